"""Plain-text and Markdown tables made from result numbers (never stored in result files)."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table with a dashed rule under the header."""
    cols = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols if i < len(r)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage string (``n/a`` for None)."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def pct_cell(cell: dict | None) -> str:
    """``mean ± 2 sd`` of a repeated-runs cell (``{"mean", "two_sd", ...}``) in percent."""
    if cell is None:
        return "n/a"
    return f"{100 * cell['mean']:.1f} ± {100 * cell['two_sd']:.2f}"
