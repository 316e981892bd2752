"""The tokenize job on a real multi-node Ray cluster on this machine (a head and two worker nodes, each its
own raylet): actors spread over the worker nodes, one worker node removed mid-run."""

import contextlib
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from processes import kill_marked
from shardmaker import make_shard
from test_tokenize_job import (
    MARKER,
    assert_tokens_match,
    job_cmd,
    kill_job,
    reference,
    start_job,
    wait_for_commits,
)  # fmt: skip

pytestmark = pytest.mark.slow
# Nodes are declared dead after ~1.5 s of missed health checks (Ray's default is ~30 s).
FAST_FAILURE = {
    "health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3,
}  # fmt: skip


@pytest.fixture
def ray_cluster(monkeypatch):
    """A head (no CPUs: only the driver runs there) and two worker nodes of 2 logical CPUs each.

    RAY_TMPDIR is a short directory of the test's own (socket paths stay under ~107 characters, and the
    `ray_current_cluster` address file written there is not seen by any other Ray user of this machine);
    every process of the cluster carries a marker, and all are gone when the test ends, pass or fail."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="gqc", dir="/tmp")
    token = uuid.uuid4().hex
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv(MARKER, token)
    cluster = None
    try:
        small = {"object_store_memory": 80 * 2**20, "include_dashboard": False}
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "_system_config": FAST_FAILURE, **small},
            shutdown_at_exit=False,
        )
        for _ in range(2):
            cluster.add_node(num_cpus=2, **small)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
        kill_marked(f"{MARKER}={token}")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(8):
        make_shard(str(d / f"part-{i:06d}.tar"), 12, seed=200 + i, start_key=1000 * i)
    return sorted(d.glob("*.tar"))


def test_worker_node_lost_mid_run(tmp_path, ray_cluster, shards, small_checkpoint, monkeypatch):
    out = tmp_path / "tokens"
    cmd = job_cmd(shards[0].parent, out, small_checkpoint, "--image-size", "128", "--actors", "2",
                  "--cpus-per-actor", "1")  # fmt: skip
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)  # the job joins the cluster
    proc = start_job(cmd)
    try:
        wait_for_commits(out, 2, proc, timeout=240)
        victim = next(iter(ray_cluster.worker_nodes))
        ray_cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: its raylet and actor die at once
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_job(proc)
    assert proc.returncode == 0, stdout + stderr[-3000:]
    assert f"{len(shards)}/{len(shards)} committed" in stdout, stdout
    assert "actors: started on 2 node(s)" in stdout  # spread: one actor on each worker node
    lost = [line for line in stdout.splitlines() if line.startswith("LOST actor")]
    assert len(lost) == 1 and victim.node_id[:16] in lost[0], stdout  # the removed node's actor, by node
    retried = [line.split()[1] for line in stdout.splitlines() if line.startswith("RETRIED ")]
    assert retried and set(retried) <= {p.stem for p in shards}, stdout
    assert "actor died" in stdout
    assert_tokens_match(out, reference(shards, small_checkpoint, size=128))
    assert not list(Path(out).rglob("*.tmp"))
