"""The names of PNI's four anomaly maps, in the order every array, table and file uses, and
one image's scores as numpy arrays (what prediction reads, whichever runtime scored it).

A module of its own so that the analysis side (results, ravel, ensemble) and prediction can
name the maps without importing torch through :mod:`pni.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAP_NAMES: tuple[str, ...] = ("nb", "coor", "patchcore", "nb_coor")


@dataclass
class MapScores:
    """Scores of one image, each a dict keyed by :data:`MAP_NAMES`: ``coarse`` ``(R, C)`` and
    ``maps`` ``(imagesize, imagesize)`` float32 arrays, ``image`` floats (the fields of
    :class:`pni.scoring.ImageScores`, on the host)."""

    coarse: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    image: dict[str, float] = field(default_factory=dict)
