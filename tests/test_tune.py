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
from kd_core.tune import best_trial, job_with, ranked_trials, search_space
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
    """Trials whose loss depends on the learning rate only; kd_weight does not matter. Their
    `val_agreement` depends on kd_weight only, and is highest where the loss is not lowest."""
    import random

    generator = random.Random(0)
    trials = []
    for index in range(count):
        rate, weight = generator.uniform(1e-3, 1e-2), generator.uniform(0.1, 0.9)
        loss, agreement = 3 + 200 * abs(rate - 4e-3), 1 - abs(weight - 0.7)
        status = "stopped early" if index % 3 == 0 else "finished"
        reports = {"val_loss": [[5, loss + 1], [10, loss]], "val_agreement": [[5, agreement - 0.1], [10, agreement]]}
        trials.append({
            "trial": f"t{index}", "params": {"distill.train.learning_rate": rate, "distill.loss.kd_weight": weight},
            "reports": reports["val_loss"], "val_loss": loss, "metric_reports": reports,
            "metrics": {"val_loss": loss, "val_agreement": agreement}, "steps": 10, "status": status, "error": None,
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
    by_agreement = importance(synthetic_trials(), space, "val_agreement", "max")
    assert by_agreement["distill.loss.kd_weight"] > 0.5 > by_agreement["distill.train.learning_rate"]


def test_the_best_trial_is_the_best_on_the_searched_metric_in_its_direction():
    trials = synthetic_trials()
    trials[4]["metrics"] = {"val_loss": None, "val_agreement": None}  # a trial that never reported
    reported = [trial for trial in trials if trial["metrics"]["val_loss"] is not None]
    assert best_trial(trials, "val_loss", "min") is min(reported, key=lambda trial: trial["metrics"]["val_loss"])
    best = best_trial(trials, "val_agreement", "max")
    assert best is max(reported, key=lambda trial: trial["metrics"]["val_agreement"])
    assert best is not best_trial(trials, "val_loss", "min") and best is not best_trial(trials, "val_agreement", "min")
    ranked = ranked_trials(trials, "val_agreement", "max")
    assert ranked[-1] is trials[4] and [t["metrics"]["val_agreement"] for t in ranked[:-1]] == sorted(
        (t["metrics"]["val_agreement"] for t in reported), reverse=True
    )
    assert best_trial([trials[4]], "val_loss", "min") is None


def test_tune_metric_must_be_one_the_task_reports():
    assert load_config(REPO / "configs" / "reward_tiny.yaml", ["tune.metric=val_agreement"]).tune.metric == "val_agreement"
    with pytest.raises(ConfigError, match=r"tune.metric: task causal_lm validates a student on val_loss, got 'val_agreement'"):
        load_config(REPO / "configs" / "tiny.yaml", ["tune.metric=val_agreement"])
    with pytest.raises(ConfigError, match=r"tune.metric: task reward validates a student on val_loss or val_agreement, got 'agreement'"):
        load_config(REPO / "configs" / "reward_tiny.yaml", ["tune.metric=agreement"])


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
    assert "val_loss" in text and "val_agreement" in text, "a column per validation metric"
    console = Console(width=200, record=True)
    console.print(trials_table(trials, space, "val_agreement", "max"))
    text = console.export_text()
    best = max(trials, key=lambda trial: trial["metrics"]["val_agreement"])
    first_row = next(line for line in text.splitlines() if line.strip().startswith("│ t"))
    assert best["trial"] + " ★" in first_row and "ranked by val_agreement" in text
    png = tune_png(trials, {"distill.train.learning_rate": 0.9, "distill.loss.kd_weight": 0.1}, TuneConfig(max_concurrent=2))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    png = tune_png(trials, {}, TuneConfig(metric="val_agreement"), "agreement with the teacher", "max")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_the_training_loop_reports_and_returns_every_validation_metric():
    """What a trial hands Ray Tune at each validation (`on_validation`, i.e. `ray.train.report`):
    the step and every metric of `Task.validation_metrics`; the run's last record holds them too."""
    from types import SimpleNamespace

    import torch

    from kd_core.train.loop import WorkerRun
    from kd_core.train.targets import NoTargets

    class Task:
        def batch_tokens(self, batch):
            return batch["ids"].numel()

        def validation_metrics(self, model, rows, batch_size, spec, device):
            assert not model.training and batch_size == 2 and rows == {"ids": "rows"}
            return {"val_loss": torch.tensor(2.5), "val_agreement": 0.75 + 0.01 * model.calls}

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(1, 1)
            self.model.calls = 0

    module = Step()

    def step(micro_batches):
        module.model.calls += 1
        return {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0}

    train = SimpleNamespace(max_steps=5, log_every=1, batch_size=2, max_nonfinite_steps=3)
    spec = SimpleNamespace(
        train=train, task=Task(), deepspeed=False, validate_every=2, checkpoint_every=None, role="student", output_folder="distill/x",
    )
    reports = []
    run = WorkerRun(
        spec, 0, 1, 1, SimpleNamespace(module=module, step=step), torch.device("cpu"), checkpoints=None,
        on_validation=reports.append, validation_rows={"ids": "rows"},
    )
    batches = iter(lambda: {"ids": torch.zeros(2, 3, dtype=torch.long)}, None)
    record = run.train_steps(batches, NoTargets())
    assert reports == [
        {"step": 2, "val_loss": 2.5, "val_agreement": pytest.approx(0.77)},
        {"step": 4, "val_loss": 2.5, "val_agreement": pytest.approx(0.79)},
        {"step": 5, "val_loss": 2.5, "val_agreement": pytest.approx(0.80)},
    ]
    assert all(type(value) is float for report in reports for name, value in report.items() if name != "step")
    assert record["step"] == 5 and record["val_loss"] == 2.5 and record["val_agreement"] == pytest.approx(0.80)
    assert module.training and module.model.training, "validation leaves the model training"
