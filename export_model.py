#!/usr/bin/env python
"""Export a trained PNI model as a self-contained bundle with calibrated thresholds (README,
"Use on your own images"). Takes the flags of train_coreset_distribution.py plus --output."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from pni import console
    from pni.cli import run_cli
    from pni.config import build_export_parser, export_settings_from_flags, parse_args, settings_from_flags
    from pni.export import export

    args = parse_args(argv, build_export_parser())
    console.setup(args.verbose)
    settings, export_settings = settings_from_flags(args), export_settings_from_flags(args)
    return run_cli(lambda: export(settings, export_settings), debug=args.debug)


if __name__ == "__main__":
    from pni.cli import exit_with

    exit_with(main)
