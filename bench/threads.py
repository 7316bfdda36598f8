"""Training images/s with one torch thread against every core (issue 16: a one-node `emotune train` uses the machine).

The real loop (`train.train_loop` through `LocalRun`, no Ray) on the default TrainConfig's data, one model at a
time, at 1 thread and at every core, alternating the order each round; each run trains --epochs epochs and the
figure is the images/s the loop reports for its last epoch (the first carries start-up). The ratio is taken within a
round (same data, same process, seconds apart), and the median is given with its min-max over rounds.

    python -m bench.threads                          # small_cnn and baseline_cnn, 3 rounds
    python -m bench.threads --models small_cnn --rounds 1 --epochs 1 --set train_limit=200   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from bench.common import out_dir
from distributed.config import TrainConfig
from distributed.data import load_data
from distributed.train import LocalRun, train_loop


def images_per_s(cfg: TrainConfig, data, threads: int) -> float:
    torch.set_num_threads(threads)
    run = LocalRun(device="cpu")
    train_loop(cfg, data, run)
    return float(run.reports[-1]["images_per_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["small_cnn", "baseline_cnn"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    out = out_dir("threads", args.out)
    rows = []
    for model in args.models:
        cfg = TrainConfig(model=model, epochs=args.epochs).with_overrides(args.overrides)
        data = load_data(cfg)
        for r in range(args.rounds):
            order = [1, cores] if r % 2 == 0 else [cores, 1]
            got = {t: images_per_s(cfg, data, t) for t in order}
            rows.append({"model": model, "round": r, "one": got[1], "all": got[cores], "ratio": got[cores] / got[1]})
            print(json.dumps(rows[-1]), flush=True)
    (out / "threads.json").write_text(json.dumps({"cores": cores, "epochs": args.epochs,
                                                   "overrides": args.overrides, "rows": rows}, indent=1))
    print(f"\n| model | 1 thread img/s | {cores} threads img/s | ratio, median [min, max] over {args.rounds} rounds |")
    print("|---|---:|---:|---:|")
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]

        def med(key, rows=mine):
            return statistics.median(r[key] for r in rows)
        ratios = [r["ratio"] for r in mine]
        print(f"| {model} | {med('one'):.0f} | {med('all'):.0f} | {med('ratio'):.2f} [{min(ratios):.2f}, "
              f"{max(ratios):.2f}] |")
    print(f"\nraw: {out / 'threads.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
