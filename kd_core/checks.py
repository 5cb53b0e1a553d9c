"""`kdflow validate --check-inputs`: are the job's inputs there and usable, before any work?

`check_inputs(config)` raises an `InputError` (one line naming the field and what to do) for the
first unusable input. It checks today:

- `registry.tracking_uri`: the MLflow server answers as MLflow and accepts kdflow's credentials,
  or the SQLite database's folder can be written (`kd_core.train.tracking_probe`).

Each check is quick (seconds) and reads nothing large. It sits beside the CLI's other helpers:
it calls into the library and nothing in the library calls it.
"""

from __future__ import annotations

from kd_core.config import JobConfig
from kd_core.train.tracking_probe import probe_tracking_uri, redact


def check_inputs(config: JobConfig) -> list[str]:
    """Run every input check; returns what was checked, one line each, for the CLI to print."""
    probe_tracking_uri(config.registry.tracking_uri, config.registry.experiment)
    return [f"registry.tracking_uri: {redact(config.registry.tracking_uri)} is usable"]

