"""The eval stage: teacher, student and baseline measured on the same held-out rows, then gated.

The job's task measures every model (`Task.measure`: quality, size and speed, and the uniform
predictor's reference numbers; `kd_core/eval` for a language model, `kd_core/eval/reward.py` for
a reward model). Then `eval.gates`, or with none the task's default sanity gates (beat the
uniform predictor, beat the baseline; `kd_core/gates.py`), are evaluated over these numbers, each
pass or fail with the two numbers it compared. Everything goes to `metrics.json` and the manifest
(`metrics["task"]` names the task); `training_curves.png` and `report.html` (the page a person
reads: verdict, gates, metrics and plots) are the task's figures.

The step holds a `StageLease`, so a second run of it waits and reuses this one's files instead of
rewriting them under a registered version.
"""

from __future__ import annotations

import json

import torch

from kd_core.config import EvalConfig
from kd_core.eval import device_name
from kd_core.eval.plots import read_history
from kd_core.gates import evaluate_gates
from kd_core.manifest import Manifest
from kd_core.stage import StageLease, StageRun, reused_manifest
from kd_core.storage import Store
from kd_core.tasks import task_of

CURVES_NAME = "training_curves.png"
REPORT_NAME = "report.html"


def evaluate(
    config: EvalConfig,
    prep: Manifest,
    teacher: Manifest,
    student: Manifest,
    baseline: Manifest | None,
    store: Store,
    *,
    job_name: str = "kdflow job",
    force: bool = False,
    lease: tuple[float, float] = (120.0, 300.0),
) -> Manifest:
    """`job_name` titles the report (not part of the step's key). `lease`: the lease's ttl and
    how long to wait for another run of the step (`compute.lease_ttl_s` / `lease_wait_s`)."""
    inputs = {"prep": prep, "teacher": teacher, "student": student, **({"baseline": baseline} if baseline else {})}
    run = StageRun(store, "eval", task_of(prep).eval_settings(config, prep.details), inputs=inputs, force=force)
    if run.reused:
        return run.reused
    with StageLease(store, "eval", run.folder, *lease) as held:
        if held.finished_elsewhere:
            return reused_manifest(run)
        return _measure_and_gate(run, config, prep, teacher, student, baseline, store, inputs, job_name)


def _measure_and_gate(run: StageRun, config: EvalConfig, prep, teacher, student, baseline, store: Store, inputs: dict, job_name: str) -> Manifest:
    task = task_of(prep)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    held_out, scores, extras = task.measure(config, prep, teacher, student, baseline, store, run, device)
    metrics: dict = {"task": task.name, "split": config.split, **held_out, "device": device_name(device)} | scores
    default_gates = list(task.sanity_gates if baseline is not None else task.sanity_gates[:1])
    gates = config.gates or (default_gates if config.sanity_gates else [])
    metrics["gates"] = evaluate_gates(gates, metrics)
    metrics["gates_default"] = not config.gates and bool(gates)
    metrics["gates_passed"] = all(gate["passed"] for gate in metrics["gates"])
    run.write_bytes("metrics.json", json.dumps(metrics, indent=2).encode())
    histories = {name: read_history(store, manifest) for name, manifest in inputs.items() if name != "prep"}
    run.write_bytes(CURVES_NAME, task.training_curves_png(histories, metrics))
    run.write_bytes(REPORT_NAME, task.report_html(job_name, metrics, histories, extras).encode())
    return run.finish(metrics=metrics)
