"""Convert between the paper's official GQ checkpoints and ours.

Run:    python jobs/convert.py from-official --checkpoint sd3unet_gq_0.25.ckpt \\
            --config sd3unet_gq_0.25.yaml --output gq-paper-0.25bpp.safetensors
        python jobs/convert.py to-official --checkpoint model.safetensors --output model.ckpt \\
            [--config-output model.yaml] [--resolution 256]
        python jobs/convert.py from-diffusers --vae sd3-vae/ --group-dim 16 --codebook-bits 16 \
            [--calibrate 'shards/*.tar' --calibrate-images 1000] --output sd3-gq.safetensors
        python jobs/convert.py calibrate --checkpoint model.safetensors --calibrate 'shards/*.tar' \
            --output model-calibrated.safetensors

from-official: an official Lightning `.ckpt` (read without running any code in it) and its YAML -> our
`.safetensors` (config, codebook recipe and fingerprint, provenance: the source's sha256, the official
config, the converter version, what was ignored), which `gq.load`, jobs/tokenize.py, evaluate.py and
detokenize.py run unchanged. to-official: the way back, for models of the official architecture
(`paper-f8c16` or a converted one): the official tensor names and a YAML the authors' code loads.
from-diffusers: a diffusers `AutoencoderKL` directory (`config.json` + `diffusion_pytorch_model.safetensors`:
SD, SDXL, SD3, FLUX.1 VAEs) -> our `.safetensors` at the GQ operating point asked for; `--calibrate`
measures the aggregate posterior's per-channel mean and std on those images and stores them as the prior
(gq/calibration.py). calibrate: the same for any checkpoint of ours (trained, official or diffusers).
Paths may be fsspec URLs; an output may not be an input or the other output, however spelled. Nothing is
downloaded. Exit status: 0 written, 2 bad arguments or a checkpoint/config this version cannot convert
(one line saying which field or tensor).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("from-official", help="official .ckpt + YAML -> our .safetensors")
    a.add_argument("--checkpoint", required=True, help="the official Lightning .ckpt (path or fsspec URL)")
    a.add_argument("--config", required=True, help="its YAML config (configs/sd3unet_gq_*.yaml style)")
    a.add_argument("--output", required=True, help="our .safetensors checkpoint to write")
    b = sub.add_parser("to-official", help="our .safetensors -> official .ckpt + YAML")
    b.add_argument("--checkpoint", required=True, help="our .safetensors checkpoint (path or fsspec URL)")
    b.add_argument("--output", required=True, help="the official-format .ckpt to write")
    b.add_argument("--config-output", help="its YAML (default: the --output path with .yaml)")
    b.add_argument(
        "--resolution",
        type=int,
        help="the config's `resolution`, which places attention (default: the converted model's, else 256)",
    )
    c = sub.add_parser("from-diffusers", help="diffusers AutoencoderKL directory -> our .safetensors")
    c.add_argument("--vae", required=True, help="directory save_pretrained wrote (path or fsspec URL)")
    c.add_argument("--group-dim", type=int, help="GQ group dimension d (default: all latent channels)")
    c.add_argument("--codebook-bits", type=int, default=16, help="log2 K, the codebook size (default 16)")
    c.add_argument("--layout", choices=["interleaved", "contiguous"], default="interleaved")
    c.add_argument("--calibrate", metavar="SHARDS", help="image shards to measure the prior on")
    d = sub.add_parser("calibrate", help="our .safetensors -> the same model with a measured prior")
    d.add_argument("--checkpoint", required=True, help="our .safetensors checkpoint (path or fsspec URL)")
    d.add_argument(
        "--calibrate", metavar="SHARDS", required=True, help="image shards to measure the prior on"
    )
    for parser in (c, d):
        parser.add_argument(
            "--calibrate-images", type=int, default=1000, help="images measured (default 1000)"
        )
        parser.add_argument(
            "--image-size", type=int, default=256, help="shorter side resized to this, center crop"
        )
        parser.add_argument("--batch-size", type=int, default=8, help="calibration images per forward pass")
        parser.add_argument("--output", required=True, help="our .safetensors checkpoint to write")
    for parser in (a, b, c, d):
        parser.add_argument("--force", action="store_true", help="replace output files that already exist")
    return p.parse_args(argv)


def _location(url: str) -> tuple[str, str]:
    """Where a path or URL points: the file system and its normalised path (links resolved locally)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.normcase(os.path.realpath(path))
    return type(fs).__name__, posixpath.normpath(path)


def _refuse_same_files(inputs: list[str], outputs: list[str]) -> None:
    """An output that is another output or an input, however spelled, would overwrite it."""
    seen: dict[tuple[str, str], str] = {}
    for url in inputs + outputs:
        where = _location(url)
        if where in seen and url in outputs:
            raise gq.CheckpointError(f"{url}: the same file as {seen[where]}; give each output its own path")
        seen.setdefault(where, url)


def _refuse_bad_paths(inputs: list[str], outputs: list[str], force: bool) -> None:
    _refuse_same_files(inputs, outputs)
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


def from_diffusers_job(args: argparse.Namespace) -> None:
    """Convert (and with --calibrate, calibrate) a diffusers VAE; write and describe the checkpoint."""
    _refuse_bad_paths([], [args.output], args.force)
    model = from_diffusers(
        args.vae, group_dim=args.group_dim, codebook_bits=args.codebook_bits, layout=args.layout
    )
    if args.calibrate:
        model = _calibrated(model, args)
    sha = gq.save(model, args.output, model.provenance)
    source = model.provenance["diffusers"]
    print(f"converted {args.vae} (sha256 {source['source_sha256'][:16]}) -> {args.output}")
    print(f"  sha256 {sha[:16]}; {describe(model)}")
    _say_calibration(model)


def _calibrated(model: gq.GQVAE, args: argparse.Namespace) -> gq.GQVAE:
    """The model with the prior measured on --calibrate's images (gq/calibration.py)."""
    if args.calibrate_images < 1 or args.batch_size < 1 or args.image_size % model.downsample:
        raise gq.CheckpointError(
            "--calibrate-images and --batch-size must be >= 1 and --image-size a multiple of "
            f"{model.downsample}"
        )
    try:
        shards = expand_shards(args.calibrate)
    except ValueError as e:
        raise CalibrationError(f"--calibrate: {e}") from None
    settings = EvalSettings(args.image_size, args.batch_size, limit=args.calibrate_images)
    return calibrate(model, shards, settings)


def _say_calibration(model: gq.GQVAE) -> None:
    cal = model.config.calibration
    if cal:
        print(f"  calibrated on {cal.images} images: scale {min(cal.scale):.4g} .. {max(cal.scale):.4g}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.direction == "from-diffusers":
            from_diffusers_job(args)
        elif args.direction == "calibrate":
            _refuse_bad_paths([args.checkpoint], [args.output], args.force)
            model = _calibrated(gq.load(args.checkpoint), args)
            sha = gq.save(model, args.output, model.provenance)
            print(f"calibrated {args.checkpoint} -> {args.output}; sha256 {sha[:16]}")
            _say_calibration(model)
        elif args.direction == "from-official":
            _refuse_bad_paths([args.checkpoint, args.config], [args.output], args.force)
            model = from_official(args.checkpoint, args.config)
            sha = gq.save(model, args.output, model.provenance)
            official = model.provenance["official"]
            print(f"converted {args.checkpoint} (sha256 {official['source_sha256'][:16]}) -> {args.output}")
            print(f"  sha256 {sha[:16]}; {describe(model)}")
            ignored = len(official["ignored_keys"])
            print(f"  ignored: {ignored} tensors not encoder/decoder (loss.*), {official['ignored_entries']}")
            if official["skipped_pickle_globals"]:
                print(f"  not run (inert placeholders): {official['skipped_pickle_globals']}")
        else:
            config_out = args.config_output or os.path.splitext(args.output)[0] + ".yaml"
            _refuse_bad_paths([args.checkpoint], [args.output, config_out], args.force)
            model = gq.load(args.checkpoint)
            save_official(model, args.output, config_out, args.resolution)
            print(f"exported {args.checkpoint} -> {args.output} + {config_out}; {describe(model)}")
    except (gq.CheckpointError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
