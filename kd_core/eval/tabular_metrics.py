"""Held-out metrics of tabular models: a scikit-learn teacher, a distilled MLP student, a baseline.

Classification takes `probs` (n, C), each row a model's class probabilities, and `labels` (n,), integer
class indices in 0..C−1; regression takes `pred` and `target` (n,). Inputs of any float dtype are cast
to float64 first, and all arithmetic is float64. Write ŷ_i = argmax_c p_ic (the first on ties),
q_i = max_c p_ic (the top-label confidence) and y_i for the label of row i. Definitions:
- `accuracy` = (1/n) Σ_i 1[ŷ_i = y_i];
- `log_loss` = −(1/n) Σ_i log p̃_{i,y_i}, with p̃ the probabilities clipped to [eps, 1 − eps] and each row
  then divided by its sum (scikit-learn's rule while it took `eps`; current versions clip at machine
  epsilon and do not renormalise, which differs only for rows that hit the clip or do not sum to 1);
- `roc_auc`, binary (C = 2): the AUC of the score s_i = p_i1 for the positives y_i = 1 by the
  Mann–Whitney statistic, AUC = (R₊ − n₊(n₊ + 1)/2) / (n₊ n₋), with R₊ the sum of the positives' ranks
  among all n scores, tied scores sharing the mean of their ranks (a tie counts ½); NaN when labels
  hold one class only. Multiclass (C ≠ 2): the unweighted mean of the one-vs-rest AUCs of the score
  p_ic for the positives y_i = c, over the classes c with both positives and negatives in `labels`;
  NaN when no class has both;
- `brier_score` = (1/n) Σ_i Σ_c (p_ic − 1[c = y_i])², in [0, 2] (for C = 2 this is twice scikit-learn's
  binary `brier_score_loss`, which scores the positive class only);
- `calibration_bins`: the top-label confidences q_i in `bins` equal-width bins with edges
  e_b = b / bins: bin b holds e_b ≤ q_i < e_{b+1}, and the last bin also holds q_i = 1. Per bin: `count`,
  `confidence` = mean q_i, `accuracy` = mean 1[ŷ_i = y_i]; NaN confidence and accuracy for an empty bin;
- `expected_calibration_error` (top-label ECE) = Σ_b (count_b / n) |accuracy_b − confidence_b| over the
  non-empty bins: 0 when, in every bin, the share of correct rows equals their mean confidence;
- `agreement` = (1/n) Σ_i 1[argmax_c a_ic = argmax_c b_ic] of two models' probabilities on the same rows:
  the fidelity of a student to its teacher;
- `rmse` = √((1/n) Σ_i (pred_i − target_i)²), `mae` = (1/n) Σ_i |pred_i − target_i|, and
  `r2` = 1 − SS_res / SS_tot with SS_res = Σ_i (target_i − pred_i)², SS_tot = Σ_i (target_i − mean(target))²;
  NaN when the target is constant (SS_tot = 0), where scikit-learn's default returns 0 or 1 instead.
Every function raises ValueError, naming the argument and the shapes, for arrays of the wrong rank or of
disagreeing lengths, for no rows, for non-finite values, and for labels that are not integers in 0..C−1.
Every metric is returned as a Python float.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BINS = 15
"""Equal-width confidence bins of the calibration metrics, as the language-model eval uses."""


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose most probable class in `probs` (n, C), the first on ties, is their label in `labels`."""
    probs, labels = _checked_classification(probs, labels)
    return float(np.mean(probs.argmax(axis=1) == labels))


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative natural log of each row's probability of its label, after clipping `probs` (n, C) to
    [eps, 1 − eps] and renormalising each row to sum 1, so that a confident mistake costs at most −log(eps)
    instead of infinity. `eps` must lie in (0, 0.5)."""
    probs, labels = _checked_classification(probs, labels)
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    clipped = np.clip(probs, eps, 1.0 - eps)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(clipped[np.arange(len(labels)), labels])))


def roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the Mann–Whitney rank statistic, ties counting one half. With two classes
    it is the AUC of `probs[:, 1]` for label 1 (NaN when `labels` hold one class only); otherwise the
    macro mean of the one-vs-rest AUCs of `probs[:, c]` for label c over the classes that have both
    positive and negative rows in `labels`, and NaN when no class has both."""
    probs, labels = _checked_classification(probs, labels)
    if probs.shape[1] == 2:
        return _binary_auc(probs[:, 1], labels == 1)
    aucs = [_binary_auc(probs[:, c], labels == c) for c in range(probs.shape[1])]
    defined = [auc for auc in aucs if not np.isnan(auc)]
    return float(np.mean(defined)) if defined else float("nan")


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over rows of the squared distance between the row's probabilities in `probs` (n, C) and the
    one-hot vector of its label: Σ_c (p_c − 1[c = label])², from 0 (certain and right) to 2 (certain and wrong)."""
    probs, labels = _checked_classification(probs, labels)
    one_hot = np.zeros_like(probs)
    one_hot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """The reliability diagram of the top-label confidence (the largest probability of each row of `probs`):
    float64 arrays `confidence` (mean confidence), `accuracy` (share of rows whose top class is the label)
    and int64 `count` for each of `bins` equal-width bins on [0, 1], and their `edges` (bins + 1). Bin b
    holds edges[b] ≤ confidence < edges[b + 1], the last bin also confidence 1 (and anything above 1, anything
    below 0 going to the first); empty bins have count 0 and NaN confidence and accuracy."""
    probs, labels = _checked_classification(probs, labels)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    edges = np.arange(bins + 1) / bins  # each edge b / bins correctly rounded
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    filled = count > 0
    mean_confidence = np.full(bins, np.nan)
    mean_accuracy = np.full(bins, np.nan)
    mean_confidence[filled] = np.bincount(which, weights=confidence, minlength=bins)[filled] / count[filled]
    mean_accuracy[filled] = np.bincount(which, weights=correct, minlength=bins)[filled] / count[filled]
    return {"confidence": mean_confidence, "accuracy": mean_accuracy, "count": count.astype(np.int64), "edges": edges}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE: Σ_b (count_b / n) · |accuracy_b − confidence_b| over the non-empty bins of
    `calibration_bins(probs, labels, bins)`, the mean gap between how often the top class is right and how
    confident the model was, in [0, 1]."""
    calibration = calibration_bins(probs, labels, bins)
    filled = calibration["count"] > 0
    share = calibration["count"][filled] / calibration["count"].sum()
    return float(np.sum(share * np.abs(calibration["accuracy"][filled] - calibration["confidence"][filled])))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error √(mean (pred − target)²) of the predictions `pred` (n,) against `target` (n,)."""
    pred, target = _checked_regression(pred, target)
    return float(np.sqrt(np.mean((pred - target) ** 2)))


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error mean |pred − target| of the predictions `pred` (n,) against `target` (n,)."""
    pred, target = _checked_regression(pred, target)
    return float(np.mean(np.abs(pred - target)))


def r2(pred: np.ndarray, target: np.ndarray) -> float:
    """Coefficient of determination 1 − SS_res / SS_tot of `pred` (n,) against `target` (n,): 1 for a perfect
    fit, 0 for predicting the target's mean, negative for worse; NaN when the target is constant (SS_tot = 0)."""
    pred, target = _checked_regression(pred, target)
    total = np.sum((target - target.mean()) ** 2)
    if total == 0.0:
        return float("nan")
    return float(1.0 - np.sum((target - pred) ** 2) / total)


def agreement(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """The share of rows on which two models' most probable classes (the first on ties) agree, from their
    probabilities `probs_a` and `probs_b` (n, C) on the same rows: a student's fidelity to its teacher."""
    probs_a = _checked_probs(probs_a, "probs_a")
    probs_b = _checked_probs(probs_b, "probs_b")
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"probs_a and probs_b must have the same shape, got {probs_a.shape} and {probs_b.shape}")
    return float(np.mean(probs_a.argmax(axis=1) == probs_b.argmax(axis=1)))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, float]:
    """All classification metrics of `probs` (n, C) against `labels` (n,): `accuracy`, `log_loss`,
    `roc_auc`, `brier` (the Brier score) and `ece` (top-label ECE over `bins` bins)."""
    return {
        "accuracy": accuracy(probs, labels),
        "log_loss": log_loss(probs, labels),
        "roc_auc": roc_auc(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels, bins),
    }


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """All regression metrics of `pred` (n,) against `target` (n,): `rmse`, `mae` and `r2`."""
    return {"rmse": rmse(pred, target), "mae": mae(pred, target), "r2": r2(pred, target)}


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann–Whitney AUC of `scores` (n,) for the rows where `positive` (n,) is true; NaN without both kinds."""
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    rank_sum = ranks[positive].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values` (n,), equal values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def _checked_probs(probs: np.ndarray, name: str) -> np.ndarray:
    """`probs` as a float64 (n, C) array with n, C ≥ 1 and finite values, or ValueError naming `name`."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, C), got shape {probs.shape}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one class, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError(f"{name} must be finite, got NaN or infinity in shape {probs.shape}")
    return probs


def _checked_classification(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`probs` as float64 (n, C) and `labels` as int64 (n,) in 0..C−1, or ValueError naming the culprit."""
    probs = _checked_probs(probs, "probs")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != probs.shape[0]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},) to match probs {probs.shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype} in shape {labels.shape}")
    outside = (labels < 0) | (labels >= probs.shape[1])
    if np.any(outside):
        raise ValueError(
            f"labels must lie in 0..{probs.shape[1] - 1} for probs of shape {probs.shape}, "
            f"got {labels[outside][0]} at index {int(np.flatnonzero(outside)[0])}"
        )
    return probs, labels.astype(np.int64)


def _checked_regression(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`pred` and `target` as float64 (n,) arrays with n ≥ 1 and finite values, or ValueError naming the culprit."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.ndim != 1 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both have shape (n,), got pred {pred.shape} and target {target.shape}")
    if len(pred) == 0:
        raise ValueError(f"pred and target must have at least one row, got pred {pred.shape} and target {target.shape}")
    for name, values in (("pred", pred), ("target", target)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be finite, got NaN or infinity in shape {values.shape}")
    return pred, target
