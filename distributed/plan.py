"""How many trials of a search run at once, from what the cluster holds and what its autoscaler may launch (pure
logic: no Ray needed to test it), and the watch that says so while a search waits for nodes."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

from distributed.cluster.common import NodeType
from distributed.config import DRIVER_RESOURCE, ConfigError, Scaling
from distributed.search_space import SearchSpace, SpaceError

EPS = 1e-9


@dataclass
class Plan:
    concurrent: int          # trials that run at once
    in_process: bool         # one-worker trials run the loop in the trial process, without a worker group
    trial_resources: dict    # what the trial's own process holds
    driver_pinned: bool      # trial drivers only run where the driver resource is
    launched: list = field(default_factory=list)  # node types counted in `concurrent` beyond the nodes up now
    waits: bool = False      # no node up holds a trial and nothing names the node types: one at a time, waiting


def worker_slots(space: SearchSpace, resources: dict) -> int:
    """How many of one trial's worker bundles a node of these resources holds. Logical GPUs (declared on CPU
    nodes) count exactly like real ones."""
    s = space.scaling
    limits = [math.floor(resources.get("CPU", 0) / s.cpus_per_worker + EPS) if s.cpus_per_worker else 10**6]
    if s.gpus_per_worker:
        limits.append(math.floor(resources.get("GPU", 0) / s.gpus_per_worker + EPS))
    return min(limits)


def is_of_type(node: dict, node_type: NodeType) -> bool:
    """A node that is up counts as one of this type when it offers the type's CPUs and GPUs (Ray's node list does
    not name the type for every provider) and is not the head (the only node with the driver resource)."""
    return not node.get(DRIVER_RESOURCE) and all(
        abs(node.get(k, 0) - node_type.resources.get(k, 0)) < EPS for k in ("CPU", "GPU"))


def launchable(nodes: list[dict], node_types: list[NodeType]) -> list[tuple[NodeType, int]]:
    """(node type, how many more of it the autoscaler may launch), given the nodes up now."""
    return [(t, max(0, t.max_workers - sum(is_of_type(n, t) for n in nodes))) for t in node_types]


def worker_need(space: SearchSpace) -> str:
    """What one worker asks for: "1 CPU and 1 GPU"."""
    s = space.scaling
    return f"{s.cpus_per_worker:g} CPU" + (f" and {s.gpus_per_worker:g} GPU" if s.gpus_per_worker else "")


def plan_trials(space: SearchSpace, nodes: list[dict], node_types: list[NodeType] | None = ()) -> Plan:
    """How many trials fit at once on the nodes up now plus the nodes the autoscaler may still launch, from one
    trial's needs (its driver plus its worker group), so no trial waits forever for a worker group. Workers are
    placed bundle by bundle, so count how many worker bundles each node holds.

    node_types None: an autoscaler may launch nodes, but nothing names their types (a cluster joined without a
    cluster config). Where no node up holds a trial, that is no reason to refuse: one trial at a time then waits
    for a node (NodeWait), as with known node types."""
    s = space.scaling
    need = worker_need(space)
    more = [(t, count) for t, count in launchable(nodes, node_types or []) if count and worker_slots(space, t.resources)]
    per_node = [worker_slots(space, n) for n in nodes] + [worker_slots(space, t.resources)
                                                          for t, count in more for _ in range(count)]
    waits = node_types is None and sum(per_node) < s.workers
    if not any(per_node) and not waits:
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        largest = f"largest: {biggest.get('CPU', 0):g} CPU" + (f", {biggest['GPU']:g} GPU" if "GPU" in biggest else "")
        if node_types:
            top = max(node_types, key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))
            largest = (f"largest node type: {top.name} with {top.resources.get('CPU', 0):g} CPU, "
                       f"{top.resources.get('GPU', 0):g} GPU")
        raise SpaceError(f"{space.path}: scaling: one worker needs {need}, but no node "
                         f"{'or node type ' if node_types else ''}has that much ({largest}); lower cpus_per_worker/"
                         f"gpus_per_worker or add bigger nodes")
    concurrent = max(sum(per_node) // s.workers, int(waits))
    if concurrent < 1:
        raise SpaceError(f"{space.path}: scaling: a trial needs {s.workers} workers of {need}, but the cluster holds "
                         f"only {sum(per_node)}; lower workers or add nodes")
    one_machine = len(nodes) == 1 and not more and not waits
    in_process = space.worker_group == "never" or (space.worker_group == "auto" and s.workers == 1 and one_machine)
    pinned = any(n.get(DRIVER_RESOURCE, 0) > 0 for n in nodes)
    if in_process:
        resources = s.worker_resources()
    else:
        resources = {"CPU": 0}
        if pinned:
            resources[DRIVER_RESOURCE] = 0.001
    return Plan(min(concurrent, space.num_samples), in_process, resources, pinned, [t for t, _ in more], waits)


def local_nodes(count_gpus: bool = True) -> list[dict]:
    """This machine as Ray would see it, known before Ray starts (so a request that can't fit exits 2 early).
    count_gpus False: a request without GPUs, which no GPU count changes, is planned without importing torch."""
    node = {"CPU": float(local_cpus()), DRIVER_RESOURCE: 1000}
    if count_gpus:
        import torch

        node["GPU"] = float(torch.cuda.device_count())
    return [node]


def local_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2) quota as in containers. os.cpu_count()
    counts the host's CPUs, which would plan more than a container may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def cluster_nodes() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


class NodeWait:
    """While no node that is up could hold one trial's worker group, the search waits for the autoscaler: say so
    about every `every_s` seconds ("waiting for 1 GPU node (type gpu_1x): 0 of 2 up, 3 min") and give up after
    `timeout_s`. check() is called often (each step of Tune's loop); it looks at the cluster every few seconds."""

    def __init__(self, space: SearchSpace, node_types: list[NodeType], timeout_s: float, nodes=cluster_nodes,
                 clock=time.monotonic, every_s: float = 30, look_s: float = 3):
        self.space, self.node_types, self.timeout_s = space, node_types, timeout_s
        # (Tune pickles its stopper with the experiment: everything here is plain data or a module-level function.)
        self.nodes, self.clock, self.every_s, self.look_s = nodes, clock, every_s, look_s
        self.since = self.said = self.looked = None
        self.gave_up: str | None = None  # the message, once it has given up

    def check(self) -> bool:
        """True once it has waited longer than the timeout (the search should stop)."""
        now = self.clock()
        if self.gave_up or (self.looked is not None and now - self.looked < self.look_s):
            return bool(self.gave_up)
        self.looked = now
        nodes = self.nodes()
        if sum(worker_slots(self.space, n) for n in nodes) >= self.space.scaling.workers:
            self.since = self.said = None  # one trial fits on the nodes up: nothing to wait for
            return False
        self.since = now if self.since is None else self.since
        line = self.waiting_for(nodes, now - self.since)
        if self.said is None or now - self.said >= self.every_s:
            print(f"emotune: {line}", file=sys.stdout, flush=True)
            self.said = now
        if now - self.since > self.timeout_s:
            self.gave_up = (f"gave up {line}: the autoscaler launched none in time; see `ray status` and the "
                            f"autoscaler's log (monitor.log) on the head, or wait longer with --wait-timeout MINUTES")
        return bool(self.gave_up)

    def waiting_for(self, nodes: list[dict], waited_s: float) -> str:
        fitting = [t for t in self.node_types if worker_slots(self.space, t.resources)]
        if not fitting:
            return f"waiting for a node that holds one worker ({worker_need(self.space)}), {waited_s // 60:.0f} min"
        t = fitting[0]
        count = math.ceil(self.space.scaling.workers / worker_slots(self.space, t.resources))
        kind = "GPU" if t.resources.get("GPU") else "CPU"
        up = sum(is_of_type(n, t) for n in nodes)
        return (f"waiting for {count} {kind} node{'s' if count > 1 else ''} (type {t.name}): {up} of "
                f"{t.max_workers} up, {waited_s // 60:.0f} min")


# ------------------------------------------------------------------------------------------ emotune train

def train_flags(workers: str, cpus: float | None, gpus: float | None) -> tuple[int | None, float | None, float | None]:
    """--workers (a number or auto), --cpus-per-worker and --gpus-per-worker as given (None: not given, or auto),
    checked without importing torch."""
    count = None
    if workers != "auto":
        try:
            count = int(workers)
        except ValueError:
            raise ConfigError(f"--workers {workers!r}: expected a number or auto, e.g. --workers 2") from None
    if (count is not None and count < 1) or (cpus is not None and cpus < 0) or (gpus is not None and gpus < 0):
        raise ConfigError("--workers must be >= 1 and --cpus-per-worker/--gpus-per-worker >= 0; fix the flag")
    return count, cpus, gpus


def train_scaling(workers: str, cpus: float | None, gpus: float | None, address: str | None) -> Scaling:
    """A single-machine run uses the whole machine: one worker per GPU (or one on the CPUs), every CPU shared
    among the workers. On a cluster (address) the defaults stay small, since this machine is not the cluster."""
    count, cpus, gpus = train_flags(workers, cpus, gpus)
    if count is None or gpus is None:
        import torch

        gpus_here = torch.cuda.device_count() if not address else 0
        if count is None:
            count = max(1, gpus_here)
        if gpus is None:
            gpus = 1.0 if (torch.cuda.is_available() if address else gpus_here) else 0.0
    if cpus is None:
        cpus = 1.0 if address else float(max(1, local_cpus() // count))
    return Scaling(workers=count, cpus_per_worker=cpus, gpus_per_worker=gpus)
