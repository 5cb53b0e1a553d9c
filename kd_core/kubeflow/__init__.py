"""The job as a Kubeflow Pipelines DAG, with its multi-GPU step on a KubeRay RayJob.

- `job`: the job as JSON for a step (a component parameter, the RayJob's environment) and back.
- `steps`: what each KFP component runs (one stage, its inputs named by manifest URL).
- `rayjob`: the distill step's RayJob: built from infra/kuberay/rayjob.yaml, submitted, watched, deleted.
- `isolation`: who may reach a RayJob's pods: its own pods (their label, its NetworkPolicy).
The components themselves (`components/`), the DAGs (`pipelines/dags.py`) and what compiles,
runs, submits and schedules them (`pipelines/engines.py`) stay thin and call these; nothing here
imports them.
"""
