"""The main job on a bundled demo model: prune, compile for the host and a Raspberry Pi 4, check, benchmark.

The demo model is the feed-forward half of a MiniLM-sized encoder (two 384->1536->384 MatMul+Add+Relu blocks on a
[1, 128, 384] input), built in code with seeded weights, so the demo needs no download. Its inputs are Gaussian by
construction, so Gaussian calibration samples are the real input distribution here (for your own models, pass real
samples: `edge-sparse prune --calib`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_sparse.errors import check_threads
from edge_sparse.util import atomic_dir, check_output
from edge_sparse.progress import Progress

__all__ = ["demo", "format_summary"]

SPARSITY, PATTERN = 0.8, "16x1"


def _demo_model():
    from edge_sparse.models import synthetic

    return synthetic.mlp(batch=1, seq=128, d_in=384, hidden=1536, d_out=384, layers=2, seed=0)


def demo(out_dir: str | os.PathLike = "out/demo", *, force: bool = False, threads: int | None = None,
         min_seconds: float = 1.0, pi_target: str = "rpi4", quiet: bool | None = None) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the summary (also written to ``out_dir/summary.json``)."""
    import onnxruntime as ort

    from edge_sparse import benchmark as bench_mod
    from edge_sparse import compiler, pruning, runtime
    from edge_sparse.models import synthetic
    from edge_sparse.passes import methods

    check_threads(threads)
    out = check_output(out_dir, force=force, kind="dir", replaceable=lambda p: (p / "summary.json").is_file())
    progress = Progress(quiet)
    with atomic_dir(out, replace=force) as stage:
        dense_path, pruned_path = stage / "model.onnx", stage / "model-pruned.onnx"
        synthetic.save(_demo_model(), dense_path)
        rng = np.random.default_rng(1)
        calib = {"x": rng.standard_normal((16, 128, 384)).astype(np.float32)}
        with progress.step(f"pruning to {SPARSITY:.0%} in {PATTERN} blocks ({methods.default(True)}, 16 calibration "
                           f"samples)"):
            # every layer: the MLP's last layer is no classifier head (the default skips would keep it dense)
            pruned = pruning.prune(dense_path, pruned_path, sparsity=SPARSITY, pattern=PATTERN,
                                   calib=calib, default_skips=False, report_path=stage / "prune-report.json",
                                   quiet=True)
        builds = {
            "host-dense": (dense_path, "host", "off"),
            "host-sparse": (pruned_path, "host", "auto"),
            f"{pi_target}-sparse": (pruned_path, pi_target, "auto"),
        }
        manifests = {}
        for name, (src, target, sparse) in builds.items():
            with progress.step(f"compiling {src.name} for {target} (--sparse {sparse})"):
                manifests[name] = compiler.compile(src, target, stage / name, sparse=sparse, threads=threads,
                                                   quiet=True)
        x = {"x": np.random.default_rng(7).standard_normal((1, 128, 384)).astype(np.float32)}
        checks = {}
        for name, src in (("host-dense", dense_path), ("host-sparse", pruned_path)):
            got = runtime.load(stage / name).run(x)["y"]
            ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, x)[0]
            checks[name] = float(np.abs(got - ref).max())
        results = {}
        for name, src in (("host-dense", dense_path), ("host-sparse", pruned_path)):
            with progress.step(f"benchmarking {name} against onnxruntime"):
                results[name] = bench_mod.bench(stage / name, compare=src, threads=threads, min_seconds=min_seconds,
                                                energy="auto", inputs=x, quiet=True)
        summary = _summary(manifests, pruned.report, checks, results, stage)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["out_dir"] = str(out)
    return summary


def _summary(manifests, report, checks, results, stage: Path) -> dict[str, Any]:
    def size(name):
        return sum(f["bytes"] for f in manifests[name]["files"].values())

    rows = {}
    for name, res in results.items():
        runs = res["runs"]
        ours, ort_run = runs[0], runs[-1]
        rows[name] = {
            "edge_sparse_median_ms": ours["latency"]["median_ms"],
            "onnxruntime_median_ms": ort_run["latency"]["median_ms"],
            "speedup_vs_onnxruntime": ort_run["latency"]["median_ms"] / ours["latency"]["median_ms"],
            "threads": ours["threads"],
            "max_abs_diff_vs_onnxruntime": checks[name],
            "energy": ours.get("energy"),
        }
    acc = report.get("accuracy", report.get("metrics", {}))
    return {
        "model": "MLP 2x(384->1536->384), x[1,128,384]",
        "pruning": {"sparsity": SPARSITY, "pattern": PATTERN, "method": report["method"], "accuracy": acc},
        "artifact_bytes": {name: size(name) for name in manifests},
        "layers": manifests["host-sparse"]["layers"],
        "pi_artifact": {k: v["library"] for k, v in manifests.items() if not k.startswith("host")},
        "runs": rows,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"demo model: {summary['model']}",
             f"pruned: {summary['pruning']['sparsity']:.0%} in {summary['pruning']['pattern']} blocks "
             f"({summary['pruning']['method']})"]
    held = summary["pruning"]["accuracy"].get("holdout", {}).get("outputs", {})
    for out_name, m in held.items():
        lines.append(f"accuracy vs dense on held-out samples ({out_name}): cosine {m['cosine_mean']:.3f}, "
                     f"relative L2 {m['rel_l2']:.3f} (random weights have no redundancy to prune; real models: "
                     f"see the e2e table in the README)")
    kernels = sorted({str(layer.get("kernel", layer.get("format"))) for layer in summary["layers"]})
    lines.append(f"sparse kernels chosen: {', '.join(kernels) if kernels else 'none'}")
    for name, b in summary["artifact_bytes"].items():
        lines.append(f"artifact {name:<14} {b / 1e6:7.2f} MB")
    lines.append(f"{'run':<14} {'edge-sparse':>12} {'onnxruntime':>12} {'speedup':>8} {'threads':>8} {'max|diff|':>10}")
    for name, r in summary["runs"].items():
        lines.append(f"{name:<14} {r['edge_sparse_median_ms']:>9.3f} ms {r['onnxruntime_median_ms']:>9.3f} ms "
                     f"{r['speedup_vs_onnxruntime']:>7.2f}x {r['threads']:>8} {r['max_abs_diff_vs_onnxruntime']:>10.2e}")
    for name, r in summary["runs"].items():
        e = r.get("energy")
        if e:
            kind = "ESTIMATE" if e.get("estimate") else "measured"
            lines.append(f"energy/inference {name}: {e['joules_per_inference'] * 1e3:.2f} mJ ({kind}: {e['boundary']})")
    lines.append(f"written to {summary.get('out_dir')}")
    return "\n".join(lines)
