"""Teacher inference over whole shards: a Ray actor pool, or this process.

`TeacherWorker` loads the teacher once (through the job's task: `Task.load_cache_teacher`) and
turns token shards into cache shards: it reads and checks a token shard, has the task's teacher
compute its cache columns, writes the shard atomically and then its commit record
(`<shard>.commit.json`: the shard's record and its source token shard's sha256), which is what
lets a rerun of a killed cache keep the shards already done. `run_teacher_jobs` runs a list of
(token shard, output) jobs, each a whole shard, and yields each (record, rows) as it finishes:
- on GPUs (or through Ray Client), on `cache.num_actors` actors of one GPU each (one CPU), which
  take the next job as they finish;
- on CPUs, in `cache.num_actors` Ray tasks that each load the teacher once and work through
  their share of the jobs, yielding as they go (streaming generator tasks). A task's worker
  process outlives it, with torch and the teacher's code imported, and Ray gives it to the run's
  next fit (`kd_core.train.ray_glue`); an actor's process would die with the actor;
- inline with the `local` backend.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict

import torch

from kd_core.cache.format import CacheLayout
from kd_core.config import CacheConfig, ComputeConfig, StorageConfig
from kd_core.data.shards import decode_arrow, encode_arrow, read_verified
from kd_core.manifest import Manifest
from kd_core.models.teacher import teacher_model_dir
from kd_core.storage import FileRecord, Store

COMMIT_SUFFIX = ".commit.json"
"""Beside each finished shard: its record and its source shard's sha256, written after it."""


class TeacherWorker:
    """Loads the teacher once; turns token shards into target shards. Runs as a Ray actor or inline.
    `positions_per_chunk` sets how many positions a language-model teacher's output layer takes
    at once (default: `kd_core.models.inference.default_positions_per_chunk`)."""

    def __init__(
        self, storage: StorageConfig, teacher: Manifest, config: CacheConfig, layout: CacheLayout, task, prep_details: dict,
        threads: int, positions_per_chunk: int | None = None,
    ):
        torch.set_num_threads(threads)
        self.store = Store(storage)
        self.config, self.layout = config, layout
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = task.load_cache_teacher(teacher_model_dir(self.store, teacher), self.device, layout, prep_details, positions_per_chunk)

    def process(self, token_record: FileRecord, output_relative: str) -> tuple[FileRecord, int]:
        shard = decode_arrow(read_verified(self.store, token_record), token_record.url)
        # Draws depend only on the seed and the shard's content: not on which actor runs it, or when.
        seed = zlib.crc32(f"{self.config.seed}:{token_record.sha256}".encode())
        columns = self.teacher.columns(shard, self.config.batch_size, seed)
        rows = len(next(iter(shard.values())))
        payload = encode_arrow(columns, metadata=self.layout.schema_metadata())
        record = self.store.write_bytes(output_relative, payload)
        commit = {"shard": asdict(record), "rows": rows, "source_sha256": token_record.sha256}
        self.store.write_bytes(output_relative + COMMIT_SUFFIX, json.dumps(commit).encode())
        return record, rows


def run_teacher_jobs(
    config: CacheConfig, teacher: Manifest, store: Store, compute: ComputeConfig, jobs: list[tuple[FileRecord, str]],
    layout: CacheLayout, task, prep_details: dict,
) -> Iterator[tuple[FileRecord, int]]:
    """(record, rows) of each (token shard, output) job's cache shard, in the order they finish."""
    if not jobs:
        return
    if compute.backend == "local":
        worker = TeacherWorker(store.config, teacher, config, layout, task, prep_details, threads=torch.get_num_threads())
        for job in jobs:
            yield worker.process(*job)
        return
    import ray
    from ray.util import ActorPool

    from kd_core.train.ray_glue import ensure_ray

    ensure_ray(compute)
    workers = min(config.num_actors, len(jobs))
    if not compute.use_gpu and not ray.util.client.ray.is_connected():  # Ray Client has no streaming generators
        share = ray.remote(num_cpus=1)(teacher_jobs)
        generators = [share.remote(store.config, teacher, config, layout, task, prep_details, jobs[index::workers]) for index in range(workers)]
        try:
            while generators:
                ready, _ = ray.wait(generators, num_returns=1)
                for generator in ready:
                    try:
                        yield ray.get(next(generator))
                    except StopIteration:
                        generators.remove(generator)
        finally:
            for generator in generators:
                ray.cancel(generator)
        return
    actor_class = ray.remote(num_cpus=1, num_gpus=int(compute.use_gpu))(TeacherWorker)
    actors = [actor_class.remote(store.config, teacher, config, layout, task, prep_details, threads=1) for _ in range(workers)]
    try:
        yield from ActorPool(actors).map_unordered(lambda actor, job: actor.process.remote(*job), jobs)
    finally:
        for actor in actors:
            ray.kill(actor)


def teacher_jobs(
    storage: StorageConfig, teacher: Manifest, config: CacheConfig, layout: CacheLayout, task, prep_details: dict,
    jobs: list[tuple[FileRecord, str]],
) -> Iterator[tuple[FileRecord, int]]:
    """A Ray task's share of the jobs, on one thread: the teacher loaded once, each shard's
    (record, rows) yielded as it is written."""
    worker = TeacherWorker(storage, teacher, config, layout, task, prep_details, threads=1)
    for job in jobs:
        yield worker.process(*job)
