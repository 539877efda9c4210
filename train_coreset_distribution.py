#!/usr/bin/env python
"""Train PNI for one category and score its test set (see README and docs/METHOD.md)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from pni import console
    from pni.cli import run_cli
    from pni.config import parse_args, settings_from_flags
    from pni.pipeline import run

    args = parse_args(argv)
    console.setup(args.verbose)
    settings = settings_from_flags(args)
    return run_cli(lambda: run(settings), debug=args.debug)


if __name__ == "__main__":
    from pni.cli import exit_with

    exit_with(main)
