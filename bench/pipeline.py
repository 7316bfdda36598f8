"""Input-pipeline throughput: the loop's training epoch against the model step alone.

full = the loop's own `train_epoch` on a member built by its `build_member` (model, per-stage AdamW, loss, OneCycle
       schedule): its sampler (epoch_batches: seeded per-epoch permutation, this rank's share) -> uint8 gather
       -> prepare_batch (to float, resize, augment, normalise) -> MixUp/CutMix -> forward + backward + optimizer
       and schedule step, the loss summed on the device and read once at the end of the epoch. The training set
       is capped (train_limit) so that an epoch is the row's `steps` batches. With one worker the loop does not
       wrap the model in DDP, so neither does this. What train_loop does around train_epoch (evaluation,
       checkpoint, report) is not timed.
raw  = the same member's step (its model, loss, optimizer and schedule) `steps` times on one batch that is
       already prepared, augmented and mixed, with the same single read of the summed loss at the end

Both run on the same member, batch size and thread count, interleaved block by block (full epoch, raw block, full,
raw, ...) so background load hits both alike; the ratio is taken per round and the median reported. Goal:
full/raw >= 0.95.

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

from bench.common import code_version, sync
from distributed.augment import augment, mix_transform
from distributed.config import TrainConfig
from distributed.data import Decoded, decode_data
from distributed.evaluate import prepare_batch
from distributed.splits import make_splits
from distributed.train import (
    LocalRun,
    build_member,
    epoch_seed,
    make_schedule,
    shared_tensor,
    steps_per_epoch,
    train_epoch,
)

# model:image_size:batch[:steps]; 224 rows use few steps because a CPU trains resnet18 at a few images/s
DEFAULT_ROWS = ["emotion_cnn48:48:64:8", "resnet18:112:32:4", "resnet18:224:16:2", "mobilenet_v2:224:16:2"]


def bench_row(model: str, size: int, batch: int, steps: int, rounds: int, run: LocalRun, decoded: Decoded,
              channels_last: bool) -> dict:
    # train_limit makes one epoch `steps` batches (fewer when the data has fewer training images); the model takes
    # the decoded images' channels (grey or RGB)
    cfg = TrainConfig(model=model, image_size=size, batch_size=batch, mixup_alpha=0.2, cutmix_alpha=1.0,
                      augment=True, channels_last=channels_last, train_limit=steps * batch,
                      in_channels=int(decoded.train_x.shape[1]))
    device = run.device
    # as train_loop builds its first (or only) member
    torch.manual_seed(cfg.seed)
    splits = make_splits(decoded, cfg)
    images, labels = shared_tensor(splits.x), torch.from_numpy(splits.y)
    m = build_member(cfg, splits, run)
    mix = mix_transform(cfg.mixup_alpha, cfg.cutmix_alpha, len(splits.class_names))
    steps = steps_per_epoch(len(m.train_idx), run.world, batch)
    # a warm-up round and `rounds` timed ones, each stepping the schedule once per full and once per raw step
    m.scheduler = make_schedule(cfg, m.optimizer, m.peak_lrs, total_steps=2 * steps * (rounds + 1))
    gen = torch.Generator(device=device)
    epoch = 0
    first = m.train_idx[:batch]
    ready_x, ready_y = mix(prepare_batch(images[first], cfg, device, augment_with=gen), labels[first].to(device))

    def full_block() -> int:
        nonlocal epoch
        epoch += 1
        gen.manual_seed(epoch_seed(cfg, epoch, run.rank))  # as train_loop seeds each epoch
        return train_epoch(m, cfg, epoch, images, labels, mix, gen, run)[1]

    def raw_block() -> int:
        # train_epoch's step without its data pieces (grad_clip and EMA are off in this config)
        train_loss = torch.zeros((), device=device)
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = m.loss_fn(m.model(ready_x), ready_y)
            m.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            m.optimizer.step()
            m.scheduler.step()
            train_loss += loss.detach().float() * batch
        float(train_loss)  # the loop's one sync per epoch
        return steps * batch

    def timed(block) -> tuple[int, float]:
        sync(device)
        tic = time.perf_counter()
        n = block()
        sync(device)
        return n, time.perf_counter() - tic

    # warm-up (allocator, oneDNN/cuDNN kernel selection); the first epoch also sets m.model, which raw_block uses
    timed(full_block), timed(raw_block)
    full, raw, ratios = [], [], []
    for _ in range(rounds):
        # alternate block by block, so a burst of background load lands on both sides
        n_full, t_full = timed(full_block)
        n_raw, t_raw = timed(raw_block)
        full.append(n_full / t_full)
        raw.append(n_raw / t_raw)
        ratios.append(full[-1] / raw[-1])

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

    pick = torch.Generator().manual_seed(0)

    def batch_idx():
        return m.train_idx[torch.randperm(len(m.train_idx), generator=pick)[:batch]]

    idx = batch_idx()
    x_u8 = images[idx]
    x01 = x_u8.to(device).float().div_(255)
    x01 = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False) if size != x01.shape[-1] else x01
    y = labels[idx].to(device)
    x_aug = prepare_batch(x_u8, cfg, device, augment_with=gen)
    pieces = {"gather_ms": ms(lambda: images[batch_idx()]),
              "prepare_ms": ms(lambda: prepare_batch(x_u8, cfg, device)),  # without augmentation
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
    p.add_argument("--steps", type=int, default=None, help="batches per epoch, the timed block (overrides each row's)")
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
    print(f"{code_version()}; device {run.device}, torch threads {torch.get_num_threads()}, "
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
