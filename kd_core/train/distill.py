"""The distill stage, and the no-teacher baseline it is measured against.

- `distill`: the student learns from the training tokens and the teacher, with the
  `DistillationObjective` (cross-entropy + T²-scaled KD) configured by `distill.loss`; a
  multimodal reward student (`task: reward`) learns from the cached teacher rewards with the
  `RewardObjective` of `distill.reward`. The
  teacher's targets come from the cache stage (`distill.teacher_source: cache`, the default:
  top-k, sampled or full, streamed with the tokens) or from running the teacher on every batch
  (`online`: full logits, no cache).
- `baseline`: the same student architecture, data, seed, optimiser and DeepSpeed settings, with
  cross-entropy alone (for reward models: Bradley–Terry on the human labels alone).
  Its perplexity is what the student would reach without a teacher, so the evaluation can show
  what distillation bought.

Both train through `fit` (Ray Train workers, or this process) and write `model/` (a Hugging Face
directory with the tokenizer) and `history.jsonl` (the logged loss terms).
"""

from __future__ import annotations

from kd_core.cache import cache_shards
from kd_core.config import ComputeConfig, DistillConfig, StudentConfig
from kd_core.manifest import Manifest
from kd_core.stage import StageRun
from kd_core.storage import Store
from kd_core.train.loop import TrainSpec
from kd_core.train.ray_glue import fit_stage
from kd_core.train.tracking import TrainingRun


def distill(
    config: DistillConfig,
    student: StudentConfig,
    prep: Manifest,
    targets: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    tracking: TrainingRun | None = None,
    force: bool = False,
) -> Manifest:
    """`targets` is the cache stage's manifest, or the teacher step's with `teacher_source: online`.
    With `tracking`, rank 0 logs the run to MLflow (not part of the step's key)."""
    expected = "cache" if config.teacher_source == "cache" else "teacher"
    if targets.stage != expected:
        raise ValueError(f"distill.teacher_source is {config.teacher_source}: distill needs the {expected} step's output, got {targets.stage}'s")
    reward = prep.details.get("task") == "reward"
    section = {
        "student": _student_section(student, reward),
        "loss": config.reward.model_dump(mode="json") if reward else config.loss.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"),
        "teacher_source": config.teacher_source,
        "deepspeed": config.deepspeed.model_dump(mode="json"),
    }
    run = StageRun(store, "distill", section, inputs={"prep": prep, expected: targets}, force=force)
    if run.reused:
        return run.reused
    if config.teacher_source == "online":
        return _train_student(
            run, config, student, prep, store, compute, "distill: student (online teacher)", force, online_teacher=targets, tracking=tracking
        )
    return _train_student(
        run, config, student, prep, store, compute, "distill: student", force,
        cache_shards=cache_shards(targets), cache_layout=targets.details["layout"], tracking=tracking,
    )


def baseline(
    config: DistillConfig,
    student: StudentConfig,
    prep: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    force: bool = False,
) -> Manifest:
    section = {
        "student": _student_section(student, prep.details.get("task") == "reward"),
        "train": config.train.model_dump(mode="json"),
        "deepspeed": config.deepspeed.model_dump(mode="json"),
    }
    run = StageRun(store, "baseline", section, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    return _train_student(run, config, student, prep, store, compute, "distill: no-teacher baseline", force, with_teacher=False)


def _student_section(student: StudentConfig, reward: bool) -> dict:
    """The student's settings that shape it: the image encoder only for a multimodal reward model."""
    return student.model_dump(mode="json", exclude=None if reward else {"vision"})


def _train_student(run, config, student, prep, store, compute, description, force, *, with_teacher=True, **teacher) -> Manifest:
    """Train into the step's folder, checkpointing every `distill.checkpoint_every` steps and
    resuming from the latest checkpoint unless forced or `distill.resume` is `never`."""
    deepspeed = config.deepspeed if config.deepspeed.enabled else None
    spec = TrainSpec.from_prep(
        prep, store, run.folder, student.architecture, config.train, deepspeed=deepspeed,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
        **student_objective(config, student, prep, with_teacher=with_teacher), **teacher,
    )
    return fit_stage(run, spec, compute, description, fresh=force or config.resume == "never")


def student_objective(config: DistillConfig, student: StudentConfig, prep: Manifest, *, with_teacher: bool = True) -> dict:
    """The `TrainSpec` fields of the student's objective for the prepared task: a language model's
    `distill.loss`, or a multimodal reward model's image encoder and `distill.reward`; without the
    teacher (the baseline), the task's loss on the data alone."""
    if prep.details.get("task") == "reward":
        return {"vision": student.vision, "reward_loss": config.reward if with_teacher else None}
    return {"loss": config.loss if with_teacher else None}
