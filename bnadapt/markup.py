"""A report as a list of blocks (heading, paragraph, list, table, code, figure), rendered as Markdown
and as one self-contained HTML page (figures embedded as data URIs, no external request)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnadapt.tables import markdown_table


@dataclass
class Block:
    kind: str            # "h1" | "h2" | "h3" | "p" | "table" | "figure" | "code" | "list"
    text: str = ""
    header: list | None = None
    rows: list | None = None
    path: Path | None = None
    items: list | None = None


def to_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {i}" for i in b.items or []))
        elif b.kind == "table":
            out.append(markdown_table(b.header, b.rows))
        elif b.kind == "code":
            out.append(f"```\n{b.text}\n```")
        elif b.kind == "figure":
            rel = b.path.relative_to(base) if b.path.is_relative_to(base) else b.path
            out.append(f"![{b.text}]({rel})\n\n*{b.text}*")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in a paragraph, escaped for HTML."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1a1a1a;line-height:1.45}table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
td,th{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}td.num{text-align:right;white-space:nowrap}
th{background:#f1f3f5}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}code{background:#f4f4f4;padding:0 .2em}
.holds{color:#0a7d28;font-weight:600}.fails{color:#b3261e;font-weight:600}.na{color:#777}"""


def to_html(blocks: list[Block]) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items or []) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join((NUM_TD if _numeric(c) else "<td>") + _cell(c) + "</td>" for c in r)
                           + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "figure":
            data = base64.b64encode(b.path.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bnadapt report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


NUM_TD = '<td class="num">'


def _numeric(c: Any) -> bool:
    import re

    return bool(re.fullmatch(r"[-+]?[0-9.]+( ± [0-9.]+)?%?|n/a", str(c).strip()))


def _cell(c: Any) -> str:
    s = str(c)
    cls = {"holds": "holds", "does not hold": "fails", "not measured": "na"}.get(s)
    return f'<span class="{cls}">{html.escape(s)}</span>' if cls else _inline(s)
