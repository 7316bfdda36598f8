"""`emotune train`'s pure pieces: refusing to continue someone else's run, and how a single machine is used."""
from __future__ import annotations

import pytest

from distributed.cli import build_parser, scaling_from
from distributed.config import ConfigError, Scaling, TrainConfig
from distributed.plan import local_cpus
from distributed.run import check_same_run


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
