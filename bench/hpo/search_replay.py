"""Search strategies replayed on recorded learning curves (a tabular benchmark, like LCBench / HPOBench).

Each Parquet file (bench/hpo/curves.py writes one) holds full curves: one row per (config, epoch). A real
Optuna study runs each strategy: its sampler proposes a config, the replay answers with the NEAREST recorded one
(categoricals must match; numeric parameters by normalised distance, log-scaled learning rates and weight decay)
and walks that config's curve epoch by epoch (`trial.report(val_acc, epoch)`, `trial.should_prune()`), counting
the epochs spent. Simplifications: every epoch takes the same time (so `--concurrency K` trials at once advance in
step; with K = 1, the default, trials run one after another and no straggler exists), and a proposal gets the
nearest recorded config's curve (a finite table: repeats give the same curve; `--answer unused` gives each proposal
the nearest config the search has not run yet; `--answer blend`, a surrogate, the distance-weighted mean of the 3
nearest curves of its (model, batch size) cell). Besides Optuna's samplers and pruners: Ray's ASHA rule (with
brackets, or judging the best value so far) and synchronous successive halving (`sync-sh`, every rung waits for
all its trials). replay.png draws regret against epochs for the strategies `--figure` names.

Random search (N trials, every one trained to the end) sets the budget and the target per seed. Reported per
strategy and data set, median [IQR] over seeds:
  - reach: epochs spent until the strategy's best validation accuracy is within one validation image (1/n_val)
    of random search's final best, as a share of random's epochs (not reached within random's budget: inf);
  - regret at 25% / 50% / 100% of random's epochs: the best val_acc in the table minus the strategy's best so far;
  - pick test: test_acc_at_best of the config the strategy ranks best (best val_acc at any epoch) at 25% and
    100% of the budget. For a stopped trial that is the full run's best-epoch test accuracy (an approximation).

    python -m bench.hpo.search_replay bench/curves/curves_fer2013_small.parquet bench/curves/curves_ckplus48.parquet \
        --seeds 20 --out results/bench/search_replay
"""
from __future__ import annotations

import argparse
import csv
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pyarrow.parquet as pq
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

PARAMS = ("model", "lr_head", "weight_decay", "dropout", "mixup_alpha", "batch_size", "label_smoothing")
CATEGORICAL = ("model", "batch_size")
LOG = ("lr_head", "weight_decay")  # searched on a log scale (when every recorded value is positive)
BUDGETS = (0.25, 0.5, 1.0)
GRID = 40  # the figure's points along random search's budget


# ------------------------------------------------------------------------------------------ the table

@dataclass
class Table:
    """One data set's recorded curves: params per config, val_acc [config, epoch] (NaN where a run diverged)."""
    dataset: str
    params: list[dict]
    val_acc: np.ndarray
    test_acc: np.ndarray
    n_val: int
    space: dict  # name -> Optuna distribution over the recorded range

    @property
    def epochs(self) -> int:
        return self.val_acc.shape[1]

    def coords(self, params: list[dict]) -> np.ndarray:
        """Numeric parameters on the search's scale (log where searched on a log scale), range mapped to [0, 1]."""
        cols = []
        for name, dist in self.space.items():
            if isinstance(dist, FloatDistribution):
                f = math.log if dist.log else float
                cols.append([(f(p[name]) - f(dist.low)) / (f(dist.high) - f(dist.low)) for p in params])
        return np.array(cols, dtype=float).T.reshape(len(params), -1)

    def nearest(self, proposal: dict, used: set | None = None) -> int:
        """The nearest recorded config; with `used`, the nearest not used yet in this search (all used: any)."""
        if not hasattr(self, "_coords"):
            self._coords = self.coords(self.params)
            self._cats = [(n, np.array([p[n] for p in self.params], dtype=object)) for n, d in self.space.items()
                          if isinstance(d, CategoricalDistribution)]
        d = ((self._coords - self.coords([proposal])) ** 2).sum(axis=1)
        for name, got in self._cats:
            d[got != proposal[name]] = np.inf
        if used and len(used) < len(d):
            fresh = d.copy()
            fresh[list(used)] = np.inf
            if np.isfinite(fresh).any():  # (else every config of this model and batch size is used)
                d = fresh
        return int(np.argmin(d))


    def blend(self, proposal: dict, k: int = 3) -> tuple[np.ndarray, float]:
        """A surrogate answer: the inverse-distance-weighted mean of the k nearest recorded curves of the proposal's
        (model, batch size) cell, each epoch rounded to a whole number of validation images (a recorded config
        proposed exactly gets its own curve). The run diverges where the nearest one did. -> (curve, test_acc)."""
        first = self.nearest(proposal)
        d = np.sqrt(((self._coords - self.coords([proposal])) ** 2).sum(axis=1))
        for name, got in self._cats:
            d[got != proposal[name]] = np.inf
        near = np.argsort(d)[:k]
        near = near[np.isfinite(d[near])]
        if d[first] < 1e-12 or len(near) == 1:
            return self.val_acc[first], float(self.test_acc[first])
        w = 1 / d[near]
        curves = self.val_acc[near]
        ok = np.isfinite(curves)
        mean = (np.where(ok, curves, 0) * w[:, None]).sum(0) / np.maximum((ok * w[:, None]).sum(0), 1e-12)
        curve = np.round(mean * self.n_val) / self.n_val
        curve[~np.isfinite(self.val_acc[first])] = np.nan
        return curve, float((self.test_acc[near] * w).sum() / w.sum())


    def answer(self, proposal: dict, how: str, used: set) -> tuple[np.ndarray, float]:
        """What a proposal trains to: (val_acc curve, test accuracy). how: "nearest" recorded config, "unused"
        (the nearest this search has not run; `used` collects them) or "blend" (a surrogate, see blend)."""
        if how == "blend":
            return self.blend(proposal)
        cid = self.nearest(proposal, used if how == "unused" else None)
        used.add(cid)
        return self.val_acc[cid], float(self.test_acc[cid])


def read_tables(path: Path) -> list[Table]:
    rows = pq.read_table(path).to_pylist()
    tables = []
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset]
        ids = sorted({r["config_id"] for r in mine})
        where = {c: i for i, c in enumerate(ids)}
        epochs = max(r["epoch"] for r in mine)
        val = np.full((len(ids), epochs), np.nan)
        test = np.zeros(len(ids))
        params = [None] * len(ids)
        for r in mine:
            i = where[r["config_id"]]
            val[i, r["epoch"] - 1] = r["val_acc"]
            test[i] = r["test_acc_at_best"]
            params[i] = {k: r[k] for k in PARAMS if k in r}
        space = {}
        for name in params[0]:
            values = [p[name] for p in params]
            if name in CATEGORICAL:
                space[name] = CategoricalDistribution(sorted(set(values)))
            elif max(values) > min(values):
                space[name] = FloatDistribution(min(values), max(values), log=name in LOG and min(values) > 0)
        tables.append(Table(dataset, params, val, test, val_images(val), space))
    return tables


def val_images(val: np.ndarray) -> int:
    """The validation set's size, read off the accuracies (each is k / n_val)."""
    acc = np.unique(val[np.isfinite(val)])
    for n in range(2, 100_000):
        if np.allclose(acc * n, np.round(acc * n), atol=1e-6):
            return n
    raise ValueError("val_acc values are not k / n for any n below 100000")


# -------------------------------------------------------------------------------------- strategies

def ray_rungs(grace: int, rf: float, max_t: int, s: int = 0) -> list[int]:
    """Ray's ASHA milestones for bracket s (async_hyperband.py, _Bracket: min_t * rf**(k + s) for k below
    log(max_t / min_t) / log(rf) - s + 1): the one rung formula of the benches."""
    n = int(math.log(max_t / grace) / math.log(rf) - s + 1)
    return [grace * rf ** (k + s) for k in range(n)]


def asha_stops(seen: list[float], value: float, rf: float) -> bool:
    """Ray's rule at a rung: stop when below the (1 - 1/rf) percentile of the values recorded there before."""
    return bool(seen) and value < np.nanpercentile(seen, (1 - 1 / rf) * 100)


class RayAshaPruner(optuna.pruners.BasePruner):
    """Ray Tune's ASHA rule (ray/tune/schedulers/async_hyperband.py, _Bracket.on_result): at each rung, stop a
    trial whose value is below the (1 - 1/rf) percentile of the values recorded there before it; the first trial
    at a rung always continues. Optuna's SuccessiveHalvingPruner instead promotes, while a rung holds fewer than rf
    trials, only a trial that beats all of them.

    brackets > 1: as Ray's AsyncHyperBandScheduler, bracket s has its first rung at grace * rf**s, and each trial
    joins one at random with probability proportional to e**(rungs in the bracket) (drawn from the study name and
    trial number, so a replay repeats). on="best": a rung judges the trial's best value so far, not its last (the
    service reports it as best_<metric> every epoch)."""

    def __init__(self, grace: int, rf: int, max_t: int, brackets: int = 1, on: str = "last"):
        self.rf, self.on = rf, on
        self.brackets = []
        for s in range(brackets):
            self.brackets.append({m: [] for m in ray_rungs(grace, rf, max_t, s)})
        sizes = np.array([len(b) for b in self.brackets], dtype=float)
        self.p = np.exp(sizes - sizes.max()) / np.exp(sizes - sizes.max()).sum()

    @property
    def recorded(self) -> dict:  # the first bracket's rungs (the only ones with brackets=1)
        return self.brackets[0]

    def bracket(self, study, trial) -> dict:
        if len(self.brackets) == 1:
            return self.brackets[0]
        rng = np.random.default_rng([zlib.crc32(study.study_name.encode()), trial.number])
        return self.brackets[rng.choice(len(self.brackets), p=self.p)]

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        rungs = self.bracket(study, trial)
        if step not in rungs:
            return False
        values = trial.intermediate_values
        value = max(values.values()) if self.on == "best" else values[step]
        stop = asha_stops(rungs[step], value, self.rf)
        rungs[step].append(value)
        return stop


def tpe(seed: int, startup: int = 8):
    # As the service (tune.py): multivariate TPE with the constant liar (it changes nothing when trials run one at
    # a time: no trial is running when the next is asked for).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def tpe_startup(startup: int):
    return lambda seed: tpe(seed, startup)


def random(seed: int):
    return optuna.samplers.RandomSampler(seed=seed)


def sh(grace, rf, bootstrap=0):
    return lambda E: optuna.pruners.SuccessiveHalvingPruner(min_resource=grace, reduction_factor=rf,
                                                            bootstrap_count=bootstrap)


def hyperband(E):
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=E, reduction_factor=3)


def ray_asha(grace, rf, brackets=1, on="last"):
    return lambda E: RayAshaPruner(grace, rf, E, brackets, on)


# name -> (sampler, pruner factory taking the epochs, how a stopped trial is told: "pruned" | "complete").
# g = grace (first rung, epochs), rf = reduction factor. "asha" is Optuna's SuccessiveHalvingPruner (asynchronous
# SH), "ray-asha" Ray's rule (what the service runs); the shipped spaces use g3-g6, rf 3 at 20-40 epochs.
STRATEGIES = {
    "random": (random, None, None),
    "tpe": (tpe, None, None),
    "asha g1 rf3": (random, sh(1, 3), "pruned"),
    "asha g1 rf4": (random, sh(1, 4), "pruned"),
    "asha g2 rf3": (random, sh(2, 3), "pruned"),
    "asha g3 rf3": (random, sh(3, 3), "pruned"),
    "asha g5 rf3": (random, sh(5, 3), "pruned"),
    "asha g3 rf3 bootstrap 2": (random, sh(3, 3, 2), "pruned"),
    "ray-asha g1 rf4": (random, ray_asha(1, 4), "pruned"),
    "ray-asha g2 rf3": (random, ray_asha(2, 3), "pruned"),
    "ray-asha g3 rf3": (random, ray_asha(3, 3), "pruned"),
    "ray-asha g2 rf4": (random, ray_asha(2, 4), "pruned"),
    "ray-asha g2 rf5": (random, ray_asha(2, 5), "pruned"),
    "ray-asha g4 rf4": (random, ray_asha(4, 4), "pruned"),
    "ray-asha g1 rf3 brackets 3": (random, ray_asha(1, 3, 3), "pruned"),
    "ray-asha g2 rf3 brackets 2": (random, ray_asha(2, 3, 2), "pruned"),
    "ray-asha g2 rf3 brackets 3": (random, ray_asha(2, 3, 3), "pruned"),
    "ray-asha g2 rf3 on best": (random, ray_asha(2, 3, on="best"), "pruned"),
    "ray-asha g2 rf4 on best": (random, ray_asha(2, 4, on="best"), "pruned"),
    "ray-asha g2 rf5 on best": (random, ray_asha(2, 5, on="best"), "pruned"),
    "ray-asha g1 rf4 on best": (random, ray_asha(1, 4, on="best"), "pruned"),
    "tpe + ray-asha g2 rf3, PRUNED (shipped since 2026-11-26)": (tpe, ray_asha(2, 3), "pruned"),
    "tpe startup 16 + ray-asha g2 rf3, PRUNED": (tpe_startup(16), ray_asha(2, 3), "pruned"),
    "tpe startup 24 + ray-asha g2 rf3, PRUNED": (tpe_startup(24), ray_asha(2, 3), "pruned"),
    "hyperband g1 rf3": (random, hyperband, "pruned"),
    "sync-sh g2 rf3": (random, None, None),  # synchronous successive halving: measure() runs synchronous_sh
    "sync-sh g2 rf4": (random, None, None),
    "bohb (tpe + hyperband g1 rf3)": (tpe, hyperband, "pruned"),
    "median (warmup 3)": (random, lambda E: optuna.pruners.MedianPruner(5, n_warmup_steps=3), "pruned"),
    "tpe + asha g3 rf3, PRUNED": (tpe, sh(3, 3), "pruned"),
    "tpe + asha g3 rf3, COMPLETE (last value)": (tpe, sh(3, 3), "complete"),
    "tpe + ray-asha g3 rf3, PRUNED (shipped)": (tpe, ray_asha(3, 3), "pruned"),
    "tpe + ray-asha g3 rf3, COMPLETE (last value; Ray's OptunaSearch)": (tpe, ray_asha(3, 3), "complete"),
}


# ------------------------------------------------------------------------------------------ a search

def search(table: Table, strategy: str, seed: int, budget: int | None = None, trials: int | None = None,
           answer: str = "nearest", concurrency: int = 1) -> dict:
    """One study: run trials until `budget` epochs are spent (or `trials` trials ran). Returns the trace: after
    each epoch, the best val_acc so far and the config holding it. answer="unused": each proposal gets the nearest
    recorded config this search has not run yet (a proposal next to one already run is a new run, as in the real
    service, rather than the same curve again; it exhausts the table's configs of a cell first).

    concurrency=K: K trials run at once, as in the service (one epoch = one unit of time for every config; within
    a unit, trials report in the order they started). A new trial is asked for as soon as one ends, while the
    others are still running (TPE's constant liar sees them), and each rung sees results in the order they
    arrive: the first arrivals at a rung always continue under Ray's rule."""
    sampler, pruner, stopped_as = STRATEGIES[strategy]
    # A fixed study name: Optuna's HyperbandPruner assigns trials to brackets by a hash of it (a generated name made
    # Hyperband and BOHB rows differ from run to run before 2026-11-26)
    study = optuna.create_study(direction="maximize", sampler=sampler(seed), study_name=f"{strategy} seed {seed}",
                                pruner=pruner(table.epochs) if pruner else optuna.pruners.NopPruner())
    best, pick, trace = -1.0, math.nan, []  # trace[e] = (best so far, its test accuracy) after e + 1 epochs
    n, used, running = 0, set(), []  # running: [trial, curve, test accuracy, epochs run], in the order they started

    def spent() -> bool:
        return budget is not None and len(trace) >= budget

    while not spent():
        while len(running) < concurrency and (trials is None or n < trials):
            trial = study.ask(table.space)
            curve, test = table.answer(trial.params, answer, used)
            n += 1
            running.append([trial, curve, test, 0])
        if not running:
            break
        for slot in list(running):  # one epoch of every running trial
            trial, curve, test, ran = slot
            acc = curve[ran]
            if not math.isfinite(acc):  # the recorded run diverged here: the service tells FAIL
                study.tell(trial, state=TrialState.FAIL)
                running.remove(slot)
                continue
            if acc > best:
                best, pick = float(acc), test
            trace.append((best, pick))
            slot[3] = ran = ran + 1
            trial.report(float(acc), ran)
            if spent():
                break
            if trial.should_prune():
                state = TrialState.PRUNED if stopped_as == "pruned" else TrialState.COMPLETE
            elif ran == table.epochs:
                state = TrialState.COMPLETE
            else:
                continue
            study.tell(trial, float(acc) if state == TrialState.COMPLETE else None, state=state)
            running.remove(slot)
    return {"trace": trace, "trials": n}


def synchronous_sh(table: Table, seed: int, budget: int, n: int, grace: int, rf: int, answer: str) -> dict:
    """Synchronous successive halving, random sampling: n configs each train to the first rung (grace epochs); once
    ALL of them are there, the best 1/rf go on to the next (grace * rf), and so on; the last survivors train to
    the end. No straggler is promoted before the rung is full, so this is the cost floor that ASHA's asynchronous
    promotion pays above (the rung waits for its slowest trial: wall time is not modelled). A bracket that ends
    before the budget is followed by a new one with fresh configs. -> {"trace"} as search() returns it."""
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler, study_name=f"sync-sh seed {seed}")
    rungs = [r for r in ray_rungs(grace, rf, table.epochs) if r < table.epochs] + [table.epochs]
    best, pick, trace, used = -1.0, math.nan, [], set()
    while len(trace) < budget:
        alive = []
        for _ in range(n):
            trial = study.ask(table.space)
            alive.append(table.answer(trial.params, answer, used))
            study.tell(trial, state=TrialState.PRUNED)  # the sampler is random: what it is told changes nothing
        start = 0
        for rung in rungs:
            for curve, test in alive:
                for e in range(start, rung):
                    if len(trace) >= budget or not math.isfinite(curve[e]):
                        break
                    if curve[e] > best:
                        best, pick = float(curve[e]), test
                    trace.append((best, pick))
            keep = max(1, len(alive) // rf)
            at_rung = [np.nan_to_num(c[rung - 1], nan=-1.0) for c, _ in alive]
            alive = [alive[i] for i in np.argsort(at_rung, kind="stable")[::-1][:keep]]
            start = rung
    return {"trace": trace[:budget]}


def measure(table: Table, strategy: str, seed: int, target: float, budget: int, answer: str = "nearest",
            concurrency: int = 1, trials: int = 0) -> dict:
    if strategy.startswith("sync-sh"):  # "sync-sh gG rfR": concurrency does not apply (every rung waits for all)
        grace, rf = (int(w.lstrip("grf")) for w in strategy.split()[1:3])
        trace = synchronous_sh(table, seed, budget, trials, grace, rf, answer)["trace"]
    else:
        trace = search(table, strategy, seed, budget=budget, answer=answer, concurrency=concurrency)["trace"]
    oracle = float(np.nanmax(table.val_acc))
    reach = next((e + 1 for e, (b, _) in enumerate(trace) if b >= target - 1 / table.n_val + 1e-9), None)
    row = {"dataset": table.dataset, "strategy": strategy, "concurrency": concurrency, "seed": seed,
           "random_epochs": budget,
           "reach": reach / budget if reach else math.inf}
    for share in BUDGETS:
        b, pick = trace[min(len(trace), max(1, round(share * budget))) - 1]
        row[f"regret_{share:g}"] = (oracle - b) * 100
        row[f"pick_test_{share:g}"] = pick
    # regret after each 1/GRID of random's epochs, for the figure (not a CSV column)
    row["regret_grid"] = [(oracle - trace[min(len(trace), max(1, round(i * budget / GRID))) - 1][0]) * 100
                          for i in range(1, GRID + 1)]
    return row


def replay(tables: list[Table], seeds: int, trials: int | None, strategies: list[str],
           answer: str = "nearest", concurrency: tuple[int, ...] = (1,)) -> list[dict]:
    """Random search with N trials (run to the end; its order does not change its result) sets each seed's
    target and budget; every strategy runs at every concurrency against them."""
    rows = []
    for table in tables:
        n = trials or max(8, len(table.params) // 2)
        for seed in range(seeds):
            ran = search(table, "random", seed, trials=n, answer=answer)
            target, budget = ran["trace"][-1][0], len(ran["trace"])
            for k in concurrency:
                for strategy in strategies:
                    tic = time.perf_counter()
                    rows.append({**measure(table, strategy, seed, target, budget, answer, k, n), "random_trials": n,
                                 "random_best": target, "n_val": table.n_val,
                                 "wall_s": round(time.perf_counter() - tic, 3)})
    return rows


# ------------------------------------------------------------------------------------------- reports

def median_iqr(values: list[float], fmt: str) -> str:
    # "not reached" (inf) sorts last; a quartile that falls on it reads inf
    q1, med, q3 = np.percentile(np.nan_to_num(values, posinf=1e300), [25, 50, 75])
    q1, med, q3 = (math.inf if v >= 1e200 else v for v in (q1, med, q3))
    def f(v: float) -> str:
        return "inf" if math.isinf(v) else format(v, fmt)

    return f"{f(med)} [{f(q1)}, {f(q3)}]"


def markdown(rows: list[dict]) -> str:
    lines = [("| data (val images, random trials x epochs) | strategy | at once | epochs to random's best / random's "
              "| reached | regret @25% (pt) | regret @50% (pt) | regret @100% (pt) | pick test @25% | pick test @100% |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        first = mine[0]
        label = (f"{dataset} ({first['n_val']}, {first['random_trials']} x "
                 f"{first['random_epochs'] // first['random_trials']})")
        for strategy, k in dict.fromkeys((r["strategy"], r["concurrency"]) for r in mine):
            rs = [r for r in mine if r["strategy"] == strategy and r["concurrency"] == k]
            lines.append("| " + " | ".join([
                label, strategy, str(k), median_iqr([r["reach"] for r in rs], ".2f"),
                f"{sum(math.isfinite(r['reach']) for r in rs)}/{len(rs)}",
                *(median_iqr([r[f"regret_{s:g}"] for r in rs], ".1f") for s in BUDGETS),
                median_iqr([r["pick_test_0.25"] for r in rs], ".3f"), median_iqr([r["pick_test_1"] for r in rs], ".3f"),
            ]) + " |")
            label = ""
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path, strategies: list[str]) -> None:
    """Regret (points below the table's best val_acc) against epochs spent as a share of random search's, median
    over seeds with the interquartile band; one panel per data set and trials at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    ks = list(dict.fromkeys(r["concurrency"] for r in rows))
    fig, axes = plt.subplots(len(datasets), len(ks), figsize=(4.6 * len(ks), 3.3 * len(datasets)), squeeze=False)
    x = np.arange(1, GRID + 1) / GRID
    for (i, dataset), (j, k) in ((a, b) for a in enumerate(datasets) for b in enumerate(ks)):
        ax = axes[i][j]
        for strategy in strategies:
            grid = np.array([r["regret_grid"] for r in rows if r["dataset"] == dataset and r["concurrency"] == k
                             and r["strategy"] == strategy])
            if not len(grid):
                continue
            q1, med, q3 = np.percentile(grid, [25, 50, 75], axis=0)
            line, = ax.plot(x, med, label=strategy.split(" (")[0])
            ax.fill_between(x, q1, q3, color=line.get_color(), alpha=0.15)
        n_val = next(r["n_val"] for r in rows if r["dataset"] == dataset)
        ax.axhline(100 / n_val, color="grey", lw=0.8, ls=":")
        ax.axvline(0.25, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{dataset}, {k} at once", xlabel="epochs / random search's epochs", ylim=(0, None))
        ax.set_ylabel("regret (points of val_acc)")
    axes[0][0].legend(fontsize=7)
    fig.text(0.01, 0.005, "median over seeds, band: 25th-75th percentile; dotted: one validation image; "
             "dashed: the 25% goal", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curves", nargs="+", type=Path, help="Parquet files of recorded curves")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--trials", type=int, default=None,
                    help="random search's trials, which set the budget (default: half the recorded configs, >= 8)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES), metavar="NAME")
    ap.add_argument("--answer", choices=("nearest", "unused", "blend"), default="nearest",
                    help="a proposal gets the nearest recorded config, the nearest this search has not run, or the "
                         "distance-weighted mean of the 3 nearest curves of its cell (a surrogate)")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1], metavar="K",
                    help="trials running at once (each value replays every strategy; default: 1)")
    ap.add_argument("--figure", nargs="+", default=None, metavar="NAME",
                    help="strategies drawn in replay.png (default: the first four replayed)")
    ap.add_argument("--out", type=Path, required=True, help="directory for replay.csv, replay.md and replay.png")
    args = ap.parse_args(argv)
    missing = [p for p in args.curves if not p.is_file()]
    if missing:
        raise SystemExit(f"{missing[0]}: no such curves file; record one with python -m bench.hpo.curves")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tic = time.perf_counter()
    if min(args.concurrency) < 1:
        raise SystemExit("--concurrency: each value must be >= 1 (trials running at once)")
    unknown = [s for s in args.figure or () if s not in args.strategies]
    if unknown:
        raise SystemExit(f"--figure: {unknown[0]!r} is not replayed; name it in --strategies too")
    rows = replay([t for p in args.curves for t in read_tables(p)], args.seeds, args.trials, args.strategies,
                  args.answer, tuple(args.concurrency))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "replay.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "regret_grid"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    (args.out / "replay.md").write_text(table)
    figure(rows, args.out / "replay.png", args.figure or args.strategies[:4])
    print(table + f"\n{len(rows)} searches in {time.perf_counter() - tic:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
