"""Cold run vs. warm rerun of a whole job: what stage reuse saves.

Runs `kdflow run CONFIG` twice into a fresh storage root (and a fresh MLflow database), then prints
each step's seconds side by side with the ratio, and appends the result (machine, date, versions)
to benchmarks/results/pipeline_reuse.jsonl.

    .venv/bin/python benchmarks/pipeline_reuse.py configs/demo.yaml
    .venv/bin/python benchmarks/pipeline_reuse.py configs/tiny.yaml compute.backend=local
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from results_log import append_result

from kd_core.job import load_config
from kd_core.pipeline import run_pipeline

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_reuse.jsonl"


def timed_run(config) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    steps = run_pipeline(config)
    seconds = time.perf_counter() - started
    return seconds, {name: (0.0 if manifest.reused else manifest.timings["total"]) for name, manifest in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the run is appended to")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-") as folder:
        config = load_config(
            args.config,
            [*args.overrides, f"storage.root={folder}/store", f"registry.tracking_uri=sqlite:///{folder}/mlflow.db"],
        )
        cold_total, cold_steps = timed_run(config)
        warm_total, _ = timed_run(config)
    print(f"\n{'step':<10}{'cold s':>10}")
    for name, seconds in cold_steps.items():
        print(f"{name:<10}{seconds:>10.1f}")
    print(f"\ncold run {cold_total:.1f} s | warm rerun {warm_total:.1f} s | ratio {cold_total / warm_total:.1f}x")
    fields = {
        "speedup": round(cold_total / warm_total, 1),
        "cold_seconds": round(cold_total, 1),
        "warm_seconds": round(warm_total, 1),
        "steps": cold_steps,
    }
    append_result(args.results, f"python benchmarks/pipeline_reuse.py {args.config} {' '.join(args.overrides)}".strip(), fields)


if __name__ == "__main__":
    main()
