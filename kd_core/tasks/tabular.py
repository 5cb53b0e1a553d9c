"""`task: tabular`: a scikit-learn pipeline (a classical teacher) distilled into an MLP.

- prep: a table (CSV or Parquet files, or a dataset bundled with scikit-learn) -> numeric,
  categorical and target shards, with the training split's statistics and vocabularies
  (`kd_core/data/tabular.py`);
- teacher: a scikit-learn pipeline (preprocessing and `teacher.sklearn.estimator`) trained here in
  a Ray task, or a user's `.skops` (trusted types checked, never unpickled) or `.onnx` file
  (`teacher.path`); the step stores the file and `teacher.json` (`kd_core/models/tabular_teacher.py`);
- teacher outputs: each row's class log-probabilities (or prediction) for the training and
  validation splits and for `cache.synthetic.rows` MUNGE rows around the training split
  (`kd_core/data/munge.py`), which the distilled student trains on too (`Task.synthetic_rows`);
- student: an MLP built from `student.mlp` with the table's preprocessing inside it
  (`kd_core/models/tabular.py`), trained by the training loop (DeepSpeed or not, Ray or not); the
  objective is `distill.tabular` (`kd_core/losses/tabular.py`); the baseline learns the labels alone;
- eval: quality, calibration, fidelity to the teacher (held-out and synthetic rows), latency at
  batch 1 and throughput at 1024, size (`kd_core/eval/tabular.py`);
- registry: MLflow's ONNX flavour (the student's `model.onnx`), with its safetensors and config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd_core.tasks.base import Task, models_table

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from kd_core.cache.format import CacheLayout

LABELS = {"teacher": "teacher (scikit-learn)", "student": "KD student (MLP)", "baseline": "hard-label MLP"}


class Tabular(Task):
    name = "tabular"
    data_sources = ("sklearn", "table")
    metrics = (
        "score", "accuracy", "log_loss", "roc_auc", "brier", "ece", "rmse", "mae", "r2", "agreement", "synthetic_agreement",
        "teacher_rmse", "synthetic_teacher_rmse", "latency_ms", "rows_per_s", "parameters", "weight_bytes",
    )
    # score: accuracy (classification) or R² (regression); uniform: the majority class, or the mean
    sanity_gates = ("student.score > uniform.score", "student.score > baseline.score")
    objective_field = "tabular"
    validation_modes = {"val_loss": "min", "val_score": "max"}
    validation_label = "held-out loss to the labels (cross-entropy, or squared error in target standard deviations)"
    validation_labels = {"val_score": "held-out accuracy (or R²)"}

    # ----------------------------------------------------------------------------- the job config
    def check_config(self, job) -> None:
        super().check_config(job)
        table = job.data.table
        if job.data.source == "sklearn" and table.dataset is None:
            raise ValueError("data.table.dataset: name the bundled dataset (breast_cancer, wine, iris, digits, diabetes)")
        if job.data.source == "table" and table.kind is None:
            raise ValueError("data.table.kind: say whether the target is a class (classification) or a number (regression)")
        if job.data.source == "table" and table.numeric is None:
            raise ValueError("data.table.numeric: name the numeric feature columns (an empty list if there are none)")
        if job.distill.teacher_source != "cache":
            raise ValueError("distill.teacher_source: a tabular teacher's predictions are cached once, with its synthetic rows; set it to cache")
        if job.teacher.finetune:
            raise ValueError("teacher.finetune: a tabular teacher is trained here (teacher.sklearn) or used as it is (teacher.path); set finetune: false")
        from kd_core.models.tabular_teacher import teacher_file_problem

        if job.teacher.path is not None and teacher_file_problem(job.teacher.path):
            raise ValueError(teacher_file_problem(job.teacher.path))
        if job.student.init != "config":
            raise ValueError("student.init: a tabular student is an MLP built from student.mlp; set init: config")

    @property
    def tunable_prefixes(self) -> tuple[str, ...]:
        return ("distill.tabular.", "distill.train.", "student.mlp.")

    # ------------------------------------------------------------------------------------- prep
    def data_settings(self, data) -> dict:
        return data.model_dump(mode="json", include={"source", "files", "table", "val_fraction", "test_fraction", "rows_per_shard", "seed"})

    def prepare(self, data, store, run, source) -> tuple[dict, dict]:
        from kd_core.data.tabular import prepare_table

        return prepare_table(data, store, run, source)

    def separates_documents(self) -> bool:
        return False

    # ----------------------------------------------------------------------------------- teacher
    def teacher_step(self, config, prep, store, compute, force):
        """A scikit-learn pipeline fitted on the training split in a Ray task (`teacher.sklearn`, after
        its search if it has one), or the user's `.skops` / `.onnx` file (`teacher.path`), checked by
        loading it and predicting the validation split; the step stores the file and its `teacher.json`.
        A search's trials depend on how they run (concurrent Ray Tune trials, or one after another in
        this process), so its key says which; a fit without one is the same wherever it runs."""
        from kd_core.models.tabular_teacher import teacher_info
        from kd_core.stage import StageRun

        if config.path:
            return _user_teacher(config, prep, store, force)
        settings = config.sklearn.model_dump(mode="json", exclude={"cpus", "trusted_types"})
        if not settings["search"]:
            del settings["search"], settings["search_trials"]
        else:
            settings["search_runs_on"] = "ray" if compute.backend == "ray" else "this process"
        run = StageRun(store, "teacher", {"sklearn": settings}, inputs={"prep": prep}, force=force)
        if run.reused:
            return run.reused
        with run.timed("fit"):
            data, metrics, search = _fit_teacher(config.sklearn.model_dump(mode="json"), prep, store, compute)
        run.write_bytes("model/teacher.skops", data)
        run.write_bytes("model/teacher.json", teacher_info("teacher.skops", [], "trained here", config.sklearn.cpus))
        details = {"model_folder": f"{run.folder}/model", "estimator": config.sklearn.estimator}
        if search is not None:
            details["search"] = search
            metrics |= {"search_trials": len(search["trials"]), "search_best_val_score": search["best_val_score"]}
        return run.finish(metrics=metrics, details=details)

    # ---------------------------------------------------------------------------------- training
    def student_settings(self, student) -> dict:
        return student.model_dump(mode="json", include={"mlp"})

    def columns(self, role: str, prep_details: dict) -> tuple[str, ...]:
        widths = prep_details["widths"]
        return (*(name for name in ("numeric", "categorical") if widths[name]), "target")

    def build_model(self, spec) -> torch.nn.Module:
        import torch

        from kd_core.models.tabular import TabularMLP

        if spec.role == "teacher":
            raise ValueError("a tabular teacher is a scikit-learn pipeline (teacher.sklearn), not trained by the training loop")
        torch.manual_seed(spec.train.seed)
        return TabularMLP(spec.prep_details["table"], spec.student.mlp.model_dump(mode="json"), spec.train.dropout)

    def make_step(self, spec, model, store) -> torch.nn.Module:
        from kd_core.tasks.tabular_step import TabularStep

        return TabularStep(model, spec.objective)

    def save_model(self, model, store, spec, folder) -> None:
        """The MLP saves itself whole (safetensors, config.json with the table's schema, ONNX): no tokenizer."""
        model.save_folder(folder)

    def batch_tokens(self, batch) -> int:
        return int(batch["target"].shape[0])  # rows: a tabular model reads one row at a time

    def validation_metrics(self, model, rows, batch_size, spec, device) -> dict[str, float]:
        from kd_core.tasks.tabular_step import validation_fit

        return validation_fit(model, rows, batch_size, device)

    # ------------------------------------------------------------------------ teacher outputs
    def cache_settings(self, config) -> dict:
        return {"synthetic": config.synthetic.model_dump(mode="json")}

    def synthetic_rows(self, config, prep, store, run) -> list:
        """`cache.synthetic.rows` MUNGE rows around the training split, as input shards of prep's
        columns (`target`: no label, −1 or NaN) in `run`'s `synthetic/`."""
        if config.synthetic.rows == 0:
            return []
        import numpy as np

        from kd_core.data.munge import munge
        from kd_core.data.shards import encode_arrow, read_columns, split_shards
        from kd_core.data.tabular import NO_LABEL, feature_arrays

        rows = read_columns(store, split_shards(prep, "train"))
        widths, settings = prep.details["widths"], config.synthetic
        made = dict(zip(("numeric", "categorical"), munge(
            *feature_arrays(rows), settings.rows, swap_probability=settings.swap_probability, spread=settings.spread, seed=settings.seed,
        )))
        columns = {name: values for name, values in made.items() if widths[name]}
        classification = prep.details["table"]["kind"] == "classification"
        columns["target"] = np.full((settings.rows, 1), NO_LABEL, np.int32) if classification else np.full((settings.rows, 1), np.nan, np.float32)
        per_shard = prep.config["data"]["rows_per_shard"]
        return [
            run.write_bytes(f"synthetic/synthetic-{index:05d}.arrow", encode_arrow({name: values[start : start + per_shard] for name, values in columns.items()}))
            for index, start in enumerate(range(0, settings.rows, per_shard))
        ]

    def cache_layout(self, config, prep, store, teacher) -> CacheLayout:
        from kd_core.cache.format import CacheLayout

        outputs = prep.details["vocab_size"]
        return CacheLayout(format="tabular", seq_len=1, vocab_size=outputs, slots=outputs)

    def load_cache_teacher(self, model_dir, device, layout, prep_details, positions_per_chunk=None):
        from kd_core.models.tabular_teacher import load_teacher_folder
        from kd_core.tasks.tabular_step import CachedPredictions

        return CachedPredictions(load_teacher_folder(model_dir, prep_details["table"]))

    # ---------------------------------------------------------------------------------- eval
    def eval_settings(self, config, prep_details) -> dict:
        return config.model_dump(mode="json", include={"split", "max_rows", "gates", "sanity_gates"})

    def measure(self, config, prep, teacher, student, baseline, store, run, device) -> tuple[dict, dict, dict]:
        import json

        from kd_core.eval.tabular import measure_tables

        held_out, scores, extras = measure_tables(config, prep, teacher, student, baseline, store, device)
        if extras.get("calibration") and any(extras["calibration"].values()):
            bins = {name: {key: [None if value != value else float(value) for value in values] for key, values in part.items()}
                    for name, part in extras["calibration"].items() if part}
            run.write_bytes("calibration.json", json.dumps(bins, indent=2).encode())
        return held_out, scores, extras

    def training_curves_png(self, histories, metrics) -> bytes:
        from kd_core.eval.plots import CurvesSpec, training_curves_png

        regression = "r2" in metrics.get("student", {})
        key_label = "held-out R²" if regression else "held-out accuracy"
        return training_curves_png(histories, metrics, CurvesSpec(LABELS, "loss", "training loss", "score", key_label, "{:.3f}" if regression else "{:.1%}"))

    def report_html(self, job_name, metrics, histories, extras) -> str:
        from kd_core.eval.figures import metrics_table_html
        from kd_core.eval.report import report_html
        from kd_core.eval.tabular_plots import reliability_png

        regression = "r2" in metrics.get("student", {})
        quality = [("r2", "R²", "{:.3f}"), ("rmse", "RMSE", "{:.4g}"), ("mae", "MAE", "{:.4g}"), ("teacher_rmse", "RMSE to the teacher", "{:.4g}"),
                   ("synthetic_teacher_rmse", "RMSE to the teacher, synthetic rows", "{:.4g}")] if regression else [
            ("accuracy", "accuracy", "{:.1%}"), ("log_loss", "log-loss", "{:.4f}"), ("roc_auc", "ROC AUC", "{:.4f}"), ("brier", "Brier score", "{:.4f}"),
            ("ece", "calibration error", "{:.4f}"),
            ("agreement", "agrees with the teacher", "{:.1%}"), ("synthetic_agreement", "agrees with the teacher, synthetic rows", "{:.1%}")]
        columns = [*quality, ("latency_ms", "latency, 1 row (ms)", "{:.3f}"), ("rows_per_s", "rows/s at 1024", "{:,.0f}"),
                   ("parameters", "parameters", "{:,}"), ("weight_bytes", "size", None)]
        table = metrics_table_html(metrics, columns, LABELS)
        figures = {"training_curves": self.training_curves_png(histories, metrics)}
        if extras and extras.get("calibration") and any(extras["calibration"].values()):
            figures["calibration"] = reliability_png(extras["calibration"], LABELS)
        return report_html(job_name, metrics, figures, table, f'{metrics["rows"]:,} held-out rows, {metrics["synthetic_rows"]:,} synthetic rows around them')

    # ------------------------------------------------------------------------------- preflight
    def preflight_checks(self, job, records, *, deep) -> list[tuple[str, str, str]]:
        from kd_core.tasks.tabular_preflight import preflight_rows

        return preflight_rows(job, records, deep=deep)

    # --------------------------------------------------------------------------------- register
    def log_model(self, model_dir):
        from kd_core.registry import log_tabular_onnx

        return log_tabular_onnx(model_dir)

    # ------------------------------------------------------------------------------------- CLI
    def headline(self, step, manifest) -> str | None:
        metrics, details = manifest.metrics, manifest.details
        if step == "prep":
            table = details["table"]
            what = f"{len(table['classes'])} classes" if table["kind"] == "classification" else "regression"
            dropped = f", {metrics['rows_dropped']:,} bad rows dropped" if metrics.get("rows_dropped") else ""
            return (f"{metrics['rows_read']:,} rows -> {metrics['train_rows']:,} train, {metrics['val_rows']:,} val, {metrics['test_rows']:,} test{dropped}; "
                    f"{len(table['numeric'])} numeric, {len(table['categorical'])} categorical features; {what}")
        if step == "teacher" and "train_score" in metrics:
            searched = f" (best of {metrics['search_trials']} searched: {details['search']['best_params']})" if "search" in details else ""
            return (f"{details.get('estimator', 'pipeline')}{searched} fitted in {metrics['fit_seconds']:.1f}s; "
                    f"training score {metrics['train_score']:.4f}, validation {metrics['val_score']:.4f}")
        if step == "cache":
            rows = sum(shard["rows"] for shard in details["shards"])
            synthetic = details.get("synthetic_rows", {}).get("rows", 0)
            return f"teacher predictions of {rows:,} rows ({synthetic:,} of them synthetic, MUNGE)"
        if step == "eval":
            return f"{metrics['rows']:,} held-out rows ({metrics['split']}), {metrics['synthetic_rows']:,} synthetic rows around them"
        return None

    def comparison_table(self, metrics) -> Table:
        regression = "r2" in metrics.get("student", {})

        def cells(row: dict, teacher: bool) -> tuple[str, ...]:
            if regression:
                quality = (f"{row['r2']:.3f}", f"{row['rmse']:.4g}", "—" if teacher else f"{row['teacher_rmse']:.4g}")
            else:
                quality = (f"{row['accuracy']:.1%}", f"{row['log_loss']:.4f}", f"{row['ece']:.3f}", "—" if teacher else f"{row['agreement']:.1%}",
                           "—" if teacher else f"{row['synthetic_agreement']:.1%}")
            size = f"{row['weight_bytes'] / 1e6:.2f} MB"
            return (*quality, f"{row['latency_ms']:.3f}", f"{row['rows_per_s']:,.0f}", size)

        columns = ("model", "R²", "RMSE", "RMSE to teacher") if regression else ("model", "accuracy", "log-loss", "ECE", "agrees w/ teacher", "on synthetic rows")
        table = models_table(
            f"held-out {metrics['split']} split, {metrics['rows']:,} rows; speed on {metrics.get('device', 'this machine')}",
            (*columns, "ms/row (batch 1)", "rows/s (batch 1024)", "size"), LABELS, metrics, cells,
        )
        if "baseline" in metrics:
            student, teacher, baseline = metrics["student"], metrics["teacher"], metrics["baseline"]
            speed = student["rows_per_s"] / max(teacher["rows_per_s"], 1e-9)
            name = "R²" if regression else "accuracy"
            table.caption = (f"the distilled MLP's {name} is {student['score'] - teacher['score']:+.4f} from the teacher's and "
                             f"{student['score'] - baseline['score']:+.4f} from the hard-label MLP's, at {speed:.1f}× the teacher's rows/s at batch 1024")
        return table


# ---------------------------------------------------------------------------------- the teacher
def _fit_teacher(settings: dict, prep, store, compute) -> tuple[bytes, dict, dict | None]:
    """Search the estimator's parameters if `search` says so, then fit the pipeline on the training
    split in a Ray task (this process with `compute.backend: local`); its skops bytes, metrics (fit
    time, training and validation score) and the search's record (None without one)."""
    search = None
    if settings["search"]:
        search = _search_teacher(settings, prep, store, compute)
        settings = settings | {"params": {**settings["params"], **search["best_params"]}}
    if compute.backend == "local":
        return (*_fit_on_splits(settings, prep, store.config), search)
    import ray

    from kd_core.train.ray_glue import ensure_ray

    ensure_ray(compute)
    task = ray.remote(num_cpus=settings["cpus"])(_fit_on_splits)
    return (*ray.get(task.remote(settings, prep, store.config)), search)


def _trial_score(params: dict, settings: dict, prep, storage) -> float:
    """A search trial: the pipeline with `params` over `settings["params"]`, fitted on the training
    split and scored on the validation split."""
    return _fit_on_splits(settings | {"params": {**settings["params"], **params}}, prep, storage)[1]["val_score"]


def _search_teacher(settings: dict, prep, store, compute) -> dict:
    """`teacher.sklearn.search`: Optuna's TPE over the space, `search_trials` pipelines, each scored on
    the validation split; in Ray Tune trials of `cpus` CPUs (in this process with the local backend).
    {best_params, best_val_score, trials: [{params, val_score}]}."""
    import tempfile

    space, trials_wanted, seed = settings["search"], settings["search_trials"], settings["seed"]
    trials = []
    if compute.backend == "local":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def objective(trial) -> float:
            params = {name: _suggest(trial, name, dimension) for name, dimension in space.items()}
            score = _trial_score(params, settings, prep, store.config)
            trials.append({"params": params, "val_score": score})
            return score

        optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)).optimize(objective, n_trials=trials_wanted)
    else:
        from ray import tune as ray_tune
        from ray.tune.search.optuna import OptunaSearch

        from kd_core.train.ray_glue import ensure_ray

        ensure_ray(compute)

        def trainable(params: dict) -> None:
            ray_tune.report({"val_score": _trial_score(params, settings, prep, store.config)})

        with tempfile.TemporaryDirectory(prefix="kdflow-teacher-search-") as folder:
            tuner = ray_tune.Tuner(
                ray_tune.with_resources(trainable, {"cpu": settings["cpus"]}), param_space=_ray_space(space),
                tune_config=ray_tune.TuneConfig(metric="val_score", mode="max", num_samples=trials_wanted, search_alg=OptunaSearch(seed=seed)),
                run_config=ray_tune.RunConfig(name="teacher-search", storage_path=folder, verbose=0),
            )
            for result in tuner.fit():
                if result.error is None:
                    trials.append({"params": {name: result.config[name] for name in space}, "val_score": result.metrics["val_score"]})
    if not trials:
        raise RuntimeError("teacher.sklearn.search: every trial failed; see the Ray logs (KDFLOW_RAY_LOGS=1)")
    best = max(trials, key=lambda trial: trial["val_score"])
    return {"best_params": best["params"], "best_val_score": best["val_score"], "trials": trials}


def _suggest(trial, name: str, dimension: dict):
    if dimension["kind"] == "choice":
        return trial.suggest_categorical(name, dimension["values"])
    if dimension["kind"] == "int":
        return trial.suggest_int(name, int(dimension["low"]), int(dimension["high"]))
    return trial.suggest_float(name, dimension["low"], dimension["high"], log=dimension["kind"] == "loguniform")


def _ray_space(space: dict) -> dict:
    from ray import tune as ray_tune

    def distribution(dimension: dict):
        if dimension["kind"] == "choice":
            return ray_tune.choice(dimension["values"])
        if dimension["kind"] == "int":
            return ray_tune.randint(int(dimension["low"]), int(dimension["high"]) + 1)
        sample = ray_tune.loguniform if dimension["kind"] == "loguniform" else ray_tune.uniform
        return sample(dimension["low"], dimension["high"])

    return {name: distribution(dimension) for name, dimension in space.items()}


def _fit_on_splits(settings: dict, prep, storage) -> tuple[bytes, dict]:
    from kd_core.data.shards import read_columns, split_shards
    from kd_core.models.tabular_teacher import fit_pipeline, load_bytes
    from kd_core.storage import Store

    store = Store(storage)
    schema = prep.details["table"]
    train = read_columns(store, split_shards(prep, "train"))
    data, metrics = fit_pipeline(settings, schema, train.get("numeric"), train.get("categorical"), train["target"])
    val = read_columns(store, split_shards(prep, "val"))
    metrics["val_score"] = _score(load_bytes(data, schema, threads=settings["cpus"]), val, schema)
    return data, metrics


def _score(teacher, rows, schema) -> float:
    """Accuracy, or R², of a loaded teacher on rows."""
    import numpy as np

    predictions = teacher.predict(rows.get("numeric"), rows.get("categorical"))
    labels = rows["target"].reshape(-1)
    if schema["kind"] == "classification":
        return float((predictions.argmax(1) == labels).mean())
    return float(1 - ((predictions.reshape(-1) - labels) ** 2).mean() / max(float(np.var(labels)), 1e-12))


def _user_teacher(config, prep, store, force):
    """`teacher.path`: the file, identified by its content, checked by loading it (skops' trusted
    types) and predicting the validation split; stored in the step with its `teacher.json`."""
    from pathlib import PurePosixPath

    from kd_core.data.shards import read_columns, split_shards
    from kd_core.models.tabular_teacher import load_bytes, teacher_info
    from kd_core.stage import StageRun
    from kd_core.storage import content_identity, reaching, url_to_fs

    suffix = PurePosixPath(config.path).suffix
    fs, path = url_to_fs(config.path, store.config)
    with reaching(config.path, "teacher.path"):
        identity = content_identity(fs, path)
    # the file's content, not where it lies: a teacher copied elsewhere is the same step
    section = {"kind": suffix[1:], "identity": identity, "trusted_types": sorted(config.sklearn.trusted_types)}
    run = StageRun(store, "teacher", section, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    with reaching(config.path, "teacher.path"):
        data = fs.cat_file(path)
    schema = prep.details["table"]
    teacher = load_bytes(data, schema, suffix, config.sklearn.trusted_types, config.path)
    val = read_columns(store, split_shards(prep, "val"))
    metrics = {"val_score": _score(teacher, val, schema)}
    name = f"teacher{suffix}"
    run.write_bytes(f"model/{name}", data)
    run.write_bytes("model/teacher.json", teacher_info(name, config.sklearn.trusted_types, config.path))
    return run.finish(metrics=metrics, details={"model_folder": f"{run.folder}/model", "estimator": f"{suffix[1:]} file"})
