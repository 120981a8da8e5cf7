"""``compile``: ONNX model -> artifact directory (library with weights inside + manifest.json).

intake (static shapes, folded) -> Relax import -> sparsify pass (pruned weights to sparse kernels) ->
target family build (schedules, kernels) -> export/link -> manifest. Output is written to a temporary sibling
directory and renamed into place, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edge_sparse.artifact import Manifest, is_artifact, write_manifest
from edge_sparse.errors import UserError, check_threads, raise_if_interrupted
from edge_sparse.formats import SPARSE_MODES
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_dir, check_output

__all__ = ["compile", "import_relax"]


def import_relax(intake):
    """Relax IRModule of an intake result, weights as inline constants (so passes can see and rewrite them), every
    gather bounded (an out-of-range index can not read out of bounds)."""
    from tvm.relax.frontend.onnx import from_onnx

    from edge_sparse.passes.bounded_take import bound_takes

    try:
        mod = from_onnx(intake.model, shape_dict=intake.shape_dict, keep_params_in_input=False)
    except Exception as e:  # converter errors are model problems the user must fix, not our bugs
        raise_if_interrupted()
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise UserError(f"TVM's ONNX importer rejected the model: {msg}") from None
    return bound_takes(mod)


def _versions() -> tuple[dict[str, str], dict[str, str]]:
    import tvm
    import tvm_ffi

    from edge_sparse import __version__

    return {"name": "edge-sparse", "version": __version__}, {"version": tvm.__version__, "ffi_version": tvm_ffi.__version__}


def _sparsify(mod, preset, intake, sparse: str, measure: bool):
    from edge_sparse.passes.qdq import rewrite_qdq

    mod, int8_layers = rewrite_qdq(mod, preset, mode=sparse)       # quantized layers -> int8 kernels
    if sparse == "off":
        return mod, int8_layers
    mod, layers = _sparsify_float(mod, preset, intake, sparse, measure)
    return mod, int8_layers + layers


def _sparsify_float(mod, preset, intake, sparse: str, measure: bool):
    try:
        from edge_sparse.passes import sparsify as sparsify_mod
    except ImportError:  # the sparse path is an optional stage until its pass is installed
        raise UserError(f"--sparse {sparse} needs the sparsify pass, which this installation lacks; use --sparse off") from None
    return sparsify_mod.sparsify(mod, preset, mode=sparse, measure=measure, weight_names=intake.weight_names)


def compile(model: str | os.PathLike, target: str = "host", out_dir: str | os.PathLike = "out", *,
            input_shapes: dict[str, tuple[int, ...]] | None = None, sparse: str = "auto",
            target_file: str | os.PathLike | None = None, tuning_db: str | os.PathLike | None = None,
            threads: int | None = None, force: bool = False, bundle: bool = False, measure: bool = False,
            quiet: bool | None = None, input_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``model`` (an .onnx path) for ``target`` into ``out_dir``; returns the manifest as a dict.

    ``input_values`` freezes inputs to constants (name -> number or array) before folding (see ``intake``)."""
    from edge_sparse import targets
    from edge_sparse.intake import load_model

    if sparse not in SPARSE_MODES:
        raise UserError(f"unknown --sparse '{sparse}'; choose one of {', '.join(SPARSE_MODES)}")
    preset = targets.get(target, target_file)
    check_threads(threads, preset.cores, where=f"the target {preset.name}")
    out = check_output(out_dir, force=force, inputs=(model, target_file, tuning_db), kind="dir",
                       replaceable=is_artifact)
    if tuning_db is not None and not Path(tuning_db).is_dir():
        raise UserError(f"tuning database not found: {tuning_db}; create it with 'edge-sparse tune MODEL.onnx -o {tuning_db}'")
    family = targets.family_module(preset)
    if preset.link.get("kind") == "cross":
        targets.cross_compiler_or_error(preset)      # fail before minutes of compiling, not after
    if bundle and preset.arch != "aarch64":
        raise UserError(f"--bundle packs the aarch64 runtime and runner; target '{preset.name}' is {preset.arch}")
    progress = Progress(quiet)
    t0 = time.perf_counter()
    with progress.step(f"loading {Path(model).name}"):
        intake = load_model(model, input_shapes, input_values=input_values)
    with progress.step("importing into TVM Relax"):
        mod = import_relax(intake)
    with progress.step(f"choosing sparse kernels ({sparse})"):
        mod, layers = _sparsify(mod, preset, intake, sparse, measure)
    with progress.step(f"compiling for {preset.name}"):
        ex = family.build(mod, preset, tuning_db=str(tuning_db) if tuning_db else None)
    with atomic_dir(out, replace=force) as stage:
        with progress.step("linking"):
            library = family.export(ex, stage, preset)
        tool, tvm_versions = _versions()
        manifest = Manifest(
            tool=tool,
            tvm=tvm_versions,
            target=preset.to_dict(),
            library=library,
            inputs=[t.to_dict() for t in intake.inputs],
            outputs=[t.to_dict() for t in intake.outputs],
            source_model={"name": intake.source_name, "sha256": intake.source_sha256},
            layers=layers,
            compile={"seconds": round(time.perf_counter() - t0, 2), "sparse": sparse, "threads": threads,
                     "tuning_db": str(tuning_db) if tuning_db else None, "input_values": intake.frozen},
        )
        if bundle:
            from edge_sparse import bundle as bundle_mod

            with progress.step("bundling the aarch64 runtime and runner"):
                manifest.bundle = bundle_mod.make_bundle(stage, preset, manifest)
        write_manifest(stage, manifest)
    progress.info(f"wrote {out} ({library}, {len(layers)} layer choices)")
    return manifest.to_dict()
