"""`emotune` command line. main(argv) returns the exit code, so tests call it directly.

Bad input exits 2 with one line naming the problem and the fix, before any Ray process starts.
"""
from __future__ import annotations

import argparse
import os
import sys

from distributed.config import TTA_MODES
from distributed.errors import InputError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TrainConfig YAML (e.g. a best_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one TrainConfig field; repeatable (e.g. --set epochs=5 --set lr_head=3e-4)")


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", default="auto",
                   help="DDP workers (processes): a number, or auto = one per GPU of this machine, else 1 (default)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker (default: this machine's CPUs shared among the workers; with --address: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker, fractions allowed (default: 1 when this machine has a GPU, else 0)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotune", description="Ray-distributed hyperparameter search and "
                                     "training for facial-emotion-recognition CNNs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tune", help="search hyperparameters: Optuna TPE + ASHA over Ray Train trials")
    p.add_argument("space", nargs="?", default=DEFAULT_SPACE,
                   help=f"search-space YAML (path or URI), or the name of a space shipped with emotune, e.g. quick, "
                        f"fer2013, multi_arch (default: {DEFAULT_SPACE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a TrainConfig field for every trial (e.g. --set data=parquet:/data/fer2013)")
    p.add_argument("--storage-path", default="results",
                   help="where experiments go: a directory, a shared filesystem, or s3://, gs:// (default: ./results)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted experiment of the same name")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--num-samples", type=int, default=None, help="override the file's num_samples")
    p.add_argument("--top", type=int, default=5, help="trials shown in the closing summary")
    p.add_argument("--verbose", action="store_true", help="Ray's trial table and its own log lines instead of "
                   "one line per trial event")
    add_autoscaling_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("check-space", help="validate search-space files without starting Ray")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_check_space)

    p = sub.add_parser("best", help="(re)collect leaderboard and best configs from an experiment directory")
    p.add_argument("experiment", help="experiment directory or URI (s3://, gs://)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--model", default=None, help="only trials of this architecture")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("train", help="train one configuration with Ray Train, then evaluate it on the test split")
    add_config_args(p)
    add_scaling_args(p)
    p.add_argument("--output", default="runs/train", help="run directory or URI (default: runs/train)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own log lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("list-models", help="architectures with parameter counts and native input")
    p.set_defaults(func=cmd_list_models)

    p = sub.add_parser("predict", help="find the faces in photos and classify each with a saved model")
    p.add_argument("model", help="best_model.pt or final_model.pt from `emotune train`")
    p.add_argument("images", nargs="+", help="photos, or folders of photos; a face crop at the training size is "
                   "classified whole")
    p.add_argument("--json", action="store_true", help="print one JSON object per face, with its box")
    p.add_argument("--annotate", metavar="OUT.png", default=None,
                   help="draw boxes and labels: into OUT.png for one photo, into the folder OUT for several")
    p.add_argument("--tta", choices=TTA_MODES, default=None,
                   help="test-time augmentation (default: the model's own tta setting)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a saved model as ONNX or TorchScript, preprocessing beside it")
    p.add_argument("model", help="best_model.pt or final_model.pt from `emotune train`")
    p.add_argument("--format", dest="fmt", default="onnx", help="onnx or torchscript (default: onnx)")
    p.add_argument("--output", default=None, help="file to write (default: beside MODEL)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="(re)build report.html for an experiment directory, finished or not")
    p.add_argument("experiment")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cluster", help="check Ray cluster files (launcher YAMLs, KubeRay manifests)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = actions.add_parser("validate", help="validate cluster files (a directory means its *.yaml) without "
                           "launching anything")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_cluster_validate)

    p = sub.add_parser("ensemble", help="average the top K trials' models; test it beside the best single model")
    p.add_argument("experiment", help="experiment directory printed by `emotune tune`")
    p.add_argument("--top", type=int, default=5, help="members: the K best trials (default: 5)")
    p.add_argument("--retrain", action="store_true",
                   help="first train each member's config to its full epoch budget (emotune train)")
    p.add_argument("--refit", action="store_true",
                   help="with --retrain: train the members on the validation split too (TrainConfig.refit); the "
                        "single model is then the best config's first member, not chosen by validation")
    p.add_argument("--keep-last", action=argparse.BooleanOptionalAction, default=None,
                   help="with --retrain: each member is its last epoch (default), or with --no-keep-last its best "
                        "validation epoch (TrainConfig.keep_last; a space's final: {keep_last: ...})")
    p.add_argument("--distill", action="store_true",
                   help="with --retrain: the single model is one more run of the best config that learns from the "
                        "members' ensemble too (TrainConfig.teacher; a space's final: {distill: true})")
    p.add_argument("--tta", choices=TTA_MODES, default=None,
                   help="test-time augmentation (default: the best trial's tta setting)")
    p.add_argument("--output", default=None, help="default: EXPERIMENT/ensemble_topK")
    p.add_argument("--address", default=None, help="with --retrain: join this Ray cluster")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("submit", help="run `emotune tune` on a Ray cluster as a Ray job (list, logs, stop: "
                       "`ray job list/logs/stop`)")
    p.add_argument("space", help="a space shipped with emotune by name (quick, fer2013, ...), or a search-space YAML "
                   "inside this checkout (it is uploaded with the code) or at a URI")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="the head's dashboard, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a TrainConfig field for every trial; paths are paths on the cluster")
    p.add_argument("--storage-path", help="where the cluster writes results: an absolute path that every node "
                   "shares (NFS) or s3://, gs:// (required unless the --cluster file names one: the job's own "
                   "directory is temporary)")
    p.add_argument("--num-samples", type=int, default=None, help="override the file's num_samples")
    p.add_argument("--resume", action="store_true", help="finish an interrupted experiment of the same name")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following logs")
    add_autoscaling_args(p)
    p.set_defaults(func=cmd_submit)
    return parser


def add_autoscaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=None, metavar="FILE",
                   help="the cluster file (cluster/*.yaml) of the cluster at --address: trials are planned against "
                   "the node types its autoscaler may launch, not only the nodes up now (default: on a `ray up` "
                   "head, ~/ray_bootstrap_config.yaml; needed on KubeRay); `cluster validate`'s rules it breaks "
                   "are warnings here")
    p.add_argument("--wait-timeout", type=float, default=20, metavar="MINUTES",
                   help="give up (exit 2) when no node could hold a trial's workers for this long; also how long "
                   "a trial's Ray Train run waits for its workers (default: 20)")


DEFAULT_SPACE = "quick"  # a space shipped in the package (search_space.find_space)


def cmd_tune(args) -> int:
    from distributed.prepare import prepare_search

    # everything wrong with the input is answered here, before Ray, Optuna and torch are imported
    ready = prepare_search(args.space, args.overrides, storage_path=args.storage_path, resume=args.resume,
                           address=args.address, num_samples=args.num_samples, cluster=args.cluster,
                           wait_timeout_min=args.wait_timeout)
    from distributed.results import read_meta
    from distributed.summary import collect
    from distributed.tune import run_search

    exp = run_search(ready, args.overrides, storage_path=args.storage_path, resume=args.resume,
                     address=args.address, wait_timeout_min=args.wait_timeout, verbose=args.verbose)
    out = collect(exp, top=args.top)
    failed = [r for r in out["rows"] if r["status"] == "error"]
    if failed:
        print(f"emotune: {len(failed)} of {len(out['rows'])} trials failed; "
              f"{first_error(exp, [r['trial_id'] for r in failed])}", file=sys.stderr)
    if failed and len(failed) == len(out["rows"]):
        print_summary(out)
        return 1
    final = read_meta(exp).get("final") or {}
    if final.get("top_k") and "://" in exp:
        print(f"emotune: the final stage runs on local (or NFS) experiments only; for {exp}, download it and run "
              f"`emotune ensemble EXPERIMENT --top {final['top_k']} --retrain{' --refit' if final.get('refit') else ''}"
              f"{' --no-keep-last' if final.get('keep_last') is False else ''}"
              f"{' --distill' if final.get('distill') else ''}`",
              file=sys.stderr)
    elif final.get("top_k"):
        from distributed.ensemble import final_stage
        from distributed.results import final_shape

        data = f"on {final['train_limit']} training images" if final.get("train_limit") else "on every training image"
        data += ", the validation split's included (refit)" if final.get("refit") else ""
        data += ", each member its last epoch" if final.get("keep_last") or final.get("refit") else ""
        data += ", then a single model distilled from them" if final.get("distill") else ""
        print(f"emotune: final stage: {final_shape(final['top_k'], final['seeds'], final['epochs'])} {data}, then "
              f"tested once", flush=True)
        final_stage(exp, final["top_k"], final["epochs"], final["seeds"], final.get("train_limit", 0),
                    final.get("refit", False), final.get("keep_last", False), final.get("distill", False),
                    address=args.address)
        out = collect(exp, top=args.top)
    print_summary(out)
    return 0


def final_lines(out: dict) -> list[str]:
    """What the final stage found, beside the search's own figure (validation; test only for retrained models)."""
    from distributed.ensemble import FINAL_DIR, MODEL_FILE
    from distributed.results import BEST, column_name

    final = out["final"]
    metric = column_name(next(k for k in out["top"][0] if k.startswith(BEST))) if out["top"] else "val_acc"
    search_best = out["top"][0] if out["top"] else None
    chosen = final.get("distilled") or final["members"][0]
    val = next((f"{column_name(k)} {v:.4f}" for k, v in chosen.items() if k.startswith(BEST + "val")), "")
    if final.get("refit"):  # its validation images trained: the figure would flatter it
        val = "refit on the validation split too"
    elif final.get("keep_last"):
        val += " at its last epoch"
    lines = []
    if search_best:
        lines.append(f"search: best {metric} {search_best[f'best_{metric}']:.4f} (trial {search_best['trial_id']}, "
                     f"{search_best['epochs_run']} epochs)")
    seed = f" (seed {chosen['seed']})" if final.get("seeds", 1) > 1 or final.get("distilled") else ""
    # the ensemble's file is named: on a few hundred validation faces it is the model to use (README)
    how = "distilled from the ensemble" if final.get("distilled") else "retrained"
    lines.append(f"final:  trial {chosen['trial_id']}'s config{seed} {how} for {chosen['epochs']} epochs: {val}, "
                 f"test_acc {final['single_best']['all']['test_acc']:.4f}; ensemble of {len(final['members'])} "
                 f"test_acc {final['ensemble']['all']['test_acc']:.4f} ({FINAL_DIR}/{MODEL_FILE})")
    return lines


def first_error(exp: str, trial_ids: list[str]) -> str:
    """The last line of the first failed trial's error.txt (the exception), and where to read the rest (a trial
    that failed once and then finished keeps its error.txt: only the ids given count)."""
    from distributed import storage
    from distributed.results import exception_line

    for trial in storage.glob(exp, "*"):
        if storage.name(trial) in trial_ids and storage.is_file(f"{trial}/error.txt"):
            return f"the first: {exception_line(storage.read_text(f'{trial}/error.txt'))} (all of it: {trial}/error.txt)"
    return f"see {exp}"


def cmd_check_space(args) -> int:
    from distributed.search_space import find_space, load_space, param_key

    for path in args.files:
        space = load_space(find_space(path))
        for w in space.warnings():
            print(f"warning: {w}")
        searched = list(space.params) + [param_key(m, k) for m, own in space.by_model.items() for k in own]
        print(f"{path}: ok ({space.num_samples} trials, {len(searched)} parameters: {', '.join(searched)})")
    return 0


def cmd_best(args) -> int:
    from distributed.summary import collect

    print_summary(collect(args.experiment, top=args.top, model=args.model))
    return 0


def print_summary(out: dict) -> None:
    from distributed.results import BEST, column_name, param_columns
    from distributed.trial_lines import fmt_value

    rows = out["top"]
    if not rows:
        print(f"no trial has reported a metric yet in {out['experiment']}")
        return
    metric_col = next(k for k in rows[0] if k.startswith(BEST))
    params = param_columns(rows[0])
    print(f"\ntop {len(rows)} of {len(out['rows'])} trials by {column_name(metric_col)}:")
    print(f"{'trial':<14}{'status':<15}{metric_col:>14}{'epochs':>8}  params")
    for r in rows:
        shown = ", ".join(f"{column_name(k)}={fmt_value(r[k])}" for k in params if r.get(k) is not None)
        print(f"{r['trial_id']:<14}{r['status']:<15}{r[metric_col]:>14.4f}{r['epochs_run']:>8}  {shown}")
    print()
    if out.get("final"):
        print("\n".join(final_lines(out)) + "\n")
    for key in ("report", "leaderboard", "best_config", "best_by_architecture", "pareto_front"):
        if key in out:
            print(f"{key:<22}{out[key]}")
    print(f"{'tensorboard':<22}tensorboard --logdir {out['experiment']}")
    print(f"{'optuna-dashboard':<22}optuna-dashboard {out['experiment']}/optuna.journal"
          + ("  (download it first)" if "://" in out["experiment"] else ""))
    if out.get("orphans"):
        print(f"left out: {len(out['orphans'])} trial directories newer than the saved experiment state (a driver "
              f"crashed after starting them; --resume ran new trials in their place): "
              + ", ".join(out["orphans"]))


def load_train_config(args):
    from distributed.config import TrainConfig

    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    return cfg.with_overrides(args.overrides)


def scaling_from(args):
    """--workers, --cpus-per-worker, --gpus-per-worker (and --address) -> Scaling (plan.train_scaling)."""
    from distributed.plan import train_scaling

    return train_scaling(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.address)


def cmd_train(args) -> int:
    cfg = load_train_config(args)  # a wrong config, --set or flag is answered before torch and Ray are imported
    from distributed.plan import train_flags

    train_flags(args.workers, args.cpus_per_worker, args.gpus_per_worker)
    data = None
    if not (cfg.weights_path or cfg.pretrained):
        # so is wrong data (weights, where there are some, are checked first: that needs torch anyway, and a
        # wrong file should not wait for a long decode)
        from distributed.data import load_data
        from distributed.splits import make_splits

        data = load_data(cfg)
        make_splits(data, cfg)
    from distributed.run import train_run

    summary = train_run(cfg, args.output, scaling_from(args), address=args.address, verbose=args.verbose, data=data)
    print(f"\nbest val {cfg.monitor} {summary[f'best_{cfg.monitor}']:.4f}  test_acc {summary['test_acc']:.4f}  "
          f"test_macro_f1 {summary['test_macro_f1']:.4f}  "
          f"(best epoch {summary['best_epoch']} of {summary['epochs_run']})")
    print(f"results in {summary['output']}: best_model.pt final_model.pt metrics.csv curves.png "
          f"classification_report.txt confusion_matrix.png tensorboard/")
    return 0


def cmd_list_models(args) -> int:
    from distributed.models import describe_models

    print(f"{'model':<20}{'params':>12}  {'input':<12}kind")
    for m in describe_models():
        print(f"{m['name']:<20}{m['params']:>12,}  {m['native_size']}x{m['native_size']:<8}{m['kind']}")
    return 0


def cmd_predict(args) -> int:
    from distributed.predict import run_predict

    return run_predict(args.model, args.images, as_json=args.json, annotate_to=args.annotate, tta=args.tta)


def cmd_export(args) -> int:
    from distributed.predict import export

    out, meta = export(args.model, args.fmt, args.output)
    print(f"wrote {out} and {meta} (class names and preprocessing)")
    return 0


def cmd_report(args) -> int:
    from distributed.summary import collect

    print(f"wrote {collect(args.experiment)['report']}")
    return 0


def cmd_cluster_validate(args) -> int:
    from distributed.cluster.files import (
        ClusterFileError,
        cluster_files,
        validate_cluster_file,
    )

    files = cluster_files(args.files)
    if not files:
        raise ClusterFileError(f"{' '.join(args.files)}: no *.yaml files there")
    failed = False
    for file in files:
        problems = validate_cluster_file(file)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{file}: ok")
        failed = failed or bool(problems)
    return 2 if failed else 0


def cmd_submit(args) -> int:
    from distributed.cluster.jobs import submit

    return submit(args.space, args.address, args.storage_path, args.overrides, num_samples=args.num_samples,
                  resume=args.resume, wait=not args.no_wait, cluster=args.cluster, wait_timeout=args.wait_timeout)


def cmd_ensemble(args) -> int:
    from distributed.ensemble import accuracy_gain, run_ensemble

    out = run_ensemble(args.experiment, args.top, output=args.output, retrain=args.retrain, tta=args.tta,
                       address=args.address, refit=args.refit, keep_last=args.keep_last, distill=args.distill)
    ens, one = out["ensemble"]["all"], out["single_best"]["all"]
    single = "distilled single" if out.get("distilled") else "best single"
    print(f"\ntest_acc: ensemble of {len(out['members'])} {ens['test_acc']:.4f}, {single} {one['test_acc']:.4f} "
          f"({accuracy_gain(out):+.1f} points; tta {out['tta']})")
    print(f"results in {out['output']}: ensemble_model.pt ensemble.json classification_report.txt "
          f"confusion_matrix.png single_best/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:  # the user's input is wrong (exit 2), as opposed to a bug (a traceback)
        print(f"emotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
