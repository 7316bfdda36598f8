"""How many trials of a search run at once, from what the cluster holds (pure logic: no Ray needed to test it)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from distributed.config import DRIVER_RESOURCE
from distributed.search_space import SearchSpace, SpaceError

EPS = 1e-9


@dataclass
class Plan:
    concurrent: int          # trials that run at once
    in_process: bool         # one-worker trials run the loop in the trial process, without a worker group
    trial_resources: dict    # what the trial's own process holds
    driver_pinned: bool      # trial drivers only run where the driver resource is


def plan_trials(space: SearchSpace, nodes: list[dict]) -> Plan:
    """How many trials fit at once, from each node's resources and one trial's needs (its driver plus its worker
    group), so no trial waits forever for a worker group. Workers are placed bundle by bundle, so count how many
    worker bundles each node holds; logical GPUs (declared on CPU nodes) count exactly like real ones."""
    s = space.scaling
    need = f"{s.cpus_per_worker:g} CPU" + (f" and {s.gpus_per_worker:g} GPU" if s.gpus_per_worker else "")

    def slots(node: dict) -> int:
        limits = [math.floor(node.get("CPU", 0) / s.cpus_per_worker + EPS) if s.cpus_per_worker else 10**6]
        if s.gpus_per_worker:
            limits.append(math.floor(node.get("GPU", 0) / s.gpus_per_worker + EPS))
        return min(limits)

    per_node = [slots(n) for n in nodes]
    if not any(per_node):
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise SpaceError(f"{space.path}: scaling: one worker needs {need}, but no node has that much (largest: "
                         f"{biggest.get('CPU', 0):g} CPU, {biggest.get('GPU', 0):g} GPU); lower cpus_per_worker/"
                         f"gpus_per_worker or add bigger nodes")
    concurrent = sum(per_node) // s.workers
    if concurrent < 1:
        raise SpaceError(f"{space.path}: scaling: a trial needs {s.workers} workers of {need}, but the cluster holds "
                         f"only {sum(per_node)}; lower workers or add nodes")
    in_process = space.worker_group == "never" or (space.worker_group == "auto" and s.workers == 1 and len(nodes) == 1)
    pinned = any(n.get(DRIVER_RESOURCE, 0) > 0 for n in nodes)
    if in_process:
        resources = s.worker_resources()
    else:
        resources = {"CPU": 0}
        if pinned:
            resources[DRIVER_RESOURCE] = 0.001
    return Plan(min(concurrent, space.num_samples), in_process, resources, pinned)


def local_nodes() -> list[dict]:
    """This machine as Ray would see it, known before Ray starts (so a request that can't fit exits 2 early)."""
    import torch

    return [{"CPU": float(local_cpus()), "GPU": float(torch.cuda.device_count()), DRIVER_RESOURCE: 1000}]


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


