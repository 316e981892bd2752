"""The readiness audit: its statistics against an independent computation, its prediction against the
measured GQ drop, and the job's files."""

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gq
from gq.audit import OperatingPoint, ReadinessAudit
from gq.calibration import Calibration
from gq.evaluation import Evaluator
from pipeline.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo" / "gq-small-f8c16-0.25bpp-tdc.safetensors"
PHOTOS = REPO / "assets" / "samples" / "photos-000000.tar"


def photos(n: int, size: int) -> torch.Tensor:
    with tarfile.open(PHOTOS) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:n]
    return torch.from_numpy(np.stack([preprocess(np.asarray(Image.open(io.BytesIO(j)).convert("RGB")), size)
                                      for j in jpegs]))  # fmt: skip


@pytest.fixture(scope="module")
def demo():
    return gq.load(str(DEMO))


def test_statistics_equal_an_independent_computation(demo):
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(16, generator=g).mul(0.3)
    scale = torch.rand(16, generator=g).add(0.7)
    model = demo.with_calibration(Calibration(tuple(shift.tolist()), tuple(scale.tolist())))
    x = photos(3, 32)
    audit = ReadinessAudit(model, [OperatingPoint(16, 1, 16), OperatingPoint(8, 2, 16)])
    audit.update(x[:2])
    audit.update(x[2:])
    r = audit.result()
    with torch.no_grad():  # the raw posterior, calibrated here by hand in float64
        mu, logvar = demo.encode(x)
    mu = ((mu.double() - shift.double().view(1, 16, 1, 1)) / scale.double().view(1, 16, 1, 1)).numpy()
    var = (logvar.double().exp() / scale.double().view(1, 16, 1, 1) ** 2).numpy()
    kl = 0.5 * (mu**2 + var - 1 - np.log(var)) / math.log(2)
    mean = mu.mean((0, 2, 3))
    np.testing.assert_allclose([c["kl_bits"] for c in r["per_channel"]], kl.mean((0, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose([c["mean"] for c in r["per_channel"]], mean, rtol=1e-4, atol=1e-5)
    second = (mu**2 + var).mean((0, 2, 3)) - mean**2
    np.testing.assert_allclose([c["var"] for c in r["per_channel"]], second, rtol=1e-4)
    per_group = kl.sum(1)  # d = 16: one group of every channel
    own = r["per_group_kl_bits"]
    assert own["mean"] == pytest.approx(per_group.mean(), rel=1e-5)
    assert own["max"] == pytest.approx(per_group.max(), rel=1e-5)
    assert own["share_above_target_plus_1"] == pytest.approx((per_group > 17).mean())
    groups_of_8 = np.stack([kl[:, g::2].sum(1) for g in range(2)])  # interleaved: channels g, g+2, ...
    point8 = next(p for p in r["operating_points"] if p["dim"] == 8)
    assert point8["predicted_share_above_log2k"] == pytest.approx((groups_of_8 > 16).mean())
    assert point8["bits_per_pixel"] == 0.5 and point8["tokens_per_image"] == 2 * 16
    ev = Evaluator(model)  # the evaluation's own PSNR of the continuous VAE and of GQ at the model's point
    ev.update(x)
    scored = ev.result()
    point16 = next(p for p in r["operating_points"] if p["model_point"])
    assert point16["psnr_continuous_db"] == pytest.approx(scored["continuous"]["psnr_db"], abs=1e-9)
    assert point16["psnr_gq_db"] == pytest.approx(scored["gq"]["psnr_db"], abs=1e-9)
    assert point16["codes_used"] == scored["codebook"]["used"]


def test_prediction_moves_with_the_measured_drop(demo):
    """Narrower posteriors under the prior (a calibration scale below 1) carry more KL: the predicted
    share of groups above log2 K rises, and so does the PSNR that GQ loses."""
    x = photos(4, 64)
    found = []
    for k in (0.5, 0.8, 1.0):
        model = demo.with_calibration(Calibration((0.0,) * 16, (k,) * 16))
        audit = ReadinessAudit(model, [OperatingPoint(16, 1, 16)])
        audit.update(x)
        p = audit.result()["operating_points"][0]
        found.append((p["mean_group_kl_bits"], p["predicted_share_above_log2k"], p["drop_db"]))
    kls, shares, drops = zip(*found)
    assert kls[0] > kls[1] > kls[2]
    assert shares[0] > shares[1] > shares[2]
    assert drops[0] > drops[1] > drops[2] and drops[0] > 1.0


@pytest.mark.slow
def test_audit_job_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "audit"
    run = [sys.executable, str(REPO / "jobs" / "audit.py")]
    done = subprocess.run(
        [*run, "--checkpoint", str(DEMO), "--input", str(PHOTOS), "--output", str(out), "--images", "2",
         "--image-size", "32", "--codebook-bits", "12"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "audit.json").read_text())
    assert report["images"] == 2 and len(report["per_channel"]) == 16
    dims = [p["dim"] for p in report["operating_points"]]
    assert dims == [16, 16, 8, 4, 2, 1]  # the model's own K = 2^16 first, then every d at K = 2^12
    assert report["recommendation"] and report["recommendation"] in (out / "audit.md").read_text()
    for name in ("kl_per_channel", "mean_per_channel", "var_per_channel", "code_usage"):
        assert (out / f"audit_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluated = tmp_path / "eval"  # jobs/evaluate.py --audit: the same audit of the same images
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--checkpoint", str(DEMO), "--data", str(PHOTOS),
         "--output", str(evaluated), "--limit", "2", "--image-size", "32", "--audit", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    again = json.loads((evaluated / "audit.json").read_text())
    assert again["per_channel"] == report["per_channel"] and (evaluated / "report.json").exists()
    assert again["operating_points"][0] == report["operating_points"][0]  # the model's own point
    bad = subprocess.run([*run, "--checkpoint", str(tmp_path / "none"), "--input", str(PHOTOS), "--output",
                          str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
