"""One colour per method, backbone and trial status, shared by every figure of a report.

A reader matches curves across figures by colour, so a name must get the same colour in the
shot curves, the localisation bars and the Grad-CAM captions. Colours come from the names alone
(not from the order a figure happens to list them in): baselines have fixed colours, every other
name is placed in a colour-blind-safe cycle by a stable hash, with collisions resolved in sorted
order within one report.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

#: Okabe-Ito, the colour-blind-safe qualitative palette (black left out: it is the text colour).
CYCLE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#7F3C8D", "#11A579")
#: Baselines keep the same colour in every report: random init grey, ImageNet dark red.
FIXED = {"random": "#7F7F7F", "imagenet": "#A6192E"}
#: Final trial statuses: a collapse or divergence must stand out against completed trials.
STATUS_COLOURS = {"completed": "#009E73", "pruned": "#56B4E9", "collapsed": "#D55E00", "diverged": "#CC79A7",
                  "errored": "#000000", "running": "#E69F00", "lost": "#7F7F7F"}


def _baseline_kind(name: str) -> str | None:
    lowered = name.lower()
    for kind in FIXED:
        if lowered == kind or lowered.startswith(kind + "-") or lowered.startswith(kind + " "):
            return kind
    return None


def palette(names: Iterable[str]) -> dict[str, str]:
    """name -> hex colour for every name of a report (pass them all at once to avoid clashes)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    rest = []
    for name in sorted(set(map(str, names))):
        kind = _baseline_kind(name)
        if kind is not None:
            out[name] = FIXED[kind]
        else:
            rest.append(name)
    for name in rest:
        start = int(hashlib.md5(name.encode()).hexdigest()[:8], 16) % len(CYCLE)
        for step in range(len(CYCLE)):
            colour = CYCLE[(start + step) % len(CYCLE)]
            if colour not in taken:
                break
        out[name] = colour
        taken.add(colour)
    return out


def status_colour(status: str) -> str:
    return STATUS_COLOURS.get(status, "#7F7F7F")
