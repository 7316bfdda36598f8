"""`ray start` processes for tests that need a cluster of separate processes: started in the foreground
(--block), and stopped with exactly what they started (their process trees, and whatever names the test's private
temp directory), never other Ray processes on the machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
