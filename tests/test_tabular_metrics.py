"""Metrics of tabular models (`kd_core/eval/tabular_metrics.py`) against scikit-learn.

On seeded random data every metric equals scikit-learn's to 1e-12 relative in float64, or, where
scikit-learn defines it differently (the Brier score of two classes, the AUC with a class absent from the
labels, the ECE), a direct reference written here: binary and multiclass probabilities, scores with many
ties for the AUC, and float32 inputs, which must give the float64 cast's exact numbers. Hand-worked cases
pin what scikit-learn does not have: a perfectly calibrated set (ECE 0), a miscalibrated one (ECE 0.404),
a confidence of exactly 1 in the last bin, log-loss clipping and renormalisation. Undefined metrics are NaN
(AUC with one class, R² of a constant target) and bad inputs raise ValueError naming the argument.
Run: .venv/bin/python -m pytest tests/test_tabular_metrics.py
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from sklearn import metrics as skm

from kd_core.eval import tabular_metrics as tm

N = 400


def close(value: float, reference: float) -> bool:
    """A Python float within 1e-12 relative of `reference`."""
    return type(value) is float and value == pytest.approx(float(reference), rel=1e-12, abs=0.0)


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[labels]


def reference_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label ECE by a loop over bins, bin b holding b/bins ≤ confidence < (b+1)/bins (the last one closed)."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    total = 0.0
    for b in range(bins):
        upper = confidence <= 1.0 if b == bins - 1 else confidence < (b + 1) / bins
        rows = (confidence >= b / bins) & upper
        if rows.any():
            total += rows.sum() / len(labels) * abs(correct[rows].mean() - confidence[rows].mean())
    return total


def random_classification(seed: int, classes: int, label_classes: list[int] | None = None):
    """Dirichlet probabilities (N, classes) and labels drawn from `label_classes` (default: every class)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(classes), size=N)
    labels = rng.choice(label_classes if label_classes is not None else classes, size=N)
    return probs, labels


def test_binary_matches_sklearn():
    probs, labels = random_classification(seed=0, classes=2)
    assert close(tm.accuracy(probs, labels), skm.accuracy_score(labels, probs.argmax(axis=1)))
    assert close(tm.log_loss(probs, labels), skm.log_loss(labels, probs, labels=[0, 1]))
    assert close(tm.roc_auc(probs, labels), skm.roc_auc_score(labels, probs[:, 1]))
    assert tm.roc_auc(np.array([[0.9, 0.8], [0.1, 0.2]]), np.array([1, 0])) == 1.0  # column 1 only, not one-vs-rest
    # scikit-learn's binary Brier score scores the positive class only: half of the sum over both classes.
    assert close(tm.brier_score(probs, labels), 2 * skm.brier_score_loss(labels, probs[:, 1]))
    assert close(tm.expected_calibration_error(probs, labels, bins=10), reference_ece(probs, labels, 10))


def test_auc_with_tied_scores_matches_sklearn():
    rng = np.random.default_rng(1)
    positive = rng.integers(0, 5, size=N) / 4  # five distinct scores: every rank is tied
    probs, labels = np.stack([1 - positive, positive], axis=1), rng.integers(0, 2, size=N)
    assert close(tm.roc_auc(probs, labels), skm.roc_auc_score(labels, positive))
    assert tm.roc_auc(np.full((4, 2), 0.5), np.array([0, 1, 0, 1])) == 0.5  # all tied: each pair counts ½
    tied = np.floor(random_classification(seed=2, classes=3)[0] * 4) / 4
    tied /= tied.sum(axis=1, keepdims=True)
    labels3 = np.random.default_rng(2).integers(0, 3, size=N)
    reference = skm.roc_auc_score(labels3, tied, multi_class="ovr", average="macro")
    assert close(tm.roc_auc(tied, labels3), reference)


def test_multiclass_matches_sklearn():
    probs, labels = random_classification(seed=3, classes=4)
    classes = [0, 1, 2, 3]
    assert close(tm.accuracy(probs, labels), skm.accuracy_score(labels, probs.argmax(axis=1)))
    assert close(tm.log_loss(probs, labels), skm.log_loss(labels, probs, labels=classes))
    assert close(tm.roc_auc(probs, labels), skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert close(tm.brier_score(probs, labels), skm.brier_score_loss(labels, probs, labels=classes))
    assert close(tm.expected_calibration_error(probs, labels), reference_ece(probs, labels, 15))


def test_multiclass_auc_skips_a_class_absent_from_labels():
    probs, labels = random_classification(seed=4, classes=4, label_classes=[0, 1, 3])
    per_class = [skm.roc_auc_score(labels == c, probs[:, c]) for c in (0, 1, 3)]
    assert close(tm.roc_auc(probs, labels), np.mean(per_class))
    assert close(tm.log_loss(probs, labels), skm.log_loss(labels, probs, labels=[0, 1, 2, 3]))
    assert close(tm.brier_score(probs, labels), np.mean(np.sum((probs - one_hot(labels, 4)) ** 2, axis=1)))


def test_float32_inputs_give_the_float64_casts_numbers():
    rng = np.random.default_rng(5)
    # Multiples of 1/1024 summing to 1: exact in float32, so the float64 cast is still a probability vector.
    counts = rng.multinomial(1024 - 3, np.ones(3) / 3, size=N) + 1
    probs32, labels = (counts / 1024).astype(np.float32), rng.integers(0, 3, size=N)
    probs = probs32.astype(np.float64)
    reference = {
        "accuracy": skm.accuracy_score(labels, probs.argmax(axis=1)),
        "log_loss": skm.log_loss(labels, probs, labels=[0, 1, 2]),
        "roc_auc": skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
        "brier": skm.brier_score_loss(labels, probs, labels=[0, 1, 2]),
        "ece": reference_ece(probs, labels, 15),
    }
    measured = tm.classification_metrics(probs32, labels)
    assert measured.keys() == reference.keys()
    assert all(close(measured[key], reference[key]) for key in reference), (measured, reference)

    pred32, target32 = rng.normal(size=N).astype(np.float32), rng.normal(size=N).astype(np.float32)
    pred, target = pred32.astype(np.float64), target32.astype(np.float64)
    measured = tm.regression_metrics(pred32, target32)
    assert close(measured["rmse"], math.sqrt(skm.mean_squared_error(target, pred)))
    assert close(measured["mae"], skm.mean_absolute_error(target, pred))
    assert close(measured["r2"], skm.r2_score(target, pred))


def test_regression_matches_sklearn():
    rng = np.random.default_rng(6)
    target = rng.normal(3.0, 2.0, size=N)
    pred = target + rng.normal(0.0, 0.7, size=N)
    assert tm.regression_metrics(pred, target).keys() == {"rmse", "mae", "r2"}
    assert close(tm.rmse(pred, target), math.sqrt(skm.mean_squared_error(target, pred)))
    assert close(tm.mae(pred, target), skm.mean_absolute_error(target, pred))
    assert close(tm.r2(pred, target), skm.r2_score(target, pred))


def test_agreement_is_the_share_of_equal_argmaxes():
    teacher, _ = random_classification(seed=7, classes=3)
    student = teacher + np.random.default_rng(7).normal(0.0, 0.2, size=teacher.shape)
    reference = skm.accuracy_score(teacher.argmax(axis=1), student.argmax(axis=1))
    assert 0.5 < reference < 1.0
    assert close(tm.agreement(student, teacher), reference)
    assert tm.agreement(teacher, teacher) == 1.0


def test_perfect_calibration_has_zero_ece():
    # (top-label confidence, rows, rows whose label is the top class): accuracy equals confidence in each bin.
    groups = [(0.55, 20, 11), (0.75, 8, 6), (0.9, 10, 9), (1.0, 4, 4)]
    probs = np.concatenate([np.tile([q, (1 - q) / 2, (1 - q) / 2], (rows, 1)) for q, rows, _ in groups])
    labels = np.concatenate([[0] * right + [1] * (rows - right) for _, rows, right in groups])
    calibration = tm.calibration_bins(probs, labels, bins=10)
    assert calibration["count"].tolist() == [0, 0, 0, 0, 0, 20, 0, 8, 0, 14]
    assert tm.expected_calibration_error(probs, labels, bins=10) < 1e-12


def test_known_miscalibration():
    probs = np.array([[0.95, 0.03, 0.02]] * 4 + [[0.25, 0.65, 0.10]] * 4 + [[0.42, 0.35, 0.23]] * 2)
    labels = np.array([0, 0, 1, 2] + [1, 1, 1, 1] + [1, 2])
    # Bins of 0.1: 0.95 (4 rows, half right, gap 0.45), 0.65 (4 rows, all right, gap 0.35), 0.42 (2 rows, none right,
    # gap 0.42). ECE = 0.4 · 0.45 + 0.4 · 0.35 + 0.2 · 0.42 = 0.404.
    assert close(tm.expected_calibration_error(probs, labels, bins=10), 0.404)
    calibration = tm.calibration_bins(probs, labels, bins=10)
    assert calibration["count"].tolist() == [0, 0, 0, 0, 2, 0, 4, 0, 0, 4]
    filled = calibration["count"] > 0
    np.testing.assert_allclose(calibration["confidence"][filled], [0.42, 0.65, 0.95], rtol=1e-12)
    np.testing.assert_array_equal(calibration["accuracy"][filled], [0.0, 1.0, 0.5])
    assert np.isnan(calibration["confidence"][~filled]).all() and np.isnan(calibration["accuracy"][~filled]).all()
    np.testing.assert_array_equal(calibration["edges"], np.arange(11) / 10)


def test_confidence_of_one_goes_in_the_last_bin():
    calibration = tm.calibration_bins(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]), bins=5)
    assert calibration["count"].tolist() == [0, 0, 0, 0, 2]
    assert calibration["confidence"][-1] == 1.0 and calibration["accuracy"][-1] == 0.5
    assert len(calibration["edges"]) == 6 and calibration["edges"][-1] == 1.0


def test_log_loss_clips_and_renormalises():
    assert close(tm.log_loss(np.array([[1.0, 0.0]]), np.array([1])), 15 * math.log(10))  # −log(1e-15), not inf
    assert close(tm.log_loss(np.array([[1.0, 0.0]]), np.array([1]), eps=1e-3), math.log(1000))
    assert close(tm.log_loss(np.array([[0.2, 0.6]]), np.array([0])), math.log(4))  # 0.2 / 0.8


def test_undefined_metrics_are_nan():
    probs, _ = random_classification(seed=8, classes=2)
    assert math.isnan(tm.roc_auc(probs, np.zeros(N, dtype=int)))
    assert math.isnan(tm.roc_auc(random_classification(seed=8, classes=3)[0], np.full(N, 2)))
    assert math.isnan(tm.classification_metrics(probs, np.ones(N, dtype=int))["roc_auc"])
    assert math.isnan(tm.r2(np.random.default_rng(8).normal(size=10), np.full(10, 3.0)))
    assert math.isnan(tm.r2(np.full(10, 3.0), np.full(10, 3.0)))


HALVES = np.full((2, 2), 0.5)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: tm.accuracy(np.ones((3, 2)), np.zeros(4, dtype=int)),
            "labels must have shape (3,) to match probs (3, 2), got (4,)",
        ),
        (lambda: tm.log_loss(np.ones(4), np.zeros(4, dtype=int)), "probs must be 2-D (n, C), got shape (4,)"),
        (lambda: tm.roc_auc(np.empty((0, 2)), np.empty(0, dtype=int)), "probs must have at least one row"),
        (lambda: tm.brier_score(HALVES, np.array([0, 2])), "labels must lie in 0..1 for probs of shape (2, 2), got 2"),
        (lambda: tm.accuracy(HALVES, np.array([-1, 0])), "labels must lie in 0..1 for probs of shape (2, 2), got -1"),
        (lambda: tm.accuracy(HALVES, np.array([0.0, 1.0])), "labels must be integer class indices, got dtype float64"),
        (lambda: tm.expected_calibration_error(HALVES, np.array([0, 1]), bins=0), "bins must be a positive integer"),
        (lambda: tm.agreement(np.ones((3, 2)), np.ones((3, 3))), "probs_a and probs_b must have the same shape"),
        (
            lambda: tm.rmse(np.zeros(3), np.zeros(4)),
            "pred and target must both have shape (n,), got pred (3,) and target (4,)",
        ),
        (lambda: tm.r2(np.zeros(0), np.zeros(0)), "pred and target must have at least one row, got pred (0,)"),
        (lambda: tm.mae(np.array([0.0, np.nan]), np.zeros(2)), "pred must be finite"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
