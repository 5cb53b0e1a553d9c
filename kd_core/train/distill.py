"""The distill stage, and the no-teacher baseline it is measured against.

- `distill`: the student learns from the training tokens and the teacher cache, with the
  `DistillationObjective` (cross-entropy + T²-scaled top-k KL) configured by `distill.loss`.
- `baseline`: the same student architecture, data, seed and optimiser, with cross-entropy alone.
  Its perplexity is what the student would reach without a teacher, so the evaluation can show
  what distillation bought.

Both train through `fit` (Ray Train workers, or this process) and write `model/` (a Hugging Face
directory with the tokenizer) and `history.jsonl` (the logged loss terms).
"""

from __future__ import annotations

from kd_core.config import ComputeConfig, DistillConfig, StudentConfig
from kd_core.manifest import Manifest
from kd_core.stage import StageRun
from kd_core.storage import Store
from kd_core.train.loop import TrainSpec
from kd_core.train.ray_glue import fit_stage


def distill(
    config: DistillConfig,
    student: StudentConfig,
    prep: Manifest,
    cache: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    force: bool = False,
) -> Manifest:
    section = {"student": student.model_dump(mode="json"), "loss": config.loss.model_dump(mode="json"), "train": config.train.model_dump(mode="json")}
    run = StageRun(store, "distill", section, inputs={"prep": prep, "cache": cache}, force=force)
    if run.reused:
        return run.reused
    cache_shards = [cache.output(name) for name in cache.details["shards"]]
    return _train_student(run, config, student, prep, store, compute, "distill: student", cache_shards)


def baseline(
    config: DistillConfig,
    student: StudentConfig,
    prep: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    force: bool = False,
) -> Manifest:
    section = {"student": student.model_dump(mode="json"), "train": config.train.model_dump(mode="json")}
    run = StageRun(store, "baseline", section, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    return _train_student(run, config, student, prep, store, compute, "distill: no-teacher baseline", [])


def _train_student(run, config, student, prep, store, compute, description, cache_shards) -> Manifest:
    spec = TrainSpec.from_prep(
        prep,
        store,
        run.folder,
        student.architecture,
        config.train,
        loss=config.loss if cache_shards else None,
        cache_shards=cache_shards,
    )
    return fit_stage(run, spec, compute, description)
