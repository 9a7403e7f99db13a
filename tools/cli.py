"""The ``uniref-deploy`` command line: one click group, one module per verb under ``tools/commands``.

Every ``UnirefError`` becomes one line on stderr and exit code 2 (bad input) or 1 (a failed check); no traceback
unless ``-v`` is given twice.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from uniref_deploy import __version__
from uniref_deploy.runtime.errors import UnirefError

# verb -> module under uniref_deploy.tools.commands; each exposes a click command named `command`
COMMANDS = ("preset", "edit", "export", "build", "compile", "calibrate", "profile", "compare", "inspect", "serve",
            "triton-repo", "load-test")


def _module(verb: str) -> str:
    return f"uniref_deploy.tools.commands.{verb.replace('-', '_')}"


class LazyGroup(click.Group):
    """Imports a verb's module only when that verb runs (keeps `--help` and `edit` free of export deps)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [c for c in COMMANDS if importlib.util.find_spec(_module(c)) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        try:
            module = importlib.import_module(_module(name))
        except ModuleNotFoundError:
            return None
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="uniref-deploy")
@click.option("-v", "--verbose", count=True, help="-v: info logs; -vv: debug logs and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Compile and run multi-reference image-editing DiTs (Qwen-Image-Edit family)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"verbose": verbose}


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    verbose = sum(a.count("v") for a in (argv or sys.argv[1:]) if a.startswith("-v") or a == "--verbose")
    try:
        cli.main(args=argv, prog_name="uniref-deploy", standalone_mode=False)
    except UnirefError as err:
        if verbose >= 2:
            raise
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.UsageError as err:
        verb = err.ctx.command_path if err.ctx is not None else "uniref-deploy"
        click.echo(f"error: {err.format_message()} Hint: see `{verb} --help`.", err=True)
        return 2
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        return 130
    return 0


def run() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
