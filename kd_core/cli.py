"""The `kdflow` command line.

    kdflow validate CONFIG [a.b=value ...] [--check-inputs] [--deep]
                                                check a job config, do nothing else (--check-inputs:
                                                also check that its inputs are there: data files,
                                                tokenizer, teacher, bucket, MLflow server; --deep:
                                                load the teacher, student and tokenizers and check
                                                that they fit on the first records: kd_core/preflight.py)
    kdflow prep|cache|distill|eval|register CONFIG [a.b=value ...] [--force STEP] [--force-all]
    kdflow run CONFIG [a.b=value ...] [--engine local|kfp-local]
                                                every stage, in order (in this process, or as the
                                                Kubeflow DAG through kfp.local)
    kdflow run|eval|register ... --fail-on-gates   exit 3 when a gate in eval.gates failed (for CI)
    kdflow promote CONFIG VERSION [--force]     make VERSION the champion (--force: even if it failed a gate)
    kdflow rollback CONFIG                      reject the champion, restore the previous one
    kdflow tune CONFIG [a.b=value ...]          search tune.space (Optuna TPE + ASHA on Ray Tune)
    kdflow seeds CONFIG [a.b=value ...] [--seeds N]
                                                the student, the baseline and eval for N training
                                                seeds (default 3) on one prep, teacher and cache:
                                                every held-out metric's mean, spread and range
    kdflow export CONFIG --step teacher|distill|baseline --to DEST
                                                the job up to STEP, then its model folder copied to
                                                DEST (to start another job's teacher or student)
    kdflow compile CONFIG [--output FILE]       the Kubeflow DAG as KFP YAML
    kdflow submit CONFIG                        one run of the DAG on kubeflow.host
    kdflow schedule CONFIG --cron "0 0 3 * * *" a recurring run (one at a time, no catch-up)

Every command validates the whole config before any work starts; a command that reaches a step
logging to MLflow (distill, eval, register, run, tune, promote, rollback) then probes
`registry.tracking_uri` (seconds). A stage runs what it depends on first and reuses every step
whose manifest already exists. The end prints a summary table. `run` first makes the preflight's
cheap checks (the temperature rule; a pretrained student's vocabulary, from its tokenizer files and
config.json) and refuses to start on a hard mismatch.
Exit codes: 0 success, 1 a stage failed, 2 the config or an input is unusable (or `promote` of a
version that failed its gates, without --force), 3 a gate failed and --fail-on-gates was given
(after the summary is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.table import Table

from kd_core import __version__
from kd_core.config import ConfigError
from kd_core.errors import InputError, RunStopped
from kd_core.gates import describe_failed
from kd_core.job import JobConfig, load_config
from kd_core.manifest import Manifest
from kd_core.pipeline import STAGES
from kd_core.redaction import redact
from kd_core.tasks import Task, task_named, task_of
from kd_core.train.tracking_probe import fail_fast_mlflow_client, probe_tracking_uri

EXIT_GATES_FAILED = 3
"""Exit status of `run`, `eval` and `register` with --fail-on-gates when a gate failed."""
_STEPS = ("prep", "teacher", "cache", "tune", "distill", "baseline", "eval", "register")
_TRACKED_STAGES = ("distill", "eval", "register")
"""Stage commands that reach a step logging to MLflow; prep and cache never talk to it, so a
tracking server that is down does not stop them."""
_STAGE_HELP = {
    "prep": "tokenize raw text into packed, split token shards",
    "cache": "run (or train) the teacher and cache its outputs (top-k, sampled or full)",
    "distill": "distill the student from the cache or the online teacher (and train the no-teacher baseline)",
    "eval": "measure teacher, student and baseline on held-out text",
    "register": "log the student to MLflow and register it under an alias",
    "run": "run every stage in order",
    "tune": "search distillation hyperparameters (tune.space) with Ray Tune; writes the best config",
    "seeds": "distill, train the baseline and evaluate for several training seeds; the metrics' mean and spread",
}
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdflow", description="Knowledge-distillation pipelines, laptop to cluster.")
    parser.add_argument("--version", action="version", version=f"kdflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate = commands.add_parser("validate", help="validate a job config and exit", description="Validate a job config.")
    _add_config_arguments(validate)
    validate.add_argument(
        "--check-inputs", action="store_true",
        help="also check that the job's inputs are usable: the bucket of an s3:// storage.root, the data files and "
        "their first records, the tokenizer, the teacher folder, and the MLflow server at registry.tracking_uri "
        "(or a writable SQLite folder); exit 2 naming the first that is not",
    )
    validate.add_argument(
        "--deep", action="store_true",
        help="also load the teacher, the student and their tokenizers and run them on the first records: for task causal_lm "
        "vocabularies and special tokens, chat template renderings, teacher determinism, the cache and loss temperatures, "
        "and kdflow's loss against a float64 reference on one real batch; for task cross_tokenizer the vocabulary overlap, "
        "the aligned spans, each tokenizer's round trip and the losses that apply; prints a table, exit 2 when a check fails",
    )
    for stage in (*STAGES, "tune", "seeds", "run"):
        sub = commands.add_parser(stage, help=_STAGE_HELP[stage], description=_STAGE_HELP[stage].capitalize() + ".")
        _add_config_arguments(sub)
        sub.add_argument(
            "--force", action="append", default=[], choices=_STEPS, metavar="STEP",
            help=f"redo STEP even if its outputs exist (repeatable; one of {', '.join(_STEPS)})",
        )
        sub.add_argument("--force-all", action="store_true", help="redo every step")
        if stage in ("eval", "register", "run"):
            sub.add_argument(
                "--fail-on-gates", action="store_true",
                help=f"exit {EXIT_GATES_FAILED} when a gate in eval.gates failed (after the summary), so CI notices",
            )
        if stage == "seeds":
            sub.add_argument("--seeds", type=int, default=3, metavar="N", help="training seeds: distill.train.seed, +1, ... (default 3)")
        if stage == "run":
            sub.add_argument(
                "--engine", choices=("local", "kfp-local"), default="local",
                help="local: the stages in this process (default); kfp-local: the Kubeflow DAG through kfp.local",
            )
            _add_pipeline_argument(sub)
    compile_ = commands.add_parser("compile", help="compile the Kubeflow DAG to KFP YAML", description="Compile the Kubeflow DAG of a job to KFP YAML.")
    _add_config_arguments(compile_)
    compile_.add_argument("--output", default=None, help="YAML file to write (default: pipelines/compiled/<job name>-<pipeline>.yaml)")
    _add_pipeline_argument(compile_)
    submit = commands.add_parser("submit", help="submit one run of the DAG to kubeflow.host", description="Submit one run of the Kubeflow DAG.")
    _add_config_arguments(submit)
    _add_pipeline_argument(submit)
    schedule = commands.add_parser(
        "schedule", help="create a recurring run of the DAG on kubeflow.host",
        description="Create a recurring run of the Kubeflow DAG: at most one at a time, missed runs are not caught up.",
    )
    _add_config_arguments(schedule)
    _add_pipeline_argument(schedule)
    schedule.add_argument("--cron", required=True, help="KFP cron, six fields, seconds first: '0 0 3 * * *' is 03:00 daily")
    promote = commands.add_parser(
        "promote", help="move the champion alias to a model version by hand",
        description="Move registry.champion_alias to VERSION of registry.model_name; automatic promotion then only "
        "considers versions from VERSION on.",
    )
    promote.add_argument("config", metavar="CONFIG", help="job YAML file (its registry section names the model)")
    promote.add_argument("version", metavar="VERSION", type=int, help="the model version to make champion")
    promote.add_argument("--force", action="store_true", help="promote it even if it failed its gates")
    promote.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. registry.tracking_uri=http://mlflow:5000")
    rollback = commands.add_parser(
        "rollback", help="reject the champion and restore the previous one",
        description="Mark the current champion rejected and move the champion alias back to the previous champion.",
    )
    _add_config_arguments(rollback)
    export = commands.add_parser(
        "export", help="copy the model a step made into a folder (to start another job from it)",
        description="Run the job up to STEP (reusing finished steps) and copy the Hugging Face model folder it made "
        "(safetensors, config, tokenizer) to DEST, e.g. for another job's teacher.path or student.path.",
    )
    _add_config_arguments(export)
    export.add_argument("--step", required=True, choices=("teacher", "distill", "baseline"), help="the step whose model to copy")
    export.add_argument("--to", required=True, metavar="DEST", help="a folder URL (local or s3://) that does not exist yet, or is empty")
    return parser


def _add_pipeline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline", choices=("distill", "tune-distill"), default="distill",
        help="distill: prep → cache → distill → eval → register (default); tune-distill: a search (tune.space) before distill",
    )


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="job YAML file, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. distill.train.max_steps=50")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]  # KEY=VALUE after a flag (`validate job.yaml --deep a.b=1`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    fail_fast_mlflow_client()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        stderr.print(f"[red]error:[/red] {err}", markup=True, soft_wrap=True)
        return 2
    if args.command == "validate":
        return _validate(config, args.config, args.check_inputs, args.deep)
    if args.command in ("promote", "rollback"):
        return _move_champion(config, args.command, getattr(args, "version", None), force=getattr(args, "force", False))
    if args.command in ("compile", "submit", "schedule"):
        return _kubeflow(config, args)
    if args.command == "export":
        return _export(config, args.step, args.to)
    force = frozenset(["all"] if args.force_all else args.force)
    fail_on_gates = getattr(args, "fail_on_gates", False)
    if args.command == "run" and not _preflight_passes(config):
        return 2
    if getattr(args, "engine", "local") == "kfp-local":
        if force:
            stderr.print("[red]error:[/red] --force applies to the local engine; the kfp-local DAG reuses finished steps like a cluster run")
            return 2
        return _run(config, "register", force, kfp_local=args.pipeline, fail_on_gates=fail_on_gates)
    if args.command == "tune":
        return _tune(config, force)
    if args.command == "seeds":
        return _seeds(config, args.seeds, force)
    until = "register" if args.command == "run" else args.command
    return _run(config, until, force, fail_on_gates=fail_on_gates)


def _validate(config: JobConfig, path: str, check: bool, deep: bool = False) -> int:
    if check:
        from kd_core.checks import check_inputs

        try:
            checked = check_inputs(config)
        except InputError as err:
            stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
            return 2
        for line in checked:
            stdout.print(redact(line), soft_wrap=True)
    if deep:
        from kd_core.preflight import deep_checks, failures

        try:
            results = deep_checks(config)
        except InputError as err:
            stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
            return 2
        stdout.print(preflight_table(results))
        if failures(results):
            for result in failures(results):
                stderr.print(f"[red]error:[/red] {result.name}: {redact(result.message)}", soft_wrap=True)
            return 2
    stdout.print(redact(f"{path}: valid ({_describe(config)})"))
    return 0


def _export(config: JobConfig, step: str, destination: str) -> int:
    from kd_core.pipeline import export_model

    try:
        if step != "teacher":
            _probe_tracking(config)
        manifest, url = export_model(config, step, destination)
    except (InputError, RunStopped) as err:
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2 if isinstance(err, InputError) else 1
    stdout.print(redact(f"exported the {step} step's model ({manifest.key}) to {url}"), soft_wrap=True)
    return 0


_STATUS_STYLE = {"pass": "green", "info": "cyan", "skip": "dim", "warn": "yellow", "fail": "red"}


def preflight_table(results) -> Table:
    """The preflight's checks: name, status, what it found and what to do."""
    table = Table(title="preflight (kdflow validate --deep)")
    for column in ("check", "status", "result"):
        table.add_column(column)
    for result in results:
        style = _STATUS_STYLE[result.status]
        table.add_row(result.name, f"[{style}]{result.status.upper() if result.status == 'fail' else result.status}[/{style}]", redact(result.message))
    return table


def _preflight_passes(config: JobConfig) -> bool:
    """The preflight's cheap checks before `run` starts any stage: a warning line per warn, an error
    line per failed check (then the run does not start)."""
    from kd_core.preflight import cheap_checks, failures

    try:
        results = cheap_checks(config)
    except InputError as err:
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return False
    for result in results:
        if result.status == "warn":
            stderr.print(f"[yellow]warning:[/yellow] {result.name}: {redact(result.message)}", soft_wrap=True)
    for result in failures(results):
        stderr.print(f"[red]error:[/red] {result.name}: {redact(result.message)} (kdflow validate --deep CONFIG checks more)", soft_wrap=True)
    return not failures(results)


def _probe_tracking(config: JobConfig) -> None:
    probe_tracking_uri(config.registry.tracking_uri, config.registry.experiment)


def _tune(config: JobConfig, force: frozenset[str]) -> int:
    from kd_core.pipeline import search_steps
    from kd_core.storage import Store
    from kd_core.tune import BEST_CONFIG_NAME, PLOT_NAME, TRIALS_NAME
    from kd_core.tune.report import trials_table

    if not config.tune.space:
        stderr.print("[red]error:[/red] tune.space is empty: list the fields to search (see README, 'Hyperparameter search')")
        return 2
    started = time.perf_counter()
    try:
        _probe_tracking(config)
        steps = search_steps(config, force)
    except InputError as err:
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2
    print_summary(steps, time.perf_counter() - started)
    manifest, store = steps["tune"], Store(config.storage)
    trials = json.loads(store.read_bytes(manifest.output(TRIALS_NAME).path))
    stdout.print(trials_table(trials, config.tune.space, manifest.details["metric"], manifest.details["mode"]))
    if manifest.details.get("importance"):
        stdout.print("parameter importance: " + ", ".join(f"{name} {share:.0%}" for name, share in manifest.details["importance"].items()))
    stdout.print(f"plot: {manifest.output(PLOT_NAME).url}")
    stdout.print(f"best config: {manifest.output(BEST_CONFIG_NAME).url}  (run it: kdflow run <that file>)")
    return 0


def _seeds(config: JobConfig, count: int, force: frozenset[str]) -> int:
    from kd_core.eval.seeds import seeds_summary, write_seeds_summary
    from kd_core.pipeline import seed_steps
    from kd_core.storage import Store

    if count < 1:
        stderr.print(f"[red]error:[/red] --seeds must be at least 1, got {count}")
        return 2
    started = time.perf_counter()
    try:
        _probe_tracking(config)
        shared, per_seed = seed_steps(config, count, force)
    except InputError as err:
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2
    except RunStopped as err:
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 1
    every_step = dict(shared)
    for seed, steps in per_seed.items():
        every_step |= {f"{name} (seed {seed})": manifest for name, manifest in steps.items()}
    print_summary(every_step, time.perf_counter() - started)
    evaluations = [steps["eval"] for steps in per_seed.values()]
    summary = seeds_summary(list(per_seed), evaluations, task_of(shared["prep"]).metrics)
    record = write_seeds_summary(Store(config.storage), config.name, summary)
    stdout.print(seeds_table(summary, config.registry.primary_metric, config.registry.maximize))
    reports = [evaluation.outputs["report.html"].url for evaluation in evaluations if "report.html" in evaluation.outputs]
    stdout.print("reports: " + ", ".join(reports))
    stdout.print(f"summary: {record.url}")
    return 0


_CONSTANT_METRICS = ("parameters", "weight_bytes")
"""The same for every seed by construction: in the summary file, not in the table."""


def seeds_table(summary: dict, primary_metric: str, maximize: bool) -> Table:
    """Per model and metric: mean ± standard deviation, range, and each seed's value; the caption
    says on how many seeds the gates passed and the student beat the baseline on `primary_metric`."""
    seeds, models = summary["seeds"], summary["models"]
    caption = f"all gates passed on {summary['gates_passed']} of {len(seeds)} seeds"
    metric = primary_metric.rsplit(".", 1)[-1]
    if metric in models.get("student", {}) and metric in models.get("baseline", {}):
        pairs = zip(models["student"][metric]["values"], models["baseline"][metric]["values"])
        wins = sum((student > baseline) if maximize else (student < baseline) for student, baseline in pairs)
        caption += f"; the student beat the baseline on {metric} on {wins} of {len(seeds)} seeds"
    table = Table(title=f"held-out {summary['split']} split over {len(seeds)} training seeds ({', '.join(map(str, seeds))})", caption=caption)
    for column in ("model", "metric", "mean ± sd", "min – max", *(f"seed {seed}" for seed in seeds)):
        table.add_column(column, justify="left" if column in ("model", "metric") else "right")
    for model, metrics in models.items():
        for name, values in metrics.items():
            if name in _CONSTANT_METRICS:
                continue
            cells = (f"{values['mean']:.4g} ± {values['std']:.2g}", f"{values['min']:.4g} – {values['max']:.4g}")
            table.add_row(model, name, *cells, *(f"{value:.4g}" for value in values["values"]))
        table.add_section()
    return table


def _run(config: JobConfig, until: str, force: frozenset[str], *, kfp_local: str | None = None, fail_on_gates: bool = False) -> int:
    """`kfp_local`: run that Kubeflow DAG (distill or tune-distill) through kfp.local instead;
    `fail_on_gates`: exit EXIT_GATES_FAILED when the eval step's gates did not all pass."""
    from kd_core.pipeline import run_pipeline

    started = time.perf_counter()
    try:
        if kfp_local or until in _TRACKED_STAGES:
            _probe_tracking(config)
        if kfp_local:
            return _run_kfp_local(config, kfp_local, started, fail_on_gates)
        steps = run_pipeline(config, until=until, force=force)
    except InputError as err:  # a shard, data file, manifest or teacher to fix: its message names it
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2
    except RunStopped as err:  # a diverged run (the step, the last finite loss), a step another run holds
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 1
    print_summary(steps, time.perf_counter() - started)
    return _gates_exit(steps, fail_on_gates)


def _gates_exit(steps: dict[str, Manifest], fail_on_gates: bool) -> int:
    """EXIT_GATES_FAILED, after one line naming the failed gates, when asked to and a gate failed; else 0."""
    failed = describe_failed(steps["eval"].metrics.get("gates", [])) if "eval" in steps else []
    if fail_on_gates and failed:
        stderr.print(f"[red]gates failed:[/red] {'; '.join(failed)} (--fail-on-gates: exit {EXIT_GATES_FAILED})", soft_wrap=True)
        return EXIT_GATES_FAILED
    return 0


def _run_kfp_local(config: JobConfig, pipeline: str, started: float, fail_on_gates: bool) -> int:
    """The DAG through kfp.local; a failed task's own cause is the last line: exit 2 for bad input, else 1."""
    from pipelines.engines import DagTaskFailed, run_local

    try:
        steps = run_local(config, pipeline)
    except DagTaskFailed as err:
        if err.step:
            stderr.print(f"kfp.local: the {err.step} task failed (its log is above)")
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2 if err.bad_input else 1
    print_summary(steps, time.perf_counter() - started, dag="kfp.local")
    return _gates_exit(steps, fail_on_gates)


def _kubeflow(config: JobConfig, args: argparse.Namespace) -> int:
    from pipelines import engines

    try:
        if args.command == "compile":
            path = engines.compile_pipeline(config, args.output or f"pipelines/compiled/{config.name}-{args.pipeline}.yaml", args.pipeline)
            stdout.print(f"compiled {config.name}: {path}")
        elif args.command == "submit":
            run_id = engines.submit(config, args.pipeline)
            stdout.print(f"submitted {config.name} to {engines.client_host(config)}: run {run_id}")
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                recurring_id = engines.schedule(config, args.cron, folder, args.pipeline)
            stdout.print(f"scheduled {config.name} at '{args.cron}' (max concurrency 1, no catch-up): recurring run {recurring_id}")
    except ConfigError as err:
        stderr.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2
    return 0


def _move_champion(config: JobConfig, command: str, version: int | None, *, force: bool = False) -> int:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from kd_core.registry import RegistryError, promote, rollback

    registry = config.registry
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    try:
        _probe_tracking(config)
        if command == "promote":
            chosen = promote(client, registry, version, force=force)
            stdout.print(f"{registry.model_name}: @{registry.champion_alias} -> version {chosen} (by hand)")
        else:
            rejected, restored = rollback(client, registry)
            stdout.print(f"{registry.model_name}: version {rejected} rejected; @{registry.champion_alias} -> version {restored}")
    except (RegistryError, MlflowException, InputError) as err:
        stderr.print(f"[red]error:[/red] {redact(str(err))}", soft_wrap=True)
        return 2
    return 0


def _describe(config: JobConfig) -> str:
    return f"job {config.name!r}, storage {config.storage.root}, backend {config.compute.backend}"


def print_summary(steps: dict[str, Manifest], seconds: float, dag: str | None = None) -> None:
    """`dag`: the steps ran as Kubeflow DAG tasks through that engine (the caption lists them)."""
    caption = "seconds in parentheses: what a reused step took when it was made"
    if dag:
        ran = [name for name in _STEPS if name in steps and not steps[name].reused]
        caption = f"ran as Kubeflow DAG tasks ({dag}): {', '.join(ran) or 'none, every task reused its step by key'}\n" + caption
    table = Table(title=f"kdflow: {len(steps)} steps in {seconds:.1f}s", caption=caption)
    for column in ("step", "key", "status", "seconds", "result"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    task = task_of(steps["prep"]) if "prep" in steps else task_named(steps["eval"].metrics["task"]) if "eval" in steps else None
    names = [name for name in _STEPS if name in steps] + [name for name in steps if name not in _STEPS]  # e.g. "distill (seed 1)"
    for name in names:
        manifest = steps[name]
        status = "[cyan]reused[/cyan]" if manifest.reused else "[green]ran[/green]"
        made_in = f"{manifest.timings.get('total', 0):.1f}"
        table.add_row(name, manifest.key, status, f"({made_in})" if manifest.reused else made_in, _headline(manifest.stage, manifest, task))
    stdout.print(table)
    if "eval" in steps:
        stdout.print(task_named(steps["eval"].metrics["task"]).comparison_table(steps["eval"].metrics))
        if steps["eval"].metrics.get("gates"):
            stdout.print(gates_table(steps["eval"].metrics))
        curves = steps["eval"].outputs.get("training_curves.png")
        if curves is not None:
            stdout.print(f"training curves: {curves.url}")
        report = steps["eval"].outputs.get("report.html")
        if report is not None:
            stdout.print(f"report: {report.url}")
    if "register" in steps:
        registration = steps["register"].details
        champion = registration.get("champion")
        stdout.print(
            f"registered: {registration['model_name']} version {registration['version']} "
            f"as @{registration['alias']} in {registration['tracking_uri']}; "
            + (f"@{registration['champion_alias']} is version {champion}" if champion is not None else f"no @{registration.get('champion_alias', 'champion')} yet")
            + ("" if registration.get("gates_passed", True) else " (this version failed its gates)")
        )


def _headline(step: str, manifest: Manifest, task: Task | None) -> str:
    """One line about a step's result: the task's own where it has one (prep, cache, eval)."""
    own = task.headline(step, manifest) if task is not None else None
    if own is not None:
        return own
    metrics, details = manifest.metrics, manifest.details
    if step in ("teacher", "distill", "baseline") and "parameters" in metrics:
        skipped = metrics.get("skipped_steps") or 0
        note = f"; [yellow]{skipped} steps skipped (loss or gradient not finite)[/yellow]" if skipped else ""
        return f"{metrics['parameters']:,} params, final loss {metrics.get('loss', float('nan')):.3f}{note}"
    if step == "teacher":
        return f"existing model {details.get('external_url', '')}"
    if step == "tune":
        metric = details.get("metric", "val_loss")
        return f"{metrics['trials']} trials ({metrics['stopped_early']} stopped early), best {metric} {metrics[f'best_{metric}']:.4g}"
    if step == "register":
        return f"{details['model_name']} v{details['version']} @{details['alias']}"
    return ""


def gates_table(metrics: dict) -> Table:
    table = Table(title="sanity gates (the default: eval.gates is empty)" if metrics.get("gates_default") else "quality gates (eval.gates)")
    for column in ("gate", "left", "right", "result"):
        table.add_column(column, justify="left" if column == "gate" else "right")
    for gate in metrics["gates"]:
        result = "[green]pass[/green]" if gate["passed"] else "[red]FAIL[/red]"
        table.add_row(gate["gate"], f"{gate['left']:.4g}", f"{gate['right']:.4g}", result)
    return table


if __name__ == "__main__":
    sys.exit(main())
