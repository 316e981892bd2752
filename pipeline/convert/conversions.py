"""The conversions of jobs/convert.py, one function each: paths checked first (an output is never an
input or another output, however spelled; an existing one only with `force`), the model converted and
written, and the lines to print returned. `gq.CheckpointError` or `CalibrationError`: one-line errors.

from-official: an official Lightning `.ckpt` (read without running any code in it) and its YAML -> our
`.safetensors` (config, codebook recipe and fingerprint, provenance: the source's sha256, the official
config, the converter version, what was ignored), which `gq.load`, jobs/tokenize.py, evaluate.py and
detokenize.py run unchanged. to-official: the way back, for models of the official architecture
(`paper-f8c16` or a converted one): the official tensor names and a YAML the authors' code loads.
from-diffusers: a diffusers `AutoencoderKL` directory (`config.json` + `diffusion_pytorch_model.safetensors`:
SD, SDXL, SD3, FLUX.1 VAEs) -> our `.safetensors` at the GQ operating point asked for; `--calibrate`
measures the aggregate posterior's per-channel mean and std on those images and stores them as the prior
(gq/calibration.py). calibrate: the same for any checkpoint of ours (trained, official or diffusers).
"""

from __future__ import annotations

import os
import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem

import gq
from gq.diffusers_vae import from_diffusers
from gq.model import fixed_image_size
from gq.official import from_official, save_official
from gq.presets import describe_point
from pipeline.data.shards import expand_shards
from pipeline.evaluate.calibration import CalibrationError, calibrate
from pipeline.evaluate.report import EvalSettings

# The command line of jobs/convert.py, a subcommand per conversion.
OURS, SHARDS = "our .safetensors checkpoint (path or fsspec URL)", "image shards to measure the prior on"
CALIBRATION = {  # the options of the subcommands that measure a prior
    "--calibrate-images": {"type": int, "default": 1000, "help": "images measured (default 1000)"},
    "--image-size": {"type": int, "default": 256, "help": "shorter side resized to this, center crop"},
    "--batch-size": {"type": int, "default": 8, "help": "calibration images per forward pass"},
    "--output": {"required": True, "help": "our .safetensors checkpoint to write"},
}
SUBCOMMANDS = {  # name -> (help, its options)
    "from-official": (
        "official .ckpt + YAML -> our .safetensors",
        {
            "--checkpoint": {"required": True, "help": "the official Lightning .ckpt (path or fsspec URL)"},
            "--config": {"required": True, "help": "its YAML config (configs/sd3unet_gq_*.yaml style)"},
            "--output": {"required": True, "help": "our .safetensors checkpoint to write"},
        },
    ),
    "to-official": (
        "our .safetensors -> official .ckpt + YAML",
        {
            "--checkpoint": {"required": True, "help": OURS},
            "--output": {"required": True, "help": "the official-format .ckpt to write"},
            "--config-output": {"help": "its YAML (default: the --output path with .yaml)"},
            "--resolution": {
                "type": int,
                "help": "the config's `resolution`, which places attention (default: "
                "the converted model's, else 256)",
            },
        },
    ),
    "from-diffusers": (
        "diffusers AutoencoderKL directory -> our .safetensors",
        {
            "--vae": {"required": True, "help": "directory save_pretrained wrote (path or fsspec URL)"},
            "--group-dim": {"type": int, "help": "GQ group dimension d (default: all latent channels)"},
            "--codebook-bits": {"type": int, "default": 16, "help": "log2 K, the codebook size (default 16)"},
            "--layout": {"choices": ["interleaved", "contiguous"], "default": "interleaved"},
            "--calibrate": {"metavar": "SHARDS", "help": SHARDS},
        }
        | CALIBRATION,
    ),
    "calibrate": (
        "our .safetensors -> the same model with a measured prior",
        {
            "--checkpoint": {"required": True, "help": OURS},
            "--calibrate": {"metavar": "SHARDS", "required": True, "help": SHARDS},
        }
        | CALIBRATION,
    ),
}


def official_in(checkpoint: str, config: str, output: str, *, force: bool = False) -> list[str]:
    """An official .ckpt + YAML -> our .safetensors."""
    refuse_bad_paths([checkpoint, config], [output], force)
    model = from_official(checkpoint, config)
    sha = gq.save(model, output, model.provenance)
    official = model.provenance["official"]
    lines = [
        f"converted {checkpoint} (sha256 {official['source_sha256'][:16]}) -> {output}",
        f"  sha256 {sha[:16]}; {describe(model)}",
        f"  ignored: {len(official['ignored_keys'])} tensors not encoder/decoder (loss.*), "
        f"{official['ignored_entries']}",
    ]
    if official["skipped_pickle_globals"]:
        lines.append(f"  not run (inert placeholders): {official['skipped_pickle_globals']}")
    return lines


def official_out(
    checkpoint: str,
    output: str,
    config_output: str | None = None,
    *,
    resolution: int | None = None,
    force: bool = False,
) -> list[str]:
    """Our .safetensors -> an official .ckpt + YAML (default: the output's path with .yaml)."""
    config_output = config_output or os.path.splitext(output)[0] + ".yaml"
    refuse_bad_paths([checkpoint], [output, config_output], force)
    model = gq.load(checkpoint)
    save_official(model, output, config_output, resolution)
    return [f"exported {checkpoint} -> {output} + {config_output}; {describe(model)}"]


def diffusers_in(
    vae: str,
    output: str,
    *,
    group_dim: int | None,
    codebook_bits: int,
    layout: str,
    calibration: dict | None,
    force: bool = False,
) -> list[str]:
    """A diffusers AutoencoderKL directory -> our .safetensors; with `calibration` (calibrated_model's
    keywords), the prior measured on those images."""
    refuse_bad_paths([], [output], force)
    model = from_diffusers(vae, group_dim=group_dim, codebook_bits=codebook_bits, layout=layout)
    if calibration:
        model = calibrated_model(model, **calibration)
    sha = gq.save(model, output, model.provenance)
    source = model.provenance["diffusers"]
    lines = [f"converted {vae} (sha256 {source['source_sha256'][:16]}) -> {output}"]
    return lines + [f"  sha256 {sha[:16]}; {describe(model)}", *_calibration_lines(model)]


def calibration_in(checkpoint: str, output: str, calibration: dict, *, force: bool = False) -> list[str]:
    """Our .safetensors -> the same model with the prior measured on `calibration`'s images."""
    refuse_bad_paths([checkpoint], [output], force)
    model = calibrated_model(gq.load(checkpoint), **calibration)
    sha = gq.save(model, output, model.provenance)
    return [f"calibrated {checkpoint} -> {output}; sha256 {sha[:16]}", *_calibration_lines(model)]


def calibrated_model(
    model: gq.GQVAE, *, shards: str, images: int, image_size: int, batch_size: int
) -> gq.GQVAE:
    """The model with the prior measured on `images` images of `shards` (gq/calibration.py)."""
    if images < 1 or batch_size < 1 or image_size % model.downsample:
        raise gq.CheckpointError(
            "--calibrate-images and --batch-size must be >= 1 and --image-size a multiple of "
            f"{model.downsample}"
        )
    try:
        urls = expand_shards(shards)
    except ValueError as e:
        raise CalibrationError(f"--calibrate: {e}") from None
    return calibrate(model, urls, EvalSettings(image_size=image_size, batch_size=batch_size, limit=images))


def _calibration_lines(model: gq.GQVAE) -> list[str]:
    cal = model.config.calibration
    if not cal:
        return []
    return [f"  calibrated on {cal.images} images: scale {min(cal.scale):.4g} .. {max(cal.scale):.4g}"]


def describe(model: gq.GQVAE) -> str:
    """One line of what the model is: network size, tokens and bits per pixel at its native size."""
    q = model.config.quantizer
    side = fixed_image_size(model.config) or 256
    point = describe_point(model.config, side)
    params = sum(p.numel() for p in model.parameters())
    return (
        f"{params:,} parameters, f{model.downsample}, {q.groups} group(s) of d={q.codebook.dim}, "
        f"K={q.codebook.size}, {q.layout}: {point['tokens']} tokens per {side}x{side} image, "
        f"{point['bpp']:.4g} bpp"
    )


def _location(url: str) -> tuple[str, str]:
    """Where a path or URL points: the file system and its normalised path (links resolved locally)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.normcase(os.path.realpath(path))
    return type(fs).__name__, posixpath.normpath(path)


def refuse_same_files(inputs: list[str], outputs: list[str]) -> None:
    """An output that is another output or an input, however spelled, would overwrite it."""
    seen: dict[tuple[str, str], str] = {}
    for url in inputs + outputs:
        where = _location(url)
        if where in seen and url in outputs:
            raise gq.CheckpointError(f"{url}: the same file as {seen[where]}; give each output its own path")
        seen.setdefault(where, url)


def refuse_bad_paths(inputs: list[str], outputs: list[str], force: bool) -> None:
    """Inputs must be files that exist; outputs must not be directories, nor exist without `force`."""
    refuse_same_files(inputs, outputs)
    for url in inputs:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            raise gq.CheckpointError(f"{url}: is a directory, not a file")
        if not fs.exists(path):
            raise gq.CheckpointError(f"{url}: no such file")
    for url in outputs:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            raise gq.CheckpointError(f"{url}: is a directory; give the file to write")
        if fs.exists(path) and not force:
            raise gq.CheckpointError(f"{url}: exists; pass --force to replace it")
