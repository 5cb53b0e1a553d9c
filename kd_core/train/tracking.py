"""MLflow logging of a training run, from rank 0 only.

`TrainingRun` travels in the `TrainSpec` (plain data); rank 0 of the training workers opens an
MLflow run in the registry's experiment, logs the job's flattened public config as params (no
secrets: `config.public_dict` has dropped them, and credentials in URLs are masked), then at
every log step each loss term, the learning rate, the gradient norm, tokens/s and samples seen. The run id is recorded in the stage
manifest (`details["mlflow_run_id"]`). A run resumed from a checkpoint reopens its MLflow run
and logs only the steps after the last one there, so each step is logged once. A relative SQLite
tracking URI is made absolute on the driver, so workers started in other folders write to the
same database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kd_core.config import RegistryConfig, flatten
from kd_core.redaction import redact

MAX_PARAM_LENGTH = 500
"""MLflow's limit on a param value."""


@dataclass
class TrainingRun:
    registry: RegistryConfig
    run_name: str
    params: dict = field(default_factory=dict)

    @classmethod
    def for_job(cls, registry: RegistryConfig, run_name: str, job_params: dict) -> TrainingRun:
        uri = registry.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
        return cls(registry.model_copy(update={"tracking_uri": uri}), run_name, flatten(job_params))


class MlflowLogger:
    """Rank 0's MLflow run: `start()`, `log(step, record)` at each log step, `end(status)`."""

    def __init__(self, run: TrainingRun):
        self.run, self.run_id = run, None
        self.logged_through = 0
        """The last step already in the run: a resumed run replays the steps between its checkpoint
        and the crash, which were logged before; they are not logged twice."""

    def start(self, resume_run_id: str | None = None) -> None:
        """Open a new run, or reopen `resume_run_id` (a run resumed from a checkpoint goes on
        logging into the run it started)."""
        import mlflow

        from kd_core.registry import experiment_id

        mlflow.set_tracking_uri(self.run.registry.tracking_uri)
        if resume_run_id is not None:
            self.run_id = mlflow.start_run(run_id=resume_run_id).info.run_id
            self.logged_through = _last_logged_step(self.run_id)
            return
        active = mlflow.start_run(experiment_id=experiment_id(self.run.registry), run_name=self.run.run_name)
        self.run_id = active.info.run_id
        mlflow.log_params({key: redact(str(value))[:MAX_PARAM_LENGTH] for key, value in self.run.params.items()})

    def log(self, step: int, record: dict) -> None:
        import mlflow

        if step <= self.logged_through:
            return
        # NaN and inf are logged as they are: a diverging run must show in its curves, not vanish from them.
        numbers = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(numbers, step=step)

    def end(self, status: str = "FINISHED") -> None:
        import mlflow

        if self.run_id is not None:
            mlflow.end_run(status=status)


def _last_logged_step(run_id: str) -> int:
    """The highest step of the run's `loss` metric (every log record has one), 0 if none."""
    from mlflow import MlflowClient

    return max((metric.step for metric in MlflowClient().get_metric_history(run_id, "loss")), default=0)
