"""Stage zero: adapting the SAM teacher (pipeline.training.adapt_teacher) and evaluating it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from pipeline.cache.fingerprint import cache_dir, cache_marker, teacher_fingerprint
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from pipeline.evaluation.teacher_eval import evaluate_teacher, segment_iou, summarize_teacher_eval
from pipeline.teacher.adapted import ADAPTED_FILE, adapted_dir, effective_checkpoint
from pipeline.teacher.sam_builder import build_sam, tiny_spec
from pipeline.training.adapt_teacher import adapt_teacher

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "base.yaml"

TINY = [
    "teacher.tiny.img_size=64",
    "teacher.tiny.embed_dim=32",
    "teacher.tiny.depth=2",
    "teacher.tiny.num_heads=2",
    "teacher.tiny.global_attn_indexes=[1]",
    "teacher.tiny.window_size=0",
    "teacher.tiny.decoder_mlp_dim=64",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt_data")
    generate_synthetic_coco_panoptic(
        root,
        num_train=6,
        num_val=4,
        image_size=(48, 48),
        num_thing_classes=2,
        num_stuff_classes=2,
        seed=3,
        progress=False,
    )
    return root


def _tiny_adaptation(root, tmp_path) -> list[str]:
    """Overrides shared by the in-process and command-line adaptations: tiny data and model."""
    return [
        f"data.root={root}",
        "data.synthetic.num_train=6",
        "data.synthetic.num_val=4",
        "data.synthetic.num_tune=0",
        f"cache.root={tmp_path / 'cache'}",
        "teacher.device=cpu",
        *TINY,
        "teacher_adapt.enabled=true",
        "teacher_adapt.batch_size=2",
        "teacher_adapt.prompts_per_image=4",
        "teacher_adapt.loss_size=32",
    ]


def _cfg(root, tmp_path, *extra):
    return load_config(
        BASE,
        [
            *_tiny_adaptation(root, tmp_path),
            "teacher_adapt.lr=0.002",
            "teacher_adapt.warmup_iters=2",
            "teacher_adapt.num_workers=0",
            "teacher_adapt.log_interval=5",
            *extra,
        ],
    )


def test_adaptation_lowers_the_promptable_loss_and_is_evaluated(tiny_data, tmp_path):
    """The objective goes down and the adapted weights are what the teacher evaluation and the
    cache read. (That the prompted-mask mIoU rises is NOT asserted: a SAM trained from scratch
    for a few dozen iterations learns a prompt-blind mask first; see the README.)"""
    cfg = _cfg(
        tiny_data, tmp_path, "teacher_adapt.iters=60", "teacher_adapt.checkpoint_interval=1000"
    )
    out = adapted_dir(cfg)
    summary = adapt_teacher(cfg, progress=False)
    assert summary["finished"] and Path(summary["checkpoint"]) == out / ADAPTED_FILE
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    assert last < first, (first, last)
    assert not (out / "checkpoints").exists()  # resume state removed once the weights exist

    before = evaluate_teacher(cfg, None, split="train", progress=False)
    after = evaluate_teacher(
        cfg, effective_checkpoint(cfg), tmp_path / "after.json", split="train", progress=False
    )
    assert after["num_segments"] == before["num_segments"] > 0
    assert [r["iou"] for r in after["segments"]] != [r["iou"] for r in before["segments"]]
    written = json.loads((tmp_path / "after.json").read_text())
    assert written["miou"] == pytest.approx(after["miou"])
    assert written["checkpoint_sha256"] and len(written["segments"]) == written["num_segments"]
    # the summary is recomputable from the per-segment rows
    assert summarize_teacher_eval(written["segments"])["miou"] == pytest.approx(written["miou"])


def test_adapted_checkpoint_loads_in_segment_anything(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, "teacher_adapt.iters=2")
    adapt_teacher(cfg, progress=False)
    path = adapted_dir(cfg) / ADAPTED_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    sam = build_sam(tiny_spec(cfg.teacher.tiny))  # segment-anything's own modules
    sam.load_state_dict(state, strict=True)
    assert set(state) == set(sam.state_dict())  # official layout: no extra or missing keys


def test_adapted_vit_b_loads_in_the_official_registry(tiny_data, tmp_path):
    """A vit_b adapted from an official-layout checkpoint (mask decoder only) is read back by
    segment-anything's own ``sam_model_registry['vit_b'](checkpoint=...)``."""
    from pipeline.teacher.sam_builder import TEACHER_SPECS

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit_b = build_sam(TEACHER_SPECS["vit_b"])
    official = tmp_path / "sam_vit_b.pth"
    torch.save(vit_b.state_dict(), official)
    del vit_b
    cfg = load_config(
        BASE,
        [
            f"data.root={tiny_data}",
            "data.synthetic.num_train=6",
            "data.synthetic.num_val=4",
            "data.synthetic.num_tune=0",
            f"cache.root={tmp_path / 'cache'}",
            "teacher.device=cpu",
            "teacher.type=vit_b",
            f"teacher.checkpoint={official}",
            "teacher_adapt.enabled=true",
            "teacher_adapt.iters=1",
            "teacher_adapt.batch_size=1",
            "teacher_adapt.prompts_per_image=2",
            "teacher_adapt.train_image_encoder=false",
            "teacher_adapt.train_prompt_encoder=false",
            "teacher_adapt.loss_size=256",
            "teacher_adapt.corrective_rounds=0",
            "teacher_adapt.num_workers=0",
        ],
    )
    adapt_teacher(cfg, progress=False)
    path = adapted_dir(cfg) / ADAPTED_FILE
    loaded = sam_model_registry["vit_b"](checkpoint=str(path))
    adapted = torch.load(path, map_location="cpu", weights_only=True)
    original = torch.load(official, map_location="cpu", weights_only=True)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, adapted[k]), k
    # only the mask decoder moved
    moved = {k.split(".")[0] for k in original if not torch.equal(original[k], adapted[k])}
    assert moved == {"mask_decoder"}


def test_resume_after_stop_is_exact(tiny_data, tmp_path):
    a = _cfg(
        tiny_data, tmp_path / "a", "teacher_adapt.iters=6", "teacher_adapt.checkpoint_interval=2"
    )
    b = _cfg(
        tiny_data, tmp_path / "b", "teacher_adapt.iters=6", "teacher_adapt.checkpoint_interval=2"
    )
    adapt_teacher(a, progress=False)
    part = adapt_teacher(b, progress=False, stop_at=3)
    assert not part["finished"] and (adapted_dir(b) / "checkpoints" / "last.pth").is_file()
    assert not (adapted_dir(b) / ADAPTED_FILE).exists()
    adapt_teacher(b, progress=False)
    wa = torch.load(adapted_dir(a) / ADAPTED_FILE, weights_only=True)
    wb = torch.load(adapted_dir(b) / ADAPTED_FILE, weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = (adapted_dir(a) / "metrics.jsonl").read_text()
    lb = (adapted_dir(b) / "metrics.jsonl").read_text()
    assert la == lb  # the resumed log has no duplicate or missing rows


def test_resume_refuses_a_checkpoint_of_another_adaptation(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, "teacher_adapt.iters=4", "teacher_adapt.checkpoint_interval=1")
    adapt_teacher(cfg, progress=False, stop_at=2)
    other = _cfg(tiny_data, tmp_path, "teacher_adapt.iters=4", "teacher_adapt.lr=0.01")
    with pytest.raises(RuntimeError, match="another adaptation"):
        adapt_teacher(other, adapted_dir(cfg), progress=False)


def test_cache_fingerprint_follows_the_adapted_checkpoint(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, "teacher_adapt.iters=2")
    marker = cache_marker(cfg, "train")
    assert marker == adapted_dir(cfg) / "cache_train.json"  # known before anything runs
    with pytest.raises(FileNotFoundError, match="adapt_teacher"):
        cache_dir(cfg, "train")
    weights = adapted_dir(cfg) / ADAPTED_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"adapted v1")
    first = cache_dir(cfg, "train")
    assert cache_dir(cfg, "train") == first  # unchanged adaptation: same cache
    assert teacher_fingerprint(cfg, "train")["teacher"]["weights"].startswith("sha256:")
    import os

    weights.write_bytes(b"adapted v2")
    os.utime(weights, ns=(1, 1))  # a new adaptation (also with a stale mtime)
    assert cache_dir(cfg, "train") != first
    # adaptation off: teacher.checkpoint (random weights here) and the plain COMPLETE.json marker
    off = _cfg(tiny_data, tmp_path, "teacher_adapt.enabled=false")
    assert cache_marker(off, "train") == cache_dir(off, "train") / "COMPLETE.json"
    assert cache_dir(off, "train") != first


def test_segment_iou_and_summary_hand_computed():
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    tgt = torch.tensor([[[1, 0, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    ignore = torch.tensor([[0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    # segment 0: inter {0}, union {0, 1} (pixel 5 ignored) -> 0.5; segment 1: both empty -> 1
    assert segment_iou(pred, tgt, ignore).tolist() == [0.5, 1.0]
    rows = [
        {"iou": 0.5, "pred_iou": 0.4, "isthing": True, "train_id": 0},
        {"iou": 0.9, "pred_iou": 0.8, "isthing": True, "train_id": 0},
        {"iou": 0.7, "pred_iou": 0.9, "isthing": False, "train_id": 2},
    ]
    s = summarize_teacher_eval(rows)
    assert s["miou"] == pytest.approx(0.7)
    assert s["miou_things"] == pytest.approx(0.7) and s["miou_stuff"] == pytest.approx(0.7)
    assert s["miou_class_mean"] == pytest.approx((0.7 + 0.7) / 2)
    # Pearson of (0.4, 0.8, 0.9) with (0.5, 0.9, 0.7), by hand
    x, y = np.array([0.4, 0.8, 0.9]), np.array([0.5, 0.9, 0.7])
    r = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(
        ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum()
    )
    assert s["iou_pearson"] == pytest.approx(r)
    constant = [dict(r, pred_iou=0.0) for r in rows]
    assert summarize_teacher_eval(constant)["iou_pearson"] is None


def test_adapt_config_errors_name_the_key(tiny_data, tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train_image_encoder, train_prompt_encoder"):
        _cfg(
            tiny_data,
            tmp_path,
            "teacher_adapt.train_image_encoder=false",
            "teacher_adapt.train_prompt_encoder=false",
            "teacher_adapt.train_mask_decoder=false",
        )


def _cli_args(root, tmp_path, out, *extra):
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "adapt-teacher",
        "--config",
        str(BASE),
        "--out",
        str(out),
        "--no-progress",
    ]
    for o in [
        *_tiny_adaptation(root, tmp_path),
        "teacher_adapt.num_workers=0",
        "teacher_adapt.log_interval=1",
        *extra,
    ]:
        args += ["-o", o]
    return args


def test_sigkill_then_resume_matches(tiny_data, tmp_path):
    """Kill -9 the adaptation mid-run; the rerun ends with the weights of an uninterrupted run."""
    extra = ("teacher_adapt.iters=10", "teacher_adapt.checkpoint_interval=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        _cli_args(tiny_data, tmp_path, killed, *extra),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = killed / "checkpoints" / "last.pth"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if torch.load(ckpt, weights_only=True)["iteration"] >= 3:
                break
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = torch.load(ckpt, weights_only=True)["iteration"]
    assert 3 <= at_kill < 10, "the kill should land mid-run"
    for out in (killed, clean):
        res = subprocess.run(
            _cli_args(tiny_data, tmp_path, out, *extra),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-2000:]
    a = torch.load(clean / ADAPTED_FILE, weights_only=True)
    b = torch.load(killed / ADAPTED_FILE, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x)["iteration"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(10))


def test_non_finite_loss_names_the_term(tiny_data, tmp_path):
    cfg = _cfg(
        tiny_data,
        tmp_path,
        "teacher_adapt.iters=3",
        "teacher_adapt.lr=1e30",
        "teacher_adapt.grad_clip=null",
    )
    with pytest.raises(FloatingPointError, match=r"loss_(focal|dice|iou) is .* at iteration"):
        adapt_teacher(cfg, progress=False)


def test_ddp_two_processes_on_cpu(tiny_data, tmp_path):
    """torchrun with 2 gloo processes adapts one model; rank 0 alone writes it."""
    args = _cli_args(tiny_data, tmp_path, tmp_path / "ddp", "teacher_adapt.iters=2")
    i = args.index("pipeline")
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # a free port: test files run in parallel (pytest-xdist)
        "-m",
        *args[i:],
    ]
    res = subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / ADAPTED_FILE, weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [0, 1]


def _adapt_samples(cfg, keys):
    from pipeline.data.coco_panoptic import PanopticDataset
    from pipeline.training.adapt_teacher import AdaptDataset

    data = PanopticDataset(*cfg.split_paths("train"), transform=None, seed=0)
    ds = AdaptDataset(
        data, cfg.teacher.tiny.img_size, cfg.teacher_adapt.loss_size, cfg.teacher_adapt
    )
    return [ds[k] for k in keys]


def test_flips_mirror_image_targets_and_valid_together_and_prompts_stay_inside(tiny_data, tmp_path):
    """hflip/vflip at chance 1 against a chance so small it never fires (the same two draws,
    so the same segments are prompted): every array is the mirror of the unflipped one, and
    each positive point of a flipped sample lies on its own target."""
    tiny = "teacher_adapt.{}_prob={}"
    plain = _cfg(tiny_data, tmp_path, tiny.format("hflip", 1e-12), tiny.format("vflip", 1e-12))
    h = _cfg(tiny_data, tmp_path, tiny.format("hflip", 1), tiny.format("vflip", 1e-12))
    hv = _cfg(tiny_data, tmp_path, tiny.format("hflip", 1), tiny.format("vflip", 1))
    keys = [0, 3, 7]
    for cfg, dims in ((h, [-1]), (hv, [-1, -2])):
        for a, b in zip(_adapt_samples(plain, keys), _adapt_samples(cfg, keys)):
            assert b["targets"].shape[0] == a["targets"].shape[0] > 0
            assert torch.equal(b["targets"], a["targets"].flip(dims))
            assert torch.equal(b["valid"], a["valid"].flip(dims))
            diff = (b["image"].int() - a["image"].flip(dims).int()).abs().max()
            assert diff <= 1  # the resize of a mirrored image, up to uint8 rounding
            assert torch.equal(b["is_box"], a["is_box"])
            L = b["targets"].shape[-1]
            f = cfg.teacher.tiny.img_size / L
            for p in range(b["targets"].shape[0]):
                for (x, y), lab in zip(b["points"][p].tolist(), b["labels"][p].tolist()):
                    if lab == 1:  # frame pixel -> loss-grid cell
                        gx, gy = round((x + 0.5) / f - 0.5), round((y + 0.5) / f - 0.5)
                        assert b["targets"][p, gy, gx]
                if b["is_box"][p]:
                    ys, xs = torch.nonzero(b["targets"][p], as_tuple=True)
                    x0, y0, x1, y1 = b["boxes"][p].tolist()
                    cx, cy = (
                        (xs.float().mean() + 0.5) * f - 0.5,
                        (ys.float().mean() + 0.5) * f - 0.5,
                    )
                    assert x0 < cx < x1 and y0 < cy < y1  # the box surrounds its segment


def test_flips_off_keep_the_adaptation_identity(tiny_data, tmp_path):
    """Chance 0 (the default) leaves the identity, so the folder, of existing adaptations as it
    was; any other chance makes a new adaptation."""
    from pipeline.teacher.adapted import adapt_identity

    base = _cfg(tiny_data, tmp_path)
    off = _cfg(tiny_data, tmp_path, "teacher_adapt.hflip_prob=0", "teacher_adapt.vflip_prob=0")
    on = _cfg(tiny_data, tmp_path, "teacher_adapt.hflip_prob=0.5")
    assert "hflip_prob" not in adapt_identity(base)["teacher_adapt"]
    assert adapted_dir(off) == adapted_dir(base)
    assert adapt_identity(on)["teacher_adapt"]["hflip_prob"] == 0.5
    assert adapted_dir(on) != adapted_dir(base)
