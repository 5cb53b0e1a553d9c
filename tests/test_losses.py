"""The losses the spine trains with: top-k KL and the combined objective.

Checked against naive references written out here (full-vocabulary KL by the definition), on odd
shapes, with masks, for float32 and bfloat16 inputs. Run: .venv/bin/python -m pytest tests/test_losses.py
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from kd_core.config import ConfigError, LossConfig, RewardLossConfig
from kd_core.job import validate_config
from kd_core.losses import (
    DIVERGENCES,
    DistillationObjective,
    RewardObjective,
    TeacherTargets,
    draw_teacher_samples,
    generalized_jsd,
    hidden_cosine,
    next_token_cross_entropy,
    sampled_kl,
    topk_kl,
)
from kd_core.losses.targets import BATCH_KEYS, batch_keys


def reference_forward_kl(student_logits, teacher_logits, temperature, mask):
    """KL(p_t || p_s) per position by the definition, float64, then the masked mean."""
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    per_position = (p * (log_p - log_q)).sum(-1)
    weights = mask.double()
    return (per_position * weights).sum() / weights.sum()


def reference_tail_kl(student_logits, teacher_logits, k, mask):
    """KL over the k+1 outcomes {teacher's top-k ids, everything else}, float64, masked mean."""
    p = torch.softmax(teacher_logits.double(), -1)
    q = torch.softmax(student_logits.double(), -1)
    ids = p.topk(k, dim=-1).indices
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_all = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_all = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    per_position = (p_all * (p_all.log() - q_all.log())).sum(-1)
    return (per_position * mask.double()).sum() / mask.double().sum()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("temperature,tail", [(1.0, True), (1.0, False), (2.5, False)])
def test_topk_with_k_equal_v_is_forward_kl(dtype, tolerance, temperature, tail):
    generator = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 47, 123
    student = torch.randn(batch, length, vocab, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(batch, length, vocab, generator=generator) * 2
    mask = torch.rand(batch, length, generator=generator) > 0.3
    top = torch.log_softmax(teacher, -1).topk(vocab, dim=-1)

    loss = topk_kl(student, top.values, top.indices, temperature=temperature, mask=mask, tail=tail)
    (gradient,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().double().requires_grad_()
    reference = reference_forward_kl(reference_student, teacher.to(dtype), temperature, mask)
    (reference_gradient,) = torch.autograd.grad(reference, reference_student)

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(gradient.double(), reference_gradient, rtol=tolerance, atol=tolerance * 1e-2)
    assert gradient[~mask].abs().max() == 0  # masked positions never count


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_tail_bucket_matches_the_coarsened_reference(dtype, tolerance):
    generator = torch.Generator().manual_seed(1)
    batch, length, vocab, k = 3, 47, 123, 9
    student = torch.randn(batch, length, vocab, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(batch, length, vocab, generator=generator)
    mask = torch.rand(batch, length, generator=generator) > 0.3
    top = torch.log_softmax(teacher, -1).topk(k, dim=-1)

    loss = topk_kl(student, top.values, top.indices, mask=mask)
    (gradient,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().double().requires_grad_()
    reference = reference_tail_kl(reference_student, teacher, k, mask)
    (reference_gradient,) = torch.autograd.grad(reference, reference_student)
    torch.testing.assert_close(loss.double(), reference, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(gradient.double(), reference_gradient, rtol=tolerance, atol=tolerance * 1e-2)


def test_tail_keeps_the_teachers_tail_mass_where_renormalising_does_not():
    # Teacher: 0.3 on token 0, 0.2 on token 1, the remaining 0.5 spread over tokens 2..9.
    teacher_probs = torch.tensor([0.3, 0.2] + [0.5 / 8] * 8)
    top = teacher_probs.log().topk(2)
    student = torch.zeros(1, 10, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=2.0)
    for _ in range(500):
        optimizer.zero_grad()
        topk_kl(student, top.values[None], top.indices[None]).backward()
        optimizer.step()
    learned = torch.softmax(student.detach(), -1)[0]
    torch.testing.assert_close(learned[:2], torch.tensor([0.3, 0.2]), atol=1e-3, rtol=0)
    assert learned[2:].sum() == pytest.approx(0.5, abs=1e-3)
    # Renormalised over the top 2, the optimum pushes the tail towards 0 instead.
    assert topk_kl(student.detach(), top.values[None], top.indices[None], tail=False) > 0.05


def test_topk_kl_is_zero_when_student_matches_teacher_on_kept_ids():
    logits = torch.randn(5, 50)
    top = torch.log_softmax(logits, -1).topk(50, dim=-1)
    assert topk_kl(logits, top.values, top.indices).abs() < 1e-6
    assert topk_kl(torch.randn(5, 50), top.values, top.indices) > 0
    top8 = torch.log_softmax(logits, -1).topk(8, dim=-1)
    assert topk_kl(logits, top8.values, top8.indices).abs() < 1e-6  # with the tail, exact for any k


def test_all_masked_gives_zero_and_zero_gradient():
    student = torch.randn(2, 7, 11, requires_grad=True)
    top = torch.log_softmax(torch.randn(2, 7, 11), -1).topk(4, dim=-1)
    loss = topk_kl(student, top.values, top.indices, mask=torch.zeros(2, 7, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert student.grad.abs().max() == 0


def test_minus_infinity_teacher_entries_contribute_nothing():
    student = torch.randn(4, 9)
    ids = torch.tensor([[0, 1, 2]] * 4)
    finite = torch.log_softmax(torch.tensor([[1.0, 0.5, -1.0]] * 4), -1)
    padded_ids = torch.cat([ids, torch.tensor([[8]] * 4)], dim=1)
    padded = torch.cat([finite, torch.full((4, 1), float("-inf"))], dim=1)
    assert torch.isfinite(topk_kl(student, padded, padded_ids))
    torch.testing.assert_close(topk_kl(student, padded, padded_ids), topk_kl(student, finite, ids))


def test_pinned_value():
    # teacher keeps ids {0, 1} with probs (0.75, 0.25); student uniform over 4 tokens:
    # KL = 0.75 ln(0.75 / 0.25) + 0.25 ln(0.25 / 0.25) = 0.75 ln 3
    teacher_logprobs = torch.log(torch.tensor([[0.75, 0.25]]))
    loss = topk_kl(torch.zeros(1, 4), teacher_logprobs, torch.tensor([[0, 1]]), tail=False)
    assert loss.item() == pytest.approx(0.75 * torch.log(torch.tensor(3.0)).item(), rel=1e-6)
    # With the tail: teacher (0.6, 0.2 | tail 0.2) vs uniform student (0.25, 0.25 | 0.5).
    with_tail = topk_kl(torch.zeros(1, 4), torch.log(torch.tensor([[0.6, 0.2]])), torch.tensor([[0, 1]]))
    expected = 0.6 * math.log(0.6 / 0.25) + 0.2 * math.log(0.2 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert with_tail.item() == pytest.approx(expected, rel=1e-5)


def test_objective_weights_and_temperature_scaling():
    logits = torch.randn(2, 6, 13)
    input_ids = torch.randint(0, 13, (2, 6))
    top = torch.log_softmax(torch.randn(2, 6, 13), -1).topk(5, dim=-1)
    ce = next_token_cross_entropy(logits, input_ids)

    kd = topk_kl(logits, top.values, top.indices, temperature=2.0, tail=False)

    targets = TeacherTargets(topk_logprobs=top.values, topk_ids=top.indices)
    objective = DistillationObjective(ce_weight=0.7, kd_weight=0.3, temperature=2.0, topk_tail=False)
    terms = objective(logits, input_ids, targets)
    torch.testing.assert_close(terms["loss"], 0.7 * ce + 0.3 * 4.0 * kd)
    torch.testing.assert_close(terms["kd"], kd)
    unscaled = DistillationObjective(0.7, 0.3, 2.0, scale_by_temperature_squared=False, topk_tail=False)(logits, input_ids, targets)
    torch.testing.assert_close(unscaled["loss"], 0.7 * ce + 0.3 * kd)
    ce_only = DistillationObjective(ce_weight=1.0, kd_weight=0.0)(logits, input_ids, targets)
    torch.testing.assert_close(ce_only["loss"], ce)
    assert "kd" not in ce_only
    # The weights are independent: no hidden (1 - w) on the other term.
    kd_only = DistillationObjective(ce_weight=0.0, kd_weight=1.0, topk_tail=False, temperature=2.0)
    torch.testing.assert_close(kd_only(logits, input_ids, targets)["loss"], 4.0 * kd)


def test_objective_with_full_teacher_logits_uses_the_chosen_divergence():
    logits, teacher = torch.randn(2, 6, 13), torch.randn(2, 6, 13)
    input_ids = torch.randint(0, 13, (2, 6))
    objective = DistillationObjective(ce_weight=0.0, kd_weight=1.0, divergence="generalized_jsd", divergence_parameter=0.3)
    expected = generalized_jsd(logits, teacher, beta=0.3)
    torch.testing.assert_close(objective(logits, input_ids, TeacherTargets(logits=teacher))["kd"], expected)
    with pytest.raises(ValueError, match="divergence must be one of"):
        DistillationObjective(divergence="wasserstein")


def test_objective_with_sampled_targets_is_sampled_kl():
    logits, teacher = torch.randn(2, 6, 13), torch.randn(2, 6, 13)
    input_ids = torch.randint(0, 13, (2, 6))
    ids, counts = draw_teacher_samples(teacher, 12, generator=torch.Generator().manual_seed(0))
    terms = DistillationObjective(ce_weight=0.5, kd_weight=2.0)(logits, input_ids, TeacherTargets(sample_ids=ids, sample_counts=counts))
    torch.testing.assert_close(terms["kd"], sampled_kl(logits, ids, counts))
    torch.testing.assert_close(terms["loss"], 0.5 * terms["ce"] + 2.0 * terms["kd"])


def test_teacher_confidence_weighting_favours_confident_positions():
    vocab = 8
    logits = torch.zeros(1, 3, vocab)  # uniform student
    confident = torch.log(torch.tensor([0.93] + [0.01] * 7))
    unsure = torch.full((vocab,), -math.log(vocab))
    teacher_logprobs = torch.stack([confident, unsure, unsure])[None]
    top = teacher_logprobs.topk(vocab, dim=-1)
    entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1)
    weighted = DistillationObjective(kd_weight=1.0, token_weighting="teacher_confidence")
    plain = DistillationObjective(kd_weight=1.0)
    input_ids = torch.zeros(1, 3, dtype=torch.long)
    targets = TeacherTargets(topk_logprobs=top.values, topk_ids=top.indices)
    kd_weighted = weighted(logits, input_ids, TeacherTargets(topk_logprobs=top.values, topk_ids=top.indices, entropy=entropy))["kd"]
    kd_plain = plain(logits, input_ids, targets)["kd"]
    # Only the confident position has a non-zero KL, and only it keeps a non-zero weight: 3x the plain mean.
    torch.testing.assert_close(kd_weighted, 3 * kd_plain)
    with pytest.raises(ValueError, match="needs teacher_entropy"):
        weighted(logits, input_ids, targets)


def test_balancing_matches_term_magnitudes():
    logits = torch.randn(2, 6, 13)
    input_ids = torch.randint(0, 13, (2, 6))
    top = torch.log_softmax(torch.randn(2, 6, 13) * 5, -1).topk(13, dim=-1)
    objective = DistillationObjective(ce_weight=1.0, kd_weight=1.0, balance_terms=True)
    terms = objective(logits, input_ids, TeacherTargets(topk_logprobs=top.values, topk_ids=top.indices))
    # First step: the running magnitudes are this step's, so the balanced KD term equals CE.
    torch.testing.assert_close(terms["loss"], 2 * terms["ce"])
    assert objective.running_magnitudes[1] == terms["kd"].detach()


def test_cross_entropy_predicts_the_next_token():
    vocab = 5
    input_ids = torch.tensor([[1, 2, 3, 4]])
    perfect = torch.full((1, 4, vocab), -1e4)
    for position in range(3):
        perfect[0, position, input_ids[0, position + 1]] = 1e4
    assert next_token_cross_entropy(perfect, input_ids).item() == pytest.approx(0.0, abs=1e-4)
    assert next_token_cross_entropy(torch.zeros(1, 4, vocab), input_ids).item() == pytest.approx(torch.log(torch.tensor(5.0)).item())


@pytest.mark.parametrize("balance_terms", [False, True], ids=["one-pass", "balanced"])
@pytest.mark.parametrize("targets", ["topk", "sampled", "dense"])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_fused_objective_matches_the_unfused_objective_in_value_and_gradient(targets, chunk_size, balance_terms):
    torch.manual_seed(0)
    batch, length, width, vocab = 3, 7, 10, 13
    hidden = torch.randn(batch, length, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    input_ids = torch.randint(0, vocab, (batch, length))
    mask = torch.rand(batch, length) > 0.3
    teacher = torch.randn(batch, length, vocab) * 2
    top = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    entropy = -(torch.softmax(teacher, -1) * torch.log_softmax(teacher, -1)).sum(-1)
    ids, counts = draw_teacher_samples(teacher, 6, generator=torch.Generator().manual_seed(1))
    given = {
        "topk": {"topk_logprobs": top.values, "topk_ids": top.indices},
        "sampled": {"sample_ids": ids, "sample_counts": counts},
        "dense": {"logits": teacher},
    }[targets]
    teacher_targets = TeacherTargets(entropy=entropy, mask=mask, **given)
    options = dict(ce_weight=0.4, kd_weight=0.9, temperature=2.0, token_weighting="teacher_confidence", divergence="generalized_jsd",
                   balance_terms=balance_terms)
    unfused = DistillationObjective(**options)(hidden @ weight.T, input_ids, teacher_targets)
    expected = [g.clone() for g in torch.autograd.grad(unfused["loss"], (hidden, weight))]
    fused = DistillationObjective(**options).fused(hidden, weight, input_ids, teacher_targets, chunk_size=chunk_size)
    for term in ("ce", "kd", "loss"):
        torch.testing.assert_close(fused[term], unfused[term], rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused["loss"], (hidden, weight)), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_teacher_targets_from_a_batch_with_every_key_fill_every_field():
    """`from_batch` reads exactly the keys the training stream (`CacheLayout.decode`) and the
    online teacher put in a batch; the other columns are not targets."""
    batch = {name: torch.full((2,), float(index)) for index, name in enumerate(batch_keys(hidden_layers=(0, 3)))}
    batch |= {"input_ids": torch.zeros(2, 4, dtype=torch.long), "human_label": torch.ones(2, 1)}
    targets = TeacherTargets.from_batch(batch)
    for key, field_name in BATCH_KEYS.items():
        assert getattr(targets, field_name) is batch[key]
    assert targets.hidden == {0: batch["teacher_hidden_0"], 3: batch["teacher_hidden_3"]}
    filled = {field.name for field in dataclasses.fields(TeacherTargets) if getattr(targets, field.name) is not None}
    assert filled == {field.name for field in dataclasses.fields(TeacherTargets)} - {"mask"}  # a batch carries no mask
    assert targets.has_token_targets() and targets.has_rewards()
    nothing = TeacherTargets.from_batch({"input_ids": batch["input_ids"]})
    assert all(getattr(nothing, field.name) is None for field in dataclasses.fields(TeacherTargets) if field.name != "hidden")
    assert not TeacherTargets().has_token_targets() and TeacherTargets().hidden == {}
    moved = dataclasses.replace(targets, mask=torch.ones(2, dtype=torch.bool)).to("cpu")
    assert torch.equal(moved.logits, targets.logits) and moved.hidden.keys() == {0, 3} and moved.mask.all()
    with pytest.raises(ValueError, match="'teacher_logprobs' is not a teacher target"):
        TeacherTargets.from_batch({"teacher_logprobs": torch.zeros(1)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        targets.logits = None


@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_an_all_masked_batch_with_targets_gives_zero_loss(kind):
    batch, length, width, vocab = 2, 5, 6, 11
    hidden = torch.randn(batch, length, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    input_ids = torch.randint(0, vocab, (batch, length))
    teacher = torch.randn(batch, length, vocab)
    top = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    ids, counts = draw_teacher_samples(teacher, 6, generator=torch.Generator().manual_seed(0))
    given = {"topk": {"topk_logprobs": top.values, "topk_ids": top.indices}, "sampled": {"sample_ids": ids, "sample_counts": counts},
             "dense": {"logits": teacher}}[kind]
    entropy = -(torch.softmax(teacher, -1) * torch.log_softmax(teacher, -1)).sum(-1)
    targets = TeacherTargets(entropy=entropy, mask=torch.zeros(batch, length, dtype=torch.bool), **given)
    objective = DistillationObjective(ce_weight=0.5, kd_weight=0.5, token_weighting="teacher_confidence")
    for terms in (objective(hidden @ weight.T, input_ids, targets), objective.fused(hidden, weight, input_ids, targets, chunk_size=3)):
        assert set(terms) == {"loss", "ce", "kd"}
        for value in terms.values():
            assert value.item() == 0.0
        assert all(torch.isfinite(gradient).all() for gradient in torch.autograd.grad(terms["loss"], (hidden, weight)))


def test_objectives_from_config_take_every_field_of_their_section():
    """`from_config` passes each `distill.loss` / `distill.reward` field by name: one added to the
    section and not to the objective fails here."""
    loss = LossConfig(temperature=2.0, divergence="skew_reverse_kl", divergence_parameter=0.2, topk_tail=False, ce_weight=0.1,
                      kd_weight=0.7, scale_by_temperature_squared=False, token_weighting="teacher_confidence", balance_terms=True,
                      balance_momentum=0.5, feature_weight=0.3, feature_layers=[(1, 2)], feature_kind="cosine")
    parameters = set(inspect.signature(DistillationObjective).parameters) - {"student_hidden_size", "teacher_hidden_size"}
    assert parameters == set(LossConfig.model_fields) - {"fused", "fused_chunk_size"}  # those choose forward or fused
    objective = DistillationObjective.from_config(loss, student_hidden_size=8, teacher_hidden_size=12)
    assert (objective.ce_weight, objective.kd_weight, objective.temperature, objective.kd_scale) == (0.1, 0.7, 2.0, 1.0)
    assert objective.dense_divergence.func is DIVERGENCES["skew_reverse_kl"].per_position
    assert objective.dense_divergence.keywords == {"alpha": 0.2}
    assert (objective.topk_tail, objective.token_weighting, objective.balance_terms, objective.balance_momentum) == (
        False, "teacher_confidence", True, 0.5
    )
    assert objective.feature_weight == 0.3 and objective.features.layer_map == [(1, 2)]
    assert objective.features.loss is hidden_cosine and objective.features.projections[0].weight.shape == (12, 8)

    reward = RewardLossConfig(pointwise_weight=0.25, pairwise_weight=0.5, temperature=3.0, bradley_terry_weight=2.0)
    assert set(inspect.signature(RewardObjective).parameters) == set(RewardLossConfig.model_fields)
    from_config = RewardObjective.from_config(reward)
    assert from_config.weights == {"pointwise": 0.25, "pairwise": 0.5, "bt": 2.0} and from_config.temperature == 3.0


def test_the_configured_divergence_is_one_of_the_registry():
    for name in DIVERGENCES:
        assert LossConfig(divergence=name).divergence == name
    message = str(pytest.raises(ConfigError, validate_config, {"distill": {"loss": {"divergence": "wasserstein"}}}).value)
    assert f"distill.loss.divergence: must be one of {', '.join(map(repr, DIVERGENCES))}, got 'wasserstein'" in message
