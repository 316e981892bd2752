"""The pool of tokenizer actors: start them, keep each fed with shards, replace one that dies.

The driver owns the queue and the retry policy; the pool owns the actors and what each one holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
        # Actors report images as they encode them, so that progress moves inside a long shard too. The
        # counter lives on the driver's node: losing any other node must not take it (and the job) along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.counter = ray.remote(num_cpus=0)(ProgressCounter).options(scheduling_strategy=here).remote()
        self._args = (checkpoint, options, device, max(1, int(cpus)), sha256, self.counter)
        self.actors: list[ray.actor.ActorHandle] = []
        self._where: dict[ray.actor.ActorHandle, ray.ObjectRef] = {}  # actor -> ref of its where()
        for _ in range(size):
            self.actors.append(self._start())
        self.inflight: dict[ray.ObjectRef, Attempt] = {}
        self.restarts = 0
        self.lost: list[str] = []  # the actors that died: id, node, pid, why

    def _start(self) -> ray.actor.ActorHandle:
        actor = self._cls.remote(*self._args)
        self._where[actor] = actor.where.remote()  # answered once the model is loaded, kept for the summary
        return actor

    def wait_ready(self) -> int:
        """Block until every actor has loaded its model (one that cannot start fails its shards later);
        the number of nodes they run on."""
        nodes = set()
        for actor in self.actors:
            with contextlib.suppress(RayActorError):
                nodes.add(ray.get(self._where[actor])["node_id"])
        return len(nodes)

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

    def replace(self, attempt: Attempt, why: str) -> None:
        """The actor of `attempt` died: start a fresh one in its slot, once however many shards it held."""
        if self.actors[attempt.slot] is attempt.actor:
            ray.kill(attempt.actor, no_restart=True)
            self.lost.append(f"{self.describe(attempt.actor)}: {why}")
            self.actors[attempt.slot] = self._start()
            self.restarts += 1

    def describe(self, actor: ray.actor.ActorHandle) -> str:
        """`actor <id> on node <id> (<ip>), pid <pid>`, as far as the actor told before it died."""
        name = f"actor {actor._actor_id.hex()[:16]}"
        try:
            w = ray.get(self._where.pop(actor), timeout=0)
        except (RayError, ValueError, KeyError):  # it died before its model was loaded
            return f"{name} (node unknown: it died starting)"
        return f"{name} on node {w['node_id'][:16]} ({w['node_ip']}), pid {w['pid']}"

    def images(self) -> int:
        return ray.get(self.counter.value.remote())

    def close(self) -> None:
        for a in [*self.actors, self.counter]:
            ray.kill(a, no_restart=True)
