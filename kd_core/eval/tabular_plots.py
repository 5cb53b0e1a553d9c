"""The tabular report's figure: a reliability diagram (calibration) of every model."""

from __future__ import annotations

from kd_core.eval.figures import figure_png


def reliability_png(calibration: dict[str, dict | None], labels: dict[str, str]) -> bytes:
    """Top-label confidence against accuracy per bin (`tabular_metrics.calibration_bins`), one line per
    model, the diagonal a perfectly calibrated model; a point's size grows with its bin's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    for name, bins in calibration.items():
        if not bins:
            continue
        count = np.asarray(bins["count"], dtype=float)
        used = count > 0
        confidence, accuracy = np.asarray(bins["confidence"], dtype=float)[used], np.asarray(bins["accuracy"], dtype=float)[used]
        line = axis.plot(confidence, accuracy, marker="", linewidth=1.5, label=labels.get(name, name))[0]
        axis.scatter(confidence, accuracy, s=10 + 200 * count[used] / count.sum(), color=line.get_color(), alpha=0.7)
    axis.set_xlabel("confidence (top-class probability)")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_title("calibration on the held-out rows")
    axis.legend(loc="upper left", fontsize=8)
    return figure_png(figure)
