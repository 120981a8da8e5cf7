"""Sparse formats and CPU sparse kernels against numpy, property-based over shapes, formats, sparsities, M.

Each kernel result is compared with float64 numpy of the same pruned weight: |y - ref| <= 1e-4 * (1 + max|ref|)
(float32 accumulation in a different order; GELU through a rational erf approximation with error < 2e-7).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sparse import targets
from edge_sparse import formats as F
from edge_sparse.targets.cpu import sparse as S

tvm = pytest.importorskip("tvm")

HOST = targets.get("host")
SPARSITIES = (0.0, 0.3, 0.5, 0.8, 0.95, 1.0)
_erf = np.vectorize(math.erf)


def prune(w: np.ndarray, fmt: str, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    """Zero random Rx1 blocks (BSR formats) or keep 2 of every 4 along k (2:4; sparsity >= 0.5 zeroes more)."""
    K, N = w.shape
    if fmt == "2:4":
        kp = -(-K // 4) * 4
        wp = np.zeros((kp, N), np.float32)
        wp[:K] = w
        g = wp.reshape(kp // 4, 4, N)
        drop = np.argsort(rng.random(g.shape), axis=1)[:, :2, :]
        np.put_along_axis(g, drop, 0.0, axis=1)
        wp[rng.random(wp.shape) < max(0.0, sparsity - 0.5) * 2] = 0.0
        return wp[:K].copy()
    R = F.bsr_rows(fmt)
    keep = rng.random((K, -(-N // R))) >= sparsity
    return (w * np.repeat(keep, R, axis=1)[:, :N]).astype(np.float32)


def reference(y: np.ndarray, activation: str | None) -> np.ndarray:
    if activation == "relu":
        return np.maximum(y, 0)
    if activation == "gelu":
        return y * 0.5 * (1 + _erf(y / math.sqrt(2)))
    return y


def run_kernel(pf, args_np, out_shape):
    ex = S.build_kernel(pf, HOST)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in args_np] + [tvm.runtime.empty(out_shape, "float32", dev)]
    ex["main"](*args)
    return args[-1].numpy()


def assert_close(out, ref):
    ref = np.asarray(ref, np.float64)
    tol = 1e-4 * (1.0 + float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(out - ref).max(initial=0.0))
    assert err <= tol, f"max error {err} > {tol}"


# ------------------------------------------------------------------------------------------------ formats
@settings(max_examples=60, deadline=None)
@given(K=st.integers(1, 40), N=st.integers(1, 40), fmt=st.sampled_from(F.FORMATS),
       sparsity=st.sampled_from(SPARSITIES), seed=st.integers(0, 2**16))
def test_format_roundtrip_and_size(K, N, fmt, sparsity, seed):
    rng = np.random.default_rng(seed)
    w = prune(rng.standard_normal((K, N)).astype(np.float32), fmt, sparsity, rng)
    obj = F.convert(w, fmt)
    assert obj is not None
    np.testing.assert_array_equal(obj.to_dense(), w)
    if isinstance(obj, F.BSR):
        R = obj.R
        nb = -(-N // R)
        assert obj.nnzb == int(np.any(np.pad(w, ((0, 0), (0, nb * R - N))).T.reshape(nb, R, K) != 0, axis=1).sum())
        assert obj.nbytes == obj.nnzb * (4 * R + 4) + 4 * (nb + 1)
        assert np.all(np.diff(obj.indptr) >= 0) and obj.indptr[-1] == obj.nnzb
    else:
        assert obj.nbytes == obj.vals.size * 5 and obj.vals.shape == (-(-K // 4) * 2, N)


def test_nm_rejects_dense_weight():
    w = np.ones((8, 3), np.float32)
    assert F.to_nm(w) is None and not F.nm_fits(w)
    assert F.describe(w)["2:4"] is False and F.describe(w)["element"] == 0.0


def test_bsr_size_shrinks_with_sparsity():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    sizes = [F.to_bsr(prune(w, "bsr16x1", s, rng), 16).nbytes for s in (0.0, 0.5, 0.9)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 0.15 * F.dense_bytes(256, 256)


# ------------------------------------------------------------------------------------------------ kernels
M_VALUES = st.one_of(st.just(1), st.integers(2, 9), st.integers(10, 70))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=M_VALUES, K=st.integers(1, 72), N=st.integers(1, 72), fmt=st.sampled_from(F.FORMATS),
       sparsity=st.sampled_from(SPARSITIES), activation=st.sampled_from(S.ACTIVATIONS), seed=st.integers(0, 2**16))
def test_matmul_kernels_match_numpy(M, K, N, fmt, sparsity, activation, seed):
    rng = np.random.default_rng(seed)
    w = prune(rng.standard_normal((K, N)).astype(np.float32), fmt, sparsity, rng)
    b = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    obj = F.convert(w, fmt)
    R = obj.R if isinstance(obj, F.BSR) else 1
    nnz = obj.nnzb if isinstance(obj, F.BSR) else obj.nnz
    spec = F.KernelSpec("matmul", M, K, N, fmt, R=R, nnz=nnz, has_bias=True, activation=activation)
    pf = S.make_sparse_kernel(spec, HOST)
    assert pf is not None
    out = run_kernel(pf, [x, *obj.arrays(), b], (M, N))
    assert_close(out, reference(x.astype(np.float64) @ w + b, activation))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(Bt=st.integers(1, 2), HW=st.integers(1, 80), K=st.integers(1, 48), C=st.integers(1, 48),
       fmt=st.sampled_from(("bsr16x1", "bsr8x1", "bsr4x1", "csr")), sparsity=st.sampled_from(SPARSITIES),
       activation=st.sampled_from(S.ACTIVATIONS), seed=st.integers(0, 2**16))
def test_conv1x1_kernel_matches_numpy(Bt, HW, K, C, fmt, sparsity, activation, seed):
    rng = np.random.default_rng(seed)
    w = prune(rng.standard_normal((K, C)).astype(np.float32), fmt, sparsity, rng)
    b = rng.standard_normal(C).astype(np.float32)
    x = rng.standard_normal((Bt, K, HW)).astype(np.float32)
    obj = F.convert(w, fmt)
    spec = F.KernelSpec("conv1x1", Bt, K, HW, fmt, R=obj.R, nnz=obj.nnzb, has_bias=True, activation=activation,
                        cout=C)
    out = run_kernel(S.make_sparse_kernel(spec, HOST), [x, *obj.arrays(), b], (Bt, C, HW))
    ref = np.einsum("kc,bks->bcs", w.astype(np.float64), x) + b[None, :, None]
    assert_close(out, reference(ref, activation))


@pytest.mark.parametrize("fmt", F.FORMATS)
@pytest.mark.parametrize("M", [1, 128])
def test_realistic_shapes(fmt, M):
    """768 -> 3072 at 90% (the benchmark shape) and an all-zero weight, through the kernel the pass would pick."""
    rng = np.random.default_rng(1)
    for sparsity in (0.9, 1.0):
        w = prune(rng.standard_normal((768, 384)).astype(np.float32), fmt, sparsity, rng)
        x = rng.standard_normal((M, 768)).astype(np.float32)
        b = np.zeros(384, np.float32)
        obj = F.convert(w, fmt)
        R = obj.R if isinstance(obj, F.BSR) else 1
        nnz = obj.nnzb if isinstance(obj, F.BSR) else obj.nnz
        spec = F.KernelSpec("matmul", M, 768, 384, fmt, R=R, nnz=nnz, activation="relu")
        out = run_kernel(S.make_sparse_kernel(spec, HOST), [x, *obj.arrays(), b], (M, 384))
        assert_close(out, reference(x.astype(np.float64) @ w, "relu"))


def test_gelu_epilogue_accuracy_over_range():
    """The vectorised erf: GELU within 1e-6 of the exact one on [-8, 8] (beyond |x/sqrt2| = 4 erf saturates)."""
    x = np.linspace(-8, 8, 4097, dtype=np.float32).reshape(1, -1)
    eye = F.to_bsr(np.eye(1, dtype=np.float32), 1)
    spec = F.KernelSpec("matmul", x.shape[1], 1, 1, "csr", R=1, nnz=1, activation="gelu")
    out = run_kernel(S.make_sparse_kernel(spec, HOST), [x.T.copy(), *eye.arrays(), np.zeros(1, np.float32)],
                     (x.shape[1], 1))
    ref = reference(x.T.astype(np.float64), "gelu")
    assert float(np.abs(out - ref).max()) < 1e-6


@pytest.mark.parametrize("preset_name", ["rpi4", "rpi5"])
def test_kernels_cross_compile_for_arm(preset_name, tmp_path):
    """Every kernel kind compiles for the AArch64 presets (NEON tiles) and links with the cross g++."""
    from tvm.support import cc

    preset = targets.get(preset_name)
    cxx = targets.cross_compiler_or_error(preset)
    rng = np.random.default_rng(0)
    w = prune(rng.standard_normal((64, 48)).astype(np.float32), "2:4", 0.5, rng)
    specs = []
    for fmt in F.FORMATS:
        obj = F.convert(w, fmt)
        R = obj.R if isinstance(obj, F.BSR) else 1
        nnz = obj.nnzb if isinstance(obj, F.BSR) else obj.nnz
        for M in (1, 5, 128):
            specs.append(F.KernelSpec("matmul", M, 64, 48, fmt, R=R, nnz=nnz, activation="gelu"))
        if fmt != "2:4":
            specs.append(F.KernelSpec("conv1x1", 1, 64, 49, fmt, R=R, nnz=nnz, activation="relu", cout=48))
    names = set()
    for i, spec in enumerate(specs):
        pf = S.make_sparse_kernel(spec, preset)
        assert pf is not None
        names.add(S.kernel_name(spec, preset))
        ex = S.build_kernel(pf, preset)
        if i % 4 == 0:  # linking every one costs seconds each; a sample proves the objects are AArch64
            so = tmp_path / f"k{i}.so"
            ex.export_library(str(so), fcompile=cc.cross_compiler(cxx))
            assert so.read_bytes()[18] == 183   # ELF e_machine = EM_AARCH64
    assert names == {"bsr_gemv", "bsr_rows", "bsr_gemm_t", "bsr_conv1x1", "nm_gemv", "nm_gemm_t"}
