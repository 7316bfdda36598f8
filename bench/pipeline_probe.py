"""A second look at one pipeline row, step by step: is a full/raw ratio below the goal a pipeline cost or noise?

Interleaved, one step each per turn, on the same model:
  same_x_int      the model step on one reused ready batch (bench/pipeline.py's raw side)
  fresh_x_int     the model step on one of 8 distinct ready batches (cache-cold inputs, no pipeline work)
  fresh_x_soft    the same with MixUp/CutMix soft targets
  fresh_x_onehot  the same with one-hot targets
  full            sample, gather, prepare_batch with augmentation, MixUp/CutMix, then the step

    .venv/bin/python bench/pipeline_probe.py mobilenet_v2 224
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.config import TrainConfig  # noqa: E402
from distributed.data import load_pool, mix_transform  # noqa: E402
from distributed.models import create_model  # noqa: E402
from distributed.train import prepare_batch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("size", type=int)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6, help="rounds of --steps turns; the first round is warm-up")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args(argv)

    cpu = torch.device("cpu")
    cfg = TrainConfig(model=args.model, image_size=args.size, batch_size=args.batch, mixup_alpha=0.2,
                      cutmix_alpha=1.0, augment=True)
    pool = load_pool("synthetic", in_channels=1, size=48, seed=0)
    train_x, train_y = torch.from_numpy(pool.train_x), torch.from_numpy(pool.train_y)
    k = len(pool.class_names)
    torch.manual_seed(0)
    net = create_model(args.model, k, in_channels=1).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    mix = mix_transform(cfg.mixup_alpha, cfg.cutmix_alpha, k)
    gen = torch.Generator().manual_seed(0)

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    def sample():
        return torch.randperm(len(train_y), generator=gen)[:args.batch]

    ready = [(prepare_batch(train_x[i], cfg, args.size, cpu, augment_with=gen), train_y[i])
             for i in (sample() for _ in range(8))]
    soft = [mix(x.clone(), y) for x, y in ready]
    onehot = [(x, F.one_hot(y, k).float()) for x, y in ready]

    def full(_):
        i = sample()
        step(*mix(prepare_batch(train_x[i], cfg, args.size, cpu, augment_with=gen), train_y[i]))

    kinds = {"same_x_int": lambda n: step(*ready[0]), "fresh_x_int": lambda n: step(*ready[n % 8]),
             "fresh_x_soft": lambda n: step(*soft[n % 8]), "fresh_x_onehot": lambda n: step(*onehot[n % 8]),
             "full": full}
    times = {name: [] for name in kinds}
    for n in range(args.rounds * args.steps):
        for name, fn in kinds.items():
            tic = time.perf_counter()
            fn(n)
            times[name].append(time.perf_counter() - tic)
    base = statistics.median(times["same_x_int"][args.steps:])
    print(f"{args.model} @ {args.size}, batch {args.batch}, torch threads {torch.get_num_threads()}; "
          f"median of {(args.rounds - 1) * args.steps} steps after warm-up")
    for name, t in times.items():
        med = statistics.median(t[args.steps:])
        print(f"  {name:<16}{med * 1e3:8.1f} ms   same_x_int / this {base / med:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
