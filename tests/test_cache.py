"""The cache stage: top-k targets aligned with the token shards, and resuming a killed job.

A killed job leaves the state checked here: no manifest, some shards finished with their commit
records, some never written, one written but not committed, one damaged. The rerun must keep
exactly the good shards and end byte-identical to an uninterrupted run.
Run: .venv/bin/python -m pytest tests/test_cache.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.cache import COMMIT_SUFFIX, cache
from kd_core.config import load_config
from kd_core.data.prep import prep
from kd_core.data.shards import decode_arrow, load_split
from kd_core.models import load_causal_lm
from kd_core.storage import Store
from kd_core.train.teacher import teacher, teacher_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Prepared data and a trained tiny teacher, shared by the tests of this file (they only touch the cache)."""
    folder = tmp_path_factory.mktemp("cache")
    config = load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={folder}", "compute.backend=local"])
    store = Store(config.storage)
    prepared = prep(config.data, store)
    taught = teacher(config.teacher, prepared, store, config.compute)
    return config, store, prepared, taught


def test_targets_are_the_teachers_top_k_next_token_distribution(trained):
    config, store, prepared, taught = trained
    manifest = cache(config.cache, prepared, taught, store, config.compute)
    seq_len, k = prepared.details["seq_len"], config.cache.top_k
    record = manifest.output(manifest.details["shards"][0])
    columns = decode_arrow(store.read_bytes(record.path), record.url)
    ids, logprobs = (columns[name].reshape(-1, seq_len, k) for name in ("topk_ids", "topk_logprobs"))
    rows = load_split(store, prepared, "train")[: len(ids)]
    model = load_causal_lm(teacher_model_dir(store, taught))
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(model(input_ids=torch.from_numpy(rows)).logits, -1)
    top = teacher_logprobs.topk(k, dim=-1)
    assert np.array_equal(ids.astype(np.int64), top.indices.numpy())
    np.testing.assert_allclose(logprobs.astype(np.float32), top.values.numpy(), atol=2e-2, rtol=1e-3)
    entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1).numpy()
    np.testing.assert_allclose(columns["entropy"].astype(np.float32), entropy, atol=2e-2, rtol=1e-3)


def test_killed_job_resumes_to_a_byte_identical_cache(trained):
    config, store, prepared, taught = trained
    complete = cache(config.cache, prepared, taught, store, config.compute)
    shard_names = complete.details["shards"]
    assert len(shard_names) >= 6
    original = {name: store.read_bytes(complete.output(name).path) for name in shard_names}

    # The state a killed attempt leaves behind.
    path = lambda name: f"{complete.folder}/{name}"  # noqa: E731
    store.delete(f"{complete.folder}/manifest.json")
    for name in shard_names[-2:]:  # never written
        store.delete(path(name))
        store.delete(path(name) + COMMIT_SUFFIX)
    store.delete(path(shard_names[0]) + COMMIT_SUFFIX)  # written, killed before its commit record
    store.write_bytes(path(shard_names[1]), original[shard_names[1]][:100])  # damaged after commit

    resumed = cache(config.cache, prepared, taught, store, config.compute)
    assert not resumed.reused
    assert resumed.metrics["shards_resumed"] == len(shard_names) - 4
    assert resumed.key == complete.key
    for name in shard_names:
        assert store.read_bytes(resumed.output(name).path) == original[name], name
    assert {name: r.sha256 for name, r in resumed.outputs.items()} == {name: r.sha256 for name, r in complete.outputs.items()}


def test_forced_run_recomputes_every_shard(trained):
    config, store, prepared, taught = trained
    first = cache(config.cache, prepared, taught, store, config.compute)
    forced = cache(config.cache, prepared, taught, store, config.compute, force=True)
    assert forced.metrics["shards_resumed"] == 0
    assert forced.outputs == first.outputs


def test_sampled_format_is_deterministic_draws_with_counts(trained):
    config, store, prepared, taught = trained
    sampled_config = config.cache.model_copy(update={"format": "sampled", "num_samples": 12})
    manifest = cache(sampled_config, prepared, taught, store, config.compute)
    assert manifest.details["format"] == "sampled" and manifest.metrics["bytes_per_token"] <= 40
    first_shard = manifest.details["shards"][0]
    record = manifest.output(first_shard)
    columns = decode_arrow(store.read_bytes(record.path), record.url)
    seq_len = prepared.details["seq_len"]
    counts = columns["sample_counts"].reshape(len(columns["entropy"]), seq_len, 12).astype(np.int64)
    ids = columns["sample_ids"].reshape(counts.shape)
    assert (counts.sum(-1) == 12).all()
    assert ids.max() < prepared.details["vocab_size"]
    again = cache(sampled_config, prepared, taught, store, config.compute, force=True)
    assert again.outputs == manifest.outputs  # same seed, same draws, same bytes
    reseeded = cache(sampled_config.model_copy(update={"seed": 1}), prepared, taught, store, config.compute)
    assert reseeded.outputs[first_shard].sha256 != record.sha256
