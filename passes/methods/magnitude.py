"""Magnitude pruning: drop the smallest ``|W|`` across the whole layer. Needs no calibration data."""
from __future__ import annotations

import numpy as np

from edge_sparse.passes.methods import PruningMethod, register

__all__ = ["Magnitude"]


@register
class Magnitude(PruningMethod):
    name = "magnitude"
    summary = "|W|, compared across the layer; no calibration data"

    def score(self, layer, weight, statistic):
        return np.abs(weight.astype(np.float64))
