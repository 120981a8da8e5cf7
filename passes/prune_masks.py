"""Pruning masks in the patterns the sparse kernels accelerate, computed on a canonical ``[N_out, K_in]`` matrix.

Every prunable weight is viewed as a matrix with one row per output channel and one column per reduction (input)
feature: MatMul ``W[K, N]`` -> ``W.T``; Gemm ``transB=1`` ``W[N, K]`` as is; Conv ``W[Cout, Cin, kh, kw]`` ->
``[Cout, Cin*kh*kw]``. In that view:

- ``unstructured``: any element.
- ``Rx1`` blocks: R consecutive output channels (rows) at one input feature (column), the BSR blocks of the kernels.
- ``N:M``: in every run of M consecutive input features of one output channel, keep N (2:4 keeps 2 of 4).

Scores come from a pruning method (:mod:`edge_sparse.passes.methods`); :func:`mask` keeps the highest ones, across
the layer or within each output channel (``per_row``).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from edge_sparse.errors import UserError

__all__ = ["Pattern", "parse_pattern", "to_canonical", "from_canonical", "mask"]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """``kind`` is ``unstructured``, ``block`` (``rows`` x ``cols``: output x input channels) or ``nm``."""

    kind: str
    rows: int = 1
    n: int = 0
    m: int = 0
    cols: int = 1

    def __str__(self) -> str:
        if self.kind == "block":
            return f"{self.rows}x{self.cols}"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M patterns prune exactly 1 - N/M; the others take any sparsity."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


MAX_BLOCK_ROWS = 4096   # a block or N:M group larger than any layer's channel count is a typo


def parse_pattern(text: str) -> Pattern:
    """``unstructured`` | ``Rx1`` (``16x1``) | ``N:M`` (``2:4``); anything else is a UserError."""
    t = str(text).strip().lower()
    if t in ("unstructured", "1x1"):
        return Pattern("unstructured")
    m = re.fullmatch(r"(\d+)x(\d+)", t)
    if m:
        r, c = int(m.group(1)), int(m.group(2))
        if c == 1 and r > MAX_BLOCK_ROWS or c == 4 and r > MAX_BLOCK_ROWS:
            raise UserError(f"unknown pattern '{text[:40]}': block rows must be at most {MAX_BLOCK_ROWS}, "
                            f"e.g. 16x1, 8x1, 4x1 or 16x4")
        if c not in (1, 4) or r < 1 or (c == 4 and r % 4):
            raise UserError(f"unknown pattern '{text[:40]}': blocks are Rx1 (R output channels at one input, as the "
                            f"float BSR kernels use), e.g. 16x1, 8x1, 4x1, or Rx4 (R output channels x 4 consecutive "
                            f"inputs, as the int8 dot-product kernels use), e.g. 16x4")
        return Pattern("block", rows=r, cols=c)
    m = re.fullmatch(r"(\d+):(\d+)", t)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm or mm > MAX_BLOCK_ROWS:
            raise UserError(f"unknown pattern '{text[:40]}': N:M needs 0 < N < M <= {MAX_BLOCK_ROWS}, e.g. 2:4")
        return Pattern("nm", n=n, m=mm)
    raise UserError(f"unknown pattern '{text}': use unstructured, Rx1 blocks (16x1, 8x1, 4x1), Rx4 blocks (16x4) "
                    f"or N:M (2:4)")


def to_canonical(weight: np.ndarray, op: str, trans_b: bool = False) -> np.ndarray:
    """The ``[N_out, K_in]`` view of a MatMul / Gemm / Conv weight (a copy or a view; do not write through it)."""
    if op == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if op == "Gemm" and trans_b:
        return weight
    return weight.T


def from_canonical(matrix: np.ndarray, shape: tuple[int, ...], op: str, trans_b: bool = False) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back to the weight's own layout and ``shape``."""
    if op == "Conv":
        return matrix.reshape(shape)
    if op == "Gemm" and trans_b:
        return matrix.reshape(shape)
    return np.ascontiguousarray(matrix.T).reshape(shape)


def _lowest(scores: np.ndarray, count: int, axis_groups: bool) -> np.ndarray:
    """Boolean array, True at the ``count`` lowest scores (per row when ``axis_groups``, else over everything)."""
    drop = np.zeros(scores.shape, dtype=bool)
    if count <= 0:
        return drop
    if axis_groups:
        idx = np.argsort(scores, axis=1, kind="stable")[:, :count]
        np.put_along_axis(drop, idx, True, axis=1)
    else:
        flat = np.argsort(scores.reshape(-1), kind="stable")[:count]
        drop.reshape(-1)[flat] = True
    return drop


def mask(scores: np.ndarray, pattern: Pattern, sparsity: float, per_row: bool) -> np.ndarray:
    """Keep-mask (True = keep) over a canonical ``[N, K]`` score matrix.

    ``per_row``: compare scores within each output channel (for blocks: within each row of R channels) instead of
    across the layer. N:M is always per output channel. ``sparsity`` is ignored for N:M (it is 1 - N/M).
    """
    n_out, k_in = scores.shape
    if pattern.kind == "nm":
        m, keep_n = pattern.m, pattern.n
        groups = -(-k_in // m)
        padded = np.full((n_out, groups * m), -np.inf)   # padding scores lowest, so a short tail group keeps its best
        padded[:, :k_in] = scores
        g = padded.reshape(n_out, groups, m)
        order = np.argsort(g, axis=2, kind="stable")
        drop = np.zeros(g.shape, dtype=bool)
        np.put_along_axis(drop, order[:, :, : m - keep_n], True, axis=2)
        return ~drop.reshape(n_out, groups * m)[:, :k_in]
    if sparsity <= 0.0:
        return np.ones(scores.shape, dtype=bool)
    if pattern.kind == "unstructured":
        count = int(round(sparsity * (k_in if per_row else scores.size)))
        return ~_lowest(scores, count, per_row)
    r, c = pattern.rows, pattern.cols
    blocks = -(-n_out // r)
    kb = -(-k_in // c)
    padded = np.zeros((blocks * r, kb * c))
    padded[:n_out, :k_in] = scores
    counts = np.full((blocks, kb), float(r * c))           # elements per block: a short tail block is not penalised
    counts[-1, :] = (n_out - (blocks - 1) * r) * c
    counts[:, -1] = counts[:, -1] / c * (k_in - (kb - 1) * c)
    block_scores = padded.reshape(blocks, r, kb, c).sum(axis=(1, 3)) / counts             # mean over the block
    count = int(round(sparsity * (kb if per_row else block_scores.size)))
    keep_blocks = ~_lowest(block_scores, count, per_row)
    return np.repeat(np.repeat(keep_blocks, r, axis=0), c, axis=1)[:n_out, :k_in]
