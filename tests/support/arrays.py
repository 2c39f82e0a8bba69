"""Deterministic test data for every numpy dtype the v2 datatypes map to.

    x = random_array((2, 3), "float16", seed=1)
"""

from __future__ import annotations

import numpy as np


def random_array(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Deterministic test data for any numpy dtype name, including bool and object (bytes)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype == "object":
        flat = np.array([f"item-{i}-é".encode() for i in range(int(np.prod(shape)))], dtype=object)
        return flat.reshape(shape)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, dtype=dtype)
