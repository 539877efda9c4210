"""Print the scores of two analysed ravel folders side by side (before / after refinement).

``python -m pni.refinement.compare BEFORE_DIR AFTER_DIR`` reads each folder's
``score_result.csv`` (written by ``analysis_code/analysis_amap.py``).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

from pni.cli import ArgumentParser, exit_with, run_cli
from pni.console import print_table
from pni.errors import PNIError
from pni.results import render_table

COLUMNS = ("P-AUROC", "AUPRO_MVTec", "AUPRO_PNI", "I-AUROC")


def _read(folder: Path) -> dict[str, dict[str, str]]:
    path = folder / "score_result.csv"
    if not path.is_file():
        raise PNIError(f"missing {path}: run analysis_code/analysis_amap.py --calc_pro on {folder} first")
    with open(path, newline="") as fh:
        return {row["category"]: row for row in csv.DictReader(fh)}


def compare_table(before: Path, after: Path) -> str:
    """Per category (and average): each metric before -> after, in %."""
    a, b = _read(Path(before)), _read(Path(after))
    cols = [c for c in COLUMNS if c in next(iter(a.values())) and c in next(iter(b.values()))]
    head = ["category"] + [f"{c} before -> after" for c in cols]
    lines = [head]
    for cat in a:
        if cat in b:
            lines.append([cat] + [f"{100 * float(a[cat][c]):.2f} -> {100 * float(b[cat][c]):.2f}" for c in cols])
    return render_table(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    return run_cli(lambda: print_table(f"{args.before} -> {args.after} (%)",
                                       compare_table(Path(args.before), Path(args.after))), args.debug)


if __name__ == "__main__":
    exit_with(main)
