"""Service overhead: the same fixed trials through `emotune tune` and through a plain PyTorch loop.

Three runs of the same N configurations x E epochs (search_spaces/bench_overhead.yaml: small_cnn, synthetic data,
fixed points_to_evaluate, no scheduler, no early stopping, one trial at a time), side by side in one invocation:

  plain   this script's own loop in one process, no Ray: same data tensors, model, seeds, batch size, augment,
          MixUp, OneCycle schedule and per-epoch validation as train_loop_per_worker (no checkpoints)
  direct  `emotune tune search_spaces/bench_overhead.yaml`: one-worker trials run in the trial process
  group   `emotune tune search_spaces/bench_overhead_group.yaml`: the same trials, each in a Ray Train worker group

Each run is a fresh process (interpreter start and imports included on both sides); plain runs first and last,
and the ratio uses their mean (their difference shows how noisy the machine was). CPU seconds of every process in
each run's tree are read from /proc, split into trial/worker processes, the driver and Ray's system processes.

    .venv/bin/python bench/overhead.py                       # short (4 x 2 epochs) and long (3 x 10 epochs, ~40 s) trials
    .venv/bin/python bench/overhead.py --scales 3x10 --modes plain direct
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SPACES = {"direct": REPO / "search_spaces/bench_overhead.yaml", "group": REPO / "search_spaces/bench_overhead_group.yaml"}


# ------------------------------------------------------------------------------------------ the plain loop

def plain_main(config_file: str, threads: int) -> int:
    """Child process: train each TrainConfig in the file one after another; print one JSON line of timings."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import accuracy_score, f1_score
    from torch import nn

    from distributed.config import TrainConfig
    from distributed.data import load_pool, make_splits, mix_transform
    from distributed.models import create_model, native_size, stages
    from distributed.train import make_schedule, prepare_batch, steps_per_epoch

    tic0 = time.perf_counter()
    torch.set_num_threads(threads)
    configs = [TrainConfig.from_dict(c) for c in json.loads(Path(config_file).read_text())]
    first = configs[0]  # decoded once, like the driver does for a search (every config shares the data keys)
    pool = load_pool(first.data, in_channels=first.in_channels, size=first.data_size, seed=first.seed)
    trials = []
    for cfg in configs:
        t_trial = time.perf_counter()
        torch.manual_seed(cfg.seed)
        s = make_splits(pool, cfg.classes, cfg.val_fraction, cfg.seed, cfg.train_limit)
        k = len(s.class_names)
        train_x, train_y = torch.from_numpy(s.train_x), torch.from_numpy(s.train_y)
        val_x, val_y = torch.from_numpy(s.val_x), torch.from_numpy(s.val_y)
        net = create_model(cfg.model, k, in_channels=cfg.in_channels, dropout=cfg.dropout)
        groups = stages(net)
        lrs = [cfg.lr_head] + [cfg.lr_backbone] * (len(groups) - 1)
        opt = torch.optim.AdamW([{"params": list(g.parameters()), "lr": lr} for g, lr in zip(groups, lrs)],
                                weight_decay=cfg.weight_decay)
        steps = steps_per_epoch(len(train_y), 1, cfg.batch_size)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        mix = mix_transform(cfg.mixup_alpha, cfg.cutmix_alpha, k)
        size = cfg.image_size or native_size(cfg.model)
        sched = make_schedule(cfg, opt, lrs, total_steps=cfg.epochs * steps)
        gen = torch.Generator().manual_seed(cfg.seed * 1000)
        epochs, loop_s = [], 0.0
        for epoch in range(1, cfg.epochs + 1):
            tic = time.perf_counter()
            gen.manual_seed(cfg.seed * 1000 + epoch * 10)
            net.train()
            order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            seen = 0
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < 2:
                    continue
                # augmentation happens inside prepare_batch, on [0, 1] pixels before normalising (as in the loop)
                x = prepare_batch(train_x[idx], cfg, size, torch.device("cpu"), augment_with=gen if cfg.augment else None)
                y = train_y[idx]
                if mix is not None:
                    x, y = mix(x, y)
                loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss.item()
                seen += len(idx)
            train_s = time.perf_counter() - tic
            net.eval()
            with torch.no_grad():
                logits = torch.cat([net(prepare_batch(val_x[i:i + 256], cfg, size, torch.device("cpu")))
                                    for i in range(0, len(val_y), 256)])
            pred = logits.argmax(1).numpy()
            val_loss = F.cross_entropy(logits, val_y).item()
            epoch_s = time.perf_counter() - tic
            loop_s += epoch_s
            epochs.append({"epoch": epoch, "val_acc": float(accuracy_score(val_y.numpy(), pred)),
                           "val_macro_f1": float(f1_score(val_y.numpy(), pred, average="macro", zero_division=0)),
                           "val_loss": val_loss, "images_per_s": seen / train_s, "epoch_s": epoch_s})
        trials.append({"wall_s": time.perf_counter() - t_trial, "loop_s": loop_s, "epochs": epochs,
                       "config": {k: getattr(cfg, k) for k in ("lr_head", "lr_backbone", "dropout")}})
    print("PLAIN " + json.dumps({"trials": trials, "process_s": time.perf_counter() - tic0,
                                 "threads": torch.get_num_threads(), "np": np.__version__}))
    return 0


# ----------------------------------------------------------------------------------------- the comparison

def trial_rows(exp: Path) -> list[list[dict]]:
    """Each trial's result rows (epoch order), trials in start order."""
    trials = []
    for f in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "epoch" in r]
        if rows:
            trials.append(rows)
    trials.sort(key=lambda rows: rows[0]["timestamp"] - rows[0]["time_total_s"])
    return trials


def summarise_tune(run: dict, exp: Path, n: int, epochs: int) -> dict:
    trials = trial_rows(exp)
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
    line = next(l for l in log.read_text().splitlines() if l.startswith("PLAIN "))
    out = json.loads(line[len("PLAIN "):])
    trials = out["trials"]
    return {**run, "trials": len(trials), "epochs": len(trials[0]["epochs"]),
            "trial_s": sum(t["wall_s"] for t in trials), "loop_s": sum(t["loop_s"] for t in trials),
            "startup_s": statistics.mean(t["wall_s"] - t["loop_s"] for t in trials), "report_s": 0.0,
            "outside_trials_s": run["wall_s"] - sum(t["wall_s"] for t in trials),
            "img_s": statistics.median(e["images_per_s"] for t in trials for e in t["epochs"]),
            "final_val_acc": [t["epochs"][-1]["val_acc"] for t in trials],
            "config": [t["config"] for t in trials]}


def configs_for(n: int, epochs: int) -> list[dict]:
    from distributed.search_space import load_space

    space = load_space(SPACES["direct"], [f"epochs={epochs}"])
    if n > len(space.points):
        raise SystemExit(f"{SPACES['direct']}: only {len(space.points)} points_to_evaluate; use N <= that")
    return [space.trial_config(p) for p in space.points[:n]]


def run_scale(n: int, epochs: int, modes: list[str], out: Path, threads: int) -> list[dict]:
    import proc

    py = sys.executable
    env = {**os.environ, "RAY_DEDUP_LOGS": "1"}
    cfg_file = out / f"configs-{n}x{epochs}.json"
    cfg_file.write_text(json.dumps(configs_for(n, epochs), indent=1))
    rows = []
    for i, mode in enumerate(modes):
        tag = f"{mode}-{n}x{epochs}-{i}"
        print(f"  running {tag} ...", flush=True)
        if mode == "plain":
            # Ray sets OMP_NUM_THREADS = floor(CPUs) in trial and worker processes before torch loads; the plain
            # process gets the same (torch.set_num_threads alone ran 3-5x slower here when other jobs held the cores)
            plain_env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            run = proc.run([py, __file__, "--plain-child", str(cfg_file), "--threads", str(threads)],
                           out / f"{tag}.log", env=plain_env, cwd=str(REPO))
            if run["rc"]:
                raise SystemExit(f"plain loop failed; see {out / f'{tag}.log'}")
            rows.append({"mode": mode, **summarise_plain(run, out / f"{tag}.log")})
        else:
            storage = out / tag
            cmd = [py, "-m", "distributed", "tune", str(SPACES[mode]), "--storage-path", str(storage),
                   "--num-samples", str(n), "--set", f"epochs={epochs}"]
            run = proc.run(cmd, out / f"{tag}.log", env=env, cwd=str(REPO))
            if run["rc"]:
                raise SystemExit(f"emotune tune failed (rc {run['rc']}); see {out / f'{tag}.log'}")
            exp = next(p for p in storage.iterdir() if p.is_dir())
            rows.append({"mode": mode, **summarise_tune(run, exp, n, epochs)})
        r = rows[-1]
        print(f"    wall {r['wall_s']:.1f}s, loop {r['loop_s']:.1f}s, {r['img_s']:.0f} img/s", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    plain = [r for r in rows if r["mode"] == "plain"]
    mean = lambda key: statistics.mean(r[key] for r in plain) if plain else float("nan")  # noqa: E731
    base, base_loop = mean("wall_s"), mean("loop_s")
    base_cpu = statistics.mean(sum(r["cpu"].values()) for r in plain) if plain else float("nan")
    base_rest = base - base_loop
    n, e = rows[0]["trials"], rows[0]["epochs"]
    print(f"\n{n} trials x {e} epochs, one at a time; plain = mean of {len(plain)} plain runs "
          f"(walls {', '.join('%.1f' % r['wall_s'] for r in plain)} s)")
    print(f"{'mode':<8}{'wall s':>8}{'/plain':>8}{'loop s':>8}{'img/s':>7}{'rest s':>8}{'est.':>7}{'CPU s':>8}{'/plain':>8}"
          f"{'s/trial':>9}{'start-up':>9}{'report':>8}{'outside':>9}{'trial':>8}{'driver':>8}{'ray sys':>8}  final val_acc")
    for r in rows:
        cpu = r["cpu"]
        rest = r["wall_s"] - r["loop_s"]
        print(f"{r['mode']:<8}{r['wall_s']:>8.1f}{r['wall_s'] / base:>8.3f}{r['loop_s']:>8.1f}{r['img_s']:>7.0f}"
              f"{rest:>8.1f}{(base_loop + rest) / (base_loop + base_rest):>7.3f}{sum(cpu.values()):>8.1f}"
              f"{sum(cpu.values()) / base_cpu:>8.3f}{r['trial_s'] / r['trials']:>9.1f}{r['startup_s']:>9.2f}"
              f"{r['report_s']:>8.3f}{r['outside_trials_s']:>9.1f}{cpu['trial']:>8.1f}{cpu['driver']:>8.1f}"
              f"{cpu['ray_system']:>8.1f}  " + " ".join(f"{v:.3f}" for v in r["final_val_acc"]))


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
    import proc

    rows = []
    for i in range(repeats):
        for dashboard in (False, True):
            log = out / f"ray-init-dashboard{int(dashboard)}-{i}.log"
            run = proc.run([sys.executable, "-c", RAY_INIT_CHILD, str(int(dashboard))], log, cwd=str(REPO))
            line = next((l for l in log.read_text().splitlines() if l.startswith("RAYINIT")), None)
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
    p.add_argument("--ray-init", type=int, default=2, metavar="N",
                   help="also time ray.init with and without the dashboard, N times each (0: skip)")
    p.add_argument("--modes", nargs="+", default=["plain", "direct", "group", "plain"],
                   help="runs in this order (plain twice brackets the others)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the plain loop (= floor(cpus_per_worker) of the bench spaces: 1)")
    p.add_argument("--out", default=None, help="default: results/bench/overhead/<time>")
    p.add_argument("--table", default=None, metavar="OVERHEAD_JSON", help="re-print the tables of a finished run")
    p.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_child:
        return plain_main(args.plain_child, args.threads)
    if args.table:
        for rows in json.loads(Path(args.table).read_text()):
            print_table(rows)
        return 0

    out = Path(args.out or REPO / "results/bench/overhead" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import proc

    print(f"{proc.code_version()}; results and logs in {out}; load average at start {os.getloadavg()[0]:.2f}",
          flush=True)
    everything = []
    for scale in args.scales:
        n, e = (int(v) for v in scale.split("x"))
        print(f"scale {n} trials x {e} epochs", flush=True)
        rows = run_scale(n, e, args.modes, out, args.threads)
        everything.append(rows)
    init_rows = ray_init_cost(args.ray_init, out) if args.ray_init else []
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (2-core machine; other users' jobs add noise)")
    for rows in everything:
        print_table(rows)
    print("\nwall: whole command (interpreter start, Ray start/stop, data decoding included); loop: train + validation "
          "inside the loop, summed over trials;\nrest: wall - loop (everything else); est.: the wall ratio had the loop "
          "run at the plain runs' mean speed, (plain loop + rest) / plain wall;\nCPU s: all processes of the run, "
          "from /proc; s/trial: the trial's own clock; start-up: trial start -> first epoch begins;\nreport: "
          "checkpoint + report per epoch; outside: wall - sum of the trials' own clocks (Ray/Tune start and stop, "
          "scheduling gaps);\ntrial/driver/ray sys: CPU s of the trial (or Train worker) processes, the emotune "
          "process, Ray's own processes")
    (out / "overhead.json").write_text(json.dumps(everything, indent=1, default=str) + "\n")
    if init_rows:
        (out / "ray_init.json").write_text(json.dumps(init_rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
