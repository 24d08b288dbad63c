"""The `edgesvd` command line: parse options, call one public function per command, print its result.

Every EdgesvdError becomes one `error: …` line and its exit code; nothing below this package
imports it, and it holds no global console: each command makes its own (stdout for results,
stderr for progress).
"""

from __future__ import annotations

import sys

import click

from edgesvd.errors import EdgesvdError

from .compress import compress, inspect
from .export import export, pack, profile, report, verify
from .profiles import calibrate_device, plan, profiles
from .run import run


class _Group(click.Group):
    """Turns every EdgesvdError raised by a command, click's usage errors and an OSError that
    escaped the library's own handling (an output it could not write) into one `error: …` line
    and the error's exit code (2 for bad input, usage and the environment; 1 for a failed check)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgesvdError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # the environment, not edgesvd: a disk, a permission, a limit
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgesvd")
def main() -> None:
    """edgesvd: compress transformer models by learned low-rank factorization for edge devices."""


for _command in (compress, inspect, export, verify, profile, pack, run, report, profiles, plan, calibrate_device):
    main.add_command(_command)
