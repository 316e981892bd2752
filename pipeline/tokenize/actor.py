"""The tokenizer actor: a Ray actor around `ShardTokenizer`, one GQ-VAE per actor on its GPU or CPUs."""

from __future__ import annotations

import os

import ray

from pipeline import ROOT
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions

# Environment the actors need from the driver's: object-store credentials and endpoints, fsspec settings.
FORWARDED_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "GCS_", "HF_")
# glibc's default malloc lets a long-lived actor's RSS creep up shard after shard (per-thread arenas and a
# dynamic mmap threshold that keeps freed image buffers in the heap): 896 -> 1078 MiB over 20 shards in
# benchmarks/pipeline.py, flat at 954 MiB from the 2nd shard with these. The driver's own values win.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}


class TokenizerActor:
    """Holds the model; `process(url, output)` tokenizes and commits one shard, telling `counter` (a
    ProgressCounter actor) of each batch of images as it is encoded.

    Construction is cheap and the model is loaded by `load()` (or the first `process`): the answer to
    `where()` then tells the pool that the actor is placed on a node, apart from how long loading takes."""

    def __init__(
        self,
        checkpoint: str,
        options: TokenizeOptions,
        device: str,
        threads: int,
        expected_sha256: str,
        counter=None,
    ) -> None:
        self._args = (checkpoint, options, device, threads, expected_sha256)
        self.worker: ShardTokenizer | None = None
        self.counter = counter

    def load(self) -> None:
        """Load the model, once; one that failed to load is tried again (and its error raised) by the
        next shard, so that the error reaches that shard's record in the summary."""
        if self.worker is None:
            self.worker = ShardTokenizer(*self._args)

    def where(self) -> dict:
        """Where this actor runs (named in the summary should it be lost): pid, node id and node IP."""
        node = ray.get_runtime_context().get_node_id()
        return {"pid": os.getpid(), "node_id": node, "node_ip": ray.util.get_node_ip_address()}

    def process(self, url: str, output: str) -> dict:
        self.load()
        if self.counter is None:
            return self.worker.process(url, output)
        record = self.worker.process(url, output, self.counter.add.remote)  # reports: fire and forget
        # calls from one caller run in order: once this one is done, every report of the shard has arrived,
        # so the driver, which reads the counter after the record, never counts less than was committed
        ray.get(self.counter.add.remote(0))
        return record


class ProgressCounter:
    """Images encoded so far by every actor of a job: actors add, the driver's progress bar reads."""

    def __init__(self) -> None:
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def value(self) -> int:
        return self.images


def actor_env() -> dict[str, str]:
    """Driver environment forwarded to actors, with this checkout importable on every worker."""
    env = dict(MALLOC_ENV)
    env |= {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in MALLOC_ENV}
    root = str(ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def tokenizer_actor(cpus: float, gpus: float):
    """The Ray actor class with its resource request (no automatic restarts: the driver replaces actors).

    Spread over the cluster's nodes: CPU actors do not crowd one node while another idles, and a lost
    node takes as few actors as the placement allows."""
    return ray.remote(TokenizerActor).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_restarts=0,
        runtime_env={"env_vars": actor_env()},
        scheduling_strategy="SPREAD",
    )
