"""The ``moegraph`` command line. One module per command group; each registers on ``app``.

Errors that moegraph raises on purpose (``MoegraphError``) are printed as one line per problem and
exit with status 2, never with a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import typer
import typer.main

from ..errors import MoegraphError
from .output import console, err_console, say, say_error  # noqa: F401  (markup never interpreted)

app = typer.Typer(
    name="moegraph",
    help="A declarative compiler for Mixture-of-Experts layers: spec -> plan -> generated code -> layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        console.print(f"moegraph {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the moegraph version and exit."),
) -> None:
    """A declarative compiler for Mixture-of-Experts layers: spec -> plan -> generated code -> layer."""


# Command modules register themselves on `app` when imported.
from . import spec_cmds  # noqa: E402,F401

for _optional in ("compile_cmds", "plan_cmds", "run_cmds", "hf_cmds", "demo_cmds", "export_cmds", "tune_cmds"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as exc:  # a stage not built yet; its commands are simply absent
        if exc.name != f"{__name__}.{_optional}":
            raise


def report_error(exc: MoegraphError) -> None:
    say_error(str(exc) or type(exc).__name__)


def _click_exceptions():
    """The click exception classes typer may raise.

    typer >= 0.29 ships its own copy of click (``typer._click``) and no longer depends on click;
    older typer uses click itself. Collect the classes of whichever are installed, without ever
    requiring click (it is not one of our dependencies).
    """
    import importlib

    exit_, usage, abort = [typer.Exit], [], []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            exceptions = importlib.import_module(mod)
        except ImportError:
            continue
        for name, bucket in (("Exit", exit_), ("ClickException", usage), ("Abort", abort)):
            cls = getattr(exceptions, name, None)
            if cls is not None and cls not in bucket:
                bucket.append(cls)
    return tuple(exit_), tuple(usage), tuple(abort)


#: commands that never generate code nor run a layer (specs, planning, traces, plan export): the CLI
#: configures neither for them, so that they run without importing torch (2 of the 3 s a command took)
_NO_LAYER_COMMANDS = frozenset({"plan", "trace", "export", "validate", "show", "schema", "presets"})


def _configure_from_environment(argv: list[str] | None = None) -> None:
    """The one place that reads the environment: generated code and the tuned expert-strategy table
    go under $XDG_CACHE_HOME if set (else ~/.cache). Skipped for a command of ``_NO_LAYER_COMMANDS``."""
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), None)
    if command in _NO_LAYER_COMMANDS:
        return
    from .. import codegen, tuning

    xdg = os.environ.get("XDG_CACHE_HOME")
    codegen.set_cache_dir(Path(xdg) / "moegraph" / "generated" if xdg else None)
    tuning.enable_tuning(tuned_cache_dir(xdg))


def tuned_cache_dir(xdg: str | None) -> Path:
    """Where the CLI keeps tuned expert-strategy tables (one JSON file per device identity)."""
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moegraph" / "tuned"


@functools.cache
def _command() -> typer.main.TyperGroup:
    """The click command typer builds from the commands' signatures, built once per process. ``app()`` builds it
    again on every call (evaluating every annotation of every command: 40-50 ms, half the time of a small
    command run in-process, as the tests and tools that call ``main`` many times do); with pretty exceptions
    off, that call adds nothing else to calling the command."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for moegraph errors and usage errors)."""
    exit_types, click_errors, abort_types = _click_exceptions()
    try:
        with warnings.catch_warnings():  # a warning is one 'warning:' line, as errors are (no source line)
            warnings.showwarning = _warning_line
            # (reads the tuned table, which may warn; imports torch: a Ctrl-C in those seconds says 'aborted' too)
            _configure_from_environment(argv)
            rc = _command()(args=argv, standalone_mode=False, prog_name="moegraph")
    except MoegraphError as exc:
        report_error(exc)
        return 2
    except exit_types as exc:
        return exc.exit_code
    except click_errors as exc:
        exc.show()
        return exc.exit_code
    except (*abort_types, KeyboardInterrupt):
        err_console.print("aborted")
        return _INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`moegraph ... | head -1`): files are written first; stop quietly
        _silence_stdout()
        return 1  # as rich's consoles do when they meet the closed pipe themselves (Console.on_broken_pipe)
    if rc == _INTERRUPTED:  # typer >= 0.29 turns Ctrl-C into Exit(130) and returns its code: say why it stopped
        err_console.print("aborted")
    return rc if isinstance(rc, int) else 0


#: the exit status of a command stopped by Ctrl-C (128 + SIGINT, as shells report it)
_INTERRUPTED = 130


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    say(str(message), prefix="warning:", style="bold yellow", err=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured in tests): nothing to flush
        pass


def entry() -> None:
    sys.exit(main())
