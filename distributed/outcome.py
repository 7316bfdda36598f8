"""How a trial ended, read once: the leaderboard's status column, the line `emotune tune` prints when a trial ends
and what Optuna is told (tune.DivergenceAwareOptunaSearch) all call trial_outcome. Imports nothing: a new ending
is taught here, once."""
from __future__ import annotations

# the leaderboard's status words
OUTCOMES = ("completed", "asha_stopped", "early_stopped", "diverged", "error", "incomplete")


def trial_outcome(last: dict, tune_status: str | None = None, planned: int | None = None) -> str:
    """One of OUTCOMES, from a trial's last report and Tune's status of the trial (TERMINATED: it ended without an
    error; ERROR; RUNNING, PENDING...; None: not known).

    last: nested, as result.json holds it ({"train_config": {"epochs": 6}}), or flattened, as Tune hands results to
    searchers ("train_config/epochs"). planned: the trial's epoch budget, when the caller knows it better than last
    does (a divergence report records no train_config)."""
    if tune_status == "ERROR":
        return "error"
    if last.get("diverged"):
        return "diverged"
    if last.get("early_stopped"):
        return "early_stopped"
    if planned is None:
        planned = (last.get("train_config") or {}).get("epochs", last.get("train_config/epochs"))
    if planned is None:  # no budget to compare with: a trial Tune ended is taken to have run to its end
        return "completed" if tune_status == "TERMINATED" else "incomplete"
    if (last.get("epoch") or 0) >= planned:
        return "completed"  # whatever the status says: a saved state may lag behind the trial's last report
    # short of its budget, neither diverged nor early-stopped: if Tune ended it, its scheduler did (ASHA's cut)
    return "asha_stopped" if tune_status == "TERMINATED" else "incomplete"
