"""Per-epoch checkpoint cost by model: what train_loop_per_worker writes after every epoch, timed.

Every epoch the loop torch.saves state.pt (weights + AdamW state + history) and best_model.pt (the best weights so
far, re-serialised even when unchanged) into a temporary directory, and Ray then copies that directory into the
run's storage path. This times the two saves and one directory copy (standing in for Ray's persist to a local
storage path) for each model, next to its size, so the per-epoch cost can be set against an epoch's training time.

    .venv/bin/python bench/checkpoint.py
    .venv/bin/python bench/checkpoint.py --models resnet50 vgg16 --repeat 5
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.models import create_model  # noqa: E402


def cost(name: str, repeat: int, where: str | None) -> dict:
    torch.manual_seed(0)
    net = create_model(name, 7, in_channels=1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    size = 224 if name not in ("small_cnn", "baseline_cnn", "emotion_cnn48") else 48
    net(torch.randn(2, 1, size, size)).sum().backward()
    opt.step()  # AdamW state (exp_avg, exp_avg_sq) exists from the first step on
    state = {"format": "emotune-state/1", "epoch": 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
             "ema": None, "best": {"value": 0.5, "epoch": 1}, "bad_epochs": 0, "history": [{"val_acc": 0.5}] * 30}
    blob = {"format": "emotune-model/1", "model": name, "state_dict":
            {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}}
    save_s, copy_s, total = [], [], 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(dir=where) as tmp, tempfile.TemporaryDirectory(dir=where) as dest:
            tic = time.perf_counter()
            torch.save(state, Path(tmp) / "state.pt")
            torch.save(blob, Path(tmp) / "best_model.pt")
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
