"""MUNGE: synthetic rows around the training rows, for a teacher to label (Bucilă, Caruana &
Niculescu-Mizil, "Model Compression", KDD 2006).

The algorithm, with the paper's swap probability p (`swap_probability`) and local variance
parameter s (`spread`): for each training example e, find its nearest neighbour e′ among the other
training rows; then for each attribute a, independently with probability p,
  numeric a:      e_a ← N(e′_a, σ) with σ = |e_a − e′_a| / s;
  categorical a:  e_a ← e′_a.
The modified copy of e is one synthetic row. Larger s keeps synthetic rows closer to the data.

Choices made here:
- Distance: distance² = Σ (standardised numeric difference)² + (number of mismatching categorical
  features). Numeric features are divided by their training standard deviation (a constant
  feature contributes nothing); categorical features are one-hot encoded (over the codes the
  column has in training) and scaled by 1/√2, so a mismatch adds (1/√2)² + (1/√2)² = 1. The
  Euclidean distance on that encoding is exactly the distance above, which is what
  `sklearn.neighbors.NearestNeighbors` searches. The encoding is dense float64 of width
  F_num + Σ (codes per categorical column).
- Neighbours are found once for the training set: NearestNeighbors proposes the 3 nearest
  rows, and these candidates are re-scored with the exact formula (direct differences, so an exact
  duplicate is at distance exactly 0), the row itself excluded. The smallest distance wins; ties
  go to the lowest row index. An exact duplicate of e is therefore a valid neighbour, and then
  σ = 0: the numeric values swapped in are the duplicate's, exactly.
- The paper also modifies e′ symmetrically (e′_a ← N(e_a, σ), e′_a ← e_a) in the same step; here
  only e's modified copy is emitted: one synthetic row per (example, pass).
- More rows than n: passes over a copy of the training set, each pass in a fresh seeded
  permutation, until `rows` rows are made (the last pass cut short). Every pass starts again from
  the training rows (a synthetic row is never munged again).
- Randomness: `default_rng(seed)` spawns three independent streams (pass order, swap decisions,
  Gaussian noise). Rows are generated in chunks of `chunk_rows` so memory beyond the output stays
  bounded, and since each stream is drawn in row order the result does not depend on `chunk_rows`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.neighbors import NearestNeighbors

NEIGHBOUR_CANDIDATES = 3  # rows NearestNeighbors proposes per row (itself included), re-scored exactly


def munge(
    numeric: np.ndarray,
    categorical: np.ndarray,
    rows: int,
    *,
    swap_probability: float = 0.5,
    spread: float = 1.0,
    seed: int = 0,
    chunk_rows: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """`rows` synthetic rows made by MUNGE from the training rows (`numeric` (n, F_num) float,
    `categorical` (n, F_cat) integer codes): float32 numeric (rows, F_num) and int32 categorical
    (rows, F_cat). Deterministic for a seed."""
    numeric, categorical = _checked_inputs(numeric, categorical)
    _check_parameters(rows, swap_probability, spread, chunk_rows)
    n, numeric_width = numeric.shape
    categorical_width = categorical.shape[1]
    synthetic_numeric = np.empty((rows, numeric_width), dtype=np.float32)
    synthetic_categorical = np.empty((rows, categorical_width), dtype=np.int32)
    if rows == 0:
        return synthetic_numeric, synthetic_categorical

    neighbours = nearest_neighbours(numeric, categorical, chunk_rows=chunk_rows)
    order_rng, swap_rng, noise_rng = np.random.default_rng(seed).spawn(3)
    examples = _example_order(n, rows, order_rng)
    training_numeric = numeric.astype(np.float64)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        example = examples[start:stop]
        neighbour = neighbours[example]
        swap = swap_rng.random((stop - start, numeric_width + categorical_width)) < swap_probability
        noise = noise_rng.standard_normal((stop - start, numeric_width))

        own, other = training_numeric[example], training_numeric[neighbour]
        sigma = np.abs(own - other) / spread
        synthetic_numeric[start:stop] = np.where(swap[:, :numeric_width], other + sigma * noise, own)
        synthetic_categorical[start:stop] = np.where(
            swap[:, numeric_width:], categorical[neighbour], categorical[example]
        )
    return synthetic_numeric, synthetic_categorical


def nearest_neighbours(numeric: np.ndarray, categorical: np.ndarray, *, chunk_rows: int = 8192) -> np.ndarray:
    """For each training row, the index of its nearest other row under the MUNGE distance
    (standardised Euclidean on numeric + 1 per categorical mismatch, squared; see the module)."""
    numeric, categorical = _checked_inputs(numeric, categorical)
    encoded = _encode(numeric, categorical)
    n = len(encoded)
    search = NearestNeighbors(n_neighbors=min(NEIGHBOUR_CANDIDATES, n)).fit(encoded)
    proposed = search.kneighbors(encoded, return_distance=False)

    neighbours = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        candidates = proposed[start:stop]
        squared_distances = ((encoded[candidates] - encoded[start:stop, None, :]) ** 2).sum(axis=2)
        squared_distances[candidates == np.arange(start, stop)[:, None]] = np.inf  # not its own neighbour
        by_distance_then_index = np.lexsort((candidates, squared_distances), axis=1)
        neighbours[start:stop] = np.take_along_axis(candidates, by_distance_then_index[:, :1], axis=1)[:, 0]
    return neighbours


def _encode(numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
    """Rows whose Euclidean distances are the MUNGE distances: standardised numeric (a constant
    column becomes 0) next to one-hot categorical scaled by 1/√2."""
    values = numeric.astype(np.float64)
    std = values.std(axis=0)
    scale = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
    parts = [(values - values.mean(axis=0)) * scale]
    for column in categorical.T:
        codes, index = np.unique(column, return_inverse=True)
        one_hot = np.zeros((len(column), len(codes)))
        one_hot[np.arange(len(column)), index] = 1.0 / math.sqrt(2.0)
        parts.append(one_hot)
    return np.concatenate(parts, axis=1)


def _example_order(n: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """The training row each synthetic row starts from: passes over the training set, each in a
    fresh permutation, the last one cut to make `rows` in all."""
    passes = -(-rows // n)
    return np.concatenate([rng.permutation(n) for _ in range(passes)])[:rows]


def _checked_inputs(numeric: np.ndarray, categorical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training arrays as 2-D float32 numeric and int32 categorical, or a ValueError naming the
    argument at fault."""
    numeric = np.asarray(numeric)
    categorical = np.asarray(categorical)
    if numeric.ndim != 2:
        raise ValueError(f"numeric must be a 2-D array (rows, numeric features); got shape {numeric.shape}")
    if categorical.ndim != 2:
        raise ValueError(
            f"categorical must be a 2-D array (rows, categorical features); got shape {categorical.shape}"
        )
    if numeric.shape[0] != categorical.shape[0]:
        raise ValueError(
            f"numeric and categorical must have the same number of rows; got {numeric.shape[0]} "
            f"and {categorical.shape[0]}"
        )
    if numeric.shape[1] + categorical.shape[1] == 0:
        raise ValueError("numeric and categorical have no features between them (F_num + F_cat == 0)")
    if numeric.shape[0] < 2:
        raise ValueError(
            f"numeric/categorical: MUNGE needs at least 2 training rows (a row needs a neighbour); "
            f"got {numeric.shape[0]}"
        )
    if numeric.size and not np.issubdtype(numeric.dtype, np.number):
        raise ValueError(f"numeric must hold numbers; got dtype {numeric.dtype}")
    if categorical.size and not np.issubdtype(categorical.dtype, np.integer):
        raise ValueError(f"categorical must hold integer category codes; got dtype {categorical.dtype}")
    numeric = numeric.astype(np.float32)
    bad_columns = np.flatnonzero(~np.isfinite(numeric).all(axis=0))
    if bad_columns.size:
        raise ValueError(
            f"numeric has NaN or infinite values in column(s) {bad_columns.tolist()}; impute them first"
        )
    return numeric, categorical.astype(np.int32)


def _check_parameters(rows: int, swap_probability: float, spread: float, chunk_rows: int) -> None:
    """A ValueError naming the first parameter out of range."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0; got {rows}")
    if not 0.0 <= swap_probability <= 1.0:
        raise ValueError(f"swap_probability must be in [0, 1]; got {swap_probability}")
    if not (math.isfinite(spread) and spread > 0):
        raise ValueError(f"spread must be a finite number > 0; got {spread}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
