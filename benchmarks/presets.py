"""Tokenize images/s on this CPU per network preset: the paper's `paper-f8c16` (the official sd3unet, here
randomly initialised and passed through the official-format round trip, as a converted released
checkpoint would be) against `small-f8c16`, same images, same batch, same run.

Run: `python benchmarks/presets.py [--batch-size 16] [--repeats 2] [--json out.json]`
(`--smoke`: 64 px, batch 2, one repeat: every code path in seconds, for the tests).
Images: the bundled real photos (assets/samples), center-cropped to --image-size, and their mirror images.
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


def converted_paper_model(bpp: float) -> gq.GQVAE:
    """A random paper-f8c16 written in the official format and converted back, as `jobs/convert.py` does."""
    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config("paper-f8c16", bpp))
    with tempfile.TemporaryDirectory(prefix="gq-presets-") as tmp:
        ckpt, config, ours = (os.path.join(tmp, n) for n in ("m.ckpt", "m.yaml", "m.safetensors"))
        gq.save_official(model, ckpt, config)
        converted = gq.from_official(ckpt, config)
        gq.save(converted, ours, converted.provenance)
        return gq.load(ours)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=16, help="images per repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bpp", type=float, default=0.25)
    p.add_argument("--smoke", action="store_true", help="64 px, batch 2, 2 images, one repeat")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_size, args.images, args.repeats = 64, 2, 2, 1
    images = photos(args.image_size, args.images)
    torch.manual_seed(0)
    models = {
        "small-f8c16": gq.GQVAE(gq.model_config("small-f8c16", args.bpp)).eval(),
        "paper-f8c16 (converted)": converted_paper_model(args.bpp),
    }
    rows = []
    for name, model in models.items():
        row = {"preset": name, "parameters": sum(t.numel() for t in model.parameters())}
        row |= time_model(model, images, args.batch_size, args.repeats)
        rows.append(row)
        print(
            f"{name:24s} {row['parameters']:>11,} params  encoder {row['encoder_ms']:8.1f} ms/img  "
            f"search {row['search_ms']:7.1f} ms/img  {row['images_per_s']:7.2f} images/s"
        )
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, ISA {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "settings": {k: getattr(args, k) for k in ("image_size", "batch_size", "images", "repeats", "bpp")},
        "rows": rows,
        "paper_vs_small_time": rows[0]["images_per_s"] / rows[1]["images_per_s"],
    }
    print(f"{result['machine']}; paper-f8c16 takes {result['paper_vs_small_time']:.1f}x small-f8c16's time")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
