"""Where a training's fixed cost goes: Ray's start-up, each path's worker start-up, the first step.

    .venv/bin/python benchmarks/startup.py                      # configs/tiny.yaml
    .venv/bin/python benchmarks/startup.py --whole-run          # also `kdflow run` end to end per path
    .venv/bin/python benchmarks/startup.py configs/demo.yaml distill.train.max_steps=20

1. A new interpreter's imports, each in a new process: what every new Ray worker process pays.
2. `ray.init` of a local cluster, in this process.
3. The job's distill step trained again (forced) on each path, on the same prepared data, teacher
   and cache (made first, in this process), with a log record every step:
   - in this process (`compute.backend: local`), the reference;
   - Ray Train (`compute.single_worker: ray_train`): a controller, a worker group and a gloo
     process group for the fit, the path every fit took before issue 26;
   - a Ray task (`single_worker: task`, the default), first in a worker process Ray had
     prestarted, then again in the process the first one left (what the run's later fits get).
   Each row says when, in seconds from the fit's start, its worker process started (below 0: it
   already existed), its training loop started, and its first log record came (data, model, the
   first step), and the fit's total; then the fixed cost (total minus in-process training).
4. With `--whole-run`: `kdflow run CONFIG` in a new process from an empty store, in this
   process's backend (`local`), on Ray with Ray Train, and on Ray with tasks.

It prints the rows side by side, each with its ratio to the in-process path, and appends them
(with the machine and date) to benchmarks/results/startup.jsonl.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_log import append_result

RESULTS = Path(__file__).resolve().parent / "results" / "startup.jsonl"
REPO = Path(__file__).resolve().parent.parent
IMPORTS = ("torch", "deepspeed", "kd_core.train.loop", "ray.train.torch")
"""What a new Ray worker imports before it trains: torch, DeepSpeed, kdflow's loop, Ray Train."""


def import_seconds(module: str, repeats: int) -> float:
    """The median seconds a new interpreter takes to import `module`, less a bare interpreter's."""

    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
        return time.perf_counter() - started

    bare = statistics.median(run("pass") for _ in range(repeats))
    return statistics.median(run(f"import {module}") for _ in range(repeats)) - bare


def distill_fit(config, steps: dict, compute) -> dict[str, float]:
    """Train the job's distill step again (forced) with `compute`; its manifest's timings."""
    from kd_core.stages.distill import distill
    from kd_core.storage import Store

    started = time.perf_counter()
    manifest = distill(
        config.distill, config.student, steps["prep"], steps["cache"], Store(config.storage), compute, teacher=steps["teacher"], force=True,
    )
    timings = manifest.timings
    return {
        "worker_started": timings["worker_started"], "loop": timings["startup"], "first_log": timings["first_log"],
        "train": timings["train"], "total": time.perf_counter() - started,
    }


def whole_run(config_path: str, overrides: list[str], folder: str, settings: list[str]) -> float:
    """Seconds of `kdflow run` in a new process from an empty store under `folder`."""
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "kd_core.cli", "run", config_path, *overrides, f"storage.root={folder}/store",
         f"registry.tracking_uri=sqlite:///{folder}/mlflow.db", *settings],
        cwd=REPO, capture_output=True, text=True,
    )
    if run.returncode:
        sys.exit(f"kdflow run {' '.join(settings)} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--whole-run", action="store_true", help="also time `kdflow run` end to end on each path")
    parser.add_argument("--repeats", type=int, default=3, help="new interpreters per import measured (the median counts)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the run is appended to")
    args = parser.parse_args()

    import ray

    from kd_core.job import load_config
    from kd_core.pipeline import run_pipeline
    from kd_core.progress import silenced
    from kd_core.train.ray_glue import ensure_ray

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}")
    imports = {module: import_seconds(module, args.repeats) for module in IMPORTS}
    print("a new interpreter's imports (s, median of %d, less a bare interpreter's):" % args.repeats)
    for module, seconds in imports.items():
        print(f"  {module:<22}{seconds:>6.2f}")

    fits: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kdflow-startup-") as folder:
        config = load_config(
            args.config,
            [*args.overrides, f"storage.root={folder}/store", f"registry.tracking_uri=sqlite:///{folder}/mlflow.db", "distill.train.log_every=1"],
        )
        local = config.compute.model_copy(update={"backend": "local"})
        with silenced():
            steps = run_pipeline(config.model_copy(update={"compute": local}), until="cache")
            fits["in this process"] = distill_fit(config, steps, local)
            started = time.perf_counter()
            ensure_ray(config.compute.model_copy(update={"backend": "ray"}))
            ray_init = time.perf_counter() - started
            on_ray = config.compute.model_copy(update={"backend": "ray", "num_workers": 1})
            fits["Ray task, new process"] = distill_fit(config, steps, on_ray.model_copy(update={"single_worker": "task"}))
            fits["Ray task, reused process"] = distill_fit(config, steps, on_ray.model_copy(update={"single_worker": "task"}))
            fits["Ray Train"] = distill_fit(config, steps, on_ray.model_copy(update={"single_worker": "ray_train"}))
        ray.shutdown()

        reference = fits["in this process"]
        training = reference["train"] - reference["first_log"]  # what the steps after the first cost in this process
        print(f"\nray.init (a local cluster): {ray_init:.2f} s")
        print(f"\nthe distill step of {args.config}, {config.distill.train.max_steps} steps, seconds from the fit's start:")
        header = f"{'path':<26}{'process':>9}{'loop':>8}{'1st log':>9}{'train':>8}{'fixed':>8}{'vs here':>9}"
        print(header)
        for name, row in fits.items():
            row["fixed"] = row["train"] - training
            print(
                f"{name:<26}{row['worker_started']:>9.2f}{row['loop']:>8.2f}{row['first_log']:>9.2f}{row['train']:>8.2f}"
                f"{row['fixed']:>8.2f}{row['train'] / reference['train']:>8.1f}x"
            )
        runs: dict[str, float] = {}
        if args.whole_run:
            paths = {
                "in this process": ["compute.backend=local"],
                "Ray, Ray Train": ["compute.backend=ray", "compute.single_worker=ray_train"],
                "Ray, tasks": ["compute.backend=ray", "compute.single_worker=task"],
            }
            print(f"\n`kdflow run {args.config}` from an empty store, in a new process:")
            for name, settings in paths.items():
                runs[name] = whole_run(args.config, args.overrides, f"{folder}/{len(runs)}", settings)
                print(f"  {name:<20}{runs[name]:>8.1f} s{runs[name] / runs['in this process']:>8.1f}x")
    fields = {
        "config": args.config, "imports_s": {name: round(value, 2) for name, value in imports.items()},
        "ray_init_s": round(ray_init, 2), "fits": {name: {key: round(value, 3) for key, value in row.items()} for name, row in fits.items()},
        "whole_run_s": {name: round(value, 1) for name, value in runs.items()},
    }
    command = " ".join(["python benchmarks/startup.py", args.config, *args.overrides, *(["--whole-run"] if args.whole_run else [])])
    append_result(args.results, command, fields)


if __name__ == "__main__":
    main()
