"""MLflow logging of a training run, from rank 0 only.

`TrainingRun` travels in the `TrainSpec` (plain data); rank 0 of the training workers opens an
MLflow run in the registry's experiment, logs the job's flattened public config as params (no
secrets: `config.public_dict` has dropped them, and credentials in URLs are masked), then at
every log step each loss term, the learning rate, the gradient norm, tokens/s and samples seen. The run id is recorded in the stage
manifest (`details["mlflow_run_id"]`). A run resumed from a checkpoint reopens its MLflow run
and logs only the steps after the last one there, so each step is logged once. A relative SQLite
tracking URI is made absolute on the driver, so workers started in other folders write to the
same database.

Logging is best-effort: MLflow going away mid-run never fails training. The records wait in a
buffer (the latest `MAX_BUFFERED` steps), a warning says so once, the server is tried again every
`retry_every_s` seconds (not at every step: each try waits out the client's own retries), and
once it answers the buffered steps are sent in order. What never reached MLflow by the end is
counted in a warning.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from kd_core.config import RegistryConfig, flatten
from kd_core.progress import say
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
    """Rank 0's MLflow run: `start()`, `log(step, record)` at each log step, `end(status)`; every
    call best-effort (see the module docstring)."""

    MAX_BUFFERED = 100_000

    def __init__(self, run: TrainingRun, retry_every_s: float = 30.0):
        self.run, self.run_id = run, None
        self.retry_every_s = retry_every_s
        self.logged_through = 0
        """The last step already in the run: a resumed run replays the steps between its checkpoint
        and the crash, which were logged before; they are not logged twice."""
        self.pending: deque[tuple[int, dict[str, float]]] = deque(maxlen=self.MAX_BUFFERED)
        self.dropped = 0
        self._resume_run_id: str | None = None
        self._params_logged = False
        self._outage_since: float | None = None
        self._retry_at = 0.0

    def start(self, resume_run_id: str | None = None) -> None:
        """Open a new run, or reopen `resume_run_id` (a run resumed from a checkpoint goes on
        logging into the run it started)."""
        self._resume_run_id = resume_run_id
        self._attempt(self._open)

    def log(self, step: int, record: dict) -> None:
        if step <= self.logged_through:
            return
        # NaN and inf are logged as they are: a diverging run must show in its curves, not vanish from them.
        numbers = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append((step, numbers))
        if time.monotonic() >= self._retry_at:
            self._attempt(self._flush)

    def end(self, status: str = "FINISHED") -> None:
        if self._attempt(self._flush) and self.run_id is not None:
            self._attempt(lambda: self._client().set_terminated(self.run_id, status=status))
        lost = len(self.pending) + self.dropped
        if lost:
            say(f"[yellow]MLflow: {lost} log steps of {self.run.run_name} never reached {self.run.registry.tracking_uri} "
                "(it did not answer); they are in the step's history.jsonl[/yellow]")

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.run.registry.tracking_uri)

    def _open(self) -> None:
        """Create (or reopen) the run and log its params, whichever of these is not done yet. The
        client API, not mlflow's module-level active run: a run left open by an outage never
        blocks the next one in this process."""
        import mlflow
        from mlflow.entities import Param

        client = self._client()
        if self.run_id is None:
            mlflow.set_tracking_uri(self.run.registry.tracking_uri)  # experiment_id's lookup goes there
            if self._resume_run_id is not None:
                client.update_run(self._resume_run_id, status="RUNNING")
                self.run_id = self._resume_run_id
                self.logged_through = _last_logged_step(client, self.run_id)
                self._params_logged = True  # logged when the run began
            else:
                self.run_id = client.create_run(experiment_id(self.run.registry), run_name=self.run.run_name).info.run_id
        if not self._params_logged:
            params = [Param(key, redact(str(value))[:MAX_PARAM_LENGTH]) for key, value in self.run.params.items()]
            for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
                client.log_batch(self.run_id, params=params[start : start + 100])
            self._params_logged = True

    def _flush(self) -> None:
        """Send the buffered steps in order, up to 1000 numbers per request."""
        from mlflow.entities import Metric

        self._open()
        client = self._client()
        while self.pending:
            batch, steps = [], 0
            for step, numbers in self.pending:
                if len(batch) + len(numbers) > 1000:
                    break
                stamp = int(time.time() * 1000)
                if step > self.logged_through:
                    batch.extend(Metric(name, value, stamp, step) for name, value in numbers.items())
                steps += 1
            if batch:
                client.log_batch(self.run_id, metrics=batch)
            for _ in range(steps):
                self.pending.popleft()

    def _attempt(self, action) -> bool:
        """Run `action`; on failure warn once per outage, keep the records, and wait
        `retry_every_s` before the next try. True when it ran."""
        try:
            action()
        except Exception as err:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                say(f"[yellow]MLflow: {self.run.registry.tracking_uri} did not take the log ({type(err).__name__}); "
                    f"training goes on, the records wait and are sent when it answers (tried every {self.retry_every_s:.0f} s)[/yellow]")
            self._retry_at = time.monotonic() + self.retry_every_s
            return False
        if self._outage_since is not None:
            say(f"MLflow: {self.run.registry.tracking_uri} answers again after {time.monotonic() - self._outage_since:.0f} s; "
                "the buffered log steps were sent")
            self._outage_since = None
        return True


def _last_logged_step(client, run_id: str) -> int:
    """The highest step of the run's `loss` metric (every log record has one), 0 if none."""
    return max((metric.step for metric in client.get_metric_history(run_id, "loss")), default=0)


def experiment_id(config: RegistryConfig) -> str:
    """The id of `registry.experiment`, created (with its artifact location) when missing."""
    import mlflow

    existing = mlflow.get_experiment_by_name(config.experiment)
    if existing is not None:
        return existing.experiment_id
    return mlflow.create_experiment(config.experiment, artifact_location=_artifact_location(config))


def _artifact_location(config: RegistryConfig) -> str | None:
    if config.artifact_location:
        return config.artifact_location
    parsed = urlparse(config.tracking_uri)
    if parsed.scheme == "sqlite":
        database = Path(config.tracking_uri.removeprefix("sqlite:///"))
        return (database.resolve().parent / "mlartifacts").as_uri()
    return None
