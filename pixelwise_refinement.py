"""Pixel-wise refinement of PNI anomaly maps (ravel folders); see ``pni.refinement``."""
import sys

from pni.refinement.cli import main

if __name__ == "__main__":
    sys.exit(main())
