"""The service's GPU figures without Ray (issue 15): every step runs the real loop (`train.train_loop` with a
`LocalRun`) or its pieces, and records into OUT/results.json as soon as it has a figure.

    python3 -m bench.gpu STEP --out OUT [--tiny] [--limit-s S]      (bench/gpu_check.sh runs them all in order)

Steps: env, pipeline (P2), loop (P6), packing (P4), ddp, summary. `--tiny` shrinks every size so the
whole path runs on a CPU in a couple of minutes (it checks the script, its figures mean nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, Deadline, free_port, read_results, record, spread, sync
from distributed.config import TrainConfig
from distributed.data import decode_data
from distributed.results import git_commit
from distributed.train import LocalRun, Run, train_loop


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ 1. env

def step_env(args) -> None:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count(), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability()),
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info["device"] = "cpu"
    info["ray_imported"] = "ray" in sys.modules  # must stay False: this path runs where Ray is not installed
    record(args.out, "env", info)
    print(json.dumps(info, indent=1))


# ------------------------------------------------------------------------------------- 2. input pipeline

def pipeline_specs(tiny: bool) -> list[dict]:
    # steps: batches per timed block; the synthetic set has 1,785 training images, so 7 batches of 256
    if tiny:  # the same code path at a size a loaded CPU gets through
        return [{"model": "small_cnn", "size": 48, "channels": 1, "batch": 8, "steps": 1},
                {"model": "resnet50", "size": 32, "channels": 3, "batch": 8, "steps": 1}]
    return [{"model": "emotion_cnn48", "size": 48, "channels": 1, "batch": 256, "steps": 7},
            {"model": "resnet50", "size": 224, "channels": 3, "batch": 256, "steps": 7}]


def step_pipeline(args) -> None:
    """P2: bench.pipeline's row on the GPU: the loop's own train_epoch (gather of uint8 images, prepare_batch with
    augmentation, MixUp/CutMix, bf16 forward + backward + step) against the same member's step on a ready batch,
    blocks alternated in one process, so drift hits both alike (no hand-written training step here). The images
    are decoded at the model's size and channels (grey 48 px, RGB 224 px), as uint8 on the CPU: each batch is
    copied to the GPU at full size, as in training."""
    from bench.pipeline import bench_row

    run = LocalRun(device())
    rows = []
    for spec in pipeline_specs(args.tiny):
        row = {**spec, "data_at": f"uint8 on the CPU, {spec['channels']} x {spec['size']} px"}
        try:
            decoded = decode_data("synthetic", in_channels=spec["channels"], size=spec["size"], seed=0)
            row.update(bench_row(spec["model"], spec["size"], spec["batch"], spec["steps"], 2 if args.tiny else 7,
                                 run, decoded, channels_last=run.device.type == "cuda"))
            row["meets_goal"] = row["ratio"] >= 0.95
        except Exception as exc:  # noqa: BLE001 - record the failure and go on with the next model
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows.append(row)
        record(args.out, "pipeline", rows)
        print(json.dumps(row))
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


# -------------------------------------------------------------------------------- 3. ResNet-50 in the loop

def step_loop(args) -> None:
    """P6: ResNet-50 at 224 px, bf16, images/s as the loop reports it (epochs after the first), channels_last on
    and off, batch 128 and 256. Synthetic RGB faces decoded once at 224 px (uint8 on the CPU, like decoded
    ImageNet-size data), so every batch travels host->device at full size."""
    dev = device()
    size, epochs, limit, val = (32, 2, 8, 0.01) if args.tiny else (224, 4, 0, 0.15)
    batches = (2, 4) if args.tiny else (128, 256)
    tic = time.perf_counter()
    data = decode_data("synthetic", in_channels=3, size=size, seed=0)
    decode_s = time.perf_counter() - tic
    rows = []
    for batch in batches:
        for cl in (True, False):
            cfg = TrainConfig(model="resnet50", data="synthetic", in_channels=3, data_size=size, image_size=size,
                              batch_size=batch, channels_last=cl, amp=True, epochs=epochs, train_limit=limit,
                              val_fraction=val,
                              mixup_alpha=0.2, augment=True, pretrained=False, lr_head=1e-3, lr_backbone=1e-3)
            row = {"batch": batch, "channels_last": cl, "size": size, "data_size": size, "epochs": epochs}
            try:
                run = LocalRun(device=dev)
                train_loop(cfg, data, run)
                later = [r["images_per_s"] for r in run.reports[1:]] or [run.reports[0]["images_per_s"]]
                row.update(images_per_s=spread(later), epoch1_images_per_s=run.reports[0]["images_per_s"],
                           epoch_s=[round(r["epoch_s"], 3) for r in run.reports])
                if dev.type == "cuda":
                    row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    torch.cuda.reset_peak_memory_stats()
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            record(args.out, "loop_resnet50", {"decode_s": decode_s, "rows": rows,
                                               "data": f"synthetic RGB, decoded at {size}px, 1785 train images"})
            print(json.dumps(row))
            if dev.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- 4. packing

def step_packing(args) -> None:
    """P4: N concurrent processes, each running the loop (emotion_cnn48, batch 64, synthetic 48 px) through a
    LocalRun on the one GPU. Per trial: images/s of epochs after the first; all together: total training images
    over the wall time from the common start to the last trial's end, evaluation and checkpoints included
    (summed per-trial rates overstate when the trials do not overlap)."""
    counts = (1, 2) if args.tiny else (1, 2, 4, 8)
    epochs, limit, val = (2, 32, 0.02) if args.tiny else (12, 0, 0.15)
    model = "small_cnn" if args.tiny else "emotion_cnn48"
    deadline = Deadline(args.limit_s)
    rows = []
    for n in counts:
        if deadline.left() < 10:
            rows.append({"trials": n, "skipped": "step time limit"})
            break
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {"model": model, "batch_size": 64, "epochs": epochs, "train_limit": limit, "mixup_alpha": 0.2,
                   "val_fraction": val}
            procs = [subprocess.Popen([sys.executable, "-m", "bench.gpu", "pack-trial", "--out", tmp,
                                       "--trial-json", json.dumps({**cfg, "seed": i}), "--trial-file",
                                       f"{tmp}/trial{i}.json"], cwd=REPO, env=child_env(n))
                     for i in range(n)]
            # Start together: each trial imports, decodes and touches CUDA first, then waits for the go file, so
            # the measured part overlaps (imports of 8 processes can be seconds apart).
            while len(list(Path(tmp).glob("ready*"))) < n and deadline.left() > 5 and \
                    all(p.poll() is None for p in procs):
                time.sleep(0.05)
            Path(tmp, "go").touch()
            rc = wait_all(procs, deadline)
            trials = [json.loads(Path(f"{tmp}/trial{i}.json").read_text())
                      for i in range(n) if Path(f"{tmp}/trial{i}.json").is_file()]
        row = {"trials": n, "finished": len(trials), "rc": rc}
        if trials:
            per = [t["images_per_s"] for t in trials]
            span = max(t["t_end"] for t in trials) - min(t["t_start"] for t in trials)
            total_images = sum(t["train_images"] for t in trials)
            row.update(per_trial_img_s=spread(per), sum_of_rates=sum(per), total_img_s=total_images / span,
                       span_s=span, process_wall_s=[round(t["t_end"] - t["t_proc"], 2) for t in trials])
            solo = rows[0].get("per_trial_img_s", {}).get("median") if rows else None
            if solo:  # the slowest trial against one alone; all trials together against one alone
                row["per_trial_vs_solo"] = row["per_trial_img_s"]["min"] / solo
                row["total_vs_solo"] = row["total_img_s"] / rows[0]["total_img_s"]
        rows.append(row)
        record(args.out, "packing", {"model": model, "batch": 64, "epochs": epochs, "rows": rows,
                                     "goal": ">= 4 trials each at >= 80% of solo speed"})
        print(json.dumps(row))


def child_env(n: int) -> dict:
    threads = max(1, (os.cpu_count() or 2) // max(n, 1))
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}


def wait_all(procs: list[subprocess.Popen], deadline: Deadline) -> list:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline.left(), 1)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append("killed at the step's time limit")
    return codes


def pack_trial(args) -> None:
    """One packed trial (a child process): the loop on synthetic data, with the moments its training ran."""
    t_proc = time.time()
    cfg = TrainConfig.from_dict(json.loads(args.trial_json))
    data = decode_data("synthetic", in_channels=cfg.in_channels, size=cfg.data_size, seed=0)
    run = LocalRun(device=device())
    torch.ones(1, device=run.device).sum().item()  # CUDA context up before the start line
    Path(args.out, f"ready{cfg.seed}").touch()
    while not Path(args.out, "go").exists():
        time.sleep(0.01)
    t_start = time.time()
    train_loop(cfg, data, run)
    sync(run.device)
    t_end = time.time()
    later = run.reports[1:] or run.reports
    Path(args.trial_file).write_text(json.dumps({
        "images_per_s": float(np.median([r["images_per_s"] for r in later])), "t_proc": t_proc,
        "t_start": t_start, "t_end": t_end, "train_images": epoch_images(cfg) * len(run.reports)}))


def epoch_images(cfg: TrainConfig) -> int:
    """Training images per epoch of synthetic data under cfg (2100 train images, val_fraction, train_limit)."""
    n = 2100 - math.ceil(2100 * cfg.val_fraction)  # sklearn rounds the test share up
    return min(n, cfg.train_limit) if cfg.train_limit else n


# ------------------------------------------------------------------------------------- 6. DDP on one GPU

class EnvRun(Run):
    """A DDP rank started without Ray: rank and world from the environment torch.distributed reads."""

    def __init__(self, dev: torch.device):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.device, self.reports = dev, []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})


def step_ddp(args) -> None:
    """Two ranks on one GPU (both cuda:0, nccl), as Ray would place 2 workers with gpus_per_worker 0.5 on a
    single-GPU node. NCCL is expected to refuse two ranks on one device; this records what happens."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", "bench.gpu", "ddp-rank", "--out", tmp,
                                   "--trial-file", f"{tmp}/rank{r}.json", "--backend", backend],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**child_env(2), "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for r in range(2)]
        ranks = []
        for r, p in enumerate(procs):
            try:
                text, _ = p.communicate(timeout=max(args.limit_s - 5, 5))
                rc = p.returncode
            except subprocess.TimeoutExpired:
                p.kill()
                text, _ = p.communicate()
                rc = "hung: killed at the step's time limit"
            written = Path(f"{tmp}/rank{r}.json")
            result = json.loads(written.read_text()) if written.is_file() else {}
            ranks.append({"rank": r, "rc": rc, **result, "output_tail": (text or "")[-1500:]})
    outcome = "works" if all(x.get("ok") for x in ranks) else "fails"
    record(args.out, "ddp_one_gpu", {"backend": backend, "devices": "cuda:0 for both ranks" if backend == "nccl"
                                     else "cpu", "outcome": outcome, "ranks": ranks})
    print(json.dumps({"outcome": outcome, "errors": [x.get("error") for x in ranks]}))


def ddp_rank(args) -> None:
    import datetime

    import torch.distributed as dist

    dev = torch.device("cuda:0" if args.backend == "nccl" else "cpu")
    result = {"ok": False}
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
        run = EnvRun(dev)
        cfg = TrainConfig(model="small_cnn", epochs=1, batch_size=16, train_limit=64, val_fraction=0.02, amp=True)
        train_loop(cfg, decode_data("synthetic", seed=0), run)
        result = {"ok": True, "val_acc": run.reports[-1]["val_acc"], "epochs": len(run.reports)}
    except Exception as exc:  # noqa: BLE001 - the error is the finding
        result["error"] = f"{type(exc).__name__}: {exc}"[:1500]
    finally:
        Path(args.trial_file).write_text(json.dumps(result))
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------------------------- summary

def step_summary(args) -> None:
    res = read_results(args.out)
    env = res.get("env", {})
    print(f"\n=== GPU check: {env.get('device', '?')}  torch {env.get('torch')}  cuda {env.get('cuda')}  "
          f"capability {env.get('capability')}  commit {env.get('commit')}  {env.get('date')}")
    for row in res.get("pipeline", []):
        if "error" in row:
            print(f"P2 {row['model']:<14} {row['size']}px b{row['batch']}: ERROR {row['error'][:100]}")
        else:
            print(f"P2 {row['model']:<14} {row['size']}px b{row['batch']}: full {row['full_img_s']:8.0f} "
                  f"raw {row['raw_img_s']:8.0f} img/s  ratio {row['ratio']:.3f} "
                  f"[{row['ratio_min']:.3f}-{row['ratio_max']:.3f}] (goal >= 0.95)")
    for row in res.get("loop_resnet50", {}).get("rows", []):
        what = f"P6 resnet50 {row['size']}px b{row['batch']} channels_last={str(row['channels_last']):<5}"
        print(f"{what}: ERROR {row['error'][:100]}" if "error" in row else
              f"{what}: {row['images_per_s']['median']:8.0f} img/s through the loop (epochs 2+; goal >= 3000)")
    for row in res.get("packing", {}).get("rows", []):
        if "per_trial_img_s" not in row:
            print(f"P4 {row['trials']} trials: {row.get('skipped') or row.get('rc')}")
            continue
        print(f"P4 {row['trials']} trials: per trial {row['per_trial_img_s']['median']:7.0f} img/s "
              f"(min {row['per_trial_img_s']['min']:.0f}, {row.get('per_trial_vs_solo', 1):.0%} of solo), "
              f"together {row['total_img_s']:7.0f} img/s ({row.get('total_vs_solo', 1):.2f}x one alone) over "
              f"{row['span_s']:.1f} s; sum of rates {row['sum_of_rates']:.0f}")
    tests = res.get("cuda_tests")
    if tests:
        print(f"CUDA tests: rc {tests.get('rc')}: {tests.get('tail', '').strip().splitlines()[-1:] or ''}")
    ddp = res.get("ddp_one_gpu")
    if ddp:
        errs = {x.get("error", "")[:160] for x in ddp["ranks"] if x.get("error")}
        print(f"DDP 2 ranks on one GPU ({ddp['backend']}): {ddp['outcome']} {'; '.join(errs)}")
    for name, c in res.get("curves", {}).items():
        print(f"Curves {name}: {c.get('configs_done')} configs x {c.get('epochs')} epochs in "
              f"{c.get('wall_s', 0):.0f} s -> {c.get('file')}")
    for name, st in res.get("steps", {}).items():
        if st.get("rc") not in (0, None):
            limit = " (time limit)" if st["rc"] in (124, 137) else ""
            print(f"step {name}: rc {st['rc']} after {st.get('wall_s')} s{limit}")


STEPS = {"env": step_env, "pipeline": step_pipeline, "loop": step_loop, "packing": step_packing, "ddp": step_ddp,
         "summary": step_summary, "pack-trial": pack_trial,
         "ddp-rank": ddp_rank}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=STEPS)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks the script on a CPU")
    p.add_argument("--limit-s", type=float, default=120, help="the step's own time limit (seconds)")
    p.add_argument("--trial-json", default="{}")
    p.add_argument("--trial-file", default="")
    p.add_argument("--backend", default="nccl")
    args = p.parse_args(argv)
    STEPS[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
