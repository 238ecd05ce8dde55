"""HTML pieces for the report page: escaped text, base64-embedded images, tables, the inline CSS."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2327;
       margin: 0 auto; max-width: 1240px; padding: 0 24px 48px; }
header { border-bottom: 1px solid #dcdfe3; padding: 12px 0 8px; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; }
h3 { font-size: 15px; margin: 20px 0 6px; }
.meta, .note, figcaption, .empty { color: #5b636b; } .empty { font-style: italic; }
nav a { margin-right: 14px; } .state { font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0 14px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e4e6e8; padding: 3px 10px; text-align: right; }
th:first-child, td:first-child, .text { text-align: left; }
thead th { background: #f3f4f6; } td.err { text-align: left; max-width: 640px;
       overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 12px; }
.sheet { display: grid; gap: 12px 18px;
       grid-template-columns: repeat(auto-fill, minmax(var(--card, 380px), 1fr)); }
.card { border: 1px solid #e4e6e8; border-radius: 6px; padding: 8px; }
.tiles { display: flex; gap: 6px; }
.tiles figure { margin: 0; width: 112px; font-size: 11px; line-height: 1.3; }
.tiles figure.orig { margin-right: 6px; }
.tiles img, .missing { width: 112px; height: 112px; object-fit: contain; display: block;
       image-rendering: pixelated; background: #f3f4f6; }
.missing { display: flex; align-items: center; justify-content: center; color: #8a9199; }
.card .caption { font-size: 12px; margin: 6px 0 0; overflow-wrap: anywhere; }
img.figure { max-width: 100%; height: auto; display: block; margin: 6px 0; }
ul.problems li { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, mime: str, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} src="{data_uri(data, mime)}" alt="{esc(alt)}">'


def empty(text: str) -> str:
    return f'<p class="empty">{esc(text)}</p>'


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], *, text_cols: int = 1) -> str:
    """A table with a header; the first `text_cols` columns are text (left-aligned), an "error"
    column is monospace; a cell that would be empty shows "–" (callers skip empty tables)."""
    th = "".join(
        f'<th class="text">{esc(h)}</th>' if i < text_cols else f"<th>{esc(h)}</th>"
        for i, h in enumerate(head)
    )
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = "–" if v is None or str(v) == "" else str(v)
            cls = "err" if head[i] == "error" else "text" if i < text_cols else ""
            attr = f' class="{cls}"' if cls else ""
            cells.append(f"<td{attr}>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: str) -> str:
    """A whole document: no script, no stylesheet or font from a network, so it opens offline."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )
