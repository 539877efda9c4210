"""Convert an ensemble folder into the flat "ravel" folder (docs/METHOD.md, section 6).

    python analysis_code/convert_result_format.py \
        --before_result_root_dir ./result/ensemble_result \
        --after_result_root_dir ./result/ensemble_ravel

Writes {i:05d}_pred.png (16-bit map), {i:05d}_gt.png (16-bit 0/65535), image{i:05d}.png and
index.csv (index,category,defect_type,stem). --is_MVTec_small (alias --is_MVtec_small) keeps
MVTec's category order and is accepted for the original's command lines.
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
    p.add_argument("--before_result_root_dir", default="./result/ensemble_result")
    p.add_argument("--after_result_root_dir", default="./result/ensemble_ravel")
    p.add_argument("--is_BTAD", action="store_true", help="BTAD categories 01 02 03")
    p.add_argument(
        "--is_MVTec_small",
        "--is_MVtec_small",
        dest="is_MVTec_small",
        action="store_true",
        help="the original's small MVTec version (same category order)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verbose", action="store_true", help="show everything, third-party warnings included")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    if args.is_BTAD and args.is_MVTec_small:
        print("error: --is_BTAD and --is_MVTec_small exclude each other", file=sys.stderr)
        return 2

    def work() -> None:
        from pni.ravel import convert

        convert(args.before_result_root_dir, args.after_result_root_dir, args.is_BTAD, args.is_MVTec_small)

    return run_cli(work, debug=args.debug)


if __name__ == "__main__":
    exit_with(main)
