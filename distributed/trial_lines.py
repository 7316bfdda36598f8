"""The plain lines `emotune tune` prints per trial (tune.TrialLines, instead of Ray's table): a trial's start, each
epoch, its end, its error. Pure formatting: no Ray needed to test it."""
from __future__ import annotations

import sys
from pathlib import Path

from distributed.outcome import trial_outcome
from distributed.results import exception_line


def say(line: str) -> None:
    """One write per line: print() writes the text and its newline separately, and Ray's log thread (the trials'
    own output) could land between the two."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def trial_start_line(trial_id: str, config: dict, params: list[str]) -> str:
    shown = "  ".join(f"{k} {fmt_value(config[k])}" for k in params if k in config)
    return f"trial {trial_id} started: {shown}".rstrip()


def trial_epoch_line(trial_id: str, result: dict, metric: str) -> str:
    planned = (result.get("train_config") or {}).get("epochs", "?")
    if result.get("diverged"):
        return f"trial {trial_id} epoch {result.get('epoch', '?')}/{planned}  diverged (the loss is not finite)"
    shown = [metric] + [k for k in ("val_loss", "train_loss") if k != metric]
    values = "  ".join(f"{k} {result[k]:.4f}" for k in shown if isinstance(result.get(k), (int, float)))
    return f"trial {trial_id} epoch {result.get('epoch', '?')}/{planned}  {values}  {result.get('epoch_s', 0):.1f}s"


def trial_end_line(trial_id: str, result: dict, metric: str, best: float | None) -> str:
    epoch, planned = result.get("epoch"), (result.get("train_config") or {}).get("epochs")
    if best is None:  # a trial resumed at its end reports nothing new: its last result carries the best so far
        best = result.get(f"best_{metric}")
    best = f"best {metric} {best:.4f}" if isinstance(best, (int, float)) else "no result"
    outcome = trial_outcome(result, "TERMINATED")  # Tune's on_trial_complete: the trial ended without an error
    if outcome == "diverged":
        return f"trial {trial_id} diverged at epoch {epoch}: stopped (a lower learning rate may help)"
    if outcome == "early_stopped":
        return f"trial {trial_id} early-stopped at epoch {epoch} (no improvement): {best}"
    if outcome == "asha_stopped":
        return f"trial {trial_id} stopped by ASHA after epoch {epoch} of {planned}: {best}"
    return f"trial {trial_id} finished {epoch} epochs: {best}"


def last_error_line(error_file: str | None) -> str:
    """The exception's own line from a trial's error file (Ray keeps the traceback there)."""
    try:
        return exception_line(Path(error_file).read_text()) if error_file else exception_line("")
    except OSError:
        return exception_line("")


def fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
