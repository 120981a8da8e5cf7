"""The compile stages, each a public function on in-memory objects, and ``compile`` composing them:

``intake(path) -> Intake`` (static shapes, folded ONNX, tensor metadata) -> ``lower(model, preset, sparse) ->
(IRModule, layers)`` (Relax import + the :class:`~edge_sparse.passes.sparsify.Sparsify` pass: pruned weights to
sparse kernels, per-layer report) -> ``build(mod, preset) -> Executable`` (the target family's pipeline: schedules,
kernels) -> ``write_artifact(ex, out_dir, preset, model, layers)`` (link + manifest, written to a temporary sibling
directory and renamed into place, so a failure leaves nothing half-written).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edge_sparse.artifact import Manifest, is_artifact, write_manifest
from edge_sparse.errors import UserError, check_threads, internal_errors, raise_if_interrupted
from edge_sparse.formats import SPARSE_MODES
from edge_sparse.intake import Intake
from edge_sparse.intake import load_model as intake
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_dir, check_output

__all__ = ["compile", "intake", "lower", "build", "write_artifact", "import_relax", "Intake"]


def import_relax(model: Intake):
    """Relax IRModule of an intake result, weights as inline constants (so passes can see and rewrite them), every
    gather bounded (an out-of-range index can not read out of bounds)."""
    import contextlib
    import io

    from tvm.relax.frontend.onnx import from_onnx

    from edge_sparse.passes.bounded_take import bound_takes

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # (it prints its own "Error converting operator" line)
            mod = from_onnx(model.model, shape_dict=model.shape_dict, keep_params_in_input=False)
    except Exception as e:  # converter errors are model problems the user must fix, not our bugs
        raise_if_interrupted()
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        node = _failing_node(e)
        where, hint = "", ""
        if node is not None:
            where = f" at {node.op_type}" + (f" (node '{node.name}')" if node.name else "")
            graph_inputs = {t.name for t in model.inputs}
            fed = [i for i in list(node.input)[1:] if i in graph_inputs]
            if fed:  # shapes, axes, pads, k, scales given as graph inputs: TVM needs them as constants
                hint = (f"; TVM needs {', '.join(fed)} to be constant: freeze "
                        + " ".join(f"--input-value {n}=V" for n in fed) + " or make it an initializer of the model")
        raise UserError(f"TVM's ONNX importer rejected the model{where}: {msg}{hint}") from None
    with internal_errors("bounding gathers"):
        return bound_takes(mod)


def _failing_node(exc):
    """The ONNX node TVM's importer was converting when it raised (its converter loop holds it as ``node``)."""
    import onnx

    tb, found = exc.__traceback__, None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, onnx.NodeProto):
            found = node
        tb = tb.tb_next
    return found


def _versions() -> tuple[dict[str, str], dict[str, str]]:
    import tvm
    import tvm_ffi

    from edge_sparse import __version__

    return {"name": "edge-sparse", "version": __version__}, {"version": tvm.__version__, "ffi_version": tvm_ffi.__version__}


def _preset(target):
    from edge_sparse import targets

    return targets.get(target) if isinstance(target, str) else target


def lower(model: Intake, preset, sparse: str = "auto", *, measure: bool = False, log=None):
    """Relax module of ``model`` with its quantized layers routed to int8 kernels and its pruned layers to
    ``preset``'s sparse kernels: ``(mod, layers)``, ``layers`` being the per-layer report of the manifest."""
    from edge_sparse.passes.qdq import rewrite_qdq
    from edge_sparse.passes.sparsify import Sparsify

    if sparse not in SPARSE_MODES:
        raise UserError(f"unknown --sparse '{sparse}'; choose one of {', '.join(SPARSE_MODES)}")
    preset = _preset(preset)
    mod = import_relax(model)
    with internal_errors("choosing int8 and sparse kernels"):
        mod, int8_layers = rewrite_qdq(mod, preset, mode=sparse, measure=measure)   # quantized -> int8 kernels
        if sparse == "off":
            return mod, int8_layers
        sparsify = Sparsify(preset, mode=sparse, measure=measure, weight_names=model.weight_names, log=log)
        mod = sparsify(mod)
    return mod, int8_layers + sparsify.layers


def build(mod, preset, *, tuning_db: str | os.PathLike | None = None):
    """Compile a lowered module with ``preset``'s family (schedules, kernels): a ``relax.Executable``."""
    from edge_sparse import targets

    preset = _preset(preset)
    with internal_errors(f"compiling for {preset.name}"):
        return targets.family_of(preset).build(mod, preset, tuning_db=str(tuning_db) if tuning_db else None)


def write_artifact(ex, out_dir: str | os.PathLike, preset, model: Intake, layers: list[dict[str, Any]], *,
                   compile_info: dict[str, Any] | None = None, bundle: bool = False, force: bool = False,
                   quiet: bool | None = None) -> dict[str, Any]:
    """Link ``ex`` for ``preset`` into the artifact directory ``out_dir`` with its manifest (and, with ``bundle``,
    the device runtime and runner); returns the manifest as a dict."""
    from edge_sparse import targets

    preset = _preset(preset)
    out = check_output(out_dir, force=force, kind="dir", replaceable=is_artifact)
    progress = Progress(quiet)
    with atomic_dir(out, replace=force) as stage:
        with progress.step("linking"), internal_errors("linking"):
            library = targets.family_of(preset).export(ex, stage, preset)
        tool, tvm_versions = _versions()
        manifest = Manifest(
            tool=tool,
            tvm=tvm_versions,
            target=preset.to_dict(),
            library=library,
            inputs=[t.to_dict() for t in model.inputs],
            outputs=[t.to_dict() for t in model.outputs],
            source_model={"name": model.source_name, "sha256": model.source_sha256},
            layers=layers,
            compile=dict(compile_info or {}),
        )
        if bundle:
            from edge_sparse import bundle as bundle_mod

            with progress.step("bundling the device runtime and runner"):
                manifest.bundle = bundle_mod.make_bundle(stage, preset, manifest)
        write_manifest(stage, manifest)
    progress.info(f"wrote {out} ({library}, {len(layers)} layer choices)")
    return manifest.to_dict()


def compile(model: str | os.PathLike, target: str = "host", out_dir: str | os.PathLike = "out", *,
            input_shapes: dict[str, tuple[int, ...]] | None = None, sparse: str = "auto",
            target_file: str | os.PathLike | None = None, tuning_db: str | os.PathLike | None = None,
            threads: int | None = None, force: bool = False, bundle: bool = False, measure: bool = False,
            quiet: bool | None = None, input_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``model`` (an .onnx path) for ``target`` into ``out_dir``: intake -> lower -> build ->
    write_artifact. Returns the manifest as a dict.

    ``input_values`` freezes inputs to constants (name -> number or array) before folding (see ``intake``)."""
    from edge_sparse import targets

    if sparse not in SPARSE_MODES:
        raise UserError(f"unknown --sparse '{sparse}'; choose one of {', '.join(SPARSE_MODES)}")
    preset = targets.get(target, target_file)
    check_threads(threads, preset.cores, where=f"the target {preset.name}")
    check_output(out_dir, force=force, inputs=(model, target_file, tuning_db), kind="dir", replaceable=is_artifact)
    if tuning_db is not None and not Path(tuning_db).is_dir():
        raise UserError(f"tuning database not found: {tuning_db}; create it with 'edge-sparse tune MODEL.onnx -o {tuning_db}'")
    if preset.link.get("kind") == "cross":
        targets.cross_compiler_or_error(preset)      # fail before minutes of compiling, not after
    if bundle:
        from edge_sparse.bundle import check_bundle_target

        check_bundle_target(preset)
    progress = Progress(quiet)
    t0 = time.perf_counter()
    with progress.step(f"loading {Path(model).name}"):
        model_obj = intake(model, input_shapes, input_values=input_values)
    with progress.step(f"importing into TVM Relax, choosing sparse kernels ({sparse})"):
        mod, layers = lower(model_obj, preset, sparse, measure=measure)
    with progress.step(f"compiling for {preset.name}"):
        ex = build(mod, preset, tuning_db=tuning_db)
    info = {"seconds": round(time.perf_counter() - t0, 2), "sparse": sparse, "threads": threads,
            "tuning_db": str(tuning_db) if tuning_db else None, "input_values": model_obj.frozen}
    return write_artifact(ex, out_dir, preset, model_obj, layers, compile_info=info, bundle=bundle, force=force,
                          quiet=quiet)
