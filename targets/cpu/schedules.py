"""Dense schedule rules for LLVM CPU targets (x86-64 AVX2/AVX-512, AArch64 NEON), applied per fused PrimFunc.

TVM's default CPU pipeline leaves every PrimFunc unscheduled (scalar, one thread). :class:`ScheduleDense` walks the
PrimFuncs after FuseTIR and gives each the first rule that fits:

1. ``contraction``: a reduction block whose inputs are contiguous in the output's innermost index (or do not depend on
   it) -- matmul, batched matmul, dense, conv2d (NHWC/HWIO after the layout pass; NCHW stride 1), depthwise conv,
   pooling, mean over non-inner axes. Register tile ``mt x nt`` (``nt`` = whole vectors of the output's inner axis,
   ``mt`` rows of another output axis that the vector operands do not depend on), reduction loops outside the tile,
   accumulator in a small stack buffer, fused epilogues (bias, activation, residual) inlined into the tile store,
   parallel over the outer tiles.
2. ``row_reduction``: softmax / LayerNorm / RMSNorm shaped functions: rows in parallel, the row's blocks computed
   together, each reduction along the row accumulated in a vector register (rfactor over the vector lanes) and the
   elementwise steps vectorised; dlight's CPU reduction rule where that does not fit (e.g. a row not a multiple of
   two vectors). Measured here, 1 thread: softmax [12,128,128] 0.34 -> 0.10 ms, LayerNorm [128,384] 0.096 ->
   0.009 ms (onnxruntime 0.07 and 0.024 ms).
3. ``injective``: elementwise / broadcast / transpose / reshape / pad: producers inlined, outer loops parallel,
   innermost vectorised.
4. ``fallback``: anything else (e.g. reductions along the contiguous axis): parallel over the leading spatial loops of
   every block, innermost spatial loop vectorised when it is innermost.

Register tiles come from the preset: ``vector_bits`` gives the f32 lanes, ``vector_registers`` the accumulator budget
(half the register file), so AVX-512 gets 8 x 32 (16 zmm accumulators) and NEON 4 x 16 (16 q accumulators).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from edge_sparse.errors import raise_if_interrupted

__all__ = ["TileConfig", "tile_config", "ScheduleDense", "schedule_func", "SCHEDULED_ATTR"]

# Marks a PrimFunc scheduled by one of our rules, naming the rule (for inspection and tests).
SCHEDULED_ATTR = "edge_sparse.schedule"
# LowerTVMBuiltin keeps a constant-size buffer allocated inside a parallel loop on the stack (where LLVM promotes
# the accumulator tile to registers) only below this size; bigger ones become a heap workspace per task.
STACK_BYTES = 1024
# Repack constant weights into column panels (measured ~10% on MiniLM's matmuls here).
PACK_WEIGHTS = True


@dataclasses.dataclass(frozen=True)
class TileConfig:
    lanes: int       # f32 lanes of one vector register
    registers: int   # vector registers of the ISA
    mt: int          # register-tile rows (broadcast operand)
    nvec: int        # vectors per register-tile row

    @property
    def nt(self) -> int:
        return self.lanes * self.nvec

    @property
    def acc_budget(self) -> int:
        """Vector registers the accumulators may use: half the file (the rest holds operands and addresses)."""
        return max(2, self.registers // 2)


def tile_config(preset) -> TileConfig:
    """Register tile for a preset: AVX-512 8x(2x16), AVX2 4x(2x8), NEON 4x(4x4)."""
    device = getattr(preset, "device", {}) or {}
    bits = int(device.get("vector_bits", 128))
    lanes = max(4, bits // 32)
    arch = getattr(preset, "arch", "x86_64")
    regs = int(device.get("vector_registers", 32 if arch == "aarch64" or bits >= 512 else 16))
    nvec = 4 if lanes <= 4 else 2
    mt = max(1, min(8, (max(2, regs // 2)) // nvec))
    return TileConfig(lanes=lanes, registers=regs, mt=mt, nvec=nvec)


# --------------------------------------------------------------------------------------------------------- helpers
def _int(x) -> int | None:
    from tvm import tirx

    return int(x.value) if isinstance(x, tirx.IntImm) else (int(x) if isinstance(x, int) else None)


def _vector_tile(n: int, cfg: TileConfig) -> tuple[int, int]:
    """(columns per register tile, vector width): the tile is a divisor of n (no ragged tail) made of whole
    power-of-two vectors -- LLVM scalarises odd-length vectors such as <40 x float> -- close to ``cfg.nt``.
    E.g. AVX-512: 384 -> (48, 16) (three zmm per row, 4 x 3 accumulators measured faster than 4 x 2), 256 -> (32, 16),
    200 -> (40, 8) (five ymm per row)."""
    w = cfg.lanes
    while w >= 4:
        if n % w == 0:
            nv = _largest_divisor(n // w, max(1, (cfg.nt + cfg.nt // 2) // w))
            return nv * w, w
        w //= 2
    if n <= cfg.nt:
        return n, n
    d = _largest_divisor(n, cfg.nt)
    return d, d


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _stride(expr, var) -> int | None:
    """d expr / d var when expr is linear in var with a constant coefficient, else None."""
    from tvm.sym import detect_linear_equation

    coeffs = detect_linear_equation(expr, [var])
    if len(coeffs) != 2:
        return None
    return _int(coeffs[0])


def _uses(expr, var) -> bool:
    return _stride(expr, var) != 0


def _vectorize_inner(sch, loop, lanes: int, max_len: int = 64) -> None:
    """Vectorise ``loop`` in power-of-two chunks (up to 4 vectors) that divide its extent; a loop with no such chunk
    is left scalar (LLVM's own loop vectoriser may still take it) -- odd TVM vectors (<25 x float>) scalarise."""
    ext = _int(sch.get(loop).extent)
    if ext is None or ext < 2:
        return
    for width in (4 * lanes, 2 * lanes, lanes, lanes // 2, lanes // 4):
        if width >= 4 and ext % width == 0:
            if ext == width:
                sch.vectorize(loop)
            else:
                _, inner = sch.split(loop, factors=[None, width])
                sch.vectorize(inner)
            return
    if ext in (2, 4, 8, 16, 32, 64) and ext <= max_len:
        sch.vectorize(loop)


def _parallel_outer(sch, loops, min_tasks: int = 2, max_loops: int | None = None):
    """Fuse leading loops until there are enough parallel tasks, mark the fused loop parallel."""
    if not loops:
        return None
    take, tasks = 0, 1
    for lp in loops[: max_loops or len(loops)]:
        ext = _int(sch.get(lp).extent)
        if ext is None:
            break
        take += 1
        tasks *= ext
        if tasks >= 64:
            break
    if take == 0 or tasks < min_tasks:
        return None
    fused = sch.fuse(*loops[:take]) if take > 1 else loops[0]
    sch.parallel(fused)
    return fused


# ----------------------------------------------------------------------------------------------------- rules
def _blocks(sch):
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    return normalize_prim_func(sch)


def _contraction(sch, cfg: TileConfig, _padded: bool = False) -> bool:
    """Register-tiled reduction (matmul, conv, pooling): see the module docstring."""
    from tvm import tirx

    infos = _blocks(sch)
    if infos is None:
        return False
    reds = [b for b in infos if b.is_reduction()]
    if len(reds) != 1:
        return False
    main = reds[0]
    block = sch.get(main.block_rv)
    if len(block.writes) != 1 or block.init is None:
        return False
    out = block.writes[0]
    if out.source.dtype not in ("float32", "float16", "float64"):
        return False
    svars = {it.var: it for it in main.iters if it.kind == "S"}
    rits = [it for it in main.iters if it.kind == "R"]
    if any(it.kind not in ("S", "R") for it in main.iters) or not rits:
        return False
    # normalize_prim_func drops unit loops, leaving constant indices behind
    out_idx = [r.min for r in out.region if not isinstance(r.min, tirx.IntImm)]
    if not all(isinstance(e, tirx.Var) and any(e.same_as(v) for v in svars) for e in out_idx):
        return False
    # The vector axis j: innermost output index with extent > 1 that every read is contiguous in or independent of.
    reads = [r for r in block.reads if not r.source.same_as(out.source)]
    if not reads:
        return False

    def classify(jvar):
        vec, bcast = [], []
        for r in reads:
            idx = [x.min for x in r.region]
            strides = [_stride(e, jvar) for e in idx]
            if any(s is None for s in strides):
                return None
            if all(s == 0 for s in strides):
                bcast.append(r)
            elif strides[-1] == 1 and all(s == 0 for s in strides[:-1]):
                vec.append(r)
            else:
                return None
        return (vec, bcast) if vec or not bcast else None

    jvar = None
    for e in reversed(out_idx):
        it = _iter(svars, e)
        if _int(it.dom) == 1:
            continue
        jvar = it.var if classify(it.var) is not None else None
        break
    if jvar is None:
        return False
    vec, bcast = classify(jvar)
    jit = _iter(svars, jvar)
    n_ext = _int(jit.dom)
    if n_ext is None:
        return False
    if n_ext % 4 and n_ext > cfg.nt and not _padded:
        # odd output width (6625 OCR classes, 258 STFT bins): compute a zero-padded multiple of the vector width,
        # copy out after; the weight padding block reads a constant, so it is folded at compile time like the packing
        padding = [cfg.nt if it.var.same_as(jvar) else 1 for it in main.iters]
        try:
            sch.pad_einsum(main.block_rv, padding)
        except Exception:  # noqa: BLE001 - a conv's input index (x[w * stride + k]) is no einsum access
            raise_if_interrupted()
            # read such operands through copies indexed by the block's own iterators (pad_einsum accepts those);
            # the copies are plain, so the padded rule below inlines them again
            for i, r in enumerate(list(block.reads)):
                if not r.source.same_as(out.source) and \
                        not all(isinstance(x.min, (tirx.Var, tirx.IntImm)) for x in r.region):
                    sch.reindex(main.block_rv, ("read", i))
            sch.pad_einsum(main.block_rv, padding)
        for blk in _root_blocks(sch):
            b = sch.get(blk)
            if b.name_hint.endswith("_pad") and len(b.reads) == 1 and _is_layout_free(sch, b.reads[0].source):
                sch.annotate(blk, "meta_schedule.layout_rewrite_preproc", True)
        return _contraction(sch, cfg, _padded=True)
    # Row axis i: an output axis (not j) the vector operands depend on least; innermost wins ties.
    cands = []
    for pos, e in enumerate(out_idx):
        it = _iter(svars, e)
        if it.var.same_as(jvar) or (_int(it.dom) or 0) <= 1:
            continue
        deps = sum(1 for r in vec if any(_uses(x.min, it.var) for x in r.region))
        cands.append((deps, -pos, it))
    iit = min(cands, key=lambda c: (c[0], c[1]))[2] if cands else None

    nt, vw = _vector_tile(n_ext, cfg)
    nvec = -(-nt // vw)
    mt_cap = max(1, min(12, cfg.acc_budget // nvec))
    mt_cap = max(1, min(mt_cap, (STACK_BYTES // 4 - 1) // nt))  # the tile must stay on the stack
    mt = 1
    if iit is not None:
        m_ext = _int(iit.dom)
        mt = _largest_divisor(m_ext, mt_cap)
        if mt * 2 <= mt_cap and m_ext > mt_cap:
            mt = mt_cap  # ragged last row tile, predicated per row (not per lane)

    # A "pad" that pads nothing (1x1 convs) is a full copy of the input: read the input directly instead. A real
    # pad of a vector operand (depthwise conv, pooling: the padded map is read as channel vectors) is inlined too:
    # its bounds test is one scalar branch per vector load, cheaper than writing and re-reading a padded copy of the
    # whole map (MobileNetV2's 112x112x96 depthwise: 0.36 -> 0.10 ms). A padded broadcast operand (dense conv)
    # keeps the copy: there the test would be paid for every scalar of the reduction.
    vec_bufs = [r.source for r in vec]
    for producer in sch.get_producers(main.block_rv):
        body = sch.get(producer).body
        text = body.script() if hasattr(body, "script") else str(body)
        pads_vector = any(w.source.same_as(b) for w in sch.get(producer).writes for b in vec_bufs) \
            and _pads_outer_axes_only(sch.get(producer))
        if ("if_then_else" not in text or pads_vector) and len(sch.get(producer).reads) == 1:
            try:
                sch.compute_inline(producer)
            except Exception:  # not a plain copy after all
                raise_if_interrupted()
    jo, ji = sch.split(jit.loop_rv, factors=[None, nt])
    if iit is not None:
        io, ii = sch.split(iit.loop_rv, factors=[None, mt])
    outer = [it.loop_rv for it in main.iters if it.kind == "S" and not it.var.same_as(jvar)
             and (iit is None or not it.var.same_as(iit.var))]
    red = [it.loop_rv for it in rits]
    if iit is not None:
        sch.reorder(*outer, jo, io, *red, ii, ji)
        tile_loop = io
    else:
        sch.reorder(*outer, jo, *red, ji)
        tile_loop = jo

    acc = sch.cache_write(main.block_rv, 0, "global")
    # Epilogues (bias, activation, residual, requantise...) go into the tile's store.
    # (not after pad_einsum: inlining the un-padding copy drops its bound, TVM 0.27 then writes past the output)
    progress = not _padded
    while progress:
        progress = False
        consumers = sch.get_consumers(acc)
        # Only a sole consumer reading the tile once: with two consumers (x * sigmoid(x)) TVM 0.27's
        # reverse_compute_inline rewires one and leaves the other reading a buffer nobody writes.
        if len(consumers) != 1 or _loads_of(sch, consumers[0], sch.get(acc).writes[0].source) != 1:
            break
        for consumer in consumers:
            try:
                sch.reverse_compute_inline(consumer)
                progress = True
                break
            except Exception:  # not elementwise on this buffer: scheduled below as its own loop nest
                raise_if_interrupted()
                continue
    sch.reverse_compute_at(acc, tile_loop, preserve_unit_loops=True)
    epilogue = None if _padded else _tile_epilogue(sch, acc, tile_loop)
    n_tile_outer = len(outer) + (2 if iit is not None else 1)
    # Loop marks go on before decompose_reduction: afterwards the update block is no longer a "reduction block" and
    # parallel/vectorize refuse the loops around it.
    par_loops = sch.get_loops(main.block_rv)[:n_tile_outer]
    _parallel_outer(sch, par_loops, max_loops=len(par_loops))
    tile_depth = len(sch.get_loops(main.block_rv)) - len(red) - (2 if iit is not None else 1)
    if iit is not None and mt > 1:
        sch.unroll(ii)
    _vector_split(sch, ji, vw)
    _tile_store(sch, sch.get_loops(acc)[tile_depth:], vw)
    if epilogue is not None:
        _tile_store(sch, sch.get_loops(epilogue)[tile_depth:], vw)
    init = sch.decompose_reduction(main.block_rv, red[0])
    _tile_store(sch, sch.get_loops(init)[tile_depth:], vw)
    # Constant weights read as the vector operand are packed into column panels [N/nt, ..., nt]: each k step then
    # reads one contiguous nt-vector instead of jumping a whole row (TLB and prefetcher friendly). The copy block is
    # split out by SplitLayoutRewritePreproc and folded into the constant at compile time.
    packed = _pack_weights(sch, main.block_rv, vec, nt, n_ext) if PACK_WEIGHTS else []
    # Every other block (pad producers, epilogues that could not be inlined) as its own loop nest.
    done = [sch.get(b).name_hint for b in [main.block_rv, acc, init] + ([epilogue] if epilogue is not None else [])]
    for other in _root_blocks(sch):
        name = sch.get(other).name_hint
        if name in done or name in packed:
            continue
        if "meta_schedule.layout_rewrite_preproc" in sch.get(other).annotations:
            continue
        _spatial_nest(sch, other, cfg)
    return True


def _pads_outer_axes_only(block) -> bool:
    """A pad block ``out[...] = if_then_else(cond, in[...], c)`` whose bounds test does not involve the innermost
    (vector) axis: inlined, each vector load is then guarded by one scalar test. (Dilated or channel-padded inputs,
    e.g. conv2d_transpose's zero insertion, test every lane: inlined they turn vector loads into per-lane selects.)"""
    from tvm import ir, tirx

    store = block.body
    if not isinstance(store, tirx.BufferStore) or not store.indices:
        return False
    value = store.value
    if not (isinstance(value, ir.Call) and str(getattr(value.op, "name", "")).endswith(".if_then_else")):
        return False
    inner = store.indices[-1]
    if not isinstance(inner, tirx.Var):
        return False
    return not any(v.same_as(inner) for v in tirx.analysis.undefined_vars(value.args[0]))


def _tile_epilogue(sch, acc, tile_loop):
    """An elementwise epilogue that reads the tile more than once (swish ``x * sigmoid(x)``, hard-swish) as one block
    computed per register tile, right after the tile's store: its intermediates are inlined into it and the stored
    tile is still in L1 when it reads it back. (Left as separate loop nests, EfficientNet's swish made six passes
    over a 112x112x96 map: 1.5 ms of a 2.4 ms block.) Returns the block, or None when the consumers are not such a
    chain (a broadcast to a bigger map, a reduction): they are then scheduled as their own loop nests."""
    out = sch.get(acc).writes[0].source
    shape = [_int(d) for d in out.shape]

    def downstream():
        seen, todo = [], list(sch.get_consumers(acc))
        while todo:
            b = todo.pop()
            if any(sch.get(b).same_as(sch.get(x)) for x in seen):
                continue
            seen.append(b)
            todo += list(sch.get_consumers(b))
        return seen

    def elementwise(b):  # every write the shape of the tile's buffer, every loop spatial
        blk = sch.get(b)
        return all([_int(d) for d in w.source.shape] == shape for w in blk.writes) and \
            all(int(iv.iter_type) == 0 for iv in blk.iter_vars)

    changed = True
    while changed:
        changed = False
        for b in downstream():
            if not elementwise(b) or not sch.get_consumers(b):
                continue
            try:
                sch.compute_inline(b)
            except Exception:  # writes a function output, or not inlinable: stays a block of its own
                raise_if_interrupted()
                continue
            changed = True
            break
    consumers = sch.get_consumers(acc)
    if len(consumers) != 1 or not elementwise(consumers[0]):
        return None
    try:
        sch.reverse_compute_at(consumers[0], tile_loop, preserve_unit_loops=True)
    except Exception:  # reads the tile at other positions (a transpose): its own loop nest
        raise_if_interrupted()
        return None
    return consumers[0]


def _is_layout_free(sch, buffer) -> bool:
    func = sch.mod["main"]
    free = {int(i) for i in (func.attrs.get("layout_free_buffers", []) if func.attrs else [])}
    return any(buffer.same_as(p) for i, p in enumerate(func.params) if i in free)


def _pack_weights(sch, block_rv, vec_regions, nt: int, n_ext: int) -> list[str]:
    """Pack layout-free (constant) vector operands into [N/nt, ..., nt] panels; names of the copy blocks."""
    from tvm.tirx import IndexMap

    func = sch.mod["main"]
    free = {int(i) for i in (func.attrs.get("layout_free_buffers", []) if func.attrs else [])}
    if not free or n_ext % nt or n_ext == nt:
        return []
    free_bufs = [p for i, p in enumerate(func.params) if i in free]
    names = []
    for region in vec_regions:
        buf = region.source
        if not any(buf.same_as(p) for p in free_bufs):
            continue
        reads = sch.get(block_rv).reads
        idx = next(i for i, r in enumerate(reads) if r.source.same_as(buf))
        ndim = len(buf.shape)
        if _int(buf.shape[-1]) != n_ext:
            continue
        copy = sch.cache_read(block_rv, idx, "global")
        sch.transform_layout(block_rv, ("read", idx), IndexMap.from_func(
            lambda *x: [x[-1] // nt, *x[:-1], x[-1] % nt], ndim=ndim))
        sch.annotate(copy, "meta_schedule.layout_rewrite_preproc", True)
        names.append(sch.get(copy).name_hint)
    return names


def _vector_split(sch, loop, width: int) -> None:
    """Vectorise ``loop`` as unrolled whole vectors of ``width`` lanes."""
    ext = _int(sch.get(loop).extent)
    if ext is not None and ext > width and ext % width == 0:
        outer, inner = sch.split(loop, factors=[None, width])
        sch.unroll(outer)
        sch.vectorize(inner)
    elif ext is not None and ext > 1:
        sch.vectorize(loop)


def _tile_store(sch, loops, width: int) -> None:
    """Inner loops of a tile's init / store: innermost as vectors, the others unrolled."""
    loops = [lp for lp in loops if (_int(sch.get(lp).extent) or 0) > 1]
    if not loops:
        return
    for lp in loops[:-1]:
        sch.unroll(lp)
    _vector_split(sch, loops[-1], width)


def _loads_of(sch, block_rv, buffer) -> int:
    """How many times the block's body reads ``buffer`` (there is no Python TIR visitor in 0.27: count in the text)."""
    import re

    text = sch.get(block_rv).body.script() if hasattr(sch.get(block_rv).body, "script") else str(sch.get(block_rv).body)
    return len(re.findall(r"(?<![\w.])" + re.escape(buffer.name) + r"\[", text))


def _iter(svars, e):
    for v, it in svars.items():
        if v.same_as(e):
            return it
    raise KeyError(e)


def _root_blocks(sch):
    from tvm.s_tir.dlight.analysis import get_root_block

    return sch.get_child_blocks(get_root_block(sch))


def _spatial_nest(sch, block_rv, cfg: TileConfig) -> None:
    """Parallel over the leading spatial loops; an all-spatial block also vectorises its innermost loop."""
    from tvm.s_tir.dlight.analysis import get_sblock_info

    info = get_sblock_info(sch, block_rv)
    loops = sch.get_loops(block_rv)
    kinds = [it.kind for it in info.iters]
    if len(loops) != len(kinds) or not loops:
        return
    n_lead = len(kinds) - len("".join(kinds).lstrip("S"))
    if n_lead == len(kinds) and _vectorizable(sch.get(block_rv)):
        _vectorize_inner(sch, loops[-1], cfg.lanes)
        n_lead -= 1  # the innermost loop (or its vector part's outer loop) stays inside the task
    loops = sch.get_loops(block_rv)
    if n_lead > 0:
        _parallel_outer(sch, loops[:n_lead])


# Element types LLVM has no vector form of here: TVM lowers them after scheduling, per element with if_then_else,
# which refuses vector operands ("if_then_else can only take scalar").
_SCALAR_ONLY_DTYPES = ("float8", "float6", "float4", "bfloat16")


def _vectorizable(block) -> bool:
    return not any(str(r.source.dtype).startswith(_SCALAR_ONLY_DTYPES) for r in [*block.reads, *block.writes])


def _has_opaque_block(sch) -> bool:
    """A root block that declares no writes (an extern-style body: argsort, NMS, scatter) reads and writes buffers
    the schedule cannot see, so inlining or moving its neighbours would break it."""
    try:
        return any(not sch.get(b).writes for b in _root_blocks(sch))
    except Exception:  # no root block of the usual form: nothing to inline either
        raise_if_interrupted()
        return True


def _injective(sch, cfg: TileConfig) -> bool:
    infos = _blocks(sch)
    if infos is None or any(not b.is_injective() for b in infos):
        return False
    blocks = _root_blocks(sch)
    for blk in blocks[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:
            raise_if_interrupted()
    for blk in _root_blocks(sch):
        _transpose_order(sch, blk)
        _spatial_nest(sch, blk, cfg)
    return True


def _transpose_order(sch, block_rv) -> None:
    """A transpose-like block (its innermost loop gathers from a strided input): the output axis that is the
    input's contiguous one goes right outside the innermost loop, so the rows a task gathers from stay in L1 while
    it writes every row of the output that reads them (NHWC -> NCHW of a 56x56x24 map gathered each pixel row once
    per channel from L2)."""
    from tvm import tirx
    from tvm.s_tir.dlight.analysis import get_sblock_info

    blk = sch.get(block_rv)
    if len(blk.reads) != 1 or len(blk.writes) != 1:
        return
    iters = get_sblock_info(sch, block_rv).iters
    if len(iters) < 3 or any(it.kind != "S" for it in iters):
        return
    loops = [it.loop_rv for it in iters]
    actual = sch.get_loops(block_rv)
    if len(actual) != len(loops) or not all(sch.get(a).same_as(sch.get(b)) for a, b in zip(actual, loops)):
        return  # not one loop per iterator, in order
    last = blk.reads[0].region[-1].min
    if _stride(last, iters[-1].var) == 1 or not isinstance(last, tirx.Var):
        return  # the innermost loop already reads contiguously (or the input's inner index is no plain axis)
    k = next((i for i, it in enumerate(iters[:-1]) if last.same_as(it.var)), None)
    if k is None or k == len(iters) - 2:
        return
    sch.reorder(*[lp for i, lp in enumerate(loops[:-1]) if i != k], loops[k], loops[-1])


def _row_reduction(sch, cfg: TileConfig) -> bool:
    """Softmax / LayerNorm / RMSNorm: rows in parallel, every block of a row computed together, and each reduction
    along the row accumulated in one vector register per row (rfactor over ``lanes`` columns, then a final
    horizontal sum of ``lanes`` values), so the reductions vectorise as the elementwise steps do. Producers with one
    consumer are inlined; a producer with several (softmax's exp) is computed once per row."""
    from tvm.s_tir.dlight.analysis import get_sblock_info

    if _blocks(sch) is None:
        return False

    def kinds(b):
        return "".join(it.kind for it in get_sblock_info(sch, b).iters)

    blocks = _root_blocks(sch)
    if len(blocks) < 2 or set(kinds(blocks[-1])) != {"S"}:
        return False
    if not any(kinds(b).endswith("R") for b in blocks):
        return False
    for b in blocks[:-1]:
        k = kinds(b)
        if not (set(k) == {"S"} or (k.endswith("R") and "R" not in k[:-1])):
            return False
    for b in blocks[:-1]:
        if set(kinds(b)) == {"S"} and len(sch.get_consumers(b)) == 1:
            sch.compute_inline(b)
    rfactored = []
    for b in _root_blocks(sch):
        if kinds(b).endswith("R"):
            red = sch.get_loops(b)[-1]
            ext = _int(sch.get(red).extent)
            if ext is None or ext % cfg.lanes or ext < 2 * cfg.lanes:
                return False
            _, ki = sch.split(red, factors=[None, cfg.lanes])
            ndim = len(sch.get(b).writes[0].source.shape)
            rfactored.append(sch.get(sch.rfactor(ki, factor_axis=ndim)).name_hint)
    blocks = _root_blocks(sch)
    loops = sch.get_loops(blocks[-1])
    if len(loops) < 2:
        return False
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.parallel(row)
    spatial = [b for b in blocks if set(kinds(b)) == {"S"}]  # (block info is read before compute_at moves them)
    for b in reversed(blocks[:-1]):
        sch.compute_at(b, row, preserve_unit_loops=False)
    for b in spatial:  # elementwise steps of the row (softmax's exp, the normalised output)
        loops = sch.get_loops(b)
        if len(loops) > 1:  # (a per-row scalar such as LayerNorm's mean has only the row loop)
            _vectorize_inner(sch, loops[-1], cfg.lanes)
    for name in rfactored:  # loops under the row: (ki, ko) -> ko outside, ki vectorised, init hoisted out of ko
        rf = sch.get_sblock(name)
        inner = sch.get_loops(rf)[1:]
        if len(inner) != 2:
            return False
        ki, ko = inner
        sch.reorder(ko, ki)
        sch.vectorize(ki)
    # (after all vectorize calls: an update block without its init fails vectorize's dataflow check)
    for name in rfactored:
        rf = sch.get_sblock(name)
        init = sch.decompose_reduction(rf, sch.get_loops(rf)[1])
        sch.vectorize(sch.get_loops(init)[-1])
    return True


def _row_reduction_dlight(func, target):
    from tvm.s_tir.dlight.cpu import Reduction

    return Reduction().apply(func, target, False)


def _fallback(sch, cfg: TileConfig) -> bool:
    """Applies when some root block got a parallel or vector loop; extern-style functions (scatter, unique: one
    opaque block of loops, no child blocks) are left to TVM's default lowering."""
    before = sch.mod
    for blk in _root_blocks(sch):
        try:
            _spatial_nest(sch, blk, cfg)
        except Exception:  # this block's loops do not allow it: the others may
            raise_if_interrupted()
            continue
    return not sch.mod.same_as(before)


# ------------------------------------------------------------------------------------------------- driver
def schedule_func(func, target, cfg: TileConfig):
    """The scheduled PrimFunc (with ``SCHEDULED_ATTR`` naming the rule), or None when no rule applied."""
    from tvm import s_tir

    def on_schedule(rule: Callable) -> Callable:
        """A rule that edits a fresh Schedule and says whether it applied, as ``apply(func) -> Schedule | None``."""
        def apply(f):
            sch = s_tir.Schedule(f)
            return sch if rule(sch) else None
        return apply

    rules: list[tuple[str, Callable]] = [  # dlight-style: apply(func) -> Schedule, or None when it does not apply
        ("contraction", on_schedule(lambda sch: _contraction(sch, cfg))),
        ("row_reduction", on_schedule(lambda sch: _row_reduction(sch, cfg))),
        ("row_reduction", lambda f: _row_reduction_dlight(f, target)),
        ("injective", on_schedule(lambda sch: _injective(sch, cfg))),
        ("fallback", on_schedule(lambda sch: _fallback(sch, cfg))),
    ]
    if _has_opaque_block(s_tir.Schedule(func)):  # only the fallback leaves every block in place
        rules = [r for r in rules if r[0] == "fallback"]
    for name, apply in rules:
        try:
            sch = apply(func)
        except Exception:  # a rule whose schedule primitives refuse this function does not apply either
            raise_if_interrupted()
            continue
        if sch is not None:
            return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(SCHEDULED_ATTR, name)
    return None


def ScheduleDense(preset, *, skip_attrs=("tirx.is_scheduled",)):
    """Module pass: schedule every unscheduled PrimFunc of the module for ``preset``'s CPU."""
    import tvm
    from tvm import tirx

    cfg = tile_config(preset)
    target = preset.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.ScheduleDense")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            attrs = func.attrs or {}
            if any(k in attrs and bool(attrs[k]) for k in skip_attrs):
                continue
            from edge_sparse.formats import KERNEL_ATTR

            if KERNEL_ATTR in attrs:
                continue
            scheduled = schedule_func(func, target, cfg)
            if scheduled is not None:
                updates[gv] = scheduled
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
