"""The eval stage's report: one self-contained HTML page (PNG plots inlined) a person can read.

Sections, top to bottom: the verdict (every gate passed or not), the gates with their numbers, the
held-out metrics per model, then four plots:
- training: each loss term of the student over its steps, with the baseline's and teacher's CE;
- quality: the student and baseline against the teacher (perplexity, KL, agreement);
- calibration: a reliability diagram (accuracy against confidence per bin) for every model;
- size and speed against quality: parameters and inference tokens/s against perplexity.
Chat data adds the greedy-answer scores to the table and a few held-out prompts with every
model's answer (`answers_html`).

Reward models (`task: reward`) get their own table and plots (`kd_core/eval/reward_report.py`);
the labels, colours, the metrics table and the training and size-and-speed plots both draw are in
`kd_core/eval/figures.py`.

The page needs no network (no scripts, fonts or images from elsewhere) and is written beside
`metrics.json`; the register step logs it to MLflow with the other eval files.
"""

from __future__ import annotations

import base64
import html

from kd_core.eval.figures import COLORS, LABELS, figure_png, metrics_table_html, pyplot, size_speed_png, training_png


def report_html(job_name: str, metrics: dict, figures: dict[str, bytes | None], table: str, held_out: str, sections: str = "") -> str:
    """The page: the verdict and gates from `metrics`, then the task's metrics `table` (HTML),
    any further `sections` (HTML) and `figures` (title -> PNG; None is left out); `held_out`
    says what the split held."""
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
        sections,
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


def language_model_figures(metrics: dict, histories: dict[str, list[dict]]) -> dict[str, bytes]:
    """A language-model job's plots (the module docstring lists them)."""
    return {
        "Training": training_png(histories),
        "Quality against the teacher": quality_png(metrics),
        "Calibration": reliability_png(metrics),
        "Size and speed against quality": size_speed_png(metrics),
    }


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


def language_model_table(metrics: dict) -> str:
    columns = [
        ("perplexity", "perplexity", "{:.2f}"), ("cross_entropy", "cross-entropy", "{:.4f}"), ("kl_to_teacher", "KL from teacher", "{:.4f}"),
        ("agreement_top1", "top-1 agreement", "{:.1%}"), ("agreement_top5", "top-5 agreement", "{:.1%}"), ("ece", "ECE", "{:.3f}"),
        ("parameters", "parameters", "{:,}"), ("weight_bytes", "size on disk", None), ("tokens_per_s", "tokens/s", "{:,.0f}"),
        ("latency_ms", "latency (ms/batch)", "{:.1f}"),
    ]
    if "answer_f1" in metrics.get("student", {}):
        columns[3:3] = [("answer_exact_match", "greedy answers: exact match", "{:.1%}"), ("answer_f1", "greedy answers: word F1", "{:.3f}")]
    return metrics_table_html(metrics, columns, LABELS, not_for_teacher=("kl_to_teacher", "agreement_top1", "agreement_top5"))


def answers_html(examples: list[dict]) -> str:
    """Held-out prompts with the reference answer and what each model wrote (chat data)."""
    if not examples:
        return ""
    names = [name for name in LABELS if name in examples[0]["answers"]]
    header = "".join(f"<th>{LABELS[name]}</th>" for name in names)
    rows = "".join(
        f"<tr><td><pre>{html.escape(example['prompt'])}</pre></td><td>{html.escape(example['reference'])}</td>"
        + "".join(f"<td>{html.escape(example['answers'][name])}</td>" for name in names)
        + "</tr>"
        for example in examples
    )
    return f"<h2>Greedy answers to held-out prompts</h2><table><tr><th>prompt</th><th>reference</th>{header}</tr>{rows}</table>"


# ------------------------------------------------------------------------------------ plots
def quality_png(metrics: dict) -> bytes:
    plt = pyplot()
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
    return figure_png(figure)


def reliability_png(metrics: dict) -> bytes:
    plt = pyplot()
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
    return figure_png(figure)
