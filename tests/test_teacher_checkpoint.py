"""Teacher checkpoints: official-layout round trips and a clear error for every bad file."""

from __future__ import annotations

import logging

import pytest
import torch
from segment_anything import sam_model_registry

from pipeline.config import SamTinyConfig
from pipeline.teacher.sam_builder import CheckpointError, build_teacher, identify_checkpoint

TINY = SamTinyConfig(
    img_size=64,
    embed_dim=16,
    depth=3,
    num_heads=2,
    global_attn_indexes=[0, 2],
    window_size=2,
    decoder_depth=1,
    decoder_mlp_dim=32,
)


def _randomise(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every float tensor redrawn, so none equals a freshly built model's (zero pos_embed etc.)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else v
        for k, v in state_dict.items()
    }


@pytest.fixture(scope="session")
def vit_b_checkpoint(tmp_path_factory):
    """A vit_b state dict in the official layout (built by segment-anything's own registry)."""
    state = _randomise(sam_model_registry["vit_b"]().state_dict(), seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    state = _randomise(build_teacher("sam_tiny", None, TINY).state_dict(), seed=2)
    path = tmp_path_factory.mktemp("tiny") / "sam_tiny.pth"
    torch.save(state, path)
    return path, state


def _assert_loaded(sam, state):
    loaded = sam.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_vit_b_official_layout_round_trip(vit_b_checkpoint, caplog):
    path, state = vit_b_checkpoint
    with caplog.at_level(logging.WARNING, logger="pipeline.teacher.sam_builder"):
        sam = build_teacher("vit_b", str(path))
    assert "RANDOMLY" not in caplog.text
    _assert_loaded(sam, state)
    assert not sam.training and not any(p.requires_grad for p in sam.parameters())
    assert identify_checkpoint(state) == "vit_b"


def test_sam_tiny_round_trip(tiny_checkpoint):
    path, state = tiny_checkpoint
    _assert_loaded(build_teacher("sam_tiny", path, TINY, seed=5), state)
    assert identify_checkpoint(state, TINY) == "sam_tiny"
    assert identify_checkpoint(state) is None  # not an official type


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_teacher("vit_b", tmp_path / "absent.pth")


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint[0].read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: cannot read"):
        build_teacher("sam_tiny", bad, TINY)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pth: cannot read"):
        build_teacher("sam_tiny", bad, TINY)


def test_not_a_state_dict(tmp_path):
    bad = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], bad)
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a state dict .* got list"):
        build_teacher("sam_tiny", bad, TINY)


def test_wrapped_state_dict_names_the_wrapper(tiny_checkpoint, tmp_path):
    bad = tmp_path / "wrapped.pth"
    torch.save({"model": tiny_checkpoint[1], "epoch": 3}, bad)
    with pytest.raises(CheckpointError, match=r"wrapped\.pth: not a flat state dict.*'model'"):
        build_teacher("sam_tiny", bad, TINY)


@pytest.mark.parametrize(
    "found, width, blocks, config",
    [
        ("vit_h", 1280, 32, "vit_b"),
        ("vit_l", 1024, 24, "vit_b"),
        ("vit_b", 768, 12, "vit_h"),
    ],
)
def test_weights_of_another_type(tmp_path, found, width, blocks, config):
    # the few distinguishing tensors are enough: detection happens before building the model
    fake = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16),
        f"image_encoder.blocks.{blocks - 1}.norm1.weight": torch.ones(width),
    }
    path = tmp_path / f"{found}.pth"
    torch.save(fake, path)
    pattern = rf"{found}\.pth: checkpoint looks like {found} .*config says {config}"
    with pytest.raises(CheckpointError, match=pattern):
        build_teacher(config, path)


def test_tiny_weights_for_vit_b_config(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="looks like sam_tiny.*config says vit_b"):
        build_teacher("vit_b", tiny_checkpoint[0], TINY)


def test_unknown_encoder_shape(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(
        {
            "image_encoder.patch_embed.proj.weight": torch.zeros(40, 3, 16, 16),
            "image_encoder.blocks.6.norm1.weight": torch.ones(40),
        },
        path,
    )
    with pytest.raises(
        CheckpointError,
        match=r"odd\.pth: checkpoint has embed_dim 40, 7 blocks, "
        r"which matches no SAM type",
    ):
        build_teacher("sam_tiny", path, TINY)


def test_missing_and_unexpected_keys_are_listed(tiny_checkpoint, tmp_path):
    state = dict(tiny_checkpoint[1])
    del state["mask_decoder.iou_token.weight"]
    del state["prompt_encoder.no_mask_embed.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        build_teacher("sam_tiny", path, TINY)
    msg = str(info.value)
    assert msg.startswith(str(path))
    assert "2 missing keys" in msg and "mask_decoder.iou_token.weight" in msg
    assert "prompt_encoder.no_mask_embed.weight" in msg
    assert "1 unexpected keys" in msg and "mask_decoder.extra_head.weight" in msg


def test_mis_shaped_tensor_is_listed(tiny_checkpoint, tmp_path):
    state = dict(tiny_checkpoint[1])
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match=r"shape\.pth: .*mask_decoder\.iou_token\.weight: "
        r"\(1, 128\) vs \(1, 256\)",
    ):
        build_teacher("sam_tiny", path, TINY)


def test_ddp_prefix_gets_a_hint(tiny_checkpoint, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in tiny_checkpoint[1].items()}, path)
    with pytest.raises(CheckpointError, match=r"ddp\.pth: .*'module\.' prefix"):
        build_teacher("sam_tiny", path, TINY)
