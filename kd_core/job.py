"""The job: one YAML file describes a whole distillation job (`JobConfig`), loaded and checked.

`load_config(path, overrides)` reads the YAML, applies dotted command-line overrides
(`distill.train.max_steps=50`) and validates everything before any work starts: every section
(`kd_core/config.py`), then the checks across sections, including the job's task's own
(`Task.check_config`, kd_core/tasks). Errors are raised as `ConfigError`, one line per problem,
each naming the field path and the bad value:

    distill.loss.temperature: must be > 0, got -1

Library functions take plain arguments or one config *section*; only the CLI, the pipeline
runner, the stages that need several sections (tune) and the Kubeflow steps see the whole job.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kd_core.config import (
    CHAT_SOURCES,
    CacheConfig,
    ComputeConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    KubeflowConfig,
    OnPolicyConfig,
    RegistryConfig,
    Section,
    StorageConfig,
    StudentConfig,
    TeacherConfig,
    TuneConfig,
    public_dict,
    secret_fields,
)
from kd_core.gates import Gate, parse_metric
from kd_core.redaction import MASK
from kd_core.tasks import task_named

_TEACHER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_OBJECT_STORE_USERINFO = re.compile(r"^(s3a?|gs|gcs|az|abfs)://[^/@]*@", re.IGNORECASE)
"""`s3://KEY:SECRET@bucket/...`: object stores take no credentials in the URL (the client would
send `KEY:SECRET@bucket` as the bucket name, and name it in its error)."""


class JobConfig(Section):
    name: str = Field(default="kdflow-job", min_length=1)
    """Human-readable job name (shown in logs and MLflow)."""
    task: str = "causal_lm"
    """The kind of distillation (`kd_core.tasks.TASKS`). `causal_lm`: a language-model teacher and
    student over token shards. `reward`: a text reward model (the teacher, reading each image's
    text rendering) distilled into a multimodal reward model (the student, reading the image
    itself), over preference pairs."""

    storage: StorageConfig = StorageConfig()
    """Where every stage reads and writes (fsspec)."""
    data: DataConfig = DataConfig()
    """The prep stage: raw text to tokenizer and packed token shards."""
    teacher: TeacherConfig = TeacherConfig()
    """The teacher: an existing model directory, or one kdflow trains."""
    teachers: dict[str, TeacherConfig] = {}
    """More teachers, by name, each set up like `teacher` (a folder, or trained here on the same
    data and tokenizer), for distillation from several (`distill.route`, `distill.teacher_weights`).
    `teacher` is still the one eval measures and a student may be cut from."""
    student: StudentConfig = StudentConfig()
    """The student: its architecture, or where its weights start (`student.init`)."""
    cache: CacheConfig = CacheConfig()
    """The cache stage: teacher outputs computed once, read by every distillation."""
    distill: DistillConfig = DistillConfig()
    """The distill stage: objective and optimisation."""
    eval: EvalConfig = EvalConfig()
    """The eval stage: held-out measurements of teacher, student and baseline."""
    registry: RegistryConfig = RegistryConfig()
    """The register stage: MLflow tracking and model registry."""
    compute: ComputeConfig = ComputeConfig()
    """Where the heavy steps run: Ray (local or a cluster) or this process."""
    tune: TuneConfig = TuneConfig()
    """`kdflow tune`: hyperparameter search over distillation settings."""
    kubeflow: KubeflowConfig = KubeflowConfig()
    """Kubeflow Pipelines and KubeRay settings (used only when the job runs as a KFP DAG)."""

    @field_validator("task")
    @classmethod
    def _known_task(cls, name: str) -> str:
        task_named(name)  # a ValueError naming the known tasks
        return name

    @model_validator(mode="after")
    def _cross_section_checks(self) -> JobConfig:
        if self.data.source in ("files", "chat") and not self.data.files:
            raise ValueError(f"data.files: must list at least one file when data.source is '{self.data.source}'")
        urls = [("storage.root", self.storage.root), *((f"data.files[{i}]", url) for i, url in enumerate(self.data.files or [])),
                ("data.tokenizer", self.data.tokenizer), ("teacher.path", self.teacher.path), ("student.path", self.student.path)]
        for field_path, url in urls:
            if url and _OBJECT_STORE_USERINFO.match(url):
                raise ValueError(
                    f"{field_path}: an object-store URL cannot carry credentials ({url}); give them through "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a Kubernetes secret), or storage.s3"
                )
        if self.teacher.finetune and not self.teacher.path:
            raise ValueError("teacher.finetune: fine-tunes the model at teacher.path, which is not set; set it, or finetune: false to train one from teacher.architecture")
        if self.teacher.path and not self.data.tokenizer:
            self.data.tokenizer = self.teacher.path  # an existing teacher reads its own tokenizer's ids
        workers = self.compute.num_workers
        for field_path, train in (("teacher.train", self.teacher.train), ("distill.train", self.distill.train)):
            if train.batch_size % workers:
                raise ValueError(
                    f"{field_path}.batch_size: must be a multiple of compute.num_workers ({workers}), got {train.batch_size}"
                )
        accumulation = self.distill.deepspeed.gradient_accumulation_steps if self.distill.deepspeed.enabled else 1
        if self.distill.train.batch_size % (workers * accumulation):
            raise ValueError(
                f"distill.train.batch_size: must be a multiple of compute.num_workers × distill.deepspeed.gradient_accumulation_steps "
                f"({workers} × {accumulation}), got {self.distill.train.batch_size}"
            )
        self._check_student()
        self._check_task()
        self._check_baseline_metrics()
        self._check_tune_space()
        self._check_on_policy_actors()
        self._check_teachers()
        return self

    def _check_teachers(self) -> None:
        """Named teachers are used, and used one way: routed, or weighted with weights summing to 1."""
        distill, names = self.distill, {"teacher", *self.teachers}
        for name in self.teachers:
            if name == "teacher" or not _TEACHER_NAME.match(name):
                raise ValueError(f"teachers.{name}: a teacher's name is a letter, then letters, digits, _ or -, and not 'teacher' (the main one)")
        if distill.route and distill.teacher_weights:
            raise ValueError("distill.route and distill.teacher_weights: each token is taught by its routed teacher or by all of them weighted; set one")
        for tag, name in distill.route.items():
            if name not in names:
                raise ValueError(f"distill.route.{tag}: {name!r} is not a teacher; name 'teacher' or one of teachers ({', '.join(self.teachers) or 'none'})")
        for name, weight in distill.teacher_weights.items():
            if name not in names:
                raise ValueError(f"distill.teacher_weights.{name}: not a teacher; name 'teacher' or one of teachers ({', '.join(self.teachers) or 'none'})")
            if weight < 0:
                raise ValueError(f"distill.teacher_weights.{name}: a weight is at least 0, got {weight}")
        if distill.teacher_weights and abs(sum(distill.teacher_weights.values()) - 1) > 1e-6:
            raise ValueError(
                f"distill.teacher_weights: the weights sum to {sum(distill.teacher_weights.values()):g}; they must sum to 1 "
                f"(e.g. {', '.join(f'{name}: {1 / len(distill.teacher_weights):.3g}' for name in distill.teacher_weights)})"
            )
        used = set(distill.route.values()) | {name for name, weight in distill.teacher_weights.items() if weight > 0}
        for name in self.teachers:
            if name not in used:
                raise ValueError(f"teachers.{name}: no token is taught by it; name it in distill.route or distill.teacher_weights, or remove it")
        if self.teachers or distill.route or distill.teacher_weights:
            task_named(self.task).check_teachers(self)

    def _check_on_policy_actors(self) -> None:
        """Generation and teacher actors are Ray actors: they need the `ray` backend."""
        on_policy = self.distill.on_policy
        if self.distill.teacher_source != "on_policy" or self.compute.backend == "ray":
            return
        for name in ("generation_actors", "teacher_actors"):
            if getattr(on_policy, name):
                raise ValueError(
                    f"distill.on_policy.{name}: actors run on Ray, and compute.backend is local; set compute.backend: ray, "
                    f"or {name}: 0 to run in the training process"
                )

    def _check_student(self) -> None:
        """`student.path` is given exactly when the student starts from it."""
        student = self.student
        if student.init == "pretrained" and not student.path:
            raise ValueError("student.path: student.init is pretrained: set it to the URL of a Hugging Face causal-LM folder (safetensors)")
        if student.path and student.init != "pretrained":
            raise ValueError(
                f"student.path: it is read only with student.init: pretrained (init is {student.init}); set student.init: "
                "pretrained, or drop student.path"
            )

    def _check_baseline_metrics(self) -> None:
        """A gate or primary metric that reads `baseline.*` needs the baseline to be trained, and one
        that reads `start.*` a student that does not start from random weights; without them the
        eval stage would fail after training, so refuse it here."""
        answered = self.data.source in CHAT_SOURCES and self.data.chat.train_on == "assistant" and self.eval.answer_prompts > 0
        named = [(f"eval.gates[{index}]: {text!r}", Gate.parse(text).metric_names()) for index, text in enumerate(self.eval.gates)]
        named.append((f"registry.primary_metric: {self.registry.primary_metric!r}", [parse_metric(self.registry.primary_metric)]))
        for where, metrics in named:
            if not answered and any(metric.startswith("answer_") for _, metric in metrics):
                raise ValueError(
                    f"{where} reads the greedy answers' scores, which are measured only on chat data (data.source chat, "
                    "python-qa or exact-answers) with data.chat.train_on: assistant and eval.answer_prompts > 0"
                )
        if self.student.init == "config":
            for index, text in enumerate(self.eval.gates):
                if any(model == "start" for model, _ in Gate.parse(text).metric_names()):
                    raise ValueError(
                        f"eval.gates[{index}]: {text!r} reads the student before distillation (start), which is measured only "
                        "for student.init: pretrained or from_teacher; drop the gate or set student.init"
                    )
        if self.distill.baseline:
            return
        advice = "set distill.baseline: true or drop"
        for index, text in enumerate(self.eval.gates):
            if any(model == "baseline" for model, _ in Gate.parse(text).metric_names()):
                raise ValueError(f"eval.gates[{index}]: {text!r} reads the baseline, but distill.baseline is false; {advice} the gate")
        if parse_metric(self.registry.primary_metric)[0] == "baseline":
            raise ValueError(
                f"registry.primary_metric: {self.registry.primary_metric!r} reads the baseline, but distill.baseline is false; "
                f"{advice} it (e.g. student.perplexity)"
            )

    def _check_task(self) -> None:
        """The task's own cross-section checks (`Task.check_config`), then the metrics the gates and
        the primary metric name: the task's."""
        task = task_named(self.task)
        task.check_config(self)
        known = task.metrics
        for index, text in enumerate(self.eval.gates):
            for _, metric in Gate.parse(text).metric_names():
                if metric not in known:
                    raise ValueError(f"eval.gates[{index}]: {metric!r} is not a {self.task} metric; use one of {', '.join(known)}")
        primary = self.registry.primary_metric.rsplit(".", 1)[-1]
        if primary not in known:
            raise ValueError(f"registry.primary_metric: {primary!r} is not a {self.task} metric; use one of {', '.join(known)}")

    def _check_tune_space(self) -> None:
        """Every searched field exists, may be searched, and takes each bound of its range."""
        accumulation = self.distill.deepspeed.gradient_accumulation_steps if self.distill.deepspeed.enabled else 1
        trial_workers = self.tune.workers_per_trial
        if trial_workers and self.distill.train.batch_size % (trial_workers * accumulation):
            raise ValueError(
                f"tune.workers_per_trial: distill.train.batch_size ({self.distill.train.batch_size}) must be a multiple of "
                f"tune.workers_per_trial × distill.deepspeed.gradient_accumulation_steps ({trial_workers} × {accumulation})"
            )
        tunable = task_named(self.task).tunable_prefixes + (("distill.on_policy.",) if self.distill.teacher_source == "on_policy" else ())
        for dotted, dimension in self.tune.space.items():
            if dotted.startswith("student.architecture.") and self.student.init != "config":
                raise ValueError(
                    f"tune.space.{dotted}: the student starts from {'student.path' if self.student.init == 'pretrained' else 'the teacher'} "
                    f"(student.init: {self.student.init}), so student.architecture does not shape it; search student.from_teacher "
                    "fields or the training settings instead"
                )
            if dotted.removeprefix("distill.on_policy.") in OnPolicyConfig.PLACEMENT:
                raise ValueError(f"tune.space.{dotted}: where the answers are written is not searched (every trial shares the search's actors); set it for the job")
            if not dotted.startswith(tunable):
                raise ValueError(
                    f"tune.space.{dotted}: only fields under {', '.join(p.rstrip('.') for p in tunable)} can be searched "
                    f"for task {self.task} "
                    "(data, teacher and cache outputs are shared by every trial)"
                )
            for value in dimension.extremes():
                raw = public_dict(self)
                raw["tune"]["space"] = {}
                set_dotted(raw, dotted, value)
                try:
                    JobConfig.model_validate(raw)
                except ValidationError as err:
                    problems = "; ".join(_describe_error(error) for error in err.errors())
                    raise ValueError(f"tune.space.{dotted}: the value {value!r} makes the job invalid: {problems}") from None


# ------------------------------------------------------------------------------ loading, errors
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job file, apply `a.b.c=value` overrides and validate the result."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error(error) for error in err.errors()]
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


SEARCH_SPACE = "tune.space."
"""The keys of `tune.space` are dotted field names themselves: an override under it names one whole."""


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.field=value` in the raw mapping; the value is parsed as YAML (`1e-3`, `true`).
    Under `tune.space` the rest is one searched field: `tune.space.distill.loss.kd_weight={kind:
    uniform, low: 0.2, high: 0.9}`."""
    dotted, sep, value_text = override.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError(f"override {override!r}: expected the form section.field=value")
    value = yaml.safe_load(value_text) if value_text.strip() else None
    if dotted.startswith(SEARCH_SPACE) and len(dotted) > len(SEARCH_SPACE):
        space = raw.setdefault("tune", {}).setdefault("space", {})
        if not isinstance(space, dict):
            raise ConfigError(f"override {override!r}: tune.space is not a section")
        space[dotted[len(SEARCH_SPACE):]] = value
        return
    set_dotted(raw, dotted, value, f"override {override!r}")


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str = "") -> None:
    """raw[a][b][c] = value for `a.b.c`, creating sections on the way."""
    keys = dotted.split(".")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source or dotted}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "must match {pattern}",
}


def _describe_error(error: dict[str, Any]) -> str:
    field_path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{field_path}: unknown field{_suggestion(error['loc'])}"
    if error["type"] == "value_error":  # our own validators already name the field
        message = str(error["ctx"]["error"])
        return message if not field_path else f"{field_path}: {message}"
    template = _MESSAGES.get(error["type"])
    bounds = {name: value if name == "expected" else _show(value) for name, value in error.get("ctx", {}).items()}
    message = template.format(**bounds) if template else error["msg"][0].lower() + error["msg"][1:]
    shown = f"{MASK} (a secret: its value is not shown)" if _is_secret(error["loc"]) else _show(error.get("input"))
    return f"{field_path}: {message}, got {shown}"


def _is_secret(location: tuple[Any, ...]) -> bool:
    """Whether a field path (as pydantic reports it) lies in a `SecretStr` field of the job."""
    secrets: Any = secret_fields(JobConfig())
    for part in location:
        if not isinstance(secrets, dict) or str(part) not in secrets:
            return False
        secrets = secrets[str(part)]
        if secrets is True:
            return True
    return False


def _suggestion(location: tuple[Any, ...]) -> str:
    """', did you mean X?' for a misspelt key, looked up on the section that holds it."""
    model: type[BaseModel] = JobConfig
    for part in location[:-1]:
        annotation = model.model_fields.get(str(part))
        if annotation is None or not isinstance(annotation.annotation, type):
            return ""
        model = annotation.annotation
    close = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(model.model_fields)}"


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value)[:80]
    return repr(value) if isinstance(value, str) else str(value)
