"""The README's "From an image folder to a token dataset" section, run as written: an ImageNet-style folder
of real JPEGs made here -> shards -> tokens with labels and two views, and a caption shard -> (caption,
tokens) rows read by Polars; the values are checked against the files made here and the model."""

import io
import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from processes import kill_marked
from shardmaker import jpeg_bytes, photo_like, real_jpegs

from jobs import make_shards
from pipeline.pack.shard_writer import write_shard
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO = REPO / "assets" / "demo" / "gq-small-f8c16-0.25bpp-tdc.safetensors"
HEADING = "From an image folder to a token dataset"
CAPTIONS = ["a red fox in snow", "", "Straße am Meer, 海辺の道 🌊", "x" * 300]
pytestmark = pytest.mark.slow


def blocks(kind: str) -> str:
    section = README.read_text().split(f"## {HEADING}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{kind}\n(.*?)```", section, re.S).group(1)


def make_inputs(root: Path) -> dict:
    """imagenet/train (3 class folders), imagenet/val + labels file, laion/00000.tar, model.safetensors."""
    photos = real_jpegs()
    train = {}
    for i in range(9):
        cls = ("n01440764", "n01443537", "n02085620")[i % 3]
        data = photos[i] if i < len(photos) else jpeg_bytes(photo_like(i, 200, 300))
        path = root / "imagenet" / "train" / cls / f"{cls}_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        train[f"{cls}/{cls}_{i:05d}"] = (data, i % 3)
    (root / "imagenet" / "val").mkdir()
    val = {}
    for i, data in enumerate(photos[:3]):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (root / "imagenet" / "val" / f"{name}.JPEG").write_bytes(data)
        val[name] = 2 - i
    (root / "imagenet" / "val_labels.txt").write_text("".join(f"{n}.JPEG {v}\n" for n, v in val.items()))
    samples = [
        {"__key__": f"{i:09d}", "jpg": photos[i], "txt": c, "json": json.dumps({"url": f"https://x/{i}"})}
        for i, c in enumerate(CAPTIONS)
    ]
    write_shard(str(root / "laion" / "00000.tar"), samples)
    os.symlink(DEMO, root / "model.safetensors")
    return {"train": train, "val": val, "laion": samples}


def run_commands(root: Path, monkeypatch) -> None:
    """Each command of the bash block: make_shards through its main() here (a process costs seconds of
    imports), tokenize as a process of this interpreter with float32 (the in-process reference is float32
    on every CPU); no progress bars."""
    script = blocks("bash").replace("\\\n", " ")
    for line in script.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        argv = shlex.split(line)
        assert argv[0] == "python"
        if argv[1] == "jobs/make_shards.py":
            monkeypatch.chdir(root)
            assert make_shards.main([*argv[2:], "--no-progress"]) == 0, line
            continue
        argv = [
            sys.executable,
            str(REPO / argv[1]),
            *argv[2:],
            "--no-progress",
            "--encoder-precision",
            "float32",
        ]
        marker = uuid.uuid4().hex
        try:
            env = {**os.environ, "GQ_TEST_README": marker}
            done = subprocess.run(
                argv, cwd=root, capture_output=True, text=True, timeout=300, env=env, start_new_session=True
            )
        finally:
            kill_marked(f"GQ_TEST_README={marker}")
        assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-3000:])


def test_readme_folder_to_shards_to_tokens_with_labels_views_and_captions(tmp_path, monkeypatch):
    made = make_inputs(tmp_path)
    run_commands(tmp_path, monkeypatch)

    classes = json.loads((tmp_path / "shards" / "train" / "classes.json").read_text())["classes"]
    assert classes == ["n01440764", "n01443537", "n02085620"]
    table = pq.read_table(tmp_path / "tokens" / "train" / "shard-000000.parquet")
    keys = sorted(made["train"])
    assert table["key"].to_pylist() == [k for k in keys for _ in range(2)]  # two views, rows adjacent
    assert table["view"].to_pylist() == [0, 1] * len(keys)
    assert table["label"].to_pylist() == [made["train"][k][1] for k in keys for _ in range(2)]
    sizes = [Image.open(io.BytesIO(made["train"][k][0])).size for k in keys]
    assert list(zip(table["width"].to_pylist(), table["height"].to_pylist(), strict=True)) == [
        s for s in sizes for _ in range(2)
    ]
    val_tar = tmp_path / "shards" / "val" / "shard-000000.tar"
    val = ShardTokenizer(str(DEMO), TokenizeOptions(image_size=64)).tokenize_shard(str(val_tar))
    assert dict(zip(val.keys, val.labels, strict=True)) == made["val"]

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks("python"), str(README), "exec"), namespace)
    pairs = namespace["pairs"]
    assert pairs["txt"].to_list() == CAPTIONS  # value for value, non-ASCII and empty included
    crops = ShardTokenizer(str(DEMO), TokenizeOptions(image_size=256, encoder_precision="float32"))
    want = crops.tokenize_shard(str(tmp_path / "laion" / "00000.tar")).tokens
    np.testing.assert_array_equal(np.stack(pairs["tokens"].to_numpy()), want)
    assert namespace["caption"] == CAPTIONS[0] and namespace["tokens"].shape == (32 * 32,)
    item = namespace["item"]
    assert item["view"] in (0, 1) and item["label"] == made["train"][item["key"]][1]

    # test_readme_readers runs the "Reading tokens for training" snippets on files it writes: they are
    # this layout (folders, columns and their types, views, kept members), so the snippets read what the
    # README's commands make
    from test_readme_readers import write_token_dirs

    write_token_dirs(tmp_path / "readers")
    for name in ("train", "laion"):
        real = pq.read_schema(next((tmp_path / "tokens" / name).glob("*.parquet")))
        made_there = pq.read_schema(next((tmp_path / "readers" / "tokens" / name).glob("*.parquet")))
        assert real.remove_metadata() == made_there.remove_metadata(), name
        real_pre, there_pre = (json.loads(s.metadata[b"gq"])["preprocessing"] for s in (real, made_there))
        assert {k: real_pre[k] for k in there_pre} == there_pre, name

    # resuming tokens/train with other views or kept members is refused: one line, exit 2
    for change in (["--views", "flip", "--keep", "txt"],):
        argv = [sys.executable, str(REPO / "jobs/tokenize.py"), "--input", "shards/train", "--output",
                "tokens/train", "--checkpoint", "model.safetensors", "--encoder-precision", "float32",
                *change]  # fmt: skip
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "different run" in done.stderr and "'keep': ['txt']" in done.stderr
