#!/usr/bin/env python
"""Predict new images with a model bundle made by export_model.py (README, "Use on your own
images"). Exit status 0, 1 if some input could not be read (see errors.csv), 2 on bad flags
or a bad bundle."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from pni import console
    from pni.cli import run_cli
    from pni.config import build_predict_parser, predict_settings_from_flags
    from pni.predict_files import predict_files

    args = build_predict_parser().parse_args(argv)
    console.setup(args.verbose)
    settings = predict_settings_from_flags(args)
    return run_cli(lambda: 1 if predict_files(settings) else 0, debug=args.debug)


if __name__ == "__main__":
    from pni.cli import exit_with

    exit_with(main)
