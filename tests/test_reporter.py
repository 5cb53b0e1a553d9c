"""The progress channel of a fit on Ray (`kd_core/train/reporter.py`), as plain objects."""

from __future__ import annotations

import time

from kd_core.train.reporter import TrainReporter, startup, worker_timings


def test_a_late_call_from_an_earlier_fit_is_ignored_by_the_next_one():
    reporter = TrainReporter()
    reporter.begin("first")
    reporter.update("first", 10, {"loss": 2.0})
    reporter.finish("first", {"loss": 2.0})
    reporter.begin("second")
    assert reporter.poll() == (0, {}, None) and reporter.timeline() == {}
    reporter.update("first", 11, {"loss": 9.0})  # the first fit's worker, late
    reporter.finish("first", {"loss": 9.0})
    reporter.started("first", {"loop_started": 1.0})
    assert reporter.poll() == (0, {}, None) and reporter.timeline() == {}
    reporter.started("second", {"process_started": 5.0, "loop_started": 7.0})
    reporter.update("second", 1, {"loss": 3.0})
    reporter.update("second", 2, {"loss": 2.5})
    assert reporter.poll() == (2, {"loss": 2.5}, None)
    first_log = reporter.timeline()["first_log"]
    assert reporter.timeline() == {"process_started": 5.0, "loop_started": 7.0, "first_log": first_log}


def test_startup_points_are_seconds_from_the_fits_start():
    before = time.time()
    timings = worker_timings()
    assert timings["process_started"] < before <= timings["loop_started"]  # this process is older than the call
    points = startup({"process_started": 95.0, "loop_started": 104.5, "first_log": 106.25, "unrelated": 1.0}, started=100.0)
    assert points == {"worker_started": -5.0, "startup": 4.5, "first_log": 6.25}
    assert startup({"loop_started": 101.0}, started=100.0) == {"worker_started": 0.0, "startup": 1.0, "first_log": 0.0}  # points never reached
