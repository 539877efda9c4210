"""Test infrastructure shared by the test files: the tiny run's flags and the analysis CLIs."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]

# A whole run in seconds: random ResNet-18 at 64 px (an 8 x 8 grid), 32-dim features, a
# 3-layer MLP trained for 2 epochs on 16 distribution entries.
TINY = ["--backbone", "R18", "--random_init", "--resize", "64", "--imagesize", "64",
        "--pretrain_embed_dimension", "48", "--target_embed_dimension", "32", "-p", "0.25",
        "--dist_coreset_size", "16", "--dist_padding", "2", "--num_layers", "3", "--num_epochs", "2",
        "--step_size", "1", "--dist_batchsize", "64", "--blursigma", "1", "--accelerator", "cpu"]
TRAIN = ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]
MAPS = ("nb", "coor", "patchcore", "nb_coor")


def load_cli(name: str) -> ModuleType:
    """Import ``analysis_code/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "analysis_code" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
