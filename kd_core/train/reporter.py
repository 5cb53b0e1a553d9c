"""The progress channel of a fit on Ray: rank 0's log records, start-up times and final result.

`TrainReporter` runs as a small Ray actor that rank 0 calls and the driver polls to draw the
progress bar (`kd_core.train.ray_glue`). `fit_reporter(fit)` gives the driver's one reporter,
made on first use and set to a new fit each time: an actor made per fit would start a worker
process per fit. Each fit has its own id, so that a late call from an earlier fit's worker is
ignored. This module imports neither torch nor the training loop, so the actor's process starts
without them.
"""

from __future__ import annotations

import time

NAMES = {"process_started": "worker_started", "loop_started": "startup", "first_log": "first_log"}
"""The start-up points a fit reports, as a stage's manifest names them in its timings (`startup`)."""


class TrainReporter:
    """Collects one fit's log records, start-up times and result; a Ray actor under the `ray`
    backend, a plain object in this process with the `local` one."""

    def __init__(self):
        self.begin("")

    def begin(self, fit: str) -> None:
        self.fit, self.step, self.record, self.result = fit, 0, {}, None
        self.timings: dict[str, float] = {}

    def started(self, fit: str, timings: dict[str, float]) -> None:
        """The worker's wall-clock times (`worker_timings`), as its loop starts."""
        if fit == self.fit:
            self.timings |= timings

    def update(self, fit: str, step: int, record: dict) -> None:
        if fit == self.fit:
            self.step, self.record = step, record
            self.timings.setdefault("first_log", time.time())

    def finish(self, fit: str, result: dict) -> None:
        if fit == self.fit:
            self.result = result

    def poll(self) -> tuple[int, dict, dict | None]:
        return self.step, self.record, self.result

    def timeline(self) -> dict[str, float]:
        return self.timings


def worker_timings() -> dict[str, float]:
    """This process's start and now (time.time()), for `TrainReporter.started`."""
    import psutil

    return {"process_started": psutil.Process().create_time(), "loop_started": time.time()}


def startup(timings: dict[str, float], started: float) -> dict[str, float]:
    """Seconds from `started` (the fit's start) to each point of a reporter's timeline: its worker
    process's start (`worker_started`, below 0 for a process that already existed), its loop's
    start (`startup`) and its first log record (`first_log`); 0 for a point it never reached."""
    return {NAMES[name]: round(timings[name] - started, 3) if name in timings else 0.0 for name in NAMES}


_reporter: tuple[tuple[str, str], object] | None = None


def fit_reporter(fit: str):
    """The reporter actor of this driver (made once per Ray cluster and job, and again if it
    died), set to the fit `fit`."""
    import ray

    global _reporter
    context = ray.get_runtime_context()
    session = (context.gcs_address, context.get_job_id())
    if _reporter is not None and _reporter[0] == session:
        try:
            ray.get(_reporter[1].begin.remote(fit))
            return _reporter[1]
        except ray.exceptions.RayActorError:
            pass
    _reporter = (session, ray.remote(num_cpus=0)(TrainReporter).remote())
    ray.get(_reporter[1].begin.remote(fit))
    return _reporter[1]
