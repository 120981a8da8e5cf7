"""The README's main command: `edge-sparse demo` prunes, compiles (host + rpi4), checks and benchmarks."""
from __future__ import annotations

import json

from conftest import invoke


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = invoke(["demo", "-o", out, "--threads", "1", "-q"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    # the sparse host artifact computes what onnxruntime computes on the same pruned model
    for name in ("host-dense", "host-sparse"):
        assert s["runs"][name]["max_abs_diff_vs_onnxruntime"] < 1e-3
        assert s["runs"][name]["threads"] == 1
    assert s["layers"] and all(layer["format"] != "dense" for layer in s["layers"])   # every layer pruned + sparse
    # compressed weights make the sparse artifact smaller than the dense one
    assert s["artifact_bytes"]["host-sparse"] < 0.6 * s["artifact_bytes"]["host-dense"]
    head = (out / "rpi4-sparse" / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183
    assert "speedup" in r.output and "host-sparse" in r.output
    r = invoke(["demo", "-o", out, "-q"])
    assert r.exit_code == 2 and "--force" in r.output
