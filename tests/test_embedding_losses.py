"""Sentence-embedding distillation losses (kd_core.losses.embedding): values and gradients against
float64 loop references written independently of the module, dtypes, empty batches, the teacher
staying frozen, and the EmbeddingObjective's projection, weighted sum and validation.

Run: .venv/bin/python -m pytest tests/test_embedding_losses.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kd_core.losses.embedding import (
    EmbeddingObjective,
    embedding_cosine,
    embedding_mse,
    soft_contrastive,
    unsupervised_contrastive,
)
from kd_core.losses.matryoshka import matryoshka_distillation
from kd_core.losses.relational import rkd_angle, rkd_distance, similarity_kl


# ------------------------------------------------------------------------------ float64 references
def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (torch.sqrt(sum(x * x for x in a)) * torch.sqrt(sum(y * y for y in b)))


def reference_mse(s, t):
    return sum(sum((s[i, d] - t[i, d]) ** 2 for d in range(s.shape[1])) / s.shape[1] for i in range(len(s))) / len(s)


def reference_cosine(s, t):
    return sum(1 - cos(s[i], t[i]) for i in range(len(s))) / len(s)


def reference_soft_contrastive(s, t, tau):
    n, total = len(s), 0.0
    for i in range(n):
        student_row = torch.stack([torch.exp(cos(s[i], t[j]) / tau) for j in range(n)])
        teacher_row = torch.stack([torch.exp(cos(t[i], t[j]) / tau) for j in range(n)])
        q, p = student_row / student_row.sum(), teacher_row / teacher_row.sum()
        total = total + sum(p[j] * (torch.log(p[j]) - torch.log(q[j])) for j in range(n))
    return total / n


def reference_infonce(a, b, tau):
    n, total = len(a), 0.0
    for i in range(n):
        logits = [cos(a[i], b[j]) / tau for j in range(n)]
        total = total - (logits[i] - torch.log(sum(torch.exp(x) for x in logits)))
    return total / n


def values_and_grads(fn, *inputs):
    """fn(*inputs) and d/d inputs (None for an input not in the graph), inputs copied to leaves."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves, allow_unused=True)


def random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------ plain functions
CASES = [
    ("mse", lambda s, t: embedding_mse(s, t), reference_mse, 7),
    ("cosine", lambda s, t: embedding_cosine(s, t), reference_cosine, 7),
    ("soft_contrastive", lambda s, t: soft_contrastive(s, t, temperature=0.2), lambda s, t: reference_soft_contrastive(s, t, 0.2), 7),
    ("infonce", lambda a, b: unsupervised_contrastive(a, b, temperature=0.3), lambda a, b: reference_infonce(a, b, 0.3), 7),
]


@pytest.mark.parametrize("name,module_fn,reference_fn,teacher_dim", CASES, ids=[c[0] for c in CASES])
def test_value_and_gradients_match_float64_reference(name, module_fn, reference_fn, teacher_dim):
    student, teacher = random(5, 7, seed=1), random(5, teacher_dim, seed=2)
    expected, expected_grads = values_and_grads(reference_fn, student, teacher)
    value, grads = values_and_grads(module_fn, student.float(), teacher.float())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6)
    if name != "infonce":  # the teacher is frozen; both SimCSE views learn
        expected_grads = expected_grads[:1]
        assert grads[1] is None, "the teacher's embeddings must get no gradient"
        grads = grads[:1]
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_teacher_is_detached():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    for fn in (embedding_mse, embedding_cosine, soft_contrastive):
        fn(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32(dtype):
    student, teacher = torch.randn(4, 8).to(dtype), torch.randn(4, 8).to(dtype)
    for fn in (embedding_mse, embedding_cosine, soft_contrastive, unsupervised_contrastive):
        value = fn(student, teacher)
        assert value.dtype == torch.float32, fn.__name__
        torch.testing.assert_close(value, fn(student.float(), teacher.float()))


def test_empty_batch_and_single_row_give_zero_not_nan():
    empty_s = torch.zeros(0, 8, requires_grad=True)
    for fn in (embedding_mse, embedding_cosine, soft_contrastive, unsupervised_contrastive):
        value = fn(empty_s, torch.zeros(0, 8))
        assert value.item() == 0.0, fn.__name__
        value.backward()  # still in the graph, and no NaN gradient
        assert not empty_s.grad.isnan().any()
    one_row = torch.randn(1, 8, requires_grad=True)
    value = soft_contrastive(one_row, torch.randn(1, 8))  # one text: its own key is the only one
    assert value.item() == pytest.approx(0.0, abs=1e-7)
    value.backward()
    assert not one_row.grad.isnan().any()


def test_width_mismatch_errors_name_both_widths():
    student, teacher = torch.randn(3, 6), torch.randn(3, 10)
    for fn in (embedding_mse, embedding_cosine, unsupervised_contrastive, soft_contrastive):
        with pytest.raises(ValueError, match=r"student's is 6 and the teacher's 10"):
            fn(student, teacher)


def test_known_answers():
    x = torch.randn(6, 5)
    assert embedding_mse(x, x).item() == 0.0
    assert embedding_cosine(2.5 * x, x).abs().item() < 1e-6  # cosine ignores scale
    assert soft_contrastive(x, x).abs().item() < 1e-6
    assert soft_contrastive(3 * x, x).abs().item() < 1e-6
    # It compares each student row with the teacher's rows, not with the student's own (similarity_kl):
    # a student that reproduces the teacher's similarity structure in a rotated space is not at 0.
    rotation = torch.linalg.qr(torch.randn(5, 5))[0]
    assert soft_contrastive(x @ rotation, x).item() > 1e-3
    # Pinned by hand: ‖(1, 2) − (0, 0)‖² / 2 = 2.5; orthogonal rows have cosine 0.
    assert embedding_mse(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)
    assert embedding_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx(1.0)
    # Two orthonormal texts, identical views, τ = 1: logits [[1, 0], [0, 1]] → log(1 + e^-1).
    eye = torch.eye(2)
    assert unsupervised_contrastive(eye, eye, temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_contrastive(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        unsupervised_contrastive(torch.randn(3, 4), torch.randn(3, 4), temperature=-1.0)


# ------------------------------------------------------------------------------ the objective
ALL_WEIGHTS = dict(mse_weight=0.5, cosine_weight=2.0, matryoshka_weight=0.7, distance_weight=0.3,
                   angle_weight=0.2, similarity_kl_weight=1.5, contrastive_weight=0.4)  # fmt: skip


def test_objective_loss_is_weighted_sum_of_reference_terms():
    torch.manual_seed(0)
    objective = EmbeddingObjective(student_dim=6, teacher_dim=6, matryoshka_dims=[2, 6], matryoshka_weights=[2.0, 1.0],
                                   temperature=0.1, **ALL_WEIGHTS)  # fmt: skip
    assert objective.projection is None
    student, teacher = torch.randn(5, 6), torch.randn(5, 6)
    out = objective(student, teacher)
    expected = {
        "mse": embedding_mse(student, teacher),
        "cosine": embedding_cosine(student, teacher),
        "matryoshka": matryoshka_distillation(student, teacher, [2, 6], [2.0, 1.0]),
        "distance": rkd_distance(student, teacher),
        "angle": rkd_angle(student, teacher),
        "similarity_kl": similarity_kl(student, student, teacher, teacher, temperature=0.1, exclude_diagonal=True),
        "contrastive": soft_contrastive(student, teacher, temperature=0.1),
    }
    assert set(out) == {"loss", *expected}
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, msg=name)
    weighted = sum(ALL_WEIGHTS[f"{name}_weight"] * value for name, value in expected.items())
    torch.testing.assert_close(out["loss"], weighted)


def test_objective_reports_only_weighted_terms():
    objective = EmbeddingObjective(student_dim=4, teacher_dim=8, cosine_weight=1.0, distance_weight=0.0, angle_weight=0.5)
    out = objective(torch.randn(3, 4), torch.randn(3, 8))
    assert set(out) == {"loss", "cosine", "angle"}
    torch.testing.assert_close(out["loss"], out["cosine"] + 0.5 * out["angle"])


def test_projection_only_where_widths_differ_and_it_is_trained():
    assert EmbeddingObjective(student_dim=8, teacher_dim=8, mse_weight=1.0).projection is None
    assert EmbeddingObjective(student_dim=4, teacher_dim=8, distance_weight=1.0).projection is None  # no pointwise term
    objective = EmbeddingObjective(student_dim=4, teacher_dim=8, mse_weight=1.0, contrastive_weight=1.0)
    assert isinstance(objective.projection, torch.nn.Linear) and objective.projection.bias is None
    assert tuple(objective.projection.weight.shape) == (8, 4)
    assert [p is objective.projection.weight for p in objective.parameters()] == [True]
    student = torch.randn(5, 4, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(5, 8, requires_grad=True)
    out = objective(student, teacher)
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert objective.projection.weight.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    projected = student.float() @ objective.projection.weight.T
    torch.testing.assert_close(out["mse"], embedding_mse(projected, teacher), rtol=1e-5, atol=1e-6)


def test_objective_small_batches_are_finite():
    objective = EmbeddingObjective(student_dim=6, teacher_dim=6, matryoshka_dims=[3], **ALL_WEIGHTS)
    for n in (0, 1):
        student = torch.randn(n, 6, requires_grad=True)
        out = objective(student, torch.randn(n, 6))
        assert all(torch.isfinite(v) for v in out.values()), (n, out)
        out["loss"].backward()
        assert not student.grad.isnan().any()
    assert objective(torch.zeros(0, 6), torch.zeros(0, 6))["loss"].item() == 0.0


def test_objective_validation_errors():
    with pytest.raises(ValueError, match="the embedding objective has no term.*set a weight > 0"):
        EmbeddingObjective(student_dim=4, teacher_dim=4)
    with pytest.raises(ValueError, match=r"matryoshka_dims must be sizes in 1..4"):
        EmbeddingObjective(student_dim=4, teacher_dim=8, matryoshka_weight=1.0, matryoshka_dims=[2, 8])
    with pytest.raises(ValueError, match="matryoshka_weight > 0 needs matryoshka_dims"):
        EmbeddingObjective(student_dim=4, teacher_dim=8, matryoshka_weight=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        EmbeddingObjective(student_dim=4, teacher_dim=4, mse_weight=1.0, cosine_weight=-1.0)
    objective = EmbeddingObjective(student_dim=4, teacher_dim=8, cosine_weight=1.0)
    with pytest.raises(ValueError, match=r"widths 8 \(student\) and 8 \(teacher\).*built for 4 and 8"):
        objective(torch.randn(2, 8), torch.randn(2, 8))


def test_from_config_reads_fields_by_name():
    config = SimpleNamespace(mse_weight=0.0, cosine_weight=1.0, matryoshka_weight=2.0, distance_weight=0.0,
                             angle_weight=0.0, similarity_kl_weight=0.0, contrastive_weight=0.5,
                             matryoshka_dims=[2, 4], matryoshka_weights=[1.0, 3.0], temperature=0.2)  # fmt: skip
    objective = EmbeddingObjective.from_config(config, student_dim=4, teacher_dim=6)
    assert objective.weights["matryoshka"] == 2.0 and objective.matryoshka_weights == [1.0, 3.0]
    assert objective.temperature == 0.2 and objective.projection is not None
    student, teacher = torch.randn(5, 4), torch.randn(5, 6)
    out = objective(student, teacher)
    assert set(out) == {"loss", "cosine", "matryoshka", "contrastive"}
    projected = student @ objective.projection.weight.T  # the soft-label contrast runs in the teacher's space
    torch.testing.assert_close(out["contrastive"], soft_contrastive(projected, teacher, temperature=0.2))
