"""The `Task` protocol: what a kind of distillation tells the stages, the engine and the CLI.

Methods are grouped by the stage that calls them, in pipeline order. Roles are `teacher` (a
model kdflow trains as the teacher) and `student` (the distilled student, and the no-teacher
baseline: a student trained without teacher targets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch
    from rich.table import Table

    from kd_core.cache.format import CacheLayout
    from kd_core.config import CacheConfig, ComputeConfig, DataConfig, DistillConfig, EvalConfig, StudentConfig, TeacherConfig
    from kd_core.data.sources import FileSource
    from kd_core.job import JobConfig
    from kd_core.manifest import Manifest
    from kd_core.stage import StageRun
    from kd_core.storage import FileRecord, Store
    from kd_core.train.spec import TrainSpec


class Task:
    """Base of every task: subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    """The value of `task:` in a job config."""
    data_sources: ClassVar[tuple[str, ...]]
    """The `data.source` values the task prepares."""
    metrics: ClassVar[tuple[str, ...]]
    """The eval metrics it measures per model: what gates and `registry.primary_metric` may name."""
    sanity_gates: ClassVar[tuple[str, str]]
    """The default gates: [0] the student beats the uniform predictor, [1] it beats the baseline."""
    objective_field: ClassVar[str]
    """The `distill` field holding its objective (`loss`, `reward`): searchable, and in the key."""
    validation_modes: ClassVar[dict[str, str]]
    """The validation metrics a student reports (`validation_metrics`), each with its direction:
    `min` or `max` is better. `val_loss` comes first and is always there; `tune.metric` names one."""
    validation_label: ClassVar[str]
    """What a student's `val_loss` measures (its unit too), for plots and tables."""
    validation_labels: ClassVar[dict[str, str]] = {}
    """Short labels of the validation metrics besides `val_loss`, for plots (default: the name)."""
    pretrained_reads_data_ids: ClassVar[bool] = True
    """Whether a pretrained student (`student.init: pretrained`) reads the prepared token ids, so
    its folder must hold the data's tokenizer; false: it tokenizes the text with its own
    (`task: embedding`, whose losses live in embedding space)."""

    # ----------------------------------------------------------------------------- the job config
    def check_config(self, job: JobConfig) -> None:
        """Cross-section checks of a job with this task; raise ValueError naming the field."""
        self.check_source(job.data.source)
        if job.tune.metric not in self.validation_modes:
            raise ValueError(
                f"tune.metric: task {self.name} validates a student on {' or '.join(self.validation_modes)}, got {job.tune.metric!r}"
            )

    def check_teachers(self, job: JobConfig) -> None:
        """Checks of a job distilled from several teachers (`teachers`, `distill.route`,
        `distill.teacher_weights`); a task that has one teacher refuses them."""
        raise ValueError(f"teachers: task {self.name} distils from one teacher; remove teachers, distill.route and distill.teacher_weights")

    def check_source(self, source: str) -> None:
        """`data.source` must be one this task prepares."""
        if source not in self.data_sources:
            raise ValueError(f"data.source: task {self.name} reads {' or '.join(self.data_sources)}, got {source!r}")

    @property
    def tunable_prefixes(self) -> tuple[str, ...]:
        """What a search may vary: the task's objective, the optimisation and the student. Never
        data, teacher or cache settings, which every trial shares (computed once, before it)."""
        return (f"distill.{self.objective_field}.", "distill.train.", "student.")

    # ------------------------------------------------------------------------------------- prep
    def data_settings(self, data: DataConfig) -> dict[str, Any]:
        """The data settings that shape what prep writes (the prep key covers them)."""
        raise NotImplementedError

    def prepare(self, data: DataConfig, store: Store, run: StageRun, source: FileSource | None) -> tuple[dict, dict]:
        """Write the tokenizer and the split shards into `run`; return (metrics, details). Details
        hold at least `seq_len`, `vocab_size`, `special_token_ids` and `splits`."""
        raise NotImplementedError

    def separates_documents(self) -> bool:
        """Whether prep separates documents with the tokenizer's eos (so a loaded one needs one)."""
        return True

    # ----------------------------------------------------------------------------------- teacher
    def teacher_step(self, config: TeacherConfig, prep: Manifest, store: Store, compute: ComputeConfig, force: bool) -> Manifest | None:
        """The teacher step done this task's own way (a tabular task: a scikit-learn pipeline
        trained in a Ray task, or a skops or ONNX file); None (default): the teacher stage's own (a
        model folder used as it is, or trained through the training loop)."""
        return None

    def teacher_settings(self, config: TeacherConfig) -> dict[str, Any]:
        """What the key of a teacher the stage trains through the training loop covers: the
        architecture and its training (not `path`, `finetune`, or the scikit-learn section only a
        tabular task reads)."""
        return config.model_dump(mode="json", exclude={"path", "finetune", "sklearn"})

    # ---------------------------------------------------------------------------------- training
    def objective(self, distill: DistillConfig):
        """The task's objective section of `distill` (the student learns with it)."""
        return getattr(distill, self.objective_field)

    def student_settings(self, student: StudentConfig) -> dict[str, Any]:
        """The student settings that shape the task's student (the distill key covers them)."""
        return student.model_dump(mode="json")

    def student_inputs(self, student: StudentConfig, prep: Manifest, store: Store, force: bool = False) -> dict[str, Manifest]:
        """Steps a student of this task reads besides prep (and its start), run or reused here, before
        it trains (redone with `force`: the step reading them is forced): the distilled student, the
        baseline and every search trial share them, and they are inputs of those steps' keys
        (`cross_tokenizer`: the student's own tokenizer)."""
        return {}

    def columns(self, role: str, prep_details: dict) -> tuple[str, ...]:
        """The token-shard columns a role's training step reads (what the stream decodes), of the
        data the prep manifest's `prep_details` describe."""
        raise NotImplementedError

    def build_model(self, spec: TrainSpec) -> torch.nn.Module:
        """The role's model: built from config with seeded random weights, or (a student) where
        `spec.student_start` says, for tasks that support other starts."""
        raise NotImplementedError

    def make_step(self, spec: TrainSpec, model: torch.nn.Module, store: Store) -> torch.nn.Module:
        """The trained module: the model and its objective; `forward(batch, targets)` returns the
        loss terms (`loss` carries the gradient)."""
        raise NotImplementedError

    def save_model(self, model: torch.nn.Module, store: Store, spec: TrainSpec, folder: Path) -> None:
        """Write a trained model into the local `folder`: by default a Hugging Face directory,
        the safetensors weights and the role's tokenizer (`spec.tokenizer_folder`)."""
        from kd_core.models import local_copy, save_model_dir

        save_model_dir(model, local_copy(store, spec.tokenizer_folder), folder)

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Text tokens a role's model reads in a batch (for tokens/s)."""
        raise NotImplementedError

    def validation_reads_cache(self) -> bool:
        """Whether validating a student needs the cache's targets of the validation split."""
        return False

    def validation_metrics(self, model, rows: dict[str, np.ndarray], batch_size: int, spec: TrainSpec, device) -> dict[str, float]:
        """A student's validation metrics on validation rows (float32): one value per name of
        `validation_modes`, `val_loss` among them (`validation_label` says what it is)."""
        raise NotImplementedError

    def validation_metric_label(self, metric: str) -> str:
        """What a validation metric measures, for a plot's axis."""
        return self.validation_label if metric == "val_loss" else self.validation_labels.get(metric, metric)

    # ------------------------------------------------------------------------ teacher outputs
    def cache_splits(self) -> tuple[str, ...]:
        """The splits whose teacher outputs the cache stores."""
        return ("train",)

    def cache_settings(self, config: CacheConfig) -> dict[str, Any]:
        """The cache settings that shape this task's cache (the cache key covers them): all but the
        synthetic rows, which only a tabular task makes."""
        return config.model_dump(mode="json", exclude={"synthetic"})

    def synthetic_rows(self, config: CacheConfig, prep: Manifest, store: Store, run: StageRun) -> list[FileRecord]:
        """Input shards of rows for the teacher to label besides the data's, written into the cache
        step `run` (a tabular task's MUNGE rows around the training split): their targets are the
        cache's split `synthetic`, and a distilled student trains on them too. [] (default): none."""
        return []

    def cache_layout(self, config: CacheConfig, prep: Manifest, store: Store, teacher: Manifest) -> CacheLayout:
        """How this cache's shards are laid out; raises `CacheSettingsError` for settings the
        teacher and data cannot satisfy, before any inference."""
        raise NotImplementedError

    def load_cache_teacher(self, model_dir, device: str, layout: CacheLayout, prep_details: dict, positions_per_chunk: int | None = None):
        """The teacher as the cache runs it: an object whose `columns(shard, batch_size, seed)` gives
        a token shard's cache columns (`seed` fixes any draws)."""
        raise NotImplementedError

    def load_online_teacher(self, model_dir, runner, device):
        """The frozen teacher an online run (`distill.teacher_source: online`) runs on every batch,
        beside the student's `runner`. A task without one refuses it in `check_config`."""
        raise ValueError(f"task {self.name} has no online teacher; set distill.teacher_source: cache")

    def online_targets(self, teacher, batch: dict[str, torch.Tensor], spec: TrainSpec):
        """The `TeacherTargets` of one batch from the online teacher (under no_grad)."""
        raise ValueError(f"task {self.name} has no online teacher; set distill.teacher_source: cache")

    def on_policy_sampling(self, spec: TrainSpec, store: Store):
        """What `on_policy_batch` needs on this worker besides the student (read once per run)."""
        raise ValueError(f"task {self.name} has no on-policy distillation; set distill.teacher_source: cache")

    def on_policy_batch(self, student, batch: dict[str, torch.Tensor], spec: TrainSpec, sampling) -> dict[str, torch.Tensor]:
        """The student's own answers to the batch's prompts, as a batch (`distill.on_policy`)."""
        raise ValueError(f"task {self.name} has no on-policy distillation; set distill.teacher_source: cache")

    # ---------------------------------------------------------------------------------- eval
    def eval_settings(self, config: EvalConfig, prep_details: dict) -> dict:
        """The eval settings that shape what eval measures, of data `prep_details` describes (the
        eval key covers them): all but the greedy answers', which only chat data has."""
        return config.model_dump(mode="json", exclude={"answer_prompts", "max_new_tokens"})

    def measure(
        self, config: EvalConfig, prep: Manifest, teacher: Manifest, student: Manifest, baseline: Manifest | None,
        store: Store, run: StageRun, device: str,
    ) -> tuple[dict, dict, Any]:
        """(the held-out split's size (`rows`, and what else the task counts), the metrics of every
        model and of the uniform predictor (`uniform`), extras for the report), on `config.split`."""
        raise NotImplementedError

    def training_curves_png(self, histories: dict[str, list[dict]], metrics: dict) -> bytes:
        """The eval stage's `training_curves.png`."""
        raise NotImplementedError

    def report_html(self, job_name: str, metrics: dict, histories: dict[str, list[dict]], extras: Any) -> str:
        """The eval stage's self-contained `report.html`."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------- register
    def log_model(self, model_dir):
        """Log the student to the active MLflow run as an MLflow model; returns its ModelInfo."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- preflight
    def preflight_checks(self, job: JobConfig, records: int, *, deep: bool) -> list[tuple[str, str, str]] | None:
        """The task's own preflight (`kdflow validate --deep`, and before `kdflow run` with `deep`
        false) as (check, status, message) rows (`kd_core.preflight.CheckResult`); None: the
        language-model checks of `kd_core/preflight.py`."""
        return None

    # ------------------------------------------------------------------------------------- CLI
    def headline(self, step: str, manifest: Manifest) -> str | None:
        """The CLI's one-line summary of a step's manifest, where the task has its own (None: the
        generic one)."""
        return None

    def comparison_table(self, metrics: dict) -> Table:
        """The CLI's table of the eval metrics: teacher, student and baseline side by side."""
        raise NotImplementedError

    def best_trial_metrics(self, val_loss: float) -> dict[str, float]:
        """Extra metrics of a search's best trial, from its `val_loss`."""
        return {}


def models_table(title: str, columns: tuple[str, ...], labels: dict[str, str], metrics: dict, cells) -> Table:
    """A CLI table with one row per model of `labels` (teacher, student, baseline) that the eval
    metrics hold: its label, then `cells(row, is_teacher)` (the model's formatted numbers)."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, label in labels.items():
        if name in metrics:
            table.add_row(label, *cells(metrics[name], name == "teacher"))
    return table
