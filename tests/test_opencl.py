"""OpenCL sparse kernels and the replay harness, run on a real OpenCL runtime (PoCL in CI) against numpy.

Every kernel is compiled by TVM for the mali/adreno targets, its OpenCL C and launch geometry captured from the
TIR (edge_sparse.targets.opencl.check), and executed through pyopencl. Reference: numpy in float64. Tolerance:
atol = 2e-6 * K (fp32 sums of K products of N(0, 1) values, accumulated in a different order), rtol = 1e-5.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from edge_sparse.targets.opencl import check as oc
from edge_sparse import targets
from edge_sparse.formats import KernelSpec, to_bsr
from edge_sparse.targets.opencl import kernels

R_OF = {"csr": 1, "bsr4x1": 4, "bsr8x1": 8, "bsr16x1": 16}


@pytest.fixture(scope="module")
def ctx():
    if not oc.opencl_devices():
        pytest.fail("no OpenCL device: CI needs PoCL (apt-get install pocl-opencl-icd)")
    return oc.default_context()


def _pruned(rng, K, N, R, sparsity):
    """W[K, N] with a fraction ``sparsity`` of its Rx1 blocks (R output channels at one k) zero."""
    w = rng.standard_normal((K, N)).astype(np.float32)
    nb = -(-N // R)
    keep = rng.random((K, nb)) >= sparsity
    return w * np.repeat(keep, R, axis=1)[:, :N]


def _gelu(v):
    return v * 0.5 * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))


def _epilogue(y, b, has_bias, act):
    if has_bias:
        y = y + b
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "gelu":
        y = _gelu(y)
    return y


def _run(f, args, ctx, preset="mali"):
    return oc.run_primfunc(f, preset, args, ctx=ctx)[-1]


def _tol(K):
    return dict(atol=2e-6 * K, rtol=1e-5)


# (M, K, N, format, sparsity, bias, activation): GEMV (M <= 4), GEMM (M > 4), ragged N (N % R != 0),
# ragged M (M % rows-per-group != 0), all-zero weights, dense weights (0% sparse), every format.
MATMUL_CASES = [
    (1, 64, 48, "bsr16x1", 0.8, True, None),
    (1, 96, 50, "bsr4x1", 0.5, False, None),        # N % R != 0
    (1, 128, 33, "csr", 0.9, True, "relu"),
    (2, 64, 40, "bsr8x1", 0.0, True, "gelu"),       # no zeros at all
    (3, 32, 24, "csr", 1.0, True, None),            # everything pruned: only the bias remains
    (4, 200, 64, "bsr16x1", 0.5, False, "relu"),
    (1, 512, 48, "bsr16x1", 0.3, True, None),       # long rows: 256-thread work-groups
    (5, 64, 48, "bsr16x1", 0.9, True, None),
    (37, 96, 40, "bsr4x1", 0.5, True, "gelu"),
    (37, 96, 40, "csr", 0.9, True, None),
    (64, 128, 72, "bsr8x1", 0.8, False, "relu"),
    (128, 64, 56, "bsr16x1", 0.7, True, None),      # 56 % 16 != 0
    (130, 72, 32, "csr", 0.5, False, None),
]


# both presets get the same kernel source; adreno is sampled on a GEMV and a GEMM case
CASES_BY_PRESET = [("mali", *c) for c in MATMUL_CASES] + [("adreno", *c) for c in MATMUL_CASES if c[0] in (1, 37)]


@pytest.mark.parametrize("preset,M,K,N,fmt,sparsity,bias,act", CASES_BY_PRESET)
def test_sparse_matmul_matches_numpy(ctx, preset, M, K, N, fmt, sparsity, bias, act):
    rng = np.random.default_rng(M * 1000 + K + N)
    R = R_OF[fmt]
    w = _pruned(rng, K, N, R, sparsity)
    x = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    bsr = to_bsr(w, R)
    spec = KernelSpec(op="matmul", M=M, K=K, N=N, format=fmt, R=R, nnz=bsr.nnzb, has_bias=bias, activation=act)
    f = kernels.make_sparse_kernel(spec, targets.get(preset))
    assert f is not None
    ref = _epilogue(x.astype(np.float64) @ w, b, bias, act)
    got = _run(f, [x, *bsr.arrays(), b, np.zeros((M, N), np.float32)], ctx, preset)
    np.testing.assert_allclose(got, ref, **_tol(K))


@pytest.mark.parametrize("stage_x", [True, False])
@pytest.mark.parametrize("gemm", [False, True])
def test_x_staging_variants_agree(ctx, stage_x, gemm):
    """Both the local-memory-staged and the direct-X code paths (forced) give the numpy result."""
    rng = np.random.default_rng(7)
    M, K, N, R = (24, 300, 40, 4) if gemm else (2, 300, 40, 4)   # K > staged chunk: several chunks in GEMM
    w = _pruned(rng, K, N, R, 0.6)
    x = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    bsr = to_bsr(w, R)
    make = kernels.bsr_gemm if gemm else kernels.bsr_gemv
    f = make(M, K, N, R, bsr.nnzb, bias=True, stage_x=stage_x)
    got = _run(f, [x, *bsr.arrays(), b, np.zeros((M, N), np.float32)], ctx)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + b, **_tol(K))


CONV_CASES = [
    (1, 24, 49, 40, "bsr8x1", 0.7, True, "relu"),     # 7x7 pixels, cout % R != 0
    (2, 32, 64, 32, "bsr16x1", 0.9, False, None),     # batch 2
    (1, 16, 100, 20, "csr", 0.5, True, None),
    (1, 64, 196, 64, "bsr4x1", 0.8, True, "gelu"),
]


@pytest.mark.parametrize("B,K,P,cout,fmt,sparsity,bias,act", CONV_CASES)
def test_sparse_conv1x1_matches_numpy(ctx, B, K, P, cout, fmt, sparsity, bias, act):
    rng = np.random.default_rng(K + P + cout)
    R = R_OF[fmt]
    w = _pruned(rng, K, cout, R, sparsity)                 # W[K, cout] (= conv weight[cout, K, 1, 1] transposed)
    x = rng.standard_normal((B, K, P)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    bsr = to_bsr(w, R)
    spec = KernelSpec(op="conv1x1", M=B, K=K, N=P, format=fmt, R=R, nnz=bsr.nnzb, has_bias=bias, activation=act,
                      cout=cout)
    f = kernels.make_sparse_kernel(spec, targets.get("mali"))
    ref = np.einsum("kc,bkp->bcp", w.astype(np.float64), x)
    ref = _epilogue(ref, b[None, :, None], bias, act)
    got = _run(f, [x, *bsr.arrays(), b, np.zeros((B, cout, P), np.float32)], ctx)
    np.testing.assert_allclose(got, ref, **_tol(K))


def test_unsupported_specs_decline():
    mali = targets.get("mali")
    assert kernels.make_sparse_kernel(KernelSpec(op="matmul", M=1, K=8, N=8, format="2:4", nnz=8), mali) is None
    assert kernels.make_sparse_kernel(KernelSpec(op="matmul", M=1, K=8, N=8, format="csr", nnz=8,
                                                 dtype="float16"), mali) is None
    assert kernels.make_sparse_kernel(KernelSpec(op="matmul", M=1, K=8, N=8, format="csr", nnz=8,
                                                 activation="silu"), mali) is None


def test_kernels_stay_within_target_limits():
    """Work-group size and local memory fit what the Adreno/Mali targets advertise (256 threads, 16 KiB)."""
    rng = np.random.default_rng(0)
    for M, fmt in [(1, "csr"), (4, "bsr16x1"), (64, "csr"), (64, "bsr16x1"), (128, "bsr4x1")]:
        R = R_OF[fmt]
        bsr = to_bsr(_pruned(rng, 512, 64, R, 0.5), R)
        f = kernels.make_sparse_kernel(KernelSpec(op="matmul", M=M, K=512, N=64, format=fmt, R=R, nnz=bsr.nnzb,
                                                  has_bias=True), targets.get("adreno"))
        _, plan = oc.plan_primfunc(f, "adreno")
        for ln in plan.launches:
            assert int(np.prod(ln.local_size)) <= 256, (M, fmt, ln)
        local_floats = sum(int(n) for n in re.findall(r"__local float \w+\[(\d+)\]", plan.source))
        assert local_floats * 4 <= 16384, (M, fmt, local_floats)


# -------------------------------------------------------------------------------------------- harness itself
def test_plan_roundtrip_and_corruption_is_detected(ctx, tmp_path):
    """A saved plan replays identically; a corrupted constant changes the result (the check can fail)."""
    from tvm import relax

    M, K, N = 4, 32, 16
    rng = np.random.default_rng(1)
    w = rng.standard_normal((K, N)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, relax.const(w))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    _, plan = oc.capture(bb.get(), "mali")
    xin = rng.standard_normal((M, K)).astype(np.float32)
    ref = np.maximum(xin @ w, 0)
    got = oc.Replayer(plan, ctx).run({"x": xin})["output0"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    again = oc.LaunchPlan.load(plan.save(tmp_path / "plan"))
    np.testing.assert_array_equal(oc.Replayer(again, ctx).run({"x": xin})["output0"], got)
    cid = next(iter(again.consts))
    again.consts[cid] = again.consts[cid] + 1.0
    bad = oc.Replayer(again, ctx).run({"x": xin})["output0"]
    assert np.max(np.abs(bad - ref)) > 1e-2


def test_timing_reports_every_launch(ctx):
    rng = np.random.default_rng(2)
    w = _pruned(rng, 64, 32, 4, 0.5)
    bsr = to_bsr(w, 4)
    f = kernels.bsr_gemv(1, 64, 32, 4, bsr.nnzb, bias=True)
    _, plan = oc.plan_primfunc(f, "mali")
    rep = oc.Replayer(plan, ctx, profile=True)
    args = [rng.standard_normal((1, 64)).astype(np.float32), *bsr.arrays(), np.zeros(32, np.float32),
            np.zeros((1, 32), np.float32)]
    t = rep.time_launches(args, warmup=1, repeat=3)
    assert len(t["launches"]) == len(plan.launches) == 1
    assert t["launches"][0]["median_us"] > 0 and t["total_us_median"] > 0


def test_kernels_follow_a_toml_presets_limits(tmp_path, ctx):
    """A user's GPU preset with smaller work-groups / local memory gets kernels within them, still correct."""
    toml = tmp_path / "small_gpu.toml"
    toml.write_text('name = "small-gpu"\nfamily = "opencl"\narch = "aarch64"\n\n[target]\nkind = "opencl"\n'
                    'device = "mali"\nmax_num_threads = 128\nmax_shared_memory_per_block = 4096\n\n'
                    '[host]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\n')
    preset = targets.get(None, toml)
    rng = np.random.default_rng(5)
    M, K, N, R = 1, 1024, 32, 16                   # long rows: the default would use 256 threads
    w = _pruned(rng, K, N, R, 0.3)
    bsr = to_bsr(w, R)
    f = kernels.make_sparse_kernel(KernelSpec(op="matmul", M=M, K=K, N=N, format="bsr16x1", R=R, nnz=bsr.nnzb,
                                              has_bias=True), preset)
    _, plan = oc.plan_primfunc(f, preset)
    assert all(int(np.prod(ln.local_size)) <= 128 for ln in plan.launches)
    local_floats = sum(int(n) for n in re.findall(r"__local float \w+\[(\d+)\]", plan.source))
    assert local_floats * 4 <= 4096
    x = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    got = _run(f, [x, *bsr.arrays(), b, np.zeros((M, N), np.float32)], ctx, preset)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + b, **_tol(K))
