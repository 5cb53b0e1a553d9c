"""The prep stage: the job's data -> a tokenizer and split shards, prepared for the job's task.

The task is resolved here, once, from the config (`task:`), and recorded in the manifest
(`details["task"]`): every later stage reads it from there. What the shards hold is the task's
(`Task.prepare`: packed token rows for a language model, preference pairs with images for a
reward model); the stage keeps the bookkeeping.

The step's key covers the task, the data settings the task reads, the identity of every matched
file (URL, size, ETag or modification time) and of the tokenizer's files: an edited or added file,
or a changed tokenizer, gives a new key, so a scheduled run over a refreshed bucket prepares (and
distills) again.
"""

from __future__ import annotations

import hashlib
import json
import platform

from kd_core.config import DataConfig, StorageConfig
from kd_core.data.prep import file_source
from kd_core.data.sources import FileSource
from kd_core.data.tokenizer import tokenizer_identity
from kd_core.manifest import Manifest
from kd_core.stage import StageRun
from kd_core.storage import Store
from kd_core.tasks import Task, task_named


def prep(config: DataConfig, store: Store, *, task: str = "causal_lm", force: bool = False) -> Manifest:
    """Prepare `config`'s data for the task named `task` (the job's `task:`)."""
    kind = task_named(task)
    kind.check_source(config.source)
    source = file_source(config, store.config)
    run = StageRun(store, "prep", prep_section(kind, config, store.config, source), inputs={}, force=force)
    if run.reused:
        return run.reused
    metrics, details = kind.prepare(config, store, run, source)
    return run.finish(metrics=metrics, details={"task": kind.name, **details})


def prep_section(task: Task, config: DataConfig, storage: StorageConfig, source: FileSource | None = None) -> dict:
    """What the step's key covers: the task, the data settings it reads, the identity of every
    file read and of the tokenizer's files."""
    section: dict = {"task": task.name, "data": task.data_settings(config)}
    source = source or file_source(config, storage)
    if source is not None:
        listing = json.dumps(source.listing(), sort_keys=True).encode()
        section["files"] = {"count": len(source.files), "bytes": source.total_bytes, "identity": hashlib.sha256(listing).hexdigest()}
    elif config.source in ("python-docs", "python-qa", "exact-answers"):
        section["python"] = platform.python_version()  # the bundled text (exact-answers: random's draws) is the running Python's
    if config.tokenizer:
        section["tokenizer_identity"] = tokenizer_identity(config.tokenizer, storage)
    return section
