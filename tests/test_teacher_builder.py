"""SAM builder: type specs, sam_tiny sizes and checks, default levels, seeding, sha256 sidecar."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch

from pipeline.config import SamTinyConfig
from pipeline.teacher import specs
from pipeline.teacher.sam_builder import (
    TEACHER_SPECS,
    build_teacher,
    default_layers,
    sha256_file,
    spec_for,
)

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


def test_official_specs_match_segment_anything_build_sam():
    # values of segment_anything/build_sam.py (SAM paper, appendix A)
    expect = {
        "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
        "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
        "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    }
    for name, (dim, depth, heads, glob) in expect.items():
        spec = TEACHER_SPECS[name]
        assert (spec.embed_dim, spec.depth, spec.num_heads, spec.global_attn_indexes) == (
            dim,
            depth,
            heads,
            glob,
        )
        assert (spec.img_size, spec.window_size, spec.embedding_size) == (1024, 14, 64)
        assert (spec.decoder_depth, spec.decoder_mlp_dim) == (2, 2048)


def test_vit_b_without_weights_has_official_shapes_and_default_layers(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.teacher.sam_builder"):
        sam = build_teacher("vit_b", None)
    assert "RANDOMLY INITIALISED" in caplog.text and "no knowledge" in caplog.text
    enc = sam.image_encoder
    assert enc.img_size == 1024 and len(enc.blocks) == 12
    assert enc.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert [i for i, b in enumerate(enc.blocks) if b.window_size == 0] == [2, 5, 8, 11]
    assert {b.window_size for b in enc.blocks} == {0, 14}
    assert enc.neck[0].out_channels == 256
    assert default_layers(sam) == [2, 5, 8, "neck"]
    assert not sam.training and not any(p.requires_grad for p in sam.parameters())
    assert 85e6 < sum(p.numel() for p in sam.parameters()) < 95e6  # vit_b: ~91M


def test_sam_tiny_uses_config_sizes_and_sam_embedding_width():
    sam = build_teacher("sam_tiny", None, TINY)
    enc = sam.image_encoder
    assert enc.img_size == 64 and len(enc.blocks) == 3
    assert enc.patch_embed.proj.weight.shape == (16, 3, 16, 16)
    assert [b.window_size for b in enc.blocks] == [0, 2, 0]
    assert enc.blocks[0].attn.num_heads == 2
    assert len(sam.mask_decoder.transformer.layers) == 1
    assert sam.mask_decoder.transformer.layers[0].mlp.lin1.out_features == 32
    assert sam.prompt_encoder.image_embedding_size == (4, 4)
    out = enc(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 256, 4, 4)
    assert default_layers(sam) == [0, "neck"]


def test_default_layers_keeps_a_global_block_that_is_not_last():
    tiny = TINY.model_copy(update={"global_attn_indexes": [0, 1]})
    assert default_layers(build_teacher("sam_tiny", None, tiny)) == [0, 1, "neck"]


def test_seed_makes_random_init_reproducible_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_teacher("sam_tiny", None, TINY, seed=1).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    b = build_teacher("sam_tiny", None, TINY, seed=1).state_dict()
    c = build_teacher("sam_tiny", None, TINY, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "image_encoder.patch_embed.proj.weight"
    assert not torch.equal(a[key], c[key])


@pytest.mark.parametrize(
    "update, field",
    [
        ({"global_attn_indexes": [1, 4]}, "teacher.tiny.global_attn_indexes"),
        ({"embed_dim": 18, "num_heads": 4}, "teacher.tiny.num_heads"),
        ({"img_size": 72}, "teacher.tiny.img_size"),
    ],
)
def test_inconsistent_tiny_sizes_name_the_field(update, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_teacher("sam_tiny", None, TINY.model_copy(update=update))


def test_unknown_type_names_the_field():
    with pytest.raises(ValueError, match=r"teacher\.type='vit_x'"):
        spec_for("vit_x")


# --------------------------------------------------------------------------- sha256
def test_sha256_sidecar_is_written_and_never_trusted(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert sha256_file(f) == want
    side = tmp_path / "w.pth.sha256"
    record = json.loads(side.read_text())
    assert record == {"size": 3000, "mtime_ns": f.stat().st_mtime_ns, "sha256": want}

    # a sidecar matching size and mtime is not trusted: a planted digest is ignored
    side.write_text(json.dumps({**record, "sha256": "planted"}))
    assert sha256_file(f) == want

    # same size, new mtime -> recomputed and rewritten
    os.utime(f, ns=(record["mtime_ns"] + 10**9, record["mtime_ns"] + 10**9))
    assert sha256_file(f) == want
    assert json.loads(side.read_text())["sha256"] == want

    # new content and size -> recomputed
    f.write_bytes(b"xyz")
    assert sha256_file(f) == hashlib.sha256(b"xyz").hexdigest()

    # a corrupt sidecar is ignored
    side.write_text("{not json")
    assert sha256_file(f) == hashlib.sha256(b"xyz").hexdigest()


def test_sha256_without_writable_sidecar(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    f.write_bytes(b"data")

    def refuse(*args, **kwargs):
        raise PermissionError("read-only directory")

    monkeypatch.setattr(specs.tempfile, "mkstemp", refuse)
    assert sha256_file(f) == hashlib.sha256(b"data").hexdigest()
    assert not (tmp_path / "w.pth.sha256").exists()


def test_sha256_flipped_byte_with_restored_mtime_changes_the_digest(tmp_path, caplog):
    """Issue 11 item 8: a byte flipped in place, size and mtime put back, changes the digest
    (the sidecar still matching size and mtime is not trusted) and a warning says so."""
    f = tmp_path / "sam.pth"
    data = bytearray(os.urandom(1 << 16))
    f.write_bytes(bytes(data))
    before = sha256_file(f)
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(12345)
        fh.write(bytes([data[12345] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    data[12345] ^= 0x01
    with caplog.at_level("WARNING"):
        after = sha256_file(f)
    assert after != before and after == hashlib.sha256(bytes(data)).hexdigest()
    assert "changed in place" in caplog.text


def test_sha256_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        sha256_file(tmp_path / "nope.pth")
