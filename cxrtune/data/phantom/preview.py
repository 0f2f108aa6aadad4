"""A contact sheet of the phantom: a normal study and one study per finding with its box drawn,
so a person can judge at a glance whether the images look like chest radiographs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from cxrtune.data.phantom.builder import BILATERAL, Renderer, _seed
from cxrtune.data.phantom.findings import FINDINGS, NORMAL, boxes_of


class _Row:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def preview_rows(seed: int = 0, severity: float = 0.7) -> list[_Row]:
    rows = []
    for i, finding in enumerate((NORMAL,) + FINDINGS):
        pseed = _seed(seed, 2, i)
        rows.append(_Row(anatomy=0, patient_seed=pseed, study_seed=_seed(pseed, 9, 0), finding=finding,
                         severity=severity if finding != NORMAL else 0.0, finding_seed=_seed(pseed, 7, i)))
    return rows


def preview_contact_sheet(out_png: str | Path, size: int = 256, seed: int = 0, ct: str | None = None,
                          columns: int = 4) -> Path:
    """Write the contact sheet to ``out_png`` (atomically) and return its path."""
    from cxrtune.data.phantom.anatomy import anatomy_pool

    renderer = Renderer(anatomy_pool(ct, None))
    rows = preview_rows(seed)
    label_h = max(14, size // 14)
    n_rows = -(-len(rows) // columns)
    sheet = Image.new("RGB", (columns * size, n_rows * (size + label_h)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for k, row in enumerate(rows):
        img = renderer.render(row, size)
        x, y = (k % columns) * size, (k // columns) * (size + label_h)
        sheet.paste(Image.fromarray(img).convert("RGB"), (x, y))
        if row.finding != NORMAL:
            mask = renderer.mask(row, size)
            p = renderer.of(row, size, light=True)
            for x0, y0, x1, y1 in boxes_of(mask, p.mid_col if row.finding in BILATERAL else None):
                draw.rectangle([x + x0 * size, y + y0 * size, x + x1 * size - 1, y + y1 * size - 1],
                               outline=(255, 60, 60), width=max(1, size // 128))
        text = row.finding + (f" (severity {row.severity:.1f})" if row.finding != NORMAL else "")
        draw.text((x + 3, y + size + 1), text, fill=(255, 230, 120))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_png.name + ".", suffix=".png", dir=out_png.parent)
    os.close(fd)
    try:
        sheet.save(tmp, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a contact sheet is for anyone to look at
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png
