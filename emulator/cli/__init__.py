"""Command-line entry point: subcommands only (parse, build a config, call one function).

Each subcommand group lives in its own module and is registered here. User errors raise
:class:`emulator.errors.UserError` (or a subclass) and end with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from emulator.errors import RunError, UserError


class _Group(click.Group):
    """Turns a UserError raised anywhere below into one clean line and exit code 2, a
    RunError (a failed rank or collective) into one line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except RunError as exc:
            click.echo(f"run failed: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llm-parallel-emulator")
def cli() -> None:
    """Trace-driven emulator and simulator of LLM inference parallelism."""


def _register() -> None:
    # Subcommand modules are imported lazily here so a missing optional piece cannot break
    # the others; each module defines `commands` (a list of click commands/groups).
    import importlib

    for name in ("trace", "run", "results", "calibrate"):
        try:
            module = importlib.import_module(f"emulator.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"emulator.cli.{name}":
                raise
            continue
        for command in module.commands:
            cli.add_command(command)


_register()


def main() -> None:
    cli.main(prog_name="emulator")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
