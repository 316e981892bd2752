"""Training on Ray Train: the data split and resumable data position (plain lists and real shards), bad images
skipped and counted, the fallback when Ray's checkpoint list is torn, and one end-to-end run of the job on a
real local Ray cluster with two CPU workers: killed with SIGKILL after its first checkpoint, started again,
it resumes (step, Adam state, TDC multipliers), the loss falls, the multipliers agree on both workers, and
the exported model loads and tokenizes; a third start finds it finished and only re-exports."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from processes import processes_with
from shardmaker import jpeg_bytes, make_shard, photo_like, shard_samples

import gq
import gq.metrics
from pipeline.pack.shard_writer import write_shard
from pipeline.train.checkpoint import (
    SNAPSHOT,
    checkpoint_complete,
    latest_complete_checkpoint,
    prepare_resume,
)
from pipeline.train.config import TrainSettings
from pipeline.train.data import DataPosition, TrainBatches, worker_shards
from pipeline.train.run import EXPERIMENT
from pipeline.train.validation import validate

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "train_vae.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 good training shards of 12 photo-like JPEGs (96x128), one shard that also holds a truncated JPEG
    and a non-image, and a validation shard."""
    root = tmp_path_factory.mktemp("shards")
    train = root / "train"
    for i in range(4):
        make_shard(str(train / f"train-{i:03d}.tar"), 12, seed=i, start_key=100 * i)
    samples = shard_samples(6, seed=9, start_key=900)
    cut = jpeg_bytes(photo_like(77, 96, 128))
    samples.insert(2, {"__key__": "truncated", "jpg": cut[: len(cut) // 2], "cls": 1})
    samples.insert(4, {"__key__": "not_image", "jpg": b"<html>no image here</html>", "cls": 2})
    write_shard(str(train / "train-004.tar"), samples)
    make_shard(str(root / "val" / "val-000.tar"), 8, seed=50)
    return {"train": str(train), "val": str(root / "val"), "bad": str(train / "train-004.tar")}


def shard_list(data) -> list[str]:
    return sorted(str(p) for p in Path(data["train"]).glob("*.tar"))


# --- data split and position -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_workers_get_disjoint_shards_covering_all(n, world):
    shards = [f"s{i}" for i in range(n)]
    orders = []
    for epoch in range(4):
        parts = [worker_shards(shards, rank=r, world=world, epoch=epoch, seed=7) for r in range(world)]
        flat = [i for part in parts for i in part]
        assert sorted(flat) == list(range(n)), "every shard exactly once per epoch"
        assert all(len(p) >= n // world for p in parts)
        assert parts == [
            worker_shards(shards, rank=r, world=world, epoch=epoch, seed=7) for r in range(world)
        ]
        orders.append(parts)
    assert any(orders[0] != o for o in orders[1:]), "the split is reshuffled between epochs"


def test_worker_shards_rejects_bad_rank():
    with pytest.raises(ValueError):
        worker_shards(["a", "b"], rank=2, world=2, epoch=0, seed=0)


def batches(data, **kw):
    args = dict(batch_size=5, image_size=64, rank=0, world=2, seed=3, threads=2) | kw
    return TrainBatches(shard_list(data), **args)


def test_saved_position_resumes_at_the_next_sample(data):
    # 9 batches of 5 cross shard and epoch boundaries (rank 0 of 2 reads 2-3 shards of 6-12 samples)
    reference = batches(data)
    expected = [reference.next_images() for _ in range(9)]
    assert reference.position.epoch >= 1
    reference.close()

    first = batches(data)
    got = [first.next_images() for _ in range(4)]
    saved = DataPosition.from_dict(json.loads(json.dumps(first.position.to_dict())))
    first.close()
    second = batches(data, position=saved)
    got += [second.next_images() for _ in range(5)]
    second.close()
    for a, b in zip(expected, got):
        assert len(a) == len(b) == 5
        for x, y in zip(a, b):
            assert x.shape == (64, 64, 3) and x.dtype == y.dtype and (x == y).all()

    serial = batches(data, threads=1)  # the thread pool changes nothing
    assert all((x == y).all() for x, y in zip(expected[0], serial.next_images()))
    serial.close()


def test_batches_are_float_model_input(data):
    it = batches(data, batch_size=3)
    x = next(it)
    it.close()
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_bad_images_are_skipped_and_counted(data):
    it = TrainBatches([data["bad"]], batch_size=4, image_size=64, seed=0)
    for _ in range(3):  # 12 good images: two passes over the 6 good samples of the shard
        assert len(it.next_images()) == 4
    it.close()
    assert it.skipped["truncated image"] >= 1 and it.skipped["not an image"] >= 1
    assert {key for key, _, _ in it.examples} == {"truncated", "not_image"}


def test_unreadable_shard_is_counted_not_fatal(data, tmp_path):
    shards = [str(tmp_path / "missing.tar"), data["bad"]]
    it = TrainBatches(shards, batch_size=4, image_size=64, seed=0)
    it.next_images()
    it.close()
    assert it.skipped["shard unreadable"] >= 1


def test_more_workers_than_shards_is_refused(data):
    with pytest.raises(ValueError, match="at least one shard"):
        TrainBatches([data["bad"]], batch_size=2, image_size=64, rank=0, world=2)


# --- resume fallback, settings, command line ---------------------------------------------------------------


def fake_checkpoint(experiment: Path, step: int, world: int = 2, cut: bool = False) -> Path:
    path = experiment / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer.pt").write_bytes(b"x" * (50 if cut else 100))
    (path / "checkpoint.json").write_text(
        json.dumps({"step": step, "world_size": world, "trainer_bytes": 100})
    )
    for r in range(world):
        (path / f"rank-{r}.json").write_text(json.dumps({"rank": r}))
    return path


def test_torn_ray_snapshot_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    experiment = tmp_path / EXPERIMENT
    ten = fake_checkpoint(experiment, 10)
    fake_checkpoint(experiment, 20, cut=True)  # killed while trainer.pt was being copied
    twenty_five = fake_checkpoint(experiment, 25)
    (twenty_five / "rank-1.json").unlink()  # one worker's files never arrived
    assert checkpoint_complete(ten) and latest_complete_checkpoint(experiment) == ten
    (experiment / SNAPSHOT).write_text('{"ray_version": "2.6')  # cut mid-write
    assert prepare_resume(experiment) == str(ten)
    assert not (experiment / SNAPSHOT).exists()
    assert list(experiment.glob(f"{SNAPSHOT}.unusable-*"))


def test_usable_ray_snapshot_is_left_to_ray(tmp_path):
    import ray

    experiment = tmp_path / EXPERIMENT
    fake_checkpoint(experiment, 10)
    snapshot = {
        "ray_version": ray.__version__,
        "checkpoint_results": [{"checkpoint_dir_name": "step-00000010"}],
    }
    (experiment / SNAPSHOT).write_text(json.dumps(snapshot))
    assert prepare_resume(experiment) is None and (experiment / SNAPSHOT).exists()
    snapshot["ray_version"] = "0.0.1"  # another Ray version cannot load it
    (experiment / SNAPSHOT).write_text(json.dumps(snapshot))
    assert prepare_resume(experiment) == str(experiment / "step-00000010")


def test_settings_round_trip_and_validation():
    s = TrainSettings.of(preset="small-f8c16", data="d", output="o", image_size=64)
    assert TrainSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for bad in ({"image_size": 60}, {"preset": "nope"}, {"bpp": 2.0}, {"kl_mode": "x"}, {"workers": 0}):
        with pytest.raises(ValueError):
            TrainSettings.of(**({"preset": "small-f8c16", "data": "d", "output": "o"} | bad))


def test_validation_metrics_match_the_model_api():
    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config("small-f8c16", 0.5))
    images = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    s = TrainSettings.of(preset="small-f8c16", data="d", output="o", bpp=0.5, image_size=64, batch_size=2)
    val = validate(model, images, s)
    with torch.no_grad():
        tokens = model.tokenize(images)
        continuous = gq.metrics.psnr(images, model.reconstruct(images)).mean()
        quantized = gq.metrics.psnr(images, model.detokenize(tokens)).mean()
        kappa = gq.kl_bits(*model.encode(images), groups=2)
    assert val["val_images"] == 5
    assert val["psnr_continuous"] == pytest.approx(float(continuous), rel=1e-6)
    assert val["psnr_quantized"] == pytest.approx(float(quantized), rel=1e-6)
    assert val["codes_used"] == len(torch.unique(tokens))
    assert val["codebook_usage"] == val["codes_used"] / 65536
    assert val["kl_bits_mean"] == pytest.approx(float(kappa.mean()), rel=1e-5)
    assert val["kl_bits_max"] == pytest.approx(float(kappa.max()), rel=1e-5)
    assert val["kl_bits_std"] == pytest.approx(float(kappa.double().std()), rel=1e-5)
    in_band = ((kappa - val["kl_bits_target"]).abs() <= model.config.tdc.tolerance).double().mean()
    assert val["kl_bits_in_band"] == pytest.approx(float(in_band))


def run_job(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, JOB, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_job_bad_arguments_exit_2(tmp_path):
    base = ["--preset", "small-f8c16", "--data", "x", "--output", str(tmp_path / "o")]
    assert run_job(*base, "--image-size", "60").returncode == 2
    assert run_job("--preset", "tiny", "--data", "x", "--output", "o").returncode == 2
    missing = run_job(*base)  # no such shards: refused before Ray starts
    assert missing.returncode == 2 and "no such shard" in missing.stderr
    assert run_job(*base, "--perceptual-weights", str(tmp_path / "vgg.safetensors")).returncode == 2
    help_ = run_job("--help")
    assert help_.returncode == 0 and "--perceptual-weights" in help_.stdout and "--disc-start" in help_.stdout


# --- end to end on a local Ray cluster ---------------------------------------------------------------------


def read_metrics(out: Path) -> list[dict]:
    lines = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill
            lines.append(json.loads(line))
    return lines


def registered_names(out: Path) -> list[str]:
    """The checkpoints in Ray Train's list (its snapshot file) now."""
    try:
        snapshot = json.loads((out / EXPERIMENT / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]


def registered(out: Path, name: str) -> bool:
    return name in registered_names(out)


def assert_no_stray_processes(marker: str, wait: float = 30.0) -> None:
    deadline = time.monotonic() + wait
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # ours: clean up before failing
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow
def test_job_two_workers_kill_resume_export(data, tmp_path):
    out = tmp_path / "run"
    marker = f"GQ_TEST_{uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="gqr", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # Ray's session files and every temporary file of the job (multiprocessing's pymp-* of processes the
    # kill leaves no time to clean up) go under ray_tmp, removed at the end
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "TMPDIR": ray_tmp, marker: "1"}
    args = [
        "--preset", "small-f8c16", "--data", data["train"], "--val-data", data["val"], "--output", str(out),
        "--workers", "2", "--batch-size", "4", "--image-size", "64", "--max-steps", "30", "--lr", "1e-3",
        "--checkpoint-every", "10", "--val-every", "15", "--val-images", "8", "--log-every", "1",
        "--disc-start", "22", "--seed", "0",
    ]  # fmt: skip
    try:
        # 1. start, and SIGKILL the whole process group once the first checkpoint is registered
        with open(tmp_path / "run1.log", "w") as log1:
            proc = subprocess.Popen(
                [sys.executable, JOB, *args], cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 240
            while not registered(out, "step-00000010"):
                assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert_no_stray_processes(marker)
        before = read_metrics(out)
        # Ray Train's controller may register a checkpoint late, after the workers made the next one: the
        # run resumes from the newest registered when it was killed (step 10, or 20 on a loaded machine)
        latest = max(int(name.rsplit("-", 1)[1]) for name in registered_names(out))
        at_checkpoint = [m for m in before if m.get("step") == latest and "event" not in m][-1]
        assert max(m["step"] for m in before if "event" not in m) < 30

        # 2. start again: resumes from step 10 with Adam state and TDC multipliers, finishes
        second = run_job(*args, env=env, timeout=400)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert_no_stray_processes(marker)
        metrics = read_metrics(out)
        resume = [i for i, m in enumerate(metrics) if m.get("event") == "resume"]
        assert len(resume) == 1
        event = metrics[resume[0]]
        assert event["step"] == latest and event["adam_step"] == latest and event["tdc_updates"] == latest
        for key in ("lam", "lam_min", "lam_max"):
            assert event[key] == at_checkpoint[key], key
        after = [m for m in metrics[resume[0] + 1 :] if "event" not in m]
        assert [m["step"] for m in after] == list(range(latest + 1, 31))

        # every logged step: the TDC multipliers are identical on both workers
        steps = [m for m in metrics if "event" not in m]
        for m in steps:
            assert len(m["tdc_by_rank"]) == 2 and m["tdc_by_rank"][0] == m["tdc_by_rank"][1], m["step"]
        # the loss falls (first 5 steps against the 5 before the GAN starts at 22), so does the L1 to the end
        by_step = {m["step"]: m for m in steps}
        mean = lambda key, r: sum(by_step[s][key] for s in r) / len(r)  # noqa: E731
        assert mean("loss", range(17, 22)) < 0.9 * mean("loss", range(1, 6))
        assert mean("l1", range(26, 31)) < mean("l1", range(1, 6))
        assert all(by_step[s]["gan"] for s in range(22, 31)) and not by_step[21]["gan"]
        assert all(abs(by_step[s]["d_loss"]) < 1e3 and by_step[s]["d_loss"] > 0 for s in range(22, 31))
        # bad training images were skipped and counted
        skipped = by_step[30]["skipped"]
        assert skipped.get("truncated image", 0) >= 1 and skipped.get("not an image", 0) >= 1
        vals = [m for m in metrics if m.get("event") == "val"]
        assert {m["step"] for m in vals} >= {15, 30}
        assert all(0 < m["codebook_usage"] <= 1 and m["psnr_continuous"] > 5 for m in vals)

        # the exported inference checkpoint
        model = gq.load(str(out / "model.safetensors"))
        assert model.provenance["steps"] == 30 and model.provenance["preset"] == "small-f8c16"
        assert "git_commit" in model.provenance and model.provenance["val"]["val_images"] == 8
        assert (out / "model-step15.safetensors").exists()
        images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
        tokens = model.tokenize(images)
        assert tokens.shape == (2, 8, 8, 1)
        assert model.detokenize(tokens).shape == (2, 3, 64, 64)
        lam = float(model.tdc.lam)
        assert lam == by_step[30]["lam"]

        # 3. a finished run: only re-exported, exit 0
        (out / "model.safetensors").unlink()
        third = run_job(*args, env=env, timeout=120)
        assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
        assert "already trained to step 30" in third.stdout
        assert float(gq.load(str(out / "model.safetensors")).tdc.lam) == lam
    finally:
        assert_no_stray_processes(marker, wait=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
