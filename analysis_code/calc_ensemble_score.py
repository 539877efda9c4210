"""Ensemble the test runs of several backbones (docs/METHOD.md, section 6).

    python analysis_code/calc_ensemble_score.py --category bottle \
        --backbone_list WR101 RNX101 DN201 --save_type nb_coor

Without --category every category under --project_root_path that holds runs of the first
backbone is ensembled.
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
from pni.results import MAP_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--category",
        nargs="+",
        default=None,
        help="one or more categories (default: all found under --project_root_path)",
    )
    p.add_argument("--project_root_path", default="./result")
    p.add_argument("--ensemble_root_path", default="./result/ensemble_result")
    p.add_argument(
        "--save_type", default="nb_coor", choices=MAP_NAMES, help="map family written to --ensemble_root_path"
    )
    p.add_argument("--version_num", type=int, default=1, help="1 = newest run of each backbone, k = k-th newest")
    p.add_argument("--backbone_list", nargs="+", default=["WR101", "RNX101", "DN201"])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verbose", action="store_true", help="show everything, third-party warnings included")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)

    def work() -> None:
        from pni.ensemble import run_ensemble

        run_ensemble(
            args.project_root_path,
            args.ensemble_root_path,
            args.category,
            args.backbone_list,
            args.save_type,
            args.version_num,
        )

    return run_cli(work, debug=args.debug)


if __name__ == "__main__":
    exit_with(main)
