"""The preflight of a tabular job (`kdflow validate`, and before `kdflow run`): rows of (check,
status, message). Cheap: the table's columns against `data.table`, the teacher (a user's file
loaded the way the teacher step loads it: skops' trusted types, ONNX Runtime; or the estimator
built for the target's kind), the objective. Deep (`--deep`): the table read and checked whole,
bad rows, missing values and classes counted, without preparing anything."""

from __future__ import annotations


def preflight_rows(job, records: int, *, deep: bool) -> list[tuple[str, str, str]]:
    rows = [_table_row(job), _teacher_row(job), _objective_row(job)]
    if deep:
        rows += _deep_rows(job, records)
    return rows


def _table_row(job) -> tuple[str, str, str]:
    from kd_core.data.prep import file_source
    from kd_core.data.tabular import TableError, read_table, resolved_columns

    data = job.data
    try:
        if data.source == "sklearn":
            table, kind, numeric, categorical = read_table(data, None)
            rows = len(table.origins)
        else:
            import pyarrow.parquet as pq

            source = file_source(data, job.storage)
            first = source.files[0]
            if first.path.endswith(".parquet"):
                with first.fs.open(first.path, "rb") as handle:
                    names = pq.read_schema(handle).names
            else:
                import pyarrow.csv as csv

                with first.fs.open(first.path, "rb", compression="infer") as handle:
                    names = csv.open_csv(handle).schema.names
            kind, numeric, categorical = resolved_columns(data, names)
            rows = None
    except (TableError, ValueError, OSError) as err:
        return "table", "fail", str(err)
    size = f"{rows:,} rows, " if rows is not None else ""
    return "table", "pass", f"{size}target {data.table.target!r} ({kind}), {len(numeric)} numeric and {len(categorical)} categorical features"


def _teacher_row(job) -> tuple[str, str, str]:
    from kd_core.config import SKLEARN_DATASETS
    from kd_core.models.tabular_teacher import ESTIMATORS, TabularTeacherError, teacher_file_problem, trusted_check

    teacher = job.teacher
    if teacher.path is None:
        estimator = teacher.sklearn.estimator
        kind = job.data.table.kind or SKLEARN_DATASETS.get(job.data.table.dataset, "classification")
        module, classifier, regressor, _, _ = ESTIMATORS[estimator]
        name = classifier if kind == "classification" else regressor
        if name is None:
            return "teacher", "fail", f"teacher.sklearn.estimator: {estimator} has no {kind} model; choose another estimator"
        problem = _params_problem(module, name, teacher.sklearn.params)
        if problem:
            return "teacher", "fail", problem
        return "teacher", "pass", f"a scikit-learn {estimator} pipeline, trained here on the training split"
    from pathlib import PurePosixPath

    from kd_core.storage import reaching, url_to_fs

    suffix = PurePosixPath(teacher.path).suffix
    if teacher_file_problem(teacher.path):
        return "teacher", "fail", teacher_file_problem(teacher.path)
    try:
        fs, path = url_to_fs(teacher.path, job.storage)
        with reaching(teacher.path, "teacher.path"):
            data = fs.cat_file(path)
        if suffix == ".skops":
            trusted_check(data, teacher.sklearn.trusted_types, teacher.path)
        else:
            import onnxruntime

            onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except TabularTeacherError as err:
        return "teacher", "fail", str(err)
    except Exception as err:  # a store's or ONNX Runtime's own error: one line
        return "teacher", "fail", f"teacher.path: {teacher.path}: {str(err).splitlines()[0]}"
    checked = "every type it holds is trusted (not loaded here)" if suffix == ".skops" else "ONNX Runtime loads it"
    return "teacher", "pass", f"{teacher.path} ({len(data) / 1e6:.2f} MB): {checked}"


def _params_problem(module: str, name: str, params: dict) -> str | None:
    """Why `teacher.sklearn.params` do not make the estimator (an unknown name, a value out of its
    range: scikit-learn's own parameter check), or None."""
    import importlib

    try:
        estimator = getattr(importlib.import_module(module), name)(**params)
        if hasattr(estimator, "_validate_params"):
            estimator._validate_params()
    except (TypeError, ValueError) as err:
        return f"teacher.sklearn.params: {name} refuses them ({str(err).splitlines()[0]})"
    return None


def _objective_row(job) -> tuple[str, str, str]:
    objective, synthetic = job.distill.tabular, job.cache.synthetic
    rows = f"{synthetic.rows:,} synthetic rows (MUNGE, p={synthetic.swap_probability}, s={synthetic.spread})" if synthetic.rows else "no synthetic rows"
    regression = job.data.table.kind == "regression" or (job.data.source == "sklearn" and job.data.table.dataset == "diabetes")
    teacher = f"KD {objective.kd_weight}" + ("" if regression else f" (T={objective.temperature})")
    return "objective", "pass", f"{teacher} + labels {objective.ce_weight}; {rows}"


def _deep_rows(job, records: int) -> list[tuple[str, str, str]]:
    """The table read and checked whole, then (a user's teacher) its predictions of `records` rows as
    prep would encode them: its classes, its columns, its outputs."""
    import numpy as np

    from kd_core.data.prep import file_source
    from kd_core.data.tabular import TableError, drop_bad_rows, fit_schema, read_table, split_rows

    try:
        table, kind, numeric, categorical = read_table(job.data, file_source(job.data, job.storage))
        read = len(table.origins)
        kept = drop_bad_rows(table, job.data, kind, numeric)
        labels = kept.columns[job.data.table.target] if kind == "classification" else None
        splits = split_rows(labels, len(kept.origins), job.data.val_fraction, job.data.test_fraction, job.data.seed)
        schema = fit_schema(kept, splits["train"], kind, job.data.table.target, numeric, categorical)
    except (TableError, ValueError, OSError) as err:
        return [("table rows", "fail", str(err))]
    missing = sum(int(np.isnan(kept.columns[name]).sum()) for name in numeric)
    dropped = f", {read - len(kept.origins):,} bad rows dropped ({'; '.join(f'{k}: {v}' for k, v in kept.dropped.items())})" if kept.dropped else ""
    classes = f", {len(schema.classes)} classes" if kind == "classification" else ""
    rows = [("table rows", "pass", f"{read:,} rows read{dropped}; {missing:,} missing numeric values (imputed){classes}")]
    if job.teacher.path is not None and not _teacher_row(job)[1] == "fail":
        rows.append(_teacher_prediction_row(job, kept, splits["train"][: max(records, 2)], schema))
    return rows


def _teacher_prediction_row(job, table, sample, schema) -> tuple[str, str, str]:
    from kd_core.data.tabular import encode_rows
    from kd_core.models.tabular_teacher import TabularTeacherError, load_bytes
    from kd_core.storage import url_to_fs

    columns, _ = encode_rows(table, sample, schema)
    fs, path = url_to_fs(job.teacher.path, job.storage)
    try:
        teacher = load_bytes(fs.cat_file(path), schema.to_dict(), "." + path.rsplit(".", 1)[-1], job.teacher.sklearn.trusted_types, job.teacher.path)
        predictions = teacher.predict(columns.get("numeric"), columns.get("categorical"))
    except TabularTeacherError as err:
        return "teacher predictions", "fail", str(err)
    what = "class probabilities" if schema.kind == "classification" else "predictions"
    return "teacher predictions", "pass", f"{len(predictions)} training rows -> {what} of shape {tuple(predictions.shape)}, e.g. {predictions[0].round(3).tolist()}"

