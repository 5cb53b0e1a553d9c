"""Ray Tune's experiment state is restored only when the tune step wrote it.

`Tuner.restore` unpickles `tuner.pkl` and the other state files in `<stage>/search/`. The tune
stage records each state file's sha256 as Ray writes it (kd_core/tune/state.py) and checks them
before a restore. Here a real Ray Tune search (a trivial trainable, one CPU) writes through that
filesystem on a local store and on S3 (moto server on loopback); a restore of it passes the
check; an edited state file, and a planted `tuner.pkl` whose unpickling would run code, are
refused before anything is unpickled.

Run: .venv/bin/python -m pytest tests/test_tune_state.py
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from kd_core.config import S3Config, StorageConfig
from kd_core.storage import Store
from kd_core.tune.state import DIGESTS_NAME, SEARCH_FOLDER, SearchStateError, check_search_state, search_storage

FOLDER = "tune/0123456789abcdef0123"


def report_double(config: dict) -> None:
    from ray import tune

    tune.report({"value": config["x"] * 2})


def run_tiny_search(store: Store, *, restore: bool = False):
    from ray import tune

    storage_path, filesystem = search_storage(store, FOLDER)
    if restore:
        return tune.Tuner.restore(f"{storage_path}/{SEARCH_FOLDER}", report_double, storage_filesystem=filesystem).fit()
    run_config = tune.RunConfig(name=SEARCH_FOLDER, storage_path=storage_path, storage_filesystem=filesystem, verbose=0)
    return tune.Tuner(report_double, param_space={"x": tune.grid_search([1, 2])}, run_config=run_config).fit()


@pytest.fixture(scope="module")
def tiny_search_runtime(ray_runtime):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers do not import tests/


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_search_records_its_state_restores_and_refuses_an_edited_file(where, tmp_path, request, tiny_search_runtime):
    if where == "s3":
        bucket, endpoint = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_endpoint")
        store = Store(StorageConfig(root=f"s3://{bucket}/jobs", s3=S3Config(endpoint_url=endpoint)))
    else:
        store = Store(StorageConfig(root=str(tmp_path / "store")))
    assert sorted(result.metrics["value"] for result in run_tiny_search(store)) == [2, 4]

    recorded = json.loads(store.read_bytes(f"{FOLDER}/{DIGESTS_NAME}"))
    state_files = [name for name in recorded if name.startswith("experiment_state-")]
    assert "tuner.pkl" in recorded and len(state_files) == 1
    check_search_state(store, FOLDER)
    assert sorted(result.metrics["value"] for result in run_tiny_search(store, restore=True)) == [2, 4]
    check_search_state(store, FOLDER)  # what the restored run wrote was recorded too

    edited = f"{FOLDER}/{SEARCH_FOLDER}/{state_files[0]}"
    store.write_bytes(edited, store.read_bytes(edited) + b" ")
    with pytest.raises(SearchStateError, match=rf"search/{state_files[0]}: a Ray Tune state file this tune step did not write"):
        check_search_state(store, FOLDER)


class RunsCodeWhenUnpickled:
    """Stands for a planted pickle: unpickling it creates a file."""

    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return (Path.touch, (self.witness,))


def test_a_planted_tuner_pickle_is_refused_before_anything_is_unpickled(tiny_config, tmp_path):
    from kd_core.manifest import Manifest
    from kd_core.tune.search import run_search

    store = Store(tiny_config.storage)
    witness = tmp_path / "code-ran"
    store.write_bytes(f"{FOLDER}/{SEARCH_FOLDER}/tuner.pkl", pickle.dumps(RunsCodeWhenUnpickled(witness)))
    prep = Manifest("prep", "1" * 20, "", {}, {}, {})
    cache = Manifest("cache", "2" * 20, "", {}, {}, {})
    with pytest.raises(SearchStateError, match=r"search/tuner.pkl: a Ray Tune state file this tune step did not write .* delete .*search \(or rerun with --force tune\)"):
        run_search(tiny_config, prep, cache, store, FOLDER, fresh=False)
    assert not witness.exists()
