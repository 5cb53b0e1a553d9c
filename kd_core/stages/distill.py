"""The distill stage, and the no-teacher baseline it is measured against.

- `distill`: the student learns from the data and the teacher with the job's task's objective
  (`distill.loss` for a language model: cross-entropy + T²-scaled KD; `distill.reward` for a
  reward model). The teacher's targets come from the cache stage (`distill.teacher_source:
  cache`, the default) or from running the teacher on every batch (`online`: full logits, no
  cache).
- `baseline`: the same student, data, seed, optimiser and DeepSpeed settings, with the task's
  loss on the data alone (cross-entropy; Bradley–Terry on the human labels). What it reaches is
  what the student would reach without a teacher, so the evaluation can show what distillation
  bought.

Both start from the same weights (`student.init`, resolved by `kd_core.train.spec.student_start`
before training: random from config, a pretrained folder, or cut from the teacher step's model,
which is then an input of both steps), build their spec with `kd_core.train.spec.student_spec`
(as every search trial does), train through `fit_stage` (Ray Train workers, or this process) and
write `model/` (a Hugging Face directory with the tokenizer) and `history.jsonl` (the logged loss
terms). Their manifests record where the student started (`details["student_start"]`); a
pretrained folder's weights identity is in their keys, so a changed folder redoes both.
"""

from __future__ import annotations

from kd_core.config import ComputeConfig, DistillConfig, StudentConfig
from kd_core.manifest import Manifest
from kd_core.stage import StageRun
from kd_core.storage import Store
from kd_core.tasks import task_of
from kd_core.train.ray_glue import fit_stage
from kd_core.train.spec import StudentStart, student_spec, student_start
from kd_core.train.tracking import TrainingRun


def distill(
    config: DistillConfig,
    student: StudentConfig,
    prep: Manifest,
    targets: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    teacher: Manifest | None = None,
    tracking: TrainingRun | None = None,
    force: bool = False,
    more_targets: dict[str, Manifest] | None = None,
) -> Manifest:
    """`targets` is the cache stage's manifest, or the teacher step's with `teacher_source: online`;
    `teacher` the teacher step's (read by a student cut from it, `student.init: from_teacher`).
    `more_targets`: the named teachers' (`teachers:`), read the same way, routed or weighted as
    `config.route` / `config.teacher_weights` say. With `tracking`, rank 0 logs the run to MLflow
    (not part of the step's key)."""
    expected = "cache" if config.teacher_source == "cache" else "teacher"
    if targets.stage != expected:
        raise ValueError(f"distill.teacher_source is {config.teacher_source}: distill needs the {expected} step's output, got {targets.stage}'s")
    task = task_of(prep)
    start = student_start(student, prep, store, teacher or (targets if targets.stage == "teacher" else None), data_ids=task.pretrained_reads_data_ids)
    section = {
        "student": task.student_settings(student),
        **_start_settings(start),
        "loss": task.objective(config).model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"),
        "teacher_source": config.teacher_source,
        **({"on_policy": config.on_policy.key_settings()} if config.teacher_source == "on_policy" else {}),
        "deepspeed": config.deepspeed.model_dump(mode="json"),
        **({"route": config.route} if config.route else {}),
        **({"teacher_weights": config.teacher_weights} if config.teacher_weights else {}),
    }
    more_targets = more_targets or {}
    own = task.student_inputs(student, prep, store, force=force)
    inputs = {
        "prep": prep, **start.inputs(), **own, expected: targets, **{f"{expected}:{name}": manifest for name, manifest in more_targets.items()},
    }
    run = StageRun(store, "distill", section, inputs=inputs, force=force)
    if run.reused:
        return run.reused
    spec = student_spec(
        task, config, student, prep, store, run.folder, targets=targets, checkpoint_every=config.checkpoint_every, tracking=tracking,
        start=start, more_targets=more_targets, student_inputs=own,
    )
    description = "distill: student" + {"cache": "", "online": " (online teacher)", "on_policy": " (on-policy)"}[config.teacher_source]
    return fit_stage(run, spec, compute, description, fresh=force or config.resume == "never", details={"student_start": start.record()})


def baseline(
    config: DistillConfig,
    student: StudentConfig,
    prep: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    teacher: Manifest | None = None,
    force: bool = False,
) -> Manifest:
    """The student's start, data, seed and optimiser without teacher targets. `teacher`, the teacher
    step's manifest, is read only by a student cut from it (`student.init: from_teacher`): the
    baseline starts from the same weights as the distilled student."""
    task = task_of(prep)
    start = student_start(student, prep, store, teacher, data_ids=task.pretrained_reads_data_ids)
    section = {
        "student": task.student_settings(student),
        **_start_settings(start),
        "train": config.train.model_dump(mode="json"),
        "deepspeed": config.deepspeed.model_dump(mode="json"),
    }
    own = task.student_inputs(student, prep, store, force=force)
    run = StageRun(store, "baseline", section, inputs={"prep": prep, **start.inputs(), **own}, force=force)
    if run.reused:
        return run.reused
    spec = student_spec(
        task, config, student, prep, store, run.folder, targets=None, checkpoint_every=config.checkpoint_every, start=start, student_inputs=own,
    )
    return fit_stage(
        run, spec, compute, "distill: no-teacher baseline", fresh=force or config.resume == "never", details={"student_start": start.record()}
    )


def _start_settings(start: StudentStart) -> dict:
    """What the key needs beyond the student's settings: a pretrained folder's weights identity (a
    cut's teacher is an input step, and a config student's settings say it all)."""
    return {"student_weights": start.weights_identity} if start.weights_identity is not None else {}
