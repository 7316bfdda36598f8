"""report.html for a search: one self-contained page (plotly's JavaScript inline, no network) that shows the
leaderboard, every trial's learning curve with the points where ASHA stopped it, Optuna's parameter importances,
parameters against the metric, the Pareto front of a multi-objective search, and the best trial's confusion
matrix and per-class F1.

Everything is read back from the experiment directory (the same files `emotune best` reads), so the page can be
rebuilt for an interrupted search or a copy synced from cloud storage: `emotune report EXPERIMENT`.

The best trial's confusion matrix comes from scoring its best_model.pt on the validation split again (the same
seeded split the trial used): a trial reports only scalar metrics, and the validation split is what the search
selected on. The test split stays untouched until `emotune train` evaluates the winner.
"""
from __future__ import annotations

import html
import math
import os
import warnings

import numpy as np

from distributed import storage
from distributed.results import BEST, PARAM, column_name, final_shape, newest_checkpoint_file, param_columns

PAGE_FILE = "report.html"
# A click on a column header sorts the leaderboard by it (numbers as numbers, empty cells last).
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], down = th.dataset.dir !== "desc";
  th.dataset.dir = down ? "desc" : "asc";
  const key = r => { const t = r.cells[col].textContent, n = parseFloat(t); return t === "" ? null : isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return x === null ? 1 : y === null ? -1 : (x < y ? -1 : x > y ? 1 : 0) * (down ? -1 : 1);
  }).forEach(r => body.appendChild(r));
}));
"""
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table.sortable { border-collapse: collapse; font-size: 0.85em; }
table.sortable th { cursor: pointer; background: #f2f2f2; position: sticky; top: 0; }
table.sortable td, table.sortable th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
.note { color: #666; font-size: 0.9em; }
"""


def load_study(exp: str):
    """The experiment's Optuna study (study.StudyFiles publishes it as <exp>/optuna.journal, on any storage), or None
    when there is none. A copy is read into memory, so a search writing to the journal is never disturbed and no
    file is left behind."""
    import tempfile

    import optuna
    from optuna.storages.journal import JournalFileBackend

    journal = storage.join(exp, "optuna.journal")
    if not storage.is_file(journal):
        return None
    with tempfile.TemporaryDirectory(prefix="emotune-report-") as tmp:
        local = os.path.join(tmp, "optuna.journal")
        storage.download(journal, local)
        copy = optuna.storages.JournalStorage(JournalFileBackend(local))
        names = optuna.study.get_all_study_names(copy)
        if len(names) != 1:
            return None
        memory = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=names[0], from_storage=copy, to_storage=memory)
    return optuna.load_study(study_name=names[0], storage=memory)


def write_report(exp: str, meta: dict, rows: list[dict], final: dict | None, trials: list[dict],
                 front: list[dict] | None) -> str:
    """Build report.html for the experiment directory or URI from what summary.collect read: `meta` (emotune.json),
    the leaderboard `rows` (best first), the final stage's record (None: none), every trial (results.read_trials)
    and the Pareto front (None: one objective)."""
    metric, mode = meta["metric"], meta["mode"]
    name = str(exp).rstrip("/").rsplit("/", 1)[-1]
    trials = [t for t in trials if not t["orphan"]]
    sections = [("Leaderboard", leaderboard_html(rows, metric)),
                ("Learning curves", figure_html(curves_figure(trials, rows, metric))),
                ("Parameter importances", importances_html(exp, metric, len(meta["objectives"]) > 1)),
                ("Parameters against the metric", figure_html(parallel_figure(rows, metric)))]
    if front is not None:
        objectives = [tuple(o) for o in meta["objectives"]]
        sections.append(("Pareto front", figure_html(pareto_figure(rows, front, objectives, metric))))
    sections.append(("Best trial on the validation split", best_trial_html(exp, rows, metric)))
    if final:
        sections.insert(1, ("Final stage", final_html(final, rows, metric)))

    import plotly.offline

    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    head = (f"<h1>Search {html.escape(name)}</h1><p>{len(rows)} trials "
            f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); metric <b>{metric}</b> ({mode}). "
            f"Directory: <code>{html.escape(str(exp))}</code></p>")
    body = head + "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>emotune: {html.escape(name)}</title>"
            f"<style>{STYLE}</style><script>{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body>{body}<script>{SORT_SCRIPT}</script></body></html>")
    path = storage.join(exp, PAGE_FILE)
    storage.write_text(path, page)
    return path


def final_html(final: dict, rows: list[dict], metric: str) -> str:
    """The final stage: each retrained member (validation, test), the chosen one first, and the ensemble."""
    searched = {r["trial_id"]: r for r in rows}
    val_key = next((k for k in final["members"][0] if k.startswith(BEST + "val")), BEST + metric)
    lines = ["<tr><th>member</th><th>model</th><th>search: best " + html.escape(metric) + " (epochs)</th>"
             f"<th>retrained: {html.escape(column_name(val_key))} (epochs)</th><th>test_acc</th></tr>"]
    for i, m in enumerate(final["members"]):
        row = searched.get(m["trial_id"], {})
        seed = f" seed {m['seed']}" if final.get("seeds", 1) > 1 and "seed" in m else ""
        chosen = i == 0 and not final.get("distilled")
        lines.append(f"<tr><td>{html.escape(m['trial_id'])}{seed}{' (chosen)' if chosen else ''}</td>"
                     f"<td>{html.escape(m['model'])}</td><td>{cell(row.get(f'best_{metric}'))} "
                     f"({cell(row.get('epochs_run'))})</td><td>{cell(m.get(val_key))} ({cell(m.get('epochs'))})</td>"
                     f"<td>{cell(m.get('test_acc'))}</td></tr>")
    if final.get("distilled"):
        m = final["distilled"]
        lines.append(f"<tr><td>{html.escape(m['trial_id'])} seed {m['seed']} distilled (chosen)</td>"
                     f"<td>{html.escape(m['model'])}</td><td></td><td>{cell(m.get(val_key))} "
                     f"({cell(m.get('epochs'))})</td><td>{cell(m.get('test_acc'))}</td></tr>")
    ens, one = final["ensemble"]["all"]["test_acc"], final["single_best"]["all"]["test_acc"]
    shape = final_shape(len({m["trial_id"] for m in final["members"]}), final["seeds"], final["epochs"])
    how = ("refit on the validation split too (so its figures are in-sample), the single model the best config's "
           "first seed" if final.get("refit") else "the single model chosen by validation"
           + (" at each member's last epoch" if final.get("keep_last") else ""))
    if final.get("distilled"):
        how = "the single model one more run of the best config that learned from the members' ensemble too"
    single = "distilled model" if final.get("distilled") else "chosen member"
    return (f"<p>{shape[0].upper() + shape[1:]}, {how}; test touched once: the "
            f"{single} <b>{one:.4f}</b>, the ensemble of all "
            f"{len(final['members'])} <b>{ens:.4f}</b> (tta {html.escape(str(final['tta']))}).</p>"
            f"<table>{''.join(lines)}</table>")


def figure_html(fig) -> str:
    if fig is None:
        return "<p class='note'>nothing to plot yet: no trial has reported a metric</p>"
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def cell(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def leaderboard_html(rows: list[dict], metric: str) -> str:
    if not rows:
        return "<p class='note'>no trials yet</p>"
    shown = ["trial_id", "status", "model", f"best_{metric}", "epochs_run"]
    shown += [k for k in param_columns(rows[0]) if column_name(k) not in shown] + ["num_params", "epoch_s", "wall_s"]
    shown = [k for k in dict.fromkeys(shown) if any(k in r for r in rows)]
    head = "".join(f"<th>{html.escape(k.removeprefix(PARAM))}</th>" for k in shown)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k in shown) + "</tr>" for r in rows)
    return (f"<p class='note'>click a column to sort; the same rows as leaderboard.csv</p>"
            f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def curves_figure(trials: list[dict], rows: list[dict], metric: str):
    """The metric per epoch for every trial; an X where ASHA stopped a trial."""
    import plotly.graph_objects as go

    status = {r["trial_id"]: r["status"] for r in rows}
    fig = go.Figure()
    stops_x, stops_y, stops_text = [], [], []
    for t in trials:
        points = [(h["epoch"], h[metric]) for h in t["rows"] if isinstance(h.get(metric), (int, float))]
        if not points:
            continue
        x, y = zip(*points)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=t["trial_id"], marker={"size": 5},
                                 hovertemplate=f"{t['trial_id']}<br>epoch %{{x}}<br>{metric} %{{y:.4f}}<extra></extra>"))
        if status.get(t["trial_id"]) == "asha_stopped":
            stops_x.append(x[-1]), stops_y.append(y[-1]), stops_text.append(t["trial_id"])
    if not fig.data:
        return None
    if stops_x:
        fig.add_trace(go.Scatter(x=stops_x, y=stops_y, mode="markers", name="stopped by ASHA", text=stops_text,
                                 marker={"symbol": "x", "size": 12, "color": "black"},
                                 hovertemplate="%{text} stopped by ASHA after epoch %{x}<extra></extra>"))
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, height=450, margin={"t": 20})
    return fig


def importances_html(exp: str, metric: str, multi_objective: bool) -> str:
    """Two of Optuna's importance evaluators over the study's completed trials, side by side: fANOVA (the share of
    the metric's variance each parameter explains; the first objective of a multi-objective study) and PED-ANOVA
    (what sets the top 10% of trials apart; for a multi-objective study, reaching the Pareto front)."""
    import optuna
    import plotly.graph_objects as go

    study = load_study(exp)
    if study is None:
        return "<p class='note'>no Optuna study in this experiment (optuna.journal): importances need it</p>"
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Evaluators named explicitly (fANOVA seeded): the page does not change when Optuna changes its default.
    evaluators = {
        "fANOVA (share of the variance)": (optuna.importance.FanovaImportanceEvaluator(seed=0),
                                           {"target": (lambda t: t.values[0])} if multi_objective else {}),
        "PED-ANOVA (top 10% against the rest)": (optuna.importance.PedAnovaImportanceEvaluator(), {})}
    found, failed = {}, []
    for name, (evaluator, kw) in evaluators.items():
        try:
            with warnings.catch_warnings():  # PED-ANOVA warns when its top quantile holds a single trial
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, evaluator=evaluator, **kw)
        except (RuntimeError, ValueError) as exc:  # too few completed trials, or no parameter varied
            failed.append(f"{name.split(' ')[0]}: {exc}")
            continue
        if imp:
            found[name] = imp
    notes = "".join(f"<p class='note'>not computable yet ({len(done)} completed trials): {html.escape(f)}</p>"
                    for f in failed)
    if not found:
        return notes or f"<p class='note'>importances need at least two completed trials ({len(done)} so far)</p>"
    # every parameter either evaluator scored (PED-ANOVA also scores a model's own, conditional parameters),
    # ordered by the first evaluator that scored it, most important on top
    names = list(dict.fromkeys(n for imp in found.values() for n in imp))[::-1]
    fig = go.Figure([go.Bar(x=[imp.get(n, 0.0) for n in names], y=names, orientation="h", name=name)
                     for name, imp in found.items()])
    fig.update_layout(barmode="group", xaxis_title=f"importance for {metric}", height=140 + 45 * len(names),
                      margin={"t": 20}, legend={"orientation": "h", "y": -0.25})
    return (f"<p class='note'>Optuna's {' and '.join(n.split(' ')[0] for n in found)} "
            f"evaluator{'s' if len(found) > 1 else ''} over {len(done)} "
            f"completed trials, on the value each trial ended with (a trial ASHA stopped is PRUNED in the study and "
            f"not counted)</p>" + notes + figure_html(fig))


def parallel_figure(rows: list[dict], metric: str):
    """One line per trial through its parameters to best_<metric>; log-distributed numbers on a log10 axis."""
    import plotly.graph_objects as go

    ranked = [r for r in rows if r.get(f"best_{metric}") is not None]
    if not ranked:
        return None
    params = list(dict.fromkeys(k for r in ranked for k in param_columns(r)))
    dims = []
    for key in params:
        values = [r.get(key) for r in ranked]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            positive = all(v > 0 for v in values)
            spread = positive and max(values) / min(values) > 50
            dims.append({"label": f"log10 {column_name(key)}" if spread else column_name(key),
                         "values": [math.log10(v) for v in values] if spread else values})
        else:  # categorical (or missing for some architectures): one tick per value
            labels = sorted({str(v) for v in values})
            dims.append({"label": column_name(key), "values": [labels.index(str(v)) for v in values],
                         "tickvals": list(range(len(labels))), "ticktext": labels})
    scores = [r[f"best_{metric}"] for r in ranked]
    dims.append({"label": f"best {metric}", "values": scores})
    fig = go.Figure(go.Parcoords(dimensions=dims, line={"color": scores, "colorscale": "Viridis", "showscale": True}))
    fig.update_layout(height=450, margin={"t": 60, "l": 60, "r": 60})
    return fig


def pareto_figure(rows: list[dict], front: list[dict], objectives: list[tuple[str, str]], metric: str):
    """The first two objectives: every trial, the non-dominated ones (pareto_front.csv) highlighted."""
    import plotly.graph_objects as go

    (a, da), (b, db) = objectives[0], objectives[1]

    from distributed.results import objective_value

    def val(r, m):
        return objective_value(r, m, metric)

    scored = [r for r in rows if val(r, a) is not None and val(r, b) is not None]
    if not scored:
        return None
    on_front = {r["trial_id"] for r in front}
    fig = go.Figure()
    for name, group, style in (("trials", [r for r in scored if r["trial_id"] not in on_front], {"color": "#aaa"}),
                               ("Pareto front", sorted([r for r in scored if r["trial_id"] in on_front],
                                                       key=lambda r: val(r, b)), {"color": "crimson", "size": 10})):
        fig.add_trace(go.Scatter(x=[val(r, b) for r in group], y=[val(r, a) for r in group], name=name,
                                 text=[f"{r['trial_id']} ({r['model']})" for r in group], marker=style,
                                 mode="markers+lines" if name == "Pareto front" else "markers",
                                 hovertemplate="%{text}<br>" + f"{b} %{{x}}<br>{a} %{{y:.4f}}<extra></extra>"))
    fig.update_layout(xaxis_title=f"{b} ({db})", yaxis_title=f"{a} ({da})", height=450, margin={"t": 20})
    return fig


def best_trial_html(exp: str, rows: list[dict], metric: str) -> str:
    ranked = [r for r in rows if r.get(f"best_{metric}") is not None]
    if not ranked:
        return "<p class='note'>no trial has reported a metric yet</p>"
    best = ranked[0]
    from distributed.data import DataError
    from distributed.modelfile import BEST_FILE, ModelFileError

    ckpt = newest_checkpoint_file(exp, best["trial_id"], BEST_FILE)
    if ckpt is None:
        return f"<p class='note'>{best['trial_id']}: no checkpoint with best_model.pt in {html.escape(str(exp))}</p>"
    from distributed.evaluate import validation_confusion

    try:
        cm, names, again = validation_confusion(ckpt)
    except (DataError, ModelFileError) as exc:  # e.g. a copied experiment whose data lives on another machine
        return f"<p class='note'>{best['trial_id']}: cannot score {html.escape(str(ckpt))}: {html.escape(str(exc))}</p>"
    how = "scored again on its validation split" if again else "on its validation split, as its epoch was validated"
    return (f"<p class='note'>{best['trial_id']}'s best weights ({html.escape(ckpt[len(str(exp)) + 1:])}) "
            f"{how} ({int(cm.sum())} images)</p>"
            + figure_html(confusion_figure(cm, names)) + figure_html(f1_figure(cm, names)))


def confusion_figure(cm: np.ndarray, names: list[str]):
    import plotly.express as px

    fig = px.imshow(cm, x=names, y=names, text_auto=True, color_continuous_scale="Blues",
                    labels={"x": "predicted", "y": "true", "color": "images"})
    fig.update_layout(title=f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.3f})", height=500,
                      width=600)
    return fig


def f1_figure(cm: np.ndarray, names: list[str]):
    """Per-class F1 from the confusion matrix: 2 TP / (2 TP + FP + FN), 0 for a class never seen nor predicted."""
    import plotly.graph_objects as go

    tp = np.diag(cm).astype(float)
    denominator = cm.sum(0) + cm.sum(1)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    fig = go.Figure(go.Bar(x=names, y=f1, text=[f"{v:.2f}" for v in f1], textposition="outside"))
    fig.update_layout(title=f"per-class F1 (macro {float(np.mean(f1)):.3f})", yaxis_range=[0, 1.1], height=400,
                      width=600)
    return fig

