"""Benchmark a compiled artifact locally or over TVM RPC: latency statistics, a side-by-side onnxruntime baseline,
a per-operator profile and energy per inference.

Statistics follow LiteRT ``benchmark_model`` and ``onnxruntime_perf_test``: load time, first inference, warm-up mean,
count, mean, median, min, max, std, p90, p99, throughput, peak memory, threads. Each timed inference is one sample
taken by TVM's own timer (``time_evaluator`` over ``invoke_stateful`` with ``number=1``), locally and over RPC alike.
onnxruntime always runs in a separate process (TVM's thread pinning would otherwise leak into its threads), with the
same inputs (an .npz handed over) and the same thread count.

The JSON result is described in docs/bench-schema.md (``SCHEMA``).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sparse.errors import UserError, check_number, check_threads
from edge_sparse.util import atomic_write, check_output, json_text, latency_stats

__all__ = ["SCHEMA", "bench", "combine", "format_table", "plot", "run_ort", "write_json"]

SCHEMA = "edge-sparse.bench/1"
DEFAULT_WARMUP = 10
DEFAULT_REPEAT = 50            # LiteRT benchmark_model: --num_runs=50 ...
DEFAULT_MIN_SECONDS = 1.0      # ... and --min_secs=1
# both runtimes' peak memory is taken the same way, each in its own process: the runtime imported, the peak mark
# reset, then load + run; the "+N" figure is what loading and running the model added
MEMORY_BOUNDARY = "peak RSS (VmHWM) of the process, mark reset after importing the runtime and before loading the model"
MAX_WARMUP, MAX_REPEAT, MAX_SECONDS = 100_000, 10_000_000, 24 * 3600.0   # bounds of the options (a typo, not a plan)
ENERGY_MIN_SECONDS = 2.0       # a meter needs a window long enough to see the model above its noise
MAX_SAMPLES_KEPT = 10000
CHUNK_SECONDS = 0.03           # time_evaluator chunk: lets interleaved meters sample at >= 10 Hz


# ---------------------------------------------------------------------------------------------- statistics
def _rss_reset() -> float | None:
    """Reset the kernel's peak-RSS mark (``5`` > /proc/self/clear_refs) and return the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return None


def _default_threads(manifest: dict[str, Any], remote: bool) -> int:
    recorded = (manifest.get("compile") or {}).get("threads")
    if recorded:
        return int(recorded)
    if remote:
        return int((manifest.get("target", {}).get("device") or {}).get("cores", 1))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- runners
class _Runner:
    """Drives one Relax VM (local or remote) through set_input / invoke_stateful / time_evaluator."""

    def __init__(self, vm, dev, manifest: dict[str, Any]):
        self.vm, self.dev, self.manifest = vm, dev, manifest
        self._timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)

    def set_inputs(self, tensors: list) -> None:
        self.vm.set_input("main", *tensors)

    def first(self) -> float:
        t0 = time.perf_counter()
        self.vm.invoke_stateful("main")
        self.dev.sync()
        return time.perf_counter() - t0

    def chunk(self, k: int) -> list[float]:
        """k inferences, each timed on the device; the evaluator also makes one untimed call first."""
        if k != getattr(self, "_k", 1):
            self._timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=k)
            self._k = k
        return list(self._timer("main").results)

    def outputs(self) -> list[np.ndarray]:
        out = self.vm.get_outputs("main")
        flat = [out] if hasattr(out, "numpy") else list(out)
        return [t.numpy() for t in flat]


def _load_local(artifact: Path, threads: int):
    """(runner, model, load seconds, rss before load MB), through edge_sparse.runtime."""
    from edge_sparse import runtime
    from edge_sparse.artifact import read_manifest

    read_manifest(artifact)      # the parse is not part of the model's load time
    import tvm  # noqa: F401  (nor is the import)

    rss0 = _rss_reset()
    t0 = time.perf_counter()
    model = runtime.load(artifact, threads=threads)
    load_s = time.perf_counter() - t0
    return _Runner(model.vm, model.device, model.manifest), model, load_s, rss0


def _load_remote(sess, artifact: Path, manifest: dict[str, Any], threads: int, lib_file: Path | None = None):
    """(runner, load seconds): upload the library, load it remotely, size the remote thread pool, make the VM."""
    from tvm.runtime.vm import VirtualMachine

    from edge_sparse.artifact import library_path
    from edge_sparse.rpc import describe_error
    from edge_sparse.runtime import check_arity, open_device

    lib_file = lib_file or library_path(artifact, manifest)   # only a file the manifest's hashes vouch for
    lib_name = lib_file.name
    t0 = time.perf_counter()
    try:
        sess.upload(str(lib_file))
        lib = sess.load_module(lib_name)
        dev, devices = open_device(manifest, sess)
        cfg = sess.get_function("runtime.config_threadpool")
        cfg(1, int(threads))
        vm = VirtualMachine(lib, devices)
    except Exception as e:
        raise UserError(describe_error(e, "loading the model on the RPC device") +
                        f" (artifact built for {manifest.get('target', {}).get('name')} with TVM "
                        f"{manifest.get('tvm', {}).get('version')}; the device needs the same TVM)") from None
    load_s = time.perf_counter() - t0
    check_arity(vm, manifest, artifact)
    return _Runner(vm, dev, manifest), load_s


# ---------------------------------------------------------------------------------------------- timed loop
def _timed_loop(chunk: Callable[[int], list[float]], est_latency: float, repeat: int | None,
                min_seconds: float | None) -> tuple[Callable[[Callable[[], None]], int], dict[str, Any]]:
    """A workload for energy.measure: runs chunks until count >= repeat and elapsed >= min_seconds; returns the
    number of inferences (untimed evaluator calls included). Samples land in the returned dict (no reference
    cycle, so a remote session is released as soon as bench() returns)."""
    state: dict[str, Any] = {"samples": [], "seconds": 0.0}
    k = int(min(1000, max(1, CHUNK_SECONDS / max(est_latency, 1e-7))))

    def work(tick):
        nonlocal k
        samples: list[float] = []
        calls = 0
        t0 = time.perf_counter()
        while True:
            want = k
            if repeat is not None and len(samples) < repeat:
                want = min(k, repeat - len(samples))
            c0 = time.perf_counter()
            samples.extend(chunk(want))
            took = time.perf_counter() - c0
            calls += want + 1
            tick()
            if want == k and took > 0:  # keep chunks near CHUNK_SECONDS whatever the per-call overhead is
                k = int(min(1000, max(1, k * CHUNK_SECONDS / took)))
            elapsed = time.perf_counter() - t0
            if (repeat is None or len(samples) >= repeat) and (min_seconds is None or elapsed >= min_seconds):
                break
        state["samples"] = samples
        state["seconds"] = time.perf_counter() - t0
        return calls

    return work, state


def _choose_energy(energy: str, sess, family):
    """(meter or None, mode, notes): mode is 'meter', 'estimate' or 'none'."""
    from edge_sparse import energy as E

    if energy in (None, "none", "off"):
        return None, "none", []
    if energy == "estimate":
        return None, "estimate", []
    if energy == "auto":
        meter, skipped = E.auto_meter(remote=sess, order=family.energy_meters)
        if meter is None:           # one short line; each source's reason is in docs/bench-schema.md's list
            tried = [s.split(":", 1)[0].replace("--energy ", "") for s in skipped]
            return None, "estimate", [f"no meter found (tried {', '.join(tried)}; --energy SOURCE names one and "
                                      f"says why it is unavailable)" if tried else "no meter found"]
        return meter, "meter", []
    return E.open_meter(energy, remote=sess), "meter", []


# ---------------------------------------------------------------------------------------------- onnxruntime child
def _ort_child(spec_path: str) -> None:
    """Runs in a fresh process: onnxruntime timing with the parent's inputs and threads; writes JSON + outputs."""
    spec = json.loads(Path(spec_path).read_text())
    import onnxruntime as ort            # imported before the mark, as the TVM side imports tvm first: same boundary

    rss0 = _rss_reset()

    with np.load(spec["inputs"], allow_pickle=False) as z:
        inputs = {k: z[k] for k in z.files}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(spec["threads"])
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    sess = ort.InferenceSession(spec["model"], opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise SystemExit(f"error: the ONNX model's input(s) {', '.join(missing)} are not the artifact's inputs "
                         f"({', '.join(inputs)}); --compare needs the model the artifact was compiled from")
    feed = {n: inputs[n] for n in names}
    t0 = time.perf_counter()
    first_out = sess.run(None, feed)
    first_s = time.perf_counter() - t0
    np.savez(spec["outputs"], **{o.name: a for o, a in zip(sess.get_outputs(), first_out)})
    warm = []
    for _ in range(int(spec["warmup"])):
        t0 = time.perf_counter()
        sess.run(None, feed)
        warm.append(time.perf_counter() - t0)
    est = float(np.mean(warm)) if warm else first_s

    def chunk(k):
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            sess.run(None, feed)
            out.append(time.perf_counter() - t0)
        return out

    work, state = _timed_loop(lambda k: chunk(k + 1)[1:], est, spec["repeat"], spec["min_seconds"])
    energy_out = None
    if spec.get("energy"):
        from edge_sparse import energy as E

        meter = E.open_meter(spec["energy"])
        try:
            energy_out = E.measure(meter, work, idle_watts=spec.get("idle_watts"))
        finally:
            meter.close()
    else:
        work(lambda: None)
    result = {
        "load_ms": load_s * 1e3, "first_inference_ms": first_s * 1e3,
        "warmup": {"count": len(warm), "mean_ms": float(np.mean(warm) * 1e3) if warm else None},
        "samples_s": state["samples"], "peak_rss_mb": _proc_status_mb("VmHWM"), "rss_before_load_mb": rss0,
        "energy": energy_out, "version": ort.__version__,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def run_ort(model_path: str, inputs: dict[str, np.ndarray], threads: int, warmup: int, repeat: int | None,
             min_seconds: float | None, energy_spec: str | None, idle_watts: float | None) -> dict:
    """onnxruntime's latency (and outputs) for ``model_path`` on this machine, in a child process with its own
    thread count (the ``--compare`` baseline; also the onnxruntime points of ``optimize``'s frontier)."""
    if not Path(model_path).is_file():
        raise UserError(f"--compare model not found: {model_path}")
    with tempfile.TemporaryDirectory(prefix="edge-sparse-ort-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "inputs.npz", **inputs)
        spec = {"model": str(Path(model_path).resolve()), "inputs": str(tmp / "inputs.npz"), "threads": threads,
                "warmup": warmup, "repeat": repeat, "min_seconds": min_seconds, "energy": energy_spec,
                "idle_watts": idle_watts, "outputs": str(tmp / "outputs.npz"), "result": str(tmp / "result.json")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env.pop("TVM_NUM_THREADS", None)
        done = subprocess.run([sys.executable, "-m", "edge_sparse.benchmark", "--ort-child", str(tmp / "spec.json")],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {done.returncode}"
            raise UserError(f"onnxruntime baseline failed: {last.removeprefix('error: ')}")
        result = json.loads((tmp / "result.json").read_text())
        with np.load(tmp / "outputs.npz", allow_pickle=False) as z:
            result["outputs"] = {k: z[k] for k in z.files}
    return result


# ---------------------------------------------------------------------------------------------- profile
def _profile(model, tensors: list, runs: int = 10, top: int = 15) -> dict[str, Any]:
    """Per-operator times from the Relax VM. TVM's VM profiler (``vm_profiler_load_executable``) is used when the
    runtime has it; the PyPI runtime does not, so the VM's instrument hook times every call instead (its Python
    callback adds ~1 µs per call, reported as such)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        prof_mod = model.lib["vm_profiler_load_executable"]()
    except Exception:
        prof_mod = None
    devices = model.device if model.device.dlpack_device_type() == 1 else [model.device, tvm.cpu(0)]
    if prof_mod is not None:  # pragma: no cover - the PyPI runtime is built without the VM profiler
        return {"method": "relax VM profiler (vm_profiler_load_executable)", "runs": 1, "ops": [],
                "unavailable": "this runtime has TVM's VM profiler; its report is not parsed yet -- see the table",
                "table": str(prof_mod["profile"]("main", *tensors).table())}
    vm = VirtualMachine(model.lib, devices)
    totals: dict[str, list[float]] = {}   # op -> ms per call, this run
    stack: list[tuple[str, int]] = []
    per_run: list[dict[str, list[float]]] = []

    def instrument(func, name, before, ret, *args):
        now = time.perf_counter_ns()
        if before:
            stack.append((str(name), now))
        elif stack:
            op, t0 = stack.pop()
            totals.setdefault(op, []).append((now - t0) * 1e-6)
        return 0

    vm.set_instrument(instrument)
    vm.set_input("main", *tensors)
    vm.invoke_stateful("main")  # warm
    t0 = time.perf_counter()
    for _ in range(runs):
        totals.clear()
        vm.invoke_stateful("main")
        model.device.sync()
        per_run.append({k: list(v) for k, v in totals.items()})
    wall_ms = (time.perf_counter() - t0) * 1e3 / runs
    ops = []
    for name in per_run[0]:
        # median over runs of the op's total per run: robust to a descheduled run on a shared machine
        ms = float(np.median([sum(r.get(name, [])) for r in per_run]))
        ops.append({"name": name, "calls_per_inference": len(per_run[0][name]), "ms_per_inference": ms})
    ops.sort(key=lambda o: -o["ms_per_inference"])
    total = sum(o["ms_per_inference"] for o in ops) or 1.0
    for o in ops:
        o["percent"] = 100.0 * o["ms_per_inference"] / total
    return {"method": "relax VM instrument hook (wall time per packed call, median of runs; the hook adds ~1-2 us per call)",
            "runs": runs, "instrumented_ms_per_inference": wall_ms, "ops": ops[:top], "ops_total": len(ops)}


# ---------------------------------------------------------------------------------------------- API
def bench(artifact_dir: str | os.PathLike, *, rpc: str | None = None, tracker: str | None = None,
          key: str | None = None, warmup: int = DEFAULT_WARMUP, repeat: int | None = None,
          min_seconds: float | None = None, threads: int | None = None, compare: str | os.PathLike | None = None,
          energy: str = "auto", profile: bool = False, quiet: bool | None = None, inputs: dict | None = None,
          seed: int = 0, idle_seconds: float = 2.0, rpc_timeout: float = 10.0,
          keep_outputs: dict | None = None) -> dict[str, Any]:
    """Benchmark an artifact directory; returns the result dict described in docs/bench-schema.md.

    ``rpc='HOST:PORT'`` or ``tracker='HOST:PORT', key=KEY`` runs on a remote TVM RPC server. With neither
    ``repeat`` nor ``min_seconds``, runs at least 50 inferences and at least 1 s. ``energy``: ``auto``, ``none``,
    ``estimate`` or a meter (see :mod:`edge_sparse.energy`); a measured window lasts at least 2 s.
    """
    from edge_sparse import energy as E
    from edge_sparse.artifact import read_manifest
    from edge_sparse.progress import Progress
    from edge_sparse.runtime import Model

    progress = Progress(quiet)
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)
    remote = rpc is not None or tracker is not None
    check_number(warmup, "--warmup", 0, MAX_WARMUP)
    check_number(repeat, "--repeat", 1, MAX_REPEAT)
    check_number(min_seconds, "--min-seconds", 0, MAX_SECONDS, lo_open=True)
    if remote:
        cores = (manifest["target"].get("device") or {}).get("cores") or manifest["target"].get("cores") or 1
        check_threads(threads, cores, where=f"the target {manifest['target']['name']}")
    else:
        check_threads(threads)
    if compare is not None and remote:
        raise UserError("--compare runs onnxruntime on this machine, not on the RPC device; run 'edge-sparse bench "
                        "--compare' on the device itself, or drop --compare")
    if repeat is None and min_seconds is None:
        repeat, min_seconds = DEFAULT_REPEAT, DEFAULT_MIN_SECONDS
    threads = threads or _default_threads(manifest, remote)
    from edge_sparse import targets

    family = targets.get_family(manifest.get("target", {}).get("family", ""))
    notes: list[str] = []

    os.environ.setdefault("TVM_BIND_THREADS", "0")   # pinned workers shared one core here (TVM_NOTES)
    sess, where = None, "local"
    if remote:
        from edge_sparse.artifact import library_path
        from edge_sparse.rpc import connect

        if manifest["library"].endswith(".tar"):
            raise UserError("artifact holds an unlinked object archive (model.tar); link it for the device first "
                            "(see RUN.md)")
        lib_file = library_path(artifact, manifest)     # never upload a file the manifest's hashes do not vouch for

        with progress.step(f"connecting ({rpc or tracker})"):
            sess, where = connect(rpc, tracker=tracker, key=key, timeout=rpc_timeout)
    holder = Model(artifact, manifest, None, None, None)
    if inputs is None:
        inputs = holder.make_inputs("random", seed)
    arrays = holder.check_inputs(inputs)

    meter, energy_mode, energy_notes = _choose_energy(energy, sess, family)
    try:
        with progress.step(f"loading {artifact} ({where})"):
            if sess is None:
                runner, model, load_s, rss0 = _load_local(artifact, threads)
            else:
                runner, load_s = _load_remote(sess, artifact, manifest, threads, lib_file)
                model, rss0 = None, None
        import tvm

        tensors = [tvm.runtime.tensor(a, runner.dev) for a in arrays]
        runner.set_inputs(tensors)
        first_s = runner.first()
        tvm_outputs = runner.outputs()
        if keep_outputs is not None:           # for combine(): compare every artifact with one onnxruntime run
            keep_outputs["tvm"] = dict(zip([o["name"] for o in manifest["outputs"]], tvm_outputs))
        with progress.step(f"warm-up ({warmup} runs)"):
            warm = runner.chunk(warmup) if warmup else []
        est = float(np.mean(warm)) if warm else first_s
        run_min_seconds = min_seconds
        if energy_mode == "meter":
            run_min_seconds = max(min_seconds or 0.0, ENERGY_MIN_SECONDS)
            if (min_seconds or 0.0) < ENERGY_MIN_SECONDS:
                notes.append(f"timed window lengthened to >= {ENERGY_MIN_SECONDS:g} s for the energy meter")
        work, state = _timed_loop(runner.chunk, est, repeat, run_min_seconds)
        energy_out = None
        idle_watts = None
        with progress.step("timing" + (f" with energy meter {meter.name}" if meter else "")):
            if meter is not None:
                energy_out = E.measure(meter, work, idle_seconds=idle_seconds)
                idle_watts = energy_out["idle_watts"]
            else:
                work(lambda: None)
        samples = state["samples"]
        stats = latency_stats(samples)
        if energy_mode == "estimate":
            energy_out = E.estimate(manifest.get("target", {}).get("device") or {}, family.offloads, threads,
                                    stats["mean_ms"] * 1e-3, manifest.get("target", {}).get("name", ""))
            energy_out["notes"] = energy_out.get("notes", []) + energy_notes
        peak = _proc_status_mb("VmHWM") if sess is None else None
        if sess is not None:
            notes.append("peak memory is not read over RPC; first_inference_ms includes one RPC round trip")
        prof = None
        if profile:
            if sess is not None:
                prof = {"method": None, "ops": [], "unavailable": "the VM instrument hook is a Python callback and "
                        "cannot run over RPC; profile on the device itself"}
            else:
                with progress.step("profiling"):
                    prof = _profile(model, tensors)
    finally:
        if meter is not None:
            meter.close()
        if sess is not None:  # release the server (it serves one session at a time) before returning
            runner = work = tensors = sess = None
            import gc

            gc.collect()

    sparse_layers = [layer for layer in manifest.get("layers", []) if layer.get("format") not in (None, "dense")]
    run = {
        "name": f"edge-sparse {artifact.name}",
        "runtime": "tvm",
        "artifact": str(artifact),
        "target": manifest.get("target", {}).get("name"),
        "sparse": {"mode": (manifest.get("compile") or {}).get("sparse"), "sparse_layers": len(sparse_layers),
                   "layers": len(manifest.get("layers", []))},
        "where": where,
        "threads": threads,
        "load_ms": load_s * 1e3,
        "first_inference_ms": first_s * 1e3,
        "warmup": {"count": len(warm), "mean_ms": float(np.mean(warm) * 1e3) if warm else None},
        "latency": stats,
        "peak_memory_mb": peak,
        "rss_before_load_mb": rss0,
        "memory_boundary": MEMORY_BOUNDARY if peak else None,
        "energy": energy_out,
        "profile": prof,
        "samples_ms": [s * 1e3 for s in samples[:MAX_SAMPLES_KEPT]],
    }
    runs = [run]
    comparison = None
    if compare is not None:
        ort_energy = meter.name if (energy_mode == "meter" and meter is not None and meter.name != "csv") else None
        if energy_mode == "meter" and meter is not None and meter.name == "csv":
            ort_energy = f"csv:{meter.path}"
        with progress.step(f"onnxruntime baseline ({Path(compare).name}, separate process)"):
            ort = run_ort(str(compare), dict(zip([i["name"] for i in manifest["inputs"]], arrays)), threads, warmup,
                           repeat, run_min_seconds, ort_energy, idle_watts)
        ort_stats = latency_stats(ort["samples_s"])
        ort_energy_out = ort["energy"]
        if energy_mode == "estimate":
            ort_energy_out = E.estimate(manifest.get("target", {}).get("device") or {}, False, threads,
                                        ort_stats["mean_ms"] * 1e-3, manifest.get("target", {}).get("name", ""))
        runs.append({
            "name": f"onnxruntime {Path(compare).name}", "runtime": "onnxruntime", "version": ort["version"],
            "model": str(compare), "where": "local", "threads": threads,
            "load_ms": ort["load_ms"], "first_inference_ms": ort["first_inference_ms"], "warmup": ort["warmup"],
            "latency": ort_stats, "peak_memory_mb": ort["peak_rss_mb"], "rss_before_load_mb": ort["rss_before_load_mb"],
            "memory_boundary": MEMORY_BOUNDARY,
            "energy": ort_energy_out, "profile": None,
            "samples_ms": [s * 1e3 for s in ort["samples_s"][:MAX_SAMPLES_KEPT]],
        })
        comparison = _compare(run, runs[-1], manifest, tvm_outputs, ort["outputs"])
        if keep_outputs is not None:
            keep_outputs["onnxruntime"] = ort["outputs"]
    result = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": _host_info(),
        "device": {"where": where, "target": manifest.get("target", {}).get("name"),
                   "arch": manifest.get("target", {}).get("arch"), "family": family.name},
        "settings": {"warmup": warmup, "repeat": repeat, "min_seconds": min_seconds, "threads": threads,
                     "energy": energy, "seed": seed, "timer": "tvm time_evaluator over invoke_stateful (number=1)",
                     "TVM_BIND_THREADS": os.environ.get("TVM_BIND_THREADS")},
        "runs": runs,
        "comparisons": [comparison] if comparison else [],
        "notes": notes,
    }
    return result


def _max_abs_diffs(names: list[str], tvm_outputs: list[np.ndarray], ort_outputs: dict) -> dict:
    diffs = {}
    ort_list = [ort_outputs[n] for n in names] if all(n in ort_outputs for n in names) else list(ort_outputs.values())
    for name, a, b in zip(names, tvm_outputs, ort_list):
        if a.shape == b.shape and a.dtype.kind == b.dtype.kind:
            diffs[name] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        else:
            diffs[name] = None
    return diffs


def _compare(run: dict, base: dict, manifest: dict, tvm_outputs: list[np.ndarray], ort_outputs: dict) -> dict:
    return {
        "run": run["name"], "baseline": base["name"],
        "speedup_median": base["latency"]["median_ms"] / run["latency"]["median_ms"],
        "speedup_mean": base["latency"]["mean_ms"] / run["latency"]["mean_ms"],
        "max_abs_diff": _max_abs_diffs([o["name"] for o in manifest["outputs"]], tvm_outputs, ort_outputs),
    }


def _host_info() -> dict[str, Any]:
    import tvm

    return {"hostname": platform.node(), "machine": platform.machine(), "system": platform.system(),
            "python": platform.python_version(), "tvm": tvm.__version__, "cpus": os.cpu_count()}


def combine(results: list[dict[str, Any]], outputs: list[dict] | None = None) -> dict[str, Any]:
    """Several bench() results (e.g. sparse and dense artifacts, one with --compare) as one: runs side by side,
    every TVM run compared with the onnxruntime run. ``outputs``: per result, the ``keep_outputs`` dict bench()
    filled, so every artifact's outputs are compared with onnxruntime's (not only the first one's)."""
    if len(results) == 1:
        return results[0]
    outputs = outputs or [{} for _ in results]
    ort_outputs = next((o["onnxruntime"] for o in outputs if o.get("onnxruntime") is not None), None)
    out = dict(results[0])
    out["runs"] = [r for res in results for r in res["runs"] if r["runtime"] == "tvm"]
    seen: dict[str, int] = {}
    for res in results:   # the same directory twice: keep the runs apart by name
        for r in res["runs"]:
            seen[r["name"]] = seen.get(r["name"], 0) + 1
            if seen[r["name"]] > 1:
                old = r["name"]
                r["name"] = f"{old} #{seen[old]}"
                for c in res["comparisons"]:
                    if c["run"] == old:
                        c["run"] = r["name"]
    bases = [r for res in results for r in res["runs"] if r["runtime"] != "tvm"]
    out["runs"] += bases
    out["notes"] = [n for res in results for n in res["notes"]]
    comps = [c for res in results for c in res["comparisons"]]
    if bases:
        base = bases[0]
        for r in out["runs"]:
            if r["runtime"] == "tvm" and not any(c["run"] == r["name"] for c in comps):
                mine = next((o for res, o in zip(results, outputs) if r in res["runs"]), {})
                diffs = None
                if ort_outputs is not None and mine.get("tvm") is not None:
                    diffs = _max_abs_diffs(list(mine["tvm"]), list(mine["tvm"].values()), ort_outputs)
                comps.append({"run": r["name"], "baseline": base["name"],
                              "speedup_median": base["latency"]["median_ms"] / r["latency"]["median_ms"],
                              "speedup_mean": base["latency"]["mean_ms"] / r["latency"]["mean_ms"],
                              "max_abs_diff": diffs})
    out["comparisons"] = comps
    return out


# ---------------------------------------------------------------------------------------------- output
def _fmt_energy(e: dict | None) -> str:
    if not e or e.get("joules_per_inference") is None:
        return "-"
    j = e["joules_per_inference"]
    text = f"{j * 1e3:.3f} mJ" if abs(j) < 1 else f"{j:.3f} J"
    return f"{text} ESTIMATE" if e.get("estimate") else f"{text} ({e['source']})"


def _fmt_memory(r: dict) -> str:
    if r.get("peak_memory_mb") is None:
        return "-"
    text = f"{r['peak_memory_mb']:.1f} MB"
    if r.get("rss_before_load_mb") is not None:
        text += f" (+{r['peak_memory_mb'] - r['rss_before_load_mb']:.1f} load/run)"
    return text


def format_table(result: dict[str, Any]) -> str:
    """The terminal table: one column per run."""
    runs = result["runs"]
    s = result["settings"]
    head = (f"edge-sparse bench  {result['device']['where']}  target {result['device']['target']}  "
            f"threads {s['threads']}  warm-up {s['warmup']}")
    def ms(v):
        return "-" if v is None else f"{v:.3f} ms"
    rows = [
        ("load", [ms(r["load_ms"]) for r in runs]),
        ("first inference", [ms(r["first_inference_ms"]) for r in runs]),
        ("warm-up mean", [ms(r["warmup"]["mean_ms"]) for r in runs]),
        ("count", [str(r["latency"]["count"]) for r in runs]),
    ]
    for k in ("mean", "median", "min", "max", "std", "p90", "p99"):
        rows.append((k, [ms(r["latency"][f"{k}_ms"]) for r in runs]))
    rows += [
        ("throughput", [f"{r['latency']['throughput_ips']:.1f} inf/s" for r in runs]),
        ("peak memory", [_fmt_memory(r) for r in runs]),
        ("threads", [str(r["threads"]) for r in runs]),
        ("energy/inference", [_fmt_energy(r["energy"]) for r in runs]),
    ]
    names = [r["name"] for r in runs]
    w0 = max(len(x[0]) for x in rows) + 2
    ws = [max(len(n), *(len(row[1][i]) for row in rows)) + 2 for i, n in enumerate(names)]
    lines = [head, "".ljust(w0) + "".join(n.rjust(w) for n, w in zip(names, ws))]
    for label, vals in rows:
        lines.append(label.ljust(w0) + "".join(v.rjust(w) for v, w in zip(vals, ws)))
    for c in result.get("comparisons", []):
        diff = c.get("max_abs_diff") or {}
        dtext = ", ".join(f"{k} {v:.2e}" for k, v in diff.items() if v is not None)
        lines.append(f"{c['baseline']} / {c['run']} (median): {c['speedup_median']:.2f}x"
                     + (f"   max |diff| {dtext}" if dtext else ""))
    for r in runs:
        e = r.get("energy")
        if e:
            kind = "ESTIMATE" if e.get("estimate") else "measured"
            line = f"energy {kind} [{r['name']}]: {e['boundary']}"
            if not e.get("estimate") and e.get("window_seconds"):
                line += (f"; idle {e['idle_watts']:.2f} W, window {e['window_seconds']:.2f} s at "
                         f"{e['mean_watts']:.2f} W, {e['inferences']} inferences, {e['sample_hz']:.0f} Hz")
            lines.append(line)
            lines += [f"  note: {n}" for n in e.get("notes", [])]
        p = r.get("profile")
        if p:
            if p.get("unavailable"):
                lines.append(f"profile: {p['unavailable']}")
            else:
                lines.append(f"top operators [{r['name']}] ({p['method']}, {p['runs']} runs):")
                for o in p["ops"]:
                    lines.append(f"  {o['ms_per_inference']:9.4f} ms  {o['percent']:5.1f}%  x{o['calls_per_inference']:<4g} {o['name']}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike, force: bool = False) -> None:
    path = check_output(path, force=force)
    atomic_write(path, json_text(result) + "\n", replace=force)


def plot(result: dict[str, Any], path: str | os.PathLike, force: bool = False) -> None:
    """PNG: latency distribution per run (left) and median with p90/p99 per run (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'edge-sparse[plot]'") from None
    path = check_output(path, force=force)
    runs = result["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    every = np.concatenate([np.asarray(r["samples_ms"]) for r in runs])
    lo, hi = np.percentile(every, 0), max(np.percentile(np.asarray(r["samples_ms"]), 99.5) for r in runs)
    edges = np.linspace(lo, hi * 1.02, 80)      # shared bins; the slowest 0.5% of a run land in the last bin
    for r in runs:
        a = np.asarray(r["samples_ms"])
        ax1.hist(np.clip(a, lo, edges[-1]), bins=edges, weights=np.full(a.size, 100.0 / a.size), alpha=0.55,
                 label=r["name"])
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("% of inferences")
    ax1.set_title("latency distribution")
    ax1.legend(fontsize=8)
    med = [r["latency"]["median_ms"] for r in runs]
    ax2.bar(range(len(runs)), med, color=[f"C{i}" for i in range(len(runs))])
    ax2.errorbar(range(len(runs)), med, yerr=[[0] * len(runs), [r["latency"]["p90_ms"] - m for r, m in zip(runs, med)]],
                 fmt="none", ecolor="black", capsize=4, label="p90")
    ax2.scatter(range(len(runs)), [r["latency"]["p99_ms"] for r in runs], marker="_", s=200, color="red", label="p99")
    ax2.set_xticks(range(len(runs)), [r["name"] for r in runs], rotation=15, ha="right", fontsize=8)
    ax2.set_ylabel("median latency (ms)")
    ax2.set_title(f"threads {result['settings']['threads']}, {result['device']['where']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), replace=force)
    plt.close(fig)


if __name__ == "__main__":  # the onnxruntime baseline process
    if len(sys.argv) == 3 and sys.argv[1] == "--ort-child":
        try:
            _ort_child(sys.argv[2])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        print("usage: python -m edge_sparse.benchmark --ort-child SPEC.json (internal)", file=sys.stderr)
        sys.exit(2)
