"""The shard processor: one WebDataset shard in, one committed Parquet token file out; no Ray needed.

`ShardTokenizer` holds the GQ-VAE on its device. Decoding runs ahead of the model in a thread pool with a
bounded window, so decode and encode overlap; the Ray actor (`pipeline/actor.py`) only wraps this class.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import gq
from pipeline.decode import TAR_TRUNCATED, Decoded, DecodeLimits, decode_sample
from pipeline.manifest import token_url, write_manifest
from pipeline.memory import peak_rss_mib
from pipeline.prefetch import ordered_map
from pipeline.samples import Skip, iter_samples
from pipeline.shards import open_shard, shard_stem
from pipeline.writer import parquet_bytes, token_table, write_atomic


@dataclass(frozen=True)
class TokenizeOptions:
    """How images become tokens; everything here except the throughput knobs is pinned in `_run.json`."""

    image_size: int = 256  # shorter side resized to this (antialiased), then center-cropped square
    limits: DecodeLimits = field(default_factory=DecodeLimits)  # skip rules: min side, aspect, pixels
    batch_size: int = 32  # images per forward pass
    # Decoding threads per processor. A CPU actor's model already uses every core it has, so one thread
    # (decode overlapping encode) is enough there; a GPU actor wants as many as it has CPUs.
    decode_threads: int = 1
    prefetch_batches: int = 2  # decoded batches kept ahead of the model (bounds memory)

    def preprocessing(self) -> dict:
        """The preprocessing as recorded in token files and run records."""
        return {
            "resize": "shorter side to image_size, PIL bicubic (antialiased)",
            "crop": "center",
            "image_size": self.image_size,
            "input": "uint8 RGB; alpha composited on white; EXIF orientation applied",
            **asdict(self.limits),
        }


@dataclass
class ShardResult:
    """What tokenizing one shard produced, before or after writing."""

    stem: str
    keys: list[str]
    indices: list[int]
    labels: list[int | None]
    tokens: np.ndarray  # (rows, tokens_per_image), raster order
    skipped: list[dict]
    truncated: bool
    seconds: dict[str, float]


class ShardTokenizer:
    """Tokenizes shards with one model; `process(url, output)` writes and commits one shard."""

    def __init__(
        self,
        checkpoint: str,
        options: TokenizeOptions | None = None,
        device: str = "cpu",
        threads: int | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors; use the CPUs we were given
        self.options = options or TokenizeOptions()
        self.device = torch.device(device)
        self.model = gq.load(checkpoint, map_location=self.device)
        if expected_sha256 and self.model.checkpoint_sha256 != expected_sha256:
            raise ValueError(f"{checkpoint} changed during the run (sha256 differs from the run record)")
        self.checkpoint = checkpoint
        f = self.model.downsample
        if self.options.image_size % f:
            raise ValueError(f"--image-size must be a multiple of {f}, got {self.options.image_size}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.options.image_size // self.model.downsample
        return side, side

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w * self.model.config.quantizer.groups

    def file_metadata(self) -> dict:
        """The `gq` key-value metadata of every token file this processor writes."""
        cfg = self.model.config
        q = cfg.quantizer
        h, w = self.grid
        return {
            "codebook": q.codebook.to_dict(),
            "codebook_fingerprint": self.model.codebook_fingerprint,
            "groups": q.groups,
            "layout": q.layout,
            "rule": q.rule,
            "beta": q.beta,
            "token_grid": [h, w],
            "token_order": "raster: row, column, group",
            "tokens_per_image": self.tokens_per_image,
            "image_size": self.options.image_size,
            "preprocessing": self.options.preprocessing(),
            "model_sha256": self.model.checkpoint_sha256,
            "model_config": cfg.to_dict(),
            "checkpoint": self.checkpoint,
            "gq_version": gq.__version__,
        }

    @torch.inference_mode()
    def tokenize_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> tokens (B, tokens_per_image) int64, raster order."""
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        return self.model.tokenize(x).reshape(len(images), -1).cpu().numpy()

    def tokenize_shard(self, url: str) -> ShardResult:
        """Read, decode and tokenize one shard (nothing written)."""
        opts = self.options
        stem = shard_stem(url)
        keys: list[str] = []
        indices: list[int] = []
        labels: list[int | None] = []
        chunks: list[np.ndarray] = []
        skipped: list[dict] = []
        truncated = False
        decode_s = 0.0
        lock = threading.Lock()
        t0 = time.perf_counter()
        encode_s = 0.0

        def decode(item):
            nonlocal decode_s
            if isinstance(item, Skip):
                return item
            t = time.perf_counter()
            out = decode_sample(item, image_size=opts.image_size, limits=opts.limits)
            with lock:
                decode_s += time.perf_counter() - t
            return out

        batch: list[Decoded] = []

        def flush() -> None:
            nonlocal encode_s
            if not batch:
                return
            t = time.perf_counter()
            chunks.append(self.tokenize_images(np.stack([d.image for d in batch])))
            encode_s += time.perf_counter() - t
            for d in batch:
                keys.append(d.key)
                indices.append(d.index)
                labels.append(d.label)
            batch.clear()

        window = opts.batch_size * opts.prefetch_batches + opts.decode_threads
        with open_shard(url) as stream:
            samples = iter_samples(stream, shard=url)
            for out in ordered_map(decode, samples, opts.decode_threads, window):
                if isinstance(out, Skip):
                    if out.reason == TAR_TRUNCATED:
                        truncated = True
                    skipped.append(
                        {"key": out.key, "index": out.index, "reason": out.reason, "detail": out.detail}
                    )
                    continue
                batch.append(out)
                if len(batch) >= opts.batch_size:
                    flush()
            flush()
        tokens = np.concatenate(chunks) if chunks else np.zeros((0, self.tokens_per_image), np.int64)
        total = time.perf_counter() - t0
        seconds = {"total": total, "encode": encode_s, "decode_thread_sum": decode_s}
        return ShardResult(stem, keys, indices, labels, tokens, skipped, truncated, seconds)

    def process(self, url: str, output: str) -> dict:
        """Tokenize one shard, write `<stem>.parquet` atomically, then its commit record; the record."""
        result = self.tokenize_shard(url)
        t = time.perf_counter()
        meta = self.file_metadata()
        size = self.model.config.quantizer.codebook.size
        table = token_table(
            result.keys, result.stem, result.indices, result.labels, result.tokens, size, meta
        )
        data = parquet_bytes(table)
        write_atomic(token_url(output, result.stem), data)
        result.seconds["write"] = time.perf_counter() - t
        reasons = Counter(s["reason"] for s in result.skipped)
        record = {
            "shard": url,
            "stem": result.stem,
            "token_file": token_url(output, result.stem),
            "token_file_sha256": hashlib.sha256(data).hexdigest(),
            "rows": len(result.keys),
            "skipped": result.skipped,
            "skipped_by_reason": dict(sorted(reasons.items())),
            "tar_truncated": result.truncated,
            "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
            "model_sha256": meta["model_sha256"],
            "codebook_fingerprint": meta["codebook_fingerprint"],
            "gq_version": gq.__version__,
            "worker": {"pid": os.getpid(), "device": str(self.device), "peak_rss_mib": peak_rss_mib()},
            "committed_at": time.time(),
        }
        write_manifest(output, result.stem, record)
        return record
