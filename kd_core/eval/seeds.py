"""Seeds, not anecdotes: one job's held-out metrics over several training seeds (`kdflow seeds`).

A small model trained from random weights lands somewhere different with every seed; a
comparison made on one seed can be noise. `kdflow seeds CONFIG --seeds N` trains the student and
the baseline N times (`distill.train.seed`, +1, ..., each seed the initial weights and the batch
order of both), on one prep, teacher and cache, and evaluates each. This module turns the N eval
manifests into one summary: per model and metric, every seed's value, the mean, the sample
standard deviation, the minimum and the maximum (a metric that is missing or not finite on any
seed is left out); and how many seeds passed all the gates.
The CLI prints it as a table; it is written to `seeds/<job name>-<digest of the eval keys>.json`
in the store (same seeds, same file).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics

from kd_core.manifest import Manifest
from kd_core.storage import FileRecord, Store

SEEDS_FOLDER = "seeds"


def seeds_summary(seeds: list[int], evaluations: list[Manifest], metric_names: tuple[str, ...]) -> dict:
    """The summary of one eval manifest per seed (same order as `seeds`)."""
    if len(seeds) != len(evaluations) or not seeds:
        raise ValueError(f"need one eval manifest per seed, got {len(evaluations)} for {len(seeds)} seeds")
    first = evaluations[0].metrics
    models = [name for name, values in first.items() if isinstance(values, dict) and name != "uniform" and "parameters" in values]
    summary: dict = {
        "seeds": list(seeds),
        "split": first.get("split"),
        "eval_keys": [manifest.key for manifest in evaluations],
        "models": {},
        "gates_passed": sum(all(gate["passed"] for gate in manifest.metrics.get("gates", [])) for manifest in evaluations),
    }
    for model in models:
        per_metric = {}
        for metric in metric_names:
            values = [manifest.metrics.get(model, {}).get(metric) for manifest in evaluations]
            if all(isinstance(value, (int, float)) and math.isfinite(value) for value in values):
                per_metric[metric] = spread(values)
        summary["models"][model] = per_metric
    return summary


def spread(values: list[float]) -> dict:
    """Every value, and their mean, sample standard deviation (0 for one value), minimum and maximum."""
    return {
        "values": [float(value) for value in values],
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": float(min(values)),
        "max": float(max(values)),
    }


def write_seeds_summary(store: Store, job_name: str, summary: dict) -> FileRecord:
    """The summary as JSON in the store (atomic), named by the job and its eval keys."""
    digest = hashlib.sha256("/".join(summary["eval_keys"]).encode()).hexdigest()[:12]
    return store.write_bytes(f"{SEEDS_FOLDER}/{job_name}-{digest}.json", json.dumps(summary, indent=2).encode())
