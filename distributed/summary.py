"""What `emotune tune`, `best` and `report` leave in an experiment: the leaderboard, best_config.yaml (or, after a
final stage, the config as retrained), best_by_architecture/, the Pareto front and report.html.

It sits above both results.py (reading trials, ranking them) and report.py (the page): every trial is read once
here and handed to the page.
"""
from __future__ import annotations

from distributed import storage
from distributed.report import write_report
from distributed.results import (
    BEST,
    column_name,
    leaderboard_rows,
    pareto_front,
    read_final,
    read_meta,
    read_trials,
    write_table,
)


def collect(exp: str, top: int = 5, model: str | None = None) -> dict:
    """Leaderboard, best_config.yaml, best_by_architecture/, Pareto front; from any experiment directory or URI.
    Everything it needs about the search (metric, mode, objectives, models) is in emotune.json."""

    exp = storage.resolve(exp).rstrip("/")
    meta = read_meta(exp)
    metric = meta["metric"]
    objectives = [tuple(o) for o in meta["objectives"]]
    trials = read_trials(exp)
    rows, configs = leaderboard_rows(trials, meta)
    write_table(rows, storage.join(exp, "leaderboard"))
    out = {"experiment": exp, "leaderboard": storage.join(exp, "leaderboard.csv"), "rows": rows,
           "orphans": [t["dir"] for t in trials if t["orphan"]]}
    ranked = [r for r in rows if r[f"best_{metric}"] is not None]
    final = read_final(exp)
    if final:  # the search ended with its final stage: the best config is the winner as retrained
        out["final"] = final
        out["best_config"] = storage.join(exp, "best_config.yaml")
        write_final_best_config(out["best_config"], final, meta)
    elif ranked:
        best = ranked[0]
        out["best_config"] = storage.join(exp, "best_config.yaml")
        write_best_config(out["best_config"], best, configs[best["trial_id"]], meta, metric)
    if ranked:
        if len(meta["models"]) > 1:
            out["best_by_architecture"] = storage.join(exp, "best_by_architecture")
            for m in sorted({r["model"] for r in ranked}):
                first = next(r for r in ranked if r["model"] == m)
                write_best_config(storage.join(out["best_by_architecture"], f"{m}.yaml"), first,
                                  configs[first["trial_id"]], meta, metric)
    front = None
    if len(objectives) > 1:
        front = pareto_front(ranked, objectives, metric)
        write_table(front, storage.join(exp, "pareto_front"))
        out["pareto_front"] = storage.join(exp, "pareto_front.csv")
    out["report"] = write_report(exp, meta, rows, final, trials, front)
    # --model only narrows what is shown: the files above always hold every trial
    out["top"] = [r for r in ranked if model is None or r["model"] == model][:top]
    return out


def write_best_config(path: str, row: dict, config: dict, meta: dict, metric: str) -> None:
    """A complete TrainConfig that `emotune train --config` re-runs as is, with where it came from: `config` is the
    trial's record of the TrainConfig it trained (results.leaderboard_rows), written as recorded."""
    from datetime import datetime, timezone

    from distributed.config import write_config

    header = (f"best trial {row['trial_id']}: {metric} = {row[f'best_{metric}']:.4f} "
              f"(epoch budget {config['epochs']}, ran {row['epochs_run']})\n"
              f"search space: {meta.get('space_file')}  overrides: {' '.join(meta.get('overrides', [])) or 'none'}\n"
              f"git commit: {meta.get('git_commit', 'unknown')}  collected: "
              f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
              f"re-run: emotune train --config {path}")
    write_config(path, config, header)  # the trial's own record of its TrainConfig: validated once, on the way out


def write_final_best_config(path: str, final: dict, meta: dict) -> None:
    """best_config.yaml after a final stage: the config of the member the final stage chose (by validation; with
    refit its first), as it was retrained (the full budget), with its validation and test figures."""
    from distributed.config import read_yaml, write_config

    chosen = final.get("distilled") or final["members"][0]
    run_dir = chosen["file"].rsplit("/", 1)[0]
    config = read_yaml(storage.join(run_dir, "config.yaml"))  # the retrain's own TrainConfig, as it ran
    val = next((f"{column_name(k)} = {v:.4f}" for k, v in chosen.items() if k.startswith(BEST + "val")), "")
    how = f"chosen by validation among {len(final['members'])} retrained members"
    if final.get("refit"):  # validation trained too: nothing chose, the best config's first seed is the model
        val, how = "refit on the validation split too", f"the first of {len(final['members'])} retrained members"
    if final.get("distilled"):
        how = (f"distilled from the ensemble of {len(final['members'])} retrained members (its teacher file: "
               f"re-running this config needs it)")
    kept = "last" if final.get("keep_last") else "best"
    header = (f"final stage: trial {chosen['trial_id']}'s config retrained for {config['epochs']} epochs ({kept} epoch "
              f"{chosen.get('best_epoch')}): {val}, test_acc = {chosen['test_acc']:.4f}; {how}\n"
              f"search space: {meta.get('space_file')}  overrides: {' '.join(meta.get('overrides', [])) or 'none'}\n"
              f"git commit: {meta.get('git_commit', 'unknown')}\n"
              f"re-run: emotune train --config {path}")
    write_config(path, config, header)
