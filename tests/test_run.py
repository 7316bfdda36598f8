"""`emotune train` (run.py): in this process for one worker, under real Ray Train (gloo DDP on CPU) for several;
checkpoints, resume, reports, the CLI's lines; and its pure pieces: refusing to continue someone else's run, and how
a single machine is used."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA, REPO, Payload, need, tensorboard_scalars

from distributed.cli import build_parser, main, scaling_from
from distributed.config import ConfigError, Scaling, TrainConfig
from distributed.data import load_data
from distributed.evaluate import predict
from distributed.modelfile import MODEL_FORMAT, STATE_FORMAT, load_file, load_model
from distributed.models import create_model, stages
from distributed.plan import local_cpus
from distributed.run import check_same_run, train_run
from distributed.splits import make_splits
from distributed.train import set_trainable

RAY_INTERNALS = ("Requesting resources", "Attempting to start training worker group",
                 "PreemptionWatcher", "TrainingReport(", "Token authentication")


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a Ray instance of its own, started and stopped by the command
    return env


def train_cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "distributed", "train", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.mark.slow
def test_two_worker_ddp_run_from_the_cli_prints_plain_lines_then_resumes_and_survives_a_killed_worker(tmp_path):
    """`emotune train --workers 2`: a Ray Train worker group (gloo DDP on CPU) started by the command itself, one
    plain line per epoch and none of Ray's own; then the same command with more epochs resumes, and a training
    worker SIGKILLed mid-run costs at most one epoch."""
    # Progressive unfreezing at epochs 2 and 3 also makes DDP rebuild its wrapper while both ranks train.
    sets = ["--set", "model=small_cnn", "--set", "lr_head=3e-3", "--set", "lr_backbone=3e-3", "--set",
            "schedule=constant", "--set", "augment=false", "--set", "freeze=progressive", "--set", "unfreeze_start=2",
            "--set", "unfreeze_every=1", "--set", "seed=1", "--set", "train_limit=700"]
    out = tmp_path / "run"
    done = train_cli("--workers", "2", "--gpus-per-worker", "0", "--set", "epochs=2", *sets, "--output", str(out))
    said = done.stdout + done.stderr
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"], said[-3000:]
    for line in epochs:
        assert re.fullmatch(r"epoch \d/2  train_loss [\d.]+  val_loss [\d.]+  val_acc [\d.]+  val_macro_f1 [\d.]+  "
                            r"\d+ img/s  ETA \d+m\d\ds", line), line
    assert re.search(r"^best val val_acc [\d.]+  test_acc [\d.]+", done.stdout, re.M), done.stdout
    assert not [w for w in RAY_INTERNALS if w in said], said[-3000:]

    history = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    # Each rank scored half of the validation split; the gathered metrics cover all of it.
    assert all(h["val_count"] == 315 for h in history)
    assert [h["trainable_stages"] for h in history] == [1, 2]
    # the machine's CPUs shared between the two workers: each reserved half, and torch trained on that many threads
    assert {h["torch_threads"] for h in history} == {max(1, local_cpus() // 2)}
    assert list(out.glob("run/checkpoint_*/state.pt")) and (out / "best_model.pt").exists()
    # What the two ranks reported is what the saved (rank 0) model scores on the whole validation split: both ranks
    # evaluated with rank 0's BatchNorm statistics (at most one image apart, for batch-size rounding).
    cfg = TrainConfig.load(out / "config.yaml")
    splits = make_splits(load_data(cfg), cfg)
    net, loaded, _, _ = load_model(out / "best_model.pt")
    pred = predict(net, torch.from_numpy(splits.val_x), loaded, torch.device("cpu")).argmax(1).numpy()
    best = max(history, key=lambda h: h["val_acc"])
    assert abs(float((pred == splits.val_y).mean()) - best["val_acc"]) <= 1 / 315 + 1e-9
    # The test figure is the saved best model's accuracy on the whole test split, and the confusion matrix agrees.
    test_pred = predict(net, torch.from_numpy(splits.test_x), loaded, torch.device("cpu")).argmax(1).numpy()
    test = json.loads((out / "test_metrics.json").read_text())["all"]
    assert test["test_acc"] == pytest.approx(float((test_pred == splits.test_y).mean()), abs=1e-12)
    cm = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 8))
    assert cm.sum() == len(splits.test_y) == 700 and np.trace(cm) == (test_pred == splits.test_y).sum()

    # Same output directory, more epochs: Ray Train hands the worker group its latest checkpoint (--verbose: Ray's
    # own log lines too, which the first run kept out). Mid-run one training worker is SIGKILLed: the command's
    # failure allowance restarts the group from the newest registered checkpoint, losing at most one epoch.
    log = tmp_path / "resumed.log"
    with open(log, "w") as said:
        run = subprocess.Popen([sys.executable, "-m", "distributed", "train", "--workers", "2", "--set", "epochs=6",
                                *sets, "--output", str(out), "--verbose"], cwd=REPO, env=cli_env(), stdout=said,
                               stderr=subprocess.STDOUT, text=True)
    try:
        # A checkpoint counts once every rank has reported its epoch, which is after its file is written: a file
        # of epoch 4 means epoch 3 was registered. Kill then; the run resumes after the newest registered epoch.
        deadline = time.time() + 540  # Ray's start and the group's on a busy 2-core machine take minutes
        while time.time() < deadline and run.poll() is None and checkpointed_epoch(out) < 4:
            time.sleep(0.2)
        done_at_kill = checkpointed_epoch(out)
        assert done_at_kill in (4, 5), (done_at_kill, log.read_text()[-3000:])
        workers = train_worker_pids(run.pid)
        assert len(workers) == 2, log.read_text()[-3000:]
        os.kill(workers[1], signal.SIGKILL)
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    said = log.read_text()
    assert run.returncode == 0, said[-3000:]
    assert [w for w in RAY_INTERNALS if w in said], said[-3000:]
    history = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6], said[-3000:]
    assert history[2]["run_start_epoch"] == 3
    assert history[2]["trainable_stages"] == 3
    restarts = [h for h in history if h["run_start_epoch"] > 3]
    assert restarts, f"the worker group never restarted after its worker was killed\n{said[-3000:]}"
    # It resumed after the newest registered epoch: at most the epoch in flight when the worker died is redone.
    assert restarts[0]["run_start_epoch"] in (done_at_kill, done_at_kill + 1), (done_at_kill, restarts[0])
    assert (out / "best_model.pt").exists()


def checkpointed_epoch(out) -> int:
    """Newest epoch whose checkpoint file is in the run's storage (0 if none); tolerates a file being written."""
    epochs = [0]
    for path in out.glob("run/checkpoint_*/state.pt"):
        try:
            epochs.append(load_file(path, STATE_FORMAT)["epoch"])
        except Exception:  # still being copied in
            pass
    return max(epochs)


def train_worker_pids(pid: int) -> list[int]:
    """Ray Train workers of the Ray instance process `pid` started (they descend from it; other Ray instances on
    the machine do not). Ray titles worker processes `ray::<actor class>...`."""
    import psutil

    found = []
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(p.pid)
    return found


def test_run_outputs_are_complete_and_loadable(tmp_path):
    """In-process (one worker, no Ray): every file `emotune train` promises, each read back."""
    cfg = TrainConfig(model="small_cnn", epochs=2, ema_decay=0.9, classes=["happy", "sad", "surprise"],
                      train_limit=200)
    train_run(cfg, str(tmp_path), Scaling(workers=1, cpus_per_worker=2))
    for name in ("config.yaml", "metrics.csv", "metrics.parquet", "curves.png", "classification_report.txt",
                 "classification_report.json", "confusion_matrix.csv", "confusion_matrix.png", "test_metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    history = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    assert [h["epoch"] for h in history] == [1, 2]
    # TensorBoard events read back: every epoch's val_acc, as the metrics table has it
    logged = tensorboard_scalars(tmp_path / "tensorboard", "val_acc")
    assert [step for step, _ in logged] == [1, 2]
    assert [value for _, value in logged] == pytest.approx([h["val_acc"] for h in history], abs=1e-6)
    test = json.loads((tmp_path / "test_metrics.json").read_text())
    cm = np.loadtxt(tmp_path / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 4))
    assert cm.sum() == test["all"]["test_count"] and np.trace(cm) / cm.sum() == pytest.approx(test["all"]["test_acc"])
    assert TrainConfig.load(tmp_path / "config.yaml") == cfg
    for name in ("best_model.pt", "final_model.pt"):
        blob = torch.load(tmp_path / name, weights_only=True)
        assert blob["format"] == MODEL_FORMAT and blob["class_names"] == ["happy", "sad", "surprise"]
    net, loaded_cfg, names, _ = load_model(tmp_path / "best_model.pt")
    assert loaded_cfg == cfg and net(torch.zeros(2, 1, 48, 48)).shape == (2, 3)
    report = json.loads((tmp_path / "classification_report.json").read_text())
    assert set(names) <= set(report)


def test_progressive_unfreezing_schedule():
    """The source recipe: head only for 10 epochs, then layer4, layer3, layer2, then everything, every 10."""
    net = create_model("resnet18", 7)
    groups = stages(net)
    cfg = TrainConfig(model="resnet18", freeze="progressive", unfreeze_start=11, unfreeze_every=10)
    seen = {}
    for epoch in (1, 10, 11, 20, 21, 31, 41, 100):
        n = set_trainable(groups, cfg, epoch)
        trainable = [any(p.requires_grad for p in g.parameters()) for g in groups]
        assert trainable == [i < n for i in range(len(groups))]
        assert all(p.requires_grad == (i < n) for i, g in enumerate(groups) for p in g.parameters())
        seen[epoch] = n
    assert seen == {1: 1, 10: 1, 11: 2, 20: 2, 21: 3, 31: 4, 41: 5, 100: 5}
    assert set_trainable(groups, cfg.replace(freeze="frozen"), 50) == 1
    assert set_trainable(groups, cfg.replace(freeze="none"), 1) == len(groups)


@pytest.mark.slow
def test_pretrained_mobilenet_beats_random_init_on_ckplus(tmp_path, monkeypatch):
    """The shared torchvision ImageNet file, placed in a temporary TORCH_HOME, is found offline."""
    weights = need(DATA.parent / "weights" / "mobilenet_v2-b0353104.pth")
    data = need(DATA / "ckplus48")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / weights.name).symlink_to(weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    base = TrainConfig(model="mobilenet_v2", data=f"imagefolder:{data}", epochs=2, image_size=96, batch_size=32,
                       lr_head=1e-3, lr_backbone=3e-4, augment=False, seed=0)
    random = train_run(base, str(tmp_path / "random"), Scaling(workers=1))
    pretrained = train_run(base.replace(pretrained=True), str(tmp_path / "pretrained"), Scaling(workers=1))
    assert pretrained["test_acc"] > random["test_acc"] + 0.05, (pretrained, random)


@pytest.mark.slow
def test_a_ckplus_model_trained_in_process_predicts_photos(tmp_path, capsys):
    """`emotune train` with one worker runs the loop in this process (no Ray); its model then serves `predict`.
    How well architectures learn CK+48 is bench/quality.py's claim; this needs a model good enough that `predict`
    must get most happy faces of unseen people right (small_cnn, 8 epochs: test 0.89 measured, ~35 s)."""
    import ray

    data = need(DATA / "ckplus48")
    cfg = TrainConfig(model="small_cnn", data=f"imagefolder:{data}", epochs=8, batch_size=32, dropout=0.2,
                      augment=False, lr_head=3e-3, lr_backbone=3e-3, seed=0)
    started = ray.is_initialized()
    summary = train_run(cfg, str(tmp_path), Scaling(workers=1, cpus_per_worker=2))
    assert ray.is_initialized() == started  # in-process: no Ray started for a one-worker run on this machine
    assert not list(tmp_path.glob("run/checkpoint_*")) and (tmp_path / "run" / "checkpoint" / "state.pt").is_file()
    assert summary["test_acc"] >= 0.70, summary

    images = sorted((data / "test" / "happy").glob("*.png"))
    assert main(["predict", str(tmp_path / "best_model.pt"), *map(str, images), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-len(images):]]
    for r in records:
        probs = [t["p"] for t in r["top3"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert r["confidence"] == probs[0] and r["class"] == r["top3"][0]["class"]
    # the CLI says what the model says, and the model gets most happy faces of unseen people right
    net, loaded, names, _ = load_model(tmp_path / "best_model.pt")
    from distributed.data import read_images

    logits = predict(net, torch.from_numpy(read_images([str(i) for i in images])), loaded, torch.device("cpu"))
    assert [r["class"] for r in records] == [names[i] for i in logits.argmax(1).tolist()]
    assert sum(r["class"] == "happy" for r in records) > len(records) / 2


def test_model_files_refuse_foreign_and_pickled_content(tmp_path, capsys):
    torch.save({"x": Payload(tmp_path / "pwned")}, tmp_path / "evil.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    np.save(tmp_path / "array.npy", np.zeros(3))
    from PIL import Image

    Image.new("L", (48, 48), 128).save(tmp_path / "face.png")  # a readable image: only the model file is wrong
    for name in ("evil.pt", "foreign.pt", "array.npy"):
        assert main(["predict", str(tmp_path / name), str(tmp_path / "face.png")]) == 2
        assert f"{tmp_path / name}: not an emotune file" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------ pure pieces

def test_a_different_config_in_the_same_output_is_refused(tmp_path):
    cfg = TrainConfig(model="small_cnn", epochs=2)
    check_same_run(tmp_path, cfg)  # nothing there yet
    cfg.save(tmp_path / "config.yaml")
    (tmp_path / "run").mkdir()  # Ray Train's run folder: a run exists
    check_same_run(tmp_path, cfg)  # the same config resumes
    check_same_run(tmp_path, cfg.replace(epochs=5))  # more epochs extend it
    with pytest.raises(ConfigError, match=r"lr_head, model differ\); choose another --output"):
        check_same_run(tmp_path, cfg.replace(model="baseline_cnn", lr_head=0.01))


def test_a_config_file_alone_is_no_run(tmp_path):
    TrainConfig(model="small_cnn").save(tmp_path / "config.yaml")  # written before Ray started, then interrupted
    check_same_run(tmp_path, TrainConfig(model="baseline_cnn"))


def test_one_machine_train_uses_every_cpu():
    import torch

    scaling = scaling_from(build_parser().parse_args(["train"]))
    workers = max(1, torch.cuda.device_count())  # auto: one per GPU here, else one on the CPUs
    assert scaling.workers == workers and scaling.cpus_per_worker == max(1, local_cpus() // workers)
    two = scaling_from(build_parser().parse_args(["train", "--workers", "2"]))
    assert two.workers == 2 and two.cpus_per_worker == max(1, local_cpus() // 2)
    on_cluster = scaling_from(build_parser().parse_args(["train", "--address", "127.0.0.1:6379"]))
    assert on_cluster.cpus_per_worker == 1  # this machine says nothing about the cluster's nodes
    with pytest.raises(ConfigError, match="expected a number or auto"):
        scaling_from(build_parser().parse_args(["train", "--workers", "many"]))


def test_two_ranks_on_one_gpu_are_refused():
    """NCCL refuses two DDP ranks on one device (measured on an H200, BENCHMARKS.md section 4)."""
    with pytest.raises(ConfigError, match="which NCCL refuses; use gpus_per_worker: 1"):
        Scaling(workers=2, gpus_per_worker=0.5)
    assert Scaling(workers=1, gpus_per_worker=0.25).worker_resources() == {"CPU": 1.0, "GPU": 0.25}
    assert Scaling(workers=2, gpus_per_worker=1).workers == 2
