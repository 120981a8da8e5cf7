"""Real evaluation data from packages (models/data.py): deterministic, held-out disjoint from calibration and
training data, the scores computed as documented, and ``models get --calib/--train/--eval`` writing them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_sparse.models import data, zoo

from conftest import invoke


def test_minilm_text_splits_are_deterministic_and_disjoint():
    ev, src = data.minilm_texts("eval", 600)
    assert "lee_background" in src and len(set(ev)) == 600
    cal, _ = data.minilm_texts("calib", 256)
    tr, tsrc = data.minilm_texts("train", 5000)
    assert "wordnet" in tsrc and "Wikipedia" in tsrc
    assert data.minilm_texts("eval", 600)[0] == ev and data.minilm_texts("train", 5000)[0] == tr
    assert not set(ev) & (set(cal) | set(tr)) and not set(cal) & set(tr)
    docs, pairs, human = data.lee_pairs()
    assert len(docs) == 50 and pairs.shape == (1225, 2) and human.shape == (1225,)
    assert (pairs[:, 0] < pairs[:, 1]).all() and 0 <= human.min() and human.max() <= 1
    assert not any(s in d for s in ev + cal + tr for d in docs)          # held-out documents never used elsewhere
    with pytest.raises(data.UserError, match="available"):
        data.minilm_texts("eval", 10 ** 6)


def test_minilm_calibration_passages_are_long_and_share_no_sentence_with_training():
    cal, src = data.minilm_texts("calib", 512)
    assert "Wikipedia" in src and "wordnet" not in src            # 512 < the wiki calibration passages
    assert np.mean([len(t.split()) for t in cal]) > 30             # long sequences, unlike 12-word glosses
    assert max(len(t.split()) for t in cal) <= data.PASSAGE_WORDS + 60   # one sentence may exceed the pack target
    tr, _ = data.minilm_texts("train", 20000)
    split = lambda texts: {s for t in texts for s in data._sentences(t)}   # noqa: E731
    assert not split(cal) & split(tr)
    assert any("''" in t for t in cal + tr) is False               # wiki bold/italic quotes stripped


def test_minilm_dataset_tokenizes_like_the_zoo_sample():
    ds = data.dataset("minilm-l6", "eval", 3)
    assert set(ds.inputs) == {"input_ids", "attention_mask", "token_type_ids"} and len(ds) == 3
    from edge_sparse.models.minilm import WordPiece

    vocab = zoo._MINILM.read(zoo._MINILM_DIR + "vocab.txt", None, zoo.cache_root(), zoo.Progress(True)).decode()
    ref = WordPiece(vocab).encode(ds.texts[1])
    np.testing.assert_array_equal(ds.inputs["input_ids"][1:2], ref["input_ids"])


@pytest.mark.parametrize("model", ["ppocr-rec", "ppocr-cls"])
def test_ocr_lines_are_deterministic_and_disjoint(model):
    ev = data.ocr_lines(model, "eval", 300)
    assert ev == data.ocr_lines(model, "eval", 300)
    held = {s["text"] for s in ev}
    for split in ("calib", "train"):
        lines = data.ocr_lines(model, split, 300)
        assert not held & {s["text"] for s in lines}
    assert all(len(s["text"]) <= data.MAX_CHARS or not s["text"].isascii() for s in ev)
    if model == "ppocr-cls":
        assert [s["rotate"] for s in ev[:4]] == [False, True, False, True]
    else:
        assert any(not s["text"].isascii() for s in ev)                   # Chinese lines are in the rec set


def test_ocr_rendering_is_deterministic_and_the_dense_models_read_it():
    a = data.dataset("ppocr-rec", "eval", 24)
    b = data.dataset("ppocr-rec", "eval", 24)
    np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])
    from edge_sparse.passes import calibrate
    import onnx

    path = zoo.get("ppocr-rec")
    out = calibrate.run_model(onnx.load(str(path)), a.inputs)
    s = data.score(a, out, dense=out, charset=zoo.ocr_charset(path))
    assert s["line_accuracy"] >= 0.75 and s["cer"] < 0.1 and s["agreement"] == 1.0
    cls = data.dataset("ppocr-cls", "eval", 24)
    out = calibrate.run_model(onnx.load(str(zoo.get("ppocr-cls"))), cls.inputs)
    assert data.score(cls, out)["accuracy"] >= 0.9


def test_scores_against_hand_computed_values():
    ds = data.Dataset("ppocr-cls", "eval", {"x": np.zeros((4, 1))}, ["a"] * 4, labels=[0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    assert data.score(ds, {"p": probs})["accuracy"] == 0.75
    charset = ["<blank>", "a", "b", " "]
    # "ab" read as "abb" (one insertion); "ba" exact
    seqs = [[1, 0, 2, 2, 0, 2], [2, 2, 1, 0, 0, 0]]
    onehot = np.eye(4)[np.array(seqs)]
    ds = data.Dataset("ppocr-rec", "eval", {"x": np.zeros((2, 1))}, ["ab", "ba"], labels=["ab", "ba"])
    s = data.score(ds, {"p": onehot}, charset=charset)
    assert s["line_accuracy"] == 0.5 and s["cer"] == pytest.approx(1 / 4)
    # spearman with ties equals the rank correlation computed by hand
    a, b = np.array([1.0, 2.0, 2.0, 3.0]), np.array([0.1, 0.3, 0.2, 0.4])
    ra, rb = np.array([0, 1.5, 1.5, 3]), np.array([0, 2, 1, 3])
    assert data._spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_models_get_writes_data_files(tmp_path):
    r = invoke(["models", "get", "ppocr-cls", "-o", tmp_path, "--calib", "6", "--eval", "8", "--train", "4", "-q"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "ch_ppocr_mobile_v2.0_cls_infer.data.json").read_text())
    assert {k: v["samples"] for k, v in info["splits"].items()} == {"calib": 6, "train": 4, "eval": 8}
    assert info["splits"]["eval"]["labels"] == [0, 1] * 4 and "trdg==1.8.0" in info["splits"]["eval"]["source"]
    back = data.read_written(tmp_path, "ppocr-cls")
    np.testing.assert_array_equal(back["eval"].inputs["x"], data.dataset("ppocr-cls", "eval", 8).inputs["x"])
    with np.load(tmp_path / "ch_ppocr_mobile_v2.0_cls_infer.calib.npz", allow_pickle=False) as z:
        assert list(z.files) == ["x"] and z["x"].shape == (6, 3, 48, 192)
    r = invoke(["models", "get", "ppocr-cls", "-o", tmp_path, "--eval", "8"])
    assert r.exit_code == 2 and "exists" in r.output
    r = invoke(["models", "get", "ppocr-cls", "-o", tmp_path / "x", "--eval", "0"])
    assert r.exit_code == 2 and "at least 1" in r.output


def test_read_eval_finds_labels_beside_the_eval_file_and_refuses_mismatches(tmp_path):
    import shutil

    r = invoke(["models", "get", "ppocr-cls", "-o", tmp_path, "--eval", "4", "-q"])
    assert r.exit_code == 0, r.output
    ev_path = tmp_path / "ch_ppocr_mobile_v2.0_cls_infer.eval.npz"
    sets = data.read_eval(ev_path)
    assert list(sets) == ["eval"] and sets["eval"].labels == [0, 1, 0, 1] and sets["eval"].model == "ppocr-cls"
    np.testing.assert_array_equal(sets["eval"].inputs["x"], data.dataset("ppocr-cls", "eval", 4).inputs["x"])
    plain = tmp_path / "mine.npz"
    shutil.copy(ev_path, plain)
    assert data.read_eval(plain) is None                          # any other .npz: inputs without labels
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(ev_path, lone / ev_path.name)
    with pytest.raises(data.UserError, match="data.json not found beside .* ppocr-cls"):
        data.read_eval(lone / ev_path.name)
    info_path = tmp_path / "ch_ppocr_mobile_v2.0_cls_infer.data.json"
    info = json.loads(info_path.read_text())
    np.savez(ev_path, x=sets["eval"].inputs["x"][:3])             # the .npz rewritten without its side file
    with pytest.raises(data.UserError, match="holds 3 samples but .* describes 4"):
        data.read_eval(ev_path)
    info["splits"]["eval"]["file"] = "other.eval.npz"
    info_path.write_text(json.dumps(info))
    with pytest.raises(data.UserError, match="does not list"):
        data.read_eval(ev_path)
    info_path.write_text("{not json")
    with pytest.raises(data.UserError, match="not a data file written by"):
        data.read_eval(ev_path)


def test_score_splits_scores_each_split_of_stacked_outputs():
    """Outputs stacked over eval + pairs (one model run) score exactly as each split scored on its own."""
    rng = np.random.default_rng(3)
    ev = data.Dataset("minilm-l6", "eval", {"input_ids": np.zeros((6, 4), np.int64)}, ["t"] * 6)
    docs = data.Dataset("minilm-l6", "pairs", {"input_ids": np.ones((5, 4), np.int64)}, ["d"] * 5,
                        pairs=np.array([[0, 1], [0, 2], [1, 3], [2, 4], [3, 4]]), human=rng.random(5))
    sets = {"eval": ev, "pairs": docs}
    assert data.stack(sets)["input_ids"].shape == (11, 4) and data.stack(sets)["input_ids"][6:].all()
    out = {"sentence_embedding": rng.standard_normal((11, 8))}
    dense = {"sentence_embedding": rng.standard_normal((11, 8))}
    got = data.score_splits(sets, out, dense)
    assert got["eval"] == data.score(ev, {k: v[:6] for k, v in out.items()}, {k: v[:6] for k, v in dense.items()})
    assert got["pairs"] == data.score(docs, {k: v[6:] for k, v in out.items()}, {k: v[6:] for k, v in dense.items()})
    assert set(got["pairs"]) >= {"spearman_human", "spearman_dense"} and got["eval"]["cosine"] < 0.9
    # the report's merge (edge_sparse.evaluation): eval's metrics plus the pairs' Spearman, per model
    from edge_sparse.evaluation import EvalSet, score_outputs

    token = {"token_embeddings": rng.standard_normal((11, 4, 8))}
    res = score_outputs(EvalSet(data.stack(sets), "eval", {}, sets=sets),
                        {"dense": {**dense, **token}, "pruned": {**out, **token}})
    want = dict(got["eval"], spearman_human=got["pairs"]["spearman_human"],
                spearman_dense=got["pairs"]["spearman_dense"])
    assert res["pruned"] == pytest.approx(want, abs=1e-6)
    assert res["dense"]["cosine"] == pytest.approx(1.0) and res["dense"]["spearman_dense"] == pytest.approx(1.0)
