"""How faithfully a sentence-embedding student reproduces its teacher on held-out texts.

Both models embed the same N held-out texts: `student` (N, D_s) and `teacher` (N, D_t), float32
or float64 arrays, row i of each for text i; D_s may differ from D_t. Everything is computed in
float64, on cosine similarities only, so scaling a row changes nothing. Definitions:
- cos(u, v) = u·v / (‖u‖ ‖v‖), and cos(u, v) = 0 when u or v is the zero vector (never NaN);
- `mean_cosine` = (1/N) Σ_i cos(s_i, t_i): only defined for D_s = D_t (the two spaces must be
  the same one for row-wise cosines to mean anything);
- `neighbours(X, k)`: for each row i, the k rows j ≠ i of largest cos(x_i, x_j), most similar
  first; equal similarities are ordered by lower index j. Computed `block_rows` rows at a time,
  so at most block_rows × N similarities exist at once;
- `recall_at_k` = (1/N) Σ_i |S_i ∩ T_i| / k, with S_i and T_i the k neighbours of text i among
  the other N − 1 held-out texts by the student's and by the teacher's embeddings: how much of
  the teacher's retrieval the student keeps (1: the same k neighbours for every query);
- `similarity_spearman`: Spearman's ρ (Pearson correlation of average ranks, ties sharing the
  mean of their ranks) between the student's and the teacher's cos over pairs i < j; all
  N(N−1)/2 pairs when there are at most `max_pairs`, otherwise `max_pairs` distinct pairs drawn
  uniformly without replacement by `numpy.random.default_rng(seed)`, the same pairs for both
  models. NaN when either side's sampled similarities are all equal (ρ is undefined there);
- `prefix_metrics`: for Matryoshka students, recall_at_k and similarity_spearman of the first d
  student dimensions, `student[:, :d]`, against the full teacher, for each d in `dims`;
- `embedding_fidelity`: the summary of the above for one student.
Every function rejects arrays that are not 2-D, fewer than 2 rows, or row counts that differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

BLOCK_ROWS = 256  # rows of similarities held at once in `neighbours`: 256 × N float64
PAIR_CHUNK = 8192  # pairs whose cosines are computed at once in `similarity_spearman`


def mean_cosine(student: np.ndarray, teacher: np.ndarray) -> float:
    """(1/N) Σ_i cos(s_i, t_i) of `student` (N, D) and `teacher` (N, D); zero rows count 0."""
    _check_pair(student, teacher)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"mean_cosine needs equal widths: the student's embeddings are {student.shape[1]} wide, "
            f"the teacher's {teacher.shape[1]}"
        )
    return float(np.einsum("ij,ij->i", _unit(student), _unit(teacher)).mean())


def neighbours(embeddings: np.ndarray, k: int, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """(N, k) int64: per row of `embeddings` (N, D), the indices of its k most cosine-similar
    other rows, most similar first, ties by lower index. `block_rows` rows at a time."""
    _check_rows(embeddings, "embeddings")
    count = embeddings.shape[0]
    _check_k(k, count)
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    unit = _unit(embeddings)
    result = np.empty((count, k), dtype=np.int64)
    for start in range(0, count, block_rows):
        stop = min(start + block_rows, count)
        similarity = unit[start:stop] @ unit.T  # (block, N)
        rows = np.arange(stop - start)
        similarity[rows, rows + start] = -np.inf  # a row is not its own neighbour
        kth = np.partition(similarity, count - k, axis=1)[:, count - k]  # the k-th largest per row
        for row in rows:
            values = similarity[row]
            candidates = np.flatnonzero(values >= kth[row])  # the k largest, and any tied with the k-th
            order = np.lexsort((candidates, -values[candidates]))  # by similarity, then by index
            result[start + row] = candidates[order[:k]]
    return result


def recall_at_k(student: np.ndarray, teacher: np.ndarray, k: int = 10, block_rows: int = BLOCK_ROWS) -> float:
    """(1/N) Σ_i |S_i ∩ T_i| / k: the share of the teacher's k nearest held-out neighbours of
    each text that the student's k nearest are too (each query left out of its own results)."""
    _check_pair(student, teacher)
    ours, theirs = neighbours(student, k, block_rows), neighbours(teacher, k, block_rows)
    shared = (ours[:, :, None] == theirs[:, None, :]).sum(axis=(1, 2))  # neighbours are distinct per row
    return float(shared.mean() / k)


def similarity_spearman(student: np.ndarray, teacher: np.ndarray, max_pairs: int = 200_000, seed: int = 0) -> float:
    """Spearman's ρ between the student's and the teacher's pairwise cosines over pairs i < j
    (all of them, or `max_pairs` distinct ones drawn uniformly with `seed`); NaN when a side is
    constant."""
    _check_pair(student, teacher)
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    first, second = pair_indices(student.shape[0], max_pairs, seed)
    ranks = [rankdata(_pair_cosines(_unit(side), first, second)) for side in (student, teacher)]
    if min(np.ptp(rank) for rank in ranks) == 0:
        return float("nan")
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def pair_indices(count: int, max_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) int64 arrays of the pairs i < j of `count` rows in row-major order: all of them when
    there are at most `max_pairs`, else `max_pairs` distinct ones drawn uniformly with `seed`."""
    total = count * (count - 1) // 2
    if total <= max_pairs:
        return tuple(index.astype(np.int64) for index in np.triu_indices(count, 1))
    flat = np.sort(np.random.default_rng(seed).choice(total, size=max_pairs, replace=False))
    rows = np.arange(count, dtype=np.int64)
    offsets = rows * (2 * count - rows - 1) // 2  # the flat index of pair (i, i + 1)
    first = np.searchsorted(offsets, flat, side="right") - 1
    return first, flat - offsets[first] + first + 1


def prefix_metrics(
    student: np.ndarray,
    teacher: np.ndarray,
    dims: Sequence[int],
    k: int = 10,
    max_pairs: int = 200_000,
    seed: int = 0,
    block_rows: int = BLOCK_ROWS,
) -> list[dict]:
    """Per Matryoshka prefix d in `dims` (each 1..D_s): {"dim": d, f"recall_at_{k}", "spearman"}
    of `student[:, :d]` against the whole teacher, in the order given."""
    _check_pair(student, teacher)
    width = student.shape[1]
    wrong = [dim for dim in dims if not 1 <= dim <= width]
    if wrong:
        raise ValueError(f"prefix dims must be in 1..{width} (the student's width), got {wrong}")
    return [
        {
            "dim": int(dim),
            f"recall_at_{k}": recall_at_k(student[:, :dim], teacher, k, block_rows),
            "spearman": similarity_spearman(student[:, :dim], teacher, max_pairs, seed),
        }
        for dim in dims
    ]


def embedding_fidelity(
    student: np.ndarray,
    teacher: np.ndarray,
    k: int = 10,
    dims: Sequence[int] = (),
    max_pairs: int = 200_000,
    seed: int = 0,
    block_rows: int = BLOCK_ROWS,
) -> dict:
    """{f"recall_at_{k}", "spearman", "mean_cosine" (equal widths only), "dims" (when `dims` is
    given: `prefix_metrics`)} of a student's held-out embeddings against the teacher's."""
    _check_pair(student, teacher)
    summary = {
        f"recall_at_{k}": recall_at_k(student, teacher, k, block_rows),
        "spearman": similarity_spearman(student, teacher, max_pairs, seed),
    }
    if student.shape[1] == teacher.shape[1]:
        summary["mean_cosine"] = mean_cosine(student, teacher)
    if len(dims):
        summary["dims"] = prefix_metrics(student, teacher, dims, k, max_pairs, seed, block_rows)
    return summary


def _unit(embeddings: np.ndarray) -> np.ndarray:
    """float64 rows scaled to unit length; zero rows stay zero (so their cosines are 0)."""
    values = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)


def _pair_cosines(unit: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """cos of each pair (first[p], second[p]) of unit rows, PAIR_CHUNK pairs at a time."""
    out = np.empty(len(first), dtype=np.float64)
    for start in range(0, len(first), PAIR_CHUNK):
        part = slice(start, start + PAIR_CHUNK)
        out[part] = np.einsum("ij,ij->i", unit[first[part]], unit[second[part]])
    return out


def _check_rows(embeddings: np.ndarray, name: str) -> None:
    shape = np.shape(embeddings)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {shape}")
    if shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to compare, got {shape[0]}")


def _check_pair(student: np.ndarray, teacher: np.ndarray) -> None:
    _check_rows(student, "student")
    _check_rows(teacher, "teacher")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must embed the same texts: got {student.shape[0]} student rows "
            f"and {teacher.shape[0]} teacher rows"
        )


def _check_k(k: int, count: int) -> None:
    if not 1 <= k <= count - 1:
        raise ValueError(f"k must be in 1..{count - 1} (N − 1 other rows), got k={k} with N={count}")
