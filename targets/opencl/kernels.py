"""Sparse GPU kernels (OpenCL through TVM TIR) for BSR Rx1 / CSR weights: GEMV, GEMM and 1x1 convolution.

Weight format (passes.formats.BSR): block = R consecutive output channels at one k; ``data[nnzb, R]``,
``indices[nnzb]`` (k, ascending within a block row), ``indptr[NB + 1]``, NB = ceil(N / R); R = 1 is CSR.
Calling convention (shared with the CPU family, passes.formats.KernelSpec): ``X, data, indices, indptr, bias -> Y``;
the bias is always passed (zeros when the layer has none) and only added when ``spec.has_bias``.

Work mapping (one work-group per block row, so the j loop over a row's blocks is uniform in the group):
  * GEMV (M <= GEMV_MAX_M): threads (r, s): r over the R channels of the block (``data[j, r]`` loads coalesce),
    s splits the row's blocks (64..256 threads, about 16 blocks per lane); partial sums meet in a local-memory tree
    reduction. X is staged in local memory when the work-group would gather at least half of X anyway
    (density * M >= 0.5) and it fits.
  * GEMM: threads (r, t), each t owning MT rows of X: weights load once per group and broadcast over the rows,
    rows read X straight from global memory. Staging X chunk by chunk in local memory (coalesced loads, padded
    against bank conflicts) is available (``stage_x=True``) but off by default: it lost at 50-90% sparsity in every
    measurement (see ``bsr_gemm``).
  * 1x1 conv (NCHW, X[b, K, P]): threads over pixels p, R accumulators each; X[b, k, p] loads coalesce over p and
    ``data[j, :]`` is a broadcast, so no staging is needed.
Bias and relu/gelu are fused into the store. fp32 only (PoCL and many Mali drivers lack cl_khr_fp16).
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from edge_sparse.formats import KERNEL_ATTR

__all__ = ["make_sparse_kernel", "bsr_gemv", "bsr_gemm", "bsr_conv1x1", "gemv_threads", "GEMV_MAX_M"]

GEMV_MAX_M = 4
MAX_THREADS = 256            # Adreno/Mali targets: max_num_threads
LOCAL_BYTES = 8192            # local memory we allow ourselves per group (Adreno/Mali targets advertise 16 KiB)
FORMATS = {"csr": 1, "bsr4x1": 4, "bsr8x1": 8, "bsr16x1": 16}


def _epilogue(v, bias_v, activation):
    if bias_v is not None:
        v = v + bias_v
    if activation == "relu":
        return T.max(v, T.float32(0))
    if activation == "gelu":
        return v * T.float32(0.5) * (T.float32(1) + T.erf(v * T.float32(0.7071067811865476)))
    return v


def _density(nnzb: int, NB: int, K: int) -> float:
    return nnzb / max(1, NB * K)


def gemv_threads(R, blocks_per_row, max_threads=MAX_THREADS) -> int:
    """Work-group size for a GEMV: enough lanes that each handles <= ~16 of a row's blocks, 64..max_threads."""
    lanes = 1 << max(0, math.ceil(math.log2(max(1.0, blocks_per_row / 16))))
    return int(min(max_threads, max(64, R * lanes)))


def bsr_gemv(M, K, N, R, nnzb, *, bias=False, activation=None, threads=None, stage_x=None,
             max_threads=MAX_THREADS, local_bytes=LOCAL_BYTES):
    """Y[M, N] = act(X[M, K] @ W + b) for small M; one work-group per block row."""
    NB = -(-N // R)
    NNZ = max(nnzb, 1)
    if threads is None:
        threads = gemv_threads(R, nnzb / NB, max_threads)
    S = max(1, threads // R)                # lanes splitting a row's blocks
    LOGS = int(math.log2(S))
    assert 1 << LOGS == S, "threads / R must be a power of two"
    if stage_x is None:
        stage_x = M * K * 4 <= local_bytes and _density(nnzb, NB, K) * M >= 0.5
    XS = K if stage_x else 1
    NT = R * S
    has_bias, act = bias, activation

    @T.prim_func(private=True)
    def kernel(X: T.Buffer((M, K), "float32"), data: T.Buffer((NNZ, R), "float32"),
               indices: T.Buffer((NNZ,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
               B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: 1})
        for nb in T.thread_binding(NB, thread="blockIdx.x"):
            for s in T.thread_binding(S, thread="threadIdx.y"):
                for r in T.thread_binding(R, thread="threadIdx.x"):
                    red = T.alloc_buffer((M, S, R), "float32", scope="shared")
                    xs = T.alloc_buffer((M, XS), "float32", scope="shared")
                    acc = T.alloc_buffer((M,), "float32", scope="local")
                    if stage_x:
                        for it in range((M * K + NT - 1) // NT):
                            e: T.let = it * NT + s * R + r
                            if e < M * K:
                                xs[e // K, e % K] = X[e // K, e % K]
                        T.tvm_storage_sync("shared")
                    for m in range(M):
                        acc[m] = T.float32(0)
                    lo: T.let = indptr[nb]
                    for jj in range((indptr[nb + 1] - lo + S - 1) // S):
                        j: T.let = lo + jj * S + s
                        if j < indptr[nb + 1]:
                            w: T.let = data[j, r]
                            k: T.let = indices[j]
                            for m in range(M):
                                if stage_x:
                                    acc[m] = acc[m] + w * xs[m, k]
                                else:
                                    acc[m] = acc[m] + w * X[m, k]
                    for m in range(M):
                        red[m, s, r] = acc[m]
                    T.tvm_storage_sync("shared")
                    for step in T.unroll(LOGS):
                        hs: T.let = T.shift_right(S, step + 1)
                        # the m loop stays outside the condition: TVM's sync planner may not put barriers in one
                        for m in range(M):
                            if s < hs:
                                red[m, s, r] = red[m, s, r] + red[m, s + hs, r]
                        T.tvm_storage_sync("shared")
                    if s == 0:
                        if nb * R + r < N:
                            for m in range(M):
                                if has_bias:
                                    Y[m, nb * R + r] = _epilogue(red[m, 0, r], B[nb * R + r], act)
                                else:
                                    Y[m, nb * R + r] = _epilogue(red[m, 0, r], None, act)

    return kernel


def bsr_gemm(M, K, N, R, nnzb, *, bias=False, activation=None, rows_per_thread=None, stage_x=None,
             local_bytes=LOCAL_BYTES):
    """Y[M, N] = act(X[M, K] @ W + b); one work-group per (block row, tile of rows of X)."""
    NB = -(-N // R)
    NNZ = max(nnzb, 1)
    TY = max(1, 64 // R)                    # row threads; R * TY = 64 threads per group
    MT = rows_per_thread or (4 if R >= 8 else 2 if R >= 4 else 1)
    TM = TY * MT                            # rows of X per group
    MO = -(-M // TM)
    NT = R * TY
    if stage_x is None:
        # Staging reads all K columns of the tile whatever the sparsity; reading the rows' nonzero columns straight
        # from global memory (through the caches) won at every point measured: on an H100 through NVIDIA OpenCL,
        # 128x768x3072 bsr16x1 50/80/90% 143/94/76 us staged vs 67/35/24 us direct, bsr4x1 260/185/165 vs
        # 190/83/45 (benchmarks/results/opencl_nvidia_h100.txt). Not measured on a mobile GPU: staging stays
        # available (stage_x=True) but is off by default.
        stage_x = False
    KC = max(8, min(K, (local_bytes // 4) // TM - 1)) if stage_x else 1   # k chunk staged per round
    KCP = KC + 1 if stage_x else 1          # padded row: threads of different rows hit different banks
    NCH = -(-K // KC) if stage_x else 1
    has_bias, act = bias, activation

    @T.prim_func(private=True)
    def kernel(X: T.Buffer((M, K), "float32"), data: T.Buffer((NNZ, R), "float32"),
               indices: T.Buffer((NNZ,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
               B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: 1})
        for mo in T.thread_binding(MO, thread="blockIdx.y"):
            for nb in T.thread_binding(NB, thread="blockIdx.x"):
                for ty in T.thread_binding(TY, thread="threadIdx.y"):
                    for r in T.thread_binding(R, thread="threadIdx.x"):
                        acc = T.alloc_buffer((MT,), "float32", scope="local")
                        xs = T.alloc_buffer((TM, KCP), "float32", scope="shared")
                        jp = T.alloc_buffer((1,), "int32", scope="local")
                        for mt in range(MT):
                            acc[mt] = T.float32(0)
                        jp[0] = indptr[nb]
                        if stage_x:
                            for ch in range(NCH):
                                for it in range((TM * KC + NT - 1) // NT):
                                    e: T.let = it * NT + ty * R + r
                                    row: T.let = e // KC
                                    col: T.let = e % KC
                                    if e < TM * KC:
                                        if mo * TM + row < M and ch * KC + col < K:
                                            xs[row, col] = X[mo * TM + row, ch * KC + col]
                                T.tvm_storage_sync("shared")
                                while jp[0] < indptr[nb + 1] and indices[jp[0]] < ch * KC + KC:
                                    w: T.let = data[jp[0], r]
                                    kk: T.let = indices[jp[0]] - ch * KC
                                    for mt in range(MT):
                                        acc[mt] = acc[mt] + w * xs[ty * MT + mt, kk]
                                    jp[0] = jp[0] + 1
                                T.tvm_storage_sync("shared")
                        else:
                            for j in range(indptr[nb], indptr[nb + 1]):
                                w: T.let = data[j, r]
                                k: T.let = indices[j]
                                for mt in range(MT):
                                    if mo * TM + ty * MT + mt < M:
                                        acc[mt] = acc[mt] + w * X[mo * TM + ty * MT + mt, k]
                        if nb * R + r < N:
                            for mt in range(MT):
                                if mo * TM + ty * MT + mt < M:
                                    if has_bias:
                                        Y[mo * TM + ty * MT + mt, nb * R + r] = _epilogue(acc[mt], B[nb * R + r], act)
                                    else:
                                        Y[mo * TM + ty * MT + mt, nb * R + r] = _epilogue(acc[mt], None, act)

    return kernel


def bsr_conv1x1(batch, K, P, cout, R, nnzb, *, bias=False, activation=None, threads=64):
    """Y[b, cout, P] = act(W[cout, K] @ X[b, K, P] + b): NCHW 1x1 convolution, pixels across threads."""
    NB = -(-cout // R)
    NNZ = max(nnzb, 1)
    TP = min(threads, 1 << max(0, (P - 1).bit_length())) if P < threads else threads
    PO = -(-P // TP)
    has_bias, act = bias, activation

    @T.prim_func(private=True)
    def kernel(X: T.Buffer((batch, K, P), "float32"), data: T.Buffer((NNZ, R), "float32"),
               indices: T.Buffer((NNZ,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
               B: T.Buffer((cout,), "float32"), Y: T.Buffer((batch, cout, P), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: 1})
        for bz in T.thread_binding(batch, thread="blockIdx.z"):
            for po in T.thread_binding(PO, thread="blockIdx.y"):
                for nb in T.thread_binding(NB, thread="blockIdx.x"):
                    for tp in T.thread_binding(TP, thread="threadIdx.x"):
                        acc = T.alloc_buffer((R,), "float32", scope="local")
                        p: T.let = po * TP + tp
                        for r in range(R):
                            acc[r] = T.float32(0)
                        if p < P:
                            for j in range(indptr[nb], indptr[nb + 1]):
                                x: T.let = X[bz, indices[j], p]
                                for r in range(R):
                                    acc[r] = acc[r] + data[j, r] * x
                            for r in range(R):
                                if nb * R + r < cout:
                                    if has_bias:
                                        Y[bz, nb * R + r, p] = _epilogue(acc[r], B[nb * R + r], act)
                                    else:
                                        Y[bz, nb * R + r, p] = _epilogue(acc[r], None, act)

    return kernel


def _limits(preset) -> tuple[int, int]:
    """(max work-group size, local bytes for staging) from the preset's TVM target (a TOML preset may set
    max_num_threads / max_shared_memory_per_block); staging gets half the local memory, the rest is for reductions."""
    try:
        attrs = preset.tvm_target().attrs
        threads = int(attrs.get("max_num_threads", MAX_THREADS))
        local = int(attrs.get("max_shared_memory_per_block", 2 * LOCAL_BYTES)) // 2
    except Exception:  # not a TVM-valid target: keep the Adreno/Mali defaults
        return MAX_THREADS, LOCAL_BYTES
    return max(64, min(threads, 1024)), max(1024, local)


def make_sparse_kernel(spec, preset):
    """PrimFunc for ``spec`` (passes.formats.KernelSpec) on an OpenCL preset, or None when no GPU kernel fits."""
    if spec.dtype != "float32" or spec.format not in FORMATS or spec.activation not in (None, "relu", "gelu"):
        return None
    R = FORMATS[spec.format]                # the format names the block height; spec.R repeats it
    max_threads, local_bytes = _limits(preset)
    kw = {"bias": spec.has_bias, "activation": spec.activation}
    if spec.op == "matmul":
        if spec.M <= GEMV_MAX_M:
            f = bsr_gemv(spec.M, spec.K, spec.N, R, spec.nnz, max_threads=max_threads, local_bytes=local_bytes, **kw)
        else:
            f = bsr_gemm(spec.M, spec.K, spec.N, R, spec.nnz, local_bytes=local_bytes, **kw)
    elif spec.op == "conv1x1":
        f = bsr_conv1x1(spec.M, spec.K, spec.N, spec.out_channels, R, spec.nnz, **kw)
    else:
        return None
    return f
