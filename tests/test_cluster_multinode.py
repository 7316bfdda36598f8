"""Trials on a real three-node cluster: resource planning, logical GPUs, where drivers and workers run.

The cluster is a ray.cluster_utils.Cluster on this machine: a head with no CPU and the driver resource (like the
head of cluster/*.yaml), a 1-CPU worker node, and a 1-CPU worker node declaring 2 logical GPUs. Searches run as
`python -m distributed tune --address ...` subprocesses, so the pytest process never connects a driver (another
test may hold an in-process Ray). Where actors ran comes from Ray's state API, which keeps dead actors too.
The node-loss test gets a cluster of its own, since it removes a node and adds another.
"""
from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SPACES, free_port, remove

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



def use_token_auth() -> None:
    """Ray reads RAY_AUTH_MODE once, when imported; ray.init() reads it again, and creates ~/.ray/auth_token if
    there is none, when it starts a local cluster. Cluster() does neither, so do what ray.init() does, or the
    pytest process could not talk to the token-protected GCS it starts."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        Config.initialize("")
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


@contextlib.contextmanager
def local_cluster(*workers: dict):
    """A head (no CPU, the driver resource) plus one worker node per dict of Cluster.add_node() arguments, in a
    private temp directory; yields (cluster, worker nodes, root) and removes everything afterwards."""
    from ray.cluster_utils import Cluster

    # Short and private: Ray's socket paths live under it (a Unix socket path is limited to 107 bytes), and
    # Cluster() writes "the local cluster" address file there, not into /tmp/ray that other Ray users here share.
    root = Path(tempfile.mkdtemp(prefix="emotune-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", str(root))
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        # Ray Train gives a worker group 60 s to start; a worker importing torch on a busy 2-core box can take longer.
        env.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
        env.delenv("RAY_ADDRESS", raising=False)
        use_token_auth()
        # Every port is picked here: Ray's defaults (8265, 52365) may belong to another cluster on this machine.
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, resources={DRIVER_RESOURCE: DRIVER_SLOTS}, include_dashboard=True,
            dashboard_host="127.0.0.1", dashboard_port=free_port(), dashboard_agent_listen_port=free_port()))
        try:
            yield cluster, [cluster.add_node(**args) for args in workers], root
        finally:
            cluster.shutdown()
            remove(root)


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


# -- losing a worker node mid-search -----------------------------------------------------------------------------

LOSS_EPOCHS = 6  # long enough that a trial seen at its first epochs is still training when its node goes


def reported(exp: Path) -> dict[str, list[dict]]:
    """{trial directory name: the epoch rows Tune has written to its result.json so far} (a line still being
    written is skipped)."""
    out = {}
    for path in exp.glob("*/result.json"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        out[path.parent.name] = [r for r in rows if "epoch" in r]
    return out


@pytest.fixture
def two_worker_cluster():
    """A cluster of its own (the test removes and adds nodes): the head and two 1-CPU worker nodes."""
    with local_cluster(dict(num_cpus=1), dict(num_cpus=1)) as made:
        yield made


@pytest.mark.slow
def test_a_search_survives_losing_a_worker_node_mid_trial(two_worker_cluster, tmp_path):
    cluster, workers, root = two_worker_cluster
    doc = yaml.safe_load(QUICK.read_text())
    # Two trials, both at once (one per worker node, so the victim's node is always a worker node); no ASHA:
    # every trial has to run all its epochs. Every image: trials of ~15 s end before Tune's trial files reach the
    # storage path, where this test watches for the victim.
    doc.update(num_samples=2, scheduler="none", final={"top_k": 0})
    doc["fixed"].update(epochs=LOSS_EPOCHS, train_limit=0)
    space = tmp_path / "quick.yaml"
    space.write_text(yaml.safe_dump(doc, sort_keys=False))
    storage = root / "results-node-loss"
    exp = storage / "quick"
    log = tmp_path / "search.log"
    start = time.monotonic()
    with open(log, "w") as out:
        search = subprocess.Popen([sys.executable, "-m", "distributed", "tune", str(space), "--address",
                                   cluster.address, "--storage-path", str(storage)],
                                  cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait for a trial that has finished an epoch (so it has a checkpoint) and has epochs left; `node` in its
        # rows is where its worker (rank 0) runs.
        victim = None
        while victim is None and search.poll() is None and time.monotonic() - start < SEARCH_TIMEOUT:
            time.sleep(0.5)
            running = [(rows[-1]["epoch"], tid, rows[-1]["node"]) for tid, rows in reported(exp).items()
                       if rows and rows[-1]["epoch"] < LOSS_EPOCHS - 1 and not rows[-1].get("diverged")]
            victim = min(running, default=None)
        assert victim, f"no trial reported an epoch in time\n{log.read_text()[-6000:]}"
        seen_epoch, trial, lost = victim
        node = next(n for n in workers if n.node_id == lost)
        removed_at, removed_wall = time.monotonic(), time.time()
        cluster.remove_node(node)  # kills the node's raylet, and with it every worker process on it
        removed_s = time.monotonic() - removed_at
        cluster.add_node(num_cpus=1)  # a replacement, as an autoscaler would bring: capacity comes back
        search.wait(timeout=max(60.0, 2 * SEARCH_TIMEOUT - (time.monotonic() - start)))
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    elapsed = time.monotonic() - start
    output = log.read_text()
    assert search.returncode == 0, output[-6000:]

    with open(exp / "leaderboard.csv", newline="") as f:
        board = list(csv.DictReader(f))
    # Every trial ran to its end and none is marked errored: exactly num_samples distinct trials, all complete.
    assert len({row["trial_id"] for row in board}) == len(board) == 2, output[-6000:]
    assert {(row["status"], row["epochs_run"]) for row in board} == {("completed", str(LOSS_EPOCHS))}, board

    rows = reported(exp)
    # Tune saw each epoch once: Ray Train records an epoch's checkpoint before Tune hears of the epoch, so a restart
    # never repeats an epoch Tune already has.
    epochs = {tid: [r["epoch"] for r in trial_rows] for tid, trial_rows in rows.items()}
    assert len(epochs) == 2 and all(e == list(range(1, LOSS_EPOCHS + 1)) for e in epochs.values()), epochs
    # The trial whose worker was on the lost node went on elsewhere, in the same Tune trial (Ray Train restarted
    # its worker group; Tune saw no failure), from the checkpoint of an epoch it had finished before the loss.
    history = rows[trial]
    assert history[seen_epoch - 1]["node"] == lost
    resumed = [r for r in history if r.get("run_start_epoch", 1) > 1]
    assert resumed, f"trial {trial} never restarted after losing node {lost}: {history}"
    first = resumed[0]
    assert first["run_start_epoch"] == first["epoch"] > seen_epoch, history
    assert all(r["node"] != lost for r in resumed), history
    assert not list(exp.glob("*/error.txt")), "a trial failed at the Tune level"  # Tune writes one per failure
    print(f"node loss: trial {trial} lost its worker after epoch {seen_epoch}, resumed at epoch "
          f"{first['run_start_epoch']} {first['timestamp'] - removed_wall:.0f} s after the loss; remove_node "
          f"{removed_s:.0f} s, search {elapsed:.0f} s")
