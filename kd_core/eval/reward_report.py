"""The report's tables and plots for reward models (`task: reward`); `report.py` lays out the page,
`figures.py` holds the labels, colours and the table and plot kinds both reports share.

Plots: the training loss terms; pairwise accuracy (against the teacher and the human labels) and
Spearman correlation per model; the student's and baseline's rewards against the teacher's; a
reliability diagram of the preference probabilities against the human labels; size and speed
against accuracy.
"""

from __future__ import annotations

from kd_core.eval.figures import COLORS, REWARD_LABELS, figure_png, metrics_table_html, pyplot
from kd_core.eval.figures import size_speed_png as points_png
from kd_core.eval.figures import training_png as loss_terms_png

TERM_STYLES = {"loss": "-", "pairwise": "--", "pointwise": "-.", "bt": ":"}


def reward_metrics_table(metrics: dict) -> str:
    columns = [
        ("pairwise_accuracy_human", "accuracy vs human labels", "{:.1%}"), ("pairwise_accuracy_teacher", "agreement with teacher", "{:.1%}"),
        ("spearman_teacher", "Spearman ρ vs teacher", "{:.3f}"), ("preference_kl_to_teacher", "preference KL", "{:.4f}"),
        ("ece", "ECE", "{:.3f}"), ("parameters", "parameters", "{:,}"), ("weight_bytes", "size on disk", None),
        ("pairs_per_s", "pairs/s", "{:,.0f}"), ("latency_ms", "latency (ms/batch)", "{:.1f}"),
    ]
    return metrics_table_html(
        metrics, columns, REWARD_LABELS, not_for_teacher=("pairwise_accuracy_teacher", "spearman_teacher", "preference_kl_to_teacher")
    )


def reward_figures(metrics: dict, histories: dict[str, list[dict]], rewards: dict | None) -> dict[str, bytes]:
    figures = {
        "Training": training_png(histories),
        "Preference accuracy": accuracy_png(metrics),
        "Rewards against the teacher's": rewards_png(metrics, rewards or {}),
        "Calibration against the human labels": reliability_png(metrics),
        "Size and speed against accuracy": size_speed_png(metrics),
    }
    return {title: png for title, png in figures.items() if png is not None}


def training_png(histories: dict[str, list[dict]]) -> bytes:
    return loss_terms_png(
        histories, labels=REWARD_LABELS, styles=TERM_STYLES, others=("bt",), ylabel="loss (per pair)",
        title="Training loss terms (bt: Bradley–Terry on human labels; running mean of 5 log steps)", smooth=5,
    )


def accuracy_png(metrics: dict) -> bytes:
    plt = pyplot()
    names = [name for name in REWARD_LABELS if name in metrics]
    figure, (accuracy, correlation) = plt.subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.38
    for offset, (key, label) in zip((-width / 2, width / 2), (("pairwise_accuracy_human", "vs human"), ("pairwise_accuracy_teacher", "vs teacher"))):
        shown = [n for n in names if key in metrics[n] and not (n == "teacher" and key == "pairwise_accuracy_teacher")]
        positions = [names.index(n) + offset for n in shown]
        teacher_side = key == "pairwise_accuracy_teacher"
        bars = accuracy.bar(positions, [metrics[n][key] for n in shown], width, color=[COLORS[n] for n in shown],
                            alpha=0.45 if teacher_side else 1.0, hatch="//" if teacher_side else None, edgecolor="white")
        accuracy.bar_label(bars, labels=[f"{label}\n{metrics[n][key]:.1%}" for n in shown], fontsize=8)
    accuracy.axhline(0.5, color="#888888", linestyle="--", linewidth=1)
    accuracy.set_xticks(range(len(names)), [REWARD_LABELS[n] for n in names])
    accuracy.set(title="Pairwise accuracy (dashed: chance)", ylim=(0, 1.25), ylabel="share of pairs ranked right")
    students = [n for n in names if n != "teacher"]
    bars = correlation.bar([REWARD_LABELS[n] for n in students], [metrics[n]["spearman_teacher"] for n in students], color=[COLORS[n] for n in students])
    correlation.bar_label(bars, fmt="%.3f")
    correlation.set(title="Spearman ρ with the teacher's rewards", ylim=(min(0, *[metrics[n]["spearman_teacher"] for n in students]) - 0.05, 1.1))
    return figure_png(figure)


def rewards_png(metrics: dict, rewards: dict) -> bytes | None:
    students = [name for name in ("student", "baseline") if name in rewards]
    if "teacher" not in rewards or not students:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(students), figsize=(5.2 * len(students), 4.0), squeeze=False)
    teacher = rewards["teacher"]["chosen"] + rewards["teacher"]["rejected"]
    for axis, name in zip(axes[0], students):
        values = rewards[name]["chosen"] + rewards[name]["rejected"]
        axis.scatter(teacher, values, s=6, alpha=0.35, color=COLORS[name])
        axis.set(xlabel="teacher reward (text view)", ylabel=f"{REWARD_LABELS[name]} reward (image view)",
                 title=f"{REWARD_LABELS[name]}: Spearman ρ {metrics[name]['spearman_teacher']:.3f}")
        axis.grid(alpha=0.3)
    return figure_png(figure)


def reliability_png(metrics: dict) -> bytes | None:
    names = [name for name in REWARD_LABELS if name in metrics and "calibration" in metrics[name]]
    if not names:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        calibration = metrics[name]["calibration"]
        bins, low = len(calibration["count"]), calibration["low"]
        step = (1 - low) / bins
        filled = [i for i in range(bins) if calibration["count"][i] > 0]
        axis.bar([low + (i + 0.5) * step for i in filled], [calibration["accuracy"][i] for i in filled], width=step, color=COLORS[name],
                 alpha=0.75, edgecolor="white", label="accuracy")
        axis.plot([low, 1], [low, 1], "--", color="#888888", label="perfect calibration")
        axis.set(xlim=(low, 1), ylim=(0, 1.05), xlabel="confidence max(p, 1 − p)", ylabel="accuracy vs human",
                 title=f"{REWARD_LABELS[name]}: ECE {metrics[name]['ece']:.3f}")
        axis.legend(fontsize=8, loc="lower right")
    return figure_png(figure)


def size_speed_png(metrics: dict) -> bytes:
    names = [name for name in REWARD_LABELS if name in metrics]
    key = "pairwise_accuracy_human" if all("pairwise_accuracy_human" in metrics[n] for n in names) else "pairwise_accuracy_teacher"
    quality = (key, "accuracy vs human labels" if key == "pairwise_accuracy_human" else "agreement with the teacher")
    return points_png(metrics, labels=REWARD_LABELS, quality=quality, speed=("pairs_per_s", "pairs scored per second"))
