"""What a person reads after a search: the trials table, the plot and parameter importance.

Importance is Optuna's fANOVA estimate (`optuna.importance.get_param_importances`) over the
trials that reported, computed from a study rebuilt from their final `val_loss`; with fewer than
two such trials, or a single searched field, there is nothing to apportion and it is empty.
"""

from __future__ import annotations

import io

from rich.table import Table

from kd_core.config import SearchDimension, TuneConfig

STATUS_STYLE = {"finished": "green", "stopped early": "yellow", "error": "red"}


def importance(trials: list[dict], space: dict[str, SearchDimension]) -> dict[str, float]:
    """Searched field -> share of the variance of the final `val_loss` it explains."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    reported = [trial for trial in trials if trial["val_loss"] is not None]
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
    study = optuna.create_study(direction="minimize")
    for trial in reported:
        study.add_trial(optuna.trial.create_trial(params=trial["params"], distributions=distributions, value=trial["val_loss"]))
    return {name: float(value) for name, value in optuna.importance.get_param_importances(study, evaluator=None).items()}


def trials_table(trials: list[dict], space: dict[str, SearchDimension]) -> Table:
    ranked = sorted(trials, key=lambda trial: (trial["val_loss"] is None, trial["val_loss"] or 0.0))
    best = ranked[0]["trial"] if ranked and ranked[0]["val_loss"] is not None else None
    table = Table(title=f"kdflow tune: {len(trials)} trials, ranked by validation loss")
    for column in ("trial", *space, "val_loss", "steps", "status"):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for trial in ranked:
        values = [_show(trial["params"].get(name)) for name in space]
        loss = "—" if trial["val_loss"] is None else f"{trial['val_loss']:.4g}"  # a reward KL may be ~1e-5
        status = f"[{STATUS_STYLE[trial['status']]}]{trial['status']}[/]"
        name = f"[bold]{trial['trial']} ★[/bold]" if trial["trial"] == best else trial["trial"]
        table.add_row(name, *values, loss, str(trial["steps"]), status)
    return table


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def tune_png(trials: list[dict], importances: dict[str, float], settings: TuneConfig, metric: str = "validation loss (nats/token)") -> bytes:
    """Left: the validation metric (`metric` names it) over steps per trial (ASHA's stops
    visible). Middle: its last value per trial in launch order, best marked. Right: parameter
    importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, per_trial, bars) = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    reported = [trial for trial in trials if trial["reports"]]
    best = min(reported, key=lambda trial: trial["val_loss"])["trial"] if reported else None
    for trial in reported:
        steps, losses = zip(*trial["reports"])
        style = {"linewidth": 2.4, "color": "#1f77b4", "zorder": 3} if trial["trial"] == best else {"linewidth": 1, "alpha": 0.6}
        curves.plot(steps, losses, marker="o", markersize=3, linestyle="--" if trial["status"] == "stopped early" else "-", **style)
    curves.set(xlabel="optimizer step", ylabel=metric, title="Trials (dashed: stopped early by ASHA)")
    curves.grid(alpha=0.3)
    colors = {"finished": "#2ca02c", "stopped early": "#ff7f0e", "error": "#d62728"}
    for index, trial in enumerate(trials):
        if trial["val_loss"] is not None:
            per_trial.scatter(index + 1, trial["val_loss"], color=colors[trial["status"]], s=90 if trial["trial"] == best else 35,
                              edgecolor="black" if trial["trial"] == best else "none", zorder=3)
    for status, color in colors.items():
        per_trial.scatter([], [], color=color, label=status)
    per_trial.set(xlabel="trial (launch order)", ylabel="last validation loss", title="Metric per trial (large: best)")
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
