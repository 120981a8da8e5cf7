"""Time one compiled kernel or one-layer Relax module, on this machine or on a TVM RPC device.

``time_kernel(ex, args, preset, session=None)``: ``ex`` is what ``tvm.compile`` returned for a PrimFunc with entry
``main`` (``relax=False``) or for a Relax module (``relax=True``, driven through set_input / invoke_stateful like the
benchmark). Remote: the module is linked with the target family's export (host or cross compiler), uploaded and loaded
on the device, and timed there with ``time_evaluator``. Returns the median in microseconds.
"""
from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["time_kernel"]

_UPLOADS = itertools.count()


def _load(ex, preset, session):
    import tvm

    if session is None:
        return ex, tvm.cpu(0)
    from edge_sparse import targets

    family = targets.family_of(preset)
    with tempfile.TemporaryDirectory(prefix="edge-sparse-kernel-") as tmp:
        lib = Path(tmp) / family.export(ex, Path(tmp), preset)
        if lib.suffix != ".so":
            from edge_sparse.errors import UserError

            raise UserError(f"target '{preset.name}' links to {lib.name}, which an RPC device cannot load; "
                            f"set up its compiler (see 'edge-sparse targets') to measure over RPC")
        name = f"edge_sparse_kernel_{next(_UPLOADS)}.so"
        session.upload(str(lib), name)
    return session.load_module(name), session.cpu(0)


def time_kernel(ex, args: list[np.ndarray], preset, *, session=None, relax: bool = False, repeats: int = 15) -> float:
    """Median time (us) of one call of ``ex``'s ``main`` on ``args`` (numpy arrays, outputs included)."""
    import tvm

    mod, dev = _load(ex, preset, session)
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    if relax:
        from tvm.runtime.vm import VirtualMachine

        vm = VirtualMachine(mod, dev)
        vm.set_input("main", *tensors)
        f = vm.time_evaluator("invoke_stateful", dev, number=5, repeat=repeats, min_repeat_ms=2)
        res = f("main")
    else:
        if session is None:
            mod = mod.jit() if hasattr(mod, "jit") else mod
        f = mod.time_evaluator("main", dev, number=5, repeat=repeats, min_repeat_ms=2)
        res = f(*tensors)
    return float(np.median(res.results) * 1e6)
