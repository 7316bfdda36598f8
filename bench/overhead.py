"""Service overhead: the same fixed trials through `emotune tune` and through the loop alone, without Ray.

Three kinds of run of the same N configurations x E epochs (bench/spaces/overhead.yaml: small_cnn, synthetic data,
fixed points_to_evaluate, no scheduler, no early stopping, one trial at a time), side by side in one invocation:

  plain       the configurations one after another in one process, each by the real loop,
              `train.train_loop(cfg, data, LocalRun(device="cpu"))`, with the trial's torch threads: exactly the
              loop's work (checkpoints included) without Ray, Tune or the trial process
  in-process  `emotune tune bench/spaces/overhead.yaml`: one-worker trials run in the trial process
  group       the same space with scaling.worker_group: always (a copy written into OUT/spaces): each trial in a
              one-worker Ray Train worker group

Each run is a fresh process (interpreter start and imports included on both sides). Every mode runs --repeats
times (default 3), the order rotating each round so no mode always goes first; each ratio is taken against the
plain run of the same round, and the median is reported with its min-max over rounds. Wall and CPU seconds both:
a run that keeps a second core busy with Ray's processes is slower on a machine whose cores are all training.
CPU seconds of every process in each run's tree are sampled (bench/proc.py), split into trial/worker processes, the
driver and Ray's system processes.

    python -m bench.overhead                                  # short (4 x 2 epochs) and long (3 x 10 epochs) trials
    python -m bench.overhead --scales 3x10 --modes plain in-process --repeats 5
    python -m bench.overhead --scales 1x1 --modes plain --repeats 1 --ray-init 0   # a smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench import proc
from bench.common import REPO, SPACES, code_version, out_dir, spread, trial_reports, tune

SPACE = SPACES / "overhead.yaml"
MODES = ("plain", "in-process", "group")


# ------------------------------------------------------------------------------------------ the plain loop

def plain_main(config_file: str, threads: int) -> int:
    """Child process: each TrainConfig in the file through the real loop in this process, one after another (the
    data decoded once and shared, as a search's driver shares it); print one JSON line of timings."""
    import torch

    from distributed.config import TrainConfig
    from distributed.data import load_data
    from distributed.train import LocalRun, train_loop

    tic0 = time.perf_counter()
    torch.set_num_threads(threads)
    configs = [TrainConfig.from_dict(c) for c in json.loads(Path(config_file).read_text())]
    data = load_data(configs[0])  # every config shares the data fields (only lr_head, lr_backbone, dropout vary)
    class TimedRun(LocalRun):  # each report's time, as Tune stamps time_this_iter_s
        def report(self, metrics, checkpoint_dir):
            super().report({**metrics, "at": time.perf_counter()}, checkpoint_dir)

    trials = []
    for cfg in configs:
        tic = time.perf_counter()
        run = TimedRun(device="cpu")
        train_loop(cfg, data, run)
        marks = [tic] + [r["at"] for r in run.reports]
        epochs = [{**{k: r[k] for k in ("epoch", "val_acc", "val_macro_f1", "val_loss", "images_per_s", "epoch_s")},
                   "time_this_iter_s": at - before} for r, before, at in zip(run.reports, marks, marks[1:])]
        trials.append({"wall_s": time.perf_counter() - tic, "loop_s": sum(e["epoch_s"] for e in epochs),
                       "epochs": epochs, "config": {k: getattr(cfg, k) for k in ("lr_head", "lr_backbone", "dropout")}})
    print("PLAIN " + json.dumps({"trials": trials, "process_s": time.perf_counter() - tic0,
                                 "threads": torch.get_num_threads()}))
    return 0


# ----------------------------------------------------------------------------------------- the comparison

def summarise_tune(run: dict, exp: Path, n: int, epochs: int) -> dict:
    trials = trial_reports(exp)
    if len(trials) != n or any(len(t) != epochs for t in trials):
        raise SystemExit(f"{exp}: expected {n} trials x {epochs} epochs, found "
                         f"{[len(t) for t in trials]}; see the log next to it")
    trial_s = sum(t[-1]["time_total_s"] for t in trials)  # the trial's own clock, from its start to its last report
    loop_s = sum(r["epoch_s"] for t in trials for r in t)  # train + validation inside the loop
    startup = [t[0]["time_this_iter_s"] - t[0]["epoch_s"] for t in trials]  # trial start -> first epoch begins
    per_epoch = [r["time_this_iter_s"] - r["epoch_s"] for t in trials for r in t[1:]]  # checkpoint + report
    return {**run, "trials": n, "epochs": epochs, "trial_s": trial_s, "loop_s": loop_s,
            "startup_s": statistics.mean(startup), "report_s": statistics.mean(per_epoch) if per_epoch else 0.0,
            "outside_trials_s": run["wall_s"] - trial_s,
            "img_s": statistics.median(r["images_per_s"] for t in trials for r in t),
            "final_val_acc": [t[-1]["val_acc"] for t in trials],
            "config": [{k: t[0]["config"].get(k) for k in ("lr_head", "lr_backbone", "dropout")} for t in trials]}


def summarise_plain(run: dict, log: Path) -> dict:
    line = next(s for s in log.read_text().splitlines() if s.startswith("PLAIN "))
    trials = json.loads(line[len("PLAIN "):])["trials"]
    rows = [t["epochs"] for t in trials]
    cpu = run["cpu"]  # the plain process is proc.run's root ("driver"), but it is what the trials are elsewhere
    run = {**run, "cpu": {"trial": cpu["driver"] + cpu["trial"], "driver": 0.0, "ray_system": cpu["ray_system"]}}
    return {**run, "trials": len(trials), "epochs": len(rows[0]), "trial_s": sum(t["wall_s"] for t in trials),
            "loop_s": sum(t["loop_s"] for t in trials),
            "startup_s": statistics.mean(t[0]["time_this_iter_s"] - t[0]["epoch_s"] for t in rows),
            "report_s": statistics.mean([r["time_this_iter_s"] - r["epoch_s"] for t in rows for r in t[1:]] or [0.0]),
            "outside_trials_s": run["wall_s"] - sum(t["wall_s"] for t in trials),
            "img_s": statistics.median(r["images_per_s"] for t in rows for r in t),
            "final_val_acc": [t[-1]["val_acc"] for t in rows], "config": [t["config"] for t in trials]}


def configs_for(n: int, epochs: int) -> list[dict]:
    from distributed.search_space import load_space

    space = load_space(SPACE, [f"epochs={epochs}"])
    if n > len(space.points):
        raise SystemExit(f"{SPACE}: only {len(space.points)} points_to_evaluate; use N <= that")
    return [space.trial_config(p).to_dict() for p in space.points[:n]]


def run_one(mode: str, n: int, epochs: int, tag: str, out: Path, cfg_file: Path, threads: int) -> dict:
    if mode == "plain":
        # Ray sets OMP_NUM_THREADS = floor(CPUs) in trial and worker processes before torch loads; the plain
        # process gets the same (torch.set_num_threads alone ran 3-5x slower here when other jobs held the cores)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "bench.overhead", "--plain-child", str(cfg_file), "--threads", str(threads)]
        run = proc.run(cmd, out / f"{tag}.log", env=env, cwd=str(REPO))
        if run["rc"]:
            raise SystemExit(f"plain loop failed; see {out / f'{tag}.log'}")
        return summarise_plain(run, out / f"{tag}.log")
    group = ["--set", "scaling.worker_group=always"] if mode == "group" else []
    run, exp = tune(SPACE, out / tag, out / f"{tag}.log", "--num-samples", str(n), "--set", f"epochs={epochs}", *group)
    return summarise_tune(run, exp, n, epochs)


def run_scale(n: int, epochs: int, modes: list[str], repeats: int, out: Path, threads: int) -> list[dict]:
    """Every mode `repeats` times; round r starts at mode r (mod len) so no mode always runs first."""
    cfg_file = out / f"configs-{n}x{epochs}.json"
    cfg_file.write_text(json.dumps(configs_for(n, epochs), indent=1))
    rows = []
    for r in range(repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            tag = f"{mode}-{n}x{epochs}-{r}"
            print(f"  running {tag} ...", flush=True)
            rows.append({"mode": mode, "round": r, **run_one(mode, n, epochs, tag, out, cfg_file, threads)})
            row = rows[-1]
            print(f"    wall {row['wall_s']:.1f}s, CPU {sum(row['cpu'].values()):.1f}s, loop {row['loop_s']:.1f}s, "
                  f"{row['img_s']:.0f} img/s", flush=True)
    return rows


def ratios(rows: list[dict], mode: str, key) -> list[float]:
    """key(row) / key(plain row of the same round), one per round that ran both."""
    plain = {r["round"]: key(r) for r in rows if r["mode"] == "plain"}
    return [key(r) / plain[r["round"]] for r in rows if r["mode"] == mode and r["round"] in plain]


def print_table(rows: list[dict]) -> None:
    def cpu(r):
        return sum(r["cpu"].values())

    def med(values, fmt="{:.1f}"):
        s = spread(values)
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})" if values else "-"

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    n, e = rows[0]["trials"], rows[0]["epochs"]
    rounds = len({r["round"] for r in rows})
    print(f"\n{n} trials x {e} epochs, one at a time; {rounds} rounds; median (min-max) over rounds; ratios against "
          f"the plain run of the same round")
    print(f"{'mode':<11}{'wall s':>20}{'wall/plain':>20}{'CPU s':>20}{'CPU/plain':>20}{'loop s':>8}{'img/s':>7}"
          f"{'start-up':>9}{'report':>8}{'outside':>9}{'trial':>7}{'driver':>7}{'ray sys':>8}")
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        m = lambda key: statistics.median(r[key] for r in mine)  # noqa: E731
        c = lambda key: statistics.median(r["cpu"][key] for r in mine)  # noqa: E731
        wall = med(ratios(rows, mode, lambda r: r["wall_s"]), "{:.3f}")
        print(f"{mode:<11}{med([r['wall_s'] for r in mine]):>20}{wall:>20}"
              f"{med([cpu(r) for r in mine]):>20}{med(ratios(rows, mode, cpu), '{:.3f}'):>20}{m('loop_s'):>8.1f}"
              f"{m('img_s'):>7.0f}{m('startup_s'):>9.2f}{m('report_s'):>8.3f}{m('outside_trials_s'):>9.1f}"
              f"{c('trial'):>7.1f}{c('driver'):>7.1f}{c('ray_system'):>8.1f}")
    print("final val_acc per trial (the same work gives the same figures in every mode):")
    for r in rows:
        print(f"  {r['mode']:<11} round {r['round']}: " + " ".join(f"{v:.4f}" for v in r["final_val_acc"]))


RAY_INIT_CHILD = """
import sys, time
tic = time.perf_counter()
import ray
imported = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=sys.argv[1] == "1", dashboard_host="127.0.0.1",
         logging_level="WARNING", configure_logging=True, resources={"emotune_driver": 1000})
up = time.perf_counter()
ray.shutdown()
print("RAYINIT", imported - tic, up - imported, time.perf_counter() - up)
"""


def ray_init_cost(repeats: int, out: Path) -> list[dict]:
    """ray.init + ray.shutdown of a local instance as `emotune` starts it, with and without the dashboard."""
    rows = []
    for i in range(repeats):
        for dashboard in (False, True):
            log = out / f"ray-init-dashboard{int(dashboard)}-{i}.log"
            run = proc.run([sys.executable, "-c", RAY_INIT_CHILD, str(int(dashboard))], log, cwd=str(REPO))
            line = next((s for s in log.read_text().splitlines() if s.startswith("RAYINIT")), None)
            if run["rc"] or line is None:
                raise SystemExit(f"ray.init measurement failed; see {log}")
            imp, init, stop = (float(v) for v in line.split()[1:])
            rows.append({"dashboard": dashboard, "import_s": imp, "init_s": init, "shutdown_s": stop,
                         "wall_s": run["wall_s"], "cpu_s": sum(run["cpu"].values())})
    print(f"\nray.init(address='local') + ray.shutdown(), {repeats} runs each, alternating")
    print(f"{'dashboard':<10}{'import s':>9}{'init s':>8}{'stop s':>8}{'wall s':>8}{'CPU s':>7}")
    for r in rows:
        print(f"{str(r['dashboard']):<10}{r['import_s']:>9.2f}{r['init_s']:>8.2f}{r['shutdown_s']:>8.2f}"
              f"{r['wall_s']:>8.2f}{r['cpu_s']:>7.2f}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", nargs="*", default=["4x2", "3x10"], help="NxE: N trials of E epochs each")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which runs (plain: the loop alone)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="rounds of every mode (default 3)")
    p.add_argument("--ray-init", type=int, default=2, metavar="N",
                   help="also time ray.init with and without the dashboard, N times each (0: skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the plain loop (= floor(cpus_per_worker) of the bench space: 1)")
    p.add_argument("--out", default=None, help="default: results/bench/overhead/<time>")
    p.add_argument("--table", default=None, metavar="OVERHEAD_JSON", help="re-print the tables of a finished run")
    p.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_child:
        return plain_main(args.plain_child, args.threads)
    if args.table:
        for rows in json.loads(Path(args.table).read_text()):
            if any("round" not in r for r in rows):
                raise SystemExit(f"{args.table}: written before --repeats (no rounds); re-print it with "
                                 f"bench/overhead.py as of the commit that wrote it (git log -- bench/overhead.py)")
            print_table(rows)
        return 0
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: use 1 or more (3 or more for a figure with its spread)")
    modes = list(dict.fromkeys(args.modes))

    out = out_dir("overhead", args.out)
    print(f"{code_version()}; results and logs in {out}; load average at start {os.getloadavg()[0]:.2f}",
          flush=True)
    everything = []
    for scale in args.scales:
        n, e = (int(v) for v in scale.split("x"))
        print(f"scale {n} trials x {e} epochs", flush=True)
        everything.append(run_scale(n, e, modes, args.repeats, out, args.threads))
        (out / "overhead.json").write_text(json.dumps(everything, indent=1, default=str) + "\n")
    init_rows = ray_init_cost(args.ray_init, out) if args.ray_init else []
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (2-core machine; other users' jobs add noise)")
    for rows in everything:
        print_table(rows)
    print("\nwall: whole command (interpreter start, Ray start/stop, data decoding included); CPU s: all processes of "
          "the run, from /proc;\nloop: train + validation inside the loop, summed over trials; start-up: trial start "
          "-> first epoch begins;\nreport: checkpoint + report per epoch (time between reports - epoch_s, in every "
          "mode); outside: wall - sum of the trials' own clocks\n(Ray/Tune start and stop, scheduling gaps); "
          "trial/driver/ray sys: CPU s of the trial (or Train worker) processes, the emotune process, Ray's own")
    if init_rows:
        (out / "ray_init.json").write_text(json.dumps(init_rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
