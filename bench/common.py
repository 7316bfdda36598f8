"""Helpers shared by the benches: where results go, how a step records them, and `emotune` run in a subprocess.

Bench scripts run as modules of the `bench` package (`python -m bench.gpu ...`) from the repo root.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from bench import proc
from distributed.storage import write_atomic

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
SPACES = REPO / "bench" / "spaces"  # the benches' search spaces (users' spaces are in search_spaces/)
RESULTS = "results.json"


def out_dir(name: str, given: str | None = None, prefix: str = "") -> Path:
    """`given`, or results/bench/NAME/<prefix><time>: a fresh folder for one bench run's results and logs."""
    out = Path(given or REPO / "results" / "bench" / name / (prefix + datetime.now().strftime("%Y%m%d-%H%M%S")))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def shown(cmd: list[str]) -> str:
    """[python, -m, distributed, ...] as the user types it: emotune ..."""
    return " ".join(["emotune", *cmd[3:]] if cmd[1:3] == ["-m", "distributed"] else cmd)


def emotune(args: list[str], log: Path, echo: bool = False) -> dict:
    """`emotune ARGS` in a fresh process from the repository root, its output to `log`; -> proc.run's {"wall_s",
    "rc", "cpu"} (CPU seconds of its whole process tree). A failure ends the bench, naming the log."""
    cmd = [sys.executable, "-m", "distributed", *args]
    if echo:
        print(f"    $ {shown(cmd)}", flush=True)
    run = proc.run(cmd, log, env={**os.environ, "RAY_DEDUP_LOGS": "1"}, cwd=str(REPO))
    if run["rc"]:
        raise SystemExit(f"{shown(cmd)} failed (rc {run['rc']}); see {log}")
    return run


def tune(space: str | Path, storage: Path, log: Path, *args: str, echo: bool = False) -> tuple[dict, Path]:
    """`emotune tune SPACE --storage-path STORAGE ARGS` -> (the run as emotune() returns it, the experiment dir)."""
    run = emotune(["tune", str(space), "--storage-path", str(storage), *args], log, echo)
    found = [p for p in storage.iterdir() if (p / "emotune.json").is_file()]
    if len(found) != 1:
        raise SystemExit(f"{storage}: expected one experiment directory (with emotune.json), found {len(found)}; "
                         f"use a fresh --storage-path (see {log})")
    return run, found[0]


def leaderboard(exp: str | Path) -> list[dict]:
    """An experiment's leaderboard rows, best first, read as the package reads them (results.leaderboard_rows)."""
    from distributed.results import leaderboard_rows, read_meta, read_trials

    return leaderboard_rows(read_trials(str(exp)), read_meta(str(exp)))[0]


def trial_reports(exp: str | Path) -> list[list[dict]]:
    """Each trial's reports (epoch order) as results.read_trials reads them, trials in start order."""
    from distributed.results import read_trials

    trials = [t["rows"] for t in read_trials(str(exp)) if t["rows"]]
    return sorted(trials, key=lambda rows: rows[0]["timestamp"] - rows[0]["time_total_s"])


def read_results(out: str | Path) -> dict:
    path = Path(out) / RESULTS
    return json.loads(path.read_text()) if path.is_file() else {}


def record(out: str | Path, key: str, value) -> None:
    """Merge `value` under `key` into OUT/results.json, written through a rename so a kill never leaves half a
    file. Steps run one at a time, so read-modify-write is safe."""
    results = read_results(out)
    results[key] = value
    write_atomic(Path(out) / RESULTS, (json.dumps(results, indent=1, default=str) + "\n").encode())


def spread(values: list[float]) -> dict:
    """Median with min and max: the figure and how much it moved across repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def code_version() -> str:
    """The commit, plus a hash of distributed/*.py: the package may differ from the commit (uncommitted edits)."""
    import hashlib

    from distributed.results import git_commit

    digest = hashlib.sha256()
    for f in sorted((REPO / "distributed").glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"git {git_commit()}, distributed/*.py sha256 {digest.hexdigest()[:12]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deadline:
    """Seconds left until a fixed moment (time.monotonic)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def sync(device) -> None:
    """Wait for the work queued on `device`, so a timer read next counts it (CUDA runs asynchronously; on the CPU
    there is nothing to wait for)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def cpu_threads(n: int) -> None:
    """Cap torch's intra-op threads (concurrent processes would otherwise each take every core)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def mark(argv=None) -> None:
    """`python -m bench.common mark --out OUT --step NAME --rc N --wall-s S [--tail-file F]`: gpu_check.sh records
    each step's exit code and wall time (and, for pytest, the tail of its output). Imports no torch: quick."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--step", required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--wall-s", type=float, default=0)
    p.add_argument("--tail-file", default="")
    args = p.parse_args(argv)
    steps = read_results(args.out).get("steps", {})
    steps[args.step] = {"rc": args.rc, "wall_s": args.wall_s}
    record(args.out, "steps", steps)
    if args.tail_file:
        record(args.out, args.step, {"rc": args.rc, "tail": Path(args.tail_file).read_text()[-3000:]})


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["mark"]:
        raise SystemExit("usage: python -m bench.common mark --out OUT --step NAME --rc N [--wall-s S]")
    mark(sys.argv[2:])
