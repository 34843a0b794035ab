"""Tables the commands print: `rich` tables when stdout is a terminal, plain aligned text otherwise
(a pipe, a file, a test), so what a script reads never holds box-drawing characters or colours."""

from __future__ import annotations

import sys


def is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def print_table(headers: list[str], rows: list[list[str]], *, title: str | None = None) -> None:
    """Print `rows` under `headers` (every cell a string; numbers right-aligned)."""
    if is_terminal():
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title, title_justify="left")
            for index, header in enumerate(headers):
                numeric = all(_numeric(row[index]) for row in rows if index < len(row))
                table.add_column(header, justify="right" if numeric and index else "left")
            for row in rows:
                table.add_row(*row)
            Console(file=sys.stdout).print(table)
            return
        except ImportError:  # rich is optional: plain text below
            pass
    widths = [max([len(h)] + [len(row[i]) for row in rows if i < len(row)]) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        cells = [(c.rjust(w) if _numeric(c) and i else c.ljust(w)) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


def _numeric(text: str) -> bool:
    try:
        float(str(text).rstrip("%").replace(",", ""))
        return True
    except ValueError:
        return False
