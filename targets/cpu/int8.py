"""int8 kernels for LLVM CPUs: dense and block-sparse ``Y = act(dequant(Xq @ Wq) + b)`` with int32 accumulation.

Weights are int8, symmetric (zero point 0), one scale per output channel; activations uint8 or int8 per tensor with
a runtime scale and zero point (static or dynamic quantization). Both kernels store the weight in blocks of
``R`` output channels x 4 consecutive input channels (``data[nblocks, R * 4]``, row r of a block at ``4r..4r+3``):
that is the operand layout of the 4-way int8 dot-product instructions, so one block is one instruction on x86
(``vpdpbusd`` zmm, R = 16) and R / 4 instructions on Armv8.2 (``sdot``). The dense kernel is the same loop over every
block of a block row (no indices); the sparse one is BSR over those blocks (``indices`` = k / 4 of each stored block).

The inner step is TVM's own tensor intrinsics' instruction sequence (``tvm.s_tir.tensor_intrin``: ``dot_16x4_vnni``
= ``llvm.x86.avx512.vpdpbusd.512``; ``dot_4x4_i8i8s32_sdot`` = ``llvm.aarch64.neon.sdot``; ``dot_4x4_i8i8s32_neon``
= ``smull`` + ``saddlp`` + ``addp`` for cores without dotprod, e.g. Cortex-A72), emitted directly in our
hand-scheduled kernels instead of through ``tensorize`` (the kernels are hand-written loops, like the float sparse
kernels, not scheduled blocks). ``generic`` widens to int32 in plain TIR for other CPUs (x86 without VNNI).

Signedness: ``vpdpbusd`` multiplies unsigned by signed bytes, ``sdot`` signed by signed. When the activations have
the other signedness the kernel flips their top bit (``x ^ 0x80``: uint8 <-> int8 shifted by 128) on the 4-byte group
it loads and shifts the zero point by 128, so results are unchanged.

Epilogue per output channel n: ``acc - zp * wsum[n]`` (exact int32, ``wsum`` = column sums of Wq), then either that
int32 (``out="int32"``, MatMulInteger and the bit-exact tests) or ``act(float(.) * xscale * wscale[n] + bias[n])``.

Calling convention: ``(Xq[M, K], data, [indices, indptr,] xzp[1] int32, xscale[1] f32, wscale[N] f32, wsum[N] int32,
bias[N] f32, Y[M, N])``. Requires K % 4 == 0 and N % R == 0 (other layers stay on TVM's default path).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tvm.script import tirx as T

from edge_sparse.targets.cpu.sparse import _act_fn, _attrs, _cdiv, as_block_func

__all__ = ["Int8Kernels", "minmax_kernel", "ISAS", "Int8Weight", "pack_int8", "isa_for", "int8_kernel", "build_int8_kernel", "reference_int32",
           "block_density"]

ISAS = ("vnni", "sdot", "neon", "generic")
_FLIP = -2139062144          # 0x80808080 as int32: flips the top bit of each of the 4 bytes


@dataclasses.dataclass
class Int8Weight:
    """An int8 weight W[K, N] as BSR over R x 4 blocks (``sparse`` False: every block stored)."""

    R: int
    K: int
    N: int
    data: np.ndarray                   # [nblocks, R * 4] int8
    indices: np.ndarray                # [nblocks] int32 (k // 4 of each block)
    indptr: np.ndarray                 # [N // R + 1] int32
    wsum: np.ndarray                   # [N] int32 column sums
    sparse: bool = False

    @property
    def nblocks(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes + self.wsum.nbytes)

    def arrays(self) -> list[np.ndarray]:
        return [self.data, self.indices, self.indptr]


def _blocks(wq: np.ndarray, R: int) -> np.ndarray:
    """[NB, KB, R * 4] view of W[K, N]: block (nb, kb) = W[4kb:4kb+4, nb*R:(nb+1)*R] laid out row (n) major."""
    K, N = wq.shape
    b = wq.reshape(K // 4, 4, N // R, R).transpose(2, 0, 3, 1)          # [NB, KB, R, 4]
    return np.ascontiguousarray(b).reshape(N // R, K // 4, R * 4)


def block_density(wq: np.ndarray, R: int = 16) -> float:
    """Fraction of R x 4 blocks of W[K, N] holding a nonzero."""
    return float(np.mean(np.any(_blocks(wq, R) != 0, axis=2)))


def pack_int8(wq: np.ndarray, R: int = 16, sparse: bool = False) -> Int8Weight:
    """Pack an int8 W[K, N] (K % 4 == 0, N % R == 0) dense or as BSR over R x 4 blocks."""
    wq = np.ascontiguousarray(wq, dtype=np.int8)
    K, N = wq.shape
    if K % 4 or N % R:
        raise ValueError(f"int8 kernels need K % 4 == 0 and N % {R} == 0, got K={K}, N={N}")
    blocks = _blocks(wq, R)
    wsum = wq.astype(np.int32).sum(axis=0).astype(np.int32)
    nz = np.any(blocks != 0, axis=2) if sparse else np.ones(blocks.shape[:2], bool)        # [NB, KB]
    indptr = np.concatenate([[0], np.cumsum(nz.sum(axis=1))]).astype(np.int32)
    nbi, kbi = np.nonzero(nz)
    data = blocks[nbi, kbi]
    indices = kbi.astype(np.int32)
    if data.shape[0] == 0:                 # keep buffers non-empty: one zero block that indptr never reaches
        data, indices = np.zeros((1, R * 4), np.int8), np.zeros(1, np.int32)
    return Int8Weight(R, K, N, np.ascontiguousarray(data), indices, indptr, wsum, sparse)


def isa_for(preset) -> str:
    """Which dot-product path the preset's CPU has."""
    tgt = preset.cpu_target if preset is not None else {}
    attrs = [str(a) for a in (tgt.get("mattr") or [])]
    mcpu = str(tgt.get("mcpu", ""))
    if str(tgt.get("mtriple", "")).startswith("aarch64") or preset is not None and preset.arch == "aarch64":
        dot_cpus = ("cortex-a55", "cortex-a75", "cortex-a76", "cortex-a77", "cortex-a78", "cortex-x", "neoverse",
                    "apple", "cortex-a710", "cortex-a715", "cortex-a720")
        if "+dotprod" in attrs or any(mcpu.startswith(c) for c in dot_cpus):
            return "sdot"
        return "neon"
    if "+avx512vnni" in attrs or _llvm_cpu_has(mcpu, "avx512vnni"):
        return "vnni"
    return "generic"


def _llvm_cpu_has(mcpu: str, feature: str) -> bool:
    if not mcpu:
        return False
    try:
        import tvm

        t = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        return bool(tvm.target.codegen.target_has_features(feature, t))
    except Exception:  # unknown CPU name or an older TVM without the query
        return False


def reference_int32(xq: np.ndarray, zp: int, wq: np.ndarray) -> np.ndarray:
    """numpy int32 reference: sum_k (xq[m, k] - zp) * wq[k, n]."""
    return ((xq.astype(np.int64) - zp) @ wq.astype(np.int64)).astype(np.int32)


def _flip_for(isa: str, x_dtype: str) -> int:
    """Zero-point shift when the kernel flips the activations' top bit (0: no flip)."""
    if isa == "vnni" and x_dtype == "int8":
        return 128
    if isa in ("sdot", "neon") and x_dtype == "uint8":
        return -128
    return 0


def _dot(isa: str):
    """(lanes per instruction, f(acc_vec, x_group_i32, w_bytes) -> acc_vec) of the ISA's 4-way dot product."""
    if isa == "vnni":
        def f(c, xg, w):
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c,
                                           T.reinterpret(T.broadcast(xg, 16), dtype="int8x64"), w, dtype="int32x16")
        return 16, f
    if isa == "sdot":
        def f(c, xg, w):
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), c,
                                           T.reinterpret(T.broadcast(xg, 4), dtype="int8x16"), w, dtype="int32x4")
        return 4, f
    if isa == "neon":
        def half(xg, w):
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                                           T.call_llvm_pure_intrin(
                                               T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                               T.reinterpret(T.broadcast(xg, 2), dtype="int8x8"), w, dtype="int16x8"),
                                           dtype="int32x4")

        def f(c, xg, w):
            lo = T.Shuffle([w], [T.int32(i) for i in range(8)])
            hi = T.Shuffle([w], [T.int32(i) for i in range(8, 16)])
            return c + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"),
                                               half(xg, lo), half(xg, hi), dtype="int32x4")
        return 4, f
    raise ValueError(f"isa '{isa}' has no dot-product instruction")


def int8_kernel(M: int, K: int, N: int, R: int, nblocks: int, *, isa: str, x_dtype: str = "uint8",
                out: str = "float32", activation=None, MT: int = 4, U: int = 4):
    """PrimFunc for ``Y[M, N]`` from int8 ``Xq[M, K]`` and an R x 4-blocked int8 weight (see the module docstring).

    The weight is always given as BSR over its R x 4 blocks (``pack_int8``); a dense weight lists every block.
    M == 1: U independent accumulators over the blocks of a block row (the dot-product chain is latency bound);
    M > 1: register tile acc[MT, R] over rows of X, each weight block loaded once per tile; consecutive tasks share a
    block row of weights (L1) and walk the row tiles. Measured on the host (1 thread): 128x384 @ 384x384 and 384x768
    at 380-410 GOPS (one vpdpbusd per cycle); once weights + X + Y outgrow L2 (384x1152 and up) 130-200 GOPS, and
    neither rows-outer order nor chunking block rows to fit L2 changed that.
    """
    if isa not in ISAS:
        raise ValueError(f"unknown isa '{isa}'")
    if isa == "vnni" and R != 16:
        raise ValueError("the VNNI kernel uses R = 16 (one zmm per block)")
    if K % 4 or N % R or R % 4:
        raise ValueError(f"int8 kernels need K % 4 == 0 and N % R == 0 (R % 4 == 0), got K={K}, N={N}, R={R}")
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"activations must be uint8 or int8, got {x_dtype}")
    NB = N // R
    shift = _flip_for(isa, x_dtype)
    flip = shift != 0
    generic = isa == "generic"
    LQ, dot = _dot(isa) if not generic else (R, None)
    NQ = R // LQ
    act = _act_fn(activation)
    attrs = _attrs()
    int_out = out == "int32"
    odt = "int32" if int_out else "float32"
    xv = f"{x_dtype}x4"
    if M == 1:
        A, MO = U, 1
    else:
        A = max(1, min(MT, M))
        MO = _cdiv(M, A)

    def row(e):
        return T.min(e, M - 1) if (M > 1 and M % A) else e

    def xgroup(X, r, k4):
        g = T.reinterpret(X.vload([r, k4 * 4], xv), dtype="int32")
        return T.bitwise_xor(g, T.int32(_FLIP)) if flip else g

    def widen(X, r, k4, kk):
        return T.Cast("int32", X[r, k4 * 4 + kk])

    if M == 1:
        @T.prim_func(private=True)
        def f(X: T.Buffer((M, K), x_dtype), data: T.Buffer((nblocks, R * 4), "int8"),
              indices: T.Buffer((nblocks,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
              xzp: T.Buffer((1,), "int32"), xscale: T.Buffer((1,), "float32"), wscale: T.Buffer((N,), "float32"),
              wsum: T.Buffer((N,), "int32"), bias: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), odt)):
            T.func_attr(attrs)
            for nb in T.parallel(NB):
                acc = T.alloc_buffer((A, R), "int32", scope="local", annotations={"disable_lower_builtin": True})
                for a in T.unroll(A):
                    for i in T.vectorized(R):
                        acc[a, i] = 0
                beg: T.let = indptr[nb]
                end: T.let = indptr[nb + 1]
                nu: T.let = (end - beg) // A
                for jo in range(nu):
                    for a in T.unroll(A):
                        if generic:
                            for i in T.vectorized(R):
                                for kk in T.unroll(4):
                                    acc[a, i] = acc[a, i] + widen(X, 0, indices[beg + jo * A + a], kk) * T.Cast(
                                        "int32", data[beg + jo * A + a, i * 4 + kk])
                        else:
                            for q in T.unroll(NQ):
                                acc[a, T.ramp(q * LQ, 1, LQ)] = dot(
                                    acc[a, T.ramp(q * LQ, 1, LQ)], xgroup(X, 0, indices[beg + jo * A + a]),
                                    data[beg + jo * A + a, T.ramp(q * LQ * 4, 1, LQ * 4)])
                for j in range(beg + nu * A, end):
                    if generic:
                        for i in T.vectorized(R):
                            for kk in T.unroll(4):
                                acc[0, i] = acc[0, i] + widen(X, 0, indices[j], kk) * T.Cast("int32", data[j, i * 4 + kk])
                    else:
                        for q in T.unroll(NQ):
                            acc[0, T.ramp(q * LQ, 1, LQ)] = dot(acc[0, T.ramp(q * LQ, 1, LQ)], xgroup(X, 0, indices[j]),
                                                                data[j, T.ramp(q * LQ * 4, 1, LQ * 4)])
                for a in T.unroll(1, A):
                    for i in T.vectorized(R):
                        acc[0, i] = acc[0, i] + acc[a, i]
                for i in T.vectorized(R):
                    if int_out:
                        Y[0, nb * R + i] = acc[0, i] - (xzp[0] + shift) * wsum[nb * R + i]
                    else:
                        Y[0, nb * R + i] = act(T.Cast("float32", acc[0, i] - (xzp[0] + shift) * wsum[nb * R + i])
                                               * (xscale[0] * wscale[nb * R + i]) + bias[nb * R + i])
        return f

    @T.prim_func(private=True)
    def g(X: T.Buffer((M, K), x_dtype), data: T.Buffer((nblocks, R * 4), "int8"),
          indices: T.Buffer((nblocks,), "int32"), indptr: T.Buffer((NB + 1,), "int32"),
          xzp: T.Buffer((1,), "int32"), xscale: T.Buffer((1,), "float32"), wscale: T.Buffer((N,), "float32"),
          wsum: T.Buffer((N,), "int32"), bias: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), odt)):
        T.func_attr(attrs)
        for t in T.parallel(NB * MO):
            nb: T.let = t // MO
            mo: T.let = t % MO
            acc = T.alloc_buffer((A, R), "int32", scope="local", annotations={"disable_lower_builtin": True})
            for a in T.unroll(A):
                for i in T.vectorized(R):
                    acc[a, i] = 0
            for j in range(indptr[nb], indptr[nb + 1]):
                k4: T.let = indices[j]
                for a in T.unroll(A):
                    if generic:
                        for i in T.vectorized(R):
                            for kk in T.unroll(4):
                                acc[a, i] = acc[a, i] + widen(X, row(mo * A + a), k4, kk) * T.Cast(
                                    "int32", data[j, i * 4 + kk])
                    else:
                        for q in T.unroll(NQ):
                            acc[a, T.ramp(q * LQ, 1, LQ)] = dot(acc[a, T.ramp(q * LQ, 1, LQ)],
                                                                xgroup(X, row(mo * A + a), k4),
                                                                data[j, T.ramp(q * LQ * 4, 1, LQ * 4)])
            for a in T.unroll(A):
                for i in T.vectorized(R):
                    if int_out:
                        Y[row(mo * A + a), nb * R + i] = acc[a, i] - (xzp[0] + shift) * wsum[nb * R + i]
                    else:
                        Y[row(mo * A + a), nb * R + i] = act(
                            T.Cast("float32", acc[a, i] - (xzp[0] + shift) * wsum[nb * R + i])
                            * (xscale[0] * wscale[nb * R + i]) + bias[nb * R + i])
    return g


def minmax_kernel(n: int, V: int = 16):
    """(min, max) of X[n] float32 in one vectorised pass (the range dynamic quantization needs)."""
    attrs = _attrs()
    nv = n // V

    @T.prim_func(private=True)
    def f(X: T.Buffer((n,), "float32"), out: T.Buffer((2,), "float32")):
        T.func_attr(attrs)
        acc = T.alloc_buffer((2, V), "float32", scope="local", annotations={"disable_lower_builtin": True})
        for i in T.vectorized(V):
            acc[0, i] = X[0]
            acc[1, i] = X[0]
        for c in range(nv):
            for i in T.vectorized(V):
                acc[0, i] = T.min(acc[0, i], X[c * V + i])
                acc[1, i] = T.max(acc[1, i], X[c * V + i])
        for r in range(nv * V, n):
            acc[0, 0] = T.min(acc[0, 0], X[r])
            acc[1, 0] = T.max(acc[1, 0], X[r])
        out[0] = acc[0, 0]
        out[1] = acc[1, 0]
        for i in range(1, V):
            out[0] = T.min(out[0], acc[0, i])
            out[1] = T.max(out[1], acc[1, i])
    return as_block_func(f)


@dataclasses.dataclass(frozen=True)
class Int8Kernels:
    """What a Relax pass needs from this family to route int8 layers (``targets.cpu.int8_kernels(preset)``)."""

    isa: str
    R: int = 16

    @classmethod
    def for_preset(cls, preset) -> "Int8Kernels":
        return cls(isa_for(preset))

    def fits(self, K: int, N: int) -> bool:
        return K % 4 == 0 and N % self.R == 0

    def pack(self, wq: np.ndarray, sparse: bool) -> Int8Weight:
        return pack_int8(wq, self.R, sparse)

    def block_density(self, wq: np.ndarray) -> float:
        return block_density(wq, self.R)

    def kernel(self, M: int, K: int, N: int, nblocks: int, *, x_dtype: str, out: str, activation):
        return as_block_func(int8_kernel(M, K, N, self.R, nblocks, isa=self.isa, x_dtype=x_dtype, out=out,
                                         activation=activation))

    def minmax(self, n: int):
        return minmax_kernel(n)


def build_int8_kernel(prim_func, preset):
    """Compile one kernel on its own (tests, benchmarks): callable module with entry ``main``."""
    from edge_sparse.targets.cpu.sparse import build_kernel

    return build_kernel(as_block_func(prim_func), preset)
