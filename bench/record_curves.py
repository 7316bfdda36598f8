"""Record full learning curves for bench/search_replay.py: random configs, each trained to the end by the real loop
(train.train_loop with a LocalRun, no Ray), one Parquet row per (config, epoch), plus the test accuracy of each
config's best-epoch weights (scored once on the held-out test split, which no search reads).

CPU sample (the committed bench/curves/sample_cpu.parquet: 36 min on one thread at load 18-28):
    python -m bench.record_curves fer2013_small --configs 12 --epochs 8 --set train_limit=300 \
        --out bench/curves/sample_cpu.parquet
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed.config import TrainConfig
from distributed.data import load_data
from distributed.evaluate import score_model
from distributed.train import LocalRun, train_loop

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The searched knobs (the bench_search spaces' ranges); lr_backbone follows lr_head (one learning rate).
LOG = {"lr_head": (1e-4, 3e-2), "weight_decay": (1e-5, 1e-2)}
LINEAR = {"dropout": (0.1, 0.6), "mixup_alpha": (0.0, 0.4), "label_smoothing": (0.0, 0.2)}
CHOICE = {"batch_size": (32, 64)}
CURVE = ("epoch", "val_acc", "val_macro_f1", "val_loss", "train_loss", "epoch_s")


def draw(rng: np.random.Generator) -> dict:
    params = {k: float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for k, (lo, hi) in LOG.items()}
    params.update({k: float(rng.uniform(lo, hi)) for k, (lo, hi) in LINEAR.items()})
    params.update({k: int(rng.choice(v)) for k, v in CHOICE.items()})
    return params


def record(dataset: str, configs: int, epochs: int, sets: list[str], seed: int, out: Path) -> None:
    base = TrainConfig(model="small_cnn", data=f"imagefolder:{DATA / dataset}", epochs=epochs).with_overrides(sets)
    data = load_data(base)
    rng = np.random.default_rng(seed)
    rows = []
    for cid in range(configs):
        params = draw(rng)
        cfg = base.replace(lr_backbone=params["lr_head"], **params)
        with tempfile.TemporaryDirectory() as tmp:
            run = LocalRun("cpu", checkpoint_dir=tmp)
            train_loop(cfg, data, run)
            scored = score_model(Path(tmp) / "best_model.pt", "test", data=data)
        test_acc = float((scored.y_pred == scored.y_true).mean())
        for r in run.reports:
            rows.append({"config_id": cid, "dataset": dataset, "model": cfg.model, **params,
                         **{k: float(r[k]) if k != "epoch" else int(r[k]) for k in CURVE},
                         "test_acc_at_best": test_acc})
        print(f"config {cid}: best val_acc {max(r['val_acc'] for r in run.reports):.3f}, test {test_acc:.3f}",
              flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    print(f"{len(rows)} rows -> {out}")
    print_rank_correlation(rows)


def print_rank_correlation(rows: list[dict]) -> None:
    """How well a rung at epoch e ranks the configs: Spearman of val_acc at e with each config's final (last
    epoch's) val_acc, its best val_acc, and its best weights' test accuracy."""
    from scipy.stats import spearmanr

    curves = {}
    for r in rows:
        curves.setdefault(r["config_id"], []).append(r)
    curves = [sorted(c, key=lambda r: r["epoch"]) for c in curves.values()]
    last = min(len(c) for c in curves)
    finals = [c[last - 1]["val_acc"] for c in curves]
    bests = [max(r["val_acc"] for r in c) for c in curves]
    tests = [c[0]["test_acc_at_best"] for c in curves]
    print("epoch | Spearman with final val_acc | with best val_acc | with test acc")
    for e in range(1, last + 1):
        at = [c[e - 1]["val_acc"] for c in curves]
        cells = [spearmanr(at, other).statistic for other in (finals, bests, tests)]
        print(f"{e} | " + " | ".join(f"{v:+.2f}" for v in cells))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="a folder under ../shared/data (ImageFolder layout)")
    ap.add_argument("--configs", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="TrainConfig override key=value (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the configs drawn (training stays at seed 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    record(args.dataset, args.configs, args.epochs, args.set, args.seed, args.out)


if __name__ == "__main__":
    main()
