"""Do an image's tokens depend on the other images in its encoder batch? float32 and bf16 autocast.

Run: `python benchmarks/batch_invariance.py [--input assets/samples/photos-000000.tar] [--checkpoint CKPT]
[--image-size 256] [--batch-sizes 5,10]`.

The images are the shard's samples decoded as the tokenize job decodes them, with `tencrop` views (ten
crops of each photo, so that a few photos give enough images); they are tokenized by the job's own
`ShardTokenizer.tokenize_images` in consecutive batches of each batch size, and each batch size's tokens
are compared with the first's: the share of images with any differing token, the share of tokens that
differ, and the largest difference of the encoder's posterior means, per precision. Prints one JSON
object (the CPU's model name and bf16 flags included).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.decode import Decoded, decode_sample  # noqa: E402
from pipeline.data.samples import Sample  # noqa: E402
from pipeline.data.stages import shard_samples  # noqa: E402
from pipeline.tokenize.precision import cpu_flags  # noqa: E402
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions  # noqa: E402

DEMO = REPO / "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors"
SAMPLES = REPO / "assets/samples/photos-000000.tar"


def crops(url: str, size: int) -> np.ndarray:
    """(N, S, S, 3) uint8: the ten views of every decodable sample of the shard, in shard order."""
    out = []
    for sample in shard_samples(url):
        if not isinstance(sample, Sample):
            continue
        decoded = decode_sample(sample, image_size=size, views="tencrop")
        if isinstance(decoded, Decoded):
            out.append(decoded.image)
    return np.concatenate(out)


def latents_in_batches(
    worker: ShardTokenizer, images: np.ndarray, batch: int, precision: str
) -> torch.Tensor:
    """The encoder's posterior means (float32) for `images`, in consecutive batches of `batch`."""
    autocast = torch.bfloat16 if precision == "bfloat16" else None
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch])
            out.append(worker.model.encode(x, autocast)[0].float())
    return torch.cat(out)


def tokens_in_batches(worker: ShardTokenizer, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate(
        [worker.tokenize_images(images[i : i + batch]) for i in range(0, len(images), batch)]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=str(SAMPLES))
    p.add_argument("--checkpoint", default=str(DEMO))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-sizes", default="5,10")
    args = p.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    images = crops(args.input, args.image_size)
    flags = cpu_flags()
    result = {
        "cpu": platform.processor() or "",
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        ),  # fmt: skip
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": len(images),
        "batch_sizes": sizes,
    }
    for precision in ("float32", "bfloat16"):
        opts = TokenizeOptions(image_size=args.image_size, encoder_precision=precision)
        worker = ShardTokenizer(args.checkpoint, opts)
        runs = [tokens_in_batches(worker, images, b) for b in sizes]
        latents = [latents_in_batches(worker, images, b, precision) for b in sizes]
        for b, tokens in zip(sizes[1:], runs[1:], strict=True):
            differ = tokens != runs[0]
            result[f"{precision} {sizes[0]} vs {b}"] = {
                "images_differing": f"{int(differ.any(axis=1).sum())}/{len(images)}",
                "tokens_differing": f"{int(differ.sum())}/{differ.size}",
                "token_share": round(float(differ.mean()), 6),
                "latent_max_abs_diff": float((latents[0] - latents[sizes.index(b)]).abs().max()),
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
