"""Validate OpenCL builds numerically on a real OpenCL runtime (PoCL in CI, a GPU driver where present).

TVM's PyPI runtime has no OpenCL, so an adreno/mali executable cannot run here. This module takes every OpenCL
kernel TVM generated (source, argument order, launch geometry from the TIR thread bindings) and the Relax call
sequence, turns them into a :class:`LaunchPlan` (buffers + an ordered list of kernel launches, all static), and replays
that plan through pyopencl with the same inputs that onnxruntime (or numpy) sees.

Capture points (``PassContext`` instruments, active through ``targets.opencl.build``):
  * right after ``tirx.SplitHostDevice``: host PrimFuncs launch device kernels with
    ``tirx.call_ffi_kernel(name, *args, *extents, launch_params=[tags])``; device PrimFuncs carry
    ``tirx.kernel_launch_params``. Global size = grid x local per dimension.
  * right before ``CallTIRRewrite``: Relax ``main`` holds only ``call_tir``, tuples, constants and reshapes.

A plan needs only numpy and pyopencl to replay (``LaunchPlan.save`` / ``load``), so it runs on machines without TVM.

Entry points: :func:`capture` (Relax module -> plan), :func:`plan_primfunc` (one PrimFunc -> plan),
:func:`check_model` (ONNX model vs onnxruntime), :func:`run_primfunc` (one kernel on numpy arrays),
:class:`Replayer` (pyopencl execution and profiling-event timing).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edge_sparse.errors import UserError

__all__ = ["LaunchPlan", "Launch", "capture", "plan_primfunc", "Replayer", "check_model", "run_primfunc",
           "opencl_devices", "default_context"]

_LAUNCH_TAG = re.compile(r"(blockIdx|threadIdx)\.([xyz])$")


# ------------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Launch:
    kernel: str
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]
    args: list[tuple]          # ("buf", buffer_id) | ("scalar", dtype, value)
    caller: str = ""           # the host PrimFunc (Relax call_tir callee) that launched it


@dataclasses.dataclass
class LaunchPlan:
    """Everything needed to run a compiled OpenCL model without TVM: buffers, constants, launches in order."""

    source: str                                     # OpenCL C of the whole module
    buffers: list[dict[str, Any]]                   # {"id", "nbytes", "dtype", "kind": input|const|temp}
    inputs: list[dict[str, Any]]                    # {"name", "buffer", "shape", "dtype"}
    outputs: list[dict[str, Any]]                   # {"name", "buffer", "shape", "dtype"}
    launches: list[Launch]
    consts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    target: str = ""

    @property
    def kernel_names(self) -> list[str]:
        return sorted({ln.kernel for ln in self.launches})

    def save(self, directory: str | Path) -> Path:
        """Write ``plan.json``, ``kernels.cl`` and ``consts.npz`` into ``directory`` (each file all or nothing)."""
        from edge_sparse.util import atomic_write

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "kernels.cl", self.source)
        atomic_write(d / "consts.npz", lambda f: np.savez(f, **{f"b{k}": v for k, v in self.consts.items()}))
        meta = {"target": self.target, "buffers": self.buffers, "inputs": self.inputs, "outputs": self.outputs,
                "launches": [dataclasses.asdict(ln) for ln in self.launches]}
        atomic_write(d / "plan.json", json.dumps(meta, indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> LaunchPlan:
        d = Path(directory)
        meta = json.loads((d / "plan.json").read_text())
        with np.load(d / "consts.npz") as z:
            consts = {int(k[1:]): z[k] for k in z.files}
        launches = [Launch(x["kernel"], tuple(x["global_size"]), tuple(x["local_size"]),
                           [tuple(a) for a in x["args"]], x.get("caller", "")) for x in meta["launches"]]
        return cls((d / "kernels.cl").read_text(), meta["buffers"], meta["inputs"], meta["outputs"], launches,
                   consts, meta.get("target", ""))


# ---------------------------------------------------------------------------------------------------- capture
def _instrument():
    from tvm.ir.instrument import pass_instrument

    @pass_instrument
    class _Capture:
        def __init__(self):
            self.split_mod = None
            self.relax_mod = None

        def run_before_pass(self, mod, info):
            if info.name.endswith("CallTIRRewrite") and self.relax_mod is None:
                self.relax_mod = mod

        def run_after_pass(self, mod, info):
            if info.name == "tirx.SplitHostDevice":
                self.split_mod = mod

    return _Capture()


def _iter_modules(m):
    yield m
    for im in m.imports:
        yield from _iter_modules(im)


def _opencl_source(ex) -> str:
    srcs = [m.inspect_source() for m in _iter_modules(ex.mod) if m.kind == "opencl"]
    if not srcs:
        raise RuntimeError("the executable holds no OpenCL module (was it built for an OpenCL target?)")
    return "\n".join(srcs)


def _param_kind(p) -> tuple[str, str]:
    import tvm

    t = p.ty
    if isinstance(t, tvm.ir.PointerType):
        et = t.element_type
        return "ptr", str(getattr(et, "dtype", et))
    return "scalar", str(getattr(t, "dtype", t))


class _Compiled:
    """What the instruments saw: device kernels' parameter kinds, host PrimFuncs, the Relax module."""

    def __init__(self, ex, cap):
        import tvm

        if cap.split_mod is None:
            raise RuntimeError("tirx.SplitHostDevice was not seen: nothing was compiled for a device")
        self.ex = ex
        self.source = _opencl_source(ex)
        self.kernels: dict[str, list[tuple[str, str, str]]] = {}
        self.host: dict[str, Any] = {}
        for gv, f in cap.split_mod.functions.items():
            if not isinstance(f, tvm.tirx.PrimFunc):
                continue
            if f.attrs is not None and int(f.attrs.get("calling_conv", 0)) == 2:
                self.kernels[gv.name_hint] = [(p.name, *_param_kind(p)) for p in f.params]
            else:
                self.host[gv.name_hint] = f
        self.relax_mod = cap.relax_mod


class _Ref:
    """A device buffer (or a reshaped view of one) during static planning."""

    __slots__ = ("id", "shape", "dtype")

    def __init__(self, id_: int, shape, dtype: str):
        self.id, self.shape, self.dtype = id_, tuple(int(s) for s in shape), str(dtype)


class _Planner:
    def __init__(self, compiled: _Compiled, target: str = ""):
        self.c = compiled
        self.buffers: list[dict[str, Any]] = []
        self.consts: dict[int, np.ndarray] = {}
        self.launches: list[Launch] = []
        self.target = target

    def new_buffer(self, shape, dtype, kind, data=None) -> _Ref:
        i = len(self.buffers)
        n = int(np.prod([int(s) for s in shape], dtype=np.int64)) * np.dtype(str(dtype)).itemsize
        self.buffers.append({"id": i, "nbytes": int(n), "dtype": str(dtype), "kind": kind,
                             "shape": [int(s) for s in shape]})
        if data is not None:
            self.consts[i] = np.ascontiguousarray(data)
        return _Ref(i, shape, dtype)

    def plan(self, inputs, outputs) -> LaunchPlan:
        return LaunchPlan(self.c.source, self.buffers, inputs, outputs, self.launches, self.consts, self.target)

    # -- host TIR (static shapes): evaluate launch extents and scalar arguments
    def eval(self, e, env):
        import tvm

        T = tvm.tirx
        if isinstance(e, (int, float, np.integer, np.floating)):
            return e
        if isinstance(e, T.IntImm):
            return int(e.value)
        if isinstance(e, T.FloatImm):
            return float(e.value)
        if isinstance(e, tvm.ir.Var):
            return self._lookup_scalar(e, env)
        name = type(e).__name__
        if name in _BINOPS:
            return _BINOPS[name](self.eval(e.a, env), self.eval(e.b, env))
        if name == "Not":
            return not self.eval(e.a, env)
        if name == "Cast":
            v = self.eval(e.value, env)
            return float(v) if "float" in str(e.dtype) else int(v)
        if name == "Select":
            return self.eval(e.true_value if self.eval(e.condition, env) else e.false_value, env)
        if isinstance(e, tvm.ir.Call):
            op = getattr(e.op, "name", "")
            if op in ("tirx.likely",):
                return self.eval(e.args[0], env)
            if op == "tirx.if_then_else":
                return self.eval(e.args[1] if self.eval(e.args[0], env) else e.args[2], env)
            if op in ("tirx.shift_left", "tirx.shift_right"):
                a, b = self.eval(e.args[0], env), self.eval(e.args[1], env)
                return a << b if op.endswith("left") else a >> b
        r = tvm.arith.Analyzer().simplify(e)
        if isinstance(r, T.IntImm):
            return int(r.value)
        raise NotImplementedError(f"cannot evaluate host expression {name}: {e}")

    @staticmethod
    def _lookup_scalar(v, env):
        for k, val in reversed(env):
            if k.same_as(v):
                return val
        # After FlattenBuffer the host body may refer to re-created Vars with the parameters' names.
        for k, val in reversed(env):
            if not isinstance(val, _Ref) and getattr(k, "name", None) == v.name:
                return val
        raise NotImplementedError(f"unbound host variable {v.name}")

    def resolve(self, e, env) -> _Ref:
        import tvm

        if isinstance(e, tvm.ir.Call) and getattr(e.op, "name", "") == "tirx.buffer_data":
            return self.resolve(e.args[0], env)
        for k, val in reversed(env):
            if k.same_as(e) and isinstance(val, _Ref):
                return val
        hits = [val for k, val in env if isinstance(val, _Ref) and getattr(k, "name", None) == getattr(e, "name", "")]
        if hits:
            return hits[-1]
        raise NotImplementedError(f"unknown buffer {e}")

    def run_host(self, name: str, refs: list[_Ref]):
        import tvm

        f = self.c.host.get(name)
        if f is None:
            raise NotImplementedError(f"no host function '{name}' (only call_tir of TIR PrimFuncs can be replayed)")
        if len(f.params) != len(refs):
            raise RuntimeError(f"{name}: {len(f.params)} parameters, {len(refs)} arguments")
        env: list[tuple[Any, Any]] = []
        for p, r in zip(f.params, refs):
            env.append((p, r))
            # TVM 0.27: PrimFunc parameters are the Buffers themselves (older TVM: Vars plus a buffer_map).
            buf = p if hasattr(p, "data") else getattr(f, "buffer_map", {}).get(p)
            if buf is None:
                continue
            env.append((buf.data, r))
            for d, v in zip(buf.shape, r.shape):
                if isinstance(d, tvm.ir.Var):
                    env.append((d, int(v)))
            if isinstance(buf.elem_offset, tvm.ir.Var):
                env.append((buf.elem_offset, 0))
            stride = 1
            for d, sv in reversed(list(zip(r.shape, list(buf.strides) or [None] * len(r.shape)))):
                if isinstance(sv, tvm.ir.Var):
                    env.append((sv, stride))
                stride *= int(d)
        self._exec(f.body, env, name)

    def _exec(self, s, env, caller):
        import tvm

        T = tvm.tirx
        kind = type(s).__name__
        if isinstance(s, T.SeqStmt):
            for x in s.seq:
                self._exec(x, env, caller)
        elif kind == "DeclBuffer":
            b = s.buffer
            base = self.resolve(b.data, env)
            if b.elem_offset is not None and not isinstance(b.elem_offset, tvm.ir.Var) and self.eval(b.elem_offset, env):
                raise NotImplementedError("host buffer declared at a non-zero offset")
            env.append((b, base))
            if isinstance(b.elem_offset, tvm.ir.Var):
                env.append((b.elem_offset, 0))
            if hasattr(s, "body"):
                self._exec(s.body, env, caller)
        elif kind in ("AllocBuffer", "Allocate"):
            b = s.buffer if hasattr(s, "buffer") else None
            shape = [self.eval(x, env) for x in (b.shape if b is not None else s.extents)]
            dtype = str(b.dtype if b is not None else s.dtype)
            ref = self.new_buffer(shape, dtype, "temp")
            if b is not None:
                env.append((b, ref))
                env.append((b.data, ref))
            else:
                env.append((s.buffer_var, ref))
            if hasattr(s, "body"):
                self._exec(s.body, env, caller)
        elif kind in ("Bind", "LetStmt"):
            env.append((s.var, self.eval(s.value, env)))
            if hasattr(s, "body") and kind == "LetStmt":
                self._exec(s.body, env, caller)
        elif kind == "AttrStmt":
            self._exec(s.body, env, caller)
        elif kind == "IfThenElse":
            if self.eval(s.condition, env):
                self._exec(s.then_case, env, caller)
            elif s.else_case is not None:
                self._exec(s.else_case, env, caller)
        elif kind == "For":
            lo, ext = self.eval(s.min, env), self.eval(s.extent, env)
            for i in range(lo, lo + ext):
                env.append((s.loop_var, i))
                self._exec(s.body, env, caller)
        elif kind == "Evaluate":
            c = s.value
            if isinstance(c, tvm.ir.Call) and getattr(c.op, "name", "") == "tirx.call_ffi_kernel":
                self._launch(c, env, caller)
            elif not isinstance(c, T.IntImm):
                raise NotImplementedError(f"host statement {c}")
        else:
            raise NotImplementedError(f"host statement {kind}")

    def _launch(self, c, env, caller):
        tags = [str(t) for t in c.attrs.launch_params]
        n = len(tags)
        kname = str(c.args[0].value)
        args, extents = list(c.args[1:len(c.args) - n]), list(c.args[len(c.args) - n:])
        params = self.c.kernels[kname]
        if len(args) != len(params):
            raise RuntimeError(f"{kname}: {len(params)} kernel parameters, {len(args)} launch arguments")
        grid, local = [1, 1, 1], [1, 1, 1]
        for t, v in zip(tags, extents):
            m = _LAUNCH_TAG.match(t)
            if not m:
                raise NotImplementedError(f"launch tag {t} (dynamic shared memory?)")
            (grid if m.group(1) == "blockIdx" else local)["xyz".index(m.group(2))] = int(self.eval(v, env))
        cl_args = []
        for a, (_, pkind, dtype) in zip(args, params):
            if pkind == "ptr":
                cl_args.append(("buf", self.resolve(a, env).id))
            else:
                v = self.eval(a, env)
                cl_args.append(("scalar", dtype, float(v) if "float" in dtype else int(v)))
        ndim = 3 if grid[2] > 1 or local[2] > 1 else 2 if grid[1] > 1 or local[1] > 1 else 1
        self.launches.append(Launch(kname, tuple(grid[i] * local[i] for i in range(ndim)), tuple(local[:ndim]),
                                    cl_args, caller))

    # -- Relax main (before CallTIRRewrite)
    def run_relax(self, func, input_infos):
        env: list[tuple[Any, Any]] = []
        inputs = []
        params = list(func.params)
        if len(params) != len(input_infos):
            raise RuntimeError(f"Relax main takes {len(params)} inputs, got {len(input_infos)} (weights must be constants)")
        for p, (name, shape, dtype) in zip(params, input_infos):
            ref = self.new_buffer(shape, dtype, "input")
            env.append((p, ref))
            inputs.append({"name": name, "buffer": ref.id, "shape": list(ref.shape), "dtype": ref.dtype})
        for blk in func.body.blocks:
            for b in blk.bindings:
                if type(b).__name__ != "VarBinding":
                    raise NotImplementedError(f"Relax binding {type(b).__name__}")
                env.append((b.var, self._reval(b.value, env)))
        out = self._reval(func.body.body, env)
        flat = list(out) if isinstance(out, tuple) else [out]
        outputs = [{"name": f"output{i}", "buffer": r.id, "shape": list(r.shape), "dtype": r.dtype}
                   for i, r in enumerate(flat)]
        return inputs, outputs

    def _alloc(self, t):
        n = type(t).__name__
        if n == "TensorType":
            return self.new_buffer([int(x) for x in t.shape.values], str(t.dtype), "temp")
        if n == "TupleType":
            return tuple(self._alloc(x) for x in t.fields)
        raise NotImplementedError(f"Relax output type {n}")

    def _reval(self, e, env):
        import tvm

        n = type(e).__name__
        if n in ("Var", "DataflowVar"):
            for k, v in reversed(env):
                if k.same_as(e):
                    return v
            raise KeyError(e)
        if n in ("GenericConst", "Constant"):
            arr = (e.value if hasattr(e, "value") else e.data).numpy()
            return self.new_buffer(arr.shape, str(arr.dtype), "const", arr)
        if n == "Tuple":
            return tuple(self._reval(x, env) for x in e.fields)
        if n == "TupleGetItem":
            return self._reval(e.tuple_value, env)[e.index]
        if n == "Call":
            op = getattr(e.op, "name", None)
            if op == "relax.call_tir":
                if len(e.args) > 2:
                    raise NotImplementedError("call_tir with symbolic shape arguments")
                ins = [self._reval(a, env) for a in e.args[1].fields]
                outs = self._alloc(e.ty_args[0])
                flat = list(outs) if isinstance(outs, tuple) else [outs]
                self.run_host(e.args[0].name_hint, ins + flat)
                return outs
            sym = str(getattr(e.op, "global_symbol", "")) or str(e.op)
            if op == "relax.reshape" or "vm.builtin.reshape" in sym:
                src = self._reval(e.args[0], env)
                t = e.ty if op == "relax.reshape" else e.ty_args[0]
                return _Ref(src.id, [int(x) for x in t.shape.values], src.dtype)
            raise NotImplementedError(f"Relax operator {op or sym} (only call_tir, reshape, tuples and constants replay)")
        if isinstance(e, tvm.ir.GlobalVar):
            raise NotImplementedError(f"Relax reference to {e.name_hint}")
        raise NotImplementedError(f"Relax expression {n}")


_BINOPS = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "FloorDiv": lambda a, b: a // b, "FloorMod": lambda a, b: a % b,
    "Div": lambda a, b: a / b if isinstance(a, float) or isinstance(b, float) else int(a / b),
    "Mod": lambda a, b: int(np.fmod(a, b)), "Min": min, "Max": max,
    "EQ": lambda a, b: a == b, "NE": lambda a, b: a != b, "LT": lambda a, b: a < b, "LE": lambda a, b: a <= b,
    "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b, "And": lambda a, b: a and b, "Or": lambda a, b: a or b,
}


def _compile_captured(mod, preset):
    import tvm

    from edge_sparse.targets import opencl

    cap = _instrument()
    with tvm.transform.PassContext(instruments=[cap]):
        ex = opencl.build(mod, preset)
    return ex, _Compiled(ex, cap)


def capture(mod, preset, input_infos: list[tuple[str, tuple[int, ...], str]] | None = None):
    """Build a Relax module for an OpenCL preset; returns ``(executable, LaunchPlan)``.

    ``input_infos``: ``[(name, shape, dtype)]`` of ``main``'s parameters (default: names and shapes from the module).
    """
    from edge_sparse import targets

    preset = targets.get(preset)
    if preset.family != "opencl":
        raise UserError(f"target '{preset.name}' is not an OpenCL target; use adreno, mali or an opencl TOML preset")
    ex, compiled = _compile_captured(mod, preset)
    if compiled.relax_mod is None:
        raise RuntimeError("CallTIRRewrite was not seen: the module has no Relax main")
    func = compiled.relax_mod["main"]
    if input_infos is None:
        input_infos = [(str(getattr(p, "name_hint", None) or p.name), tuple(int(s) for s in p.ty.shape.values), str(p.ty.dtype)) for p in func.params]
    planner = _Planner(compiled, preset.name)
    inputs, outputs = planner.run_relax(func, input_infos)
    return ex, planner.plan(inputs, outputs)


def plan_primfunc(func, preset, *, name: str = "kernel"):
    """Build one PrimFunc for an OpenCL preset; the plan's inputs are all its buffer parameters (in order)."""
    import tvm

    from edge_sparse import targets

    preset = targets.get(preset)
    func = func.with_attr("global_symbol", name)
    mod = tvm.IRModule({name: func})
    cap = _instrument()
    with tvm.transform.PassContext(opt_level=3, instruments=[cap]):
        ex = tvm.compile(mod, target=preset.tvm_target())
    compiled = _Compiled(ex, cap)
    planner = _Planner(compiled, preset.name)
    refs, infos = [], []
    for p in func.params:
        buf = p if hasattr(p, "data") else func.buffer_map[p]
        ref = planner.new_buffer([int(s) for s in buf.shape], str(buf.dtype), "input")
        refs.append(ref)
        infos.append({"name": str(buf.name), "buffer": ref.id, "shape": list(ref.shape), "dtype": ref.dtype})
    host_name = name if name in compiled.host else next(iter(compiled.host))
    planner.run_host(host_name, refs)
    return ex, planner.plan(infos, [dict(x) for x in infos])


# ---------------------------------------------------------------------------------------------------- replay
def opencl_devices() -> list[str]:
    """``"platform: device"`` for every OpenCL device the ICD loader lists (empty without pyopencl or devices)."""
    try:
        import pyopencl as cl

        return [f"{p.name}: {d.name}" for p in cl.get_platforms() for d in p.get_devices()]
    except Exception:
        return []


def default_context(device: str | None = None):
    """A pyopencl context on the first device whose ``"platform: device"`` name contains ``device`` (any if None)."""
    try:
        import pyopencl as cl
    except ImportError:
        raise UserError("pyopencl is not installed; pip install pyopencl==2026.1.4 (and an OpenCL driver, "
                        "e.g. apt-get install pocl-opencl-icd)") from None
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    for p in platforms:
        for d in p.get_devices():
            if device is None or device.lower() in f"{p.name}: {d.name}".lower():
                return cl.Context([d])
    have = ", ".join(opencl_devices()) or "none"
    raise UserError(f"no OpenCL device{' matching ' + repr(device) if device else ''} (found: {have}); "
                    f"install an OpenCL driver (e.g. apt-get install pocl-opencl-icd) or register its ICD in /etc/OpenCL/vendors")


class Replayer:
    """Runs a :class:`LaunchPlan` on one OpenCL device through pyopencl."""

    def __init__(self, plan: LaunchPlan, ctx=None, *, profile: bool = False, build_options=()):
        import pyopencl as cl

        self.cl = cl
        self.plan = plan
        self.ctx = ctx if ctx is not None else default_context()
        props = cl.command_queue_properties.PROFILING_ENABLE if profile else 0
        self.queue = cl.CommandQueue(self.ctx, properties=props)
        self.program = cl.Program(self.ctx, plan.source).build(options=list(build_options))
        self._kernels = {name: getattr(self.program, name) for name in plan.kernel_names}
        mf = cl.mem_flags
        self.bufs: dict[int, Any] = {}
        for b in plan.buffers:
            n = max(int(b["nbytes"]), 4)
            if b["id"] in plan.consts:
                self.bufs[b["id"]] = cl.Buffer(self.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR,
                                               hostbuf=_padded(plan.consts[b["id"]], n))
            else:
                self.bufs[b["id"]] = cl.Buffer(self.ctx, mf.READ_WRITE, n)
        self._launch_args = [self._args(ln) for ln in plan.launches]

    def _args(self, ln: Launch):
        out = []
        for a in ln.args:
            out.append(self.bufs[a[1]] if a[0] == "buf" else np.dtype(a[1]).type(a[2]))
        return out

    @property
    def device_name(self) -> str:
        d = self.ctx.devices[0]
        return f"{d.platform.name}: {d.name}"

    def _poison(self):
        """Fill non-constant buffers with NaN (floats) / a sentinel, so a kernel that skips an element shows."""
        for b in self.plan.buffers:
            if b["id"] in self.plan.consts or b["kind"] == "input" or not b["nbytes"]:
                continue
            pat = np.full(b["nbytes"] // np.dtype(b["dtype"]).itemsize,
                          np.nan if b["dtype"].startswith("float") else -7, dtype=b["dtype"])
            self.cl.enqueue_copy(self.queue, self.bufs[b["id"]], pat)

    def write_inputs(self, inputs: dict[str, np.ndarray] | list[np.ndarray]):
        for i, info in enumerate(self.plan.inputs):
            x = inputs[info["name"]] if isinstance(inputs, dict) else inputs[i]
            x = np.ascontiguousarray(x, dtype=info["dtype"])
            if tuple(x.shape) != tuple(info["shape"]):
                raise UserError(f"input '{info['name']}': shape {tuple(x.shape)}, plan expects {tuple(info['shape'])}")
            if x.nbytes:
                self.cl.enqueue_copy(self.queue, self.bufs[info["buffer"]], x)

    def launch_all(self) -> list:
        events = []
        for ln, args in zip(self.plan.launches, self._launch_args):
            events.append(self._kernels[ln.kernel](self.queue, ln.global_size, ln.local_size, *args))
        return events

    def read_outputs(self) -> dict[str, np.ndarray]:
        res = {}
        for info in self.plan.outputs:
            out = np.empty(info["shape"], dtype=info["dtype"])
            if out.nbytes:
                self.cl.enqueue_copy(self.queue, out, self.bufs[info["buffer"]])
            res[info["name"]] = out
        self.queue.finish()
        return res

    def run(self, inputs) -> dict[str, np.ndarray]:
        """Write inputs, run every launch in order, read outputs (by plan output name)."""
        self._poison()
        self.write_inputs(inputs)
        self.launch_all()
        return self.read_outputs()

    def first_nonfinite(self, inputs) -> dict[str, Any] | None:
        """Run launch by launch; the first launch after which one of its buffers holds NaN/inf (unwritten outputs
        stay NaN from the poison fill), with the buffer and how many elements; None when all stay finite."""
        self._poison()
        self.write_inputs(inputs)
        for i, (ln, args) in enumerate(zip(self.plan.launches, self._launch_args)):
            self._kernels[ln.kernel](self.queue, ln.global_size, ln.local_size, *args)
            for a in ln.args:
                if a[0] != "buf":
                    continue
                b = self.plan.buffers[a[1]]
                if not b["dtype"].startswith("float") or not b["nbytes"]:
                    continue
                host = np.empty(b["nbytes"] // np.dtype(b["dtype"]).itemsize, b["dtype"])
                self.cl.enqueue_copy(self.queue, host, self.bufs[a[1]])
                self.queue.finish()
                bad = int(np.count_nonzero(~np.isfinite(host)))
                if bad:
                    return {"launch": i, "kernel": ln.kernel, "caller": ln.caller, "buffer": a[1],
                            "buffer_kind": b["kind"], "nonfinite": bad, "size": int(host.size),
                            "global": list(ln.global_size), "local": list(ln.local_size)}
        return None

    def time_launches(self, inputs, *, warmup: int = 3, repeat: int = 50) -> dict[str, Any]:
        """Median/min device time (profiling events, microseconds) per launch and for the whole sequence."""
        self.write_inputs(inputs)
        for _ in range(warmup):
            self.launch_all()
        self.queue.finish()
        per = [[] for _ in self.plan.launches]
        totals = []
        for _ in range(repeat):
            evs = self.launch_all()
            self.queue.finish()
            ts = [(e.profile.end - e.profile.start) / 1e3 for e in evs]
            for i, t in enumerate(ts):
                per[i].append(t)
            totals.append((evs[-1].profile.end - evs[0].profile.start) / 1e3 if evs else 0.0)
        return {"device": self.device_name, "repeat": repeat,
                "total_us_median": float(np.median(totals)), "kernel_us_sum_median": float(sum(np.median(p) for p in per)),
                "launches": [{"kernel": ln.kernel, "global": list(ln.global_size), "local": list(ln.local_size),
                              "median_us": float(np.median(p)), "min_us": float(np.min(p))}
                             for ln, p in zip(self.plan.launches, per)]}


def _padded(arr: np.ndarray, nbytes: int) -> np.ndarray:
    raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    if raw.nbytes >= nbytes:
        return raw
    return np.concatenate([raw, np.zeros(nbytes - raw.nbytes, np.uint8)])


# ----------------------------------------------------------------------------------------------------- checks
def run_primfunc(func, preset, args: list[np.ndarray], *, ctx=None) -> list[np.ndarray]:
    """Compile one PrimFunc for ``preset`` and run it on OpenCL; returns every buffer argument after the run."""
    _, plan = plan_primfunc(func, preset)
    rep = Replayer(plan, ctx)
    rep.write_inputs(list(args))
    rep.launch_all()
    return list(rep.read_outputs().values())


def check_model(model, target: str = "mali", *, input_shapes: dict[str, tuple[int, ...]] | None = None,
                sparse: str = "auto", inputs: dict[str, np.ndarray] | None = None, device: str | None = None,
                seed: int = 0, ctx=None, plan_dir: str | Path | None = None) -> dict[str, Any]:
    """Compile an ONNX model for an OpenCL target, replay all its kernels on OpenCL, compare with onnxruntime.

    Returns a report: target, device, kernels, launches, sparse layers, per-output max abs / rel error.
    """
    import onnxruntime as ort

    from edge_sparse import targets
    from edge_sparse.compiler import intake as load_model
    from edge_sparse.compiler import lower
    from edge_sparse.targets.opencl import FAMILY

    preset = targets.get(target)
    if targets.family_of(preset) is not FAMILY:
        raise UserError(f"target '{preset.name}' is not an OpenCL target; use adreno, mali or an opencl TOML preset")
    intake = load_model(model, input_shapes)
    mod, layers = lower(intake, preset, sparse)
    infos = [(t.name, tuple(t.shape), t.dtype) for t in intake.inputs]
    _, plan = capture(mod, preset, infos)
    if plan_dir is not None:
        plan.save(plan_dir)
    if inputs is None:
        rng = np.random.default_rng(seed)
        inputs = {t.name: _random_input(rng, t) for t in intake.inputs}
    else:
        inputs = _check_inputs(dict(inputs), intake.inputs)
    # the reference is the user's model file as onnxruntime runs it (not intake's folded copy)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = sess.run(None, inputs)
    rep = Replayer(plan, ctx if ctx is not None else default_context(device))
    got = list(rep.run(inputs).values())
    if len(got) != len(ref):
        raise RuntimeError(f"replay produced {len(got)} outputs, onnxruntime {len(ref)}")
    outs = []
    for info, g, r in zip(intake.outputs, got, ref):
        g = g.reshape(np.shape(r))
        err = float(np.max(np.abs(g.astype(np.float64) - r))) if g.size else 0.0
        scale = float(np.max(np.abs(r))) if np.size(r) else 0.0
        outs.append({"name": info.name, "shape": list(np.shape(r)), "max_abs_err": err,
                     "max_rel_err": err / scale if scale else err, "finite": bool(np.all(np.isfinite(g)))})
    return {"target": preset.name, "device": rep.device_name, "kernels": len(plan.kernel_names),
            "launches": len(plan.launches), "sparse_layers": [dict(x) for x in layers], "outputs": outs}


def _check_inputs(inputs: dict[str, np.ndarray], infos) -> dict[str, np.ndarray]:
    if "__single__" in inputs and len(infos) == 1:           # a bare .npy for a one-input model
        inputs = {infos[0].name: inputs.pop("__single__")}
    missing = [t.name for t in infos if t.name not in inputs]
    if missing:
        raise UserError(f"inputs lack {', '.join(missing)} (the model's inputs: {', '.join(t.name for t in infos)})")
    out = {}
    for t in infos:
        x = np.asarray(inputs[t.name])
        if tuple(x.shape) != tuple(t.shape):
            raise UserError(f"input '{t.name}' has shape {tuple(x.shape)}, the model expects {tuple(t.shape)}")
        out[t.name] = x.astype(t.dtype, copy=False)
    return out


def _random_input(rng, info):
    if info.dtype.startswith("float"):
        return rng.standard_normal(info.shape).astype(info.dtype)
    if info.dtype == "bool":
        return rng.integers(0, 2, info.shape).astype(bool)
    # 0/1: valid token ids, token types and masks alike (a random id can index past a small embedding table)
    return rng.integers(0, 2, info.shape).astype(info.dtype)
