"""Teacher cache: bytes per token of each format, and reader throughput beside the trainer's appetite.

1. Size. The job's teacher (trained or reused through the pipeline) runs once over `--rows`
   training rows; the same log-probs are then encoded in every format and written as the cache
   writes them (Arrow IPC). Reported: bytes per token (everything: ids, log-probs, tail, entropy,
   Arrow framing), bytes per kept top-k entry (the packed ids + log-probs alone), and the fidelity
   of the decoded top-k: mean KL(exact ‖ decoded) over the k+1 outcomes (top-k ids + tail).
2. Reader. `--shards` copies of the top-k shard (with their token shards) are streamed once by
   `TrainingStream` (sha256 checks, decoding, shuffle buffer, prefetch) from local disk and from a
   moto S3 server on loopback, batched by a DataLoader as the trainer does. Printed beside the
   trainer's own consumption: tokens/s of distillation steps of the job's student on this machine.

    .venv/bin/python benchmarks/cache.py                      # the demo job (configs/demo.yaml)
    .venv/bin/python benchmarks/cache.py configs/tiny.yaml compute.backend=local --rows 64

Appends a record (machine, date, command, versions) to benchmarks/results/cache.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

from kd_core.cache.format import CacheLayout  # noqa: E402
from kd_core.config import StorageConfig, load_config  # noqa: E402
from kd_core.data.prep import prep  # noqa: E402
from kd_core.data.shards import encode_arrow, load_split  # noqa: E402
from kd_core.data.stream import TrainingStream, collate  # noqa: E402
from kd_core.devtools import loopback_s3  # noqa: E402
from kd_core.losses import DistillationObjective  # noqa: E402
from kd_core.models import build_causal_lm, load_causal_lm  # noqa: E402
from kd_core.storage import Store  # noqa: E402
from kd_core.train.loop import make_optimizer  # noqa: E402
from kd_core.train.step import PlainRunner, StudentStep  # noqa: E402
from kd_core.train.teacher import teacher, teacher_model_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cache.jsonl"
PEER_TOPK_BYTES_PER_TOKEN = "114-300 (DistillKit, compressed top-k)"


def variants(config) -> list[tuple[str, object]]:
    """(label, cache config) for each format measured."""
    base = config.cache
    k = base.top_k
    chosen = [
        (f"topk-{k} 8-bit log-probs + tail", base.model_copy(update={"format": "topk", "logprob_bits": 8})),
        (f"topk-{k} 12-bit log-probs + tail (default)", base.model_copy(update={"format": "topk", "logprob_bits": 12})),
        (f"topk-{k} 16-bit log-probs + tail", base.model_copy(update={"format": "topk", "logprob_bits": 16})),
        (f"topk-{k} 12-bit, no tail", base.model_copy(update={"format": "topk", "logprob_bits": 12, "tail_mass": False})),
        (f"sampled-{base.num_samples}", base.model_copy(update={"format": "sampled"})),
    ]
    if config.data.vocab_size <= base.full_max_vocab:
        chosen.append(("full (float16)", base.model_copy(update={"format": "full"})))
    return chosen


def teacher_logprobs(config, store, prepared, taught, rows: int) -> tuple[np.ndarray, torch.Tensor]:
    tokens = load_split(store, prepared, "train", max_rows=rows)
    model = load_causal_lm(teacher_model_dir(store, taught)).eval()
    with torch.no_grad():
        parts = [
            torch.log_softmax(model(input_ids=torch.from_numpy(tokens[start : start + 32])).logits.float() / config.cache.temperature, -1)
            for start in range(0, len(tokens), 32)
        ]
    return tokens, torch.cat(parts)


def coarsened_kl(exact: torch.Tensor, ids: np.ndarray, decoded: np.ndarray) -> float:
    """Mean KL(exact ‖ decoded) over {the k kept ids, the rest}, the distribution the loss sees."""
    p = exact.gather(-1, torch.from_numpy(ids).long()).exp().double()
    q = torch.from_numpy(decoded).exp().double()
    p_all = torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(1e-12)], -1)
    q_all = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp_min(1e-12)], -1)
    return float((p_all * (p_all.log() - q_all.log())).sum(-1).mean())


def measure_sizes(config, logprobs: torch.Tensor) -> list[dict]:
    rows, seq_len, vocab = logprobs.shape
    tokens = rows * seq_len
    results = []
    for label, cache_config in variants(config):
        layout = CacheLayout.from_config(cache_config, seq_len, vocab)
        columns = layout.encode(logprobs, torch.Generator().manual_seed(0), {})
        payload = encode_arrow(columns, layout.schema_metadata())
        row = {"format": label, "bytes_per_token": len(payload) / tokens}
        if layout.format == "topk":
            row["bytes_per_entry"] = columns["topk_packed"].nbytes / (tokens * layout.slots)
            decoded = layout.decode(columns)
            row["kl_exact_to_decoded"] = coarsened_kl(logprobs, decoded["teacher_topk_ids"], decoded["teacher_topk_logprobs"])
        results.append(row)
    # What the previous (unpacked) layout spent: uint16/int32 ids and float16 log-probs, 4+ bytes an entry.
    id_bytes = 2 if vocab <= 65536 else 4
    results.append({"format": f"topk-{config.cache.top_k} unpacked (ids + float16)", "bytes_entry_reference": id_bytes + 2})
    return results


def write_shards(store: Store, tokens: np.ndarray, columns: dict, layout: CacheLayout, copies: int):
    token_records, cache_records = [], []
    token_payload = encode_arrow({"input_ids": tokens.astype(np.int32)})
    cache_payload = encode_arrow(columns, layout.schema_metadata())
    for index in range(copies):
        token_records.append(store.write_bytes(f"tokens/train-{index:05d}.arrow", token_payload))
        cache_records.append(store.write_bytes(f"cache/train-{index:05d}.arrow", cache_payload))
    return token_records, cache_records


def reader_throughput(storage: StorageConfig, tokens, columns, layout, copies, batch_size) -> dict:
    store = Store(storage)
    token_records, cache_records = write_shards(store, tokens, columns, layout, copies)
    stream = TrainingStream(storage, token_records, cache_shards=cache_records, cache_layout=layout, epochs=1)
    started, served = time.perf_counter(), 0
    for batch in DataLoader(stream, batch_size=batch_size, collate_fn=collate):
        served += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    return {"tokens": served, "seconds": seconds, "tokens_per_s": served / seconds}


def trainer_consumption(config, layout: CacheLayout, decoded: dict, tokens: np.ndarray, steps: int) -> float:
    """Tokens/s of distillation steps of the job's student on this machine (data already in memory)."""
    model = build_causal_lm(config.student.architecture, config.data.vocab_size, layout.seq_len, seed=0)
    objective = DistillationObjective(**config.distill.loss.model_dump(exclude={"fused", "fused_chunk_size"}))
    module = StudentStep(model, objective)
    runner = PlainRunner(module, *make_optimizer(module, config.distill.train), grad_clip=1.0)
    size = config.distill.train.batch_size
    batch = {"input_ids": torch.from_numpy(tokens[:size].astype(np.int64))}
    batch |= {name: torch.from_numpy(values[:size]) for name, values in decoded.items()}
    runner.step([batch])  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        runner.step([batch])
    return steps * batch["input_ids"].numel() / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rows", type=int, default=512, help="training rows run through the teacher")
    parser.add_argument("--shards", type=int, default=8, help="shard copies streamed by the reader")
    parser.add_argument("--train-steps", type=int, default=5, help="student steps timed for the consumption rate")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    store = Store(config.storage)
    prepared = prep(config.data, store)
    taught = teacher(config.teacher, prepared, store, config.compute)
    tokens, logprobs = teacher_logprobs(config, store, prepared, taught, args.rows)
    torch.set_num_threads(os.cpu_count() or 1)

    sizes = measure_sizes(config, logprobs)
    print(f"\nbytes per token, {logprobs.shape[0] * logprobs.shape[1]:,} tokens, vocabulary {logprobs.shape[2]:,}")
    print(f"{'format':<42}{'bytes/token':>12}{'bytes/entry':>12}{'KL(exact||decoded)':>20}")
    for row in sizes:
        entry = row.get("bytes_per_entry", row.get("bytes_entry_reference"))
        per_token = f"{row['bytes_per_token']:.2f}" if "bytes_per_token" in row else "—"
        fidelity = f"{row['kl_exact_to_decoded']:.2e}" if "kl_exact_to_decoded" in row else "—"
        print(f"{row['format']:<42}{per_token:>12}{'—' if entry is None else f'{entry:.3f}':>12}{fidelity:>20}")
    print(f"{'peer: ' + PEER_TOPK_BYTES_PER_TOKEN:<42}")

    layout = CacheLayout.from_config(config.cache.model_copy(update={"format": "topk"}), tokens.shape[1], logprobs.shape[2])
    columns = layout.encode(logprobs, torch.Generator(), {})
    batch_size = config.distill.train.batch_size
    with tempfile.TemporaryDirectory(prefix="kdflow-cache-bench-") as folder:
        local = reader_throughput(StorageConfig(root=folder), tokens, columns, layout, args.shards, batch_size)
    with loopback_s3() as endpoint:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("kdflow-bench")
        s3 = reader_throughput(
            StorageConfig(root="s3://kdflow-bench/cache", s3={"endpoint_url": endpoint}), tokens, columns, layout, args.shards, batch_size
        )
    consumption = trainer_consumption(config, layout, layout.decode(columns), tokens, args.train_steps)
    print(f"\nreader, top-{layout.slots} cache, {local['tokens']:,} tokens in batches of {batch_size} rows")
    print(f"{'source':<28}{'tokens/s':>14}{'x trainer':>12}")
    for name, result in (("local disk", local), ("moto S3 (loopback)", s3)):
        print(f"{name:<28}{result['tokens_per_s']:>14,.0f}{result['tokens_per_s'] / consumption:>12.1f}")
    print(f"{'trainer consumes (student)':<28}{consumption:>14,.0f}{1.0:>12.1f}")

    command = f"python benchmarks/cache.py {args.config} {' '.join(args.overrides)} --rows {args.rows} --shards {args.shards}"
    fields = {
        "vocab_size": int(logprobs.shape[2]),
        "tokens_measured": int(logprobs.shape[0] * logprobs.shape[1]),
        "sizes": sizes,
        "reader_local": local,
        "reader_s3": s3,
        "trainer_tokens_per_s": consumption,
    }
    append_result(args.results, command, fields)


if __name__ == "__main__":
    main()
