"""A search's final stage (ensemble.final_stage): the winners retrained at the full budget, tested once, ensembled,
the ensemble distilled into one network; best_config.yaml and report.html say so; a stage killed half way resumes
with --resume."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, crash_when

from distributed.config import TrainConfig
from distributed.data import load_data
from distributed.ensemble import load_predictor
from distributed.splits import make_splits


@pytest.mark.slow
def test_the_final_stage_retrains_the_winners_and_tests_them_once(two_arch_search):
    exp = two_arch_search  # conftest: 2 trials of 2 epochs, final: {top_k: 2, epochs: 3, train_limit: 200, distill}
    final = json.loads((exp / "final" / "ensemble.json").read_text())
    assert final["retrained"] and final["epochs"] == 3 and final["seeds"] == 1 and len(final["members"]) == 2
    # the stage trained its members with the search's scaling, which emotune.json records (no space re-read)
    assert json.loads((exp / "emotune.json").read_text())["scaling"] == {"workers": 1, "cpus_per_worker": 1.0,
                                                                        "gpus_per_worker": 0.0}
    trials = {m["trial_id"] for m in final["members"]}
    assert trials == {d.name for d in exp.iterdir() if (d / "result.json").is_file()}
    for m in final["members"]:
        run = Path(m["file"]).parent
        # the trial's own config at the full budget (3 epochs; the search ran 2), trained once, tested once
        assert [h["epoch"] for h in pq.read_table(run / "metrics.parquet").to_pylist()] == [1, 2, 3]
        cfg = TrainConfig.load(run / "config.yaml")
        trial = json.loads((exp / m["trial_id"] / "result.json").read_text().splitlines()[-1])["train_config"]
        assert cfg == TrainConfig.from_dict({**trial, "epochs": 3, "cv_folds": 0, "train_limit": 200, "keep_last": True})
        assert json.loads((run / "test_metrics.json").read_text())["all"]["test_acc"] == m["test_acc"]
    # each member is its last epoch (the stage's default keep_last), its validation figure that epoch's; the chosen
    # member (listed first) is the best by that held-out validation after retraining, never by test
    assert final["keep_last"] and all(m["best_epoch"] == 3 for m in final["members"])
    for m in final["members"]:
        last = pq.read_table(Path(m["file"]).parent / "metrics.parquet").to_pylist()[-1]
        assert m["best_val_acc"] == pytest.approx(last["val_acc"])
    vals = [m["best_val_acc"] for m in final["members"]]
    assert vals[0] == max(vals)
    # distill: the single model is one more run of the search's best config, a seed no member had, learning from
    # the members' ensemble (its file) as well as from the labels; it is not one of the ensemble's members
    distilled = final["distilled"]
    student = TrainConfig.load(Path(distilled["file"]).parent / "config.yaml")
    from distributed.cli import final_lines
    from distributed.summary import collect

    assert distilled["trial_id"] == collect(str(exp))["top"][0]["trial_id"]  # the search's best config
    top = json.loads((exp / distilled["trial_id"] / "result.json").read_text().splitlines()[-1])["train_config"]
    assert student == TrainConfig.from_dict({**top, "epochs": 3, "cv_folds": 0, "train_limit": 200, "keep_last": True,
                                             "seed": top["seed"] + 1,
                                             "teacher": str(exp / "final" / "ensemble_model.pt")})
    assert distilled["best_epoch"] == 3
    best = exp / "best_config.yaml"
    assert TrainConfig.load(best) == student
    assert best.read_text().startswith("# final stage: trial ") and "epochs (last epoch 3)" in best.read_text()
    assert "distilled from the ensemble of 2 retrained members" in best.read_text().splitlines()[0]
    assert re.search(rf"^final:  trial {distilled['trial_id']}'s config \(seed {student.seed}\) distilled from the "
                     rf"ensemble for 3 epochs: .* ensemble of 2 test_acc", final_lines(collect(str(exp)))[-1])
    # the figures are the files scored on the best trial's test split: the ensemble of the two members (not the
    # student), and the student alone
    splits = make_splits(load_data(TrainConfig.from_dict(top)), TrainConfig.from_dict(top))
    ensemble = load_predictor(exp / "final" / "ensemble_model.pt")
    assert len(ensemble.members) == 2
    for name, predictor in (("ensemble", ensemble), ("single_best", load_predictor(distilled["file"]))):
        pred = predictor.probs(torch.from_numpy(splits.test_x)).argmax(1).numpy()
        assert final[name]["all"]["test_acc"] == pytest.approx(float(np.mean(pred == splits.test_y)))
    page = (exp / "report.html").read_text()
    assert "<h2>Final stage</h2>" in page and all(t in page for t in trials)
    assert f"{distilled['trial_id']} seed {distilled['seed']} distilled (chosen)" in page


@pytest.mark.slow
def test_a_final_stage_killed_half_way_resumes(two_arch_search, tmp_path):
    """Killed after the first member's first epoch: --resume leaves the search alone, continues that member from
    its checkpoint and trains the other, then writes the record."""
    exp = tmp_path / "two_arch"
    shutil.copytree(two_arch_search, exp)
    shutil.rmtree(exp / "final")
    (exp / "best_config.yaml").unlink()
    # members of 700 images an epoch (the shared search's final stage trains on 200: too fast to cut in the middle)
    meta = json.loads((exp / "emotune.json").read_text())
    meta["final"]["train_limit"] = 700
    meta["final"]["distill"] = False  # the distilled run is the first test's; here it would add ~40 s of training
    (exp / "emotune.json").write_text(json.dumps(meta))
    space = exp / "space.yaml"
    cmd = [sys.executable, "-m", "distributed", "tune", str(space), "--storage-path", str(tmp_path), "--resume"]
    crash_when(cmd, printed="epoch 1/3")
    assert not (exp / "final" / "ensemble.json").exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final:  trial " in done.stdout and "ensemble of 2 test_acc" in done.stdout, done.stdout[-3000:]
    final = json.loads((exp / "final" / "ensemble.json").read_text())
    starts = {}
    for m in final["members"]:
        history = pq.read_table(Path(m["file"]).parent / "metrics.parquet").to_pylist()
        assert [h["epoch"] for h in history] == [1, 2, 3]
        starts[m["trial_id"]] = [h["run_start_epoch"] for h in history]
    # one member cut after epoch 1 (or 2: the line is printed up to half a second after its epoch), none redone
    fresh, cut = sorted(starts.values())
    assert fresh == [1, 1, 1] and cut in ([1, 2, 2], [1, 1, 3]), starts
    # the search itself was not run again: still its two trials of 2 epochs
    assert sorted(len((exp / t / "result.json").read_text().splitlines()) for t in starts) == [2, 2]


@pytest.mark.slow
def test_a_refit_final_stage_of_one_config_and_several_seeds(two_arch_search, tmp_path):
    """The shipped per-model spaces' shape (top_k 1, seeds 3; here 2 seeds), refit: the best config retrained once
    per seed (seed, seed + 1) on the validation split too, each member saying its seed and keeping its last epoch,
    the ensemble of the seeds; the single model is the first seed's (validation trained, so it chooses nothing),
    and best_config.yaml, the page and the summary say so and name the seeds."""
    from distributed.cli import final_lines
    from distributed.ensemble import final_stage
    from distributed.summary import collect

    exp = tmp_path / "two_arch"
    shutil.copytree(two_arch_search, exp)
    shutil.rmtree(exp / "final")
    top = collect(str(exp))["top"][0]["trial_id"]  # the search's best trial: the one config retrained
    final_stage(exp, top_k=1, epochs=3, seeds=2, train_limit=200, refit=True)
    final = json.loads((exp / "final" / "ensemble.json").read_text())
    assert final["seeds"] == 2 and final["refit"] and [m["trial_id"] for m in final["members"]] == [top, top]
    trial = json.loads((exp / top / "result.json").read_text().splitlines()[-1])["train_config"]
    assert [m["seed"] for m in final["members"]] == [trial["seed"], trial["seed"] + 1]  # the first seed: the model
    for m in final["members"]:
        run = Path(m["file"]).parent
        assert run.name == f"{top}-seed{m['seed'] - trial['seed']}"
        assert TrainConfig.load(run / "config.yaml") == TrainConfig.from_dict(
            {**trial, "epochs": 3, "cv_folds": 0, "train_limit": 200, "seed": m["seed"], "refit": True,
             "keep_last": True})
        assert m["best_epoch"] == 3  # nothing held out to pick an earlier epoch
    out = collect(str(exp))
    chosen = final["members"][0]
    best = exp / "best_config.yaml"
    assert TrainConfig.load(best).seed == chosen["seed"] and TrainConfig.load(best).refit
    assert "refit on the validation split too" in best.read_text().splitlines()[0]
    assert (f"trial {top}'s config (seed {chosen['seed']}) retrained for 3 epochs: refit on the validation split too"
            in final_lines(out)[-1])
    assert final_lines(out)[-1].endswith(f"ensemble of 2 test_acc {final['ensemble']['all']['test_acc']:.4f} "
                                         f"(final/ensemble_model.pt)")
    page = (exp / "report.html").read_text()
    assert "The best config retrained for 3 epochs (2 seeds), refit on the validation split too" in page
    assert f"{top} seed {chosen['seed']}" in page
