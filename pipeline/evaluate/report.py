"""Evaluating a checkpoint on image shards: images decoded and preprocessed exactly as for tokenizing (center
crop), scored batch by batch by `gq.evaluation.Evaluator`, written as DIR/report.json, DIR/report.md and
three PNG plots. A plain in-process loop (no Ray): evaluation sets are small next to training corpora.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import chain

import numpy as np
import torch

import gq
from gq.evaluation import Evaluator
from gq.model import fixed_image_size
from pipeline.cli import option
from pipeline.data.decode import DEFAULT_LIMITS, Decoded, DecodeLimits, decode_sample
from pipeline.data.reasons import SHARD_UNREADABLE, count_by_reason, format_by_reason
from pipeline.data.samples import Skip
from pipeline.data.stages import batched, decoded, first_rows, is_row, shard_samples
from pipeline.evaluate import plots
from pipeline.io import join, write_atomic

RULES = ("posterior", "mean")  # the GQ rules a report scores
MAX_SKIPS_LISTED = 1000  # skipped samples listed one by one in report.json (all are counted by reason)
PLOTS = {"grid": "reconstructions.png", "kl": "kl_histogram.png", "usage": "code_usage.png"}


@dataclass(frozen=True)
class EvalSettings:
    """How images are read and scored (as jobs/tokenize.py reads them)."""

    image_size: int | None = (
        None  # shorter side resized to this, center crop (default: a ViT's own, else 256)
    )
    batch_size: int = 16  # images per forward pass
    limit: int | None = None  # stop after this many images (default: every image of every shard)
    rule: str | None = field(
        default=None, metadata=option(choices=RULES, type=None)
    )  # the GQ rule scored (default: the checkpoint's own)
    limits: DecodeLimits = field(default_factory=lambda: DEFAULT_LIMITS)  # which images are skipped
    decode_threads: int = 2  # image decoding threads
    examples: int = 4  # rows of the reconstruction grid

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.decode_threads < 0:
            raise ValueError(f"--decode-threads must be >= 0, got {self.decode_threads}")
        if self.rule not in (None, *RULES):
            raise ValueError(f"--rule must be one of {', '.join(RULES)}, got {self.rule!r}")

    def for_model(self, model: gq.GQVAE) -> EvalSettings:
        """These settings with the image size the model takes: a ViT's own size (any other is refused),
        else the one given or 256, a multiple of the model's downsampling (ValueError, one line)."""
        fixed = fixed_image_size(model.config)
        size = self.image_size if self.image_size is not None else fixed or 256
        if fixed is not None and size != fixed:
            raise ValueError(f"--image-size {size}: this model takes {fixed}x{fixed} images only (a ViT)")
        if size % model.downsample:
            raise ValueError(f"--image-size must be a multiple of {model.downsample}, got {size}")
        return dataclasses.replace(self, image_size=size)


@dataclass(frozen=True)
class EvalJob:
    """The command line of jobs/evaluate.py: what to evaluate, where to, and how."""

    checkpoint: str = field(metadata=option(type=None))  # GQ-VAE .safetensors checkpoint (path or fsspec URL)
    data: str = field(metadata=option(type=None))  # SHARDS: brace pattern, glob, directory or .txt URL list
    output: str = field(metadata=option(type=None))  # DIR for report.json, report.md and the PNG plots
    device: str = field(default="cpu", metadata=option(type=None))  # torch device of the model (cpu, cuda:1)
    audit: bool = field(
        default=False, metadata=option(action="store_true")
    )  # also write the readiness audit (jobs/audit.py)
    progress: bool = field(default=True, metadata=option(negated=True, help="no progress bar"))  # a bar
    settings: EvalSettings = field(default_factory=EvalSettings)  # how images are read and scored


@dataclass
class EvalRun:
    """What evaluating the shards produced: the filled Evaluator and what was skipped."""

    evaluator: Evaluator
    shards: list[str]
    skipped: list[dict] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0


def image_batches(
    shards: list[str],
    settings: EvalSettings,
    on_skip: Callable[[str, Skip], None],
    progress: Callable[[Iterator[str]], Iterator[str]] = iter,
) -> Iterator[torch.Tensor]:
    """uint8 (B, H, W, 3) batches of every decodable image of `shards` (up to `settings.limit`), decoded
    and center-cropped as `ShardTokenizer` does; each skipped sample (or unreadable shard) goes to
    `on_skip(shard, skip)`; `progress` wraps the shard loop (e.g. tqdm)."""
    decode = partial(decode_sample, image_size=settings.image_size, limits=settings.limits)

    def shard_items(url: str) -> Iterator[tuple[str, Decoded | Skip]]:  # the shard, for the report
        samples = shard_samples(url, max_member_bytes=settings.limits.max_member_bytes, on_error="skip")
        for item in decoded(samples, decode, settings.decode_threads):
            yield url, item

    is_pair_row = lambda pair: is_row(pair[1])  # noqa: E731
    pairs = chain.from_iterable(shard_items(url) for url in progress(shards))
    items = first_rows(pairs, settings.limit, is_pair_row)
    # batches run across shards, so that the model sees the same batches whatever the shard sizes
    for out in batched(items, settings.batch_size, row=is_pair_row):
        if isinstance(out, tuple):
            on_skip(*out)
            continue
        yield torch.from_numpy(np.stack([d.image for _, d in out]))


def record_skip(run: EvalRun, url: str, skip: Skip) -> None:
    """Note a skipped sample in `run`; an unreadable shard also in `run.unreadable` (the job exits 1)."""
    run.skipped.append({"shard": url, **asdict(skip)})
    if skip.reason == SHARD_UNREADABLE:
        run.unreadable.append(url)


def evaluate_shards(
    model: gq.GQVAE,
    shards: list[str],
    settings: EvalSettings,
    progress: Callable[[Iterator[str]], Iterator[str]] = iter,
    also: Callable[[torch.Tensor], None] | None = None,
) -> EvalRun:
    """Score every decodable image of `shards` (up to `settings.limit`) with `gq.evaluation.Evaluator`
    (`image_batches`), each batch also given to `also` (e.g. the readiness audit's update). A shard that
    cannot be opened or read is recorded as unreadable and the next read."""
    t0 = time.perf_counter()
    run = EvalRun(Evaluator(model, rule=settings.rule, examples=settings.examples), list(shards))
    for batch in image_batches(shards, settings, partial(record_skip, run), progress):
        run.evaluator.update(batch)
        if also is not None:
            also(batch)
    run.seconds = time.perf_counter() - t0
    return run


def build_report(run: EvalRun, model: gq.GQVAE, checkpoint: str, settings: EvalSettings) -> dict:
    """report.json's content: the metrics of `gq.evaluation` plus checkpoint, data and skipped samples."""
    q = model.config.quantizer
    report = {
        "checkpoint": {
            "path": checkpoint,
            "model_sha256": model.checkpoint_sha256,
            "codebook_fingerprint": model.codebook_fingerprint,
            "codebook": q.codebook.to_dict(),
            "preset": model.config.preset,
            "groups": q.groups,
            "layout": q.layout,
            "rule": q.rule,
            "beta": q.beta,
        },
        "data": {
            "shards": len(run.shards),
            "shards_unreadable": run.unreadable,
            "image_size": settings.image_size,
            "preprocessing": "shorter side to image_size (PIL bicubic, antialiased), center crop",
            "limit": settings.limit,
            "limits": asdict(settings.limits),
        },
        "skipped": {
            "count": len(run.skipped),
            "by_reason": count_by_reason(run.skipped),
            "samples": run.skipped[:MAX_SKIPS_LISTED],
        },
        "seconds": round(run.seconds, 3),
        "gq_version": gq.__version__,
    }
    if run.evaluator.images:
        report |= run.evaluator.result()
    else:
        report["images"] = 0
    report["plots"] = dict(PLOTS)
    return finite(report)


def write_report(output: str, report: dict, run: EvalRun) -> list[str]:
    """Write report.json, report.md and (when any image was scored) the plots under `output`; their URLs."""
    files = document_files("report", report, format_markdown(report))
    ev = run.evaluator
    if ev.images:
        ex = ev.example_images()
        kl = ev.kl
        files[PLOTS["grid"]] = plots.reconstruction_grid([ex["original"], ex["continuous"], ex["gq"]])
        files[PLOTS["kl"]] = plots.kl_histogram(
            kl.counts.numpy(), kl.bin_bits, target_bits=kl.target_bits, lo=kl.min, hi=kl.max
        )
        files[PLOTS["usage"]] = plots.code_usage(ev.code_counts.numpy())
    return write_files(output, files)


def document_files(stem: str, report: dict, markdown: str) -> dict[str, bytes]:
    """`<stem>.json` (strict JSON: no NaN) and `<stem>.md`, as bytes by name."""
    data = json.dumps(report, indent=1, sort_keys=True, allow_nan=False).encode()
    return {f"{stem}.json": data, f"{stem}.md": markdown.encode()}


def write_files(output: str, files: dict[str, bytes]) -> list[str]:
    """Each file under `output` (a local path or fsspec URL), written atomically; their URLs."""
    written = []
    for name, data in files.items():
        write_atomic(join(output, name), data)
        written.append(join(output, name))
    return written


def summary_line(r: dict) -> str:
    """The report of some images in one line (what jobs/evaluate.py prints)."""
    g, c = r["gq"], r["continuous"]
    return (
        f"{r['images']} images, {r['rate']['bits_per_pixel']:.4g} bpp; "
        f"PSNR {c['psnr_db']:.2f} dB continuous, {g['psnr_db']:.2f} dB GQ; "
        f"SSIM {c['ssim']:.4f} continuous, {g['ssim']:.4f} GQ; "
        f"codebook usage {r['codebook']['usage']:.4f}; skipped {r['skipped']['count']}"
    )


def format_markdown(r: dict) -> str:
    """A human-readable report.md from report.json's content."""
    ck = r["checkpoint"]
    lines = [
        "# GQ-VAE evaluation",
        "",
        f"- checkpoint: `{ck['path']}` (sha256 {str(ck['model_sha256'])[:16]}, preset {ck['preset'] or '-'})",
        f"- codebook: {ck['codebook']} (fingerprint {ck['codebook_fingerprint'][:16]}), "
        f"groups {ck['groups']}, "
        f"layout {ck['layout']}",
        f"- images: {r['images']} from {r['data']['shards']} shards at {r['data']['image_size']} px; "
        f"skipped {r['skipped']['count']}{format_by_reason(r['skipped']['by_reason'])}",
    ]
    if r["data"]["shards_unreadable"]:
        lines.append(f"- **unreadable shards**: {', '.join(r['data']['shards_unreadable'])}")
    if not r["images"]:
        return "\n".join(lines + ["", "No image could be evaluated."]) + "\n"
    rate, c, g, d, cb, kl = r["rate"], r["continuous"], r["gq"], r["drop"], r["codebook"], r["kl_bits"]
    pct = kl["percentiles"]
    lines += [
        "",
        "## Rate",
        "",
        f"{rate['tokens_per_image']} tokens per image ({rate['token_grid'][0]} x {rate['token_grid'][1]} x "
        f"{rate['groups']}), {rate['bits_per_token']:g} bits per token: **{rate['bits_per_pixel']:.4g} bpp**",
        "",
        f"## Distortion (GQ rule: {r['rule']})",
        "",
        "| | PSNR (dB) | SSIM |",
        "|---|---|---|",
        f"| continuous VAE (decode mu) | {c['psnr_db']:.2f} | {c['ssim']:.4f} |",
        f"| GQ tokens | {g['psnr_db']:.2f} | {g['ssim']:.4f} |",
        f"| drop | {d['psnr_db']:.2f} | {d['ssim']:.4f} |",
        "",
        "PSNR and SSIM per image on uint8 pixels (data range 255; SSIM: 11x11 Gaussian window, sigma 1.5, "
        "RGB channels averaged), then averaged over images.",
        "",
        "## Codebook",
        "",
        f"- used {cb['used']} of {cb['size']} codes: usage {cb['usage']:.4f} (a uniform draw of the same "
        f"{cb['tokens']} tokens would use {cb['expected_uniform_usage']:.4f})",
        f"- token entropy {cb['entropy_bits']:.3f} bits (max {rate['bits_per_token']:g}), perplexity "
        f"{cb['perplexity']:.1f}",
        "",
        "## Per-group KL (bits)",
        "",
        f"- target log2 K = {kl['target_bits']:g}; min {kl['min']:.3f}, mean {kl['mean']:.3f}, "
        f"max {kl['max']:.3f}",
        "- percentiles: " + ", ".join(f"{k} {v:.3f}" for k, v in pct.items()),
        f"- above target: {kl['above_target']} of {kl['values']} ({kl['above_target_fraction']:.2%}); within "
        f"+-{kl['tolerance_bits']:g} bit of it: {kl['within_band_fraction']:.2%}",
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{name}]({file})" for name, file in r["plots"].items()]
    return "\n".join(lines) + "\n"


def finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
