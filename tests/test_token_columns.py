"""The columns beyond the tokens: kept members (captions, JSON metadata), width and height, and views
(flip, tencrop) checked against `model.tokenize` of crops computed here, independently of the pipeline."""

import io
import json

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shardmaker import jpeg_bytes, photo_like, real_jpegs

import gq
from pipeline.data import extras
from pipeline.data.reasons import BAD_LABEL, INVALID_JSON, INVALID_UTF8, UNREADABLE
from pipeline.pack.shard_writer import write_shard
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions
from pipeline.tokens.records import check_run

SIZE = 64
CAPTIONS = ["a cat on a mat", "", "café au lait, 猫と🐱", "line one\nline two\ttab", None, b"\xff\xfe bad"]


def caption_shard(path) -> list[dict]:
    samples = []
    for i, caption in enumerate(CAPTIONS):
        h, w = 80 + 8 * i, 120 - 4 * i
        sample = {"__key__": f"laion/{i:05d}", "jpg": jpeg_bytes(photo_like(i, h, w))}
        if caption is not None:
            sample["txt"] = caption
        meta = {"url": f"https://example.com/{i}.jpg", "original_width": w, "similarity": 0.3 + i / 100}
        sample["json"] = b'{"url": "cut' if i == 3 else json.dumps(meta, ensure_ascii=False)
        samples.append(sample)
    write_shard(str(path), samples)
    return samples


def test_captions_and_json_round_trip_through_duckdb_and_polars(tmp_path, small_checkpoint):
    samples = caption_shard(tmp_path / "laion-000000.tar")
    worker = ShardTokenizer(
        small_checkpoint, TokenizeOptions(image_size=SIZE, batch_size=4, keep=("txt", "json"))
    )
    record = worker.process(str(tmp_path / "laion-000000.tar"), str(tmp_path / "out"))
    assert record["rows"] == len(CAPTIONS) and not record["skipped"]
    files = str(tmp_path / "out" / "*.parquet")

    want_txt = [c if isinstance(c, str) else None for c in CAPTIONS]  # absent and invalid UTF-8: null
    want_json = [None if i == 3 else s["json"] for i, s in enumerate(samples)]
    rows = duckdb.sql(f"SELECT key, txt, json, width, height FROM '{files}' ORDER BY index").fetchall()
    assert [r[1] for r in rows] == want_txt
    assert [r[2] for r in rows] == want_json
    assert [json.loads(r[2])["url"] for r in rows if r[2]] == [
        f"https://example.com/{i}.jpg" for i in (0, 1, 2, 4, 5)
    ]
    sizes = [Image.open(io.BytesIO(s["jpg"])).size for s in samples]  # (width, height)
    assert [(r[3], r[4]) for r in rows] == sizes
    frame = pl.read_parquet(files)
    assert frame["txt"].to_list() == want_txt and frame["json"].to_list() == want_json
    assert frame.schema["width"] == pl.Int32 and frame.schema["txt"] == pl.String

    notes = {(n["key"], n["reason"]) for n in record["notes"]}
    assert notes == {("laion/00005", INVALID_UTF8), ("laion/00003", INVALID_JSON)}
    meta = json.loads(pq.read_schema(tmp_path / "out" / "laion-000000.parquet").metadata[b"gq"])
    assert meta["preprocessing"]["keep"] == ["txt", "json"]


# One kept member of each kind of failure reading one can raise (issue 26, item 10); the good samples
# around them must become rows of a committed shard. (json text, txt bytes, cls bytes, expected note)
PLANTED = {
    "deep": (b"[" * 100_000 + b"]" * 100_000, b"ok", b"1", INVALID_JSON),  # RecursionError
    "digits": (b"9" * 5000, b"ok", b"2", INVALID_JSON),  # ValueError: int conversion limit
    "bom": (b"\xef\xbb\xbf{}", b"ok", b"3", INVALID_JSON),  # JSONDecodeError: a BOM before the text
    "syntax": (b'{"a": ', b"ok", b"4", INVALID_JSON),  # JSONDecodeError
    "utf8": (b'"\xc3("', b"\xff\xfe", b"5", INVALID_UTF8),  # UnicodeDecodeError, in .json and .txt
    "memory": (b'"planted"', b"ok", b"6", UNREADABLE),  # MemoryError (planted through json.loads below)
    "label": (b"{}", b"ok", b"1" * 20, BAD_LABEL),  # a .cls beyond int64: OverflowError at write time
}


def test_every_failure_of_a_kept_member_is_its_note_and_the_shard_is_committed(
    tmp_path, small_checkpoint, monkeypatch
):
    real_loads = json.loads

    def loads(text, *args, **kwargs):
        if text == '"planted"':
            raise MemoryError("planted")
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(extras.json, "loads", loads)
    samples = [{"__key__": "good0", "jpg": jpeg_bytes(photo_like(0, 80, 96)), "json": b"{}", "txt": b"a"}]
    for i, (key, (js, txt, cls, _)) in enumerate(PLANTED.items()):
        samples.append({"__key__": key, "jpg": jpeg_bytes(photo_like(i + 1, 80, 96)), "json": js, "txt": txt,
                        "cls": cls})  # fmt: skip
    samples.append(
        {"__key__": "good1", "jpg": jpeg_bytes(photo_like(9, 96, 80)), "json": b"[1]", "cls": b"7"}
    )
    write_shard(str(tmp_path / "bad-000000.tar"), samples)
    worker = ShardTokenizer(
        small_checkpoint, TokenizeOptions(image_size=SIZE, batch_size=4, keep=("txt", "json"))
    )
    record = worker.process(str(tmp_path / "bad-000000.tar"), str(tmp_path / "out"))

    assert record["rows"] == len(samples) and not record["skipped"]  # every sample a row
    table = pq.read_table(tmp_path / "out" / "bad-000000.parquet")
    rows = {
        k: (j, t, c) for k, j, t, c in zip(*(table[c].to_pylist() for c in ("key", "json", "txt", "label")))
    }
    assert rows["good0"] == ("{}", "a", None) and rows["good1"] == ("[1]", None, 7)
    for key, (js, txt, cls, reason) in PLANTED.items():
        want_json = None if reason in (INVALID_JSON, UNREADABLE) or key == "utf8" else js.decode()
        want_txt = None if key == "utf8" else txt.decode()
        want_label = None if reason == BAD_LABEL else int(cls)
        assert rows[key] == (want_json, want_txt, want_label), key
    notes = sorted((n["key"], n["reason"]) for n in record["notes"])
    want = [(k, r) for k, (*_, r) in PLANTED.items()] + [("utf8", INVALID_UTF8)]  # its .txt too
    assert notes == sorted(want)
    details = {n["key"]: n["detail"] for n in record["notes"]}
    assert details["deep"].startswith(".json: RecursionError") and "MemoryError" in details["memory"]
    assert all(len(d) < 250 for d in details.values())


def test_a_member_name_that_is_not_utf8_becomes_an_escaped_key_and_the_shard_is_committed(
    tmp_path, small_checkpoint
):
    """A tar member named with non-UTF-8 bytes (a Latin-1 file name): its key was a string with lone
    surrogates, which Parquet cannot write, so the whole shard failed on every retry."""
    import tarfile

    path = tmp_path / "names-000000.tar"
    members = [
        (b"good.jpg", jpeg_bytes(photo_like(0, 80, 96))),
        (b"caf\xe9.jpg", jpeg_bytes(photo_like(1, 80, 96))),
        (b"caf\xe9.txt", "crème".encode()),
    ]
    with tarfile.open(
        path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    worker = ShardTokenizer(small_checkpoint, TokenizeOptions(image_size=SIZE, keep=("txt",)))
    record = worker.process(str(path), str(tmp_path / "out"))
    assert record["rows"] == 2 and not record["skipped"]
    table = pq.read_table(tmp_path / "out" / "names-000000.parquet")
    assert table.select(["key", "txt"]).to_pylist() == [
        {"key": "good", "txt": None},
        {"key": "caf\\xe9", "txt": "crème"},  # the byte 0xE9 written out, the file traceable
    ]


def test_run_record_pins_keep_and_views_and_old_records_imply_none():
    def run(**pre):
        return {"model_sha256": "m", "preprocessing": {"image_size": 64, **pre}}

    new = run(keep=["txt"], views="flip", view_names=["center", "center mirrored"], source_size=True)
    check_run(new, new)
    for other in (dict(new["preprocessing"], keep=[]), dict(new["preprocessing"], views="center")):
        with pytest.raises(ValueError, match="different run"):
            check_run(new, run(**other))
    old = run()  # a record from before these keys: no kept members, center only, no width/height
    check_run(old, run(keep=[], views="center", view_names=["center"], source_size=False))
    with pytest.raises(ValueError, match="keep"):
        check_run(old, run(keep=["txt"], views="center", view_names=["center"], source_size=False))


def resized(image: np.ndarray, short: int) -> np.ndarray:
    """Shorter side to `short` (longer side rounded), PIL bicubic without reducing_gap: written out here."""
    h, w = image.shape[:2]
    if h <= w:
        nh, nw = short, max(short, round(w * (short / h)))
    else:
        nh, nw = max(short, round(h * (short / w))), short
    if (nh, nw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None))


def center(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    return image[(h - size) // 2 : (h - size) // 2 + size, (w - size) // 2 : (w - size) // 2 + size]


def ten_crop(square: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision.transforms.functional.ten_crop (vertical_flip=False), its geometry written out."""

    def five(img):
        h, w = img.shape[:2]
        ct, cl = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        corners = [
            img[:size, :size],
            img[:size, w - size :],
            img[h - size :, :size],
            img[h - size :, w - size :],
        ]
        return [*corners, img[ct : ct + size, cl : cl + size]]

    return five(square) + five(np.ascontiguousarray(square[:, ::-1]))


@pytest.fixture(scope="module")
def view_shard(tmp_path_factory):
    """Real photos (one cut to a non-square, one rotated to portrait) and photo-like JPEGs of odd sizes."""
    photos = real_jpegs()[:4]
    wide = np.asarray(Image.open(io.BytesIO(photos[0])).convert("RGB"))[:200]
    tall = np.asarray(Image.open(io.BytesIO(photos[1])).convert("RGB"))[:, :171]
    images = [photos[2], photos[3], jpeg_bytes(wide), jpeg_bytes(tall), jpeg_bytes(photo_like(7, 97, 151))]
    path = tmp_path_factory.mktemp("views") / "views-000000.tar"
    write_shard(str(path), [{"__key__": f"v{i}", "jpg": d, "cls": i} for i, d in enumerate(images)])
    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in images]
    return path, decoded


@pytest.mark.parametrize("views", ["flip", "tencrop"])
def test_view_tokens_equal_the_model_on_crops_computed_here(tmp_path, view_shard, views):
    path, decoded = view_shard
    size = 72  # int(1.1 * 72) - 72 = 7: odd, so the center crops' rounding matters
    worker = ShardTokenizer(
        gq_demo(), TokenizeOptions(image_size=size, batch_size=7, views=views, encoder_precision="float32")
    )
    worker.process(str(path), str(tmp_path))
    table = pq.read_table(tmp_path / "views-000000.parquet")
    n = 2 if views == "flip" else 10
    assert table["key"].to_pylist() == [f"v{i}" for i in range(len(decoded)) for _ in range(n)]  # adjacent
    assert table["view"].to_pylist() == list(range(n)) * len(decoded)
    assert table.schema.field("view").type == "int8"
    assert table["width"].to_pylist() == [d.shape[1] for d in decoded for _ in range(n)]
    meta = json.loads(table.schema.metadata[b"gq"])
    assert meta["preprocessing"]["views"] == views and len(meta["preprocessing"]["view_names"]) == n

    crops = []
    for image in decoded:
        if views == "flip":
            c = center(resized(image, size), size)
            crops += [c, c[:, ::-1]]
        else:
            crops += ten_crop(center(resized(image, int(size * 1.1)), int(size * 1.1)), size)
    model = gq.load(gq_demo())
    with torch.inference_mode():
        want = model.tokenize(torch.from_numpy(np.ascontiguousarray(np.stack(crops)))).reshape(len(crops), -1)
    got = np.stack(table["tokens"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(got, want.numpy())
    # the views differ from each other (a mirrored crop is not the crop)
    assert len({got[i].tobytes() for i in range(n)}) == n


def gq_demo() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors")
