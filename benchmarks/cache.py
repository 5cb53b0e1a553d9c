"""Teacher cache: bytes per token of each format, reader throughput beside the trainer's appetite,
and the teacher's peak memory per batch, whole against chunked.

1. Size. The job's teacher (trained or reused through the pipeline) runs once over `--rows`
   training rows; the same log-probs are then encoded in every format and written as the cache
   writes them (Arrow IPC). Reported: bytes per token (everything: ids, log-probs, tail, entropy,
   Arrow framing), bytes per kept top-k entry (the packed ids + log-probs alone), and the fidelity
   of the decoded top-k: mean KL(exact ‖ decoded) over the k+1 outcomes (top-k ids + tail).
2. Reader. `--shards` copies of the top-k shard (with their token shards) are streamed once by
   `TrainingStream` (sha256 checks, decoding, shuffle buffer, prefetch) from local disk and from a
   moto S3 server on loopback, batched by a DataLoader as the trainer does. Printed beside the
   trainer's own consumption: tokens/s of distillation steps of the job's student on this machine.

3. Teacher memory. Peak memory of teacher inference for one batch against batch × T × V: a
   random one-layer Llama teacher (H = `--memory-hidden`) with the job's cache format, the whole
   batch's float32 logits and log-softmax at once (the cache before kdflow chunked it: the
   reference `full_materialisation_columns` of tests/test_cache.py) beside the cache's
   `CausalLMTeacher` (the output layer chunk by chunk over positions, `LOGITS_CHUNK_BYTES` of
   float32 log-probs per chunk). Each case runs in its own process; reported: the peak resident
   memory above the process's before the batch (MB, from `getrusage`), the peak bytes of live
   tensors (MB, `kd_core.devtools.tensor_bytes`: exact, allocator-independent) and seconds, with
   chunked/whole ratios. Whole-batch cases estimated above `--memory-limit-gb` are skipped.

    .venv/bin/python benchmarks/cache.py                      # the demo job (configs/demo.yaml)
    .venv/bin/python benchmarks/cache.py configs/tiny.yaml compute.backend=local --rows 64
    .venv/bin/python benchmarks/cache.py --memory-only --memory-sizes 4x512x32000 8x1024x32000

Appends a record (machine, date, command, versions) to benchmarks/results/cache.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from results_log import append_result  # noqa: E402
from test_cache import full_materialisation_columns  # noqa: E402

from kd_core.cache.format import CacheLayout  # noqa: E402
from kd_core.models.inference import CausalLMTeacher  # noqa: E402
from kd_core.config import StorageConfig  # noqa: E402
from kd_core.job import load_config  # noqa: E402
from kd_core.stages.prep import prep  # noqa: E402
from kd_core.data.shards import encode_arrow, load_split  # noqa: E402
from kd_core.data.stream import TrainingStream, collate  # noqa: E402
from kd_core.devtools import loopback_s3, tensor_bytes  # noqa: E402
from kd_core.losses import DistillationObjective, TeacherTargets  # noqa: E402
from kd_core.models import build_causal_lm, load_causal_lm  # noqa: E402
from kd_core.storage import Store  # noqa: E402
from kd_core.train.loop import make_optimizer  # noqa: E402
from kd_core.tasks.causal_lm_step import CausalLMStep  # noqa: E402
from kd_core.train.step import PlainRunner  # noqa: E402
from kd_core.stages.teacher import teacher  # noqa: E402
from kd_core.models.teacher import teacher_model_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cache.jsonl"
MEMORY_SIZES = ("4x512x32000", "8x1024x32000", "2x1024x128256", "4x1024x128256")
"""batch x T x V of the teacher-memory cases: up to 1 GiB of float32 logits per batch."""
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
    objective = DistillationObjective.from_config(config.distill.loss, student_hidden_size=None, teacher_hidden_size=None)
    module = CausalLMStep(model, objective)
    runner = PlainRunner(module, *make_optimizer(module, config.distill.train), grad_clip=1.0)
    size = config.distill.train.batch_size
    batch = {"input_ids": torch.from_numpy(tokens[:size].astype(np.int64))}
    batch |= {name: torch.from_numpy(values[:size]) for name, values in decoded.items()}
    micro_batch = (batch, TeacherTargets.from_batch(batch))
    runner.step([micro_batch])  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        runner.step([micro_batch])
    return steps * batch["input_ids"].numel() / (time.perf_counter() - started)


# ------------------------------------------------------------------------------- teacher memory
def random_teacher(vocab_size: int, seq_len: int, hidden_size: int):
    """A random one-layer Llama: its output layer, not its body, is what grows with V."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len)
    return LlamaForCausalLM(config).eval()


def teacher_memory_case(cache_config, implementation: str, batch: int, seq_len: int, vocab: int, hidden: int) -> dict:
    """One batch through the teacher in this process, `whole` or `chunked`: the peak resident
    memory above the process's before the batch, the peak live tensor bytes, seconds."""
    model = random_teacher(vocab, seq_len, hidden)
    layout = CacheLayout.from_config(cache_config, seq_len, vocab)
    rows = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).numpy()
    if implementation == "whole":
        def run(rows):
            return full_materialisation_columns(model, rows, layout, batch, torch.Generator())
    else:
        teacher = CausalLMTeacher(model, layout)
        def run(rows):
            return teacher.columns(rows, batch, torch.Generator())
    run(rows[:1])  # warm-up: one row
    Path("/proc/self/clear_refs").write_text("5")  # restart the kernel's peak-resident count (VmHWM) here
    resident_before = _status_mb("VmRSS")
    started = time.perf_counter()
    with tensor_bytes() as tensors:
        run(rows)
    seconds = time.perf_counter() - started
    return {"peak_rss_mb": _status_mb("VmHWM") - resident_before, "peak_tensor_mb": tensors.peak / 2**20, "seconds": seconds}


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure_teacher_memory(args) -> list[dict]:
    """Every `--memory-sizes` case, whole and chunked, each in a fresh process."""
    cases = []
    for size in args.memory_sizes:
        batch, seq_len, vocab = (int(part) for part in size.split("x"))
        case = {"batch": batch, "seq_len": seq_len, "vocab": vocab, "logits_mb": batch * seq_len * vocab * 4 / 2**20}
        for implementation in ("whole", "chunked"):
            # The whole batch peaks at about 5 float32 (batch, T, V) tensors (measured: logits, log-probs, the temporaries of tail and entropy).
            if implementation == "whole" and 5 * case["logits_mb"] / 1024 > args.memory_limit_gb:
                case[implementation] = f"skipped (needs ~{5 * case['logits_mb'] / 1024:.0f} GB)"
                continue
            command = [sys.executable, __file__, args.config, *args.overrides, "--memory-hidden", str(args.memory_hidden),
                       "--one-memory", implementation, str(batch), str(seq_len), str(vocab)]
            result = subprocess.run(command, capture_output=True, text=True)
            failed = f"failed ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode})"
            case[implementation] = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else failed
        cases.append(case)
    return cases


def print_teacher_memory(cases: list[dict], hidden: int) -> None:
    print(f"\nteacher memory per batch (random 1-layer Llama, H={hidden}, CPU float32): whole batch vs chunked output layer")
    print(f"{'batch x T x V':>18}{'logits MB':>11} | {'whole RSS MB':>13}{'tensors MB':>11}{'s':>7} | "
          f"{'chunked RSS MB':>15}{'tensors MB':>11}{'s':>7} | {'chunked/whole RSS, tensors, time':>34}")
    for case in cases:
        cells = []
        for implementation in ("whole", "chunked"):
            value = case[implementation]
            width = 31 if implementation == "whole" else 33
            cells.append(f"{value['peak_rss_mb']:>{width - 18}.0f}{value['peak_tensor_mb']:>11.0f}{value['seconds']:>7.1f}"
                         if isinstance(value, dict) else f"{value:>{width}}")
        whole, chunked = case["whole"], case["chunked"]
        ratios = (f"{chunked['peak_rss_mb'] / whole['peak_rss_mb']:.1%}, {chunked['peak_tensor_mb'] / whole['peak_tensor_mb']:.1%}, "
                  f"{chunked['seconds'] / whole['seconds']:.2f}x") if isinstance(whole, dict) and isinstance(chunked, dict) else "-"
        size = f"{case['batch']}x{case['seq_len']}x{case['vocab']}"
        print(f"{size:>18}{case['logits_mb']:>11.0f} | {cells[0]} | {cells[1]} | {ratios:>34}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rows", type=int, default=512, help="training rows run through the teacher")
    parser.add_argument("--shards", type=int, default=8, help="shard copies streamed by the reader")
    parser.add_argument("--train-steps", type=int, default=5, help="student steps timed for the consumption rate")
    parser.add_argument("--memory-sizes", nargs="+", default=list(MEMORY_SIZES), help="batch x T x V of the teacher-memory cases")
    parser.add_argument("--memory-hidden", type=int, default=256, help="H of the teacher-memory cases' random teacher")
    parser.add_argument("--memory-limit-gb", type=float, default=6.0, help="skip whole-batch cases estimated above this")
    parser.add_argument("--memory-only", action="store_true", help="only the teacher-memory cases (no prep, teacher or cache)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--one-memory", nargs=4, metavar=("IMPL", "BATCH", "T", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if args.one_memory:
        implementation, *shape = args.one_memory
        print(json.dumps(teacher_memory_case(config.cache, implementation, *map(int, shape), args.memory_hidden)))
        return
    fields = {} if args.memory_only else format_and_reader_fields(config, args)
    fields["teacher_memory"] = measure_teacher_memory(args)
    print_teacher_memory(fields["teacher_memory"], args.memory_hidden)
    command = f"python benchmarks/cache.py {args.config} {' '.join(args.overrides)}" + (
        " --memory-only" if args.memory_only else f" --rows {args.rows} --shards {args.shards}"
    ) + f" --memory-sizes {' '.join(args.memory_sizes)} --memory-hidden {args.memory_hidden}"
    append_result(args.results, command, fields | {"memory_hidden": args.memory_hidden})


def format_and_reader_fields(config, args) -> dict:
    """Parts 1 and 2: bytes per token of each format, the reader's and the trainer's tokens/s."""
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

    return {
        "vocab_size": int(logprobs.shape[2]),
        "tokens_measured": int(logprobs.shape[0] * logprobs.shape[1]),
        "sizes": sizes,
        "reader_local": local,
        "reader_s3": s3,
        "trainer_tokens_per_s": consumption,
    }


if __name__ == "__main__":
    main()
