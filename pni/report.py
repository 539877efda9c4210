"""Score tables of finished test runs: per category, and per defect type (which map
catches which defect). ``python -m pni.report --project_root_path ./result``.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from pni.cli import ArgumentParser, run_cli
from pni.errors import PNIError
from pni.metrics import image_auroc, pixel_auroc
from pni.results import MAP_NAMES, format_score_table, read_sample, version_dirs


def latest_run(project_root: str | Path, category: str, backbone: str) -> Path:
    runs = version_dirs(project_root, category, backbone)
    runs = [r for r in runs if (r / "image_scores.csv").is_file()]
    if not runs:
        raise PNIError(f"no finished test run for {category}/{backbone} under {project_root}")
    return runs[-1]


def per_defect_scores(run: Path) -> list[dict]:
    """For each defect type: I-AUROC and P-AUROC of every map family on that type's images
    plus all normal images."""
    with open(run / "image_scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sample_dir = run / "sample"
    good = [r for r in rows if r["defect_type"] == "good"]
    out = []
    for dtype in sorted({r["defect_type"] for r in rows} - {"good"}):
        subset = good + [r for r in rows if r["defect_type"] == dtype]
        labels = np.array([int(r["label"]) for r in subset])
        samples = [read_sample(sample_dir, r["defect_type"], r["stem"]) for r in subset]
        masks = np.stack([s["gt"] for s in samples])
        entry = {"defect_type": dtype, "n": int(labels.sum())}
        for m in MAP_NAMES:
            entry[f"{m}_I-AUROC"] = image_auroc(labels, np.array([float(r[m]) for r in subset]))
            entry[f"{m}_P-AUROC"] = pixel_auroc(masks, np.stack([s[m] for s in samples]))
        out.append(entry)
    return out


def report(project_root: str | Path, categories: Sequence[str], backbone: str) -> str:
    """Both tables as text (per category, then per category/defect type)."""
    cat_rows, defect_rows = [], []
    for category in categories:
        run = latest_run(project_root, category, backbone)
        per_type = per_defect_scores(run)
        with open(run / "image_scores.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        samples = [read_sample(run / "sample", r["defect_type"], r["stem"]) for r in rows]
        labels = np.array([int(r["label"]) for r in rows])
        masks = np.stack([s["gt"] for s in samples])
        entry = {"category": category}
        for m in MAP_NAMES:
            entry[f"{m}_I-AUROC"] = image_auroc(labels, np.array([float(r[m]) for r in rows]))
            entry[f"{m}_P-AUROC"] = pixel_auroc(masks, np.stack([s[m] for s in samples]))
        cat_rows.append(entry)
        defect_rows += [dict(d, defect_type=f"{category}/{d['defect_type']}") for d in per_type]
    return ("AUROC (%) per category\n" + format_score_table(cat_rows, "category", digits=1)
            + "\n\nAUROC (%) per defect type (that type's images + all normal ones)\n"
            + format_score_table(defect_rows, "defect_type", digits=1))


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--project_root_path", default="./result")
    p.add_argument("--categories", nargs="+", required=True)
    p.add_argument("--backbone", default="WR101")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    return run_cli(lambda: print(report(args.project_root_path, args.categories, args.backbone)), args.debug)


if __name__ == "__main__":
    sys.exit(main())
