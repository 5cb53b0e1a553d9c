"""kdflow tune: the search space is checked before any work, importance and the report are right,
and the RayJob for a search sizes its cluster for the concurrent trials.

The search itself (2 trials at once, MLflow parent and child runs, Tuner.restore, the best
config distilled) runs inside the tune → distill DAG in tests/test_kubeflow.py, so the tiny job's
stages are computed once for both; ASHA's stopping rule is checked here on the real scheduler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_core.config import ConfigError, SearchDimension
from kd_core.job import load_config
from kd_core.tune import job_with, search_space
from kd_core.tune.report import importance, trials_table, tune_png

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("space", "message"), [
    ("{cache.top_k: {kind: int, low: 4, high: 9}}", "only fields under distill.loss, distill.train, student can be searched"),
    ("{distill.loss.tempreature: {kind: uniform, low: 1, high: 2}}", "did you mean 'temperature'"),
    ("{distill.loss.temperature: {kind: uniform, low: 1, high: 4}}", "the value 4.0 makes the job invalid: distill.loss.temperature: must equal cache.temperature"),
    ("{distill.loss.divergence: {kind: choice, values: [forward_kl, nope]}}", "the value 'nope' makes the job invalid"),
    ("{distill.train.learning_rate: {kind: loguniform, low: 0, high: 1}}", "loguniform needs low > 0"),
    ("{distill.train.learning_rate: {kind: uniform, low: 2, high: 1}}", "needs low < high"),
])
def test_search_space_errors_name_the_field_before_any_work(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(REPO / "configs" / "demo.yaml", [f"tune.space={space}"])


def test_trial_values_apply_to_the_job_and_keep_credentials():
    config = load_config(REPO / "configs" / "tiny.yaml", ["storage.s3.secret_access_key=kept"])
    job = job_with(config, {"distill.loss.kd_weight": 0.25, "student.architecture.hidden_size": 24})
    assert job.distill.loss.kd_weight == 0.25 and job.student.architecture.hidden_size == 24
    assert job.storage.s3.secret_access_key.get_secret_value() == "kept"
    assert job.distill.train == config.distill.train


def test_search_space_becomes_ray_tune_distributions():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = search_space({
        "a": SearchDimension(kind="loguniform", low=1e-4, high=1e-2),
        "b": SearchDimension(kind="int", low=2, high=5),
        "c": SearchDimension(kind="choice", values=["forward_kl", "reverse_kl"]),
    })
    assert isinstance(space["a"], Float) and space["a"].lower == 1e-4 and space["a"].upper == 1e-2
    assert isinstance(space["b"], Integer) and (space["b"].lower, space["b"].upper) == (2, 6)  # randint's upper bound is exclusive
    assert isinstance(space["c"], Categorical) and space["c"].categories == ["forward_kl", "reverse_kl"]


def synthetic_trials(count=12):
    """Trials whose loss depends on the learning rate only; kd_weight does not matter."""
    import random

    generator = random.Random(0)
    trials = []
    for index in range(count):
        rate, weight = generator.uniform(1e-3, 1e-2), generator.uniform(0.1, 0.9)
        loss = 3 + 200 * abs(rate - 4e-3)
        status = "stopped early" if index % 3 == 0 else "finished"
        trials.append({
            "trial": f"t{index}", "params": {"distill.train.learning_rate": rate, "distill.loss.kd_weight": weight},
            "reports": [[5, loss + 1], [10, loss]], "val_loss": loss, "steps": 10, "status": status, "error": None,
        })
    return trials


def test_importance_credits_the_field_that_moves_the_metric():
    space = {
        "distill.train.learning_rate": SearchDimension(kind="uniform", low=1e-3, high=1e-2),
        "distill.loss.kd_weight": SearchDimension(kind="uniform", low=0.1, high=0.9),
    }
    shares = importance(synthetic_trials(), space)
    assert set(shares) == set(space) and sum(shares.values()) == pytest.approx(1, abs=1e-6)
    assert shares["distill.train.learning_rate"] > 0.5 > shares["distill.loss.kd_weight"]
    assert importance(synthetic_trials()[:1], space) == {}


def test_table_ranks_trials_and_the_plot_renders():
    from rich.console import Console

    from kd_core.config import TuneConfig

    trials = synthetic_trials()
    space = {"distill.train.learning_rate": SearchDimension(kind="uniform", low=1e-3, high=1e-2)}
    console = Console(width=200, record=True)
    console.print(trials_table(trials, space))
    text = console.export_text()
    best = min(trials, key=lambda trial: trial["val_loss"])
    first_row = next(line for line in text.splitlines() if line.strip().startswith("│ t"))
    assert best["trial"] + " ★" in first_row and "stopped early" in text
    png = tune_png(trials, {"distill.train.learning_rate": 0.9, "distill.loss.kd_weight": 0.1}, TuneConfig(max_concurrent=2))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_search_rayjob_holds_every_concurrent_trial():
    from kd_core.kubeflow.rayjob import build_rayjob

    config = load_config(REPO / "configs" / "cluster.yaml")  # 4 concurrent trials × 8 workers, 8 GPUs per pod
    job = build_rayjob(config, "tune", {"prep": "x"}, "kdflow-tune-t")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 4 and job["spec"]["entrypoint"].endswith("steps tune")
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "tune"
    with pytest.raises(ValueError, match="does not run as a RayJob"):
        build_rayjob(config, "eval", {}, "x")


def test_asha_stops_a_trial_that_trails_at_its_first_rung_and_no_sooner():
    """The scheduler the search runs with, fed the reports two trials would send: the rung sits at
    `grace_period` validations (in optimizer steps), and the trial behind there is stopped. (In the
    kfp.local search, whether ASHA stops one of the 2 trials depends on which reaches a rung first.)"""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from kd_core.tune import METRIC
    from kd_core.tune.search import asha_scheduler

    settings = load_config(REPO / "configs" / "tiny.yaml").tune
    rung = settings.eval_every * settings.grace_period
    scheduler = asha_scheduler(settings, steps=4 * rung)
    scheduler.set_search_properties(METRIC, "min")  # what the Tuner's TuneConfig(metric, mode) sets
    leader, trailer, close = (SimpleNamespace(trial_id=name) for name in ("leader", "trailer", "close"))
    for trial in (leader, trailer, close):
        scheduler.on_trial_add(None, trial)

    def report(trial, step, val_loss):
        return scheduler.on_trial_result(None, trial, {"step": step, METRIC: val_loss})

    assert report(trailer, rung - settings.eval_every, 9.0) == TrialScheduler.CONTINUE, "stopped before its first rung"
    assert report(leader, rung, 3.0) == TrialScheduler.CONTINUE
    assert report(trailer, rung, 9.0) == TrialScheduler.STOP
    assert report(close, rung, 2.5) == TrialScheduler.CONTINUE, "a trial ahead of the rung's cutoff goes on"
