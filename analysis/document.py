"""What a report says, apart from how it is printed: sections of notes, paragraphs, tables and
figures. :mod:`cxrtune.analysis.webpage` prints it as HTML, :func:`markdown` as Markdown, and the report
folder keeps each table as CSV and each figure as PNG, so every copy holds the same cells."""

from __future__ import annotations

import dataclasses
import io

import pandas as pd

from cxrtune.analysis.tables import to_markdown


@dataclasses.dataclass(frozen=True)
class Note:
    text: str
    warn: bool = False  # a problem with the sweep, not an explanation


@dataclasses.dataclass(frozen=True)
class Paragraph:
    text: str


@dataclasses.dataclass(frozen=True, eq=False)  # a DataFrame has no truth value to compare by
class Table:
    """``key`` names the CSV file and the HTML table's id; cells are printed as they are."""

    key: str
    frame: pd.DataFrame
    title: str


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    png: bytes
    alt: str


Block = Note | Paragraph | Table | Figure


@dataclasses.dataclass
class Section:
    """``data``: tables only written as CSV (full-precision numbers behind a shown table)."""

    anchor: str
    title: str
    blocks: list[Block]
    data: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)


def figure(key: str, fig, alt: str) -> Figure:
    """A matplotlib figure as a PNG block; the figure is closed, as a report makes dozens."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Figure(key, buffer.getvalue(), alt)


def all_tables(sections: list[Section]) -> dict[str, pd.DataFrame]:
    """Every table of the report by key, shown or not."""
    out: dict[str, pd.DataFrame] = {}
    for section in sections:
        out.update((b.key, b.frame) for b in section.blocks if isinstance(b, Table))
        out.update(section.data)
    return out


def pngs(sections: list[Section]) -> dict[str, bytes]:
    return {b.key: b.png for s in sections for b in s.blocks if isinstance(b, Figure)}


def markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown; figures point at ``figures/<key>.png`` beside it."""
    lines = [f"# {title}\n"]
    for section in sections:
        lines.append(f"## {section.title}\n")
        for block in section.blocks:
            if isinstance(block, Note):
                lines.append(f"> {block.text}\n")
            elif isinstance(block, Paragraph):
                lines.append(f"{block.text}\n")
            elif isinstance(block, Table):
                lines.append(f"### {block.title}\n\n{to_markdown(block.frame)}")
            else:
                lines.append(f"![{block.alt}](figures/{block.key}.png)\n")
    return "\n".join(lines)
