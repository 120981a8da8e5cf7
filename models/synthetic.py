"""Tiny synthetic ONNX models for tests and demos, built in code with seeded random float32 weights.

- :func:`mlp`: MatMul+Add+Relu stack (the shape of transformer FFNs).
- :func:`cnn`: 3x3 conv, depthwise 3x3, 1x1 convs, BatchNorm folded as Conv bias, pooling, Gemm head.
- :func:`transformer_block`: one encoder block: self-attention (4 heads), LayerNorm, GELU FFN, residuals.
- :func:`mbconv`: one MobileNetV2 inverted residual (ReLU6) or EfficientNet MBConv block (swish, squeeze-excitation):
  1x1 expand, 3x3 depthwise, 1x1 project, residual. ``mbv2_112`` / ``mbv2_56`` / ``effnet_112`` / ``effnet_56`` are
  the benchmark shapes (expansion 6, at 112x112 and 56x56 as in the networks' early stages).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["mlp", "cnn", "transformer_block", "mbconv", "mbv2_112", "mbv2_56", "effnet_112", "effnet_56", "save",
           "OPSET"]

OPSET = 17


def _w(rng, *shape, scale=None):
    fan_in = int(np.prod(shape[:-1])) if len(shape) == 2 else int(np.prod(shape[1:]))
    scale = scale if scale is not None else 1.0 / np.sqrt(max(1, fan_in))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits, name):
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-sparse")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(batch: int = 1, seq: int = 128, d_in: int = 384, hidden: int = 1536, d_out: int = 384, layers: int = 1,
        seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, d_in] -> (MatMul+Add+Relu -> MatMul+Add) x layers -> y[batch, seq, d_out]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    cur, width = "x", d_in
    for i in range(layers):
        last = d_out if i == layers - 1 else d_in
        inits[f"fc{i}_1.weight"] = _w(rng, width, hidden)
        inits[f"fc{i}_1.bias"] = _w(rng, hidden, scale=0.1)
        inits[f"fc{i}_2.weight"] = _w(rng, hidden, last)
        inits[f"fc{i}_2.bias"] = _w(rng, last, scale=0.1)
        nodes += [
            helper.make_node("MatMul", [cur, f"fc{i}_1.weight"], [f"h{i}_mm"], name=f"fc{i}_1/MatMul"),
            helper.make_node("Add", [f"h{i}_mm", f"fc{i}_1.bias"], [f"h{i}_b"], name=f"fc{i}_1/Add"),
            helper.make_node("Relu", [f"h{i}_b"], [f"h{i}"], name=f"relu{i}"),
            helper.make_node("MatMul", [f"h{i}", f"fc{i}_2.weight"], [f"o{i}_mm"], name=f"fc{i}_2/MatMul"),
            helper.make_node("Add", [f"o{i}_mm", f"fc{i}_2.bias"], ["y" if i == layers - 1 else f"o{i}"],
                             name=f"fc{i}_2/Add"),
        ]
        cur, width = f"o{i}", last
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, d_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, d_out])
    return _model(nodes, [x], [y], inits, "mlp")


def cnn(batch: int = 1, channels: int = 3, size: int = 32, width: int = 32, classes: int = 10,
        seed: int = 0) -> onnx.ModelProto:
    """A MobileNet-like CNN: 3x3 stride-2 stem, depthwise 3x3 + pointwise 1x1 blocks, pooling, Gemm classifier."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}

    def conv(name, inp, cin, cout, k, stride=1, group=1, act="Relu"):
        inits[f"{name}.weight"] = _w(rng, cout, cin // group, k, k)
        inits[f"{name}.bias"] = _w(rng, cout, scale=0.1)
        nodes.append(helper.make_node("Conv", [inp, f"{name}.weight", f"{name}.bias"], [f"{name}_c"], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group))
        if act is None:
            return f"{name}_c"
        nodes.append(helper.make_node(act, [f"{name}_c"], [f"{name}_a"], name=f"{name}/{act}"))
        return f"{name}_a"

    h = conv("stem", "x", channels, width, 3, stride=2)
    h = conv("block1.dw", h, width, width, 3, group=width)
    h = conv("block1.pw", h, width, 2 * width, 1)
    h = conv("block2.dw", h, 2 * width, 2 * width, 3, stride=2, group=2 * width)
    p = conv("block2.pw", h, 2 * width, 2 * width, 1, act=None)
    # residual around a 1x1 pair
    q = conv("block3.pw1", p, 2 * width, 4 * width, 1)
    q = conv("block3.pw2", q, 4 * width, 2 * width, 1, act=None)
    nodes.append(helper.make_node("Add", [p, q], ["res"], name="block3/Add"))
    nodes.append(helper.make_node("Relu", ["res"], ["res_a"], name="block3/Relu"))
    nodes.append(helper.make_node("MaxPool", ["res_a"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("GlobalAveragePool", ["mp"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    inits["head.weight"] = _w(rng, classes, 2 * width, scale=1.0 / np.sqrt(2 * width))
    inits["head.bias"] = _w(rng, classes, scale=0.1)
    nodes.append(helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["logits"], name="head", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, classes])
    return _model(nodes, [x], [y], inits, "cnn")


def transformer_block(batch: int = 1, seq: int = 64, d_model: int = 128, heads: int = 4, ffn: int = 512,
                      seed: int = 0) -> onnx.ModelProto:
    """A post-LN encoder block: QKV projections, scaled dot-product attention, LayerNorm, GELU FFN."""
    assert d_model % heads == 0
    rng = np.random.default_rng(seed)
    dh = d_model // heads
    nodes, inits = [], {}

    def linear(name, inp, din, dout):
        inits[f"{name}.weight"] = _w(rng, din, dout)
        inits[f"{name}.bias"] = _w(rng, dout, scale=0.05)
        nodes.append(helper.make_node("MatMul", [inp, f"{name}.weight"], [f"{name}_mm"], name=f"{name}/MatMul"))
        nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}.bias"], [f"{name}_out"], name=f"{name}/Add"))
        return f"{name}_out"

    inits["split_shape"] = np.array([batch, seq, heads, dh], dtype=np.int64)
    inits["merge_shape"] = np.array([batch, seq, d_model], dtype=np.int64)
    inits["scale"] = np.array(1.0 / np.sqrt(dh), dtype=np.float32)

    def heads_of(name, t, perm):
        nodes.append(helper.make_node("Reshape", [t, "split_shape"], [f"{name}_r"], name=f"{name}/Reshape"))
        nodes.append(helper.make_node("Transpose", [f"{name}_r"], [f"{name}_t"], name=f"{name}/Transpose", perm=perm))
        return f"{name}_t"

    q = heads_of("q", linear("attn.q", "x", d_model, d_model), [0, 2, 1, 3])
    k = heads_of("k", linear("attn.k", "x", d_model, d_model), [0, 2, 3, 1])
    v = heads_of("v", linear("attn.v", "x", d_model, d_model), [0, 2, 1, 3])
    nodes += [
        helper.make_node("MatMul", [q, k], ["scores"], name="attn/QK"),
        helper.make_node("Mul", ["scores", "scale"], ["scores_s"], name="attn/Scale"),
        helper.make_node("Softmax", ["scores_s"], ["probs"], name="attn/Softmax", axis=-1),
        helper.make_node("MatMul", ["probs", v], ["ctx"], name="attn/PV"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="attn/Merge/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx_m"], name="attn/Merge/Reshape"),
    ]
    o = linear("attn.out", "ctx_m", d_model, d_model)

    def layernorm(name, inp):
        inits[f"{name}.weight"] = (1.0 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)
        inits[f"{name}.bias"] = (0.1 * rng.standard_normal(d_model)).astype(np.float32)
        nodes.append(helper.make_node("LayerNormalization", [inp, f"{name}.weight", f"{name}.bias"], [f"{name}_out"],
                                      name=name, axis=-1, epsilon=1e-5))
        return f"{name}_out"

    nodes.append(helper.make_node("Add", ["x", o], ["res1"], name="res1"))
    h = layernorm("ln1", "res1")
    f = linear("ffn.fc1", h, d_model, ffn)
    # GELU (erf form), as exporters emit it before opset 20
    inits["sqrt2"] = np.array(np.sqrt(2.0), dtype=np.float32)
    inits["one"] = np.array(1.0, dtype=np.float32)
    inits["half"] = np.array(0.5, dtype=np.float32)
    nodes += [
        helper.make_node("Div", [f, "sqrt2"], ["g_div"], name="gelu/Div"),
        helper.make_node("Erf", ["g_div"], ["g_erf"], name="gelu/Erf"),
        helper.make_node("Add", ["g_erf", "one"], ["g_add"], name="gelu/Add"),
        helper.make_node("Mul", [f, "g_add"], ["g_mul"], name="gelu/Mul"),
        helper.make_node("Mul", ["g_mul", "half"], ["gelu"], name="gelu/Half"),
    ]
    f2 = linear("ffn.fc2", "gelu", ffn, d_model)
    nodes.append(helper.make_node("Add", [h, f2], ["res2"], name="res2"))
    out = layernorm("ln2", "res2")
    nodes.append(helper.make_node("Identity", [out], ["y"], name="output"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, d_model])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, d_model])
    return _model(nodes, [x], [y], inits, "transformer_block")


def mbconv(size: int = 56, cin: int = 24, expand: int = 6, cout: int = 24, kind: str = "mbv2", stride: int = 1,
           se_ratio: float = 0.25, seed: int = 0) -> onnx.ModelProto:
    """x[1, cin, size, size] -> 1x1 expand + act -> 3x3 depthwise (stride) + act [-> SE] -> 1x1 project [+ x].

    ``kind="mbv2"``: ReLU6 (Clip 0..6), no SE. ``kind="effnet"``: swish ``x * sigmoid(x)`` and squeeze-excitation
    (global average pool, 1x1 reduce + swish, 1x1 expand + sigmoid, channel scale), as exporters emit them.
    Batch norms are folded into conv biases (what inference exports contain)."""
    if kind not in ("mbv2", "effnet"):
        raise ValueError(f"kind must be 'mbv2' or 'effnet', got {kind!r}")
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    mid = cin * expand
    inits["relu6_min"] = np.array(0.0, np.float32)
    inits["relu6_max"] = np.array(6.0, np.float32)

    def act(name, inp):
        if kind == "mbv2":
            nodes.append(helper.make_node("Clip", [inp, "relu6_min", "relu6_max"], [f"{name}_a"], name=f"{name}/Relu6"))
        else:
            nodes.append(helper.make_node("Sigmoid", [inp], [f"{name}_s"], name=f"{name}/Sigmoid"))
            nodes.append(helper.make_node("Mul", [inp, f"{name}_s"], [f"{name}_a"], name=f"{name}/Swish"))
        return f"{name}_a"

    def conv(name, inp, ci, co, k, stride=1, group=1):
        inits[f"{name}.weight"] = _w(rng, co, ci // group, k, k)
        inits[f"{name}.bias"] = _w(rng, co, scale=0.1)
        nodes.append(helper.make_node("Conv", [inp, f"{name}.weight", f"{name}.bias"], [f"{name}_c"], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group))
        return f"{name}_c"

    h = act("expand", conv("expand", "x", cin, mid, 1))
    h = act("dw", conv("dw", h, mid, mid, 3, stride=stride, group=mid))
    if kind == "effnet":
        red = max(1, int(cin * se_ratio))
        nodes.append(helper.make_node("GlobalAveragePool", [h], ["se_pool"], name="se/Pool"))
        r = act("se_reduce", conv("se_reduce", "se_pool", mid, red, 1))
        e = conv("se_expand", r, red, mid, 1)
        nodes.append(helper.make_node("Sigmoid", [e], ["se_gate"], name="se/Sigmoid"))
        nodes.append(helper.make_node("Mul", [h, "se_gate"], ["se_out"], name="se/Scale"))
        h = "se_out"
    out = conv("project", h, mid, cout, 1)
    out_size = (size + stride - 1) // stride
    if stride == 1 and cin == cout:
        nodes.append(helper.make_node("Add", [out, "x"], ["y"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", [out], ["y"], name="output"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, out_size, out_size])
    return _model(nodes, [x], [y], inits, f"{kind}_block")


def mbv2_112() -> onnx.ModelProto:
    """MobileNetV2's first expanding block: 16 -> 96 -> 24 channels at 112x112, depthwise stride 2."""
    return mbconv(size=112, cin=16, expand=6, cout=24, kind="mbv2", stride=2)


def mbv2_56() -> onnx.ModelProto:
    """MobileNetV2's repeated 56x56 block: 24 -> 144 -> 24 channels with a residual."""
    return mbconv(size=56, cin=24, expand=6, cout=24, kind="mbv2")


def effnet_112() -> onnx.ModelProto:
    """EfficientNet-B0's first expanding MBConv: 16 -> 96 -> 24 at 112x112, stride 2, swish, SE."""
    return mbconv(size=112, cin=16, expand=6, cout=24, kind="effnet", stride=2)


def effnet_56() -> onnx.ModelProto:
    """EfficientNet-B0's repeated 56x56 MBConv: 24 -> 144 -> 24, swish, SE, residual."""
    return mbconv(size=56, cin=24, expand=6, cout=24, kind="effnet")


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)
