"""The ``moegraph`` command line. One module per command group; each registers on ``app``.

Errors that moegraph raises on purpose (``MoegraphError``) are printed as one line per problem and
exit with status 2, never with a traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console

from ..errors import MoegraphError

app = typer.Typer(
    name="moegraph",
    help="A declarative compiler for Mixture-of-Experts layers: spec -> plan -> generated code -> layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)

# Command modules register themselves on `app` when imported.
from . import spec_cmds  # noqa: E402,F401

for _optional in ("compile_cmds", "plan_cmds", "run_cmds", "hf_cmds", "demo_cmds"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as exc:  # a stage not built yet; its commands are simply absent
        if exc.name != f"{__name__}.{_optional}":
            raise


def report_error(exc: MoegraphError) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except MoegraphError as exc:
        report_error(exc)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    return 0


def entry() -> None:
    sys.exit(main())
