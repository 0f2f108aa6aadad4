"""Indexing all of NIH ChestX-ray14: one directory scan per folder vs one ``stat`` per image.

Builds a fake NIH folder in the NIH-box layout (the real ``Data_Entry_2017_v2020.csv``, 112,120
empty files spread over ``images_001/ ... images_012/``), then times, in the same run:

- ``NihSource.build_index()`` end to end (CSV parse, splits, one ``os.scandir`` per folder);
- the file lookup alone, three ways: the scan the source does; a per-image ``os.path.isfile``
  probe of each candidate folder until found (what a naive loader does when it does not know
  which ``images_NNN`` holds an image); one ``os.path.isfile`` per image on its known path.

The file lookup dominates on network file systems, where every stat is a round trip; on a local
disk with a warm cache the difference is smaller. Output: one line per side and the ratio.

    python bench/nih_index.py --csv PATH/Data_Entry_2017_v2020.csv.gz [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from cxrtune.data.sources.files import scan_folders, subfolders
from cxrtune.data.sources.nih import NihSource


def make_layout(csv: Path, workdir: Path) -> tuple[Path, list[str]]:
    root = Path(tempfile.mkdtemp(prefix="nih-bench-", dir=workdir))
    shutil.copy(csv, root / csv.name)
    names = pd.read_csv(csv, usecols=["Image Index"])["Image Index"].tolist()
    per_folder = -(-len(names) // 12)
    for k in range(12):
        folder = root / f"images_{k + 1:03d}"
        folder.mkdir()
        for name in names[k * per_folder:(k + 1) * per_folder]:
            open(folder / name, "wb").close()
    return root, names


def probe_each(root: Path, names: list[str]) -> dict[str, str]:
    folders = [root / "images"] + subfolders(root, "images_*") + [root]
    found = {}
    for name in names:
        for folder in folders:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found[name] = path
                break
    return found


def stat_each(paths: list[str]) -> int:
    return sum(os.path.isfile(p) for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, required=True, help="Data_Entry_2017_v2020.csv(.gz)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    root, names = make_layout(args.csv, args.workdir)
    try:
        folders = [root / "images"] + subfolders(root, "images_*") + [root]
        start = time.perf_counter()
        scanned = scan_folders(folders)
        scan_s = time.perf_counter() - start
        start = time.perf_counter()
        probed = probe_each(root, names)
        probe_s = time.perf_counter() - start
        assert scanned == probed and len(scanned) == len(names)
        start = time.perf_counter()
        assert stat_each(list(scanned.values())) == len(names)
        stat_s = time.perf_counter() - start
        start = time.perf_counter()
        index = NihSource(root).build_index()
        build_s = time.perf_counter() - start
        print(json.dumps({"images": len(index), "build_index_s": round(build_s, 3)}))
        print(json.dumps({"side": "scan (os.scandir per folder)", "seconds": round(scan_s, 3)}))
        print(json.dumps({"side": "probe (os.path.isfile per image and folder)", "seconds": round(probe_s, 3)}))
        print(json.dumps({"side": "stat (os.path.isfile per image, folder known)", "seconds": round(stat_s, 3)}))
        print(json.dumps({"ratio_probe_over_scan": round(probe_s / scan_s, 1),
                          "ratio_stat_over_scan": round(stat_s / scan_s, 1)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
