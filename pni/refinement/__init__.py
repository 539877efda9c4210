"""Pixel-wise refinement model (docs/METHOD.md, section 7): model, ravel/synthetic data, training, inference.

Importing this package does not import Lightning (see ``pni.refinement.lightning``).
"""

from pni.ravel import read_png16, write_png16

from .data import (
    RavelRefinementDataset,
    SyntheticRefinementDataset,
    make_synthetic_triple,
    make_synthetic_triples,
    read_map,
)
from .geometry import zoom_map
from .infer import refine_ravel_folder
from .model import RefinementNet, build_fresh_model, load_refinement_checkpoint, load_refinement_state_dict
from .train import refinement_loss, save_state_dict, select_device, train_step

__all__ = [
    "RavelRefinementDataset",
    "SyntheticRefinementDataset",
    "make_synthetic_triple",
    "make_synthetic_triples",
    "read_map",
    "read_png16",
    "write_png16",
    "zoom_map",
    "refine_ravel_folder",
    "RefinementNet",
    "build_fresh_model",
    "load_refinement_checkpoint",
    "load_refinement_state_dict",
    "refinement_loss",
    "save_state_dict",
    "select_device",
    "train_step",
]
