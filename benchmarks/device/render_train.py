"""Device helper: the 'train' split of an OCR zoo model as 'edge-sparse models get --train N' writes it (data.py's
own dataset(), its rendering spread over processes), but uncompressed; data.json (written by 'models get
--calib/--eval' first) gains the split. Usage: render_train.py MODEL DIR COUNT PROCESSES"""
import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from edge_sparse.models import data
from edge_sparse.models.zoo import recipes

model, out, count, procs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
_render = data._ocr_inputs


def _chunk(specs):
    return _render(model, specs, None)


def _pooled(model_, specs, cache_dir):
    with Pool(procs) as p:
        arrays = p.map(_chunk, [specs[i:i + 500] for i in range(0, len(specs), 500)])
    return {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}


if __name__ == "__main__":
    t = time.time()
    data._ocr_inputs = _pooled
    ds = data.dataset(model, "train", count)
    stem = Path(recipes()[model].filename).stem
    np.savez(out / f"{stem}.train.npz", **ds.inputs)
    info_path = out / f"{stem}.data.json"
    info = json.loads(info_path.read_text())
    info["splits"]["train"] = data.info_entry(ds, f"{stem}.train.npz")
    info_path.write_text(json.dumps(info))
    print(f"rendered {len(ds)} {model} train lines in {time.time() - t:.1f}s", flush=True)
