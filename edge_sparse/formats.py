"""Sparse weight formats: BSR Rx1 over output channels (R = 1 is CSR), N:M (2:4), conversion from dense, sizes.

Every format stores the weight of ``Y[M, N] = X[M, K] @ W[K, N]`` (a 1x1 conv is the same with K = C_in,
N = C_out). Blocks run over *output channels*: a BSR block is R consecutive output channels at one k, so a kernel
broadcasts one X value against an R-wide vector of weights (no data-dependent vector gathers, which TVM codegen turns
into scalar loads).

- ``BSR(R)``: ``indptr[NB + 1]``, ``indices[nnzb]`` (k of each block, ascending within a block row),
  ``data[nnzb, R]`` with NB = ceil(N / R); the last block row is zero-padded when R does not divide N.
  Arrays are never empty (a 100%-sparse weight keeps one zero block that ``indptr`` never reaches), so kernels
  always get valid buffers.
- ``NM(n, m)`` (2:4 by default): per output channel, every group of m consecutive k holds at most n nonzeros.
  ``vals[K'/m*n, N]`` (slot-major, output channels contiguous) and ``idx[K'/m*n, N]`` uint8 positions in 0..m-1,
  K' = K rounded up to m. A weight that violates the pattern has no N:M form (``to_nm`` returns None).

``KernelSpec`` describes one sparse layer to a target family's ``make_sparse_kernel(spec, preset)``.

This module sits below both ``passes/`` and ``targets/`` (numpy only): the sparsify pass converts weights with it, the
families' kernels read the layouts it defines.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "FORMATS", "KernelSpec", "BSR", "NM", "to_bsr", "to_nm", "bsr_block_density", "nm_fits",
    "dense_bytes", "convert", "bsr_rows", "describe", "SPARSE_MODES", "KERNEL_ATTR",
]

# format names as used by `--sparse` and in the per-layer report
FORMATS = ("bsr16x1", "bsr8x1", "bsr4x1", "csr", "2:4")
# `compile --sparse`: auto (measured or modelled choice per layer), off (all dense), or one format for every layer
SPARSE_MODES = ("auto", "off", *FORMATS)
# PrimFunc attribute naming a sparse kernel (its catalogue name); dense schedule rules and dlight leave these alone
KERNEL_ATTR = "edge_sparse.kernel"
_BSR_R = {"bsr16x1": 16, "bsr8x1": 8, "bsr4x1": 4, "csr": 1}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One sparse layer as a kernel request: ``Y[M, N] = act(X[M, K] @ W[K, N] + b)``.

    op: ``"matmul"`` (X is [M, K], M = product of the leading dims) or ``"conv1x1"`` (NCHW, X is
    [batch, K, N_spatial]; ``M`` is the batch, ``N`` the spatial size H*W and ``cout`` the output channels).
    format: one of FORMATS. ``R`` is the BSR block height (1 for csr); ``n``/``m`` the N:M pattern.
    nnz: stored blocks (BSR) or stored slots per output channel times channels (N:M).
    """

    op: str
    M: int
    K: int
    N: int
    format: str
    R: int = 1
    n: int = 2
    m: int = 4
    nnz: int = 0
    has_bias: bool = False
    activation: str | None = None       # None | "relu" | "gelu"
    dtype: str = "float32"
    cout: int = 0                       # conv1x1 only: output channels (the weight's N)

    @property
    def out_channels(self) -> int:
        return self.cout if self.op == "conv1x1" else self.N


@dataclasses.dataclass
class BSR:
    """Block-sparse rows over W^T: block = R output channels at one input channel k."""

    R: int
    K: int
    N: int
    data: np.ndarray      # [max(nnzb, 1), R] float32
    indices: np.ndarray   # [max(nnzb, 1)] int32
    indptr: np.ndarray    # [NB + 1] int32
    nnzb: int

    @property
    def format(self) -> str:
        return "csr" if self.R == 1 else f"bsr{self.R}x1"

    @property
    def nbytes(self) -> int:
        """Bytes stored (values + indices + row pointers)."""
        return int(self.nnzb * (self.R * 4 + 4) + self.indptr.size * 4)

    @property
    def density(self) -> float:
        nb = -(-self.N // self.R)
        return self.nnzb / max(1, nb * self.K)

    def arrays(self) -> list[np.ndarray]:
        return [self.data, self.indices, self.indptr]

    def to_dense(self) -> np.ndarray:
        nb = -(-self.N // self.R)
        w = np.zeros((self.K, nb * self.R), np.float32)
        for b in range(nb):
            for j in range(self.indptr[b], self.indptr[b + 1]):
                w[self.indices[j], b * self.R:(b + 1) * self.R] = self.data[j]
        return w[:, :self.N]


@dataclasses.dataclass
class NM:
    """N:M structured sparsity along k, per output channel."""

    n: int
    m: int
    K: int
    N: int
    vals: np.ndarray      # [S, N] float32, S = ceil(K/m)*n
    idx: np.ndarray       # [S, N] uint8 in 0..m-1

    @property
    def format(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def nnz(self) -> int:
        return int(self.vals.size)

    @property
    def nbytes(self) -> int:
        return int(self.vals.size * 4 + self.idx.size)

    def arrays(self) -> list[np.ndarray]:
        return [self.vals, self.idx]

    def to_dense(self) -> np.ndarray:
        S, N = self.vals.shape
        kp = S // self.n * self.m
        w = np.zeros((kp, N), np.float32)
        slot = np.arange(S)[:, None]
        k = slot // self.n * self.m + self.idx.astype(np.int64)
        np.add.at(w, (k, np.broadcast_to(np.arange(N), (S, N))), self.vals)
        return w[:self.K]


def _check_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"sparse formats take a 2-D weight [K, N], got shape {w.shape}")
    return np.ascontiguousarray(w, dtype=np.float32)


def _pad_n(w: np.ndarray, R: int) -> np.ndarray:
    K, N = w.shape
    nb = -(-N // R)
    if nb * R == N:
        return w
    out = np.zeros((K, nb * R), np.float32)
    out[:, :N] = w
    return out


def bsr_block_density(w: np.ndarray, R: int) -> float:
    """Fraction of Rx1 blocks (R output channels at one k) that hold a nonzero."""
    w = _check_weight(w)
    K, N = w.shape
    if K == 0 or N == 0:
        return 0.0
    wp = _pad_n(w, R)
    nz = np.any(wp.T.reshape(-1, R, K) != 0, axis=1)
    return float(nz.mean())


def to_bsr(w: np.ndarray, R: int) -> BSR:
    """Dense W[K, N] -> BSR with Rx1 blocks over output channels (R = 1: CSR over W^T)."""
    if R not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"unsupported BSR block height {R}")
    w = _check_weight(w)
    K, N = w.shape
    wb = _pad_n(w, R).T.reshape(-1, R, K)                 # [NB, R, K]
    nz = np.any(wb != 0, axis=1)                          # [NB, K]
    indptr = np.concatenate([[0], np.cumsum(nz.sum(1))]).astype(np.int32)
    nb_idx, k_idx = np.nonzero(nz)                        # row-major: grouped by block row, k ascending
    nnzb = int(nb_idx.size)
    if nnzb:
        data = np.ascontiguousarray(wb[nb_idx, :, k_idx], dtype=np.float32)
        indices = k_idx.astype(np.int32)
    else:
        data = np.zeros((1, R), np.float32)
        indices = np.zeros((1,), np.int32)
    return BSR(R=R, K=K, N=N, data=data, indices=indices, indptr=indptr, nnzb=nnzb)


def nm_fits(w: np.ndarray, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive k of every output channel holds at most n nonzeros."""
    w = _check_weight(w)
    K, N = w.shape
    kp = -(-K // m) * m
    wp = np.zeros((kp, N), np.float32)
    wp[:K] = w
    return bool(((wp.reshape(kp // m, m, N) != 0).sum(1) <= n).all())


def to_nm(w: np.ndarray, n: int = 2, m: int = 4) -> NM | None:
    """Dense W[K, N] -> N:M (None when the weight violates the pattern). Unused slots hold value 0 at position 0."""
    w = _check_weight(w)
    K, N = w.shape
    if not nm_fits(w, n, m):
        return None
    kp = -(-K // m) * m
    g = kp // m
    wp = np.zeros((kp, N), np.float32)
    wp[:K] = w
    grp = wp.reshape(g, m, N)                             # [G, m, N]
    nzm = grp != 0
    # stable order of positions: nonzeros first (by position), then zeros
    order = np.argsort(~nzm, axis=1, kind="stable")[:, :n, :]      # [G, n, N]
    vals = np.take_along_axis(grp, order, axis=1)
    idx = np.where(vals != 0, order, 0).astype(np.uint8)
    return NM(n=n, m=m, K=K, N=N, vals=np.ascontiguousarray(vals.reshape(g * n, N)),
              idx=np.ascontiguousarray(idx.reshape(g * n, N)))


def convert(w: np.ndarray, fmt: str) -> BSR | NM | None:
    """Dense W[K, N] in format ``fmt`` (None: the weight does not fit the format, only possible for N:M)."""
    if fmt in _BSR_R:
        return to_bsr(w, _BSR_R[fmt])
    if fmt == "2:4":
        return to_nm(w, 2, 4)
    raise ValueError(f"unknown sparse format '{fmt}'; choose one of {', '.join(FORMATS)}")


def bsr_rows(fmt: str) -> int:
    return _BSR_R[fmt]


def dense_bytes(K: int, N: int) -> int:
    return int(K * N * 4)


def describe(w: np.ndarray) -> dict[str, Any]:
    """Sparsity of ``w`` per format: element sparsity, block sparsity per BSR height, whether 2:4 fits."""
    w = _check_weight(w)
    out: dict[str, Any] = {"element": float((w == 0).mean()) if w.size else 0.0}
    for fmt, R in _BSR_R.items():
        out[fmt] = 1.0 - bsr_block_density(w, R)
    out["2:4"] = nm_fits(w, 2, 4)
    return out
