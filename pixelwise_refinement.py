"""Pixel-wise refinement of PNI anomaly maps (ravel folders); see ``pni.refinement``."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from pni.refinement.cli import main as refinement_main  # heavy imports inside exit_with's Ctrl-C handling

    return refinement_main(argv)


if __name__ == "__main__":
    from pni.cli import exit_with

    exit_with(main)
