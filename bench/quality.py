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

Compute: `--compute 1 3` trains the plain run at the search's epochs (1x: both sides pass over the images as often)
and at a third of them (3x: the search and its final stage spent three times the plain run's epochs). `--from DIR`
reuses the searches of an earlier run (its quality.json and seed folders) and trains only what is asked: the plain
runs, and with `--final-epochs N` the final stage again at N epochs per member (into the experiment's final_eN/),
so a longer final stage is measured on the very searches the shorter one had; `--final-top-k K --final-seeds S`
reshape it (K configs x S seeds, into final_eN_kKsS/), and `--final-refit` trains its members on the validation
split too (into ..._refit/; the record keeps the search's own stage as final_before, for paired figures);
`--final-keep-last` / `--no-final-keep-last` keeps each member's last / best validation epoch (..._last/, ..._best/).
`--final-distill` adds a single model distilled from the members' ensemble (..._distill/); when the stage otherwise
has the search's own shape, its members are the search's own stage's runs (copied, scored again: no retraining), so
the paired difference is the distilled model alone, and only it trains.
`--set KEY=VALUE` changes the search alone (e.g. `cv_folds=3`: each trial scored on 3 folds by person; the final
stage retrains on all of train as always).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench import proc
from bench.common import DATA, REPO, SPACES, code_version, emotune, leaderboard, out_dir, tune

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
    run = emotune(["train", *args, "--output", str(out), *scaling], out.parent / f"{out.name}.log", echo=True)
    test = json.loads((out / "test_metrics.json").read_text())
    return {"epochs": epochs, "cpu_min": cpu_min(run), "wall_s": run["wall_s"], "test_acc": test["all"]["test_acc"],
            "test_macro_f1": test["all"]["test_macro_f1"]}


def plain_runs(result: dict, space: Path, out: Path, budget: str, compute: list[float]) -> None:
    """The plain recipe at the search's total epochs divided by each compute factor (1: the same work; 3: the search
    side spent three times the plain run's epochs), into result["plain"] (1x) and result["plain_by_compute"]."""
    total = result["search_epochs"] + (result["final"]["epochs"] if result.get("final") else 0)
    runs = result.setdefault("plain_by_compute", {})
    out.mkdir(parents=True, exist_ok=True)
    for factor in compute:
        epochs = max(1, round(total / factor))
        print(f"  plain recipe at {factor:g}x: {epochs} epochs (the search and its final stage: {total})", flush=True)
        where = out / "plain" if factor == 1 else out / f"plain_x{factor:g}"
        runs[f"{factor:g}"] = plain_recipe(space, result["data"], result["protocol"], epochs, where, budget)
    if "1" in runs:
        result["plain"] = runs["1"]


def one_dataset(name: str, budget: str, data_root: Path, out: Path, compute: list[float], seed: int,
                search_sets: list[str] = ()) -> dict:
    space = BUDGET_SPACES[budget][name]
    data, extra = DATASETS[name]
    data = data.format(root=data_root)
    if seed:  # another sampler seed, training seed and validation split (the plain run's too)
        extra = [*extra, f"seed={seed}"]
    print(f"{name} ({budget} budget, search seed {seed}): search {space.relative_to(REPO)}", flush=True)
    sets = [a for e in [f"data={data}", *extra, *([f"search.seed={seed}"] if seed else []), *search_sets]
            for a in ("--set", e)]
    search, exp = tune(space.relative_to(REPO), out / "search", out / "search.log", *sets, echo=True)
    board = json.loads((exp / "emotune.json").read_text())
    epochs_spent = sum(r["epochs_run"] for r in leaderboard(exp))
    final = final_stage(exp)  # the space's final stage, run by `emotune tune` itself (None without one)
    print(f"  scoring every trial's model on the test split ({', '.join(TTAS)})", flush=True)
    scored = score_trials(exp)
    result = {"dataset": name, "seed": seed, "budget": budget, "space": str(space.relative_to(REPO)), "data": data,
              "protocol": extra, "search_sets": list(search_sets), "metric": board["metric"], "search_cpu_min": cpu_min(search),
              "search_wall_s": search["wall_s"], "search_epochs": epochs_spent, "final": final, **scored}
    plain_runs(result, space, out, budget, compute)
    return result


def again(record: dict, out: Path, dest: Path, budget: str, compute: list[float], final_epochs: int | None,
          final_top_k: int | None = None, final_seeds: int | None = None, final_refit: bool | None = None,
          final_keep_last: bool | None = None, final_distill: bool = False) -> dict:
    """An earlier run's search (record, its folder `out`) with, if asked, its final stage again at `final_epochs`
    per member, and `final_top_k` configs x `final_seeds` seeds, `final_refit` and `final_keep_last` when given
    (else the search's own; into the experiment's final_eN[_kKsS][_refit|_last|_best]/), then the plain runs (into
    `dest`); the search itself is not run again."""
    result = {k: v for k, v in record.items() if k not in ("plain", "plain_by_compute")}
    if final_epochs:
        if not record.get("final"):
            raise SystemExit(f"{out}: that search had no final stage, so there is none to run again")
        from distributed.results import read_meta
        from distributed.search_space import load_space

        exp = next(p.parent for p in (out / "search").glob("*/emotune.json"))
        final = load_space(exp / "space.yaml", read_meta(str(exp))["overrides"]).final  # as the search's own stage
        top = final_top_k or record["final"]["members"] // final["seeds"]
        seeds = final_seeds or final["seeds"]
        refit = final.get("refit", False) if final_refit is None else final_refit
        keep_last = final.get("keep_last", False) if final_keep_last is None else final_keep_last
        folder = (f"final_e{final_epochs}" + (f"_k{top}s{seeds}" if final_top_k or final_seeds else "")
                  + ("_refit" if refit else "_last" if final_keep_last else "_best" if final_keep_last is False
                     else "") + ("_distill" if final_distill else ""))
        own = (final_epochs == final["epochs"] and top * seeds == record["final"]["members"] and seeds == final["seeds"]
               and refit == final.get("refit", False) and keep_last == final.get("keep_last", False))
        if final_distill and own and not (exp / folder).exists():  # the same members: only the student trains
            shutil.copytree(exp / "final" / "retrain", exp / folder / "retrain")
        print(f"{record['dataset']} seed {record['seed']}: the final stage again, {top} configs x {seeds} "
              f"seeds x {final_epochs} epochs{', refit' if refit else ''}"
              f"{', last epoch' if keep_last and not refit else ''}{', distilled' if final_distill else ''}",
              flush=True)
        code = (f"from distributed.ensemble import run_ensemble; run_ensemble({str(exp)!r}, {top}, "
                f"output={str(exp / folder)!r}, retrain=True, epochs={final_epochs}, "
                f"seeds={seeds}, train_limit={final['train_limit']}, refit={refit}, keep_last={keep_last}, "
                f"distill={final_distill})")
        run = proc.run([sys.executable, "-c", code], out / f"{folder}.log", cwd=str(REPO))
        if run["rc"]:
            raise SystemExit(f"the final stage failed (rc {run['rc']}); see {out / f'{folder}.log'}")
        result["final"] = {**final_stage(exp, folder), "top_k": top, "seeds": seeds, "cpu_min": cpu_min(run),
                           "wall_s": run["wall_s"]}
        result["final_before"] = record.get("final")  # the search's own stage, for a paired comparison
    space = REPO / result["space"]
    if not space.is_file():  # an earlier bench copied its space into the run's folder
        space = out / "spaces" / Path(result["space"]).name
    plain_runs(result, space, dest, budget, compute)
    return result


def final_stage(exp: Path, folder: str = "final") -> dict | None:
    """The final stage's figures from its record (final/ensemble.json): the chosen member (by validation) and the
    ensemble on test, and the epochs its members trained."""
    record = exp / folder / "ensemble.json"
    if not record.is_file():
        return None
    final = json.loads(record.read_text())
    distilled = final.get("distilled")
    return {"members": len(final["members"]), "refit": final.get("refit", False),
            "keep_last": final.get("keep_last", False),
            # every epoch the stage trained, the distilled model's too (each of its epochs also runs the members)
            "epochs": sum(m["epochs"] for m in final["members"]) + (distilled["epochs"] if distilled else 0),
            "chosen": final["single_best"]["all"]["test_acc"], "ensemble": final["ensemble"]["all"]["test_acc"],
            "member_test_acc": [m["test_acc"] for m in final["members"]],
            "distilled": distilled is not None,
            # the member validation chose (the single model without distill)
            "chosen_by_validation": final["members"][0]["test_acc"] if final["members"][0].get("test_acc") else None}


def interval(acc: float, n: int) -> float:
    """Half-width of a test accuracy's 95% interval (normal approximation) on n test images."""
    return 1.96 * (acc * (1 - acc) / n) ** 0.5


def print_paired(results: list[dict]) -> None:
    """Per data set and compute factor over seeds: final stage (chosen, ensemble) minus the plain run."""
    print("\n| data (test images) | compute | seeds | final chosen - plain (points, mean ± sd; per seed) | "
          "final ensemble - plain | plain test_acc (95% interval ±) |")
    print("|---|---:|---:|---:|---:|---:|")

    def ms(v):
        return (f"{statistics.mean(v):+.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f} "
                f"({' / '.join(f'{x:+.1f}' for x in v)})")

    for name in dict.fromkeys(r["dataset"] for r in results):
        rs = [r for r in results if r["dataset"] == name and r.get("final")]
        for factor in dict.fromkeys(f for r in rs for f in r.get("plain_by_compute", {"1": 0})):
            pairs = [(r, (r.get("plain_by_compute") or {"1": r.get("plain")})[factor]) for r in rs]
            pairs = [(r, p) for r, p in pairs if p]
            if not pairs:
                continue
            one = [100 * (r["final"]["chosen"] - p["test_acc"]) for r, p in pairs]
            ens = [100 * (r["final"]["ensemble"] - p["test_acc"]) for r, p in pairs]
            plain = statistics.mean(p["test_acc"] for _, p in pairs)
            print(f"| {name} ({pairs[0][0]['test_images']}) | {factor}x | {len(pairs)} | {ms(one)} | {ms(ens)} | "
                  f"{plain:.3f} (± {100 * interval(plain, pairs[0][0]['test_images']):.1f} points) |")


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
    p.add_argument("--compute", type=float, nargs="+", default=[1.0], help="plain runs at the search's epochs "
                   "divided by each factor (default 1: the same work; 3: the search spent three times the plain's)")
    p.add_argument("--from", dest="again", default=None, help="reuse the searches of this earlier run's folder")
    p.add_argument("--final-epochs", type=int, default=None, help="with --from: the final stage again, at this "
                   "many epochs per member")
    p.add_argument("--final-top-k", type=int, default=None, help="with --final-epochs: retrain this many configs "
                   "(default: the search's own top_k)")
    p.add_argument("--final-seeds", type=int, default=None, help="with --final-epochs: seeds per config")
    p.add_argument("--final-refit", action=argparse.BooleanOptionalAction, default=None,
                   help="with --final-epochs: members train on the validation split too (default: the space's)")
    p.add_argument("--final-keep-last", action=argparse.BooleanOptionalAction, default=None,
                   help="with --final-epochs: each member its last epoch, not its best validation epoch (default: "
                        "the space's)")
    p.add_argument("--final-distill", action="store_true",
                   help="with --final-epochs: a single model distilled from the members' ensemble too")
    p.add_argument("--seeds", type=int, default=1, help="searches per data set, seeds FIRST..N-1 (sampler, "
                   "training and split; the plain run's too)")
    p.add_argument("--first-seed", type=int, default=0, help="skip the seeds below (run before)")
    p.add_argument("--set", dest="search_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="the search's alone (not the plain run's), e.g. cv_folds=3; the final stage retrains "
                        "without cv_folds")
    p.add_argument("--out", default=None, help="default: results/bench/quality/<budget>-<time>")
    args = p.parse_args(argv)
    if args.final_epochs and not args.again:
        p.error("--final-epochs runs an earlier search's final stage again: give that run's folder with --from")
    if (args.final_top_k or args.final_seeds or args.final_refit is not None
            or args.final_keep_last is not None or args.final_distill) and not args.final_epochs:
        p.error("--final-top-k, --final-seeds, --final-refit and --final-keep-last shape a final stage run again: "
                "give --final-epochs too")
    out = out_dir("quality", args.out, prefix=f"{args.budget}-")
    root = Path(args.data_root).resolve()
    print(code_version(), flush=True)
    tic = time.perf_counter()
    compute = [] if args.no_plain else args.compute
    results = []
    if args.again:
        earlier = Path(args.again).resolve()
        for record in json.loads((earlier / "quality.json").read_text()):
            if record["dataset"] in args.datasets:
                folder = earlier / record["dataset"]
                folder = folder / f"seed{record['seed']}" if (folder / f"seed{record['seed']}").is_dir() else folder
                dest = out / record["dataset"] / f"seed{record['seed']}"
                results.append(again(record, folder, dest, args.budget, compute, args.final_epochs, args.final_top_k,
                                     args.final_seeds, args.final_refit, args.final_keep_last,
                                     args.final_distill))
                (out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    for name in [] if args.again else args.datasets:
        for seed in range(args.first_seed, args.seeds):
            where = out / name / f"seed{seed}" if args.seeds > 1 else out / name
            results.append(one_dataset(name, args.budget, root, where, compute, seed, args.search_sets))
            (out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")  # after each: a crash keeps the rest
    print(f"\n{args.budget} budget, {time.perf_counter() - tic:.0f} s in all; results in {out}")
    print_table(results)
    print_paired(results)
    for name, r in {r["dataset"]: r for r in results}.items():
        print(f"\n{name}: protocol {r['protocol'] or 'validation carved from train'}; {ANCHORS[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
