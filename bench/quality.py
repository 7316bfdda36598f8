"""Model quality: search on a validation split of train, retrain the best config once, evaluate once on test.

For each data set: `emotune tune SPACE` (validation split carved from train; the test split is never read),
then `emotune train --config best_config.yaml` (which picks its best epoch on the same validation split and
evaluates that model once on the test split), then the test accuracy, macro-F1 and confusion matrix are read
from the run's report files. FER2013's test split holds PublicTest and PrivateTest; the report has each group
and both together.

Budgets (state which one a figure came from):
  cpu  fits 2 CPU cores in ~15-20 minutes: small_cnn; FER2013 on a stratified 8,000-image subset of Training,
       10 epochs, 6 trials; CK+48 20 epochs, 8 trials (bench/spaces/quality_*_cpu.yaml)
  gpu  the full recipes: FER2013 with search_spaces/fer2013.yaml (emotion_cnn48, all 25,838 training images after
       the validation split, 32 trials x up to 40 epochs); CK+48 with bench/spaces/quality_ckplus48_gpu.yaml

    python -m bench.quality --budget cpu
    python -m bench.quality --budget gpu --datasets fer2013
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import proc
from bench.common import DATA, REPO, SPACES, emotune, out_dir, read_csv, tune

DATASETS = {"fer2013": "parquet:{root}/fer2013", "ckplus48": "imagefolder:{root}/ckplus48"}
BUDGET_SPACES = {
    "cpu": {"fer2013": SPACES / "quality_fer2013_cpu.yaml", "ckplus48": SPACES / "quality_ckplus48_cpu.yaml"},
    "gpu": {"fer2013": REPO / "search_spaces" / "fer2013.yaml", "ckplus48": SPACES / "quality_ckplus48_gpu.yaml"},
}
# the retrain's scaling; one CPU (one torch thread) on the CPU budget: two OpenMP threads stall badly on a shared
# 2-core machine
TRAIN_ARGS = {"cpu": ["--cpus-per-worker", "1", "--gpus-per-worker", "0"], "gpu": ["--cpus-per-worker", "4"]}
ANCHORS = {"fer2013": "published: best single network 73.28% (Khaireddin & Chen 2021), ensembles 75-77%; "
                      "human ~65%",
           "ckplus48": "no published figure uses this by-sequence 80/20 split (CK+ papers use subject-wise k-fold)"}


def one_dataset(name: str, budget: str, data_root: Path, out: Path) -> dict:
    space = BUDGET_SPACES[budget][name].relative_to(REPO)
    data = DATASETS[name].format(root=data_root)
    print(f"{name} ({budget} budget): search {space}", flush=True)
    search, exp = tune(space, out / "search", out / "search.log", "--set", f"data={data}", echo=True)
    board = read_csv(exp / "leaderboard.csv")
    best_config = exp / "best_config.yaml"
    print(f"  retrain {best_config}", flush=True)
    train = emotune(["train", "--config", str(best_config), "--output", str(out / "train"), *TRAIN_ARGS[budget]],
                    out / "train.log", echo=True)
    test = json.loads((out / "train" / "test_metrics.json").read_text())
    history = read_csv(out / "train" / "metrics.csv")
    best_epoch = max(history, key=lambda r: float(r["val_acc"]))
    return {"dataset": name, "budget": budget, "space": str(space), "data": data, "search_s": search["wall_s"],
            "train_s": train["wall_s"], "trials": len(board), "search_epochs": sum(int(r["epochs_run"]) for r in board),
            "search_best_val_acc": float(board[0]["best_val_acc"]), "best_config": str(best_config),
            "retrain_best_epoch": int(best_epoch["epoch"]), "retrain_val_acc": float(best_epoch["val_acc"]),
            "test": test, "run_dir": str(out / "train")}


def print_confusion(path: Path, title: str) -> None:
    rows = read_csv(path)
    names = [k for k in rows[0] if k != "true"]
    print(f"  confusion matrix, {title} (rows true, columns predicted):")
    print("  " + " " * 10 + "".join(f"{n[:8]:>9}" for n in names))
    for r in rows:
        print("  " + f"{r['true'][:10]:<10}" + "".join(f"{int(r[n]):>9}" for n in names))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--data-root", default=str(DATA))
    p.add_argument("--out", default=None, help="default: results/bench/quality/<budget>-<time>")
    args = p.parse_args(argv)
    out = out_dir("quality", args.out, prefix=f"{args.budget}-")
    root = Path(args.data_root).resolve()
    print(proc.code_version(), flush=True)
    tic = time.perf_counter()
    results = [one_dataset(name, args.budget, root, out / name) for name in args.datasets]
    (out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n{args.budget} budget, {time.perf_counter() - tic:.0f} s in all; results in {out}")
    print(f"{'dataset':<10}{'trials':>7}{'epochs':>7}{'search s':>9}{'val acc':>8}{'train s':>8}{'best ep':>8}"
          f"{'test split':>13}{'images':>7}{'acc':>8}{'macro-F1':>9}")
    for r in results:
        for part, m in r["test"].items():
            first = part == "all"
            lead = (f"{r['dataset']:<10}{r['trials']:>7}{r['search_epochs']:>7}{r['search_s']:>9.0f}"
                    f"{r['search_best_val_acc']:>8.4f}{r['train_s']:>8.0f}{r['retrain_best_epoch']:>8}"
                    if first else " " * 57)
            print(f"{lead}{part:>13}{m['test_count']:>7}{m['test_acc']:>8.4f}{m['test_macro_f1']:>9.4f}")
    for r in results:
        print(f"\n{r['dataset']}: {ANCHORS[r['dataset']]}")
        run_dir = Path(r["run_dir"])
        print_confusion(run_dir / "confusion_matrix.csv", "whole test split")
        print(f"  per-class reports: {run_dir}/classification_report*.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
