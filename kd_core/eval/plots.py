"""The eval stage's picture: training curves beside held-out perplexity (reward models: pairwise
accuracy against the human labels), as one PNG."""

from __future__ import annotations

import io
import json

from kd_core.eval.figures import COLORS, LABELS, REWARD_LABELS
from kd_core.manifest import HISTORY_NAME, Manifest
from kd_core.storage import Store


def read_history(store: Store, training: Manifest) -> list[dict]:
    """The logged records of a training step (empty for a teacher kdflow did not train)."""
    if HISTORY_NAME not in training.outputs:
        return []
    text = store.read_bytes(training.output(HISTORY_NAME).path).decode()
    return [json.loads(line) for line in text.splitlines() if line]


def training_curves_png(histories: dict[str, list[dict]], metrics: dict) -> bytes:
    """Left: training cross-entropy per step. Right: held-out perplexity per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward = metrics.get("task") == "reward"
    labels = REWARD_LABELS if reward else LABELS
    term, term_label = ("loss", "training loss (per pair)") if reward else ("ce", "training cross-entropy (nats/token)")
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for name, history in histories.items():
        if history:
            curves.plot([r["step"] for r in history], [r[term] for r in history], label=labels[name], color=COLORS[name])
    curves.set(xlabel="optimizer step", ylabel=term_label, title="Training")
    curves.grid(alpha=0.3)
    curves.legend()
    key, key_label, form = ("pairwise_accuracy_human", "accuracy vs human labels", "{:.1%}") if reward else ("perplexity", "perplexity (lower is better)", "{:.1f}")
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
