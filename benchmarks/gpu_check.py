"""The distill stage's GPU check: kdflow's DeepSpeed trainer against a plain DeepSpeed step.

One process, one GPU, no Ray: it calls `train_worker`, the code each Ray Train worker runs, so the
GPU machine needs only torch, transformers and deepspeed (`benchmarks/gpu_check.sh` sets that up).
Everything is built from config with random weights (nothing is downloaded):

- data: uniform random token rows over a synthetic word-level vocabulary, written as prep shards;
- student ~0.5B and teacher ~1.5B parameters (Llama-style, shaped like Qwen2-0.5B / -1.5B with
  their 151,936-entry vocabulary); the teacher is saved as safetensors like any teacher step.

Side by side, at batch 8 × 1024 tokens, bf16:
- `plain ZeRO-2`, `plain ZeRO-3`: the baseline of ../shared/BASELINES.md. A student DeepSpeed
  engine and an optimizer-free teacher engine; forward KL on materialised fp32 logits.
- `kdflow ZeRO-3 online`: `train_worker` with the teacher in its own partitioned engine and the
  fused chunked loss (the student's logits are never materialised).
- `kdflow ZeRO-3 cache`: `train_worker` reading a sampled teacher cache (the cache stage runs
  first; its time is reported apart).
- `kdflow ZeRO-3 chat cache`: the same on packed chat rows (four conversations per row, position
  ids restarting, losses on each one's second half); and `packed_attention_gap`, the teacher's
  log-probs of a conversation packed after another against it alone, in bf16 on the GPU's
  attention kernel (0 up to rounding when packing keeps conversations apart).

Each row gives the steady tokens/s (after `--warmup` steps), MFU counting 6·N_student +
2·N_teacher FLOPs per token (the teacher only for online rows) against `--peak-tflops`, and peak GPU
memory; ratios are against the plain row of the same ZeRO stage. Then the loss benchmark runs
with `--device cuda`. Results are appended to benchmarks/results/gpu_check.jsonl.

    bash benchmarks/gpu_check.sh              # on the GPU machine (about 4 minutes on an H100)
    python benchmarks/gpu_check.py --tiny     # CPU, tiny models: checks the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

from kd_core.config import (  # noqa: E402
    ArchitectureConfig,
    CacheConfig,
    ComputeConfig,
    DeepSpeedConfig,
    LossConfig,
    StorageConfig,
    TrainConfig,
)
from kd_core.data.tokenizer import save_hf_tokenizer  # noqa: E402
from kd_core.data.shards import write_split  # noqa: E402
from kd_core.models import build_causal_lm, count_parameters, save_model_dir  # noqa: E402
from kd_core.stage import StageRun  # noqa: E402
from kd_core.stages.cache import cache  # noqa: E402
from kd_core.storage import Store  # noqa: E402
from kd_core.train.deepspeed_engine import TeacherEngine, deepspeed_config, start_deepspeed  # noqa: E402
from kd_core.tasks import task_of  # noqa: E402
from kd_core.train.spec import TrainSpec  # noqa: E402
from kd_core.train.loop import make_optimizer, train_worker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.jsonl"
SHAPES = {
    # name: (student, teacher, vocabulary, batch rows, sequence length)
    "gpu": (
        ArchitectureConfig(hidden_size=896, num_layers=24, num_heads=14, intermediate_size=4864),
        ArchitectureConfig(hidden_size=1536, num_layers=26, num_heads=12, intermediate_size=8960),
        151_936, 8, 1024,
    ),
    "tiny": (
        ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        ArchitectureConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        512, 4, 32,
    ),
}


# ------------------------------------------------------------------------------------ inputs
def synthetic_prep(store: Store, vocab: int, seq_len: int, rows: int):
    """A prep step of uniform random rows over a word-level vocabulary of exactly `vocab` ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from kd_core.data.tokenizer import END_OF_TEXT, PAD, PreparedTokenizer

    run = StageRun(store, "prep", {"synthetic": True, "vocab": vocab, "seq_len": seq_len, "rows": rows}, inputs={})
    words = {END_OF_TEXT: 0, PAD: 1} | {f"w{i}": i for i in range(2, vocab)}
    save_hf_tokenizer(PreparedTokenizer(Tokenizer(WordLevel(words, unk_token=END_OF_TEXT)), bos=END_OF_TEXT, eos=END_OF_TEXT, pad=PAD), run)
    data = np.random.default_rng(0).integers(0, vocab, size=(rows, seq_len), dtype=np.int32)
    details = {"task": "causal_lm", "seq_len": seq_len, "vocab_size": vocab, "splits": {"train": write_split(run, "train", {"input_ids": data}, 64)}}
    return run.finish(details=details)


def synthetic_chat_prep(store: Store, vocab: int, seq_len: int, rows: int, per_row: int = 4):
    """A prep step of packed chat rows as `kd_core/data/chat.py` writes them: `per_row`
    conversations of random tokens per row, position ids restarting with each, the loss mask over
    each one's second half (its "answer")."""
    plain = synthetic_prep(store, vocab, seq_len, rows)
    run = StageRun(store, "prep", {"synthetic": True, "chat": True, "vocab": vocab, "seq_len": seq_len, "rows": rows}, inputs={})
    run.upload_dir(store.local_path(f"{plain.folder}/tokenizer"), "tokenizer")
    length = seq_len // per_row
    positions = np.tile(np.arange(seq_len) % length, (rows, 1)).astype(np.int32)
    columns = {
        "input_ids": np.random.default_rng(1).integers(0, vocab, size=(rows, seq_len), dtype=np.int32),
        "position_ids": positions,
        "loss_mask": (positions >= length // 2).astype(np.uint8),
    }
    details = {
        "task": "causal_lm", "seq_len": seq_len, "vocab_size": vocab, "splits": {"train": write_split(run, "train", columns, 64)},
        "chat": {"train_on": "assistant", "layout": "packed"},
    }
    return run.finish(details=details)


@torch.no_grad()
def packed_attention_gap(store: Store, teacher_manifest, device: torch.device, dtype: torch.dtype) -> float:
    """The largest difference in float32 log-probs between a conversation packed after another in
    one row (position ids restarting) and the same conversation alone, on this device's attention
    kernel in `dtype`: 0 up to rounding when packed conversations do not see each other."""
    from kd_core.models import load_causal_lm, model_copy, sequence_inputs

    model = load_causal_lm(model_copy(store, teacher_manifest), dtype=dtype).to(device)
    vocab = model.config.vocab_size
    first, second = (torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(seed)).to(device) for seed in (2, 3))
    packed = {"input_ids": torch.cat([first, second], 1), "position_ids": torch.arange(128, device=device).repeat(1, 2)}
    together = model(**sequence_inputs(packed)[0]).logits[0, 128:].float().log_softmax(-1)
    alone = model(**sequence_inputs({"input_ids": second})[0]).logits[0].float().log_softmax(-1)
    del model
    release_memory()
    return float((together - alone).abs().max())


def synthetic_teacher(store: Store, prep, architecture: ArchitectureConfig, dtype: torch.dtype):
    """A teacher step holding a random-weight model directory (safetensors + tokenizer)."""
    run = StageRun(store, "teacher", {"synthetic": True, "architecture": architecture.model_dump()}, inputs={"prep": prep})
    model = build_causal_lm(architecture, prep.details["vocab_size"], prep.details["seq_len"], seed=1).to(dtype)
    parameters = count_parameters(model)
    with tempfile.TemporaryDirectory() as folder:
        save_model_dir(model, store.local_path(f"{prep.folder}/tokenizer"), Path(folder))
        run.upload_dir(folder, "model")
    del model
    return run.finish(metrics={"parameters": parameters}, details={"model_folder": f"{run.folder}/model"}), parameters


# ------------------------------------------------------------------------------------ timing
class StepClock:
    """Steady throughput: tokens and seconds after the warmup steps (GPU work synchronised)."""

    def __init__(self, warmup: int, tokens_per_step: int, device: torch.device):
        self.warmup, self.tokens_per_step, self.device = warmup, tokens_per_step, device
        self.steps, self.started = 0, None

    def tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.steps += 1
        if self.steps == self.warmup:
            self.started = time.perf_counter()

    def tokens_per_s(self) -> float:
        return (self.steps - self.warmup) * self.tokens_per_step / (time.perf_counter() - self.started)


def steady_tokens_per_s(history: list[dict], warmup: int, tokens_per_step: int) -> float:
    """From `train_worker`'s log records (cumulative tokens/s at each step): the rate between
    the warmup step and the last step."""
    by_step = {record["step"]: record for record in history}
    last = max(by_step)
    elapsed = {step: step * tokens_per_step / by_step[step]["tokens_per_s"] for step in (warmup, last)}
    return (last - warmup) * tokens_per_step / (elapsed[last] - elapsed[warmup])


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that receives the peak allocated GPU memory (GB) of the block."""
    result = {"peak_gb": float("nan")}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield result
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9


def release_memory() -> None:
    """Free the last run's engines before the next one is built."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ runs
def plain_step_run(args, store, prep, teacher_manifest, student_arch, zero_stage, device) -> dict:
    """The baseline: DeepSpeed engines, forward KL on materialised fp32 logits."""
    import deepspeed

    from kd_core.models.teacher import teacher_model_dir

    vocab, seq_len = prep.details["vocab_size"], prep.details["seq_len"]
    train = TrainConfig(batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4, warmup_steps=1)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=zero_stage, precision=args.precision), train, world_size=1)
    start_deepspeed()
    with peak_memory(device) as memory:
        student = build_causal_lm(student_arch, vocab, seq_len, seed=0)
        optimizer, schedule = make_optimizer(student, train)
        engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=schedule, config=config)
        teacher = TeacherEngine(teacher_model_dir(store, teacher_manifest), config)
        clock = StepClock(args.warmup, args.batch * seq_len, engine.device)
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            input_ids = torch.randint(0, vocab, (args.batch, seq_len), generator=generator).to(engine.device)
            with torch.no_grad():
                teacher_log_probs = torch.log_softmax(teacher(input_ids=input_ids).logits.float(), dim=-1)
            student_log_probs = torch.log_softmax(engine(input_ids=input_ids).logits.float(), dim=-1)
            loss = torch.nn.functional.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum") / input_ids.numel()
            engine.backward(loss)
            engine.step()
            clock.tick()
        tokens_per_s = clock.tokens_per_s()
    del engine, teacher, optimizer, student
    release_memory()
    return {"tokens_per_s": tokens_per_s, "peak_gb": memory["peak_gb"], "loss": float(loss.detach())}


def kdflow_run(args, store, prep, student_arch, zero_stage, output, **targets) -> dict:
    """`train_worker`, the code a Ray Train worker runs, with the fused chunked loss."""
    train = TrainConfig(
        batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4, warmup_steps=1, log_every=1, shuffle_buffer=0, prefetch_shards=2
    )
    loss = LossConfig(ce_weight=0.0, kd_weight=1.0, divergence="forward_kl", fused=True, fused_chunk_size=args.chunk)
    spec = TrainSpec.from_prep(
        prep, store, output, student_arch, train, task=task_of(prep), objective=loss,
        deepspeed=DeepSpeedConfig(zero_stage=zero_stage, precision=args.precision), **targets,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with peak_memory(device) as memory:
        result = train_worker(spec)
    release_memory()
    history = [json.loads(line) for line in store.read_bytes(f"{output}/history.jsonl").decode().splitlines()]
    tokens_per_s = steady_tokens_per_s(history, args.warmup, args.batch * prep.details["seq_len"])
    return {"tokens_per_s": tokens_per_s, "peak_gb": memory["peak_gb"], "loss": result["loss"]}


def mfu(tokens_per_s: float, student_parameters: int, teacher_parameters: int, peak_tflops: float) -> float:
    return tokens_per_s * (6 * student_parameters + 2 * teacher_parameters) / (peak_tflops * 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU, fp32 (checks the script, measures nothing)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 14; tiny 4)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 4; tiny 1)")
    parser.add_argument("--chunk", type=int, default=2048, help="rows per chunk of the fused loss")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default bf16 on a GPU, fp32 with --tiny")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--skip-losses", action="store_true", help="do not run benchmarks/losses.py afterwards")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "gpu"
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no GPU: run on a GPU machine, or pass --tiny for the CPU check")
    student_arch, teacher_arch, vocab, args.batch, seq_len = SHAPES[shape]
    args.steps = args.steps or (4 if args.tiny else 14)
    args.warmup = args.warmup or (1 if args.tiny else 4)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""

    with tempfile.TemporaryDirectory(prefix="kdflow-gpu-check-") as folder:
        store = Store(StorageConfig(root=folder))
        rows = args.batch * args.steps * 2
        prep = synthetic_prep(store, vocab, seq_len, rows)
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        teacher_manifest, teacher_parameters = synthetic_teacher(store, prep, teacher_arch, dtype)
        student_parameters = count_parameters(build_causal_lm(student_arch, vocab, seq_len, seed=0))
        print(f"student {student_parameters / 1e6:,.1f}M, teacher {teacher_parameters / 1e6:,.1f}M parameters, "
              f"batch {args.batch} × {seq_len}, {args.precision}, {gpu or 'CPU'}", flush=True)

        runs: dict[str, dict] = {}

        def record(name: str, run: dict) -> None:
            """Keep a row and print it at once, so a run cut short still shows the rows it finished."""
            runs[name] = run
            print(f"{name}: {run['tokens_per_s']:,.0f} tokens/s, peak {run['peak_gb']:.1f} GB", flush=True)

        for stage in (2, 3):
            record(f"plain ZeRO-{stage}", plain_step_run(args, store, prep, teacher_manifest, student_arch, stage, device))
        record("kdflow ZeRO-3 online", kdflow_run(args, store, prep, student_arch, 3, "kdflow-online", online_teacher=teacher_manifest))
        started = time.perf_counter()
        cache_config = CacheConfig(format="sampled", num_samples=12, batch_size=args.batch, num_actors=1)
        cached = cache(cache_config, prep, teacher_manifest, store, ComputeConfig(backend="local"))
        cache_seconds = time.perf_counter() - started
        record("kdflow ZeRO-3 cache", kdflow_run(args, store, prep, student_arch, 3, "kdflow-cache", cache=cached))
        # Chat data: packed conversations with restarting position ids and a loss mask, cached and distilled.
        chat_prep = synthetic_chat_prep(store, vocab, seq_len, rows)
        chat_cache = cache(cache_config, chat_prep, teacher_manifest, store, ComputeConfig(backend="local"))
        record("kdflow ZeRO-3 chat cache", kdflow_run(args, store, chat_prep, student_arch, 3, "kdflow-chat-cache", cache=chat_cache))
        gap = packed_attention_gap(store, teacher_manifest, device, dtype)
        print(f"packed conversations, {args.precision} on {gpu or 'CPU'}: max |Δ log-prob| against each alone {gap:.3g}", flush=True)

    rows_out = []
    for name, run in runs.items():
        counted_teacher = 0 if name.endswith("cache") else teacher_parameters
        baseline = runs["plain ZeRO-3" if "ZeRO-3" in name else "plain ZeRO-2"]
        rows_out.append({
            "run": name,
            "tokens_per_s": run["tokens_per_s"],
            "mfu": mfu(run["tokens_per_s"], student_parameters, counted_teacher, args.peak_tflops),
            "peak_gb": run["peak_gb"],
            "vs_plain_same_zero": run["tokens_per_s"] / baseline["tokens_per_s"],
            "loss": run["loss"],
        })
    print(f"\n{'run':<26} {'tokens/s':>10} {'MFU':>7} {'peak GB':>8} {'× plain (same ZeRO)':>20} {'loss':>8}")
    for row in rows_out:
        print(f"{row['run']:<26} {row['tokens_per_s']:>10,.0f} {row['mfu']:>7.1%} {row['peak_gb']:>8.1f} {row['vs_plain_same_zero']:>20.2f} {row['loss']:>8.4f}")
    print(f"cache stage (teacher over {rows} rows, sampled 12): {cache_seconds:.1f} s")
    command = "python benchmarks/gpu_check.py" + (" --tiny" if args.tiny else "")
    append_result(args.results, command, {
        "student_parameters": student_parameters, "teacher_parameters": teacher_parameters, "batch": args.batch, "seq_len": seq_len,
        "steps": args.steps, "warmup": args.warmup, "precision": args.precision, "peak_tflops": args.peak_tflops,
        "runs": rows_out, "cache_seconds": cache_seconds, "packed_attention_gap": gap,
    }, machine_detail=gpu)

    if not args.skip_losses:
        losses = [sys.executable, str(Path(__file__).with_name("losses.py"))]
        if args.tiny:
            losses += ["--rows", "64", "--vocabs", "512", "--hidden", "32", "--repeats", "1", "--results", str(args.results.with_name("losses-tiny.jsonl"))]
        else:
            # 256 rows is the chunk Liger-Kernel picks for this shape (B·T / ⌈V / H⌉, to a power of 2).
            losses += ["--device", "cuda", "--hidden", "4096", "--dtype", "bf16", "--vocabs", "128256", "--chunk-sizes", "256", "1024"]
        subprocess.run(losses, check=True)


if __name__ == "__main__":
    main()
