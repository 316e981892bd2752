import io
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from shardmaker import (
    HAS_WEBP,
    bad_input_samples,
    big_header_over_small_data,
    damaged,
    exif_rotated_jpeg,
    jpeg_bytes,
    photo_like,
    png_bytes,
    png_declaring,
    png_with_bad_pixels,
    real_jpegs,
    webp_bytes,
)

from pipeline.data import reasons
from pipeline.data.decode import (
    Decoded,
    DecodeLimits,
    decode_image,
    decode_image_and_shape,
    decode_sample,
    find_image,
    label_of,
)
from pipeline.data.preprocess import preprocess
from pipeline.data.reasons import (
    CORRUPT,
    DUPLICATE,
    EMPTY,
    NO_IMAGE,
    NOT_IMAGE,
    TAR_TRUNCATED,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    TRUNCATED,
    count_by_reason,
    format_by_reason,
)
from pipeline.data.samples import Note, Rejected, Sample, Skip, iter_samples
from pipeline.data.shards import open_shard
from pipeline.pack.shard_writer import write_shard

LIMITS = DecodeLimits()


def members_of(key):
    samples, _ = bad_input_samples()
    return next(s for s in samples if s["__key__"] == key)


def decoded_member(key, ext):
    data = members_of(key)[ext]
    return decode_image(data if isinstance(data, bytes) else str(data).encode())


def test_reason_strings_are_the_documented_ones():
    assert (reasons.TRUNCATED, reasons.CORRUPT, reasons.EMPTY, reasons.NOT_IMAGE, reasons.NO_IMAGE) == (
        "truncated image",
        "corrupt image",
        "empty member",
        "not an image",
        "no image member",
    )
    assert (
        reasons.DUPLICATE,
        reasons.TOO_SMALL,
        reasons.ASPECT,
        reasons.TOO_MANY_PIXELS,
        reasons.TAR_TRUNCATED,
    ) == (
        "duplicate key",
        "too small",
        "aspect ratio",
        "too many pixels",
        "tar truncated",
    )
    assert reasons.MEMBER_TOO_LARGE == "member too large"
    assert len(set(reasons.REASONS)) == len(reasons.REASONS) == 11
    assert reasons.NOTES == (
        "link member",
        "extra image member",
        "unparsable label",
        "invalid UTF-8",
        "invalid JSON",
        "unreadable member",
    )
    assert not set(reasons.NOTES) & set(reasons.REASONS)
    assert reasons.SHARD_UNREADABLE == "shard unreadable"
    assert reasons.FILE_REASONS == (
        "missing file",
        "not a regular file",
        "file too large",
        "empty member",
        "not an image",
        "not in the labels file",
        "outside the class folders",
        "in a subfolder of a flat folder",
        "bad list line",
        "duplicate list line",
        "directory link loop",
    )


def test_count_and_format_by_reason():
    items = [
        {"reason": "too small"},
        Skip("a", 0, "corrupt image"),
        Note("link member"),
        {"reason": "too small"},
    ]
    counts = count_by_reason(items)
    assert counts == {"corrupt image": 1, "link member": 1, "too small": 2}
    assert list(counts) == ["corrupt image", "link member", "too small"]  # sorted, as records store them
    assert format_by_reason(counts) == " (corrupt image: 1, link member: 1, too small: 2)"
    assert format_by_reason({"b": 1, "a": 3}) == " (a: 3, b: 1)"
    assert count_by_reason([]) == {} and format_by_reason({}) == ""


def test_rejected_becomes_its_skip():
    e = Rejected(TOO_SMALL, "20x20, shorter side < 64")
    assert str(e) == "too small: 20x20, shorter side < 64"
    assert e.skip("k", 3) == Skip("k", 3, TOO_SMALL, "20x20, shorter side < 64")
    assert str(Rejected(EMPTY)) == EMPTY and Rejected(EMPTY).skip("", -1) == Skip("", -1, EMPTY, "")


@pytest.mark.parametrize("ext", [".tar", ".tar.zst"])
def test_every_bad_input_case_end_to_end(tmp_path, ext):
    samples, expected = bad_input_samples()
    url = str(tmp_path / f"bad{ext}")
    write_shard(url, samples)
    with open_shard(url) as stream:
        outcomes = [
            decode_sample(s, image_size=64, limits=LIMITS) if isinstance(s, Sample) else s
            for s in iter_samples(stream, shard="bad")
        ]
    assert [o.index for o in outcomes] == list(range(len(samples)))  # every sample accounted for, in order
    assert [o.key for o in outcomes] == [s["__key__"] for s in samples]
    seen = Counter()
    for outcome in outcomes:
        seen[outcome.key] += 1
        want = None if (outcome.key == "dup" and seen["dup"] == 1) else expected[outcome.key]
        if want is None:
            assert isinstance(outcome, Decoded), outcome
            assert outcome.image.shape == (64, 64, 3) and outcome.image.dtype == np.uint8
        else:
            assert isinstance(outcome, Skip) and outcome.reason == want, (outcome, want)
    labels = {o.key: o.label for o in outcomes if isinstance(o, Decoded)}
    assert labels["good"] == 1 and labels["png16"] == 3


def test_cmyk_jpeg_keeps_its_color():
    image = decoded_member("cmyk", "jpg")
    assert image.shape == (80, 96, 3)
    r, g, b = image.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_grayscale_jpeg_becomes_three_equal_channels():
    image = decoded_member("grayscale", "jpg")
    assert image.shape == (96, 128, 3)
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])


def test_sixteen_bit_png_is_scaled_not_clipped():
    image = decoded_member("png16", "png")
    assert image.shape == (80, 256, 3)
    row = image[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # 65535 -> 255
    assert np.all(np.diff(row) >= 0)
    assert abs(row[128] - 128) <= 1  # a gradient, not a step at 255
    assert np.abs(row - np.linspace(0, 255, 256)).max() <= 1


def test_alpha_png_is_composited_on_white():
    image = decoded_member("alpha_png", "png")
    assert tuple(image[10, 5]) == (255, 255, 255)  # fully transparent black -> white
    assert tuple(image[10, 90]) == (255, 0, 0)  # opaque red stays red
    half = np.zeros((80, 80, 4), np.uint8)
    half[...] = (0, 0, 0, 128)
    assert tuple(decode_image(png_bytes(half))[0, 0]) == (127, 127, 127)  # half black on white


def test_palette_png_with_transparency_is_composited_on_white():
    image = decoded_member("palette_transparency", "png")
    assert tuple(image[10, 5]) == (255, 255, 255)
    assert tuple(image[10, 90]) == (0, 0, 255)


def test_other_modes_convert():
    photo = photo_like(11, 80, 90)
    gray_alpha = Image.fromarray(photo[..., 0]).convert("LA")
    assert decode_image(png_bytes(gray_alpha)).shape == (80, 90, 3)
    rgb_with_key = Image.fromarray(photo)  # tRNS colour key on an RGB PNG
    key_color = tuple(int(v) for v in photo[0, 0])
    image = decode_image(png_bytes(rgb_with_key, transparency=key_color))
    assert tuple(image[0, 0]) == (255, 255, 255)
    bilevel = Image.fromarray(photo[..., 0] > 128)
    assert decode_image(png_bytes(bilevel)).shape == (80, 90, 3)
    for fmt in ("GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format=fmt)
        assert decode_image(buffer.getvalue()).shape == (80, 90, 3), fmt


def float_tiff(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.float32)).save(buffer, format="TIFF")  # mode "F"
    return buffer.getvalue()


def test_float_tiff_in_unit_range_is_scaled_and_0_255_kept():
    gray = photo_like(12, 80, 90)[..., 1]
    unit = decode_image(float_tiff(gray / 255.0))
    assert np.abs(unit[..., 0].astype(int) - gray).max() <= 1  # 0..1 -> 0..255, not a black image
    assert np.array_equal(decode_image(float_tiff(gray.astype(np.float32))), np.repeat(gray[..., None], 3, 2))
    clipped = decode_image(float_tiff(np.full((80, 90), 300.0)))
    assert clipped.min() == 255
    nan = np.full((80, 90), 0.5)
    nan[3, 4] = np.nan
    with pytest.raises(Rejected) as e:
        decode_image(float_tiff(nan))
    assert e.value.reason == CORRUPT and "non-finite" in e.value.detail


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_jpeg_draft_decodes_at_a_reduced_scale_close_to_the_full_decode():
    big = jpeg_bytes(photo_like(13, 1200, 1800), quality=95)
    full = decode_image(big)
    drafted, shape = decode_image_and_shape(big, draft_side=256)
    assert full.shape == (1200, 1800, 3)
    assert drafted.shape == (300, 450, 3) and shape == (1200, 1800)  # 1/4: the smallest scale keeping >= 256
    assert decode_image(big, draft_side=600).shape == (600, 900, 3)  # exactly 1/2 is enough
    # what the tokenizer sees (draft side = DRAFT_MARGIN x the crop size): close to the full decode's
    assert psnr_db(preprocess(full, 128), preprocess(drafted, 128, shape)) > 40

    # nothing to gain: a JPEG whose shorter side is below twice the draft side, and other formats, decode
    # bit for bit as without the option
    small = jpeg_bytes(photo_like(14, 300, 500))
    assert np.array_equal(decode_image(small, draft_side=256), decode_image(small))
    png = png_bytes(photo_like(15, 1200, 1600))
    assert np.array_equal(decode_image(png, draft_side=256), decode_image(png))


def textured(height: int, width: int) -> np.ndarray:
    """photo_like plus a fine diagonal grating: a crop shifted by one pixel no longer matches."""
    y, x = np.mgrid[0:height, 0:width]
    grating = 60 * np.sin(2 * np.pi * (x / 23.0 + y / 41.0))[..., None]
    return np.clip(photo_like(20, height, width) + grating, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [256, 128])
def test_jpeg_draft_crops_cover_what_the_full_decode_crops_cover(size):
    # 1074 x 1365 halves to 537 x 683 (rounded up): resized from its own shape the draft image's longer
    # side would round to 326, not 325, and the center crop would move by a pixel
    sample = Sample("k", 0, {"jpg": jpeg_bytes(textured(1074, 1365), quality=95)})
    full = decode_sample(sample, image_size=size)
    drafted = decode_sample(sample, image_size=size, jpeg_draft=True)
    assert psnr_db(full.image, drafted.image) > 40  # 18.8 and 23.0 dB with the crop a pixel off


def test_jpeg_draft_keeps_orientation_and_limits():
    rotated = exif_rotated_jpeg(height=1000, width=2000)  # displayed 1000 wide, 2000 high
    full = decode_image(rotated)
    drafted, shape = decode_image_and_shape(rotated, draft_side=200)
    assert full.shape == (2000, 1000, 3) and drafted.shape == (500, 250, 3) and shape == (2000, 1000)
    assert tuple(drafted[10, -10]) == pytest.approx((255, 0, 0), abs=40)  # the red corner, now top right
    assert psnr_db(preprocess(full, 100), preprocess(drafted, 100, shape)) > 35
    # the limits apply to the declared size, before any reduction
    big = jpeg_bytes(photo_like(16, 1200, 1800))
    with pytest.raises(Rejected) as e:
        decode_image(big, DecodeLimits(max_pixels=1_000_000), draft_side=64)
    assert e.value.reason == TOO_MANY_PIXELS


def test_exif_orientation_is_applied():
    stored = exif_rotated_jpeg(100, 200, orientation=6)
    assert Image.open(io.BytesIO(stored)).size == (200, 100)
    image = decode_image(stored)
    assert image.shape == (200, 100, 3)
    # orientation 6 shows the stored top-left corner at the top right
    assert image[10, 90, 0] > 200 and image[10, 90, 1] < 60
    assert image[10, 10, 0] < 200 or image[10, 10, 1] > 60
    assert decode_image(exif_rotated_jpeg(100, 200, orientation=1)).shape == (100, 200, 3)
    assert decode_image(exif_rotated_jpeg(100, 200, orientation=3)).shape == (100, 200, 3)


def test_decompression_bombs_are_rejected_from_the_header_fast():
    for width, height in [(100_000, 100_000), (8000, 6000)]:
        data = png_declaring(width, height)
        start = time.perf_counter()
        with pytest.raises(Rejected) as info:
            decode_image(data)
        assert time.perf_counter() - start < 1.0
        assert info.value.reason == TOO_MANY_PIXELS
    # the limit is ours: a lower max_pixels applies before any decoding
    with pytest.raises(Rejected, match=TOO_MANY_PIXELS):
        decode_image(jpeg_bytes(photo_like(1, 96, 128)), DecodeLimits(max_pixels=96 * 128 - 1))


def test_truncation_and_corruption_are_told_apart():
    photo = photo_like(12, 96, 128)
    cases = {
        "jpeg": jpeg_bytes(photo),
        "progressive jpeg": jpeg_bytes(photo, progressive=True),
        "png": png_bytes(photo),
    }
    if HAS_WEBP:
        cases["webp"] = webp_bytes(photo)
    for name, data in cases.items():
        for fraction in (0.1, 0.5, 0.9):
            with pytest.raises(Rejected) as info:
                decode_image(data[: int(len(data) * fraction)])
            assert info.value.reason == TRUNCATED, (name, fraction, info.value)
    with pytest.raises(Rejected) as info:
        decode_image(png_with_bad_pixels(photo))
    assert info.value.reason == CORRUPT
    with pytest.raises(Rejected) as info:
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 40 + b"\xff\xd9")  # JPEG magic, complete, garbage
    assert info.value.reason == CORRUPT


def test_empty_and_non_images():
    with pytest.raises(Rejected) as info:
        decode_image(b"")
    assert info.value.reason == EMPTY
    for data in [b"plain text", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n", b"\x00" * 100]:
        with pytest.raises(Rejected) as info:
            decode_image(data)
        assert info.value.reason == NOT_IMAGE, data


def test_limits_are_options():
    tiny = jpeg_bytes(photo_like(3, 20, 20))
    with pytest.raises(Rejected, match=TOO_SMALL):
        decode_image(tiny)
    assert decode_image(tiny, DecodeLimits(min_side=16)).shape == (20, 20, 3)
    wide = jpeg_bytes(photo_like(4, 100, 800))
    assert decode_image(wide, DecodeLimits(max_aspect=8)).shape == (100, 800, 3)
    with pytest.raises(ValueError):
        DecodeLimits(min_side=0)


def test_find_image_by_extension_then_content():
    jpeg = jpeg_bytes(photo_like(1, 70, 70))
    assert find_image({"cls": b"1", "JPG": jpeg}) == ("JPG", jpeg)
    assert find_image({"png": b"x", "jpg": b"y"}) == ("jpg", b"y")  # preference order, bad bytes still chosen
    assert find_image({"txt": b"BMW parked outside", "bin": jpeg}) == ("bin", jpeg)
    assert find_image({"data": png_bytes(photo_like(1, 70, 70))})[0] == "data"
    for members in [{"cls": b"1", "json": b"{}", "txt": b"BM" + b"\x00" * 40}, {}]:
        with pytest.raises(Rejected) as info:
            find_image(members)
        assert info.value.reason == NO_IMAGE


def test_label_of():
    assert label_of({"cls": b" 42\n"}) == 42
    assert label_of({"CLS": b"7"}) == 7
    assert label_of({"cls": b"cat"}) is None
    assert label_of({"cls": b"\xff"}) is None
    assert label_of({"jpg": b""}) is None
    # the label column is int64: a larger .cls would fail the shard's write, so it is unparsable here
    assert label_of({"cls": str(2**63 - 1).encode()}) == 2**63 - 1
    assert label_of({"cls": str(-(2**63)).encode()}) == -(2**63)
    assert label_of({"cls": str(2**63).encode()}) is None


def test_decode_sample_center_and_training_crops():
    photo = photo_like(5, 96, 160)
    sample = Sample("k", 3, {"jpg": png_bytes(photo), "cls": b"4"})
    center = decode_sample(sample, image_size=96, limits=LIMITS)
    assert (center.key, center.index, center.label) == ("k", 3, 4)
    assert np.array_equal(center.image, photo[:, 32:128])
    first = decode_sample(sample, image_size=64, limits=LIMITS, train_rng=np.random.default_rng(1))
    again = decode_sample(sample, image_size=64, limits=LIMITS, train_rng=np.random.default_rng(1))
    assert np.array_equal(first.image, again.image) and first.image.shape == (64, 64, 3)
    skip = decode_sample(Sample("bad", 9, {"jpg": b"", "cls": b"1"}), image_size=64, limits=LIMITS)
    assert skip == Skip("bad", 9, EMPTY, ".jpg: 0 bytes")


def test_duplicate_and_tar_reasons_are_reexported():
    assert DUPLICATE == "duplicate key" and TAR_TRUNCATED == "tar truncated"


def test_decoding_from_threads_matches_sequential():
    samples, _ = bad_input_samples()
    items = [
        Sample(s["__key__"], i, {k: v for k, v in s.items() if isinstance(v, bytes)})
        for i, s in enumerate(samples)
    ]
    items = items * 4

    def run(sample):
        out = decode_sample(sample, image_size=64, limits=LIMITS)
        return (out.reason, "") if isinstance(out, Skip) else (None, out.image.tobytes())

    sequential = [run(s) for s in items]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, items)) == sequential


# ---- damaged real JPEGs that libjpeg only warns about (issue 12)


@pytest.mark.parametrize("kind", ["cut_reterminated", "spurious_marker", "no_huffman_tables"])
def test_damaged_real_jpegs_are_corrupt_not_grey_rows(kind):
    photos = real_jpegs()
    assert len(photos) >= 8
    for data in photos:
        bad = damaged(data, kind)
        Image.open(io.BytesIO(bad)).load()  # PIL alone decodes each of them without a word
        with pytest.raises(Rejected) as e:
            decode_image(bad, DecodeLimits(max_pixels=10**9))
        assert e.value.reason == CORRUPT, (kind, e.value)
        # the undamaged photo still decodes, to the very pixels PIL gives
        np.testing.assert_array_equal(
            decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        )


def test_big_header_over_small_data_is_corrupt():
    data = big_header_over_small_data()
    Image.open(io.BytesIO(data)).load()  # a flat grey 6000x6000 for PIL
    with pytest.raises(Rejected) as e:
        decode_image(data, DecodeLimits(max_pixels=10**9))
    assert e.value.reason == CORRUPT and "premature end" in e.value.detail


def test_good_jpegs_of_every_kind_decode_as_pil_does():
    photo = photo_like(11, 150, 200)
    kinds = [
        jpeg_bytes(photo),
        jpeg_bytes(photo, optimize=True),
        jpeg_bytes(photo, subsampling=0),
        jpeg_bytes(photo, progressive=True),
        jpeg_bytes(photo, restart_marker_rows=1),
        jpeg_bytes(photo[..., 0]),
        jpeg_bytes(photo) + b"trailing junk after the end marker",
    ]
    assert b"\xff\xdd" in kinds[4]  # a restart interval: RSTn markers inside the scan
    for data in kinds:
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(decode_image(data), np.asarray(image.convert("RGB")))


def test_notes_extra_image_and_unparsable_label_keep_the_row():
    photo = jpeg_bytes(photo_like(12, 96, 128))
    sample = Sample("k", 3, {"jpg": photo, "png": png_bytes(photo_like(13, 96, 128)), "cls": b"cat"})
    out = decode_sample(sample, image_size=64)
    assert isinstance(out, Decoded) and (out.key, out.index, out.label) == ("k", 3, None)
    assert out.notes == [
        Note(reasons.EXTRA_IMAGE, ".png not used (.jpg was)"),
        Note(reasons.BAD_LABEL, ".cls: b'cat'"),
    ]
    np.testing.assert_array_equal(
        out.image, decode_sample(Sample("k", 3, {"jpg": photo}), image_size=64).image
    )
