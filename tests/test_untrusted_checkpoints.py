"""Untrusted files: a crafted pickle at every checkpoint entry point runs no code.

Each test writes a torch file whose pickle calls ``open(marker, "w")`` when unpickled by the
unsafe loader (``weights_only=False``), hands it to one entry point (resume, init_from,
evaluate, predict, report/export complexity, teacher, backbone) and checks that the marker file
was never created and that the error names the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.training.checkpoint import CheckpointReadError, UntrustedCheckpointError
from pipeline.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this with the unsafe loader creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_file(path: Path, marker: Path, wrap: str | None = None) -> Path:
    payload = _Payload(marker)
    obj = (
        {"iteration": 1, "model": payload, "student": payload} if wrap is None else {wrap: payload}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def tiny_cfg(data_root: Path, *extra: str):
    return load_config(
        ROOT / "configs/reg_sam/baseline.yaml",
        [
            f"data.root={data_root}",
            "data.crop_size=[64, 64]",
            "data.test_size=64",
            "data.num_workers=0",
            "model.neck.channels=16",
            "model.head.num_queries=4",
            "model.head.num_stages=1",
            "model.head.ffn_dim=32",
            "model.loss.num_points=64",
            "training.batch_size=2",
            "training.max_iters=2",
            "training.warmup_iters=1",
            "training.num_threads=1",
            *extra,
        ],
    )


def _refused(exc: BaseException, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the pickle ran code"
    assert str(path) in str(exc)


def test_resume_refuses_a_malicious_last_checkpoint(tmp_path, data_root):
    marker = tmp_path / "pwned"
    work = tmp_path / "run"
    path = malicious_file(work / "checkpoints" / "last.pth", marker)
    with pytest.raises(UntrustedCheckpointError) as info:
        Trainer(tiny_cfg(data_root), work, progress=False).train()
    _refused(info.value, path, marker)
    assert "weights_only" in str(info.value)


@pytest.mark.parametrize("name", ["stage0.pth", "final.pth"])
def test_init_from_refuses_a_malicious_file(tmp_path, data_root, name):
    marker = tmp_path / "pwned"
    path = malicious_file(tmp_path / name, marker)
    cfg = tiny_cfg(data_root, f"training.init_from={path}")
    with pytest.raises(UntrustedCheckpointError) as info:
        Trainer(cfg, tmp_path / "run", progress=False).train()
    _refused(info.value, path, marker)


def test_evaluate_and_predict_refuse_a_malicious_model_file(tmp_path, data_root):
    from pipeline.evaluation.run import evaluate_checkpoint, predict_checkpoint

    marker = tmp_path / "pwned"
    path = malicious_file(tmp_path / "final.pth", marker)
    with pytest.raises(UntrustedCheckpointError) as info:
        evaluate_checkpoint(tiny_cfg(data_root), path, tmp_path / "eval")
    _refused(info.value, path, marker)
    with pytest.raises(UntrustedCheckpointError) as info:
        predict_checkpoint(path, data_root / "val", tmp_path / "pred", device="cpu")
    _refused(info.value, path, marker)


def test_report_complexity_refuses_a_malicious_model_file(tmp_path):
    from pipeline.report.report import student_complexity

    marker = tmp_path / "pwned"
    path = malicious_file(tmp_path / "final.pth", marker)
    with pytest.raises(Exception) as info:
        student_complexity(path, (1, 3, 64, 64), device="cpu", warmup=0, iters=1)
    _refused(info.value, path, marker)


def test_teacher_checkpoint_refuses_a_malicious_file(tmp_path):
    from pipeline.teacher.sam_builder import CheckpointError, build_teacher

    marker = tmp_path / "pwned"
    path = malicious_file(
        tmp_path / "sam.pth", marker, wrap="image_encoder.patch_embed.proj.weight"
    )
    with pytest.raises(CheckpointError) as info:
        build_teacher("sam_tiny", path)
    _refused(info.value, path, marker)


def test_backbone_pretrained_path_refuses_a_malicious_file(tmp_path):
    from pipeline.models.backbone import RegNetBackbone

    marker = tmp_path / "pwned"
    path = malicious_file(tmp_path / "regnet.pth", marker, wrap="stem.conv.weight")
    with pytest.raises(ValueError) as info:
        RegNetBackbone(name="regnetx_002", pretrained_path=path)
    _refused(info.value, path, marker)


def test_truncated_checkpoint_is_a_read_error_naming_the_file(tmp_path):
    from pipeline.training.checkpoint import load_checkpoint

    path = tmp_path / "last.pth"
    torch.save({"iteration": 3, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointReadError, match="last.pth"):
        load_checkpoint(path)
