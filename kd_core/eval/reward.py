"""The eval stage for reward models (`task: reward`): preference metrics on held-out pairs.

The teacher scores each pair's text view (image rendering + prompt + response); the student and
the baseline score the student view (the image itself + prompt + response). Per model:
- `pairwise_accuracy_teacher`: how often it prefers the response the teacher prefers (1 for the
  teacher itself);
- `pairwise_accuracy_human`: how often it prefers the response the human label prefers, over the
  labelled pairs (ties, label 0.5, left out); absent when the split has no labels;
- `spearman_teacher`: Spearman rank correlation of its rewards with the teacher's, over every
  response of the split;
- `preference_kl_to_teacher`: mean KL(Bern(σ(Δ_teacher)) ‖ Bern(σ(Δ_model))), Δ = r(chosen) −
  r(rejected): how far its preference probabilities are from the teacher's;
- `ece`: expected calibration error of its preference probability σ(Δ) against the human labels
  (confidence max(p, 1 − p) in 10 equal bins over [0.5, 1]), with the bins kept for the
  reliability diagram;
- `parameters`, `weight_bytes`, and `pairs_per_s` / `latency_ms`: scoring speed on this machine.
The rewards themselves go to `rewards.json` (the report's scatter plot).
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from kd_core.data.shards import read_columns, split_shards
from kd_core.losses.reward import preference_kl
from kd_core.manifest import Manifest
from kd_core.models import count_parameters, model_copy
from kd_core.models.reward import load_reward_model, text_rewards, trim_padding
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store

REWARDS_NAME = "rewards.json"
CALIBRATION_BINS = 10


def load_pairs(store: Store, prep: Manifest, split: str, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Every column of a split's pair shards, concatenated (at most `max_rows` pairs)."""
    return read_columns(store, split_shards(prep, split), max_rows)


def measure_reward_models(config, prep: Manifest, model_dirs: dict, store: Store, run: StageRun, device: str) -> tuple[dict, dict]:
    """(scores per model, rewards per model) on the held-out split."""
    pairs = load_pairs(store, prep, config.split, config.max_rows)
    pad_id = prep.details["pad_id"]
    models = {name: load_reward_model(folder).to(device) for name, folder in model_dirs.items()}
    rewards: dict[str, dict[str, np.ndarray]] = {}
    with run.timed("measure"), progress_bar("eval: score pairs", total=len(models)) as bar:
        for name, model in models.items():
            rewards[name] = score_pairs(model, pairs, config.batch_size, pad_id, device, text_view=name == "teacher")
            bar.advance()
    scores = {name: preference_scores(rewards[name], rewards["teacher"], pairs["human_label"][:, 0]) for name in models}
    with run.timed("speed"), progress_bar("eval: speed", total=len(models)) as bar:
        for name, model in models.items():
            scores[name] |= scoring_speed(model, pairs, config.batch_size, config.throughput_batches, pad_id, device, text_view=name == "teacher")
            scores[name]["parameters"] = count_parameters(model)
            scores[name]["weight_bytes"] = sum(f.stat().st_size for f in model_dirs[name].glob("*.safetensors"))
            bar.advance()
    return scores, {name: {side: values.tolist() for side, values in both.items()} for name, both in rewards.items()}


def reward_model_dirs(store: Store, teacher_dir, student: Manifest, baseline: Manifest | None) -> dict:
    dirs = {"teacher": teacher_dir, "student": model_copy(store, student)}
    if baseline is not None:
        dirs["baseline"] = model_copy(store, baseline)
    return dirs


@torch.no_grad()
def score_pairs(model, pairs: dict, batch_size: int, pad_id: int, device, *, text_view: bool) -> dict[str, np.ndarray]:
    """{"chosen": (N,), "rejected": (N,)} float32 rewards; the text view for a text reward model."""
    out: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    for start in range(0, len(pairs["pixels"]), batch_size):
        for side in out:
            out[side].append(_score(model, pairs, slice(start, start + batch_size), side, pad_id, device, text_view).cpu().numpy())
    return {side: np.concatenate(parts).astype(np.float32) for side, parts in out.items()}


def _score(model, pairs, rows: slice, side: str, pad_id: int, device, text_view: bool) -> torch.Tensor:
    ids = trim_padding(torch.as_tensor(pairs[f"{'text_' if text_view else ''}{side}_ids"][rows], dtype=torch.long, device=device), pad_id)
    if text_view:
        return text_rewards(model, ids, pad_id)
    return model(input_ids=ids, pixel_values=torch.as_tensor(pairs["pixels"][rows], device=device))


def agrees_with_teacher(margin: np.ndarray, teacher_margin: np.ndarray) -> np.ndarray:
    """Per pair: whether a model prefers the response the teacher prefers (a side is preferred
    when its margin r(chosen) − r(rejected) is > 0; a tie counts as preferring `rejected`)."""
    return (margin > 0) == (teacher_margin > 0)


def preference_scores(model: dict[str, np.ndarray], teacher: dict[str, np.ndarray], human_label: np.ndarray) -> dict:
    """The preference metrics of one model's rewards (see the module docstring)."""
    from scipy.stats import spearmanr

    margin = model["chosen"] - model["rejected"]
    teacher_margin = teacher["chosen"] - teacher["rejected"]
    labeled = np.isfinite(human_label) & (human_label != 0.5)
    all_rewards, all_teacher = np.concatenate([model["chosen"], model["rejected"]]), np.concatenate([teacher["chosen"], teacher["rejected"]])
    scores = {
        "pairs": int(len(margin)),
        "labeled_pairs": int(labeled.sum()),
        "pairwise_accuracy_teacher": float(np.mean(agrees_with_teacher(margin, teacher_margin))),
        "spearman_teacher": float(spearmanr(all_rewards, all_teacher).statistic) if np.ptp(all_rewards) > 0 else 0.0,
        "preference_kl_to_teacher": float(
            preference_kl(*(torch.from_numpy(v) for v in (model["chosen"], model["rejected"], teacher["chosen"], teacher["rejected"])))
        ),
        "mean_reward": float(all_rewards.mean()),
    }
    if labeled.any():
        human_prefers_chosen = human_label[labeled] > 0.5
        scores["pairwise_accuracy_human"] = float(np.mean((margin[labeled] > 0) == human_prefers_chosen))
        scores |= preference_calibration(margin[labeled], human_prefers_chosen)
    return scores


def uniform_preference_scores(teacher: dict[str, np.ndarray]) -> dict:
    """What a reward model that learned nothing scores (one reward for every response: each side
    of every pair equally likely): the reference of the default sanity gate."""
    tie = torch.zeros(len(teacher["chosen"]))
    kl = preference_kl(tie, tie, *(torch.from_numpy(np.ascontiguousarray(teacher[side], dtype=np.float32)) for side in ("chosen", "rejected")))
    return {"preference_kl_to_teacher": float(kl), "pairwise_accuracy_teacher": 0.5, "pairwise_accuracy_human": 0.5}


def preference_calibration(margin: np.ndarray, human_prefers_chosen: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """ECE of σ(margin) as P(chosen preferred) against the labels: confidence max(p, 1 − p) in
    `bins` equal bins over [0.5, 1], accuracy = how often the more likely side is the labelled one."""
    p = 1 / (1 + np.exp(-margin.astype(np.float64)))
    confidence = np.maximum(p, 1 - p)
    correct = (p > 0.5) == human_prefers_chosen
    which = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    filled = count > 0
    accuracy = np.where(filled, np.bincount(which, weights=correct.astype(float), minlength=bins) / np.maximum(count, 1), 0.0)
    mean_confidence = np.where(filled, np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1), 0.0)
    ece = float((count / len(margin) * np.abs(accuracy - mean_confidence)).sum())
    return {"ece": ece, "calibration": {"accuracy": accuracy.tolist(), "confidence": mean_confidence.tolist(), "count": count.astype(int).tolist(), "low": 0.5}}


@torch.no_grad()
def scoring_speed(model, pairs: dict, batch_size: int, batches: int, pad_id: int, device, *, text_view: bool) -> dict:
    """Pairs scored per second (both responses) and the median latency of one batch, after a warm-up."""
    rows = slice(0, batch_size)
    _score(model, pairs, rows, "chosen", pad_id, device, text_view)
    times = []
    for index in range(batches):
        start = (index * batch_size) % max(len(pairs["pixels"]) - batch_size + 1, 1)
        rows = slice(start, start + batch_size)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        for side in ("chosen", "rejected"):
            _score(model, pairs, rows, side, pad_id, device, text_view)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    pairs_in_batch = len(pairs["pixels"][rows])
    return {"pairs_per_s": pairs_in_batch * len(times) / sum(times), "latency_ms": 1000 * statistics.median(times), "latency_batch_rows": pairs_in_batch}


def write_rewards(run: StageRun, rewards: dict) -> None:
    run.write_bytes(REWARDS_NAME, json.dumps(rewards).encode())
