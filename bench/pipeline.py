"""Input-pipeline throughput: the training step as the loop runs it against the model step alone.

full = the loop's sampler (epoch_batches: seeded per-epoch permutation, this rank's share) -> uint8 gather
       (train_x[idx]) -> prepare_batch (to float, resize, augment, normalise) -> MixUp/CutMix -> forward +
       backward + AdamW step        (the pieces of distributed.train.train_loop, run for a one-process LocalRun;
       with one worker the loop does not wrap the model in DDP, so neither does this)
raw  = forward + backward + AdamW step on a ready float batch of the same shape

Both run on the same model, batch size and thread count, interleaved round by round (full, raw, full, raw, ...)
so background load hits both alike; the ratio is taken per round and the median reported. Goal: full/raw >= 0.95.

    python -m bench.pipeline                 # the default rows (about 3-5 minutes on 2 CPU cores)
    python -m bench.pipeline --rows emotion_cnn48:48:64 --steps 10 --rounds 5
    python -m bench.pipeline --rows small_cnn:48:8:1 --rounds 1     # a smoke run, seconds

bench.gpu's pipeline step measures the same on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import proc
from distributed.augment import augment, mix_transform
from distributed.config import TrainConfig
from distributed.data import Decoded, decode_data
from distributed.models import create_model
from distributed.train import LocalRun, epoch_batches, prepare_batch

# model:image_size:batch[:steps]; 224 rows use few steps because a CPU trains resnet18 at a few images/s
DEFAULT_ROWS = ["emotion_cnn48:48:64:8", "resnet18:112:32:4", "resnet18:224:16:2", "mobilenet_v2:224:16:2"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_row(model: str, size: int, batch: int, steps: int, rounds: int, run: LocalRun, decoded: Decoded,
              channels_last: bool) -> dict:
    cfg = TrainConfig(model=model, image_size=size, batch_size=batch, mixup_alpha=0.2, cutmix_alpha=1.0,
                      augment=True, channels_last=channels_last)
    torch.manual_seed(0)
    device = run.device
    train_x, train_y = torch.from_numpy(decoded.train_x), torch.from_numpy(decoded.train_y)
    k = len(decoded.class_names)
    net = create_model(model, k, in_channels=cfg.in_channels).to(device)
    if cfg.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    mix = mix_transform(cfg.mixup_alpha, cfg.cutmix_alpha, k)
    gen = torch.Generator().manual_seed(0)
    amp = cfg.amp and device.type == "cuda"

    def model_step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # the loop calls .item() every step too

    def batch_idx():
        return torch.randperm(len(train_y), generator=gen)[:batch]

    def sampler():  # the loop's own batches for this process: rank 0 of 1
        epoch = 0
        while True:
            epoch += 1
            yield from epoch_batches(decoded.train_y, cfg, run.rank, run.world, epoch)

    batches = sampler()

    def full_step():
        idx = next(batches)
        x = prepare_batch(train_x[idx], cfg, size, device, augment_with=gen)  # augments [0, 1] pixels, then normalises
        y = train_y[idx].to(device, non_blocking=True)
        x, y = mix(x, y)
        model_step(x, y)

    ready_x = prepare_batch(train_x[batch_idx()], cfg, size, device).clone()
    ready_y = train_y[batch_idx()].to(device)

    def raw_step():
        model_step(ready_x, ready_y)

    def seconds(step):
        sync(device)
        tic = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - tic

    seconds(full_step), seconds(raw_step)  # warm-up: allocator, oneDNN/cuDNN kernel selection
    full, raw, ratios = [], [], []
    for _ in range(rounds):
        # alternate step by step, so a burst of background load lands on both sides
        t_full = t_raw = 0.0
        for _ in range(steps):
            t_full += seconds(full_step)
            t_raw += seconds(raw_step)
        full.append(steps * batch / t_full)
        raw.append(steps * batch / t_raw)
        ratios.append(t_raw / t_full)

    # The pieces alone, ms per batch (median of 20), to show where a shortfall comes from.
    def ms(fn, n=20):
        times = []
        for _ in range(n):
            sync(device)
            tic = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - tic) * 1e3)
        return statistics.median(times)

    idx = batch_idx()
    x_u8 = train_x[idx]
    x01 = x_u8.to(device).float().div_(255)
    x01 = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False) if size != x01.shape[-1] else x01
    y = train_y[idx].to(device)
    x_aug = prepare_batch(x_u8, cfg, size, device, augment_with=gen)
    pieces = {"gather_ms": ms(lambda: train_x[batch_idx()]),
              "prepare_ms": ms(lambda: prepare_batch(x_u8, cfg, size, device)),  # without augmentation
              "augment_ms": ms(lambda: augment(x01, gen)),  # on [0, 1] pixels at the model's size, as in prepare_batch
              "mix_ms": ms(lambda: mix(x_aug, y)),
              "model_step_ms": 1e3 * batch / statistics.median(raw)}
    overhead = pieces["gather_ms"] + pieces["prepare_ms"] + pieces["augment_ms"] + pieces["mix_ms"]
    pieces["predicted_ratio"] = pieces["model_step_ms"] / (pieces["model_step_ms"] + overhead)
    return {"model": model, "image_size": size, "batch": batch, "steps": steps, "rounds": rounds,
            "full_img_s": statistics.median(full), "raw_img_s": statistics.median(raw),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), **pieces}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="model:image_size:batch[:steps]")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (overrides each row's)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved full/raw blocks per row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true", help="channels_last (CUDA only, like the loop)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads and os.environ.get("OMP_NUM_THREADS") != str(args.threads):
        # OpenMP sizes its pool when torch loads; torch.set_num_threads alone is not the same (and is much slower
        # on a busy machine), so start again with the environment Ray gives trial processes
        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        os.execv(sys.executable, [sys.executable, "-m", "bench.pipeline", *sys.argv[1:]])
    if args.threads:
        torch.set_num_threads(args.threads)
    run = LocalRun(device=args.device)
    decoded = decode_data("synthetic", in_channels=1, size=48, seed=0)  # 48 px like FER2013; resized per batch
    print(f"{proc.code_version()}; device {run.device}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; augment + MixUp 0.2/CutMix 1.0 on; {args.rounds} interleaved rounds per row",
          flush=True)
    rows = []
    head = (f"{'model':<14}{'size':>5}{'batch':>6}{'full img/s':>11}{'raw img/s':>10}{'ratio':>7}{'(min-max)':>12}"
            f"{'gather':>8}{'prepare':>8}{'augment':>8}{'mix':>7}{'model':>8}{'pieces':>8}")
    print(head, flush=True)
    for spec in args.rows:
        parts = spec.split(":")
        model, size, batch = parts[0], int(parts[1]), int(parts[2])
        steps = args.steps or (int(parts[3]) if len(parts) > 3 else 5)
        r = bench_row(model, size, batch, steps, args.rounds, run, decoded, args.channels_last)
        rows.append(r)
        print(f"{r['model']:<14}{r['image_size']:>5}{r['batch']:>6}{r['full_img_s']:>11.1f}{r['raw_img_s']:>10.1f}"
              f"{r['ratio']:>7.3f}{r['ratio_min']:>6.2f}-{r['ratio_max']:<5.2f}{r['gather_ms']:>8.2f}"
              f"{r['prepare_ms']:>8.2f}{r['augment_ms']:>8.2f}{r['mix_ms']:>7.2f}{r['model_step_ms']:>8.0f}"
              f"{r['predicted_ratio']:>8.3f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
