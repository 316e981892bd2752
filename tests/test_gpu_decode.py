"""The tokenizer's GPU options without a GPU: the torch resize against PIL's, which JPEGs take the GPU
path, the batch/fallback logic (a PIL stand-in for nvJPEG), and bf16 autocast of the encoder."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shardmaker import bad_input_samples, exif_rotated_jpeg, jpeg_bytes, make_shard, photo_like

import gq
from pipeline.data.decode import DecodeLimits
from pipeline.data.gpu_decode import EncodedJpeg, GpuJpegDecoder, resize_crop, screen
from pipeline.data.preprocess import preprocess
from pipeline.data.samples import Sample
from pipeline.pack.shard_writer import write_shard
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions

DEMO = "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def pil_decode(datas: list[bytes], device) -> list[torch.Tensor]:
    """Stands in for nvJPEG: raises for the whole batch if any image is bad, like decode_jpeg does."""
    out = []
    for d in datas:
        with Image.open(io.BytesIO(d)) as im:
            im.load()
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
    return out


@pytest.mark.parametrize(("h", "w"), [(96, 128), (300, 200), (64, 64), (64, 100), (513, 257)])
def test_torch_resize_crop_matches_pil_preprocessing(h, w):
    image = photo_like(h * 7 + w, h, w)
    ours = resize_crop(torch.from_numpy(image).permute(2, 0, 1), 64).numpy()
    pil = preprocess(image, 64)
    assert ours.shape == pil.shape == (64, 64, 3) and ours.dtype == np.uint8
    if min(h, w) == 64:
        assert np.array_equal(ours, pil)  # no resize: the same crop
    else:
        assert psnr(ours, pil) > 35  # two bicubic implementations, the same geometry


def test_only_plain_jpegs_take_the_gpu_path():
    limits = DecodeLimits()
    rgb = jpeg_bytes(photo_like(1, 96, 128))
    cases = {
        "rgb": ({"jpg": rgb}, True),
        "gray": ({"jpg": jpeg_bytes(photo_like(2, 96, 128)[..., 0])}, True),
        "cut": ({"jpg": rgb[: len(rgb) // 2]}, True),  # header fine: nvJPEG fails, then the CPU names it
        "cmyk": ({"jpg": jpeg_bytes(Image.fromarray(photo_like(3, 96, 128)).convert("CMYK"))}, False),
        "rotated": ({"jpg": exif_rotated_jpeg()}, False),
        "png": ({"png": b"\x89PNG\r\n\x1a\n" + b"0" * 100}, False),
        "tiny": ({"jpg": jpeg_bytes(photo_like(4, 20, 20))}, False),
        "no_image": ({"txt": b"hello"}, False),
    }
    for key, (members, gpu) in cases.items():
        out = screen(Sample(key=key, index=0, members=members), limits)
        assert isinstance(out, EncodedJpeg) == gpu, key


def test_gpu_decoder_falls_back_image_by_image():
    good = [jpeg_bytes(photo_like(i, 80, 120)) for i in range(3)]
    items = [EncodedJpeg(str(i), i, None, d, None, []) for i, d in enumerate(good)]
    items.insert(1, EncodedJpeg("bad", 9, None, good[0][:300], None, []))
    done, failed = GpuJpegDecoder(64, torch.device("cpu"), decode=pil_decode)(items)
    assert failed == [1] and sorted(done) == [0, 2, 3]
    assert all(t.shape == (64, 64, 3) and t.dtype == torch.uint8 for t in done.values())


def test_nvjpeg_option_keeps_rows_skips_and_tokens(tmp_path, small_checkpoint):
    """With the GPU path (PIL standing in for nvJPEG): the bad-input shard gives the CPU path's rows and
    skip reasons, and images already at image_size give the CPU path's tokens exactly."""
    samples, expected = bad_input_samples()
    write_shard(str(tmp_path / "bad.tar"), samples)
    make_shard(str(tmp_path / "exact.tar"), 6, seed=4, size=(64, 64))
    opts = TokenizeOptions(image_size=64, batch_size=4, decode_threads=2)
    gpu_opts = TokenizeOptions(image_size=64, batch_size=4, decode_threads=2, jpeg_decoder="nvjpeg")
    decoder = GpuJpegDecoder(64, torch.device("cpu"), decode=pil_decode)
    cpu = ShardTokenizer(small_checkpoint, opts)
    gpu = ShardTokenizer(small_checkpoint, gpu_opts, jpeg_decoder=decoder)
    records = {}
    for stem in ("bad", "exact"):
        a = cpu.process(str(tmp_path / f"{stem}.tar"), str(tmp_path / "cpu"))
        b = records[stem] = gpu.process(str(tmp_path / f"{stem}.tar"), str(tmp_path / "gpu"))
        ta, tb = (
            pq.read_table(tmp_path / "cpu" / f"{stem}.parquet"),
            pq.read_table(tmp_path / "gpu" / f"{stem}.parquet"),
        )
        assert ta["key"].to_pylist() == tb["key"].to_pylist()
        assert sorted((s["key"], s["reason"]) for s in a["skipped"]) == sorted(
            (s["key"], s["reason"]) for s in b["skipped"]
        )
        if stem == "exact":
            assert ta["tokens"].to_pylist() == tb["tokens"].to_pylist()
    skipped = {s["key"]: s["reason"] for s in records["bad"]["skipped"]}
    assert skipped["truncated_jpeg"] == expected["truncated_jpeg"]


def test_nvjpeg_option_is_checked():
    with pytest.raises(ValueError, match="jpeg.decoder"):
        TokenizeOptions(jpeg_decoder="libjpeg")
    with pytest.raises(ValueError, match="encoder.precision"):
        TokenizeOptions(encoder_precision="float16")
    assert TokenizeOptions(image_size=256, jpeg_decoder="nvjpeg").preprocessing()["jpeg_decoder"] == "nvjpeg"


def test_nvjpeg_without_a_gpu_is_refused(small_checkpoint):
    with pytest.raises(ValueError, match="CUDA"):
        ShardTokenizer(small_checkpoint, TokenizeOptions(jpeg_decoder="nvjpeg"))


@torch.no_grad()
def test_bf16_autocast_encoder_stays_close_to_float32():
    model = gq.load(DEMO)
    images = torch.from_numpy(np.stack([preprocess(photo_like(i, 256, 320), 256) for i in range(4)]))
    mu, lv = model.encode(images)
    mu16, lv16 = model.encode(images, autocast=torch.bfloat16)
    assert mu16.dtype == lv16.dtype == torch.float32
    rel = float((mu - mu16).norm() / mu.norm())
    assert 0 < rel < 0.03  # autocast really ran (not bitwise float32) and stayed close
    agree = (model.tokenize(images) == model.tokenize(images, autocast=torch.bfloat16)).float().mean()
    assert agree > 0.85
