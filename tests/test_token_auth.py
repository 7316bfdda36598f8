"""Token auth is ON in the local Ray that emotune starts (run.ray_session), not merely not disabled.

Each check runs in a fresh Python process: RAY_AUTH_MODE is read when Ray starts, and the pytest process may hold
an in-process Ray of its own.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, remove

# Inside the session: the auth mode Ray runs with, and what its dashboard answers a request without a token.
PROBE = """
import urllib.error, urllib.request
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from distributed.run import ray_session

with ray_session(num_cpus=1):
    url = ray._private.worker.global_worker.node.webui_url
    try:
        status = urllib.request.urlopen(f"http://{url}/api/version", timeout=30).status
    except urllib.error.HTTPError as exc:
        status = exc.code
    print("mode", get_authentication_mode() == AuthenticationMode.TOKEN, "status", status)
"""


def probe(env_mode: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=str(tmp_path), HOME=str(tmp_path))  # a home of its own: Ray writes ~/.ray/auth_token
    if env_mode is not None:
        env["RAY_AUTH_MODE"] = env_mode
    return subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture
def short_tmp():
    """A short private directory: Ray's socket paths live under RAY_TMPDIR (a Unix socket path is limited to
    107 bytes, which pytest's tmp_path can exceed)."""
    root = Path(tempfile.mkdtemp(prefix="emotune-", dir="/tmp"))
    yield root
    remove(root)


@pytest.mark.slow
def test_the_local_ray_runs_with_token_auth_on(short_tmp):
    r = probe(None, short_tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    # Token mode, and the dashboard refuses a request that carries no token (401).
    assert r.stdout.strip().splitlines()[-1] == "mode True status 401", r.stdout
    assert (short_tmp / ".ray" / "auth_token").is_file()  # the token Ray made for this user


def test_a_shell_that_disables_token_auth_is_refused_before_ray_starts(tmp_path):
    r = probe("disabled", tmp_path)
    assert r.returncode != 0
    assert "RAY_AUTH_MODE=disabled: emotune starts its local Ray with token auth on; unset RAY_AUTH_MODE" in r.stderr
    assert not (tmp_path / ".ray").exists() and not any(tmp_path.glob("ray/session_*"))  # no Ray started

    # `emotune tune` says so in one line, exit 2, before it writes anything (checked with the space and the data)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=str(tmp_path), HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    r = subprocess.run([sys.executable, "-m", "distributed", "tune", "--storage-path", str(tmp_path / "results")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == ["emotune: error: RAY_AUTH_MODE=disabled: emotune starts its local Ray "
                                             "with token auth on; unset RAY_AUTH_MODE (or set it to token)"], r.stderr
    assert not any((tmp_path / "results").rglob("*")), list((tmp_path / "results").rglob("*"))
    assert not any(tmp_path.glob("ray/session_*"))
