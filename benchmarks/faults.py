"""What a flaky store costs: a whole job on S3 (moto on loopback), clean and through
`FaultyProxy` (a seeded share of requests answered 500/503, another share held back).

Runs `CONFIG` twice into fresh buckets of one moto server, once straight to it and once through
the proxy, then prints each step's seconds side by side, the requests failed and delayed, whether
every output (bytes, by sha256) and the eval metrics are the same, and appends the result
(machine, date, versions) to benchmarks/results/faults.jsonl.

    .venv/bin/python benchmarks/faults.py configs/tiny.yaml compute.backend=local
    .venv/bin/python benchmarks/faults.py configs/tiny.yaml compute.backend=local --fail-share 0.2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from results_log import append_result

from kd_core.job import load_config
from kd_core.devtools import FaultyProxy, loopback_s3
from kd_core.pipeline import run_pipeline

RESULTS = Path(__file__).resolve().parent / "results" / "faults.jsonl"
QUALITY = ("cross_entropy", "perplexity", "kl_to_teacher", "agreement_top1", "agreement_top5", "ece")


def job_on(endpoint: str, bucket_endpoint: str, config_path: str, overrides: list[str], folder: str):
    """Run the job with its root in a new bucket of `bucket_endpoint`, reached through `endpoint`."""
    import s3fs

    bucket = f"kdflow-bench-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=bucket_endpoint).mkdir(bucket)
    config = load_config(config_path, [
        *overrides, f"storage.root=s3://{bucket}/kdflow", f"storage.s3.endpoint_url={endpoint}",
        f"registry.tracking_uri=sqlite:///{folder}/{bucket}.db",
    ])
    started = time.perf_counter()
    steps = run_pipeline(config)
    return time.perf_counter() - started, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the run is appended to")
    parser.add_argument("--fail-share", type=float, default=0.1, help="share of requests answered 500/503")
    parser.add_argument("--delay-share", type=float, default=0.1, help="share of requests held back")
    parser.add_argument("--delay-s", type=float, default=0.2, help="how long a held-back request waits")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with loopback_s3() as endpoint, tempfile.TemporaryDirectory(prefix="kdflow-bench-") as folder:
        clean_seconds, clean = job_on(endpoint, endpoint, args.config, args.overrides, folder)
        with FaultyProxy(endpoint, fail_share=args.fail_share, delay_share=args.delay_share, delay_s=args.delay_s, seed=0) as proxy:
            faulty_seconds, faulty = job_on(proxy.url, endpoint, args.config, args.overrides, folder)
            counts = proxy.counts
    same_bytes = all(
        {n: r.sha256 for n, r in clean[step].outputs.items() if n.startswith(("shards/", "cache/", "tokenizer"))}
        == {n: r.sha256 for n, r in faulty[step].outputs.items() if n.startswith(("shards/", "cache/", "tokenizer"))}
        for step in ("prep", "cache")
    )
    compared = sum(r.bytes for step in ("prep", "cache") for r in faulty[step].outputs.values())
    same_metrics = all(
        clean["eval"].metrics[model][name] == faulty["eval"].metrics[model][name] for model in ("teacher", "student", "baseline") for name in QUALITY
    )
    print(f"\n{'step':<10}{'clean s':>10}{'faulty s':>10}")
    for name in clean:
        print(f"{name:<10}{clean[name].timings['total']:>10.1f}{faulty[name].timings['total']:>10.1f}")
    print(
        f"\njob: clean {clean_seconds:.1f} s | faulty {faulty_seconds:.1f} s | ratio {faulty_seconds / clean_seconds:.2f}x | "
        f"{counts.failed} of {counts.requests} requests failed, {counts.delayed} delayed ({counts.delay_seconds:.1f} s) | "
        f"prep and cache outputs identical: {same_bytes} ({compared:,} bytes) | eval metrics identical: {same_metrics}"
    )
    fields = {
        "clean_seconds": round(clean_seconds, 1), "faulty_seconds": round(faulty_seconds, 1),
        "ratio": round(faulty_seconds / clean_seconds, 2), "requests": counts.requests, "failed": counts.failed,
        "delayed": counts.delayed, "delay_seconds": round(counts.delay_seconds, 1), "same_bytes": same_bytes,
        "bytes_compared": compared, "same_metrics": same_metrics, "fail_share": args.fail_share, "delay_share": args.delay_share,
    }
    append_result(args.results, f"python benchmarks/faults.py {args.config} {' '.join(args.overrides)}".strip(), fields)


if __name__ == "__main__":
    main()
