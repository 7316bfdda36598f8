"""Search efficiency: Optuna TPE + ASHA against random search without early stopping, same number of trials.

For each data set and seed, `emotune tune` runs bench/spaces/search_random.yaml (random sampling, every trial
trains all epochs) and bench/spaces/search_asha.yaml (TPE + ASHA), with the sampler seed set to the
seed (the data split and weight initialisation stay at TrainConfig seed 0, so both searches score trials on the
same validation images). Reported: total epochs trained and the best validation accuracy of any trial at any
epoch. Goal: ASHA+TPE within 0.5 points of random search's best using <= 25% of its epochs.

Also reported: the test accuracy of each search's pick (the best trial's best-epoch weights, scored once on the
held-out test split, which no search reads). "Best validation accuracy at any epoch" is a maximum over noisy
evaluations of a ~110-image split, so it rises with the number of evaluations; random search, which evaluates
every epoch of every trial, gets more draws. The pick's test accuracy has no such bias.

`--kinds random asha random-asha` adds random sampling with the same ASHA schedule (the replay's winner, BENCHMARKS
3b) beside TPE + ASHA; searches already in `--out DIR`'s search_efficiency.json are reused, not run again.

CPU scale (the default, ~35 minutes on 2 idle cores): small_cnn, 16 trials x 12 epochs, 2 trials at a time; ASHA
grace 2, reduction factor 3 (rungs at 2 and 6 epochs: the shipped default; grace 1, reduction factor 4 until git
14e9de5).

    python -m bench.hpo.search_efficiency
    python -m bench.hpo.search_efficiency --datasets fer2013_small --seeds 0 --trials 16
    python -m bench.hpo.search_efficiency --datasets fer2013_small --kinds random asha random-asha --out DIR
    python -m bench.hpo.search_efficiency --table results/bench/search_efficiency/<time>   # re-print a finished run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

from bench.common import DATA, SPACES, code_version, leaderboard, out_dir, tune
from bench.hpo.search_replay import asha_stops, ray_rungs

# kind -> (space, what the bench changes in it besides the seed). "random-asha" is the replay's winner (section 3b):
# the same schedule as "asha" with random sampling instead of TPE.
KINDS = {"random": (SPACES / "search_random.yaml", {}), "asha": (SPACES / "search_asha.yaml", {}),
         "random-asha": (SPACES / "search_asha.yaml", {"search.algorithm": "random"})}
LABELS = {"asha": "TPE+ASHA", "random-asha": "random+ASHA"}


def kind_sets(kind: str, seed: int, epochs: int) -> list[str]:
    """The --set pairs one search runs with: its kind's, the search seed, and ASHA's max_t following --epochs (no
    trial is cut short of the epochs random search trains)."""
    src, changes = KINDS[kind]
    if yaml.safe_load(src.read_text()).get("scheduler") not in (None, "none"):
        changes = {**changes, "scheduler.asha.max_t": epochs}
    return [a for k, v in {**changes, "search.seed": seed}.items() for a in ("--set", f"{k}={v}")]


def one_search(kind: str, dataset: str, seed: int, trials: int, epochs: int, out: Path, sets=()) -> dict:
    storage = out / f"{dataset}-seed{seed}-{kind}"
    run, exp = tune(KINDS[kind][0], storage, storage.with_suffix(".log"), "--num-samples", str(trials),
                    *kind_sets(kind, seed, epochs),
                    "--set", f"data=imagefolder:{DATA / dataset}", "--set", f"epochs={epochs}",
                    *(a for kv in sets for a in ("--set", kv)))
    rows = leaderboard(exp)
    scored = [r["best_val_acc"] for r in rows if r["best_val_acc"] is not None]
    return {"kind": kind, "dataset": dataset, "seed": seed, "wall_s": run["wall_s"], "cpu": run["cpu"],
            "trials": len(rows), "epochs": sum(r["epochs_run"] for r in rows), "best": max(scored),
            "pick": rows[0]["trial_id"], "pick_test_acc": pick_test_acc(exp, rows[0]["trial_id"]),
            "rung_spearman": rung_correlation(exp, list(range(1, epochs + 1))) if kind == "random" else None,
            "val_count": None, "statuses": sorted(r["status"] for r in rows),
            "epochs_per_trial": sorted((r["epochs_run"] for r in rows), reverse=True)}


def pick_test_acc(exp: Path, trial_id: str) -> float:
    """Test accuracy of the best-epoch weights the trial kept (its latest checkpoint carries best_model.pt)."""
    from distributed.evaluate import score_model

    ckpt = max((exp / trial_id).glob("checkpoint_*"), key=lambda p: p.name)
    scored = score_model(ckpt / "best_model.pt", "test")
    return float((scored.y_pred == scored.y_true).mean())


def curves(exp: Path) -> list[list[float]]:
    """Each trial's val_acc per epoch, trials in their folders' order (results.read_trials)."""
    from distributed.results import read_trials

    return [[r["val_acc"] for r in t["rows"]] for t in read_trials(str(exp)) if t["rows"]]


def rung_correlation(exp: Path, epochs: list[int]) -> dict[int, float]:
    """Spearman rank correlation, over random search's trials (every one trained all epochs), between val_acc at
    epoch e and the trial's best val_acc over the whole run: how well a rung at epoch e ranks trials."""
    from scipy.stats import spearmanr

    found = curves(exp)
    return {e: float(spearmanr([c[e - 1] if len(c) >= e else float("nan") for c in found], [max(c) for c in found],
                               nan_policy="omit").statistic) for e in epochs}


def random_curves(out: Path, dataset: str) -> list[list[float]]:
    """val_acc per epoch of every random-search trial of a finished run, all seeds (same split, so comparable)."""
    return [c for f in sorted(out.glob(f"{dataset}-seed*-random/*/emotune.json")) for c in curves(f.parent)]


def rungs(grace: int, rf: float, max_t: int) -> list[int]:
    """Ray's ASHA milestones (one bracket) below max_t: a rung at max_t stops nothing."""
    return [m for m in ray_rungs(grace, rf, max_t) if m < max_t]


def replay_asha(curves: list[list[float]], grace: int, rf: float, max_t: int, concurrency: int) -> tuple[int, float]:
    """Ray's AsyncHyperBandScheduler rule (ray/tune/schedulers/async_hyperband.py, _Bracket.on_result) replayed on
    recorded learning curves, trials started in list order, `concurrency` at a time, every epoch one time step:
    at a rung, a trial stops if its val_acc is below the (1 - 1/rf) percentile of the values already recorded
    there. -> (epochs spent, best val_acc seen)."""

    recorded_at = {m: [] for m in rungs(grace, rf, max_t)}
    waiting, running, spent, best = list(range(len(curves))), [], 0, 0.0
    while waiting or running:
        while waiting and len(running) < concurrency:
            running.append([waiting.pop(0), 0])
        still = []
        for trial in running:
            trial[1] += 1
            spent += 1
            value = curves[trial[0]][trial[1] - 1]
            best = max(best, value)
            stop = trial[1] >= min(max_t, len(curves[trial[0]]))
            if trial[1] in recorded_at:
                stop = stop or asha_stops(recorded_at[trial[1]], value, rf)
                recorded_at[trial[1]].append(value)
            if not stop:
                still.append(trial)
        running = still
    return spent, best


def replay_table(out: Path, datasets: list[str], sizes=(16, 64), repeats: int = 300) -> None:
    """ASHA's cost and result as the number of trials and the schedule change, replayed on the random searches'
    recorded curves (bootstrap: N curves drawn with replacement, random order; random sampling, not TPE)."""
    import random

    asha = yaml.safe_load(KINDS["asha"][0].read_text())["scheduler"]["asha"]
    schedules = list(dict.fromkeys([(asha["grace_period"], asha["reduction_factor"]), (2, 4), (2, 3), (4, 3)]))
    print(f"\nASHA replayed on random search's recorded curves (2 at a time; {repeats} bootstrap draws of N trials; "
          f"random sampling, not TPE; the first schedule is the one measured above):")
    print(f"{'dataset':<15}{'curves':>7}{'grace':>6}{'rf':>4}{'N':>5}{'epochs asha/all':>17}{'best diff pt (mean)':>21}"
          f"{'within 0.5 pt':>15}")
    for dataset in datasets:
        curves = random_curves(out, dataset)
        if not curves:
            continue
        max_t = max(len(c) for c in curves)  # the searches ran ASHA with max_t = their epochs
        for grace, rf in schedules:
            for n in sizes:
                rng = random.Random(n)  # the same draws for every schedule
                frac, diff, ok = [], [], 0
                for _ in range(repeats):
                    draw = [rng.choice(curves) for _ in range(n)]
                    spent, best = replay_asha(draw, grace, rf, max_t, 2)
                    full = max(max(c[:max_t]) for c in draw)
                    frac.append(spent / sum(min(len(c), max_t) for c in draw))
                    diff.append(100 * (best - full))
                    ok += diff[-1] >= -0.5
                print(f"{dataset:<15}{len(curves):>7}{grace:>6}{rf:>4}{n:>5}{statistics.mean(frac):>17.2f}"
                      f"{statistics.mean(diff):>+21.2f}{ok / repeats:>15.0%}")


def sha_floor(grace: int, rf: float, max_t: int) -> float:
    """Epochs per trial, as a fraction of max_t, if successive halving ran ideally (every rung sees all its trials and
    keeps exactly the top 1/rf; survivors of the last rung run to max_t). Asynchronous ASHA spends more: a trial is
    judged only against the results already recorded at its rung, so the first trials to arrive always continue."""
    milestones = rungs(grace, rf, max_t) + [max_t]
    epochs = sum((m - prev) / rf ** i for i, (prev, m) in enumerate(zip([0] + milestones, milestones)))
    return epochs / max_t


def val_count(dataset: str, sets=()) -> int:
    """Validation images of the bench space's split of `dataset` (the same for every trial: seed 0)."""
    from distributed.config import TrainConfig
    from distributed.data import load_data
    from distributed.search_space import load_space
    from distributed.splits import make_splits

    space = load_space(KINDS["random"][0], [f"data=imagefolder:{DATA / dataset}", *sets])
    cfg = TrainConfig.from_dict(space.fixed)
    return len(make_splits(load_data(cfg), cfg).val_y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["fer2013_small", "ckplus48"], help="folders of ../shared/data")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig override for every search (repeatable), e.g. group_by=subject for ckplus48")
    p.add_argument("--kinds", nargs="+", default=["random", "asha"], choices=list(KINDS),
                   help="searches per data set and seed (random is the baseline, always run)")
    p.add_argument("--out", default=None, help="default: results/bench/search_efficiency/<time>; searches already "
                   "in its search_efficiency.json (same data set, seed and kind) are not run again")
    p.add_argument("--table", default=None, metavar="DIR", help="re-print the tables of a finished run in DIR")
    args = p.parse_args(argv)
    if args.table:
        out = Path(args.table).resolve()
        pairs = json.loads((out / "search_efficiency.json").read_text())
        for res in pairs:  # runs written before the rank correlation was part of the result
            r = res["random"]
            if r.get("rung_spearman") is None:
                exp = next(p for p in (out / f"{r['dataset']}-seed{r['seed']}-random").iterdir() if p.is_dir())
                r["rung_spearman"] = rung_correlation(exp, list(range(1, max(r["epochs_per_trial"]) + 1)))
        args.datasets = list(dict.fromkeys(res["random"]["dataset"] for res in pairs))
        args.epochs = max(pairs[0]["random"]["epochs_per_trial"])
        report(pairs, args)
        replay_table(out, args.datasets)
        return 0
    out = out_dir("search_efficiency", args.out)
    saved = out / "search_efficiency.json"
    done = {(res["random"]["dataset"], res["random"]["seed"]): res
            for res in (json.loads(saved.read_text()) if saved.is_file() else [])}
    kinds = ["random", *(k for k in args.kinds if k != "random")]
    print(f"{code_version()}; {args.trials} trials x {args.epochs} epochs, small_cnn, 2 at a time; "
          f"results in {out}", flush=True)

    pairs = []
    for dataset in args.datasets:
        n_val = val_count(dataset, args.set)
        for seed in args.seeds:
            res = done.get((dataset, seed), {})
            # alternate which search goes first, so a slow spell on the machine does not always hit the same one
            for kind in (kinds if seed % 2 == 0 else kinds[::-1]):
                if kind in res:
                    print(f"  {dataset} seed {seed} {kind}: in {saved.name} already ({res[kind].get('version', '')})")
                    continue
                print(f"  {dataset} seed {seed} {kind} ... (load average {os.getloadavg()[0]:.1f})", flush=True)
                res[kind] = one_search(kind, dataset, seed, args.trials, args.epochs, out, args.set)
                res[kind].update(val_count=n_val, version=code_version())
                r = res[kind]
                print(f"    best val_acc {r['best']:.4f}, {r['epochs']} epochs {r['epochs_per_trial']}, "
                      f"{r['wall_s']:.0f} s", flush=True)
                done[(dataset, seed)] = res
                saved.write_text(json.dumps(list(done.values()), indent=1) + "\n")  # a kill keeps what finished
            pairs.append(res)
    report(pairs, args)
    replay_table(out, args.datasets)
    return 0


def report(pairs: list[dict], args) -> int:
    asha = yaml.safe_load(KINDS["asha"][0].read_text())["scheduler"]["asha"]
    floor = sha_floor(asha["grace_period"], asha["reduction_factor"], args.epochs)  # max_t = the epochs
    kinds = [k for k in KINDS if k != "random" and any(k in res for res in pairs)]
    spread = lambda v: f"mean {statistics.mean(v):+.2f}, range {min(v):+.2f}..{max(v):+.2f}"  # noqa: E731
    for kind in kinds:
        mine = [res for res in pairs if kind in res]
        label = LABELS[kind]
        print(f"\n{label} against random search")
        print(f"{'dataset':<15}{'seed':>5}{'val imgs':>9}{'random best':>12}{'best':>8}{'diff pt':>8}"
              f"{'random ep':>10}{'epochs':>8}{'ratio':>7}{'rand test':>10}{'test':>8}{'random s':>9}{'s':>7}")
        for res in mine:
            r, a = res["random"], res[kind]
            print(f"{r['dataset']:<15}{r['seed']:>5}{r['val_count']:>9}{r['best']:>12.4f}{a['best']:>8.4f}"
                  f"{100 * (a['best'] - r['best']):>+8.2f}{r['epochs']:>10}{a['epochs']:>8}"
                  f"{a['epochs'] / r['epochs']:>7.2f}{r['pick_test_acc']:>10.4f}{a['pick_test_acc']:>8.4f}"
                  f"{r['wall_s']:>9.0f}{a['wall_s']:>7.0f}")
        for dataset in args.datasets:
            ds = [res for res in mine if res["random"]["dataset"] == dataset]
            if not ds:
                continue
            diffs = [100 * (res[kind]["best"] - res["random"]["best"]) for res in ds]
            frac = [res[kind]["epochs"] / res["random"]["epochs"] for res in ds]
            ok = sum(d >= -0.5 and f <= 0.25 for d, f in zip(diffs, frac))
            tdiffs = [100 * (res[kind]["pick_test_acc"] - res["random"]["pick_test_acc"]) for res in ds]
            print(f"{dataset}: {label} - random best val_acc (points) {spread(diffs)}; epochs {label}/random "
                  f"{statistics.mean(frac):.2f} (range {min(frac):.2f}..{max(frac):.2f}); "
                  f"goal met in {ok}/{len(ds)} seeds; "
                  f"1 validation image = {100 / ds[0]['random']['val_count']:.2f} points; "
                  f"test accuracy of the picks, {label} - random (points) {spread(tdiffs)}")
    print("\nrank correlation (Spearman, random search's trials) of val_acc at epoch e with the trial's best val_acc; "
          "ASHA's rungs are at " + ", ".join(map(str, rungs(asha["grace_period"], asha["reduction_factor"],
                                                            args.epochs))))
    for dataset in args.datasets:
        mine = [res["random"]["rung_spearman"] for res in pairs if res["random"]["dataset"] == dataset]
        print(f"  {dataset:<15}" + "  ".join(f"e{e}: {statistics.mean(m[e] for m in mine):+.2f}"
                                              for e in sorted(mine[0], key=int)))
        print(f"  {'':<15}" + "  ".join(f"{'':>3} {min(m[e] for m in mine):+.2f}..{max(m[e] for m in mine):+.2f}"
                                        for e in sorted(mine[0], key=int)[:4]) + "  (range over seeds, e1-e4)")
    print(f"ideal successive-halving floor for this schedule (grace {asha['grace_period']}, reduction factor "
          f"{asha['reduction_factor']}, max_t {args.epochs}): {floor:.1%} of random search's "
          f"epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
