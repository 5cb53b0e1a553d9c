"""Runs the stages in order, in this process (the embedded default and `kdflow <stage>`).

    prep -> teacher -> cache -> distill (+ baseline) -> eval -> register

Asking for a stage runs everything it depends on first; stages whose manifest already exists
are reused, so `kdflow eval` after `kdflow distill` only evaluates. This module unpacks the job
config into the sections each stage function takes: the stage functions never see the whole
config, and nothing here knows about Kubeflow.
"""

from __future__ import annotations

from kd_core.config import JobConfig, public_dict
from kd_core.manifest import Manifest
from kd_core.progress import say
from kd_core.storage import Store

STAGES = ("prep", "cache", "distill", "eval", "register")
"""The CLI's stages, in order. `cache` includes the teacher step, `distill` the baseline."""

DEPENDS_ON = {
    "prep": (),
    "teacher": ("prep",),
    "cache": ("prep", "teacher"),
    "distill": ("prep", "teacher", "cache"),
    "baseline": ("prep",),
    "eval": ("prep", "teacher", "distill", "baseline"),
    "register": ("eval", "distill"),
}
"""Step -> the steps whose outputs it reads. Forcing a step also redoes everything downstream."""


def is_forced(step: str, force: frozenset[str]) -> bool:
    return "all" in force or step in force or any(is_forced(upstream, force) for upstream in DEPENDS_ON[step])


def run_pipeline(config: JobConfig, until: str = "register", force: frozenset[str] = frozenset()) -> dict[str, Manifest]:
    """Run every stage up to and including `until`; `force` names steps to redo ('all' for every one).

    Returns step name (prep, teacher, cache, distill, baseline, eval, register) -> its manifest.
    """
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    store = Store(config.storage)
    steps: dict[str, Manifest] = {}
    wanted = STAGES[: STAGES.index(until) + 1]

    from kd_core.data.prep import prep

    steps["prep"] = _announce(prep(config.data, store, force=is_forced("prep", force)))
    if "cache" in wanted:
        from kd_core.cache import cache
        from kd_core.train.teacher import teacher

        steps["teacher"] = _announce(teacher(config.teacher, steps["prep"], store, config.compute, force=is_forced("teacher", force)))
        if config.distill.teacher_source == "cache":
            steps["cache"] = _announce(
                cache(config.cache, steps["prep"], steps["teacher"], store, config.compute, force=is_forced("cache", force))
            )
    if "distill" in wanted:
        from kd_core.train.distill import baseline, distill
        from kd_core.train.tracking import TrainingRun

        targets = steps["cache"] if config.distill.teacher_source == "cache" else steps["teacher"]
        tracking = TrainingRun.for_job(config.registry, f"distill-{config.name}", public_dict(config))
        steps["distill"] = _announce(
            distill(
                config.distill, config.student, steps["prep"], targets, store, config.compute,
                tracking=tracking, force=is_forced("distill", force),
            )
        )
        if config.distill.baseline:
            steps["baseline"] = _announce(
                baseline(config.distill, config.student, steps["prep"], store, config.compute, force=is_forced("baseline", force))
            )
    if "eval" in wanted:
        from kd_core.eval import evaluate

        steps["eval"] = _announce(
            evaluate(
                config.eval, steps["prep"], steps["teacher"], steps["distill"], steps.get("baseline"), store,
                job_name=config.name, force=is_forced("eval", force),
            )
        )
    if "register" in wanted:
        from kd_core.registry import register

        steps["register"] = _announce(
            register(config.registry, steps["eval"], steps["distill"], store, public_dict(config), force=is_forced("register", force))
        )
    return steps


def _announce(manifest: Manifest) -> Manifest:
    state = "reused" if manifest.reused else f"done in {manifest.timings.get('total', 0):.1f}s"
    say(f"[green]✓[/green] {manifest.stage:<9} {manifest.key}  {state}")
    return manifest
