"""Runs the stages in order, in this process (the embedded default and `kdflow <stage>`).

    prep -> teacher -> cache -> distill (+ baseline) -> eval -> register

Asking for a stage runs everything it depends on first; stages whose manifest already exists
are reused, so `kdflow eval` after `kdflow distill` only evaluates. This module unpacks the job
config into the sections each stage function takes: the stage functions never see the whole
config, and nothing here knows about Kubeflow.
"""

from __future__ import annotations

from kd_core.config import public_dict
from kd_core.errors import InputError
from kd_core.job import JobConfig
from kd_core.manifest import Manifest
from kd_core.progress import say
from kd_core.storage import Store

STAGES = ("prep", "cache", "distill", "eval", "register")
"""The CLI's stages, in order. `cache` includes the teacher step, `distill` the baseline."""

DEPENDS_ON = {
    "prep": (),
    "teacher": ("prep",),
    "cache": ("prep", "teacher"),
    "distill": ("prep", "teacher", "cache"),
    "baseline": ("prep",),
    "eval": ("prep", "teacher", "distill", "baseline"),
    "register": ("eval", "distill"),
    "tune": ("prep", "teacher", "cache"),
}
"""Step -> the steps whose outputs it reads. Forcing a step also redoes everything downstream."""


def is_forced(step: str, force: frozenset[str]) -> bool:
    return "all" in force or step in force or any(is_forced(upstream, force) for upstream in DEPENDS_ON[step])


def run_pipeline(config: JobConfig, until: str = "register", force: frozenset[str] = frozenset()) -> dict[str, Manifest]:
    """Run every stage up to and including `until`; `force` names steps to redo ('all' for every one).

    Returns step name (prep, teacher, cache, distill, baseline, eval, register) -> its manifest.
    """
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    wanted = STAGES[: STAGES.index(until) + 1]
    steps: dict[str, Manifest] = {"prep": prep_step(config, force)}
    if "cache" in wanted:
        steps |= cache_steps(config, steps["prep"], force)
    if "distill" in wanted:
        steps |= distill_steps(config, steps["prep"], steps["teacher"], steps.get("cache"), force)
    if "eval" in wanted:
        steps["eval"] = eval_step(config, steps["prep"], steps["teacher"], steps["distill"], steps.get("baseline"), force)
    if "register" in wanted:
        steps["register"] = register_step(config, steps["eval"], steps["distill"], force)
    return steps


# One function per stage, shared by run_pipeline and the Kubeflow components (kd_core/kubeflow).
def prep_step(config: JobConfig, force: frozenset[str] = frozenset()) -> Manifest:
    from kd_core.stages.prep import prep

    return _announce(prep(config.data, Store(config.storage), task=config.task, force=is_forced("prep", force)))


def cache_steps(config: JobConfig, prep: Manifest, force: frozenset[str] = frozenset()) -> dict[str, Manifest]:
    """The teacher step, then (with `distill.teacher_source: cache`) the cache stage. A student that
    starts from a pretrained folder, or is cut from an external teacher, is checked first
    (`check_student_start`): a bad one fails before the teacher trains or the cache is computed."""
    from kd_core.stages.cache import cache

    store = Store(config.storage)
    check_student_start(config, prep, store)
    check_route(config, prep)
    steps = {"teacher": teacher_step(config, prep, force)}
    if config.distill.teacher_source == "cache":
        steps["cache"] = _announce(cache(config.cache, prep, steps["teacher"], store, config.compute, force=is_forced("cache", force)))
    more_teacher_targets(config, prep, force)  # the other teachers' steps are this stage's work too (the distill step reuses them)
    return steps


def check_route(config: JobConfig, prep: Manifest) -> None:
    """Every tag `distill.route` names is a tag of the prepared data (a misspelt one would route
    nothing, silently). Raises `InputError` before any teacher trains."""
    if not config.distill.route:
        return
    tags = prep.details.get("tags")
    if tags is None:
        raise InputError("distill.route: the prepared data records no tags (prepared before kdflow recorded them); rerun prep with --force prep")
    for tag in config.distill.route:
        if tag not in tags:
            raise InputError(f"distill.route.{tag}: no conversation of the data has this tag; its tags are {', '.join(tags)} (data.chat.tag_field)")


def more_teacher_targets(config: JobConfig, prep: Manifest, force: frozenset[str] = frozenset()) -> dict[str, Manifest]:
    """Each named teacher's (`teachers:`) targets, as `teacher`'s are read: its cache with
    `distill.teacher_source: cache`, else its teacher step; every step reused when done. A teacher
    that predicts fewer tokens than the data's vocabulary is refused, naming it."""
    from kd_core.models.teacher import teacher_model_config
    from kd_core.stages.cache import cache
    from kd_core.stages.teacher import teacher

    store, targets = Store(config.storage), {}
    for name, section in config.teachers.items():
        manifest = _announce(teacher(section, prep, store, config.compute, checkpointing=config.distill, force=is_forced("teacher", force)))
        vocabulary = teacher_model_config(store, manifest).get("vocab_size", 0)
        if vocabulary < prep.details["vocab_size"]:
            raise InputError(
                f"teachers.{name}: it predicts {vocabulary} tokens (config.json vocab_size) but the prepared data's tokenizer has "
                f"{prep.details['vocab_size']}; every teacher reads the data's tokenizer (data.tokenizer)"
            )
        if config.distill.teacher_source == "cache":
            manifest = _announce(cache(config.cache, prep, manifest, store, config.compute, force=is_forced("cache", force)))
        targets[name] = manifest
    return targets


def teacher_step(config: JobConfig, prep: Manifest, force: frozenset[str] = frozenset()) -> Manifest:
    """The teacher: `teacher.path` recorded as it is, or the model kdflow trains (reused when done)."""
    from kd_core.stages.teacher import teacher

    store = Store(config.storage)
    return _announce(teacher(config.teacher, prep, store, config.compute, checkpointing=config.distill, force=is_forced("teacher", force)))


EXPORTABLE = ("teacher", "distill", "baseline")
"""Steps whose model `kdflow export` copies out."""


def export_model(config: JobConfig, step: str, destination: str) -> tuple[Manifest, str]:
    """Run the job up to `step` (reusing every finished step), then copy the Hugging Face model
    folder it made (safetensors, config, tokenizer) to `destination`, a folder URL on any fsspec
    store that must not exist yet or be empty: e.g. to start another job's teacher or student
    from it (`teacher.path`, `student.path`). The copy lands whole: on local disk it is written
    beside the destination and renamed into place. `kdflow-export.json` in it names the job,
    step and key it came from. Returns (the step's manifest, the destination's URL)."""
    import json
    import os
    import shutil
    import tempfile

    from fsspec.implementations.local import LocalFileSystem

    from kd_core.models import model_copy
    from kd_core.models.teacher import teacher_model_dir
    from kd_core.storage import url_to_fs

    if step not in EXPORTABLE:
        raise ValueError(f"kdflow export: step must be one of {', '.join(EXPORTABLE)}, got {step!r}")
    if step == "baseline" and not config.distill.baseline:
        raise InputError("kdflow export: --step baseline, but distill.baseline is false: the job trains no baseline; set it true or export distill")
    fs, target = url_to_fs(destination, config.storage)
    target = target.rstrip("/")
    if fs.exists(target) and fs.ls(target):
        raise InputError(f"kdflow export: {destination} exists and is not empty; remove it or export to another folder")
    if step == "teacher":
        manifest = teacher_step(config, prep_step(config))
        folder = teacher_model_dir(Store(config.storage), manifest)
    else:
        manifest = run_pipeline(config, until="distill")[step]
        folder = model_copy(Store(config.storage), manifest)
    provenance = {"job": config.name, "step": step, "key": manifest.key, "source_folder": str(manifest.details.get("model_folder") or folder)}
    local = isinstance(fs, LocalFileSystem)
    if local:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kdflow-export-", dir=os.path.dirname(target) if local else None) as staging:
        copied = os.path.join(staging, "model")
        shutil.copytree(folder, copied, ignore=shutil.ignore_patterns(".kdflow-download.json"))
        with open(os.path.join(copied, "kdflow-export.json"), "w") as handle:
            json.dump(provenance, handle, indent=2)
        if local:
            if os.path.isdir(target):
                os.rmdir(target)  # empty, checked above
            os.replace(copied, target)
        else:
            fs.put(copied + "/", target + "/", recursive=True)
    return manifest, destination


def check_student_start(config: JobConfig, prep: Manifest, store: Store) -> None:
    """What can be checked of `student.init` before the teacher step: a pretrained folder against
    the prepared data; a cut against an external teacher's config.json (a teacher kdflow trains
    was checked against `teacher.architecture` when the job was loaded). Raises `StudentError`."""
    from kd_core.models.students import check_pretrained_student, cut_settings
    from kd_core.models.teacher import read_teacher_json
    from kd_core.storage import reaching, url_to_fs
    from kd_core.tasks import task_named

    student = config.student
    if student.init == "pretrained":
        check_pretrained_student(student.path, store, prep, data_ids=task_named(config.task).pretrained_reads_data_ids)
    elif student.init == "from_teacher" and config.teacher.path:
        url = config.teacher.path
        fs, root = url_to_fs(url, store.config)
        with reaching(url, "teacher.path"):
            model_config = fs.cat_file(f"{root.rstrip('/')}/config.json")
        cut_settings(student.from_teacher, read_teacher_json(model_config, f"{url}/config.json"))


def seed_steps(config: JobConfig, seeds: int, force: frozenset[str] = frozenset()) -> tuple[dict[str, Manifest], dict[int, dict[str, Manifest]]]:
    """What `kdflow seeds` runs: prep, teacher and cache once (each reused when done), then for
    each of `seeds` seeds (`distill.train.seed`, +1, ...) the student, the baseline and eval.
    Returns (the shared steps, seed -> that seed's steps)."""
    shared = {"prep": prep_step(config, force)}
    shared |= cache_steps(config, shared["prep"], force)
    per_seed = {}
    for seed in range(config.distill.train.seed, config.distill.train.seed + seeds):
        job = with_training_seed(config, seed)
        say(f"[bold]seed {seed}[/bold]")
        steps = distill_steps(job, shared["prep"], shared["teacher"], shared.get("cache"), force)
        steps["eval"] = eval_step(job, shared["prep"], shared["teacher"], steps["distill"], steps.get("baseline"), force)
        per_seed[seed] = steps
    return shared, per_seed


def with_training_seed(config: JobConfig, seed: int) -> JobConfig:
    """The job with `distill.train.seed` set: the student's and the baseline's batch order, and
    their initial weights when built from config (a pretrained or cut student starts from the same
    weights whatever the seed; prep, teacher and cache do not read it)."""
    train = config.distill.train.model_copy(update={"seed": seed})
    return config.model_copy(update={"distill": config.distill.model_copy(update={"train": train})})


def distill_steps(
    config: JobConfig, prep: Manifest, teacher: Manifest, cache: Manifest | None, force: frozenset[str] = frozenset()
) -> dict[str, Manifest]:
    """The distilled student, then (with `distill.baseline`) the no-teacher baseline."""
    from kd_core.stages.distill import baseline, distill
    from kd_core.train.tracking import TrainingRun

    store = Store(config.storage)
    targets = _teacher_targets(config, teacher, cache, "distill")
    tracking = TrainingRun.for_job(config.registry, f"distill-{config.name}", public_dict(config))
    steps = {
        "distill": _announce(
            distill(
                config.distill, config.student, prep, targets, store, config.compute,
                teacher=teacher, tracking=tracking, force=is_forced("distill", force), more_targets=more_teacher_targets(config, prep),
            )
        )
    }
    if config.distill.baseline:
        steps["baseline"] = _announce(
            baseline(
                config.distill, config.student, prep, store, config.compute, teacher=teacher,
                # A baseline cut from the teacher reads it: a redone teacher redoes it too.
                force=is_forced("baseline", force) or (config.student.init == "from_teacher" and is_forced("teacher", force)),
            )
        )
    return steps


def tune_step(config: JobConfig, prep: Manifest, teacher: Manifest, cache: Manifest | None, force: frozenset[str] = frozenset()) -> Manifest:
    """The search of `config.tune` (kd_core/tune); its best_config.yaml is the job to distill next."""
    from kd_core.stages.tune import tune

    targets = _teacher_targets(config, teacher, cache, "tune")
    more = more_teacher_targets(config, prep)
    return _announce(tune(config, prep, targets, Store(config.storage), teacher=teacher, force=is_forced("tune", force), more_targets=more))


def search_steps(config: JobConfig, force: frozenset[str] = frozenset()) -> dict[str, Manifest]:
    """prep, teacher, cache (each reused when done), then the search: what `kdflow tune` runs."""
    steps = {"prep": prep_step(config, force)}
    steps |= cache_steps(config, steps["prep"], force)
    steps["tune"] = tune_step(config, steps["prep"], steps["teacher"], steps.get("cache"), force)
    return steps


def _teacher_targets(config: JobConfig, teacher: Manifest, cache: Manifest | None, step: str) -> Manifest:
    """What the student learns from: the cache, or the teacher itself with an online teacher."""
    targets = cache if config.distill.teacher_source == "cache" else teacher
    if targets is None:
        raise ValueError(f"distill.teacher_source is cache: the {step} step needs the cache stage's manifest")
    return targets


def eval_step(
    config: JobConfig, prep: Manifest, teacher: Manifest, student: Manifest, baseline: Manifest | None,
    force: frozenset[str] = frozenset(),
) -> Manifest:
    from kd_core.stages.eval import evaluate

    return _announce(
        evaluate(
            config.eval, prep, teacher, student, baseline, Store(config.storage),
            job_name=config.name, force=is_forced("eval", force), lease=(config.compute.lease_ttl_s, config.compute.lease_wait_s),
        )
    )


def register_step(config: JobConfig, evaluation: Manifest, student: Manifest, force: frozenset[str] = frozenset()) -> Manifest:
    from kd_core.stages.register import register

    return _announce(
        register(config.registry, evaluation, student, Store(config.storage), public_dict(config), force=is_forced("register", force))
    )


def _announce(manifest: Manifest) -> Manifest:
    state = "reused" if manifest.reused else f"done in {manifest.timings.get('total', 0):.1f}s"
    say(f"[green]✓[/green] {manifest.stage:<9} {manifest.key}  {state}")
    return manifest
