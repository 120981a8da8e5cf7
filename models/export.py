"""PyTorch -> ONNX with torch's current (``torch.export``-based) exporter: the optional ``export`` extra.

``export_module`` takes a module object; ``load_module`` resolves what a user names on the command line:
``pkg.mod:factory`` (a callable returning an ``nn.Module``, or an ``nn.Module`` class / instance) or a TorchScript
file saved with ``torch.jit.save``. Inputs are zero-filled tensors of the given static shapes (float32 unless a
dtype is given), so the exported graph has fixed shapes, which is what ``edge-sparse compile`` needs anyway.
The file is written to a temporary name beside the output and moved into place only after ``onnx.checker`` passed.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

from edge_sparse.errors import UserError
from edge_sparse.util import atomic_path

__all__ = ["export_module", "load_module", "require_torch", "DEFAULT_OPSET"]

# Opset 18: the lowest opset the torch.export-based exporter emits natively (no down-conversion pass), and one
# TVM 0.27's ONNX importer and onnxruntime 1.32 both cover.
DEFAULT_OPSET = 18


def require_torch():
    """Import torch (and check for onnxscript, which the exporter needs) or raise a UserError naming the extra."""
    try:
        import torch
    except ImportError:
        raise UserError("exporting from PyTorch needs torch: pip install 'edge-sparse[export]'") from None
    try:
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) imports it lazily and fails late)
    except ImportError:
        raise UserError("torch's ONNX exporter needs onnxscript: pip install 'edge-sparse[export]'") from None
    return torch


def load_module(spec: str):
    """``pkg.mod:attr`` or a TorchScript file path -> an ``nn.Module`` in eval mode."""
    torch = require_torch()
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ts", ".torchscript") or (path.exists() and ":" not in spec):
        if not path.is_file():
            raise UserError(f"TorchScript file not found: {spec}")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise UserError(f"{spec} is not a TorchScript file saved with torch.jit.save ({type(e).__name__}); "
                            f"pass a module as pkg.mod:factory instead") from None
        return module.eval()
    if ":" not in spec:
        raise UserError(f"cannot resolve '{spec}': pass a TorchScript file (.pt) or an import path 'pkg.mod:factory'")
    mod_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())          # like `python -m`: modules in the working directory are importable
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"cannot import module '{mod_name}' ({e}); is it on PYTHONPATH?") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise UserError(f"'{spec}' is neither an nn.Module nor a callable that returns one")
        obj = obj()
    if not isinstance(obj, torch.nn.Module):
        raise UserError(f"'{spec}' returned {type(obj).__name__}, not a torch.nn.Module")
    return obj.eval()


def _first_line(e: Exception) -> str:
    """The cause of an exporter error: its 'Exception summary' line when there is one, else its first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1][:300]
    return (lines[0] if lines else type(e).__name__)[:300]


_DTYPES = {"float32": "float32", "float": "float32", "float16": "float16", "int64": "int64", "long": "int64",
           "int32": "int32", "bool": "bool"}


def export_module(module, out: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]], *,
                  input_dtypes: dict[str, str] | None = None, output_names: list[str] | None = None,
                  opset: int = DEFAULT_OPSET, force: bool = False) -> Path:
    """Export ``module`` called as ``module(*inputs)`` (inputs in ``input_shapes`` order) to ``out``.

    Returns the written path. Deterministic for a given torch/onnxscript version: no random inputs, no timestamps.
    """
    torch = require_torch()
    import onnx

    out = Path(out)
    if not input_shapes:
        raise UserError("give every model input's shape with --input-shape NAME=D1,D2,... (in forward() order)")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    dtypes = dict(input_dtypes or {})
    unknown = [n for n in dtypes if n not in input_shapes]
    if unknown:
        raise UserError(f"--input-dtype names {', '.join(unknown)}, which no --input-shape names")
    args = []
    for name, shape in input_shapes.items():
        dt = _DTYPES.get(dtypes.get(name, "float32"))
        if dt is None:
            raise UserError(f"--input-dtype {name}={dtypes[name]}: use one of {', '.join(sorted(set(_DTYPES)))}")
        args.append(torch.zeros(tuple(shape), dtype=getattr(torch, dt)))
    program_input = module
    if isinstance(module, torch.jit.ScriptModule):
        # torch.export (the current exporter's front end) rejects ScriptModules; torch's own TorchScript ->
        # ExportedProgram converter bridges them (a private module, hence the guarded import).
        try:
            from torch._export.converter import TS2EPConverter
        except ImportError:
            raise UserError(f"this torch ({torch.__version__}) cannot convert TorchScript for the exporter; "
                            f"export the Python module as pkg.mod:factory instead") from None
        try:
            program_input = TS2EPConverter(module, tuple(args)).convert()
        except Exception as e:
            raise UserError(f"converting the TorchScript module for export failed: {_first_line(e)}") from None
    import logging

    # torch's exporter warns once per missing torchvision op it could have registered: noise for users
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with atomic_path(out) as tmp, torch.no_grad():
        try:
            program = torch.onnx.export(program_input, tuple(args), input_names=list(input_shapes),
                                        output_names=output_names, opset_version=opset, dynamo=True,
                                        external_data=False, optimize=True, verbose=False)
        except Exception as e:
            raise UserError(f"torch.onnx.export failed: {_first_line(e)}") from None
        program.save(tmp, external_data=False)
        model = onnx.load(tmp)
        if name_weights(model):
            onnx.save(model, tmp)
        onnx.checker.check_model(model)
    return out


_GENERATED = re.compile(r"^(val|_val|initializer|const|onnx::\w+)_?\d+$")


def name_weights(model) -> int:
    """Give weights the PyTorch module path they belong to (``layers.0.q.weight``) where the exporter's constant
    folding left a generated name (``val_6``, the transposed ``nn.Linear`` weight): pruning reports, recipes' globs and
    ``compile -v`` then speak the model's own names. The module path comes from the consuming node's
    ``pkg.torch.onnx.name_scopes`` metadata. Returns how many initializers were renamed."""
    import ast

    inits = {i.name: i for i in model.graph.initializer}
    taken = set(inits) | {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    taken |= {o for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    renames = {}
    for name, users in consumers.items():
        if name not in inits or not _GENERATED.match(name) or len(users) != 1:
            continue
        node = users[0]
        if node.op_type not in ("MatMul", "Gemm", "Conv") or list(node.input).index(name) != 1:
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        try:
            scopes = ast.literal_eval(scopes) if scopes else None
        except (ValueError, SyntaxError):
            scopes = None
        if not scopes or len(scopes) < 2 or not scopes[-2]:
            continue
        new = f"{scopes[-2]}.weight"
        if new in taken or new in renames.values():
            continue
        renames[name] = new
    for old, new in renames.items():
        inits[old].name = new
        for node in consumers[old]:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        for vi in model.graph.value_info:
            if vi.name == old:
                vi.name = new
    return len(renames)
