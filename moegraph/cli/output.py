"""The one output path of the command line: user text is printed as text, never as rich markup nor as
terminal control.

Spec names, paths, expressions and error messages may hold brackets (``[red]``, ``[/x]``); rich would
read them as style tags, eat them or fail with ``MarkupError``. Both consoles therefore have markup
off, and the few styled words (``error:``, ``note:``, ``ok``) are added as ``rich.text.Text`` spans
by ``say``. They may also hold control characters (a spec description's ``ESC ]0;...`` retitling the
terminal, ``ESC [2J`` clearing it): both consoles show every control character of the text they print
(tables and error lines included) as its escape, ``\x1b`` (``visible``); rich's own styling and cursor
control are not text and pass unchanged. A table's cells are escaped before rich lays it out, so that an
escape widens its column, not its cell past the border.
"""

from __future__ import annotations

import re

from rich.console import Console, ConsoleOptions, RenderHook, RenderResult
from rich.table import Table
from rich.text import Text

#: C0 controls but tab and newline, DEL and the C1 controls (``\x9b`` starts a sequence as ``ESC [`` does)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """``text`` with each control character (``_CONTROL``) written as its escape, e.g. ``\x1b``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _Visible:
    """A renderable whose text segments pass through ``visible`` (control segments, rich's own, untouched)."""

    def __init__(self, renderable) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for segment in console.render(self.renderable, options):
            yield segment if segment.control else segment._replace(text=visible(segment.text))


def _escaped(cell):
    """A table cell with its control characters escaped before rich lays the table out (escaped after, a cell
    grew past its column's border). A styled cell holding one keeps its overall style only."""
    if isinstance(cell, str):
        return visible(cell)
    if isinstance(cell, Text) and _CONTROL.search(cell.plain):
        return Text(visible(cell.plain), style=cell.style, justify=cell.justify)
    return cell


def _escape_table(table: Table) -> None:
    table.title, table.caption = _escaped(table.title), _escaped(table.caption)
    for column in table.columns:
        column.header = _escaped(column.header)
        column._cells[:] = [_escaped(c) for c in column._cells]


class _ShowControls(RenderHook):
    def process_renderables(self, renderables: list) -> list:
        for r in renderables:
            if isinstance(r, Table):
                _escape_table(r)
        return [_Visible(r) for r in renderables]


console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)
for _c in (console, err_console):
    _c.push_render_hook(_ShowControls())


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
