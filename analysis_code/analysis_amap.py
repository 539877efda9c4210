"""Analyse the anomaly maps of a ravel folder (docs/METHOD.md, section 6).

    python analysis_code/analysis_amap.py --project_root_path ./result/ensemble_ravel \
        --visualize --calc_pro

Writes <root>/score_result.csv (one row per category and an `average` row), with
--visualize pictures in <root>/viz/<category>/, with --calc_misclassified_sample
<root>/misclassified_sample_list.csv. --calc_pro adds AUPRO_MVTec (standard MVTec definition)
and AUPRO_PNI (the original PNI code's definition, --max_steps thresholds).
--compare_with_patchcore also analyses a PatchCore ravel folder beside the root
(../patchcore_ravel or <root>_patchcore) and prints both side by side; when neither exists it
only warns.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import pni  # noqa: F401
except ImportError:  # run from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pni import console
from pni.cli import ArgumentParser, exit_with, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project_root_path", default="./result/ensemble_ravel")
    p.add_argument("--calc_pro", action="store_true", help="also compute AUPRO (both definitions)")
    p.add_argument(
        "--compare_with_patchcore",
        action="store_true",
        help="also analyse ../patchcore_ravel or <root>_patchcore if present",
    )
    p.add_argument("--visualize", action="store_true", help="write pictures to <root>/viz/<category>/")
    p.add_argument("--max_steps", type=int, default=2000, help="thresholds of the PNI AUPRO")
    p.add_argument(
        "--calc_misclassified_sample",
        action="store_true",
        help="list misclassified images (image threshold) in misclassified_sample_list.csv",
    )
    p.add_argument("--is_BTAD", action="store_true")
    p.add_argument("--is_MVTec_small", "--is_MVtec_small", dest="is_MVTec_small", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verbose", action="store_true", help="show everything, third-party warnings included")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)

    def work() -> None:
        from pni.analysis import analyse

        analyse(
            args.project_root_path,
            calc_pro=args.calc_pro,
            visualize=args.visualize,
            max_steps=args.max_steps,
            calc_misclassified=args.calc_misclassified_sample,
            is_btad=args.is_BTAD,
            is_mvtec_small=args.is_MVTec_small,
            compare_with_patchcore=args.compare_with_patchcore,
        )

    return run_cli(work, debug=args.debug)


if __name__ == "__main__":
    exit_with(main)
