"""The cache stage: run the teacher once over the training shards and store what students need.

One cache shard per training token shard (for `task: reward`, per validation shard too), aligned
row for row, in the bit-packed Arrow format of
`kd_core.cache.format` (top-k, sampled or full log-probs, the teacher's entropy, optionally its
hidden states; for `task: reward`, the reward teacher's scores of each pair's two responses);
the manifest's `details["layout"]` says how to decode them, and lists each shard's rows, tokens,
bytes and sha256.

Resumable: each shard is written atomically, then a commit record beside it
(`<shard>.commit.json`: the shard's size and sha256, and its source token shard's sha256). A rerun
of a killed job keeps every shard whose commit record, bytes and source check out and computes the
rest; teacher inference is deterministic, so the result is byte-identical to an uninterrupted run.
Two writers of the same cache write the same bytes for a shard, each through an atomic replace,
so either order leaves a valid shard. Teacher inference runs in a Ray actor pool (each actor
loads the teacher once and processes whole shards), or in this process when `compute.backend` is
`local`; a language-model teacher runs its output layer chunk by chunk over positions, in its own
dtype on a GPU (`kd_core.cache.inference`).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict

import numpy as np
import torch

from kd_core.cache.format import CacheLayout
from kd_core.cache.inference import CausalLMTeacher, teacher_dtype
from kd_core.config import CacheConfig, ComputeConfig, StorageConfig
from kd_core.data.shards import decode_arrow, encode_arrow, read_verified, split_shards
from kd_core.errors import InputError
from kd_core.manifest import Manifest
from kd_core.models import load_causal_lm
from kd_core.models.reward import load_reward_model, text_rewards
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import FileRecord, Store
from kd_core.train.step import trim_padding

class CacheSettingsError(InputError):
    """Cache settings this teacher and data cannot satisfy, found before any teacher inference."""


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
    # A reward teacher also scores the validation pairs (two floats a pair): what a `kdflow tune`
    # trial measures its student against. Language-model trials validate on the tokens themselves.
    splits = ["train", "val"] if prep.details.get("task") == "reward" else ["train"]
    jobs = [
        (record, run.relative(f"shards/{split}-{index:05d}.arrow"), split)
        for split in splits
        for index, record in enumerate(split_shards(prep, split))
    ]
    layout = cache_layout(config, prep, store, teacher)
    # An earlier attempt that was killed left finished shards with commit records: keep those.
    finished = {} if force else {output: committed_shard(store, record, output) for record, output, _ in jobs}
    pending = [(record, output) for record, output, _ in jobs if finished.get(output) is None]
    rows_of: dict[str, int] = {}
    with run.timed("teacher_inference"), progress_bar("cache: teacher", total=len(jobs)) as bar:
        for record, rows in [*filter(None, finished.values()), *_run_jobs(config, teacher, store, compute, pending, layout, prep.details.get("pad_id", 1))]:
            run.record(record)
            rows_of[record.path] = rows
            bar.advance()
    split = prep.details["splits"]["train"]
    cache_bytes = sum(record.bytes for record in run.outputs.values())
    details = {
        "format": config.format,
        "layout": layout.to_dict(),
        "shards": [
            {"name": run.name_of(output), "split": split, "rows": rows_of[output], "tokens": rows_of[output] * layout.seq_len, "source": token.path}
            for token, output, split in jobs
        ],
    }
    metrics = {
        "tokens": split["tokens"],
        "bytes": cache_bytes,
        "bytes_per_token": round(cache_bytes / max(split["tokens"], 1), 2),
        "shards_resumed": len(jobs) - len(pending),
    }
    return run.finish(metrics=metrics, details=details)


def cache_layout(config: CacheConfig, prep: Manifest, store: Store, teacher: Manifest) -> CacheLayout:
    """The layout of this cache: the data's vocabulary and row length, the teacher's hidden size,
    the format settings."""
    from kd_core.train.teacher import teacher_model_config  # the trainer imports this package's format

    if prep.details.get("task") == "reward":  # one score per response: nothing to choose
        return CacheLayout(format="reward", seq_len=prep.details["seq_len"], vocab_size=prep.details["vocab_size"], slots=1)
    model_config = teacher_model_config(store, teacher)
    data_vocab, teacher_vocab = prep.details["vocab_size"], model_config["vocab_size"]
    if teacher_vocab < data_vocab:
        raise CacheSettingsError(
            f"teacher: it predicts {teacher_vocab} tokens (config.json vocab_size) but the prepared data's tokenizer has "
            f"{data_vocab}; prepare the data with the teacher's own tokenizer (data.tokenizer: the teacher's folder)"
        )
    if config.format == "topk" and config.top_k > data_vocab:
        raise CacheSettingsError(f"cache.top_k: {config.top_k} is more than the vocabulary's {data_vocab} tokens; set cache.top_k <= {data_vocab}")
    if config.format == "full" and data_vocab > config.full_max_vocab:
        raise CacheSettingsError(
            f"cache.format: 'full' is for vocabularies up to cache.full_max_vocab ({config.full_max_vocab}); "
            f"the data has {data_vocab}: use topk or sampled"
        )
    layers = model_config.get("num_hidden_layers", model_config.get("n_layer", 0))  # GPT-2 configs name it n_layer
    for layer in config.hidden_layers:
        if not 0 <= layer <= layers:
            raise CacheSettingsError(f"cache.hidden_layers: {layer} is not a hidden state of the teacher (0..{layers}); pick layers in that range")
    # A teacher output layer padded past the tokenizer (e.g. 152064 logits for 151936 tokens) is cut
    # to the data's vocabulary: the cache describes the distribution over real tokens only.
    hidden_size = model_config.get("hidden_size", model_config.get("n_embd", 0))
    return CacheLayout.from_config(config, prep.details["seq_len"], data_vocab, hidden_size)


def cache_shards(cache_manifest: Manifest, split: str = "train") -> list[FileRecord]:
    """The cache's shard records of a split, in the order of that split's token shards (a reward
    cache also holds `val`; shards listed without a split are `train`)."""
    shards = cache_manifest.details["shards"]
    return [cache_manifest.output(shard["name"]) for shard in shards if shard.get("split", "train") == split]


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


def _run_jobs(config, teacher, store, compute, jobs, layout, pad_id):
    if not jobs:
        return
    if compute.backend == "local":
        worker = TeacherWorker(store.config, teacher, config, layout, threads=torch.get_num_threads(), pad_id=pad_id)
        for job in jobs:
            yield worker.process(*job)
        return
    import ray
    from ray.util import ActorPool

    from kd_core.train.ray_glue import ensure_ray

    ensure_ray(compute)
    actor_class = ray.remote(num_cpus=1, num_gpus=1 if compute.use_gpu else 0)(TeacherWorker)
    actors = [
        actor_class.remote(store.config, teacher, config, layout, threads=1, pad_id=pad_id)
        for _ in range(min(config.num_actors, len(jobs)))
    ]
    try:
        yield from ActorPool(actors).map_unordered(lambda actor, job: actor.process.remote(*job), jobs)
    finally:
        for actor in actors:
            ray.kill(actor)


class TeacherWorker:
    """Loads the teacher once; turns token shards into target shards. Runs as a Ray actor or inline.
    `positions_per_chunk` sets how many positions a language-model teacher's output layer takes
    at once (default: `kd_core.cache.inference.default_positions_per_chunk`)."""

    def __init__(
        self, storage: StorageConfig, teacher: Manifest, config: CacheConfig, layout: CacheLayout, threads: int, pad_id: int = 1,
        positions_per_chunk: int | None = None,
    ):
        from kd_core.train.teacher import teacher_model_dir

        torch.set_num_threads(threads)
        self.store = Store(storage)
        self.config, self.layout = config, layout
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model_dir = teacher_model_dir(self.store, teacher)
        if layout.format == "reward":
            self.model = load_reward_model(model_dir).to(self.device).eval()
        else:
            self.model = load_causal_lm(model_dir, dtype=teacher_dtype(self.device)).to(self.device).eval()
            self.teacher = CausalLMTeacher(self.model, layout, positions_per_chunk)
        self.pad_id = pad_id

    def process(self, token_record: FileRecord, output_relative: str) -> tuple[FileRecord, int]:
        shard = decode_arrow(read_verified(self.store, token_record), token_record.url)
        if self.layout.format == "reward":
            columns = self.reward_columns(shard)
        else:
            # Draws depend only on the seed and the shard's content: not on which actor runs it, or when.
            seed = zlib.crc32(f"{self.config.seed}:{token_record.sha256}".encode())
            generator = torch.Generator(device=self.device).manual_seed(seed)
            columns = self.teacher.columns(shard["input_ids"], self.config.batch_size, generator)
        rows = len(next(iter(shard.values())))
        payload = encode_arrow(columns, metadata=self.layout.schema_metadata())
        record = self.store.write_bytes(output_relative, payload)
        commit = {"shard": asdict(record), "rows": rows, "source_sha256": token_record.sha256}
        self.store.write_bytes(output_relative + COMMIT_SUFFIX, json.dumps(commit).encode())
        return record, rows

    @torch.no_grad()
    def reward_columns(self, shard: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reward teacher's scores of both responses of every pair, from the text view."""
        scores: dict[str, list[np.ndarray]] = {"teacher_chosen": [], "teacher_rejected": []}
        for start in range(0, len(shard["text_chosen_ids"]), self.config.batch_size):
            for name, column in (("teacher_chosen", "text_chosen_ids"), ("teacher_rejected", "text_rejected_ids")):
                ids = torch.as_tensor(shard[column][start : start + self.config.batch_size], dtype=torch.long, device=self.device)
                ids = trim_padding(ids, self.pad_id)
                scores[name].append(text_rewards(self.model, ids, self.pad_id).cpu().numpy())
        return {name: np.concatenate(parts).astype(np.float32).reshape(-1, 1) for name, parts in scores.items()}
