"""Read what ``--print-config`` printed: key -> (value text, origin)."""

from __future__ import annotations

import re


def parse_config_table(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].startswith("# "), lines[0]
    for line in lines[1:]:
        key, value, origin = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        rows[key] = (value, origin)
    return rows
