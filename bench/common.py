"""Helpers shared by the benches: where results go and how a step records them.

Bench scripts run as modules of the `bench` package (`python -m bench.gpu ...`) from the repo root.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = "results.json"


def read_results(out: str | Path) -> dict:
    path = Path(out) / RESULTS
    return json.loads(path.read_text()) if path.is_file() else {}


def record(out: str | Path, key: str, value) -> None:
    """Merge `value` under `key` into OUT/results.json, written through a rename so a kill never leaves half a
    file. Steps run one at a time, so read-modify-write is safe."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = read_results(out)
    results[key] = value
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(out / RESULTS)


def spread(values: list[float]) -> dict:
    """Median with min and max: the figure and how much it moved across repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


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
