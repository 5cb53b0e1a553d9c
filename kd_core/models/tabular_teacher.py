"""Tabular teachers: a scikit-learn pipeline trained here, or a user's own, never unpickled.

- Trained here (`teacher.sklearn`): numeric columns standardised, categorical ones one-hot encoded
  (a missing value is a category of its own, an unseen one all zeros), then the estimator. It is
  fitted on the training split's rows, its classes the data's class names, and saved with skops
  (`skops.io`, which stores an object's state, never executable pickle code).
- A user's own (`teacher.path`): a `.skops` file, loaded only if every type it holds is one skops
  trusts by default, one of `TRUSTED_TYPES` (the data structures scikit-learn's fitted estimators
  hold, by exact name) or listed in `teacher.sklearn.trusted_types` (skops' trusted-types check: it
  names the others and loads nothing; a type is trusted by its exact name only, never by its
  package, since a file may name any function of a package for skops to call); or an `.onnx`
  model, run by ONNX Runtime. A pickle or joblib file is refused.

Every teacher reads rows as prep wrote them (`kd_core.data.tabular`): `numeric` (n, F_num) and
`categorical` (n, F_cat) codes, turned back into a table of the configured column names
(`teacher_frame`; code 0, a value prep's training split lacks, reaches it as `<unknown>`, code 1 as
a missing value). `TabularTeacher.predict` gives (n, C) class probabilities in the order of the
data's classes, or (n, 1) predictions.

ONNX inputs: one per configured column, named as the column (numeric ones float32 (n, 1),
categorical ones string (n, 1), as skl2onnx converts a pipeline fitted on a DataFrame), or a single
float32 input (n, F_num) of the numeric columns in config order (tables without categorical
columns). Its probability output (a (n, C) tensor, or ONNX-ML's list of maps) is read in the order
of the data's classes.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np

from kd_core.errors import InputError

SKOPS_SUFFIX = ".skops"
ONNX_SUFFIX = ".onnx"
TRUSTED_TYPES = frozenset({
    "numpy.dtype", "sklearn.tree._tree.Tree", "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neighbors._kd_tree.KDTree", "sklearn.neighbors._ball_tree.BallTree", "sklearn.metrics._dist_metrics.EuclideanDistance64",
})
"""Types beyond skops' defaults a `.skops` teacher may hold without being listed in `trusted_types`:
the data structures scikit-learn's fitted trees, boosting, and neighbour models hold (classes
built from arrays, not functions)."""
ESTIMATORS = {
    # name: (module, classifier, regressor, keyword of its seed, keyword of its thread count)
    "hist_gradient_boosting": ("sklearn.ensemble", "HistGradientBoostingClassifier", "HistGradientBoostingRegressor", "random_state", None),
    "gradient_boosting": ("sklearn.ensemble", "GradientBoostingClassifier", "GradientBoostingRegressor", "random_state", None),
    "random_forest": ("sklearn.ensemble", "RandomForestClassifier", "RandomForestRegressor", "random_state", "n_jobs"),
    "extra_trees": ("sklearn.ensemble", "ExtraTreesClassifier", "ExtraTreesRegressor", "random_state", "n_jobs"),
    "logistic_regression": ("sklearn.linear_model", "LogisticRegression", None, "random_state", None),
    "ridge": ("sklearn.linear_model", None, "Ridge", None, None),
    "svm": ("sklearn.svm", "SVC", "SVR", "random_state", None),
    "knn": ("sklearn.neighbors", "KNeighborsClassifier", "KNeighborsRegressor", None, "n_jobs"),
}


class TabularTeacherError(InputError):
    """A tabular teacher that cannot be built, loaded or read; names the field and what to do."""


# ------------------------------------------------------------------------------------ the rows
def teacher_frame(numeric: np.ndarray | None, categorical: np.ndarray | None, schema: dict):
    """The rows as a table of the configured columns (pandas), as a scikit-learn pipeline reads them."""
    import pandas as pd

    columns = {}
    for index, name in enumerate(schema["numeric"]):
        columns[name] = numeric[:, index].astype(np.float64)
    for index, name in enumerate(schema["categorical"]):
        vocabulary = np.array(schema["categories"][name], dtype=object)
        values = vocabulary[np.clip(categorical[:, index], 0, len(vocabulary) - 1)]
        values[categorical[:, index] == 1] = None
        columns[name] = values
    return pd.DataFrame(columns)


# ----------------------------------------------------------------------------- trained here
def build_pipeline(settings: dict, schema: dict):
    """The preprocessing and the estimator of `teacher.sklearn` (as a dict) for the table `schema`."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    module, classifier, regressor, seed_keyword, threads_keyword = ESTIMATORS[settings["estimator"]]
    name = classifier if schema["kind"] == "classification" else regressor
    if name is None:
        raise TabularTeacherError(f"teacher.sklearn.estimator: {settings['estimator']} has no {schema['kind']} model; choose another estimator")
    keywords = {}
    if seed_keyword:
        keywords[seed_keyword] = settings["seed"]
    if threads_keyword:
        keywords[threads_keyword] = settings["cpus"]
    if settings["estimator"] == "svm" and schema["kind"] == "classification":
        keywords["probability"] = True
    keywords |= settings["params"]
    try:
        estimator = getattr(importlib.import_module(module), name)(**keywords)
    except TypeError as err:
        raise TabularTeacherError(f"teacher.sklearn.params: {name} does not take them ({err})") from None
    categorical = Pipeline([("missing", SimpleImputer(strategy="constant", fill_value="<missing>")),
                            ("one_hot", OneHotEncoder(handle_unknown="ignore", sparse_output=False))])
    features = ColumnTransformer(
        [("numeric", StandardScaler(), list(schema["numeric"])), ("categorical", categorical, list(schema["categorical"]))],
        sparse_threshold=0.0,
    )
    return Pipeline([("features", features), ("estimator", estimator)])


def fit_pipeline(settings: dict, schema: dict, numeric, categorical, target: np.ndarray) -> tuple[bytes, dict]:
    """Fit the pipeline on the rows (classification targets are class indices: it learns the data's
    class names); its skops bytes and the fit's metrics (`fit_seconds`, training score)."""
    import skops.io

    pipeline = build_pipeline(settings, schema)
    labels = np.asarray(schema["classes"], dtype=object)[target.reshape(-1)] if schema["kind"] == "classification" else target.reshape(-1)
    frame = teacher_frame(numeric, categorical, schema)
    started = time.perf_counter()
    with cpu_threads(settings["cpus"]):
        try:
            pipeline.fit(frame, labels)
        except ValueError as err:
            raise TabularTeacherError(f"teacher.sklearn: {settings['estimator']} could not be fitted on the training split ({err})") from None
        metrics = {"fit_seconds": time.perf_counter() - started, "train_score": float(pipeline.score(frame, labels)), "train_rows": int(len(labels))}
    return skops.io.dumps(pipeline), metrics


def cpu_threads(count: int):
    """At most `count` threads in every native thread pool (OpenMP, BLAS) inside the block. Torch
    loads an OpenMP runtime of its own beside scikit-learn's: unlimited, the two oversubscribe the
    cores and a gradient-boosting fit runs 100× slower on a busy machine."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=count)


# -------------------------------------------------------------------------------------- loading
class TabularTeacher:
    """A loaded teacher: `predict(numeric, categorical)` -> (n, C) probabilities or (n, 1) predictions."""

    def __init__(self, model, kind: str, schema: dict, file_bytes: int, onnx_labels: list[str] | None = None, threads: int = 1):
        self.model, self.kind, self.schema, self.file_bytes, self.onnx_labels = model, kind, schema, file_bytes, onnx_labels
        self.threads = threads
        """Native threads it predicts with (`cpu_threads`): a trained teacher's `teacher.sklearn.cpus`, else 1."""
        self.classification = schema["kind"] == "classification"
        self._columns = self._class_columns() if kind == "skops" and self.classification else None

    def _check_labels(self, labels: list[str], what: str) -> None:
        """The teacher's class labels are the data's, each once."""
        if sorted(labels) != sorted(self.schema["classes"]):
            raise TabularTeacherError(
                f"teacher.path: {what} {labels} are not the data's classes {self.schema['classes']}; check data.table.target "
                "(a class label is compared as text)"
            )

    def _class_columns(self) -> np.ndarray:
        """Where each of the data's classes is among the estimator's `classes_`."""
        known = [str(label) for label in getattr(self.model, "classes_", [])]
        if not known:
            raise TabularTeacherError("teacher.path: the pipeline has no classes_: it is not a fitted classifier (data.table.kind is classification)")
        absent = [label for label in self.schema["classes"] if label not in known]
        extra = [label for label in known if label not in self.schema["classes"]]
        if absent or extra:
            raise TabularTeacherError(
                f"teacher.path: the teacher's classes {known} are not the data's {self.schema['classes']} "
                f"(missing {absent}, unknown {extra}); check data.table.target"
            )
        return np.array([known.index(label) for label in self.schema["classes"]])

    def predict(self, numeric: np.ndarray | None, categorical: np.ndarray | None) -> np.ndarray:
        """(n, C) class probabilities in the data's class order, or (n, 1) predictions; checked:
        finite, and probabilities in [0, 1] summing to 1 per row."""
        if self.classification and self.kind == "skops" and not hasattr(self.model, "predict_proba"):
            raise TabularTeacherError("teacher.path: the classifier has no predict_proba; distillation needs the teacher's class probabilities")
        try:
            with cpu_threads(self.threads):
                out = self._predict(numeric, categorical)
        except TabularTeacherError:
            raise
        except Exception as err:  # the user's pipeline's own error, whatever its type
            columns = ", ".join([*self.schema["numeric"], *self.schema["categorical"]])
            raise TabularTeacherError(
                f"teacher: it could not predict ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it receives the "
                f"columns {columns} (numbers as float64, categories as text, a missing one as None, an unseen one as <unknown>)"
            ) from None
        return self._checked(out)

    def _predict(self, numeric, categorical) -> np.ndarray:
        if self.kind == "onnx":
            return self._predict_onnx(numeric, categorical)
        frame = teacher_frame(numeric, categorical, self.schema)
        if self.classification:
            return np.asarray(self.model.predict_proba(frame), dtype=np.float64)[:, self._columns]
        return np.asarray(self.model.predict(frame), dtype=np.float64).reshape(-1, 1)

    def _checked(self, out: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(out).all(1)
        if self.classification and not bad.any():
            bad = (out < -1e-6).any(1) | (out > 1 + 1e-6).any(1) | (np.abs(out.sum(1) - 1) > 1e-3)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            what = "class probabilities (each in [0, 1], summing to 1)" if self.classification else "finite predictions"
            raise TabularTeacherError(f"teacher: its output for row {row} is {np.round(out[row], 6).tolist()}, not {what}; "
                                      "a classifier must give its predict_proba (an ONNX model: its probability output)")
        return np.clip(out, 0.0, 1.0) if self.classification else out

    def _predict_onnx(self, numeric, categorical) -> np.ndarray:
        session, rows = self.model, len(numeric if numeric is not None else categorical)
        inputs = session.get_inputs()
        if len(inputs) == 1 and not self.schema["categorical"]:
            feed = {inputs[0].name: numeric.astype(np.float32)}
        else:
            columns = {name: numeric[:, i : i + 1].astype(np.float32) for i, name in enumerate(self.schema["numeric"])}
            frame = teacher_frame(numeric, categorical, self.schema)
            for name in self.schema["categorical"]:
                columns[name] = frame[name].fillna("").astype(str).to_numpy().reshape(-1, 1)
            absent = [i.name for i in inputs if i.name not in columns]
            if absent:
                raise TabularTeacherError(
                    f"teacher.path: the ONNX model's inputs {absent} are not configured columns ({', '.join(columns)}); "
                    "export it with one input per column named as the column, or a single float input of the numeric columns"
                )
            feed = {i.name: columns[i.name] if "string" in i.type else columns[i.name].astype(np.float32) for i in inputs}
        outputs = session.run(None, feed)
        if not self.classification:
            return np.asarray(outputs[0], dtype=np.float64).reshape(rows, 1)
        classes = self.schema["classes"]
        for output in outputs:
            if isinstance(output, list) and output and isinstance(output[0], dict):  # ONNX-ML ZipMap: one {class: p} per row
                keys = {str(key): key for key in output[0]}
                self._check_labels(list(keys), "its ZipMap's keys")
                return np.array([[row[keys[label]] for label in classes] for row in output], dtype=np.float64)
            values = np.asarray(output)
            if values.ndim == 2 and values.shape[1] == len(classes) and values.dtype.kind == "f":
                labels = self.onnx_labels
                if labels is None:  # no labels in the graph (e.g. a network's softmax): columns in the data's class order
                    return values.astype(np.float64)
                self._check_labels(labels, "its classifier's class labels")
                return values.astype(np.float64)[:, [labels.index(label) for label in classes]]
        raise TabularTeacherError(
            f"teacher.path: no output of the ONNX model holds {len(self.schema['classes'])} class probabilities per row; "
            "export the classifier with its probabilities (skl2onnx: options={'zipmap': False})"
        )


def onnx_class_labels(data: bytes) -> list[str] | None:
    """The class labels an ONNX-ML classifier node of the model names (`classlabels_strings` or
    `classlabels_int64s`), as text, in its probability columns' order; None when none does."""
    import onnx

    for node in onnx.load_model_from_string(data).graph.node:
        for attribute in node.attribute:
            if attribute.name == "classlabels_strings" and attribute.strings:
                return [value.decode() for value in attribute.strings]
            if attribute.name == "classlabels_int64s" and attribute.ints:
                return [str(value) for value in attribute.ints]
    return None


def trusted_check(data: bytes, trusted_types: list[str], where: str) -> list[str]:
    """The types of a skops file beyond skops' defaults, all of them in `TRUSTED_TYPES` or the
    `trusted_types` listed (exact names); any other stops the load, named (nothing is loaded)."""
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except Exception as err:  # a corrupt or foreign file: skops' own errors vary by version
        raise TabularTeacherError(f"teacher.path: {where} is not a readable skops file ({err})") from None
    refused = [name for name in untrusted if name not in TRUSTED_TYPES and name not in trusted_types]
    if refused:
        raise TabularTeacherError(
            f"teacher.path: {where} holds types kdflow does not trust: {', '.join(refused)}; review them and, if you trust "
            "them, list them in teacher.sklearn.trusted_types (nothing was loaded)"
        )
    return untrusted


def teacher_file_problem(path: str) -> str | None:
    """Why `teacher.path` cannot name a tabular teacher (it is neither `.skops` nor `.onnx`), or None."""
    if path.endswith((SKOPS_SUFFIX, ONNX_SUFFIX)):
        return None
    return (f"teacher.path: {path} is neither a .skops nor an .onnx file; save a scikit-learn pipeline with skops.io.dump "
            "(kdflow never loads pickle or joblib files) or convert it to ONNX")


def load_tabular_teacher(path: Path | str, schema: dict, trusted_types: list[str] = (), threads: int = 1) -> TabularTeacher:
    """A `.skops` or `.onnx` teacher file (module docstring)."""
    path = Path(path)
    return load_bytes(path.read_bytes(), schema, path.suffix, trusted_types, str(path), threads)


def load_bytes(
    data: bytes, schema: dict, suffix: str = SKOPS_SUFFIX, trusted_types: list[str] = (), where: str = "the teacher", threads: int = 1,
) -> TabularTeacher:
    """A teacher from a file's bytes, by its suffix (`.skops` or `.onnx`); `where` names it in errors;
    it predicts with `threads` native threads."""
    if suffix == SKOPS_SUFFIX:
        import skops.io

        trusted = trusted_check(data, list(trusted_types), where)
        try:
            model = skops.io.loads(data, trusted=trusted)
        except ModuleNotFoundError as err:
            raise TabularTeacherError(
                f"teacher.path: {where} holds a type from the module {err.name!r}, which this Python cannot import; install it "
                "(pip install, or PYTHONPATH) wherever kdflow runs: here, and on the Ray workers and in the cluster's image"
            ) from None
        except Exception as err:  # skops' own errors vary by version
            raise TabularTeacherError(f"teacher.path: {where} could not be loaded by skops ({err})") from None
        return TabularTeacher(model, "skops", schema, len(data), threads=threads)
    if suffix == ONNX_SUFFIX:
        import onnxruntime

        try:
            session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise TabularTeacherError(f"teacher.path: {where} is not a loadable ONNX model ({err})") from None
        return TabularTeacher(session, "onnx", schema, len(data), onnx_class_labels(data), threads=threads)
    raise TabularTeacherError(teacher_file_problem(where) or f"teacher.path: {where}: unknown teacher file type {suffix!r}")

TEACHER_INFO = "teacher.json"
"""Beside a teacher step's file: which file it is and the types its owner trusts it to hold."""


def teacher_info(file_name: str, trusted_types: list[str], origin: str, threads: int = 1) -> bytes:
    """The `teacher.json` of a teacher step's folder."""
    import json

    return json.dumps({"file": file_name, "trusted_types": list(trusted_types), "origin": origin, "threads": threads}, indent=2).encode()


def load_teacher_folder(folder: Path, schema: dict) -> TabularTeacher:
    """The teacher a teacher step stored (its file, read as `teacher.json` says)."""
    import json

    info = json.loads((Path(folder) / TEACHER_INFO).read_text())
    return load_tabular_teacher(Path(folder) / info["file"], schema, info.get("trusted_types", []), info.get("threads", 1))
