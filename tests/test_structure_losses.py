"""Feature, relational, Matryoshka and reward distillation losses, against naive references and
their defining properties (invariances, zero on a perfect student, stability).

Run: .venv/bin/python -m pytest tests/test_structure_losses.py
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kd_core.losses.features import HiddenStateDistillation, hidden_cosine, hidden_mse
from kd_core.losses.matryoshka import matryoshka_distillation
from kd_core.losses.relational import rkd_angle, rkd_distance, similarity_kl
from kd_core.losses.reward import preference_kl, reward_mse


def huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


# ------------------------------------------------------------------------------ hidden states
def test_hidden_losses_match_references_with_masks():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 7, 5, generator=generator), torch.randn(3, 7, 5, generator=generator)
    mask = torch.rand(3, 7, generator=generator) > 0.4
    expected_mse = ((student - teacher) ** 2).mean(-1)[mask].mean()
    cosine = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    torch.testing.assert_close(hidden_mse(student, teacher, mask), expected_mse)
    torch.testing.assert_close(hidden_cosine(student, teacher, mask), (1 - cosine)[mask].mean())
    assert hidden_mse(student, teacher, torch.zeros(3, 7, dtype=torch.bool)).item() == 0.0


def test_hidden_state_module_projects_and_maps_layers():
    student_states = [torch.randn(2, 4, 8, requires_grad=True) for _ in range(3)]
    teacher_states = [torch.randn(2, 4, 16) for _ in range(5)]
    module = HiddenStateDistillation([(1, 2), (2, 4)], student_dim=8, teacher_dim=16, kind="cosine")
    loss = module(student_states, teacher_states)
    loss.backward()
    assert all(projection.weight.grad is not None for projection in module.projections)
    assert student_states[0].grad is None and student_states[2].grad is not None
    with pytest.raises(ValueError, match=r"layer pair \(1, 7\) is out of range"):
        HiddenStateDistillation([(1, 7)], 8, 16)(student_states, teacher_states)
    same_width = HiddenStateDistillation([(0, 0)], 16, 16)
    assert same_width(teacher_states, teacher_states).item() == 0.0


# ------------------------------------------------------------------------------ relational
def test_rkd_distance_matches_loop_reference_and_ignores_scale():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 3, generator=generator), torch.randn(5, 4, generator=generator)
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]

    def normalised(x):
        d = {(i, j): (x[i] - x[j]).norm().item() for i, j in pairs}
        mean = sum(d.values()) / len(d)
        return {k: v / mean for k, v in d.items()}

    ds, dt = normalised(student), normalised(teacher)
    expected = sum(huber(ds[p] - dt[p]) for p in pairs) / len(pairs)
    assert rkd_distance(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert rkd_distance(3 * teacher + 1, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_angle_matches_loop_reference_and_ignores_similarity_transforms():
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)

    def angle(x, i, j, k):
        if i == j or k == j:
            return 0.0
        a, b = x[i] - x[j], x[k] - x[j]
        return (a @ b / (a.norm() * b.norm())).item()

    triplets = list(itertools.product(range(4), repeat=3))
    expected = sum(huber(angle(student, *t) - angle(teacher, *t)) for t in triplets) / len(triplets)
    assert rkd_angle(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator))
    assert rkd_angle(2 * teacher @ rotation + 5, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_similarity_kl_reference_and_zero_for_a_perfect_student():
    generator = torch.Generator().manual_seed(3)
    images_s, texts_s = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    images_t, texts_t = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)

    def rows(a, b):
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        return torch.softmax(a @ b.T / 0.1, -1)

    p, q = rows(images_t, texts_t), rows(images_s, texts_s)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(similarity_kl(images_s, texts_s, images_t, texts_t, temperature=0.1), expected)
    assert similarity_kl(images_t, texts_t, images_t, texts_t).abs() < 1e-6
    intra = similarity_kl(images_s, images_s, images_t, images_t, exclude_diagonal=True)
    assert torch.isfinite(intra) and intra > 0


# ------------------------------------------------------------------------------ Matryoshka
def test_matryoshka_reference_and_full_width_term():
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(6, 8, generator=generator), torch.randn(6, 10, generator=generator)

    def cos(x):
        x = x / x.norm(dim=-1, keepdim=True)
        return x @ x.T

    expected = (2 * ((cos(student[:, :2]) - cos(teacher)) ** 2).mean() + ((cos(student) - cos(teacher)) ** 2).mean()) / 3
    torch.testing.assert_close(matryoshka_distillation(student, teacher, [2, 8], weights=[2.0, 1.0]), expected)
    assert matryoshka_distillation(teacher, teacher, [10]).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="dims must be sizes in 1..8"):
        matryoshka_distillation(student, teacher, [4, 16])


# ------------------------------------------------------------------------------ reward
def test_reward_mse_with_mask():
    student, teacher = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 0.0])
    assert reward_mse(student, teacher, torch.tensor([True, True, False])).item() == pytest.approx(0.125)


def test_preference_kl_reference_properties_and_stability():
    generator = torch.Generator().manual_seed(5)
    sc, sr, tc, tr = (torch.randn(9, generator=generator) for _ in range(4))
    p = torch.sigmoid((tc - tr) / 2.0)
    q = torch.sigmoid((sc - sr) / 2.0)
    expected = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
    torch.testing.assert_close(preference_kl(sc, sr, tc, tr, temperature=2.0), expected)
    # Swapping chosen and rejected on both sides describes the same preference.
    torch.testing.assert_close(preference_kl(sr, sc, tr, tc), preference_kl(sc, sr, tc, tr))
    assert preference_kl(tc + 3, tr + 3, tc, tr).abs() < 1e-6  # only the margin matters
    huge = preference_kl(torch.tensor([1000.0]), torch.tensor([-1000.0]), torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert torch.isfinite(huge) and huge.item() == pytest.approx(2000.0, rel=1e-4)
    assert preference_kl(sc, sr, tc, tr, mask=torch.zeros(9, dtype=torch.bool)).item() == 0.0
    assert math.isfinite(preference_kl(sc, sr, tc, tr).item())
