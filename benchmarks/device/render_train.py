"""Device helper: the 'train' split of an OCR zoo model rendered with data.py's own code in parallel processes,
written uncompressed next to what 'edge-sparse models get --calib/--eval' wrote (data.json gains the split)."""
import json, sys, time
from multiprocessing import Pool
from pathlib import Path
import numpy as np
from edge_sparse.models import data
from edge_sparse.models.zoo import recipes

model, out, count, procs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def chunk(specs):
    return data._ocr_inputs(model, specs, None)

if __name__ == "__main__":
    t = time.time()
    ref = data.dataset(model, "train", 2)          # source text and label rule, as dataset() has them
    specs = data.ocr_lines(model, "train", count)
    parts = [specs[i:i + 500] for i in range(0, len(specs), 500)]
    with Pool(procs) as p:
        arrays = p.map(chunk, parts)
    (name,) = arrays[0].keys()
    x = np.concatenate([a[name] for a in arrays])
    stem = Path(recipes()[model].filename).stem
    np.savez(out / f"{stem}.train.npz", **{name: x})
    info_path = out / f"{stem}.data.json"
    info = json.loads(info_path.read_text())
    task = recipes()[model].task
    info["splits"]["train"] = {"model": model, "split": "train", "samples": len(specs), "source": ref.source,
                               "file": f"{stem}.train.npz", "texts": [s["text"] for s in specs],
                               "labels": [int(s["rotate"]) for s in specs] if task == "ocr-cls" else [s["text"] for s in specs]}
    info_path.write_text(json.dumps(info))
    print(f"rendered {len(specs)} {model} train lines in {time.time() - t:.1f}s", flush=True)
