"""SparseGPT-style reconstruction (Frantar & Alistarh 2023): the mask and the kept weights are both chosen to keep the
layer's output, using the Hessian ``H = X^T X`` of its calibration inputs.

Columns are processed in chunks of :data:`BLOCK`; in each chunk the mask is chosen from the OBS saliency
``w^2 / [H^-1]_jj^2`` in the layer's pattern (unstructured: lowest saliencies of the chunk; ``Rx1``: summed over each
group of R output rows, which share the Hessian; ``N:M``: per row in runs of M columns), then every pruned weight's
error is pushed onto the not-yet-processed columns through the Cholesky factor of ``H^-1`` (the optimal update of
the remaining weights) so that later choices see the updated weights. Once the mask is fixed, :func:`refit` solves
each row's kept weights exactly (least squares on the support: the OBS pass compensates each dropped weight only
with the columns after it, 2-8x above that optimum on correlated inputs). Damping: ``DAMP`` x mean(diag H) on the
diagonal, a ridge toward the weights being reconstructed (inputs that are always zero on the calibration data get a
unit diagonal: their weights are judged by magnitude, not dropped wholesale, since other data may use them).

Target: with :class:`Hessian` fed pairs (input from the already-pruned upstream graph ``x_p``, dense input
``x_d``), the layer reproduces the *dense* layer's output: ``W* = W_d (C + lam I) (H + lam I)^-1``
(``C = X_d^T X_p``, ``lam`` the damping: ridge toward ``W_d``, so ``W* = W_d`` when nothing upstream changed) is
reconstructed, so errors from earlier layers are corrected too. With a bias (refit), the inputs carry a constant 1:
the bias is the last column, never pruned, updated with the others. Rows of padded positions (a token mask among the
model's inputs, :func:`edge_sparse.passes.calibrate.token_mask_input`) are left out of every moment.
:func:`edge_sparse.passes.reconstruct.reconstruct` drives the layers in graph order (``sequential``).
"""
from __future__ import annotations

import numpy as np

from edge_sparse.passes.calibrate import token_rows
from edge_sparse.passes.methods import PruningMethod, Statistic, register
from edge_sparse.passes.prune_masks import Pattern, mask

__all__ = ["SparseGPT", "Hessian", "obs_prune", "refit", "rows_of", "BLOCK", "DAMP", "MAX_ROWS"]

BLOCK = 128                # columns per chunk (a multiple of every N:M group size we accept: 2, 4, 8)
DAMP = 0.3                 # fraction of mean(diag H) added to the diagonal: a ridge toward the dense weights. 0.3
#                            measured best of 0.01 / 0.1 / 0.3 / 1 on held-out data (MiniLM 50%, 64 calibration
#                            passages: cosine 0.898 / 0.919 / 0.921 / 0.915; PP-OCR rec 30%: lines 0.930 -> 0.946;
#                            cls 50%: 0.987 -> 0.990): with as few calibration rows as a prune gets, a weak ridge
#                            fits the calibration set, not the model (benchmarks/results/recovery/README.md)
MAX_ROWS = 2048            # input rows taken from each calibration batch (evenly strided): bounds memory and time


def rows_of(layer, activation: np.ndarray) -> np.ndarray:
    """The layer's input as ``[rows, K]`` in the canonical column order (a conv's patches: Cin x kh x kw)."""
    x = np.asarray(activation, dtype=np.float64)
    conv = getattr(layer, "conv", None)
    if layer.op != "Conv":
        return np.moveaxis(x, layer.feature_axis, -1).reshape(-1, x.shape[layer.feature_axis])
    kernel = tuple(layer.weight_shape[2:])
    nd = len(kernel)
    conv = conv or {}
    strides = conv.get("strides") or [1] * nd
    dil = conv.get("dilations") or [1] * nd
    pads = conv.get("pads") or [0] * 2 * nd
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0), *[(pads[i], pads[i + nd]) for i in range(nd)]])
    if all(k == 1 for k in kernel):
        patches = x[(slice(None), slice(None), *[slice(None, None, s) for s in strides])]
        return np.moveaxis(patches, 1, -1).reshape(-1, x.shape[1])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None), *[slice(None, None, s) for s in strides],
               *[slice(None, None, d) for d in dil])]                  # [B, C, out..., k...]
    b, c = win.shape[:2]
    out = win.shape[2:2 + nd]
    win = np.moveaxis(win, 1, 1 + nd)                                   # [B, out..., C, k...]
    return win.reshape(b * int(np.prod(out)), c * int(np.prod(kernel)))


class Hessian(Statistic):
    """``H = mean(x_p x_p^T)``, ``C = mean(x_d x_p^T)`` and ``Hd = mean(x_d x_d^T)`` over the inputs with a constant 1
    appended (bias column);
    ``update(a)`` is the dense case (``x_p = x_d``, then C is H). At most :data:`MAX_ROWS` rows per batch."""

    def __init__(self, layer, max_rows: int = MAX_ROWS):
        self.layer, self.max_rows = layer, max_rows
        self.H = self.C = self.Hd = None
        self.n = 0
        self.paired = False

    def _rows(self, activation, tokens):
        x = rows_of(self.layer, activation)
        real = token_rows(tokens, activation, self.layer.feature_axis)
        if real is not None and len(real) == len(x):       # a conv's output positions line up only at stride 1
            x = x[real]
        if len(x) > self.max_rows:
            x = x[np.linspace(0, len(x) - 1, self.max_rows).astype(np.int64)]
        return np.hstack([x, np.ones((len(x), 1))])

    def update(self, activation: np.ndarray, tokens: np.ndarray | None = None) -> None:
        self.update_pair(activation, None, tokens)

    def update_pair(self, pruned: np.ndarray, dense: np.ndarray | None, tokens: np.ndarray | None = None) -> None:
        xp = self._rows(pruned, tokens)
        if self.H is None:
            self.H = np.zeros((xp.shape[1], xp.shape[1]))
        self.H += xp.T @ xp
        if dense is not None:
            xd = self._rows(dense, tokens)
            if self.C is None:
                self.C, self.Hd = np.zeros_like(self.H), np.zeros_like(self.H)
            self.C += xd.T @ xp
            self.Hd += xd.T @ xd
            self.paired = True
        self.n += len(xp)

    def result(self) -> dict:
        if self.H is None:
            raise ValueError("no calibration batches reached this statistic")
        H = self.H / self.n
        if not self.paired:
            return {"H": H, "C": None, "Hd": H, "rows": self.n}
        return {"H": H, "C": self.C / self.n, "Hd": self.Hd / self.n, "rows": self.n}


def _damping(H: np.ndarray, damp: float) -> float:
    """What :func:`_damped` adds to the diagonal: ``damp`` x its mean (an always-zero input counting as 1)."""
    d = np.diag(H)
    return damp * float(np.mean(np.where(d <= 0, 1.0, d)))


def _damped(H: np.ndarray, damp: float) -> np.ndarray:
    lam = _damping(H, damp)
    H = H.copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += lam
    return H


def _inverse_cholesky_upper(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with ``U^T U = (H + damping)^-1``; damping grows until the factorisation succeeds."""
    for attempt in range(6):
        try:
            Hd = _damped(H, damp * 10 ** attempt)
            Linv = np.linalg.inv(np.linalg.cholesky(Hd))
            return np.linalg.cholesky(Linv.T @ Linv).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Hessian is not positive definite even after damping")


def obs_prune(W: np.ndarray, H: np.ndarray, pattern: Pattern, sparsity: float, keep_last: int = 0,
              damp: float = DAMP, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(updated W, keep mask) for canonical ``W [N, K']`` and its input Hessian ``H [K', K']``; the last
    ``keep_last`` columns (the bias) are never pruned but are updated."""
    W = W.astype(np.float64).copy()
    n_out, kp = W.shape
    k = kp - keep_last
    U = _inverse_cholesky_upper(H, damp)
    keep = np.ones((n_out, kp), dtype=bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        E = np.zeros_like(W1)
        sal = (W1 / np.diag(U1)[None, :]) ** 2
        m1 = mask(sal, pattern, sparsity, per_row=False)
        keep[:, i1:i2] = m1
        for j in range(i2 - i1):
            w = W1[:, j]
            q = np.where(m1[:, j], w, 0.0)
            e = (w - q) / U1[j, j]
            W1[:, j:] -= np.outer(e, U1[j, j:])
            W1[:, j] = q
            E[:, j] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= E @ U[i1:i2, i2:]
    W[:, :k][~keep[:, :k]] = 0.0
    return W, keep


def refit(W: np.ndarray, H: np.ndarray, keep: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The best weights on a fixed support: per output row, ``w`` zero outside ``keep`` minimising
    ``(w - w_r)^T (H + lam I) (w - w_r)`` (the layer's output error against ``W`` on the calibration inputs, plus the
    damping as a ridge toward ``W``): ``w_S = w_S + A^-1 B w_D`` with ``A = H'_SS``, ``B = H'_SD``, D the dropped
    columns. The OBS pass only pushes each dropped weight's error onto the columns after it; this solves for all kept
    columns at once. Rows sharing a support (R x 1 blocks) are solved together."""
    Hd = _damped(H, damp)
    W = W.astype(np.float64)
    out = np.where(keep, W, 0.0)
    groups: dict[bytes, list[int]] = {}
    for r in range(W.shape[0]):
        groups.setdefault(np.packbits(keep[r]).tobytes(), []).append(r)
    for rows in groups.values():
        s, d = keep[rows[0]], ~keep[rows[0]]
        if not s.any() or not d.any():
            continue
        delta = np.linalg.solve(Hd[np.ix_(s, s)], Hd[np.ix_(s, d)] @ W[np.ix_(rows, d)].T)
        out[np.ix_(rows, np.flatnonzero(s))] = W[np.ix_(rows, s)] + delta.T
    return out


@register
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    summary = ("OBS reconstruction: mask from w^2/[H^-1]_jj^2, kept weights and bias updated to reproduce the dense "
               "layer's output, layers in order on the pruned graph's inputs; needs calibration data")
    needs_calibration = True
    updates_weights = True
    sequential = True
    damp = DAMP             # the ridge toward the dense weights, as a fraction of mean(diag H)
    preference = 2          # the default with real calibration data: closer to dense than the mask-only default on MiniLM, PP-OCR
    #                         rec and cls on held-out data (benchmarks/results/recovery)

    def statistic(self, layer):
        return Hessian(layer)

    def score(self, layer, weight, statistic):
        d = np.diag(statistic["H"])[:weight.shape[1]] if statistic is not None else np.ones(weight.shape[1])
        return np.abs(weight.astype(np.float64)) * np.sqrt(np.maximum(d, 0))[None, :]

    def reconstruct(self, layer, weight: np.ndarray, bias: np.ndarray | None, pattern: Pattern, sparsity: float,
                    statistic: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """(pruned canonical weight, refitted bias or None) reproducing the dense layer ``weight x + bias``."""
        H, C = statistic["H"], statistic["C"]
        k = weight.shape[1]
        if H.shape[0] != k + 1:
            raise ValueError(f"Hessian of {layer.name} has {H.shape[0] - 1} columns, the weight {k}")
        if bias is None:
            W0, H, C = weight.astype(np.float64), H[:k, :k], (C[:k, :k] if C is not None else None)
        else:
            W0 = np.hstack([weight.astype(np.float64), bias.reshape(-1, 1).astype(np.float64)])
        if C is not None:              # dense-output target: W* = W_d (C + lam I) (H + lam I)^-1
            # ridge toward the dense weight, not toward zero: with x_p = x_d (C = H) W* is exactly W_d, and input
            # directions the calibration data hardly spans keep their dense weights instead of being shrunk away
            dead = np.diag(H) <= 0
            lam = _damping(H, self.damp)
            target = np.linalg.solve(_damped(H, self.damp), (C + lam * np.eye(len(C))).T @ W0.T).T
            # an input that is always zero here may not be elsewhere: keep its weights rather than the solve's zeros
            W0 = np.where(dead[None, :], W0, target)
        _, keep = obs_prune(W0, H, pattern, sparsity, keep_last=0 if bias is None else 1, damp=self.damp)
        W = refit(W0, H, keep, damp=self.damp)
        if bias is None:
            return W.astype(weight.dtype), None
        return W[:, :k].astype(weight.dtype), W[:, k].astype(bias.dtype)

    def prune(self, layer, weight, pattern, sparsity, statistic=None):
        if statistic is None:
            raise ValueError(f"{self.name} needs the input Hessian from calibration")
        return self.reconstruct(layer, weight, None, pattern, sparsity, statistic)[0]
