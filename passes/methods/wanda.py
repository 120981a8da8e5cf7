"""Wanda (Sun et al. 2023): score ``|W| * ||X_k||_2`` with ``||X_k||`` the L2 norm of input feature k over the
calibration data, compared within each output channel (or each row of blocks), as in the paper, because the scores
are only comparable there. Kept weights are unchanged."""
from __future__ import annotations

import numpy as np

from edge_sparse.passes.methods import InputNorm, PruningMethod, canonical_feature_norm, register

__all__ = ["Wanda"]


@register
class Wanda(PruningMethod):
    name = "wanda"
    summary = "|W| x input L2 norm, per output channel; needs calibration data"
    needs_calibration = True
    per_row = True
    preference = 1

    def statistic(self, layer):
        return InputNorm(layer.feature_axis)

    def score(self, layer, weight, statistic):
        if statistic is None:
            raise ValueError(f"{self.name} scoring needs the input-feature L2 norms from calibration")
        norm = canonical_feature_norm(layer, np.asarray(statistic))
        if norm.shape != (weight.shape[1],):
            raise ValueError(f"input norm has shape {norm.shape}, expected ({weight.shape[1]},)")
        return np.abs(weight.astype(np.float64)) * norm.astype(np.float64)[None, :]
