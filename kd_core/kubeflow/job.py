"""The job as it travels to a step: the public config as compact JSON, and back.

    job_json(config)      the job as a component parameter (no secrets), as `pipelines/dags.py`
                          compiles it and the RayJob's runtime environment carries it
    job_config(job)       that JSON back as a validated `JobConfig`, before any work
    JOB_ENV, INPUTS_ENV   the environment variables that hand the job and its input manifest URLs
                          to the RayJob's entrypoint (`rayjob` sets them, `steps.main` reads them)
"""

from __future__ import annotations

import json

from kd_core.config import ConfigError, public_dict
from kd_core.job import JobConfig, validate_config

JOB_ENV, INPUTS_ENV = "KDFLOW_JOB", "KDFLOW_STEP_INPUTS"
"""How the distill RayJob's entrypoint receives the job and its inputs."""


def job_config(job_json: str) -> JobConfig:
    """The job config a component was given, validated before any work."""
    try:
        raw = json.loads(job_json)
    except json.JSONDecodeError as err:
        raise ConfigError(f"the pipeline's job parameter is not JSON ({err}); compile the pipeline with kdflow") from None
    if not isinstance(raw, dict):
        raise ConfigError("the pipeline's job parameter must be a JSON object of config sections")
    return validate_config(raw, source="the pipeline's job parameter")


def job_json(config: JobConfig) -> str:
    """The job as a component parameter: the public config (secrets removed), as compact JSON."""
    return json.dumps(public_dict(config), sort_keys=True, separators=(",", ":"))
