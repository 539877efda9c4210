"""Score tables of finished test runs: per category, and per defect type (which map
catches which defect)::

    python -m pni.report --project_root_path ./result --categories bottle cable --backbone WR101
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from pni.cli import ArgumentParser, exit_with, run_cli
from pni.console import titled
from pni.errors import PNIError
from pni.io import load_json
from pni.results import MAP_NAMES, auroc_scores, format_score_table, read_sample, version_dirs


def latest_run(project_root: str | Path, category: str, backbone: str) -> Path:
    runs = version_dirs(project_root, category, backbone)
    runs = [r for r in runs if (r / "image_scores.csv").is_file()]
    if not runs:
        raise PNIError(f"no finished test run for {category}/{backbone} under {project_root}")
    return runs[-1]


def load_run(run: Path) -> tuple[list[dict], list[dict]]:
    """``image_scores.csv`` rows of a test run and each row's sample files (read once)."""
    with open(run / "image_scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, [read_sample(run / "sample", r["defect_type"], r["stem"]) for r in rows]


def run_variant(run: Path) -> dict[str, object]:
    """``variant`` and ``mask_workers`` of a test run, from its ``settings.json``."""
    path = run / "settings.json"
    settings = load_json(path) if path.is_file() else {}
    return {"variant": settings.get("variant", "?"), "mask_workers": settings.get("mask_workers", "")}


def auroc_entry(rows: Sequence[dict], samples: Sequence[dict]) -> dict[str, float | None]:
    """I-AUROC and P-AUROC of every map family over the given images."""
    return auroc_scores(
        [int(r["label"]) for r in rows],
        {m: [float(r[m]) for r in rows] for m in MAP_NAMES},
        [s["gt"] for s in samples],
        {m: [s[m] for s in samples] for m in MAP_NAMES},
    )


def per_defect_scores(rows: Sequence[dict], samples: Sequence[dict]) -> list[dict]:
    """For each defect type: the AUROCs on that type's images plus all normal images."""
    good = [i for i, r in enumerate(rows) if r["defect_type"] == "good"]
    out = []
    for dtype in sorted({r["defect_type"] for r in rows} - {"good"}):
        subset = good + [i for i, r in enumerate(rows) if r["defect_type"] == dtype]
        entry = auroc_entry([rows[i] for i in subset], [samples[i] for i in subset])
        out.append({"defect_type": dtype, "n": len(subset) - len(good), **entry})
    return out


def report(project_root: str | Path, categories: Sequence[str], backbone: str) -> str:
    """Both tables as text (per category, then per category/defect type)."""
    cat_rows, defect_rows = [], []
    for category in categories:
        run = latest_run(project_root, category, backbone)
        rows, samples = load_run(run)
        variant = run_variant(run)
        cat_rows.append({"category": category, **variant, **auroc_entry(rows, samples)})
        defect_rows += [
            dict(d, defect_type=f"{category}/{d['defect_type']}", **variant) for d in per_defect_scores(rows, samples)
        ]
    return titled("AUROC (%) per category", format_score_table(cat_rows, "category", digits=1)) + titled(
        "AUROC (%) per defect type (that type's images + all normal ones)",
        format_score_table(defect_rows, "defect_type", digits=1),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--project_root_path", default="./result")
    p.add_argument("--categories", nargs="+", required=True)
    p.add_argument("--backbone", default="WR101")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    return run_cli(lambda: print(report(args.project_root_path, args.categories, args.backbone), end=""), args.debug)


if __name__ == "__main__":
    exit_with(main)
