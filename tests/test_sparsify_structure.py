"""The Sparsify Relax pass as IR: Before/Expected modules compared structurally (tvm.ir.assert_structural_equal)
for the patterns it rewrites (MatMul + bias + ReLU, Gemm transB, 1x1 conv + bias) and for the ones it leaves.

Expected modules are written by hand with the BlockBuilder: one call_tir to the family's kernel taking the activation
(reshaped where the kernel wants [M, K]; a 1x1 conv transposed to channels-last first), the format's arrays and the
bias as constants, a reshape back to the layer's output shape, and nothing left of the dense chain. Numerics are tested in test_sparse_pass.py.
"""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from edge_sparse import formats as F  # noqa: E402
from edge_sparse import targets  # noqa: E402
from edge_sparse.passes.sparsify import Sparsify  # noqa: E402

HOST = targets.get("host")
FAMILY = targets.family_of(HOST)


def _bsr_weight(K, N, rng, R=16, keep=0.25):
    w = rng.standard_normal((K, N)).astype(np.float32)
    blocks = rng.random((K, N // R)) < keep
    return (w * np.repeat(blocks, R, axis=1)).astype(np.float32)


def _module(x_shape, body):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(x_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _sparse_call(bb, spec, arrays, bias, args_x, out_shape, kernel):
    pf = FAMILY.make_sparse_kernel(spec, HOST)
    name = "".join(c if c.isalnum() else "_" for c in kernel)
    gv = bb.add_func(pf, f"sparse_{name}")
    out_t = relax.TensorType(list(spec_out_shape(spec)), "float32")
    y = bb.emit(relax.call_tir(gv, [args_x] + [relax.const(a) for a in arrays] + [relax.const(bias)], out_t))
    return relax.op.reshape(y, out_shape)


def spec_out_shape(spec):
    return (spec.M, spec.cout, spec.N) if spec.op == "conv1x1" else (spec.M, spec.N)


def _run(before, mode="bsr16x1"):
    p = Sparsify(HOST, mode=mode)
    return p(before), p.layers


def test_matmul_bias_relu_becomes_one_kernel_call():
    rng = np.random.default_rng(0)
    w, b = _bsr_weight(64, 32, rng), rng.standard_normal(32).astype(np.float32)

    def dense(bb, x):
        y = bb.emit(relax.op.matmul(x, relax.const(w)))
        y = bb.emit(relax.op.add(y, relax.const(b)))
        return relax.op.nn.relu(y)

    after, layers = _run(_module((4, 64), dense))
    (layer,) = layers
    assert layer["format"] == "bsr16x1" and layer["activation"] == "relu" and layer["bias"]
    spec = F.KernelSpec("matmul", 4, 64, 32, "bsr16x1", R=16, nnz=F.to_bsr(w, 16).nnzb, has_bias=True,
                        activation="relu")
    expected = _module((4, 64), lambda bb, x: _sparse_call(bb, spec, F.to_bsr(w, 16).arrays(), b, x, (4, 32),
                                                           layer["kernel"]))
    tvm.ir.assert_structural_equal(after, expected)


def test_gemm_transb_3d_input_is_reshaped_to_rows():
    rng = np.random.default_rng(1)
    w = _bsr_weight(48, 32, rng)                              # [K, N]; the graph holds W^T and a permute_dims

    def dense(bb, x):
        return relax.op.matmul(x, relax.op.permute_dims(relax.const(np.ascontiguousarray(w.T))))

    after, layers = _run(_module((2, 3, 48), dense))
    (layer,) = layers
    assert layer["op"] == "Gemm" and not layer["bias"]
    spec = F.KernelSpec("matmul", 6, 48, 32, "bsr16x1", R=16, nnz=F.to_bsr(w, 16).nnzb)

    def sparse(bb, x):
        x2 = bb.emit(relax.op.reshape(x, (6, 48)))
        return _sparse_call(bb, spec, F.to_bsr(w, 16).arrays(), np.zeros(32, np.float32), x2, (2, 3, 32),
                            layer["kernel"])

    tvm.ir.assert_structural_equal(after, _module((2, 3, 48), sparse))


def test_conv1x1_bias_runs_as_channels_last_matmul_over_pixels():
    """The CPU family runs convs in NHWC, so a pruned 1x1 conv becomes the matmul kernel over its B*H*W pixels
    between two transposes (which fuse into the channels-last neighbours), not an NCHW conv kernel."""
    assert FAMILY.conv_layout == "NHWC"
    rng = np.random.default_rng(2)
    w = _bsr_weight(32, 64, rng)                              # [Cin, Cout]
    b = rng.standard_normal(64).astype(np.float32)
    w4 = np.ascontiguousarray(w.T).reshape(64, 32, 1, 1)

    def dense(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(w4)))
        return relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1)))

    after, layers = _run(_module((1, 32, 5, 5), dense))
    (layer,) = layers
    assert layer["kind"] == "conv1x1" and layer["bias"] and layer["M"] == 25
    spec = F.KernelSpec("matmul", 25, 32, 64, "bsr16x1", R=16, nnz=F.to_bsr(w, 16).nnzb, has_bias=True)

    def sparse(bb, x):
        xt = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        x2 = bb.emit(relax.op.reshape(xt, (25, 32)))
        y = bb.emit(_sparse_call(bb, spec, F.to_bsr(w, 16).arrays(), b, x2, (1, 5, 5, 64), layer["kernel"]))
        return relax.op.permute_dims(y, [0, 3, 1, 2])

    tvm.ir.assert_structural_equal(after, _module((1, 32, 5, 5), sparse))


@pytest.mark.parametrize("mode", ["off", "2:4", "auto"])
def test_layers_that_do_not_qualify_are_left_alone(mode):
    """A dense weight (no zeros: not 2:4, never cheaper sparse) and mode off leave the module unchanged."""
    w = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    before = _module((4, 64), lambda bb, x: relax.op.matmul(x, relax.const(w)))
    after, layers = _run(before, mode)
    tvm.ir.assert_structural_equal(after, before)
    assert all(layer["format"] == "dense" for layer in layers) and (mode == "off") == (not layers)
