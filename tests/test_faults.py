"""Faults with real processes and real signals: a training worker SIGKILLed mid-run loses at most one epoch."""
from __future__ import annotations

import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from distributed.config import Scaling, TrainConfig
from distributed.modelfile import STATE_FORMAT, load_file
from distributed.run import train_run


def train_worker_pids() -> list[int]:
    """Ray Train workers of the Ray instance this process started (they descend from it; other Ray instances on
    the machine do not). Ray titles worker processes `ray::<actor class>...`."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and " ".join(p.cmdline()).startswith("ray::RayTrainWorker")]


@pytest.mark.slow
def test_killed_train_worker_resumes_from_its_last_epoch(ray_local, tmp_path):
    cfg = TrainConfig(model="small_cnn", epochs=4, seed=3, train_limit=700)
    out = tmp_path / "run"
    result, errors = {}, []

    def run():
        try:
            result.update(train_run(cfg, str(out), Scaling(workers=2), max_failures=2))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    # A checkpoint counts once every rank has reported its epoch, which is after its file is written: a file of
    # epoch 2 means epoch 1 was registered. Kill then; the run resumes after the newest registered epoch.
    deadline = time.time() + 400
    while time.time() < deadline and checkpointed_epoch(out) < 2:
        time.sleep(0.2)
    done_at_kill = checkpointed_epoch(out)
    assert done_at_kill >= 2, "no epoch finished in time"
    pids = train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors

    history = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    restarts = [h for h in history if h["run_start_epoch"] > 1]
    assert restarts, "the worker group never restarted"
    # It resumed after the newest registered epoch: at most the epoch in flight when the worker died is redone.
    assert restarts[0]["run_start_epoch"] in (done_at_kill, done_at_kill + 1), (done_at_kill, restarts[0])
    assert (out / "best_model.pt").exists() and result["epochs_run"] == 4


def checkpointed_epoch(out) -> int:
    """Newest epoch whose checkpoint file is in the run's storage (0 if none); tolerates a file being written."""
    epochs = [0]
    for path in out.glob("run/checkpoint_*/state.pt"):
        try:
            epochs.append(load_file(path, STATE_FORMAT)["epoch"])
        except Exception:  # still being copied in
            pass
    return max(epochs)
