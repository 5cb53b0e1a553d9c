"""MUNGE synthetic rows for tabular distillation (`kd_core/data/munge.py`).

What these prove: the output has the asked shapes and dtypes for numeric-only, categorical-only
and mixed inputs and is a function of the seed (and not of `chunk_rows`); with p = 0 the synthetic
rows are the training rows, each pass a permutation of them; categorical values come only from the
column's training values and with p = 1 are exactly the neighbours'; an exact duplicate is the
neighbour, so σ = 0 and the numeric values are copied exactly; synthetic rows stay near the data
(none in the gap between two separated clusters, where a uniform box sampler puts many) and keep
the training means and standard deviations; the neighbour is found with standardised numeric
distance plus 1 per categorical mismatch (checked against brute force, and a feature with a huge
scale does not decide it); every bad argument is a ValueError naming it.
Run: .venv/bin/python -m pytest tests/test_munge.py
"""

from __future__ import annotations

import numpy as np
import pytest

from kd_core.data.munge import munge, nearest_neighbours


def mixed_data(n: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n rows of 3 numeric features on different scales and 2 categorical columns with odd codes."""
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(n, 3)) * np.array([1.0, 100.0, 0.01]) + np.array([0.0, 50.0, -3.0])
    categorical = np.stack([rng.choice([3, 7, 11], size=n), rng.choice([-1, 5], size=n)], axis=1)
    return numeric.astype(np.float32), categorical.astype(np.int32)


def sorted_rows(values: np.ndarray) -> np.ndarray:
    """The rows of a 2-D array in lexicographic order (to compare multisets of rows)."""
    return values[np.lexsort(values.T[::-1])] if values.shape[1] else values


def row_set(numeric: np.ndarray, categorical: np.ndarray) -> set[tuple]:
    return {tuple(a.tolist()) + tuple(b.tolist()) for a, b in zip(numeric, categorical)}


@pytest.mark.parametrize("numeric_width, categorical_width", [(3, 0), (0, 2), (3, 2)])
def test_shapes_dtypes_and_determinism(numeric_width: int, categorical_width: int) -> None:
    numeric, categorical = mixed_data()
    numeric, categorical = numeric[:, :numeric_width], categorical[:, :categorical_width]

    synthetic_numeric, synthetic_categorical = munge(numeric, categorical, 450, seed=3)
    assert synthetic_numeric.shape == (450, numeric_width) and synthetic_numeric.dtype == np.float32
    assert synthetic_categorical.shape == (450, categorical_width) and synthetic_categorical.dtype == np.int32

    again = munge(numeric, categorical, 450, seed=3, chunk_rows=7)  # chunking changes nothing
    np.testing.assert_array_equal(again[0], synthetic_numeric)
    np.testing.assert_array_equal(again[1], synthetic_categorical)
    other = munge(numeric, categorical, 450, seed=4)
    assert not (np.array_equal(other[0], synthetic_numeric) and np.array_equal(other[1], synthetic_categorical))


def test_zero_rows_gives_empty_arrays_of_the_right_widths() -> None:
    synthetic_numeric, synthetic_categorical = munge(*mixed_data(), 0)
    assert synthetic_numeric.shape == (0, 3) and synthetic_numeric.dtype == np.float32
    assert synthetic_categorical.shape == (0, 2) and synthetic_categorical.dtype == np.int32


def test_no_swaps_copies_training_rows_and_each_pass_covers_them() -> None:
    numeric, categorical = mixed_data(n=50)
    synthetic_numeric, synthetic_categorical = munge(numeric, categorical, 125, swap_probability=0.0)

    for pass_start in (0, 50):  # each full pass is a permutation of the training rows
        window = slice(pass_start, pass_start + 50)
        np.testing.assert_array_equal(sorted_rows(synthetic_numeric[window]), sorted_rows(numeric))
        np.testing.assert_array_equal(sorted_rows(synthetic_categorical[window]), sorted_rows(categorical))
        assert list(synthetic_numeric[window, 0]) != list(numeric[:, 0])  # shuffled, not in training order
    assert row_set(synthetic_numeric, synthetic_categorical) <= row_set(numeric, categorical)  # the cut pass too


def test_categorical_values_stay_in_each_columns_training_values() -> None:
    numeric, categorical = mixed_data()
    _, synthetic_categorical = munge(numeric, categorical, 1000, swap_probability=0.5)
    assert set(synthetic_categorical[:, 0].tolist()) == {3, 7, 11}
    assert set(synthetic_categorical[:, 1].tolist()) == {-1, 5}


def test_full_swaps_take_the_neighbours_categorical_row() -> None:
    rng = np.random.default_rng(2)
    categorical = rng.integers(0, 6, size=(60, 4)).astype(np.int32)
    numeric = np.empty((60, 0), dtype=np.float32)
    neighbours = nearest_neighbours(numeric, categorical)

    _, synthetic_categorical = munge(numeric, categorical, 60, swap_probability=1.0)
    # One pass: the synthetic rows are the rows' neighbours' rows, as a multiset.
    np.testing.assert_array_equal(sorted_rows(synthetic_categorical), sorted_rows(categorical[neighbours]))
    assert not np.array_equal(sorted_rows(categorical[neighbours]), sorted_rows(categorical))  # a real check


def test_full_swaps_draw_numeric_values_around_the_neighbours() -> None:
    numeric, categorical = mixed_data(n=60)
    neighbours = nearest_neighbours(numeric, categorical)
    # spread = 1e6: σ = |e_a − e′_a| / s is negligible, so each value is its neighbour's (N(e′_a, σ)).
    synthetic_numeric, _ = munge(numeric, categorical, 60, swap_probability=1.0, spread=1e6)
    tolerance = 1e-4 * numeric.std(axis=0)
    assert (np.abs(sorted_rows(synthetic_numeric) - sorted_rows(numeric[neighbours])) < tolerance).all()


def test_duplicates_are_neighbours_and_give_zero_sigma() -> None:
    numeric, categorical = mixed_data(n=40)
    numeric, categorical = np.concatenate([numeric, numeric]), np.concatenate([categorical, categorical])
    neighbours = nearest_neighbours(numeric, categorical)
    np.testing.assert_array_equal(neighbours, np.concatenate([np.arange(40, 80), np.arange(40)]))

    synthetic_numeric, synthetic_categorical = munge(numeric, categorical, 300, swap_probability=0.5, seed=5)
    assert row_set(synthetic_numeric, synthetic_categorical) <= row_set(numeric, categorical)


def test_neighbours_match_brute_force_distance() -> None:
    numeric, categorical = mixed_data(n=80)
    numeric[:, 1] = 7.0  # a constant feature contributes nothing
    values = numeric.astype(np.float64)
    std = values.std(axis=0)
    standardised = np.zeros_like(values)
    np.divide(values - values.mean(axis=0), std, out=standardised, where=std > 0)
    squared = ((standardised[:, None] - standardised[None]) ** 2).sum(axis=2)
    squared += (categorical[:, None] != categorical[None]).sum(axis=2)
    np.fill_diagonal(squared, np.inf)

    neighbours = nearest_neighbours(numeric, categorical)
    np.testing.assert_allclose(squared[np.arange(80), neighbours], squared.min(axis=1), rtol=1e-9)


def test_a_huge_scale_feature_does_not_decide_the_neighbour() -> None:
    # Row 0 is 1e3 away from row 1 in feature 0 (std ~3e6: negligible) and 1 away from row 2 in
    # feature 1 (std ~0.4: far). Raw Euclidean would pick row 2; standardised picks row 1.
    numeric = np.array(
        [[0, 0], [1e3, 0], [0, 1], [4e6, 0.2], [4.001e6, 0.2], [-4e6, -0.2], [-4.001e6, -0.2]], dtype=np.float32
    )
    tracer = np.array([[0], [1], [2], [0], [0], [0], [0]], dtype=np.int32)  # marks rows 1 and 2
    raw_squared = ((numeric[:, None].astype(np.float64) - numeric[None]) ** 2).sum(axis=2)
    np.fill_diagonal(raw_squared, np.inf)
    assert raw_squared[0].argmin() == 2  # the case does separate the two distances

    _, synthetic_categorical = munge(numeric, tracer, len(numeric), swap_probability=1.0)
    # One pass, every attribute swapped: a 1 comes from a row whose neighbour is row 1, a 2 from
    # one whose neighbour is row 2. Only row 0 has row 1 as neighbour; no row has row 2.
    assert (synthetic_categorical == 1).sum() == 1
    assert (synthetic_categorical == 2).sum() == 0


def test_synthetic_rows_stay_out_of_the_gap_between_clusters() -> None:
    rng = np.random.default_rng(6)
    left = rng.normal(size=(300, 2)) + np.array([-10.0, 0.0])
    right = rng.normal(size=(300, 2)) + np.array([10.0, 0.0])
    numeric = np.concatenate([left, right]).astype(np.float32)
    categorical = np.empty((600, 0), dtype=np.int32)

    synthetic_numeric, _ = munge(numeric, categorical, 3000, seed=7)
    in_gap = np.abs(synthetic_numeric[:, 0]) < 5.0
    assert in_gap.mean() < 0.005  # seeded: 0 or 1 row of 3000

    low, high = numeric.min(axis=0), numeric.max(axis=0)
    uniform = rng.uniform(low, high, size=(3000, 2))
    assert (np.abs(uniform[:, 0]) < 5.0).mean() > 0.3


def test_synthetic_moments_are_close_to_trainings() -> None:
    numeric, categorical = mixed_data(n=3000, seed=8)
    synthetic_numeric, _ = munge(numeric, categorical, 6000, seed=9)
    mean, std = numeric.mean(axis=0), numeric.std(axis=0)
    np.testing.assert_array_less(np.abs(synthetic_numeric.mean(axis=0) - mean), 0.1 * std)
    np.testing.assert_allclose(synthetic_numeric.std(axis=0), std, rtol=0.15)


def test_larger_spread_stays_closer_to_the_data() -> None:
    numeric, categorical = mixed_data(n=300)
    numeric, categorical = numeric[:, :1], categorical[:, :0]
    wide, _ = munge(numeric, categorical, 300, swap_probability=1.0, spread=0.5)
    tight, _ = munge(numeric, categorical, 300, swap_probability=1.0, spread=50.0)

    def distance_to_data(values: np.ndarray) -> float:
        return float(np.abs(values[:, None, 0] - numeric[None, :, 0]).min(axis=1).mean())

    assert distance_to_data(tight) < distance_to_data(wide) / 5


@pytest.mark.parametrize(
    "numeric, categorical, kwargs, argument",
    [
        (np.zeros((1, 2)), np.zeros((1, 1), dtype=np.int32), {}, "2 training rows"),
        (np.zeros((4, 2)), np.zeros((3, 1), dtype=np.int32), {}, "same number of rows"),
        (np.zeros((4, 0)), np.zeros((4, 0), dtype=np.int32), {}, "F_num \\+ F_cat == 0"),
        (np.zeros((4, 2)), np.zeros((4, 1), dtype=np.int32), {"rows": -1}, "rows"),
        (np.zeros((4, 2)), np.zeros((4, 1), dtype=np.int32), {"swap_probability": 1.5}, "swap_probability"),
        (np.zeros((4, 2)), np.zeros((4, 1), dtype=np.int32), {"swap_probability": -0.1}, "swap_probability"),
        (np.zeros((4, 2)), np.zeros((4, 1), dtype=np.int32), {"spread": 0.0}, "spread"),
        (np.zeros((4, 2)), np.zeros((4, 1), dtype=np.int32), {"spread": -1.0}, "spread"),
        (np.zeros((4, 2)), np.zeros((4, 1), dtype=np.int32), {"chunk_rows": 0}, "chunk_rows"),
        (np.zeros((4,)), np.zeros((4, 1), dtype=np.int32), {}, "numeric must be a 2-D"),
        (np.zeros((4, 2)), np.zeros((4, 1)), {}, "categorical must hold integer"),
        (np.array([[0, 1], [0, np.nan], [0, 2]]), np.zeros((3, 0), dtype=np.int32), {}, r"column\(s\) \[1\]"),
        (np.array([[np.inf, 1], [0, 1], [0, 2]]), np.zeros((3, 0), dtype=np.int32), {}, r"column\(s\) \[0\]"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(numeric, categorical, kwargs, argument) -> None:
    rows = kwargs.pop("rows", 10)
    with pytest.raises(ValueError, match=argument):
        munge(numeric, categorical, rows, **kwargs)
