"""Per-epoch checkpoint cost by model: what train.train_loop writes after every epoch, timed.

Every epoch the loop writes one checkpoint with modelfile.save_state: state.pt (weights + AdamW state + history) and
best_model.pt (modelfile.model_blob of the best weights so far, re-serialised even when unchanged) into a temporary
directory, and Ray then copies that directory into the run's storage path. This times save_state and one directory
copy (standing in for Ray's persist to a local storage path) for each model, next to its size, so the per-epoch
cost can be set against an epoch's training time.

    python -m bench.checkpoint
    python -m bench.checkpoint --models resnet50 vgg16 --repeat 5
    python -m bench.checkpoint --models small_cnn --repeat 1      # a smoke run, seconds
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distributed.config import TrainConfig
from distributed.modelfile import model_blob, model_state, save_state, training_state
from distributed.models import create_model, native_size


def cost(name: str, repeat: int, where: str | None) -> dict:
    torch.manual_seed(0)
    cfg = TrainConfig(model=name)
    classes = [f"class{i}" for i in range(7)]
    net = create_model(name, len(classes), in_channels=cfg.in_channels)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    size = native_size(name)
    net(torch.randn(2, cfg.in_channels, size, size)).sum().backward()
    opt.step()  # AdamW state (exp_avg, exp_avg_sq) exists from the first step on
    history = [{"val_acc": 0.5, "epoch": e} for e in range(1, 31)]
    # the training state as the loop hands it to save_state (one fold, no EMA)
    state = training_state(30, [model_state(net, opt)], {"value": 0.5, "epoch": 1}, 0, history)
    blob = model_blob(net, cfg, classes, history[-1])  # made only on an improving epoch: not timed
    save_s, copy_s, total = [], [], 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(dir=where) as tmp, tempfile.TemporaryDirectory(dir=where) as dest:
            tic = time.perf_counter()
            save_state(tmp, state, blob)
            save_s.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            shutil.copytree(tmp, Path(dest) / "checkpoint_000000")
            copy_s.append(time.perf_counter() - tic)
            total = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return {"model": name, "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "mb": total / 2**20,
            "save_s": statistics.median(save_s), "copy_s": statistics.median(copy_s)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["small_cnn", "emotion_cnn48", "resnet18", "mobilenet_v2",
                                                   "resnet50", "vgg16"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: the system temp dir, like the loop)")
    args = p.parse_args(argv)
    print(f"{'model':<15}{'params M':>9}{'MB/epoch':>9}{'save s':>8}{'copy s':>8}{'total s':>8}")
    for name in args.models:
        r = cost(name, args.repeat, args.dir)
        print(f"{r['model']:<15}{r['params_m']:>9.2f}{r['mb']:>9.1f}{r['save_s']:>8.3f}{r['copy_s']:>8.3f}"
              f"{r['save_s'] + r['copy_s']:>8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
