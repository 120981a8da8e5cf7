"""Label-free distillation of a pruned ONNX model against its dense teacher, masks frozen (``edge-sparse recover``).

Flow: both ONNX graphs become PyTorch modules (:mod:`edge_sparse.onnx_torch`); the student's weights, biases and
norm parameters train with AdamW (warm-up, cosine decay) to match the teacher's outputs on unlabeled inputs
(``--data``: an ``.npz`` of model inputs, like ``--calib``); the pruned weights' zeros are re-applied after every
step and their gradients are masked, so every zero stays exactly zero; the trained values are written back into
the pruned ONNX by initializer (or Constant) name, the graph unchanged.

Loss per output: class scores (an output produced by Softmax) use KL(teacher || student) on the logits; every
other float output uses the squared error normalised by the teacher's mean square (scale-free, so outputs of
different magnitude weigh the same). ``match_layers`` adds the same normalised error on the output of every
pruned MatMul/Gemm/Conv (intermediate matching), averaged over those layers and scaled by ``layer_weight``.

A checkpoint (safetensors: weights and AdamW moments; JSON metadata) is written every ``checkpoint_every`` steps;
a rerun with the same arguments resumes from it. The step's batch is a function of (seed, step), so a resumed run
draws the batches an uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edge_sparse.errors import UserError
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_path, atomic_write, sha256_bytes, sha256_file

__all__ = ["recover", "RecoverResult", "METADATA_KEY"]

METADATA_KEY = "edge_sparse.recover"
PROBE_SAMPLES = 64             # fixed samples on which the loss before and after is reported


@dataclasses.dataclass
class RecoverResult:
    model: onnx.ModelProto
    report: dict


def _load(model, what: str) -> tuple[onnx.ModelProto, Path | None, str]:
    if isinstance(model, onnx.ModelProto):
        return model, None, sha256_bytes(model.SerializeToString())
    path = Path(model)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as e:                                    # noqa: BLE001 (any decode failure is the user's file)
        raise UserError(f"{what} {path} is not a readable ONNX file ({type(e).__name__})") from None
    return proto, path, sha256_file(path)


def _softmax_logits(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """{output: (logits tensor, axis)} for outputs produced by a Softmax over its last axis (through identities)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for out in model.graph.output:
        node = producers.get(out.name)
        while node is not None and node.op_type in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            if node.op_type != "Identity":
                node = None
                break
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "Softmax":
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            found[out.name] = (node.input[0], axis)
    return found


def _pruned_layer_outputs(model: onnx.ModelProto, masked: list[str]) -> list[str]:
    masked = set(masked)
    return [n.output[0] for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm", "Conv") and any(i in masked for i in n.input)]


def _same_graph(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    s_in = [(i.name, i.type.tensor_type.elem_type) for i in student.graph.input]
    t_in = {i.name: i.type.tensor_type.elem_type for i in teacher.graph.input}
    for name, dt in s_in:
        if name in {x.name for x in student.graph.initializer}:
            continue
        if name not in t_in:
            raise UserError(f"the teacher has no input '{name}'; pass the dense model the student was pruned from")
    outs = {o.name for o in teacher.graph.output}
    missing = [o.name for o in student.graph.output if o.name not in outs]
    if missing:
        raise UserError(f"the teacher has no output '{missing[0]}'; pass the dense model the student was pruned from")


def _per_token(tok, x):
    """``tok`` ([B, S] 0/1) shaped to broadcast over ``x`` ([B, S, ...]) in its dtype; None when ``x`` is not per token."""
    if tok is None or x.dim() < 2 or tuple(x.shape[:2]) != tuple(tok.shape):
        return None
    return tok.reshape(*tok.shape, *[1] * (x.dim() - 2)).to(x.dtype)


def _fast_path(student_m, teacher_m, feeds: dict, pad: str | None, torch) -> dict:
    """Choose how the graphs run: a batch-1 graph on whole batches, and sequences trimmed to the longest real one in
    the batch (exact for every real position when attention excludes the padding). Each option is kept only if the
    outputs at real positions match the exact path (per-sample vmap, full length) on a few training samples.
    Trimming also needs the padding at the end of every sample of ``feeds`` (ones, then zeros)."""
    if pad and not np.all(np.diff(feeds[pad].astype(np.int8), axis=1) <= 0):
        pad = None
    probe = {k: torch.from_numpy(np.ascontiguousarray(v[:4])) for k, v in feeds.items()}
    seq = probe[pad].shape[1] if pad else None
    seq_inputs = [k for k, v in probe.items() if pad and v.dim() >= 2 and v.shape[1] == seq]
    with torch.no_grad():
        ref = teacher_m(**probe)
        keep = int(probe[pad].sum(1).max()) if pad else None
        tried = []
        if student_m.per_sample:
            tried.append((True, None))
        if pad and keep < seq:
            tried.insert(0, (True, seq))
        for fast, seq_len in tried:
            teacher_m.set_fast(fast, seq_len, seq_inputs)
            trim = {k: (v[:, :keep] if k in seq_inputs and seq_len else v) for k, v in probe.items()}
            got = teacher_m(**trim)
            ok = True
            for name, r in ref.items():
                g = got[name]
                if seq_len and r.dim() >= 2 and r.shape[1] == seq and g.shape[1] == keep:
                    w = _per_token(probe[pad][:, :keep], g)
                    r, g = r[:, :keep] * w, g * w
                if r.shape != g.shape or (r.is_floating_point() and
                                          float((r - g).abs().max()) > 1e-4 * max(1.0, float(r.abs().max()))):
                    ok = False
                    break
            teacher_m.set_fast(False)
            if ok:
                return {"batched": fast, "seq_len": seq_len, "seq_inputs": seq_inputs if seq_len else []}
    return {"batched": not student_m.per_sample, "seq_len": None, "seq_inputs": []}


def _gradual_plan(model: onnx.ModelProto, masked: list[str]) -> dict[str, dict]:
    """{weight: {pattern, sparsity, op, trans_b}} for gradual pruning, from the record ``edge-sparse prune`` wrote into
    the pruned model (``edge_sparse.pruning`` metadata: each layer's pattern and sparsity)."""
    from edge_sparse.passes.prune import METADATA_KEY as PRUNE_KEY
    from edge_sparse.passes.prune_masks import parse_pattern

    meta = {p.key: p.value for p in model.metadata_props}
    try:
        layers = json.loads(meta[PRUNE_KEY])["layers"]
    except (KeyError, ValueError, TypeError):
        raise UserError("--gradual needs a model written by 'edge-sparse prune' (its metadata names each layer's "
                        "pattern and sparsity); this model has no such record") from None
    consumers = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            consumers.setdefault(node.input[1], (node.op_type, trans_b))
    plan = {}
    for name in masked:
        info = layers.get(name)
        if info is None or name not in consumers:
            continue
        op, trans_b = consumers[name]
        plan[name] = {"pattern": parse_pattern(info["pattern"]), "sparsity": float(info["sparsity"]), "op": op,
                      "trans_b": trans_b}
    if not plan:
        raise UserError("--gradual: the pruning record names none of the model's pruned weights (was the model "
                        "changed after 'edge-sparse prune'?)")
    return plan


def _gradual_mask(weight: np.ndarray, info: dict, sparsity: float) -> np.ndarray:
    """Magnitude mask of ``weight`` at ``sparsity`` in the layer's pattern (1 keep, 0 drop), in the weight's layout."""
    from edge_sparse.passes.prune_masks import from_canonical, mask, to_canonical

    scores = np.abs(to_canonical(weight, info["op"], info["trans_b"])).astype(np.float64)
    keep = mask(scores, info["pattern"], sparsity, per_row=False)
    return from_canonical(keep, weight.shape, info["op"], info["trans_b"]).astype(weight.dtype)


def _checkpoint_meta(config: dict) -> dict:
    return {"edge_sparse_recover": json.dumps(config, sort_keys=True)}


def _save_checkpoint(path: Path, student, opt, names: list[str], step: int, config: dict, losses: list) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, name in enumerate(names):
        p = student.constant(name)
        tensors[f"w{i}"] = p.detach().cpu().contiguous()
        state = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in state:
                tensors[f"{k}{i}"] = state[k].detach().cpu().contiguous()
        if "step" in state:
            tensors[f"step{i}"] = state["step"].detach().cpu().reshape(1).float()
    meta = dict(_checkpoint_meta(config), step=str(step), losses=json.dumps(losses[-1000:]))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_checkpoint(path: Path, student, opt, names: list[str], config: dict) -> tuple[int, list]:
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("edge_sparse_recover") != _checkpoint_meta(config)["edge_sparse_recover"]:
                raise UserError(f"checkpoint {path} was made with other models, data or settings; delete it or pass "
                                f"another --checkpoint path")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except UserError:
        raise
    except Exception as e:                                    # noqa: BLE001
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to start over") from None
    with torch.no_grad():
        for i, name in enumerate(names):
            p = student.constant(name)
            p.copy_(tensors[f"w{i}"].to(p.device))
            if f"exp_avg{i}" in tensors:
                opt.state[p] = {"step": tensors[f"step{i}"].reshape(()).to(torch.float32),
                                "exp_avg": tensors[f"exp_avg{i}"].to(p.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq{i}"].to(p.device)}
    return int(meta["step"]), json.loads(meta.get("losses", "[]"))


def recover(student, teacher, data, output=None, *, steps: int = 1000, batch_size: int = 32, lr: float = 1e-4,
            device: str = "cpu", precision: str | None = None, gradual: float = 0.0, match_layers: bool = False,
            layer_weight: float = 1.0, seed: int = 0, eval_data=None, batch: int | None = None,
            checkpoint=None, checkpoint_every: int = 200, threads: int | None = None, force: bool = False,
            quiet: bool | None = None) -> RecoverResult:
    """Distil ``teacher`` (dense ONNX) into ``student`` (pruned ONNX), masks frozen; write ``output`` if given.

    data: ``.npz`` path or ``{input: array}`` of unlabeled inputs (samples on the first axis).
    checkpoint: safetensors path for resumable training (default ``OUTPUT.ckpt.safetensors``; None without output).
    gradual: 0 keeps the student's masks (default). A fraction f in (0, 1] instead starts the student from the
    teacher's weights and prunes it gradually during the first f of the steps (cubic schedule, magnitude within each
    layer's pattern, masks updated about 20 times), ending at each layer's pattern and sparsity as recorded by
    ``edge-sparse prune`` in the student; the rest of the steps train with those masks fixed. Masks may then differ
    from the student's, sparsity and pattern do not.
    precision: ``fp32`` or ``bf16`` (autocast of both forward passes; losses and weights stay fp32); default bf16 on
    cuda, fp32 on cpu.
    eval_data: held-out samples (:func:`edge_sparse.evaluation.load_eval`: a zoo ``.eval.npz`` for the real metrics,
    another ``.npz``, arrays or an ``EvalSet``): the report's ``accuracy.eval`` then scores the teacher, the student
    as given and the recovered model side by side (onnxruntime; ``batch`` samples per call).
    """
    from edge_sparse.onnx_torch import OnnxModule, masked_constants, require_torch, trainable_constants
    from edge_sparse.passes import calibrate

    torch = require_torch()
    t0 = time.perf_counter()
    progress = Progress(quiet)
    if steps < 0:
        raise UserError(f"--steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 <= gradual <= 1.0:
        raise UserError(f"--gradual must be a fraction of the steps in [0, 1], got {gradual}")
    if not lr > 0:
        raise UserError(f"--lr must be > 0, got {lr}")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got '{device}'")
    precision = precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got '{precision}'")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch (install a CUDA build of torch or use "
                        "--device cpu)")
    s_proto, s_path, s_sha = _load(student, "pruned model")
    t_proto, t_path, t_sha = _load(teacher, "teacher model")
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        for src in (s_path, t_path):
            if src is not None and out_path.resolve() == src.resolve():
                raise UserError(f"output {out_path} is an input model; choose another path (inputs are never "
                                f"overwritten)")
        if out_path.exists() and not force:
            raise UserError(f"output {out_path} already exists; pass --force to overwrite it")
        if not out_path.parent.exists():
            raise UserError(f"output directory {out_path.parent} does not exist")
    _same_graph(s_proto, t_proto)
    from edge_sparse.passes.permute import align

    try:                    # the pruner may have reordered channels (prune --permute): reorder the teacher alike
        t_proto = align(t_proto, s_proto)
    except ValueError as e:
        raise UserError(f"{e}; pass the dense model the student was pruned from") from None
    specs = calibrate.input_specs(s_proto)
    if isinstance(data, dict):
        feeds = calibrate.check_calibration(data, specs, "distillation data")
        data_desc = "arrays"
    else:
        feeds = calibrate.load_calibration(data, specs)
        data_desc = str(data)
    n = calibrate.sample_count(feeds)
    eval_set, warnings = None, []
    if eval_data is not None:                     # read and checked before training
        from edge_sparse import evaluation

        eval_set = evaluation.load_eval(eval_data, t_proto, calib=data, calib_flag="--data")
        warnings = evaluation.overlap_warnings(eval_set, feeds, "distillation data")

    names = trainable_constants(s_proto)
    masked = masked_constants(s_proto)
    if not masked:
        raise UserError("the student has no pruned weights (no MatMul/Gemm/Conv weight holds zeros); recover "
                        "trains a pruned model against its dense teacher: run 'edge-sparse prune' first")
    plan = _gradual_plan(s_proto, masked) if gradual > 0 else {}
    logits = _softmax_logits(s_proto)
    layer_outs = _pruned_layer_outputs(s_proto, masked) if match_layers else []
    capture = [v[0] for v in logits.values()] + layer_outs
    dev = torch.device(device)
    if dev != torch.device("cpu"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    with progress.step("convert ONNX -> PyTorch (student, teacher)"):
        student_m = OnnxModule(s_proto, trainable=names, capture=capture).to(dev)
        teacher_m = OnnxModule(t_proto, capture=capture).eval()
        pad = calibrate.token_mask_input(specs, feeds)
        fast = _fast_path(student_m, teacher_m, feeds, pad, torch)
        for m in (student_m, teacher_m):
            m.set_fast(fast["batched"], fast["seq_len"], fast["seq_inputs"])
        student_m.to(dev)
        teacher_m.to(dev)
    student_m.set_masks(masked)
    if plan:                                     # gradual: start dense, from the teacher's values
        with torch.no_grad():
            for nm in names:
                student_m.constant(nm).copy_(teacher_m.constant(nm).to(dev))
        for nm in plan:
            student_m.masks[nm] = torch.ones_like(student_m.masks[nm])
    student_m.masks = {k: v.to(dev) for k, v in student_m.masks.items()}
    student_m.train()
    params = [student_m.constant(nm) for nm in names]
    for p in teacher_m.parameters():
        p.requires_grad_(False)
    for nm in masked:
        student_m.constant(nm).register_hook(lambda g, nm=nm: g * student_m.masks[nm])
    ramp = int(round(gradual * steps))
    every = max(1, ramp // 20)

    def prune_to(step):
        """Gradual pruning: masks at the cubic schedule's sparsity for ``step`` (target reached at ``ramp``)."""
        frac = 1.0 - (1.0 - min(step, ramp) / max(ramp, 1)) ** 3
        with torch.no_grad():
            for nm, info in plan.items():
                p = student_m.constant(nm)
                keep = _gradual_mask(p.detach().float().cpu().numpy(), info, info["sparsity"] * frac)
                student_m.masks[nm] = torch.from_numpy(keep).to(device=dev, dtype=p.dtype)
        student_m.apply_masks()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, min(100, steps // 10))

    def lr_factor(s):
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    seq_len = fast["seq_len"]

    def to_dev(idx):
        """The batch's inputs on the device (trimmed to its longest real sequence when the fast path allows it) and
        its token mask ([B, S] float, None without a padding input)."""
        keep = None
        if seq_len:
            keep = int(feeds[pad][idx].sum(1).max())
            keep = min(seq_len, -(-keep // 8) * 8)    # few distinct shapes (kernel caches stay warm)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v[idx][:, :keep] if keep and k in fast["seq_inputs"]
                                                          else v[idx])).to(dev) for k, v in feeds.items()}
        return batch, (batch[pad].float() if pad else None)

    def _err(s, t, tok):
        """Squared error normalised by the teacher's mean square; positions that are padding do not count."""
        s, t = s.float(), t.float()
        w = _per_token(tok, s)
        if w is not None:
            return (w * (s - t) ** 2).sum() / (w * t * t).sum().clamp_min(1e-12)
        return ((s - t) ** 2).mean() / (t * t).mean().clamp_min(1e-12)

    def loss_fn(s_out, t_out, tok=None):
        total = 0.0
        for name in student_m.output_names:
            s, t = s_out[name], t_out[name]
            if not s.is_floating_point():
                continue
            if name in logits:
                cap, axis = logits[name]
                ls, lt = s_out[cap].float(), t_out[cap].float()
                ax = axis % ls.dim()
                kl = torch.sum(torch.softmax(lt, ax) * (torch.log_softmax(lt, ax) - torch.log_softmax(ls, ax)), dim=ax)
                w = _per_token(tok, kl)
                if w is not None:
                    w = w.expand_as(kl)
                    total = total + (w * kl).sum() / w.sum().clamp_min(1.0)
                else:
                    total = total + kl.mean()
            else:
                total = total + _err(s, t, tok)
        for name in layer_outs:                   # averaged: all layers together weigh like one output
            total = total + layer_weight / len(layer_outs) * _err(s_out[name], t_out[name], tok)
        return total

    amp = precision == "bf16"

    def forward(m, feeds_b):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            return m(**feeds_b)

    probe = np.arange(min(n, PROBE_SAMPLES))

    def probe_loss():
        student_m.eval()
        vals = []
        with torch.no_grad():
            for i in range(0, len(probe), batch_size):
                feeds_b, tok = to_dev(probe[i:i + batch_size])
                vals.append(float(loss_fn(forward(student_m, feeds_b), forward(teacher_m, feeds_b), tok))
                            * len(feeds_b[specs[0].name]))
        student_m.train()
        return sum(vals) / len(probe)

    config = {"student": s_sha, "teacher": t_sha,
              "data": sha256_bytes(b"".join(np.ascontiguousarray(feeds[k]).tobytes() for k in sorted(feeds))),
              "steps": steps, "batch_size": batch_size, "lr": lr, "match_layers": match_layers, "precision": precision,
              "layer_weight": layer_weight, "seed": seed, "gradual": gradual}
    ckpt = Path(checkpoint) if checkpoint is not None else (
        out_path.with_name(out_path.name + ".ckpt.safetensors") if out_path is not None else None)
    start, losses = 0, []
    if ckpt is not None and ckpt.exists():
        start, losses = _load_checkpoint(ckpt, student_m, opt, names, config)
        sched.last_epoch = start
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(start)
        progress.info(f"resuming from {ckpt} at step {start}/{steps}")
    if plan and start > 0:                        # resumed inside or after the ramp: the zeros are the masks
        with torch.no_grad():
            for nm in plan:
                student_m.masks[nm] = (student_m.constant(nm).detach() != 0).to(student_m.constant(nm).dtype)
    before = probe_loss() if start == 0 else None
    if start == 0:
        student_m.apply_masks()
    t_train = time.perf_counter()
    last_print = 0.0
    for step in range(start, steps):
        if plan and step <= ramp and (step % every == 0 or step == ramp):
            prune_to(step + (1 if step < ramp else 0))
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(n, size=batch_size, replace=n < batch_size)
        feeds_b, tok = to_dev(idx)
        with torch.no_grad():
            t_out = forward(teacher_m, feeds_b)
        loss = loss_fn(forward(student_m, feeds_b), t_out, tok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        student_m.apply_masks()
        losses.append(round(float(loss.detach()), 6))
        now = time.perf_counter()
        if now - last_print > 0.5 or step + 1 == steps:
            progress.count(step + 1, steps, f"distill (loss {np.mean(losses[-20:]):.4g})")
            last_print = now
        if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, student_m, opt, names, step + 1, config, losses)
    train_s = time.perf_counter() - t_train
    after = probe_loss()

    trained = student_m.named_constants(names)
    result = onnx.ModelProto()
    result.CopyFrom(s_proto)
    consts = {i.name: i for i in result.graph.initializer}
    cnodes = {nd.output[0]: nd for nd in result.graph.node if nd.op_type == "Constant"}
    if plan and ramp >= steps:                    # the ramp ends with the last step: make sure it ended on target
        prune_to(ramp)
    orig = {nm: student_m.masks[nm].cpu().numpy() for nm in masked}
    for nm, arr in trained.items():
        if nm in orig:
            arr = np.where(orig[nm] != 0, arr, 0)
        if nm in consts:
            dtype = numpy_helper.to_array(consts[nm]).dtype
            consts[nm].CopyFrom(numpy_helper.from_array(arr.astype(dtype), nm))
        else:
            attr = next(a for a in cnodes[nm].attribute if a.name == "value")
            dtype = numpy_helper.to_array(attr.t).dtype
            attr.t.CopyFrom(numpy_helper.from_array(arr.astype(dtype), nm))
    report = {
        "student": {"name": s_path.name if s_path else "model", "sha256": s_sha},
        "teacher": {"name": t_path.name if t_path else "model", "sha256": t_sha},
        "data": {"source": data_desc, "samples": n},
        "steps": steps, "resumed_from": start, "batch_size": batch_size, "lr": lr, "device": device,
        "precision": precision, "gradual": gradual, "execution": {"batched": fast["batched"], "padding_input": pad,
                                              "trimmed_inputs": fast["seq_inputs"]},
        "match_layers": match_layers, "trainable_tensors": len(names), "masked_tensors": len(masked),
        "trainable_params": int(sum(a.size for a in trained.values())),
        "loss": {"probe_samples": len(probe), "before": before, "after": after,
                 "train_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]},
        "train_seconds": round(train_s, 1), "seconds": round(time.perf_counter() - t0, 1),
        "warnings": warnings,
    }
    meta = {p.key: p for p in result.metadata_props}
    record = json.dumps({k: report[k] for k in ("steps", "batch_size", "lr", "data")} | {"loss_after": after},
                        separators=(",", ":"))
    if METADATA_KEY in meta:
        meta[METADATA_KEY].value = record
    else:
        result.metadata_props.add(key=METADATA_KEY, value=record)
    try:
        onnx.checker.check_model(result, full_check=False)
    except onnx.checker.ValidationError as e:       # a bug, not a user error
        raise RuntimeError(f"recover produced an invalid model: {e}") from None
    if eval_set is not None:
        from edge_sparse import evaluation

        with progress.step(f"accuracy on {eval_set.info['samples']} held-out samples ({eval_set.info['origin']})"):
            report["accuracy"] = {"eval": evaluation.evaluate(t_proto, {"pruned": s_proto, "recovered": result},
                                                              eval_set, batch)}
        report["seconds"] = round(time.perf_counter() - t0, 1)
    if out_path is not None:
        atomic_write(out_path, lambda f: onnx.save(result, f))
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()                           # finished: the output holds everything the checkpoint did
    return RecoverResult(result, report)
