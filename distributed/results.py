"""What runs and searches leave behind: metric tables, test reports, plots, leaderboards, best configs.

Every file is written through distributed.storage (local: a temporary file and a rename; object stores: one PUT),
so a crash never leaves half a report, and an experiment may live on s3:// or gs:// as well as on a local path.
"""
from __future__ import annotations

import io
import json
import math
import re
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from distributed import storage
from distributed.config import HISTORY_FILE, METRICS
from distributed.outcome import trial_outcome

if TYPE_CHECKING:
    from distributed.search_space import SearchSpace


def write_table(rows: list[dict], stem, parquet: bool = True) -> None:
    """rows -> STEM.csv (and STEM.parquet); columns are the union of keys, missing values are null. STEM is a local
    path or a URI."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({c: [row.get(c) for row in rows] for c in columns}) if rows else pa.table({})
    for suffix, write in ((".parquet", pq.write_table), (".csv", pacsv.write_csv))[0 if parquet else 1:]:
        buf = pa.BufferOutputStream()
        write(table, buf)
        storage.write_bytes(f"{stem}{suffix}", buf.getvalue().to_pybytes())


def write_json(obj, path) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["train_loss"] for h in history], label="train_loss")
    a.plot(epochs, [h["val_loss"] for h in history], label="val_loss")
    a.set_xlabel("epoch"), a.set_title("loss"), a.legend()
    b.plot(epochs, [h["val_acc"] for h in history], label="val_acc")
    b.plot(epochs, [h["val_macro_f1"] for h in history], label="val_macro_f1")
    b.set_xlabel("epoch"), b.set_title("validation"), b.legend()
    save_figure(fig, path)


# ------------------------------------------------------------------------------- collecting a search's results

def read_trials(exp: str) -> list[dict]:
    """Every trial of an experiment (a local path or a URI), finished or not, from the files Tune writes (so this
    also works on an interrupted search). A trial directory that Tune's saved experiment state does not know is
    marked `orphan`: a crashed driver started it after its last saved state, so a --resume ran a new trial instead."""
    saved = {t["trial_id"]: t for t in saved_trials(exp)}
    status = {tid: t["status"] for tid, t in saved.items()}
    files = set(storage.list_files(exp))
    trials = []
    for params_file in sorted(f for f in files if f.count("/") == 1 and f.endswith("/params.json")):
        tdir = params_file.split("/")[0]
        rows = []
        if f"{tdir}/result.json" in files:
            lines = storage.read_text(storage.join(exp, tdir, "result.json")).splitlines()
            for i, line in enumerate(lines, 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) and line.strip():  # the last line may be cut short by a crash; others not
                        warnings.warn(f"{storage.join(exp, tdir, 'result.json')}: line {i} is not JSON, skipped "
                                      f"(the file was damaged after Tune wrote it)", stacklevel=2)
        rows = [r for r in rows if "epoch" in r]
        trial_id = rows[-1]["trial_id"] if rows else tdir
        last = saved.get(trial_id, {}).get("last_result", {})
        if isinstance(last.get("epoch"), int) and last["epoch"] > (rows[-1]["epoch"] if rows else 0):
            # Tune uploads the experiment state and the trials' result.json one by one: a driver killed in between
            # leaves a finished trial whose result.json lacks its last epochs; the state's last result has the end
            rows.append(last)
        rows = fill_from_checkpoint(rows, exp, tdir, files)
        trials.append({"trial_id": trial_id, "dir": storage.join(exp, tdir),
                       "params": json.loads(storage.read_text(storage.join(exp, params_file))),
                       "rows": rows, "error": f"{tdir}/error.txt" in files, "status": status.get(trial_id),
                       "orphan": bool(status) and trial_id not in status})
    return trials


def fill_from_checkpoint(rows: list[dict], exp: str, tdir: str, files: set[str]) -> list[dict]:
    """A trial's reports in epoch order, with the epochs below its last that result.json lacks taken from its
    newest checkpoint's HISTORY_FILE: a driver killed after a checkpoint reached the bucket and before the
    result.json did leaves such a gap, and the trial resumes after it (or, resumed at its last epoch, reports
    nothing more)."""
    have = {r["epoch"] for r in rows}
    if not rows or have >= set(range(1, max(have) + 1)):
        return rows
    trial_id = rows[-1].get("trial_id", tdir)
    found = newest_checkpoint_file(exp, trial_id, HISTORY_FILE, files)
    if found is None:
        return rows
    earlier = [dict(e, trial_id=trial_id) for e in json.loads(storage.read_text(found))
               if e["epoch"] not in have and e["epoch"] < max(have)]
    return sorted(rows + earlier, key=lambda r: r["epoch"])


def newest_checkpoint_file(exp: str | Path, trial_id: str, name: str, files: set[str] | None = None) -> str | None:
    """A file of a trial's newest checkpoint (best_model.pt, history.json, ...), local or on object storage: under
    the trial's directory, or for worker-group trials under train_runs/<trial_id>/ where Ray Train keeps its
    checkpoints (the trial's directory then has none). `files`: the experiment's listing when the caller has it."""
    for base in (trial_id, f"train_runs/{trial_id}"):
        under = (storage.list_files(storage.join(str(exp), base)) if files is None
                 else [f[len(base) + 1:] for f in files if f.startswith(base + "/")])
        found = sorted((f for f in under if re.search(rf"(^|/)checkpoint_[^/]+/{re.escape(name)}$", f)),
                       key=lambda f: f.rsplit("/", 2)[-2])
        if found:
            return storage.join(str(exp), base, found[-1])
    return None


def exception_line(error_text: str) -> str:
    """The last non-empty line of a trial's error.txt (Ray writes the traceback there): the exception itself,
    without terminal colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in error_text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no error text; see the trial's error.txt)"


def saved_trials(exp: str) -> list[dict]:
    """Tune's newest saved experiment state in exp (an experiment, or Tune's local staging copy of it), its trials
    in creation order: trial_id, status, evaluated_params, last_result. Plain JSON fields only, nothing unpickled;
    [] without a state."""
    states = storage.glob(exp, "experiment_state-*.json")
    if not states:
        return []
    out = []
    for entry in json.loads(storage.read_text(states[-1])).get("trial_data", []):
        try:
            info, runtime = json.loads(entry[0]), json.loads(entry[1])
            out.append({"trial_id": info["trial_id"], "status": info.get("status"),
                        "evaluated_params": info.get("evaluated_params") or {},
                        "last_result": runtime.get("last_result") or {}})
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            continue
    return out


def flatten_params(params: dict) -> dict:
    """{"lr_head": 1e-3, "mobilenet_v2": {"unfreeze_start": 4}} -> conditional values under their own names."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


# The leaderboard's column families: param.<name> for each searched parameter, best_<metric> for the best value of
# a metric over the trial's epochs (last_<metric> for its value at the end). Read them with these, not by offset.
PARAM, BEST = "param.", "best_"


def param_columns(row: dict) -> list[str]:
    return [k for k in row if k.startswith(PARAM)]


def column_name(column: str) -> str:
    """param.lr_head -> lr_head, best_val_acc -> val_acc: the parameter or metric a column holds."""
    return column.removeprefix(PARAM) if column.startswith(PARAM) else column.removeprefix(BEST)


def leaderboard_rows(trials: list[dict], meta: dict) -> tuple[list[dict], dict]:
    """-> (rows best first, {trial_id: the trial's complete TrainConfig dict}). Each trial's config is the one it
    recorded with its results; a trial that never reported has no config (and no metric), only its parameters."""
    metric, mode = meta["metric"], meta["mode"]
    sign = 1 if mode == "max" else -1
    rows, configs = [], {}
    for t in trials:
        if t.get("orphan"):
            continue
        hist = t["rows"]
        recorded = next((h["train_config"] for h in reversed(hist) if isinstance(h.get("train_config"), dict)), None)
        if recorded:
            configs[t["trial_id"]] = recorded
        cfg = recorded or {"model": t["params"].get("model", meta["model"]), "epochs": meta["epochs"]}
        values = [v for v in (h.get(metric) for h in hist) if isinstance(v, (int, float)) and math.isfinite(v)]
        best = max(values, key=lambda v: sign * v) if values else None
        last = hist[-1] if hist else {}
        epochs_run = int(last.get("epoch", 0))
        # error.txt stays after a failed attempt (Ray appends to it and never removes it), also when a retry or a
        # --resume (resume_errored) then ran the trial to its end: the saved state's status decides where there is one
        status = trial_outcome(last, t["status"] or ("ERROR" if t["error"] else None), planned=cfg["epochs"])
        row = {"trial_id": t["trial_id"], "status": status, "model": cfg["model"],
               **{PARAM + k: v for k, v in flatten_params(t["params"]).items()},
               "epochs_run": epochs_run, f"best_{metric}": best}
        for m in METRICS:
            row[f"last_{m}"] = last.get(m)
        row["num_params"] = last.get("num_params")
        epoch_times = [h["epoch_s"] for h in hist if isinstance(h.get("epoch_s"), (int, float))]
        row["epoch_s"] = round(sum(epoch_times) / len(epoch_times), 3) if epoch_times else None
        row["wall_s"] = round(float(last.get("time_total_s", 0.0)), 1)
        row["asha_stopped"] = status == "asha_stopped"
        rows.append(row)
    rows.sort(key=lambda r: (r[f"best_{metric}"] is None, -sign * (r[f"best_{metric}"] or 0)))
    return rows, configs


def objective_value(row: dict, name: str, metric: str):
    """A leaderboard row's value of an objective: the search metric's best; another metric (val_loss, ...) as the
    trial ended (what Optuna was told for it); num_params and epoch_s from their columns. None where there is no
    finite value (a diverged trial's last val_loss is NaN, which nothing could dominate)."""
    value = row.get(f"best_{metric}") if name == metric else row[name] if name in row else row.get(f"last_{name}")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def pareto_front(rows: list[dict], objectives: list[tuple[str, str]], metric: str) -> list[dict]:
    """Non-dominated trials under all objectives (each read by objective_value)."""
    def key(row, m):
        return objective_value(row, m, metric)

    scored = [r for r in rows if all(key(r, m) is not None for m, _ in objectives)]

    def better_or_equal(a, b):
        return all((key(a, m) >= key(b, m)) if d == "max" else (key(a, m) <= key(b, m)) for m, d in objectives)

    return [r for r in scored if not any(better_or_equal(o, r) and o is not r and
                                         any(key(o, m) != key(r, m) for m, _ in objectives) for o in scored)]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_meta(exp: str, space_file: str, overrides: list[str], space: SearchSpace) -> None:
    """emotune.json: what `emotune best` and --resume need, so nothing here re-reads the search space."""
    from dataclasses import asdict
    from datetime import datetime, timezone

    from distributed.config import TrainConfig

    write_json({"space_file": str(space_file), "overrides": list(overrides), "num_samples": space.num_samples,
                "scaling": asdict(space.scaling),
                "metric": space.metric, "mode": space.mode, "objectives": [list(o) for o in space.objectives],
                "models": space.model_choices(), "model": space.fixed.get("model", TrainConfig().model),
                "epochs": space.epochs(), "final": space.final, "git_commit": git_commit(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}, storage.join(exp, "emotune.json"))


def read_meta(exp: str, resuming: bool = False) -> dict:
    """An experiment's emotune.json (write_meta): what the search was (metric, mode, objectives, models, scaling),
    so nothing here needs the search space. resuming: a missing file is a --resume with nothing to resume."""
    from distributed.config import ConfigError

    meta_file = storage.join(exp, "emotune.json")
    if not storage.is_file(meta_file):
        if resuming:
            raise ConfigError(f"{exp}: no emotune experiment here to resume (missing emotune.json); "
                              f"run without --resume to start it")
        raise ConfigError(f"{exp}: not an emotune experiment directory (no emotune.json); pass the directory "
                          f"printed by `emotune tune`")
    meta = json.loads(storage.read_text(meta_file))
    if "metric" not in meta:
        raise ConfigError(f"{meta_file}: written by an older emotune (no metric); re-run the search with this one")
    return meta


FINAL_RECORD = "final/ensemble.json"  # written by ensemble.final_stage (the same record as `emotune ensemble`)


def read_final(exp: str) -> dict | None:
    """The final stage's record, or None when the search has none (yet)."""
    path = storage.join(exp, FINAL_RECORD)
    return json.loads(storage.read_text(path)) if storage.is_file(path) else None


def final_shape(configs: int, seeds: int, epochs: int) -> str:
    """A final stage in words, as the CLI and the page say it: "the best config retrained for 60 epochs (3 seeds)"."""
    which = "the best config" if configs == 1 else f"the top {configs} configs"
    each = "" if configs == 1 else " each"
    return f"{which} retrained for {epochs} epochs ({seeds} seed{'s' if seeds > 1 else ''}{each})"
