"""Shared fixtures. Tests use real Ray, real Optuna, real files; nothing here is mocked.

Ray instances are started by the fixtures that need them and stopped by the same fixtures (ray.shutdown() for
in-process instances; process handles for `ray start` clusters), so no test touches a Ray it did not start.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
SPACES = REPO / "search_spaces"

# Quiet, fast local Ray for tests; token auth stays at Ray's default (on for a new local cluster).
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove(root: Path) -> None:
    """Delete the temp directory; again after a moment if a Ray process that was exiting wrote into it meanwhile."""
    for _ in range(3):
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists():
            return
        time.sleep(2)


def crash_when(cmd: list[str], ready=None, timeout: float = 420, printed: str | None = None,
               env: dict | None = None) -> None:
    """Run cmd in its own process group and SIGKILL the whole group (the driver and every process it started: a
    real crash) as soon as ready() is true, or the command has printed `printed`; fails if neither happens within
    timeout seconds."""
    import signal
    import subprocess
    import tempfile

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def said(tail: int = 4000) -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-tail:]

    def is_ready() -> bool:
        return (printed is not None and printed in said(tail=10**7)) or (ready is not None and ready())

    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not is_ready():
            assert proc.poll() is None, f"exited ({proc.returncode}) before it was ready: {' '.join(cmd)}\n{said()}"
            time.sleep(0.2 if printed else 1)
        assert is_ready(), f"not ready within {timeout:.0f} s: {' '.join(cmd)}\n{said()}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def small_space(tmp_path: Path, name: str, **changes) -> Path:
    """quick.yaml, shrunk for a test (fewer trials and epochs), with any top-level key replaced; without its final
    stage unless `final` is given (tests/test_final_stage.py and the default search test it)."""
    doc = yaml.safe_load((SPACES / "quick.yaml").read_text())
    doc.update({"name": name, "final": {"top_k": 0}, **changes})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def need(path: Path) -> Path:
    """Skip (with the reason) when the shared data that a test reads is absent; in CI (CI=true) fail instead, so
    a missing ../shared can never turn CI green by skipping."""
    if not path.exists():
        message = f"needs {path} (the ../shared folder beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class Payload:
    """Pickled code: unpickling it creates the file `marker` (what a malicious .pt could do with os.system instead).
    Safe loading (weights_only=True) refuses it before anything runs, so the marker's absence is the check."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="session")
def ray_local():
    """One in-process local Ray instance (2 CPUs, the driver resource) for the tests that run real trials."""
    import ray

    from distributed.config import DRIVER_RESOURCE, DRIVER_SLOTS

    if ray.is_initialized():
        ray.shutdown()
    # The dashboard serves the State API that Ray Train V2 uses to clean up after a dead controller.
    ray.init(num_cpus=2, resources={DRIVER_RESOURCE: DRIVER_SLOTS}, include_dashboard=True,
             dashboard_host="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def tensorboard_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every scalar `tag` in the TensorBoard event files under logdir, read back with the event
    protobuf tensorboardX writes (TFRecord framing: length, its CRC, the record, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    found = []
    for file in sorted(Path(logdir).rglob("events.out.tfevents*")):
        data, at = file.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            found += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return found


@pytest.fixture(scope="session")
def two_arch_search(ray_local, tmp_path_factory) -> Path:
    """One small real search that several modules read (report, Pareto front, best per architecture, ensembles,
    the final stage): two trials, one per architecture, two objectives (so there is a Pareto front), 2 epochs on
    200 images; its final stage retrains both for 3 epochs on the same 200, then distils their ensemble into one
    more run of the best config. Tests that change its files work on a copy."""
    from distributed.cli import main

    tmp = tmp_path_factory.mktemp("two_arch")
    path = small_space(tmp, "two_arch", num_samples=2, scheduler="none",
                       objectives=[{"val_acc": "max"}, {"num_params": "min"}],
                       fixed={"epochs": 2, "train_limit": 200, "data": "synthetic"},
                       space={"model": {"choice": ["small_cnn", "emotion_cnn48"]},
                              "lr_head": {"loguniform": [1e-3, 1e-2]}},
                       points_to_evaluate=[{"model": "small_cnn"}, {"model": "emotion_cnn48"}],
                       final={"top_k": 2, "epochs": 3, "train_limit": 200, "distill": True})
    assert main(["tune", str(path), "--storage-path", str(tmp)]) == 0
    return tmp / "two_arch"
