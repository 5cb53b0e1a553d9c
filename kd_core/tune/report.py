"""What a person reads after a search: the trials table, the plot and parameter importance.

Importance is Optuna's fANOVA estimate (`optuna.importance.get_param_importances`) over the
trials that reported, computed from a study rebuilt from their final `tune.metric` (in its
direction); with fewer than two such trials, or a single searched field, there is nothing to
apportion and it is empty.
"""

from __future__ import annotations

import io

from rich.table import Table

from kd_core.config import SearchDimension, TuneConfig
from kd_core.tune import METRIC, best_trial, ranked_trials, trial_value, validation_names

STATUS_STYLE = {"finished": "green", "stopped early": "yellow", "error": "red"}


def importance(trials: list[dict], space: dict[str, SearchDimension], metric: str = METRIC, mode: str = "min") -> dict[str, float]:
    """Searched field -> share of the variance of the final `metric` (`mode`: its direction) it explains."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    reported = [trial for trial in trials if trial_value(trial, metric) is not None]
    if len(reported) < 2 or len(space) < 2:
        return {}
    distributions = {}
    for name, dimension in space.items():
        if dimension.kind == "choice":
            distributions[name] = CategoricalDistribution(list(dimension.values))
        elif dimension.kind == "int":
            distributions[name] = IntDistribution(int(dimension.low), int(dimension.high))
        else:
            distributions[name] = FloatDistribution(dimension.low, dimension.high, log=dimension.kind == "loguniform")
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for trial in reported:
        study.add_trial(optuna.trial.create_trial(params=trial["params"], distributions=distributions, value=trial_value(trial, metric)))
    return {name: float(value) for name, value in optuna.importance.get_param_importances(study, evaluator=None).items()}


def trials_table(trials: list[dict], space: dict[str, SearchDimension], metric: str = METRIC, mode: str = "min") -> Table:
    """One row per trial, best first on `metric` (`mode`: its direction): its values, the final
    value of every validation metric, its steps and how it ended."""
    best = best_trial(trials, metric, mode)
    names = validation_names(trials)
    table = Table(title=f"kdflow tune: {len(trials)} trials, ranked by {metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    for column in ("trial", *space, *names, "steps", "status"):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for trial in ranked_trials(trials, metric, mode):
        values = [_show(trial["params"].get(name)) for name in space]
        scores = ["—" if trial_value(trial, name) is None else f"{trial_value(trial, name):.4g}" for name in names]  # a reward KL may be ~1e-5
        status = f"[{STATUS_STYLE[trial['status']]}]{trial['status']}[/]"
        name = f"[bold]{trial['trial']} ★[/bold]" if best is not None and trial["trial"] == best["trial"] else trial["trial"]
        table.add_row(name, *values, *scores, str(trial["steps"]), status)
    return table


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def tune_png(
    trials: list[dict], importances: dict[str, float], settings: TuneConfig, label: str = "validation loss (nats/token)", mode: str = "min",
) -> bytes:
    """Left: the searched metric (`settings.metric`, `label` says what it is; `mode` its direction)
    over steps per trial (ASHA's stops visible). Middle: its last value per trial in launch order,
    best marked. Right: parameter importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, per_trial, bars) = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    metric = settings.metric
    chosen = best_trial(trials, metric, mode)
    best = chosen["trial"] if chosen is not None else None
    for trial in trials:
        if not trial["metric_reports"].get(metric):
            continue
        steps, values = zip(*trial["metric_reports"][metric])
        style = {"linewidth": 2.4, "color": "#1f77b4", "zorder": 3} if trial["trial"] == best else {"linewidth": 1, "alpha": 0.6}
        curves.plot(steps, values, marker="o", markersize=3, linestyle="--" if trial["status"] == "stopped early" else "-", **style)
    curves.set(xlabel="optimizer step", ylabel=label, title="Trials (dashed: stopped early by ASHA)")
    curves.grid(alpha=0.3)
    colors = {"finished": "#2ca02c", "stopped early": "#ff7f0e", "error": "#d62728"}
    for index, trial in enumerate(trials):
        if trial_value(trial, metric) is not None:
            per_trial.scatter(index + 1, trial_value(trial, metric), color=colors[trial["status"]], s=90 if trial["trial"] == best else 35,
                              edgecolor="black" if trial["trial"] == best else "none", zorder=3)
    for status, color in colors.items():
        per_trial.scatter([], [], color=color, label=status)
    per_trial.set(xlabel="trial (launch order)", ylabel=f"last {metric}", title=f"{metric} per trial (large: best; {'lower' if mode == 'min' else 'higher'} is better)")
    per_trial.grid(alpha=0.3)
    per_trial.legend(fontsize=8)
    if importances:
        names = list(importances)[::-1]
        bars.barh(names, [importances[name] for name in names], color="#1f77b4")
        bars.set(xlabel="share of explained variance (fANOVA)", title="Parameter importance", xlim=(0, 1))
        bars.tick_params(axis="y", labelsize=8)
    else:
        bars.text(0.5, 0.5, "needs ≥ 2 searched fields\nand ≥ 2 trials with a result", ha="center", va="center", transform=bars.transAxes)
        bars.set(title="Parameter importance", xticks=[], yticks=[])
    figure.suptitle(f"{len(trials)} trials, at most {settings.max_concurrent} at a time (TPE + ASHA)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
