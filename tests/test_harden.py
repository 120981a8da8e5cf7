"""Issue 13: hardening. One regression test per item; bad inputs checked against the contract in tests/contract.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run
from contract import assert_bad_input, snapshot
from edge_sparse import compiler, runtime
from edge_sparse.errors import UserError
from edge_sparse.util import sha256_file


def _compile(src, out, **kw):
    kw.setdefault("sparse", "off")
    return compiler.compile(src, kw.pop("target", "host"), out, quiet=True, **kw)


def _gather_model(path: Path, rows: int = 100, dim: int = 16, seq: int = 8) -> np.ndarray:
    table = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])],
                          [numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return table


@pytest.fixture(scope="module")
def gather_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("gather")
    table = _gather_model(d / "g.onnx")
    _compile(d / "g.onnx", d / "art")
    return d, table


# ------------------------------------------------------------------------------------ 2: out-of-range indices
def test_gather_records_index_range_and_matches_ort(gather_artifact):
    d, table = gather_artifact
    man = json.loads((d / "art" / "manifest.json").read_text())
    assert man["inputs"][0]["range"] == [-100, 99]
    ids = np.array([[0, 5, 99, -1, -100, 42, 7, 3]], np.int64)
    got = runtime.load(d / "art").run({"ids": ids})["y"]
    np.testing.assert_array_equal(got, ort_run(d / "g.onnx", {"ids": ids})[0])


@pytest.mark.parametrize("bad", [-5000, 100, -101, 10**9])
def test_gather_out_of_range_ids_one_line(gather_artifact, tmp_path, bad):
    d, _ = gather_artifact
    ids = np.zeros((1, 8), np.int64)
    ids[0, 3] = bad
    np.savez(tmp_path / "ids.npz", ids=ids)
    assert_bad_input(["run", d / "art", "-i", tmp_path / "ids.npz", "-o", tmp_path / "out.npz"],
                     f"holds {bad}", "[-100, 99]", inputs=[tmp_path / "ids.npz", d / "art"],
                     outputs=[tmp_path / "out.npz"], in_process=False)


def test_generated_gather_cannot_read_out_of_bounds(gather_artifact):
    """Bypassing the runtime's range check, the compiled code itself clips: ids 10**9 used to segfault."""
    d, table = gather_artifact
    code = f"""
import numpy as np, tvm
from edge_sparse import runtime
m = runtime.load({str(d / 'art')!r})
ids = np.array([[10**9, -5000, 0, 99, 100, -101, 2**62, -2**62]], np.int64)
y = m.outputs_to_numpy(m._main(tvm.runtime.tensor(ids, m.device)))["y"]
np.save({str(d / 'clip.npy')!r}, y)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    y = np.load(d / "clip.npy")
    # negative ids are first shifted by the row count (ONNX semantics), then clipped to [0, 99]
    want = table[np.array([99, 0, 0, 99, 99, 0, 99, 0])][None]
    np.testing.assert_array_equal(y, want)


def test_no_fast_take_after_import(tmp_path):
    from edge_sparse.intake import load_model

    _gather_model(tmp_path / "g.onnx")
    mod = compiler.import_relax(load_model(tmp_path / "g.onnx"))
    text = mod.script()
    assert 'mode="clip"' in text and 'mode="fast"' not in text


@pytest.fixture(scope="module")
def cnn_artifact(synthetic_models, tmp_path_factory):
    art = tmp_path_factory.mktemp("cnn") / "art"
    _compile(synthetic_models["cnn"], art)
    return art


def _copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------ 3: zip-slip, pinned wheels
def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_cache_wheel_trusted_by_name_is_refused(tmp_path, monkeypatch):
    from edge_sparse import bundle

    monkeypatch.setenv("EDGE_SPARSE_CACHE", str(tmp_path / "cache"))
    (tvm_v, ffi_v) = ("0.27.0.post1", "0.1.14.post1")
    wheels = tmp_path / "cache" / "wheels"
    _fake_wheel(wheels / f"apache_tvm-{tvm_v}-py3-none-manylinux_2_28_aarch64.whl",
                {"tvm/lib/libtvm_runtime.so": b"evil"})
    _fake_wheel(wheels / f"apache_tvm_ffi-{ffi_v}-cp311-cp311-manylinux_2_28_aarch64.whl",
                {"tvm_ffi/lib/libtvm_ffi.so": b"evil", "tvm_ffi/include/tvm/ffi/x.h": b"//"})
    with pytest.raises(UserError, match="is not PyPI's apache-tvm==0.27.0.post1 wheel"):
        bundle.runtime_files(tvm_v, ffi_v, quiet=True)
    assert not (tmp_path / "cache" / "aarch64-runtime").exists()


@pytest.mark.parametrize("member", ["tvm_ffi/include/tvm/../../../../escaped.h", "tvm_ffi/include/tvm/a/../../../x.h",
                                    "tvm_ffi/include/tvm/a\\..\\..\\x.h"])
def test_wheel_member_outside_extraction_dir_is_refused(tmp_path, monkeypatch, member):
    """A wheel whose hash is trusted (pinned here to the crafted file) still cannot write outside the directory."""
    from edge_sparse import bundle

    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGE_SPARSE_CACHE", str(cache))
    tvm_v, ffi_v = "0.27.0.post1", "0.1.14.post1"
    w1 = _fake_wheel(cache / "wheels" / f"apache_tvm-{tvm_v}-py3-none-manylinux_2_28_aarch64.whl",
                     {"tvm/lib/libtvm_runtime.so": b"rt"})
    w2 = _fake_wheel(cache / "wheels" / f"apache_tvm_ffi-{ffi_v}-cp311-cp311-manylinux_2_28_aarch64.whl",
                     {"tvm_ffi/lib/libtvm_ffi.so": b"ffi", "tvm_ffi/include/tvm/ffi/ok.h": b"//", member: b"pwned"})
    monkeypatch.setattr(bundle, "WHEEL_SHA256", {("apache-tvm", tvm_v): sha256_file(w1),
                                                 ("apache-tvm-ffi", ffi_v): sha256_file(w2)})
    with pytest.raises(UserError, match="outside the extraction directory"):
        bundle.runtime_files(tvm_v, ffi_v, quiet=True)
    written = [p for p in tmp_path.rglob("*") if p.name in ("escaped.h", "x.h") or "pwned" in p.name]
    assert written == []
    assert not (cache / "aarch64-runtime").exists() or not any((cache / "aarch64-runtime").iterdir())


# ------------------------------------------------------------------------------------ 4: library inside, verified
@pytest.mark.parametrize("library", ["../outside.so", "/tmp/outside.so", "sub/../../outside.so", "notlisted.so"])
def test_manifest_library_outside_artifact_is_refused(cnn_artifact, tmp_path, library):
    art = _copy_artifact(cnn_artifact, tmp_path / "art")
    (tmp_path / "outside.so").write_bytes((art / "model.so").read_bytes())
    (art / "notlisted.so").write_bytes((art / "model.so").read_bytes())
    m = json.loads((art / "manifest.json").read_text())
    m["library"] = library
    if library != "notlisted.so":
        m["files"][library] = m["files"]["model.so"]       # a hash "vouching" for a file outside
    (art / "manifest.json").write_text(json.dumps(m))
    assert_bad_input(["run", art], "manifest.json is malformed", inputs=[art, tmp_path / "outside.so"])


def test_bench_rpc_refuses_tampered_library_before_upload(cnn_artifact, tmp_path):
    art = _copy_artifact(cnn_artifact, tmp_path / "art")
    data = bytearray((art / "model.so").read_bytes())
    data[len(data) // 3] ^= 0x55
    (art / "model.so").write_bytes(bytes(data))
    # nothing listens there: the hash check must come first (no connection attempted, no upload)
    assert_bad_input(["bench", art, "--rpc", "127.0.0.1:9", "--json", tmp_path / "b.json"], "model.so", "sha256",
                     inputs=[art], outputs=[tmp_path / "b.json"])


# ------------------------------------------------------------------------------------ 10: malformed manifests
def _del(key):
    return lambda m: m.pop(key)


_MANIFEST_BREAKS = {
    "no-target": _del("target"),
    "no-tvm": _del("tvm"),
    "target-string": lambda m: m.update(target="host"),
    "target-no-family": lambda m: m["target"].pop("family"),
    "inputs-dict": lambda m: m.update(inputs={"x": [1]}),
    "input-no-name": lambda m: m["inputs"][0].pop("name"),
    "input-shape-strings": lambda m: m["inputs"][0].update(shape=["1", "a"]),
    "input-shape-huge": lambda m: m["inputs"][0].update(shape=[99999999999999999999, 1]),
    "input-shape-negative": lambda m: m["inputs"][0].update(shape=[-1, 3, 32, 32]),
    "input-dtype": lambda m: m["inputs"][0].update(dtype="complex128"),
    "output-not-object": lambda m: m.update(outputs=[1]),
    "files-list": lambda m: m.update(files=["model.so"]),
    "file-no-sha": lambda m: m["files"]["model.so"].pop("sha256"),
    "file-bytes-string": lambda m: m["files"]["model.so"].update(bytes="12"),
    "library-int": lambda m: m.update(library=3),
    "range-reversed": lambda m: m["inputs"][0].update(range=[5, 1]),
}


@pytest.mark.parametrize("cmd", ["run", "bench"])
def test_manifest_inputs_not_matching_the_library_one_line(cnn_artifact, tmp_path, cmd):
    """An empty input list is valid (a graph without inputs, e.g. ONNX's test_constant), so a manifest edited to list
    none is caught where the library is called: one line, not the VM's arity check with a traceback."""
    art = _copy_artifact(cnn_artifact, tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    m["inputs"] = []
    (art / "manifest.json").write_text(json.dumps(m))
    args = [cmd, art] + (["--repeat", "1", "--warmup", "0"] if cmd == "bench" else [])
    assert_bad_input(args, "does not belong to this library", inputs=[art])


@pytest.mark.parametrize("cmd", ["run", "inspect", "bench"])
@pytest.mark.parametrize("brk", sorted(_MANIFEST_BREAKS))
def test_malformed_manifest_one_line(cnn_artifact, tmp_path, brk, cmd):
    art = _copy_artifact(cnn_artifact, tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    _MANIFEST_BREAKS[brk](m)
    (art / "manifest.json").write_text(json.dumps(m))
    args = [cmd, art] + (["--repeat", "1", "--warmup", "0"] if cmd == "bench" else [])
    assert_bad_input(args, "manifest.json", inputs=[art])


# ------------------------------------------------------------------------------------ 7: numeric options bounded
@pytest.mark.parametrize("opts,msg", [
    (["--min-seconds", "nan"], "--min-seconds must be a finite number"),
    (["--min-seconds", "inf"], "--min-seconds must be a finite number"),
    (["--min-seconds", "-1"], "--min-seconds must be in"),
    (["--min-seconds", "1e9"], "--min-seconds must be in"),
    (["--threads", "100000"], "--threads must be between 1 and"),
    (["--threads", "5000"], "--threads must be between 1 and"),
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--repeat", "0"], "--repeat must be in"),
    (["--repeat", "99999999999"], "--repeat must be in"),
    (["--warmup", "-1"], "--warmup must be in"),
    (["--warmup", "10000000"], "--warmup must be in"),
])
def test_bench_numeric_options_bounded(cnn_artifact, tmp_path, opts, msg):
    assert_bad_input(["bench", cnn_artifact, *opts, "--json", tmp_path / "b.json"], msg, inputs=[cnn_artifact],
                     outputs=[tmp_path / "b.json"], timeout=60)


@pytest.mark.parametrize("cmd", ["run", "compile"])
def test_threads_bounded_for_run_and_compile(cnn_artifact, synthetic_models, tmp_path, cmd):
    args = ["run", cnn_artifact] if cmd == "run" else ["compile", synthetic_models["cnn"], "-o", tmp_path / "o"]
    assert_bad_input(args + ["--threads", "100000"], "--threads must be between 1 and",
                     inputs=[cnn_artifact, synthetic_models["cnn"]], outputs=[tmp_path / "o"])


# ------------------------------------------------------------------------------------ 11: click usage errors
@pytest.mark.parametrize("case", ["dir-as-model", "unknown-option", "threads-not-int", "missing-argument",
                                  "bad-choice", "unknown-command"])
def test_usage_errors_are_one_line_with_hint(synthetic_models, tmp_path, case):
    args = {
        "dir-as-model": ["compile", tmp_path, "-o", tmp_path / "o"],
        "unknown-option": ["compile", synthetic_models["mlp"], "-o", tmp_path / "o", "--bogus"],
        "threads-not-int": ["run", tmp_path, "--threads", "many"],
        "missing-argument": ["compile", "-o", tmp_path / "o"],
        "bad-choice": ["run", tmp_path, "--fill", "ones"],
        "unknown-command": ["compiel", synthetic_models["mlp"]],
    }[case]
    r = assert_bad_input(args, "--help", inputs=[synthetic_models["mlp"]], outputs=[tmp_path / "o"])
    assert "Usage:" not in r.stderr + r.stdout


def test_usage_error_from_console_script(tmp_path):
    r = assert_bad_input(["bench", tmp_path, "--repeat", "x"], "'--repeat'", "edge-sparse bench --help",
                         in_process=False)
    assert "Usage:" not in r.stderr


# ------------------------------------------------------------------------------------ 14: interrupts
@pytest.mark.parametrize("sig,delay", [("SIGINT", 3.0), ("SIGTERM", 3.0), ("SIGINT", 1.5), ("SIGTERM", 0.3)])
def test_interrupted_compile_is_one_line_and_leaves_nothing(tmp_path, sig, delay):
    """0.3 s: while the command line imports click and numpy (before any handler of the command is in place);
    1.5 s: during the imports of the compile (or, on a loaded machine, still the first ones); 3 s: inside TVM (this
    model takes 6-9 s to compile on 2 idle cores)."""
    import signal
    import time

    from contract import cli_command

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "out"
    from edge_sparse.models import synthetic

    (tmp_path / "model").mkdir()
    src = Path(synthetic.save(synthetic.mbv2_112(), tmp_path / "model" / "mbv2.onnx"))
    before = snapshot(src)
    p = subprocess.Popen(cli_command() + ["compile", str(src), "-o", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmpdir)})
    time.sleep(delay)
    assert p.poll() is None, "compile finished before the signal; use a bigger model"
    p.send_signal(getattr(signal, sig))
    t0 = time.monotonic()
    _, err = p.communicate(timeout=120)
    assert time.monotonic() - t0 < 30, "the interrupt was not acted on promptly"
    assert p.returncode == 130, (p.returncode, err)
    assert err.splitlines() == ["error: interrupted; nothing was written (partial outputs were removed)"], err
    assert sorted(os.listdir(tmp_path)) == ["model", "tmp"] and os.listdir(tmp_path / "model") == ["mbv2.onnx"]
    assert [n for n in os.listdir(tmpdir) if n != ".ses"] == []
    assert snapshot(src) == before


# ------------------------------------------------------------------------------------ 10: one line for bad inputs
def _bad_npz(tmp_path: Path, kind: str, arrays: dict) -> Path:
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    f = tmp_path / f"{kind}.npz"
    data = good.read_bytes()
    f.write_bytes({"empty": b"", "corrupt": os.urandom(300), "truncated": data[: len(data) // 2],
                   "pickle": b"\x80\x04\x95" + os.urandom(64), "npy-as-npz": data[:0]}[kind] if kind != "npy-as-npz"
                  else (np.save(tmp_path / "one.npy", np.zeros(3)), (tmp_path / "one.npy").read_bytes())[1])
    return f


_NPZ_KINDS = ["empty", "corrupt", "truncated", "pickle", "npy-as-npz"]


@pytest.mark.parametrize("kind", _NPZ_KINDS)
@pytest.mark.parametrize("cmd", ["run", "bench", "prune", "analyze"])
def test_bad_npz_one_line(cnn_artifact, synthetic_models, tmp_path, kind, cmd):
    src = synthetic_models["mlp"]
    f = _bad_npz(tmp_path, kind, {"x": np.zeros((2, 32, 128), np.float32)})
    out = tmp_path / "out"
    args = {
        "run": ["run", cnn_artifact, "-i", f, "-o", out],
        "bench": ["bench", cnn_artifact, "-i", f, "--json", out],
        "prune": ["prune", src, "-o", out, "-s", "0.5", "--calib", f],
        "analyze": ["analyze", src, "--calib", f, "-o", out],
    }[cmd]
    assert_bad_input(args, str(f), inputs=[f, src, cnn_artifact], outputs=[out])


@pytest.mark.parametrize("args,msg", [
    (["compile", "{mlp}", "-o", "{out}", "--input-shape", "x=99999999999999999999,32,128"], "too large"),
    (["compile", "{mlp}", "-o", "{out}", "--input-shape", "x=99999x99999x99999"], "too large"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "-p", "99999999999999999999x1"], "block rows must be at most"),
    (["prune", "{mlp}", "-o", "{out}", "-p", "2:99999999999999999999"], "N:M needs"),
    (["analyze", "{mlp}", "-p", "99999999999999999999x1"], "block rows must be at most"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "--batch", "-1", "--calib-random", "4"], "--batch must be in"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "--batch", "0", "--calib-random", "4"], "--batch must be in"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "--calib-random", "100000000000"], "--calib-random must be"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "--calib-random", "1e11"], "'--calib-random'"),
    (["analyze", "{mlp}", "--calib-random", "100000000000"], "--calib-random must be"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "--calib-random", "4", "--seed", "-5"], "--seed must be in"),
    (["run", "{art}", "--seed", "-1"], "--seed must be in"),
    (["bench", "{art}", "--seed", "-1", "--repeat", "1"], "--seed must be in"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "nan"], "sparsity must be in"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "--holdout", "nan"], "--holdout"),
    (["analyze", "{mlp}", "--levels", "0.5,inf"], "--levels"),
    (["prune", "{mlp}", "-o", "{out}", "-s", "0.5", "--recipe", "{recipe}"], "[[layer]] #1"),
    (["compile", "{mlp}", "-o", "{out}", "--target-file", "{cores}"], "[device] cores must be an integer"),
    (["targets", "--target-file", "{cores}"], "[device] cores must be an integer"),
    (["compile", "{mlp}", "-o", "{out}", "--target-file", "{name}"], "'name' must be a string"),
    (["compile", "{mlp}", "-o", "{out}", "--target-file", "{linkcxx}"], "[link] cxx must be a string"),
])
def test_bad_values_one_line(cnn_artifact, synthetic_models, tmp_path, args, msg):
    files = {"recipe": "layer = [1, 2]\n",
             "cores": 'name = "odd"\nfamily = "cpu"\narch = "x86_64"\n[target]\nkind = "llvm"\n[device]\ncores = "many"\n',
             "name": 'name = 5\nfamily = "cpu"\narch = "x86_64"\n[target]\nkind = "llvm"\n',
             "linkcxx": 'name = "a"\nfamily = "cpu"\narch = "aarch64"\n[target]\nkind = "llvm"\n[link]\nkind = "cross"\ncxx = 3\n'}
    paths = {}
    for k, text in files.items():
        paths[k] = tmp_path / f"{k}.toml"
        paths[k].write_text(text)
    subst = {"mlp": synthetic_models["mlp"], "out": tmp_path / "out", "art": cnn_artifact, **paths}
    full = [str(a).format(**{k: str(v) for k, v in subst.items()}) for a in args]
    assert_bad_input(full, msg, inputs=[synthetic_models["mlp"], cnn_artifact, *paths.values()],
                     outputs=[tmp_path / "out"])


# ------------------------------------------------------------------------------------ 1: --force never deletes inputs
@pytest.mark.parametrize("cmd", ["compile", "tune"])
@pytest.mark.parametrize("layout", ["output-holds-input", "output-is-parent-of-input", "output-inside-input-dir"])
def test_force_never_deletes_a_directory_holding_inputs(synthetic_models, tmp_path, cmd, layout):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    model = work / "m.onnx"
    shutil.copy(synthetic_models["mlp"], model)
    (work / "notes.txt").write_text("x\n")
    out = {"output-holds-input": work, "output-is-parent-of-input": tmp_path,
           "output-inside-input-dir": model / "sub"}[layout]
    if layout == "output-inside-input-dir":       # a model path used as a directory: refused as "inside the input"
        out = work / "m.onnx" / "art"
    args = [cmd, model, "-o", out, "--force"] + (["--trials", "1"] if cmd == "tune" else ["--sparse", "off"])
    assert_bad_input(args, "the input", inputs=[work], outputs=[out] if out != tmp_path else [])
    assert (work / "notes.txt").read_text() == "x\n"


def test_force_replaces_only_own_outputs(synthetic_models, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"\xff\xd8")
    assert_bad_input(["compile", synthetic_models["mlp"], "-o", other, "--force", "--sparse", "off"],
                     "did not write", inputs=[other, synthetic_models["mlp"]], outputs=[other])


# ------------------------------------------------------------------------------------ 5: concurrent compiles
def test_concurrent_compiles_to_one_output_one_wins(synthetic_models, tmp_path):
    """Two compiles to the same new output without --force: exactly one succeeds; the loser says so, and the
    winner's artifact is intact (the no-replace rename is atomic)."""
    from contract import cli_command

    out = tmp_path / "out"
    procs = [subprocess.Popen(cli_command() + ["compile", str(synthetic_models["mlp"]), "-o", str(out), "-q",
                                               "--sparse", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert len(loser.splitlines()) == 1 and loser.startswith("error: "), loser
    assert "another process" in loser or "already exists" in loser, loser
    runtime.load(out)                                 # hashes verified: one complete artifact, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_no_replace_loses_race_cleanly(tmp_path):
    from edge_sparse.util import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with atomic_dir(out, replace=False) as stage:
            (stage / "a").write_text("mine")
            out.mkdir()                               # another process commits first
            (out / "theirs").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------ 6: outputs inside the artifact
@pytest.mark.parametrize("case", ["run-manifest", "run-library", "bench-json-manifest", "bench-plot-in-artifact",
                                  "run-output-is-input"])
def test_outputs_inside_the_artifact_read_are_refused(cnn_artifact, tmp_path, case):
    art = _copy_artifact(cnn_artifact, tmp_path / "art")
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 3, 32, 32), np.float32))
    args, out = {
        "run-manifest": (["run", art, "-o", art / "manifest.json", "--force"], art / "manifest.json"),
        "run-library": (["run", art, "-o", art / "model.so", "--force"], art / "model.so"),
        "bench-json-manifest": (["bench", art, "--json", art / "manifest.json", "--force", "--repeat", "1"],
                                art / "manifest.json"),
        "bench-plot-in-artifact": (["bench", art, "--plot", art / "new.png", "--repeat", "1"], art / "new.png"),
        "run-output-is-input": (["run", art, "-i", tmp_path / "in.npz", "-o", tmp_path / "in.npz", "--force"],
                                tmp_path / "in.npz"),
    }[case]
    assert_bad_input(args, "the input", inputs=[art, tmp_path / "in.npz"], outputs=[out])


# ------------------------------------------------------------------------------------ 10: output paths
def _readonly_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write to (as root, chmod does not stop writes: sysfs does)."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize("cmd,where", [(c, w) for c in ("run", "analyze", "bench", "prune", "compile")
                                       for w in ("read-only", "missing-dir", "parent-is-file", "long-name")
                                       if (c, w) != ("compile", "missing-dir")])   # compile creates parents
def test_unwritable_output_fails_before_the_work(cnn_artifact, synthetic_models, tmp_path, monkeypatch, where, cmd):
    (tmp_path / "file").write_text("")
    parent = {"read-only": _readonly_dir(tmp_path), "missing-dir": tmp_path / "nope",
              "parent-is-file": tmp_path / "file", "long-name": tmp_path}[where]
    name = ("x" * 300 if where == "long-name" else "out") + (".npz" if cmd == "run" else ".json")
    out = parent / name
    src = synthetic_models["mlp"]
    args = {
        "run": ["run", cnn_artifact, "-o", out],
        "analyze": ["analyze", src, "--calib-random", "2", "-o", out],
        "bench": ["bench", cnn_artifact, "--json", out, "--repeat", "1"],
        "prune": ["prune", src, "-s", "0.5", "-o", out],
        "compile": ["compile", src, "-o", out, "--sparse", "off"],
    }[cmd]
    import edge_sparse.pruning as P

    def no_work(*a, **k):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(runtime, "load", no_work)
    monkeypatch.setattr(P, "analyze", no_work)
    monkeypatch.setattr("edge_sparse.benchmark.bench", no_work)
    msg = {"read-only": "cannot write", "missing-dir": "does not exist", "parent-is-file": "not a directory",
           "long-name": "bytes"}[where]
    assert_bad_input(args, msg, inputs=[cnn_artifact, src], outputs=[out] if where != "read-only" else [])


def test_compile_into_missing_parent_leaves_nothing_on_failure(tmp_path):
    """compile creates missing parents of -o; when it then fails, the parents it created are removed again."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert_bad_input(["compile", bad, "-o", tmp_path / "a" / "b" / "art"], "ONNX", inputs=[bad],
                     outputs=[tmp_path / "a"])


# ------------------------------------------------------------------------------------ 12: invalid models refused
def _conv_model(path: Path, kernel_shape, w_shape, out_hw: int):
    w = np.ones(w_shape, np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=kernel_shape)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w_shape[0], out_hw, out_hw])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _matmul_model(path: Path, w_shape, x_cols=None):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x_cols or w_shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w_shape[1]])],
                          [numpy_helper.from_array(np.ones(w_shape, np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("case,msg", [
    ("kernel-vs-weight", "kernel_shape [5, 5] disagrees with its weight"),
    ("kernel-vs-output", "kernel_shape [5, 5] disagrees with its weight"),
    ("zero-size-weight", "zero-size weight"),
    ("matmul-mismatch", "fails ONNX shape inference"),   # refused by both strict inference and onnxruntime
])
@pytest.mark.parametrize("cmd", ["compile", "prune"])
def test_invalid_models_refused_at_intake(tmp_path, case, msg, cmd):
    f = tmp_path / "m.onnx"
    if case == "kernel-vs-weight":
        _conv_model(f, [5, 5], (4, 3, 3, 3), 4)       # output shape agrees with kernel_shape, the weight does not
    elif case == "kernel-vs-output":
        _conv_model(f, [5, 5], (4, 3, 3, 3), 6)
    elif case == "matmul-mismatch":
        _matmul_model(f, (5, 3), x_cols=4)
    else:
        _matmul_model(f, (0, 4))
    out = tmp_path / "out"
    args = ["compile", f, "-o", out, "--sparse", "off"] if cmd == "compile" else ["prune", f, "-o", out, "-s", "0.5"]
    assert_bad_input(args, msg, inputs=[f], outputs=[out])


# ------------------------------------------------------------------------------------ 13: NaN/Inf -> warning, strict JSON
def _strict_json(text: str):
    def bad(c):
        raise AssertionError(f"bare {c} in a JSON report")
    return json.loads(text, parse_constant=bad)


@pytest.mark.parametrize("where", ["weights", "calibration"])
def test_non_finite_values_warn_and_reports_stay_json(synthetic_models, tmp_path, where):
    from edge_sparse.models import synthetic

    src = tmp_path / "m.onnx"
    m = onnx.load(str(synthetic_models["mlp"]))
    if where == "weights":
        init = m.graph.initializer[0]
        w = numpy_helper.to_array(init).copy()
        w.flat[:3] = [np.nan, np.inf, -np.inf]
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(src))
    calib = tmp_path / "c.npz"
    x = np.random.default_rng(0).standard_normal((4, 32, 128)).astype(np.float32)
    if where == "calibration":
        x[1, 2, 3] = np.nan
    np.savez(calib, x=x)
    from contract import _run

    for args, out in ((["prune", src, "-o", tmp_path / "p.onnx", "-s", "0.5", "--calib", calib], tmp_path / "p.report.json"),
                      (["analyze", src, "--calib", calib, "-o", tmp_path / "a.json", "--levels", "0.5"], tmp_path / "a.json")):
        r = _run([str(a) for a in args], tmp_path, True, None, 600, None)
        assert r.exit_code == 0, r.stderr
        assert "warning: " in r.stderr and "NaN/Inf" in r.stderr, r.stderr
        _strict_json(out.read_text())
    r = _run(["analyze", str(src), "--calib", str(calib), "--json", "--levels", "0.5"], tmp_path, True, None, 600, None)
    _strict_json(r.stdout)


def test_json_text_has_no_bare_nan():
    from edge_sparse.util import json_text

    text = json_text({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.float64(-np.inf), "d": np.int64(3)})
    assert _strict_json(text) == {"a": None, "b": [None, 1.5], "c": None, "d": 3}


# ------------------------------------------------------------------------------------ 15: RPC message not timing-dependent
@pytest.mark.parametrize("behaviour", ["close-at-once", "reset", "garbage-then-close", "garbage-after-read"])
def test_not_an_rpc_server_message_does_not_depend_on_timing(cnn_artifact, behaviour):
    """Whatever the peer does and however the race goes (EPIPE, ECONNRESET, bad magic), the same one line."""
    import socket
    import struct
    import threading

    from edge_sparse import benchmark as B

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def answer():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                if behaviour == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif behaviour == "garbage-then-close":
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                elif behaviour == "garbage-after-read":
                    conn.recv(64)
                    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            except OSError:
                pass
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        for _ in range(3):
            with pytest.raises(UserError, match="not a TVM RPC server"):
                B.bench(cnn_artifact, rpc=f"127.0.0.1:{port}", rpc_timeout=5, quiet=True)
    finally:
        srv.close()


# ------------------------------------------------------------------------------------ 16: no orphaned TVM workers
def _group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def test_stopping_a_test_rpc_server_leaves_no_popen_worker():
    """TVM's rpc_server serves from a tvm.exec.popen_worker child; terminating only the parent orphaned it (three
    ~400 MB workers stayed alive after the suite). The fixtures stop the whole process group."""
    import socket
    import time

    from conftest import start_process_group, stop_process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_process_group(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                                "--port-end", str(port + 1)])
    deadline = time.monotonic() + 60
    while len(_group_members(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_group_members(proc.pid)) >= 2, "the server did not start its worker"
    stop_process_group(proc)
    time.sleep(0.5)
    assert _group_members(proc.pid) == []


# ------------------------------------------------------------------------------------ 9: tune with every trial failed
def test_tune_with_every_trial_failed_is_an_error(synthetic_models, tmp_path, monkeypatch):
    """tune used to exit 0 and report "N records from N trials" when every trial failed. The search is replaced by
    one that leaves what meta_schedule writes when every build times out (a workload, records with run_secs 1e10):
    a real search takes minutes here. Now: one line, exit 2, no database."""
    from tvm.s_tir import meta_schedule as ms

    def every_build_failed(*, work_dir, **kw):
        Path(work_dir, "database_workload.json").write_text('["0x1", {"mod": "..."}]\n')
        Path(work_dir, "database_tuning_record.json").write_text(
            '[0, [[[], []], [10000000000.0], {"kind": "llvm"}, []]]\n' * 4)

    monkeypatch.setattr(ms.relax_integration, "tune_relax", every_build_failed)
    out = tmp_path / "db"
    assert_bad_input(["tune", synthetic_models["mlp"], "-o", out, "--trials", "4"], "tuning found nothing",
                     "failed", inputs=[synthetic_models["mlp"]], outputs=[out])


def test_tune_with_unreachable_tracker_fails_before_the_search(synthetic_models, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                     # closed again: nothing listens there
    out = tmp_path / "db"
    assert_bad_input(["tune", synthetic_models["mlp"], "-o", out, "--trials", "4", "--target", "rpi4",
                      "--tracker", f"127.0.0.1:{port}", "--key", "pi"], "unreachable",
                     inputs=[synthetic_models["mlp"]], outputs=[out], timeout=120)


def test_count_records_separates_failed_runs(tmp_path):
    from edge_sparse.tuning import count_records

    f = tmp_path / "database_tuning_record.json"
    f.write_text('[0, [[[], []], [1e10], {"kind": "llvm"}, []]]\n[1, [[[], []], [0.0012, 0.0011], {"kind": "llvm"}, []]]\n'
                 '[1, [[[], []], null, {"kind": "llvm"}, []]]\n')
    assert count_records(f) == (1, 2)


# ------------------------------------------------------------------------------------ 8: RPC commands bind 127.0.0.1
def test_every_documented_rpc_command_binds_loopback():
    import re

    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("docs/*.md"), root / "README.md", *root.glob("edge_sparse/*.py"), *root.glob("examples/**/*.md")]
    found = []
    for f in files:
        for line in f.read_text().splitlines():
            for m in re.finditer(r"tvm\.exec\.(rpc_server|rpc_tracker)\b[^'\"`\n]*", line):
                cmd = m.group(0)
                if cmd.rstrip().endswith(("rpc_server", "rpc_tracker")) and "--" not in cmd:
                    continue                          # prose naming the module, not a command line
                found.append((f.name, cmd))
                assert "--host 127.0.0.1" in cmd, f"{f.name}: {cmd!r} does not bind 127.0.0.1"
    assert any(name == "dense-cpu.md" for name, _ in found)


def test_tune_rpc_error_shows_loopback_and_tunnel(synthetic_models, tmp_path):
    r = assert_bad_input(["tune", synthetic_models["mlp"], "-o", tmp_path / "db", "--rpc", "127.0.0.1:9090"],
                         "--host 127.0.0.1", "ssh -L", inputs=[synthetic_models["mlp"]], outputs=[tmp_path / "db"])
    assert "--tracker HOST" not in r.error


# ------------------------------------------------------------------------------------ 17: docs that work as written
_ROOT = Path(__file__).resolve().parents[1]


def _table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| model | config |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_e2e_table_has_one_source_the_benchmark_json():
    import importlib.util

    spec = importlib.util.spec_from_file_location("e2e_bench", _ROOT / "benchmarks" / "e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    result = json.loads((_ROOT / "docs" / "e2e" / "e2e.json").read_text())
    generated = _table(e2e.markdown(result))
    assert _table((_ROOT / "docs" / "e2e" / "e2e.md").read_text()) == generated
    assert _table((_ROOT / "README.md").read_text()) == generated
    assert "| model | config |" not in (_ROOT / "docs" / "models.md").read_text()     # no second, stale copy


def test_documented_cross_build_finds_its_toolchain(tmp_path):
    """docs/deploy.md's cmake line, run as written from the repository root: the toolchain file is found (a
    relative path was resolved against the build directory and failed)."""
    import re
    import shutil

    if shutil.which("cmake") is None or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("cmake and g++-aarch64-linux-gnu are installed by scripts/install-system-deps.sh")
    text = (_ROOT / "docs" / "deploy.md").read_text()
    m = re.search(r"^cmake -S examples/cpp -B build-arm (.*?)\\\n\s*(-DEDGE_SPARSE_BUNDLE=\S+)", text, re.M)
    assert m, "deploy.md lost its cross-build command"
    args = (m.group(1) + " " + m.group(2)).replace("$PWD", str(_ROOT)).split()
    args = [a for a in args if not a.startswith("-DEDGE_SPARSE_BUNDLE")] + [f"-DEDGE_SPARSE_BUNDLE={tmp_path / 'b'}"]
    p = subprocess.run(["cmake", "-S", "examples/cpp", "-B", str(tmp_path / "build-arm"), *args], cwd=_ROOT,
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert "Could not find toolchain file" not in out, out[-2000:]
    assert "has no include/edge_sparse.hpp" in out, out[-2000:]     # got as far as checking the (missing) bundle


def test_run_md_documents_qemu_and_no_as_needed():
    from edge_sparse import bundle

    src = Path(bundle.__file__).read_text()
    assert "qemu-aarch64 -L /usr/aarch64-linux-gnu" in src and "qemu-aarch64 ./run" in src
    c_app = src[src.index("## In a C++ app"):src.index("## Rebuilding the runner")]
    assert "-Wl,--no-as-needed -ltvm_runtime" in c_app
    deploy = (_ROOT / "docs" / "deploy.md").read_text()
    assert "qemu-aarch64 -L /usr/aarch64-linux-gnu" in deploy


def test_compile_prints_the_library_size_not_the_bundle_total(synthetic_models, tmp_path, monkeypatch):
    """A bundle's manifest lists model.so plus the runtime and runner: the artifact line gives model.so's size (it
    printed the bundle's total, 7.90 MB, as the size of a 1.3 MB model.so); the bundle line gives the total."""
    from conftest import invoke

    files = {"model.so": 1_300_000, "lib/libtvm_runtime.so": 3_100_000, "lib/libtvm_ffi.so": 1_000_000,
             "bin/edge-sparse-run": 500_000, "lib/sysroot/libc.so.6": 2_000_000}
    manifest = {"library": "model.so", "target": {"name": "rpi5"}, "compile": {"seconds": 1.0},
                "files": {k: {"bytes": v, "sha256": "0" * 64} for k, v in files.items()},
                "bundle": {"sizes": {"model": 1_300_000, "runtime": 4_100_000, "runner": 2_500_000,
                                     "device": 7_900_000, "sdk": 1_000_000}}}
    monkeypatch.setattr(compiler, "compile", lambda *a, **k: manifest)
    r = invoke(["compile", synthetic_models["cnn"], "-o", tmp_path / "art", "--target", "rpi5"])
    assert r.exit_code == 0, r.output
    first, bundle_line = r.output.splitlines()[:2]
    assert "model.so for rpi5, 1.30 MB" in first, first
    assert bundle_line.startswith("bundle: model 1.3") and "7.9" in bundle_line, bundle_line


# ------------------------------------------------------------------------------------ 18: calibration samples
def _digest(feeds: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(feeds):
        h.update(np.ascontiguousarray(feeds[k]).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["ppocr-cls", "ppocr-det", "efficientnet-lite0", "silero-vad"])
def test_zoo_sample_inputs_do_not_repeat(name):
    """64 samples, 64 distinct inputs (they repeated every 16: a 64-sample file held 16 distinct samples)."""
    from edge_sparse import models

    recipe = models.recipes()[name]
    digests = [_digest(recipe.sample_input(i)) for i in range(64 if name != "ppocr-det" else 20)]
    assert len(set(digests)) == len(digests)


def test_nth_text_is_distinct_and_starts_with_the_originals():
    from edge_sparse.models.zoo import OCR_TEXTS, SENTENCES, nth_text

    for texts in (OCR_TEXTS, SENTENCES):
        seq = [nth_text(texts, i) for i in range(200)]
        assert len(set(seq)) == 200 and tuple(seq[:len(texts)]) == texts


def test_held_out_split_never_shares_a_sample_with_calibration():
    from edge_sparse.passes import calibrate

    specs = [calibrate.InputSpec("x", (None, 4), np.dtype("float32"))]
    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((6, 4)).astype(np.float32)
    data = {"x": np.concatenate([distinct, distinct[:2]])}          # the last two repeat calibration samples
    calib, held = calibrate.split_holdout(data, specs, 0.25)
    assert calibrate.sample_count(calib) == 6 and held == {}
    data = {"x": np.concatenate([distinct, distinct[:1], rng.standard_normal((1, 4)).astype(np.float32)])}
    calib, held = calibrate.split_holdout(data, specs, 0.25)
    assert calibrate.sample_count(held) == 1
    assert not set(calibrate.sample_hashes(held)) & set(calibrate.sample_hashes(calib))


@pytest.mark.parametrize("cmd", ["prune", "analyze"])
@pytest.mark.parametrize("case", ["one-sample", "duplicates"])
def test_few_or_duplicate_calibration_samples_warn(synthetic_models, tmp_path, cmd, case):
    from contract import _run

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1 if case == "one-sample" else 4, 32, 128)).astype(np.float32)
    if case == "duplicates":
        x = np.concatenate([x, x, x, x])                           # 16 samples, 4 distinct
    np.savez(tmp_path / "c.npz", x=x)
    args = (["prune", synthetic_models["mlp"], "-o", tmp_path / "p.onnx", "-s", "0.5"] if cmd == "prune" else
            ["analyze", synthetic_models["mlp"], "--levels", "0.5"]) + ["--calib", tmp_path / "c.npz"]
    r = _run([str(a) for a in args], tmp_path, True, None, 600, None)
    assert r.exit_code == 0, r.stderr
    want = "only 1 distinct calibration sample" if case == "one-sample" else "16 samples but only 4 distinct"
    assert any(ln.startswith("warning: ") and want in ln for ln in r.stderr.splitlines()), r.stderr


# ------------------------------------------------------------------------------------ 19: bench output
def test_bench_output_compares_every_artifact_and_stays_short(cnn_artifact, synthetic_models, tmp_path):
    from contract import _run

    out = tmp_path / "b.json"
    args = ["bench", cnn_artifact, cnn_artifact, "--compare", synthetic_models["cnn"], "--repeat", "5",
            "--warmup", "1", "--threads", "1", "--energy", "auto", "--json", out]
    r = _run([str(a) for a in args], tmp_path, True, None, 600, None)
    assert r.exit_code == 0, r.stderr
    diff_lines = [ln for ln in r.stdout.splitlines() if "max |diff|" in ln]
    assert len(diff_lines) == 2, r.stdout                   # max|diff| for both artifacts, not the first only
    assert all(len(ln) <= 200 for ln in r.stdout.splitlines()), max(r.stdout.splitlines(), key=len)
    data = _strict_json(out.read_text())
    assert all(c["max_abs_diff"] and all(v is not None for v in c["max_abs_diff"].values())
               for c in data["comparisons"])
    bounds = {run["memory_boundary"] for run in data["runs"]}
    assert len(bounds) == 1 and None not in bounds, bounds  # one way of measuring memory for both runtimes
