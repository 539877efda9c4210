"""Datasets (MVTec AD, BTAD, VisA), transforms and the built-in synthetic dataset.

Names are imported lazily so that ``python -m pni.data.synthetic`` does not pay for
importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DATASET_CATEGORIES": "pni.data.datasets",
    "AnomalyDataset": "pni.data.datasets",
    "Sample": "pni.data.datasets",
    "build_datasets": "pni.data.datasets",
    "list_categories": "pni.data.datasets",
    "list_samples": "pni.data.datasets",
    "IMAGENET_MEAN": "pni.data.images",
    "IMAGENET_STD": "pni.data.images",
    "denormalize": "pni.data.transforms",
    "image_transform": "pni.data.transforms",
    "load_image": "pni.data.images",
    "load_mask": "pni.data.transforms",
    "mask_transform": "pni.data.transforms",
    "make_dataset": "pni.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pni.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
