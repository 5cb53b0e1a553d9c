"""What a resume costs the data stream: restoring saved stream positions against replaying the stream.

For each `--steps` N, a run of the job's student (trained on cross-entropy over the prep stage's
training split, plain torch, in this process) checkpoints at step N and stops at N + 1; it is then
resumed twice from that checkpoint and trains one step each time:
1. from the checkpoint's stream positions (what kdflow does): the stream reads back only the shards
   its shuffle buffers reference and the ones it was reading;
2. from the same checkpoint without them (`stream-<R>.json` deleted, as an older kdflow wrote it):
   the stream is replayed, every batch before step N read, checked, decoded and dropped.
Reported side by side: rows read to resume (`resume_rows_read`, prefetch included) and the
seconds to resume and train the one step.

    .venv/bin/python benchmarks/resume.py configs/tiny.yaml distill.train.shuffle_buffer=16 --steps 48 192 768

Appends the table to benchmarks/results/resume.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_log import append_result  # noqa: E402

from kd_core.job import load_config  # noqa: E402
from kd_core.stages.prep import prep  # noqa: E402
from kd_core.storage import Store  # noqa: E402
from kd_core.tasks import task_of  # noqa: E402
from kd_core.train.spec import TrainSpec  # noqa: E402
from kd_core.train.loop import train_worker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "resume.jsonl"


class Stop(Exception):
    """Ends the first run right after its checkpoint."""


def resume_twice(spec: TrainSpec, store: Store, steps: int) -> dict:
    """Rows read and seconds for resuming at `steps` from stream positions, then by replay."""
    def stop(done: int, record: dict) -> None:
        if done == steps + 1:
            raise Stop

    store.delete(spec.checkpoint_folder)
    try:
        train_worker(spec, progress=stop)
    except Stop:
        pass
    measured = {"steps": steps, "rows_before": steps * spec.train.batch_size}
    for way in ("positions", "replay"):
        if way == "replay":
            store.delete(f"{spec.checkpoint_folder}/step-{steps:08d}/stream-0.json")
        started = time.perf_counter()
        result = train_worker(spec)
        measured |= {f"{way}_rows_read": result["resume_rows_read"], f"{way}_seconds": round(time.perf_counter() - started, 3)}
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.train.shuffle_buffer=16")
    parser.add_argument("--steps", nargs="+", type=int, default=[48, 192, 768], help="steps at which the run is resumed")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdflow-resume-") as root:
        config = load_config(Path(args.config), [*args.overrides, f"storage.root={root}", "compute.backend=local"])
        store = Store(config.storage)
        prepared = prep(config.data, store)
        rows = []
        for steps in args.steps:
            train = config.distill.train.model_copy(update={"max_steps": steps + 1, "log_every": steps})
            spec = TrainSpec.from_prep(prepared, store, f"resume-{steps}", config.student.architecture, train, task=task_of(prepared), checkpoint_every=steps)
            rows.append(resume_twice(spec, store, steps))
    print(f"{'step':>6} {'rows before':>12} {'rows read: positions':>21} {'replay':>8} {'seconds: positions':>19} {'replay':>8}")
    for row in rows:
        print(
            f"{row['steps']:>6} {row['rows_before']:>12} {row['positions_rows_read']:>21} {row['replay_rows_read']:>8} "
            f"{row['positions_seconds']:>19} {row['replay_seconds']:>8}"
        )
    command = " ".join(["benchmarks/resume.py", *sys.argv[1:]])
    append_result(args.results, command, {"config": args.config, "overrides": args.overrides, "resumes": rows})


if __name__ == "__main__":
    main()
