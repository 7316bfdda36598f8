"""bench/hpo/search_replay.py: its Ray-ASHA pruner follows Ray's own bracket, and a replay on a small written table
measures what it says (real Optuna studies, real Parquet)."""
from __future__ import annotations

import csv
import math
import sys

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from ray.tune.schedulers.async_hyperband import _Bracket

sys.path.insert(0, str(REPO))
from bench.hpo import search_replay


def test_ray_asha_pruner_stops_what_rays_bracket_stops():
    rng = np.random.default_rng(0)
    pruner = search_replay.RayAshaPruner(grace=2, rf=3, max_t=30)
    bracket = _Bracket(min_t=2, max_t=30, reduction_factor=3, s=0)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    assert sorted(pruner.recorded) == sorted(m for m, _ in bracket._rungs) == [2, 6, 18]
    stops = 0
    for n in range(40):
        trial = study.ask()
        ray_trial = type("T", (), {"trial_id": str(n)})()
        for epoch in range(1, 31):
            value = float(rng.integers(0, 100)) / 100  # ties included, as with accuracies
            trial.report(value, epoch)
            ours, rays = trial.should_prune(), bracket.on_result(ray_trial, epoch, value) == "STOP"
            assert ours == rays, (n, epoch)
            if ours:
                stops += 1
                break
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert stops > 10


def write_table(path, dataset="toy", configs=12, epochs=6, n_val=50):
    """Curves that rise to a ceiling set by the learning rate; val_acc are k / n_val as recorded ones are."""
    rows = []
    for c in range(configs):
        lr = 10 ** (-4 + 2 * c / (configs - 1))
        top = 0.3 + 0.5 * (1 - abs(math.log10(lr) + 3))
        for e in range(1, epochs + 1):
            acc = round(top * (1 - math.exp(-e / 2)) * n_val) / n_val
            rows.append({"config_id": c, "dataset": dataset, "model": "small_cnn", "lr_head": lr, "weight_decay": 1e-4,
                         "dropout": 0.1 + 0.04 * c, "mixup_alpha": 0.0, "batch_size": 32 if c % 2 else 64,
                         "label_smoothing": 0.0, "epoch": e, "val_acc": acc, "val_macro_f1": acc, "val_loss": 1.0,
                         "train_loss": 1.0, "epoch_s": 1.0, "test_acc_at_best": top})
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_replay_reads_the_table_and_measures_against_random_search(tmp_path, capsys):
    write_table(tmp_path / "toy.parquet")
    (table,) = search_replay.read_tables(tmp_path / "toy.parquet")
    assert table.n_val == 50 and table.val_acc.shape == (12, 6)
    # a recorded config is its own nearest; batch size must match, so a proposal is never answered across it
    assert [table.nearest(p) for p in table.params] == list(range(12))
    assert table.nearest({**table.params[3], "batch_size": 64, "lr_head": table.params[3]["lr_head"] * 1.01}) in (2, 4)
    # without repeats: a used config is passed over for the nearest unused one of the same cell, until none is left
    assert table.nearest(table.params[3], used={3}) in (1, 5)
    assert table.nearest(table.params[3], used={1, 3, 5, 7, 9, 11}) == 3

    search_replay.main([str(tmp_path / "toy.parquet"), "--seeds", "3", "--out", str(tmp_path / "out"),
                        "--strategies", "random", "asha g1 rf4", "tpe + ray-asha g3 rf3, PRUNED (shipped)"])
    with open(tmp_path / "out" / "replay.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    for r in rows:
        assert float(r["reach"]) <= 1.0 or r["strategy"] != "random"  # random reaches its own best in its budget
        assert float(r["regret_1"]) <= float(r["regret_0.5"]) <= float(r["regret_0.25"])
    table_md = (tmp_path / "out" / "replay.md").read_text()
    assert table_md.count("\n") == 2 + 3 and "toy (50, 8 x 6)" in table_md
    assert "9 searches" in capsys.readouterr().out
    assert (tmp_path / "out" / "replay.png").stat().st_size > 10_000  # the figure, drawn by matplotlib


def test_concurrent_trials_spend_and_find_what_they_report(tmp_path):
    """Trials running at once: random search (no stopping) ends with the same best and epochs whatever the
    concurrency, in another order; with a budget, it is spent exactly."""
    write_table(tmp_path / "toy.parquet")
    (table,) = search_replay.read_tables(tmp_path / "toy.parquet")
    one, four = (search_replay.search(table, "random", 0, trials=8, concurrency=k) for k in (1, 4))
    assert one["trials"] == four["trials"] == 8 and len(one["trace"]) == len(four["trace"]) == 8 * 6
    assert one["trace"][-1] == four["trace"][-1]
    assert one["trace"] != four["trace"]  # the same epochs, interleaved: the best so far rises in another order
    run = search_replay.search(table, "ray-asha g2 rf3", 0, budget=30, concurrency=3)
    assert len(run["trace"]) == 30


def test_ray_asha_brackets_have_rays_rungs_and_on_best_judges_the_best_so_far():
    pruner = search_replay.RayAshaPruner(grace=2, rf=3, max_t=30, brackets=3)
    for s, rungs in enumerate(pruner.brackets):
        assert sorted(rungs) == sorted(m for m, _ in _Bracket(min_t=2, max_t=30, reduction_factor=3, s=s)._rungs)
    assert [sorted(r) for r in pruner.brackets] == [[2, 6, 18], [6, 18], [18]]
    assert pruner.p == pytest.approx(np.exp([0, -1, -2]) / np.exp([0, -1, -2]).sum())  # Ray's on_trial_add weights
    study = optuna.create_study(direction="maximize", pruner=pruner, study_name="brackets")
    chosen = [len(pruner.bracket(study, study.ask())) for _ in range(300)]
    assert 0.6 < chosen.count(3) / 300 < 0.75 and chosen.count(1) > 10  # ~0.67 / 0.24 / 0.09

    best = search_replay.RayAshaPruner(grace=2, rf=3, max_t=30, on="best")
    study = optuna.create_study(direction="maximize", pruner=best)
    first = study.ask()
    first.report(0.5, 1)
    first.report(0.5, 2)
    assert not first.should_prune()
    second = study.ask()
    second.report(0.9, 1)
    second.report(0.1, 2)  # its last value is below the first trial's, its best is not
    assert not second.should_prune() and best.recorded[2] == [0.5, 0.9]


def test_blended_answer_is_a_recorded_curve_or_a_rounded_weighted_mean_of_its_cell(tmp_path):
    write_table(tmp_path / "toy.parquet")
    (table,) = search_replay.read_tables(tmp_path / "toy.parquet")
    curve, test = table.blend(table.params[4])
    assert np.array_equal(curve, table.val_acc[4]) and test == table.test_acc[4]  # a recorded config: its own curve
    between = {**table.params[4], "lr_head": (table.params[4]["lr_head"] * table.params[6]["lr_head"]) ** 0.5,
               "dropout": (table.params[4]["dropout"] + table.params[6]["dropout"]) / 2}
    curve, test = table.blend(between)
    lo, hi = np.minimum(table.val_acc[4], table.val_acc[6]), np.maximum(table.val_acc[4], table.val_acc[6])
    assert np.all(curve >= lo - 0.02 - 1e-9) and np.all(curve <= hi + 0.02 + 1e-9)
    assert np.allclose(curve * table.n_val, np.round(curve * table.n_val))  # whole validation images
    assert min(table.test_acc[[4, 6]]) - 0.1 <= test <= max(table.test_acc[[4, 6]]) + 0.1
    table.val_acc[4, 3:] = np.nan  # the nearest diverged at epoch 4: so does the answer
    assert np.isnan(table.blend({**table.params[4], "dropout": table.params[4]["dropout"] + 1e-3})[0][3:]).all()


def test_synchronous_successive_halving_waits_for_the_full_rung_then_keeps_the_best_third(tmp_path):
    write_table(tmp_path / "toy.parquet")
    (table,) = search_replay.read_tables(tmp_path / "toy.parquet")
    # 12 configs (each once: unused answers) x 2 epochs, then the best 4 at epoch 2 train on to 6: 24 + 16 epochs
    trace = search_replay.synchronous_sh(table, seed=0, budget=40, n=12, grace=2, rf=3, answer="unused")["trace"]
    assert len(trace) == 40
    assert trace[23][0] == np.nanmax(table.val_acc[:, :2])  # every config reached the first rung before any went on
    at_rung = table.val_acc[:, 1]
    cut = np.sort(at_rung)[::-1][3]
    assert (at_rung > cut).sum() < 4 <= (at_rung >= cut).sum()  # the 4th best value may tie: the allowed survivors
    allowed = np.nanmax(table.val_acc[at_rung >= cut], axis=1)
    assert trace[-1][0] <= allowed.max() and trace[-1][0] >= np.nanmax(table.val_acc[at_rung > cut], initial=0)
    # a budget past the bracket starts a new one (fresh configs: repeats once the table is used up)
    assert len(search_replay.synchronous_sh(table, 0, 55, 12, 2, 3, "unused")["trace"]) == 55
