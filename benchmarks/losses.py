"""Distillation loss, forward + backward: materialised logits vs. kdflow's fused chunked loss.

Generalized JSD (beta = 0.5) between a student and a teacher LM head, from hidden states
(B·T, H) and output weights (V, H). Each case runs in its own process on CPU, so its peak
resident memory is its own; on CUDA the allocator's peak is reset per case.

- naive: student logits and teacher logits materialised (B·T, V), plain torch, then the loss.
- kdflow fused: `kd_core.losses.fused.fused_lm_head_loss`, `--chunk-sizes` rows at a time (one
  column per chunk size: `kdflow@256`, ...).
- Liger-Kernel's `LigerFusedLinearJSD`, with `--device cuda` when it is installed.

    .venv/bin/python benchmarks/losses.py                       # CPU, H=256, fp32
    python benchmarks/losses.py --device cuda --hidden 4096 --dtype bf16

Prints a side-by-side table with ratios and appends it to benchmarks/results/losses.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

from kd_core.losses import generalized_jsd  # noqa: E402
from kd_core.losses.fused import dense_teacher_target, fused_lm_head_loss  # noqa: E402
from kd_core.losses.jsd import generalized_jsd_per_position  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "losses.jsonl"
ROWS = (1024, 4096, 8192)
VOCABS = (32000, 128256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(rows, vocab, hidden, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
    return (
        randn(rows, hidden).requires_grad_(),
        randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(),
        randn(rows, hidden),
        randn(vocab, hidden, scale=hidden**-0.5),
    )


def step(implementation, tensors):
    student_hidden, student_weight, teacher_hidden, teacher_weight = tensors
    if implementation == "naive":
        loss = generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, beta=0.5)
    elif implementation.startswith("kdflow@"):
        target = dense_teacher_target(partial(generalized_jsd_per_position, beta=0.5), teacher_hidden, teacher_weight)
        loss = fused_lm_head_loss(student_hidden, student_weight, target, chunk_size=int(implementation.split("@")[1]))
    else:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=0.5)(student_hidden, student_weight, teacher_hidden, teacher_weight)
    loss.backward()
    student_hidden.grad = student_weight.grad = None
    return float(loss)


def run_one(implementation, rows, vocab, args) -> dict:
    """Time one case in this process; returns ms (median), peak MB above the inputs, and the loss."""
    device = torch.device(args.device)
    tensors = make_inputs(rows, vocab, args.hidden, DTYPES[args.dtype], device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    baseline_mb = _resident_mb() if device.type == "cpu" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_mb = torch.cuda.memory_allocated() / 2**20
    loss = step(implementation, tensors)  # warm-up
    times = []
    for _ in range(args.repeats):
        synchronize()
        started = time.perf_counter()
        loss = step(implementation, tensors)
        synchronize()
        times.append((time.perf_counter() - started) * 1000)
    peak_mb = (_peak_resident_mb() if device.type == "cpu" else torch.cuda.max_memory_allocated() / 2**20) - baseline_mb
    return {"ms": statistics.median(times), "peak_mb": peak_mb, "loss": loss}


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_resident_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(implementation, rows, vocab, args) -> dict | str:
    """On CPU each case runs in a fresh process so peak memory is its own."""
    if args.device == "cuda":
        try:
            return run_one(implementation, rows, vocab, args)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return "out of memory"
    # Measured here: the naive step peaks at about 12.5 float32 (B·T, V) tensors (6.4 GB at 1024 × 128256).
    needed_gb = 13 * rows * vocab * 4 / 2**30 if implementation == "naive" else 0
    if needed_gb > args.memory_limit_gb:
        return f"skipped (needs ~{needed_gb:.0f} GB)"
    command = [sys.executable, __file__, "--one", implementation, str(rows), str(vocab), *_passthrough(args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == -9:
        return "killed (out of memory)"
    if result.returncode != 0:
        return f"failed ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode})"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _passthrough(args) -> list[str]:
    return ["--device", args.device, "--hidden", str(args.hidden), "--dtype", args.dtype,
            "--chunk-sizes", *map(str, args.chunk_sizes), "--repeats", str(args.repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=256, help="H (use 4096 on a GPU)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024], help="rows per chunk of the fused loss; one column each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--memory-limit-gb", type=float, default=18.0, help="skip naive cases estimated above this (CPU)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the run is appended to")
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "ROWS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.one:
        implementation, rows, vocab = args.one
        print(json.dumps(run_one(implementation, int(rows), int(vocab), args)))
        return
    fused = [f"kdflow@{size}" for size in args.chunk_sizes]
    implementations = ["naive", *fused] + (["liger"] if args.device == "cuda" and _has_liger() else [])
    print(f"generalized JSD (beta 0.5), forward+backward, {args.device}, {args.dtype}, H={args.hidden}")
    header = f"{'B*T':>6} {'V':>7} | " + " | ".join(f"{name + ' ms':>17} {name + ' MB':>17}" for name in implementations)
    print(header + "".join(f" | {name}/{base} time, memory" for name in fused for base in implementations if base in ("naive", "liger")))
    records = []
    for vocab in args.vocabs:
        for rows in args.rows:
            results = {name: measure(name, rows, vocab, args) for name in implementations}
            records.append({"rows": rows, "vocab": vocab, **results})
            print(_row(rows, vocab, results, implementations), flush=True)
    _append(args, records)


def _has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def _row(rows, vocab, results, implementations) -> str:
    cells = []
    for name in implementations:
        value = results[name]
        cells.append(f"{value['ms']:>17.1f} {value['peak_mb']:>17.0f}" if isinstance(value, dict) else f"{value:>35}")
    ratios = ""
    for name in implementations:
        for base in ("naive", "liger"):
            fused, reference = results.get(name), results.get(base)
            if name.startswith("kdflow@") and isinstance(fused, dict) and isinstance(reference, dict):
                ratios += f" | {fused['ms'] / reference['ms']:.2f}x, {fused['peak_mb'] / max(reference['peak_mb'], 1):.1%}"
            elif name.startswith("kdflow@") and base in results:
                ratios += " | -"
    return f"{rows:>6} {vocab:>7} | " + " | ".join(cells) + ratios


def _append(args, records) -> None:
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else ""
    append_result(args.results, "python benchmarks/losses.py " + " ".join(_passthrough(args)), {"results": records}, machine_detail=gpu)


if __name__ == "__main__":
    main()
