"""One KFP v2 component per kdflow stage: prep, cache, tune, distill, eval, register.

Each is a lightweight component that runs in the kdflow image (infra/Dockerfile): its body
imports kdflow and calls `kd_core.kubeflow.steps.run_step`, the same stage functions as
`kdflow run`. What flows between them:

- `job`: the job config as JSON (secrets removed; they come from Kubernetes secrets as
  environment variables);
- manifest URLs (strings) naming each step's outputs on the job's storage; an empty string means
  that step did not run (no cache with an online teacher, no baseline);
- tune's `best_job`: the job with the best trial's values, which the steps after it take as their `job`;
- eval's typed artifacts: `metrics` (`dsl.Metrics`: every scalar per model and gates_passed)
  and `report` (`dsl.HTML`: the report page), and its return value, whether every gate passed.

The module imports only the standard library and kfp at the top; kdflow is imported inside each
component, where it runs.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output, OutputPath

IMAGE = "ghcr.io/kdflow/kdflow:0.1.0"
"""Default image; the pipeline sets each task's image from `kubeflow.image`."""


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prep(job: str) -> str:
    """Tokenize the raw data into packed, split token shards; returns the prep manifest URL."""
    from kd_core.kubeflow.steps import run_step

    return run_step("prep", job, {})["prep"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cache(job: str, prep_manifest: str) -> NamedTuple("CacheOutputs", [("teacher", str), ("cache", str)]):
    """Train or load the teacher, then cache its outputs; returns both manifest URLs."""
    from collections import namedtuple

    from kd_core.kubeflow.steps import run_step

    made = run_step("cache", job, {"prep": prep_manifest})
    return namedtuple("CacheOutputs", ["teacher", "cache"])(made["teacher"], made.get("cache", ""))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(
    job: str, prep_manifest: str, teacher_manifest: str, cache_manifest: str, results: Output[Metrics], report: Output[HTML]
) -> NamedTuple("TuneOutputs", [("tune", str), ("best_job", str)]):
    """Search `tune.space` (a KubeRay RayJob on a cluster, Ray in this pod otherwise); returns the
    tune manifest URL and the best job, with the search's metrics and its table and plot."""
    from collections import namedtuple
    from pathlib import Path

    from kd_core.kubeflow.steps import run_step, tune_outputs

    url = run_step("tune", job, {"prep": prep_manifest, "teacher": teacher_manifest, "cache": cache_manifest})["tune"]
    best_job, scalars, page = tune_outputs(job, url)
    for name, value in scalars.items():
        results.log_metric(name, value)
    Path(report.path).write_text(page)
    return namedtuple("TuneOutputs", ["tune", "best_job"])(url, best_job)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(job: str, prep_manifest: str, teacher_manifest: str, cache_manifest: str) -> NamedTuple(
    "DistillOutputs", [("student", str), ("baseline", str)]
):
    """Distill the student (a KubeRay RayJob on a cluster, Ray in this pod otherwise) and train
    the no-teacher baseline; returns both manifest URLs."""
    from collections import namedtuple

    from kd_core.kubeflow.steps import run_step

    made = run_step("distill", job, {"prep": prep_manifest, "teacher": teacher_manifest, "cache": cache_manifest})
    return namedtuple("DistillOutputs", ["student", "baseline"])(made["distill"], made.get("baseline", ""))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    job: str,
    prep_manifest: str,
    teacher_manifest: str,
    student_manifest: str,
    baseline_manifest: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    eval_manifest: OutputPath(str),
) -> bool:
    """Measure teacher, student and baseline on held-out data and apply the gates; returns
    whether every gate passed (the pipeline registers only then)."""
    from pathlib import Path

    from kd_core.kubeflow.steps import eval_metrics, run_step

    inputs = {"prep": prep_manifest, "teacher": teacher_manifest, "distill": student_manifest, "baseline": baseline_manifest}
    url = run_step("eval", job, inputs)["eval"]
    passed, scalars, html = eval_metrics(job, url)
    for name, value in scalars.items():
        metrics.log_metric(name, value)
    Path(report.path).write_text(html)
    Path(eval_manifest).write_text(url)
    return passed


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(job: str, eval_manifest: str, student_manifest: str) -> str:
    """Log the student to MLflow, register a version and move the aliases; returns the register
    manifest URL."""
    from kd_core.kubeflow.steps import run_step

    return run_step("register", job, {"eval": eval_manifest, "distill": student_manifest})["register"]
