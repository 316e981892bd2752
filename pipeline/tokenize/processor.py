"""The shard processor: one WebDataset shard in, one committed Parquet token file out; no Ray needed.

`ShardTokenizer` holds the GQ-VAE on its device. Decoding runs ahead of the model in a thread pool with a
bounded window, so decode and encode overlap; the Ray actor (`actor.py`) only wraps this class.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch

import gq
from pipeline.data import gpu_decode
from pipeline.data.decode import Decoded, decode_sample
from pipeline.data.extras import column_type, extra_values
from pipeline.data.gpu_decode import EncodedJpeg, GpuJpegDecoder
from pipeline.data.listing import shard_identity
from pipeline.data.reasons import TAR_TRUNCATED
from pipeline.data.samples import Sample, Skip
from pipeline.data.shards import shard_stem
from pipeline.data.stages import batched, decoded, shard_samples
from pipeline.data.views import VIEW_SETS
from pipeline.io import write_atomic
from pipeline.memory import peak_rss_mib
from pipeline.tokenize.options import TokenizeOptions, settle_options
from pipeline.tokens.records import CommitRecord, Provenance, token_url, write_commit_record
from pipeline.tokens.writer import parquet_bytes, row_groups_of, token_table

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}  # the encoder precision -> its autocast dtype


@dataclass
class ShardResult:
    """What tokenizing one shard produced, before or after writing."""

    stem: str
    tokens: np.ndarray  # (rows, tokens_per_image), raster order
    keys: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    views: list[int] = field(default_factory=list)  # the view of each row (0 with views="center")
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each row's image
    extras: dict[str, list] = field(default_factory=dict)  # kept extension -> each row's value
    skipped: list[dict] = field(default_factory=list)  # samples without a row: key, index, reason, detail
    shard_events: list[dict] = field(
        default_factory=list
    )  # about the shard, not a sample (a cut at a header)
    notes: list[dict] = field(default_factory=list)  # notes on rows: key, index, reason, detail
    truncated: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


class _Timed:
    """A function that adds up the seconds spent in it, from any number of threads."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds, self._lock = fn, 0.0, threading.Lock()

    def __call__(self, *args):
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - t


class ShardTokenizer:
    """Tokenizes shards with one model; `process(url, output)` writes and commits one shard."""

    def __init__(
        self,
        checkpoint: str,
        options: TokenizeOptions | None = None,
        device: str = "cpu",
        threads: int | None = None,
        expected_sha256: str | None = None,
        jpeg_decoder: GpuJpegDecoder | None = None,
    ) -> None:
        """jpeg_decoder: the batched GPU decoder for options.jpeg_decoder == "nvjpeg" (built here
        from torchvision when not given; tests pass one with a CPU stand-in)."""
        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors; use the CPUs we were given
        self.device = torch.device(device)
        self.model = gq.load(checkpoint, map_location=self.device)
        # as the driver settles them (the job passes settled ones: this decides only for direct use)
        self.options, _ = settle_options(
            options or TokenizeOptions(), self.model.config, gpu=self.device.type == "cuda"
        )
        if expected_sha256 and self.model.checkpoint_sha256 != expected_sha256:
            raise ValueError(f"{checkpoint} changed during the run (sha256 differs from the run record)")
        self.checkpoint = checkpoint
        self.jpeg_decoder = jpeg_decoder
        if self.options.jpeg_decoder == "nvjpeg" and jpeg_decoder is None:
            if self.device.type != "cuda" or not gpu_decode.nvjpeg_available():
                raise ValueError("jpeg_decoder='nvjpeg' needs a CUDA device and torchvision")
            self.jpeg_decoder = GpuJpegDecoder(self.options.image_size, self.device)
        self.provenance = Provenance(
            self.model.identity, checkpoint, self.options.image_size, self.options.preprocessing()
        )

    @property
    def tokens_per_image(self) -> int:
        return self.provenance.tokens_per_image

    def file_metadata(self) -> dict:
        """The `gq` key-value metadata of every token file this processor writes."""
        return self.provenance.file_metadata()

    def extra_columns(self, result: ShardResult) -> dict[pa.Field, list]:
        """The columns after `tokens`: view (with several views), width and height, kept members."""
        opts, columns = self.options, {}
        if opts.views != "center":
            columns[pa.field("view", pa.int8(), nullable=False)] = result.views
        if opts.source_size:
            columns[pa.field("width", pa.int32())] = [s[1] if s else None for s in result.sizes]
            columns[pa.field("height", pa.int32())] = [s[0] if s else None for s in result.sizes]
        for ext in opts.keep:
            columns[pa.field(ext, column_type(ext))] = result.extras.get(ext, [])
        return columns

    @torch.inference_mode()
    def tokenize_images(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (B, S, S, 3) (numpy, or a tensor on any device) -> tokens (B, tokens_per_image) int64."""
        x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        x = x.to(self.device, non_blocking=True)
        autocast = AUTOCAST[self.options.encoder_precision]
        return self.model.tokenize(x, autocast=autocast).reshape(len(images), -1).cpu().numpy()

    def _batch_images(self, batch: list, skipped: list[dict]) -> torch.Tensor | np.ndarray | None:
        """The batch's images as one uint8 (B, S, S, 3); GPU-decoded JPEGs join the CPU-decoded ones in
        order, and a JPEG the GPU refuses is decoded on the CPU (dropped from `batch` if that skips)."""
        pending = [i for i, d in enumerate(batch) if isinstance(d, EncodedJpeg)]
        if not pending:
            return np.stack([d.image for d in batch])
        done, failed = self.jpeg_decoder([batch[i] for i in pending])
        images: dict[int, torch.Tensor] = {pending[j]: image for j, image in done.items()}
        opts = self.options
        for j in failed:
            item = batch[pending[j]]
            out = decode_sample(item.sample, image_size=opts.image_size, limits=opts.limits)
            if isinstance(out, Decoded):
                out.extras, out.notes = item.extras, item.notes  # kept members, and their notes
                batch[pending[j]] = out
            else:
                skipped.append(asdict(out))
                batch[pending[j]] = None
        kept = [i for i, d in enumerate(batch) if d is not None]
        on_cpu = [i for i in kept if isinstance(batch[i], Decoded)]
        if on_cpu:  # one host-to-device copy for all of them
            moved = torch.from_numpy(np.stack([batch[i].image for i in on_cpu])).to(self.device)
            images.update(zip(on_cpu, moved, strict=True))
        batch[:] = [batch[i] for i in kept]
        return torch.stack([images[i] for i in kept]) if kept else None

    def _decode(self, sample: Sample) -> Decoded | Skip | EncodedJpeg:
        """One sample as the options say: screened for the GPU decoder, else decoded on the CPU."""
        opts = self.options
        out = gpu_decode.screen(sample, opts.limits) if self.jpeg_decoder is not None else None
        if out is None:
            draft = opts.jpeg_decoder == "pil-draft"
            out = decode_sample(
                sample, image_size=opts.image_size, limits=opts.limits, jpeg_draft=draft, views=opts.views
            )
        if opts.keep and not isinstance(out, Skip):
            out.extras, notes = extra_values(sample.members, opts.keep)
            out.notes = out.notes + notes
        return out

    def _encode(self, batch: list, result: ShardResult) -> np.ndarray | None:
        """Tokens of a batch; its rows (and their notes) appended to `result` in order."""
        images = self._batch_images(batch, result.skipped)  # drops what the GPU decoder then skips
        views = len(VIEW_SETS[self.options.views])
        for d in batch:
            result.notes.extend({"key": d.key, "index": d.index, **asdict(n)} for n in d.notes)
            for v in range(views):  # the rows of a sample, adjacent
                result.keys.append(d.key)
                result.indices.append(d.index)
                result.labels.append(d.label)
                result.views.append(v)
                result.sizes.append(d.size)
                for ext in self.options.keep:
                    result.extras.setdefault(ext, []).append(d.extras.get(ext))
        if not batch:
            return None
        return self.tokenize_images(images.reshape(-1, *images.shape[-3:]))

    def tokenize_shard(self, url: str, progress: Callable[[int], None] | None = None) -> ShardResult:
        """Read, decode and tokenize one shard (nothing written); `progress(n)` is called as each batch of
        n images is encoded. Raises ShardUnreadable (an OSError) for a shard that cannot be read at all."""
        opts = self.options
        result = ShardResult(shard_stem(url), np.zeros((0, self.tokens_per_image), np.int64))
        chunks: list[np.ndarray] = []
        decode, encode = _Timed(self._decode), _Timed(self._encode)
        t0 = time.perf_counter()
        per_batch = max(1, opts.batch_size // len(VIEW_SETS[opts.views]))  # batch_size counts images
        window = per_batch * opts.prefetch_batches + opts.decode_threads
        samples = shard_samples(url, max_member_bytes=opts.limits.max_member_bytes)
        for item in batched(decoded(samples, decode, opts.decode_threads, window), per_batch):
            if isinstance(item, Skip):
                result.truncated |= item.reason == TAR_TRUNCATED
                (result.skipped if item.index >= 0 else result.shard_events).append(asdict(item))
                continue
            tokens = encode(item, result)
            if tokens is not None:
                chunks.append(tokens)
                if progress is not None:
                    progress(len(tokens))
        if chunks:
            result.tokens = np.concatenate(chunks)
        total = time.perf_counter() - t0
        result.seconds = {"total": total, "encode": encode.seconds, "decode_thread_sum": decode.seconds}
        return result

    def process(self, url: str, output: str, progress: Callable[[int], None] | None = None) -> dict:
        """Tokenize one shard, write `<stem>.parquet` atomically, then its commit record; the record.

        The record pins the shard's identity (URL, size, ETag or modification time) as read before the
        shard, so that a later run can tell a different shard of the same name from this one."""
        identity = shard_identity(url)
        result = self.tokenize_shard(url, progress)
        t = time.perf_counter()
        size = self.model.config.quantizer.codebook.size
        meta = self.file_metadata()
        table = token_table(
            keys=result.keys,
            shard=result.stem,
            indices=result.indices,
            labels=result.labels,
            tokens=result.tokens,
            codebook_size=size,
            metadata=meta,
            extra=self.extra_columns(result),
        )
        data = parquet_bytes(table)
        write_atomic(token_url(output, result.stem), data)
        result.seconds["write"] = time.perf_counter() - t
        record = CommitRecord(
            shard=url,
            shard_identity=identity,
            stem=result.stem,
            token_file=token_url(output, result.stem),
            token_file_sha256=hashlib.sha256(data).hexdigest(),
            rows=len(result.keys),
            skipped=result.skipped,
            notes=result.notes,
            shard_events=result.shard_events,
            tar_truncated=result.truncated,
            seconds=result.seconds,
            worker={"pid": os.getpid(), "device": str(self.device), "peak_rss_mib": peak_rss_mib()},
            committed_at=time.time(),
            fingerprints=self.provenance.fingerprints(),
            row_groups=row_groups_of(data),
        ).to_dict()
        write_commit_record(output, result.stem, record)
        return record
