"""Run a command and account for the CPU seconds of its whole process tree (Ray's gcs_server, raylet, dashboard,
trial and worker processes are all descendants of the `emotune` process that started Ray), read from /proc.

Used by bench/overhead.py and by bench.common.emotune (every `emotune` a bench runs): on a 2-core machine every
CPU second a Ray system process spends is a second the trials do not get, so it belongs in the overhead figures.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces: split after the last ')'
    comm = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    ppid, utime, stime = int(rest[1]), int(rest[11]), int(rest[12])
    return ppid, comm, (utime + stime) / TICK


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def kind(comm: str, cmdline: str, root: int, pid: int) -> str:
    """Which bucket a process's CPU time goes to."""
    if pid == root:
        return "driver"
    if "ImplicitFunc" in cmdline or "ImplicitFunc" in comm or "RayTrainWorker" in cmdline or "TrainWorker" in comm:
        return "trial"  # the trial process (in-process trials) or the Ray Train worker (worker-group mode)
    return "ray_system"  # gcs_server, raylet, dashboard, agents, idle workers, Train controller, ...


class TreeCpu:
    """Samples the CPU time of every descendant of `root` every `every` seconds (a process's last sample counts;
    up to `every` seconds of a short-lived process can be missed)."""

    def __init__(self, root: int, every: float = 0.5):
        self.root, self.every = root, every
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        children: dict[int, list[int]] = {}
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                s = _stat(entry)
                if s:
                    stats[int(entry)] = s
                    children.setdefault(s[0], []).append(int(entry))
        todo, tree = [self.root], []
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        for pid in tree:
            if pid in stats:
                _, comm, cpu = stats[pid]
                old = self.seen.get(pid)
                label = old[0] if old and old[0] != "ray_system" else kind(comm, _cmdline(str(pid)), self.root, pid)
                self.seen[pid] = (label, cpu)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def start(self) -> "TreeCpu":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        out = {"driver": 0.0, "trial": 0.0, "ray_system": 0.0}
        for label, cpu in self.seen.values():
            out[label] += cpu
        return out


def run(cmd: list[str], log: Path, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run cmd (stdout+stderr to `log`); -> {"wall_s", "rc", "cpu": {driver, trial, ray_system}}."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        meter = TreeCpu(proc.pid).start()
        rc = proc.wait()
        wall = time.perf_counter() - tic
        cpu = meter.stop()
    return {"wall_s": wall, "rc": rc, "cpu": cpu}


def code_version() -> str:
    """The commit, plus a hash of distributed/*.py: the package may differ from the commit (uncommitted edits)."""
    import hashlib

    from distributed.results import git_commit

    repo = Path(__file__).resolve().parents[1]
    commit = git_commit()
    digest = hashlib.sha256()
    for f in sorted((repo / "distributed").glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"git {commit}, distributed/*.py sha256 {digest.hexdigest()[:12]}"
