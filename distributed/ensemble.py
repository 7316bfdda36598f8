"""Top-K ensembles and the model files `emotune predict` reads.

`emotune ensemble EXPERIMENT --top K` averages the softmax outputs of the K best trials' best models (or, with
--retrain, of each of those configs trained again to its full epoch budget by `emotune train`) and evaluates that
once on the test split, beside the single best model on the same split and with the same test-time augmentation.

An ensemble file is a dict of plain tensors like a model file (format ENSEMBLE_FORMAT, the members' model blobs
inside), so torch.load(weights_only=True) reads it and nothing in it executes. A single model file loads as an
ensemble of one, so predict takes either.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from distributed.config import ConfigError, TrainConfig
from distributed.modelfile import BEST_FILE, MODEL_FORMAT, ModelFileError, best_model_file, load_file, model_from_blob
from distributed.models import native_size
from distributed.train import predict

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
        return torch.stack([predict(net, x, cfg, cfg.image_size or native_size(cfg.model), self.device,
                                    tta=tta).softmax(1) for net, cfg in self.members]).mean(0)

    def save(self, path: str | Path) -> None:
        torch.save({"format": ENSEMBLE_FORMAT, "members": self.blobs, "class_names": self.class_names}, path)


def load_predictor(path: str | Path, device="cpu") -> Ensemble:
    """A best_model.pt / final_model.pt (an ensemble of one) or an ensemble file."""
    blob = load_file(path, (MODEL_FORMAT, ENSEMBLE_FORMAT))
    return Ensemble(blob["members"] if blob["format"] == ENSEMBLE_FORMAT else [blob], device)


# ------------------------------------------------------------------------------------------- from a search

def top_trials(exp: str | Path, k: int) -> list[tuple[dict, dict, str]]:
    """The k best trials with a model: (leaderboard row, TrainConfig dict, best_model.pt). Writes nothing."""
    from distributed.results import leaderboard_rows, read_meta, read_trials

    exp = Path(exp)
    if k < 1:
        raise ConfigError(f"--top {k}: an ensemble needs at least 1 member")
    meta = read_meta(str(exp))
    rows, configs = leaderboard_rows(read_trials(str(exp)), meta)
    usable = [(r, configs[r["trial_id"]], best_model_file(exp, r["trial_id"])) for r in rows
              if r[f"best_{meta['metric']}"] is not None and r["status"] not in ("error", "diverged")]
    usable = [u for u in usable if u[2] is not None]
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
                 tta: str | None = None, address: str | None = None) -> dict:
    """`emotune ensemble`: everything checked before any training starts; then (with retrain) one `emotune train`
    per member, one test evaluation of the ensemble and of its best member, and the reports of `emotune train`."""
    from distributed import results, storage
    from distributed.config import TTA_MODES
    from distributed.data import load_data
    from distributed.run import train_run
    from distributed.search_space import load_space
    from distributed.splits import make_splits

    exp = Path(exp).resolve()
    if tta is not None and tta not in TTA_MODES:
        raise ConfigError(f"--tta {tta}: choose from {', '.join(TTA_MODES)}")
    chosen = top_trials(exp, top)
    out = Path(output).resolve() if output else exp / f"ensemble_top{top}{'_retrained' if retrain else ''}"
    first = TrainConfig.from_dict(chosen[0][1])
    splits = make_splits(load_data(first), first)  # the test split every member is scored on (bad data fails here)
    storage.check_writable(out, "--output")

    paths = [path for _, _, path in chosen]
    if retrain:
        scaling = load_space(exp / "space.yaml", json.loads((exp / "emotune.json").read_text())["overrides"]).scaling
        paths = []
        for row, cfg, _ in chosen:
            # cv_folds off: the retrained member learns from all of train, not from one fold
            run_dir = out / "retrain" / row["trial_id"]
            train_run(TrainConfig.from_dict({**cfg, "cv_folds": 0}), str(run_dir), scaling, address=address)
            paths.append(run_dir / BEST_FILE)

    ensemble = Ensemble([load_file(p, MODEL_FORMAT) for p in paths])
    tta = tta or ensemble.config.tta
    x = torch.from_numpy(splits.test_x)
    summary = {"experiment": str(exp), "tta": tta, "retrained": retrain,
               "members": [{"trial_id": row["trial_id"], "model": row["model"], "file": str(p)}
                           for (row, _, _), p in zip(chosen, paths)]}
    for name, predictor, where in (("ensemble", ensemble, out),
                                   ("single_best", Ensemble(ensemble.blobs[:1]), out / "single_best")):
        pred = predictor.probs(x, tta).argmax(1).numpy()
        summary[name] = results.write_test_report(where, splits.test_y, pred, ensemble.class_names,
                                                  splits.test_groups)
    ensemble.save(out / MODEL_FILE)
    results.write_json(summary, out / "ensemble.json")
    return {"output": str(out), **summary}


def accuracy_gain(summary: dict) -> float:
    """Points the ensemble adds over its best member on the whole test split."""
    return 100 * (summary["ensemble"]["all"]["test_acc"] - summary["single_best"]["all"]["test_acc"])

