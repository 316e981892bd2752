"""The training job on a real multi-node Ray cluster (a head without CPUs and three one-CPU worker nodes,
each its own raylet): a worker node is killed mid-run, as a preempted machine would be. With
`--max-failures 1` Ray Train restarts the worker group on the nodes left from the last checkpoint, by
itself: the job exits 0 with no rerun, the step counter continues from the checkpoint, and the Adam state
and TDC multipliers come back as they were saved."""

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
from processes import kill_marked
from shardmaker import make_shard

import gq
from pipeline.train.checkpoint import SNAPSHOT
from pipeline.train.run import EXPERIMENT

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "train_vae.py")
WORKER = "RayTrainWorker"  # Ray Train's worker actor: its process title names it


def registered(out: Path) -> list[str]:
    with contextlib.suppress(OSError, ValueError):
        snapshot = json.loads((out / EXPERIMENT / SNAPSHOT).read_text())
        return [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    return []


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def runs_a_train_worker(node) -> bool:
    """Whether a Ray Train worker process runs under this node's raylet."""
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in children(raylet):
        with contextlib.suppress(OSError):
            if WORKER in Path(f"/proc/{pid}/cmdline").read_text():
                return True
    return False


@pytest.fixture
def cluster(monkeypatch):
    """Head (no CPUs: nothing trains there) + three worker nodes of one CPU, in a short temp dir of its own
    (also where Ray records the cluster's address, so that no other Ray on this machine joins it)."""
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="gqn", dir="/tmp")  # Ray's socket paths must stay < 108 chars
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("TMPDIR", ray_tmp)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(3):
            c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_losing_a_worker_node_resumes_in_run_from_the_last_checkpoint(cluster, tmp_path):
    data = tmp_path / "train"
    for i in range(2):
        make_shard(str(data / f"train-{i:03d}.tar"), 16, seed=i, start_key=100 * i)
    out = tmp_path / "run"
    marker = f"GQ_TEST_{uuid.uuid4().hex}"
    env = os.environ | {"RAY_ADDRESS": cluster.address, marker: "1"}
    args = [
        "--preset", "small-f8c16", "--data", str(data), "--output", str(out), "--workers", "2",
        "--max-failures", "1", "--batch-size", "2", "--image-size", "64", "--max-steps", "24",
        "--checkpoint-every", "6", "--val-every", "1000", "--log-every", "1", "--seed", "0",
    ]  # fmt: skip
    log = tmp_path / "job.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, JOB, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 300
            while "step-00000006" not in registered(out):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s\n" + log.read_text()[-3000:]
                time.sleep(0.1)
            lost = next(n for n in list(cluster.worker_nodes) if runs_a_train_worker(n))
            cluster.remove_node(lost, allow_graceful=False)  # the machine is gone: SIGKILL, no goodbye
            saved = registered(out)
            assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
        text = log.read_text()

        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        resumes = [i for i, m in enumerate(metrics) if m.get("event") == "resume"]
        assert len(resumes) == 1, text[-3000:]  # one in-run restart, no manual rerun
        event = metrics[resumes[0]]
        at = event["step"]
        assert f"step-{at:08d}" in saved and at >= 6  # the last checkpoint registered before the loss
        assert event["adam_step"] == at and event["tdc_updates"] == at
        logged = {m["step"]: m for m in metrics[: resumes[0]] if "event" not in m}
        for key in ("lam", "lam_min", "lam_max"):
            assert event[key] == logged[at][key], key  # the TDC multipliers as saved at that step
        after = [m["step"] for m in metrics[resumes[0] + 1 :] if "event" not in m]
        assert after == list(range(at + 1, 25))  # the step counter continues
        model = gq.load(str(out / "model.safetensors"))
        assert model.provenance["steps"] == 24
        last = [m for m in metrics if "event" not in m][-1]
        assert last["step"] == 24 and float(model.tdc.lam) == last["lam"]
        assert all(len(m["tdc_by_rank"]) == 2 for m in metrics if "event" not in m)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(marker)
