"""Brace patterns as lazy sequences: the same URLs, in the same order, as bash's expansion (a reference
written here: expand one brace at a time, left to right), duplicates dropped; a range of a million shards
is planned without ever holding a million URLs."""

import itertools
import re
import tracemalloc

import fsspec
import pytest

import gq
from pipeline.data.braces import BraceShards, expand_braces
from pipeline.tokenize.driver import ShardQueue
from pipeline.tokenize.plan import plan, uncommitted
from pipeline.tokenize.processor import TokenizeOptions
from pipeline.tokenize.settings import JobSettings


def bash(pattern: str) -> list[str]:
    """Reference: the leftmost innermost brace expanded first, recursively; ranges as bash pads them."""
    braces = re.finditer(r"\{([^{}]*)\}", pattern)
    m = next((m for m in braces if "," in m[1] or re.fullmatch(r"-?\d+\.\.-?\d+", m[1])), None)
    if not m:
        return [pattern]
    if "," in m[1]:
        items = m[1].split(",")
    else:
        a, b = m[1].split("..")
        width = max(len(a), len(b)) if any(len(x) > 1 and x.lstrip("-")[0] == "0" for x in (a, b)) else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    return list(
        itertools.chain.from_iterable(bash(pattern[: m.start()] + x + pattern[m.end() :]) for x in items)
    )


@pytest.mark.parametrize(
    "pattern",
    [
        "s3://b/train-{000000..000099}.tar",
        "/d/{train,val}-{0..12}.tar",
        "/d/{8..10}/{b,a}.tar",
        "/d/{3..-2}.tar",
        "/d/{b,a,b}.tar",  # a duplicate: first kept
        "/d/{1,11}{1,11}.tar",  # 1+11 and 11+1 are one URL
        "/d/{a,{b,c}}-{0..1}.tar",  # nested
        "/d/{x}-{0..2}.tar",  # {x} is no brace expression
    ],
)
def test_lazy_expansion_is_bashs(pattern):
    want = list(dict.fromkeys(bash(pattern)))
    got = expand_braces(pattern)
    assert list(got) == want and len(got) == len(want)
    assert [got[i] for i in range(len(got))] == want and got[-1] == want[-1]


def test_a_large_range_is_lazy_and_indexable():
    tracemalloc.start()
    try:
        urls = expand_braces("s3://b/x-{0000000..0199999}.tar")
        assert isinstance(urls, BraceShards) and len(urls) == 200_000
        assert urls[123456] == "s3://b/x-0123456.tar" and urls[-1] == "s3://b/x-0199999.tar"
        assert tracemalloc.get_traced_memory()[1] < 2**20  # the URLs as a list: ~18 MiB
    finally:
        tracemalloc.stop()


def test_planning_a_large_pattern_holds_no_list(tmp_path, small_checkpoint):
    """plan() over a 200,000-shard pattern (one shard exists: an object store's plan checks the first only)
    and the queue of what is left: both walk the pattern, neither copies it."""
    fs = fsspec.filesystem("memory")
    fs.pipe("/million/x-0000000.tar", b"not read while planning")
    model = gq.describe(small_checkpoint)
    settings = JobSettings(input="memory://million/x-{0000000..0199999}.tar", output=str(tmp_path / "out"),
                           checkpoint=small_checkpoint, progress=False,
                           options=TokenizeOptions(image_size=64, batch_size=1))  # fmt: skip
    tracemalloc.start()
    try:
        shards, run = plan(settings, model)
        queue = ShardQueue(uncommitted(shards, shards.commits))
        first = [queue.popleft() for _ in range(3)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        fs.rm("/million", recursive=True)
    assert len(shards) == run["shards"] == 200_000
    assert first == [f"memory://million/x-{i:07d}.tar" for i in range(3)]
    print("PEAK", peak / 2**20)
    assert peak < 32 * 2**20, peak / 2**20  # the checkpoint read and the run record, not 10^6 URLs
