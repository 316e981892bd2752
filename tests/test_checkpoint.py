"""Inference checkpoints: exact round trip for every preset, fsspec URLs, clear errors, and no pickle."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

import gq
from gq import checkpoint as ckpt


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config("small-f8c16", 0.5))
    model.tdc.lam.fill_(3.25)
    model.tdc.lam_min.fill_(0.125)
    model.tdc.lam_max.fill_(17.5)
    model.tdc.updates.fill_(123)
    return model


@pytest.fixture(scope="module")
def small_bytes(small):
    return ckpt.checkpoint_bytes(small, {"data": "x", "steps": 5})


def uint8_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


# the other paper presets (100-175M parameters) round-trip in tests/test_vit.py and tests/test_presets.py
@pytest.mark.parametrize("preset", ["paper-f8c16", "small-f8c16", "small-f16c14"])
def test_round_trip_every_preset(tmp_path, preset):
    torch.manual_seed(1)
    bpp = {"paper-f8c16": 0.25, "small-f8c16": 1.0}.get(preset)
    model = gq.GQVAE(gq.model_config(preset, bpp)).eval()
    model.tdc.lam.fill_(2.5)
    model.tdc.lam_min.fill_(0.01)
    model.tdc.lam_max.fill_(40.0)
    model.tdc.updates.fill_(7)
    path = tmp_path / "m.safetensors"
    sha = gq.save(model, str(path), {"data": "shards", "steps": 7})
    loaded = gq.load(str(path))
    assert loaded.checkpoint_sha256 == sha
    assert loaded.config == model.config
    assert loaded.provenance == {"data": "shards", "steps": 7}
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert float(loaded.tdc.lam) == 2.5 and float(loaded.tdc.lam_min) == 0.01
    assert float(loaded.tdc.lam_max) == 40.0 and int(loaded.tdc.updates) == 7
    assert loaded.codebook_fingerprint == model.codebook_fingerprint
    size = 32 if preset == "paper-f8c16" else 64
    x = uint8_images(2, size)
    assert torch.equal(model.tokenize(x), loaded.tokenize(x))


@pytest.mark.parametrize("bpp", [0.25, 0.5])
def test_every_operating_point_config_survives(tmp_path, bpp):
    model = gq.GQVAE(gq.model_config("small-f8c16", bpp, kl_mode="kl", kl_weight=0.1, layout="contiguous"))
    gq.save(model, str(tmp_path / "m.safetensors"))
    assert gq.load(str(tmp_path / "m.safetensors")).config == model.config


def test_memory_url(small):
    url = "memory://gq-test/ckpt/model.safetensors"
    gq.save(small, url, {"steps": 1})
    loaded = gq.load(url)
    assert float(loaded.tdc.lam) == 3.25 and int(loaded.tdc.updates) == 123
    x = uint8_images(1, 64, 3)
    assert torch.equal(small.eval().tokenize(x), loaded.tokenize(x))


def write(tmp_path, data: bytes) -> str:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    return str(path)


def test_random_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    with pytest.raises(gq.CheckpointError, match="not a safetensors file"):
        gq.load(write(tmp_path, data))
    with pytest.raises(gq.CheckpointError):
        gq.load(write(tmp_path, b"abc"))


def test_safetensors_without_our_metadata(tmp_path):
    data = st_save({"w": torch.zeros(3)}, metadata={"format": "pt"})
    with pytest.raises(gq.CheckpointError, match="not a gq-tokenizer checkpoint"):
        gq.load(write(tmp_path, data))


def test_truncated_in_header(tmp_path, small_bytes):
    with pytest.raises(gq.CheckpointError, match="truncated inside its header"):
        gq.load(write(tmp_path, small_bytes[:100]))


def test_truncated_in_data(tmp_path, small_bytes):
    with pytest.raises(gq.CheckpointError, match="truncated"):
        gq.load(write(tmp_path, small_bytes[: len(small_bytes) - 1000]))


def rewrite_config(data: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    config = json.loads(header["__metadata__"]["config"])
    change(config)
    header["__metadata__"]["config"] = json.dumps(config)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_unknown_config_version(tmp_path, small_bytes):
    data = rewrite_config(small_bytes, lambda c: c.update(version=99))
    with pytest.raises(gq.CheckpointError, match="version"):
        gq.load(write(tmp_path, data))


def test_unknown_config_field(tmp_path, small_bytes):
    data = rewrite_config(small_bytes, lambda c: c["network"].update(new_knob=3))
    with pytest.raises(gq.CheckpointError, match="cannot build"):
        gq.load(write(tmp_path, data))


def test_load_never_unpickles(tmp_path, small, monkeypatch):
    path = str(tmp_path / "m.safetensors")
    gq.save(small, path)

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = gq.load(path)
    assert float(loaded.tdc.lam) == 3.25


def test_a_pickle_checkpoint_is_refused_with_the_way_to_convert_it(tmp_path, monkeypatch):
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("must not unpickle"))
    with pytest.raises(gq.CheckpointError, match="jobs/convert.py from-official"):
        gq.load(str(path))


def test_a_header_length_starting_with_byte_0x80_is_no_pickle(small):
    """A safetensors header of 0x..80 bytes begins the file with 0x80, as a bare pickle does: it loads."""
    for pad in range(256):
        data = ckpt.checkpoint_bytes(small, {"pad": "x" * pad})
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    loaded = ckpt.load_bytes(data)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))
    with pytest.raises(gq.CheckpointError, match="pickle"):
        ckpt.load_bytes(pickle.dumps({"state_dict": {}}, protocol=4))
