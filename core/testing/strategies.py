"""Hypothesis strategies shared by the conformance kit and tests: shapes, times, seeds, schedules."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def data_shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes of one example, e.g. ``(3,)`` or ``(2, 4, 4)``."""
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def batch_sizes(max_batch: int = 6) -> st.SearchStrategy[int]:
    return st.integers(1, max_batch)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def times(min_value: float = 0.0, max_value: float = 1.0, exclude_ends: bool = False) -> st.SearchStrategy[float]:
    """A time in [min_value, max_value] (or the open interval with ``exclude_ends``)."""
    return st.floats(min_value, max_value, exclude_min=exclude_ends, exclude_max=exclude_ends, allow_nan=False)


def time_tensors(batch: int, eps: float = 1e-3, dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    """A ``(batch,)`` tensor of times in ``[eps, 1 - eps]``."""
    return st.lists(st.floats(eps, 1 - eps), min_size=batch, max_size=batch).map(lambda v: torch.tensor(v, dtype=dtype))


def step_counts(max_steps: int = 64) -> st.SearchStrategy[int]:
    return st.integers(1, max_steps)
