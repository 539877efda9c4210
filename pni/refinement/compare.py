"""Print the scores of two analysed ravel folders side by side (before / after refinement).

``python -m pni.refinement.compare BEFORE_DIR AFTER_DIR`` reads each folder's
``score_result.csv`` (written by ``analysis_code/analysis_amap.py``).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

from pni.cli import ArgumentParser, exit_with, run_cli
from pni.console import print_table, render_table
from pni.errors import PNIError

COLUMNS = ("P-AUROC", "AUPRO_MVTec", "AUPRO_PNI", "I-AUROC")


def _read(folder: Path) -> dict[str, dict[str, str]]:
    """The rows of ``folder/score_result.csv`` by category; PNIError naming the file if it is
    missing, has no ``category`` column or no rows."""
    path = folder / "score_result.csv"
    if not path.is_file():
        raise PNIError(f"missing {path}: run analysis_code/analysis_amap.py --calc_pro on {folder} first")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "category" not in (reader.fieldnames or ()):
            raise PNIError(f"{path} has no category column: not a table of analysis_code/analysis_amap.py")
        rows = {row["category"]: row for row in reader}
    if not rows:
        raise PNIError(f"{path} has no rows: run analysis_code/analysis_amap.py on {folder} again")
    return rows


def _percent(value: str | None) -> str:
    """A table cell in %, or ``n/a`` where the metric was not computed (empty or non-numeric)."""
    if value is None:
        return "n/a"
    try:
        return f"{100 * float(value):.2f}"
    except (TypeError, ValueError):
        return "n/a"


def compare_table(before: Path, after: Path) -> str:
    """Per category (and average): each metric before -> after, in %."""
    a, b = _read(Path(before)), _read(Path(after))
    cols = [c for c in COLUMNS if c in next(iter(a.values())) and c in next(iter(b.values()))]
    common = [cat for cat in a if cat in b]
    if not common:
        raise PNIError(f"{before} and {after} have no category in common")
    head = ["category"] + [f"{c} before -> after" for c in cols]
    lines = [head] + [[cat] + [f"{_percent(a[cat][c])} -> {_percent(b[cat][c])}" for c in cols] for cat in common]
    return render_table(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    return run_cli(
        lambda: print_table(f"{args.before} -> {args.after} (%)", compare_table(Path(args.before), Path(args.after))),
        args.debug,
    )


if __name__ == "__main__":
    exit_with(main)
