"""Accuracy recovery on real held-out data: one-shot pruning (the default score method) against reconstruction (SparseGPT) and
label-free distillation (``edge-sparse recover``), with the dense model's own score beside them.

    python benchmarks/recovery.py --model minilm-l6 --pattern unstructured --sparsity 0.5 --methods DEFAULT,sparsegpt
    python benchmarks/recovery.py --model ppocr-rec --pattern unstructured --sparsity 0.3 --calib 128 --eval 500
    python benchmarks/recovery.py --model minilm-l6 --pattern 16x1 --sparsity 0.8 --methods sparsegpt \\
        --recover-steps 1000,4000 --device cuda --train 60000 --data-dir DIR --model-file M.onnx

Data (``edge_sparse.models.data``; the JSON records sources and sample counts): calibration samples for pruning,
held-out samples for the scores (never used for pruning or training), unlabeled training samples for distillation
(disjoint from both). ``--data-dir`` reads what ``edge-sparse models get NAME --calib N --train N --eval N`` wrote
there (machines without the data packages); ``--model-file`` uses that ONNX file as the dense model.

Scores (``data.score``): minilm-l6: mean cosine of the sentence embedding to the dense model's on held-out
sentences, Spearman of the 1,225 Lee document-pair similarities against the human scores and against the dense
model's; ppocr-rec: line accuracy and character error rate against the rendered ground truth; ppocr-cls: accuracy
on upright/180-degree lines. Everything runs in onnxruntime on the ONNX files the tools write.

Output: one JSON file (``--out``) with a row per model variant, the peak resident memory of this process after each
step (reconstruction's bound), and the time each step took.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import onnx

from edge_sparse.util import atomic_write

__all__ = ["main"]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _score(proto, sets, dense_outs, charset, batch):
    """``data.score`` per held-out split of ``proto``'s outputs (one onnxruntime run over every split)."""
    from edge_sparse.models import data
    from edge_sparse.passes import calibrate

    return data.score_splits(sets, calibrate.run_model(proto, data.stack(sets), batch), dense_outs, charset)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=["minilm-l6", "ppocr-rec", "ppocr-cls"])
    ap.add_argument("--model-file", help="dense ONNX to use instead of the zoo's cached file")
    ap.add_argument("--data-dir", help="read the splits written by 'edge-sparse models get --calib/--train/--eval'")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--allocate", default="uniform", choices=["uniform", "sensitivity"])
    ap.add_argument("--permute", default="off",
                    help="output-channel permutation before pruning (prune --permute): off, on, or off,on (each "
                         "method once per setting, side by side)")
    ap.add_argument("--methods", default="DEFAULT,sparsegpt",
                    help="pruning methods to compare (comma-separated; DEFAULT: prune's default with calibration data)")
    ap.add_argument("--calib", type=int, default=128, help="calibration samples")
    ap.add_argument("--eval", type=int, default=500, help="held-out samples")
    ap.add_argument("--train", type=int, default=0, help="distillation samples (with --recover-steps)")
    ap.add_argument("--recover-steps", default="", help="distillation budgets, e.g. 1000,4000 (from the last method)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--match-layers", action="store_true")
    ap.add_argument("--gradual", type=float, default=0.0,
                    help="recover from the dense weights, pruning gradually over this fraction of the steps")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="recover's autocast [default: bf16 on cuda]")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16, help="samples per onnxruntime call")
    ap.add_argument("--save-dir", help="also write every model variant here")
    ap.add_argument("--max-eval", type=int, default=0, help="score on the first N held-out samples only")
    ap.add_argument("--damp", type=float,
                    help="SparseGPT's damping, a fraction of mean(diag H) [default: the method's, sparsegpt.DAMP]")
    ap.add_argument("--pruned-file", help="an already pruned ONNX: score it and distil it instead of pruning")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)

    from edge_sparse import pruning
    from edge_sparse.models import data, zoo
    from edge_sparse.passes import calibrate
    from edge_sparse.passes.methods import sparsegpt

    if args.damp is not None:
        sparsegpt.SparseGPT.damp = args.damp
    t0 = time.perf_counter()
    path = Path(args.model_file) if args.model_file else zoo.get(args.model)
    dense = onnx.load(str(path))
    charset = zoo.ocr_charset(path) if args.model == "ppocr-rec" else None
    if args.data_dir:
        sets = data.read_written(args.data_dir, args.model)
    else:
        sets = {"calib": data.dataset(args.model, "calib", args.calib), "eval": data.dataset(args.model, "eval", args.eval)}
        if args.model == "minilm-l6":
            sets["pairs"] = data.dataset(args.model, "pairs")
        if args.train:
            sets["train"] = data.dataset(args.model, "train", args.train)
    if args.max_eval:
        sets = {k: (v if k != "eval" or len(v) <= args.max_eval else data.Dataset(
            v.model, v.split, {n: a[:args.max_eval] for n, a in v.inputs.items()}, v.texts[:args.max_eval],
            labels=v.labels[:args.max_eval] if v.labels else None, source=v.source)) for k, v in sets.items()}
    calib = sets.pop("calib")
    train = sets.pop("train", None)
    held = {k: v for k, v in sets.items() if k in ("eval", "pairs")}
    result = {"model": args.model, "pattern": args.pattern, "sparsity": args.sparsity, "allocate": args.allocate,
              "sparsegpt_damp": sparsegpt.SparseGPT.damp,
              "data": {"calib": calib.describe(), **{k: v.describe() for k, v in held.items()},
                       **({"train": train.describe()} if train is not None else {})},
              "host": {"machine": platform.machine(), "cpus": os.cpu_count()}, "rows": []}
    dense_outs = calibrate.run_model(dense, data.stack(held), args.batch)
    result["rows"].append({"variant": "dense", **_score(dense, held, None, charset, args.batch)})
    print(json.dumps(result["rows"][-1]), flush=True)
    last = None
    if args.pruned_file:
        given = onnx.load(args.pruned_file)
        result["rows"].append({"variant": f"given:{Path(args.pruned_file).name}",
                               **_score(given, held, dense_outs, charset, args.batch)})
        print(json.dumps(result["rows"][-1]), flush=True)
        last = (Path(args.pruned_file).stem, given)
    from edge_sparse.passes import methods as registry

    chosen = [registry.default(calibrated=True) if m == "DEFAULT" else m for m in args.methods.split(",") if m]
    settings = {"on": True, "off": False}
    permutes = [p for p in args.permute.split(",") if p]
    if not permutes or any(p not in settings for p in permutes):
        sys.exit(f"--permute takes on, off or off,on, got {args.permute!r}")
    for method, permute in [(m, p) for m in chosen if not args.pruned_file for p in permutes]:
        t = time.perf_counter()
        res = pruning.prune(dense, sparsity=args.sparsity, pattern=args.pattern, method=method, calib=calib.inputs,
                            holdout=0.0, allocate_by=args.allocate, batch=args.batch, permute=settings[permute],
                            quiet=True)
        perm = res.report["permutation"] or {}
        row = {"variant": f"{method}" + ("" if len(permutes) == 1 and permute == "off" else f" permute={permute}"),
               "permuted_groups": perm.get("applied", 0),
               "prune_seconds": round(time.perf_counter() - t, 1),
               "overall_sparsity": res.report["sparsity"]["overall"], "peak_rss_mib": round(_peak_mib()),
               **_score(res.model, held, dense_outs, charset, args.batch)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")          # partial results survive a time limit
        if args.save_dir:
            tag = "-permute" if permute == "on" else ""
            onnx.save(res.model, str(Path(args.save_dir) / f"{args.model}-{method}-{args.sparsity:g}{tag}.onnx"))
        last = (method, res.model)
    for steps in [int(s) for s in args.recover_steps.split(",") if s]:
        from edge_sparse.recover import recover

        if train is None:
            sys.exit("--recover-steps needs --train N (or a train split in --data-dir)")
        t = time.perf_counter()
        rec = recover(last[1], dense, train.inputs, steps=steps, batch_size=args.batch_size, lr=args.lr,
                      device=args.device, match_layers=args.match_layers, gradual=args.gradual,
                      precision=args.precision, quiet=True)
        tag = f"+gradual{args.gradual:g}" if args.gradual else ""
        row = {"variant": f"{last[0]}+recover{steps}{tag}", "lr": args.lr, "batch_size": args.batch_size,
               "precision": rec.report["precision"], "recover_seconds": round(time.perf_counter() - t, 1),
               "loss": {k: rec.report["loss"][k] for k in ("before", "after")},
               **_score(rec.model, held, dense_outs, charset, args.batch)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
        if args.save_dir:
            onnx.save(rec.model, str(Path(args.save_dir) / f"{args.model}-{last[0]}-recover{steps}.onnx"))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
