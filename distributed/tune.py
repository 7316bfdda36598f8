"""The only module that imports ray.tune: trial driver, OptunaSearch (TPE), ASHA, Tuner, resume.

Each trial is one run of train.train_loop. With several workers it runs in a Ray Train worker group
(TorchTrainer + TuneReportCallback, Train V2); a one-worker trial on a single node runs the same loop in the trial
process (in-process), which skips the worker group's start-up (measured in BENCHMARKS.md).
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import optuna
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

from distributed import storage
from distributed.cluster.nodes import autoscaler_node_types, unknown_node_types_line
from distributed.config import METRICS, ConfigError, better
from distributed.modelfile import checkpoint_state
from distributed.outcome import trial_outcome
from distributed.plan import NodeWait, Plan, cluster_nodes, plan_trials
from distributed.prepare import Prepared
from distributed.results import saved_trials, write_meta
from distributed.run import cpu_for_reserved_gpu, make_trainer, passed_env, ray_session
from distributed.search_space import SearchSpace
from distributed.study import StudyFiles
from distributed.summary import collect
from distributed.train import Run, train_loop
from distributed.trial_lines import last_error_line, say, trial_end_line, trial_epoch_line, trial_start_line

# ------------------------------------------------------------------------------------------------ a trial

class TuneTrialRun(Run):
    """A one-worker trial that runs the loop in its own process: reports go straight to Tune."""

    def __init__(self):
        import ray
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.node = ray.get_runtime_context().get_node_id()

    def resume(self):
        return checkpoint_state(tune.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


# Ray Train's wait for a worker group's resources (60 s by default, then it retries forever with a traceback each
# time); cloud nodes take minutes to boot, so a trial's Train run waits as long as the search does (--wait-timeout).
START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def run_trial(config: dict, *, space: SearchSpace, data_box: list, in_process: bool, threads: int, runs_dir: str,
              env: dict, start_timeout_s: str, verbose: bool = False) -> None:
    """Tune function trainable: one TrainConfig, trained by the one loop. data_box holds the decoded data's
    ObjectRef or None (boxed, because with_parameters would resolve a bare ref into a copy per trial)."""
    import ray
    import torch

    cfg = space.trial_config(config)
    if not verbose:
        sys.unraisablehook = quiet_exit
    if in_process:
        if not verbose:  # "Checkpoint successfully created at ..." per epoch: Ray's INFO, in its log files only
            logging.getLogger("ray.train").setLevel(logging.WARNING)
        os.environ.update(env)
        torch.set_num_threads(threads)
        run = TuneTrialRun()
        wanted = space.scaling.gpus_per_worker > 0
        if wanted and run.device.type != "cuda":  # never train on the CPU in silence when a GPU was reserved
            run.device = cpu_for_reserved_gpu(space.scaling.gpus_per_worker, run.node)
        train_loop(cfg, ray.get(data_box[0]) if data_box[0] is not None else None, run)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ[START_TIMEOUT] = start_timeout_s  # trainer.fit() hands it to the run's controller, which reads it
    loop_config = {"train": cfg, "data": data_box[0], "env": env, "verbose": verbose}
    # The run name is the trial id (no timestamp): a restarted trial finds its Train run and resumes it.
    trainer = make_trainer(loop_config, space.scaling, name=tune.get_context().get_trial_id(),
                           storage_path=runs_dir, callbacks=[TuneReportCallback()], max_failures=2, verbose=verbose)
    trainer.fit()


def quiet_exit(unraisable, default=sys.__unraisablehook__) -> None:
    """Ray ends a trial's process with SIGTERM, whose handler raises SystemExit wherever the process is; inside a
    weakref callback Python ignores it and prints "Exception ignored in ..." with a traceback, nothing to act on."""
    if not isinstance(unraisable.exc_value, SystemExit):
        default(unraisable)


# ---------------------------------------------------------------------------------------------- a search

def run_search(ready: Prepared, overrides: list[str], storage_path: str = "results", resume: bool = False,
               address: str | None = None, verbose: bool = False, wait_timeout_min: float = 20) -> str:
    """`emotune tune` once prepare.prepare_search has checked everything: search; returns the experiment
    directory (a path or a URI)."""
    import ray

    space, exp, data, node_types, notes, space_file = (ready.space, ready.exp, ready.data, ready.node_types,
                                                       ready.notes, ready.space_file)
    study = StudyFiles(exp)
    study.fetch() if resume else study.fresh()

    if not verbose:  # "A new study created in Journal with name: ..."
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    with ray_session(address, verbose=verbose):
        if node_types is None:  # (autoscaling) None: nothing names them, and an autoscaler may run
            node_types = autoscaler_node_types() or None
        plan = plan_trials(space, cluster_nodes(), node_types)
        waiting = NodeWait(space, node_types or [], wait_timeout_min * 60)
        if not resume:
            storage.write_text(storage.join(exp, "space.yaml"), storage.read_text(space_file))
            write_meta(exp, space_file, overrides, space)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, space=space, data_box=[ray.put(data) if data is not None else None],
                                 in_process=plan.in_process,
                                 threads=max(1, int(space.scaling.cpus_per_worker)),
                                 runs_dir=storage.join(exp, "train_runs"), env=passed_env(), verbose=verbose,
                                 start_timeout_s=os.environ.get(START_TIMEOUT) or f"{wait_timeout_min * 60:g}"),
            plan.trial_resources)
        print(f"emotune: {space.num_samples} trials of {space.name}, {plan.concurrent} at a time, "
              f"{'in-process' if plan.in_process else f'{space.scaling.workers}-worker Ray Train'} trials; "
              f"results in {exp}")
        for line in notes:  # (autoscaling) the cluster file's policy problems: the search runs all the same
            print(f"emotune: {line}", file=sys.stderr)
        if plan.launched:  # (autoscaling)
            print("emotune: counting nodes the autoscaler may launch: "
                  + ", ".join(f"{t.name} (up to {t.max_workers})" for t in plan.launched))
        if plan.waits:
            print(f"emotune: {unknown_node_types_line(wait_timeout_min)}")
        # Plain lines (TrialLines); with --verbose Ray's classic table, sorted by the metric, not a box per result.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # A limit on kept checkpoints makes each checkpoint snapshot the (small) experiment state; that is the
        # point (restore sees state and checkpoints agree), so Tune's warning about it is noise here.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        if resume:
            tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            # Checkpoints: each carries the best weights. Two, not one: Tune deletes the older when it registers a
            # newer, and a driver killed before the state naming the newer is uploaded leaves a state that
            # --resume restores from the older.
            run_config = tune.RunConfig(name=space.name, storage_path=storage.resolve(storage_path),
                                        verbose=1 if verbose else 0,
                                        callbacks=[] if verbose else [TrialLines(space, space.num_samples)],
                                        failure_config=tune.FailureConfig(max_failures=2),
                                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                        progress_reporter=progress_table(space) if verbose else None,
                                        stop=GiveUpWaiting(waiting))  # (autoscaling)
            tuner = tune.Tuner(trainable, tune_config=tune_config(space, plan, study), run_config=run_config)
        tuner.fit()
    study.publish()
    if waiting.gave_up:  # (autoscaling): what did run is still collected (leaderboard, report.html)
        collect(exp)
        raise ConfigError(f"{exp}: {waiting.gave_up}; what ran is in its leaderboard.csv and report.html")
    return exp


# -------------------------------------------------------------------------------- autoscaling clusters

class GiveUpWaiting(tune.Stopper):
    """Ends the search once NodeWait has waited for nodes longer than --wait-timeout (Tune asks stop_all() at
    every step of its loop)."""

    def __init__(self, waiting: NodeWait):
        self.waiting = waiting

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.waiting.check()


# --------------------------------------------------------------------------------------------- the searcher

def tune_config(space: SearchSpace, plan: Plan, study: StudyFiles):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if space.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=space.seed)
    else:
        # multivariate + group: TPE models the conditional (per-architecture) parameters jointly;
        # constant_liar: trials running at the same time are not sent to the same spot.
        sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.n_startup_trials,
                                             multivariate=True, group=True, constant_liar=True)
    metrics = [m for m, _ in space.objectives]
    modes = [m for _, m in space.objectives]
    many = space.multi_objective
    searcher = DivergenceAwareOptunaSearch(space=space.define_by_run, metric=metrics if many else metrics[0],
                                           mode=modes if many else modes[0], sampler=sampler,
                                           points_to_evaluate=space.optuna_points() or None, study_name=space.name,
                                           storage=study.storage())
    searcher.study = study
    scheduler = None
    if space.asha:
        scheduler = ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, **space.asha)
    # In-process trials reuse their trial actor: a new trial then starts without a new Python process, torch import
    # and object-store fetch (3.3 s -> under 1 s per trial in bench/overhead.py). Every trial builds its model,
    # optimiser, RNGs and data views afresh inside train_loop(cfg, data, run), so nothing carries over but the
    # process.
    return tune.TuneConfig(search_alg=ResumableSearch(ConcurrencyLimiter(searcher, max_concurrent=plan.concurrent)),
                           scheduler=scheduler, num_samples=space.num_samples, trial_dirname_creator=trial_dirname,
                           reuse_actors=plan.in_process)


class ResumableSearch(SearchGenerator):
    """Tune's SearchGenerator, made to agree on --resume with the trials Tune restored.

    Tune saves the trial states, this generator's trial count, the concurrency limiter's live trials and the searcher
    (with its study) as separate files and uploads them one by one; a driver killed between two uploads leaves them
    from different moments, and Tune restores each as found: a count behind the trials makes one trial too many, a
    limiter that does not know a restored trial drops its completion (its Optuna trial stays RUNNING), one that holds
    a dropped trial keeps its slot forever. The trial states (experiment_state-*.json, what Tune actually resumes)
    are the truth; the rest is set from them here, and the searcher adopts or re-issues trials
    (DivergenceAwareOptunaSearch.agree_with)."""

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        trials = saved_trials(dirpath)
        if not trials:
            return
        self._counter = len(trials)
        limiter = self.searcher
        if isinstance(limiter, ConcurrencyLimiter):
            limiter.live_trials = {t["trial_id"] for t in trials if t["status"] != "TERMINATED"}
            limiter.num_unfinished_live_trials = len(limiter.live_trials)
            limiter = limiter.searcher
        if isinstance(limiter, DivergenceAwareOptunaSearch):
            limiter.agree_with(trials)


class DivergenceAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, telling the study what happened to a trial that did not finish its epochs:

    - diverged (NaN metrics): FAIL. Optuna refuses NaN values; Ray only logs that and leaves the trial RUNNING.
    - stopped by ASHA (last epoch below its configured epochs, neither early-stopped nor diverged): PRUNED, with
      its per-epoch values as intermediate values. Ray tells COMPLETE with the last (low-fidelity) value, so TPE and
      optuna-dashboard would take an epoch-3 score for a trial's result; TPE ranks PRUNED trials by how far they
      got, then by value (bench/hpo/search_replay.py compares both).

    Each save of the searcher (with the experiment state) also snapshots the study (StudyFiles)."""

    study: StudyFiles | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_step: dict[str, int] = {}  # trial id -> the last step told as an intermediate value
        self._reissue: list[str] = []  # (after --resume) trials Tune dropped, handed to the next new trials

    def save(self, checkpoint_path: str):
        """The searcher state and the study in one file: Tune uploads its files one by one, so a driver killed
        during an upload could leave a study behind (or ahead of) the searcher state, and a --resume would then
        report to Optuna trials it does not have. A copy of the study also goes beside it, for optuna-dashboard."""
        journal = Path(self.study.working).read_bytes() if self.study and os.path.exists(self.study.working) else None
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"emotune_journal": journal, "searcher": pickle.dumps(self.__dict__.copy())}, f)
        if self.study is not None:  # in Tune's staging directory, uploaded to <exp>/optuna.journal
            self.study.snapshot(os.path.dirname(checkpoint_path))

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)
        if not (isinstance(saved, dict) and "emotune_journal" in saved):
            return super().restore(checkpoint_path)
        if saved["emotune_journal"] is not None and self.study is not None:
            self.study.restore(saved["emotune_journal"])  # before the study inside the state is unpickled
        self.__dict__.update(pickle.loads(saved["searcher"]))

    def agree_with(self, trials: list[dict]) -> None:
        """Make the study agree with the trials Tune restored (ResumableSearch): a trial Tune has but this state
        does not gets an Optuna trial with its parameters (told its result if it had finished); an Optuna trial
        Tune dropped is handed to the next new trial, parameters and all, so the study ends with exactly
        num_samples trials and none left RUNNING."""
        tune_ids = {t["trial_id"] for t in trials}
        self._reissue = [tid for tid in self._ot_trials
                         if tid not in tune_ids and tid not in self._completed_trials]
        for t in trials:
            tid = t["trial_id"]
            if tid not in self._ot_trials:
                if not self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                    # (a waiting trial is the next points_to_evaluate entry: it is the one this trial was made from)
                    self._ot_study.enqueue_trial(t["evaluated_params"])
                if callable(self._space):
                    self._ot_trials[tid] = self._ot_study.ask()
                    self._suggest_from_define_by_run_func(self._space, self._ot_trials[tid])
                else:
                    self._ot_trials[tid] = self._ot_study.ask(fixed_distributions=self._space)
            if t["status"] == "TERMINATED" and tid not in self._completed_trials:  # Tune will not report it again
                self.on_trial_complete(tid, result=flatten_dict(t["last_result"]))

    def suggest(self, trial_id: str):
        if trial_id not in self._ot_trials and self._reissue:
            self._ot_trials[trial_id] = self._ot_trials.pop(self._reissue.pop(0))
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id, result):
        if trial_id not in self._ot_trials:  # a trial Tune restored from a newer state than this searcher's
            warnings.warn(f"trial {trial_id}: not in the restored searcher state; its results are not told to Optuna")
            return
        super().on_trial_result(trial_id, result)
        self._last_step[trial_id] = result[TRAINING_ITERATION]

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id not in self._ot_trials:  # see on_trial_result
            return
        ot_trial = self._ot_trials[trial_id]
        if result and not error and trial_id not in self._completed_trials:
            # Results reach searchers flattened ("train_config/epochs"), which trial_outcome reads too.
            outcome = trial_outcome(result, "TERMINATED")
            if outcome == "diverged":
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
                self._completed_trials.add(trial_id)
                return
            single = not isinstance(self.metric, list)  # Optuna keeps no intermediate values for several objectives
            if single and result.get(self.metric) is not None and \
                    self._last_step.get(trial_id) != result[TRAINING_ITERATION]:
                # Tune hands the result on which its scheduler stopped a trial (ASHA's cut, or max_t) to no
                # searcher's on_trial_result: tell it here, so the study holds every epoch the trial ran.
                ot_trial.report(result[self.metric], result[TRAINING_ITERATION])
            if single and outcome == "asha_stopped":
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)  # value: the last intermediate
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result=result, error=error)


class TrialLines(tune.Callback):
    """What `emotune tune` prints instead of Ray's table (which repeats every trial every 15 s): one line when a
    trial starts (its parameters), one per epoch, one when it ends (finished, stopped by ASHA, early-stopped,
    diverged, failed), and a running count with the best so far. Ray's table: --verbose."""

    def __init__(self, space: SearchSpace, total: int):
        self.metric, self.params, self.total = space.metric, list(space.params), total
        self.start, self.best, self.trial_best = time.monotonic(), None, {}

    def setup(self, **info):  # also on --resume, which unpickles this callback with the experiment
        self.start = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        say(trial_start_line(trial.trial_id, trial.config, self.params))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and not result.get("diverged"):
            if better(self.metric, value, self.trial_best.get(trial.trial_id)):
                self.trial_best[trial.trial_id] = value
            if better(self.metric, value, self.best[0] if self.best else None):
                self.best = (value, trial.trial_id)
        say(trial_epoch_line(trial.trial_id, result, self.metric))

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(trial_end_line(trial.trial_id, trial.last_result or {}, self.metric, self.trial_best.get(trial.trial_id)))
        say(self.count_line(trials, trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} failed: {last_error_line(trial.error_file)}")
        say(self.count_line(trials, trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} failed and is retried from its last checkpoint: "
            f"{last_error_line(trial.error_file)}")

    def count_line(self, trials, ended) -> str:
        """Counted from Tune's trials, so a resumed search counts what finished before the crash too."""
        done = len({t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {ended.trial_id})
        took = int(time.monotonic() - self.start)
        best = f", best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else ""
        return f"search: {done} of {self.total} trials done{best}, {took // 60}m{took % 60:02d}s"


def progress_table(space: SearchSpace):
    from ray.tune import CLIReporter

    metrics = {"epoch": "epoch", space.metric: space.metric}
    metrics.update({m: m for m in METRICS if m not in metrics})
    return CLIReporter(metric_columns=metrics, parameter_columns=list(space.params)[:6], max_progress_rows=12,
                       max_report_frequency=15, sort_by_metric=True, metric=space.metric, mode=space.mode)


def trial_dirname(trial) -> str:
    return trial.trial_id
