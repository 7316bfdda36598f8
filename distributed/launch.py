"""Starting or joining Ray, and building the TorchTrainer that runs train_loop_per_worker.

Shared by `emotune train` (one run) and `emotune tune` (one TorchTrainer per trial).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

DRIVER_RESOURCE = "emotune_driver"
# Plenty of slots: the resource only says *where* trial drivers may run; concurrency is planned elsewhere.
DRIVER_SLOTS = 1000


@dataclass
class Scaling:
    """How one training run is spread: `workers` DDP processes, each with these CPUs/GPUs (fractions allowed)."""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def worker_resources(self) -> dict:
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Join the cluster at `address` (or $RAY_ADDRESS, as inside a Ray job), or start a local instance that
    declares the driver resource. Only a Ray instance started here is shut down here.

    A local instance starts its dashboard (bound to 127.0.0.1): Ray Train V2 asks the State API it serves
    whether a run's controller is alive, to release the run's placement group when it is not."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(log_to_driver=True, configure_logging=True, logging_level="WARNING")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": without it ray.init() joins any cluster that `ray start` left on this machine, and then
        # refuses the resources below ("When connecting to an existing cluster, resources must not be provided").
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources={DRIVER_RESOURCE: DRIVER_SLOTS},
                 include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def make_trainer(loop_config: dict, scaling: Scaling, name: str, storage_path: str, *, callbacks=(),
                 max_failures: int = 0, num_to_keep: int = 1):
    """A TorchTrainer for one run. `name` must be stable (no timestamp): a run started again under the same
    storage_path/name resumes from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distributed.train import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0,
                                     resources_per_worker=scaling.worker_resources()),
        torch_config=TorchConfig(backend="nccl" if scaling.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep)),
    )


def absolute_storage(path: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://, ...) pass through unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def tensorboard_callback(logdir: str):
    """Ray Train callback writing each report as TensorBoard scalars. It runs in the Train controller, which
    Ray places on the driver's node, so logdir is a local path of the machine that launched the run."""
    from ray.train.v2.api.callback import UserCallback

    class TensorBoard(UserCallback):
        def __init__(self):
            self.writer = None

        def after_report(self, run_context, metrics, checkpoint):
            from tensorboardX import SummaryWriter

            self.writer = self.writer or SummaryWriter(logdir)
            row = metrics[0]
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self.writer.add_scalar(key, value, global_step=row.get("epoch", 0))
            self.writer.flush()

    return TensorBoard()


def fit(cfg, output: str, scaling: Scaling, address: str | None = None, max_failures: int = 1) -> dict:
    """`emotune train`: one run through Ray Train, then one evaluation on the test split and the reports.

    Everything that can be wrong with the input (model name, data path, classes) is checked before Ray starts.
    Running the same command again with the same --output resumes an interrupted run from its last epoch.
    """
    from pathlib import Path

    import torch

    from distributed import results
    from distributed.data import load_pool, make_splits
    from distributed.models import fetch_weights, native_size
    from distributed.train import MODEL_FORMAT, load_file, load_model, predict

    out = Path(output).resolve()
    fetch_weights(cfg.model, cfg.pretrained, cfg.weights_path)
    pool = load_pool(cfg.data, in_channels=cfg.in_channels, size=cfg.data_size, seed=cfg.seed)
    splits = make_splits(pool, cfg.classes, cfg.val_fraction, cfg.seed, cfg.train_limit)
    check_same_run(out, cfg)
    check_writable(out)
    cfg.save(out / "config.yaml", header="resolved TrainConfig of this run; re-run: emotune train --config config.yaml")

    with ray_session(address) as ray:
        loop_config = {"train": cfg.to_dict(), "pool": ray.put(pool), "direct": False, "env": passed_env()}
        trainer = make_trainer(loop_config, scaling, name="run", storage_path=str(out), max_failures=max_failures,
                               callbacks=[tensorboard_callback(str(out / "tensorboard"))])
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            state = load_file(Path(d) / "state.pt", "emotune-state/1")
            best = load_file(Path(d) / "best_model.pt", MODEL_FORMAT)

    torch.save(best, out / "best_model.pt")
    final = dict(best, state_dict=final_weights(state), metrics=state["history"][-1])
    torch.save(final, out / "final_model.pt")
    results.write_table(state["history"], out / "metrics")
    results.plot_curves(state["history"], out / "curves.png")

    net, _, names, _ = load_model(out / "best_model.pt")
    logits = predict(net, torch.from_numpy(splits.test_x), cfg, cfg.image_size or native_size(cfg.model),
                     torch.device("cpu"))
    summary = results.write_test_report(out, splits.test_y, logits.argmax(1).numpy(), names, splits.test_groups)
    return {"output": str(out), "best_epoch": state["best"]["epoch"], "epochs_run": state["epoch"],
            f"best_{cfg.monitor}": state["best"]["value"], **summary["all"]}


def passed_env() -> dict:
    """Environment the workers need from the launching shell (Ray's worker processes may predate it):
    TORCH_HOME says where pretrained weights are cached."""
    return {k: os.environ[k] for k in ("TORCH_HOME",) if k in os.environ}


def final_weights(state: dict) -> dict:
    """The last epoch's weights; its EMA weights when EMA was on (what evaluation used)."""
    if state.get("ema") is None:
        return state["model"]
    return {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}


def check_same_run(out, cfg) -> None:
    """An existing run directory is resumed (or extended with more epochs) only by the same config: anything
    else would silently continue someone else's run."""
    from distributed.config import ConfigError, TrainConfig

    saved = out / "config.yaml"
    if not (out / "run").exists() or not saved.exists():
        return
    before = TrainConfig.load(saved).to_dict()
    changed = sorted(k for k, v in cfg.to_dict().items() if k != "epochs" and before.get(k) != v)
    if changed:
        raise ConfigError(f"{out}: holds a run of a different config ({', '.join(changed)} differ); "
                          f"choose another --output, or the same config to resume it")


def check_writable(path) -> None:
    """A clear error before any work starts, rather than a failure after the first epoch."""
    import tempfile
    from pathlib import Path

    from distributed.config import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write results there ({exc.strerror or exc}); "
                          f"choose a writable --output/--storage-path") from None
