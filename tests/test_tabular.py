"""Tabular distillation end to end (`task: tabular`), at the smallest size.

A user's own CSV (numeric and categorical columns, missing values, a text label) goes through every
stage in this process: prep, a scikit-learn teacher, its cache with MUNGE rows, the distilled MLP
and the hard-label one, eval and the MLflow registry. Then: bad tables and teachers stop with one
line naming the file, row, column or type; a user's own skops and ONNX teachers; the teacher's fit
in a Ray task and the cache's actors; the new config sections leave every other task's keys alone.
Run: .venv/bin/python -m pytest tests/test_tabular.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO
from kd_core.devtools import migrated_sqlite_uri
from kd_core.job import load_config
from kd_core.pipeline import run_pipeline


def write_table(path, rows: int = 400, seed: int = 0, bad_cell: str | None = None):
    """A CSV of a rule a forest learns well: label `yes` when x1 + x2 > 0 or colour is red (x2 and
    colour sometimes missing)."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    lines = ["x1,x2,colour,label"]
    for i in range(rows):
        label = "yes" if x1[i] + x2[i] > 0 or colour[i] == "red" else "no"
        x2_cell = "" if i % 17 == 0 else f"{x2[i]:.5f}"
        colour_cell = "" if i % 23 == 0 else colour[i]
        lines.append(f"{x1[i]:.5f},{x2_cell},{colour_cell},{label}")
    if bad_cell is not None:
        lines[5] = f"{bad_cell},0.5,red,yes"
    path.write_text("\n".join(lines) + "\n")
    return path


def tabular_config(tmp_path, csv, *overrides: str):
    return load_config(REPO / "configs" / "tabular.yaml", [
        f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}", "compute.backend=local",
        "data.source=table", f"data.files=[{csv}]", "data.table.target=label", "data.table.kind=classification",
        "data.table.numeric=[x1, x2]", "data.table.categorical=[colour]", "teacher.sklearn.params={n_estimators: 30}",
        "cache.synthetic.rows=600", "distill.train.max_steps=40", "distill.train.batch_size=64", "student.mlp.hidden_size=32", *overrides,
    ])


@pytest.mark.slow
def test_a_users_csv_distils_into_an_mlp_that_exports_to_onnx_and_is_registered(tmp_path):
    import mlflow
    import onnxruntime

    from kd_core.models import model_copy
    from kd_core.models.tabular import load_tabular_mlp
    from kd_core.storage import Store

    config = tabular_config(tmp_path, write_table(tmp_path / "rows.csv"))
    steps = run_pipeline(config)
    prep = steps["prep"]
    assert prep.metrics["train_imputed"] > 0 and prep.metrics["train_missing_categories"] > 0
    assert prep.details["table"]["categories"]["colour"] == ["<unknown>", "<missing>", "blue", "green", "red"]
    assert steps["cache"].details["synthetic_rows"]["rows"] == 600
    metrics = steps["eval"].metrics
    for name in ("teacher", "student", "baseline"):
        assert {"accuracy", "log_loss", "roc_auc", "ece", "latency_ms", "rows_per_s", "weight_bytes"} <= set(metrics[name]), name
    assert metrics["student"]["accuracy"] > metrics["uniform"]["accuracy"]
    assert 0.0 <= metrics["student"]["synthetic_agreement"] <= 1.0 and metrics["synthetic_rows"] == 2000
    # the exported graph computes what the torch module does, missing values and categories included
    folder = model_copy(Store(config.storage), steps["distill"])
    model = load_tabular_mlp(folder)
    numeric = np.array([[0.3, np.nan], [-1.0, 2.0]], np.float32)
    categorical = np.array([[1], [4]], np.int64)
    import torch

    expected = model.predict(torch.from_numpy(numeric), torch.from_numpy(categorical)).detach().numpy()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"numeric": numeric, "categorical": categorical})[0], expected, atol=1e-5)
    assert np.allclose(expected.sum(1), 1.0)
    # registered: MLflow's ONNX flavour serves it, with the vocabularies beside it
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{config.registry.model_name}/1")
    out = served.predict({"numeric": numeric, "categorical": categorical})
    np.testing.assert_allclose(out["prediction"], expected, atol=1e-5)
    report = (Store(config.storage).local_path(f"{steps['eval'].folder}/report.html")).read_text()
    assert "calibration" in report and "hard-label MLP" in report


def test_bad_tables_stop_before_any_step_naming_the_file_row_and_column(tmp_path):
    from kd_core.data.tabular import TableError

    csv = write_table(tmp_path / "rows.csv", bad_cell="twelve")
    with pytest.raises(TableError, match=r"rows.csv line 6: column 'x1' holds a value that is not a finite number \('twelve'\).*bad_rows: drop"):
        run_pipeline(tabular_config(tmp_path, csv), until="prep")
    dropped = run_pipeline(tabular_config(tmp_path, csv, "data.table.bad_rows=drop"), until="prep")["prep"]
    assert dropped.metrics["rows_dropped"] == 1 and dropped.metrics["rows_read"] == 400
    with pytest.raises(TableError, match=r"no column 'size' in the table; it has x1, x2, colour, label"):
        run_pipeline(tabular_config(tmp_path, csv, "data.table.numeric=[x1, size]"), until="prep")
    ok = write_table(tmp_path / "ok.csv")
    with pytest.raises(TableError, match=r"column 'x2' is missing.*data.table.missing: impute"):
        run_pipeline(tabular_config(tmp_path, ok, "data.table.missing=error"), until="prep")
    with pytest.raises(TableError, match=r"column 'colour' is mostly not numbers .* list it under data.table.categorical"):
        run_pipeline(tabular_config(tmp_path, ok, "data.table.numeric=[x1, colour]", "data.table.categorical=[]"), until="prep")
    with pytest.raises(TableError, match=r"column 'label' is mostly not numbers .* the target: set data.table.kind: classification"):
        run_pipeline(tabular_config(tmp_path, ok, "data.table.kind=regression"), until="prep")


def test_unseen_categories_read_as_unknown_and_classes_sort_numerically(tmp_path):
    from kd_core.config import DataConfig
    from kd_core.data.tabular import Table, encode_rows, fit_schema

    table = Table({"y": np.array(["10", "9", "10", "2"], dtype=object), "c": np.array(["a", "b", None, "z"], dtype=object)}, ["r"] * 4)
    schema = fit_schema(table, np.array([0, 1, 2]), "classification", "y", [], ["c"])
    assert schema.classes == ["2", "9", "10"] and schema.categories["c"] == ["<unknown>", "<missing>", "a", "b"]
    columns, counts = encode_rows(table, np.arange(4), schema)
    assert columns["categorical"].reshape(-1).tolist() == [2, 3, 1, 0] and counts == {"imputed": 0, "unseen": 1, "missing_categories": 1}
    assert columns["target"].reshape(-1).tolist() == [2, 1, 2, 0]
    assert DataConfig(source="sklearn").table.kind is None


def test_a_users_skops_and_onnx_teachers_are_read_and_pickles_and_untrusted_types_refused(tmp_path):
    import pandas as pd
    import skops.io
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier

    from kd_core.models.tabular_teacher import TabularTeacherError, load_bytes, trusted_check

    csv = write_table(tmp_path / "rows.csv")
    frame = pd.read_csv(csv)
    forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(frame[["x1"]].fillna(0), frame["label"])
    skops.io.dump(forest, tmp_path / "forest.skops")
    steps = run_pipeline(tabular_config(tmp_path, csv, f"teacher.path={tmp_path / 'forest.skops'}", "data.table.numeric=[x1]",
                                        "data.table.categorical=[]"), until="cache")
    assert steps["teacher"].details["estimator"] == "skops file" and steps["teacher"].metrics["val_score"] > 0.5
    schema = steps["prep"].details["table"]
    rows = np.array([[-2.0], [0.1], [2.5]], np.float32)
    expected = forest.predict_proba(pd.DataFrame({"x1": rows[:, 0]}))[:, [list(forest.classes_).index(c) for c in schema["classes"]]]
    np.testing.assert_allclose(load_bytes((tmp_path / "forest.skops").read_bytes(), schema).predict(rows, None), expected)
    # the same forest as ONNX (skl2onnx, probabilities as a tensor): the same predictions
    onnx_model = to_onnx(forest, rows, options={id(forest): {"zipmap": False}}, target_opset=17)
    onnx_teacher = load_bytes(onnx_model.SerializeToString(), schema, ".onnx")
    np.testing.assert_allclose(onnx_teacher.predict(rows, None), expected, atol=1e-5)
    # a pickle is refused before anything is read; a type skops does not trust is named
    with pytest.raises(ValueError, match="never loads pickle or joblib"):  # when the job is read, before any step
        tabular_config(tmp_path, csv, f"teacher.path={tmp_path / 'forest.pkl'}")
    payload = skops.io.dumps({"model": forest, "helper": _Helper()})
    with pytest.raises(TabularTeacherError, match=r"types kdflow does not trust: .*_Helper.*trusted_types"):
        trusted_check(payload, [], "helper.skops")
    assert trusted_check(payload, [f"{_Helper.__module__}._Helper"], "helper.skops")
    # a type is trusted by its exact name, never by its package: a file may name any numpy function for skops to call
    with pytest.raises(TabularTeacherError, match=r"numpy.testing._private.utils.assert_equal"):
        trusted_check(skops.io.dumps({"f": np.testing.assert_equal}), [], "function.skops")
    # an output that is not probabilities is refused, naming the row (an ONNX graph that echoes its input twice)
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Concat", ["x1", "x1"], ["scores"], axis=1)], "echo",
                              [helper.make_tensor_value_info("x1", TensorProto.FLOAT, [None, 1])], [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 2])])
    echo = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(TabularTeacherError, match=r"output for row 0 is \[-2.0, -2.0\], not class probabilities"):
        load_bytes(echo.SerializeToString(), schema, ".onnx").predict(rows, None)


class _Helper:
    """A user type: a skops file holding it needs the user's explicit trust."""


@pytest.mark.slow
def test_the_teacher_fits_in_a_ray_task_and_the_cache_runs_on_ray_actors(tmp_path):
    csv = write_table(tmp_path / "rows.csv")
    config = tabular_config(tmp_path, csv, "compute.backend=ray", "teacher.sklearn.cpus=1", "cache.num_actors=1")
    steps = run_pipeline(config, until="cache")
    assert steps["teacher"].metrics["train_score"] > 0.9 and steps["cache"].metrics["bytes"] > 0
    local = run_pipeline(tabular_config(tmp_path / "local", csv, "teacher.sklearn.cpus=1"), until="cache")
    assert local["teacher"].key == steps["teacher"].key  # where it ran is not part of what it is


def test_the_tabular_sections_leave_the_other_tasks_keys_as_they_were():
    """`data.table`, `teacher.sklearn`, `student.mlp` and `cache.synthetic` shape only tabular jobs:
    in another task's keys they would redo every stored step of its existing jobs."""
    from kd_core.config import CacheConfig, DataConfig, StudentConfig, TeacherConfig
    from kd_core.stages.tune import _unkeyed_student_fields
    from kd_core.tasks import TASKS

    for task in TASKS:
        settings = task.data_settings(DataConfig(source=task.data_sources[0], files=["x.jsonl"]))
        assert ("table" in settings) == (task.name == "tabular"), task.name
        assert ("synthetic" in task.cache_settings(CacheConfig())) == (task.name == "tabular"), task.name
        assert set(task.teacher_settings(TeacherConfig())) == {"architecture", "train"}, task.name
    assert "mlp" in _unkeyed_student_fields(StudentConfig())


def test_tabular_losses_match_their_float64_reference():
    import torch

    from kd_core.losses.tabular import classification_terms, regression_terms

    rng = np.random.default_rng(0)
    student_bf16 = torch.tensor(rng.normal(size=(6, 3))).bfloat16()  # the math runs in float32 whatever the input dtype
    student = student_bf16.double().numpy()
    teacher = np.log(rng.dirichlet(np.ones(3), size=6))
    teacher[0, 2] = -np.inf  # a class the forest gives probability 0
    labels = np.array([0, 2, 1, -1, -1, 1])
    T = 2.0

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(teacher / T), softmax(student / T)
    kd = T**2 * np.mean(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0), 1))
    labelled = labels >= 0
    ce = -np.mean(np.log(softmax(student)[np.flatnonzero(labelled), labels[labelled]]))
    terms = classification_terms(student_bf16, torch.tensor(teacher), torch.tensor(labels), temperature=T)
    assert terms["kd"].dtype == torch.float32 and abs(terms["kd"].item() - kd) < 1e-5 and abs(terms["ce"].item() - ce) < 1e-5
    none = classification_terms(torch.tensor(student), None, torch.full((6,), -1), temperature=T)
    assert none["ce"].item() == 0.0 and none["kd"].item() == 0.0  # all rows unlabelled: 0, not NaN
    values, targets, truth = rng.normal(size=5), rng.normal(size=5), np.array([0.5, np.nan, -1.0, np.nan, 2.0])
    terms = regression_terms(torch.tensor(values), torch.tensor(targets), torch.tensor(truth))
    kept = ~np.isnan(truth)
    assert abs(terms["kd"].item() - np.mean((values - targets) ** 2)) < 1e-6
    assert abs(terms["ce"].item() - np.mean((values[kept] - truth[kept]) ** 2)) < 1e-6


@pytest.mark.slow
def test_the_regression_recipe_runs_on_the_bundled_diabetes_table(tmp_path):
    config = load_config(REPO / "configs" / "tabular_regression.yaml", [
        f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}", "compute.backend=local",
        "cache.synthetic.rows=300", "distill.train.max_steps=30", "teacher.sklearn.params={max_iter: 20}",
    ])
    steps = run_pipeline(config, until="eval")
    metrics = steps["eval"].metrics
    assert steps["prep"].details["table"]["categorical"] == ["sex"]
    assert {"r2", "rmse", "teacher_rmse", "synthetic_teacher_rmse"} <= set(metrics["student"]) and metrics["uniform"]["r2"] == 0.0
    saved = json.loads((Store_of(config).local_path(f"{steps['distill'].folder}/model/config.json")).read_text())
    assert saved["schema"]["kind"] == "regression" and saved["schema"]["target_std"] > 1


def Store_of(config):
    from kd_core.storage import Store

    return Store(config.storage)


@pytest.mark.slow
@pytest.mark.parametrize("backend, trials", [("local", 4), ("ray", 2)])
def test_a_teacher_search_fits_the_best_of_its_trials(tmp_path, backend, trials):
    """In this process (Optuna), and in Ray Tune trials (Optuna's TPE through Ray Tune)."""
    search = "teacher.sklearn.search={max_depth: {kind: int, low: 1, high: 6}, min_samples_leaf: {kind: choice, values: [1, 20]}}"
    config = tabular_config(tmp_path, write_table(tmp_path / "rows.csv"), f"compute.backend={backend}", search,
                            f"teacher.sklearn.search_trials={trials}", "teacher.sklearn.cpus=1")
    teacher = run_pipeline(config, until="cache")["teacher"]
    trials_run = teacher.details["search"]["trials"]
    assert len(trials_run) == trials and teacher.metrics["search_trials"] == trials
    best = max(trials_run, key=lambda trial: trial["val_score"])
    assert teacher.details["search"]["best_params"] == best["params"] and teacher.metrics["val_score"] == pytest.approx(best["val_score"])
    assert all(1 <= trial["params"]["max_depth"] <= 6 and trial["params"]["min_samples_leaf"] in (1, 20) for trial in trials_run)


def test_parquet_tables_on_s3_are_read_and_a_changed_table_is_prepared_again(tmp_path, s3_endpoint, s3_bucket):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    def parquet(rows: int, seed: int) -> bytes:
        rng = np.random.default_rng(seed)
        table = pa.table({"size": rng.normal(size=rows), "city": rng.choice(["a", "b"], size=rows), "price": rng.normal(size=rows) * 10})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    s3 = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    s3.pipe(f"{s3_bucket}/homes/part-0.parquet", parquet(120, 0))
    s3.pipe(f"{s3_bucket}/homes/part-1.parquet", parquet(80, 1))
    overrides = [f"storage.s3.endpoint_url={s3_endpoint}", f"data.files=[s3://{s3_bucket}/homes/]", "data.table.target=price",
                 "data.table.kind=regression", "data.table.numeric=[size]", "data.table.categorical=[city]"]
    config = tabular_config(tmp_path, "unused.csv", *overrides)
    first = run_pipeline(config, until="prep")["prep"]
    assert first.metrics["rows_read"] == 200 and first.details["table"]["categories"]["city"] == ["<unknown>", "<missing>", "a", "b"]
    assert first.details["table"]["kind"] == "regression" and first.details["table"]["target_std"] > 1
    s3.pipe(f"{s3_bucket}/homes/part-1.parquet", parquet(81, 2))  # a refreshed partition
    again = run_pipeline(config, until="prep")["prep"]
    assert again.key != first.key and again.metrics["rows_read"] == 201


def test_the_mlp_runs_in_bfloat16_as_a_bf16_engine_casts_it():
    import torch

    from kd_core.models.tabular import TabularMLP

    schema = {"kind": "classification", "numeric": ["a"], "categorical": ["c"], "numeric_mean": [0.0], "numeric_std": [1.0],
              "categories": {"c": ["<unknown>", "<missing>", "x"]}, "classes": ["0", "1"], "target_mean": 0.0, "target_std": 1.0}
    model = TabularMLP(schema, {"hidden_size": 8, "num_layers": 1, "norm": "layer", "activation": "relu", "embedding_dim": None}).bfloat16()
    probabilities = model.predict(torch.tensor([[0.5], [float("nan")]]), torch.tensor([[2], [0]]))
    assert probabilities.dtype == torch.float32 and torch.allclose(probabilities.sum(1), torch.ones(2), atol=1e-3)


def test_the_deep_preflight_runs_a_users_teacher_on_rows_and_checks_its_params(tmp_path):
    import pandas as pd
    import skops.io
    from sklearn.ensemble import RandomForestClassifier

    from kd_core.preflight import cheap_checks, deep_checks

    csv = write_table(tmp_path / "rows.csv")
    frame = pd.read_csv(csv)
    good = RandomForestClassifier(n_estimators=5, random_state=0).fit(frame[["x1"]], frame["label"])
    skops.io.dump(good, tmp_path / "good.skops")
    numbered = RandomForestClassifier(n_estimators=5, random_state=0).fit(frame[["x1"]], (frame["label"] == "yes").astype(int))
    skops.io.dump(numbered, tmp_path / "numbered.skops")
    one_column = ["data.table.numeric=[x1]", "data.table.categorical=[]"]
    rows = {r.name: r for r in deep_checks(tabular_config(tmp_path, csv, f"teacher.path={tmp_path / 'good.skops'}", *one_column), records=8)}
    assert rows["teacher predictions"].status == "pass" and "class probabilities of shape (8, 2)" in rows["teacher predictions"].message
    assert rows["table rows"].status == "pass" and "400 rows read" in rows["table rows"].message
    rows = {r.name: r for r in deep_checks(tabular_config(tmp_path, csv, f"teacher.path={tmp_path / 'numbered.skops'}", *one_column), records=8)}
    assert rows["teacher predictions"].status == "fail" and "classes ['0', '1'] are not the data's ['no', 'yes']" in rows["teacher predictions"].message
    rows = {r.name: r for r in cheap_checks(tabular_config(tmp_path, csv, "teacher.sklearn.params={n_estimator: 10}"))}
    assert rows["teacher"].status == "fail" and "teacher.sklearn.params: RandomForestClassifier refuses them" in rows["teacher"].message
    rows = {r.name: r for r in cheap_checks(tabular_config(tmp_path, csv, "teacher.sklearn.params={n_estimators: -5}"))}
    assert rows["teacher"].status == "fail" and "n_estimators" in rows["teacher"].message
