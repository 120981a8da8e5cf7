"""int8 benchmark: our int8 kernels (dense and BSR 16x4) against onnxruntime int8 and fp32, on the same ONNX files.

Models: all-MiniLM-L6-v2 (seq 128) and PP-OCR rec (1x3x48x320; ``ppocr_rec``: static QDQ per channel, the
only scheme that quantizes its convs; its 1x1 convs run on our int8 GEMM kernel, 3x3 / depthwise convs stay
dequantize + float conv). MiniLM:
- ``fp32``: the float model (onnxruntime fp32 is the reference and a baseline);
- ``int8``: ``quantize --scheme dynamic --per-channel`` of it: onnxruntime's own int8 (DynamicQuantizeLinear +
  MatMulInteger) and our compile of that same file;
- ``int8_sp16x4`` / ``int8_sp16x1``: ``prune`` (default calibrated method, 80%, 16x4 or 16x1 blocks) then the same quantization; timed in
  onnxruntime int8 and our compile (BSR 16x4 int8 kernels where the cost model picks them).
Accuracy: mean cosine of the sentence embeddings to fp32 dense on the 8 held-out zoo sentences (calibration uses the
other 8), computed by onnxruntime on each int8 ONNX; our artifact must match onnxruntime on the timing input.

Timing: each (runtime, model, threads) in its own process (TVM pins threads; TVM_NOTES), runtimes alternate over
``--rounds`` rounds; the figure is the median over rounds of per-round medians after warm-up. The host is shared
(other jobs): ratios come from numbers taken side by side in this one run.

Kernel table: Y = X @ W for MiniLM's FFN shapes, M = 1 (GEMV) and 128 (GEMM): int8 dense, int8 BSR 16x4 and fp32
BSR 16x1 at 50/80/90% (int8 kernels include requantization to float). ``calibration``: the sparse int8 kernel's time
per stored block relative to the dense int8 kernel's (``passes.qdq.INT8_CALIBRATION``).
Instruction mix: mnemonic counts of the aarch64 builds (rpi5: dotprod, rpi4: Cortex-A72 NEON).

    python benchmarks/int8.py --threads 1 2 --json benchmarks/results/int8.json
"""
from __future__ import annotations

import argparse
import os
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from minilm_sparse import _child  # noqa: E402  (one timing child for every model benchmark)

from edge_sparse.util import atomic_write  # noqa: E402

__all__ = ["main"]

KERNEL_SHAPES = ((384, 1536), (1536, 384))
SPARSITIES = (0.5, 0.8, 0.9)


# ------------------------------------------------------------------------------------------------ models
def _minilm_data(work: Path):
    from edge_sparse import models

    rec = models.recipes()["minilm-l6"]
    order = list(range(8, 16)) + list(range(8))          # calibration sentences first; the last 8 are held out
    samples = [rec.sample_input(i) for i in order]
    calib = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    np.savez(work / "calib.npz", **calib)
    np.savez(work / "input.npz", **rec.sample_input(0))
    return models.get("minilm-l6", quiet=True), work / "calib.npz", work / "input.npz"


def _prepare(work: Path, src: Path, calib: Path, sparsity: float) -> dict[str, Path]:
    from edge_sparse import pruning, quantization

    files = {"fp32": src}
    quantization.quantize(src, work / "int8.onnx", calib=calib, scheme="dynamic", per_channel=True, holdout=0.5,
                          force=True, quiet=True)
    files["int8"] = work / "int8.onnx"
    for pattern in ("16x4", "16x1"):
        tag = pattern.replace("x", "x")
        pruned = work / f"pruned_{tag}.onnx"
        pruning.prune(src, pruned, sparsity=sparsity, pattern=pattern, calib=calib, holdout=0.5, force=True,
                      quiet=True)
        out = work / f"int8_sp{tag}.onnx"
        quantization.quantize(pruned, out, calib=calib, scheme="dynamic", per_channel=True, holdout=0.5,
                              force=True, quiet=True)
        files[f"int8_sp{tag}"] = out
    return files


def _accuracy(files: dict[str, Path], calib: Path) -> dict[str, float]:
    from edge_sparse.passes import calibrate

    data = dict(np.load(calib))
    held = {k: v[8:] for k, v in data.items()}
    import onnx

    ref = calibrate.run_model(onnx.load(str(files["fp32"])), held)["sentence_embedding"]
    out = {}
    for name, path in files.items():
        if name == "fp32":
            continue
        got = calibrate.run_model(onnx.load(str(path)), held)["sentence_embedding"]
        cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        out[name] = round(float(cos.mean()), 5)
    return out


def _ppocr_rec_data(work: Path):
    """PP-OCR rec, its zoo sample lines 0-7 as calibration (6 for ranges, 2 held out), line 12 timed."""
    from edge_sparse import models

    rec = models.recipes()["ppocr-rec"]
    np.savez(work / "rec_calib.npz", x=np.concatenate([rec.sample_input(i)["x"] for i in range(8)]))
    np.savez(work / "rec_input.npz", **rec.sample_input(12))
    return models.get("ppocr-rec", quiet=True), work / "rec_calib.npz", work / "rec_input.npz", rec


def _ppocr_rec(work: Path, threads: list[int], rounds: int, repeat: int) -> dict:
    """PP-OCR rec quantized static QDQ per channel (onnxruntime's dynamic quantizer finds no MatMul weight worth
    it there: the MACs are in convs): ours vs onnxruntime int8 on that same file, and vs onnxruntime fp32."""
    from edge_sparse import quantization

    src, calib, npz, rec = _ppocr_rec_data(work)
    q = work / "rec_int8.onnx"
    res = quantization.quantize(src, q, calib=calib, scheme="static", per_channel=True, holdout=0.25, force=True,
                                quiet=True)
    files = {"fp32": src, "int8": q}
    info, runs = _model_runs(work, files, npz, threads, rounds, repeat, names=("int8",),
                             input_shapes=dict(rec.input_shapes), tag="rec_")
    return {"input": list(rec.input_shapes["x"]), "quantization": "static QDQ, per channel (uint8 activations)",
            "quantize_accuracy_vs_fp32": res.report["accuracy"], "compile": info, "runs": runs}


def _model_runs(work: Path, files: dict[str, Path], npz: Path, threads: list[int], rounds: int, repeat: int,
                names=("int8", "int8_sp16x4", "int8_sp16x1"), input_shapes=None, tag: str = ""):
    from edge_sparse import compiler

    arts, compile_info = {}, {}
    for name in names:
        t0 = time.perf_counter()
        man = compiler.compile(str(files[name]), "host", work / f"art_{tag}{name}", sparse="auto", force=True,
                               quiet=True, input_shapes=input_shapes)
        arts[name] = work / f"art_{tag}{name}"
        int8 = [lay for lay in man["layers"] if lay.get("dtype") == "int8"]
        on = [lay for lay in int8 if lay["kernel"] != "tvm_default"]
        compile_info[name] = {"seconds": round(time.perf_counter() - t0, 1), "int8_layers": len(on),
                              "int8_layers_on_tvm_default": len(int8) - len(on),
                              "int8_conv1x1_layers": sum(lay["kind"] == "conv1x1" for lay in on),
                              "bsr16x4_layers": sum(lay["format"] == "int8_bsr16x4" for lay in on),
                              "mean_block_sparsity_16x4": round(float(np.mean([lay["block_sparsity"]
                                                                               for lay in on])), 4) if on else None}
        print(f"compiled {name}: {compile_info[name]}", flush=True)
    runs = []
    per_round = max(3, repeat // rounds)
    jobs = [("ort", "fp32", str(files["fp32"]))]
    for name in arts:
        jobs += [("ort", name, str(files[name])), ("tvm", name, str(arts[name]))]
    for thr in threads:
        times: dict[tuple[str, str], list[float]] = {(k, n): [] for k, n, _ in jobs}
        outs: dict[tuple[str, str], dict] = {}
        for _ in range(rounds):
            for kind, name, path in jobs:
                r = _child(kind, path, thr, per_round, str(npz))
                times[(kind, name)].append(r["median_ms"])
                outs[(kind, name)] = r["outputs"]
        ms = {f"{k}_{n}": round(float(np.median(v)), 3) for (k, n), v in times.items()}
        row = {"threads": thr, "ms": ms, "round_ms": {f"{k}_{n}": [round(t, 2) for t in v]
                                                     for (k, n), v in times.items()}}
        for name in arts:
            ref = {k: np.asarray(v) for k, v in outs[("ort", name)].items()}
            got = {k: np.asarray(v) for k, v in outs[("tvm", name)].items()}
            err = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
            row[f"max_abs_err_vs_ort_{name}"] = err
            k0 = next(iter(ref))
            if ref[k0].ndim == 3:                  # per-step classes (PP-OCR rec): same character as onnxruntime
                row[f"argmax_agree_vs_ort_{name}"] = round(float(np.mean(got[k0].argmax(-1) ==
                                                                         ref[k0].argmax(-1))), 4)
            row[f"tvm_{name}_vs_ort_int8_same_model"] = round(ms[f"ort_{name}"] / ms[f"tvm_{name}"], 2)
            row[f"tvm_{name}_vs_ort_int8_dense"] = round(ms["ort_int8"] / ms[f"tvm_{name}"], 2)
            row[f"tvm_{name}_vs_ort_fp32"] = round(ms["ort_fp32"] / ms[f"tvm_{name}"], 2)
        row["ort_int8_vs_fp32"] = round(ms["ort_fp32"] / ms["ort_int8"], 2)
        print(json.dumps(row), flush=True)
        runs.append(row)
    return compile_info, runs


# ------------------------------------------------------------------------------------------------ kernels
def _block_pruned(K, N, sparsity, rows, cols, rng):
    w = rng.standard_normal((K, N)).astype(np.float32)
    nb = (K // cols) * (N // rows)
    keep = np.ones(nb, bool)
    keep[rng.permutation(nb)[:int(round(sparsity * nb))]] = False
    mask = np.repeat(np.repeat(keep.reshape(K // cols, N // rows), cols, axis=0), rows, axis=1)
    return w * mask


def _kernel_table(repeat: int, rounds: int) -> tuple[list[dict], dict]:
    import tvm

    from edge_sparse import formats as F
    from edge_sparse import targets
    from edge_sparse.targets.cpu import int8 as I
    from edge_sparse.targets.cpu import sparse as S

    preset = targets.get("host")
    isa = I.isa_for(preset)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    cases = []
    for K, N in KERNEL_SHAPES:
        for M in (1, 128):
            x8 = rng.integers(0, 256, (M, K)).astype(np.uint8)
            xf = rng.standard_normal((M, K)).astype(np.float32)
            for sp in (0.0, *SPARSITIES):
                w16x4 = _block_pruned(K, N, sp, 16, 4, rng)
                wq = np.clip(np.round(w16x4 / np.abs(w16x4).max() * 127), -127, 127).astype(np.int8)
                packed = I.pack_int8(wq, 16, sparse=sp > 0)
                pf = I.int8_kernel(M, K, N, 16, packed.nblocks, isa=isa, x_dtype="uint8")
                args = [x8, *packed.arrays(), np.array([128], np.int32), np.array([0.01], np.float32),
                        np.full(N, 0.01, np.float32), packed.wsum, np.zeros(N, np.float32),
                        np.zeros((M, N), np.float32)]
                cases.append(({"K": K, "N": N, "M": M, "sparsity": sp, "kind": "int8_dense" if sp == 0 else
                               "int8_bsr16x4", "blocks": packed.nblocks},
                              I.build_int8_kernel(pf, preset), args))
                if sp > 0:
                    wf = _block_pruned(K, N, sp, 16, 1, rng)
                    obj = F.convert(wf, "bsr16x1")
                    spec = F.KernelSpec("matmul", M, K, N, "bsr16x1", R=16, nnz=obj.nnzb)
                    cases.append(({"K": K, "N": N, "M": M, "sparsity": sp, "kind": "fp32_bsr16x1",
                                   "blocks": obj.nnzb},
                                  S.build_kernel(S.make_sparse_kernel(spec, preset), preset),
                                  [xf, *obj.arrays(), np.zeros(N, np.float32), np.zeros((M, N), np.float32)]))
    timings: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(rounds):                      # alternate kernels: host load hits them all
        for i, (_, ex, args) in enumerate(cases):
            ta = [tvm.runtime.tensor(a, dev) for a in args]
            f = ex.jit().time_evaluator("main", dev, number=5, repeat=max(3, repeat // rounds), min_repeat_ms=2)
            timings[i].append(float(np.median(f(*ta).results) * 1e6))
    rows = []
    for i, (info, _, _) in enumerate(cases):
        rows.append({**info, "us": round(float(np.median(timings[i])), 2)})
    dense = {(r["K"], r["N"], r["M"]): r for r in rows if r["kind"] == "int8_dense"}
    calib = {"gemv": [], "gemm": []}
    for r in rows:
        d = dense[(r["K"], r["N"], r["M"])]
        r["vs_int8_dense"] = round(d["us"] / r["us"], 2)
        if r["kind"] == "int8_bsr16x4":
            calib["gemv" if r["M"] == 1 else "gemm"].append((r["us"] / r["blocks"]) / (d["us"] / d["blocks"]))
        if r["kind"] == "fp32_bsr16x1":
            i8 = [q for q in rows if q["kind"] == "int8_bsr16x4" and (q["K"], q["N"], q["M"], q["sparsity"]) ==
                  (r["K"], r["N"], r["M"], r["sparsity"])][0]
            i8["vs_fp32_bsr16x1"] = round(r["us"] / i8["us"], 2)
    return rows, {k: round(float(np.median(v)), 3) for k, v in calib.items() if v}


def _instruction_mix() -> dict:
    from edge_sparse import targets
    from edge_sparse.targets.cpu import int8 as I

    out = {}
    for name in ("rpi5", "rpi4"):
        preset = targets.get(name)
        isa = I.isa_for(preset)
        for M in (1, 128):
            ex = I.build_int8_kernel(I.int8_kernel(M, 384, 1536, 16, 96 * 48, isa=isa, x_dtype="uint8",
                                                   activation="gelu"), preset)
            ops = Counter(re.findall(r"^\s+([a-z][a-z0-9.]*)\s", ex.mod.inspect_source("asm"), re.M))
            keys = ("sdot", "udot", "smull", "smull2", "saddlp", "addp", "mul", "madd", "smaddl", "fmla", "fmul")
            out[f"{name}_{isa}_M{M}"] = {k: ops.get(k, 0) for k in keys}
    return out


def _arm_estimates(files: dict[str, Path], threads: int = 4) -> dict:
    """Roofline *estimates* (ms) on rpi4 / rpi5 at ``threads``: fp32 dense through benchmarks/e2e.py's model, the
    int8 models with each MatMulInteger layer timed by the int8 cost model (passes.qdq.int8_estimate_us) for the
    preset's dot-product path, the rest of the graph by the same roofline. Not measurements (no ARM board here)."""
    from onnx import numpy_helper

    from e2e import _shapes, estimate, layer_estimates
    from edge_sparse import targets
    from edge_sparse.intake import load_model
    from edge_sparse.passes.qdq import int8_estimate_us
    from edge_sparse.targets.cpu.int8 import block_density, isa_for

    out = {}
    intakes = {name: load_model(str(path), None) for name, path in files.items()}
    for dev in ("rpi4", "rpi5"):
        preset = targets.get(dev)
        isa = isa_for(preset)
        row = {"isa": isa, "threads": threads}
        fp = intakes["fp32"]
        row["fp32_dense_ms"] = round(estimate(fp.model, preset.device, threads,
                                              layer_estimates(fp, preset, "off"))["seconds"] * 1e3, 2)
        for name, it in intakes.items():
            if name == "fp32":
                continue
            model, shapes = it.model, _shapes(it.model)
            inits = {t.name: t for t in model.graph.initializer}
            layers = {}
            for node in model.graph.node:
                if node.op_type != "MatMulInteger" or node.input[1] not in inits or node.input[0] not in shapes:
                    continue
                wq = numpy_helper.to_array(inits[node.input[1]])
                K, N = wq.shape
                M = int(np.prod(shapes[node.input[0]])) // K
                dens = block_density(wq, 16)
                sparse = dens < 0.85
                blocks = max(1, int(round((dens if sparse else 1.0) * (K // 4) * (N // 16))))
                layers[node.input[1]] = {"format": "int8_bsr16x4" if sparse else "int8_dense",
                                         "us": int8_estimate_us(M, K, N, blocks, sparse, preset, isa)}
            row[f"{name}_ms"] = round(estimate(model, preset.device, threads, layers)["seconds"] * 1e3, 2)
        out[dev] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per runtime (split over --rounds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--skip-models", action="store_true", help="skip MiniLM")
    ap.add_argument("--skip-ppocr", action="store_true", help="skip PP-OCR rec")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", "-o", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")          # the in-process kernel table runs on one thread
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    work = Path(args.work or tempfile.mkdtemp(prefix="int8_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"host": "shared with other jobs (ratios from one run, runtimes alternated)", "threads": args.threads,
              "repeat": args.repeat, "rounds": args.rounds}
    if not args.skip_models:
        src, calib, npz = _minilm_data(work)
        files = _prepare(work, src, calib, args.sparsity)
        result["minilm"] = {"seq": 128, "sparsity": args.sparsity, "quantization": "dynamic, per channel",
                            "accuracy_cosine_vs_fp32_heldout8": _accuracy(files, calib)}
        print("accuracy:", result["minilm"]["accuracy_cosine_vs_fp32_heldout8"], flush=True)
        result["minilm"]["arm_estimates_ms"] = _arm_estimates(files)
        print("ARM estimates (roofline, not measured):", result["minilm"]["arm_estimates_ms"], flush=True)
        info, runs = _model_runs(work, files, npz, args.threads, args.rounds, args.repeat)
        result["minilm"].update(compile=info, runs=runs)
    if not args.skip_ppocr:
        result["ppocr_rec"] = _ppocr_rec(work, args.threads, args.rounds, args.repeat)
    if not args.skip_kernels:
        rows, calib_ratio = _kernel_table(args.repeat, args.rounds)
        result["kernels"] = {"threads": 1, "rows": rows, "calibration": calib_ratio}
        print("\n| K x N | M | sparsity | kind | us | x int8 dense | x fp32 16x1 |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['K']}x{r['N']} | {r['M']} | {r['sparsity']:.0%} | {r['kind']} | {r['us']:.1f} | "
                  f"{r['vs_int8_dense']:.2f} | {r.get('vs_fp32_bsr16x1', '')} |")
        print("calibration (sparse int8 cost per block / dense int8):", calib_ratio)
    result["instruction_mix_aarch64"] = _instruction_mix()
    print(json.dumps(result["instruction_mix_aarch64"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
