"""Model quality on faces nobody tuned on: a search's pick, its median trial, a top-5 ensemble, test-time
augmentation, and a plain recipe given the same CPU time.

For each data set, one search (`emotune tune`; validation from train, or FER2013's PublicTest, never the reported
test split), then every finished trial's best model (the weights its best validation epoch left) is scored once on
the test split:
  pick         the trial the search ranks first (best validation accuracy): what `best_config.yaml` names
  median       the median trial's test accuracy (every trial with a model, ASHA-stopped ones included)
  top-5        the mean of the softmax outputs of the 5 best trials' models (`emotune ensemble --top 5`)
each with test-time augmentation none, flip and ten-crop. Then a plain recipe from the source projects, Adam
(AdamW, weight decay 0) at a constant 1e-3, no MixUp or label smoothing, the same model, data and batch as the
search, is trained by `emotune train` for as many epochs as the whole search spent, so both sides do about the same
work; the CPU-minutes of both (every process of each command's tree, from /proc) are printed side by side.

Protocols: FER2013 selects on PublicTest (`val_from=PublicTest`) and reports PrivateTest; CK+48 (split by person)
validates on whole people (`group_by=subject`, its manifest column) and reports the 24 test people; fer2013_small
carves a stratified validation split from train.

Budgets (state which one a figure came from):
  cpu  fits 2 CPU cores: small_cnn; FER2013 on a stratified 8,000-image subset of Training, 10 epochs, 6 trials;
       CK+48 and fer2013_small 20 epochs, 8 trials (bench/spaces/quality_*_cpu.yaml)
  gpu  the full recipes: FER2013 with search_spaces/fer2013.yaml, CK+48 with bench/spaces/quality_ckplus48_gpu.yaml

    python -m bench.quality --budget cpu
    python -m bench.quality --budget cpu --datasets ckplus48 fer2013_small
    python -m bench.quality --datasets synthetic --seeds 3 --no-plain   # the default search: pick against median
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench import proc
from bench.common import DATA, REPO, SPACES, emotune, out_dir, tune

DATASETS = {"fer2013": ("parquet:{root}/fer2013", ["val_from=PublicTest"]),
            "ckplus48": ("imagefolder:{root}/ckplus48", ["group_by=subject"]),
            "fer2013_small": ("imagefolder:{root}/fer2013_small", []),
            "synthetic": ("synthetic", [])}  # the default `emotune tune` (quick.yaml) as shipped
BUDGET_SPACES = {
    "cpu": {"fer2013": SPACES / "quality_fer2013_cpu.yaml", "ckplus48": SPACES / "quality_ckplus48_cpu.yaml",
            "fer2013_small": SPACES / "quality_fer2013_small_cpu.yaml",
            "synthetic": REPO / "search_spaces" / "quick.yaml"},
    "gpu": {"fer2013": REPO / "search_spaces" / "fer2013.yaml", "ckplus48": SPACES / "quality_ckplus48_gpu.yaml",
            "fer2013_small": SPACES / "quality_fer2013_small_cpu.yaml",
            "synthetic": REPO / "search_spaces" / "quick.yaml"},
}
TTAS = ("none", "flip", "tencrop")
TOP = 5
# the plain recipe: what the source projects train with (Adam 1e-3), nothing searched
PLAIN = {"lr_head": 1e-3, "lr_backbone": 1e-3, "weight_decay": 0.0, "schedule": "constant", "mixup_alpha": 0.0,
         "cutmix_alpha": 0.0, "label_smoothing": 0.0, "early_stop_patience": 0}
ANCHORS = {"fer2013": "published: best single network 73.28% (Khaireddin & Chen 2021), ensembles 75-77%; "
                      "human ~65%",
           "ckplus48": "CK+ papers report subject-wise 10-fold cross-validation (often 95%+ with 3 peak frames per "
                       "sequence); this is one person-independent 777/204 split of all frames",
           "fer2013_small": "no published figure: a small ImageFolder sample of FER2013",
           "synthetic": "procedurally drawn faces (the built-in default data); no published figure"}


def cpu_min(run: dict) -> float:
    return sum(run["cpu"].values()) / 60


def score_trials(exp: Path) -> dict:
    """Every finished trial's best model on the test split, with each TTA; the pick, median and top-5 ensemble."""
    from distributed.config import TrainConfig
    from distributed.data import load_data
    from distributed.ensemble import Ensemble, top_trials
    from distributed.modelfile import MODEL_FORMAT, load_file
    from distributed.results import leaderboard_rows, read_meta, read_trials
    from distributed.splits import make_splits

    meta = read_meta(str(exp))
    rows, _ = leaderboard_rows(read_trials(str(exp)), meta)
    usable = sum(1 for r in rows if r["status"] not in ("error", "diverged") and r[f"best_{meta['metric']}"] is not None)
    chosen = top_trials(exp, usable)  # ranked by validation, each with its best_model.pt
    cfg = TrainConfig.from_dict(chosen[0][1])
    splits = make_splits(load_data(cfg), cfg)
    x, y = torch.from_numpy(splits.test_x), np.asarray(splits.test_y)
    probs = {tta: [] for tta in TTAS}
    for _, _, path in chosen:
        member = Ensemble([load_file(path, MODEL_FORMAT)])
        for tta in TTAS:
            probs[tta].append(member.probs(x, tta))
    acc = {tta: [float((p.argmax(1).numpy() == y).mean()) for p in probs[tta]] for tta in TTAS}
    top = min(TOP, len(chosen))
    out = {"trials_scored": len(chosen), "test_images": int(len(y)), "val_acc": [r[f"best_{meta['metric']}"]
                                                                                for r, _, _ in chosen]}
    for tta in TTAS:
        ens = torch.stack(probs[tta][:top]).mean(0).argmax(1).numpy()
        out[tta] = {"pick": acc[tta][0], "median": statistics.median(acc[tta]), "best_trial": max(acc[tta]),
                    f"top{top}": float((ens == y).mean()), "per_trial": acc[tta]}
    return out


def plain_recipe(space_file: Path, data: str, extra: list[str], epochs: int, out: Path, budget: str) -> dict:
    """`emotune train` with the space's fixed fields (model, data, batch, ...) and the plain recipe."""
    fixed = yaml.safe_load(space_file.read_text()).get("fixed", {})
    sets = {**fixed, **PLAIN, "epochs": epochs, "data": data, **dict(e.split("=", 1) for e in extra)}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    scaling = ["--cpus-per-worker", "1", "--gpus-per-worker", "0"] if budget == "cpu" else ["--cpus-per-worker", "4"]
    run = emotune(["train", *args, "--output", str(out), *scaling], out.parent / "plain.log", echo=True)
    test = json.loads((out / "test_metrics.json").read_text())
    return {"epochs": epochs, "cpu_min": cpu_min(run), "wall_s": run["wall_s"], "test_acc": test["all"]["test_acc"],
            "test_macro_f1": test["all"]["test_macro_f1"]}


def one_dataset(name: str, budget: str, data_root: Path, out: Path, plain: bool, seed: int) -> dict:
    space = BUDGET_SPACES[budget][name]
    data, extra = DATASETS[name]
    data = data.format(root=data_root)
    if seed:  # another sampler seed, training seed and validation split (the plain run's too)
        extra = [*extra, f"seed={seed}"]
    print(f"{name} ({budget} budget, search seed {seed}): search {space.relative_to(REPO)}", flush=True)
    sets = [a for e in [f"data={data}", *extra, *([f"search.seed={seed}"] if seed else [])] for a in ("--set", e)]
    search, exp = tune(space.relative_to(REPO), out / "search", out / "search.log", *sets, echo=True)
    board = json.loads((exp / "emotune.json").read_text())
    epochs_spent = sum(int(r["epochs_run"]) for r in _leaderboard(exp))
    final = final_stage(exp)  # the space's final stage, run by `emotune tune` itself (None without one)
    print(f"  scoring every trial's model on the test split ({', '.join(TTAS)})", flush=True)
    scored = score_trials(exp)
    result = {"dataset": name, "seed": seed, "budget": budget, "space": str(space.relative_to(REPO)), "data": data,
              "protocol": extra, "metric": board["metric"], "search_cpu_min": cpu_min(search),
              "search_wall_s": search["wall_s"], "search_epochs": epochs_spent, "final": final, **scored}
    if plain:
        # the same work: every epoch the search and its final stage trained, in one plain run
        total = epochs_spent + (final["epochs"] if final else 0)
        print(f"  plain recipe for the search's {total} epochs (final stage included)", flush=True)
        result["plain"] = plain_recipe(space, data, extra, total, out / "plain", budget)
    return result


def final_stage(exp: Path) -> dict | None:
    """The final stage's figures from its record (final/ensemble.json): the chosen member (by validation) and the
    ensemble on test, and the epochs its members trained."""
    record = exp / "final" / "ensemble.json"
    if not record.is_file():
        return None
    final = json.loads(record.read_text())
    return {"members": len(final["members"]), "epochs": sum(m["epochs"] for m in final["members"]),
            "chosen": final["single_best"]["all"]["test_acc"], "ensemble": final["ensemble"]["all"]["test_acc"]}


def interval(acc: float, n: int) -> float:
    """Half-width of a test accuracy's 95% interval (normal approximation) on n test images."""
    return 1.96 * (acc * (1 - acc) / n) ** 0.5


def print_paired(results: list[dict]) -> None:
    """Per data set over seeds: final stage (chosen, ensemble) minus the plain run at the same epochs."""
    print("\n| data (test images) | seeds | final chosen - plain (points, mean ± sd) | final ensemble - plain | "
          "plain test_acc (95% interval ±) |")
    print("|---|---:|---:|---:|---:|")
    for name in dict.fromkeys(r["dataset"] for r in results):
        rs = [r for r in results if r["dataset"] == name and r.get("final") and r.get("plain")]
        if not rs:
            continue
        one = [100 * (r["final"]["chosen"] - r["plain"]["test_acc"]) for r in rs]
        ens = [100 * (r["final"]["ensemble"] - r["plain"]["test_acc"]) for r in rs]
        plain = statistics.mean(r["plain"]["test_acc"] for r in rs)

        def ms(v):
            return f"{statistics.mean(v):+.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f}"

        print(f"| {name} ({rs[0]['test_images']}) | {len(rs)} | {ms(one)} | {ms(ens)} | {plain:.3f} "
              f"(± {100 * interval(plain, rs[0]['test_images']):.1f} points) |")


def _leaderboard(exp: Path) -> list[dict]:
    import csv

    with open(exp / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def print_table(results: list[dict]) -> None:
    print("\n| data (test images) | search: trials, epochs, CPU-min | TTA | pick | median trial | best trial "
          "(hindsight) | top-5 ensemble | final stage: chosen / ensemble (members, epochs) | plain recipe (epochs, "
          "CPU-min) |")
    print("|---|---|---|---:|---:|---:|---:|---|---|")
    for r in results:
        top = next(k for k in r["none"] if k.startswith("top"))
        for i, tta in enumerate(TTAS):
            m = r[tta]
            lead = (f"| {r['dataset']} ({r['test_images']}), seed {r['seed']} | {r['trials_scored']}, {r['search_epochs']}, "
                    f"{r['search_cpu_min']:.1f} |" if i == 0 else "| | |")
            plain, final = r.get("plain"), r.get("final")
            tail = (f"{plain['test_acc']:.3f} ({plain['epochs']}, {plain['cpu_min']:.1f})" if plain and i == 0
                    else "")
            fin = (f"{final['chosen']:.3f} / {final['ensemble']:.3f} ({final['members']}, {final['epochs']})"
                   if final and i == 0 else "")
            print(f"{lead} {tta} | {m['pick']:.3f} | {m['median']:.3f} | {m['best_trial']:.3f} | {m[top]:.3f} | "
                  f"{fin} | {tail} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--data-root", default=str(DATA))
    p.add_argument("--no-plain", action="store_true", help="skip the plain-recipe comparison")
    p.add_argument("--seeds", type=int, default=1, help="searches per data set, seeds FIRST..N-1 (sampler, "
                   "training and split; the plain run's too)")
    p.add_argument("--first-seed", type=int, default=0, help="skip the seeds below (run before)")
    p.add_argument("--out", default=None, help="default: results/bench/quality/<budget>-<time>")
    args = p.parse_args(argv)
    out = out_dir("quality", args.out, prefix=f"{args.budget}-")
    root = Path(args.data_root).resolve()
    print(proc.code_version(), flush=True)
    tic = time.perf_counter()
    results = []
    for name in args.datasets:
        for seed in range(args.first_seed, args.seeds):
            where = out / name / f"seed{seed}" if args.seeds > 1 else out / name
            results.append(one_dataset(name, args.budget, root, where, not args.no_plain, seed))
        (out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")  # after each: a crash keeps the rest
    print(f"\n{args.budget} budget, {time.perf_counter() - tic:.0f} s in all; results in {out}")
    print_table(results)
    print_paired(results)
    for r in results:
        print(f"\n{r['dataset']}: protocol {r['protocol'] or 'validation carved from train'}; {ANCHORS[r['dataset']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
