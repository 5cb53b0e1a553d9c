"""The job as a Kubeflow Pipelines DAG, with its multi-GPU step on a KubeRay RayJob.

- `steps`: what each KFP component runs (one stage, its inputs named by manifest URL).
- `rayjob`: the distill step's RayJob: built from infra/kuberay/rayjob.yaml, submitted, watched, deleted.
- `isolation`: who may reach a RayJob's pods: its own pods (their label, its NetworkPolicy).
- `engines`: compiling the DAG, running it through `kfp.local`, submitting and scheduling it on
  a KFP endpoint.
The components themselves (`components/`) and the DAGs (`pipelines/`) stay thin and call these.
"""
