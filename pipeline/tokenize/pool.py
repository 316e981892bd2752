"""The pool of tokenizer actors: start them, keep each fed with shards, replace one that dies.

The driver owns the queue and the retry policy; the pool owns the actors and what each one holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError

from pipeline.tokenize.actor import ProgressCounter, tokenizer_actor
from pipeline.tokenize.processor import TokenizeOptions

SHARDS_IN_FLIGHT_PER_ACTOR = 2  # one running, one queued on the actor: no idle gap between shards


@dataclass(frozen=True)
class Attempt:
    """One shard sent to one actor; `ref` resolves to its commit record or raises."""

    ref: ray.ObjectRef
    slot: int
    actor: ray.actor.ActorHandle
    url: str


def actor_resources(actors: int, cpus_per_actor: float | None, gpus_per_actor: float) -> float:
    """CPUs per actor: as given, 1 beside a GPU, else the cluster's CPUs shared out among the actors."""
    if cpus_per_actor is not None:
        return cpus_per_actor
    if gpus_per_actor > 0:
        return 1.0
    return max(1.0, float(int(ray.cluster_resources().get("CPU", 1.0) // actors)))


class ActorPool:
    """`size` tokenizer actors writing into `output`; actors report encoded images to one counter."""

    def __init__(
        self, size: int, checkpoint: str, options: TokenizeOptions, output: str, sha256: str,
        cpus: float, gpus: float,
    ) -> None:  # fmt: skip
        self.output = output
        self._cls = tokenizer_actor(cpus, gpus)
        device = "cuda" if gpus > 0 else "cpu"
        # Actors report images as they encode them, so that progress moves inside a long shard too.
        self.counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
        self._args = (checkpoint, options, device, max(1, int(cpus)), sha256, self.counter)
        self.actors = [self._cls.remote(*self._args) for _ in range(size)]
        self.inflight: dict[ray.ObjectRef, Attempt] = {}
        self.restarts = 0

    def wait_ready(self) -> None:
        """Block until every actor has loaded its model (one that cannot start fails its shards later)."""
        with contextlib.suppress(RayActorError):
            ray.get([a.pid.remote() for a in self.actors])

    def feed(self, slot: int, todo) -> None:
        """Send shards from the deque `todo` to actor `slot` until it holds its share."""
        while todo and sum(1 for a in self.inflight.values() if a.slot == slot) < SHARDS_IN_FLIGHT_PER_ACTOR:
            url = todo.popleft()
            ref = self.actors[slot].process.remote(url, self.output)
            self.inflight[ref] = Attempt(ref, slot, self.actors[slot], url)

    def finished(self, timeout: float = 1.0) -> Iterator[Attempt]:
        """Attempts that completed (or failed) within `timeout`, removed from the in-flight set."""
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in ready:
            yield self.inflight.pop(ref)

    def replace(self, attempt: Attempt) -> None:
        """The actor of `attempt` died: start a fresh one in its slot, once however many shards it held."""
        if self.actors[attempt.slot] is attempt.actor:
            ray.kill(attempt.actor, no_restart=True)
            self.actors[attempt.slot] = self._cls.remote(*self._args)
            self.restarts += 1

    def images(self) -> int:
        return ray.get(self.counter.value.remote())

    def close(self) -> None:
        for a in [*self.actors, self.counter]:
            ray.kill(a, no_restart=True)
