"""The names of PNI's four anomaly maps, in the order every array, table and file uses.

A module of its own so that the analysis side (results, ravel, ensemble) can name the maps
without importing torch through :mod:`pni.scoring`.
"""

MAP_NAMES: tuple[str, ...] = ("nb", "coor", "patchcore", "nb_coor")
