#!/usr/bin/env python
"""Predict new images with a model bundle made by export_model.py (README, "Use on your own
images"). Exit status 0, 1 if some input could not be read (see errors.csv), 2 on bad flags
or a bad bundle."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from pni.cli import run_cli
    from pni.config import build_predict_parser
    from pni.predict import predict_files

    args = build_predict_parser().parse_args(argv)
    failed: list[int] = []
    code = run_cli(lambda: failed.append(predict_files(args)), debug=args.debug)
    return 1 if code == 0 and failed and failed[0] else code


if __name__ == "__main__":
    sys.exit(main())
