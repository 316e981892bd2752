"""jobs/evaluate.py in-process on real shards; every number checked against an independent computation."""

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from shardmaker import jpeg_bytes, photo_like, shard_samples
from test_metrics import reference_ssim

import gq
from jobs import evaluate
from pipeline.data.decode import decode_image
from pipeline.data.preprocess import preprocess
from pipeline.evaluate import plots
from pipeline.pack.shard_writer import write_shard

ARGS = ["--image-size", "64", "--batch-size", "4", "--no-progress", "--decode-threads", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-shards")
    first = shard_samples(5, seed=11)
    first.insert(2, {"__key__": "broken", "jpg": b"<html>not an image</html>"})
    first.append({"__key__": "tiny", "jpg": jpeg_bytes(photo_like(3, 20, 20))})
    write_shard(str(d / "val-000000.tar"), first)
    write_shard(str(d / "val-000001.tar"), shard_samples(2, seed=12, size=(128, 96)))
    return d


def reference_images(directory) -> np.ndarray:
    """The good images of every shard, in order: tarfile + decode_image + preprocess (no sample grouping)."""
    images = []
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg") and m.name not in ("broken.jpg", "tiny.jpg"):
                    images.append(preprocess(decode_image(tar.extractfile(m).read()), 64))
    return np.stack(images)


def reference_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def report(shards, small_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    rc = evaluate.main(["--checkpoint", small_checkpoint, "--data", str(shards), "--output", str(out), *ARGS])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_has_every_field(report):
    _, r = report
    for section, fields in {
        "rate": [
            "bits_per_pixel",
            "tokens_per_image",
            "token_grid",
            "codebook_size",
            "bits_per_token",
            "groups",
        ],
        "continuous": ["psnr_db", "ssim", "psnr_db_std", "ssim_std"],
        "gq": ["psnr_db", "ssim", "psnr_db_std", "ssim_std"],
        "drop": ["psnr_db", "ssim"],
        "codebook": [
            "size",
            "used",
            "usage",
            "expected_uniform_usage",
            "entropy_bits",
            "perplexity",
            "tokens",
        ],
        "kl_bits": [
            "min",
            "mean",
            "max",
            "percentiles",
            "above_target",
            "within_band_fraction",
            "target_bits",
        ],
        "skipped": ["count", "by_reason", "samples"],
        "checkpoint": ["model_sha256", "codebook_fingerprint", "codebook", "rule"],
        "data": ["shards", "image_size", "shards_unreadable"],
    }.items():
        assert set(fields) <= set(r[section]), section
    assert r["images"] == 7 and r["rule"] == "posterior"
    assert r["rate"]["bits_per_pixel"] == 0.25  # 64 tokens * 16 bits / (64 * 64) pixels
    assert r["rate"]["tokens_per_image"] == 64 and r["rate"]["token_grid"] == [8, 8]
    assert r["skipped"]["by_reason"] == {"not an image": 1, "too small": 1}
    assert {s["key"] for s in r["skipped"]["samples"]} == {"broken", "tiny"}
    assert set(r["kl_bits"]["percentiles"]) == {"p1", "p5", "p25", "p50", "p75", "p95", "p99"}


def test_values_match_an_independent_computation(report, shards, small_checkpoint):
    _, r = report
    model = gq.load(small_checkpoint)
    x = torch.from_numpy(reference_images(shards))
    tokens, gq_images, continuous, kl = [], [], [], []
    for i in range(0, len(x), 4):
        batch = x[i : i + 4]
        t = model.tokenize(batch)
        tokens.append(t)
        gq_images.append(gq.metrics.to_uint8(model.detokenize(t)))
        continuous.append(gq.metrics.to_uint8(model.reconstruct(batch)))
        with torch.no_grad():
            mu, logvar = model.encode(batch)
        kl.append(gq.kl_bits(mu, logvar, 1).flatten().double())
    images, t, kl = x.numpy(), torch.cat(tokens).numpy(), torch.cat(kl).numpy()
    for name, recon in (("gq", torch.cat(gq_images).numpy()), ("continuous", torch.cat(continuous).numpy())):
        assert r[name]["psnr_db"] == pytest.approx(reference_psnr(images, recon).mean(), abs=1e-9)
        ssims = [reference_ssim(a, b) for a, b in zip(images, recon)]
        assert r[name]["ssim"] == pytest.approx(np.mean(ssims), abs=1e-6)
    assert r["drop"]["psnr_db"] == pytest.approx(r["continuous"]["psnr_db"] - r["gq"]["psnr_db"])

    _, counts = np.unique(t, return_counts=True)
    p = counts / counts.sum()
    cb = r["codebook"]
    assert cb["tokens"] == 7 * 64 and cb["used"] == len(counts) and cb["usage"] == len(counts) / 65536
    assert cb["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-9)
    assert cb["expected_uniform_usage"] == pytest.approx(1 - (1 - 1 / 65536) ** (7 * 64), rel=1e-9)

    k = r["kl_bits"]
    assert k["target_bits"] == 16.0 and k["values"] == len(kl)
    assert (k["min"], k["max"]) == pytest.approx((kl.min(), kl.max()), abs=1e-9)
    assert k["mean"] == pytest.approx(kl.mean(), rel=1e-6)
    assert k["above_target"] == int((kl > 16).sum())
    assert k["within_band_fraction"] == pytest.approx(np.mean(np.abs(kl - 16) <= 0.5))
    assert k["percentiles"]["p50"] == pytest.approx(np.median(kl), abs=2 / 32)


def test_plots_and_markdown(report):
    out, r = report
    sizes = {}
    for name in ("reconstructions.png", "kl_histogram.png", "code_usage.png"):
        with Image.open(out / name) as image:
            image.load()
            sizes[name] = image.size
    assert sizes["reconstructions.png"][1] > 4 * 128  # 4 example rows, enlarged to 128 px
    assert set(r["plots"].values()) == set(sizes)
    md = (out / "report.md").read_text()
    assert "0.25 bpp" in md and "| GQ tokens |" in md and "reconstructions.png" in md
    assert "skipped 2 (not an image: 1, too small: 1)" in md  # the summaries' one by-reason format


def test_limit_rule_and_unreadable_shard(shards, small_checkpoint, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{tmp_path}/missing.tar\n{shards}/val-000000.tar\n{shards}/val-000001.tar\n")
    out = tmp_path / "out"
    argv = ["--checkpoint", small_checkpoint, "--data", str(listing), "--output", str(out), "--limit", "3"]
    assert evaluate.main([*argv, "--rule", "mean", *ARGS]) == 1  # report written, but a shard was unreadable
    r = json.loads((out / "report.json").read_text())
    assert r["images"] == 3 and r["rule"] == "mean" and r["checkpoint"]["rule"] == "posterior"
    assert r["data"]["shards_unreadable"] == [f"{tmp_path}/missing.tar"]
    assert r["skipped"]["by_reason"] == {"not an image": 1, "shard unreadable": 1}

    # rule "mean": the nearest code to mu, found here by brute force
    model = gq.load(small_checkpoint)
    x = torch.from_numpy(reference_images(shards)[:3])
    with torch.no_grad():
        mu, _ = model.encode(x)
    flat = mu.permute(0, 2, 3, 1).reshape(-1, 16).double()
    nearest = torch.cdist(flat, model.quantizer.codes.double()).argmin(1)
    assert r["codebook"]["used"] == len(torch.unique(nearest))
    recon = gq.metrics.to_uint8(model.detokenize(nearest.view(3, 8, 8, 1))).numpy()
    assert r["gq"]["psnr_db"] == pytest.approx(reference_psnr(x.numpy(), recon).mean(), abs=1e-9)
    assert math.isfinite(r["continuous"]["psnr_db"])


def test_unreadable_shards_exit_1_and_are_named(shards, small_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "val-000002.tar").write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>\n" * 30)
    (bad / "val-000003.tar").write_bytes(b"")
    (bad / "val-000004.tar.gz").write_bytes(b"not gzip at all" * 40)
    listing = tmp_path / "shards.txt"
    names = [f"{shards}/val-000001.tar", *(str(p) for p in sorted(bad.iterdir()))]
    listing.write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    code = evaluate.main(
        ["--checkpoint", small_checkpoint, "--data", str(listing), "--output", str(out), *ARGS]
    )
    assert code == 1
    r = json.loads((out / "report.json").read_text())
    assert r["images"] == 2 and r["data"]["shards_unreadable"] == names[1:]
    assert r["skipped"]["by_reason"] == {"shard unreadable": 3}
    err = capsys.readouterr().err
    assert all(n in err for n in names[1:]), err


def test_bad_arguments_exit_2(shards, small_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert (
        evaluate.main(
            ["--checkpoint", small_checkpoint, "--data", str(shards), "--output", out, "--image-size", "60"]
        )
        == 2
    )
    assert "multiple of 8" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path), "--data", str(shards), "--output", out]) == 2
    err = capsys.readouterr().err
    assert "Is a directory" in err and len(err.strip().splitlines()) == 1
    assert (
        evaluate.main(
            ["--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(shards), "--output", out]
        )
        == 2
    )
    assert (
        evaluate.main(["--checkpoint", small_checkpoint, "--data", str(tmp_path / "empty"), "--output", out])
        == 2
    )
    with pytest.raises(SystemExit) as e:
        evaluate.main(
            ["--checkpoint", small_checkpoint, "--data", str(shards), "--output", out, "--limit", "0"]
        )
    assert e.value.code == 2


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_plots_draw_with_either_backend(backend):
    if backend == "matplotlib" and not plots.have_matplotlib():
        pytest.skip("matplotlib not installed")
    counts = np.zeros(8193, np.int64)
    counts[400:600] = 5
    codes = np.random.default_rng(0).poisson(2.0, 4096)
    for png in (
        plots.kl_histogram(counts, 1 / 32, target_bits=16.0, lo=12.5, hi=18.7, backend=backend),
        plots.code_usage(codes, backend=backend),
    ):
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) >= 300
