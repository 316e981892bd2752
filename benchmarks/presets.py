"""Tokenize images/s on this CPU for every network preset, same photos, same batch, same run: each preset at
its own operating point (`gq.model_config(preset)`: one token per latent position, K = 2^C) and its native
image size (256; a ViT's fixed size). The paper presets (the official architectures) are randomly
initialised and passed through the official-format round trip, as a converted released checkpoint would be.

Run: `python benchmarks/presets.py [--batch-size 16] [--repeats 2] [--json out.json]`
(`--smoke`: 64 px, batch 2, one repeat, the small presets and paper-f8c16 only: every code path in
seconds, for the tests; `--presets A B` picks presets).
Images: the bundled real photos (assets/samples), center-cropped to the size, and their mirror images.
Times the encoder and the search separately (`GQVAE.encode`, then `quantizer.quantize`), best of repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gq  # noqa: E402
from gq.model import fixed_image_size  # noqa: E402
from gq.presets import describe_point  # noqa: E402
from pipeline.data.preprocess import preprocess  # noqa: E402

PHOTOS = REPO / "assets" / "samples" / "photos-000000.tar"


def photos(size: int, count: int) -> torch.Tensor:
    """`count` uint8 (size, size, 3) crops of the sample photos, mirrored copies after the originals."""
    with tarfile.open(PHOTOS) as tar:
        raw = [
            tar.extractfile(m).read() for m in sorted(tar, key=lambda m: m.name) if m.name.endswith(".jpg")
        ]
    crops = [preprocess(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), size) for b in raw]
    crops += [c[:, ::-1].copy() for c in crops]
    return torch.from_numpy(np.stack([crops[i % len(crops)] for i in range(count)]))


def converted_model(preset: str) -> gq.GQVAE:
    """A random preset written in the official format and converted back, as `jobs/convert.py` does."""
    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config(preset))
    with tempfile.TemporaryDirectory(prefix="gq-presets-") as tmp:
        ckpt, config, ours = (os.path.join(tmp, n) for n in ("m.ckpt", "m.yaml", "m.safetensors"))
        gq.save_official(model, ckpt, config)
        converted = gq.from_official(ckpt, config)
        gq.save(converted, ours, converted.provenance)
        return gq.load(ours)


def build(preset: str) -> tuple[str, gq.GQVAE]:
    """(row name, model in eval mode): the paper presets converted, the small ones as built."""
    if preset.startswith("paper-"):
        return f"{preset} (converted)", converted_model(preset)
    torch.manual_seed(0)
    return preset, gq.GQVAE(gq.model_config(preset)).eval()


def time_model(model: gq.GQVAE, images: torch.Tensor, batch: int, repeats: int) -> dict:
    """Best-of-`repeats` seconds per image of the encoder and of the search, over all `images`."""
    encode, search = [], []
    with torch.no_grad():
        for _ in range(repeats):
            e = s = 0.0
            for i in range(0, len(images), batch):
                t0 = time.perf_counter()
                mu, logvar = model.encode(images[i : i + batch])
                t1 = time.perf_counter()
                model.quantizer.quantize(mu, logvar)
                e, s = e + t1 - t0, s + time.perf_counter() - t1
            encode.append(e / len(images))
            search.append(s / len(images))
    enc, sea = min(encode), min(search)
    return {"encoder_ms": 1e3 * enc, "search_ms": 1e3 * sea, "images_per_s": 1.0 / (enc + sea)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SMOKE = ("small-f8c16", "small-f16c14", "paper-f8c16")


def measure(preset: str, args: argparse.Namespace) -> dict:
    name, model = build(preset)
    size = fixed_image_size(model.config) or args.image_size
    point = describe_point(model.config, size)
    row = {"preset": name, "image_size": size, "parameters": sum(t.numel() for t in model.parameters())}
    row |= {"tokens": point["tokens"], "bits_per_token": point["bits_per_token"], "bpp": point["bpp"]}
    row |= time_model(model, photos(size, args.images), args.batch_size, args.repeats)
    print(
        f"{name:28s} {row['parameters']:>12,} params  {row['tokens']:5d} tokens x "
        f"{row['bits_per_token']:g} bits at {size}px  encoder {row['encoder_ms']:8.1f} ms/img  "
        f"search {row['search_ms']:7.1f} ms/img  {row['images_per_s']:7.2f} images/s",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=256, help="image side (a ViT always takes its own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=16, help="images per repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--presets", nargs="*", choices=sorted(gq.PRESETS), help="default: every preset")
    p.add_argument(
        "--smoke", action="store_true", help="64 px, batch 2, 2 images, one repeat, " + ", ".join(SMOKE)
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_size, args.images, args.repeats = 64, 2, 2, 1
    presets = args.presets or (SMOKE if args.smoke else list(gq.PRESETS))
    rows = [measure(preset, args) for preset in presets]
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, ISA {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "settings": {k: getattr(args, k) for k in ("image_size", "batch_size", "images", "repeats")},
        "rows": rows,
    }
    print(result["machine"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
