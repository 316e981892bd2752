import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shardmaker import photo_like

from pipeline.data.preprocess import preprocess, random_crop_flip, resize_shorter_side, to_model_input


@pytest.mark.parametrize("shape", [(96, 128), (128, 96), (64, 64), (40, 50), (300, 301), (257, 1000)])
def test_output_shape_and_dtype(shape):
    image = photo_like(0, *shape)
    out = preprocess(image, 64)
    assert (
        out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    )


def test_shorter_side_rounding_keeps_aspect():
    assert resize_shorter_side(photo_like(0, 100, 150), 64).shape == (64, 96, 3)
    assert resize_shorter_side(photo_like(0, 150, 100), 64).shape == (96, 64, 3)
    assert resize_shorter_side(photo_like(0, 99, 100), 64).shape == (64, 65, 3)  # 64.65 rounds to 65


def test_shorter_side_already_at_size_is_not_resampled():
    image = photo_like(1, 64, 100)
    assert np.array_equal(preprocess(image, 64), image[:, 18:82])
    tall = photo_like(2, 101, 64)
    assert np.array_equal(preprocess(tall, 64), tall[18:82])


def checkerboard(n):
    y, x = np.mgrid[0:n, 0:n]
    board = ((x + y) % 2 * 255).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=2)


def torch_reference(image, size):
    """torch's antialiased bicubic (which follows PIL's filter), as an independent implementation."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    height, width = image.shape[:2]
    scale = size / min(height, width)
    out_size = (size, round(width * scale)) if height <= width else (round(height * scale), size)
    out = F.interpolate(tensor, size=out_size, mode="bicubic", antialias=True, align_corners=False)
    out = out.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[top : top + size, left : left + size]


def test_downscaling_is_antialiased():
    out = preprocess(checkerboard(256), 64)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 3  # a 1-pixel checkerboard averages to gray
    naive = checkerboard(256)[::4, ::4]  # what sampling without a low-pass filter gives
    assert abs(naive.mean() - 127.5) > 100  # aliases to black
    reference = torch_reference(checkerboard(256), 64).astype(int)
    assert np.abs(out.astype(int) - reference).mean() < 3


@pytest.mark.parametrize("shape", [(300, 420), (420, 300), (96, 128), (40, 50)])
def test_matches_an_independent_resize(shape):
    image = photo_like(3, *shape)
    error = np.abs(preprocess(image, 64).astype(int) - torch_reference(image, 64).astype(int))
    assert error.mean() < 0.5 and error.max() <= 2


def test_random_crop_flip_is_deterministic_and_varies():
    image = photo_like(4, 64, 160)  # shorter side at size: every crop is a window of the original
    first = random_crop_flip(image, 64, np.random.default_rng(5))
    assert np.array_equal(first, random_crop_flip(image, 64, np.random.default_rng(5)))
    outs = [random_crop_flip(image, 64, np.random.default_rng(seed)) for seed in range(12)]
    assert len({o.tobytes() for o in outs}) > 6
    windows = [image[:, i : i + 64] for i in range(160 - 64 + 1)]
    flipped = 0
    for out in outs:
        assert out.shape == (64, 64, 3) and out.flags.c_contiguous
        if any(np.array_equal(out, w[:, ::-1]) for w in windows):
            flipped += 1
        else:
            assert any(np.array_equal(out, w) for w in windows)
    assert 0 < flipped < len(outs)
    rng = np.random.default_rng(6)
    tall = random_crop_flip(photo_like(4, 200, 90), 64, rng)
    assert tall.shape == (64, 64, 3)


def test_to_model_input_range_and_layout():
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[0, 1, 2] = (0, 255, 51)
    images[1] = 255
    x = to_model_input(images)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[0, :, 1, 2].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    assert x[0, 0, 0, 0] == -1 and torch.all(x[1] == 1)
    assert torch.equal(to_model_input(list(images)), x)
    readonly = images.copy()
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(to_model_input(readonly), x)
    with pytest.raises(ValueError):
        to_model_input(images.astype(np.float32))
    with pytest.raises(ValueError):
        to_model_input(images[0])
