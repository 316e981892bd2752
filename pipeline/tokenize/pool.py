"""The pool of tokenizer actors: start them, keep the placed ones fed with shards, replace one that dies.

An actor is fed from the moment it is placed (its process runs on a node; its model loads ahead of its
first shard), so that no actor waits for another. A lost actor's shards go back to the driver at once,
for any live actor to take, and a replacement is asked for but never waited for: when the cluster has
room for it, it joins the pool; while it has none (a preempted or shrunk cluster, a GPU cluster at full
allocation), the job goes on with the actors it has. Only when no actor is alive and none is placed
within the driver's wait does the pool call the run stalled, saying what it asked for and what the
cluster has. The driver owns the queue and the retry policy; the pool owns the actors and what each holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.tokenize.actor import ProgressCounter, tokenizer_actor
from pipeline.tokenize.processor import TokenizeOptions

SHARDS_IN_FLIGHT_PER_ACTOR = 2  # one running, one queued on the actor: no idle gap between shards
START_FAILURES = 3  # actors in a row that die before being placed: then no more replacements are asked


@dataclass(frozen=True)
class Attempt:
    """One shard sent to one actor; `ref` resolves to its commit record or raises."""

    ref: ray.ObjectRef
    actor: ray.actor.ActorHandle
    url: str


@dataclass
class Member:
    """One actor the pool asked for, from its request until it is lost."""

    actor: ray.actor.ActorHandle
    placed_ref: ray.ObjectRef  # where(): answered once the actor's process runs on a node
    loaded_ref: ray.ObjectRef  # load(): answered once its model is loaded
    asked: float  # perf_counter() of the request
    replacement: bool  # asked for in place of a lost actor
    where: dict | None = None  # pid, node id, node IP: set once placed
    loaded: bool = False


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
        self,
        *,
        size: int,
        checkpoint: str,
        options: TokenizeOptions,
        output: str,
        sha256: str,
        cpus: float,
        gpus: float,
    ) -> None:
        self.output = output
        self.size = size
        self.request = {"CPU": cpus} | ({"GPU": gpus} if gpus > 0 else {})  # per actor, named when stalled
        self._cls = tokenizer_actor(cpus, gpus)
        device = "cuda" if gpus > 0 else "cpu"
        # Actors report images as they encode them, so that progress moves inside a long shard too. The
        # counter lives on the driver's node: losing any other node must not take it (and the job) along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.counter = ray.remote(num_cpus=0)(ProgressCounter).options(scheduling_strategy=here).remote()
        self._args = (checkpoint, options, device, max(1, int(cpus)), sha256, self.counter)
        self.members: list[Member] = []  # asked for and not lost: placed or waiting for a place
        self.inflight: dict[ray.ObjectRef, Attempt] = {}
        self.restarts = 0
        self.lost: list[str] = []  # the actors that died: id, node, pid, why
        self.replacement_waits: list[float] = []  # seconds each placed replacement waited for its place
        self.first_nodes: set[str] = set()  # nodes the first actors were placed on
        self.ready_at: float | None = None  # perf_counter() once every first actor had loaded its model
        self._none_alive_since: float | None = time.perf_counter()  # None while an actor is alive
        self._start_failures = 0  # actors in a row that died before being placed
        self._start_error = ""
        for _ in range(size):
            self._ask(replacement=False)

    def _ask(self, replacement: bool) -> None:
        actor = self._cls.remote(*self._args)
        placed, loaded = actor.where.remote(), actor.load.remote()
        self.members.append(Member(actor, placed, loaded, time.perf_counter(), replacement))

    @property
    def alive(self) -> int:
        """Actors placed and not lost."""
        return sum(1 for m in self.members if m.where is not None)

    def waiting(self) -> list[float]:
        """Seconds each actor not yet placed has waited for a place so far."""
        now = time.perf_counter()
        return [now - m.asked for m in self.members if m.where is None]

    def feed(self, todo) -> None:
        """Send shards from the deque `todo` to the placed actors until each holds its share."""
        for m in (m for m in self.members if m.where is not None):
            held = sum(1 for a in self.inflight.values() if a.actor is m.actor)
            for _ in range(SHARDS_IN_FLIGHT_PER_ACTOR - held):
                if not todo:
                    return
                url = todo.popleft()
                ref = m.actor.process.remote(url, self.output)
                self.inflight[ref] = Attempt(ref, m.actor, url)

    def finished(self, timeout: float = 1.0) -> Iterator[Attempt]:
        """Attempts that completed (or failed) within `timeout`, removed from the in-flight set; actors
        placed or loaded meanwhile are taken into the pool on the way."""
        events = {m.placed_ref if m.where is None else m.loaded_ref: m for m in self.members if not m.loaded}
        refs = [*self.inflight, *events]
        if not refs:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in ready:
            if ref in events:
                self._event(events[ref])
            elif ref in self.inflight:  # not if its actor was declared lost by an attempt before it
                yield self.inflight.pop(ref)

    def _event(self, m: Member) -> None:
        """`m` was placed, or loaded its model; or it died before either."""
        try:
            answer = ray.get(m.placed_ref if m.where is None else m.loaded_ref)
        except RayError as e:
            if m.where is None or isinstance(e, RayActorError):  # it died
                m.loaded = True  # watched no longer: the shards it holds report its death, or lose() now
                if not any(a.actor is m.actor for a in self.inflight.values()):
                    self.lose(m.actor, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
                return
            answer = None  # its model failed to load: each shard sent raises the error, to be retried
        if m.where is None:
            m.where, self._start_failures = answer, 0
            if m.replacement:
                self.replacement_waits.append(time.perf_counter() - m.asked)
            else:
                self.first_nodes.add(answer["node_id"])
            return
        m.loaded = True
        if self.ready_at is None and all(m.loaded for m in self.members if not m.replacement):
            self.ready_at = time.perf_counter()

    def lose(self, actor: ray.actor.ActorHandle, why: str) -> list[str]:
        """`actor` died: ask for a replacement (without waiting for it) and return the shards it still
        held, out of the in-flight set; nothing if it was already declared lost."""
        m = next((m for m in self.members if m.actor is actor), None)
        if m is None:
            return []
        self.members.remove(m)
        ray.kill(actor, no_restart=True)
        self.lost.append(f"{describe(actor, m.where)}: {why}")
        if m.where is None:
            self._start_failures += 1
            self._start_error = why
        if self._start_failures < START_FAILURES:
            self._ask(replacement=True)
            self.restarts += 1
        held = [ref for ref, a in self.inflight.items() if a.actor is actor]
        return [self.inflight.pop(ref).url for ref in held]

    def stalled(self, wait: float) -> str | None:
        """Why the run cannot go on (no actor alive, and none placed within `wait` seconds, or none can
        start at all); None while an actor is alive or may still be placed in time. An actor granted its
        resources and starting counts as alive: the wait is for room on the cluster, not for a start."""
        if self.alive or any(_starting(m.actor) for m in self.members):
            self._none_alive_since = None
            return None
        if self._none_alive_since is None:
            self._none_alive_since = time.perf_counter()
        if not self.members:
            return f"tokenizer actors die before they start ({self._start_error})"
        waited = time.perf_counter() - self._none_alive_since
        return self.no_room(waited, wait) if waited >= wait else None

    def no_room(self, waited: float, wait: float) -> str:
        """`no tokenizer actor alive and none placed in N s (--actor-wait S s): each asks for ...; the
        cluster has ...`."""
        total, free = ray.cluster_resources(), ray.available_resources()
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        asked = ", ".join(f"{k} {v:g}" for k, v in self.request.items())
        has = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in self.request)
        return (
            f"no tokenizer actor alive and none placed in {waited:.0f} s (--actor-wait {wait:g} s): "
            f"each asks for {asked}; the cluster has {has} on {nodes} live node(s)"
        )

    def images(self) -> int:
        return ray.get(self.counter.value.remote())

    def close(self) -> None:
        for a in [*(m.actor for m in self.members), self.counter]:
            ray.kill(a, no_restart=True)


def _starting(actor: ray.actor.ActorHandle) -> bool:
    """Whether Ray has granted `actor` its resources and a worker process, which has not yet answered
    (starting a worker and importing torch can take many seconds). Read from the GCS actor table through
    Ray's internal `ray._private.state` (public state API needs the dashboard, which a cluster may not
    run): without it, only an answering actor counts as placed."""
    try:
        from ray._private import state

        entry = state.actors(actor._actor_id.hex())
        return entry["State"] != "DEAD" and bool(entry["Address"]["Port"])
    except (ImportError, AttributeError, KeyError, TypeError, RayError):
        return False


def describe(actor: ray.actor.ActorHandle, where: dict | None) -> str:
    """`actor <id> on node <id> (<ip>), pid <pid>`, as far as the actor told before it died."""
    name = f"actor {actor._actor_id.hex()[:16]}"
    if where is None:
        return f"{name} (node unknown: it died before it was placed)"
    return f"{name} on node {where['node_id'][:16]} ({where['node_ip']}), pid {where['pid']}"
