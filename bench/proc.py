"""Run a command and account for the CPU seconds of its whole process tree (Ray's gcs_server, raylet, dashboard,
trial and worker processes are all descendants of the `emotune` process that started Ray), sampled with psutil.

Used by bench/overhead.py and by bench.common.emotune (every `emotune` a bench runs): on a 2-core machine every
CPU second a Ray system process spends is a second the trials do not get, so it belongs in the overhead figures.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil


def kind(name: str, cmdline: str, root: bool) -> str:
    """Which bucket a process's CPU time goes to."""
    if root:
        return "driver"
    if any(tag in text for tag in ("ImplicitFunc", "TrainWorker") for text in (name, cmdline)):
        return "trial"  # the trial process (in-process trials) or the Ray Train worker (worker-group mode)
    return "ray_system"  # gcs_server, raylet, dashboard, agents, idle workers, Train controller, ...


class TreeCpu:
    """Samples the CPU time (user + system) of `root` and every descendant every `every` seconds (a process's last
    sample counts; up to `every` seconds of a short-lived process can be missed). Ray renames its workers after
    they start (ray::IDLE -> ray::ImplicitFunc), so a process is labelled again until it reads as a trial."""

    def __init__(self, root: psutil.Process, every: float = 0.5):
        self.root, self.every = root, every
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in tree:
            try:
                with p.oneshot():
                    cpu = p.cpu_times()
                    old = self.seen.get(p.pid)
                    label = old[0] if old and old[0] != "ray_system" else \
                        kind(p.name(), " ".join(p.cmdline())[:200], p.pid == self.root.pid)
            except psutil.Error:  # gone between the listing and the read
                continue
            self.seen[p.pid] = (label, cpu.user + cpu.system)

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
        proc = psutil.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        meter = TreeCpu(proc).start()
        rc = proc.wait()
        wall = time.perf_counter() - tic
        cpu = meter.stop()
    return {"wall_s": wall, "rc": rc, "cpu": cpu}
