"""Benchmark scripts at a tiny size on the CPU: the GPU scripts' smoke modes (every code path, so a script
that would break on the device is caught here; their numbers are measured only on a GPU), and the JPEG
draft benchmark on generated JPEGs."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, out: Path) -> dict:
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def test_search_benchmark_smoke(tmp_path):
    result = run("search_gpu.py", tmp_path / "search.json")
    assert [r["rule"] for r in result["rules"]] == ["posterior", "mean"]
    for row in result["rules"]:
        # the path under test, the exact tiled path and both baselines find the same codes here
        assert row["exact_tiled_agreement"] == 1.0
        assert row["dense_agreement"] == 1.0 and row["dense_n"] == 2048
        assert row["chunked_agreement"] > 0.999
        assert row["ours_ms"] > 0 and row["dense_ms_scaled"] > 0


def test_tokenizer_benchmark_smoke(tmp_path):
    result = run("tokenizer_gpu.py", tmp_path / "tok.json")
    rows = {(r["preset"], r["encoder"], r["jpeg_decoder"]): r for r in result["rows"]}
    assert set(rows) == {("small-f8c16", "float32", "pil"), ("small-f8c16", "bfloat16", "pil")}
    for r in rows.values():
        assert abs(sum(r["stage_share"].values()) - 1) < 1e-9
        assert r["bottleneck"] in r["stage_share"] and r["images_per_s"] > 0
    assert 0.85 < rows[("small-f8c16", "bfloat16", "pil")]["token_agreement_with_float32"] <= 1


def test_jpeg_draft_benchmark(tmp_path, small_checkpoint):
    from PIL import Image
    from shardmaker import photo_like

    for i in range(3):
        Image.fromarray(photo_like(i, 600, 900)).save(tmp_path / f"{i}.jpg", quality=92)
    out = tmp_path / "draft.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "jpeg_draft.py"), "--images", str(tmp_path / "*.jpg"),
         "--image-size", "64", "--repeat", "1", "--checkpoint", small_checkpoint, "--json", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["megapixels_mean"] == 0.54
    assert result["crops_identical"] == 0 and result["psnr_db_min"] > 35  # 1/4 scale, then the resize
    assert result["images_per_s"]["pil-draft"] > 0 and 0 < result["tokens_equal"] <= 1


def test_presets_benchmark_smoke(tmp_path):
    result = run("presets.py", tmp_path / "presets.json")
    rows = {r["preset"]: r for r in result["rows"]}
    assert rows["paper-f8c16 (converted)"]["parameters"] == 35_325_856 + 51_648_771
    assert rows["small-f8c16"]["parameters"] < rows["paper-f8c16 (converted)"]["parameters"]
    f16 = rows["small-f16c14"]  # at 64 px: 4 x 4 tokens of 14 bits
    assert (f16["tokens"], f16["bits_per_token"], f16["bpp"]) == (16, 14, 16 * 14 / 64**2)
    for r in rows.values():
        assert r["encoder_ms"] > 0 and r["search_ms"] > 0
        assert abs(r["images_per_s"] - 1e3 / (r["encoder_ms"] + r["search_ms"])) < 1e-6 * r["images_per_s"]


def test_make_shards_benchmark_small(tmp_path):
    out = tmp_path / "shards.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "make_shards.py"), "--count", "30", "--repeat", "1",
         "--views-images", "2", "--image-size", "64", "--json", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["images"] == 30 and result["make_shards"]["images_per_s"] > 0
    views = result["views"]
    assert [views[v]["rows"] for v in ("center", "flip", "tencrop")] == [2, 4, 20]
    assert views["tencrop_over_center_time"] > 0
