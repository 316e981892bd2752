"""jobs/make_shards.py on real JPEG folders made here: class folders, a flat folder with a labels file, a
list file; every image exactly one sample with its label and its bytes unchanged; a kill and a rerun."""

import contextlib
import hashlib
import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from shardmaker import jpeg_bytes, photo_like, real_jpegs

from gq.storage import is_temporary
from jobs import make_shards
from pipeline.data.reasons import EMPTY, MISSING, NOT_IMAGE
from pipeline.data.samples import iter_samples
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions

REPO = Path(__file__).resolve().parents[1]


def make(argv: list[str]) -> subprocess.CompletedProcess:
    """The job's main() in this process (a subprocess costs seconds of imports), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = make_shards.main(["--no-progress", *argv])
        except SystemExit as e:  # argparse errors
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def tar_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    """key -> members of every shard in DIR, read with tarfile (independent of our reader); keys must not
    repeat across shards."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})
                assert ext not in out[key], f"{m.name} twice"
                out[key][ext] = tar.extractfile(m).read()
    return out


def image_folder(root: Path) -> dict[str, tuple[bytes, str]]:
    """ImageNet-style class folders of the 8 real photos and a few photo-like JPEGs; rel path -> (bytes,
    class). Names with dots and spaces, an upper-case extension, a nested folder, and junk to skip."""
    photos = real_jpegs()
    files = {}
    for i, data in enumerate(photos):
        cls = ("n01440764", "n01443537", "n01484850")[i % 3]
        files[f"{cls}/{cls}_{i:05d}.JPEG"] = (data, cls)
    files["n01443537/sub dir/a.b c.jpg"] = (jpeg_bytes(photo_like(1, 80, 120)), "n01443537")
    files["n01484850/x.png"] = (jpeg_bytes(photo_like(2, 90, 90)), "n01484850")  # named wrongly: kept
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "n01440764" / "notes.txt").write_text("not an image file: ignored")
    (root / "n01440764" / ".hidden.jpg").write_bytes(photos[0])  # hidden: ignored
    (root / "n01443537" / "broken.jpg").write_text("<html>not found</html>")  # not an image: skipped
    (root / "n01443537" / "empty.jpg").write_bytes(b"")  # empty: skipped
    return files


def test_class_folders_every_image_one_sample_with_its_label_and_tokenize_reads_them(tmp_path):
    src, out = tmp_path / "train", tmp_path / "shards"
    files = image_folder(src)
    res = make(["--input", str(src), "--output", str(out), "--samples-per-shard", "3"])
    assert res.returncode == 0, res.stderr
    classes = sorted({c for _, c in files.values()})
    assert json.loads((out / "classes.json").read_text())["classes"] == classes
    got = tar_samples(out)
    assert len(got) == len(files)  # every image exactly once, the junk not at all
    by_bytes = {}
    for key, members in got.items():
        image_ext = next(e for e in members if e != "cls")
        by_bytes[members[image_ext]] = (key, int(members["cls"]))
        assert "." not in key.rsplit("/", 1)[-1] and " " not in key  # tar-safe keys
    for rel, (data, cls) in files.items():
        key, label = by_bytes[data]  # bytes as they were, never re-encoded
        assert label == classes.index(cls), rel
        assert key.startswith(cls + "/")
    assert len(list(out.glob("shard-*.tar"))) == -(-(len(files) + 2) // 3)  # 2 junk files were listed too
    assert "skipped files: 2" in res.stdout and NOT_IMAGE in res.stdout and EMPTY in res.stdout

    # the tokenize job's reader takes them with their labels (in-process: the same processor as the job)
    worker = ShardTokenizer(str(REPO / "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors"),
                            TokenizeOptions(image_size=64, batch_size=8))  # fmt: skip
    labels = {}
    for shard in sorted(out.glob("*.tar")):
        r = worker.tokenize_shard(str(shard))
        labels |= dict(zip(r.keys, r.labels, strict=True))
    assert labels == {k: int(m["cls"]) for k, m in got.items()}

    # a rerun leaves every shard alone; another plan into the same DIR is refused
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = make(["--input", str(src), "--output", str(out), "--samples-per-shard", "3"])
    assert again.returncode == 0 and f"{len(before)} shards finished before this run" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    plan = json.loads((out / "_make_shards.json").read_text())  # as an older version wrote it
    older = {k: v for k, v in plan.items() if k not in ("classes", "max_file_bytes")}
    (out / "_make_shards.json").write_text(json.dumps(older))
    again = make(["--input", str(src), "--output", str(out), "--samples-per-shard", "3"])
    assert again.returncode == 0 and f"{len(before)} shards finished before this run" in again.stdout, again
    other = make(["--input", str(src), "--output", str(out), "--samples-per-shard", "4"])
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "another plan" in other.stderr


def test_flat_folder_with_labels_file_and_a_list_file(tmp_path):
    photos = real_jpegs()
    val = tmp_path / "val"
    val.mkdir()
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(photos) + 1)]
    for name, data in zip(names, photos, strict=True):
        (val / name).write_bytes(data)
    (val / "unlisted.jpg").write_bytes(photos[0])
    labels = tmp_path / "val_labels.txt"
    labels.write_text("".join(f"{n} {(7 * i) % 1000}\n" for i, n in enumerate(names)))
    res = make(["--input", str(val), "--labels", str(labels), "--output", str(tmp_path / "a"),
                "--shuffle-seed", "3", "--samples-per-shard", "5"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = tar_samples(tmp_path / "a")
    assert {k: (m["jpeg"], int(m["cls"])) for k, m in got.items()} == {
        n[: -len(".JPEG")]: (d, (7 * i) % 1000) for i, (n, d) in enumerate(zip(names, photos, strict=True))
    }
    assert "not in the labels file: 1" in res.stdout
    # the seeded shuffle: a fixed order, not the sorted one, the same on a second run
    order = [k for s in sorted((tmp_path / "a").glob("*.tar")) for k in _keys(s)]
    assert sorted(order) != order or len(order) < 3
    res = make(["--input", str(val), "--labels", str(labels), "--output", str(tmp_path / "b"),
                "--shuffle-seed", "3", "--samples-per-shard", "5"])  # fmt: skip
    assert [k for s in sorted((tmp_path / "b").glob("*.tar")) for k in _keys(s)] == order

    # a list file: relative paths, labels after a comma, a missing file recorded
    lst = tmp_path / "list.txt"
    lst.write_text(f"val/{names[0]},4\n# a comment\nval/{names[1]}\n{val / names[2]},9\nval/gone.jpg,1\n")
    res = make(["--input", str(lst), "--output", str(tmp_path / "c")])
    assert res.returncode == 0, res.stderr
    got = tar_samples(tmp_path / "c")
    assert [(m["jpeg"], m.get("cls")) for m in got.values()] == [(photos[0], b"4"), (photos[1], None),
                                                                  (photos[2], b"9")]  # fmt: skip
    assert f"{MISSING}: 1" in res.stdout and "gone.jpg" in res.stdout
    bad = make(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "d")])
    assert bad.returncode == 2 and bad.stderr.startswith("make_shards: error:")
    assert bad.stderr.count("\n") == 1


def _keys(shard: Path) -> list[str]:
    with open(shard, "rb") as f:
        return [s.key for s in iter_samples(f)]


class HeldFiles:
    """Files served over HTTP on 127.0.0.1 (with ranges, as fsspec reads them); a request for a name in
    `held` waits until `release()`: a read that blocks for as long as the test wants."""

    def __init__(self, files: dict[str, bytes], held: set[str]) -> None:
        self.files, self.held, self.released = files, held, threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.reply(head=True)

            def do_GET(self) -> None:
                self.reply(head=False)

            def reply(self, head: bool) -> None:
                name = self.path.lstrip("/")
                if name in outer.held:
                    outer.released.wait(120)
                data = outer.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start, end, status = 0, len(data), 200
                if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                    start, end, status = int(m[1]), min(len(data), int(m[2] or len(data) - 1) + 1), 206
                self.send_response(status)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if not head:
                    with contextlib.suppress(OSError):
                        self.wfile.write(data[start:end])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def test_killed_mid_way_a_rerun_completes_without_duplicates(tmp_path):
    """The list's 7th entry is a URL whose server does not answer until told, so the run is killed inside
    shard 3 for sure (shards 0-2 finished, shard 3's temporary file open); then the server answers and a
    rerun finishes the job."""
    photos = real_jpegs()
    src = tmp_path / "img"
    src.mkdir()
    entries = []
    server = HeldFiles({"img/img07.jpg": photos[7]}, held={"img/img07.jpg"})
    for i in range(12):
        path = src / f"img{i:02d}.jpg"
        if i == 7:
            entries.append(f"{server.url}/img/{path.name},{i % 4}")
            continue
        path.write_bytes(photos[i % len(photos)] if i < 8 else jpeg_bytes(photo_like(i, 70, 90)))
        entries.append(f"img/{path.name},{i % 4}")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(entries) + "\n")
    out = tmp_path / "shards"
    cmd = [sys.executable, str(REPO / "jobs" / "make_shards.py"), "--no-progress", "--input", str(lst),
           "--output", str(out), "--samples-per-shard", "2", "--read-threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while len(list((out / "_make_shards").glob("*.json")) if (out / "_make_shards").exists() else []) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None  # blocked on the held file
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    try:
        finished = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")}
        assert sorted(finished) == [f"shard-{i:06d}.tar" for i in range(3)]
        assert [p for p in out.iterdir() if is_temporary(p.name)]  # the killed shard's temporary file
        server.release()
        res = make(["--input", str(lst), "--output", str(out), "--samples-per-shard", "2"])
    finally:
        server.stop()
    assert res.returncode == 0, res.stderr
    assert "12 images in 6 shards" in res.stdout and "3 shards finished before" in res.stdout
    assert {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in finished} == finished
    assert not [p for p in out.iterdir() if is_temporary(p.name)]
    got = tar_samples(out)  # asserts no key twice
    assert [int(m["cls"]) for m in got.values()] == [i % 4 for i in range(12)]
    held_key = next(k for k in got if k.endswith("/img/img07"))
    assert got[held_key]["jpg"] == photos[7]


@pytest.mark.parametrize("bad", [["--samples-per-shard", "0"], ["--prefix", "a/b"]])
def test_bad_arguments_exit_2(tmp_path, bad):
    (tmp_path / "x.jpg").write_bytes(real_jpegs()[0])
    res = make(["--input", str(tmp_path), "--output", str(tmp_path / "o"), *bad])
    assert res.returncode == 2 and "error:" in res.stderr.strip().splitlines()[-1]
