"""Clusters for tests: `ray start` processes where a test needs a cluster of separate processes (started in the
foreground, --block, and stopped with exactly what they started: their process trees, and whatever names the test's
private temp directory, never other Ray processes on the machine), and ray.cluster_utils.Cluster nodes where it
needs several nodes in this process's care (`local_cluster`)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, remove

from distributed.config import DRIVER_RESOURCE, DRIVER_SLOTS

BIN = Path(sys.executable).parent  # the virtualenv's bin: `ray`, and the `python` a job's entrypoint runs


def start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`ray start --block ARGS`, returned once the node is up. --block keeps the process (our handle on the node)
    in the foreground; SIGTERM to it stops the node's processes."""
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc], None)
            pytest.fail(f"ray start {' '.join(args)} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def wait_for_dashboard(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): it is up
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard at {url} did not come up in {timeout:.0f}s")
            time.sleep(1)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on this machine, from /proc (none without /proc: then
    the `ray start` processes alone clean up)."""
    found = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found[int(d.name)] = (ppid, (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError, ValueError):
                pass  # it ended while we looked
    return found


def stop(procs: list[subprocess.Popen], root: Path | None) -> None:
    """Stop what we started and nothing else: our `ray start` processes (each stops its node), then whatever is left
    of their process trees, or names our private temp directory (Ray workers and job drivers that outlived their
    parents). A pid is only signalled while its command line is still the one we saw."""
    before = processes()
    ours = {p.pid for p in procs}
    while True:  # everything below our `ray start` processes, by parent links
        more = {pid for pid, (ppid, _) in before.items() if ppid in ours} - ours
        if not more:
            break
        ours |= more
    try:
        for proc in reversed(procs):  # worker nodes first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        now = processes()
        left = {pid for pid in ours if pid in now and now[pid][1] == before.get(pid, (0, None))[1]}
        if root is not None:
            left |= {pid for pid, (_, cmd) in now.items() if str(root) in cmd and pid != os.getpid()}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 20
            while left and time.monotonic() < deadline:
                time.sleep(0.5)
                left = {pid for pid in left if Path(f"/proc/{pid}").exists() and not zombie(pid)}
            if not left:
                break


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# -- a ray.cluster_utils.Cluster: several nodes in this process's care ---------------------------------------

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
