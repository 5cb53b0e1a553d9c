"""The cache stage: run the teacher once over the training shards and store what students need.

One cache shard per token shard of each split the task caches (`Task.cache_splits`: the training
split; a reward task's validation split too), aligned row for row, in the format of
`kd_core.cache.format`; the task computes the columns (`Task.load_cache_teacher`: a language
model's top-k, sampled or full log-probs, entropy and hidden states; a reward model's scores of
each pair's two responses) and `Task.cache_layout` says how they are laid out. The manifest's
`details["layout"]` says how to decode them, and lists each shard's rows, tokens, bytes and
sha256.

A task may add rows of its own for the teacher to label (`Task.synthetic_rows`: a tabular task's
MUNGE rows around the training split): their input shards are written into this step
(`synthetic/`), their targets cached as the split `synthetic`, and every distilled student trains
on them beside the training split (`details["synthetic_rows"]`).

Resumable: each shard is written atomically, then a commit record beside it
(`kd_core.train.inference.COMMIT_SUFFIX`). A rerun of a killed job keeps every shard whose commit
record, bytes and source check out and computes the rest; teacher inference is deterministic, so
the result is byte-identical to an uninterrupted run. Two writers of the same cache write the same
bytes for a shard, each through an atomic replace, so either order leaves a valid shard. Teacher
inference runs in a Ray actor pool or in this process (`kd_core/train/inference.py`).
"""

from __future__ import annotations

import json

from kd_core.cache import SYNTHETIC
from kd_core.config import CacheConfig, ComputeConfig
from kd_core.data.shards import read_verified, split_shards
from kd_core.manifest import Manifest
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import FileRecord, Store
from kd_core.tasks import task_of
from kd_core.train.inference import COMMIT_SUFFIX, run_teacher_jobs


def cache(
    config: CacheConfig,
    prep: Manifest,
    teacher: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    force: bool = False,
) -> Manifest:
    task = task_of(prep)
    run = StageRun(store, "cache", task.cache_settings(config), inputs={"prep": prep, "teacher": teacher}, force=force)
    if run.reused:
        return run.reused
    jobs = [
        (record, run.relative(f"shards/{split}-{index:05d}.arrow"), split)
        for split in task.cache_splits()
        for index, record in enumerate(split_shards(prep, split))
    ]
    layout = task.cache_layout(config, prep, store, teacher)
    synthetic = task.synthetic_rows(config, prep, store, run)  # rows the teacher labels besides the data's (tabular: MUNGE)
    jobs += [(record, run.relative(f"shards/{SYNTHETIC}-{index:05d}.arrow"), SYNTHETIC) for index, record in enumerate(synthetic)]
    # An earlier attempt that was killed left finished shards with commit records: keep those.
    finished = {} if force else {output: committed_shard(store, record, output) for record, output, _ in jobs}
    pending = [(record, output) for record, output, _ in jobs if finished.get(output) is None]
    rows_of: dict[str, int] = {}
    with run.timed("teacher_inference"), progress_bar("cache: teacher", total=len(jobs)) as bar:
        for record, rows in [*filter(None, finished.values()), *run_teacher_jobs(config, teacher, store, compute, pending, layout, task, prep.details)]:
            run.record(record)
            rows_of[record.path] = rows
            bar.advance()
    split = prep.details["splits"]["train"]
    cache_bytes = sum(record.bytes for record in run.outputs.values())
    details = {
        "format": layout.format,
        "layout": layout.to_dict(),
        "shards": [
            {"name": run.name_of(output), "split": split, "rows": rows_of[output], "tokens": rows_of[output] * layout.seq_len, "source": token.path}
            for token, output, split in jobs
        ],
    }
    if synthetic:
        details["synthetic_rows"] = {"shards": [run.name_of(record.path) for record in synthetic], "rows": sum(rows_of[out] for _, out, kind in jobs if kind == SYNTHETIC)}
    metrics = {
        "tokens": split["tokens"],
        "bytes": cache_bytes,
        "bytes_per_token": round(cache_bytes / max(split["tokens"], 1), 2),
        "shards_resumed": len(jobs) - len(pending),
    }
    return run.finish(metrics=metrics, details=details)


def committed_shard(store: Store, token_record: FileRecord, output_relative: str) -> tuple[FileRecord, int] | None:
    """The shard (and its row count) an earlier attempt finished for this token shard, if its commit
    record, its bytes and its source all check out; None means it has to be (re)computed."""
    commit = output_relative + COMMIT_SUFFIX
    if not store.exists(commit):
        return None
    try:
        saved = json.loads(store.read_bytes(commit))
        record = FileRecord(**saved["shard"])
        if saved["source_sha256"] != token_record.sha256 or record.path != output_relative:
            return None
        read_verified(store, record)
        return record, int(saved["rows"])
    except (ValueError, KeyError, TypeError):  # unreadable record, or a ShardError: redo the shard
        return None
