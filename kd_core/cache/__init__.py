"""The cache stage: run the teacher once over the training shards and store what students need.

Format `topk` (one Arrow IPC file per training shard, rows aligned with the token shard):

| column                | type                                   | meaning                              |
|-----------------------|----------------------------------------|--------------------------------------|
| `topk_ids`            | fixed_size_list<uint16 or int32>[T·k]  | the k most likely next-token ids     |
| `topk_logprobs`       | fixed_size_list<float16>[T·k]          | their log-probs at `cache.temperature`|
| `entropy`             | fixed_size_list<float16>[T]            | the teacher's full predictive entropy|

Position t of a row describes the teacher's distribution over the token after input t.

Resumable: each shard is written atomically, then a commit record beside it
(`<shard>.commit.json`: the shard's size and sha256, and its source token shard's sha256). A rerun
of a killed job keeps every shard whose commit record, bytes and source check out and computes the
rest; teacher inference is deterministic, so the result is byte-identical to an uninterrupted run.
Teacher inference runs in a Ray actor pool (each actor loads the teacher once and processes whole
shards), or in this process when `compute.backend` is `local`.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict

import numpy as np
import torch

from kd_core.config import CacheConfig, ComputeConfig, StorageConfig
from kd_core.data.shards import decode_arrow, encode_arrow, read_verified, split_shards
from kd_core.losses.sampled import draw_teacher_samples
from kd_core.manifest import Manifest
from kd_core.models import load_causal_lm
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import FileRecord, Store
from kd_core.train.teacher import teacher_model_dir


COMMIT_SUFFIX = ".commit.json"
"""Beside each finished shard: its record and its source shard's sha256, written after it."""


def cache(
    config: CacheConfig,
    prep: Manifest,
    teacher: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    force: bool = False,
) -> Manifest:
    run = StageRun(store, "cache", config, inputs={"prep": prep, "teacher": teacher}, force=force)
    if run.reused:
        return run.reused
    token_shards = split_shards(prep, "train")
    jobs = [(record, run.relative(f"shards/train-{index:05d}.arrow")) for index, record in enumerate(token_shards)]
    vocab_size = prep.details["vocab_size"]
    # An earlier attempt that was killed left finished shards with commit records: keep those.
    finished = {} if force else {job[1]: committed_shard(store, *job) for job in jobs}
    pending = [job for job in jobs if finished.get(job[1]) is None]
    with run.timed("teacher_inference"), progress_bar("cache: teacher", total=len(jobs)) as bar:
        for record in filter(None, finished.values()):
            run.record(record)
            bar.advance()
        for record in _run_jobs(config, teacher, store, compute, pending, vocab_size):
            run.record(record)
            bar.advance()
    tokens = prep.details["splits"]["train"]["tokens"]
    cache_bytes = sum(record.bytes for record in run.outputs.values())
    details = {
        "format": config.format,
        "top_k": config.top_k if config.format == "topk" else 0,
        "num_samples": config.num_samples if config.format == "sampled" else 0,
        "vocab_size": vocab_size,
        "shards": [run.name_of(output) for _, output in jobs],
    }
    metrics = {
        "tokens": tokens,
        "bytes": cache_bytes,
        "bytes_per_token": round(cache_bytes / max(tokens, 1), 2),
        "shards_resumed": len(jobs) - len(pending),
    }
    return run.finish(metrics=metrics, details=details)


def committed_shard(store: Store, token_record: FileRecord, output_relative: str) -> FileRecord | None:
    """The shard an earlier attempt finished for this token shard, if its commit record, its bytes
    and its source all check out; None means it has to be (re)computed."""
    commit = output_relative + COMMIT_SUFFIX
    if not store.exists(commit):
        return None
    try:
        saved = json.loads(store.read_bytes(commit))
        record = FileRecord(**saved["shard"])
        if saved["source_sha256"] != token_record.sha256 or record.path != output_relative:
            return None
        read_verified(store, record)
    except (ValueError, KeyError, TypeError):  # unreadable record, or a ShardError: redo the shard
        return None
    return record


def _run_jobs(config, teacher, store, compute, jobs, vocab_size):
    if not jobs:
        return
    if compute.backend == "local":
        worker = TeacherWorker(store.config, teacher, config, vocab_size, threads=torch.get_num_threads())
        for job in jobs:
            yield worker.process(*job)
        return
    import ray
    from ray.util import ActorPool

    from kd_core.train.ray_glue import ensure_ray

    ensure_ray(compute)
    actor_class = ray.remote(num_cpus=1, num_gpus=1 if compute.use_gpu else 0)(TeacherWorker)
    actors = [
        actor_class.remote(store.config, teacher, config, vocab_size, threads=1)
        for _ in range(min(config.num_actors, len(jobs)))
    ]
    try:
        yield from ActorPool(actors).map_unordered(lambda actor, job: actor.process.remote(*job), jobs)
    finally:
        for actor in actors:
            ray.kill(actor)


class TeacherWorker:
    """Loads the teacher once; turns token shards into target shards. Runs as a Ray actor or inline."""

    def __init__(self, storage: StorageConfig, teacher: Manifest, config: CacheConfig, vocab_size: int, threads: int):
        torch.set_num_threads(threads)
        self.store = Store(storage)
        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(teacher_model_dir(self.store, teacher)).to(self.device)
        self.id_dtype = torch.uint16 if vocab_size <= 65536 else torch.int32

    def process(self, token_record: FileRecord, output_relative: str) -> FileRecord:
        rows = decode_arrow(read_verified(self.store, token_record), token_record.url)["input_ids"]
        # Draws depend only on the seed and the shard's content: not on which actor runs it, or when.
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.config.seed}:{token_record.sha256}".encode()))
        payload = encode_arrow(self.columns(rows, generator))
        record = self.store.write_bytes(output_relative, payload)
        commit = {"shard": asdict(record), "source_sha256": token_record.sha256}
        self.store.write_bytes(output_relative + COMMIT_SUFFIX, json.dumps(commit).encode())
        return record

    @torch.no_grad()
    def columns(self, rows: np.ndarray, generator: torch.Generator) -> dict[str, np.ndarray]:
        """The shard's Arrow columns, each (rows, width): the format's targets and the entropy."""
        blocks: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(rows), self.config.batch_size):
            batch = torch.as_tensor(rows[start : start + self.config.batch_size], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=batch).logits.float()
            teacher_logprobs = torch.log_softmax(logits / self.config.temperature, dim=-1)
            for name, values in self._format_targets(teacher_logprobs, generator).items():
                blocks.setdefault(name, []).append(values.cpu().numpy().reshape(len(batch), -1))
            entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1)
            blocks.setdefault("entropy", []).append(entropy.cpu().numpy().astype(np.float16))
        return {name: np.concatenate(parts) for name, parts in blocks.items()}

    def _format_targets(self, teacher_logprobs: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.config.format == "topk":
            top = teacher_logprobs.topk(self.config.top_k, dim=-1)
            return {"topk_ids": top.indices.to(self.id_dtype), "topk_logprobs": top.values.half()}
        ids, counts = draw_teacher_samples(teacher_logprobs.cpu(), self.config.num_samples, generator=generator)
        return {"sample_ids": ids.to(self.id_dtype), "sample_counts": counts.to(torch.uint8)}
