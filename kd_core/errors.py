"""The errors the CLI reports in one line, without a traceback. They live alone so that catching
them imports nothing heavy (a `kdflow prep` never loads torch).

- `InputError`: a config, data file, cache shard, manifest or teacher that the user must fix.
  Each subclass's message names the field, file or shard and says what to do; exit status 2.
- `RunStopped`: a run that stopped for a reason that is not bad input, e.g. `TrainingDiverged`
  (a loss or gradient norm NaN or infinite for more steps in a row than
  `train.max_nonfinite_steps`; the message names the run, the step and the last finite loss) or
  `kd_core.stage.StageBusy` (another run holds the step); exit status 1.

A message naming a URL names it without the credentials the URL may carry (`kd_core.redaction`).
"""

from kd_core.redaction import redact


class InputError(ValueError):
    """Bad input, reported by name before any expensive work starts."""

    def __init__(self, *args):
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class RunStopped(RuntimeError):
    """A run stopped for a reason its message names (not bad input)."""


class TrainingDiverged(RunStopped):
    """A training run stopped because its loss or gradient norm was not finite."""

    def __init__(self, message: str, *, step: int, last_finite_loss: float | None, last_finite_step: int | None):
        super().__init__(message)
        self.step, self.last_finite_loss, self.last_finite_step = step, last_finite_loss, last_finite_step

    def __reduce__(self):  # crosses process boundaries (Ray workers) with its fields
        return (_rebuild_diverged, (str(self), self.step, self.last_finite_loss, self.last_finite_step))


def _rebuild_diverged(message: str, step: int, last_finite_loss: float | None, last_finite_step: int | None) -> TrainingDiverged:
    return TrainingDiverged(message, step=step, last_finite_loss=last_finite_loss, last_finite_step=last_finite_step)
