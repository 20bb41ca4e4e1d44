"""TimmBackbone: stride contract for any timm backbone, local ImageNet weights, frozen BatchNorm,
pretrained mean/std."""

from __future__ import annotations

import timm
import torch
import pytest

from pipeline.models.backbone import TimmBackbone


@pytest.mark.parametrize(
    "name",
    [
        "regnetx_002",
        "regnety_002",
        "regnetx_004",
        "resnet18",
        "mobilenetv3_small_050",
        "efficientnet_b0",
    ],
)
def test_strides_and_channels(name: str) -> None:
    backbone = TimmBackbone(name=name).eval()
    assert backbone.strides == [4, 8, 16, 32]
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        feats = backbone(images)
    assert len(feats) == 4
    for f, c, s in zip(feats, backbone.out_channels, backbone.strides):
        assert tuple(f.shape) == (2, c, 96 // s, 128 // s)
    # the channel list is timm's own, not a hard-coded copy
    assert (
        backbone.out_channels
        == timm.create_model(
            name, features_only=True, out_indices=(1, 2, 3, 4)
        ).feature_info.channels()
    )


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="model.backbone.name.*'resnet_51' is not a timm model"):
        TimmBackbone(name="resnet_51")


def test_backbone_without_strides_4_to_32_is_rejected() -> None:
    # a plain ViT's features_only maps are all at stride 16: a clear error, not a shape crash
    with pytest.raises(ValueError, match=r"model.backbone.name.*strides \[16, 16, 16, 16\]"):
        TimmBackbone(name="vit_tiny_patch16_224")


@pytest.mark.parametrize(
    "name, mean, std",
    [
        ("regnetx_002", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("inception_v3", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_mean_std_from_timm_pretrained_config(name, mean, std) -> None:
    backbone = TimmBackbone(name=name)
    assert backbone.pixel_mean == pytest.approx(mean) and backbone.pixel_std == pytest.approx(std)


def test_loads_local_checkpoint_exactly(tmp_path) -> None:
    torch.manual_seed(1)
    reference = timm.create_model("regnetx_002", pretrained=False)  # official classification layout
    path = tmp_path / "regnetx_002.pth"
    torch.save(reference.state_dict(), path)

    torch.manual_seed(2)
    backbone = TimmBackbone(name="regnetx_002", pretrained_path=str(path))
    loaded = backbone.body.state_dict()
    stored = torch.load(path, weights_only=True)
    assert loaded.keys() <= stored.keys()
    for key, value in loaded.items():
        assert torch.equal(value, stored[key]), key
    # a randomly initialised backbone differs, so the equality above is meaningful
    random = TimmBackbone(name="regnetx_002").body.state_dict()
    assert not torch.equal(random["s1.b1.conv1.conv.weight"], loaded["s1.b1.conv1.conv.weight"])


def test_checkpoint_under_state_dict_key(tmp_path) -> None:
    reference = timm.create_model("regnety_002", pretrained=False)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    backbone = TimmBackbone(name="regnety_002", pretrained_path=path)
    assert torch.equal(
        backbone.body.state_dict()["stem.conv.weight"], reference.state_dict()["stem.conv.weight"]
    )


def test_missing_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "nowhere" / "regnetx_002.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/regnetx_002.pth"):
        TimmBackbone(name="regnetx_002", pretrained_path=str(path))


@pytest.mark.parametrize("other", ["regnety_002", "regnetx_004"])
def test_other_architecture_is_a_clear_error(tmp_path, other: str) -> None:
    path = tmp_path / f"{other}.pth"
    torch.save(timm.create_model(other, pretrained=False).state_dict(), path)
    with pytest.raises(
        ValueError, match=f"{other}.pth does not hold weights of the timm model 'regnetx_002'"
    ):
        TimmBackbone(name="regnetx_002", pretrained_path=str(path))


def test_partial_checkpoint_is_an_error(tmp_path) -> None:
    state = timm.create_model("regnetx_002", pretrained=False).state_dict()
    del state["s3.b1.conv2.conv.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="1 missing .*s3.b1.conv2.conv.weight"):
        TimmBackbone(name="regnetx_002", pretrained_path=str(path))


def test_not_a_checkpoint_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        TimmBackbone(name="regnetx_002", pretrained_path=str(path))


def test_freeze_bn_keeps_statistics_and_affine() -> None:
    backbone = TimmBackbone(name="regnetx_002", freeze_bn=True)
    backbone.train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.requires_grad for m in convs)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone(torch.randn(2, 3, 64, 64) * 3 + 1).__getitem__(-1).sum().backward()
    after = backbone.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # the same keys as an unfrozen backbone, so checkpoints move between the two settings
    assert set(after) == set(TimmBackbone(name="regnetx_002").state_dict())


def test_unfrozen_bn_updates_statistics() -> None:
    backbone = TimmBackbone(name="regnetx_002").train()
    before = backbone.body.state_dict()["stem.bn.running_mean"].clone()
    backbone(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert not torch.equal(before, backbone.body.state_dict()["stem.bn.running_mean"])
