"""Convert between the paper's official GQ checkpoints and ours.

Run:    python jobs/convert.py from-official --checkpoint sd3unet_gq_0.25.ckpt \\
            --config sd3unet_gq_0.25.yaml --output gq-paper-0.25bpp.safetensors
        python jobs/convert.py to-official --checkpoint model.safetensors --output model.ckpt \\
            [--config-output model.yaml] [--resolution 256]

from-official: an official Lightning `.ckpt` (read without running any code in it) and its YAML -> our
`.safetensors` (config, codebook recipe and fingerprint, provenance: the source's sha256, the official
config, the converter version, what was ignored), which `gq.load`, jobs/tokenize.py, evaluate.py and
detokenize.py run unchanged. to-official: the way back, for models of the official architecture
(`paper-f8c16` or a converted one): the official tensor names and a YAML the authors' code loads.
Paths may be fsspec URLs. Nothing is downloaded. Exit status: 0 written, 2 bad arguments or a
checkpoint/config this version cannot convert (one line saying which field or tensor).
"""

from __future__ import annotations

import startup  # noqa: F401  (first: the jobs' shared start-up, jobs/startup.py)

# isort: split
import argparse
import os
import sys

import fsspec

import gq
from gq.model import fixed_image_size
from gq.official import from_official, save_official
from gq.presets import describe_point


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
    for parser in (a, b):
        parser.add_argument("--force", action="store_true", help="replace output files that already exist")
    return p.parse_args(argv)


def _refuse_bad_paths(inputs: list[str], outputs: list[str], force: bool) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.direction == "from-official":
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
    except gq.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
