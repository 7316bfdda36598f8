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
        time.sleep(2)
        if not root.exists():
            return


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
    """quick.yaml, shrunk for a test (fewer trials and epochs), with any top-level key replaced."""
    doc = yaml.safe_load((SPACES / "quick.yaml").read_text())
    doc.update(name=name, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def need(path: Path) -> Path:
    """Skip (with the reason) when the shared data that a test reads is absent."""
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared folder beside the repo)")
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
