"""What checkpointing costs the distill stage: the same distillation at several `checkpoint_every`.

Runs the job's prep, teacher and cache steps (reused when they exist), then forces the distill
step once per setting through the configured backend (Ray Train by default) and reports the
worker's time in the optimizer steps (`train_seconds`, Ray Train start-up left out), the whole
step's wall time and the final training loss, side by side.

    .venv/bin/python benchmarks/checkpoint_cost.py configs/demo.yaml --every none 100 25

Appends the table to benchmarks/results/checkpoint_cost.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

from kd_core.stages.cache import cache  # noqa: E402
from kd_core.job import load_config  # noqa: E402
from kd_core.stages.prep import prep  # noqa: E402
from kd_core.storage import Store  # noqa: E402
from kd_core.stages.distill import distill  # noqa: E402
from kd_core.stages.teacher import teacher  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_cost.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.train.max_steps=50")
    parser.add_argument("--every", nargs="+", default=["none", "100", "25"], help="checkpoint_every values ('none': no checkpoints)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    store = Store(config.storage)
    prepared = prep(config.data, store)
    cached = cache(config.cache, prepared, teacher(config.teacher, prepared, store, config.compute), store, config.compute)
    rows = []
    for every in args.every:
        section = config.distill.model_copy(update={"checkpoint_every": None if every == "none" else int(every)})
        started = time.perf_counter()
        manifest = distill(section, config.student, prepared, cached, store, config.compute, force=True)
        steps = section.train.max_steps
        written = 0 if section.checkpoint_every is None else len(range(section.checkpoint_every, steps, section.checkpoint_every))
        rows.append({"checkpoint_every": every, "checkpoints": written, "train_seconds": manifest.metrics["train_seconds"],
                     "step_seconds": time.perf_counter() - started, "final_loss": manifest.metrics["loss"]})
    reference = rows[0]["train_seconds"]
    print(f"\n{'checkpoint_every':>16} {'checkpoints':>11} {'train s':>8} {'step s':>7} {'× first':>8} {'final loss':>10}")
    for row in rows:
        print(f"{row['checkpoint_every']:>16} {row['checkpoints']:>11} {row['train_seconds']:>8.1f} {row['step_seconds']:>7.1f} "
              f"{row['train_seconds'] / reference:>8.2f} {row['final_loss']:>10.4f}")
    command = "python benchmarks/checkpoint_cost.py " + " ".join([args.config, *args.overrides, "--every", *args.every])
    append_result(args.results, command, {"backend": config.compute.backend, "rows": rows})


if __name__ == "__main__":
    main()
