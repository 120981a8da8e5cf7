"""pack: float32 initializers -> float16 (transfer size); unpack: back to float32 (exact cast of the fp16 values)."""
import sys
import numpy as np, onnx
from onnx import numpy_helper
mode, src, dst = sys.argv[1:4]
m = onnx.load(src)
for i, t in enumerate(m.graph.initializer):
    a = numpy_helper.to_array(t)
    if mode == "pack" and a.dtype == np.float32 and a.size > 64:
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a.astype(np.float16), t.name))
    elif mode == "unpack" and a.dtype == np.float16:
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
onnx.save(m, dst)
