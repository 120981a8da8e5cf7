"""Sparse TIR kernels for LLVM CPUs (x86-64 AVX2/AVX-512, AArch64 NEON), scheduled from the preset's vector width.

All kernels compute ``Y = act(X @ W + b)`` for a weight stored in a ``passes.formats`` format, with static shapes.
Calling convention (shared with the other families, see ``passes.formats.KernelSpec``):

    matmul : (X[M, K], *format arrays, bias[N], Y[M, N])
    conv1x1: (X[B, K, HW], *format arrays, bias[Cout], Y[B, Cout, HW])        (NCHW, spatial flattened)

format arrays: BSR/CSR ``data[nnzb, R], indices[nnzb], indptr[NB + 1]``; N:M ``vals[S, N], idx[S, N]``.
The bias is always passed (zeros when the layer has none): one more vector add per output, no second code path.

Kernel shapes, chosen per M (see ``make_sparse_kernel``):
- ``bsr_gemv`` (M = 1): parallel over block rows, an R-wide accumulator vector, U independent accumulators so
  the FMA chain is not latency bound; X[k] is a broadcast scalar (no gathers).
- ``bsr_rows`` (M > 1 when R fills a vector register, or small M): register tile acc[MT, R], X[m, k] broadcast;
  rows past M are clamped onto row M - 1 (recomputed and rewritten by the same task: no guards, no races).
- ``bsr_gemm_t`` (larger M, narrow blocks): X transposed in-kernel to XT[K, Mp] so the vector runs over m (contiguous), acc[R, MV]
  with data[j, r] broadcast; results go to YT[Np, Mp] with contiguous stores, then one blocked transpose applies bias
  and activation. MV is sized so that R * MV / lanes accumulators fit the register file.
- ``bsr_conv1x1`` (NCHW): the same core reading X[b] directly (vector over the spatial dimension, as in "Fast
  Sparse ConvNets"); spatial sizes that MV does not divide go through a zero-padded copy. The sparsify pass does not
  ask this family for it: the CPU pipeline runs convs channels-last (``CPUFamily.conv_layout``), where a pruned 1x1
  conv is ``bsr_rows`` over its pixels and needs no NCHW transposes around it (PP-OCRv4 rec at 16x1 50%, 1 thread:
  whole model 1.54x -> 1.87x onnxruntime fp32). It serves NCHW callers of the ``KernelSpec`` contract.
- ``nm_gemv`` (2:4, M = 1): vector over output channels; the m candidate X values of a group are scalars shared by
  all channels, so the stored position selects among them with compare+blend instead of a gather.
- ``nm_gemm_t`` (2:4, M > 1): like ``bsr_gemm_t`` with a fixed number of slots per output channel.

Accumulators are ``scope="local"`` buffers with ``disable_lower_builtin`` and the kernels carry ``KERNEL_ATTR`` so the
``edge_sparse_cpu`` TIR pipeline compiles them without StorageRewrite: that keeps them in registers (TVM_NOTES).
"""
from __future__ import annotations

from tvm.script import tirx as T

from edge_sparse.formats import KernelSpec

__all__ = [
    "make_sparse_kernel", "vector_params", "bsr_gemv", "bsr_rows", "bsr_gemm_t", "bsr_conv1x1", "nm_gemv",
    "nm_gemm_t", "ACTIVATIONS", "build_kernel", "kernel_name", "as_block_func",
]

ACTIVATIONS = (None, "relu", "gelu")
_TB = 16  # transpose tile

# Eigen's / TVM topi fast_erf rational approximation for float32 (|error| < 2e-7 on [-4, 4], erf saturates beyond):
# LLVM lowers tir erf to a scalar libm call per lane, which costs milliseconds on MiniLM's FFN; this vectorises.
_ERF_A = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_B = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf(v):
    x = T.max(T.min(v, T.float32(4.0)), T.float32(-4.0))
    x2 = x * x
    p = T.float32(_ERF_A[0])
    for a in _ERF_A[1:]:
        p = p * x2 + T.float32(a)
    q = T.float32(_ERF_B[0])
    for b in _ERF_B[1:]:
        q = q * x2 + T.float32(b)
    return x * p / q


def _act_fn(activation):
    if activation is None:
        return lambda v: v
    if activation == "relu":
        return lambda v: T.max(v, T.float32(0))
    if activation == "gelu":  # exact (erf) GELU, as ONNX Gelu / the Erf pattern of BERT-style exports
        return lambda v: v * T.float32(0.5) * (T.float32(1.0) + _erf(v * T.float32(0.7071067811865476)))
    raise ValueError(f"unsupported activation '{activation}'")


def _attrs():
    from edge_sparse.formats import KERNEL_ATTR

    return {"tir.noalias": True, KERNEL_ATTR: 1}


def vector_params(preset) -> tuple[int, int]:
    """(float32 lanes, vector registers) of the preset's CPU."""
    lanes = int(getattr(preset, "vector_lanes_f32", 4)) if preset is not None else 4
    regs = int(preset.device.get("vector_registers", 32 if lanes >= 16 or lanes == 4 else 16)) if preset is not None else 32
    return max(1, lanes), max(8, regs)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_floor(x: int) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


def _pick_mv(R: int, lanes: int, regs: int) -> int:
    """Vector length over m for the transposed kernels: R * MV / lanes accumulators plus a few live registers."""
    per_row = max(1, (regs - 8) // max(1, R))
    return lanes * min(8, _pow2_floor(per_row))


# ------------------------------------------------------------------------------------------------ BSR kernels
def bsr_gemv(K: int, N: int, R: int, nnzb: int, activation=None, U: int = 4):
    """M = 1: Y[1, N] = act(X[1, K] @ W + b), W in BSR Rx1 (R = 1: CSR)."""
    NB = _cdiv(N, R)
    NBF = N // R                       # full block rows
    act = _act_fn(activation)
    attrs = _attrs()

    @T.prim_func(private=True)
    def f(X: T.Buffer((1, K), "float32"), data: T.Buffer((nnzb, R), "float32"),
          indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((1, N), "float32")):
        T.func_attr(attrs)
        for nb in T.parallel(NB):
            acc = T.alloc_buffer((U, R), "float32", scope="local", annotations={"disable_lower_builtin": True})
            for u in T.unroll(U):
                for i in T.vectorized(R):
                    acc[u, i] = T.float32(0)
            beg: T.let = indptr[nb]
            end: T.let = indptr[nb + 1]
            nu: T.let = (end - beg) // U
            for jo in range(nu):
                for u in T.unroll(U):
                    for i in T.vectorized(R):
                        acc[u, i] = acc[u, i] + data[beg + jo * U + u, i] * X[0, indices[beg + jo * U + u]]
            for jr in range(beg + nu * U, end):
                for i in T.vectorized(R):
                    acc[0, i] = acc[0, i] + data[jr, i] * X[0, indices[jr]]
            for u in T.unroll(1, U):
                for i in T.vectorized(R):
                    acc[0, i] = acc[0, i] + acc[u, i]
            if nb < NBF:
                for i in T.vectorized(R):
                    Y[0, nb * R + i] = act(acc[0, i] + B[nb * R + i])
            else:
                for i in range(N - NBF * R):
                    Y[0, nb * R + i] = act(acc[0, i] + B[nb * R + i])
    return f


def bsr_rows(M: int, K: int, N: int, R: int, nnzb: int, activation=None, MT: int = 4, rows_outer: bool = False):
    """Register tile acc[MT, R] over (rows of X, output channels), X[m, k] broadcast.

    rows_outer: consecutive tasks share one tile of X rows (which stays in L1/L2) and stream the weights, instead of
    sharing one block row of weights and streaming X; better when X is large (long K) and the weights are small.
    """
    NB = _cdiv(N, R)
    NBF = N // R
    MT = max(1, min(MT, M))
    MO = _cdiv(M, MT)
    NBD, MOD = (1, NB) if rows_outer else (MO, 1)     # t -> (nb, mo) = (t // NBD % NB, t // MOD % MO)
    act = _act_fn(activation)
    attrs = _attrs()

    def row(e):
        return T.min(e, M - 1) if M % MT else e

    @T.prim_func(private=True)
    def f(X: T.Buffer((M, K), "float32"), data: T.Buffer((nnzb, R), "float32"),
          indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr(attrs)
        for t in T.parallel(NB * MO):
            nb: T.let = t // NBD % NB
            mo: T.let = t // MOD % MO
            acc = T.alloc_buffer((MT, R), "float32", scope="local", annotations={"disable_lower_builtin": True})
            for mi in T.unroll(MT):
                for i in T.vectorized(R):
                    acc[mi, i] = T.float32(0)
            for j in range(indptr[nb], indptr[nb + 1]):
                k: T.let = indices[j]
                for mi in T.unroll(MT):
                    for i in T.vectorized(R):
                        acc[mi, i] = acc[mi, i] + data[j, i] * X[row(mo * MT + mi), k]
            if nb < NBF:
                for mi in T.unroll(MT):
                    for i in T.vectorized(R):
                        Y[row(mo * MT + mi), nb * R + i] = act(acc[mi, i] + B[nb * R + i])
            else:
                for mi in T.unroll(MT):
                    for i in range(N - NBF * R):
                        Y[row(mo * MT + mi), nb * R + i] = act(acc[mi, i] + B[nb * R + i])
    return f


def bsr_gemm_t(M: int, K: int, N: int, R: int, nnzb: int, activation=None, MV: int = 16, RS: int = 0):
    """Larger M: vector over m on a transposed copy of X; YT then a blocked transpose with bias + activation.

    RS: block rows per pass (R / RS passes over a block row's nonzeros): acc[RS, MV] with MV a multiple of the
    vector width lets each broadcast weight feed MV / lanes FMAs, so the loop is no longer bound by loads.
    """
    RS = RS if RS and R % RS == 0 else R
    NP = R // RS
    NB = _cdiv(N, R)
    Mp = _cdiv(M, MV) * MV
    Mp = _cdiv(Mp, _TB) * _TB
    MO = Mp // MV
    Kp = _cdiv(K, _TB) * _TB
    Np = NB * R
    MF, NF = M // _TB, N // _TB
    act = _act_fn(activation)
    attrs = _attrs()

    def xrow(e):
        return T.min(e, M - 1) if Mp != M else e

    def xcol(e):
        return T.min(e, K - 1) if Kp != K else e

    @T.prim_func(private=True)
    def f(X: T.Buffer((M, K), "float32"), data: T.Buffer((nnzb, R), "float32"),
          indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr(attrs)
        XT = T.decl_buffer((Kp, Mp), "float32")
        YT = T.decl_buffer((Np, Mp), "float32")
        for kb in T.parallel(Kp // _TB):
            for mb in range(Mp // _TB):
                for kk in range(_TB):
                    for mm in T.vectorized(_TB):
                        XT[kb * _TB + kk, mb * _TB + mm] = X[xrow(mb * _TB + mm), xcol(kb * _TB + kk)]
        for t in T.parallel(NB * MO):
            nb: T.let = t // MO
            mo: T.let = t % MO
            for rp in range(NP):
                acc = T.alloc_buffer((RS, MV), "float32", scope="local", annotations={"disable_lower_builtin": True})
                for r in T.unroll(RS):
                    for i in T.vectorized(MV):
                        acc[r, i] = T.float32(0)
                for j in range(indptr[nb], indptr[nb + 1]):
                    k: T.let = indices[j]
                    for r in T.unroll(RS):
                        for i in T.vectorized(MV):
                            acc[r, i] = acc[r, i] + data[j, rp * RS + r] * XT[k, mo * MV + i]
                for r in T.unroll(RS):
                    for i in T.vectorized(MV):
                        YT[nb * R + rp * RS + r, mo * MV + i] = acc[r, i]
        for mb in T.parallel(MF):
            for nb2 in range(NF):
                for mm in range(_TB):
                    for nn in T.vectorized(_TB):
                        Y[mb * _TB + mm, nb2 * _TB + nn] = act(YT[nb2 * _TB + nn, mb * _TB + mm] + B[nb2 * _TB + nn])
            for mm in range(_TB):
                for n in range(NF * _TB, N):
                    Y[mb * _TB + mm, n] = act(YT[n, mb * _TB + mm] + B[n])
        for m in range(MF * _TB, M):
            for n in range(N):
                Y[m, n] = act(YT[n, m] + B[n])
    return f


def bsr_conv1x1(Bt: int, K: int, HW: int, Cout: int, R: int, nnzb: int, activation=None, MV: int = 16):
    """NCHW 1x1 conv, stride 1: Y[b, :, hw] = act(W^T X[b, :, hw] + bias); vector over the spatial dimension."""
    NB = _cdiv(Cout, R)
    NBF = Cout // R
    MV = min(MV, _cdiv(HW, 4) * 4)
    MO = _cdiv(HW, MV)
    MOF = HW // MV
    HWp = MO * MV
    act = _act_fn(activation)
    attrs = _attrs()
    padded = HWp != HW
    xp_shape = (Bt, K, HWp) if padded else (1, 1, 1)   # the padded copy exists only when MV does not divide HW

    @T.prim_func(private=True)
    def f(X: T.Buffer((Bt, K, HW), "float32"), data: T.Buffer((nnzb, R), "float32"),
          indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
          B: T.Buffer((Cout,), "float32"), Y: T.Buffer((Bt, Cout, HW), "float32")):
        T.func_attr(attrs)
        XP = T.decl_buffer(xp_shape, "float32")
        if padded:
            for bk in T.parallel(Bt * K):
                for s in range(HWp):
                    XP[bk // K, bk % K, s] = T.if_then_else(s < HW, X[bk // K, bk % K, T.min(s, HW - 1)], T.float32(0))
        for t in T.parallel(Bt * NB * MO):
            b: T.let = t // (NB * MO)
            nb: T.let = t // MO % NB
            mo: T.let = t % MO
            acc = T.alloc_buffer((R, MV), "float32", scope="local", annotations={"disable_lower_builtin": True})
            for r in T.unroll(R):
                for i in T.vectorized(MV):
                    acc[r, i] = T.float32(0)
            for j in range(indptr[nb], indptr[nb + 1]):
                k: T.let = indices[j]
                for r in T.unroll(R):
                    for i in T.vectorized(MV):
                        if padded:
                            acc[r, i] = acc[r, i] + data[j, r] * XP[b, k, mo * MV + i]
                        else:
                            acc[r, i] = acc[r, i] + data[j, r] * X[b, k, mo * MV + i]
            if mo < MOF:
                for r in T.unroll(R):
                    if nb * R + r < Cout:
                        for i in T.vectorized(MV):
                            Y[b, nb * R + r, mo * MV + i] = act(acc[r, i] + B[nb * R + r])
            else:
                for r in T.unroll(R):
                    if nb * R + r < Cout:
                        for i in range(HW - MOF * MV):
                            Y[b, nb * R + r, mo * MV + i] = act(acc[r, i] + B[nb * R + r])
    return f


# ------------------------------------------------------------------------------------------------ N:M kernels
def nm_gemv(K: int, N: int, n: int = 2, m: int = 4, activation=None, NV: int = 16):
    """M = 1, N:M along k: vector over output channels, the stored position selects one of m broadcast X values."""
    if (n, m) != (2, 4):
        raise NotImplementedError("nm_gemv implements 2:4")
    G = _cdiv(K, 4)
    S = G * 2
    NC = N // NV
    act = _act_fn(activation)
    attrs = _attrs()

    def xk(e):
        return T.min(e, K - 1) if K % 4 else e

    @T.prim_func(private=True)
    def f(X: T.Buffer((1, K), "float32"), vals: T.Buffer((S, N), "float32"), idx: T.Buffer((S, N), "uint8"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((1, N), "float32")):
        T.func_attr(attrs)
        for nc in T.parallel(NC):
            acc = T.alloc_buffer((2, NV), "float32", scope="local", annotations={"disable_lower_builtin": True})
            for u in T.unroll(2):
                for i in T.vectorized(NV):
                    acc[u, i] = T.float32(0)
            for g in range(G):
                x0: T.let = X[0, 4 * g]
                x1: T.let = X[0, xk(4 * g + 1)]
                x2: T.let = X[0, xk(4 * g + 2)]
                x3: T.let = X[0, xk(4 * g + 3)]
                for u in T.unroll(2):
                    for i in T.vectorized(NV):
                        acc[u, i] = acc[u, i] + vals[2 * g + u, nc * NV + i] * T.Select(
                            idx[2 * g + u, nc * NV + i] == T.uint8(0), x0, T.Select(
                                idx[2 * g + u, nc * NV + i] == T.uint8(1), x1, T.Select(
                                    idx[2 * g + u, nc * NV + i] == T.uint8(2), x2, x3)))
            for i in T.vectorized(NV):
                Y[0, nc * NV + i] = act(acc[0, i] + acc[1, i] + B[nc * NV + i])
        for c in T.parallel(N - NC * NV):
            s = T.alloc_buffer((1,), "float32", scope="local", annotations={"disable_lower_builtin": True})
            s[0] = T.float32(0)
            for sl in range(S):
                s[0] = s[0] + vals[sl, NC * NV + c] * X[0, xk(sl // 2 * 4 + T.Cast("int32", idx[sl, NC * NV + c]))]
            Y[0, NC * NV + c] = act(s[0] + B[NC * NV + c])
    return f


def nm_gemm_t(M: int, K: int, N: int, n: int = 2, m: int = 4, activation=None, MV: int = 16, NT: int = 4):
    """M > 1, N:M: XT[Kp, Mp] (vector over m); NT output channels per task share each XT row load."""
    if (n, m) != (2, 4):
        raise NotImplementedError("nm_gemm_t implements 2:4")
    G = _cdiv(K, 4)
    S = G * 2
    Kp = _cdiv(G * 4, _TB) * _TB
    Mp = _cdiv(_cdiv(M, MV) * MV, _TB) * _TB
    MO = Mp // MV
    NO = _cdiv(N, NT)
    Np = NO * NT
    MF, NF = M // _TB, N // _TB
    act = _act_fn(activation)
    attrs = _attrs()

    def xrow(e):
        return T.min(e, M - 1) if Mp != M else e

    def xcol(e):
        return T.min(e, K - 1) if Kp != K else e

    def ch(e):
        return T.min(e, N - 1) if Np != N else e

    @T.prim_func(private=True)
    def f(X: T.Buffer((M, K), "float32"), vals: T.Buffer((S, N), "float32"), idx: T.Buffer((S, N), "uint8"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr(attrs)
        XT = T.decl_buffer((Kp, Mp), "float32")
        YT = T.decl_buffer((Np, Mp), "float32")
        for kb in T.parallel(Kp // _TB):
            for mb in range(Mp // _TB):
                for kk in range(_TB):
                    for mm in T.vectorized(_TB):
                        XT[kb * _TB + kk, mb * _TB + mm] = X[xrow(mb * _TB + mm), xcol(kb * _TB + kk)]
        for t in T.parallel(NO * MO):
            no: T.let = t // MO
            mo: T.let = t % MO
            acc = T.alloc_buffer((NT, MV), "float32", scope="local", annotations={"disable_lower_builtin": True})
            for c in T.unroll(NT):
                for i in T.vectorized(MV):
                    acc[c, i] = T.float32(0)
            for sl in range(S):
                for c in T.unroll(NT):
                    k: T.let = sl // 2 * 4 + T.Cast("int32", idx[sl, ch(no * NT + c)])
                    for i in T.vectorized(MV):
                        acc[c, i] = acc[c, i] + vals[sl, ch(no * NT + c)] * XT[k, mo * MV + i]
            for c in T.unroll(NT):
                for i in T.vectorized(MV):
                    YT[no * NT + c, mo * MV + i] = acc[c, i]
        for mb in T.parallel(MF):
            for nb2 in range(NF):
                for mm in range(_TB):
                    for nn in T.vectorized(_TB):
                        Y[mb * _TB + mm, nb2 * _TB + nn] = act(YT[nb2 * _TB + nn, mb * _TB + mm] + B[nb2 * _TB + nn])
            for mm in range(_TB):
                for n2 in range(NF * _TB, N):
                    Y[mb * _TB + mm, n2] = act(YT[n2, mb * _TB + mm] + B[n2])
        for m2 in range(MF * _TB, M):
            for n2 in range(N):
                Y[m2, n2] = act(YT[n2, m2] + B[n2])
    return f


# ------------------------------------------------------------------------------------------------ dispatch
def kernel_name(spec: KernelSpec, preset) -> str:
    """Which kernel ``make_sparse_kernel`` picks for ``spec`` (for the per-layer report)."""
    lanes, _ = vector_params(preset)
    if spec.op == "conv1x1":
        return "bsr_conv1x1" if spec.format != "2:4" else "dense"
    if spec.format == "2:4":
        return "nm_gemv" if spec.M == 1 else "nm_gemm_t"
    if spec.M == 1:
        return "bsr_gemv"
    # an R-block that fills a vector register: broadcast X rows against it (measured: as fast or faster than the
    # transposed kernel at 16x1 on AVX-512, with no transposes); narrower blocks vectorise over rows instead
    if spec.R >= lanes or (spec.M < 2 * lanes and spec.R >= min(4, lanes)):
        return "bsr_rows"
    return "bsr_gemm_t"


def as_block_func(func):
    """``func`` with its body inside a root block holding one opaque block.

    Relax passes of the CPU pipeline (``SplitLayoutRewritePreproc``) walk every PrimFunc of the module and require
    the s_tir convention (a root block whose statements contain blocks); lowering removes the blocks again.
    """
    from tvm import s_tir

    inner = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "sparse_kernel", func.body))
    return func.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", inner)))


def _rows_outer(spec: KernelSpec, mt: int, preset) -> bool:
    """Task order of ``bsr_rows`` from the cache traffic of each: rows outer re-streams the weights once per row
    tile, block rows outer re-streams the touched lines of X once per block row; traffic from beyond L2 counts 3x.
    (Measured on the host: 3072x768 at 90% 16x1, M=128: 746 us rows outer vs 2245 us; 768x3072 at 50%: 4848 vs
    3932 us, its 5 MB of weights do not fit L2.)"""
    l2 = float(preset.device.get("l2_kb", 1024) if preset is not None else 1024) * 1024
    nb = _cdiv(spec.N, spec.R)
    w_bytes = spec.nnz * (spec.R * 4 + 4) + 4 * (nb + 1)
    density = spec.nnz / max(1, nb * spec.K)
    x_bytes = spec.M * spec.K * 4 * (1.0 - (1.0 - density) ** 16)     # 64-byte lines of X holding a used k
    rows_outer_cost = _cdiv(spec.M, mt) * w_bytes * (1 if w_bytes <= 0.75 * l2 else 3)
    blocks_outer_cost = nb * x_bytes * (1 if spec.M * spec.K * 4 <= 0.75 * l2 else 3)
    return rows_outer_cost < blocks_outer_cost


def make_sparse_kernel(spec: KernelSpec, preset):
    """A PrimFunc for ``spec`` on a CPU preset, or None when no sparse kernel fits (the layer stays dense)."""
    pf = _make_sparse_kernel(spec, preset)
    return as_block_func(pf) if pf is not None else None


def _make_sparse_kernel(spec: KernelSpec, preset):
    if spec.dtype != "float32" or spec.activation not in ACTIVATIONS:
        return None
    lanes, regs = vector_params(preset)
    name = kernel_name(spec, preset)
    nnzb = max(1, spec.nnz)
    if name == "dense":
        return None
    if name == "bsr_conv1x1":
        return bsr_conv1x1(spec.M, spec.K, spec.N, spec.cout, spec.R, nnzb, spec.activation,
                           MV=_pick_mv(spec.R, lanes, regs))
    if name == "nm_gemv":
        return nm_gemv(spec.K, spec.N, spec.n, spec.m, spec.activation, NV=max(lanes, 4) * 2 if lanes < 16 else lanes)
    if name == "nm_gemm_t":
        return nm_gemm_t(spec.M, spec.K, spec.N, spec.n, spec.m, spec.activation, MV=lanes * 2, NT=4)
    if name == "bsr_gemv":
        return bsr_gemv(spec.K, spec.N, spec.R, nnzb, spec.activation, U=4)
    if name == "bsr_rows":
        per_row = max(1, _cdiv(spec.R, lanes))
        mt = max(1, min(8, (regs - 6) // per_row))
        return bsr_rows(spec.M, spec.K, spec.N, spec.R, nnzb, spec.activation, MT=mt,
                        rows_outer=_rows_outer(spec, mt, preset))
    mv = min(_pick_mv(spec.R, lanes, regs), _cdiv(spec.M, lanes) * lanes)    # no 64-row tiles for M = 5
    return bsr_gemm_t(spec.M, spec.K, spec.N, spec.R, nnzb, spec.activation, MV=mv)


def build_kernel(prim_func, preset):
    """Compile one kernel on its own (tests, benchmarks, ``measure=True``): callable module with entry ``main``."""
    import tvm

    from edge_sparse.targets.cpu import TIR_PIPELINE, _register_tir_pipeline

    _register_tir_pipeline()
    mod = tvm.IRModule({"main": prim_func.with_attr("global_symbol", "main")})
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=preset.tvm_target(), tir_pipeline=TIR_PIPELINE)
