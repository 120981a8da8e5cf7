"""The ``edge-sparse`` command line: a thin click layer over the Python API.

Every command turns :class:`~edge_sparse.errors.UserError` (and click's usage errors) into one line on stderr
and exit code 2, with no traceback. Commands decide paths and printing; the API does the work.
"""
from __future__ import annotations

import json
import sys

import click

from edge_sparse.errors import UserError
from edge_sparse.progress import set_quiet

__all__ = ["main", "cli"]


class _Group(click.Group):
    """Maps UserError to ``error: ...`` + exit 2 for every subcommand."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


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


def main(argv=None):
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="edge-sparse", standalone_mode=True)
    except UserError as e:  # raised outside a subcommand's invoke (e.g. in a callback)
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
