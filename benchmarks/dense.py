"""Dense CPU benchmark: compiled artifact (sparse off, untuned) vs onnxruntime, side by side, same inputs and threads.

For each model: compile for ``host`` with ``--sparse off`` (compile seconds recorded), then time it and onnxruntime
(on the original ONNX file, all its optimisations on) in two worker processes -- TVM's thread pinning leaks into other
runtimes of the same process -- alternating short batches between them so both see the same machine load. Reports
medians (wall and process CPU time), minimums, the TVM/ORT ratio, and the largest output difference between the two
runtimes.

    python benchmarks/dense.py --threads 1,2 --json dense.json
    python benchmarks/dense.py --models mlp,ppocr-cls --rounds 10 --batch 10
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

from edge_sparse.util import atomic_write

__all__ = ["MODELS", "main"]

ZOO = ("minilm-l6", "ppocr-rec", "ppocr-cls", "ppocr-det", "silero-vad", "efficientnet-lite0")
SYNTHETIC = ("mlp", "cnn", "transformer_block", "mbv2_112", "mbv2_56", "effnet_112", "effnet_56")
MODELS = ZOO + SYNTHETIC
TARGET_RATIO = 1.0      # issue 17: at most onnxruntime's latency ...
MAX_RATIO = 1.1         # ... and no model above 1.1x
PAUSE_S = 0.05


# ------------------------------------------------------------------------------------------------ worker side
def _worker(kind: str, path: str, inputs_npz: str, threads: int) -> None:
    """Line protocol on stdin/stdout: 'run N' -> JSON list of N (wall, process CPU) seconds; 'out PATH' saves
    outputs; 'quit'."""
    inputs = dict(np.load(inputs_npz))
    if kind == "tvm":
        os.environ["TVM_NUM_THREADS"] = str(threads)
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        from edge_sparse import runtime

        model = runtime.load(path, threads=threads)
        run = lambda: model.run(inputs)  # noqa: E731
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        run = lambda: dict(zip(names, sess.run(None, inputs)))  # noqa: E731
    for _ in range(3):
        run()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            times = []
            for _ in range(int(arg)):
                t, c = time.perf_counter(), time.process_time()
                run()
                times.append((time.perf_counter() - t, time.process_time() - c))
            print(json.dumps(times), flush=True)
        elif cmd == "out":
            np.savez(arg, **{k: np.asarray(v) for k, v in run().items()})
            print("saved", flush=True)
        else:
            break


class _Worker:
    def __init__(self, kind, path, inputs_npz, threads):
        env = dict(os.environ, TVM_BIND_THREADS=os.environ.get("TVM_BIND_THREADS", "0"))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, str(path), str(inputs_npz), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{kind} worker failed to start: {line!r}")

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def outputs(self, path: Path) -> dict:
        self.proc.stdin.write(f"out {path}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        return dict(np.load(path))

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ parent side
def _model_and_inputs(name: str, work: Path):
    """(onnx path, input shapes for compile, inputs dict, onnxruntime's inputs: plus the inputs intake freezes)."""
    if name in ZOO:
        from edge_sparse import models

        recipe = models.recipes()[name]
        return models.get(name, quiet=True), dict(recipe.input_shapes), recipe.sample_input(), recipe.onnx_feeds()
    from edge_sparse.models import synthetic

    model = getattr(synthetic, name)()
    path = work / f"{name}.onnx"
    synthetic.save(model, path)
    rng = np.random.default_rng(0)
    inputs = {}
    for vi in model.graph.input:
        shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        inputs[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return path, None, inputs, inputs


def bench_model(name: str, threads_list, work: Path, rounds: int, batch: int, log) -> list[dict]:
    from edge_sparse.compiler import compile as compile_model

    path, shapes, inputs, ort_inputs = _model_and_inputs(name, work)
    art = work / f"{name}.art"
    t0 = time.perf_counter()
    manifest = compile_model(path, "host", art, input_shapes=shapes, sparse="off", force=True, quiet=True)
    compile_s = time.perf_counter() - t0
    log(f"{name}: compiled in {compile_s:.1f} s")
    npz, ort_npz = work / f"{name}.inputs.npz", work / f"{name}.ort-inputs.npz"
    np.savez(npz, **inputs)
    np.savez(ort_npz, **ort_inputs)
    rows = []
    for threads in threads_list:
        tvm_w = _Worker("tvm", art, npz, threads)
        ort_w = _Worker("ort", path, ort_npz, threads)
        try:
            out_t = tvm_w.outputs(work / f"{name}.tvm.npz")
            out_o = ort_w.outputs(work / f"{name}.ort.npz")
            err = 0.0
            for (kt, vt), (ko, vo) in zip(sorted(out_t.items()), sorted(out_o.items())):
                scale = float(np.abs(vo).max()) or 1.0
                err = max(err, float(np.abs(vt.astype(np.float64) - vo.astype(np.float64)).max()) / scale)
            t_tvm, t_ort = [], []
            for r in range(rounds):       # alternate which runtime goes first, so drifts in load hit both
                first, second = (tvm_w, ort_w) if r % 2 == 0 else (ort_w, tvm_w)
                # a pause between batches lets the idle runtime's spinning worker threads park before the other
                # one runs (otherwise they hold the cores the other runtime's threads need)
                time.sleep(PAUSE_S)
                a = first.run(batch)
                time.sleep(PAUSE_S)
                b = second.run(batch)
                (t_tvm if first is tvm_w else t_ort).extend(a)
                (t_ort if first is tvm_w else t_tvm).extend(b)
        finally:
            tvm_w.close()
            ort_w.close()
        wall_t, wall_o = np.array([w for w, _ in t_tvm]), np.array([w for w, _ in t_ort])
        cpu_t, cpu_o = np.array([c for _, c in t_tvm]), np.array([c for _, c in t_ort])
        med_t, med_o = float(np.median(wall_t)) * 1e3, float(np.median(wall_o)) * 1e3
        # process CPU time per run: on a shared machine it excludes time spent waiting for a core (1 thread: the
        # latency an idle machine would show; with more threads it is the sum over threads, not a latency)
        row = {"model": name, "threads": threads, "tvm_ms": round(med_t, 3), "ort_ms": round(med_o, 3),
               "ratio": round(med_t / med_o, 3), "tvm_min_ms": round(float(wall_t.min()) * 1e3, 3),
               "ort_min_ms": round(float(wall_o.min()) * 1e3, 3),
               "tvm_cpu_ms": round(float(np.median(cpu_t)) * 1e3, 3), "ort_cpu_ms": round(float(np.median(cpu_o)) * 1e3, 3),
               "min_ratio": round(float(wall_t.min() / wall_o.min()), 3), "samples": len(t_tvm),
               "compile_s": round(compile_s, 1), "max_rel_err": err,
               "meets_target": med_t <= TARGET_RATIO * med_o, "within_max": med_t <= MAX_RATIO * med_o}
        log(f"  {threads} thread(s): TVM {med_t:.2f} ms, ORT {med_o:.2f} ms, x{row['ratio']:.2f}, err {err:.1e}")
        rows.append(row)
    return rows


def _table(rows) -> str:
    head = f"{'model':18s} {'thr':>3s} {'TVM ms':>9s} {'ORT ms':>9s} {'TVM/ORT':>8s} {'TVM min':>8s} {'ORT min':>8s} " \
           f"{'min/min':>8s} {'TVM cpu':>8s} {'ORT cpu':>8s} {'compile s':>9s} {'max rel err':>11s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:18s} {r['threads']:3d} {r['tvm_ms']:9.2f} {r['ort_ms']:9.2f} {r['ratio']:8.2f} "
                     f"{r['tvm_min_ms']:8.2f} {r['ort_min_ms']:8.2f} {r['min_ratio']:8.2f} {r['tvm_cpu_ms']:8.2f} "
                     f"{r['ort_cpu_ms']:8.2f} {r['compile_s']:9.1f} {r['max_rel_err']:11.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list from {', '.join(MODELS)}")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds per runtime (default 20)")
    ap.add_argument("--batch", type=int, default=5, help="runs per round (default 5)")
    ap.add_argument("--json", "-o", dest="json_out", help="write the results as JSON here")
    ap.add_argument("--work-dir", help="keep compiled artifacts here (default: a temporary directory)")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    threads_list = [int(t) for t in args.threads.split(",")]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="es-dense-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            rows += bench_model(name, threads_list, work, args.rounds, args.batch, log)
    print(_table(rows))
    if args.json_out:
        import platform

        import tvm

        doc = {"benchmark": "dense", "target_ratio": TARGET_RATIO, "max_ratio": MAX_RATIO, "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "tvm": tvm.__version__, "rounds": args.rounds, "batch": args.batch,
               "results": rows}
        atomic_write(args.json_out, json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(main())
