"""Real searches: Ray Tune + OptunaSearch (TPE) + ASHA over the training loop, on this 2-CPU machine."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from conftest import REPO, crash_when, small_space, tensorboard_scalars

from distributed.cli import main
from distributed.config import TrainConfig
from distributed.results import saved_trials


def leaderboard(exp: Path) -> list[dict]:
    return pq.read_table(exp / "leaderboard.parquet").to_pylist()


@pytest.mark.slow
def test_default_tune_end_to_end_and_best_config_reruns(ray_local, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # `emotune tune` with no argument runs the shipped quick space from any directory
    assert main(["tune", "--storage-path", str(tmp_path)]) == 0
    exp = tmp_path / "quick"
    rows = leaderboard(exp)
    assert len(rows) == 8 == len({r["trial_id"] for r in rows})
    assert any(r["asha_stopped"] for r in rows), [r["status"] for r in rows]
    assert all(r["status"] in ("completed", "asha_stopped") for r in rows)
    # It speaks plainly: a line per trial start, epoch and end, a running count; no Ray table, no Ray INFO lines.
    out = capfd.readouterr().out
    for r in rows:
        assert len(re.findall(rf"^trial {r['trial_id']} started: lr_head ", out, re.M)) == 1, out[-3000:]
        assert len(re.findall(rf"^trial {r['trial_id']} epoch \d/6  val_acc ", out, re.M)) == r["epochs_run"]
        end = "stopped by ASHA after epoch" if r["asha_stopped"] else "finished 6 epochs"
        assert re.search(rf"^trial {r['trial_id']} {end}.*: best val_acc {r['best_val_acc']:.4f}$", out, re.M), r
    assert re.search(r"^search: 8 of 8 trials done, best val_acc [\d.]+ \(trial ", out, re.M), out[-3000:]
    assert not [w for w in ("Trial status", "Checkpoint successfully created", "A new study created") if w in out]
    best, worst = rows[0]["best_val_acc"], rows[-1]["best_val_acc"]
    assert best > worst + 0.15, (best, worst)
    # The final stage retrained the top 2 configs for 8 epochs, kept each one's last epoch and chose one by
    # validation; it says so beside the search's figure, and best_config.yaml is that member's config as retrained.
    final = json.loads((exp / "final" / "ensemble.json").read_text())
    assert len(final["members"]) == 2 and {m["trial_id"] for m in final["members"]} == {r["trial_id"] for r in rows[:2]}
    assert re.search(rf"^search: best val_acc {best:.4f} \(trial {rows[0]['trial_id']}, ", out, re.M), out[-3000:]
    assert re.search(r"^final:  trial \S+'s config retrained for 8 epochs: val_acc [\d.]+ at its last epoch, "
                     r"test_acc [\d.]+; "
                     r"ensemble of 2 test_acc [\d.]+ \(final/ensemble_model\.pt\)$", out, re.M), out[-3000:]
    assert (exp / "final" / "ensemble_model.pt").is_file()  # the file that line names
    header = (exp / "best_config.yaml").read_text()
    assert header.startswith(f"# final stage: trial {final['members'][0]['trial_id']}'s config retrained for 8 epochs")
    assert "git commit:" in header
    # The published study: a trial ASHA stopped is PRUNED, the others COMPLETE; every epoch a trial ran is an
    # intermediate value (the one it was stopped on included), and its value is the last.
    study = load_study(exp, "quick")
    trials = {t.number: t for t in study.trials}
    assert len(trials) == 8
    for r in rows:
        curve = [line["val_acc"] for line in read_json_lines(exp / r["trial_id"] / "result.json")]
        params = {k[len("param."):]: v for k, v in r.items() if k.startswith("param.")}
        (t,) = [t for t in trials.values() if t.params == params]  # (two points share lr_head: every value counts)
        want = optuna.trial.TrialState.PRUNED if r["asha_stopped"] else optuna.trial.TrialState.COMPLETE
        assert t.state == want, (r["trial_id"], t.state, r["status"])
        assert [t.intermediate_values[e] for e in sorted(t.intermediate_values)] == pytest.approx(curve)
        assert len(curve) == r["epochs_run"] and t.value == pytest.approx(curve[-1])
    # TensorBoard events read back: the best trial's val_acc at each epoch it ran
    logged = tensorboard_scalars(exp / rows[0]["trial_id"], "ray/tune/val_acc")
    assert [v for _, v in logged] == pytest.approx(
        [line["val_acc"] for line in read_json_lines(exp / rows[0]["trial_id"] / "result.json")], abs=1e-6)

    # The best config re-runs as is through `emotune train` and, at the same seed and with as many torch threads as
    # the member had (every core: the final stage trains its members one after another; a float sum split over
    # another number of threads rounds differently), repeats the member's curve exactly.
    from distributed.plan import local_cpus

    assert main(["train", "--config", str(exp / "best_config.yaml"), "--output", str(tmp_path / "rerun"),
                 "--cpus-per-worker", str(local_cpus())]) == 0
    rerun = pq.read_table(tmp_path / "rerun" / "metrics.parquet").to_pylist()
    member = pq.read_table(Path(final["members"][0]["file"]).parent / "metrics.parquet").to_pylist()
    assert len(rerun) == len(member) == 8
    assert [r["val_acc"] for r in rerun] == [r["val_acc"] for r in member]
    assert [r["train_loss"] for r in rerun] == [r["train_loss"] for r in member]

    # `emotune best` re-collects the same from the directory alone.
    (exp / "leaderboard.csv").unlink()
    assert main(["best", str(exp), "--top", "3"]) == 0
    assert [r["trial_id"] for r in leaderboard(exp)] == [r["trial_id"] for r in rows]


@pytest.mark.slow
def test_two_workers_per_trial_complete_without_deadlock(ray_local, tmp_path):
    space = small_space(tmp_path, "ddp", num_samples=2, scheduler="none",
                        scaling={"workers": 2, "cpus_per_worker": 1},
                        fixed={"model": "small_cnn", "epochs": 1, "train_limit": 300})
    assert main(["tune", str(space), "--storage-path", str(tmp_path / "out")]) == 0
    rows = leaderboard(tmp_path / "out" / "ddp")
    assert [r["status"] for r in rows] == ["completed", "completed"]
    # each trial ran as a 2-worker Ray Train run named after its trial id
    assert {p.name for p in (tmp_path / "out" / "ddp" / "train_runs").iterdir()} == {r["trial_id"] for r in rows}
    # ...where its checkpoints are too: the report finds the best trial's weights there and scores them again
    page = (tmp_path / "out" / "ddp" / "report.html").read_text()
    assert f"{rows[0]['trial_id']}'s best weights (train_runs/{rows[0]['trial_id']}/checkpoint_" in page
    assert '"text":"confusion matrix (accuracy ' in page


@pytest.mark.slow
def test_trials_reuse_their_process_and_each_starts_afresh(ray_local, tmp_path):
    # The same point three times, one trial at a time: in-process trials reuse their trial process, and each
    # builds its model, optimiser and RNGs anew, so all three follow the same curve (MixUp and augmentation draw
    # random numbers, so leftover RNG state would show).
    point = {"lr_head": 3.0e-3, "dropout": 0.3, "mixup_alpha": 0.2, "weight_decay": 1.0e-4, "schedule": "wsd"}
    space = small_space(tmp_path, "reuse", num_samples=3, scheduler="none", scaling={"workers": 1, "cpus_per_worker": 2},
                        fixed={"model": "small_cnn", "data": "synthetic", "epochs": 2, "batch_size": 64,
                               "train_limit": 700},
                        points_to_evaluate=[point] * 3)
    assert main(["tune", str(space), "--storage-path", str(tmp_path)]) == 0
    trials = [read_progress(d / "progress.csv") for d in (tmp_path / "reuse").iterdir() if (d / "progress.csv").exists()]
    assert len(trials) == 3 and all(len(rows) == 2 for rows in trials)
    assert len({row["pid"] for rows in trials for row in rows}) == 1, "the trials did not share one process"
    curves = [[row[k] for row in rows for k in ("train_loss", "val_loss")] for rows in trials]
    assert curves[1] == pytest.approx(curves[0], rel=1e-6) and curves[2] == pytest.approx(curves[0], rel=1e-6), curves


def read_progress(path: Path) -> list[dict]:
    """A trial's per-epoch results as Tune wrote them (with the pid of the process that ran it)."""
    with open(path, newline="") as f:
        return [{"pid": r["pid"], "train_loss": float(r["train_loss"]), "val_loss": float(r["val_loss"])}
                for r in csv.DictReader(f)]


@pytest.mark.slow
def test_diverging_trial_is_marked_and_the_search_goes_on(ray_local, tmp_path, capfd):
    # lr 10 with decoupled weight decay 1 multiplies every weight by -9 per step: inf within a few dozen steps.
    space = small_space(tmp_path, "diverge", num_samples=2, scheduler="none",
                        fixed={"model": "small_cnn", "epochs": 3, "train_limit": 700},
                        space={"lr_head": {"loguniform": [1.0e-4, 10]}, "weight_decay": {"uniform": [0.0, 1.0]}},
                        points_to_evaluate=[{"lr_head": 10, "weight_decay": 1.0}, {"lr_head": 3.0e-3, "weight_decay": 1.0e-4}])
    assert main(["tune", str(space), "--storage-path", str(tmp_path), "--verbose"]) == 0
    out = capfd.readouterr().out  # --verbose: Ray's own trial table instead of emotune's lines
    assert "== Status ==" in out and "Number of trials: 2/2" in out, out[-3000:]
    assert not re.search(r"^trial \S+ (started|epoch|finished)", out, re.M), out[-3000:]
    rows = {r["param.lr_head"]: r for r in leaderboard(tmp_path / "diverge")}
    assert rows[10]["status"] == "diverged" and rows[10]["epochs_run"] < 3
    assert rows[3e-3]["status"] == "completed"
    study = load_study(tmp_path / "diverge", "diverge")
    states = {t.params["lr_head"]: t.state for t in study.trials}
    assert states == {10: optuna.trial.TrialState.FAIL, 3e-3: optuna.trial.TrialState.COMPLETE}


def test_searcher_tells_stopped_trials_pruned_finished_complete_diverged_failed():
    # Tune's calls in order, as its controller makes them: each result but the one the scheduler stopped on goes
    # to on_trial_result; on_trial_complete gets the last result, flattened.
    from distributed.tune import DivergenceAwareOptunaSearch

    searcher = DivergenceAwareOptunaSearch(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
                                           metric="val_acc", mode="max")

    def result(epoch, acc, **extra):
        return {"epoch": epoch, "training_iteration": epoch, "val_acc": acc, "train_config/epochs": 4,
                "early_stopped": False, "diverged": False, **extra}

    cases = {"full": [0.3, 0.4, 0.5, 0.6], "stopped": [0.2, 0.25], "early": [0.3, 0.2], "nan": [0.3, float("nan")]}
    for name, accs in cases.items():
        searcher.suggest(name)
        for e, acc in enumerate(accs[:-1], start=1):
            searcher.on_trial_result(name, result(e, acc))
        searcher.on_trial_complete(name, result(len(accs), accs[-1], early_stopped=name == "early",
                                                diverged=name == "nan"))
    trials = {name: t for name, t in zip(cases, searcher._ot_study.trials)}
    state = optuna.trial.TrialState
    assert {n: t.state for n, t in trials.items()} == {"full": state.COMPLETE, "stopped": state.PRUNED,
                                                       "early": state.COMPLETE, "nan": state.FAIL}
    for name in ("full", "stopped", "early"):
        assert list(trials[name].intermediate_values.values()) == cases[name]
        assert trials[name].value == cases[name][-1]


@pytest.mark.parametrize("study_file", ["behind", "ahead"])
def test_searcher_state_carries_its_study_so_a_resume_agrees_with_it(tmp_path, study_file):
    """Tune uploads its files one by one: a driver killed mid-upload left the published study behind the searcher
    state (a resumed trial's report then hit "Record does not exist") or ahead of it (trials asked twice). The
    searcher state now holds its study; restoring it makes the working study exactly that, whatever the file says."""
    from distributed.study import StudyFiles
    from distributed.tune import DivergenceAwareOptunaSearch

    def searcher():
        study = StudyFiles(str(tmp_path / "exp"))
        s = DivergenceAwareOptunaSearch(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
                                        metric="val_acc", mode="max", study_name="s", storage=study.storage())
        s.study = study
        return s, study

    first, study = searcher()
    first.suggest("a")
    first.on_trial_result("a", {"epoch": 1, "training_iteration": 1, "val_acc": 0.3})
    staging = tmp_path / "staging"
    staging.mkdir()
    first.save(str(staging / "searcher-state.pkl"))
    assert (staging / "optuna.journal").read_bytes() == open(study.working, "rb").read()  # the dashboard's copy
    if study_file == "ahead":
        first.suggest("b")  # asked after the saved state: a resume must not count it
    else:
        os.remove(study.working)  # the fetched study is older than the state
    restored, _ = searcher()
    restored.restore(str(staging / "searcher-state.pkl"))
    restored.on_trial_result("a", {"epoch": 2, "training_iteration": 2, "val_acc": 0.4})
    restored.on_trial_complete("a", {"epoch": 2, "training_iteration": 2, "val_acc": 0.4, "train_config/epochs": 2})
    restored.on_trial_result("ghost", {"epoch": 1, "training_iteration": 1, "val_acc": 0.5})  # unknown: ignored
    trials = restored._ot_study.trials
    assert [(t.state, t.value, dict(t.intermediate_values)) for t in trials] == \
        [(optuna.trial.TrialState.COMPLETE, 0.4, {1: 0.3, 2: 0.4})]


@pytest.mark.parametrize("saved_first", ["searcher", "trials"])
def test_a_resume_agrees_with_the_trials_tune_restored(tmp_path, saved_first):
    """Tune saves the trial states and the generator (trial count, live trials, searcher) as separate files; a driver
    killed between uploads leaves them from different moments. Restored, the generator's count, the limiter's live
    trials and the study follow the trial states: no trial too many or too few, none left RUNNING."""
    from ray.tune.search import ConcurrencyLimiter

    from distributed.study import StudyFiles
    from distributed.tune import DivergenceAwareOptunaSearch, ResumableSearch

    def generator():
        study = StudyFiles(str(tmp_path / "exp"))
        s = DivergenceAwareOptunaSearch(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
                                        metric="val_acc", mode="max", study_name="s", storage=study.storage())
        s.study = study
        gen = ResumableSearch(ConcurrencyLimiter(s, max_concurrent=2))
        gen._total_samples = 3  # (num_samples; Tune sets it from the experiment)
        return gen, s

    def done(epoch, acc):
        return {"epoch": epoch, "training_iteration": epoch, "val_acc": acc, "train_config/epochs": 1}

    first, searcher = generator()
    staging = tmp_path / "staging"
    staging.mkdir()
    params = {"a": first.searcher.suggest("a"), "b": None}
    first._counter = 1
    if saved_first == "searcher":  # the generator was saved knowing only a; the trial states then also hold b
        first.save_to_dir(str(staging), "1")
        params["b"] = first.searcher.suggest("b")
        first.searcher.on_trial_complete("a", done(1, 0.5))
        trials = [("a", "TERMINATED", done(1, 0.5)), ("b", "RUNNING", {})]
    else:  # the generator was saved after b was asked for; the trial states hold only a, still running
        params["b"] = first.searcher.suggest("b")
        first._counter = 2
        first.save_to_dir(str(staging), "1")
        trials = [("a", "RUNNING", {})]
    (staging / "experiment_state-1.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": tid, "status": status, "evaluated_params": params[tid]}),
         json.dumps({"last_result": last})] for tid, status, last in trials]}))

    restored, searcher = generator()
    restored.restore_from_dir(str(staging))
    assert restored._counter == len(trials)  # Tune makes num_samples - this many new trials
    assert restored.searcher.live_trials == {tid for tid, status, _ in trials if status != "TERMINATED"}
    if saved_first == "searcher":
        restored.on_trial_complete("b", done(1, 0.6))
        restored.searcher.suggest("c")
        restored.on_trial_complete("c", done(1, 0.7))
    else:
        restored.on_trial_complete("a", done(1, 0.5))
        assert restored.searcher.suggest("c") == params["b"]  # the dropped trial's Optuna trial, asked again
        restored.on_trial_complete("c", done(1, 0.6))
    study = searcher._ot_study
    finished = 3 if saved_first == "searcher" else 2
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * finished
    assert [t.params["lr"] for t in study.trials][:2] == [params["a"]["lr"], params["b"]["lr"]]


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_search_killed_then_resumed_runs_each_trial_once(tmp_path):
    # (With ASHA: a FIFO resume checks nothing this does not; tests/test_storage.py resumes a FIFO search on s3://.)
    # One trial at a time on the whole synthetic set. With ASHA (grace 1, rf 2) the trials at 1e-6 and 2e-6 barely
    # leave chance by epoch 1 and fall below the trials at 3e-3 and 5e-3 there, so the second trial is stopped
    # before the kill; Tune does not save its scheduler, so after the resume the rung starts empty and the last
    # trial, the first to arrive there, goes on.
    points = [{"lr_head": 3.0e-3}, {"lr_head": 1.0e-6}, {"lr_head": 5.0e-3}, {"lr_head": 2.0e-6}]
    scheduler = {"asha": {"max_t": 2, "grace_period": 1, "reduction_factor": 2}}
    space = small_space(tmp_path, "resume", num_samples=4, scheduler=scheduler, points_to_evaluate=points,
                        scaling={"workers": 1, "cpus_per_worker": 2}, space={"lr_head": {"loguniform": [1e-6, 1e-2]}},
                        fixed={"model": "small_cnn", "data": "synthetic", "epochs": 2, "batch_size": 64})
    cmd = [sys.executable, "-m", "distributed", "tune", str(space), "--storage-path", str(tmp_path)]
    exp = tmp_path / "resume"
    victim = 5.0e-3  # after a trial was stopped

    def cut_after_epoch_1() -> list[str]:
        """The trial at `victim` half done in the experiment state synced to the experiment directory (what a
        resume reads): running, its epoch-1 result (and checkpoint) saved."""
        try:
            saved = saved_trials(str(exp))
        except ValueError:  # the state file caught mid-copy
            return []
        return [t["trial_id"] for t in saved if t["status"] == "RUNNING" and t["last_result"].get("epoch") == 1
                and t["evaluated_params"].get("lr_head") == victim]

    # Tune saves and syncs its state at every step of its loop (instead of every ~10 s): the half-done moment shows
    crash_when(cmd, cut_after_epoch_1, env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"})
    (cut,) = cut_after_epoch_1()

    done = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = leaderboard(exp)
    assert len(rows) == 4 == len({r["trial_id"] for r in rows})
    status = {r["param.lr_head"]: r["status"] for r in rows}
    want = {lr: "completed" for lr in status}
    want[1.0e-6] = "asha_stopped"
    assert status == want, status
    # Every epoch of every trial was reported once: a finished trial was not run again, and the trial cut off after
    # epoch 1 went on from its checkpoint (from scratch, epoch 1 would appear twice and epoch 2 would say so).
    for r in rows:
        assert epochs(exp / r["trial_id"] / "result.json") == list(range(1, r["epochs_run"] + 1)), r
    lines = read_json_lines(exp / cut / "result.json")
    assert [line["run_start_epoch"] for line in lines] == [1, 2], lines
    # The study holds exactly the search's trials, each in the state the leaderboard gives it: nothing asked twice,
    # nothing left RUNNING, the trial ASHA stopped PRUNED.
    study = load_study(exp, "resume")
    states = {"completed": optuna.trial.TrialState.COMPLETE, "asha_stopped": optuna.trial.TrialState.PRUNED}
    assert {t.params["lr_head"]: t.state for t in study.trials} == {lr: states[s] for lr, s in status.items()}
    assert len(study.trials) == 4
    assert (exp / "best_config.yaml").exists()


def epochs(result_file: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in result_file.read_text().splitlines() if '"epoch"' in line]


def load_study(exp: Path, name: str) -> optuna.Study:
    """The study as the experiment published it (optuna-dashboard opens the same file)."""
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name,
                             storage=optuna.storages.JournalStorage(JournalFileBackend(str(exp / "optuna.journal"))))


@pytest.mark.slow
def test_multi_objective_pareto_front_and_best_by_architecture(two_arch_search, tmp_path, capsys):
    exp = two_arch_search
    rows = leaderboard(exp)
    front = pq.read_table(exp / "pareto_front.parquet").to_pylist()
    assert front and {r["trial_id"] for r in front} <= {r["trial_id"] for r in rows}
    # nothing on the front is beaten on both objectives by another trial
    for f in front:
        assert not any(r["best_val_acc"] >= f["best_val_acc"] and r["num_params"] <= f["num_params"] and
                       (r["best_val_acc"], r["num_params"]) != (f["best_val_acc"], f["num_params"]) for r in rows)
    for model in ("small_cnn", "emotion_cnn48"):
        assert TrainConfig.load(exp / "best_by_architecture" / f"{model}.yaml").model == model
    # `emotune best --model M` shows only that architecture's trials (the files keep every trial; on a copy, since
    # best rewrites them)
    copy = tmp_path / "copy"
    shutil.copytree(exp, copy)
    assert main(["best", str(copy), "--model", "emotion_cnn48"]) == 0
    out = capsys.readouterr().out
    by_model = {r["model"]: r["trial_id"] for r in rows}
    shown = [line.split()[0] for line in out.split("top 1 of 2 trials by val_acc:\n")[1].split("\n\n")[0].splitlines()[1:]]
    assert shown == [by_model["emotion_cnn48"]], out
