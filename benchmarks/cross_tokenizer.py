"""The cross-tokenizer comparison (issue 23): configs/cross_tokenizer.yaml's student, whose tokenizer
is not the teacher's, distilled by each method at the same steps, batch and seed.

Arms (overrides of the job):
- ULD from the cache, span-aligned KL from the cache (the job as it is): the teacher's top-32 in
  its own vocabulary, written once and read by every cache arm;
- ULD online, span-aligned KL online, DSKD online: the teacher's full distribution (and, for DSKD,
  its hidden states and output layer) on every batch.
The no-teacher student (the job's baseline: the same student, tokenizer and steps, CE alone) and
the teacher are measured beside them. Every model is measured on the test split in bits per byte
with its own tokenizer (kd_core/eval/cross_tokenizer.py); students also by their agreement with
the teacher on aligned spans. Throughput: each arm's training seconds.

    .venv/bin/python benchmarks/cross_tokenizer.py                     # configs/cross_tokenizer.yaml, every arm
    .venv/bin/python benchmarks/cross_tokenizer.py configs/cross_tokenizer.yaml distill.train.max_steps=100 --arms span_kl_cache

Prints the table and appends a record (machine, date, command, versions) to
benchmarks/results/cross_tokenizer.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_log import append_result  # noqa: E402

ARMS = {
    "uld_cache": ("ULD, from the cache", ["distill.cross_tokenizer.method=uld"]),
    "span_kl_cache": ("span-aligned KL, from the cache", ["distill.cross_tokenizer.method=span_kl"]),
    "uld_online": ("ULD, online", ["distill.cross_tokenizer.method=uld", "distill.teacher_source=online"]),
    "span_kl_online": ("span-aligned KL, online", ["distill.cross_tokenizer.method=span_kl", "distill.teacher_source=online"]),
    "dskd_online": ("DSKD, online", ["distill.cross_tokenizer.method=dskd", "distill.teacher_source=online"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "cross_tokenizer.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm (e.g. distill.train.max_steps=100)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args()

    from kd_core.job import load_config
    from kd_core.pipeline import run_pipeline

    results, reference = {}, None
    for arm in args.arms:
        label, overrides = ARMS[arm]
        print(f"\n=== {label} ===", flush=True)
        steps = run_pipeline(load_config(args.config, [*args.overrides, *overrides]), until="eval")
        metrics = steps["eval"].metrics
        results[arm] = {"label": label, "distill_key": steps["distill"].key, "train_seconds": steps["distill"].metrics.get("train_seconds"), **metrics["student"]}
        reference = metrics
    results["teacher"] = {"label": "teacher (byte-level BPE, 2,048)", **reference["teacher"]}
    results["baseline"] = {"label": "no-teacher student (CE only)", **reference["baseline"]}
    print_table(results, reference)
    append_result(REPO / "benchmarks" / "results" / "cross_tokenizer.jsonl", " ".join(["benchmarks/cross_tokenizer.py", *sys.argv[1:]]), {"arms": results, "held_out": {k: reference[k] for k in ("rows", "bytes", "characters")}})


def print_table(results: dict, reference: dict) -> None:
    print(f"\nheld-out test split: {reference['rows']:,} rows, {reference['bytes']:,} bytes; each model with its own tokenizer")
    print("| model | bits/byte | bits/character | tokens/byte | agreement on aligned spans | vs no-teacher (bits/byte) | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = results["baseline"]["bits_per_byte"]
    for name in ["teacher", "baseline", *[arm for arm in ARMS if arm in results]]:
        row = results[name]
        agreement = f"{row['span_agreement']:.1%}" if "span_agreement" in row else "—"
        change = "—" if name in ("teacher", "baseline") else f"{row['bits_per_byte'] - baseline:+.4f}"
        seconds = f"{row['train_seconds']:.0f}" if row.get("train_seconds") else "—"
        print(f"| {row['label']} | {row['bits_per_byte']:.4f} | {row['bits_per_character']:.4f} | {row['tokens_per_byte']:.3f} | {agreement} | {change} | {seconds} |")


if __name__ == "__main__":
    main()
