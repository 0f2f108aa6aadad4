"""The report as one HTML page, rendered from ``templates/report.html.j2`` with autoescaping:
inline CSS, figures as base64 PNG data URIs, no script, no server."""

from __future__ import annotations

import base64
import dataclasses
import functools
import re
from pathlib import Path

import pandas as pd

from cxrtune.analysis.document import Figure, Note, Paragraph, Section, Table

#: cells printed right-aligned: numbers, "0.581 [0.48, 0.68]", "<0.001", "-0.02", and "–" (missing)
_NUMERIC = re.compile(r"^([-<+]?\d+(\.\d+)?(\s*[\[/].*)?|–)$")


@dataclasses.dataclass(frozen=True)
class Cell:
    text: str
    numeric: bool
    colour: str | None  # a swatch for names that have a colour in the report's palette


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def cells(frame: pd.DataFrame, colours: dict[str, str]) -> list[list[Cell]]:
    """The body of a table: each cell's text is exactly the CSV/Markdown copy's."""
    return [[Cell(text, _NUMERIC.match(text) is not None, colours.get(text))
             for text in map(str, row)] for row in frame.itertuples(index=False)]


@functools.cache
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.tests.update(note=lambda b: isinstance(b, Note), paragraph=lambda b: isinstance(b, Paragraph),
                     table=lambda b: isinstance(b, Table), figure=lambda b: isinstance(b, Figure))
    return env.get_template("report.html.j2")


def page(title: str, meta: str, sections: list[Section], colours: dict[str, str] | None = None) -> str:
    return _template().render(title=title, meta=meta, sections=sections, data_uri=data_uri,
                              cells=functools.partial(cells, colours=colours or {}))
