"""The config sections: each stage's settings, typed and documented field by field.

A job (`kd_core/job.py: JobConfig`) is one YAML file holding these sections; `load_config` there
reads and checks it. Every field here checks its own value (`distill.loss.temperature: must be >
0, got -1`); checks across sections live on the job and its task. Library functions take plain
arguments or one section. `section_hash` and `public_dict` give a section's key and its
secret-free form.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kd_core.redaction import redact


class ConfigError(ValueError):
    """A job config that cannot be used; the message lists every problem, one per line. A secret
    never shows in it: the value of a `SecretStr` field is masked, and a URL is named without the
    credentials it may carry (`kd_core.redaction`)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------- storage
class S3Config(Section):
    endpoint_url: str | None = None
    """S3 API endpoint, e.g. `http://minio.minio:9000`; None uses AWS (or `AWS_ENDPOINT_URL`)."""
    region: str | None = None
    """Region name; None takes `AWS_REGION` / `AWS_DEFAULT_REGION` from the environment."""
    access_key_id: SecretStr | None = None
    """Access key. Prefer the environment (`AWS_ACCESS_KEY_ID`) or a Kubernetes secret."""
    secret_access_key: SecretStr | None = None
    """Secret key. Prefer the environment (`AWS_SECRET_ACCESS_KEY`) or a Kubernetes secret."""
    max_attempts: int = Field(default=5, ge=1)
    """Attempts botocore makes per request (the first included): 5xx replies, 429 / throttling,
    dropped connections and timeouts are retried with jittered exponential backoff."""
    retry_mode: Literal["standard", "adaptive"] = "standard"
    """botocore's retry mode; `adaptive` also slows the client down when the store throttles."""
    retries: int = Field(default=5, ge=1)
    """s3fs's own attempts around each call, for errors botocore leaves to it (a response cut
    short, a timeout while reading the body)."""
    connect_timeout: float = Field(default=5, gt=0)
    """Seconds to wait for a connection to the endpoint (a dead endpoint fails in seconds)."""
    read_timeout: float = Field(default=60, gt=0)
    """Seconds to wait for a reply once connected."""


class StorageConfig(Section):
    root: str = "runs/artifacts"
    """fsspec URL under which every stage writes: a path, `file://`, `memory://` or `s3://bucket/prefix`."""
    s3: S3Config = S3Config()
    """Connection settings used when `root` is an `s3://` URL."""


# ------------------------------------------------------------------------------------------ data
class PreferenceConfig(Section):
    """Preference pairs for reward models (`task: reward`): JSONL records of
    `{"prompt", "chosen", "rejected", "image", "image_text", "human_label"?}` (field names below).
    `chosen` and `rejected` are the two responses in the order the source gave them; only
    `human_label`, when present, says which one a person preferred: P(chosen preferred) in [0, 1]."""

    image_size: int = Field(default=16, ge=4, le=512)
    """Images are resized to image_size × image_size RGB (the student's input)."""
    prompt_field: str = "prompt"
    """Field holding the prompt (the question about the image)."""
    chosen_field: str = "chosen"
    """Field holding the first response of the pair."""
    rejected_field: str = "rejected"
    """Field holding the second response of the pair."""
    image_field: str = "image"
    """Image reference: a path relative to the JSONL file's folder that stays inside it, or a URL
    whose scheme is in `allowed_schemes`."""
    allowed_schemes: list[str] = []
    """URL schemes an image reference may use (e.g. `[s3]`); empty: only paths relative to the
    JSONL file. A record is input: without this it cannot make prep read another bucket, a local
    file or a web address. The `storage.s3` settings (credentials) go to `s3://` URLs only."""
    max_image_bytes: int = Field(default=20 * 2**20, gt=0)
    """Largest image file prep reads, in bytes (20 MiB); a larger one is an error naming its record.
    Decoding also keeps to PIL's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`): past it, an error."""
    image_text_field: str = "image_text"
    """A text rendering of the image (a caption or description): what the text-only teacher reads."""
    label_field: str = "human_label"
    """Optional human preference: 1 = chosen preferred, 0 = rejected preferred, in between = a tie
    or a vote share; missing or null = nobody labelled the pair."""
    labeled_fraction: float = Field(default=0.1, gt=0, le=1)
    """Bundled `digit-preferences` data only: the share of pairs that carry a human label."""
    pairs_per_image: int = Field(default=3, ge=1, le=4)
    """Bundled `digit-preferences` data only: preference pairs made per image (one per question
    kind, of four)."""

    @field_validator("allowed_schemes")
    @classmethod
    def _plain_schemes(cls, schemes: list[str]) -> list[str]:
        for scheme in schemes:
            if not scheme.isascii() or not scheme[:1].isalpha() or not all(c.isalnum() or c in "+.-" for c in scheme):
                raise ValueError(f"{scheme!r} is not a URL scheme; write it without '://', e.g. s3")
        return [scheme.lower() for scheme in schemes]


class ChatConfig(Section):
    """Chat and instruction records (`data.source: chat`): how they are read, rendered through the
    tokenizer's chat template, cut to rows and trained on (`kd_core/data/chat.py`)."""

    messages_field: str = "messages"
    """Field holding a conversation: a list of {role, content} turns."""
    prompt_field: str = "prompt"
    """Field of an instruction record's prompt (a record without `messages_field`): it becomes the
    user turn."""
    completion_field: str = "completion"
    """Field of an instruction record's answer: it becomes the assistant turn."""
    system_field: str = "system"
    """Optional field of an instruction record: a system turn before the prompt."""
    role_field: str = "role"
    """Key of a turn's role."""
    content_field: str = "content"
    """Key of a turn's text."""
    roles: list[str] = ["system", "user", "assistant"]
    """The roles a turn may have; any other is an error naming file:line."""
    assistant_role: str = "assistant"
    """The role whose turns the student learns to write (every turn ends with one)."""
    template: str | None = None
    """A Jinja chat template (the text itself) for a tokenizer that has none, or to replace its
    own; None: the tokenizer's `chat_template`."""
    tag_field: str = "tag"
    """Field of a record naming its kind (e.g. a task family), recorded per token (`tag_ids`) for
    `distill.route` and the per-tag answer scores; a record without it is tagged with the name of
    the file it came from."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Tokens the losses count: `assistant`, the assistant turns' tokens as the template renders
    them (their end-of-turn marker included); `all`, every token of the conversation."""
    layout: Literal["packed", "padded"] = "packed"
    """`packed`: several conversations per row of `data.seq_len` tokens, each with its own
    position ids (restarting at 0) and attending only to itself. `padded`: one conversation per
    row, padded with the pad token."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """A conversation longer than `data.seq_len` tokens: `truncate` keeps its first `seq_len`
    tokens, `drop` leaves it out. Either is counted in the prep manifest."""
    split_field: str | None = None
    """Field of each record naming its split, one of `train`, `val`, `test`: prep puts the record's
    conversation there instead of splitting at random (`data.val_fraction` and `test_fraction`
    then split nothing), e.g. to keep a fixed test set, or harder problems out of training. With
    it set, a record without the field (or with null) or with another value is an error naming
    `file:line`, and every split must get a conversation. None: a seeded random split. The
    `exact-answers` source's records carry theirs in `split`, which prep reads for it (leave this
    unset there)."""

    @model_validator(mode="after")
    def _assistant_is_a_role(self) -> ChatConfig:
        if self.assistant_role not in self.roles:
            raise ValueError(f"assistant_role: {self.assistant_role!r} is not one of roles {self.roles}")
        return self


EXACT_ANSWER_TASKS = ("add", "subtract", "sort", "reverse", "drop_vowels")
"""The task families of the `exact-answers` source (`kd_core/data/exact_answers.py`)."""


class ExactAnswersConfig(Section):
    """The bundled instruction pairs with exact answers (`data.source: exact-answers`,
    `kd_core/data/exact_answers.py`), generated from `data.seed`. A problem's length is the
    number of digits of the first operand (`add`, `subtract`), of digits in the list (`sort`) or
    of letters in the word (`reverse`, `drop_vowels`). Problems of `train_lengths` are split into
    train / val / test by `data.val_fraction` and `test_fraction`; those of `held_out_lengths` go
    to test alone, so the test split measures how answers hold up past the lengths trained on."""

    tasks: list[Literal["add", "subtract", "sort", "reverse", "drop_vowels"]] = list(EXACT_ANSWER_TASKS)
    """Task families to generate: `add` ("347+58" -> "405"), `subtract` ("347-58" -> "289", never
    negative), `sort` ("sort 3 1 2" -> "1 2 3"), `reverse` ("reverse abc" -> "cba"), `drop_vowels`
    ("drop vowels abcde" -> "bcd")."""
    pairs_per_task: int = Field(default=6000, ge=10, le=1_000_000)
    """Problems of `train_lengths` per task family, spread evenly over the lengths; a length with
    fewer distinct problems (1-digit sums) gives what it has."""
    train_lengths: tuple[int, int] = (1, 3)
    """Shortest and longest length (inclusive) of the problems in train, val and test."""
    held_out_lengths: list[int] = [4, 5]
    """Longer lengths, each past `train_lengths`, whose problems are in the test split alone."""
    held_out_pairs: int = Field(default=50, ge=1, le=100_000)
    """Problems per task family and held-out length."""

    @field_validator("tasks")
    @classmethod
    def _tasks_once_each(cls, tasks: list[str]) -> list[str]:
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"list each task family once, at least one of {list(EXACT_ANSWER_TASKS)}; got {tasks}")
        return tasks

    @model_validator(mode="after")
    def _lengths_in_order(self) -> ExactAnswersConfig:
        shortest, longest = self.train_lengths
        if not 1 <= shortest <= longest <= 20:
            raise ValueError(f"train_lengths: must be [shortest, longest] with 1 <= shortest <= longest <= 20, got {list(self.train_lengths)}")
        if any(length <= longest or length > 30 for length in self.held_out_lengths) or len(set(self.held_out_lengths)) != len(self.held_out_lengths):
            raise ValueError(
                f"held_out_lengths: each must be longer than train_lengths' longest ({longest}), at most 30, and listed once; "
                f"got {self.held_out_lengths}"
            )
        return self


CHAT_SOURCES = ("chat", "python-qa", "exact-answers")
"""The `data.source` values that are conversations (`kd_core/data/chat.py`: chat rows with a loss
mask over the assistant's tokens), not plain text or preference pairs."""


class TextsConfig(Section):
    """How prep cuts documents into the texts an embedding model embeds (`task: embedding`): every
    paragraph (a blank-line-separated block: headings, prose, list items) of each document, cut
    at spaces where longer than `max_chars`, kept when at least `min_chars` long."""

    min_chars: int = Field(default=24, ge=1)
    """Shorter paragraphs (stray markup, one-word lines) are dropped."""
    max_chars: int = Field(default=1000, ge=8)
    """Longer paragraphs are cut into pieces of at most this many characters (at spaces)."""

    @model_validator(mode="after")
    def _range(self) -> TextsConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be at most max_chars ({self.max_chars})")
        return self


SKLEARN_DATASETS = {"breast_cancer": "classification", "wine": "classification", "iris": "classification", "digits": "classification", "diabetes": "regression"}
"""The datasets bundled with scikit-learn (offline) that `data.source: sklearn` reads, and their kind."""


class TableConfig(Section):
    """A table of examples (`task: tabular`): one row per example, a target column and named feature
    columns, from CSV or Parquet files (`data.source: table`, `data.files`) or a dataset bundled
    with scikit-learn (`data.source: sklearn`, `dataset`).

    Handling, all recorded in the prep manifest's counts:
    - a missing numeric value (empty cell, NaN, null) becomes the training split's mean of that
      column (`missing: impute`), or stops prep naming the column and row (`missing: error`);
    - a missing categorical value is a category of its own (`<missing>`); a category not seen in the
      training split is read as `<unknown>` (one embedding shared by every unseen value);
    - a row whose target is missing, or whose numeric cell does not parse as a number, stops prep
      naming the file, row and column (`bad_rows: error`), or is dropped and counted (`drop`)."""

    dataset: Literal["breast_cancer", "wine", "iris", "digits", "diabetes"] | None = None
    """`data.source: sklearn`: the bundled dataset (features named as scikit-learn names them,
    the target `target`; `diabetes` is regression, the others classification)."""
    target: str = "target"
    """The target column: a class label (classification; any values, read as text) or a number
    (regression)."""
    kind: Literal["classification", "regression"] | None = None
    """What the target is; None: the bundled dataset's kind (required for `data.source: table`)."""
    numeric: list[str] | None = None
    """The numeric feature columns. None: every column but the target and `categorical` (a
    bundled dataset), or an error naming the table's columns (`data.source: table`)."""
    categorical: list[str] = []
    """The categorical feature columns (any values, read as text; each gets an embedding in the
    student and a one-hot encoding in a teacher trained here)."""
    missing: Literal["impute", "error"] = "impute"
    """A missing numeric value: the training mean (`impute`) or an error (`error`)."""
    bad_rows: Literal["error", "drop"] = "error"
    """A row with a missing target or an unparseable number: an error naming it, or dropped and counted."""

    @model_validator(mode="after")
    def _columns_once(self) -> TableConfig:
        named = [self.target, *(self.numeric or []), *self.categorical]
        repeated = sorted({name for name in named if named.count(name) > 1})
        if repeated:
            raise ValueError(f"each column is the target, numeric or categorical once; named more than once: {repeated}")
        return self


class DataConfig(Section):
    source: Literal["python-docs", "files", "chat", "python-qa", "exact-answers", "preferences", "digit-preferences", "table", "sklearn"] = "python-docs"
    """`python-docs`: the language reference and standard-library docstrings bundled with Python
    (offline on every machine). `files`: the text, JSONL or Parquet files matched by `files`.
    `chat`: chat or instruction records (`chat`) in JSONL or Parquet files, or Hugging Face
    `datasets` folders (saved with `save_to_disk`), matched by `files`. `python-qa`: instruction
    pairs about the standard library answered by its own docstrings ("What does `zip` do?"),
    bundled with Python (`kd_core/data/python_qa.py`), read like `chat`. `exact-answers`:
    generated problems with one right answer (sums, differences, sorting, string transforms;
    `exact_answers`), written to the store and read like `chat`, split by their `split` field,
    with a test split of longer problems than training sees; without `tokenizer` they are read
    with a character-level tokenizer written beside them.
    `preferences` (`task: reward`): JSONL preference records with images (`preferences`), matched
    by `files`. `digit-preferences` (`task: reward`): preference pairs about the handwritten digit
    images bundled with scikit-learn, written to the store and read like `preferences`.
    `table` (`task: tabular`): CSV or Parquet files matched by `files`, read as `table` says.
    `sklearn` (`task: tabular`): a dataset bundled with scikit-learn (`table.dataset`)."""
    files: list[str] = []
    """fsspec URLs, globs or folders of `.txt`, `.jsonl` or `.parquet` files, optionally compressed
    (`.jsonl.gz`) (sources `files`, `chat`, `preferences`). A file matched twice is read once; an
    `s3://` URL uses the `storage.s3` settings."""
    chat: ChatConfig = ChatConfig()
    """Chat and instruction records (sources `chat`, `python-qa` and `exact-answers`)."""
    exact_answers: ExactAnswersConfig = ExactAnswersConfig()
    """The generated problems of the `exact-answers` source."""
    preferences: PreferenceConfig = PreferenceConfig()
    """Preference records (sources `preferences` and `digit-preferences`)."""
    texts: TextsConfig = TextsConfig()
    """The texts of an embedding task (`task: embedding`), cut from the documents."""
    table: TableConfig = TableConfig()
    """The columns of a tabular task (`task: tabular`; sources `table` and `sklearn`)."""
    text_field: str = "text"
    """Column holding the text in JSONL and Parquet files."""
    max_documents: int | None = Field(default=None, gt=0)
    """Use at most this many documents (conversations, for chat data) after a seeded shuffle; None uses all."""
    tokenizer: str | None = None
    """fsspec URL of a Hugging Face tokenizer directory (with `tokenizer.json`) to use as it is,
    e.g. the teacher's own: its eos token separates documents, its pad token (else the eos) pads.
    None: the teacher's folder when `teacher.path` is set, else a byte-level BPE tokenizer trained
    on the training split (source `exact-answers`: a character-level tokenizer, one token per
    character, written with the data)."""
    vocab_size: int = Field(default=2048, ge=260, le=1_000_000)
    """Vocabulary size of the tokenizer kdflow trains (ignored when `tokenizer` or `teacher.path` is
    set, and by the `exact-answers` source's character-level tokenizer)."""
    seq_len: int = Field(default=128, ge=8)
    """Tokens per training row (packed text, packed or padded conversations)."""
    val_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    """Fraction of documents held out for validation (chat records with `chat.split_field` name
    their own split; `exact-answers`: of each family's problems of the train lengths)."""
    test_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    """Fraction of documents held out for the final evaluation (as `val_fraction`)."""
    rows_per_shard: int = Field(default=512, gt=0)
    """Packed rows per Arrow shard; the cache writes one teacher shard per training shard."""
    seed: int = 0
    """Seed of the document shuffle and split, and of the training-row shuffle before sharding
    (and of the problems the `exact-answers` source generates)."""

    @model_validator(mode="after")
    def _exact_answers_split_field(self) -> DataConfig:
        if self.source == "exact-answers" and self.chat.split_field not in (None, "split"):
            raise ValueError(
                f"chat.split_field: the exact-answers records name their split in 'split', which prep reads for them; "
                f"leave it unset, got {self.chat.split_field!r}"
            )
        return self


# ---------------------------------------------------------------------------------------- models
class ArchitectureConfig(Section):
    """A Llama-style causal LM built from config (random init)."""

    hidden_size: int = Field(default=128, gt=0)
    """Width of the residual stream."""
    num_layers: int = Field(default=2, gt=0)
    """Number of transformer blocks."""
    num_heads: int = Field(default=4, gt=0)
    """Attention heads; must divide `hidden_size`."""
    intermediate_size: int | None = Field(default=None, gt=0)
    """MLP width; None means 4 × hidden_size."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ArchitectureConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        return self


class TrainConfig(Section):
    """How one model is optimised (AdamW with linear warmup then cosine decay)."""

    max_steps: int = Field(default=300, gt=0)
    """Optimizer steps."""
    batch_size: int = Field(default=16, gt=0)
    """Rows per step across all workers (the global batch)."""
    learning_rate: float = Field(default=3e-3, gt=0)
    """Peak learning rate."""
    warmup_steps: int = Field(default=20, ge=0)
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """The cosine decays to `learning_rate * min_lr_ratio`."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping."""
    max_nonfinite_steps: int = Field(default=3, ge=0)
    """Steps in a row whose loss or gradient norm is NaN or infinite that are skipped (no update:
    the weights, optimizer state and schedule stay as they were); one more aborts the run with
    `TrainingDiverged`, naming the step and the last finite loss. 0 aborts on the first."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Attention dropout during training (an encoder, `task: embedding`: its hidden-state dropout too)."""
    seed: int = 0
    """Seed of the initial weights and the data order."""
    log_every: int = Field(default=10, gt=0)
    """Record the loss terms every this many steps."""
    shuffle_buffer: int = Field(default=1024, ge=0)
    """Rows in each data consumer's shuffle buffer (on top of the seeded shard order); 0 or 1
    streams rows in shard order."""
    prefetch_shards: int = Field(default=2, gt=0)
    """Shards read, verified and decoded ahead of the one being trained on."""
    data_split: Literal["shards", "rows"] = "shards"
    """How ranks share the data. `shards`: each rank reads its own shards (no overlap, no extra
    reading). `rows`: every rank reads everything and keeps its rows of each global batch, so the
    batches are the same for any number of ranks (reproducible across world sizes), at
    num_workers times the reading."""
    data_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes per rank (0 reads in the training process, with a prefetch
    thread). The batches depend on this number: keep it fixed to reproduce a run."""


class SearchDimension(Section):
    """One searched config field: `{kind: loguniform, low: 1e-4, high: 1e-2}` or
    `{kind: choice, values: [forward_kl, reverse_kl]}`."""

    kind: Literal["uniform", "loguniform", "int", "choice"]
    """`uniform` / `loguniform` floats in [low, high], `int` integers in [low, high], `choice` one of `values`."""
    low: float | None = None
    """Lower bound (uniform, loguniform, int)."""
    high: float | None = None
    """Upper bound, inclusive (uniform, loguniform, int)."""
    values: list[Any] | None = None
    """The options of a `choice`."""

    @model_validator(mode="after")
    def _bounds(self) -> SearchDimension:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty `values` list")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.kind} needs low < high, got low={self.low}, high={self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self

    def extremes(self) -> list[Any]:
        """Values that bound the dimension (checked against the config before any trial runs)."""
        if self.kind == "choice":
            return list(self.values or [])
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SklearnTeacherConfig(Section):
    """A scikit-learn teacher (`task: tabular`): the preprocessing (numeric columns standardised,
    categorical ones one-hot encoded) and an estimator, trained here on the training split in a Ray
    task (or this process, `compute.backend: local`), saved with skops."""

    estimator: Literal[
        "hist_gradient_boosting", "gradient_boosting", "random_forest", "extra_trees", "logistic_regression", "ridge", "svm", "knn",
    ] = "hist_gradient_boosting"
    """The estimator (classifier or regressor by `data.table.kind`): scikit-learn's
    HistGradientBoosting*, GradientBoosting*, RandomForest*, ExtraTrees*, LogisticRegression /
    Ridge, SVC (with probabilities) / SVR, KNeighbors*."""
    params: dict[str, int | float | str | bool | None] = {}
    """Keyword arguments of the estimator (e.g. `{n_estimators: 300, max_depth: 8}`); `random_state`
    defaults to `seed`."""
    seed: int = 0
    """The estimator's `random_state` (where it has one)."""
    cpus: int = Field(default=1, gt=0)
    """CPUs of the Ray task that trains it (and the estimator's `n_jobs`, where it has one)."""
    trusted_types: list[str] = []
    """A `.skops` teacher (`teacher.path`): types beyond scikit-learn's, NumPy's and SciPy's that you have
    reviewed and trust it to hold (skops refuses to load any other: it never unpickles)."""
    search: dict[str, SearchDimension] = {}
    """Estimator parameters to search before the teacher is fitted (e.g. `{max_depth: {kind: int,
    low: 3, high: 12}}`): `search_trials` pipelines fitted on the training split, each scored on
    the validation split (accuracy, or R²), in Ray Tune trials (Optuna's TPE; this process with
    `compute.backend: local`); the best parameters (over `params`) make the teacher. {}: no search."""
    search_trials: int = Field(default=8, gt=0)
    """Pipelines the search fits."""


class TeacherConfig(Section):
    path: str | None = None
    """fsspec URL of an existing Hugging Face causal-LM directory (`task: tabular`: a scikit-learn
    pipeline saved with skops, `.skops`, or an ONNX model, `.onnx`). When None, the teacher is
    trained by kdflow itself from `architecture` (tabular: `sklearn`), seeded, and reused from
    storage afterwards."""
    finetune: bool = False
    """With `path`: fine-tune that model on the training split (`train`; completion-only on chat
    data) before it teaches, instead of using it as it is: Minitron's "teacher correction", for
    a teacher pretrained on other data than the distillation's. The result is stored and reused
    like a teacher kdflow trained."""
    architecture: ArchitectureConfig = ArchitectureConfig(hidden_size=256, num_layers=4, num_heads=4)
    """Architecture of a teacher trained by kdflow (ignored when `path` is set)."""
    train: TrainConfig = TrainConfig()
    """How a kdflow-trained (or fine-tuned) teacher is optimised (cross-entropy on the training split)."""
    sklearn: SklearnTeacherConfig = SklearnTeacherConfig()
    """The scikit-learn teacher of a tabular task (`task: tabular`; ignored otherwise)."""


class VisionConfig(Section):
    """A ViT image encoder built from config (random init), for multimodal students."""

    patch_size: int = Field(default=4, gt=0)
    """Side of the square patches; must divide `data.preferences.image_size`."""
    hidden_size: int = Field(default=64, gt=0)
    """Width of the ViT."""
    num_layers: int = Field(default=2, gt=0)
    """ViT blocks."""
    num_heads: int = Field(default=4, gt=0)
    """Attention heads; must divide `hidden_size`."""
    fusion: Literal["late", "prefix"] = "late"
    """How image and text meet. `late`: a dual encoder; the head scores the image vector (the ViT's
    [CLS], projected) times the text vector (the language model's mean over tokens), beside the
    text vector. `prefix` (LLaVA-style): the projected patch features go in front of the text
    embeddings and the language model reads both (about 1.3× the compute; benchmarks/reward_study.py
    compares how fast each learns)."""
    warm_start_steps: int = Field(default=0, ge=0)
    """Optimizer steps at the start in which the student's language model is held still (learning
    rate 0) while the image encoder, the projector and the head learn against its fixed text
    features; then everything learns. The student and the baseline alike. 0: none."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> VisionConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


WIDTH_PRUNABLE = ("llama", "qwen2", "mistral")
"""Model types (config.json `model_type`) whose width `student.from_teacher` can prune: the
Llama layout (`model.layers[i].self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, RMSNorms).
Any causal LM with a list of blocks (Llama-family, GPT-2) can drop layers."""


def evenly_spaced_layers(total: int, count: int) -> list[int]:
    """`count` block indices of `total`, evenly spaced from the first to the last (both kept),
    rounded half up: 4 blocks, 2 kept -> [0, 3]; 5, 3 -> [0, 2, 4]; one kept -> [0]."""
    if count == 1:
        return [0]
    return [(index * (total - 1) + (count - 1) // 2) // (count - 1) for index in range(count)]


class FromTeacherConfig(Section):
    """A student cut from the teacher (`student.init: from_teacher`): a subset of its blocks
    (depth pruning, as DistilBERT and Minitron do), optionally with fewer residual and MLP
    channels (width pruning, as Minitron does; `kd_core/models/students.py: cut_from_teacher`).

    Width pruning keeps the channels with the largest importance computed from the teacher's
    weights (not activations): a residual channel's importance is the L2 norm of every weight
    that reads or writes it: its column of the input embedding and of an untied output layer, and,
    in each kept block, its column of q/k/v_proj, gate_proj and up_proj and its row of o_proj and
    down_proj. An MLP channel's (per kept block) is the L2 norm of its row of gate_proj and up_proj
    and its column of down_proj. Kept channels stay in their order; attention heads stay whole
    (their count and head_dim are the teacher's). Only the Llama layout (`WIDTH_PRUNABLE`) can be
    pruned in width; any layout can drop blocks."""

    layers: list[int] | None = None
    """Indices of the teacher's transformer blocks the student keeps, increasing; None: `num_layers`
    of them, evenly spaced from the first to the last (both kept)."""
    num_layers: int | None = Field(default=None, gt=0)
    """How many evenly spaced blocks to keep when `layers` is None; None: half the teacher's
    (at least 1)."""
    hidden_size: int | None = Field(default=None, gt=0)
    """Residual channels the student keeps (the most important ones, by the teacher's weights);
    None: the teacher's width."""
    intermediate_size: int | None = Field(default=None, gt=0)
    """MLP channels each kept block keeps (the most important ones); None: the teacher's."""

    @field_validator("layers")
    @classmethod
    def _increasing(cls, layers: list[int] | None) -> list[int] | None:
        if layers is None:
            return None
        if not layers:
            raise ValueError("must list at least one block index, or be null (evenly spaced)")
        if any(index < 0 for index in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"must be block indices >= 0 in increasing order without repeats, got {layers}")
        return layers

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> FromTeacherConfig:
        if self.layers is not None and self.num_layers is not None and self.num_layers != len(self.layers):
            raise ValueError(f"num_layers ({self.num_layers}) and layers ({self.layers}) disagree; set one of them")
        return self

    def kept_layers(self, teacher_layers: int) -> list[int]:
        """The blocks kept of a teacher with `teacher_layers` blocks; ValueError naming the field
        when they do not fit it."""
        if self.layers is not None:
            outside = [index for index in self.layers if index >= teacher_layers]
            if outside:
                raise ValueError(
                    f"student.from_teacher.layers: {outside} are not blocks of the teacher, which has {teacher_layers} "
                    f"(0..{teacher_layers - 1}); pick indices in that range"
                )
            return list(self.layers)
        count = self.num_layers if self.num_layers is not None else max(1, teacher_layers // 2)
        if count > teacher_layers:
            raise ValueError(
                f"student.from_teacher.num_layers: {count} is more than the teacher's {teacher_layers} blocks; set it <= {teacher_layers}"
            )
        return evenly_spaced_layers(teacher_layers, count)

    def check_width(self, teacher_hidden: int, teacher_intermediate: int | None, model_type: str) -> None:
        """The kept widths fit the teacher's, and its layout can be pruned in width; ValueError naming the field."""
        widths = (("hidden_size", self.hidden_size, teacher_hidden), ("intermediate_size", self.intermediate_size, teacher_intermediate))
        for name, value, teachers in widths:
            if value is None:
                continue
            if model_type not in WIDTH_PRUNABLE:
                raise ValueError(
                    f"student.from_teacher.{name}: width pruning works on the Llama layout ({', '.join(WIDTH_PRUNABLE)}), "
                    f"the teacher is {model_type!r}; leave it null (a {model_type} teacher can only drop layers)"
                )
            if teachers is not None and value > teachers:
                raise ValueError(f"student.from_teacher.{name}: {value} is wider than the teacher's {teachers}; set it <= {teachers}")


class StudentTokenizerConfig(Section):
    """The student's own tokenizer (`task: cross_tokenizer`): a Hugging Face tokenizer folder
    (`path`), or one kdflow trains on the prepared training text (`kind`, `vocab_size`). Either
    way it is a step of its own (`student_tokenizer`), which the student and the baseline share;
    the teacher's cache never depends on it."""

    path: str | None = None
    """fsspec URL of a Hugging Face tokenizer folder (tokenizer.json) for the student; None: train
    one (`kind`, `vocab_size`, which a folder ignores)."""
    kind: Literal["bpe", "wordpiece", "unigram"] = "unigram"
    """The tokenizer kdflow trains: byte-level `bpe` (GPT-2's kind), `wordpiece` (BERT's
    pre-tokenizer; it drops whitespace, so its bits per byte count less text) or `unigram`
    (SentencePiece's kind, with a Metaspace `▁`)."""
    vocab_size: int = Field(default=1024, ge=64, le=1_000_000)
    """Its vocabulary, special tokens included."""


class SentenceEmbeddingConfig(Section):
    """How an embedding student (`task: embedding`) turns its token states into one vector per
    text, as sentence-transformers' modules do (and as its exported folder says): pooling, an
    optional dense projection to `output_dim`, then optional L2 normalisation. A student cut from
    the teacher (`init: from_teacher`) takes the teacher's pooling and normalisation instead."""

    pooling: Literal["mean", "cls", "last"] = "mean"
    """`mean`: the mean of the token states (padding excluded); `cls`: the first token's state;
    `last`: the last real token's state."""
    normalize: bool = True
    """L2-normalise the embedding (sentence-transformers' `Normalize` module)."""
    output_dim: int | None = Field(default=None, gt=0)
    """Width of a learned linear projection after pooling (sentence-transformers' `Dense`): a
    narrower embedding than the encoder's width. None: the pooled state as it is."""


class MLPConfig(Section):
    """The MLP student of a tabular task (`task: tabular`): numeric features standardised with the
    training split's statistics (a missing value at the mean), each categorical feature through an
    embedding, then `num_layers` blocks of linear, normalisation, activation and dropout
    (`distill.train.dropout`), then the output layer (class logits, or the standardised target)."""

    hidden_size: int = Field(default=256, gt=0)
    """Width of each block."""
    num_layers: int = Field(default=3, gt=0)
    """Number of blocks."""
    norm: Literal["batch", "layer", "none"] = "layer"
    """Normalisation after each block's linear layer (batch norm needs batches of 2 rows or more)."""
    activation: Literal["relu", "silu", "gelu"] = "relu"
    """Activation of each block."""
    embedding_dim: int | None = Field(default=None, gt=0)
    """Width of each categorical feature's embedding; None: min(16, ⌈1.6 · categories^0.56⌉)
    (fastai's rule), per feature."""


class StudentConfig(Section):
    architecture: ArchitectureConfig = ArchitectureConfig()
    """Architecture of the student (with `task: reward`, its language model), built from config
    with random weights (`init: config`; ignored otherwise)."""
    init: Literal["config", "pretrained", "from_teacher"] = "config"
    """Where the student's weights start (the distilled student and the no-teacher baseline
    alike): `config`, random weights from `architecture`; `pretrained`, the Hugging Face causal LM
    at `path`; `from_teacher`, cut from the teacher (`from_teacher`). `pretrained` and `from_teacher`:
    `task: causal_lm` and `embedding` (an encoder folder, which may bring its own tokenizer)."""
    path: str | None = None
    """fsspec URL of a Hugging Face model directory (safetensors) to start from (`init:
    pretrained`). A causal LM's tokenizer must be the prepared data's, its output layer at least
    that wide (a padded one is fine) and its context at least `data.seq_len`; an encoder
    (`task: embedding`) reads the texts with its own tokenizer."""
    from_teacher: FromTeacherConfig = FromTeacherConfig()
    """How a student is cut from the teacher (`init: from_teacher`)."""
    vision: VisionConfig = VisionConfig()
    """The image encoder of a multimodal reward student (`task: reward`; ignored otherwise)."""
    tokenizer: StudentTokenizerConfig = StudentTokenizerConfig()
    """The student's own tokenizer (`task: cross_tokenizer`; ignored otherwise)."""
    embedding: SentenceEmbeddingConfig = SentenceEmbeddingConfig()
    """Pooling, projection and normalisation of an embedding student (`task: embedding`; ignored otherwise)."""
    mlp: MLPConfig = MLPConfig()
    """The MLP of a tabular student (`task: tabular`; ignored otherwise)."""


# ----------------------------------------------------------------------------------------- cache
class SyntheticRowsConfig(Section):
    """Rows the teacher labels besides the training split's (`task: tabular`), made by MUNGE
    (Bucilă et al., 2006; `kd_core/data/munge.py`): each training row's copy with every feature,
    with probability `swap_probability`, moved towards its nearest training neighbour's value.
    They show the student the teacher's decision surface around the data; they carry no label."""

    rows: int = Field(default=0, ge=0)
    """How many synthetic rows (0: none)."""
    swap_probability: float = Field(default=0.5, ge=0, le=1)
    """MUNGE's p: the chance each feature of a copy takes (a draw around) its neighbour's value."""
    spread: float = Field(default=1.0, gt=0)
    """MUNGE's s: a numeric value is drawn from N(neighbour's, |own − neighbour's| / s)."""
    seed: int = 0
    """Seed of the draws."""


class CacheConfig(Section):
    format: Literal["topk", "sampled", "full"] = "topk"
    """Teacher-output format. `topk`: the k most likely next tokens with their log-probs.
    `sampled` (Random-Sampling KD): `num_samples` draws per position from the teacher, stored as
    unique ids with counts; an unbiased forward-KL gradient. `full`: every log-prob, in float16
    (vocabularies up to `full_max_vocab` only)."""
    top_k: int = Field(default=32, gt=0)
    """Entries kept per position."""
    logprob_bits: int = Field(default=12, ge=4, le=16)
    """Bits per cached top-k log-prob: fixed point on [logprob_floor, 0]. 12 bits over 24 nats is a
    step of 0.006 nats (probabilities within 0.3%)."""
    logprob_floor: float = Field(default=-24.0, lt=0)
    """Lowest storable top-k log-prob; smaller ones are stored as this (exp(-24) = 4e-11)."""
    tail_mass: bool = True
    """Store log(1 − Σ top-k probabilities) per position, computed from the full softmax, and
    renormalise the decoded top-k so head and tail sum to exactly 1."""
    batch_size: int = Field(default=32, gt=0)
    """Rows per teacher forward pass."""
    num_samples: int = Field(default=12, gt=0, le=255)
    """Draws per position for the `sampled` format."""
    seed: int = 0
    """Seed of the `sampled` draws (each shard's generator mixes it with the shard's checksum)."""
    temperature: float = Field(default=1.0, gt=0)
    """Temperature of the teacher softmax the cache stores (top-k log-probs) or draws from (sampled)."""
    full_max_vocab: int = Field(default=8192, gt=0)
    """Largest vocabulary the `full` format accepts (it stores 2 bytes per vocabulary entry per token)."""
    hidden_layers: list[int] = []
    """Teacher hidden states to store as well, for feature distillation: indices into the model's
    `hidden_states` (0 = embeddings, num_layers = last layer), float16."""
    num_actors: int = Field(default=2, gt=0)
    """Teacher actors in the Ray pool (one per GPU on a cluster, CPU actors locally)."""
    synthetic: SyntheticRowsConfig = SyntheticRowsConfig()
    """Synthetic rows the teacher labels as well (`task: tabular`; ignored otherwise)."""


# --------------------------------------------------------------------------------------- distill
DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "total_variation")
"""The names of `kd_core.losses.divergences.DIVERGENCES`, written out: loading a job must not
import the losses (they import torch). `tests/test_divergences.py` keeps the two equal."""


class LossConfig(Section):
    temperature: float = Field(default=1.0, gt=0)
    """Softmax temperature T of the KD term. With `topk_tail` it must equal `cache.temperature`
    (the cached log-probs are already at it)."""
    divergence: str = "forward_kl"
    """Divergence against the teacher's distribution: a name in
    `kd_core.losses.divergences.DIVERGENCES` (forward_kl, reverse_kl, generalized_jsd,
    skew_forward_kl, skew_reverse_kl, total_variation). Over the full vocabulary with full logits
    (`distill.teacher_source: online` or `on_policy`, a `full` cache); over the top k and one tail
    bucket with top-k targets (a `topk` cache, `distill.on_policy.teacher_top_k`; any divergence
    but forward KL needs `topk_tail`). A sampled cache always uses forward KL, which is what it
    estimates."""
    divergence_parameter: float | None = Field(default=None, ge=0, le=1)
    """beta of `generalized_jsd` or alpha of the skew KLs; None keeps the function's default."""
    topk_tail: bool = True
    """Compare over the cached top-k ids plus one bucket for the rest of the vocabulary, so the
    student keeps the teacher's tail mass; False renormalises the teacher over its top k."""
    ce_weight: float = Field(default=0.5, ge=0)
    """Weight of the hard-label (next-token) cross-entropy term."""
    kd_weight: float = Field(default=0.5, ge=0)
    """Weight of the KD term (each term has its own weight; nothing is mixed as 1 − w)."""
    scale_by_temperature_squared: bool = True
    """Multiply the KD term by T², keeping its gradient scale independent of T (Hinton et al.)."""
    token_weighting: Literal["none", "teacher_confidence"] = "none"
    """`teacher_confidence` weights each position's KD term by 1 − H_teacher / log V (from the
    cached entropy), rescaled to mean 1, so confident teacher predictions count more."""
    balance_terms: bool = False
    """Scale the KD term by the running ratio of the CE and KD magnitudes, so terms that differ by
    orders of magnitude contribute alike (the weights then act on balanced terms)."""
    balance_momentum: float = Field(default=0.9, ge=0, lt=1)
    """Momentum of the running magnitudes used by `balance_terms`."""
    feature_weight: float = Field(default=0.0, ge=0)
    """Weight of hidden-state distillation (0 = off): the student's hidden states, through a
    learned projection, matched to the teacher's (`cache.hidden_layers`, or the online teacher's)."""
    feature_layers: list[tuple[int, int]] = []
    """(student layer, teacher layer) pairs for `feature_weight`, as Hugging Face `hidden_states`
    indices (0 = embeddings)."""
    feature_kind: Literal["mse", "cosine"] = "mse"
    """How hidden states are compared: mean squared error or 1 − cosine."""
    fused: bool = False
    """Compute CE and KD from the student's final hidden states and output weight, chunk by chunk
    (`kd_core.losses.fused`), so the student's full (batch·T × V) logits never exist at once."""
    fused_chunk_size: int = Field(default=1024, gt=0)
    """Positions per chunk of the fused loss."""

    @field_validator("divergence")
    @classmethod
    def _registered_divergence(cls, name: str) -> str:
        if name not in DIVERGENCE_NAMES:
            raise ValueError(f"must be one of {', '.join(repr(known) for known in DIVERGENCE_NAMES)}, got {name!r}")
        return name

    @model_validator(mode="after")
    def _some_term_is_weighted(self) -> LossConfig:
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("ce_weight and kd_weight are both 0: nothing would be trained")
        return self


class DeepSpeedConfig(Section):
    enabled: bool = True
    """Train the student in a DeepSpeed engine (kdflow's optimizer and schedule inside it); False
    uses plain torch DDP."""
    zero_stage: int = Field(default=2, ge=0, le=3)
    """ZeRO stage: 0 replicates everything, 1 partitions optimizer states, 2 also gradients, 3
    also parameters."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Weights and activations in float32, or bfloat16 with float32 master weights (GPUs with bf16;
    losses are float32 either way)."""
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    """Micro-batches per optimizer step; the global batch (`train.batch_size`) is split into
    num_workers × this many micro-batches."""


class RewardLossConfig(Section):
    """The reward-distillation objective (`task: reward`, kd_core/losses/reward.py):
    `pointwise_weight · MSE(r_s, r_t) + pairwise_weight · KL(σ(Δ_t/T) ‖ σ(Δ_s/T)) +
    bradley_terry_weight · BT(human labels)`, Δ = r(chosen) − r(rejected)."""

    pointwise_weight: float = Field(default=0.0, ge=0)
    """Weight of the squared error between student and teacher rewards (it matches the teacher's
    scale and offset too, which a pairwise loss leaves free)."""
    pairwise_weight: float = Field(default=1.0, ge=0)
    """Weight of the KL between the teacher's and the student's preference probabilities."""
    temperature: float = Field(default=1.0, gt=0)
    """T of the pairwise term: margins are divided by it before the sigmoid."""
    bradley_terry_weight: float = Field(default=0.0, ge=0)
    """Weight of the Bradley–Terry loss on human labels (pairs without a label do not count). The
    no-teacher baseline trains on this term alone."""

    @model_validator(mode="after")
    def _some_term_is_weighted(self) -> RewardLossConfig:
        if self.pointwise_weight == 0 and self.pairwise_weight == 0 and self.bradley_terry_weight == 0:
            raise ValueError("pointwise_weight, pairwise_weight and bradley_terry_weight are all 0: nothing would be trained")
        return self


class CrossTokenizerLossConfig(Section):
    """The objective of a student whose tokenizer is not the teacher's (`task: cross_tokenizer`):

        total = ce_weight · CE(student, its own next tokens) + kd_weight · KD(teacher, student)

    KD is averaged over the aligned spans of the two tokenizations (`kd_core/data/alignment.py`;
    the losses in `kd_core/losses/cross_tokenizer.py`)."""

    method: Literal["uld", "span_kl", "dskd"] = "span_kl"
    """`uld`: the Wasserstein distance between the sorted next-token distributions (Boizard et
    al.); `span_kl`: KL over the strings both vocabularies hold, each span's probability merged
    from its tokens' conditionals, the unmatched mass compared by ULD (GOLD's hybrid); `dskd`:
    dual-space KD with cross-model attention (Zhang et al.), which needs the teacher's hidden
    states and output layer: online only (`distill.teacher_source: online`)."""
    temperature: float = Field(default=1.0, gt=0)
    """Both models' softmax temperature in the KD term (a top-k cache's, `cache.temperature`, for
    `uld` and `span_kl` from the cache)."""
    ce_weight: float = Field(default=0.5, ge=0)
    """Weight of the cross-entropy on the student's own next tokens."""
    kd_weight: float = Field(default=0.5, ge=0)
    """Weight of the KD term over the aligned spans."""
    uld_weight: float = Field(default=1.0, ge=0)
    """`span_kl`: the weight of ULD on the tokens whose strings only one vocabulary holds."""

    @model_validator(mode="after")
    def _some_term_is_weighted(self) -> CrossTokenizerLossConfig:
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("ce_weight and kd_weight are both 0: nothing would be trained")
        return self


class OnPolicyConfig(Section):
    """On-policy distillation (`distill.teacher_source: on_policy`, chat data): the student writes
    its own answers to the batch's prompts and the teacher scores every token of them."""

    mixing: float = Field(default=1.0, ge=0, le=1)
    """λ of GKD: the chance that a batch is on-policy (the student's samples); otherwise the
    dataset's own answers are distilled, as `online` does. 0 is offline distillation."""
    offline_steps: int = Field(default=0, ge=0)
    """The first this many optimizer steps learn the dataset's answers (λ = 0), then `mixing`
    applies: a student that cannot write a sensible answer yet gets a start first, as supervised
    or off-policy distillation precedes on-policy distillation in practice (GKD starts from an
    SFT student; Qwen3 distils off-policy first)."""
    objective: Literal["divergence", "policy_gradient"] = "divergence"
    """`divergence`: `distill.loss.divergence` over the full vocabulary at each sampled token's
    position (reverse_kl is the usual choice on-policy); `policy_gradient`: the sampled-token
    reverse-KL advantage with a policy-gradient update (`kd_core/losses/policy_gradient.py`). Both
    weighted by `distill.loss.kd_weight`; the cross-entropy term never counts on the student's
    own samples."""
    max_new_tokens: int = Field(default=32, gt=0)
    """The longest answer the student writes (tokens); the prompt and answer are cut to
    `data.seq_len`."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the student's answers."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens with this much probability (1: all)."""
    samples_per_prompt: int = Field(default=1, gt=0)
    """Answers the student writes to each prompt (each its own row)."""
    writer: Literal["student", "teacher"] = "student"
    """Who answers the prompts. `student`: on-policy distillation. `teacher`: the teacher samples
    the answers and the student learns them as data: cross-entropy and the objective on them
    (supervised KD on teacher outputs; with `distill.loss.kd_weight: 0`, sequence-level KD, "SFT
    on teacher outputs"). The baseline arm of an on-policy comparison; needs the teacher in the
    training process (no generation or teacher actors)."""
    teacher_top_k: int | None = Field(default=None, gt=0)
    """Score with the teacher's k most likely tokens (and one bucket for the rest) at each
    position instead of its full vocabulary: what teacher actors send back shrinks from V to k + 1
    numbers per token. `distill.loss.divergence` compares the two distributions over those k + 1
    outcomes (`kd_core.losses.topk.coarsened`). None: the full vocabulary."""
    generation_actors: int = Field(default=0, ge=0)
    """0: each training worker samples with its own student, in its own process. N: each training
    worker has N Ray actors holding a copy of the student (refreshed every `sync_every` steps)
    that write the answers, one micro-batch each in turn (`compute.backend: ray`)."""
    sync_every: int = Field(default=1, gt=0)
    """Generation actors get the student's current weights every this many optimizer steps; the
    steps an answer's weights lag behind the step that trains on it are logged (`staleness`)."""
    async_generation: bool = Field(default=False, alias="async")
    """`async: true`: the generation actors write the next step's answers while this step trains
    (one step ahead: their weights lag at least one step). Needs `generation_actors`."""
    teacher_actors: int = Field(default=0, ge=0)
    """0: each training worker runs the teacher beside its student. N: a pool of N Ray actors
    holds the teacher and scores the answers, so the teacher never shares the student's memory;
    one pool serves every worker of the run, and every trial of a search."""
    actor_cpus: float = Field(default=1.0, gt=0)
    """CPUs each generation or teacher actor reserves (a fraction shares a core)."""
    actor_gpus: float = Field(default=0.0, ge=0)
    """GPUs each generation or teacher actor reserves (a fraction shares a GPU; 0: on CPU)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    PLACEMENT: ClassVar[tuple[str, ...]] = ("generation_actors", "teacher_actors", "actor_cpus", "actor_gpus")
    """Where the work runs, not what it computes: left out of the distill step's key."""

    def key_settings(self) -> dict:
        """The settings that shape what a student learns (the distill step's key covers them)."""
        return self.model_dump(mode="json", exclude=set(self.PLACEMENT))

    @model_validator(mode="after")
    def _actor_settings_need_actors(self) -> OnPolicyConfig:
        if self.async_generation and not self.generation_actors:
            raise ValueError("async: the answers are written one step ahead by generation actors; set generation_actors >= 1")
        if self.writer == "teacher" and (self.generation_actors or self.teacher_actors):
            raise ValueError("writer: the teacher writes the answers in the training process; set generation_actors: 0 and teacher_actors: 0")
        if self.sync_every > 1 and not self.generation_actors:
            raise ValueError("sync_every: refreshes the generation actors' copy of the student; without generation_actors the student answers itself, always current")
        return self


class EmbeddingLossConfig(Section):
    """The objective of a sentence-embedding student (`task: embedding`), a weighted sum over a
    batch of texts' embeddings, student s and teacher t (`kd_core/losses/embedding.py`):

        total = mse_weight · MSE(P s, t) + cosine_weight · (1 − cos(P s, t))
              + matryoshka_weight · Matryoshka + distance_weight · RKD-distance + angle_weight · RKD-angle
              + similarity_kl_weight · KL(teacher similarities ‖ student's) + contrastive_weight · soft-label InfoNCE

    P is a learned projection to the teacher's width when the widths differ (trained with the
    student, not exported). The no-teacher baseline learns SimCSE (two dropout views of each
    text, the batch's other texts as negatives, τ = 0.05)."""

    mse_weight: float = Field(default=1.0, ge=0)
    """Mean squared error to the teacher's embedding (per dimension)."""
    cosine_weight: float = Field(default=0.0, ge=0)
    """1 − cosine similarity to the teacher's embedding."""
    matryoshka_weight: float = Field(default=0.0, ge=0)
    """The teacher's cosine-similarity matrix taught at each prefix width of `matryoshka_dims`."""
    matryoshka_dims: list[int] = []
    """Prefix widths of the student's embedding that must work on their own (e.g. [32, 64, 128]);
    eval measures each. Needed when `matryoshka_weight` > 0."""
    matryoshka_weights: list[float] | None = None
    """One weight per `matryoshka_dims` entry (None: equal)."""
    distance_weight: float = Field(default=0.0, ge=0)
    """Relational KD, distance: pairwise distances normalised by their mean (Park et al.)."""
    angle_weight: float = Field(default=0.0, ge=0)
    """Relational KD, angle: the angles of every triplet in the batch (Park et al.)."""
    similarity_kl_weight: float = Field(default=0.0, ge=0)
    """KL between the teacher's and the student's softmaxed in-batch similarity rows (CLIP-RD)."""
    contrastive_weight: float = Field(default=0.0, ge=0)
    """In-batch contrastive loss with the teacher's similarities as soft labels."""
    temperature: float = Field(default=0.05, gt=0)
    """Temperature of the similarity softmax (`similarity_kl`, `contrastive`)."""

    @model_validator(mode="after")
    def _consistent(self) -> EmbeddingLossConfig:
        weights = ("mse_weight", "cosine_weight", "matryoshka_weight", "distance_weight", "angle_weight", "similarity_kl_weight", "contrastive_weight")
        if not any(getattr(self, name) > 0 for name in weights):
            raise ValueError(f"every weight is 0 ({', '.join(weights)}): nothing would be distilled")
        if self.matryoshka_weight > 0 and not self.matryoshka_dims:
            raise ValueError("matryoshka_dims: give the prefix widths (e.g. [32, 64]) when matryoshka_weight > 0")
        if any(dim <= 0 for dim in self.matryoshka_dims):
            raise ValueError(f"matryoshka_dims: widths must be > 0, got {self.matryoshka_dims}")
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError(f"matryoshka_weights: one per matryoshka_dims entry ({len(self.matryoshka_dims)}), got {len(self.matryoshka_weights)}")
        return self


class TabularLossConfig(Section):
    """The objective of a tabular student (`task: tabular`; `kd_core/losses/tabular.py`).
    Classification: kd_weight · T² · KL(teacher_T ‖ student_T) over every row (synthetic rows
    included) + ce_weight · cross-entropy with the label over the labelled rows. Regression:
    kd_weight · (student − teacher)² + ce_weight · (student − label)², in units of the training
    target's standard deviation."""

    temperature: float = Field(default=2.0, gt=0)
    """Softmax temperature T of both distributions in the KD term (classification)."""
    kd_weight: float = Field(default=0.8, ge=0)
    """Weight of the teacher's term."""
    ce_weight: float = Field(default=0.2, ge=0)
    """Weight of the label's term (the hard labels mixed in)."""

    @model_validator(mode="after")
    def _something_learned(self) -> TabularLossConfig:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing would be learned")
        return self


class DistillConfig(Section):
    loss: LossConfig = LossConfig()
    """The distillation objective of language models (`task: causal_lm`)."""
    reward: RewardLossConfig = RewardLossConfig()
    """The distillation objective of reward models (`task: reward`)."""
    cross_tokenizer: CrossTokenizerLossConfig = CrossTokenizerLossConfig()
    """The distillation objective of a student with its own tokenizer (`task: cross_tokenizer`)."""
    embedding: EmbeddingLossConfig = EmbeddingLossConfig()
    """The distillation objective of a sentence-embedding student (`task: embedding`)."""
    tabular: TabularLossConfig = TabularLossConfig()
    """The distillation objective of a tabular student (`task: tabular`)."""
    train: TrainConfig = TrainConfig()
    """Optimisation of the student."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """How the student is trained in DeepSpeed (the teacher and baseline train with plain DDP)."""
    teacher_source: Literal["cache", "online", "on_policy"] = "cache"
    """`cache`: read the teacher's targets from the cache stage (the teacher ran once). `online`:
    run the teacher on every training batch and distill from its full logits (no cache; costs a
    teacher forward pass per step). `on_policy`: the student answers the batch's prompts itself
    and the teacher scores its answers (`on_policy`; chat data)."""
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """On-policy distillation's settings (`teacher_source: on_policy`)."""
    route: dict[str, str] = {}
    """Several teachers, each teaching its own part of the data: a conversation's tag (its record's
    `data.chat.tag_field`, else the name of the file it came from) -> the name of the teacher
    that teaches its tokens (`teacher`, or one of `teachers`). Tags it does not name go to
    `teacher`. The KD term is the mean over all counted tokens, whichever teacher scored them."""
    teacher_weights: dict[str, float] = {}
    """Several teachers teaching every token together: teacher name (`teacher`, or one of
    `teachers`) -> its weight (they sum to 1). The KD term is the weighted sum of each teacher's
    (for forward KL: distilling the weighted mixture of their distributions), from their caches
    or run online."""
    baseline: bool = True
    """Also train a same-size student on the same tokens with cross-entropy only (no teacher),
    so the evaluation shows what the teacher added."""
    checkpoint_every: int | None = Field(default=100, gt=0)
    """Write a checkpoint (model, optimizer, schedule, RNG and data position, from every rank)
    every this many optimizer steps; None writes none. Applies to every model kdflow trains: the
    student, the baseline and a teacher trained from `teacher.architecture`."""
    resume: Literal["auto", "never"] = "auto"
    """`auto`: a run of the same step (same key) that stopped midway continues from its latest
    checkpoint, with the same number of workers. `never`: start over."""
    keep_checkpoints: int = Field(default=2, gt=0)
    """Checkpoints kept while training (older ones are deleted); all are deleted once the model
    is saved."""


# ------------------------------------------------------------------------------------------ eval
class EvalConfig(Section):
    split: Literal["val", "test"] = "test"
    """Held-out split the models are measured on."""
    batch_size: int = Field(default=32, gt=0)
    """Rows per evaluation forward pass."""
    max_rows: int | None = Field(default=None, gt=0)
    """Evaluate on at most this many rows; None uses the whole split."""
    gates: list[str] = []
    """Quality gates the student must pass to be promoted, each one comparison over the eval
    metrics, e.g. `student.perplexity <= 1.3 * teacher.perplexity` or `agreement_top1 >= 0.55`
    (see kd_core/gates.py). Parsed here, never run as code."""
    sanity_gates: bool = True
    """With no `gates`, gate the student on sanity: it must beat the uniform predictor (by 1%)
    and, when one was trained, the no-teacher baseline (`kd_core/gates.py`: perplexity for a
    language model, preference KL to the teacher for a reward model). false opts out: a job with
    no gates then promotes any student that is not diverged."""
    throughput_batches: int = Field(default=5, gt=0)
    """Timed forward passes per model for inference tokens/s and latency (after one warm-up)."""
    answer_prompts: int = Field(default=32, ge=0)
    """Chat data: held-out prompts every model answers greedily, scored against the reference
    answer by exact match and word F1 (`kd_core/eval/answers.py`); 0: none."""
    max_new_tokens: int = Field(default=48, gt=0)
    """Chat data: the longest answer a model may write to a held-out prompt (tokens)."""

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, gates: list[str]) -> list[str]:
        from kd_core.gates import Gate, GateError

        for index, text in enumerate(gates):
            try:
                Gate.parse(text)
            except GateError as err:
                raise ValueError(f"[{index}] {err}") from None
        return gates


# -------------------------------------------------------------------------------------- registry
class RegistryConfig(Section):
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    """MLflow tracking URI: a SQLite file for the embedded default, an http(s) server on a cluster."""
    artifact_location: str | None = None
    """Artifact root for a newly created experiment (fsspec/MLflow URI); None puts it beside a
    SQLite tracking file, or uses the tracking server's default."""
    experiment: str = "kdflow"
    """MLflow experiment that holds the registration runs."""
    model_name: str = Field(default="kdflow-student", min_length=1)
    """Registered model name."""
    alias: str = Field(default="challenger", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    """Alias set on the newly registered version."""
    champion_alias: str = Field(default="champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    """Alias of the version in production: moved only to a version that passed every gate and is
    the best on `primary_metric` (see kd_core/registry)."""
    primary_metric: str = "student.perplexity"
    """The eval metric that ranks versions, named as in `eval.gates` (e.g. `agreement_top1`)."""
    primary_goal: Literal["minimize", "maximize"] | None = None
    """Whether lower or higher `primary_metric` is better; None: maximize agreement, accuracy,
    correlation and throughput (`kd_core.gates.MAXIMIZED`), minimize everything else."""

    @field_validator("primary_metric")
    @classmethod
    def _primary_metric_is_a_metric(cls, text: str) -> str:
        from kd_core.gates import GateError, parse_metric

        try:
            parse_metric(text)
        except GateError as err:
            raise ValueError(str(err)) from None
        return text

    @property
    def maximize(self) -> bool:
        if self.primary_goal is not None:
            return self.primary_goal == "maximize"
        from kd_core.gates import MAXIMIZED

        return self.primary_metric.rsplit(".", 1)[-1] in MAXIMIZED


# --------------------------------------------------------------------------------------- compute
class ComputeConfig(Section):
    backend: Literal["ray", "local"] = "ray"
    """`ray`: training runs in Ray Train workers and teacher inference in a Ray actor pool.
    `local`: everything in this process (no Ray), e.g. for debugging or a bare GPU box."""
    ray_address: str | None = None
    """Address of an existing Ray cluster; None starts a local one."""
    num_cpus: int | None = Field(default=None, gt=0)
    """CPUs a locally started Ray cluster may use; None uses every core."""
    num_workers: int = Field(default=1, gt=0)
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: int = Field(default=2, gt=0)
    """CPUs reserved by each training worker; also its torch thread count."""
    use_gpu: bool = False
    """Give each worker a GPU (NCCL) instead of CPU (gloo)."""
    max_failures: int = Field(default=3, ge=0)
    """Times Ray Train restarts the training workers after one dies (a preempted node, an OOM
    kill); they continue from the latest checkpoint."""
    single_worker: Literal["task", "ray_train"] = "task"
    """How a one-worker training (`num_workers: 1`, a search trial with one worker) runs on Ray.
    `task`: a stage's fit is a Ray task on a worker process Ray keeps between tasks (torch
    already imported), retried `max_failures` times from the latest checkpoint when its process
    dies; a search trial trains inside its Tune trial, whose process Tune reuses for the next
    trial. `ray_train`: a Ray Train `TorchTrainer`, as every multi-worker training runs, which
    starts a controller, a worker group and a process group for each fit (about 25 s on 2 cores:
    `benchmarks/startup.py`)."""
    lease_ttl_s: float = Field(default=120, gt=0)
    """A training step holds a lease on its folder, renewed every third of this; a lease not
    renewed for this long (its run died) is taken over by the next run of the step."""
    lease_wait_s: float = Field(default=300, ge=0)
    """How long a second run of a training step that is already running waits for it (then
    reuses its result) before it stops, naming the holder."""


# ------------------------------------------------------------------------------------------ tune
class TuneConfig(Section):
    """`kdflow tune`: an Optuna TPE search with ASHA early stopping over `space`, each trial a short
    distillation (Ray Train inside a Ray Tune trial) on the shared prep and cache outputs."""

    space: dict[str, SearchDimension] = {}
    """Dotted config field -> distribution, e.g. `distill.loss.kd_weight: {kind: uniform, low: 0.2,
    high: 0.9}`; fields under distill.loss (`task: reward`: distill.reward), distill.train or student."""
    num_trials: int = Field(default=8, gt=0)
    """Trials in the search."""
    max_concurrent: int = Field(default=2, gt=0)
    """Trials running at once (each also needs its workers' CPUs/GPUs free)."""
    max_steps: int | None = Field(default=None, gt=0)
    """Optimizer steps per trial; None: `distill.train.max_steps`. The best config keeps the full run's."""
    eval_every: int = Field(default=25, gt=0)
    """A trial reports its validation metrics every this many steps; ASHA compares trials at these
    points. `val_loss` is the student's cross-entropy on the validation split (nats/token), or with
    `task: reward` its preference KL to the teacher on the validation pairs (nats/pair, T = 1),
    beside `val_agreement`: the share of those pairs on which it prefers the teacher's response."""
    metric: str = "val_loss"
    """The validation metric TPE and ASHA optimise (and the best trial is chosen by), in the
    direction the task gives it: `val_loss` (lower is better); `task: reward` also `val_agreement`
    (higher is better)."""
    val_rows: int = Field(default=64, gt=0)
    """Validation rows (reward: pairs) per report."""
    grace_period: int = Field(default=2, gt=0)
    """Reports a trial gets before ASHA may stop it."""
    reduction_factor: int = Field(default=2, ge=2)
    """ASHA keeps 1 / reduction_factor of the trials at each rung."""
    workers_per_trial: int | None = Field(default=None, gt=0)
    """Ray Train workers per trial; None: `compute.num_workers`."""
    cpus_per_worker: int | None = Field(default=None, gt=0)
    """CPUs per trial worker; None: `compute.cpus_per_worker`. (GPUs: one per worker with `compute.use_gpu`.)"""
    seed: int = 0
    """Seed of the TPE sampler."""


# -------------------------------------------------------------------------------------- kubeflow
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"
_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Toleration(Section):
    key: str | None = None
    """Taint key to tolerate (None with operator `Exists` tolerates every taint)."""
    operator: Literal["Equal", "Exists"] = "Equal"
    """`Equal`: the taint's value must be `value`; `Exists`: any value."""
    value: str | None = None
    """Taint value (operator `Equal`)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; None tolerates every effect."""


class PodResources(Section):
    """What one Kubernetes pod asks for: requests, limits, accelerators and placement."""

    cpu: str | None = Field(default=None, pattern=_QUANTITY)
    """CPU request, e.g. `2` or `500m`."""
    memory: str | None = Field(default=None, pattern=_QUANTITY)
    """Memory request, e.g. `8Gi`."""
    cpu_limit: str | None = Field(default=None, pattern=_QUANTITY)
    """CPU limit; None: the request."""
    memory_limit: str | None = Field(default=None, pattern=_QUANTITY)
    """Memory limit; None: the request."""
    accelerator_type: str = "nvidia.com/gpu"
    """Extended resource that counts the accelerators."""
    accelerators: int = Field(default=0, ge=0)
    """Accelerators per pod (0: none)."""
    node_selector: dict[str, str] = {}
    """Node labels the pod must land on, e.g. `{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}`."""
    tolerations: list[Toleration] = []
    """Taints the pod tolerates, e.g. the `nvidia.com/gpu` taint of a GPU node pool."""


class SecretEnv(Section):
    secret: str = Field(pattern=_K8S_NAME)
    """Name of a Kubernetes secret in the pipeline's namespace."""
    env: dict[str, str]
    """Environment variable -> key in the secret."""


class RayJobConfig(Section):
    """The KubeRay RayJob that runs the distill and tune steps on a cluster (the pipeline's pod only
    submits it, streams its status and deletes it). Workers: `compute.num_workers` for distill,
    `tune.max_concurrent` × `tune.workers_per_trial` for tune."""

    enabled: bool = True
    """False: the distill and tune steps run Ray inside their own pod (`kubeflow.steps` resources)."""
    ray_version: str = "2.60.0"
    """Ray version of the image (KubeRay checks it against the cluster it starts)."""
    head: PodResources = PodResources(cpu="2", memory="8Gi")
    """The Ray head pod (it schedules no training)."""
    worker: PodResources = PodResources(cpu="8", memory="64Gi", accelerators=1)
    """One Ray Train worker per pod; with accelerators > 0 set `compute.use_gpu: true`."""
    active_deadline_seconds: int = Field(default=3 * 24 * 3600, gt=0)
    """The job is stopped after this long."""
    poll_seconds: float = Field(default=10.0, gt=0)
    """How often the step reads the RayJob's status."""
    api_retry_seconds: float = Field(default=900.0, ge=0)
    """How long the step retries a Kubernetes API call that fails transiently (no connection, 429,
    5xx) before it fails; the RayJob is left running then, and a rerun of the step adopts it."""
    api_backoff_seconds: float = Field(default=1.0, gt=0)
    """The first wait before retrying an API call; it doubles per retry (with jitter) up to
    `api_backoff_max_seconds`. A Retry-After from the API server is waited out in full."""
    api_backoff_max_seconds: float = Field(default=60.0, gt=0)
    """The longest wait between two retries of an API call."""

    @model_validator(mode="after")
    def _backoff_bounds(self) -> RayJobConfig:
        if self.api_backoff_max_seconds < self.api_backoff_seconds:
            raise ValueError(
                f"api_backoff_max_seconds ({self.api_backoff_max_seconds}) must be at least api_backoff_seconds ({self.api_backoff_seconds})"
            )
        return self


class StepRetry(Section):
    """KFP's retry policy for the long steps: a step whose pod was lost (node failure, eviction, an
    API outage longer than `kubeflow.rayjob.api_retry_seconds`) is started again, and picks up
    where it was (a running RayJob adopted, checkpoints and finished steps reused)."""

    steps: list[Literal["prep", "cache", "tune", "distill", "eval", "register"]] = ["cache", "tune", "distill"]
    """The steps that are retried."""
    retries: int = Field(default=2, ge=0)
    """Retries after the first attempt (0: none)."""
    backoff_seconds: int = Field(default=60, ge=0)
    """The wait before the first retry; multiplied by `backoff_factor` for each one after it."""
    backoff_factor: float = Field(default=2.0, ge=1)
    """Growth of the wait from one retry to the next."""
    max_duration_seconds: int = Field(default=4 * 24 * 3600, gt=0)
    """Argo retries a step only this long after its first attempt started, and bounds a retried
    pod's deadline by it: keep it above the longest a step runs (`kubeflow.rayjob.active_deadline_seconds`)."""


def _default_steps() -> dict[str, PodResources]:
    return {
        "prep": PodResources(cpu="4", memory="16Gi"),
        "cache": PodResources(cpu="8", memory="64Gi", accelerators=1),
        "tune": PodResources(cpu="1", memory="2Gi"),
        "distill": PodResources(cpu="1", memory="2Gi"),
        "eval": PodResources(cpu="8", memory="32Gi", accelerators=1),
        "register": PodResources(cpu="1", memory="4Gi"),
    }


class KubeflowConfig(Section):
    """How the job runs as a Kubeflow Pipelines DAG (`kdflow submit`, `kdflow schedule`,
    `kdflow run --engine kfp-local`). None of it changes what a stage computes."""

    host: str | None = None
    """KFP API endpoint, e.g. `http://ml-pipeline-ui.kubeflow:80`; None: `KF_PIPELINES_ENDPOINT`."""
    namespace: str = Field(default="kdflow", pattern=_K8S_NAME)
    """Kubernetes namespace of the runs and RayJobs."""
    experiment: str = "kdflow"
    """KFP experiment the runs are filed under."""
    image: str = "ghcr.io/kdflow/kdflow:0.1.0"
    """The project image (infra/Dockerfile) every step and Ray pod runs."""
    service_account: str = Field(default="kdflow-pipeline", pattern=_K8S_NAME)
    """Service account of the step pods: it may create and watch RayJobs (infra/k8s/rbac.yaml)."""
    secrets: list[SecretEnv] = [
        SecretEnv(secret="kdflow-s3", env={"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key"}),
        SecretEnv(secret="kdflow-mlflow", env={"MLFLOW_TRACKING_USERNAME": "username", "MLFLOW_TRACKING_PASSWORD": "password"}),
    ]
    """Kubernetes secrets exposed to every step (and Ray pod) as environment variables."""
    steps: dict[Literal["prep", "cache", "tune", "distill", "eval", "register"], PodResources] = Field(default_factory=_default_steps)
    """Resources of each step's pod; a step left out asks for nothing."""
    rayjob: RayJobConfig = RayJobConfig()
    """The KubeRay RayJob that runs the distill step on a cluster."""
    retry: StepRetry = StepRetry()
    """KFP's retry policy for the long steps."""
    local_pipeline_root: str = "runs/kfp-local"
    """Folder where `kdflow run --engine kfp-local` keeps KFP's own outputs (metrics, report)."""

    @model_validator(mode="after")
    def _retries_outlast_a_rayjob(self) -> KubeflowConfig:
        if self.retry.retries and self.retry.max_duration_seconds <= self.rayjob.active_deadline_seconds:
            raise ValueError(
                f"retry.max_duration_seconds ({self.retry.max_duration_seconds}) must exceed rayjob.active_deadline_seconds "
                f"({self.rayjob.active_deadline_seconds}): Argo would not retry a step that ran longer, and would cut a retry's deadline short"
            )
        return self


# ---------------------------------------------------------------------------------------- hashing
def section_hash(section: BaseModel | dict[str, Any]) -> str:
    """Stable sha256 of a config section (secrets excluded: they never change what a stage makes)."""
    payload = section.model_dump(mode="json", exclude=secret_fields(section)) if isinstance(section, BaseModel) else section
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def secret_fields(model: BaseModel) -> dict[str, Any]:
    excluded: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.annotation is SecretStr or SecretStr in get_args(field.annotation):
            excluded[name] = True
        elif isinstance(value, BaseModel):
            nested = secret_fields(value)
            if nested:
                excluded[name] = nested
    return excluded


def public_dict(config: BaseModel) -> dict[str, Any]:
    """The config as plain JSON data with every secret removed: safe for logs, manifests, MLflow."""
    return config.model_dump(mode="json", exclude=secret_fields(config))


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
