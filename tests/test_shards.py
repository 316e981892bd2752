import io
import re
import tarfile
import uuid
from pathlib import Path

import fsspec
import pytest
import zstandard
from shardmaker import cut_tar, member_offsets, shard_samples

from pipeline.data.reasons import DUPLICATE, LINK_MEMBER, MEMBER_TOO_LARGE, TAR_TRUNCATED
from pipeline.data.samples import Note, Sample, ShardUnreadable, Skip, iter_samples
from pipeline.data.shards import expand_shards, open_shard, shard_stem
from pipeline.pack.shard_writer import write_shard


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def tar_bytes(members):
    """A plain tar made by Python's tarfile (independent of write_shard): [(name, bytes)] or TarInfo."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read(data, shard="t"):
    return list(iter_samples(io.BytesIO(data), shard=shard))


def expected_samples(samples):
    """What iter_samples must give for samples written by write_shard."""
    out = []
    for index, sample in enumerate(samples):
        members = {}
        for ext, value in sample.items():
            if ext != "__key__":
                members[ext] = str(value).encode() if isinstance(value, int) else value
        out.append(Sample(key=sample["__key__"], index=index, members=members))
    return out


def small_samples(n, start=0):
    return [
        {"__key__": f"k{i:04d}", "jpg": bytes([i % 251]) * (100 + 37 * i), "cls": i}
        for i in range(start, start + n)
    ]


# ---- expand_shards


def test_brace_range_keeps_zero_padding_and_never_touches_storage():
    urls = expand_shards("s3://no-such-bucket/train-{000000..000009}.tar")
    assert urls == [f"s3://no-such-bucket/train-{i:06d}.tar" for i in range(10)]
    many = expand_shards("s3://b/x-{000000..009999}.tar")  # no request per shard: instant
    assert len(many) == 10_000 and many[-1] == "s3://b/x-009999.tar"


def test_brace_lists_ranges_and_bash_padding_rules():
    assert expand_shards("/d/{train,val}-{0..1}.tar") == [
        "/d/train-0.tar",
        "/d/train-1.tar",
        "/d/val-0.tar",
        "/d/val-1.tar",
    ]
    assert expand_shards("/d/{8..10}.tar") == ["/d/8.tar", "/d/9.tar", "/d/10.tar"]
    assert expand_shards("/d/{08..10}.tar") == ["/d/08.tar", "/d/09.tar", "/d/10.tar"]
    assert expand_shards("/d/{3..1}.tar") == ["/d/3.tar", "/d/2.tar", "/d/1.tar"]
    assert expand_shards("/d/{b,a,b}.tar") == ["/d/b.tar", "/d/a.tar"]  # duplicates dropped, first kept


def test_brace_http_with_query_string_is_only_expanded():
    urls = expand_shards("https://example.invalid/s-{0..2}.tar?token=abc")
    assert urls == [f"https://example.invalid/s-{i}.tar?token=abc" for i in range(3)]
    assert shard_stem(urls[1]) == "s-1"


def test_brace_then_glob(tmp_path):
    for split in ("train", "val"):
        for i in (1, 0):
            touch(tmp_path / split / f"{split}-{i}.tar")
    urls = expand_shards(f"{tmp_path}/{{val,train}}/*.tar")
    assert urls == [f"{tmp_path}/{s}/{s}-{i}.tar" for s in ("val", "train") for i in (0, 1)]


def test_glob_and_directory_list_shard_files_sorted(tmp_path):
    names = [
        "b.tar",
        "a.tar.gz",
        "c.tar.zst",
        "d.tgz",
        "e.tar.zstd",
        "notes.txt",
        "x.parquet",
        "c.tar.tmp-1234",
    ]
    for name in names:
        touch(tmp_path / name)
    (tmp_path / "sub.tar").mkdir()  # a directory named like a shard is not a shard
    shard_files = sorted(["b.tar", "a.tar.gz", "c.tar.zst", "d.tgz", "e.tar.zstd"])
    assert expand_shards(str(tmp_path)) == [str(tmp_path / n) for n in shard_files]
    assert expand_shards(f"{tmp_path}/*") == [str(tmp_path / n) for n in shard_files]
    assert expand_shards(f"{tmp_path}/*.tar") == [str(tmp_path / "b.tar")]
    assert expand_shards(str(tmp_path / "b.tar")) == [str(tmp_path / "b.tar")]


def test_text_list_keeps_file_order_and_skips_comments(tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text(
        "# my shards\n\ns3://b/z.tar\n  /data/a.tar.gz  \n# s3://b/hidden.tar\ns3://b/z.tar\nmemory://m/q.tar\n"
    )
    assert expand_shards(str(listing)) == ["s3://b/z.tar", "/data/a.tar.gz", "memory://m/q.tar"]


def test_nothing_matches_raises_value_error(tmp_path):
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "only-comments.txt", b"# nothing\n\n")
    for spec in [
        str(tmp_path / "missing"),
        f"{tmp_path}/*.tar",
        str(tmp_path / "empty"),
        str(tmp_path / "only-comments.txt"),
        str(tmp_path / "missing.txt"),
        "   ",
    ]:
        with pytest.raises(ValueError, match="shard|SHARDS"):
            expand_shards(spec)


def test_memory_filesystem_glob_list_and_read_back():
    root = f"memory://shards-{uuid.uuid4().hex[:8]}"
    written = {}
    for i, ext in enumerate([".tar", ".tar.gz", ".tar.zst"]):
        samples = small_samples(3, start=3 * i)
        write_shard(f"{root}/part-{i:03d}{ext}", samples)
        written[f"part-{i:03d}"] = expected_samples(samples)
    with fsspec.open(f"{root}/list.txt", "w") as f:
        f.write(f"{root}/part-002.tar.zst\n{root}/part-000.tar\n")

    urls = expand_shards(f"{root}/*")
    assert [shard_stem(u) for u in urls] == ["part-000", "part-001", "part-002"]
    assert all(u.startswith("memory://") for u in urls)
    assert expand_shards(f"{root}/*.tar.zst") == [urls[2]]
    assert expand_shards(root) == urls
    assert expand_shards(f"{root}/list.txt") == [f"{root}/part-002.tar.zst", f"{root}/part-000.tar"]
    for url in urls + expand_shards(f"{root}/list.txt"):
        with open_shard(url) as stream:
            assert list(iter_samples(stream)) == written[shard_stem(url)]


def test_shard_stem():
    assert shard_stem("s3://b/p/train-000001.tar.zst") == "train-000001"
    assert shard_stem("/data/x.tar") == "x"
    assert shard_stem("/data/x.tar.gz") == "x"
    assert shard_stem("/data/x.tgz") == "x"
    assert shard_stem("gs://b/x.y.TAR.ZSTD") == "x.y"
    assert shard_stem("https://h/a/b-7.tar?sig=1") == "b-7"
    assert shard_stem("memory:///x/part-000.tar") == "part-000"


# ---- write_shard -> open_shard -> iter_samples


@pytest.mark.parametrize("ext", [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd"])
def test_round_trip_is_exact(tmp_path, ext):
    samples = shard_samples(4, seed=3, size=(32, 40))
    samples += [
        {"__key__": "sub/dir/n0", "jpg": b"\xff\xd8\xffpartial", "json": {"caption": "été"}, "txt": "héllo"},
        {"__key__": "long_" + "é" * 80 + "_key", "png": b"\x89PNG...", "cls": 5},  # > 100 bytes: pax path
        {"__key__": "empty", "jpg": b"", "seg.png": b"mask"},
    ]
    url = str(tmp_path / f"shard{ext}")
    assert write_shard(url, samples) == len(samples)
    with open_shard(url) as stream:
        got = list(iter_samples(stream))
    want = expected_samples(samples)
    want[4].members["json"] = '{"caption": "été"}'.encode()
    want[4].members["txt"] = "héllo".encode()
    assert got == want
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary name was renamed away


@pytest.mark.parametrize("ext", [".tar", ".tar.gz", ".tar.zst"])
def test_write_shard_is_deterministic(tmp_path, ext):
    samples = small_samples(5)
    write_shard(str(tmp_path / f"a{ext}"), samples)
    write_shard(str(tmp_path / f"b{ext}"), samples)
    assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
    with open_shard(str(tmp_path / f"a{ext}")) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            assert (member.mtime, member.mode, member.uname, member.gname) == (0, 0o444, "", "")


def test_explicit_compression_and_bad_values(tmp_path):
    write_shard(str(tmp_path / "x.bin"), small_samples(2), compression="zst")
    assert (tmp_path / "x.bin").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd magic
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "y.tar"), small_samples(2), compression="lz4")
    with pytest.raises(TypeError):
        write_shard(str(tmp_path / "z.tar"), [{"__key__": "a", "jpg": 1.5}])
    assert not (tmp_path / "z.tar").exists() and not list(tmp_path.glob("z.tar.tmp-*"))


def test_zstd_with_several_frames_is_read_whole(tmp_path):
    plain = tar_bytes([(f"k{i}.jpg", bytes([i]) * 3000) for i in range(6)])
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "frames.tar.zst"
    path.write_bytes(compressor.compress(plain[:5000]) + compressor.compress(plain[5000:]))
    with open_shard(str(path)) as stream:
        got = list(iter_samples(stream))
    assert [s.key for s in got] == [f"k{i}" for i in range(6)]
    assert all(isinstance(s, Sample) for s in got)


def test_open_shard_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError), open_shard(str(tmp_path / "missing.tar")):
        pass


# ---- iter_samples on tars made by Python's tarfile


def test_grouping_by_key_and_extension():
    data = tar_bytes(
        [
            ("a.jpg", b"A"),
            ("a.cls", b"1"),
            ("a.seg.png", b"S"),
            ("dir/b.JPEG", b"B"),
            ("dir/b.json", b"{}"),
            ("c.jpg", b""),  # zero-length members are kept: the decoder reports them
        ]
    )
    assert read(data) == [
        Sample("a", 0, {"jpg": b"A", "cls": b"1", "seg.png": b"S"}),
        Sample("dir/b", 1, {"JPEG": b"B", "json": b"{}"}),
        Sample("c", 2, {"jpg": b""}),
    ]


def test_duplicate_keys_are_skipped_with_their_own_index():
    data = tar_bytes(
        [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.jpg", b"3"), ("a.cls", b"4"), ("c.jpg", b"5"), ("c.jpg", b"6")]
    )
    got = read(data)
    assert got[0] == Sample("a", 0, {"jpg": b"1"})
    assert got[1] == Sample("b", 1, {"jpg": b"2"})
    assert (got[2].key, got[2].index, got[2].reason) == ("a", 2, DUPLICATE)
    assert got[3] == Sample("c", 3, {"jpg": b"5"})
    assert (got[4].key, got[4].index, got[4].reason) == (
        "c",
        4,
        DUPLICATE,
    )  # an extension repeated in a group
    assert len(got) == 5


def test_hidden_resource_fork_and_directories_are_ignored_links_noted():
    directory = tarfile.TarInfo("dir")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("dir/a.png")
    link.type = tarfile.SYMTYPE
    link.linkname = "a.jpg"
    data = tar_bytes(
        [
            directory,
            ("__MACOSX/dir/._a.jpg", b"fork"),
            ("__MACOSX/dir/b.jpg", b"fork"),
            ("dir/a.jpg", b"A"),
            ("dir/._a.jpg", b"fork"),
            ("dir/.DS_Store", b"junk"),
            ("dir/__init__.py", b""),
            link,
            ("dir/a.cls", b"3"),
            ("README", b"no extension"),
            ("dir/z.jpg", b"Z"),
        ]
    )
    note = Note(LINK_MEMBER, "dir/a.png: symlink to 'a.jpg', not followed")
    assert read(data) == [
        Sample("dir/a", 0, {"jpg": b"A", "cls": b"3"}, [note]),
        Sample("dir/z", 1, {"jpg": b"Z"}),
    ]


def write_small_tar(tmp_path, n=4):
    samples = small_samples(n)
    path = str(tmp_path / "s.tar")
    write_shard(path, samples)
    return path, expected_samples(samples), member_offsets(path)


def test_cut_inside_a_member_keeps_earlier_samples(tmp_path):
    path, want, offsets = write_small_tar(tmp_path)
    name, _, data_offset = offsets[4]  # k0002.jpg, the first member of the third sample
    assert name == "k0002.jpg"
    got = read(Path(cut_tar(path, data_offset + 50, str(tmp_path / "cut.tar"))).read_bytes())
    assert got[:2] == want[:2]
    assert len(got) == 3
    assert (got[2].key, got[2].index, got[2].reason) == ("k0002", 2, TAR_TRUNCATED)
    assert "k0002.jpg" in got[2].detail and got[2].detail.startswith("t: ")

    name, _, data_offset = offsets[5]  # k0002.cls: the sample in progress is incomplete
    got = read(Path(cut_tar(path, data_offset + 1, str(tmp_path / "cut2.tar"))).read_bytes())
    assert got[:2] == want[:2] and len(got) == 3
    assert (got[2].key, got[2].index, got[2].reason) == ("k0002", 2, TAR_TRUNCATED)


def test_cut_at_a_header_boundary_records_the_truncation(tmp_path):
    path, want, offsets = write_small_tar(tmp_path)
    _, header_offset, _ = offsets[4]  # just before k0002.jpg: k0001 may have had more members
    got = read(Path(cut_tar(path, header_offset, str(tmp_path / "cut.tar"))).read_bytes())
    assert got[:1] == want[:1] and len(got) == 2
    assert (got[1].key, got[1].index, got[1].reason) == ("k0001", 1, TAR_TRUNCATED)
    assert "end-of-archive" in got[1].detail

    got = read(Path(cut_tar(path, header_offset + 100, str(tmp_path / "cut2.tar"))).read_bytes())
    assert got[:1] == want[:1] and (got[1].key, got[1].reason) == ("k0001", TAR_TRUNCATED)


def test_missing_end_of_archive_marks_the_last_sample(tmp_path):
    path, want, offsets = write_small_tar(tmp_path)
    _, _, last_data = offsets[-1]
    end = last_data + 512  # the last member's data fits in one block
    got = read(Path(cut_tar(path, end, str(tmp_path / "cut.tar"))).read_bytes())
    assert got[:3] == want[:3]
    assert (got[3].key, got[3].index, got[3].reason) == ("k0003", 3, TAR_TRUNCATED)
    # a complete archive gives no record at all
    assert read(Path(path).read_bytes()) == want


def test_corrupt_header_stops_with_a_record(tmp_path):
    path, want, offsets = write_small_tar(tmp_path)
    data = bytearray(Path(path).read_bytes())
    _, header_offset, _ = offsets[4]
    data[header_offset + 10 : header_offset + 20] = b"corrupted!"
    got = read(bytes(data))
    assert got[:1] == want[:1]
    assert (got[1].key, got[1].reason) == ("k0001", TAR_TRUNCATED)
    assert "corrupt tar header" in got[1].detail


def test_empty_garbage_and_headless_files_are_unreadable_shards():
    for data, message in [
        (b"", "empty file"),
        (b"<html><body>503 Service Unavailable</body></html>\n" * 40, "not a tar archive"),
        (tar_bytes([("a.jpg", b"A")])[:300], "not a tar archive (cut inside a header at byte 0)"),
    ]:
        with pytest.raises(ShardUnreadable, match=re.escape(message)):
            read(data)


def test_duplicate_in_progress_at_cut_still_records_the_truncation(tmp_path):
    data = tar_bytes([("a.jpg", b"1" * 600), ("b.jpg", b"2"), ("a.jpg", b"3" * 2000)])
    cut = data[: 512 * 6 + 100]  # inside the data of the second a.jpg
    got = read(cut)
    assert [type(s) for s in got] == [Sample, Sample, Skip, Skip]
    assert (got[2].key, got[2].index, got[2].reason) == ("a", 2, DUPLICATE)
    assert (got[3].key, got[3].index, got[3].reason) == ("", -1, TAR_TRUNCATED)


@pytest.mark.parametrize("ext", [".tar", ".tar.gz", ".tar.zst"])
def test_every_cut_point_gives_a_prefix_and_one_record(tmp_path, ext):
    samples = small_samples(6)
    path = str(tmp_path / f"s{ext}")
    write_shard(path, samples)
    want = expected_samples(samples)
    data = Path(path).read_bytes()
    end = len(data) if ext != ".tar" else member_offsets(path)[-1][2] + 512  # past it: only zero padding
    if ext == ".tar.zst":
        end -= 4  # the frame's content checksum: zstandard accepts a frame cut inside it, data all there
    for at in range(0, end, max(1, end // 120)):
        cut = tmp_path / f"cut{ext}"
        cut.write_bytes(data[:at])
        try:
            with open_shard(str(cut)) as stream:
                got = list(iter_samples(stream))
        except ShardUnreadable:  # no whole tar header before the cut
            assert ext != ".tar" or at < 512, at
            continue
        rows = [s for s in got if isinstance(s, Sample)]
        assert rows == want[: len(rows)], at
        records = [s for s in got if isinstance(s, Skip)]
        assert len(records) == 1 and records[0].reason == TAR_TRUNCATED, (at, records)
        assert records[0].index in (len(rows), -1)


def test_gzip_cut_after_the_archive_end_keeps_every_sample_and_records_it(tmp_path):
    samples = small_samples(3)
    path = tmp_path / "s.tar.gz"
    write_shard(str(path), samples)
    path.write_bytes(path.read_bytes()[:-4])  # the gzip trailer (CRC, size) is gone
    with open_shard(str(path)) as stream:
        got = list(iter_samples(stream, shard="s"))
    assert got[:3] == expected_samples(samples)
    assert len(got) == 4 and (got[3].key, got[3].index, got[3].reason) == ("", -1, TAR_TRUNCATED)
    assert "after the end of the archive" in got[3].detail


# ---- what used to be lost or kept silently (issue 12)


def test_pax_header_of_several_megabytes_is_read_in_bounded_pieces():
    big = tarfile.TarInfo("a.jpg")
    big.size = 1
    big.pax_headers = {"SCHILY.xattr.user.blob": "x" * 3_000_000, "comment": "y" * 1_500_000}
    long_name = tarfile.TarInfo("d/" + "n" * 300 + ".jpg")  # needs a pax path record
    long_name.size = 1
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(big, io.BytesIO(b"A"))
        tar.addfile(long_name, io.BytesIO(b"L"))
        tar.addfile(tarfile.TarInfo("b.cls"), io.BytesIO(b""))
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the independent reader agrees
        names = tar.getnames()
    assert names == ["a.jpg", "d/" + "n" * 300 + ".jpg", "b.cls"]
    assert read(data) == [
        Sample("a", 0, {"jpg": b"A"}),
        Sample("d/" + "n" * 300, 1, {"jpg": b"L"}),
        Sample("b", 2, {"cls": b""}),
    ]


def test_symlink_and_hardlink_members_are_notes_on_their_sample():
    symlink = tarfile.TarInfo("a.png")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hardlink = tarfile.TarInfo("b.jpg")
    hardlink.type, hardlink.linkname = tarfile.LNKTYPE, "a.jpg"
    got = read(tar_bytes([("a.jpg", b"A"), symlink, ("a.cls", b"1"), hardlink, ("b.cls", b"2")]))
    assert got == [
        Sample(
            "a",
            0,
            {"jpg": b"A", "cls": b"1"},
            [Note(LINK_MEMBER, "a.png: symlink to '/etc/passwd', not followed")],
        ),
        Sample("b", 1, {"cls": b"2"}, [Note(LINK_MEMBER, "b.jpg: hardlink to 'a.jpg', not followed")]),
    ]


def test_member_over_the_size_limit_skips_its_sample_and_the_shard_goes_on():
    members = [("a.jpg", b"A" * 100), ("b.jpg", b"B" * 5000), ("b.cls", b"1"), ("c.jpg", b"C" * 100)]
    data = tar_bytes(members)
    assert len(read(data)) == 3  # the default limit is 64 MiB
    got = list(iter_samples(io.BytesIO(data), max_member_bytes=4096))
    assert got[0] == Sample("a", 0, {"jpg": b"A" * 100})
    assert (got[1].key, got[1].index, got[1].reason) == ("b", 1, MEMBER_TOO_LARGE)
    assert got[1].detail == "b.jpg: 5000 bytes > 4096 (--max-member-bytes)"
    assert got[2] == Sample("c", 2, {"jpg": b"C" * 100})
    assert len(got) == 3


@pytest.mark.parametrize("ext", [".tar.gz", ".tar.zst"])
def test_unreadable_compression_is_an_unreadable_shard(tmp_path, ext):
    path = tmp_path / f"s{ext}"
    path.write_bytes(b"<html>not found</html>" * 50)
    with (
        pytest.raises(ShardUnreadable, match="compressed stream corrupt at its start"),
        open_shard(str(path)) as s,
    ):
        list(iter_samples(s))
    path.write_bytes(b"")
    with pytest.raises(ShardUnreadable, match="empty file"), open_shard(str(path)) as s:
        list(iter_samples(s))


def test_gzip_crc_failure_fails_the_shard_not_a_row(tmp_path):
    samples = small_samples(3)
    path = tmp_path / "s.tar.gz"
    write_shard(str(path), samples)
    good = path.read_bytes()
    # flip one byte of the gzip CRC: every member decompresses, only the integrity check fails
    path.write_bytes(good[:-8] + bytes([good[-8] ^ 1]) + good[-7:])
    with pytest.raises(ShardUnreadable, match="CRC check failed"), open_shard(str(path)) as stream:
        list(iter_samples(stream))
    # a flipped byte inside the deflate data: the damaged member must not come out as a sample
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x10
    path.write_bytes(bytes(damaged))
    with pytest.raises(ShardUnreadable), open_shard(str(path)) as stream:
        list(iter_samples(stream))


def test_zstd_checksum_failure_fails_the_shard(tmp_path):
    path = tmp_path / "s.tar.zst"
    write_shard(str(path), small_samples(3))
    good = path.read_bytes()
    assert zstandard.get_frame_parameters(good).has_checksum  # write_shard writes a content checksum
    path.write_bytes(good[:-2] + bytes([good[-2] ^ 1]) + good[-1:])
    with pytest.raises(ShardUnreadable, match="checksum"), open_shard(str(path)) as stream:
        list(iter_samples(stream))
