"""A self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no script, no server.
It opens offline, survives being mailed or attached to an MLflow run, and prints."""

from __future__ import annotations

import base64
import html
import io
import re

import pandas as pd

#: cells printed right-aligned: numbers, "0.581 [0.48, 0.68]", "<0.001", "-0.02"
_NUMERIC = re.compile(r"^[-<+]?\d+(\.\d+)?(\s*[\[/].*)?$")

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1a1a1a;background:#fff}
main{max-width:1140px;margin:0 auto;padding:12px 24px 48px}
h1{font-size:26px;margin:18px 0 4px} h2{font-size:21px;margin:34px 0 8px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px} p,li{font-size:14px;line-height:1.45} .meta{color:#555;font-size:13px}
nav{font-size:14px;margin:8px 0 4px} nav a{margin-right:14px;color:#0063a6;text-decoration:none}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d0d0;padding:4px 8px;text-align:right} th{background:#f3f5f7}
td:first-child,th:first-child,td.text{text-align:left}
.note{background:#fff8e1;border-left:4px solid #e6a700;padding:8px 12px;font-size:14px;margin:10px 0}
.warn{background:#fdecea;border-left:4px solid #c62828;padding:8px 12px;font-size:14px;margin:10px 0}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
img{max-width:100%;height:auto;display:block;margin:6px 0}
"""


def figure_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def note(text: str, kind: str = "note") -> str:
    return f'<div class="{kind}">{html.escape(text)}</div>'


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def table_html(frame: pd.DataFrame, table_id: str, colours: dict[str, str] | None = None) -> str:
    """A table whose cells hold the exact text of the CSV/Markdown copies; a colour swatch marks
    backbone names that have a colour in the report's palette."""
    colours = colours or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            text = html.escape(str(value))
            swatch = (f'<span class="swatch" style="background:{colours[str(value)]}"></span>'
                      if str(value) in colours else "")
            numeric = _NUMERIC.match(str(value)) is not None or str(value) == "–"
            klass = "" if numeric else ' class="text"'
            cells.append(f"<td{klass}>{swatch}{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def page(title: str, meta: str, sections: list[tuple[str, str, str]]) -> str:
    """``sections``: (anchor, heading, inner html)."""
    nav = "".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{html.escape(h)}</h2>{inner}</section>' for a, h, inner in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main><h1>{html.escape(title)}</h1><div class="meta">{html.escape(meta)}</div>'
            f"<nav>{nav}</nav>{body}</main></body></html>")
