"""The model registry: log a student to MLflow, register it, and promote it only through gates.

The register stage (`kd_core/stages/register.py`) runs it:
One MLflow run per registration holds the job's public config as params (no secrets), the eval
metrics, the eval stage's files (`eval/metrics.json`, `eval/training_curves.png`) and the student
as an MLflow model named `model` (logged by the job's task: `log_text_generation` for a language
model, the pyfunc of kd_core/registry/pyfunc.py for a reward model, `log_reward_pyfunc`, the
sentence-transformers flavour for a sentence encoder, `log_sentence_transformer`), so
`mlflow.pyfunc.load_model("models:/<registry.model_name>@champion")` loads it. A new version of
`registry.model_name` is created from that logged model (its source is the model's `models:/m-…`
URI), tagged with the teacher, data, cache and config keys, the code version, the gate results
(`kdflow.gates_passed`, `kdflow.gates`) and its `registry.primary_metric` value, and
`registry.alias` (challenger) is pointed at it.

Promotion (`promote_best`): the champion alias always names the best version, by the primary
metric, among the eligible ones: versions whose gates all passed and that a rollback has not
rejected; after a promotion by hand (`kdflow promote`) or a rollback, only the version chosen
then and versions registered after it. A new version that failed a gate, or whose primary metric
is NaN or infinite (a diverged run), is never eligible, and one
that does not beat the champion leaves it where it is.

Race safety without locks: each registrar creates its version first, then loops: read every
version and the alias, compute the best eligible one, and stop if the alias already names it,
else move the alias and read again. The last registrar to move the alias has afterwards seen it
name the best of every version that existed then, and any version created later has a
registrar of its own that runs the same loop after creating it; so however registrations
interleave, the alias ends on the best eligible version, never on a worse or a gate-failing one
(`tests/test_registry.py` runs concurrent registrations against a real MLflow server).

By hand: `promote(version)` moves the champion to any version (one that failed its gates only with
`force=True`, `kdflow promote --force`); `rollback()` marks the champion
rejected and moves the alias back to the previous champion in the registered model's
`kdflow.champion_history` tag, walking further back on each call.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from kd_core.config import RegistryConfig
from kd_core.gates import describe_failed
from kd_core.storage import DOWNLOAD_MARKER

MAX_PARAM_LENGTH = 500
MAX_TAG_LENGTH = 5000
_PROMOTION_ROUNDS = 20

GATES_PASSED_TAG = "kdflow.gates_passed"
GATES_TAG = "kdflow.gates"
PRIMARY_METRIC_TAG = "kdflow.primary_metric"
PRIMARY_VALUE_TAG = "kdflow.primary_value"
REJECTED_TAG = "kdflow.rejected"
STUDENT_START_TAG = "kdflow.student_start"
"""On a version: where its student's weights started, as JSON (the distill manifest's
`details["student_start"]`: init, and the pretrained path and weights identity, or the teacher's
key and the cut)."""
MODEL_NAME = "model"
"""The name of the student's MLflow model in the registration run."""
GENERATION_PARAMS = {"max_new_tokens": 64, "do_sample": False}
"""A language-model student's generation settings, with defaults, as its signature's params."""
PINNED_TAG = "kdflow.champion_pinned"
"""On the registered model: "<pinned version>:<latest version then>", set by a promotion by hand
or a rollback."""
HISTORY_TAG = "kdflow.champion_history"


class RegistryError(RuntimeError):
    """A promotion or rollback that cannot be done; the message says why."""


def log_text_generation(model_dir: Path):
    """Log a causal LM's Hugging Face directory as the active run's MLflow model `model`: the
    transformers flavour, a `text-generation` pipeline of the model and its tokenizer
    (`mlflow.pyfunc.load_model(uri).predict(["a prompt"])` generates). Returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature
    from transformers import AutoTokenizer

    from kd_core.models import load_causal_lm

    # An absolute path as the model's name: MLflow asks the Hugging Face Hub for a model card under
    # that name, and a local path is refused there before any request is made.
    model_dir = model_dir.resolve()
    components = {"model": load_causal_lm(model_dir), "tokenizer": AutoTokenizer.from_pretrained(model_dir)}
    signature = infer_signature(["a prompt"], ["a prompt and its continuation"], params=GENERATION_PARAMS)
    return mlflow.transformers.log_model(
        components, name=MODEL_NAME, task="text-generation", signature=signature,
        pip_requirements=_pinned("torch", "transformers", "tokenizers", "safetensors"),
    )


def log_reward_pyfunc(model_dir: Path):
    """Log a reward model's directory as the active run's MLflow model `model`: the pyfunc of
    kd_core/registry/pyfunc.py, whose `predict` scores a DataFrame of (prompt, response, image)
    rows, one reward each. Returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from kd_core.registry.pyfunc import STUDENT_ARTIFACT

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("string", "response"), ColSpec("binary", "image")])
    with tempfile.TemporaryDirectory() as folder:
        # MLflow stores an artifact folder under its own name: copy it to a fixed one, so the
        # directory is `artifacts/student` in every registered reward model.
        student_dir = shutil.copytree(model_dir, Path(folder) / STUDENT_ARTIFACT, ignore=shutil.ignore_patterns(DOWNLOAD_MARKER))
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc.py")), artifacts={STUDENT_ARTIFACT: str(student_dir)},
            signature=ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double")])),
            # kdflow itself is not listed: it is installed from this repository, and a pin on a name
            # PyPI does not hold for us would install whatever a stranger published under it.
            pip_requirements=_pinned("torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas"),
        )


def log_sentence_transformer(model_dir: Path):
    """Log a sentence encoder's folder (a sentence-transformers model, `kd_core/models/encoders.py`)
    as the active run's MLflow model `model`: MLflow's sentence-transformers flavour, loaded from
    the folder offline (`mlflow.pyfunc.load_model(uri).predict(["a text"])` embeds). Returns
    MLflow's ModelInfo."""
    import mlflow
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir.resolve()), device="cpu", local_files_only=True)
    return mlflow.sentence_transformers.log_model(
        model, name=MODEL_NAME, input_example=["a text to embed"],
        pip_requirements=_pinned("torch", "transformers", "tokenizers", "safetensors", "sentence-transformers"),
    )


def log_tabular_onnx(model_dir: Path):
    """Log a tabular student's folder (`kd_core/models/tabular.py`) as the active run's MLflow
    model `model`: MLflow's ONNX flavour of its `model.onnx` (inputs `numeric` (rows, F_num) float32
    and `categorical` (rows, F_cat) int64 codes; output class probabilities or the prediction), with
    `config.json` (the vocabularies that map a value to its code, the statistics, the classes) and
    the safetensors weights as extra files. Served by ONNX Runtime alone: no scikit-learn, no torch.
    Returns MLflow's ModelInfo."""
    import json

    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from kd_core.models.tabular import CONFIG_NAME, ONNX_NAME, WEIGHTS_NAME

    schema = json.loads((model_dir / CONFIG_NAME).read_text())["schema"]
    outputs = len(schema["classes"]) if schema["kind"] == "classification" else 1
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(schema["numeric"])), "numeric"),
                       TensorSpec(np.dtype(np.int64), (-1, len(schema["categorical"])), "categorical")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs), "prediction")]),
    )
    return mlflow.onnx.log_model(
        onnx.load(str(model_dir / ONNX_NAME)), name=MODEL_NAME, signature=signature, save_as_external_data=False,
        extra_files=[str(model_dir / CONFIG_NAME), str(model_dir / WEIGHTS_NAME)],
        pip_requirements=_pinned("onnx", "onnxruntime", "numpy"),
    )


def _pinned(*distributions: str) -> list[str]:
    """`name==version` of each installed distribution: what loading the logged model needs. Given
    explicitly because MLflow's default list for a torch model adds torchvision, which kdflow
    neither needs nor installs."""
    return [f"{name}=={metadata.version(name)}" for name in distributions]


def numeric_metrics(mapping: dict) -> dict[str, float]:
    return {key: float(value) for key, value in mapping.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


# ------------------------------------------------------------------------------ versions, aliases
def create_version(
    client, config: RegistryConfig, *, source: str, run_id: str, primary_value: float, gates_passed: bool, tags: dict,
    model_id: str | None = None,
) -> str:
    """A new version of `registry.model_name` (the registered model is created if missing), with
    its gate outcome and primary metric as tags, and the challenger alias on it. `source` is the
    logged model's URI (`models:/m-…`) and `model_id` its id."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(config.model_name)
    except MlflowException as err:  # another registration created it first: fine
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        **tags,
        GATES_PASSED_TAG: "true" if gates_passed else "false",
        PRIMARY_METRIC_TAG: config.primary_metric,
        PRIMARY_VALUE_TAG: repr(float(primary_value)),
    }
    version = client.create_model_version(config.model_name, source=source, run_id=run_id, tags=tags, model_id=model_id)
    client.set_registered_model_alias(config.model_name, config.alias, version.version)
    return str(version.version)


def promote_best(client, config: RegistryConfig) -> str | None:
    """Move the champion alias to the best eligible version, re-reading until it is stable (see
    the module docstring); returns the champion's version, or None when there is none."""
    for _ in range(_PROMOTION_ROUNDS):
        best = best_eligible_version(client, config)
        current = alias_version(client, config.model_name, config.champion_alias)
        if best is None or best == current:
            return current
        client.set_registered_model_alias(config.model_name, config.champion_alias, best)
        _append_history(client, config, best)
    raise RegistryError(f"{config.model_name}: @{config.champion_alias} did not settle after {_PROMOTION_ROUNDS} rounds; rerun the register step")


def best_eligible_version(client, config: RegistryConfig) -> str | None:
    """The best version that passed its gates, has a finite primary metric, is not rejected, and,
    after a promotion by hand or a rollback, is the version chosen then or was registered after it."""
    model = client.get_registered_model(config.model_name)
    pinned, latest_then = (int(part) for part in model.tags.get(PINNED_TAG, "0:0").split(":"))
    eligible = [
        version for version in client.search_model_versions(f"name = '{config.model_name}'")
        if version.tags.get(GATES_PASSED_TAG) == "true"
        and REJECTED_TAG not in version.tags
        and version.tags.get(PRIMARY_METRIC_TAG) == config.primary_metric
        and math.isfinite(float(version.tags.get(PRIMARY_VALUE_TAG, "nan")))  # a diverged student, whatever its gates said
        and (int(version.version) > latest_then or int(version.version) == pinned)
    ]
    if not eligible:
        return None
    sign = -1.0 if config.maximize else 1.0
    # Best value first; on a tie the older version (the sitting champion) stays.
    best = min(eligible, key=lambda version: (sign * float(version.tags[PRIMARY_VALUE_TAG]), int(version.version)))
    return str(best.version)


def alias_version(client, model_name: str, alias: str) -> str | None:
    """The version an alias names, as a string (MLflow's stores differ: int from SQLite, str over REST)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def promote(client, config: RegistryConfig, version: int, *, force: bool = False) -> str:
    """Make `version` the champion by hand; automatic promotion then only considers versions
    from this one on. A version that failed its gates is refused unless `force`."""
    chosen = client.get_model_version(config.model_name, str(version))
    if chosen.tags.get(GATES_PASSED_TAG) == "false" and not force:
        raise RegistryError(
            f"{config.model_name} version {chosen.version} failed its gates: {failed_gates(chosen.tags)}; "
            "promote it anyway with --force"
        )
    if REJECTED_TAG in chosen.tags:
        client.delete_model_version_tag(config.model_name, chosen.version, REJECTED_TAG)
    _pin(client, config, chosen.version)
    client.set_registered_model_alias(config.model_name, config.champion_alias, chosen.version)
    _append_history(client, config, chosen.version)
    return str(chosen.version)


def failed_gates(tags: dict) -> str:
    """The failed gates recorded on a version (its `kdflow.gates` tag), for a message."""
    try:
        gates = json.loads(tags.get(GATES_TAG, "[]"))
    except json.JSONDecodeError:  # cut at the tag length limit
        return f"see its {GATES_TAG} tag"
    return "; ".join(describe_failed(gates)) or f"see its {GATES_TAG} tag"


def rollback(client, config: RegistryConfig) -> tuple[str, str]:
    """Reject the champion and move the alias back to the previous champion; returns (rejected,
    restored)."""
    current = alias_version(client, config.model_name, config.champion_alias)
    if current is None:
        raise RegistryError(f"{config.model_name} has no @{config.champion_alias} to roll back")
    history = _history(client, config)
    earlier = [
        version for version in reversed(history)
        if version != current and REJECTED_TAG not in client.get_model_version(config.model_name, version).tags
    ]
    if not earlier:
        raise RegistryError(f"{config.model_name}: no earlier @{config.champion_alias} than version {current} to roll back to")
    client.set_model_version_tag(config.model_name, current, REJECTED_TAG, f"rolled back from @{config.champion_alias}")
    restored = earlier[0]
    _pin(client, config, restored)
    client.set_registered_model_alias(config.model_name, config.champion_alias, restored)
    _append_history(client, config, restored)
    return current, restored


def _pin(client, config: RegistryConfig, version: str) -> None:
    """From now on only `version` and versions registered after this moment are eligible."""
    latest = max(int(v.version) for v in client.search_model_versions(f"name = '{config.model_name}'"))
    client.set_registered_model_tag(config.model_name, PINNED_TAG, f"{version}:{latest}")


def _history(client, config: RegistryConfig) -> list[str]:
    text = client.get_registered_model(config.model_name).tags.get(HISTORY_TAG, "[]")
    return [str(version) for version in json.loads(text)]


def _append_history(client, config: RegistryConfig, version: str) -> None:
    """Record a champion change (the last 100); informational under races, used by rollback."""
    history = _history(client, config)
    if not history or history[-1] != str(version):
        history = (history + [str(version)])[-100:]
        client.set_registered_model_tag(config.model_name, HISTORY_TAG, json.dumps(history))
