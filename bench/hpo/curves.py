"""Issue 14's recorded benchmark: full learning curves of sampled configs on fer2013_small and CK+48, recorded with
the real loop (`train_loop` + a LocalRun per config), one Parquet file per data set:

    curves_<dataset>.parquet: config_id, dataset, every sampled param, epoch, val_acc, val_macro_f1, val_loss,
                              train_loss, epoch_s, best_epoch, test_acc_at_best (per config, on every row)

    python3 -m bench.hpo.curves --data-dir DIR --out OUT [--configs 64 --epochs 30 --workers 8 --limit-s 300]
    python3 -m bench.hpo.curves --data-dir DATA --datasets ckplus48 --models small_cnn --workers 2 --limit-s 5400 --out OUT
(the last: BENCHMARKS 3b's CPU table, ~55 min on 2 cores). `--set KEY=VALUE` changes every config the same way
(`--set schedule=wsd --set warmup_pct=0.2`: the rung-correlation tables of 3b); at the end, per data set, the
Spearman correlation of each epoch's val_acc with each config's final and best val_acc and its test accuracy: how
well a rung at that epoch ranks the configs. The project's one curve recorder (bench/record_curves.py until git 245ab62, a
one-process copy with its own space, was folded in here).

CK+48 is validated by person (GROUP_BY: no subject on both sides of the split); fer2013_small has no person labels.

Configs are drawn with a fixed numpy seed (no Optuna needed). A pool of worker processes shares the GPU; each
worker decodes each data set once. The Parquet files are rewritten after every finished config, so a kill keeps
what finished. test_acc_at_best scores the best-validation model that the loop keeps (its best_model.pt) on the
data set's test split. Curves only: no image data goes into the files.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Deadline, record

DATASETS = {"fer2013_small": "fer2013_small", "ckplus48": "ckplus48"}
# Validation that keeps each person on one side (cfg.group_by; manifest.csv's subject column): CK+48 holds
# ~10 frames of each sequence, so a random split scores a config on frames of people it trained on.
GROUP_BY = {"ckplus48": "subject"}
MODELS = ("small_cnn", "baseline_cnn", "emotion_cnn48")
METRICS = ("val_acc", "val_macro_f1", "val_loss", "train_loss", "epoch_s")  # per epoch (the scheduled rate, lr,
# follows from the config)
PARAMS = ("model", "lr_head", "weight_decay", "dropout", "mixup_alpha", "batch_size", "label_smoothing")


def sample_configs(n: int, seed: int = 0, models=MODELS) -> list[dict]:
    """The quick.yaml / emotion_cnn48.yaml-like space, drawn with numpy (lr_backbone follows lr_head: the scratch
    CNNs train every stage at their learning rates)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lr = float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-2))))
        out.append({"config_id": i, "model": str(rng.choice(models)), "lr_head": lr, "lr_backbone": lr,
                    "weight_decay": float(np.exp(rng.uniform(np.log(1e-5), np.log(1e-2)))),
                    "dropout": float(rng.uniform(0.1, 0.6)), "mixup_alpha": float(rng.uniform(0.0, 0.4)),
                    "batch_size": int(rng.choice([32, 64, 128])), "label_smoothing": float(rng.uniform(0.0, 0.15))})
    return out


_DATA: dict = {}


def run_config(task: dict) -> dict:
    """A pool worker's task; a failing config is recorded with its error instead of ending the recording."""
    try:
        return train_config(task)
    except Exception as exc:  # noqa: BLE001
        return {"task": task["key"], "error": f"{type(exc).__name__}: {exc}"[:500]}


def train_config(task: dict) -> dict:
    """One config, one data set: the loop, then the kept best model scored on the test split."""
    import torch

    from distributed.config import TrainConfig
    from distributed.data import load_data
    from distributed.evaluate import score_model
    from distributed.modelfile import BEST_FILE, load_model
    from distributed.train import train_loop

    torch.set_num_threads(task["threads"])
    data = task["data"]
    params = {k: task["config"][k] for k in (*PARAMS, "lr_backbone")}
    cfg = TrainConfig(data=data, epochs=task["epochs"], seed=0, amp=True, channels_last=True,
                      train_limit=task["train_limit"], group_by=GROUP_BY.get(task["key"][0], ""),
                      **params).with_overrides(task["sets"])
    if data not in _DATA:
        _DATA[data] = load_data(cfg)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = KeepBest(tmp)
        train_loop(cfg, _DATA[data], run)
        scored = score_model(Path(tmp) / BEST_FILE, "test", device=run.device, data=_DATA[data])
        test_acc = float((scored.y_pred == scored.y_true).mean())
        saved = load_model(Path(tmp) / BEST_FILE)[3]
    return {"task": task["key"], "reports": [{k: r[k] for k in ("epoch", *METRICS) if k in r} for r in run.reports],
            "best_epoch": int(saved["epoch"]), "test_acc_at_best": test_acc, "wall_s": time.perf_counter() - tic,
            "diverged": any(r.get("diverged") for r in run.reports)}


def KeepBest(directory: str):
    """A LocalRun that keeps only the best model file of each checkpoint, hard-linked (no copy): every checkpoint
    carries the best weights so far, so the last one's is the best-validation model."""
    from distributed.modelfile import BEST_FILE
    from distributed.train import LocalRun

    class _KeepBest(LocalRun):
        def report(self, metrics, checkpoint_dir):
            self.reports.append(dict(metrics))
            if checkpoint_dir:
                dst = Path(directory) / BEST_FILE
                dst.unlink(missing_ok=True)
                try:
                    os.link(Path(checkpoint_dir) / BEST_FILE, dst)
                except OSError:
                    shutil.copyfile(Path(checkpoint_dir) / BEST_FILE, dst)

    return _KeepBest()


def label(dataset: str) -> str:
    """The data set as the files and the replay name it: with the validation split when it keeps people apart
    (ckplus48 by subject), so a table from before (frames of one person on both sides) is never mistaken for it."""
    return f"{dataset} by {GROUP_BY[dataset]}" if dataset in GROUP_BY else dataset


def write_parquet(out: Path, dataset: str, done: list[dict], configs: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for res in done:
        cfg = configs[res["task"][1]]
        for r in res["reports"]:
            rows.append({"config_id": cfg["config_id"], "dataset": label(dataset), **{k: cfg[k] for k in PARAMS},
                         **{k: r.get(k) for k in ("epoch", *METRICS)}, "best_epoch": res["best_epoch"],
                         "test_acc_at_best": res["test_acc_at_best"], "diverged": res["diverged"]})
    rows.sort(key=lambda r: (r["config_id"], r["epoch"]))
    path = out / f"curves_{dataset}.parquet"
    tmp = out / f".curves_{dataset}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)
    return path


def print_rank_correlation(rows: list[dict]) -> None:
    """How well a rung at epoch e ranks the configs: Spearman of val_acc at e with each config's final (last
    epoch's) val_acc, its best val_acc, and its best weights' test accuracy."""
    from scipy.stats import spearmanr

    curves = {}
    for r in rows:
        curves.setdefault(r["config_id"], []).append(r)
    curves = [sorted(c, key=lambda r: r["epoch"]) for c in curves.values()]
    if len(curves) < 3:
        return
    last = min(len(c) for c in curves)
    finals = [c[last - 1]["val_acc"] for c in curves]
    bests = [max(r["val_acc"] for r in c) for c in curves]
    tests = [c[0]["test_acc_at_best"] for c in curves]
    print(f"{rows[0]['dataset']}, {len(curves)} configs: epoch | Spearman with final val_acc | with best val_acc | "
          f"with test acc")
    for e in range(1, last + 1):
        at = [c[e - 1]["val_acc"] for c in curves]
        print(f"{e} | " + " | ".join(f"{spearmanr(at, other).statistic:+.2f}" for other in (finals, bests, tests)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder holding fer2013_small/ and ckplus48/ (imagefolder)")
    p.add_argument("--out", required=True)
    p.add_argument("--configs", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--limit-s", type=float, default=300, help="stop taking results after this; what finished stays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of the data sets")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the sampled models")
    p.add_argument("--train-limit", type=int, default=0, help="cap training images (0 = all; for a CPU check)")
    p.add_argument("--set", action="append", default=[], help="TrainConfig override KEY=VALUE for every config "
                   "(repeatable), e.g. schedule=wsd")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.limit_s)
    sets = {name: f"imagefolder:{Path(args.data_dir).resolve() / folder}" for name, folder in DATASETS.items()
            if name in args.datasets.split(",") and (Path(args.data_dir) / folder / "train").is_dir()}
    if not sets:
        print(f"bench.hpo.curves: no fer2013_small/ or ckplus48/ under {args.data_dir}; copy them there", file=sys.stderr)
        return 2
    configs = {c["config_id"]: c for c in sample_configs(args.configs, args.seed, args.models.split(","))}
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    # interleaved, so a cut-short run still has both data sets
    tasks = [{"key": (name, cid), "data": data, "config": cfg, "epochs": args.epochs, "threads": threads,
              "train_limit": args.train_limit, "sets": args.set}
             for cid, cfg in configs.items() for name, data in sets.items()]
    done = {name: [] for name in sets}
    tic = time.perf_counter()
    summary = {name: {"configs_planned": args.configs, "epochs": args.epochs, "workers": args.workers,
                      "configs_done": 0, "file": None} for name in sets}
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    pool = ctx.Pool(args.workers)
    try:
        results = pool.imap_unordered(run_config, tasks)
        for _ in tasks:
            try:
                res = results.next(timeout=max(deadline.left(), 0.1))
            except (mp.TimeoutError, queue.Empty):
                print(f"bench.hpo.curves: time limit {args.limit_s:.0f} s reached; keeping what finished", flush=True)
                break
            name = res["task"][0]
            if "error" in res:
                summary[name].setdefault("errors", []).append({"config_id": res["task"][1], "error": res["error"]})
                record(out, "curves", summary)
                print(f"curves {name} config {res['task'][1]}: ERROR {res['error']}", flush=True)
                continue
            done[name].append(res)
            path = write_parquet(out, name, done[name], configs)
            summary[name].update(configs_done=len(done[name]), file=path.name, wall_s=time.perf_counter() - tic,
                                 mean_config_s=float(np.mean([d["wall_s"] for d in done[name]])))
            record(out, "curves", summary)
            print(f"curves {name} config {res['task'][1]}: {len(res['reports'])} epochs, best epoch "
                  f"{res['best_epoch']}, test acc {res['test_acc_at_best']:.3f}, {res['wall_s']:.1f} s", flush=True)
    finally:
        pool.terminate()
        pool.join()
    print(json.dumps(summary))
    import pyarrow.parquet as pq

    for name in sets:
        if summary[name]["file"]:
            print_rank_correlation(pq.read_table(out / summary[name]["file"]).to_pylist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
