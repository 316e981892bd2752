"""The tokenize job on a real multi-node Ray cluster on this machine (a head without CPUs and two worker
nodes of one CPU, each its own raylet), worker nodes removed mid-run as preemption would: with room for a
replacement actor (it joins), with none (the survivor takes the lost shards), and with every worker node
gone (the run stops within --actor-wait, and a rerun on the restored cluster completes it)."""

import contextlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from processes import kill_marked
from shardmaker import make_shard
from test_tokenize_job import (
    MARKER,
    assert_tokens_match,
    job_cmd,
    kill_job,
    reference,
    run,
    start_job,
    wait_for_commits,
)  # fmt: skip

pytestmark = pytest.mark.slow
SIZE = 128  # large enough that a shard is still being tokenized when its node is removed
WORKER_NODES = 2
# Nodes are declared dead after ~1.5 s of missed health checks (Ray's default is ~30 s).
FAST_FAILURE = {
    "health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3,
}  # fmt: skip
SMALL = {"object_store_memory": 80 * 2**20, "include_dashboard": False}


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (no CPUs: only the driver runs there) and worker nodes of 1 logical CPU, one cluster for the
    module: each test starts from `WORKER_NODES` worker nodes (`restored`).

    RAY_TMPDIR is a short directory of the module's own (socket paths stay under ~107 characters, and the
    `ray_current_cluster` address file written there is not seen by any other Ray user of this machine);
    every process of the cluster carries a marker, and all are gone when the module ends, pass or fail."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="gqc", dir="/tmp")
    token = uuid.uuid4().hex
    cluster = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv(MARKER, token)
        try:
            head = {"num_cpus": 0, "_system_config": FAST_FAILURE, **SMALL}
            cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=False)
            mp.setenv("RAY_ADDRESS", cluster.address)  # every job joins the cluster
            yield cluster
        finally:
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.shutdown()
            kill_marked(f"{MARKER}={token}")
            shutil.rmtree(tmp, ignore_errors=True)


def restore(cluster) -> None:
    """`WORKER_NODES` live worker nodes again (earlier tests removed some)."""
    while len(cluster.worker_nodes) < WORKER_NODES:
        cluster.add_node(num_cpus=1, **SMALL)
    cluster.wait_for_nodes()


@pytest.fixture
def restored(ray_cluster):
    restore(ray_cluster)
    return ray_cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    # enough work that the run outlasts the node removal after its first commit on a quiet machine too
    # (with 6 shards of 6 images the survivors once finished everything before the node was gone)
    for i in range(12):
        make_shard(str(d / f"part-{i:06d}.tar"), 6, seed=200 + i, start_key=1000 * i)
    return sorted(d.glob("*.tar"))


@pytest.fixture(scope="module")
def expected(shards, small_checkpoint):
    """Tokens of a plain, uninterrupted in-process run."""
    return reference(shards, small_checkpoint, size=SIZE)


def node_running(cluster, pid: int):
    """The worker node whose raylet started process `pid` (Ray's workers are its children)."""
    for node in cluster.worker_nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        with contextlib.suppress(OSError):
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                return node
    raise AssertionError(f"no worker node runs pid {pid}")


def tokenize_losing_nodes(cluster, shards, out, ckpt, lose, *extra) -> tuple[str, str, int, list[str]]:
    """Run the job, remove worker nodes (SIGKILL) right after the first commit: `lose` of them, or the one
    running the actor that made the commit when `lose` is "committer"; its stdout, stderr, exit status and
    the ids of the removed nodes."""
    cmd = job_cmd(shards[0].parent, out, ckpt, "--image-size", str(SIZE), *extra)
    proc = start_job(cmd)
    try:
        [first] = wait_for_commits(out, 1, proc, timeout=240)[:1]
        if lose == "committer":
            victims = [node_running(cluster, json.loads(first.read_text())["worker"]["pid"])]
        else:
            victims = list(cluster.worker_nodes)[:lose]
        for node in victims:
            cluster.remove_node(node, allow_graceful=False)  # its raylet and actor die at once
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_job(proc)
    return stdout, stderr, proc.returncode, [n.node_id for n in victims]


def lines(stdout: str, tag: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(tag)]


def assert_lost_only(stdout: str, victim: str) -> None:
    """The removed node's actor is reported lost, by node; any other LOST line is a replacement that died
    before it was placed (Ray may start placing one on the node being removed, on a loaded machine)."""
    lost = lines(stdout, "LOST actor")
    assert sum(victim[:16] in line for line in lost) == 1, stdout
    assert all(victim[:16] in line or "died before it was placed" in line for line in lost), stdout


def test_node_lost_with_room_for_a_replacement(tmp_path, restored, shards, expected, small_checkpoint):
    out = tmp_path / "tokens"
    # one actor: the job can only finish once its replacement is placed on the other node and joins
    stdout, stderr, rc, [victim] = tokenize_losing_nodes(
        restored, shards, out, small_checkpoint, "committer", "--actors", "1", "--cpus-per-actor", "1"
    )
    assert rc == 0, stdout + stderr[-3000:]
    assert f"{len(shards)}/{len(shards)} committed" in stdout, stdout
    assert "actors: started on 1 node(s), 1 of 1 running at the end; 1 replacement(s) placed after" in stdout
    assert_lost_only(stdout, victim)
    retried = [line.split()[1] for line in lines(stdout, "RETRIED ")]
    assert retried and set(retried) <= {p.stem for p in shards}, stdout
    assert "actor died" in stdout
    assert_tokens_match(out, expected)
    assert not list(Path(out).rglob("*.tmp"))


def test_node_lost_without_spare_capacity(tmp_path, restored, shards, expected, small_checkpoint):
    out = tmp_path / "tokens"
    # one CPU each on nodes of one CPU: the replacement has nowhere to go, the survivor does the rest
    stdout, stderr, rc, [victim] = tokenize_losing_nodes(
        restored, shards, out, small_checkpoint, 1, "--actors", "2", "--cpus-per-actor", "1"
    )
    assert rc == 0, stdout + stderr[-3000:]
    assert f"{len(shards)}/{len(shards)} committed" in stdout, stdout
    assert "actors: started on 2 node(s), 1 of 2 running at the end; 1 never placed (no room)" in stdout
    assert_lost_only(stdout, victim)
    assert lines(stdout, "RETRIED ") and not lines(stdout, "FAILED")
    assert_tokens_match(out, expected)  # every shard once, tokens as a plain run's


def test_every_worker_node_lost_stops_then_rerun_completes(
    tmp_path, restored, shards, expected, small_checkpoint
):
    out = tmp_path / "tokens"
    args = ("--actors", "2", "--cpus-per-actor", "1", "--actor-wait", "5")
    stdout, stderr, rc, _ = tokenize_losing_nodes(restored, shards, out, small_checkpoint, 2, *args)
    assert rc == 1, stdout + stderr[-3000:]
    [stopped] = lines(stdout, "STOPPED ")
    assert "no tokenizer actor alive and none placed in " in stopped and " s (--actor-wait 5 s): " in stopped
    assert "each asks for CPU 1; the cluster has CPU 0 free of 0 on 1 live node(s)" in stopped, stopped
    committed = sorted(p.stem for p in (out / "_manifest").glob("*.json"))
    assert 1 <= len(committed) < len(shards), stdout
    # left to do as the driver knows it (a commit its actor died before reporting counts as left)
    left = int(stopped.rsplit("; ", 1)[1].split()[0])
    assert len(shards) - len(committed) <= left < len(shards), stopped
    for stem in committed:  # kept whole: the tokens of a plain run
        assert pq.read_table(out / f"{stem}.parquet")["key"].to_pylist() == expected[stem][0]

    restore(restored)
    rerun = job_cmd(shards[0].parent, out, small_checkpoint, "--image-size", str(SIZE), *args[:4])
    res = run(rerun, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert f"{len(committed)} before this run" in res.stdout
    assert_tokens_match(out, expected)
    assert not list(Path(out).rglob("*.tmp"))
