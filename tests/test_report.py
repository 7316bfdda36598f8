"""report.html as a person sees it: a real 2-trial search writes it, a headless Chromium opens it, every plot
renders, the page logs no script error, and a screenshot shows something. `emotune report` rebuilds it, also for an
experiment that was cut off mid-trial."""
from __future__ import annotations

import csv
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from distributed.cli import main
from distributed.report import curves_figure
from distributed.results import leaderboard_rows


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("needs a headless Chromium: apt-get install -y chromium")
    return exe


def open_page(page, tmp_path) -> tuple[str, list[str], np.ndarray]:
    """-> (the DOM after scripts ran, the page's console messages, a screenshot as an RGB array)."""
    args = [chromium(), "--headless=new", "--disable-gpu", "--no-sandbox", "--enable-unsafe-swiftshader",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must carry everything it needs
            "--hide-scrollbars", "--window-size=1400,4000", "--virtual-time-budget=10000",
            f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*args, "--enable-logging=stderr", "--v=0", "--dump-dom", url], check=False,
                         capture_output=True, text=True, timeout=300)
    # Console lines: `...:CONSOLE:LINE] "message", source: URL`. Chromium's own WebGL driver notes (software
    # rendering, no GPU) come through the same channel, prefixed with "[.WebGL-" or "[]".
    console = [m for m in re.findall(r':CONSOLE[^\]]*\] "(.*)", source:', dom.stderr)
               if not m.startswith(("[.WebGL-", "[]"))]
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=300, check=True)
    return dom.stdout, console, np.asarray(Image.open(shot).convert("RGB"))


@pytest.fixture(scope="module")
def experiment(two_arch_search):
    """Two real trials of two architectures, two objectives (so the page has a Pareto front): conftest's search."""
    return two_arch_search


@pytest.mark.slow
def test_search_report_renders_in_a_browser(experiment, tmp_path):
    page = experiment / "report.html"
    source = page.read_text()
    assert "<script src" not in source and "<link" not in source  # everything inline: nothing to fetch
    figures = source.count('class="plotly-graph-div"')
    for title in ("Leaderboard", "Final stage", "Learning curves", "Parameter importances",
                  "Parameters against the metric", "Pareto front", "Best trial on the validation split"):
        assert f"<h2>{title}</h2>" in source
    # curves, importances, parallel coordinates, Pareto front, confusion matrix, per-class F1: each is there
    assert figures == 6
    for drawn in ('"xaxis":{"title":{"text":"epoch"}', '"name":"PED-ANOVA (top 10% against the rest)"',
                  '"type":"parcoords"', '"name":"Pareto front"', '"text":"confusion matrix (accuracy ',
                  '"text":"per-class F1 (macro '):
        assert drawn in source, drawn
    # fANOVA splits the variance of the trials' values: two trials that ended level (both at chance) have none,
    # and the page says so instead of drawing it
    assert ('"name":"fANOVA (share of the variance)"' in source) != \
        ("not computable yet (2 completed trials): fANOVA: Encountered zero total variance" in source)

    dom, console, shot = open_page(page, tmp_path)
    assert console == [], console
    assert dom.count('class="plotly-graph-div js-plotly-plot"') == figures  # plotly drew every figure...
    assert dom.count('class="main-svg"') >= 2 * figures  # ...into SVG
    # leaderboard and final stage: a header and one row per trial each, and the final stage's distilled model
    assert dom.count("<tr>") == 2 * (1 + 2) + 1
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 200, "the screenshot is (nearly) blank"


def test_page_errors_are_caught_by_this_check(tmp_path):
    """The console check above can fail: a page with a broken script is seen as such."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>undefined_function()</script></body></html>")
    _, console, _ = open_page(page, tmp_path)
    assert any("undefined_function is not defined" in m for m in console), console


@pytest.mark.slow
def test_report_rebuilds_for_an_interrupted_search(experiment, tmp_path, capsys):
    copy = tmp_path / "cut"
    shutil.copytree(experiment, copy)
    (copy / "report.html").unlink()
    for state in copy.glob("experiment_state-*.json"):  # as if the driver died before Tune saved its state
        state.unlink()
    result = next(copy.glob("*/result.json"))
    result.write_text(result.read_text().splitlines()[0] + "\n")  # that trial got through one epoch only
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {copy / 'report.html'}"
    source = (copy / "report.html").read_text()
    assert "2 trials (1 completed, 1 incomplete)" in source


@pytest.mark.slow
def test_a_finished_trial_whose_result_file_lags_the_saved_state_ends_from_the_state(experiment, tmp_path):
    """Tune uploads the experiment state and each trial's result.json one by one: a driver killed in between leaves
    a trial the state calls TERMINATED with a result.json that stops an epoch short. The state's last result ends
    it, so the leaderboard says completed, not asha_stopped."""
    copy = tmp_path / "lagging"
    shutil.copytree(experiment, copy)
    trial = sorted(p.parent for p in copy.glob("*/result.json"))[0]
    lines = (trial / "result.json").read_text().splitlines()
    assert len(lines) == 2
    (trial / "result.json").write_text(lines[0] + "\n")  # the copy uploaded after epoch 1
    assert main(["best", str(copy)]) == 0
    rows = {r["trial_id"]: r for r in csv.DictReader((copy / "leaderboard.csv").open())}
    assert all(r["status"] == "completed" and r["epochs_run"] == "2" for r in rows.values()), rows


@pytest.mark.slow
def test_a_trial_the_saved_state_does_not_know_is_left_out(experiment, tmp_path, capsys):
    """A driver that crashed after starting a trial but before Tune saved its state leaves that trial's directory;
    --resume runs a new trial in its place, so the leaderboard must not count the old one."""
    import json

    copy = tmp_path / "orphan"
    shutil.copytree(experiment, copy)
    state = next(copy.glob("experiment_state-*.json"))
    doc = json.loads(state.read_text())
    dropped = json.loads(doc["trial_data"][0][0])["trial_id"]
    doc["trial_data"] = doc["trial_data"][1:]
    state.write_text(json.dumps(doc))
    assert main(["best", str(copy)]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((copy / "leaderboard.csv").open()))
    assert len(rows) == 1 and rows[0]["trial_id"] != dropped, rows
    assert "left out: 1 trial directories newer than the saved experiment state" in out and dropped in out


def test_the_curves_mark_where_asha_stopped_a_trial():
    """The learning-curve figure puts an X at the last epoch of each trial ASHA stopped, and only there."""
    def trial(tid, accs, status):
        return {"trial_id": tid, "params": {"lr_head": 0.01}, "error": False, "status": status, "orphan": False,
                "rows": [{"epoch": e, "val_acc": a} for e, a in enumerate(accs, 1)]}

    trials = [trial("done", [0.2, 0.3, 0.4, 0.5], "TERMINATED"), trial("cut", [0.1, 0.15], "TERMINATED"),
              trial("running", [0.1, 0.2], "RUNNING")]
    rows, _ = leaderboard_rows(trials, {"metric": "val_acc", "mode": "max", "model": "small_cnn", "epochs": 4})
    assert {r["trial_id"]: r["status"] for r in rows} == {"done": "completed", "cut": "asha_stopped",
                                                           "running": "incomplete"}
    fig = curves_figure(trials, rows, "val_acc")
    stops = [t for t in fig.data if t.name == "stopped by ASHA"]
    assert len(stops) == 1 and list(stops[0].x) == [2] and list(stops[0].y) == [0.15] and list(stops[0].text) == ["cut"]
    assert sorted(t.name for t in fig.data if t.name != "stopped by ASHA") == ["cut", "done", "running"]


def test_importances_show_both_evaluators_and_a_models_own_parameters(tmp_path):
    """fANOVA scores the parameters every trial has; PED-ANOVA also the conditional ones (a model's own, from
    by_model): the figure shows every parameter either scored, one bar per evaluator."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.storages.journal import JournalFileBackend

    from distributed.report import importances_html

    journal = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="exp", storage=journal, direction="maximize")
    rng = np.random.default_rng(0)
    for i in range(24):
        model = ["small_cnn", "resnet18"][i % 2]
        dists = {"model": CategoricalDistribution(["small_cnn", "resnet18"]), "lr_head": FloatDistribution(1e-4, 1e-2)}
        if model == "resnet18":
            dists["resnet18/lr_backbone"] = FloatDistribution(1e-5, 1e-3)
        trial = study.ask(dists)
        study.tell(trial, float(trial.params["lr_head"] * 50 + rng.normal(0, 0.01)))
    page = importances_html(str(tmp_path), "val_acc", multi_objective=False)
    assert "Optuna's fANOVA and PED-ANOVA evaluators over 24 completed trials" in page
    for trace in ('"name":"fANOVA (share of the variance)"', '"name":"PED-ANOVA (top 10% against the rest)"',
                  'resnet18\\u002flr_backbone', '"lr_head"'):  # plotly writes / as \u002f
        assert trace in page, trace


def test_the_report_reads_the_study_from_a_copy_and_leaves_no_file_behind(tmp_path, monkeypatch):
    """report.load_study opens a copy of the journal (a search may be writing to it); every report used to leave
    that copy in the temp folder."""
    import tempfile

    import optuna
    from optuna.storages.journal import JournalFileBackend

    from distributed.report import load_study

    exp, scratch = tmp_path / "exp", tmp_path / "tmp"
    exp.mkdir(), scratch.mkdir()
    journal = optuna.storages.JournalStorage(JournalFileBackend(str(exp / "optuna.journal")))
    written = optuna.create_study(study_name="s", storage=journal, direction="maximize")
    written.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=3)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    study = load_study(str(exp))
    assert [t.params for t in study.trials] == [t.params for t in written.trials]
    assert study.best_value == written.best_value
    assert list(scratch.iterdir()) == []
    assert load_study(str(tmp_path)) is None  # no journal, no study
