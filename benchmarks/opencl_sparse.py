"""Sparse vs dense OpenCL kernel times on a real OpenCL device (the kernels TVM generates for adreno/mali).

Two steps, so the timing machine needs only numpy + pyopencl (no TVM):

    python benchmarks/opencl_sparse.py prepare --out plans/          # here: compile every kernel, save launch plans
    python benchmarks/opencl_sparse.py run plans/ --json times.json  # on the OpenCL machine: check + time

``prepare`` writes one LaunchPlan per case (edge_sparse.targets.opencl.check): the sparse kernels of targets/opencl/kernels.py
(BSR 16x1, BSR 4x1, CSR at 50/80/90% block sparsity) and TVM's dense kernel for the same layer through the generic GPU
pipeline (mali: dlight Matmul/GEMV rules) and the Adreno pipeline. Weights are not stored: ``run`` regenerates them
from the seed, checks every kernel against numpy, then times it with OpenCL profiling events (median of --repeat runs
after warm-up). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = {"bsr16x1": 16, "bsr4x1": 4, "csr": 1}
SPARSITIES = (0.5, 0.8, 0.9)
# (op, M, K, N): matmul Y[M,N] = X[M,K] W[K,N]; conv1x1 X[1,K,N] -> Y[1,cout,N] with cout = K here
SHAPES = [("matmul", 1, 768, 3072), ("matmul", 1, 3072, 768), ("matmul", 128, 768, 3072), ("matmul", 128, 3072, 768),
          ("conv1x1", 1, 256, 784)]
COUT = 256


def _module(name: str, path: str):
    """``edge_sparse.<name>``, or the file at ``path`` (repository-relative) where edge_sparse is not installed (the
    timing machine: the repository copied, numpy and pyopencl only)."""
    import importlib

    try:
        return importlib.import_module(f"edge_sparse.{name}")
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"_{name.replace('.', '_')}", ROOT / path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


def _to_bsr(w, R):
    return _module("formats", "edge_sparse/formats.py").to_bsr(w, R)


def case_name(op, M, K, N, kind, fmt=None, sp=None):
    base = f"{op}_M{M}_K{K}_N{N}"
    return f"{base}_dense_{kind}" if fmt is None else f"{base}_{fmt}_{int(round(sp * 100))}"


def make_weight(op, K, N, R, sp, seed=0):
    """Pruned W[K, Nw] with a fraction ``sp`` of its Rx1 blocks zero (exact count), deterministic."""
    nw = COUT if op == "conv1x1" else N
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, nw)).astype(np.float32)
    nb = -(-nw // R)
    total = K * nb
    keep = np.zeros(total, bool)
    keep[rng.permutation(total)[: total - int(round(sp * total))]] = True
    mask = np.repeat(keep.reshape(K, nb), R, axis=1)[:, :nw]
    return w * mask


def make_x(op, M, K, N, seed=1):
    rng = np.random.default_rng(seed)
    shape = (M, K) if op == "matmul" else (M, K, N)
    return rng.standard_normal(shape).astype(np.float32)


def reference(op, x, w, b):
    if op == "matmul":
        return x @ w + b
    return np.einsum("kc,bkp->bcp", w, x) + b[None, :, None]


# ------------------------------------------------------------------------------------------------- prepare
def _dense_module(op, M, K, N):
    from tvm import relax

    bb = relax.BlockBuilder()
    if op == "matmul":
        x = relax.Var("x", relax.TensorType((M, K), "float32"))
        w = relax.Var("w", relax.TensorType((K, N), "float32"))
        b = relax.Var("b", relax.TensorType((N,), "float32"))
        with bb.function("main", [x, w, b]):
            with bb.dataflow():
                y = bb.emit(relax.op.add(relax.op.matmul(x, w), b))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    else:  # 1x1 conv as TVM sees it from ONNX: conv2d NCHW / OIHW
        hw = int(round(N ** 0.5))
        x = relax.Var("x", relax.TensorType((M, K, hw, hw), "float32"))
        w = relax.Var("w", relax.TensorType((COUT, K, 1, 1), "float32"))
        b = relax.Var("b", relax.TensorType((1, COUT, 1, 1), "float32"))
        with bb.function("main", [x, w, b]):
            with bb.dataflow():
                y = bb.emit(relax.op.add(relax.op.nn.conv2d(x, w), b))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return bb.get()


def prepare(out: Path, quick: bool = False, extra_models=(), input_shapes=None):
    from edge_sparse import targets
    from edge_sparse.targets.opencl.check import capture, plan_primfunc
    from edge_sparse.formats import KernelSpec
    from edge_sparse.targets.opencl import kernels

    out.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES[:1] if quick else SHAPES
    cases = []
    for op, M, K, N in shapes:
        for tgt in ("mali", "adreno"):
            name = case_name(op, M, K, N, tgt)
            t0 = time.perf_counter()
            _, plan = capture(_dense_module(op, M, K, N), tgt)
            plan.save(out / name)
            cases.append({"name": name, "op": op, "M": M, "K": K, "N": N, "kind": f"dense_{tgt}", "format": None,
                          "sparsity": None})
            print(f"{name}: {len(plan.launches)} launches ({time.perf_counter() - t0:.1f} s)", flush=True)
        for fmt, R in FORMATS.items():
            for sp in SPARSITIES:
                name = case_name(op, M, K, N, None, fmt, sp)
                w = make_weight(op, K, N, R, sp)
                bsr = _to_bsr(w, R)
                spec = KernelSpec(op=op, M=M, K=K, N=N, format=fmt, R=R, nnz=bsr.nnzb, has_bias=True,
                                  cout=COUT if op == "conv1x1" else 0)
                f = kernels.make_sparse_kernel(spec, targets.get("mali"))
                _, plan = plan_primfunc(f, "mali")
                plan.save(out / name)
                cases.append({"name": name, "op": op, "M": M, "K": K, "N": N, "kind": "sparse", "format": fmt,
                              "R": R, "sparsity": sp, "nnzb": bsr.nnzb,
                              "launch": [list(plan.launches[0].global_size), list(plan.launches[0].local_size)]})
                print(f"{name}: nnzb {bsr.nnzb}", flush=True)
                if op == "matmul" and M > kernels.GEMV_MAX_M and fmt != "csr":
                    # X staged in local memory vs read from global memory, both forced, side by side
                    for variant, stage in (("stage", True), ("nostage", False)):
                        fv = kernels.bsr_gemm(M, K, N, R, bsr.nnzb, bias=True, stage_x=stage)
                        _, plan = plan_primfunc(fv, "mali")
                        plan.save(out / f"{name}_{variant}")
                        cases.append(dict(cases[-1], name=f"{name}_{variant}", variant=variant,
                                          launch=[list(plan.launches[0].global_size),
                                                  list(plan.launches[0].local_size)]))
                if op == "matmul" and M <= kernels.GEMV_MAX_M and fmt == "bsr16x1":
                    # the previous fixed 64-thread GEMV work-group, side by side with the adaptive size
                    f64 = kernels.bsr_gemv(M, K, N, R, bsr.nnzb, bias=True, threads=64)
                    _, plan = plan_primfunc(f64, "mali")
                    plan.save(out / f"{name}_t64")
                    cases.append(dict(cases[-1], name=f"{name}_t64", variant="t64",
                                      launch=[list(plan.launches[0].global_size), list(plan.launches[0].local_size)]))
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    for tgt in ("mali", "adreno"):
        prepare_model(out / f"model_mlp_{tgt}", tgt)
        for path in extra_models:
            prepare_model(out / f"model_{Path(path).stem}_{tgt}", tgt, Path(path), input_shapes)


def _pruned_mlp_intake():
    import tempfile

    import onnx
    import onnx.numpy_helper

    from edge_sparse.compiler import intake as load_model
    from edge_sparse.models import synthetic

    model = synthetic.mlp(batch=1, seq=8, d_in=64, hidden=256, d_out=64)
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:          # 80% of 4x1 blocks pruned: the sparse kernels get chosen
        w = onnx.numpy_helper.to_array(init)
        if w.ndim == 2:
            keep = np.repeat(rng.random((w.shape[0], w.shape[1] // 4)) >= 0.8, 4, axis=1)
            init.CopyFrom(onnx.numpy_helper.from_array((w * keep).astype(np.float32), init.name))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.onnx"
        onnx.save(model, str(path))
        return load_model(path)


def prepare_model(out: Path, target: str, onnx_path: Path | None = None, input_shapes=None):
    """A model through the whole OpenCL build (sparse="auto"): plan + inputs + onnxruntime outputs (io.npz).
    Default: a small synthetic MLP with 80% of its 4x1 blocks pruned."""
    import onnxruntime as ort

    from edge_sparse.compiler import intake as load_model
    from edge_sparse.compiler import lower
    from edge_sparse.targets.opencl.check import capture

    intake = load_model(onnx_path, input_shapes) if onnx_path is not None else _pruned_mlp_intake()
    mod, layers = lower(intake, target, "auto")
    _, plan = capture(mod, target, [(t.name, tuple(t.shape), t.dtype) for t in intake.inputs])
    plan.save(out)
    x = {t.name: np.random.default_rng(3).standard_normal(t.shape).astype(t.dtype) for t in intake.inputs}
    ref = ort.InferenceSession(intake.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    np.savez(out / "io.npz", **{f"in_{k}": v for k, v in x.items()}, **{f"out_{i}": r for i, r in enumerate(ref)})
    formats = [x.get("format") for x in layers]
    print(f"{out.name}: {len(plan.launches)} launches, layers {formats}", flush=True)


# ----------------------------------------------------------------------------------------------------- run
def run(plans: Path, json_path: Path | None, device: str | None, repeat: int, only: str | None):
    check = _module("targets.opencl.check", "targets/opencl/check.py")
    LaunchPlan, Replayer, default_context = check.LaunchPlan, check.Replayer, check.default_context
    from edge_sparse.util import atomic_write

    cases = json.loads((plans / "cases.json").read_text())
    if only:
        cases = [c for c in cases if only in c["name"]]
    ctx = default_context(device)
    results = []
    for c in cases:
        op, M, K, N = c["op"], c["M"], c["K"], c["N"]
        plan = LaunchPlan.load(plans / c["name"])
        R = c.get("R", 1)
        x = make_x(op, M, K, N)
        nw = COUT if op == "conv1x1" else N
        b = np.random.default_rng(2).standard_normal(nw).astype(np.float32)
        if c["kind"] == "sparse":
            w = make_weight(op, K, N, R, c["sparsity"])
            bsr = _to_bsr(w, R)
            if bsr.nnzb != c["nnzb"]:
                raise SystemExit(f"{c['name']}: regenerated weight has {bsr.nnzb} blocks, plan has {c['nnzb']}")
            ref = reference(op, x, w, b)
            inputs = [x, *bsr.arrays(), b, np.zeros(ref.shape, np.float32)]
        else:
            w = make_weight(op, K, N, 1, 0.8)      # dense kernels do not care about zeros
            ref = reference(op, x, w, b)
            if op == "matmul":
                inputs = [x, w, b]
            else:
                hw = int(round(N ** 0.5))
                inputs = [x.reshape(M, K, hw, hw), np.ascontiguousarray(w.T).reshape(COUT, K, 1, 1),
                          b.reshape(1, COUT, 1, 1)]
        rep = Replayer(plan, ctx, profile=True)
        got = list(rep.run(inputs).values())[-1].reshape(ref.shape)
        err = float(np.max(np.abs(got - ref)))
        t = rep.time_launches(inputs, warmup=5, repeat=repeat)
        res = dict(c, max_abs_err=err, ref_scale=float(np.max(np.abs(ref))), us=t["kernel_us_sum_median"],
                   launches=t["launches"], device=t["device"])
        results.append(res)
        print(f"{c['name']:<42} {t['kernel_us_sum_median']:>10.1f} us  err {err:.2e}", flush=True)
    for d in sorted(plans.glob("model_*")):
        plan = LaunchPlan.load(d)
        with np.load(d / "io.npz") as z:
            inputs = {k[3:]: z[k] for k in z.files if k.startswith("in_")}
            refs = [z[f"out_{i}"] for i in range(len(plan.outputs))]
        rep = Replayer(plan, ctx, profile=True)
        got = list(rep.run(inputs).values())
        err = max(float(np.max(np.abs(g.reshape(r.shape) - r))) for g, r in zip(got, refs))
        t = rep.time_launches(inputs, warmup=5, repeat=repeat)
        results.append({"name": d.name, "kind": "model", "max_abs_err": err, "us": t["kernel_us_sum_median"],
                        "launches": t["launches"], "device": t["device"]})
        print(f"{d.name:<42} {t['kernel_us_sum_median']:>10.1f} us  err {err:.2e}  ({len(plan.launches)} launches)",
              flush=True)
    _table([r for r in results if r["kind"] != "model"])
    if json_path:
        atomic_write(json_path, json.dumps({"device": results[0]["device"] if results else None, "repeat": repeat,
                                            "results": results}, indent=1))


def _label(r):
    return r["format"] + (f"/{r['variant']}" if r.get("variant") else "")


def _table(results):
    by_shape: dict[tuple, dict] = {}
    for r in results:
        by_shape.setdefault((r["op"], r["M"], r["K"], r["N"]), {})[
            r["kind"] if r["kind"] != "sparse" else _label(r) + f"@{int(r['sparsity'] * 100)}"] = r
    for (op, M, K, N), d in by_shape.items():
        dm = d.get("dense_mali", {}).get("us")
        da = d.get("dense_adreno", {}).get("us")
        print(f"\n{op} M={M} K={K} N={N}: dense (mali pipeline) {dm and round(dm, 1)} us, "
              f"dense (adreno pipeline) {da and round(da, 1)} us")
        print(f"  {'format':<9} {'50%':>18} {'80%':>18} {'90%':>18}   (us, x vs best dense)")
        best = min(v for v in (dm, da) if v) if (dm or da) else None
        for fmt in [*FORMATS, "bsr16x1/t64", "bsr16x1/stage", "bsr16x1/nostage", "bsr4x1/stage", "bsr4x1/nostage"]:
            if not any(k.startswith(fmt + "@") for k in d):
                continue
            cells = []
            for sp in (50, 80, 90):
                r = d.get(f"{fmt}@{sp}")
                cells.append(f"{r['us']:>9.1f} ({best / r['us']:>5.2f}x)" if r and best else f"{'-':>18}")
            print(f"  {fmt:<9} " + " ".join(f"{c:>18}" for c in cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="first shape only")
    p.add_argument("--extra-model", action="append", default=[], help="also an ONNX model (static shapes or --input-shape)")
    p.add_argument("--input-shape", action="append", default=[], help="NAME=D1,D2,... for --extra-model")
    r = sub.add_parser("run")
    r.add_argument("plans", type=Path)
    r.add_argument("--json", "-o", type=Path)
    r.add_argument("--device", help="substring of 'platform: device' to pick the OpenCL device")
    r.add_argument("--repeat", type=int, default=100)
    r.add_argument("--only", help="substring of case names to run")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        shapes = {}
        for spec in a.input_shape:
            name, dims = spec.split("=")
            shapes[name] = tuple(int(d) for d in dims.split(","))
        prepare(a.out, a.quick, a.extra_model, shapes or None)
    else:
        run(a.plans, a.json, a.device, a.repeat, a.only)


if __name__ == "__main__":
    main()
