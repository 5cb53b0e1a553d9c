"""Embedding-fidelity metrics (`kd_core/eval/embedding_metrics.py`) against plain-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kd_core.eval.embedding_metrics import (
    embedding_fidelity,
    mean_cosine,
    neighbours,
    prefix_metrics,
    recall_at_k,
    similarity_spearman,
)


def embeddings(rows, width, seed):
    return np.random.default_rng(seed).standard_normal((rows, width))


def rotation(width, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((width, width)))
    return q * np.sign(np.diag(r))


# --- references: plain Python, one pair at a time -------------------------------------------------


def ref_cos(u, v):
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    return 0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv)


def ref_neighbours(rows, k):
    out = []
    for i, u in enumerate(rows):
        scored = [(-ref_cos(u, v), j) for j, v in enumerate(rows) if j != i]
        out.append([j for _, j in sorted(scored)[:k]])
    return out


def ref_recall(student, teacher, k):
    s, t = ref_neighbours(student.tolist(), k), ref_neighbours(teacher.tolist(), k)
    return sum(len(set(a) & set(b)) / k for a, b in zip(s, t)) / len(s)


def ref_ranks(values):
    order = sorted(range(len(values)), key=lambda p: values[p])
    ranks, start = [0.0] * len(values), 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for p in order[start : stop + 1]:
            ranks[p] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def ref_spearman(student, teacher):
    n = len(student)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    a = ref_ranks([ref_cos(student[i], student[j]) for i, j in pairs])
    b = ref_ranks([ref_cos(teacher[i], teacher[j]) for i, j in pairs])
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


# --- against the references ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 29])
def test_neighbours_match_reference(k):
    x = embeddings(30, 7, seed=1)
    assert neighbours(x, k).tolist() == ref_neighbours(x.tolist(), k)


def test_recall_matches_reference_across_widths():
    teacher = embeddings(30, 8, seed=2)
    student = teacher[:, :5] + 0.8 * embeddings(30, 5, seed=3)  # related, narrower, imperfect
    value = recall_at_k(student, teacher, k=5)
    assert value == pytest.approx(ref_recall(student, teacher, 5), abs=1e-12)
    assert 0 < value < 1


def test_spearman_matches_reference_with_tied_similarities():
    teacher = embeddings(30, 6, seed=4)
    student = teacher + 0.5 * embeddings(30, 6, seed=5)
    student[[3, 4, 5]] = student[6]  # duplicated rows: exactly tied similarities
    expected = ref_spearman(student.tolist(), teacher.tolist())
    assert similarity_spearman(student, teacher) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1


def test_mean_cosine_matches_reference_and_zero_rows_count_zero():
    student, teacher = embeddings(30, 5, seed=6), embeddings(30, 5, seed=7)
    student[0] = 0.0
    expected = sum(ref_cos(s, t) for s, t in zip(student.tolist(), teacher.tolist())) / 30
    value = mean_cosine(student.astype(np.float32), teacher)
    assert value == pytest.approx(expected, abs=1e-6)
    assert not math.isnan(value)


# --- properties -------------------------------------------------------------------------------------


def test_identical_embeddings_agree_perfectly():
    x = embeddings(30, 6, seed=8)
    assert recall_at_k(x, x.copy(), k=5) == 1.0
    assert similarity_spearman(x, x.copy()) == pytest.approx(1.0, abs=1e-12)
    assert mean_cosine(x, x.copy()) == pytest.approx(1.0, abs=1e-12)


def test_rotation_keeps_retrieval_but_not_rowwise_cosine():
    teacher = embeddings(30, 6, seed=9)
    student = teacher @ rotation(6, seed=10)
    assert recall_at_k(student, teacher, k=5) == 1.0
    assert similarity_spearman(student, teacher) == pytest.approx(1.0, abs=1e-12)
    assert mean_cosine(student, teacher) < 0.9


def test_scaled_rows_keep_recall():
    teacher = embeddings(30, 6, seed=11)
    scales = np.random.default_rng(12).uniform(0.01, 100.0, size=(30, 1))
    assert recall_at_k(teacher * scales, teacher, k=5) == 1.0
    assert similarity_spearman(teacher * scales, teacher) == pytest.approx(1.0, abs=1e-12)


def test_unrelated_embeddings_recall_little():
    value = recall_at_k(embeddings(200, 16, seed=13), embeddings(200, 16, seed=14), k=10)
    assert value < 0.5
    assert abs(similarity_spearman(embeddings(200, 16, seed=13), embeddings(200, 16, seed=14))) < 0.1


def test_ties_go_to_the_lower_index():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # row 1's others: rows 4 (cos 1), then 0, 2, 3 (cos 0, tied), then 5 (cos 0)
    assert neighbours(x, 3).tolist()[1] == [4, 0, 2]
    assert neighbours(x, 3).tolist()[3] == [0, 2, 1]
    assert neighbours(x[::-1], 3).tolist()[4] == [1, 0, 2]  # row 1 reversed: row 4 there


@pytest.mark.parametrize("block_rows", [1, 3, 7])
def test_blocked_equals_unblocked(block_rows):
    x = embeddings(31, 5, seed=15)
    whole = neighbours(x, 6, block_rows=len(x))
    assert np.array_equal(neighbours(x, 6, block_rows=block_rows), whole)
    y = embeddings(31, 4, seed=16)
    assert recall_at_k(x, y, 6, block_rows=block_rows) == recall_at_k(x, y, 6, block_rows=len(x))


def test_sampled_spearman_is_close_and_deterministic():
    teacher = embeddings(120, 8, seed=17)
    student = teacher + 0.7 * embeddings(120, 8, seed=18)  # 7140 pairs
    exhaustive = similarity_spearman(student, teacher)
    sampled = similarity_spearman(student, teacher, max_pairs=2000, seed=3)
    assert sampled != exhaustive  # it did sample
    assert sampled == pytest.approx(exhaustive, abs=0.05)
    assert similarity_spearman(student, teacher, max_pairs=2000, seed=3) == sampled
    assert similarity_spearman(student, teacher, max_pairs=7140) == exhaustive


def test_zero_rows_give_numbers_not_nan():
    x = embeddings(10, 3, seed=19)
    x[2] = 0.0
    assert not np.isnan(similarity_spearman(x, embeddings(10, 3, seed=20)))
    assert neighbours(x, 3)[2].tolist() == [0, 1, 3]  # all cosines 0: the lowest other indices


def test_prefix_metrics_and_summary():
    teacher = embeddings(40, 8, seed=21)
    student = np.hstack([teacher[:, :4], embeddings(40, 4, seed=22)])
    rows = prefix_metrics(student, teacher, dims=[2, 8], k=5)
    assert [row["dim"] for row in rows] == [2, 8]
    assert rows[1]["recall_at_5"] == recall_at_k(student, teacher, 5)
    assert rows[0]["spearman"] == similarity_spearman(student[:, :2], teacher)
    summary = embedding_fidelity(student, teacher, k=5, dims=[2, 8])
    assert summary["recall_at_5"] == rows[1]["recall_at_5"]
    assert summary["mean_cosine"] == mean_cosine(student, teacher)
    assert summary["dims"] == rows
    narrow = embedding_fidelity(student[:, :6], teacher, k=5)
    assert set(narrow) == {"recall_at_5", "spearman"}


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [[9], [0], [4, 12]])
def test_prefix_dims_beyond_the_width_raise(dims):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        prefix_metrics(embeddings(10, 8, seed=23), embeddings(10, 16, seed=24), dims=dims, k=3)


def test_errors_say_what_was_given():
    with pytest.raises(ValueError, match="384.*256|256.*384"):
        mean_cosine(embeddings(5, 256, seed=25), embeddings(5, 384, seed=26))
    with pytest.raises(ValueError, match="5 student rows and 6 teacher rows"):
        recall_at_k(embeddings(5, 4, seed=27), embeddings(6, 4, seed=28), k=2)
    with pytest.raises(ValueError, match="got 1"):
        similarity_spearman(embeddings(1, 4, seed=29), embeddings(1, 4, seed=30))
    with pytest.raises(ValueError, match="k=5 with N=5"):
        neighbours(embeddings(5, 4, seed=31), 5)
    with pytest.raises(ValueError, match="k=0"):
        recall_at_k(embeddings(5, 4, seed=32), embeddings(5, 4, seed=33), k=0)
    with pytest.raises(ValueError, match="2-D"):
        neighbours(np.zeros(5), 1)
