"""The eval stage's picture: training curves beside held-out perplexity (reward models: pairwise
accuracy against the human labels), as one PNG."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from kd_core.eval.figures import COLORS, LABELS, REWARD_LABELS
from kd_core.manifest import HISTORY_NAME, Manifest
from kd_core.storage import Store


def read_history(store: Store, training: Manifest) -> list[dict]:
    """The logged records of a training step (empty for a teacher kdflow did not train)."""
    if HISTORY_NAME not in training.outputs:
        return []
    text = store.read_bytes(training.output(HISTORY_NAME).path).decode()
    return [json.loads(line) for line in text.splitlines() if line]


@dataclass(frozen=True)
class CurvesSpec:
    """What a task's `training_curves.png` shows: which logged term per step, which held-out metric."""

    labels: dict[str, str]
    """Model (teacher, student, baseline) -> its name in the legend."""
    term: str
    """The logged loss term drawn per step (`history.jsonl`)."""
    term_label: str
    key: str
    """The held-out metric drawn per model."""
    key_label: str
    form: str
    """How a bar's value is printed."""


LANGUAGE_MODEL_CURVES = CurvesSpec(LABELS, "ce", "training cross-entropy (nats/token)", "perplexity", "perplexity (lower is better)", "{:.1f}")
REWARD_CURVES = CurvesSpec(REWARD_LABELS, "loss", "training loss (per pair)", "pairwise_accuracy_human", "accuracy vs human labels", "{:.1%}")


def training_curves_png(histories: dict[str, list[dict]], metrics: dict, spec: CurvesSpec) -> bytes:
    """Left: a training term per step (a language model's cross-entropy). Right: a held-out metric
    per model (its perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, term, term_label = spec.labels, spec.term, spec.term_label
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for name, history in histories.items():
        if history:
            curves.plot([r["step"] for r in history], [r[term] for r in history], label=labels[name], color=COLORS[name])
    curves.set(xlabel="optimizer step", ylabel=term_label, title="Training")
    curves.grid(alpha=0.3)
    curves.legend()
    key, key_label, form = spec.key, spec.key_label, spec.form
    names = [name for name in labels if name in metrics and key in metrics[name]]
    values = [metrics[name][key] for name in names]
    drawn = bars.bar([labels[n] for n in names], values, color=[COLORS[n] for n in names])
    bars.bar_label(drawn, labels=[form.format(v) for v in values])
    bars.set(ylabel=key_label, title=f"Held-out {metrics['split']} split")
    bars.tick_params(axis="x", labelrotation=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
