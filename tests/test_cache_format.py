"""The cache's bit-packed, quantized columns: exact packing, bounded quantization, exact normalisation.

Run: .venv/bin/python -m pytest tests/test_cache_format.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_core.cache.format import FORMAT_VERSION, CacheLayout, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [1, 3, 8, 11, 15, 23, 32, 41, 56])
@pytest.mark.parametrize("count", [1, 7, 8, 13, 64])
def test_pack_then_unpack_returns_the_values(bits, count):
    rng = np.random.default_rng(bits * 100 + count)
    values = rng.integers(0, 2**bits, size=(5, count), dtype=np.uint64)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, -(-count // 8) * bits)
    assert np.array_equal(unpack_bits(packed, bits, count), values)


def test_packing_is_msb_first_and_rows_are_independent():
    packed = pack_bits(np.array([[5, 3, 1], [7, 0, 2]], np.uint64), 3)  # 101 011 001 + zero padding
    assert packed[0].tolist() == [0b10101100, 0b10000000, 0]
    assert unpack_bits(packed[1:], 3, 3).tolist() == [[7, 0, 2]]


def test_unpack_rejects_data_of_the_wrong_size():
    with pytest.raises(ValueError, match="packed data holds 3 bytes"):
        unpack_bits(np.zeros((1, 3), np.uint8), 11, 8)
    with pytest.raises(ValueError, match="bits must be in"):
        pack_bits(np.zeros((1, 1), np.uint64), 60)


def _layout(**overrides):
    settings = dict(format="topk", seq_len=6, vocab_size=2048, slots=16, logprob_bits=12, logprob_floor=-24.0, tail=True)
    return CacheLayout(**(settings | overrides))


def _teacher_logprobs(rows=3, seq_len=6, vocab=2048, seed=0):
    logits = torch.randn(rows, seq_len, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return torch.log_softmax(logits, -1)


def test_topk_entry_is_ceil_log2_vocab_id_bits_plus_the_logprob_bits():
    layout = _layout()
    assert (layout.id_bits, layout.entry_bits) == (11, 23)
    columns = layout.encode(_teacher_logprobs(), torch.Generator(), {})
    assert columns["topk_packed"].shape == (3, 6 * 16 * 23 // 8)  # 2.875 bytes per kept entry
    assert columns["tail_logprob"].dtype == np.float16 and columns["entropy"].dtype == np.float16
    assert _layout(vocab_size=2049).id_bits == 12 and _layout(vocab_size=151936).id_bits == 18


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_quantized_logprobs_are_within_half_a_step_without_the_tail(bits):
    layout = _layout(logprob_bits=bits, tail=False)
    logprobs = _teacher_logprobs()
    targets = layout.decode(layout.encode(logprobs, torch.Generator(), {}))
    top = logprobs.topk(16, dim=-1)
    assert np.array_equal(targets["teacher_topk_ids"], top.indices.numpy())
    step = 24 / ((1 << bits) - 1)
    error = np.abs(targets["teacher_topk_logprobs"] - top.values.numpy())
    assert error.max() <= step / 2 + 1e-6
    assert error.max() > step / 20  # it is quantized: the decoder did not get float values


def test_logprobs_below_the_floor_are_stored_at_the_floor():
    layout = _layout(slots=4, tail=False, vocab_size=8, seq_len=1)
    logprobs = torch.tensor([[[-0.01, -5.0, -30.0, -40.0, -50.0, -60.0, -70.0, -80.0]]])
    targets = layout.decode(layout.encode(logprobs, torch.Generator(), {}))
    np.testing.assert_allclose(targets["teacher_topk_logprobs"][0, 0], [-0.01, -5.0, -24.0, -24.0], atol=24 / 4095)


def test_stored_tail_makes_head_and_tail_sum_to_one_exactly():
    layout = _layout(logprob_bits=8)  # coarse steps: a large drift to undo
    logprobs = _teacher_logprobs()
    columns = layout.encode(logprobs, torch.Generator(), {})
    targets = layout.decode(columns)
    total = np.exp(targets["teacher_topk_logprobs"]).sum(-1) + np.exp(columns["tail_logprob"].astype(np.float32))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    true_tail = 1 - logprobs.topk(16, dim=-1).values.exp().sum(-1).numpy()
    np.testing.assert_allclose(np.exp(columns["tail_logprob"].astype(np.float32)), true_tail, rtol=2e-3)


def test_sampled_entries_pack_ids_with_counts():
    layout = _layout(format="sampled", slots=12, tail=False)
    assert (layout.count_bits, layout.entry_bits) == (4, 15)
    logprobs = _teacher_logprobs()
    columns = layout.encode(logprobs, torch.Generator().manual_seed(3), {})
    targets = layout.decode(columns)
    assert (targets["teacher_sample_counts"].sum(-1) == 12).all()
    # The same draws, packed: the columns hold exactly what draw_teacher_samples gives for that seed.
    from kd_core.losses.sampled import draw_teacher_samples

    ids, counts = draw_teacher_samples(logprobs, 12, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(targets["teacher_sample_ids"], ids.numpy()) and np.array_equal(targets["teacher_sample_counts"], counts.numpy())


def test_full_format_decodes_to_logits_for_any_loss_temperature():
    logits = torch.randn(2, 6, 50)
    cache_temperature = 2.0
    layout = _layout(format="full", vocab_size=50, slots=50, tail=False, temperature=cache_temperature)
    columns = layout.encode(torch.log_softmax(logits / cache_temperature, -1), torch.Generator(), {})
    decoded = torch.from_numpy(layout.decode(columns)["teacher_logits"])
    for loss_temperature in (0.5, 1.0, 3.0):
        expected = torch.softmax(logits / loss_temperature, -1)
        torch.testing.assert_close(torch.softmax(decoded / loss_temperature, -1), expected, atol=3e-3, rtol=0)


def test_layout_round_trips_and_refuses_another_format_version():
    layout = _layout(hidden_layers=(0, 2), hidden_size=8)
    assert CacheLayout.from_dict(layout.to_dict()) == layout
    old = layout.to_dict() | {"version": FORMAT_VERSION - 1}
    with pytest.raises(ValueError, match="rerun the cache stage with --force"):
        CacheLayout.from_dict(old)
