"""Full vs draft JPEG decoding (`--jpeg-decoder pil` vs `pil-draft`): decode + preprocess images/s on one
thread, and how far the draft path's crops and tokens are from the full decode's.

Run: `python benchmarks/jpeg_draft.py --images 'photos/*.jpg' [--image-size 256] [--checkpoint CKPT]`.
IMAGES are JPEG files or WebDataset shards (globs allowed); each image is decoded and preprocessed
`--repeat` times per path, alternating the paths, and the best time of each is kept. With a checkpoint
(default: the demo model) both sets of crops are also tokenized and the tokens compared.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gq  # noqa: E402
from pipeline.data.decode import DRAFT_MARGIN, decode_image_and_shape, find_image  # noqa: E402
from pipeline.data.preprocess import preprocess  # noqa: E402
from pipeline.data.samples import Sample, iter_samples  # noqa: E402
from pipeline.data.shards import is_shard_file, open_shard  # noqa: E402

DEMO = REPO / "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors"


def load_images(patterns: list[str], limit: int) -> list[bytes]:
    """Encoded images from files and shards, in the order given."""
    out: list[bytes] = []
    for path in (p for pattern in patterns for p in sorted(glob.glob(pattern, recursive=True)) or [pattern]):
        if is_shard_file(path):
            with open_shard(path) as stream:
                out += [find_image(s.members)[1] for s in iter_samples(stream) if isinstance(s, Sample)]
        else:
            out.append(Path(path).read_bytes())
    return out[:limit]


def crop(data: bytes, size: int, draft: bool) -> np.ndarray:
    image, shape = decode_image_and_shape(data, draft_side=DRAFT_MARGIN * size if draft else None)
    return preprocess(image, size, shape)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", required=True, help="JPEG files or shards (globs allowed)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--checkpoint", default=str(DEMO), help="tokenize both sets of crops ('' to skip)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    images = load_images(args.images, args.limit)
    if not images:
        p.error("no images found")
    size = args.image_size
    best = {"pil": float("inf"), "pil-draft": float("inf")}
    crops: dict[str, list[np.ndarray]] = {}
    for _ in range(args.repeat):
        for name in best:
            start = time.perf_counter()
            crops[name] = [crop(data, size, name == "pil-draft") for data in images]
            best[name] = min(best[name], time.perf_counter() - start)
    agreement = [psnr(a, b) for a, b in zip(crops["pil"], crops["pil-draft"], strict=True)]
    finite = [v for v in agreement if np.isfinite(v)]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "images": len(images),
        "megapixels_mean": float(np.mean([_megapixels(d) for d in images])),
        "image_size": size,
        "images_per_s": {k: len(images) / v for k, v in best.items()},
        "speedup": best["pil"] / best["pil-draft"],
        "crops_identical": sum(not np.isfinite(v) for v in agreement),
        "psnr_db_mean_of_differing": float(np.mean(finite)) if finite else None,
        "psnr_db_min": float(min(finite)) if finite else None,
    }
    if args.checkpoint:
        torch.set_num_threads(os.cpu_count() or 1)
        model = gq.load(args.checkpoint)
        with torch.inference_mode():
            tokens = {k: _tokenize(model, v) for k, v in crops.items()}
        result["tokens_equal"] = float((tokens["pil"] == tokens["pil-draft"]).float().mean())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _tokenize(model: gq.GQVAE, crops: list[np.ndarray], batch: int = 16) -> torch.Tensor:
    chunks = [np.stack(crops[i : i + batch]) for i in range(0, len(crops), batch)]
    return torch.cat([model.tokenize(torch.from_numpy(chunk)) for chunk in chunks])


def _megapixels(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as image:
        return image.size[0] * image.size[1] / 1e6


if __name__ == "__main__":
    raise SystemExit(main())
