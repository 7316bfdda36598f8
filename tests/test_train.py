"""The loop without Ray: one process, a LocalRun collecting reports. Fast checks of the pure pieces it relies on."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed.config import HISTORY_FILE, TrainConfig
from distributed.data import decode_data
from distributed.modelfile import BEST_FILE, load_model, load_state
from distributed.train import LocalRun, epoch_batches, make_schedule, steps_per_epoch, train_loop

TINY = dict(model="small_cnn", epochs=2, batch_size=64, train_limit=280, augment=False, lr_head=3e-3,
            lr_backbone=3e-3, seed=0)


@pytest.fixture(scope="module")
def synthetic():
    return decode_data("synthetic", seed=0)


def test_loop_runs_without_ray_and_reports_every_epoch(synthetic, tmp_path):
    run = LocalRun(device="cpu", checkpoint_dir=tmp_path)
    train_loop(TrainConfig(**TINY), synthetic, run)
    assert [r["epoch"] for r in run.reports] == [1, 2]
    assert all(r["val_count"] == 315 for r in run.reports)  # 2100 synthetic x val_fraction 0.15
    assert run.reports[0]["train_config"] == TrainConfig(**TINY).to_dict()  # the resolved config travels along
    state, best = load_state(tmp_path)
    assert state["epoch"] == 2 and best["class_names"] == synthetic.class_names


def test_the_loop_trains_in_a_process_that_never_imports_ray_or_optuna(tmp_path):
    """A GPU box without Ray, Optuna or tensorboardX (BENCHMARKS.md 4) runs the loop as it is: a fresh process
    trains one short epoch and scores its model file, and none of them was ever imported."""
    code = f"""
import sys
from distributed.config import TrainConfig
from distributed.evaluate import score_model
from distributed.train import LocalRun, train_loop
train_loop(TrainConfig(**{TINY!r} | {{"epochs": 1}}), None, LocalRun(device="cpu", checkpoint_dir={str(tmp_path)!r}))
score_model({str(tmp_path / BEST_FILE)!r}, "test")
print(sorted(m for m in ("ray", "optuna", "tensorboardX") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_same_seed_reproduces_exactly(synthetic):
    """Same config, same data, same process: every reported metric is identical, not merely close."""
    first, second = LocalRun(device="cpu"), LocalRun(device="cpu")
    cfg = TrainConfig(**{**TINY, "augment": True, "mixup_alpha": 0.2})
    train_loop(cfg, synthetic, first)
    train_loop(cfg, synthetic, second)
    keys = ("train_loss", "val_loss", "val_acc", "val_macro_f1")
    assert [[r[k] for k in keys] for r in first.reports] == [[r[k] for k in keys] for r in second.reports]


def test_resume_continues_from_the_checkpoint(synthetic, tmp_path):
    """Two epochs, then the same directory with four: epochs 3 and 4 run, starting from epoch 2's state."""
    cfg = TrainConfig(**TINY)
    assert LocalRun(device="cpu", checkpoint_dir=tmp_path).resume() is None
    first = LocalRun(device="cpu", checkpoint_dir=tmp_path)
    train_loop(cfg, synthetic, first)
    again = LocalRun(device="cpu", checkpoint_dir=tmp_path)
    train_loop(cfg.replace(epochs=4), synthetic, again)
    assert [r["epoch"] for r in again.reports] == [3, 4]
    assert again.reports[0]["run_start_epoch"] == 3
    # the checkpoint carries every epoch's report as JSON (what results.read_trials fills a lost result.json from)
    saved = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in saved] == [1, 2, 3, 4]
    assert [h["val_loss"] for h in saved] == [r["val_loss"] for r in first.reports + again.reports]


def test_refit_and_keep_last_keep_the_last_epoch_where_held_out_validation_keeps_its_best(synthetic, tmp_path):
    """refit trains on the validation images, so their score picks nothing: the model file is the last epoch's.
    keep_last keeps it too, on the same held-out validation (its curve is the plain run's, epoch by epoch). The
    plain run (same seed, same rate, hot enough to wander) keeps an earlier epoch."""
    cfg = TrainConfig(**{**TINY, "epochs": 4, "lr_head": 3e-2, "lr_backbone": None, "schedule": "constant",
                         "early_stop_patience": 2})
    kept, reports = {}, {}
    for name, change in (("plain", {}), ("refit", {"refit": True}), ("keep_last", {"keep_last": True})):
        run = LocalRun(device="cpu", checkpoint_dir=tmp_path / name)
        train_loop(cfg.replace(**change), synthetic, run)
        kept[name], reports[name] = load_model(tmp_path / name / BEST_FILE)[3]["epoch"], run.reports
    assert kept == {"plain": 1, "refit": 4, "keep_last": 4}  # and neither stops early (patience 2 stopped plain)
    assert len(reports["plain"]) == 3 and [r["epoch"] for r in reports["keep_last"]] == [1, 2, 3, 4]
    assert all(r["best_val_acc"] == r["val_acc"] for name in ("refit", "keep_last") for r in reports[name])
    # keep_last holds validation out: its epochs score exactly as the plain run's did
    assert [r["val_acc"] for r in reports["keep_last"][:3]] == [r["val_acc"] for r in reports["plain"]]


def test_best_model_file_loads_and_scores_like_the_loop(synthetic, tmp_path):
    from distributed.evaluate import predict
    from distributed.splits import make_splits

    cfg = TrainConfig(**TINY)
    run = LocalRun(device="cpu", checkpoint_dir=tmp_path)
    train_loop(cfg, synthetic, run)
    net, loaded, names, metrics = load_model(tmp_path / BEST_FILE)
    splits = make_splits(synthetic, cfg)
    pred = predict(net, torch.from_numpy(splits.val_x), loaded, torch.device("cpu")).argmax(1)
    acc = float((pred.numpy() == splits.val_y).mean())
    best = max(r["val_acc"] for r in run.reports)
    assert acc == pytest.approx(best, abs=1e-9) and metrics["val_acc"] == pytest.approx(best, abs=1e-9)
    # the file keeps that epoch's validation confusion matrix (the report draws it without decoding the data); a
    # file without one is scored again, to the same matrix
    from sklearn.metrics import confusion_matrix

    from distributed.evaluate import validation_confusion
    from distributed.modelfile import MODEL_FORMAT, load_file, save_model

    expected = confusion_matrix(splits.val_y, pred.numpy(), labels=list(range(len(names))))
    cm, cm_names, again = validation_confusion(tmp_path / BEST_FILE)
    assert (cm == expected).all() and cm_names == names and not again
    older = {k: v for k, v in load_file(tmp_path / BEST_FILE, MODEL_FORMAT).items() if k != "val_confusion"}
    save_model(tmp_path / "older.pt", older)
    cm, _, again = validation_confusion(tmp_path / "older.pt")
    assert (cm == expected).all() and again


@pytest.mark.parametrize("class_balance", ["none", "sampler"])
def test_epoch_batches_match_steps_per_epoch(class_balance):
    """The schedule is sized by steps_per_epoch; OneCycle raises if the loop ever steps more often than that."""
    for n, world, batch in itertools.product((2, 3, 63, 64, 65, 129, 700), (1, 2, 3), (1, 2, 32, 64)):
        if batch < 2:
            continue
        y = np.arange(n) % 3
        cfg = TrainConfig(batch_size=batch, class_balance=class_balance)
        counts = []
        for rank in range(world):
            batches = list(epoch_batches(y, cfg, rank, world, epoch=1))
            assert all(len(b) >= 2 for b in batches)
            counts.append(len(batches))
        assert len(set(counts)) == 1, (n, world, batch, counts)  # every rank joins every all-reduce
        assert counts[0] <= steps_per_epoch(n, world, batch)
        assert counts[0] == steps_per_epoch(n, world, batch) or n < 2 * world


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedule_resumes_where_it_stopped(schedule):
    """Stop after 15 of 40 steps, save the optimizer, rebuild both as the loop does on resume: the learning rates
    continue those of one uninterrupted schedule."""
    cfg, peaks = TrainConfig(schedule=schedule), [1e-3, 1e-4]

    def optimizer():
        net = torch.nn.Linear(2, 2)
        return torch.optim.AdamW([{"params": [net.weight], "lr": peaks[0]}, {"params": [net.bias], "lr": peaks[1]}])

    def walk(opt, sched, steps):
        out = []
        for _ in range(steps):
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        return out

    opt = optimizer()
    whole = walk(opt, make_schedule(cfg, opt, peaks, total_steps=40), 40)
    opt = optimizer()
    walk(opt, make_schedule(cfg, opt, peaks, total_steps=40), 15)
    resumed = optimizer()
    resumed.load_state_dict(opt.state_dict())
    rest = walk(resumed, make_schedule(cfg, resumed, peaks, total_steps=40, done_steps=15), 25)
    assert np.allclose(rest, whole[15:], rtol=1e-9, atol=0)
    if schedule == "onecycle":
        assert max(r[0] for r in whole) == pytest.approx(peaks[0], rel=1e-3)


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 8, 40])
@pytest.mark.parametrize("warmup_pct", [0.06, 0.25, 0.5, 0.9])
def test_onecycle_runs_on_any_number_of_steps(total_steps, warmup_pct):
    """torch's OneCycleLR divides by (pct_start x total_steps - 1): 4 steps at 0.25 (1 epoch of a 200-image run)
    raised ZeroDivisionError in a real search. Every step count walks through, warms up to the peak where it has
    room to (3 steps or more), and comes down again."""
    cfg = TrainConfig(schedule="onecycle", warmup_pct=warmup_pct)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = make_schedule(cfg, opt, [1e-2], total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(np.isfinite(lrs)) and max(lrs) <= 1e-2 * (1 + 1e-9)
    if total_steps >= 3:
        assert lrs[0] < max(lrs) and lrs[-1] < max(lrs) and max(lrs) > 0.6e-2, lrs


def test_optimizer_gives_the_body_one_rate_from_scratch_and_1e4_when_pretrained(synthetic, monkeypatch):
    """lr_backbone unset: every stage of a network trained from scratch gets lr_head (a body at 1e-4 tested at
    0.349 against 0.550 at one rate); an ImageNet body gets 1e-4; an explicit lr_backbone is taken as given."""
    import torchvision

    from distributed import models
    from distributed.splits import make_splits
    from distributed.train import build_member

    # torchvision's random weights stand in for the ImageNet file: no download, no cache
    monkeypatch.setattr(models, "download_imagenet",
                        lambda name: (getattr(torchvision.models, name)(weights=None).state_dict(), "stand-in"))
    run = LocalRun(device="cpu")

    def rates(**changes) -> list[float]:
        cfg = TrainConfig(**{**TINY, "lr_head": 2e-3, "lr_backbone": None, **changes})
        return [g["lr"] for g in build_member(cfg, make_splits(synthetic, cfg), run).optimizer.param_groups]

    for model in ("small_cnn", "baseline_cnn", "emotion_cnn48", "mobilenet_v3_small"):  # the last: pretrained false
        lrs = rates(model=model)
        assert len(lrs) > 2 and lrs == [2e-3] * len(lrs), (model, lrs)
    head, *body = rates(model="mobilenet_v3_small", pretrained=True)
    assert head == 2e-3 and len(body) > 1 and set(body) == {1e-4}
    head, *body = rates(model="emotion_cnn48", lr_backbone=5e-4)
    assert head == 2e-3 and set(body) == {5e-4}
    head, *body = rates(model="mobilenet_v3_small", pretrained=True, lr_backbone=2e-3)
    assert set(body) == {2e-3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loop_on_cuda_with_amp_and_channels_last(synthetic, tmp_path):
    """One epoch on the GPU through a LocalRun, bf16 autocast and channels_last on: finite metrics, and the kept
    model file loads back on the CPU."""
    import math


    cfg = TrainConfig(**{**TINY, "epochs": 1, "amp": True, "channels_last": True, "augment": True,
                         "mixup_alpha": 0.2})
    run = LocalRun(device="cuda", checkpoint_dir=tmp_path)
    train_loop(cfg, synthetic, run)
    (report,) = run.reports
    assert all(math.isfinite(report[k]) for k in ("train_loss", "val_loss", "val_acc", "images_per_s"))
    assert not report["diverged"]
    net, _, _, _ = load_model(tmp_path / BEST_FILE)
    assert next(net.parameters()).device.type == "cpu"


def test_under_wsd_a_rungs_value_does_not_depend_on_the_trials_budget():
    """ASHA judges a trial at epoch r of its budget: under wsd the epochs before the decay train the same whatever
    the budget, so a rung compares like with like; under OneCycle the same config at another budget is elsewhere
    in its schedule at epoch r, and scores differently."""
    def curve(schedule: str, epochs: int) -> list[float]:
        cfg = TrainConfig(model="small_cnn", epochs=epochs, schedule=schedule, train_limit=200, augment=False,
                          lr_head=3e-3, seed=0)
        run = LocalRun("cpu")
        train_loop(cfg, None, run)
        return [r["val_loss"] for r in run.reports]

    short, long = curve("wsd", 3), curve("wsd", 5)
    assert short[:2] == long[:2]  # epochs 1-2: warm-up and stable in both (the decay is epoch 3 of 3, 5 of 5)
    assert short[2] != long[2]
    one_short, one_long = curve("onecycle", 3), curve("onecycle", 5)
    assert one_short[0] != one_long[0]


def teacher_file(path, cfg: TrainConfig, class_names: list[str], answer: int):
    """A model file of cfg.model that answers `answer` for every image: its head's last layer weighs nothing and
    its bias favours that class by far."""
    from distributed.modelfile import model_blob, save_model
    from distributed.models import create_model

    net = create_model(cfg.model, len(class_names), in_channels=cfg.in_channels, dropout=cfg.dropout)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(answer), len(class_names)).float() * 20)
    save_model(path, model_blob(net, cfg, class_names, {}))
    return path


def test_a_student_learns_what_its_teacher_answers(synthetic, tmp_path):
    """teacher: a network that matches the teacher's answers on its batches ends up answering like it. The teacher
    here says class 3 for every face; with teacher_weight 1 the student does too, with 0 it learns the labels."""
    from distributed.evaluate import score_model

    cfg = TrainConfig(**TINY, keep_last=True)
    teacher = teacher_file(tmp_path / "teacher.pt", cfg, synthetic.class_names, answer=3)
    answers = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        train_loop(cfg.replace(teacher=str(teacher), teacher_weight=weight), synthetic,
                   LocalRun(device="cpu", checkpoint_dir=out))
        answers[weight] = score_model(out / BEST_FILE, "test", data=synthetic).y_pred
    assert np.mean(answers[1.0] == 3) > 0.95
    assert np.mean(answers[0.0] == 3) < 0.5


def test_a_teacher_for_other_classes_is_refused_before_training(synthetic, tmp_path):
    from distributed.errors import ConfigError

    cfg = TrainConfig(**TINY)
    teacher = teacher_file(tmp_path / "teacher.pt", cfg, synthetic.class_names[:-1], answer=0)
    with pytest.raises(ConfigError, match="distil from a model trained on the same data"):
        train_loop(cfg.replace(teacher=str(teacher)), synthetic, LocalRun(device="cpu"))
