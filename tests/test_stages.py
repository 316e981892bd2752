"""The generator stages on plain lists: order kept, skips flow through as values, the error policy."""

import contextlib
import io

import pytest

from pipeline.data.decode import Decoded
from pipeline.data.reasons import SHARD_UNREADABLE
from pipeline.data.samples import Sample, Skip
from pipeline.data.stages import batched, decoded, first_rows, shard_samples
from pipeline.pack.shard_writer import write_shard


def fake_decode(sample: Sample) -> Decoded | Skip:
    if sample.key.startswith("bad"):
        return Skip(sample.key, sample.index, "corrupt image")
    return Decoded(sample.key, sample.index, None, image=None)


ITEMS = [
    Sample("a", 0, {"jpg": b""}),
    Skip("dup", 1, "duplicate key"),
    Sample("bad1", 2, {"jpg": b""}),
    Sample("b", 3, {"jpg": b""}),
    Sample("c", 4, {"jpg": b""}),
    Skip("", -1, "tar truncated"),
]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_decoded_keeps_order_and_passes_skips(threads):
    out = list(decoded(iter(ITEMS), fake_decode, threads=threads, window=2))
    assert [(type(o).__name__, o.key, o.index) for o in out] == [
        ("Decoded", "a", 0), ("Skip", "dup", 1), ("Skip", "bad1", 2), ("Decoded", "b", 3),
        ("Decoded", "c", 4), ("Skip", "", -1),
    ]  # fmt: skip
    assert out[1] is ITEMS[1] and out[5] is ITEMS[5]  # skips are the same values, untouched


def test_batched_groups_rows_and_lets_skips_through_as_they_come():
    out = list(batched(decoded(ITEMS, fake_decode, threads=0), 2))
    shape = [o.key if isinstance(o, Skip) else [d.key for d in o] for o in out]
    assert shape == ["dup", "bad1", ["a", "b"], "", ["c"]]  # the last, short batch when the input ends
    with pytest.raises(ValueError, match="batch size"):
        list(batched([], 0))


def _opener(data: bytes | None):
    def opener(url):
        if data is None:
            raise FileNotFoundError(url)
        return contextlib.nullcontext(io.BytesIO(data))

    return opener


def test_first_rows_stops_at_the_nth_row_and_reads_nothing_after_it():
    out = list(decoded(iter(ITEMS), fake_decode, threads=0))
    read = []

    def source():
        for item in out:
            read.append(item)
            yield item

    assert [o.key for o in first_rows(source(), 2)] == ["a", "dup", "bad1", "b"]  # the skip after b: not read
    assert read == out[:4]
    assert list(first_rows(iter(out), None)) == out
    assert list(first_rows(iter(out), 0)) == []
    assert [o.key for o in first_rows(iter(out), 9)] == [o.key for o in out]


def test_shard_samples_error_policy_is_an_argument(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(str(path), [{"__key__": "k0", "jpg": b"x", "cls": b"1"}, {"__key__": "k1", "jpg": b"y"}])
    tar = path.read_bytes()
    got = list(shard_samples("s.tar", opener=_opener(tar)))
    assert [(s.key, s.members) for s in got] == [("k0", {"jpg": b"x", "cls": b"1"}), ("k1", {"jpg": b"y"})]
    for bad in (None, b"<html>not a tar</html>" * 40):
        with pytest.raises(OSError):
            list(shard_samples("s.tar", opener=_opener(bad)))
        (skip,) = shard_samples("s.tar", opener=_opener(bad), on_error="skip")
        assert (skip.key, skip.index, skip.reason) == ("", -1, SHARD_UNREADABLE)
        assert skip.detail.startswith("s.tar: ")
    with pytest.raises(ValueError, match="on_error"):
        list(shard_samples("s.tar", opener=_opener(tar), on_error="ignore"))
