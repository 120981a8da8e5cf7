"""Device-side runtime: load an artifact directory and run it with numpy arrays by ONNX input names.

Imports only numpy, the TVM runtime and the standard library (no onnx, onnxruntime or click), so it runs on a
Raspberry Pi or phone with ``pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy`` and a copy of
this file's package. Hashes from the manifest are checked before the library is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_sparse.artifact import library_path, read_manifest
from edge_sparse.errors import UserError, check_threads
from edge_sparse.util import host_arch

__all__ = ["Model", "load", "open_device", "set_threads", "read_arrays"]

def set_threads(n: int | None) -> None:
    """Number of TVM worker threads for this process (None: TVM_NUM_THREADS or TVM's default)."""
    if n is None:
        return
    check_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)      # read when the pool starts
    import tvm

    cfg = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if cfg is not None:                          # the pool may already be running: resize it
        cfg(1, int(n))


def read_arrays(path: str | os.PathLike, what: str = "inputs", npy: bool = False) -> dict[str, np.ndarray]:
    """Arrays by name from an ``.npz`` (no pickles), or ``{"__single__": array}`` from an ``.npy`` when ``npy``.
    A missing, empty, truncated or corrupt file is one UserError line."""
    import zipfile
    import zlib

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}" if not path.exists() else f"{what} path {path} is not a file")
    hint = ("pass an .npz written with numpy.savez(path, input_name=array, ...)" +
            (" (or an .npy for a one-input model)" if npy else ""))
    if path.stat().st_size == 0:
        raise UserError(f"{what} file {path} is empty; {hint}")
    try:
        if npy and path.suffix == ".npy":
            return {"__single__": np.load(path, allow_pickle=False)}
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise ValueError("a single .npy array, not an .npz archive")
        with z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError) as e:
        reason = "it holds pickled objects" if "pickle" in str(e) else " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"cannot read {what} from {path}: not a valid .npz ({reason}); {hint}") from None
    if not data:
        raise UserError(f"{what} file {path} holds no arrays; {hint}")
    return data


def _check_arch(manifest: dict[str, Any]) -> None:
    target = manifest.get("target", {})
    want = target.get("arch")
    have = host_arch()
    if want and want != have:
        raise UserError(f"artifact was compiled for '{target.get('name')}' ({want}); this machine is {have}: "
                        f"run it on the device (see RUN.md) or benchmark it with 'edge-sparse bench DIR --rpc HOST:PORT'")
    if manifest["library"].endswith(".tar"):
        raise UserError("artifact holds an unlinked object archive (model.tar); link it for the device first (see RUN.md)")


def _check_versions(manifest: dict[str, Any]) -> None:
    import tvm
    import tvm_ffi

    built = manifest.get("tvm", {})
    for pkg, want, have in (("apache-tvm", built.get("version"), tvm.__version__),
                            ("apache-tvm-ffi", built.get("ffi_version"), tvm_ffi.__version__)):
        if want and want != have:
            raise UserError(f"artifact was compiled with {pkg} {want} but this runtime has {pkg} {have}; "
                            f"install {pkg}=={want} or recompile")


class Model:
    """A loaded artifact. ``run({name: array}) -> {name: array}``."""

    def __init__(self, root: Path, manifest: dict[str, Any], lib, vm, device):
        self.root = root
        self.manifest = manifest
        self.lib = lib
        self.vm = vm
        self.device = device
        self.inputs: list[dict[str, Any]] = manifest["inputs"]
        self.outputs: list[dict[str, Any]] = manifest["outputs"]
        self._main = vm["main"] if vm is not None else None  # (None: a holder for make_inputs only)
        if vm is not None:
            check_arity(vm, manifest, root)
        # CPU: input tensors allocated once (TVM's 64-byte alignment) and filled through numpy views, which saves
        # ~10 us per input and call against allocating new tensors; a Model is not to be shared between threads.
        # None until the first call decides; [] where staging does not apply (a GPU device, read-only views).
        self._staged: list[tuple[Any, np.ndarray]] | None = None

    def __repr__(self) -> str:
        ins = ", ".join(f"{i['name']}{tuple(i['shape'])}:{i['dtype']}" for i in self.inputs)
        return f"<edge_sparse Model {self.root} target={self.manifest['target'].get('name')} inputs=[{ins}]>"

    def make_inputs(self, fill: str = "random", seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs of the right names, shapes and dtypes: standard-normal floats (or zeros); integer inputs are ones
        (valid token ids and attention masks)."""
        if fill not in ("random", "zeros"):
            raise UserError(f"fill must be 'random' or 'zeros', got '{fill}'")
        if not 0 <= seed < 2**63:
            raise UserError(f"--seed must be in [0, 2^63), got {seed}")
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.inputs:
            shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
            if fill == "zeros":
                out[spec["name"]] = np.zeros(shape, dtype)
            elif dtype.kind == "f":
                out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
            else:
                out[spec["name"]] = np.ones(shape, dtype)
        return out

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [i["name"] for i in self.inputs]
        unknown = [k for k in inputs if k not in names]
        if unknown:
            raise UserError(f"unknown input name(s) {', '.join(unknown)}; the model's inputs are: {', '.join(names)}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise UserError(f"missing input(s) {', '.join(missing)}; the model's inputs are: {', '.join(names)}")
        arrays = []
        for spec in self.inputs:
            a = np.asarray(inputs[spec["name"]])
            if tuple(a.shape) != tuple(spec["shape"]):
                raise UserError(f"input '{spec['name']}' has shape {list(a.shape)}, the model expects {spec['shape']}")
            if a.dtype != np.dtype(spec["dtype"]):
                raise UserError(f"input '{spec['name']}' has dtype {a.dtype}, the model expects {spec['dtype']}")
            if spec.get("range") is not None and a.size:
                lo, hi = spec["range"]
                amin, amax = int(a.min()), int(a.max())
                if amin < lo or amax > hi:
                    bad = amin if amin < lo else amax
                    raise UserError(f"input '{spec['name']}' holds {bad}, outside the valid index range [{lo}, {hi}] "
                                    f"(it indexes a table of {hi + 1} rows); fix the ids (e.g. the tokenizer's vocabulary)")
            arrays.append(np.asarray(a, order="C"))      # (ascontiguousarray makes 0-d arrays 1-d)
        return arrays

    def to_device(self, inputs: dict[str, np.ndarray]) -> list:
        import tvm

        arrays = self.check_inputs(inputs)
        if self._staged is None:
            self._staged = self._stage(arrays)
        if not self._staged:
            return [tvm.runtime.tensor(a, self.device) for a in arrays]
        for (_, view), a in zip(self._staged, arrays):
            np.copyto(view, a)
        return [t for t, _ in self._staged]

    def _stage(self, arrays: list[np.ndarray]) -> list:
        """(tensor, writeable numpy view) per input on the CPU; [] where the inputs are copied per call instead."""
        import tvm

        if self.device.dlpack_device_type() != tvm.cpu(0).dlpack_device_type():
            return []
        tensors = [tvm.runtime.empty(a.shape, str(a.dtype), self.device) for a in arrays]
        views = [np.from_dlpack(t) for t in tensors]
        return list(zip(tensors, views)) if all(v.flags.writeable for v in views) else []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.outputs_to_numpy(self._main(*self.to_device(inputs)))

    def outputs_to_numpy(self, result) -> dict[str, np.ndarray]:
        flat = list(result) if not hasattr(result, "numpy") else [result]
        if len(flat) != len(self.outputs):
            raise RuntimeError(f"model returned {len(flat)} outputs, manifest lists {len(self.outputs)}")
        return {spec["name"]: _to_numpy(t) for spec, t in zip(self.outputs, flat)}


def check_arity(vm, manifest: dict[str, Any], root: Path | str) -> None:
    """The library's ``main`` must take as many inputs as the manifest lists (zero is valid: a graph of constants);
    an edited manifest would otherwise end in the VM's internal arity check."""
    arity = int(vm._get_function_arity("main"))
    listed = len(manifest["inputs"])
    if arity != listed:
        raise UserError(f"{Path(root) / 'manifest.json'} lists {listed} input(s) but the library's main takes {arity}: "
                        f"the manifest does not belong to this library; recompile the model")


def _to_numpy(t) -> np.ndarray:
    """A copy of a TVM tensor (through DLPack on the CPU: ~0.3 us instead of ~5 us for ``.numpy()``)."""
    try:
        return np.from_dlpack(t).copy()
    except (BufferError, TypeError, RuntimeError):
        return t.numpy()


def open_device(manifest: dict[str, Any], session=None):
    """``(device, VM devices)`` for the manifest's TVM target: its device type (CPU, OpenCL, CUDA, ...), locally or
    on an RPC ``session``. Accelerators get the CPU as the VM's second device (host-side shape functions)."""
    import tvm

    target = manifest.get("target", {})
    kind = tvm.target.Target(target["target"]).get_target_device_type()
    dev = session.device(kind, 0) if session is not None else tvm.device(kind, 0)
    if session is None and not dev.exist:
        name = tvm.runtime.Device._DEVICE_TYPE_TO_NAME.get(kind, str(kind))
        raise UserError(f"artifact targets '{target.get('name')}' but this TVM runtime finds no {name} device; run it "
                        f"on the device with a TVM runtime built for {name}, or benchmark it there with --rpc HOST:PORT")
    if dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type():
        return dev, dev
    return dev, [dev, session.cpu(0) if session is not None else tvm.cpu(0)]


def load(path: str | os.PathLike, *, threads: int | None = None) -> Model:
    """Load an artifact directory made by ``edge-sparse compile`` (hashes checked first; the library must be one of
    the artifact's hashed files)."""
    root = Path(path)
    manifest = read_manifest(root)
    _check_arch(manifest)
    lib_file = library_path(root, manifest)
    _check_versions(manifest)
    set_threads(threads)
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev, devices = open_device(manifest)            # before the library: its loader needs the device's runtime
    lib = tvm.runtime.load_module(str(lib_file))
    vm = VirtualMachine(lib, devices)
    return Model(root, manifest, lib, vm, dev)
