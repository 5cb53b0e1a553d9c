"""The eval stage's report: one self-contained HTML page (PNG plots inlined) a person can read.

Sections, top to bottom: the verdict (every gate passed or not), the gates with their numbers, the
held-out metrics per model, then four plots:
- training: each loss term of the student over its steps, with the baseline's and teacher's CE;
- quality: the student and baseline against the teacher (perplexity, KL, agreement);
- calibration: a reliability diagram (accuracy against confidence per bin) for every model;
- size and speed against quality: parameters and inference tokens/s against perplexity.

Reward models (`task: reward`) get their own table and plots (`kd_core/eval/reward_report.py`).

The page needs no network (no scripts, fonts or images from elsewhere) and is written beside
`metrics.json`; the register step logs it to MLflow with the other eval files.
"""

from __future__ import annotations

import base64
import html
import io

from kd_core.eval.plots import COLORS, LABELS

TERM_STYLES = {"loss": "-", "ce": "--", "kd": ":"}


def report_html(job_name: str, metrics: dict, histories: dict[str, list[dict]], rewards: dict | None = None) -> str:
    """The page; `rewards` (per model, chosen and rejected rewards) feeds a reward model's scatter plot."""
    reward = metrics.get("task") == "reward"
    if reward:
        from kd_core.eval.reward_report import reward_figures, reward_metrics_table

        figures = reward_figures(metrics, histories, rewards)
        table = reward_metrics_table(metrics)
        held_out = f'{metrics["rows"]:,} preference pairs'
    else:
        figures = {
            "Training": training_png(histories),
            "Quality against the teacher": quality_png(metrics),
            "Calibration": reliability_png(metrics),
            "Size and speed against quality": size_speed_png(metrics),
        }
        table = _metrics_table(metrics)
        held_out = f'{metrics["rows"]:,} rows, {metrics["tokens"]:,} tokens'

    passed = metrics.get("gates_passed", True)
    gates = metrics.get("gates", [])
    verdict = (
        f'<p class="verdict {"pass" if passed else "fail"}">'
        + ("All gates passed: the student may be promoted." if passed and gates else
           "No gates: the student is promoted on its primary metric alone (eval.sanity_gates is false)." if not gates else
           f"{sum(not g['passed'] for g in gates)} of {len(gates)} gates failed: the student will not be promoted.")
        + "</p>"
    )
    body = [
        f"<h1>kdflow evaluation: {html.escape(job_name)}</h1>",
        f'<p class="meta">Held-out {html.escape(metrics["split"])} split: {held_out}. '
        f'Speed measured on {html.escape(str(metrics.get("device", "this machine")))}.</p>',
        verdict,
        _gates_table(gates, default=metrics.get("gates_default", False)),
        table,
    ]
    for title, png in figures.items():
        data = base64.b64encode(png).decode()
        body.append(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kdflow evaluation: {html.escape(job_name)}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; margin-bottom: 0.2em; }} h2 {{ font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }}
.meta {{ color: #666; margin-top: 0; }}
.verdict {{ font-size: 1.1em; padding: 0.6em 0.9em; border-radius: 6px; }}
.verdict.pass {{ background: #e6f4ea; color: #1e6b34; }} .verdict.fail {{ background: #fce8e6; color: #a50e0e; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.95em; }}
th, td {{ padding: 0.35em 0.8em; border-bottom: 1px solid #e4e4e4; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} th {{ background: #f6f6f6; }}
td.pass {{ color: #1e6b34; font-weight: 600; }} td.fail {{ color: #a50e0e; font-weight: 600; }}
img {{ max-width: 100%; }}
</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""


def _gates_table(gates: list[dict], default: bool) -> str:
    if not gates:
        return ""
    title = "Sanity gates (the default, as eval.gates is empty)" if default else "Quality gates"
    rows = "".join(
        f"<tr><td><code>{html.escape(g['gate'])}</code></td><td>{g['left']:.4g}</td><td>{g['right']:.4g}</td>"
        f'<td class="{"pass" if g["passed"] else "fail"}">{"pass" if g["passed"] else "FAIL"}</td></tr>'
        for g in gates
    )
    return f"<h2>{title}</h2><table><tr><th>gate</th><th>left side</th><th>right side</th><th>result</th></tr>{rows}</table>"


def _metrics_table(metrics: dict) -> str:
    columns = [
        ("perplexity", "perplexity", "{:.2f}"), ("cross_entropy", "cross-entropy", "{:.4f}"), ("kl_to_teacher", "KL from teacher", "{:.4f}"),
        ("agreement_top1", "top-1 agreement", "{:.1%}"), ("agreement_top5", "top-5 agreement", "{:.1%}"), ("ece", "ECE", "{:.3f}"),
        ("parameters", "parameters", "{:,}"), ("weight_bytes", "size on disk", None), ("tokens_per_s", "tokens/s", "{:,.0f}"),
        ("latency_ms", "latency (ms/batch)", "{:.1f}"),
    ]
    return metrics_table_html(metrics, columns, LABELS, not_for_teacher=("kl_to_teacher", "agreement_top1", "agreement_top5"))


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
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def training_png(
    histories: dict[str, list[dict]], *, labels: dict = LABELS, styles: dict = TERM_STYLES, others: tuple = ("ce",),
    ylabel: str = "nats / token", title: str = "Training loss terms", smooth: int = 1,
) -> bytes:
    """Every term in `styles` of the student's history; the `others` terms of the other models.
    With `smooth` > 1 each curve is the running mean of that many log records (noisy per-batch
    terms), drawn over the raw values in a light line."""
    plt = _pyplot()
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
    return _png(figure)


def quality_png(metrics: dict) -> bytes:
    plt = _pyplot()
    names = [name for name in LABELS if name in metrics]
    students = [name for name in names if name != "teacher"]
    figure, (perplexity, kl, agreement) = plt.subplots(1, 3, figsize=(10.5, 3.6))
    bars = perplexity.bar([LABELS[n] for n in names], [metrics[n]["perplexity"] for n in names], color=[COLORS[n] for n in names])
    perplexity.bar_label(bars, fmt="%.1f")
    perplexity.set(title="Perplexity (lower is better)")
    perplexity.margins(y=0.12)
    bars = kl.bar([LABELS[n] for n in students], [metrics[n]["kl_to_teacher"] for n in students], color=[COLORS[n] for n in students])
    kl.bar_label(bars, fmt="%.3f")
    kl.set(title="KL(teacher ‖ model), nats")
    kl.margins(y=0.12)
    width = 0.38
    for offset, (key, label) in zip((-width / 2, width / 2), (("agreement_top1", "top-1"), ("agreement_top5", "top-5"))):
        positions = [index + offset for index in range(len(students))]
        top5 = key == "agreement_top5"
        bars = agreement.bar(positions, [metrics[n][key] for n in students], width, color=[COLORS[n] for n in students],
                             alpha=0.45 if top5 else 1.0, hatch="//" if top5 else None, edgecolor="white")
        agreement.bar_label(bars, labels=[f"{label}\n{metrics[n][key]:.2f}" for n in students], fontsize=8)
    agreement.set_xticks(range(len(students)), [LABELS[n] for n in students])
    agreement.set(title="Agreement with the teacher", ylim=(0, 1.2))
    for axes in (perplexity, kl, agreement):
        axes.tick_params(axis="x", labelsize=8)
    return _png(figure)


def reliability_png(metrics: dict) -> bytes:
    plt = _pyplot()
    names = [name for name in LABELS if name in metrics and "calibration" in metrics[name]]
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        calibration = metrics[name]["calibration"]
        bins = len(calibration["count"])
        centers = [(index + 0.5) / bins for index in range(bins)]
        filled = [i for i in range(bins) if calibration["count"][i] > 0]
        axis.bar([centers[i] for i in filled], [calibration["accuracy"][i] for i in filled], width=1 / bins, color=COLORS[name], alpha=0.75,
                 edgecolor="white", label="accuracy")
        axis.plot([0, 1], [0, 1], "--", color="#888888", label="perfect calibration")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", title=f"{LABELS[name]}: ECE {metrics[name]['ece']:.3f}")
        axis.set_ylabel("accuracy")
        axis.legend(fontsize=8, loc="upper left")
    return _png(figure)


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
    plt = _pyplot()
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
    return _png(figure)
