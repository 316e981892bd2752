"""The readiness audit on image shards: `gq.audit.ReadinessAudit` over images decoded and center-cropped as
for tokenizing, written as DIR/audit.json, DIR/audit.md and PNG plots (per-channel KL against log2 K / d,
the aggregate posterior's per-channel mean and variance against N(0, 1), code usage at the model's point).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

import gq
from gq.audit import OperatingPoint, ReadinessAudit
from pipeline.cli import option
from pipeline.data.decode import DEFAULT_LIMITS, DecodeLimits
from pipeline.data.reasons import SHARD_UNREADABLE, format_by_reason
from pipeline.data.samples import Skip
from pipeline.evaluate import plots
from pipeline.evaluate.report import EvalSettings, document_files, finite, image_batches, write_files


@dataclass(frozen=True)
class AuditSettings:
    """The command line of jobs/audit.py."""

    checkpoint: str = field(metadata=option(type=None))  # our .safetensors checkpoint (path or fsspec URL)
    input: str = field(metadata=option(type=None))  # SHARDS: brace pattern, glob, directory or .txt URL list
    output: str = field(metadata=option(type=None))  # DIR for audit.json, audit.md and the plots
    images: int = 256  # audit the first N decodable images
    image_size: int = 256  # shorter side resized to this, center crop
    batch_size: int = 8  # images per forward pass
    codebook_bits: tuple[int, ...] | None = field(
        default=None, metadata=option(type=int, nargs="+")
    )  # log2 K of the candidate points (default: the model's)
    device: str = field(default="cpu", metadata=option(type=None))  # torch device of the model (cpu, cuda)
    decode_threads: int = 2  # image decoding threads
    limits: DecodeLimits = field(default_factory=lambda: DEFAULT_LIMITS)  # which images are skipped

    read: EvalSettings = field(init=False)  # how the images are read: as jobs/evaluate.py reads them

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"--images must be >= 1, got {self.images}")
        if not all(1 <= b <= 20 for b in self.codebook_bits or ()):
            raise ValueError(f"--codebook-bits must lie in 1..20, got {list(self.codebook_bits)}")
        read = EvalSettings(
            image_size=self.image_size,
            batch_size=self.batch_size,
            limit=self.images,
            limits=self.limits,
            decode_threads=self.decode_threads,
        )
        object.__setattr__(self, "read", read)  # (frozen) its __post_init__ checks the sizes


PLOTS = {
    "kl": "audit_kl_per_channel.png",
    "mean": "audit_mean_per_channel.png",
    "var": "audit_var_per_channel.png",
    "usage": "audit_code_usage.png",
}


def audit_shards(
    model: gq.GQVAE, shards: list[str], settings: EvalSettings, points: list[OperatingPoint] | None = None
) -> tuple[ReadinessAudit, dict]:
    """Audit the first `settings.limit` decodable images of `shards`; (the audit, what was read)."""
    t0 = time.perf_counter()
    audit = ReadinessAudit(model, points)
    skipped: Counter[str] = Counter()  # counts, not the skips: a corpus may hold millions
    unreadable: list[str] = []

    def on_skip(url: str, skip: Skip) -> None:
        skipped[skip.reason] += 1
        if skip.reason == SHARD_UNREADABLE:
            unreadable.append(url)

    for batch in image_batches(shards, settings, on_skip):
        audit.update(batch)
    read = {
        "shards": len(shards),
        "shards_unreadable": unreadable,
        "skipped_by_reason": dict(sorted(skipped.items())),
        "image_size": settings.image_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return audit, read


def build_audit(audit: ReadinessAudit, read: dict, checkpoint: str) -> dict:
    """audit.json's content: the audit's result plus the checkpoint and the data read."""
    m = audit.model
    report = {
        "checkpoint": {
            "path": checkpoint,
            "model_sha256": m.checkpoint_sha256,
            "codebook": m.config.quantizer.codebook.to_dict(),
            "groups": m.config.quantizer.groups,
            "layout": m.config.quantizer.layout,
            "calibration": m.config.calibration.to_dict() if m.config.calibration else None,
            "source": sorted(k for k in ("official", "diffusers") if k in m.provenance) or ["gq-tokenizer"],
        },
        "data": read,
        "gq_version": gq.__version__,
    }
    report |= audit.result() if audit.images else {"images": 0}
    return finite(report)


def write_audit(output: str, report: dict, audit: ReadinessAudit) -> list[str]:
    """Write audit.json, audit.md and (when any image was audited) the plots under `output`; their URLs."""
    files = document_files("audit", report, format_markdown(report))
    if audit.images:
        files |= _plots(report, audit)
    return write_files(output, files)


def _plots(report: dict, audit: ReadinessAudit) -> dict[str, bytes]:
    channels = report["per_channel"]
    own = report["per_group_kl_bits"]
    per_dim = own["target_bits"] / own["dim"]
    values = {k: np.array([c[k] for c in channels]) for k in ("kl_bits", "mean", "var")}
    axis = "latent channel"
    return {
        PLOTS["kl"]: plots.line(
            values["kl_bits"],
            title=f"mean KL per channel (bits); red: log2 K / d = {per_dim:g}",
            xlabel=axis,
            ylabel="KL (bits)",
            hline=per_dim,
        ),
        PLOTS["mean"]: plots.line(
            values["mean"] - values["mean"].min(),
            title=f"aggregate mean per channel, minus its min {values['mean'].min():.3g}; red: N(0, 1)'s",
            xlabel=axis,
            ylabel="mean - min",
            hline=-values["mean"].min(),
        ),
        PLOTS["var"]: plots.line(
            values["var"],
            title="aggregate variance per channel; red: N(0, 1)'s 1",
            xlabel=axis,
            ylabel="variance",
            hline=1.0,
        ),
        PLOTS["usage"]: plots.code_usage(audit.stats[audit.own].code_counts.numpy()),
    }


def format_markdown(r: dict) -> str:
    """A human-readable audit.md from audit.json's content."""
    ck, skipped = r["checkpoint"], r["data"]["skipped_by_reason"]
    lines = [
        "# GQ readiness audit",
        "",
        f"- checkpoint: `{ck['path']}` (sha256 {str(ck['model_sha256'])[:16]}, "
        f"from {', '.join(ck['source'])}); calibrated: {'yes' if ck['calibration'] else 'no'}",
        f"- images: {r['images']} from {r['data']['shards']} shards at {r['data']['image_size']} px; "
        f"skipped {sum(skipped.values())}{format_by_reason(skipped)}",
    ]
    if not r["images"]:
        return "\n".join(lines + ["", "No image could be audited."]) + "\n"
    g = r["per_group_kl_bits"]
    lines += [
        "",
        f"**Recommendation.** {r['recommendation']}",
        "",
        f"## Per-group KL at the model's point (d={g['dim']}, G={g['groups']}, "
        f"log2 K = {g['target_bits']:g})",
        "",
        f"mean {g['mean']:.3f}, min {g['min']:.3f}, max {g['max']:.3f} bits; above log2 K: "
        f"{g['share_above_target']:.2%}; above log2 K + 1: {g['share_above_target_plus_1']:.2%}",
        "",
        "## Operating points",
        "",
        "| d | G | K | tokens/image | bpp | mean group KL | predicted share > log2 K | PSNR cont. | "
        "PSNR GQ | drop | codes used (uniform) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["operating_points"]:
        mark = " (model)" if p["model_point"] else ""
        lines.append(
            f"| {p['dim']}{mark} | {p['groups']} | 2^{p['codebook_bits']} | {p['tokens_per_image']} | "
            f"{p['bits_per_pixel']:.4g} | {p['mean_group_kl_bits']:.2f} | "
            f"{p['predicted_share_above_log2k']:.2%} | {p['psnr_continuous_db']:.2f} | "
            f"{p['psnr_gq_db']:.2f} | {p['drop_db']:.2f} | "
            f"{p['codes_used']} ({p['expected_uniform_codes_used']:.0f}) |"
        )
    lines += ["", "## Per channel", "", "| channel | KL (bits) | mean | variance |", "|---|---|---|---|"]
    lines += [
        f"| {c['channel']} | {c['kl_bits']:.3f} | {c['mean']:.4g} | {c['var']:.4g} |"
        for c in r["per_channel"]
    ]
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in PLOTS.items()]
    return "\n".join(lines) + "\n"
