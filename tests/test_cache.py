"""The cache stage: top-k targets aligned with the token shards, and resuming a killed job.

A killed job leaves the state checked here: no manifest, some shards finished with their commit
records, some never written, one written but not committed, one damaged. The rerun must keep
exactly the good shards and end byte-identical to an uninterrupted run.
Run: .venv/bin/python -m pytest tests/test_cache.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.train.inference import COMMIT_SUFFIX
from kd_core.stages.cache import cache
from kd_core.cache import cache_shards
from kd_core.cache.format import CacheLayout
from kd_core.job import load_config
from kd_core.stages.prep import prep
from kd_core.data.shards import decode_arrow, load_split
from kd_core.models import load_causal_lm
from kd_core.storage import Store
from kd_core.stages.teacher import teacher
from kd_core.models.teacher import teacher_model_dir

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


def _decoded_shard(store, manifest, index=0):
    record = cache_shards(manifest)[index]
    return CacheLayout.from_dict(manifest.details["layout"]).decode(decode_arrow(store.read_bytes(record.path), record.url))


def _teacher_logprobs(store, prepared, taught, rows):
    model = load_causal_lm(teacher_model_dir(store, taught))
    tokens = torch.from_numpy(load_split(store, prepared, "train")[:rows])
    with torch.no_grad():
        out = model(input_ids=tokens, output_hidden_states=True)
    return torch.log_softmax(out.logits, -1), out.hidden_states


@pytest.mark.slow
def test_topk_targets_are_the_teachers_distribution_within_the_quantization_step(trained):
    config, store, prepared, taught = trained
    manifest = cache(config.cache, prepared, taught, store, config.compute)
    layout = CacheLayout.from_dict(manifest.details["layout"])
    assert (layout.format, layout.slots, layout.tail) == ("topk", config.cache.top_k, True)
    assert [shard["rows"] for shard in manifest.details["shards"]] == [64] * len(manifest.details["shards"][:-1]) + [
        manifest.details["shards"][-1]["rows"]
    ]
    targets = _decoded_shard(store, manifest)
    teacher_logprobs, _ = _teacher_logprobs(store, prepared, taught, len(targets["teacher_entropy"]))
    top = teacher_logprobs.topk(config.cache.top_k, dim=-1)
    assert np.array_equal(targets["teacher_topk_ids"], top.indices.numpy())
    # 12-bit fixed point over 24 nats, then the shift that makes head + tail sum to 1: within ~1.5 steps.
    step = 24 / 4095
    np.testing.assert_allclose(targets["teacher_topk_logprobs"], top.values.numpy(), atol=1.5 * step)
    head = np.exp(targets["teacher_topk_logprobs"]).sum(-1)
    true_tail = 1 - top.values.exp().sum(-1).numpy()
    np.testing.assert_allclose(1 - head, true_tail, atol=2e-3)
    entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1).numpy()
    np.testing.assert_allclose(targets["teacher_entropy"], entropy, atol=2e-2, rtol=1e-3)


def test_full_format_keeps_every_logprob_and_hidden_states_are_stored(trained):
    config, store, prepared, taught = trained
    full = config.cache.model_copy(update={"format": "full", "hidden_layers": [0, 1]})
    manifest = cache(full, prepared, taught, store, config.compute)
    targets = _decoded_shard(store, manifest)
    rows = len(targets["teacher_entropy"])
    teacher_logprobs, hidden = _teacher_logprobs(store, prepared, taught, rows)
    np.testing.assert_allclose(targets["teacher_logits"], teacher_logprobs.numpy(), atol=1e-2, rtol=1e-3)
    for layer in (0, 1):
        np.testing.assert_allclose(targets[f"teacher_hidden_{layer}"], hidden[layer].numpy(), atol=1e-2, rtol=1e-3)
    vocab = prepared.details["vocab_size"]
    assert manifest.metrics["bytes_per_token"] > 2 * vocab  # float16 per vocabulary entry: only for small vocabularies


def test_killed_job_resumes_to_a_byte_identical_cache(trained):
    config, store, prepared, taught = trained
    complete = cache(config.cache, prepared, taught, store, config.compute)
    shard_names = [shard["name"] for shard in complete.details["shards"]]
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
    targets = _decoded_shard(store, manifest)
    counts, ids = targets["teacher_sample_counts"], targets["teacher_sample_ids"]
    assert counts.shape[-1] == 12 and (counts.sum(-1) == 12).all()
    assert ids.max() < prepared.details["vocab_size"]
    filled = counts > 0
    assert all(len(set(row[mask])) == mask.sum() for row, mask in zip(ids.reshape(-1, 12), filled.reshape(-1, 12)))  # unique ids
    first = cache_shards(manifest)[0]
    again = cache(sampled_config, prepared, taught, store, config.compute, force=True)
    assert again.outputs == manifest.outputs  # same seed, same draws, same bytes
    reseeded = cache(sampled_config.model_copy(update={"seed": 1}), prepared, taught, store, config.compute)
    assert cache_shards(reseeded)[0].sha256 != first.sha256


def _distill(config, store, prepared, targets, **changes):
    from kd_core.stages.distill import distill

    section = config.distill.model_copy(update={"train": config.distill.train.model_copy(update={"log_every": 1, "max_steps": 3})})
    loss_changes = {name: value for name, value in changes.items() if name in ("fused", "fused_chunk_size")}
    section = section.model_copy(update={"loss": changes.pop("loss", section.loss).model_copy(update=loss_changes)})
    section = section.model_copy(update={name: value for name, value in changes.items() if name not in loss_changes})
    return distill(section, config.student, prepared, targets, store, config.compute)


def test_students_train_from_each_cache_format_online_and_with_the_fused_loss(trained):
    config, store, prepared, taught = trained
    topk = cache(config.cache, prepared, taught, store, config.compute)
    sampled = cache(config.cache.model_copy(update={"format": "sampled"}), prepared, taught, store, config.compute)
    histories = {
        "topk": _distill(config, store, prepared, topk),
        "topk fused": _distill(config, store, prepared, topk, fused=True, fused_chunk_size=37),
        "sampled fused": _distill(config, store, prepared, sampled, fused=True),
        "online": _distill(config, store, prepared, taught, teacher_source="online"),
    }
    first_steps = {}
    for name, manifest in histories.items():
        records = [json.loads(line) for line in store.read_bytes(f"{manifest.folder}/history.jsonl").decode().splitlines()]
        assert len(records) == 3 and all(record["kd"] > 0 for record in records), name
        first_steps[name] = records[0]
    # Same data, same initial student: the fused loss is the unfused loss.
    assert first_steps["topk fused"]["loss"] == pytest.approx(first_steps["topk"]["loss"], rel=1e-5)
    # Full online logits and a top-k cache are different targets for the same student.
    assert first_steps["online"]["kd"] != pytest.approx(first_steps["topk"]["kd"], rel=1e-3)
    assert len({manifest.key for manifest in histories.values()}) == 4
    with pytest.raises(ValueError, match="needs the teacher step's output, got cache's"):
        _distill(config, store, prepared, topk, teacher_source="online")


def test_student_matches_cached_teacher_hidden_states_through_a_learned_projection(trained):
    config, store, prepared, taught = trained
    with_hidden = cache(config.cache.model_copy(update={"hidden_layers": [1]}), prepared, taught, store, config.compute)
    assert with_hidden.details["layout"]["hidden_size"] == config.teacher.architecture.hidden_size
    manifest = _distill(config, store, prepared, with_hidden, loss=config.distill.loss.model_copy(update={"feature_weight": 1.0, "feature_layers": [(1, 1)]}))
    records = [json.loads(line) for line in store.read_bytes(f"{manifest.folder}/history.jsonl").decode().splitlines()]
    assert all(record["feature"] > 0 for record in records)
    assert records[-1]["feature"] < records[0]["feature"]  # the student and its projection learn to match
    online = _distill(
        config, store, prepared, taught, teacher_source="online",
        loss=config.distill.loss.model_copy(update={"feature_weight": 1.0, "feature_layers": [(1, 1)]}),
    )
    online_first = json.loads(store.read_bytes(f"{online.folder}/history.jsonl").decode().splitlines()[0])
    assert online_first["feature"] == pytest.approx(records[0]["feature"], rel=2e-3)  # cached (float16) = online states


def test_a_teacher_with_a_padded_output_layer_caches_only_real_tokens(trained, tmp_path):
    config, store, prepared, taught = trained
    from kd_core.stages.teacher import teacher as teacher_step

    vocab = prepared.details["vocab_size"]
    model = load_causal_lm(teacher_model_dir(store, taught))
    model.resize_token_embeddings(vocab + 20)  # as Qwen-style models pad their output layer
    with torch.no_grad():
        model.get_output_embeddings().weight[vocab:] = 50 * model.get_output_embeddings().weight[:20]  # loud padding
    padded_dir = tmp_path / "padded-teacher"
    model.save_pretrained(padded_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (padded_dir / name).write_bytes((teacher_model_dir(store, taught) / name).read_bytes())
    padded = teacher_step(config.teacher.model_copy(update={"path": str(padded_dir)}), prepared, store, config.compute)
    for format_ in ("topk", "sampled"):
        manifest = cache(config.cache.model_copy(update={"format": format_}), prepared, padded, store, config.compute)
        assert manifest.details["layout"]["vocab_size"] == vocab
        targets = _decoded_shard(store, manifest)
        ids = targets["teacher_topk_ids" if format_ == "topk" else "teacher_sample_ids"]
        assert ids.max() < vocab
    rows = torch.from_numpy(load_split(store, prepared, "train")[: len(ids)])
    with torch.no_grad():
        real = torch.log_softmax(model(input_ids=rows).logits[..., :vocab], -1)
    topk = _decoded_shard(store, cache(config.cache, prepared, padded, store, config.compute))
    assert np.array_equal(topk["teacher_topk_ids"], real.topk(config.cache.top_k, dim=-1).indices.numpy())


@torch.no_grad()
def full_materialisation_columns(model, rows: np.ndarray, layout: CacheLayout, batch_size: int, generator: torch.Generator) -> dict:
    """The reference: a cache shard's columns as the cache computed them before its output layer
    was chunked, each batch's logits and float32 log-softmax (rows, T, V) whole, then encoded."""
    blocks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(rows), batch_size):
        batch = torch.as_tensor(rows[start : start + batch_size], dtype=torch.long)
        output = model(input_ids=batch, output_hidden_states=bool(layout.hidden_layers))
        teacher_logprobs = torch.log_softmax(output.logits[..., : layout.vocab_size].float() / layout.temperature, dim=-1)
        hidden = {layer: output.hidden_states[layer] for layer in layout.hidden_layers}
        for name, values in layout.encode(teacher_logprobs, generator, hidden).items():
            blocks.setdefault(name, []).append(values)
    return {name: np.concatenate(parts) for name, parts in blocks.items()}


def wide_vocabulary_teacher(vocab_size=4096, seq_len=64):
    """A random one-layer teacher whose logits dwarf its activations (V = 4096, H = 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=seq_len)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("cache_format", ["topk", "sampled", "full"])
def test_the_chunked_output_layer_gives_the_bytes_of_the_whole_batch_at_once(trained, cache_format):
    from kd_core.models.inference import CausalLMTeacher

    config, store, prepared, taught = trained
    model = load_causal_lm(teacher_model_dir(store, taught))
    rows = load_split(store, prepared, "train")[:40]  # batches of 16, 16 and 8 rows of 32 tokens
    section = config.cache.model_copy(update={"format": cache_format, "hidden_layers": [0, 1] if cache_format == "full" else []})
    layout = CacheLayout.from_config(section, prepared.details["seq_len"], prepared.details["vocab_size"], hidden_size=32)
    expected = full_materialisation_columns(model, rows, layout, 16, torch.Generator().manual_seed(7))
    for positions in (64, 192, None):  # 192 leaves a remainder of 128 positions per batch; None: all at once here
        teacher = CausalLMTeacher(model, layout, positions_per_chunk=positions)
        assert teacher.output_layer is model.lm_head  # a Llama's logits are its output layer on its body
        columns = teacher.columns(rows, 16, torch.Generator().manual_seed(7))
        assert columns.keys() == expected.keys()
        for name in expected:
            assert np.array_equal(columns[name], expected[name]), (cache_format, positions, name)


def test_the_cache_never_holds_a_batch_of_float32_logits():
    from kd_core.models.inference import CausalLMTeacher
    from kd_core.devtools import tensor_bytes

    model = wide_vocabulary_teacher()
    rows = torch.randint(0, 4096, (16, 64), generator=torch.Generator().manual_seed(0)).numpy()
    layout = CacheLayout(format="topk", seq_len=64, vocab_size=4096, slots=8, tail=True)
    batch_logits_bytes = 16 * 64 * 4096 * 4  # 16 MiB: one float32 (batch, T, V) tensor
    with tensor_bytes() as whole:
        expected = full_materialisation_columns(model, rows, layout, 16, torch.Generator())
    with tensor_bytes() as chunked:
        columns = CausalLMTeacher(model, layout, positions_per_chunk=64).columns(rows, 16, torch.Generator())
    assert whole.peak >= 2 * batch_logits_bytes  # the meter sees the logits and their log-softmax
    # 64 of the batch's 1024 positions at a time: at most a chunk's log-probs and the temporaries
    # of its tail and entropy (about 4 chunks of 1 MiB) beside the body's small activations.
    chunk_bytes = 64 * 4096 * 4
    assert chunked.largest <= chunk_bytes and chunked.peak < 5 * chunk_bytes, (chunked, whole)
    assert all(np.array_equal(columns[name], expected[name]) for name in expected)


def test_a_teacher_whose_forward_reshapes_its_logits_is_cached_from_its_whole_forward_pass():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from kd_core.models.inference import CausalLMTeacher

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=32, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config).eval()  # soft-capped logits: 0.5 · tanh(lm_head(h) / 0.5)
    rows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0)).numpy()
    layout = CacheLayout(format="sampled", seq_len=32, vocab_size=512, slots=12)
    teacher = CausalLMTeacher(model, layout, positions_per_chunk=64)
    assert teacher.output_layer is None
    expected = full_materialisation_columns(model, rows, layout, 4, torch.Generator().manual_seed(1))
    columns = teacher.columns(rows, 4, torch.Generator().manual_seed(1))
    assert all(np.array_equal(columns[name], expected[name]) for name in expected)


def test_a_bf16_teacher_caches_within_bf16_rounding_of_float32(trained):
    """A GPU runs a bf16 checkpoint in bf16 (`teacher_dtype`): its logits are bf16, their softmax
    float32. Here on a CPU, the float32 teacher rounded to bf16 against the float32 reference."""
    from kd_core.models.inference import CausalLMTeacher

    config, store, prepared, taught = trained
    rows = load_split(store, prepared, "train")[:64]
    layout = CacheLayout.from_config(config.cache, prepared.details["seq_len"], prepared.details["vocab_size"])
    exact = layout.decode(full_materialisation_columns(load_causal_lm(teacher_model_dir(store, taught)), rows, layout, 16, torch.Generator()))
    bf16_teacher = CausalLMTeacher(load_causal_lm(teacher_model_dir(store, taught), dtype=torch.bfloat16), layout)
    rounded = layout.decode(bf16_teacher.columns(rows, 16, torch.Generator()))
    same = exact["teacher_topk_ids"] == rounded["teacher_topk_ids"]
    # Measured: every top-1 id and 96.5% of the top-8 ids agree (the rest swap near-ties); the
    # log-probs of agreeing ids within 0.014 nats (mean 0.004), the entropy within 0.004.
    assert same[..., 0].all() and same.mean() > 0.9
    np.testing.assert_allclose(rounded["teacher_topk_logprobs"][same], exact["teacher_topk_logprobs"][same], atol=0.03)
    np.testing.assert_allclose(rounded["teacher_entropy"], exact["teacher_entropy"], atol=0.01)
