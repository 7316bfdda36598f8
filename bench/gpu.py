"""GPU figures (needs a CUDA GPU; refuses to run without one unless --smoke):

A. training throughput through `emotune train`: emotion_cnn48 at 48x48 and resnet50 at 224x224, with
   AMP (bfloat16) + channels_last against fp32, read from the run's metrics.csv (images_per_s of the last epochs:
   the whole loop, gather + resize + augment + MixUp + forward/backward/step);
B. packing: four one-worker trials on one GPU (search_spaces/bench_gpu_pack.yaml, gpus_per_worker 0.25) against one
   trial alone: per-trial images/s, aggregate images/s and wall time per trial.

    .venv/bin/python bench/gpu.py                      # on a GPU machine; FER2013 if ../shared/data is there
    .venv/bin/python bench/gpu.py --data synthetic
    .venv/bin/python bench/gpu.py --dry-run            # print the commands only
    .venv/bin/python bench/gpu.py --smoke              # tiny CPU run of the same code path (checks the script)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
FER = REPO.parent / "shared" / "data" / "fer2013"
PACK = REPO / "search_spaces/bench_gpu_pack.yaml"

# (model, image size, batch, training images, epochs); the last epochs' images/s are averaged
THROUGHPUT = [("emotion_cnn48", 48, 256, 0, 3), ("resnet50", 224, 128, 8000, 3)]
VARIANTS = {"amp+channels_last": ["amp=true", "channels_last=true"], "fp32": ["amp=false", "channels_last=false"]}


def sh(cmd: list[str], log: Path, dry: bool) -> dict:
    import proc

    print(f"    $ {shown(cmd)}", flush=True)
    if dry:
        return {"wall_s": 0.0, "rc": 0}
    r = proc.run(cmd, log, env={**os.environ, "RAY_DEDUP_LOGS": "1"}, cwd=str(REPO))
    if r["rc"]:
        raise SystemExit(f"failed (rc {r['rc']}); see {log}")
    return r


def shown(cmd: list[str]) -> str:
    """[python, -m, distributed, ...] as the user types it: emotune ..."""
    return " ".join(["emotune", *cmd[3:]] if cmd[1:3] == ["-m", "distributed"] else cmd)


def throughput(data: str, out: Path, dry: bool, smoke: bool) -> list[dict]:
    rows = []
    specs = [("small_cnn", 48, 64, 256, 2)] if smoke else THROUGHPUT
    for model, size, batch, limit, epochs in specs:
        for variant, sets in VARIANTS.items():
            run_dir = out / f"train-{model}-{variant}"
            sets = [f"model={model}", f"image_size={size}", f"batch_size={batch}", f"epochs={epochs}",
                    f"data={data}", f"train_limit={limit}", "pretrained=false", *sets]
            scaling = ["--cpus-per-worker", "1", "--gpus-per-worker", "0"] if smoke else \
                ["--cpus-per-worker", "8", "--gpus-per-worker", "1"]
            cmd = [sys.executable, "-m", "distributed", "train", "--output", str(run_dir), *scaling] + \
                [a for s in sets for a in ("--set", s)]
            r = sh(cmd, out / f"train-{model}-{variant}.log", dry)
            if dry:
                continue
            with open(run_dir / "metrics.csv", newline="") as f:
                hist = list(csv.DictReader(f))
            tail = [float(h["images_per_s"]) for h in hist[1:]] or [float(hist[0]["images_per_s"])]
            rows.append({"model": model, "size": size, "batch": batch, "variant": variant,
                         "img_s": statistics.mean(tail), "wall_s": r["wall_s"]})
    return rows


def packing(data: str, out: Path, dry: bool, smoke: bool) -> list[dict]:
    space = PACK
    if smoke:  # no GPU: the same space on CPU, two trials of one CPU each
        doc = yaml.safe_load(PACK.read_text())
        doc["scaling"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
        doc["fixed"].update(model="small_cnn", epochs=2, batch_size=64)
        space = out / "bench_gpu_pack_smoke.yaml"
        out.mkdir(parents=True, exist_ok=True)
        space.write_text(yaml.safe_dump(doc, sort_keys=False))
    rows = []
    for label, n in (("alone", 1), ("packed", 2 if smoke else 4)):
        storage = out / f"pack-{label}"
        cmd = [sys.executable, "-m", "distributed", "tune", str(space), "--num-samples", str(n),
               "--storage-path", str(storage), "--set", f"data={data}"]
        r = sh(cmd, out / f"pack-{label}.log", dry)
        if dry:
            continue
        exp = next(p for p in storage.iterdir() if p.is_dir())
        trials = []
        for f in exp.glob("*/result.json"):
            res = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            trials.append([x for x in res if "epoch" in x])
        per_trial = [statistics.mean(x["images_per_s"] for x in t[1:] or t) for t in trials]
        rows.append({"mode": label, "trials": n, "wall_s": r["wall_s"],
                     "trial_s": statistics.mean(t[-1]["time_total_s"] for t in trials),
                     "img_s_per_trial": statistics.mean(per_trial), "img_s_total": sum(per_trial)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help=f"default: parquet:{FER} if present, else synthetic")
    p.add_argument("--parts", nargs="+", choices=("throughput", "packing"), default=["throughput", "packing"])
    p.add_argument("--out", default=None, help="default: results/bench/gpu/<time>")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny CPU version (small_cnn) to check the script itself")
    args = p.parse_args(argv)
    import torch

    if not (torch.cuda.is_available() or args.smoke or args.dry_run):
        print("bench/gpu.py: no CUDA GPU here; run it on a GPU machine (or --smoke / --dry-run)", file=sys.stderr)
        return 2
    data = args.data or (f"parquet:{FER}" if FER.exists() and not args.smoke else "synthetic")
    out = Path(args.out or REPO / "results/bench/gpu" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)" if args.smoke else "none"
    import proc

    print(f"{proc.code_version()}; device: {device}; data: {data}; results in {out}", flush=True)
    result = {"device": device, "data": data}
    if "throughput" in args.parts:
        result["throughput"] = throughput(data, out, args.dry_run, args.smoke)
    if "packing" in args.parts:
        result["packing"] = packing(data, out, args.dry_run, args.smoke)
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    if result.get("throughput"):
        print(f"\n{'model':<15}{'size':>5}{'batch':>6}  {'variant':<19}{'img/s':>9}")
        for r in result["throughput"]:
            print(f"{r['model']:<15}{r['size']:>5}{r['batch']:>6}  {r['variant']:<19}{r['img_s']:>9.0f}")
    if result.get("packing"):
        rows = result["packing"]
        print(f"\n{'mode':<8}{'trials':>7}{'wall s':>8}{'s/trial':>9}{'img/s per trial':>16}{'img/s total':>12}")
        for r in rows:
            print(f"{r['mode']:<8}{r['trials']:>7}{r['wall_s']:>8.0f}{r['trial_s']:>9.1f}"
                  f"{r['img_s_per_trial']:>16.0f}{r['img_s_total']:>12.0f}")
        alone, packed = rows[0], rows[1]
        print(f"packing speed-up (aggregate img/s packed / alone): {packed['img_s_total'] / alone['img_s_per_trial']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
