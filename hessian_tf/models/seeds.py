"""Seeds for layer initializers."""

from __future__ import annotations

import numpy as np


class LayerSeeds:
    """A distinct, reproducible integer seed per initializer: call it once per layer.

    Keras initializers seeded with the same integer repeat their values, so each
    layer gets its own seed derived from (seed, index), index = 1, 2, ..., without
    touching the global random state.
    """

    def __init__(self, seed: int):
        self._seed = int(seed)
        self._index = 0

    def __call__(self) -> int:
        self._index += 1
        state = np.random.SeedSequence([self._seed, self._index]).generate_state(1)[0]
        return int(state % (2**31 - 1))
