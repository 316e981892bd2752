"""jobs/make_shards.py under hostile input (issue 26, items 1-9): every input file ends as a sample or a
recorded skip, labels never shift, I/O errors exit 1 and a rerun completes, nothing of the user's is
overwritten. Each test checks the shards' contents with tarfile, independently of our reader."""

import argparse
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from shardmaker import jpeg_bytes, photo_like
from test_make_shards import make, tar_samples

from gq.storage import is_temporary
from pipeline.cli import add_dataclass_arguments
from pipeline.data.reasons import (
    BAD_LIST_LINE,
    DUPLICATE_LINE,
    IN_SUBFOLDER,
    LINK_LOOP,
    MISSING,
    NOT_REGULAR,
    OUTSIDE_CLASSES,
    TOO_LARGE,
)
from pipeline.pack.folder_shards import ShardingSettings
from pipeline.pack.sample_keys import decode_key, key_part


def jpeg(seed: int) -> bytes:
    return jpeg_bytes(photo_like(seed, 24, 32))


def write(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def labels_by_bytes(out: Path) -> dict[bytes, int]:
    return {m["jpg"]: int(m["cls"]) for m in tar_samples(out).values()}


def run(*argv):
    return make([str(a) for a in argv])


def one_line_error(res) -> bool:
    return (
        res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("make_shards: error:")
    )


def test_unreadable_class_folder_is_an_io_error_and_a_linked_one_is_followed(tmp_path, monkeypatch):
    """Item 1. The tests run as root, for whom mode 000 blocks nothing: listing the folder is made to fail
    as it does for other users (and, where the tests do not run as root, mode 000 is set as well)."""
    src, out, elsewhere = tmp_path / "train", tmp_path / "shards", tmp_path / "elsewhere"
    files = write(src, {f"{c}/{i}.jpg": jpeg(10 * n + i) for n, c in enumerate("acd") for i in range(2)})
    write(elsewhere, {"0.jpg": jpeg(90), "1.jpg": jpeg(91)})
    os.symlink(elsewhere, src / "b")  # a class folder that is a link to a directory
    os.symlink("..", src / "a" / "loop")  # a link to its own ancestor: not followed, recorded
    blocked = str(src / "c")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    if os.geteuid() != 0:
        os.chmod(blocked, 0)
    res = run("--input", src, "--output", out)
    assert res.returncode == 1 and "PermissionError" in res.stderr and "run again" in res.stderr, res
    assert not out.exists()  # nothing planned from a partial listing
    monkeypatch.setattr(os, "scandir", real_scandir)
    os.chmod(blocked, 0o755)
    res = run("--input", src, "--output", out)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "classes.json").read_text())["classes"] == ["a", "b", "c", "d"]
    expected = {data: "abcd".index(rel[0]) for rel, data in files.items()}
    expected |= {jpeg(90): 1, jpeg(91): 1}
    assert labels_by_bytes(out) == expected
    assert f"{LINK_LOOP}: 1" in res.stdout and "skipped files: 1" in res.stdout


def test_labels_index_all_class_folders_and_classes_json_is_reused(tmp_path):
    """Item 2: an empty class folder is refused (it would shift the labels after it); val without one of
    train's classes takes train's labels from --classes; a folder not in classes.json is refused."""
    train = tmp_path / "train"
    write(train, {f"{c}/{c}{i}.jpg": jpeg(ord(c) + i) for c in "abc" for i in range(2)})
    (train / "b2").mkdir()
    (train / "b2" / "readme.txt").write_text("no images here")
    res = run("--input", train, "--output", tmp_path / "s0")
    assert one_line_error(res) and "without image files: b2" in res.stderr
    (train / "b2" / "readme.txt").unlink()
    (train / "b2").rmdir()
    assert run("--input", train, "--output", tmp_path / "st").returncode == 0
    val = tmp_path / "val"
    write(val, {"a/v.jpg": jpeg(1), "c/v.jpg": jpeg(3)})
    res = run("--input", val, "--output", tmp_path / "sv", "--classes", tmp_path / "st" / "classes.json")
    assert res.returncode == 0, res.stderr
    assert labels_by_bytes(tmp_path / "sv") == {jpeg(1): 0, jpeg(3): 2}  # c is 2, as in train
    assert json.loads((tmp_path / "sv" / "classes.json").read_text())["classes"] == ["a", "b", "c"]
    write(val, {"z/v.jpg": jpeg(4)})
    res = run("--input", val, "--output", tmp_path / "sz", "--classes", tmp_path / "st" / "classes.json")
    assert one_line_error(res) and "no class z" in res.stderr


def test_layout_is_explicit_and_auto_refuses_a_mixed_folder(tmp_path):
    """Item 3: top-level images and a subfolder (here a directory named like an image) never flip the
    layout silently."""
    src = tmp_path / "flat"
    write(src, {"0.jpg": jpeg(0), "1.jpg": jpeg(1), "2.jpg": jpeg(2), "x.jpg/inner.jpg": jpeg(3)})
    res = run("--input", src, "--output", tmp_path / "a")
    assert one_line_error(res) and "3 images at its top and 1 in subfolders" in res.stderr
    res = run("--input", src, "--output", tmp_path / "f", "--layout", "flat")
    assert res.returncode == 0 and f"{IN_SUBFOLDER}: 1" in res.stdout
    plan = json.loads((tmp_path / "f" / "_make_shards.json").read_text())  # listing skips are recorded
    assert [(Path(s["file"]).name, s["reason"]) for s in plan["skipped"]] == [("inner.jpg", IN_SUBFOLDER)]
    assert {m["jpg"] for m in tar_samples(tmp_path / "f").values()} == {jpeg(0), jpeg(1), jpeg(2)}
    res = run("--input", src, "--output", tmp_path / "c", "--layout", "classes")
    assert res.returncode == 0 and f"{OUTSIDE_CLASSES}: 3" in res.stdout
    assert labels_by_bytes(tmp_path / "c") == {jpeg(3): 0}
    res = run("--input", src, "--output", tmp_path / "x", "--layout", "sideways")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_list_lines_are_paths_a_user_can_open(tmp_path):
    """Item 4: what `find . -name '*.jpg'` writes, `../` paths and dot folders are taken; a refused line
    says why."""
    work, other = tmp_path / "work", tmp_path / "other"
    write(work, {"a/b.jpg": jpeg(0), ".cache/c.jpg": jpeg(1)})
    write(other, {"y.jpg": jpeg(2)})
    lst = work / "list.txt"
    lst.write_text("./a/b.jpg,1\n../other/y.jpg,2\n.cache/c.jpg,3\nnotes.txt,4\n")
    res = run("--input", lst, "--output", tmp_path / "s")
    assert res.returncode == 0, res.stderr
    got = tar_samples(tmp_path / "s")
    assert {k: (m["jpg"], int(m["cls"])) for k, m in got.items()} == {
        "a/b": (jpeg(0), 1), "%2E%2E/other/y": (jpeg(2), 2), "cache/c": (jpeg(1), 3)
    }  # fmt: skip
    assert (
        f"{BAD_LIST_LINE}: 1" in res.stdout and "line 4" in res.stdout and "extension must be" in res.stdout
    )


class Flaky:
    """An HTTP file server on 127.0.0.1 that answers 503 for a name until `fixed` is set."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.fixed = files, threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self, head: bool = False) -> None:
                data = outer.files.get(self.path.lstrip("/"))
                status = 503 if not outer.fixed.is_set() else 200 if data is not None else 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) if status == 200 else 0))
                self.end_headers()
                if status == 200 and not head:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:
                self.do_GET(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_io_errors_at_run_time_fail_the_shard_and_a_rerun_completes(tmp_path, monkeypatch):
    """Item 5: a permission error (as a mode-000 file gives a non-root user) and an object store's 503
    fail their shard (exit 1, no record); the other shards are written; once the cause is gone a rerun
    adds exactly the missing shards."""
    src, out = tmp_path / "img", tmp_path / "shards"
    files = write(src, {f"{i}.jpg": jpeg(i) for i in range(4)})
    server = Flaky({"far.jpg": jpeg(9)})
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"img/{i}.jpg,{i}\n" for i in range(4)) + f"{server.url}/far.jpg,9\n")
    real_open, denied = os.open, str(src / "1.jpg")

    def deny(path, *args, **kwargs):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    try:
        res = run("--input", lst, "--output", out, "--samples-per-shard", "2")
        assert res.returncode == 1 and "failed: 2 shard(s)" in res.stderr and "PermissionError" in res.stderr
        assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar"]
        assert not [p for p in out.rglob("*") if is_temporary(p.name)]
        assert "skipped files: 0" in res.stdout
        monkeypatch.setattr(os, "open", real_open)
        server.fixed.set()
        res = run("--input", lst, "--output", out, "--samples-per-shard", "2")
    finally:
        server.stop()
    assert res.returncode == 0 and "1 shards finished before" in res.stdout, res
    assert labels_by_bytes(out) == {data: i for i, data in enumerate(files.values())} | {jpeg(9): 9}


def test_output_with_files_we_did_not_write_is_refused(tmp_path):
    """Item 6."""
    src, out = tmp_path / "img", tmp_path / "shards"
    write(src, {"0.jpg": jpeg(0)})
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"a user's own tar")
    res = run("--input", src, "--output", out)
    assert one_line_error(res) and "holds no _make_shards.json" in res.stderr
    assert (out / "shard-000000.tar").read_bytes() == b"a user's own tar"
    res = run("--input", src, "--output", src / "shards")
    assert one_line_error(res) and "inside --input" in res.stderr


def test_only_regular_files_within_the_size_limit_are_read(tmp_path):
    """Item 7: a FIFO and a link to /dev/zero named .jpg, and a file over --max-file-bytes, are recorded
    skips (the FIFO never opened, /dev/zero never read); so is a broken link."""
    src, out = tmp_path / "img", tmp_path / "shards"
    write(src, {"ok.jpg": jpeg(0), "big.jpg": jpeg(1) + b"\0" * 5000})
    os.mkfifo(src / "fifo.jpg")
    os.symlink("/dev/zero", src / "zero.jpg")
    os.symlink(src / "nowhere.jpg", src / "broken.jpg")
    res = run("--input", src, "--output", out, "--max-file-bytes", len(jpeg(0)) + 100)
    assert res.returncode == 0, res.stderr
    assert [m["jpg"] for m in tar_samples(out).values()] == [jpeg(0)]
    record = json.loads((out / "_make_shards" / "shard-000000.tar.json").read_text())
    reasons = {Path(s["file"]).name: s["reason"] for s in record["skipped"]}
    assert reasons == {
        "big.jpg": TOO_LARGE,
        "broken.jpg": MISSING,
        "fifo.jpg": NOT_REGULAR,
        "zero.jpg": NOT_REGULAR,
    }


def test_keys_stay_readable_and_every_sample_maps_to_its_file(tmp_path):
    """Item 8: names in other scripts keep distinct readable keys (percent-encoded UTF-8, decoded back),
    and the shard records map each file to its key with its size, sha256 and label."""
    src, out = tmp_path / "train", tmp_path / "shards"
    names = ["犬/柴犬.jpg", "犬/秋田.jpg", "chat/café.jpg", "chat/cafe.jpg"]
    files = write(src, {n: jpeg(i) for i, n in enumerate(names)})
    res = run("--input", src, "--output", out, "--samples-per-shard", "3")
    assert res.returncode == 0, res.stderr
    got = tar_samples(out)
    assert {decode_key(k) for k in got} == {n[: -len(".jpg")] for n in names}
    assert all(k.isascii() and "." not in k for k in got)
    records = [json.loads(p.read_text()) for p in sorted((out / "_make_shards").glob("*.json"))]
    mapped = {Path(f["file"]).relative_to(src).as_posix(): f for r in records for f in r["files"]}
    assert set(mapped) == set(names)
    for name, f in mapped.items():
        data = files[name]
        assert (f["size"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert got[f["key"]]["jpg"] == data and int(got[f["key"]]["cls"]) == f["label"]
    assert key_part("..") == "%2E%2E" and decode_key(key_part("a\u0301b")) == "\u00e1b"  # NFC


def test_duplicate_lines_bom_spaces_and_conflicting_labels(tmp_path):
    """Item 9: each handled (a BOM, spaces in names, a repeated line packed once and recorded) or refused
    with one line (two labels for one file)."""
    val = tmp_path / "val"
    write(val, {"a b.jpg": jpeg(0), "c.jpg": jpeg(1)})
    labels = tmp_path / "labels.txt"
    labels.write_bytes("\ufeffa b.jpg 4\nc.jpg 5\n".encode())
    res = run("--input", val, "--labels", labels, "--output", tmp_path / "s1")
    assert res.returncode == 0 and "skipped files: 0" in res.stdout, res
    assert labels_by_bytes(tmp_path / "s1") == {jpeg(0): 4, jpeg(1): 5}
    labels.write_text("a b.jpg 4\nc.jpg 5\nc 6\n")
    res = run("--input", val, "--labels", labels, "--output", tmp_path / "s2")
    assert one_line_error(res) and "two labels [5, 6]" in res.stderr
    labels.write_text("c.jpg 5\nc.jpg 7\n")
    res = run("--input", val, "--labels", labels, "--output", tmp_path / "s3")
    assert one_line_error(res) and "line 2 gives c.jpg label 7, line 1 gave 5" in res.stderr
    lst = tmp_path / "list.txt"
    lst.write_bytes("\ufeffval/a b.jpg,1\nval/c.jpg,2\n./val/c.jpg,2\n".encode())
    res = run("--input", lst, "--output", tmp_path / "s4")
    assert res.returncode == 0 and f"{DUPLICATE_LINE}: 1" in res.stdout and "repeats line 2" in res.stdout
    assert labels_by_bytes(tmp_path / "s4") == {jpeg(0): 1, jpeg(1): 2}
    lst.write_text("val/c.jpg,2\nval/c.jpg,3\n")
    res = run("--input", lst, "--output", tmp_path / "s5")
    assert one_line_error(res) and "line 2 gives val/c.jpg label 3, line 1 gave 2" in res.stderr
    lst.write_bytes(b"val/\xff.jpg\n")
    res = run("--input", lst, "--output", tmp_path / "s6")
    assert one_line_error(res) and "not UTF-8" in res.stderr


@pytest.mark.parametrize("name", ["plain", "日本語", "naïve", "..", "a b.c"])
def test_key_part_decodes_to_its_readable_name(name):
    part = key_part(name)
    assert part.isascii() and "." not in part and " " not in part
    if name.isascii() and name != "..":
        assert decode_key(part) == name.replace(" ", "_").replace(".", "_")
    else:
        assert decode_key(part) == name


def test_every_option_has_its_help():
    """The options come from ShardingSettings' end-of-line comments: one wrapped by the formatter would
    lose its help."""
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, ShardingSettings)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert {"layout", "classes", "max_file_bytes"} <= set(helps) and all(helps.values()), helps
