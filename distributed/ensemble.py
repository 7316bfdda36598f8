"""Top-K ensembles and the model files `emotune predict` reads.

`emotune ensemble EXPERIMENT --top K` averages the softmax outputs of the K best trials' best models (or, with
--retrain, of each of those configs trained again to its full epoch budget by `emotune train`) and evaluates that
once on the test split, beside the single best model on the same split and with the same test-time augmentation.

An ensemble file is a dict of plain tensors like a model file (format ENSEMBLE_FORMAT, the members' model blobs
inside), so torch.load(weights_only=True) reads it and nothing in it executes. A single model file loads as an
ensemble of one, so predict takes either.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from distributed.config import ConfigError, Scaling, TrainConfig
from distributed.evaluate import predict, write_test_report
from distributed.modelfile import BEST_FILE, MODEL_FORMAT, ModelFileError, load_file, model_from_blob
from distributed.space_sections import FINAL_KEEP_LAST

ENSEMBLE_FORMAT = "emotune-ensemble/1"
MODEL_FILE = "ensemble_model.pt"
# Members must agree on what they read and what they answer: the same decoded images and the same classes.
SAME_INPUT = ("data", "classes", "in_channels", "data_size", "val_from")


class Ensemble:
    """The mean of the members' softmax outputs. `blobs`: model_blob dicts (best_model.pt contents)."""

    def __init__(self, blobs: list[dict], device: str | torch.device = "cpu"):
        self.blobs, self.device = blobs, torch.device(device)
        self.members = [model_from_blob(b, self.device)[:2] for b in blobs]  # (net, cfg)
        self.config: TrainConfig = self.members[0][1]
        self.class_names: list[str] = list(blobs[0]["class_names"])
        for blob, (_, cfg) in zip(blobs[1:], self.members[1:]):
            if list(blob["class_names"]) != self.class_names or any(
                    getattr(cfg, k) != getattr(self.config, k) for k in ("in_channels", "data_size")):
                raise ModelFileError(f"ensemble members disagree on classes or input ({blob['class_names']} vs "
                                     f"{self.class_names}); combine models trained on the same data")

    def probs(self, x: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Class probabilities [N, K] for uint8 images [N, C, S, S]; tta None: the first member's config.tta."""
        tta = tta or self.config.tta
        return torch.stack([predict(net, x, cfg, self.device, tta=tta).softmax(1) for net, cfg in self.members]).mean(0)

    def save(self, path: str | Path) -> None:
        torch.save({"format": ENSEMBLE_FORMAT, "members": self.blobs, "class_names": self.class_names}, path)


def load_predictor(path: str | Path, device="cpu") -> Ensemble:
    """A best_model.pt / final_model.pt (an ensemble of one) or an ensemble file."""
    blob = load_file(path, (MODEL_FORMAT, ENSEMBLE_FORMAT))
    return Ensemble(blob["members"] if blob["format"] == ENSEMBLE_FORMAT else [blob], device)


# ------------------------------------------------------------------------------------------- from a search

def usable_trials(exp: str | Path) -> list[tuple[dict, dict, str]]:
    """Every trial that finished with a model, best first: (leaderboard row, TrainConfig dict, best_model.pt)."""
    from distributed.results import leaderboard_rows, newest_checkpoint_file, read_meta, read_trials

    meta = read_meta(str(exp))
    rows, configs = leaderboard_rows(read_trials(str(exp)), meta)
    usable = [(r, configs[r["trial_id"]], newest_checkpoint_file(exp, r["trial_id"], BEST_FILE)) for r in rows
              if r[f"best_{meta['metric']}"] is not None and r["status"] not in ("error", "diverged")]
    return [u for u in usable if u[2] is not None]


def top_trials(exp: str | Path, k: int) -> list[tuple[dict, dict, str]]:
    """The k best trials with a model: (leaderboard row, TrainConfig dict, best_model.pt). Writes nothing."""
    exp = Path(exp)
    if k < 1:
        raise ConfigError(f"--top {k}: an ensemble needs at least 1 member")
    usable = usable_trials(exp)
    if k > len(usable):
        raise ConfigError(f"--top {k}: only {len(usable)} trials of {exp} finished with a model; "
                          f"use --top {max(len(usable), 1)} or fewer, or let the search run more trials")
    chosen = usable[:k]
    for row, cfg, _ in chosen[1:]:
        differ = [f for f in SAME_INPUT if cfg.get(f) != chosen[0][1].get(f)]
        if differ:
            raise ConfigError(f"trials {chosen[0][0]['trial_id']} and {row['trial_id']} read different data "
                              f"({', '.join(differ)}); an ensemble needs one test split")
    return chosen


def run_ensemble(exp: str | Path, top: int, output: str | None = None, retrain: bool = False,
                 tta: str | None = None, address: str | None = None, epochs: int | None = None,
                 seeds: int = 1, train_limit: int | None = None, refit: bool = False,
                 keep_last: bool | None = None, distill: bool = False) -> dict:
    """`emotune ensemble` and a search's final stage: everything checked before any training starts; then (with
    retrain) one `emotune train` per member and seed, at `epochs` (default: each config's own budget) and on
    `train_limit` training images (default: the config's own; 0: all), with `refit` on the validation split too,
    each member its last epoch with `keep_last` (None: FINAL_KEEP_LAST) or refit, else its best validation epoch;
    one test evaluation of the ensemble and of its single best member, and the reports of `emotune train`.

    The single best member is the search's best trial, or with retrain the retrained member with the best
    validation score (test never chooses; with keep_last, its last epoch's); with refit, whose validation images
    trained, the best config's first seed. A retrained member whose run directory exists resumes (or, finished,
    is only scored again): an interrupted final stage goes on where it stopped.

    With distill (retrain only), the single model is not one of the members but one more run of the best config,
    a fresh seed, that learns from the members' ensemble as well as from the labels (TrainConfig.teacher): on a
    few hundred validation faces, which cannot choose among seeds, it takes what the ensemble knows into one
    network (BENCHMARKS.md 5). It costs one more member's epochs, each about twice as long (the teacher's forward
    passes). Its validation split is its own seed's, on some of whose faces members of other seeds trained: its
    validation figure is reported, never used to choose."""
    from distributed import results, storage
    from distributed.config import TTA_MODES, better
    from distributed.data import load_data
    from distributed.plan import local_cpus
    from distributed.results import read_meta
    from distributed.run import in_process, train_run
    from distributed.search_space import load_space
    from distributed.splits import make_splits, validation_trains

    exp = Path(exp).resolve()
    if tta is not None and tta not in TTA_MODES:
        raise ConfigError(f"--tta {tta}: choose from {', '.join(TTA_MODES)}")
    if (refit or keep_last is not None) and not retrain:
        flag = "--refit" if refit else "--keep-last" if keep_last else "--no-keep-last"
        raise ConfigError(f"{flag} shapes how the members are retrained; add --retrain")
    if distill and not retrain:
        raise ConfigError("--distill trains one more model from the retrained members' ensemble; add --retrain")
    keep_last = FINAL_KEEP_LAST if keep_last is None else keep_last
    chosen = top_trials(exp, top)
    out = Path(output).resolve() if output else exp / (f"ensemble_top{top}" + ("_refit" if refit else
                                                                               "_retrained" if retrain else ""))
    first = TrainConfig.from_dict(chosen[0][1])
    splits = make_splits(load_data(first), first)  # the test split every member is scored on (bad data fails here)
    in_sample = validation_trains(first.replace(refit=refit))  # refit on a carved split: validation chooses nothing
    storage.check_writable(out, "--output")

    members = [(row, path, None) for row, _, path in chosen]  # (row, model file, retrained run's summary)
    distilled = None  # (row, model file, run summary) of the distilled single model
    if retrain:
        meta = read_meta(str(exp))
        # an experiment from before emotune.json recorded scaling: its space file, as searched
        scaling = (Scaling(**meta["scaling"]) if "scaling" in meta
                   else load_space(exp / "space.yaml", meta["overrides"]).scaling)
        if in_process(scaling, address):  # members train one after another here: each may use every core
            scaling = replace(scaling, cpus_per_worker=max(scaling.cpus_per_worker, local_cpus()))

        def retrained(cfg: dict, seed: int, **extra) -> TrainConfig:
            # cv_folds off: the retrained member learns from all of train, not from one fold
            return TrainConfig.from_dict({**cfg, "cv_folds": 0, "epochs": epochs or cfg["epochs"],
                                          "seed": cfg["seed"] + seed, "refit": refit,
                                          "keep_last": keep_last or cfg.get("keep_last", False),
                                          "train_limit": cfg["train_limit"] if train_limit is None else train_limit,
                                          **extra})

        members = []
        for row, cfg, _ in chosen:
            for seed in range(seeds):
                cfg_run = retrained(cfg, seed)
                run_dir = out / "retrain" / (row["trial_id"] + (f"-seed{seed}" if seeds > 1 else ""))
                print(f"emotune: member {len(members) + 1} of {len(chosen) * seeds}: trial {row['trial_id']}'s "
                      f"config, seed {cfg_run.seed}, {cfg_run.epochs} epochs -> {run_dir}", flush=True)
                summary = train_run(cfg_run, str(run_dir), scaling, address=address)
                members.append((row, run_dir / BEST_FILE, {**summary, "seed": cfg_run.seed}))
        monitor = TrainConfig.from_dict(chosen[0][1]).monitor
        best_i = 0
        for i, (_, _, summary) in enumerate(members):
            if not in_sample and better(
                    monitor, summary[f"best_{monitor}"], members[best_i][2][f"best_{monitor}"]):
                best_i = i
        members.insert(0, members.pop(best_i))  # the single best: by held-out validation after retraining
        if distill:
            teacher = out / MODEL_FILE  # the members' ensemble, written now (and again, the same, below)
            Ensemble([load_file(p, MODEL_FORMAT) for _, p, _ in members]).save(teacher)
            row, cfg, _ = chosen[0]
            cfg_run = retrained(cfg, seeds, teacher=str(teacher))  # a seed no member of its config had
            run_dir = out / "retrain" / "distilled"
            print(f"emotune: distilled single model: trial {row['trial_id']}'s config, seed {cfg_run.seed}, "
                  f"{cfg_run.epochs} epochs, learning from the ensemble of {len(members)} -> {run_dir}", flush=True)
            summary = train_run(cfg_run, str(run_dir), scaling, address=address)
            distilled = (row, run_dir / BEST_FILE, {**summary, "seed": cfg_run.seed})

    ensemble = Ensemble([load_file(p, MODEL_FORMAT) for _, p, _ in members])
    tta = tta or ensemble.config.tta
    x = torch.from_numpy(splits.test_x)

    def record(row: dict, p: Path, ran: dict | None) -> dict:
        return {"trial_id": row["trial_id"], "model": row["model"], "file": str(p),
                **({"seed": ran["seed"], "epochs": ran["epochs_run"], "best_epoch": ran["best_epoch"],
                    **{k: v for k, v in ran.items() if k.startswith("best_val") or k.startswith("test_")}}
                   if ran else {})}

    summary = {"experiment": str(exp), "tta": tta, "retrained": retrain, "epochs": epochs, "seeds": seeds,
               "refit": in_sample, "keep_last": retrain and (keep_last or in_sample or first.keep_last),
               "members": [record(*m) for m in members],
               "distilled": record(*distilled) if distilled else None}
    single = (Ensemble([load_file(distilled[1], MODEL_FORMAT)]) if distilled else Ensemble(ensemble.blobs[:1]))
    for name, predictor, where in (("ensemble", ensemble, out), ("single_best", single, out / "single_best")):
        pred = predictor.probs(x, tta).argmax(1).numpy()
        summary[name] = write_test_report(where, splits.test_y, pred, ensemble.class_names, splits.test_groups)
    ensemble.save(out / MODEL_FILE)
    results.write_json(summary, out / "ensemble.json")
    return {"output": str(out), **summary}


# The final stage's directory inside an experiment, and its record (ensemble.json, as `emotune ensemble` writes).
FINAL_DIR = "final"


def final_stage(exp: str | Path, top_k: int, epochs: int, seeds: int = 1, train_limit: int = 0,
                refit: bool = False, keep_last: bool = FINAL_KEEP_LAST, distill: bool = False,
                address: str | None = None) -> dict:
    """A search's final stage: its top_k configs retrained at the full budget (`epochs`, `seeds` seeds each) by
    `emotune train` (with refit, on the validation split too; with keep_last or refit, each its last epoch), the
    ensemble of those members and the best of them by validation (refit: the best config's first seed) tested once
    on the test split (run_ensemble with retrain: the same mechanism as `emotune ensemble --retrain [--refit]
    [--no-keep-last]`). best_config.yaml becomes the config as retrained; `emotune best` and report.html read the
    record."""
    k = min(top_k, len(usable_trials(exp)))  # a search with fewer finished trials retrains what it has
    if k < 1:
        raise ConfigError(f"{exp}: no trial finished with a model, so there is nothing for the final stage to "
                          f"retrain; see the leaderboard's errors")
    return run_ensemble(exp, k, output=str(Path(exp) / FINAL_DIR), retrain=True, epochs=epochs, seeds=seeds,
                        train_limit=train_limit, refit=refit, keep_last=keep_last, distill=distill,
                        address=address)


def accuracy_gain(summary: dict) -> float:
    """Points the ensemble adds over its best member on the whole test split."""
    return 100 * (summary["ensemble"]["all"]["test_acc"] - summary["single_best"]["all"]["test_acc"])

