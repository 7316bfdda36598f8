"""Trials on a real three-node cluster: resource planning, logical GPUs, where drivers and workers run.

The cluster is a ray.cluster_utils.Cluster on this machine: a head with no CPU and the driver resource (like the
head of cluster/*.yaml), a 1-CPU worker node, and a 1-CPU worker node declaring 2 logical GPUs. Searches run as
`python -m distributed tune --address ...` subprocesses, so the pytest process never connects a driver (another
test may hold an in-process Ray). Where actors ran comes from Ray's state API, which keeps dead actors too.
The node-loss test is in test_cluster_nodeloss.py, with a cluster of its own (it removes a node and adds another;
this module's cluster is stopped before it starts).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SPACES
from ray_procs import local_cluster

from distributed.config import DRIVER_RESOURCE, DRIVER_SLOTS
from distributed.plan import plan_trials
from distributed.search_space import load_space

QUICK = SPACES / "quick.yaml"
SEARCH_TIMEOUT = 540  # seconds for one small search; the machine is shared and may be busy

# The cluster below, as Ray reports real machines of the same shape (a GPU node with 2 physical GPUs).
HEAD = {DRIVER_RESOURCE: float(DRIVER_SLOTS)}
CPU_NODE = {"CPU": 1.0}
GPU_NODE = {"CPU": 1.0, "GPU": 2.0}


def space_with(tmp_path: Path, num_samples: int = 8, **scaling) -> Path:
    """quick.yaml with other scaling; written into tmp_path, the same name (quick) for every variant."""
    doc = yaml.safe_load(QUICK.read_text())
    doc["scaling"] = {**doc["scaling"], **scaling}
    doc["num_samples"] = num_samples
    doc["final"] = {"top_k": 0}  # the search only: these tests are about placement
    path = tmp_path / f"quick-{'-'.join(f'{k}{v}' for k, v in scaling.items()) or 'as-is'}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- a live three-node cluster -----------------------------------------------------------------------------------

@dataclass
class Nodes:
    address: str     # the GCS address: what `emotune tune --address` takes
    head: str        # node ids
    cpu: str
    gpu: str
    root: Path       # private temp directory: Ray's files and the results



@pytest.fixture(scope="module")
def nodes():
    # A 1-CPU node, and a 1-CPU node with 2 logical GPUs (this machine has none).
    with local_cluster(dict(num_cpus=1), dict(num_cpus=1, num_gpus=2)) as (cluster, (cpu, gpu), root):
        yield Nodes(cluster.address, cluster.head_node.node_id, cpu.node_id, gpu.node_id, root)


def python(args: list[str], timeout: float = SEARCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run Python in a fresh process (which inherits the fixture's RAY_* settings) in the repository."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_logical_gpus_plan_like_real_ones(nodes, tmp_path):
    code = ("import json, ray\nfrom distributed.plan import cluster_nodes\n"
            f"ray.init(address={nodes.address!r}, logging_level='ERROR')\nprint(json.dumps(cluster_nodes()))")
    r = python(["-c", code], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    live = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(n.get("GPU", 0) for n in live) == [0, 0, 2.0]
    for cpus, gpus in [(0.5, 1), (0.25, 0.5), (1, 0)]:
        space = load_space(space_with(tmp_path, cpus_per_worker=cpus, gpus_per_worker=gpus))
        assert plan_trials(space, live) == plan_trials(space, [HEAD, CPU_NODE, GPU_NODE])


@pytest.mark.slow
def test_search_spreads_trial_workers_over_nodes_and_keeps_drivers_on_the_head(nodes):
    from ray.util.state import list_actors

    storage = nodes.root / "results-search"
    # Two 1-CPU trials at once on two 1-CPU worker nodes: they must land one per node.
    r = python(["-m", "distributed", "tune", str(QUICK), "--address", nodes.address, "--num-samples", "2",
                "--set", "epochs=1", "--set", "train_limit=200", "--set", "final.top_k=0", "--storage-path", str(storage)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "2 at a time, 1-worker Ray Train trials" in r.stdout  # 2 worker nodes of 1 CPU, drivers need none
    with open(storage / "quick" / "leaderboard.csv", newline="") as f:
        statuses = [row["status"] for row in csv.DictReader(f)]
    # Every trial ran to its end (1 epoch); none errored or diverged (the space's first points are its recipes).
    assert statuses == ["completed", "completed"], (r.stdout + r.stderr)[-6000:]

    actors = list_actors(address=nodes.address, detail=True, limit=10_000, raise_on_missing_output=False)
    name = {nodes.head: "head", nodes.cpu: "cpu", nodes.gpu: "gpu"}
    seen = sorted(f"{a.class_name}@{name.get(a.node_id, a.node_id)}:{a.state}" for a in actors)

    # Each trial is one RayTrainWorker (workers: 1); they hold the CPUs, which only the worker nodes have: one each.
    workers = [a.node_id for a in actors if a.class_name == "RayTrainWorker"]
    assert sorted(workers) == sorted([nodes.cpu, nodes.gpu]), seen
    # Trial drivers are Tune's function-trainable actors; the driver resource keeps them on the head.
    drivers = [a.node_id for a in actors if a.class_name == "ImplicitFunc"]
    assert len(drivers) == 2 and set(drivers) == {nodes.head}, seen


@pytest.mark.slow
def test_a_trial_no_node_up_can_hold_waits_then_gives_up_after_wait_timeout(nodes, tmp_path):
    """Joining a cluster whose node types nothing names (no --cluster, no ~/ray_bootstrap_config.yaml, an empty GCS
    cluster config): an autoscaler may still bring a node, so a trial bigger than every node up is not refused; the
    search says so in one line, waits --wait-timeout minutes, and gives up with exit 2. (After the spread search:
    its pending trial's driver would count among that test's actors.)"""
    storage = nodes.root / "results-waited"
    r = python(["-m", "distributed", "tune", str(space_with(tmp_path, num_samples=1, gpus_per_worker=3)),
                "--address", nodes.address, "--storage-path", str(storage), "--wait-timeout", "0.1"], timeout=300)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "no cluster config names the node types" in r.stdout and "--cluster FILE names them" in r.stdout, r.stdout
    error = [line for line in r.stderr.splitlines() if line.startswith("emotune: error:")]
    assert len(error) == 1 and "gave up waiting" in error[0], r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


@pytest.mark.slow
def test_a_local_run_starts_its_own_ray_even_beside_a_running_cluster(nodes):
    # Ray's ray.init() joins "the local cluster" (the address file Cluster() wrote) unless told address="local";
    # joining would then refuse the driver resource that a local emotune instance declares.
    code = ("from distributed.run import ray_session\n"
            "with ray_session(num_cpus=1) as ray:\n    print(ray.get_runtime_context().gcs_address)")
    r = python(["-c", code], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] != nodes.address
