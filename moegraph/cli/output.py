"""The one output path of the command line: user text is printed as text, never as rich markup.

Spec names, paths, expressions and error messages may hold brackets (``[red]``, ``[/x]``); rich would
read them as style tags, eat them or fail with ``MarkupError``. Both consoles therefore have markup
off, and the few styled words (``error:``, ``note:``, ``ok``) are added as ``rich.text.Text`` spans
by ``say``.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)


def styled(word: str, style: str) -> Text:
    """A styled word (for table cells); its text is never parsed."""
    return Text(word, style=style)


def say(text: str, *, prefix: str = "", style: str = "", err: bool = False, text_style: str = "") -> None:
    """Print ``prefix`` (styled) and ``text`` (plain, optionally styled as a whole) on one console."""
    line = Text()
    if prefix:
        line.append(prefix + " ", style=style)
    line.append(str(text), style=text_style)
    (err_console if err else console).print(line, soft_wrap=True)


def say_error(message: str) -> None:
    """One ``error:`` line per line of ``message`` on stderr."""
    for line in str(message).splitlines() or ["error"]:
        say(line, prefix="error:", style="bold red", err=True)
