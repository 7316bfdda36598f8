"""results.py without Ray: the leaderboard's statuses, scores and order from hand-made trials; the Pareto front of a
hand-made set; and read_trials / collect on a hand-made experiment directory laid out as Tune leaves it (trial
directories named by trial id, one JSON line per epoch in result.json, experiment_state-<time>.json)."""
from __future__ import annotations

import csv
import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

from distributed.config import HISTORY_FILE, TrainConfig
from distributed.outcome import OUTCOMES, trial_outcome
from distributed.results import leaderboard_rows, pareto_front, read_trials
from distributed.summary import collect

EPOCHS = 4
META = {"metric": "val_acc", "mode": "max", "model": "small_cnn", "epochs": EPOCHS}
NAN = float("nan")


def config(model: str = "small_cnn", epochs: int = EPOCHS) -> dict:
    return TrainConfig(model=model, epochs=epochs).to_dict()


def epoch(n: int, acc: float, loss: float, model: str = "small_cnn", **more) -> dict:
    """One report of the loop: its metrics and, as train.py sends with every result, the resolved config."""
    return {"epoch": n, "val_acc": acc, "val_loss": loss, "train_config": config(model), **more}


def trial(tid: str, rows: list[dict], status: str | None, params: dict | None = None, error: bool = False,
          orphan: bool = False) -> dict:
    """A trial as read_trials returns it."""
    return {"trial_id": tid, "params": params or {"lr_head": 0.01}, "rows": rows, "error": error, "status": status,
            "orphan": orphan}


def every_status() -> list[dict]:
    """One trial of each status a search leaves behind (budget: 4 epochs), in no particular order."""
    return [
        trial("run", [epoch(1, 0.10, 2.0)], "RUNNING"),
        trial("done", [epoch(1, 0.30, 1.5, epoch_s=1.0), epoch(2, 0.50, 1.2, epoch_s=2.0),
                       epoch(3, 0.60, 1.1, epoch_s=3.0), epoch(4, 0.55, 1.15, epoch_s=4.0, time_total_s=10.04)],
              "TERMINATED", params={"lr_head": 0.01, "mobilenet_v2": {"unfreeze_start": 4}}),
        trial("pend", [], "PENDING", params={"model": "emotion_cnn48", "lr_head": 0.02}),
        trial("early", [epoch(1, 0.40, 1.3), epoch(2, 0.35, 1.0, early_stopped=True)], "TERMINATED"),
        # train.py's divergence report carries NaN metrics and no train_config
        trial("nan", [epoch(1, 0.20, 1.9), {"epoch": 2, "diverged": True, "val_acc": NAN, "val_loss": NAN}],
              "TERMINATED"),
        trial("err", [epoch(1, 0.45, 1.4)], "ERROR", error=True),
        trial("asha", [epoch(1, 0.50, 1.25), epoch(2, 0.52, 1.05, model="emotion_cnn48")], "TERMINATED"),
        trial("orphan", [epoch(1, 0.99, 0.1)], None, orphan=True),
    ]


# -- trial_outcome: the one reading of how a trial ended (leaderboard, printed lines, what Optuna is told) -----

OF_4 = {"train_config": {"epochs": 4}}


@pytest.mark.parametrize("last, tune_status, planned, want", [
    ({"epoch": 4, **OF_4}, "TERMINATED", None, "completed"),
    ({"epoch": 4, **OF_4}, "RUNNING", None, "completed"),  # the saved state lags behind the last report
    ({"epoch": 2, **OF_4}, "TERMINATED", None, "asha_stopped"),
    ({"epoch": 2, "train_config/epochs": 4}, "TERMINATED", None, "asha_stopped"),  # flattened, as searchers get it
    ({"epoch": 4, **OF_4}, "TERMINATED", 6, "asha_stopped"),  # the caller's budget wins
    ({"epoch": 2, **OF_4}, "RUNNING", None, "incomplete"),
    ({"epoch": 2, **OF_4}, None, None, "incomplete"),
    ({}, "PENDING", 4, "incomplete"),
    ({"epoch": 2, "early_stopped": True, **OF_4}, "TERMINATED", None, "early_stopped"),
    ({"epoch": 2, "early_stopped": True, **OF_4}, "RUNNING", None, "early_stopped"),
    ({"epoch": 2, "diverged": True, "val_acc": NAN}, "TERMINATED", None, "diverged"),  # no train_config in it
    ({"epoch": 4, **OF_4}, "ERROR", None, "error"),
    ({"epoch": 2, "diverged": True}, "ERROR", None, "error"),
    ({}, "TERMINATED", None, "completed"),  # no budget known: nothing says it stopped short
    ({}, None, None, "incomplete"),
])
def test_trial_outcome(last, tune_status, planned, want):
    assert trial_outcome(last, tune_status, planned) == want and want in OUTCOMES


# -- leaderboard_rows ---------------------------------------------------------------------------------------

def test_leaderboard_status_epochs_and_order_best_first():
    """Each status from the last report and Tune's saved status; best first, the unscored trial last; the orphan
    (a directory the saved state does not know) is left out."""
    rows, configs = leaderboard_rows(every_status(), META)
    got = [(r["trial_id"], r["status"], r["epochs_run"], r["best_val_acc"], r["asha_stopped"]) for r in rows]
    assert got == [("done", "completed", 4, 0.60, False),
                   ("asha", "asha_stopped", 2, 0.52, True),
                   ("err", "error", 1, 0.45, False),
                   ("early", "early_stopped", 2, 0.40, False),
                   ("nan", "diverged", 2, 0.20, False),  # the NaN of the diverged epoch is no score
                   ("run", "incomplete", 1, 0.10, False),
                   ("pend", "incomplete", 0, None, False)]
    # every trial that reported has its config; the never-reported one has none (the diverged one: epoch 1's)
    assert sorted(configs) == ["asha", "done", "early", "err", "nan", "run"]
    assert configs["asha"]["model"] == "emotion_cnn48"  # the newest recorded config


def test_leaderboard_row_columns():
    """The model comes from the recorded config, else the parameters; conditional parameters are flattened;
    epoch_s is the mean over epochs; last_* are the last report's; wall_s is Tune's time_total_s."""
    rows = {r["trial_id"]: r for r in leaderboard_rows(every_status(), META)[0]}
    done = rows["done"]
    assert done["epoch_s"] == 2.5 and done["wall_s"] == 10.0
    assert done["param.lr_head"] == 0.01 and done["param.unfreeze_start"] == 4 and "param.mobilenet_v2" not in done
    assert (done["last_val_acc"], done["last_val_loss"], done["last_val_macro_f1"]) == (0.55, 1.15, None)
    assert rows["pend"]["model"] == "emotion_cnn48" and rows["pend"]["epoch_s"] is None
    assert rows["asha"]["model"] == "emotion_cnn48" and rows["run"]["model"] == "small_cnn"


def test_leaderboard_min_metric_takes_the_lowest_and_ranks_it_first():
    """mode=min (val_loss): best_val_loss is each trial's lowest finite loss (a NaN is never the minimum) and the
    lowest is first."""
    rows, _ = leaderboard_rows(every_status(), {**META, "metric": "val_loss", "mode": "min"})
    assert [(r["trial_id"], r["best_val_loss"]) for r in rows] == [
        ("early", 1.0), ("asha", 1.05), ("done", 1.1), ("err", 1.4), ("nan", 1.9), ("run", 2.0), ("pend", None)]
    assert "best_val_acc" not in rows[0]


def test_trial_whose_config_has_a_larger_budget_is_asha_stopped_not_completed():
    """`finished` compares with the trial's own recorded epochs (a searched `epochs`), not the search's default."""
    rows = [{"epoch": e, "val_acc": 0.5, "train_config": config(epochs=6)} for e in (1, 2, 3, 4)]
    (row,), _ = leaderboard_rows([trial("long", rows, "TERMINATED")], META)
    assert row["status"] == "asha_stopped" and row["epochs_run"] == 4


# -- pareto_front -------------------------------------------------------------------------------------------

def row(tid: str, acc: float | None, epoch_s: float | None, num_params: int | None, metric: str = "val_acc") -> dict:
    return {"trial_id": tid, f"best_{metric}": acc, "epoch_s": epoch_s, "num_params": num_params}


def test_pareto_front_three_objectives_with_ties():
    """Best accuracy (a), fastest (b, and its exact twin e), smallest (c) are on the front; d loses to b only by a
    tie on two objectives and a slower epoch; f loses to c on all three; unscored rows are left out."""
    rows = [row("a", 0.9, 5.0, 1000), row("b", 0.8, 1.0, 1000), row("c", 0.7, 2.0, 100), row("d", 0.8, 2.0, 1000),
            row("e", 0.8, 1.0, 1000), row("f", 0.6, 3.0, 500), row("g", None, 0.5, 10), row("h", 0.95, None, 10)]
    objectives = [("val_acc", "max"), ("epoch_s", "min"), ("num_params", "min")]
    assert [r["trial_id"] for r in pareto_front(rows, objectives, "val_acc")] == ["a", "b", "c", "e"]
    # with two objectives, c (the smallest) no longer matters and the slower d is still beaten by b
    front = pareto_front(rows, [("val_acc", "max"), ("epoch_s", "min")], "val_acc")
    assert [r["trial_id"] for r in front] == ["a", "b", "e"]


def test_pareto_front_min_metric_first():
    """The first objective is read from best_<metric>, in its own direction (val_loss: lower is better)."""
    rows = [row("small", 0.9, 1.0, 100, "val_loss"), row("good", 0.5, 1.0, 5000, "val_loss"),
            row("worse", 0.95, 1.0, 200, "val_loss"), row("mid", 0.7, 1.0, 1000, "val_loss")]
    front = pareto_front(rows, [("val_loss", "min"), ("num_params", "min")], "val_loss")
    assert [r["trial_id"] for r in front] == ["small", "good", "mid"]


def test_pareto_front_second_objective_a_metric():
    """objectives [val_acc max, val_loss min], as search_space accepts: one epoch per trial, so best and last agree."""
    trials = [trial("acc", [epoch(1, 0.9, 1.5)], "TERMINATED"), trial("loss", [epoch(1, 0.6, 0.8)], "TERMINATED"),
              trial("bad", [epoch(1, 0.5, 1.6)], "TERMINATED"),
              # diverged at epoch 2: a best val_acc, but a NaN last val_loss, which nothing could dominate
              trial("nan", [epoch(1, 0.95, 1.2), {"epoch": 2, "diverged": True, "val_acc": NAN, "val_loss": NAN}],
                    "TERMINATED")]
    rows, _ = leaderboard_rows(trials, {**META, "epochs": 1})
    front = pareto_front(rows, [("val_acc", "max"), ("val_loss", "min")], "val_acc")
    assert [r["trial_id"] for r in front] == ["acc", "loss"]


# -- read_trials and collect on an experiment directory -----------------------------------------------------

def write_trial(exp, tid: str, params: dict, lines: list[dict], tail: str = "") -> None:
    """A trial directory as Tune writes it; `tail` is appended to result.json as it is (e.g. a line cut short)."""
    tdir = exp / tid
    tdir.mkdir(parents=True)
    (tdir / "params.json").write_text(json.dumps(params))
    text = "".join(json.dumps({"trial_id": tid, "epoch_s": 2.0, "time_total_s": 2.0 * r["epoch"], **r}) + "\n"
                   for r in lines)
    (tdir / "result.json").write_text(text + tail)


def write_state(exp, stamp: str, trials: list[tuple[str, str, dict]]) -> None:
    """experiment_state-<stamp>.json as Ray Tune saves it: trial_data holds [trial JSON, run metadata JSON]."""
    data = [[json.dumps({"trial_id": tid, "status": status, "evaluated_params": {}}),
             json.dumps({"last_result": last, "checkpoint_manager": None})] for tid, status, last in trials]
    (exp / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": data, "runner_data": {}}))


@pytest.fixture()
def experiment(tmp_path):
    """Two architectures, 3 epochs: t1 finished (and a result line without an epoch), t2 still running with a
    result line cut short by the crash, t3 a directory newer than the saved state (an orphan). An older state, which
    still calls t1 RUNNING, sits beside it."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "emotune.json").write_text(json.dumps({
        "space_file": "quick.yaml", "overrides": [], "num_samples": 3, "metric": "val_acc", "mode": "max",
        "objectives": [["val_acc", "max"]], "models": ["small_cnn", "emotion_cnn48"], "model": "small_cnn",
        "epochs": 3}))

    def lines(model, accs):
        return [{"epoch": e, "val_acc": a, "val_loss": 1 - a, "train_config": config(model, 3)}
                for e, a in enumerate(accs, 1)]

    write_trial(exp, "t1", {"model": "small_cnn", "lr_head": 0.001}, lines("small_cnn", [0.5, 0.6, 0.55]),
                tail=json.dumps({"trial_id": "t1", "done": True, "val_acc": 0.99}) + "\n")
    write_trial(exp, "t2", {"model": "emotion_cnn48", "lr_head": 0.002}, lines("emotion_cnn48", [0.7, 0.8]),
                tail='{"trial_id": "t2", "epoch": 3, "val_a')
    write_trial(exp, "t3", {"model": "small_cnn", "lr_head": 0.003}, lines("small_cnn", [0.9]))
    write_state(exp, "2024-01-01_10-00-00", [("t1", "RUNNING", {}), ("t2", "PENDING", {})])
    write_state(exp, "2024-01-01_11-00-00", [("t1", "TERMINATED", {}), ("t2", "RUNNING", {})])
    return exp


def test_read_trials_newest_state_cut_line_and_orphan(experiment):
    """The newest experiment_state gives the status; the line cut short and the line without an epoch are skipped
    and the others are read; a directory the state does not know is an orphan."""
    trials = {t["trial_id"]: t for t in read_trials(str(experiment))}
    assert {tid: (t["status"], t["orphan"], [r["epoch"] for r in t["rows"]]) for tid, t in trials.items()} == {
        "t1": ("TERMINATED", False, [1, 2, 3]), "t2": ("RUNNING", False, [1, 2]), "t3": (None, True, [1])}
    assert trials["t2"]["params"] == {"model": "emotion_cnn48", "lr_head": 0.002}
    assert trials["t1"]["dir"] == f"{experiment}/t1" and not trials["t1"]["error"]


def test_a_damaged_line_inside_result_json_is_skipped_with_a_warning(tmp_path):
    """Only the last line may be cut short (a crash while Tune wrote it: skipped quietly); a line inside the file
    that is not JSON means the file was damaged afterwards, which is said."""
    exp = tmp_path / "exp"
    write_trial(exp, "t1", {}, [{"epoch": 1, "val_acc": 0.5}], tail='{"epoch": 2, "val_a\n')
    with open(exp / "t1" / "result.json", "a") as f:
        f.write(json.dumps({"trial_id": "t1", "epoch": 3, "val_acc": 0.7}) + "\n")
    with pytest.warns(UserWarning, match=r"t1/result.json: line 2 is not JSON, skipped"):
        (trial_read,) = read_trials(str(exp))
    assert [r["epoch"] for r in trial_read["rows"]] == [1, 3]


def test_read_trials_takes_the_last_epochs_from_the_saved_state(tmp_path):
    """A driver killed between uploading the state and the trial's result.json: the state's last result is newer
    than result.json's last line, so it becomes the last epoch; the same epoch (the usual case) or an older one is
    not added again."""
    exp = tmp_path / "exp"
    two = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]
    write_trial(exp, "t1", {}, two[:1])
    write_trial(exp, "t2", {}, two)
    write_trial(exp, "t3", {}, two)
    write_state(exp, "2024-01-01_10-00-00", [("t1", "TERMINATED", {"trial_id": "t1", "epoch": 2, "val_acc": 0.7}),
                                              ("t2", "TERMINATED", {"trial_id": "t2", "epoch": 2, "val_acc": 0.6}),
                                              ("t3", "RUNNING", {"trial_id": "t3", "epoch": 1, "val_acc": 0.5})])
    trials = {t["trial_id"]: t for t in read_trials(str(exp))}
    assert [(r["epoch"], r["val_acc"]) for r in trials["t1"]["rows"]] == [(1, 0.5), (2, 0.7)]
    assert [(r["epoch"], r["val_acc"]) for r in trials["t2"]["rows"]] == [(1, 0.5), (2, 0.6)]
    assert [(r["epoch"], r["val_acc"]) for r in trials["t3"]["rows"]] == [(1, 0.5), (2, 0.6)]


def test_read_trials_fills_epochs_a_lost_result_json_had_from_the_newest_checkpoint(tmp_path):
    """A driver killed after a trial's checkpoint reached the bucket and before its result.json did: resumed after
    that checkpoint, the trial's result.json lacks the epochs before it. t1 resumed at its last epoch and reported
    nothing more (no result.json at all; the state's last result is epoch 2); t2 resumed at epoch 3 of 3; t3, a
    worker-group trial, keeps its checkpoints under train_runs/. Each is whole from its newest checkpoint's history,
    and an epoch result.json has is never taken from there."""
    exp = tmp_path / "exp"
    history = [{"epoch": e, "val_acc": 0.1 * e} for e in (1, 2, 3)]

    def checkpoint(where: str, name: str, epochs: int) -> None:
        (exp / where / name).mkdir(parents=True)
        (exp / where / name / HISTORY_FILE).write_text(json.dumps(history[:epochs]))

    write_trial(exp, "t1", {}, [])
    (exp / "t1" / "result.json").unlink()
    checkpoint("t1", "checkpoint_000000", 1)
    checkpoint("t1", "checkpoint_000001", 2)
    write_trial(exp, "t2", {}, [{"epoch": 3, "val_acc": 0.9}])
    checkpoint("t2", "checkpoint_000002", 3)
    write_trial(exp, "t3", {}, [{"epoch": 1, "val_acc": 0.5}, {"epoch": 3, "val_acc": 0.9}])
    checkpoint("train_runs/t3", "checkpoint_2026-12-03_10-00-00.000000", 3)
    write_state(exp, "2024-01-01_10-00-00", [("t1", "TERMINATED", {"trial_id": "t1", "epoch": 2, "val_acc": 0.7}),
                                              ("t2", "TERMINATED", {}), ("t3", "TERMINATED", {})])
    trials = {t["trial_id"]: [(r["epoch"], r["val_acc"]) for r in t["rows"]] for t in read_trials(str(exp))}
    assert trials == {"t1": [(1, 0.1), (2, 0.7)], "t2": [(1, 0.1), (2, 0.2), (3, 0.9)],
                      "t3": [(1, 0.5), (2, 0.2), (3, 0.9)]}


def test_trial_that_failed_then_resumed_and_finished_is_completed(tmp_path):
    """A trial that failed once (error.txt), was restarted by --resume and ran its whole budget (TERMINATED in the
    saved state) is completed, not an error."""
    exp = tmp_path / "exp"
    write_trial(exp, "t1", {}, [{"epoch": e, "val_acc": 0.5, "train_config": config(epochs=2)} for e in (1, 2)])
    (exp / "t1" / "error.txt").write_text("Failure # 1 (occurred at 2024-01-01_10-00-00)\nRayActorError: died\n")
    write_state(exp, "2024-01-01_11-00-00", [("t1", "TERMINATED", {})])
    (trial_read,) = read_trials(str(exp))
    assert trial_read["error"] and trial_read["status"] == "TERMINATED"
    (row,), _ = leaderboard_rows([trial_read], {**META, "epochs": 2})
    assert row["status"] == "completed"


def test_read_trials_without_a_state_has_no_orphans(tmp_path):
    """No saved state (e.g. not written yet): every trial directory counts, none is an orphan."""
    exp = tmp_path / "exp"
    write_trial(exp, "t1", {}, [{"epoch": 1, "val_acc": 0.5}])
    (trial_read,) = read_trials(str(exp))
    assert (trial_read["trial_id"], trial_read["status"], trial_read["orphan"]) == ("t1", None, False)


def test_collect_writes_every_file(experiment):
    """leaderboard.csv/.parquet (orphan left out and listed), best_config.yaml re-runnable as the best trial's
    config, one best config per architecture, report.html (without a checkpoint it says so)."""
    out = collect(str(experiment))
    csv_rows = list(csv.DictReader((experiment / "leaderboard.csv").open()))
    assert [(r["trial_id"], r["status"], r["best_val_acc"]) for r in csv_rows] == [
        ("t2", "incomplete", "0.8"), ("t1", "completed", "0.6")]
    parquet = pq.read_table(experiment / "leaderboard.parquet").to_pylist()
    assert [(r["trial_id"], r["best_val_acc"], r["epoch_s"]) for r in parquet] == [("t2", 0.8, 2.0), ("t1", 0.6, 2.0)]
    assert out["orphans"] == [f"{experiment}/t3"]

    best = TrainConfig.load(experiment / "best_config.yaml")
    assert best == TrainConfig.from_dict(config("emotion_cnn48", 3))
    header = (experiment / "best_config.yaml").read_text().splitlines()[0]
    assert header == "# best trial t2: val_acc = 0.8000 (epoch budget 3, ran 2)"
    by_arch = {p.stem: yaml.safe_load(p.read_text())["model"] for p in (experiment / "best_by_architecture").iterdir()}
    assert by_arch == {"small_cnn": "small_cnn", "emotion_cnn48": "emotion_cnn48"}
    assert not (experiment / "pareto_front.csv").exists()  # one objective: no front

    page = (experiment / "report.html").read_text()
    assert out["report"] == f"{experiment}/report.html"
    assert "t2: no checkpoint with best_model.pt" in page and "2 trials (1 completed, 1 incomplete)" in page


def test_collect_with_model_narrows_only_top(experiment):
    """`emotune best --model small_cnn`: the returned top holds only that architecture; leaderboard.csv and
    best_config.yaml still cover every trial."""
    out = collect(str(experiment), model="small_cnn")
    assert [r["trial_id"] for r in out["top"]] == ["t1"]
    assert [r["trial_id"] for r in out["rows"]] == ["t2", "t1"]
    assert [r["trial_id"] for r in csv.DictReader((experiment / "leaderboard.csv").open())] == ["t2", "t1"]
    assert yaml.safe_load((experiment / "best_config.yaml").read_text())["model"] == "emotion_cnn48"
    assert [r["trial_id"] for r in collect(str(experiment), top=1)["top"]] == ["t2"]


def test_collect_two_objectives_writes_the_front(experiment):
    """With a second objective (epoch_s, min) the non-dominated trials go to pareto_front.csv: t1 is slower per
    epoch than t2 and less accurate, so only t2 is on it."""
    meta = json.loads((experiment / "emotune.json").read_text())
    (experiment / "emotune.json").write_text(json.dumps({**meta, "objectives": [["val_acc", "max"],
                                                                                ["epoch_s", "min"]]}))
    for tid, seconds in (("t1", 3.0), ("t2", 1.0)):
        path = experiment / tid / "result.json"
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        path.write_text("".join(json.dumps({**r, "epoch_s": seconds}) + "\n" for r in kept))
    out = collect(str(experiment))
    assert [r["trial_id"] for r in csv.DictReader((experiment / "pareto_front.csv").open())] == ["t2"]
    assert out["pareto_front"] == f"{experiment}/pareto_front.csv"
    assert math.isclose(out["rows"][1]["epoch_s"], 3.0)
