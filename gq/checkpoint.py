"""Inference checkpoints: one `.safetensors` file (weights + JSON metadata), any fsspec URL, never pickled.

Metadata keys (all strings): `format` = "gq-tokenizer/gqvae", `config` (ModelConfig JSON), `codebook`
(recipe) and `codebook_fingerprint`, `tdc_state` (multipliers), `provenance` (data, steps, git commit, ...),
`gq_version`.
"""

from __future__ import annotations

import hashlib
import json
import struct

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gq.model import GQVAE, ModelConfig, ModelIdentity
from gq.storage import write_atomic
from gq.version import __version__

FORMAT = "gq-tokenizer/gqvae"


class CheckpointError(ValueError):
    """The file is not a gq-tokenizer checkpoint, is damaged, or holds a config this version cannot build."""


def checkpoint_bytes(model: GQVAE, provenance: dict | None = None) -> bytes:
    """The checkpoint file's bytes (safetensors with our metadata)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tdc = model.tdc
    meta = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
        "codebook": json.dumps(model.config.quantizer.codebook.to_dict(), sort_keys=True),
        "codebook_fingerprint": model.codebook_fingerprint,
        "tdc_state": json.dumps(
            {k: float(getattr(tdc, k)) for k in ("lam", "lam_min", "lam_max")} | {"updates": int(tdc.updates)}
        ),
        "provenance": json.dumps(provenance or {}, sort_keys=True),
        "gq_version": __version__,
    }
    return st_save(tensors, metadata=meta)


def save(model: GQVAE, url: str, provenance: dict | None = None) -> str:
    """Write the checkpoint to a local path or fsspec URL (atomically: `storage.write_atomic`); its sha256."""
    data = checkpoint_bytes(model, provenance)
    write_atomic(url, data)
    return hashlib.sha256(data).hexdigest()


def read_metadata(data: bytes, name: str = "checkpoint") -> dict[str, str]:
    """The safetensors header's `__metadata__`, with a clear error for anything that is not ours."""
    if len(data) < 8:
        raise CheckpointError(f"{name}: {len(data)} bytes, not a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    # a torch.save zip archive, or a bare pickle (protocol 2+: 0x80 then the protocol number); a safetensors
    # header's length can start with byte 0x80 too, so that alone is no pickle: its JSON header tells
    safetensors = data[8:9] == b"{" and header_len <= len(data) - 8
    if data[:4] == b"PK\x03\x04" or (
        data[:1] == b"\x80" and data[1:2] in b"\x02\x03\x04\x05" and not safetensors
    ):
        raise CheckpointError(
            f"{name}: a PyTorch pickle checkpoint, not a gq-tokenizer one; convert an official GQ .ckpt "
            "with `python jobs/convert.py from-official --checkpoint CKPT --config YAML --output OUT`"
        )
    if header_len > len(data) - 8:
        raise CheckpointError(f"{name}: not a safetensors file, or truncated inside its header")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: not a safetensors file")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{name}: a safetensors file, but not a gq-tokenizer checkpoint ({FORMAT})")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > len(data):
        need = 8 + header_len + end
        raise CheckpointError(f"{name}: truncated ({len(data)} bytes, its header needs {need})")
    return meta


def _config(meta: dict[str, str], name: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: holds a model config this version cannot build: {e}") from None


def load_bytes(data: bytes, name: str = "checkpoint", map_location: str | torch.device = "cpu") -> GQVAE:
    """Build the model from checkpoint bytes; in eval mode, on `map_location`."""
    meta = read_metadata(data, name)
    model = GQVAE(_config(meta, name))
    if model.codebook_fingerprint != meta.get("codebook_fingerprint"):
        raise CheckpointError(
            f"{name}: codebook rebuilt from its recipe has fingerprint {model.codebook_fingerprint[:16]}, "
            f"the checkpoint says {str(meta.get('codebook_fingerprint'))[:16]}"
        )
    try:
        tensors = st_load(data)
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{name}: weights do not match its config: {e}") from None
    model.checkpoint_sha256 = hashlib.sha256(data).hexdigest()
    model.provenance = json.loads(meta.get("provenance", "{}"))
    return model.to(map_location).eval()


def load(url: str, map_location: str | torch.device = "cpu") -> GQVAE:
    """A GQ-VAE in eval mode from a local path or any fsspec URL (`s3://...`, `memory://...`)."""
    with fsspec.open(str(url), "rb") as f:
        data = f.read()
    return load_bytes(data, name=str(url), map_location=map_location)


def describe(url: str) -> ModelIdentity:
    """A checkpoint's identity without building the model: sha256, codebook fingerprint, config."""
    with fsspec.open(str(url), "rb") as f:
        data = f.read()
    meta = read_metadata(data, str(url))
    config = _config(meta, str(url))
    return ModelIdentity(hashlib.sha256(data).hexdigest(), meta.get("codebook_fingerprint"), config)
