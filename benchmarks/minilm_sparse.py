"""Model-level sparse benchmark: MiniLM-L6 (seq 128), every linear layer pruned to 80% in 16x1 blocks.

Prunes the zoo model's MatMul/Gemm weights (lowest-L2 16x1 blocks over output channels), compiles the pruned ONNX
with ``--sparse bsr16x1`` (and ``auto``, and ``off`` for the dense TVM path), checks outputs against onnxruntime on
the same pruned ONNX, and times every runtime in its own process (TVM pins threads; TVM_NOTES), runtimes alternate over
``--rounds`` rounds (other load on the host hits all of them); medians over rounds of per-round medians after warm-up.
Outputs must match onnxruntime within 1e-4 * (1 + max|ort|).

    python benchmarks/minilm_sparse.py --threads 1 2 --json benchmarks/results/minilm_sparse.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_sparse.util import atomic_write, latency_stats, time_calls

__all__ = ["prune_linear_blocks", "main"]


def prune_linear_blocks(model, sparsity: float = 0.8, R: int = 16):
    """Zero the lowest-L2 Rx1 blocks (R output channels at one input channel) of every MatMul/Gemm weight."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    pruned = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init).astype(np.float32)
        if w.ndim != 2:
            continue
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        wk = w.T if trans_b else w                     # [K, N]
        K, N = wk.shape
        if N % R:
            continue
        norms = np.sqrt((wk.reshape(K, N // R, R) ** 2).sum(-1))          # [K, N/R]
        drop = int(round(sparsity * norms.size))
        mask = np.ones(norms.size, bool)
        mask[np.argsort(norms, axis=None, kind="stable")[:drop]] = False
        wk = wk * np.repeat(mask.reshape(K, N // R), R, axis=1)
        out = (wk.T if trans_b else wk).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(out), init.name))
        pruned.append(init.name)
    return pruned


def _time_tvm(art: str, threads: int, repeat: int, inputs_npz: str) -> dict:
    from edge_sparse import runtime

    m = runtime.load(art, threads=threads)
    inputs = dict(np.load(inputs_npz))
    out = m.run(inputs)
    stats = latency_stats(time_calls(lambda: m.run(inputs), warmup=4, repeat=repeat))
    return {"median_ms": stats["median_ms"], "min_ms": stats["min_ms"], "outputs": {k: v.tolist() for k, v in out.items()}}


def _time_ort(onnx_path: str, threads: int, repeat: int, inputs_npz: str) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    inputs = dict(np.load(inputs_npz))
    names = [o.name for o in s.get_outputs()]
    out = s.run(None, inputs)
    stats = latency_stats(time_calls(lambda: s.run(None, inputs), warmup=4, repeat=repeat))
    return {"median_ms": stats["median_ms"], "min_ms": stats["min_ms"],
            "outputs": {n: v.tolist() for n, v in zip(names, out)}}


def _child(kind: str, path: str, threads: int, repeat: int, inputs_npz: str) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), TVM_BIND_THREADS="0", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--child", kind, path, str(threads), str(repeat), inputs_npz]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} timing failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per runtime (split over --rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="alternate the runtimes this many times (load noise)")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--modes", nargs="+", default=["bsr16x1", "auto", "off"])
    ap.add_argument("--work", default=None, help="directory for the pruned model and artifacts (default: temp)")
    ap.add_argument("--json", "-o", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, path, threads, repeat, npz = args.child
        fn = _time_tvm if kind == "tvm" else _time_ort
        print(json.dumps(fn(path, int(threads), int(repeat), npz)))
        return 0

    import onnx

    from edge_sparse import compiler, models

    work = Path(args.work or tempfile.mkdtemp(prefix="minilm_sparse_"))
    work.mkdir(parents=True, exist_ok=True)
    src = models.get("minilm-l6", quiet=True)
    recipe = models.recipes()["minilm-l6"]
    model = onnx.load(str(src))
    pruned = prune_linear_blocks(model, args.sparsity, 16)
    pruned_path = work / "minilm-l6-pruned.onnx"
    onnx.save(model, str(pruned_path))
    npz = work / "inputs.npz"
    np.savez(npz, **recipe.sample_input())
    print(f"pruned {len(pruned)} linear weights to {args.sparsity:.0%} (16x1 blocks) -> {pruned_path}")

    result = {"model": "minilm-l6", "seq": 128, "sparsity": args.sparsity, "pattern": "16x1",
              "pruned_layers": len(pruned), "repeat": args.repeat, "runs": []}
    arts = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        man = compiler.compile(str(pruned_path), "host", work / f"art_{mode.replace(':', '_')}", sparse=mode,
                               force=True, quiet=True)
        arts[mode] = work / f"art_{mode.replace(':', '_')}"
        n_sparse = sum(1 for layer in man["layers"] if layer["format"] != "dense")
        result.setdefault("compile", {})[mode] = {"seconds": round(time.perf_counter() - t0, 1),
                                                  "sparse_layers": n_sparse, "layers": len(man["layers"])}
        print(f"compiled --sparse {mode}: {n_sparse}/{len(man['layers'])} layers sparse")
    per_round = max(3, args.repeat // args.rounds)
    for thr in args.threads:
        # runtimes alternate over several rounds so that load from other processes on the host hits all of them
        times: dict[str, list[float]] = {"ort": [], **{m: [] for m in arts}}
        outs: dict[str, dict] = {}
        for _ in range(args.rounds):
            r = _child("ort", str(pruned_path), thr, per_round, str(npz))
            times["ort"].append(r["median_ms"])
            outs["ort"] = r["outputs"]
            for mode, art in arts.items():
                r = _child("tvm", str(art), thr, per_round, str(npz))
                times[mode].append(r["median_ms"])
                outs[mode] = r["outputs"]
        ort_ms = float(np.median(times["ort"]))
        row = {"threads": thr, "ort_ms": round(ort_ms, 3), "ort_round_ms": [round(t, 2) for t in times["ort"]]}
        ref = {k: np.asarray(v) for k, v in outs["ort"].items()}
        for mode in arts:
            ms = float(np.median(times[mode]))
            err = max(float(np.abs(np.asarray(outs[mode][k]) - ref[k]).max()) for k in ref)
            scale = max(float(np.abs(ref[k]).max()) for k in ref)
            row[f"tvm_{mode}_ms"] = round(ms, 3)
            row[f"tvm_{mode}_round_ms"] = [round(t, 2) for t in times[mode]]
            row[f"speedup_{mode}_vs_ort"] = round(ort_ms / ms, 2)
            row[f"max_abs_err_{mode}"] = err
            row[f"outputs_match_{mode}"] = bool(err <= 1e-4 * (1 + scale))
        result["runs"].append(row)
        print(json.dumps(row))
    print("\n| threads | ORT ms | " + " | ".join(f"TVM {m} ms (x ORT)" for m in arts) + " |")
    print("|---|---|" + "---|" * len(arts))
    for row in result["runs"]:
        cells = " | ".join(f"{row[f'tvm_{m}_ms']:.2f} ({row[f'speedup_{m}_vs_ort']:.2f}x)" for m in arts)
        print(f"| {row['threads']} | {row['ort_ms']:.2f} | {cells} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
