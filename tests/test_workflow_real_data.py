"""The README's real-data commands, as a user types them, against tiny datasets in the official
COCO panoptic and Cityscapes layouts with official-layout checkpoints.

Dry runs (``snakemake -n``) plan every command of "## Using real data"; one real run executes
the whole chain on a tiny COCO-layout dataset with a sam_tiny checkpoint in the official layout.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.workflow_helpers import (
    ROOT,
    env,
    job_counts,
    readme_commands,
    run_snakemake,
    workspace,
    write_cityscapes_raw,
    write_coco_panoptic,
    write_sam_checkpoint,
)

# Aggregation rules (no shell) are not counted.
TARGET_RULES = {"all", "ablation", "sweep", "progressive", "train_student", "evaluate", "predict"}
# the main chain; real-data configs cache the official checkpoint as it is (no adaptation), and
# the teacher's prompted-mask quality is evaluated once
CHAIN = {
    "cache_teacher": 1,
    "train_run": 1,
    "evaluate_run": 1,
    "predict_run": 1,
    "evaluate_teacher": 1,
}


def expected_jobs(target: str | None, dataset: str) -> dict[str, int]:
    """Jobs a README command must plan on a fresh dataset (Cityscapes: not yet converted)."""
    runs = {None: None, "ablation": 5, "sweep": 12, "progressive": 3}
    if target == "cache_teacher":
        jobs = {"cache_teacher": 1}
    elif target == "convert_cityscapes":
        jobs = {}
    elif target in runs:
        n = runs[target]
        jobs = (
            dict(CHAIN)
            if n is None
            else {
                "cache_teacher": 1,
                "train_run": n,
                "evaluate_run": n,
                "report_runs": 1,
                "evaluate_teacher": 1,
            }
        )
    else:
        raise AssertionError(f"README command with target {target!r} has no expectation here")
    if dataset == "cityscapes" and target != "cache_teacher" or target == "convert_cityscapes":
        jobs["convert_cityscapes"] = 1
    return jobs


def parse(command: str) -> tuple[str | None, str]:
    """(target, dataset folder of main) of a README command."""
    words = command.split()
    head = words[: words.index("--config")] if "--config" in words else words
    targets = [
        w
        for i, w in enumerate(head[1:], 1)
        if not w.startswith("-") and head[i - 1] not in ("--cores", "--profile", "-c")
    ]
    main = next(w.split("=", 1)[1] for w in words if w.startswith("main="))
    assert len(targets) <= 1, command
    return (targets[0] if targets else None), main.split("/")[1]


@pytest.fixture(scope="module")
def real_data_workspace(tmp_path_factory):
    """configs/ and workflow/ of this checkout, datasets/coco, datasets/cityscapes (official
    tree, not converted) and checkpoints/ at the paths the shipped configs name. The vit_h file
    is an official-layout state dict of sam_tiny size: a dry run only hashes it."""
    ws = workspace(tmp_path_factory.mktemp("ws"))
    write_coco_panoptic(ws / "datasets" / "coco")
    write_cityscapes_raw(ws / "datasets" / "cityscapes")
    write_sam_checkpoint(ws / "checkpoints" / "sam_vit_h_4b8939.pth")
    torch.save({}, ws / "checkpoints" / "regnetx_016.pth")  # existence only in a dry run
    return ws


def test_readme_lists_every_real_data_command():
    commands = readme_commands("Using real data")
    planned = {parse(c) for c in commands}
    for case in [
        (None, "coco"),
        ("cache_teacher", "coco"),
        ("ablation", "coco"),
        ("sweep", "coco"),
        ("progressive", "coco"),
        ("convert_cityscapes", "cityscapes"),
        (None, "cityscapes"),
    ]:
        assert case in planned, f"README '## Using real data' lacks the command for {case}"
    for c in commands:  # targets first: `--config` swallows every word after it
        words = c.split()
        if "--config" in words:
            assert all("=" in w for w in words[words.index("--config") + 1 :]), c


@pytest.mark.parametrize("command", readme_commands("Using real data"))
def test_readme_real_data_command_plans_the_expected_jobs(real_data_workspace, command):
    res = run_snakemake(command, real_data_workspace, "-n", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    target, dataset = parse(command)
    counts = {k: v for k, v in job_counts(res.stdout).items() if k not in TARGET_RULES}
    assert counts == expected_jobs(target, dataset), command
    assert "synthetic_data" not in res.stdout


@pytest.mark.parametrize("command", readme_commands("Workflow targets"))
def test_readme_profile_commands_plan_the_main_chain(real_data_workspace, command):
    if "profiles/slurm" in command:
        pytest.importorskip(
            "snakemake_executor_plugin_slurm",
            reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')",
        )
    res = run_snakemake(command, real_data_workspace, "-n", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = {k: v for k, v in job_counts(res.stdout).items() if k not in TARGET_RULES}
    # the embedded default adapts its teacher first and evaluates it before and after
    expected = (
        dict(CHAIN)
        if "main=configs/coco" in command
        else {**CHAIN, "synthetic_data": 1, "adapt_teacher": 1, "evaluate_teacher": 2}
    )
    assert counts == expected, command


def test_converted_cityscapes_plans_no_conversion(tmp_path):
    from pipeline.data.cityscapes import convert_cityscapes

    ws = workspace(tmp_path)
    convert_cityscapes(write_cityscapes_raw(ws / "datasets" / "cityscapes"))
    write_sam_checkpoint(ws / "checkpoints" / "sam_vit_h_4b8939.pth")
    torch.save({}, ws / "checkpoints" / "regnetx_016.pth")
    res = run_snakemake(
        "snakemake --cores 2 --config main=configs/cityscapes/regnet_distill.yaml",
        ws,
        "-n",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    counts = {k: v for k, v in job_counts(res.stdout).items() if k not in TARGET_RULES}
    assert counts == CHAIN


def test_missing_files_stop_with_one_paragraph_each(tmp_path):
    ws = workspace(tmp_path)
    res = run_snakemake(
        "snakemake --cores 2 --config main=configs/coco/regnet_distill.yaml", ws, "-n", timeout=300
    )
    assert res.returncode != 0
    err = res.stderr
    assert "Traceback" not in err and 'File "' not in err, err
    paragraphs = err.split("error: ", 1)[1].split("\n\n")
    assert len(paragraphs) == 3, err
    ckpt, data, backbone = paragraphs
    assert ckpt.startswith("teacher.checkpoint = checkpoints/sam_vit_h_4b8939.pth: file not found")
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in ckpt
    assert data.startswith("data.root = datasets/coco does not exist")
    assert "annotations/panoptic_train2017/" in data and "val2017/" in data
    assert backbone.startswith("model.backbone.pretrained_path = checkpoints/regnetx_016.pth")
    assert "timm.create_model('regnetx_016', pretrained=True)" in backbone

    # a partial dataset names exactly the missing keys
    write_coco_panoptic(ws / "datasets" / "coco")
    (ws / "datasets" / "coco" / "annotations" / "panoptic_val2017.json").unlink()
    res = run_snakemake(
        "snakemake --cores 2 --config main=configs/coco/regnet_distill.yaml", ws, "-n", timeout=300
    )
    assert (
        "data.root = datasets/coco lacks data.val.json = annotations/panoptic_val2017.json."
        in res.stderr
    ), res.stderr
    # --debug shows the traceback
    res = run_snakemake(
        "snakemake --cores 2 --config main=configs/coco/regnet_distill.yaml",
        ws,
        "-n",
        "--debug",
        timeout=300,
    )
    assert res.returncode != 0 and "MissingInputError" in res.stdout + res.stderr


def test_cli_missing_checkpoint_is_one_message(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "cache-teacher",
        "--config",
        str(ROOT / "configs/coco/regnet_distill.yaml"),
        "-o",
        f"data.root={tmp_path}",
    ]
    write_coco_panoptic(tmp_path)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(
        "error: teacher.checkpoint = checkpoints/sam_vit_h_4b8939.pth: file not found"
    ), res.stderr
    assert len(res.stderr.strip().splitlines()) == 2  # the paragraph + the --debug hint
    res = subprocess.run(
        [*cmd[:3], "--debug", *cmd[3:]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
        timeout=300,
    )
    assert "Traceback" in res.stderr and "MissingInputError" in res.stderr


TINY_SAM = dict(
    img_size=64,
    embed_dim=32,
    depth=4,
    num_heads=2,
    global_attn_indexes=[0, 1, 2, 3],
    window_size=0,
    decoder_mlp_dim=64,
)


def write_tiny_config(path, **sections) -> None:
    """configs/coco/regnet_distill.yaml at a size a CPU runs in a minute: sam_tiny teacher from an
    official-layout checkpoint, regnetx_002 from a timm state dict, 64x64 images, 4 iterations;
    ``sections`` update the sections (e.g. ``training={"device": "cpu"}``)."""
    import yaml

    cfg = {
        "_base_": str(ROOT / "configs/coco/regnet_distill.yaml"),
        "experiment": "coco_tiny",
        "data": {
            "crop_size": [64, 64],
            "test_size": 64,
            "scale_range": [0.8, 1.2],
            "num_workers": 0,
        },
        "teacher": {"type": "sam_tiny", "checkpoint": "checkpoints/sam_tiny.pth", "tiny": TINY_SAM},
        "cache": {"channels": 16, "mask_size": 16, "pca_samples": 2, "n_workers": 1},
        "model": {
            "backbone": {"name": "regnetx_002", "pretrained_path": "checkpoints/regnetx_002.pth"},
            "neck": {"channels": 32},
            "head": {"num_queries": 8, "num_stages": 1, "ffn_dim": 64},
            "loss": {"num_points": 256},
            "resolution_distill": {"feat_channels": 16},
            "sam_distill": {"num_points": 64},
        },
        "training": {
            "max_iters": 4,
            "batch_size": 2,
            "warmup_iters": 1,
            "checkpoint_interval": 2,
            "log_interval": 2,
            "amp": False,
            "num_threads": 1,
        },
        "evaluation": {"num_visualize": 1},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))


def test_main_chain_runs_on_a_tiny_coco_layout_dataset(tmp_path):
    import timm

    ws = workspace(tmp_path)
    write_coco_panoptic(ws / "datasets" / "coco", num_train=4, num_val=2)
    write_sam_checkpoint(ws / "checkpoints" / "sam_tiny.pth", TINY_SAM)
    torch.manual_seed(0)
    torch.save(
        timm.create_model("regnetx_002").state_dict(), ws / "checkpoints" / "regnetx_002.pth"
    )
    write_tiny_config(ws / "tiny" / "regnet_distill.yaml")

    res = run_snakemake(
        "snakemake --cores 2 --config main=tiny/regnet_distill.yaml threads=1", ws, timeout=900
    )
    assert res.returncode == 0, res.stderr[-4000:]
    main = ws / "runs" / "main"
    metrics = json.loads((main / "eval" / "metrics.json").read_text())
    assert {"All", "Things", "Stuff"} <= set(metrics)
    assert (main / "predict" / "predictions.json").is_file()
    info = json.loads((main / "run_info.json").read_text())
    assert info["config"]["teacher"]["type"] == "sam_tiny" and info["cache_path"]
    # progress lines in the rule's log, at log_interval
    log = (ws / "logs" / "train" / "main.log").read_text()
    lines = [ln for ln in log.splitlines() if " iter " in ln and " it/s" in ln]
    assert [ln.split(" iter ", 1)[1].split()[0] for ln in lines] == ["2/4", "4/4"], log
    assert "loss_sam_distill" in lines[0] and "ETA" in lines[0]
    # the closing message: where the results are and the headline PQ
    pq = f"PQ {metrics['All']['pq']:.1f}  SQ {metrics['All']['sq']:.1f}"
    assert "RegSAM results under runs/" in res.stdout + res.stderr
    assert f"main: {pq}" in res.stdout + res.stderr

    # the training checkpoint evaluates like final.pth (it holds the same weights at the end)
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "evaluate",
        "--config",
        "tiny/regnet_distill.yaml",
        "--checkpoint",
        str(main / "checkpoints" / "last.pth"),
        "--out",
        str(tmp_path / "ev"),
    ]
    ev = subprocess.run(cmd, capture_output=True, text=True, cwd=ws, env=env(), timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["All"] == metrics["All"]


def test_train_run_with_two_gpus_launches_torchrun(tmp_path):
    """`gpus=2` trains under torchrun with two processes (here on the CPU, gloo) to final.pth."""
    ws = workspace(tmp_path)
    write_coco_panoptic(ws / "datasets" / "coco", num_train=4, num_val=1)
    write_tiny_config(
        ws / "tiny" / "baseline.yaml",
        training={"device": "cpu"},
        model={
            "use_learnable_fusion": False,
            "use_resolution_distill": False,
            "use_sam_distill": False,
            "backbone": {"name": "regnetx_002", "pretrained_path": None},
        },
    )
    write_sam_checkpoint(ws / "checkpoints" / "sam_tiny.pth", TINY_SAM)  # hashed for the cache dir
    res = run_snakemake(
        "snakemake --cores 2 train_student --config main=tiny/baseline.yaml gpus=2 threads=1",
        ws,
        "-p",
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert (
        "torchrun --standalone --nproc_per_node 2 -m pipeline --parent-pid $PPID train"
        in res.stdout + res.stderr
    )
    info = json.loads((ws / "runs" / "main" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "done"


def test_cli_missing_unlabelled_folder_is_one_paragraph(tmp_path):
    """`cache-teacher --split unlabeled` with a data.unlabeled folder that does not exist: the
    preflight paragraph names the key and the path, no traceback."""
    write_coco_panoptic(tmp_path)
    ckpt = tmp_path / "sam_vit_h_4b8939.pth"
    ckpt.write_bytes(b"x")  # exists; never opened, the preflight stops first
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "cache-teacher",
        "--config",
        str(ROOT / "configs/coco/regnet_distill.yaml"),
        "--split",
        "unlabeled",
        "-o",
        f"data.root={tmp_path}",
        "-o",
        f"teacher.checkpoint={ckpt}",
        "-o",
        "data.unlabeled=[unlabeled2017]",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(
        f"error: unlabelled images not found under data.root = {tmp_path}: "
        f"data.unlabeled[0].images = unlabeled2017 (folder {tmp_path / 'unlabeled2017'})."
    ), res.stderr
