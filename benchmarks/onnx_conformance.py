"""ONNX backend node tests through edge-sparse's ``compile`` and through plain TVM, side by side (JSON report).

Every eligible case (``edge_sparse.conformance``: float32/int64/bool inputs with static declared shapes, one data
set, tensor outputs, model passes the ONNX checker) is compiled for ``host`` through the public compile API, run,
and compared with the suite's expected outputs (rtol 1e-3, atol 1e-4); TVM's own importer + default pipeline
(``tvm.compile`` for llvm) runs the same case as the baseline. ``--qemu`` also builds a subset for ``rpi4`` as a
bundle and runs it with the bundle's runner under qemu-aarch64.

Each (case, pipeline) runs in its own forked worker (modules imported once in the parent), so a segfault or a hang
in one case cannot end the run; ``--timeout`` seconds per job. Outcomes: pass / mismatch / unsupported (the one-line
error a CLI user sees) / crash (traceback kept) / timeout.

    python benchmarks/onnx_conformance.py -j 2 --json benchmarks/results/onnx_conformance.json
    python benchmarks/onnx_conformance.py --cases test_max_example,test_clip_default_min --qemu all
    python benchmarks/onnx_conformance.py --filter 'test_slice*' --no-tvm
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_QEMU_CASES = 30


def _job(kind: str, name: str, work: str, conn) -> None:
    from edge_sparse import conformance as conf

    os.environ.setdefault("TVM_NUM_THREADS", "1")
    try:
        case = conf.load_case(name)
        if kind == "ours":
            out = conf.run_ours(case, Path(work))
        elif kind == "tvm":
            out = conf.run_tvm(case)
        else:
            out = conf.run_qemu(case, Path(work))
        conn.send(out.to_dict())
    except BaseException as e:  # noqa: BLE001 - the parent records it as a crash
        conn.send({"status": "crash", "detail": f"{type(e).__name__}: {e}"[:300], "traceback": repr(e)})
    finally:
        conn.close()


def _run_jobs(jobs: list[tuple[str, str]], work: Path, parallel: int, timeout: float, progress) -> dict:
    """Run (kind, case) jobs in forked children, at most ``parallel`` at once; results keyed by (kind, case)."""
    ctx = mp.get_context("fork")
    pending = list(jobs)
    running: dict = {}
    results: dict = {}
    while pending or running:
        while pending and len(running) < parallel:
            kind, name = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            d = work / f"{kind}-{name}"
            d.mkdir(parents=True, exist_ok=True)
            p = ctx.Process(target=_job, args=(kind, name, str(d), send), daemon=True)
            p.start()
            send.close()
            running[(kind, name)] = (p, recv, time.monotonic())
        time.sleep(0.05)
        for key, (p, recv, t0) in list(running.items()):
            res = None
            if recv.poll():
                try:
                    res = recv.recv()
                except EOFError:
                    res = None
                p.join(5)
            elif not p.is_alive():
                p.join()
                res = {"status": "crash", "detail": f"worker died with exit code {p.exitcode}", "traceback": None}
            elif time.monotonic() - t0 > timeout:
                p.kill()
                p.join()
                res = {"status": "timeout", "detail": f"no result in {timeout:.0f} s"}
            else:
                continue
            if res is None:
                res = {"status": "crash", "detail": f"worker died with exit code {p.exitcode}", "traceback": None}
            res.setdefault("seconds", round(time.monotonic() - t0, 2))
            if p.is_alive():
                p.kill()
                p.join()
            recv.close()
            del running[key]
            results[key] = res
            progress(key, res)
    return results


def _import_pipeline() -> None:
    """Import the compile pipeline's modules (targets, passes) before forking: every worker then runs the same code,
    even if the files change while a long run is going."""
    import importlib
    import pkgutil

    for pkg_name in ("edge_sparse.targets", "edge_sparse.passes"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            importlib.import_module(info.name)


def _counts(cases: dict, kind: str) -> dict:
    out: dict[str, int] = {}
    for c in cases.values():
        if kind in c:
            out[c[kind]["status"]] = out.get(c[kind]["status"], 0) + 1
    return dict(sorted(out.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="comma-separated case names (default: every eligible case)")
    ap.add_argument("--filter", help="glob over case names, e.g. 'test_slice*'")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="workers at once (default 1; 2 at most on CI)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per case and pipeline (default 180)")
    ap.add_argument("--no-tvm", action="store_true", help="skip the plain-TVM baseline")
    ap.add_argument("--baseline-from", type=Path,
                    help="take the plain-TVM outcomes from an earlier report of the same TVM version instead of "
                         "rerunning them (they do not depend on edge-sparse's code)")
    ap.add_argument("--qemu", default="0",
                    help=f"rpi4 + qemu-aarch64 for N cases (every k-th eligible case), 'all', or 0 (default 0; "
                         f"{DEFAULT_QEMU_CASES} is a good sample)")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    # everything the workers need, imported once before forking
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import tvm  # noqa: F401
    from tvm.relax.frontend import onnx as _frontend  # noqa: F401

    from edge_sparse import bundle, compiler, conformance as conf, intake, runtime  # noqa: F401

    _import_pipeline()

    root = conf.node_tests_dir(quiet=args.quiet)
    names = conf.list_cases(root)
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in names]
        if unknown:
            print(f"error: unknown case(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = wanted
    if args.filter:
        names = [n for n in names if fnmatch.fnmatch(n, args.filter)]
    ineligible = {n: conf.eligibility(root / n) for n in names}
    eligible = [n for n, why in ineligible.items() if why is None]
    ineligible = {n: why for n, why in ineligible.items() if why is not None}
    if args.qemu == "all":
        qemu = list(eligible)
    else:
        k = int(args.qemu)
        qemu = eligible[:: max(1, len(eligible) // k)][:k] if k > 0 else []

    baseline = {}
    if args.baseline_from:
        import tvm as _tvm

        earlier = json.loads(args.baseline_from.read_text())
        if earlier.get("tvm_version") != _tvm.__version__:
            print(f"error: {args.baseline_from} was made with TVM {earlier.get('tvm_version')}, this is "
                  f"{_tvm.__version__}", file=sys.stderr)
            return 2
        baseline = {n: c["tvm"] for n, c in earlier["cases"].items() if "tvm" in c}
        missing = [n for n in eligible if n not in baseline]
        if missing:
            print(f"error: {args.baseline_from} lacks the TVM outcome of {len(missing)} case(s), e.g. {missing[0]}",
                  file=sys.stderr)
            return 2
    jobs = [("ours", n) for n in eligible]
    if not args.no_tvm and not baseline:
        jobs += [("tvm", n) for n in eligible]
    jobs += [("qemu", n) for n in qemu]
    # interleave so that partial results of a long run cover both pipelines
    jobs.sort(key=lambda j: (eligible.index(j[1]), j[0]))
    done = [0]

    def progress(key, res):
        done[0] += 1
        if not args.quiet:
            line = f"[{done[0]}/{len(jobs)}] {key[0]:4s} {key[1]}: {res['status']}"
            if res["status"] != "pass":
                line += f" ({res.get('detail', '')[:120]})"
            print(line, file=sys.stderr, flush=True)

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="edge-sparse-conformance-") as tmp:
        results = _run_jobs(jobs, Path(tmp), max(1, args.jobs), args.timeout, progress)
    cases = {}
    for n in eligible:
        c = {"ops": conf.Case(n, root / n, {}, {}).ops}
        for kind in ("ours", "tvm", "qemu"):
            if (kind, n) in results:
                c[kind] = results[(kind, n)]
        if n in baseline:
            c["tvm"] = dict(baseline[n], reused_from=str(args.baseline_from))
        cases[n] = c

    def failed(c, kind):
        return c.get(kind, {}).get("status") != "pass"

    tvm_only = sorted(n for n, c in cases.items() if "tvm" in c and not failed(c, "tvm") and failed(c, "ours"))
    tracebacks = sorted(n for n, c in cases.items() if c["ours"]["status"] in ("crash", "timeout"))
    summary = {
        "cases_in_suite": len(conf.list_cases(root)) if not (args.cases or args.filter) else None,
        "selected": len(ineligible) + len(eligible),
        "eligible": len(eligible),
        "ours": _counts(cases, "ours"),
        "tvm": _counts(cases, "tvm") if not args.no_tvm else None,
        "qemu_rpi4": _counts(cases, "qemu") if qemu else None,
        "ours_pass": sum(not failed(c, "ours") for c in cases.values()),
        "tvm_pass": sum(not failed(c, "tvm") for c in cases.values()) if not args.no_tvm else None,
        "tvm_pass_ours_fail": tvm_only,
        "ours_crash_or_timeout": tracebacks,
        "qemu_fail": sorted(n for n, c in cases.items() if "qemu" in c and failed(c, "qemu")),
    }
    report = {
        "benchmark": "onnx_conformance",
        "suite": f"onnx=={conf.ONNX_VERSION} backend node tests",
        "eligibility": "model passes the ONNX checker; one data set; every graph input a float32/int64/bool tensor "
                       "with a static declared shape matching its data; every graph output a tensor",
        "tolerance": {"rtol": conf.RTOL, "atol": conf.ATOL},
        "ours": "edge_sparse.compile(model, 'host') + edge_sparse.load(...).run",
        "baseline": "tvm.relax.frontend.onnx.from_onnx + tvm.compile(target=llvm) + relax.VirtualMachine",
        "qemu": "edge_sparse.compile(model, 'rpi4', bundle=True) + bin/edge-sparse-run under qemu-aarch64",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "jobs": args.jobs, "threads_per_job": 1,
                 "shared": "yes (other work ran on the same 2 cores)"},
        "seconds": round(time.time() - t0, 1),
        "tvm_version": tvm.__version__,
        "baseline_from": str(args.baseline_from) if args.baseline_from else None,
        "summary": summary,
        "ineligible": ineligible,
        "cases": cases,
    }
    s = summary
    print(f"eligible {s['eligible']} of {s['selected']}; edge-sparse pass {s['ours_pass']} {s['ours']}; "
          f"TVM pass {s['tvm_pass']} {s['tvm']}; TVM passes and we do not: {len(tvm_only)}; "
          f"crashes/timeouts: {len(tracebacks)}" + (f"; qemu rpi4 {s['qemu_rpi4']}" if qemu else ""))
    if tvm_only:
        print("TVM passes, we do not: " + ", ".join(tvm_only))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
