"""Losing a worker node mid-search, on a real cluster: a ray.cluster_utils.Cluster on this machine (a head with no
CPU and the driver resource, two 1-CPU worker nodes). One node is removed while its trial trains, a replacement is
added (as an autoscaler would), and the search ends with every trial complete. A module of its own so that no
other cluster runs beside this one (test_cluster_multinode's is stopped by then)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SPACES
from ray_procs import local_cluster

QUICK = SPACES / "quick.yaml"
SEARCH_TIMEOUT = 540  # seconds for one small search; the machine is shared and may be busy
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
