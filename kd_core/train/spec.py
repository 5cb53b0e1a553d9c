"""`TrainSpec`: everything a training worker needs, as plain picklable data.

The spec names the job's task (a `kd_core.tasks.Task` object, which travels with it to the Ray
workers) and the role it trains (`teacher`, or `student`: the distilled student and the
no-teacher baseline); the task builds the role's model and step from the spec. Nothing else in it
depends on the task: the objective is the task's section of `distill` (`objective`), the prep
manifest's details give the data's shape.

`student_spec` is the one function that builds a student's spec from the job's sections, for
the distill stage and for every trial of a search alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kd_core.cache import SYNTHETIC, cache_shards, synthetic_inputs
from kd_core.config import ArchitectureConfig, DeepSpeedConfig, DistillConfig, OnPolicyConfig, StorageConfig, StudentConfig, TrainConfig
from kd_core.data.shards import split_shards
from kd_core.manifest import Manifest
from kd_core.redaction import redact
from kd_core.storage import FileRecord, Store, absolute_url
from kd_core.train.tracking import TrainingRun

if TYPE_CHECKING:
    from kd_core.tasks import Task


@dataclass(frozen=True)
class StudentStart:
    """Where a student's weights start, as plain data each training worker acts on itself
    (`Task.build_model`): `config` (random weights from the architecture), `pretrained` (the folder
    at `path`, which must still have `weights_identity`; each worker fetches it) or `from_teacher`
    (the teacher step's model, `teacher`, cut to blocks `layers` and, when set, `hidden_size` /
    `intermediate_size` channels)."""

    init: str = "config"
    path: str | None = None
    field: str = "student.path"
    """The config field that names `path` (`teacher.path` for a teacher fine-tuned from it)."""
    weights_identity: str | None = None
    teacher: Manifest | None = None
    layers: tuple[int, ...] | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None

    def record(self) -> dict:
        """What the distill and baseline manifests record (`details["student_start"]`; a URL
        without the credentials it may carry)."""
        if self.init == "pretrained":
            return {"init": "pretrained", "path": redact(self.path), "weights_identity": self.weights_identity}
        if self.init == "from_teacher":
            return {
                "init": "from_teacher", "teacher_key": self.teacher.key, "layers": list(self.layers),
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            }
        return {"init": "config"}

    def inputs(self) -> dict[str, Manifest]:
        """The steps the start reads (a student cut from the teacher: the teacher step), for a step's key."""
        return {"teacher": self.teacher} if self.teacher is not None else {}


def student_start(student: StudentConfig, prep: Manifest, store: Store, teacher: Manifest | None, *, data_ids: bool = True) -> StudentStart:
    """Resolve `student.init` before any training: a pretrained folder is checked against the
    prepared data and identified (`kd_core.models.students.check_pretrained_student`); a cut from
    the teacher (the teacher step's manifest, `teacher`) is checked against its config.json and
    its blocks chosen. A pretrained student that reads the text with its own tokenizer (`data_ids`
    false: `Task.pretrained_reads_data_ids`) is not checked against the data's. Raises
    `StudentError` naming the field."""
    if student.init == "pretrained":
        from kd_core.models.students import check_pretrained_student

        identity = check_pretrained_student(student.path, store, prep, data_ids=data_ids)
        return StudentStart("pretrained", path=absolute_url(student.path), weights_identity=identity)  # workers run in other folders
    if student.init == "from_teacher":
        from kd_core.models.students import cut_settings
        from kd_core.models.teacher import teacher_model_config

        if teacher is None:
            raise ValueError("student.init is from_teacher: the student's step needs the teacher step's manifest")
        layers, hidden_size, intermediate_size = cut_settings(student.from_teacher, teacher_model_config(store, teacher))
        return StudentStart("from_teacher", teacher=teacher, layers=tuple(layers), hidden_size=hidden_size, intermediate_size=intermediate_size)
    return StudentStart()


@dataclass
class TrainSpec:
    """One model's training run (the storage section holds no logs)."""

    storage: StorageConfig
    task: Task
    """The job's `kd_core.tasks.Task`: it builds the model and the step, and reads the batches."""
    role: str
    """`teacher` (a teacher kdflow trains) or `student` (the distilled student, the baseline)."""
    architecture: ArchitectureConfig
    """The transformer body of the model (the teacher's, or a student's built from config; a
    student that starts elsewhere, `student_start`, takes its shape from there)."""
    train: TrainConfig
    prep_details: dict
    """The prep manifest's details: vocabulary, row length, special token ids, the task's own."""
    token_shards: list[FileRecord]
    tokenizer_folder: str
    """Store-relative folder of the model's tokenizer, copied beside the saved model: the prep
    stage's, or a student's own (`student_inputs`)."""
    output_folder: str
    """Store-relative folder that receives `model/` and `history.jsonl`."""
    prep_folder: str = ""
    """Store-relative folder of the prep step (its `tokenizer/` is the data's, the teacher's)."""
    student: StudentConfig | None = None
    """The student's section (the task reads its student-only parts, e.g. an image encoder);
    None for a teacher."""
    objective: Any = None
    """The task's objective section (`distill.loss`, `distill.reward`); None trains on the data
    alone (the teacher, the baseline)."""
    cache_shards: list[FileRecord] = field(default_factory=list)
    """Teacher-cache shards aligned one-to-one with `token_shards` (offline distillation); the
    stream decodes them into each batch (`kd_core.losses.targets.BATCH_KEYS`)."""
    cache_layout: dict | None = None
    """The cache's `CacheLayout.to_dict()`, which decodes `cache_shards`."""
    deepspeed: DeepSpeedConfig | None = None
    """Train in a DeepSpeed engine with these settings (the student); None trains with plain DDP."""
    tracking: TrainingRun | None = None
    """Log this run to MLflow from rank 0 (params, then metrics at every log step)."""
    on_policy: OnPolicyConfig | None = None
    """With `online_teacher`: the student answers the batches' prompts itself first
    (`distill.teacher_source: on_policy`; `kd_core.train.targets.OnPolicyTargets`)."""
    online_teacher: Manifest | None = None
    """The teacher step's manifest: the teacher runs on every batch (online distillation: full
    teacher logits, no cache). Each worker fetches it from storage itself, on whatever node."""
    checkpoint_every: int | None = None
    """Write a checkpoint every this many steps (None: never)."""
    keep_checkpoints: int = 2
    """Checkpoints kept while training."""
    validation_shards: list[FileRecord] = field(default_factory=list)
    """Shards of the validation split (read with `validate_every`)."""
    validation_cache_shards: list[FileRecord] = field(default_factory=list)
    """The cache's targets of the validation split, aligned with `validation_shards`, for tasks
    whose validation reads them (`Task.validation_reads_cache`)."""
    validate_every: int | None = None
    """Every this many steps (and at the last), every rank measures the student on the first
    `validation_rows` validation rows (`Task.validation_metrics`) and hands `{step, val_loss, ...}`
    (every validation metric) to `on_validation` (what a Ray Tune trial reports to its scheduler)."""
    validation_rows: int = 64
    student_start: StudentStart = StudentStart()
    """Where the student's weights start (`student.init`); a teacher always starts from config."""
    more_teachers: dict[str, Manifest] = field(default_factory=dict)
    """Several teachers (`teachers:`), online: each named teacher's step manifest besides
    `online_teacher` (named `teacher`)."""
    more_caches: dict[str, Manifest] = field(default_factory=dict)
    """Several teachers, from their caches: each named teacher's cache manifest besides `cache_shards`
    (the `teacher`'s); the stream decodes each shard's targets under `<name>:` keys."""
    route: dict[str, str] = field(default_factory=dict)
    """`distill.route`: a conversation's tag -> the teacher that teaches its tokens."""
    teacher_weights: dict[str, float] = field(default_factory=dict)
    """`distill.teacher_weights`: teacher -> its weight on every token."""
    student_inputs: dict[str, Manifest] = field(default_factory=dict)
    """The steps `Task.student_inputs` ran for a student (its own tokenizer, `student_tokenizer`,
    whose folder is then saved beside the model instead of prep's)."""

    @property
    def several_teachers(self) -> bool:
        return bool(self.route or self.teacher_weights)

    def online_teachers(self) -> dict[str, Manifest]:
        """Name -> step manifest of every teacher run online that teaches some token (`teacher`
        first; with `teacher_weights`, those weighted above 0), if any."""
        if self.online_teacher is None:
            return {}
        teachers = {"teacher": self.online_teacher, **self.more_teachers}
        return {name: manifest for name, manifest in teachers.items() if name in self.teacher_weights} if self.teacher_weights else teachers

    @property
    def vocab_size(self) -> int:
        return self.prep_details["vocab_size"]

    @property
    def seq_len(self) -> int:
        return self.prep_details["seq_len"]

    @property
    def special_token_ids(self) -> dict[str, int] | None:
        """The prepared tokenizer's bos / eos / pad ids."""
        return self.prep_details.get("special_token_ids")

    @property
    def checkpoint_folder(self) -> str:
        """Store-relative folder of this run's checkpoints (deleted once the model is saved)."""
        return f"{self.output_folder}/checkpoints"

    @classmethod
    def from_prep(
        cls, prep: Manifest, store: Store, output_folder: str, architecture: ArchitectureConfig, train: TrainConfig, *,
        task: Task, role: str = "student", student: StudentConfig | None = None, objective=None,
        deepspeed: DeepSpeedConfig | None = None, checkpoint_every: int | None = None, keep_checkpoints: int = 2,
        cache: Manifest | None = None, online_teacher: Manifest | None = None, tracking: TrainingRun | None = None,
        validate_every: int | None = None, validation_rows: int = 64, student_start: StudentStart = StudentStart(),
        on_policy: OnPolicyConfig | None = None, more_teachers: dict[str, Manifest] | None = None, route: dict[str, str] | None = None,
        teacher_weights: dict[str, float] | None = None, student_inputs: dict[str, Manifest] | None = None,
    ) -> TrainSpec:
        """A spec that trains on the prep stage's training split and writes into `output_folder`.
        `cache` (the cache stage's manifest) or `online_teacher` (the teacher step's) gives the
        teacher's targets; `validate_every` validates on the prep stage's validation split."""
        validating = validate_every is not None
        student_inputs = dict(student_inputs or {}) if role == "student" else {}
        own_tokenizer = student_inputs.get("student_tokenizer")
        return cls(
            storage=store.config, task=task, role=role, architecture=architecture, train=train, prep_details=prep.details,
            token_shards=split_shards(prep, "train") + (synthetic_inputs(cache) if cache else []), tokenizer_folder=f"{(own_tokenizer or prep).folder}/tokenizer", prep_folder=prep.folder, output_folder=output_folder,
            student=student, objective=objective, deepspeed=deepspeed, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, tracking=tracking, online_teacher=online_teacher,
            cache_shards=cache_shards(cache) + cache_shards(cache, SYNTHETIC) if cache else [], cache_layout=cache.details["layout"] if cache else None,
            validation_shards=split_shards(prep, "val") if validating else [],
            validation_cache_shards=cache_shards(cache, "val") if cache and validating and task.validation_reads_cache() else [],
            validate_every=validate_every, validation_rows=validation_rows, student_start=student_start, on_policy=on_policy,
            more_teachers=dict(more_teachers or {}) if online_teacher is not None else {},
            more_caches=dict(more_teachers or {}) if cache is not None else {},
            route=dict(route or {}), teacher_weights={name: weight for name, weight in (teacher_weights or {}).items() if weight > 0},
            student_inputs=student_inputs,
        )


def student_spec(
    task: Task, distill: DistillConfig, student: StudentConfig, prep: Manifest, store: Store, output_folder: str, *,
    targets: Manifest | None, train: TrainConfig | None = None, checkpoint_every: int | None = None,
    tracking: TrainingRun | None = None, validate_every: int | None = None, validation_rows: int = 64,
    start: StudentStart = StudentStart(), more_targets: dict[str, Manifest] | None = None, student_inputs: dict[str, Manifest] | None = None,
) -> TrainSpec:
    """The spec of a student of the job's task: the distilled student learning from `targets`
    (the cache stage's manifest, or the teacher step's for an online teacher), or with `targets`
    None the no-teacher baseline (the task's loss on the data alone), its weights starting at
    `start` (`student_start`). `more_targets`: the other named teachers' (`teachers:`) cache or
    teacher manifests, as `targets` is. `train` overrides `distill.train` (a search trial's step count)."""
    with_teacher = targets is not None
    return TrainSpec.from_prep(
        prep, store, output_folder, student.architecture, train or distill.train,
        task=task, role="student", student=student, objective=task.objective(distill) if with_teacher else None,
        deepspeed=distill.deepspeed if distill.deepspeed.enabled else None,
        checkpoint_every=checkpoint_every, keep_checkpoints=distill.keep_checkpoints, tracking=tracking,
        cache=targets if with_teacher and targets.stage == "cache" else None,
        online_teacher=targets if with_teacher and targets.stage == "teacher" else None,
        validate_every=validate_every, validation_rows=validation_rows, student_start=start,
        on_policy=distill.on_policy if with_teacher and distill.teacher_source == "on_policy" else None,
        more_teachers=more_targets if with_teacher else None, route=distill.route if with_teacher else None,
        teacher_weights=distill.teacher_weights if with_teacher else None, student_inputs=student_inputs,
    )
