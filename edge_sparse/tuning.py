"""``tune``: meta_schedule search for a model's dense PrimFuncs, written to a database that ``compile --tuning-db`` uses.

The module is brought to the state in which ``targets.cpu.relax_passes`` applies the database (imported, channels-last
convs, fast math, legalized and fused), so the workloads found here are the ones compile looks up. Functions the
database has a record for are compiled with the tuned schedule; every other one keeps our default rules
(``targets/cpu/schedules.py``), so a short search can only replace schedules it measured as faster.
Measurements run locally (host presets) or through a TVM RPC tracker (``--tracker HOST:PORT --key KEY``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edge_sparse.errors import UserError
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_dir, check_output, parse_host_port

__all__ = ["tune", "count_records"]


FAILED_RUN_SECS = 1e9   # meta_schedule records a failed build or run as 1e10 s


def count_records(path: Path) -> tuple[int, int]:
    """(usable, failed) tuning records in a meta_schedule JSON database file: lines ``[workload index, [trace,
    run_secs, target, args_info]]``; a failed build or run has run_secs of 1e10 (or none)."""
    import json

    good = bad = 0
    if not path.is_file():
        return 0, 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        body = rec[1] if isinstance(rec, list) and len(rec) > 1 else None
        secs = body[1] if isinstance(body, list) and len(body) > 1 else None
        if secs and all(float(s) < FAILED_RUN_SECS for s in secs):
            good += 1
        else:
            bad += 1
    return good, bad


STEP_TIMEOUT_S = 180.0        # per candidate build and per local measurement


def tune(model: str | os.PathLike, target: str = "host", out_db: str | os.PathLike = "tuning_db", *,
         trials: int = 64, input_shapes: dict[str, tuple[int, ...]] | None = None,
         target_file: str | os.PathLike | None = None, tracker: str | None = None, key: str | None = None,
         rpc: str | None = None, force: bool = False, quiet: bool | None = None) -> dict[str, Any]:
    """Search schedules for ``model``'s dense operators on ``target``; returns a summary dict."""
    from edge_sparse import targets
    from edge_sparse.compiler import import_relax
    from edge_sparse.intake import load_model

    preset = targets.get(target, target_file)
    family = targets.family_of(preset)
    if not family.supports_tuning:
        raise UserError(f"tune does not support '{preset.name}': its family ({family.name}) has no tuning support")
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if rpc is not None:
        raise UserError("meta_schedule measures through an RPC tracker, not a bare server: start "
                        "'python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190', tunnel with "
                        "'ssh -L 9090:127.0.0.1:9090 -R 9190:127.0.0.1:9190 USER@DEVICE', on the device run "
                        "'python -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090 --tracker 127.0.0.1:9190 --key KEY', "
                        "then pass --tracker 127.0.0.1:9190 --key KEY (never omit --host: an RPC server runs any "
                        "code it is sent, without authentication; docs/dense-cpu.md)")
    if tracker is not None and not key:
        raise UserError("--tracker needs --key (the device key the RPC server registered with)")
    if tracker is None and not preset.is_native:
        raise UserError(f"target '{preset.name}' does not run on this machine; measure on the device with "
                        "--tracker HOST:PORT --key KEY")
    out = check_output(out_db, force=force, inputs=(model, target_file), kind="dir",
                       replaceable=lambda p: (p / "database_workload.json").is_file())
    import tvm
    from tvm.s_tir import meta_schedule as ms

    progress = Progress(quiet)
    t0 = time.perf_counter()
    with progress.step(f"loading {Path(model).name}"):
        intake = load_model(model, input_shapes)
        mod = family.prepare_for_tuning(import_relax(intake), preset)
    # meta_schedule's defaults give a candidate's build and run 30 s each; a 2-core board or a busy host exceeds that
    # and then every candidate "fails"
    builder = ms.builder.LocalBuilder(timeout_sec=STEP_TIMEOUT_S)
    runner = ms.runner.LocalRunner(timeout_sec=STEP_TIMEOUT_S)
    if tracker is not None:
        from edge_sparse.rpc import check_tracker

        check_tracker(tracker, key)               # before minutes of search whose every measurement would fail
        host, port = parse_host_port(tracker, None, "--tracker")
        runner = ms.runner.RPCRunner(rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                                                    tracker_key=key, session_timeout_sec=120))
    with atomic_dir(out, replace=force) as stage, progress.step(f"tuning {trials} trials for {preset.name}"):
        ms.relax_integration.tune_relax(
            mod=mod, params={}, target=preset.tvm_target(), work_dir=str(stage), max_trials_global=trials,
            builder=builder, runner=runner, num_trials_per_iter=min(64, max(4, trials // 4)))
        records, failed = count_records(stage / "database_tuning_record.json")
        if records == 0:                          # raising here removes the staging directory: nothing is written
            how = f"all {failed} measured candidates failed" if failed else "no candidate was measured"
            raise UserError(f"tuning found nothing: {how} (build timeouts or errors, or the device/runner failed"
                            f"{'; check the RPC server of key ' + repr(key) if tracker else ''}); nothing was written")
    summary = {"database": str(out), "target": preset.name, "trials": trials, "records": records, "failed": failed,
               "seconds": round(time.perf_counter() - t0, 1)}
    progress.info(f"wrote {out}: {records} tuning records in {summary['seconds']} s")
    return summary
