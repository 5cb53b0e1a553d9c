"""The DAGs: prep → cache → [tune →] distill → eval → register, register only if every gate passed.

`build_distill_pipeline(config)` and `build_tune_distill_pipeline(config)` return the KFP
pipeline for one job config. The job (as JSON, no secrets; credentials written into a URL are
masked, so a cluster run reads such a file with the credentials of `kubeflow.secrets`) is its one
parameter; in the tune DAG
the steps after tune take the best trial's job instead, and the config's `kubeflow` section sets each step's image,
requests and limits, accelerators, node selectors, tolerations and secret-backed environment.
KFP's own caching is off for every step: the steps' inputs and outputs live on the job's storage,
outside KFP, and kdflow's step keys already skip work that is done. The long steps
(`kubeflow.retry.steps`) get KFP's retry policy: a retried step reuses the steps and checkpoints
it finished and adopts the RayJob it left running. The steps that run a RayJob know their own pod
(name, uid, namespace) through the downward API, to make it the RayJob's owner, and are marked not
safe to evict for the cluster autoscaler (the RayJob would go with them).
"""

from kfp import dsl, kubernetes

from components import stages
from kd_core.job import JobConfig
from kd_core.kubeflow.job import job_json
from kd_core.kubeflow.rayjob import POD_ENV, RAYJOB_STEPS
from kd_core.redaction import redact

PIPELINE_NAME = "kdflow-distill"
TUNE_PIPELINE_NAME = "kdflow-tune-distill"


def build_distill_pipeline(config: JobConfig):
    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="kdflow: prep → teacher cache → distillation (KubeRay) → eval with quality gates → MLflow registration",
    )
    def distill_pipeline(job: str = redact(job_json(config))):
        prep, cache = _prepare(job, config)
        _distill_and_register(job, config, prep, cache)

    return distill_pipeline


def build_tune_distill_pipeline(config: JobConfig):
    @dsl.pipeline(
        name=TUNE_PIPELINE_NAME,
        description="kdflow: prep → teacher cache → hyperparameter search (Ray Tune on KubeRay) → distillation with the best "
        "config → eval with quality gates → MLflow registration",
    )
    def tune_distill_pipeline(job: str = redact(job_json(config))):
        prep, cache = _prepare(job, config)
        search = configure(
            stages.tune(job=job, prep_manifest=prep.output, teacher_manifest=cache.outputs["teacher"], cache_manifest=cache.outputs["cache"]),
            config, "tune",
        )
        _distill_and_register(search.outputs["best_job"], config, prep, cache)

    return tune_distill_pipeline


def _prepare(job, config: JobConfig):
    prep = configure(stages.prep(job=job), config, "prep")
    cache = configure(stages.cache(job=job, prep_manifest=prep.output), config, "cache")
    return prep, cache


def _distill_and_register(job, config: JobConfig, prep, cache) -> None:
    """distill → eval → register (if the gates pass), all with `job` (the best job after a search)."""
    distill = configure(
        stages.distill(
            job=job, prep_manifest=prep.output, teacher_manifest=cache.outputs["teacher"], cache_manifest=cache.outputs["cache"]
        ),
        config, "distill",
    )
    evaluation = configure(
        stages.evaluate(
            job=job, prep_manifest=prep.output, teacher_manifest=cache.outputs["teacher"],
            student_manifest=distill.outputs["student"], baseline_manifest=distill.outputs["baseline"],
        ),
        config, "eval",
    )
    # The condition reads eval's return value ("Output"): kfp.local 2.17 resolves only that
    # form of task output inside a condition.
    with dsl.If(evaluation.outputs["Output"] == True, name="gates-passed"):  # noqa: E712 (a KFP condition, not Python)
        configure(
            stages.register(job=job, eval_manifest=evaluation.outputs["eval_manifest"], student_manifest=distill.outputs["student"]),
            config, "register",
        )


def configure(task: dsl.PipelineTask, config: JobConfig, step: str) -> dsl.PipelineTask:
    """Image, resources, placement, secrets and retries of one step's pod, from `config.kubeflow`."""
    kubeflow = config.kubeflow
    task.set_display_name(step).set_caching_options(False).set_container_image(kubeflow.image)
    resources = kubeflow.steps.get(step)
    if resources is not None:
        if resources.cpu:
            task.set_cpu_request(resources.cpu)
        if resources.cpu_limit or resources.cpu:
            task.set_cpu_limit(resources.cpu_limit or resources.cpu)
        if resources.memory:
            task.set_memory_request(resources.memory)
        if resources.memory_limit or resources.memory:
            task.set_memory_limit(resources.memory_limit or resources.memory)
        if resources.accelerators:
            task.set_accelerator_type(resources.accelerator_type).set_accelerator_limit(resources.accelerators)
        for label, value in sorted(resources.node_selector.items()):
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in resources.tolerations:
            kubernetes.add_toleration(task, **toleration.model_dump())
    for secret in kubeflow.secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret.secret, secret_key_to_env={key: env for env, key in secret.env.items()})
    if step in RAYJOB_STEPS:
        for variable, field_path in POD_ENV.items():
            kubernetes.use_field_path_as_env(task, env_name=variable, field_path=field_path)
        # The RayJob is owned by this pod: the autoscaler must not evict it to empty a node.
        kubernetes.add_pod_annotation(task, annotation_key="cluster-autoscaler.kubernetes.io/safe-to-evict", annotation_value="false")
    retry = kubeflow.retry
    if retry.retries and step in retry.steps:
        task.set_retry(
            num_retries=retry.retries, backoff_duration=f"{retry.backoff_seconds}s", backoff_factor=retry.backoff_factor,
            backoff_max_duration=f"{retry.max_duration_seconds}s",
        )
    return task
