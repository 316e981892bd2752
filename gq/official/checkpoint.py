"""Official checkpoints in: a Lightning `.ckpt` read without running its code, its tensors mapped onto our
names and shapes, checked against the config before the network is built."""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec

from gq.checkpoint import CheckpointError
from gq.model import GQVAE
from gq.official.config import CONVERTER_VERSION, model_config_from_official, read_config
from gq.official.names import official_names
from gq.official.shapes import check_before_building
from gq.official.unpickler import load_checkpoint
from gq.state_map import load_mapped_state
from gq.version import __version__


def read_official_checkpoint(checkpoint: str) -> tuple[dict, dict]:
    """The `state_dict` of an official `.ckpt` (path or URL) and what else it held, never running its code."""
    try:
        with fsspec.open(str(checkpoint), "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot read it: {e}") from None
    try:
        obj, skipped = load_checkpoint(data)
    except Exception as e:  # noqa: BLE001 (nothing of the file runs: any error is a malformed file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {checkpoint}: damaged or not a PyTorch checkpoint ({first})"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(str(k).startswith("encoder.") for k in state):
        raise CheckpointError(f"checkpoint {checkpoint}: holds no `state_dict` with encoder.* tensors")
    source = {
        "source": str(checkpoint),
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "epoch": _count(obj.get("epoch")),
        "global_step": _count(obj.get("global_step")),
        "ignored_entries": sorted(str(k) for k in obj if k != "state_dict") if state is not obj else [],
        "skipped_pickle_globals": skipped,
    }
    return state, source


def _count(value: Any) -> int | None:
    """`epoch` / `global_step` when an integer, else None: entries the conversion ignores anyway."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_official_state(model: GQVAE, state: dict, name: str = "checkpoint") -> list[str]:
    """Fill every encoder/decoder tensor of `model` from official names; the keys ignored.

    Tensors outside encoder.* / decoder.* (the training loss's `loss.*`: LPIPS, discriminator) are not
    part of the tokenizer: ignored, as the official code's own non-strict load does, and returned."""
    ours_part = {k: str(k).startswith(("encoder.", "decoder.")) for k in state}
    ignored = sorted(str(k) for k, mine in ours_part.items() if not mine)
    load_mapped_state(model, {k: v for k, v in state.items() if ours_part[k]}, official_names(model), name)
    return ignored


def from_official(checkpoint: str, config: str | dict) -> GQVAE:
    """An official GQ checkpoint (`.ckpt` path or fsspec URL) and its YAML -> our GQVAE in eval mode.

    `model.provenance["official"]` records the source file's sha256, the resolved official config, the
    converter version, the ignored tensors (`loss.*`) and other entries, and any pickle globals skipped.
    The config is checked against the checkpoint's tensor shapes before the network is built.
    """
    resolved = read_config(config)
    model_config = model_config_from_official(resolved)
    state, source = read_official_checkpoint(checkpoint)
    check_before_building(model_config, state, str(checkpoint))
    model = GQVAE(model_config)
    ignored = load_official_state(model, state, str(checkpoint))
    model.provenance = {
        "official": source
        | {
            "config": resolved.get("model", {}),
            "converter": f"gq-tokenizer {__version__} / official converter v{CONVERTER_VERSION}",
            "ignored_keys": ignored,
        }
    }
    model.checkpoint_sha256 = source["source_sha256"]
    return model.eval()
