"""End-to-end results on the model zoo: accuracy kept, host latency against onnxruntime, artifact size, and
estimated Raspberry Pi latency, for dense and pruned variants of every zoo model.

    python benchmarks/e2e.py --out-dir docs/e2e            # all models, all configs, 1 and 2 threads
    python benchmarks/e2e.py --models ppocr-cls --configs dense,b80 --threads 1 --out-dir /tmp/e2e

Per model (``edge_sparse.models``), per config:
  dense   the zoo ONNX; edge-sparse compiles it with ``--sparse off``
  u50     50% unstructured        n24  2:4 (50%)
  b70/b80/b90  70/80/90% in 16x1 blocks over output channels
Pruned models come from ``edge_sparse.prune`` (the default calibrated method, or ``--method``; per-layer sparsity by sensitivity, ``--allocate
uniform`` for the same target in every layer; default skips: first conv and classifier head), calibrated on
``--calib`` samples of the model's real calibration split (``edge_sparse.models.data``); they are compiled with
``--sparse auto``.

Accuracy is measured on ``--eval`` samples of the real held-out split (disjoint from calibration), scored by
``data.score`` against ground truth where there is one, with the dense model's own score beside it:
  ppocr-rec  line accuracy and character error rate against the rendered text (trdg fonts and word lists)
  ppocr-cls  accuracy on rendered lines upright / rotated 180 degrees
  minilm-l6  cosine of the sentence embedding to the dense model's (Lee background sentences) and Spearman of the
             1,225 human-scored Lee document pairs
using edge-sparse's outputs (what is deployed; onnxruntime's on the same pruned ONNX beside them); ``es_vs_ort`` is
the max |difference| between edge-sparse and onnxruntime on the same pruned ONNX relative to the output's max
magnitude.

Latency: each runtime in its own process (TVM's thread pinning leaks into ORT threads otherwise), TVM_BIND_THREADS=0,
same inputs, ``--threads`` list; warm-up, then at least ``--repeat`` runs and ``--min-seconds``; the median of
per-run wall times of one ``run(inputs) -> numpy outputs`` call (input copy and output copy included for both).
ORT: CPUExecutionProvider, all graph optimisations, ``intra_op_num_threads`` = threads, sequential.

Estimated latency on rpi4/rpi5 (4 threads) is an estimate, not a measurement (see ``estimate``): weight layers
(MatMul / Gemm / 1x1 conv) take the sparse pass's own per-layer cost model (passes/sparsify.py ``estimate_us``) for
the format it chooses *for that device preset*; all other ops a roofline, max(flops / (threads x
peak_gflops_per_core x 0.4), bytes / bandwidth) + 2 us dispatch, where bandwidth is 0.6 x mem_bw_gbps when the
op's tensors exceed L2+L3 and the cache's (16 B/cycle/core) when they fit; elementwise ops count as fused into
their producer (arithmetic only). The same model for the host
(``host_est``) sits next to the host measurement in the JSON, so its error on a machine we can measure is visible.

Outputs in --out-dir: e2e.json (everything), e2e.md (the table), e2e.png (plot). Rerun with --resume to keep
finished rows of an existing e2e.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_sparse.passes import methods
from edge_sparse.util import atomic_write, latency_stats, time_calls

__all__ = ["CONFIGS", "estimate", "main"]

# key -> (label, prune pattern, sparsity); pattern None = dense
CONFIGS = {
    "dense": ("dense", None, None),
    "u50": ("50% unstructured", "unstructured", 0.5),
    "n24": ("50% 2:4", "2:4", 0.5),
    "b70": ("70% 16x1", "16x1", 0.7),
    "b80": ("80% 16x1", "16x1", 0.8),
    "b90": ("90% 16x1", "16x1", 0.9),
}
EST_THREADS = 4

# ---------------------------------------------------------------------------------------------- cost model
# Ops that are not weight layers (activation x activation matmuls, k x k and depthwise convs, elementwise,
# normalisation): fraction of a core's peak FLOP rate reached (tuned NEON GEMM reaches ~60-70%; discounted for
# untuned schedules). Weight layers use the sparse pass's calibrated per-layer model instead.
EFFICIENCY = {"dense": 0.40}
PARALLEL_EFFICIENCY = 0.85     # per extra thread, compute-bound parts
BW_EFFICIENCY = 0.6            # of the preset's mem_bw_gbps reached by streaming kernels
OP_OVERHEAD_S = 2e-6           # Relax VM dispatch + thread-pool fork/join per kernel call
# Injective ops that TVM's FuseOps folds into the producing kernel: their tensors stay in registers, so they cost
# their arithmetic only (no memory traffic, no dispatch).
_FUSED = {"Add", "Sub", "Mul", "Div", "Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Erf", "Cast",
          "Pow", "Sqrt", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "BatchNormalization", "Neg", "Exp"}
_TRANSCENDENTAL = {"Erf", "Exp", "Sigmoid", "Tanh", "Softmax", "LayerNormalization", "HardSigmoid", "HardSwish",
                   "ReduceMean", "Pow", "Sqrt", "Div", "GlobalAveragePool", "AveragePool", "BatchNormalization"}


def _shapes(model) -> dict[str, tuple[int, ...]]:
    out = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        if all(d > 0 for d in dims):
            out[vi.name] = dims
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _itemsize(model) -> dict[str, int]:
    import onnx

    sizes = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        sizes[vi.name] = 8 if vi.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE) else 4
    return sizes


def layer_estimates(intake, preset, sparse_mode: str) -> dict[str, dict]:
    """Per-layer choice and time (us) from the sparse pass's own cost model (passes/sparsify.py ``estimate_us``)
    for ``preset``: weight initializer name -> {format, us}. ``sparse_mode`` "off": every layer dense."""
    from edge_sparse.compiler import lower

    _, layers = lower(intake, preset, "auto" if sparse_mode == "off" else sparse_mode)
    out = {}
    for e in layers:
        fmt = e["format"] if sparse_mode != "off" else "dense"
        us = e.get("est_us_sparse") if fmt != "dense" else e.get("est_us_dense")
        if us is not None:
            out[e["name"]] = {"format": fmt, "us": float(us)}
    return out


def estimate(model, device: dict, threads: int, layers: dict[str, dict]) -> dict:
    """Latency estimate (seconds) of ``model`` (folded ONNX with inferred shapes) on a preset's ``device``.

    MatMul / Gemm / 1x1-conv layers with constant weights (``layers``: initializer name -> {format, us}) take the
    sparse pass's per-layer estimate for the format it chose; every other op a roofline:
    max(flops / (threads x peak_gflops_per_core x efficiency), bytes / (mem_bw_gbps x BW_EFFICIENCY)) + dispatch.
    """
    shapes, itemsize = _shapes(model), _itemsize(model)
    peak = device["peak_gflops_per_core"] * 1e9
    cores = min(threads, device["cores"])
    par = 1.0 + (cores - 1) * PARALLEL_EFFICIENCY
    bw = device["mem_bw_gbps"] * 1e9 * BW_EFFICIENCY
    # Activations that fit in the caches never reach DRAM (TVM fuses elementwise chains, and the next op reads
    # them from L2/L3); a NEON core streams about 16 B/cycle from L2, as many bytes as it does flops per cycle.
    cache_bytes = (device.get("l2_kb", 0) + device.get("l3_kb", 0)) * 1024
    cache_bw = device["peak_gflops_per_core"] * 1e9 * cores
    total = layers_s = other_s = 0.0
    flops_total = 0.0
    sparse_layers = 0
    for node in model.graph.node:
        weight = node.input[1] if len(node.input) > 1 else None
        if weight in layers:
            t = layers[weight]["us"] * 1e-6
            sparse_layers += layers[weight]["format"] != "dense"
            total += t
            layers_s += t
            continue
        out_shape = shapes.get(node.output[0]) if node.output else None
        if out_shape is None:
            continue
        out_numel = float(np.prod(out_shape))
        in_bytes = sum(float(np.prod(shapes[n])) * itemsize.get(n, 4) for n in node.input if n in shapes)
        out_bytes = sum(float(np.prod(shapes[n])) * itemsize.get(n, 4) for n in node.output if n in shapes)
        op = node.op_type
        if op in ("MatMul", "Gemm", "Conv") and weight in shapes:
            wshape = shapes[weight]
            if op == "Conv":
                reduce_len = float(np.prod(wshape[1:]))
            elif op == "MatMul":
                reduce_len = wshape[-2]
            else:
                reduce_len = wshape[1] if any(a.name == "transB" and a.i for a in node.attribute) else wshape[0]
            flops = 2.0 * out_numel * reduce_len
        elif op in _TRANSCENDENTAL:
            flops = 8.0 * out_numel
        else:
            flops = out_numel
        t_compute = flops / (peak * par * EFFICIENCY["dense"])
        if op in _FUSED:
            t = t_compute
        else:
            moved = in_bytes + out_bytes
            t = max(t_compute, moved / (cache_bw if moved <= cache_bytes else bw)) + OP_OVERHEAD_S
        total += t
        other_s += t
        flops_total += flops
    return {"seconds": total, "threads": cores, "sparse_layers": sparse_layers, "layers_s": layers_s,
            "other_ops_s": other_s, "other_gflop": flops_total / 1e9}


# ---------------------------------------------------------------------------------------------- timing worker
def _worker(args) -> None:
    """Runs in its own process: load one runtime, run the inputs, time, print JSON on the last line."""
    data = dict(np.load(args.inputs))
    n = args.threads
    if args.runtime == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        t0 = time.perf_counter()
        sess = ort.InferenceSession(args.path, opts, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
        names = [o.name for o in sess.get_outputs()]

        def run(x):
            return dict(zip(names, sess.run(None, x)))
    else:
        from edge_sparse import runtime

        t0 = time.perf_counter()
        model = runtime.load(args.path, threads=n)
        load_s = time.perf_counter() - t0
        run = model.run
    samples = args.samples if args.save_outputs else 1       # the held-out set runs once, in the saving round
    eval_inputs = [{k: v[i:i + 1] for k, v in data.items()} for i in range(samples)]
    if args.save_outputs:
        outputs: dict = {}
        for x in eval_inputs:
            for name, y in run(x).items():
                outputs.setdefault(name, []).append(y)
        np.savez(args.save_outputs, **{k: np.concatenate(v) for k, v in outputs.items()})
    x = eval_inputs[0]
    times = time_calls(lambda: run(x), warmup=args.warmup, repeat=args.repeat, min_seconds=args.min_seconds,
                       max_count=2000)
    print(json.dumps({"runtime": args.runtime, "threads": n, "load_s": load_s, **latency_stats(times)}))


def _spawn(runtime_name: str, path: Path, inputs: Path, threads: int, args, save: Path | None = None) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), TVM_BIND_THREADS="0", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", "--runtime", runtime_name, "--path", str(path),
           "--inputs", str(inputs), "--threads", str(threads), "--warmup", str(args.warmup),
           "--repeat", str(args.repeat), "--min-seconds", str(args.min_seconds),
           "--samples", str(args.eval_count)]
    if save is not None:
        cmd += ["--save-outputs", str(save)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{runtime_name} worker failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- accuracy
def _accuracy(sets: dict, dense: dict | None, got: dict, charset) -> dict:
    """``data.score`` of ``got`` (outputs stacked over the held-out samples, eval first, then the Lee documents) per
    split; ``value``/``metric``: the task's primary score on the eval split. ``dense`` None: the dense model itself."""
    from edge_sparse.models import data

    res = data.score_splits(sets, got, dense, charset)
    metric = data.PRIMARY[data.recipes()[sets["eval"].model].task]
    value = res["eval"].get(metric, 1.0 if dense is None and metric == "cosine" else None)
    return {"metric": metric, "value": value, **res}


def _rel_err(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        scale = max(1e-12, float(np.abs(b[k]).max()))
        worst = max(worst, float(np.abs(a[k] - b[k]).max()) / scale)
    return worst


# ---------------------------------------------------------------------------------------------- one row
def _artifact_bytes(manifest: dict) -> int:
    return int(sum(f["bytes"] for name, f in manifest["files"].items() if name != "manifest.json"))


def _run_config(name: str, key: str, src: Path, work: Path, args, dense_outputs: dict, charset, sets: dict,
                calib: dict) -> dict:
    from edge_sparse import compiler, models, targets
    from edge_sparse.artifact import read_manifest
    from edge_sparse.compiler import intake as load_model

    recipe = models.recipes()[name]
    label, pattern, sparsity = CONFIGS[key]
    row: dict = {"model": name, "config": key, "label": label, "pattern": pattern, "target_sparsity": sparsity}
    t0 = time.perf_counter()
    inputs_npz = work / "eval_inputs.npz"
    onnx_path = src
    if pattern is not None:
        from edge_sparse import prune

        onnx_path = work / f"{key}.{args.method}.{args.allocate}.onnx"
        report_path = work / f"{key}.{args.method}.{args.allocate}.report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() and onnx_path.exists() else None
        if report is None or report["source_model"]["sha256"] != recipe.sha256 and recipe.sha256 is not None:
            report = prune(src, onnx_path, sparsity=sparsity, pattern=pattern, method=args.method, calib=calib,
                           allocate_by=args.allocate, holdout=0.0, report_path=report_path, force=True,
                           quiet=True).report
        row["sparsity"] = report["sparsity"]
        row["prune_method"] = report["method"]
    art = work / f"{key}-art"
    t = time.perf_counter()
    manifest = compiler.compile(onnx_path, "host", art, input_shapes=recipe.input_shapes,
                                sparse="off" if pattern is None else args.sparse, force=True, quiet=True)
    row["compile_s"] = round(time.perf_counter() - t, 1)
    manifest = read_manifest(art)
    layers = manifest.get("layers", [])
    row["sparse_layers"] = sum(1 for layer in layers if layer.get("format") not in (None, "dense"))
    row["formats"] = sorted({str(layer.get("format")) for layer in layers})
    row["artifact_bytes"] = _artifact_bytes(manifest)
    row["onnx_bytes"] = onnx_path.stat().st_size

    latency = {}
    es_outputs = ort_outputs = None
    for threads in args.threads:
        runs = {"ort": [], "es": []}
        for round_index in range(args.rounds):          # interleaved, so a burst of load hits both runtimes
            for rt in ("ort", "es"):
                save = work / f"{key}-{rt}-outputs.npz" if threads == args.threads[0] and round_index == 0 else None
                runs[rt].append(_spawn("ort" if rt == "ort" else "tvm", onnx_path if rt == "ort" else art,
                                       inputs_npz, threads, args, save))
        for rt, found in runs.items():
            best = dict(min(found, key=lambda r: r["median_ms"]))
            best["round_medians_ms"] = [round(r["median_ms"], 3) for r in found]
            latency[f"{rt}_{threads}t"] = best
    for rt in ("ort", "es"):
        outs = dict(np.load(work / f"{key}-{rt}-outputs.npz", allow_pickle=False))
        if rt == "es":
            es_outputs = outs
        else:
            ort_outputs = outs
    row["latency"] = latency
    for threads in args.threads:
        row[f"speedup_{threads}t"] = latency[f"ort_{threads}t"]["median_ms"] / latency[f"es_{threads}t"]["median_ms"]
    row["accuracy"] = _accuracy(sets, dense_outputs, es_outputs, charset)
    row["accuracy_ort"] = _accuracy(sets, dense_outputs, ort_outputs, charset)
    row["es_vs_ort"] = _rel_err(es_outputs, ort_outputs)

    intake = load_model(onnx_path, recipe.input_shapes)
    mode = "off" if pattern is None else args.sparse
    row["estimate"] = {}
    for dev in ("rpi4", "rpi5", "host"):
        preset = targets.get(dev)
        est = estimate(intake.model, preset.device, EST_THREADS if dev != "host" else max(args.threads),
                       layer_estimates(intake, preset, mode))
        if dev == "host":
            row["host_est"] = est
        else:
            row["estimate"][dev] = est
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ---------------------------------------------------------------------------------------------- report
def _fmt_acc(acc: dict | None) -> str:
    if not acc or acc.get("value") is None:
        return "n/a"
    v = acc["value"]
    if acc["metric"] == "cosine":
        rho = acc.get("pairs", {}).get("spearman_human")
        return f"cos {v:.3f}" + (f", ρ {rho:.3f}" if rho is not None else "")
    if acc["metric"] == "line_accuracy":
        return f"{v:.1%} lines, CER {acc['eval']['cer']:.3f}"
    return f"{v:.1%}"


def markdown(result: dict) -> str:
    threads = result["threads"]
    head = ["model", "config", "sparsity", "accuracy (held-out)", "dense model's", "ES≈ORT"]
    for t in threads:
        head += [f"ORT ms {t}t", f"edge-sparse ms {t}t", f"speedup {t}t"]
    head += ["artifact MB", "rpi4 est. ms", "rpi5 est. ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['label']} | error: {row['error'][:120]} |" + " |" * (len(head) - 3))
            continue
        sp = row.get("sparsity", {}).get("overall")
        cells = [row["model"], row["label"], f"{sp:.0%}" if sp is not None else "0%", _fmt_acc(row["accuracy"]),
                 _fmt_acc(result.get("dense_accuracy", {}).get(row["model"])), f"{row['es_vs_ort']:.0e}"]
        for t in threads:
            lat = row["latency"]
            cells += [f"{lat[f'ort_{t}t']['median_ms']:.2f}", f"{lat[f'es_{t}t']['median_ms']:.2f}",
                      f"{row[f'speedup_{t}t']:.2f}x"]
        cells += [f"{row['artifact_bytes'] / 1e6:.1f}", f"{row['estimate']['rpi4']['seconds'] * 1e3:.1f}",
                  f"{row['estimate']['rpi5']['seconds'] * 1e3:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    notes = [
        "",
        f"Host: {m['cpu']} ({m['cores']} cores available, shared), {m['os']}; onnxruntime {m['onnxruntime']}, "
        f"TVM {m['tvm']}. Latency: median of per-call wall times, each runtime in its own process, "
        f"TVM_BIND_THREADS=0, threads = {', '.join(map(str, threads))}.",
        f"Pruning: one-shot {result['method']}, no retraining, per-layer sparsity allocated "
        f"{'by sensitivity' if result.get('allocate') == 'sensitivity' else 'uniformly'} (default skips: first "
        f"conv, classifier head), calibrated on {result.get('calib', '?')} samples of real data.",
        f"Accuracy of edge-sparse's outputs on {result.get('eval', '?')} held-out samples of real data "
        "(edge_sparse.models.data; disjoint from calibration): ppocr-rec = line accuracy and character error rate "
        "against the rendered ground truth, ppocr-cls = accuracy on upright/180-degree lines, minilm-l6 = cosine of "
        "the sentence embedding to the dense model's and Spearman ρ of the 1,225 human-scored Lee document pairs. "
        "'dense model's' is the dense zoo model's own score on the same data. ES≈ORT: max |edge-sparse - "
        "onnxruntime| on the same pruned ONNX, relative to the output's max.",
        f"rpi4 / rpi5 columns are roofline *estimates* at {EST_THREADS} threads (benchmarks/e2e.py `estimate`), "
        "not measurements.",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    names = list(dict.fromkeys(r["model"] for r in rows))
    if not names:
        return
    t = result["threads"][0]
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 3.2 * len(names)), squeeze=False)
    for ax_lat, ax_acc, name in zip(axes[:, 0], axes[:, 1], names):
        mine = [r for r in rows if r["model"] == name]
        labels = [r["label"] for r in mine]
        x = np.arange(len(mine))
        ort_ms = [r["latency"][f"ort_{t}t"]["median_ms"] for r in mine]
        es_ms = [r["latency"][f"es_{t}t"]["median_ms"] for r in mine]
        ax_lat.bar(x - 0.2, ort_ms, 0.4, label="onnxruntime", color="#8c8c8c")
        ax_lat.bar(x + 0.2, es_ms, 0.4, label="edge-sparse", color="#2a7ab0")
        for xi, o, e in zip(x, ort_ms, es_ms):
            ax_lat.text(xi + 0.2, e, f"{o / e:.1f}x", ha="center", va="bottom", fontsize=8)
        ax_lat.set_xticks(x, labels, rotation=20, fontsize=8)
        ax_lat.set_ylabel(f"ms, {t} thread(s), host")
        ax_lat.set_title(f"{name}: latency (same pruned ONNX)")
        ax_lat.legend(fontsize=8)
        acc = [r["accuracy"]["value"] for r in mine]
        ax_acc.plot(x, acc, "o-", color="#2a7ab0")
        ax_acc.set_xticks(x, labels, rotation=20, fontsize=8)
        ax_acc.set_ylabel(mine[0]["accuracy"]["metric"])
        ax_acc.set_ylim(min(0.0 if mine[0]["accuracy"]["metric"] != "mean cosine" else min(acc) - 0.02, 0.9), 1.02)
        ax_acc.set_title(f"{name}: agreement with dense (8 held-out inputs)")
        ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> dict:
    import onnxruntime
    import tvm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__}


def _write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("e2e.json", json.dumps(result, indent=2) + "\n"), ("e2e.md", markdown(result))):
        atomic_write(out_dir / name, text)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:                       # internal: one timing process (see _spawn)
        w = argparse.ArgumentParser(prog="e2e.py _worker")
        w.add_argument("--runtime", choices=["ort", "tvm"], required=True)
        w.add_argument("--path", required=True)
        w.add_argument("--inputs", required=True)
        w.add_argument("--threads", type=int, required=True)
        w.add_argument("--warmup", type=int, default=5)
        w.add_argument("--repeat", type=int, default=20)
        w.add_argument("--min-seconds", type=float, default=1.5)
        w.add_argument("--samples", type=int, default=8)
        w.add_argument("--save-outputs")
        _worker(w.parse_args(argv[1:]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="ppocr-cls,ppocr-rec,minilm-l6", help="comma-separated zoo names")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (each its own processes)")
    p.add_argument("--method", default=None, choices=methods.names(),
                   help="pruning method (default: the preferred one for calibrated pruning)")
    p.add_argument("--allocate", default="sensitivity", choices=["sensitivity", "uniform"],
                   help="per-layer sparsity: by sensitivity (the global target is met) or the same for every layer")
    p.add_argument("--sparse", default="auto", help="compile --sparse mode for pruned models")
    p.add_argument("--calib", type=int, default=64, help="real calibration samples for pruning")
    p.add_argument("--eval", type=int, default=200, help="real held-out samples for the accuracy columns")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20, help="at least this many timed runs")
    p.add_argument("--min-seconds", type=float, default=1.5, help="and at least this long")
    p.add_argument("--rounds", type=int, default=3,
                   help="processes per runtime and thread count, interleaved ORT/edge-sparse (lowest median kept:\n"
                        "on a shared machine the least disturbed round)")
    p.add_argument("--out-dir", "-o", default="e2e-results", help="where e2e.json, e2e.md and e2e.png go")
    p.add_argument("--work-dir", help="pruned models and artifacts (default: a temporary directory)")
    p.add_argument("--resume", action="store_true", help="keep finished rows of an existing e2e.json")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.method = args.method or methods.default(calibrated=True)

    import onnxruntime as ort

    from edge_sparse import models
    from edge_sparse.models.zoo import ocr_charset

    names = [n for n in args.models.split(",") if n]
    keys = [k for k in args.configs.split(",") if k]
    unknown = [n for n in names if n not in models.recipes()] + [k for k in keys if k not in CONFIGS]
    if unknown:
        p.error(f"unknown model/config: {', '.join(unknown)}")
    args.threads = [int(t) for t in args.threads.split(",")]
    out_dir = Path(args.out_dir)
    result = {"command": "python benchmarks/e2e.py " + " ".join(argv),
              "machine": _machine(), "threads": args.threads, "method": args.method, "allocate": args.allocate,
              "sparse_mode": args.sparse, "calib": args.calib, "eval": args.eval, "data": {}, "dense_accuracy": {},
              "estimate_model": {"layers": "passes.sparsify.estimate_us", "other_ops_efficiency": EFFICIENCY, "parallel_efficiency": PARALLEL_EFFICIENCY,
                                 "bandwidth_efficiency": BW_EFFICIENCY, "op_overhead_s": OP_OVERHEAD_S,
                                 "threads": EST_THREADS},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}
    done = {}
    if args.resume and (out_dir / "e2e.json").exists():
        old = json.loads((out_dir / "e2e.json").read_text())
        done = {(r["model"], r["config"]): r for r in old.get("rows", []) if "error" not in r}
    tmp_ctx = tempfile.TemporaryDirectory(prefix="edge-sparse-e2e-") if not args.work_dir else None
    work_root = Path(args.work_dir or tmp_ctx.name)
    try:
        for name in names:
            src = models.get(name)
            work = work_root / name
            work.mkdir(parents=True, exist_ok=True)
            recipe = models.recipes()[name]
            charset = ocr_charset(src) if recipe.task == "ocr-rec" else None
            from edge_sparse.models import data

            sets = {"eval": data.dataset(name, "eval", args.eval)}
            if recipe.task == "sentence-embedding":
                sets["pairs"] = data.dataset(name, "pairs")
            calib = data.dataset(name, "calib", args.calib).inputs
            result["data"][name] = {"calib": data.dataset(name, "calib", args.calib).describe(),
                                    **{k: v.describe() for k, v in sets.items()}}
            stacked = data.stack(sets)
            args.eval_count = len(next(iter(stacked.values())))
            np.savez(work / "eval_inputs.npz", **stacked)
            # the accuracy reference: the dense zoo model in onnxruntime (in this process; nothing is timed here)
            sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
            out_names = [o.name for o in sess.get_outputs()]
            per = [sess.run(None, {k: v[i:i + 1] for k, v in stacked.items()}) for i in range(args.eval_count)]
            dense_outputs = {n: np.concatenate([o[j] for o in per]) for j, n in enumerate(out_names)}
            del sess
            result["dense_accuracy"][name] = _accuracy(sets, None, dense_outputs, charset)
            for key in keys:
                if (name, key) in done:
                    result["rows"].append(done[(name, key)])
                    continue
                print(f"[e2e] {name} {key} ...", file=sys.stderr, flush=True)
                try:
                    row = _run_config(name, key, src, work, args, dense_outputs, charset, sets, calib)
                except Exception as e:  # one broken config must not lose the others' rows
                    row = {"model": name, "config": key, "label": CONFIGS[key][0],
                           "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
                result["rows"].append(row)
                _write(result, out_dir)
                print(f"[e2e] {name} {key}: " + (row.get("error") or
                      f"acc {_fmt_acc(row['accuracy'])}, speedup " +
                      ", ".join(f"{row[f'speedup_{t}t']:.2f}x@{t}t" for t in args.threads)) +
                      (f" ({row['seconds']} s)" if "seconds" in row else ""), file=sys.stderr, flush=True)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write(result, out_dir)
    if not args.no_plot:
        plot(result, out_dir / "e2e.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
