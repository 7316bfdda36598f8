"""`emotune train`: one run, then the single test evaluation. One worker on this machine runs the loop in this
process (ProcessRun); several DDP workers, or a run on a cluster, run it under Ray Train. Also what every Ray Train
run needs: starting or joining Ray, the TorchTrainer, and the Run that a Ray Train worker hands the loop.

Shared by `emotune train` (one run) and `emotune tune` (one TorchTrainer per worker-group trial).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from distributed import storage
from distributed.config import DRIVER_RESOURCE, DRIVER_SLOTS, HISTORY_FILE, ConfigError, Scaling, TrainConfig
from distributed.modelfile import BEST_FILE, STATE_FILE, checkpoint_state, load_state
from distributed.prepare import check_auth_mode, check_reachable
from distributed.progress import epoch_line, follow, progress_callback, tensorboard_callback, write_scalars
from distributed.train import Run, load_teacher, train_loop


class TrainWorkerRun(Run):
    """A Ray Train worker: its DDP rank and device come from Ray Train, reports go to ray.train.report."""

    def __init__(self):
        import ray
        import ray.train.torch
        import torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        context = ray.get_runtime_context()
        self.node = context.get_node_id()  # where rank 0 ran: placement is readable from results
        # torch's intra-op threads = the CPUs Ray reserved for this worker (a whole machine for a one-node run)
        torch.set_num_threads(max(1, int(context.get_assigned_resources().get("CPU", 1))))
        gpus = context.get_accelerator_ids().get("GPU", [])
        if gpus and not torch.cuda.is_available():  # Ray Train hands out cuda:N for any reserved GPU
            self.device = cpu_for_reserved_gpu(len(gpus), self.node)

    def resume(self):
        import ray.train

        return checkpoint_state(ray.train.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        # Every rank reports (it is a barrier); only rank 0 wrote files, so only it hands over a checkpoint.
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if self.rank == 0 and checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(loop_config: dict) -> None:
    """What Ray Train runs on each worker. loop_config: {"train": the run's TrainConfig, "data": ObjectRef of the decoded
    data or None (decode here), "env": variables from the launcher, "verbose": Ray's INFO lines too}."""
    import logging

    import ray
    import ray.train.v2._internal.execution.context as train_context

    os.environ.update(loop_config.get("env", {}))
    if not loop_config.get("verbose"):
        # Ray Train logs each report ("Reporting training result N: TrainingReport(...)") at INFO on a logger named
        # after its file path, which RunConfig's LoggingConfig (it filters "ray.train.*") does not reach.
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ref = loop_config.get("data")
    train_loop(loop_config["train"], ray.get(ref) if ref is not None else None, TrainWorkerRun())


# Set to 1 where Ray's GPUs are logical (declared on CPU machines, as Ray's test clusters do): a worker that reserved
# a GPU then trains on the CPU and says so. Anywhere else a reserved GPU that torch cannot see is an error.
LOGICAL_GPUS = "EMOTUNE_LOGICAL_GPUS"


def cpu_for_reserved_gpu(gpus: float, node: str):
    """The device for a worker that reserved GPUs but sees no CUDA: the CPU where LOGICAL_GPUS=1, else an error,
    never a silent fallback."""
    import sys

    import torch

    if os.environ.get(LOGICAL_GPUS) != "1":
        raise RuntimeError(f"worker reserved {gpus:g} GPU but torch sees no CUDA device on node {node}; install a "
                           f"CUDA build of torch there (or set {LOGICAL_GPUS}=1 where the GPUs are logical)")
    print(f"emotune: node {node}: reserved {gpus:g} logical GPU and trains on the CPU ({LOGICAL_GPUS}=1)",
          file=sys.stderr, flush=True)
    return torch.device("cpu")


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                verbose: bool = False):
    """Join the cluster at `address` (or $RAY_ADDRESS, as inside a Ray job), or start a local instance that
    declares the driver resource. Only a Ray instance started here is shut down here.

    A local instance starts its dashboard (bound to 127.0.0.1): Ray Train V2 asks the State API it serves
    whether a run's controller is alive, to release the run's placement group when it is not.

    Quiet unless `verbose`: Ray's INFO lines stay in the log files Ray keeps (/tmp/ray/session_latest/logs);
    warnings from the workers still reach the terminal."""
    import logging

    import ray

    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"log_to_driver": True, "configure_logging": True, "logging_level": "INFO" if verbose else "WARNING"}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:  # "auto" with no cluster on this machine
            raise ConfigError(f"--address {address}: {str(exc).splitlines()[0]}") from None
    else:
        check_auth_mode()  # token auth ON for the instance we start
        if not verbose:
            # A local instance is this user's own: its token notice and the preemption watcher (it polls for
            # draining cloud nodes, and on a laptop logs a failed poll with a traceback) say nothing to act on.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # "local": without it ray.init() joins any cluster that `ray start` left on this machine, and then
        # refuses the resources below ("When connecting to an existing cluster, resources must not be provided").
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources={DRIVER_RESOURCE: DRIVER_SLOTS},
                 include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def make_trainer(loop_config: dict, scaling: Scaling, name: str, storage_path: str, *, callbacks=(),
                 max_failures: int = 0, num_to_keep: int = 1, verbose: bool = False):
    """A TorchTrainer for one run. `name` must be stable (no timestamp): a run started again under the same
    storage_path/name resumes from its latest checkpoint. Ray Train's own lines go to its log files only, unless
    `verbose`: its INFO (requesting resources, starting the worker group, each report) and its errors too, which
    its controller logs with a traceback for what it retries (a worker group that waits for booting nodes: "Error
    in control loop iteration"); what ends a run still reaches the caller as the exception fit() raises."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0,
                                     resources_per_worker=scaling.worker_resources()),
        torch_config=TorchConfig(backend="nccl" if scaling.gpus_per_worker > 0 and os.environ.get(LOGICAL_GPUS) != "1"
                                 else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "CRITICAL")),
    )


def in_process(scaling: Scaling, address: str | None) -> bool:
    """One worker on this machine: the loop runs in this process, without Ray. A worker group would do the same
    work after ~15-25 s of start-up (Ray, a Train controller, a worker process importing torch again); DDP over
    several workers, and any run on a cluster (--address, or $RAY_ADDRESS inside a Ray job), go through Ray Train."""
    return scaling.workers == 1 and not (address or os.environ.get("RAY_ADDRESS"))


class ProcessRun(Run):
    """`emotune train` in this process: checkpoints go to OUTPUT/run/checkpoint (a path or a URI), where the same
    command finds them to resume; each epoch's line goes to progress.log (follow() prints it) and its scalars to
    TensorBoard, as the Ray Train callbacks do for a worker group."""

    def __init__(self, out: str, local: Path, epochs: int, threads: int, gpu: bool):
        import torch

        # the GPU only where the run asked for one (--gpus-per-worker 0 on a GPU box trains on the CPU, as under
        # Ray Train with use_gpu=False)
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        torch.set_num_threads(threads)  # the CPUs this run may use (a one-node run: every core)
        self.checkpoint = storage.join(out, "run", "checkpoint")
        self.local, self.epochs, self.epoch_times, self.writer = local, epochs, [], None

    def resume(self):
        if not storage.is_file(storage.join(self.checkpoint, STATE_FILE)):
            return None
        if not storage.is_uri(self.checkpoint):
            return load_state(self.checkpoint)
        with tempfile.TemporaryDirectory() as tmp:
            for name in (STATE_FILE, BEST_FILE):
                storage.download(storage.join(self.checkpoint, name), Path(tmp) / name)
            return load_state(tmp)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:  # the best model first: a state on disk always has its best model beside it
            for name in (BEST_FILE, HISTORY_FILE, STATE_FILE):
                storage.upload(Path(checkpoint_dir) / name, storage.join(self.checkpoint, name))
        with open(self.local / "progress.log", "a") as f:
            f.write(epoch_line(metrics, self.epochs, self.epoch_times) + "\n")
        from tensorboardX import SummaryWriter

        self.writer = self.writer or SummaryWriter(str(self.local / "tensorboard"))
        write_scalars(self.writer, metrics)


def train_run(cfg: TrainConfig, output: str, scaling: Scaling, address: str | None = None,
              max_failures: int = 1, verbose: bool = False, data=None) -> dict:
    """`emotune train`: one run through Ray Train, then one evaluation on the test split and the reports.

    Everything that can be wrong with the input (model name, weights, data path, classes) is checked before Ray
    starts. Running the same command again with the same --output resumes an interrupted run from its last epoch.
    data: cfg's data, already decoded (the CLI decodes it before importing torch, so a data problem is answered in
    a second).
    """
    from distributed import results
    from distributed.data import load_data
    from distributed.evaluate import score_model, write_test_report
    from distributed.modelfile import FINAL_FILE, final_blob, save_model
    from distributed.models import BACKBONES, check_weights
    from distributed.splits import make_splits

    out = storage.resolve(output)
    check_weights(cfg)  # before a long decode: the file exists and fits (a scratch model's head: below)
    data = data or load_data(cfg)
    splits = make_splits(data, cfg)
    if cfg.weights_path and cfg.model not in BACKBONES and not cfg.classes:
        check_weights(cfg, num_classes=len(splits.class_names))  # the head of a scratch model's file fits the data
    if cfg.teacher:
        load_teacher(cfg, splits.class_names, "cpu")  # it loads and answers these classes, before Ray starts
    check_same_run(out, cfg)
    storage.check_writable(out, "--output")
    # Ray Train checkpoints straight to `out` (a path or a URI); the final files are written here, then uploaded.
    local = Path(out) if not storage.is_uri(out) else Path(tempfile.mkdtemp(prefix="emotune-train-"))
    cfg.save(storage.join(out, "config.yaml"),
             header="resolved TrainConfig of this run; re-run: emotune train --config config.yaml")

    progress = local / "progress.log"
    if in_process(scaling, address):
        run = ProcessRun(out, local, cfg.epochs, threads=max(1, int(scaling.cpus_per_worker)),
                         gpu=scaling.gpus_per_worker > 0)
        with follow(progress, cfg.epochs):
            train_loop(cfg, data, run)
        saved = run.resume()  # the last checkpoint: the final state and the best model
        if saved is None:
            raise ConfigError(f"{out}: the run diverged in its first epoch (the loss is not finite), so there is no "
                              f"model to save; try a lower lr_head")
        state, best = saved
    else:
        with ray_session(address, verbose=verbose) as ray, follow(progress, cfg.epochs):
            loop_config = {"train": cfg, "data": ray.put(data), "env": passed_env(), "verbose": verbose}
            trainer = make_trainer(loop_config, scaling, name="run", storage_path=out, max_failures=max_failures,
                                   verbose=verbose, callbacks=[tensorboard_callback(str(local / "tensorboard")),
                                                               progress_callback(str(progress), cfg.epochs)])
            result = trainer.fit()
            with result.checkpoint.as_directory() as d:
                state, best = load_state(d)

    save_model(local / BEST_FILE, best)
    save_model(local / FINAL_FILE, final_blob(state, best))
    results.write_table(state["history"], local / "metrics")
    results.plot_curves(state["history"], local / "curves.png")

    scored = score_model(local / BEST_FILE, "test", data=data)
    summary = write_test_report(local, scored.y_true, scored.y_pred, scored.class_names, scored.groups)
    if storage.is_uri(out):
        storage.upload_dir(local, out)
        shutil.rmtree(local, ignore_errors=True)
    return {"output": out, "best_epoch": state["best"]["epoch"], "epochs_run": state["epoch"],
            f"best_{cfg.monitor}": state["best"]["value"], **summary["all"]}


# TORCH_HOME: where pretrained weights are cached; the rest: how to reach object storage (pyarrow.fs reads them).
PASSED_ENV = ("TORCH_HOME", LOGICAL_GPUS, "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_EC2_METADATA_DISABLED", "GOOGLE_APPLICATION_CREDENTIALS")


def passed_env() -> dict:
    """Environment the workers need from the launching shell (Ray's worker processes may predate it): where
    pretrained weights are cached, whether GPUs are logical, and where object storage is. Secrets are not passed:
    they would travel inside Ray's run state; nodes take credentials from their own environment or role."""
    return {k: os.environ[k] for k in PASSED_ENV if k in os.environ}


def check_same_run(out: str, cfg) -> None:
    """An existing run directory is resumed (or extended with more epochs) only by the same config: anything
    else would silently continue someone else's run."""
    saved = storage.join(out, "config.yaml")
    if not storage.is_file(saved) or not storage.exists(storage.join(out, "run")):
        return
    before = TrainConfig.load(saved).to_dict()
    changed = sorted(k for k, v in cfg.to_dict().items() if k != "epochs" and before.get(k) != v)
    if changed:
        raise ConfigError(f"{out}: holds a run of a different config ({', '.join(changed)} differ); "
                          f"choose another --output, or the same config to resume it")
