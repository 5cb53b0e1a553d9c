"""What the eval stage's pictures and tables share: model labels and colours, matplotlib, and the
plots and table both reports draw.

    LABELS, REWARD_LABELS, COLORS      a model's name in a legend (language models; reward models) and its colour
    pyplot(), figure_png(figure)       matplotlib without a display; a figure as PNG bytes (closed after)
    metrics_table_html(...)            the held-out metrics table, a row per model
    training_png(histories, ...)       loss terms over the optimizer steps
    size_speed_png(metrics, ...)       parameters and speed against one quality metric

Their defaults draw the language-model report (`report.py`); `reward_report.py` passes the reward
model's labels, loss terms and metrics. `plots.py` draws the eval stage's training-curves PNG with
the same labels and colours.
"""

from __future__ import annotations

import io

LABELS = {"teacher": "teacher", "start": "student at start", "student": "KD student", "baseline": "no-teacher student"}
REWARD_LABELS = {"teacher": "text teacher", "student": "KD student", "baseline": "human-labels-only"}
COLORS = {"teacher": "#444444", "start": "#9467bd", "student": "#1f77b4", "baseline": "#d62728"}
TERM_STYLES = {"loss": "-", "ce": "--", "kd": ":"}
"""The language-model student's loss terms and their line styles (`training_png`'s default)."""


def metrics_table_html(metrics: dict, columns: list[tuple], labels: dict, not_for_teacher: tuple = ()) -> str:
    """One row per model in `labels`; `columns` are (metric, header, format or None for MB); a
    metric the model lacks, or one in `not_for_teacher` on the teacher's row, shows a dash."""
    header = "".join(f"<th>{label}</th>" for _, label, _ in columns)
    rows = []
    for name in (name for name in labels if name in metrics):
        row = metrics[name]
        cells = []
        for key, _, form in columns:
            if key not in row or (name == "teacher" and key in not_for_teacher):
                cells.append("—")
            elif form is None:
                cells.append(f"{row[key] / 1e6:.2f} MB")
            else:
                cells.append(form.format(row[key]))
        rows.append(f"<tr><td>{labels[name]}</td>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return f"<h2>Held-out metrics</h2><table><tr><th>model</th>{header}</tr>{''.join(rows)}</table>"


# ------------------------------------------------------------------------------------ plots
def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure) -> bytes:
    """The figure as PNG bytes (100 dpi, tight layout); the figure is closed."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return buffer.getvalue()


def training_png(
    histories: dict[str, list[dict]], *, labels: dict = LABELS, styles: dict = TERM_STYLES, others: tuple = ("ce",),
    ylabel: str = "nats / token", title: str = "Training loss terms", smooth: int = 1,
) -> bytes:
    """Every term in `styles` of the student's history; the `others` terms of the other models.
    With `smooth` > 1 each curve is the running mean of that many log records (noisy per-batch
    terms), drawn over the raw values in a light line."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(10.5, 3.8))
    for name, history in histories.items():
        if not history:
            continue
        steps = [r["step"] for r in history]
        terms = [term for term in (styles if name == "student" else others) if term in history[0]]
        for term in terms:
            label = f"{labels[name]}: {term}" + (" (total)" if term == "loss" else "")
            values = [r[term] for r in history]
            if smooth > 1:
                axes.plot(steps, values, styles[term], color=COLORS[name], alpha=0.18, linewidth=0.8)
                values = [sum(values[max(0, i - smooth + 1) : i + 1]) / len(values[max(0, i - smooth + 1) : i + 1]) for i in range(len(values))]
            axes.plot(steps, values, styles[term], color=COLORS[name], label=label)
    axes.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    axes.legend(ncol=2, fontsize=9)
    return figure_png(figure)


def _short_number(value: float) -> str:
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.3g}"


def size_speed_png(
    metrics: dict, *, labels: dict = LABELS, quality: tuple[str, str] = ("perplexity", "perplexity (lower is better)"),
    speed: tuple[str, str] = ("tokens_per_s", "inference tokens/s"),
) -> bytes:
    """Parameters and speed (x, log scale) against one quality metric (y), a point per model."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    names = [name for name in labels if name in metrics]
    key, quality_label = quality
    figure, (size, fast) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for axis, x_key, label in ((size, "parameters", "parameters"), (fast, *speed)):
        for name in names:
            axis.scatter(metrics[name][x_key], metrics[name][key], s=90, color=COLORS[name], zorder=3)
            axis.annotate(labels[name], (metrics[name][x_key], metrics[name][key]), textcoords="offset points", xytext=(8, 6), fontsize=9)
        axis.set(xscale="log", xlabel=f"{label} (log scale)", ylabel=quality_label)
        ticks: list[float] = []
        for value in sorted(metrics[name][x_key] for name in names):  # a tick per model (a narrow range has no decade), none crowded
            if not ticks or value > 1.1 * ticks[-1]:
                ticks.append(value)
        axis.set_xticks(ticks, [_short_number(value) for value in ticks])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.grid(alpha=0.3, which="both")
        axis.margins(x=0.35, y=0.25)
    size.set(title="Size against quality")
    fast.set(title="Speed against quality")
    return figure_png(figure)
