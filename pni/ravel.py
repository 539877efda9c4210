"""The flat "ravel" folder (docs/METHOD.md, section 6; ``convert_result_format.py``).

Input: an ensemble folder ``<before>/<cat>/{test,ground_truth,anomaly_map}/<type>/...`` as
written by :mod:`pni.ensemble`. Output: ``{i:05d}_pred.png`` (uint16 = map * 65535,
truncated), ``{i:05d}_gt.png`` (uint16 0/65535), ``image{i:05d}.png`` (8-bit RGB) and
``index.csv`` (``index,category,defect_type,stem``). The running index goes over categories
in MVTec's fixed order (those present; other names follow, sorted), BTAD's ``01 02 03``
with ``is_btad``; within a category by sorted defect type, then sorted stem.
16-bit PNGs are written and read with OpenCV (``IMREAD_UNCHANGED``).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pni.cli import warn
from pni.errors import PNIError
from pni.io import check_name, load_npy, write_csv
from pni.viz import save_png

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")
INDEX_CSV = "index.csv"
INDEX_COLUMNS: tuple[str, ...] = ("index", "category", "defect_type", "stem")
NORMAL_TYPES = ("good", "ok")
_RAVEL_NAME = re.compile(r"^(?:(\d{5})_(?:pred|gt)|image(\d{5}))\.png$")


@dataclass(frozen=True)
class Entry:
    """One row of ``index.csv``."""

    index: int
    category: str
    defect_type: str
    stem: str


def pred_path(root: Path, i: int) -> Path:
    return root / f"{i:05d}_pred.png"


def gt_path(root: Path, i: int) -> Path:
    return root / f"{i:05d}_gt.png"


def image_path(root: Path, i: int) -> Path:
    return root / f"image{i:05d}.png"


def write_png16(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a 2-D uint16 array as a 16-bit greyscale PNG (atomic)."""
    array = np.asarray(array)
    if array.dtype != np.uint16 or array.ndim != 2:
        raise ValueError(f"expected a 2-D uint16 array for {path}, got {array.dtype} {array.shape}")
    save_png(path, array)


def read_png16(path: str | os.PathLike) -> np.ndarray:
    """Read a 16-bit greyscale PNG as uint16 (an 8-bit file is scaled by 257)."""
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise PNIError(f"cannot read {path}")
    if a.ndim == 3:
        a = a[..., 0]
    if a.dtype == np.uint8:
        a = a.astype(np.uint16) * 257
    if a.dtype != np.uint16:
        raise PNIError(f"{path}: expected a 16-bit PNG, got {a.dtype}")
    return a


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H,W,3) uint8 RGB (grayscale / RGBA / 16-bit converted)."""
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise PNIError(f"cannot read {path}")
    if a.dtype == np.uint16:
        a = (a // 257).astype(np.uint8)
    if a.ndim == 2:
        return cv2.cvtColor(a, cv2.COLOR_GRAY2RGB)
    if a.shape[2] == 4:
        return cv2.cvtColor(a, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB)


def map_to_uint16(amap: np.ndarray) -> np.ndarray:
    """``uint16(map * 65535)`` (truncation, as the original) of a map in [0, 1]."""
    return (np.clip(amap.astype(np.float64), 0.0, 1.0) * 65535).astype(np.uint16)


def category_order(found: Sequence[str], is_btad: bool = False) -> list[str]:
    """Categories in the running-index order (see the module docstring)."""
    fixed = BTAD_CATEGORIES if is_btad else MVTEC_CATEGORIES
    return [c for c in fixed if c in found] + sorted(c for c in found if c not in fixed)


def find_categories(before: Path) -> list[str]:
    """Sub-folders of ``before`` that hold an ``anomaly_map`` folder."""
    if not before.is_dir():
        raise PNIError(f"--before_result_root_dir {before} does not exist")
    cats = [p.name for p in before.iterdir() if (p / "anomaly_map").is_dir()]
    if not cats:
        raise PNIError(f"no <category>/anomaly_map folder in {before} (run calc_ensemble_score.py first)")
    return cats


def category_items(cat_dir: Path) -> list[tuple[str, str]]:
    """Sorted ``(defect_type, stem)`` of ``anomaly_map/<type>/<stem>.npy``."""
    items = sorted((p.parent.name, p.stem) for p in (cat_dir / "anomaly_map").glob("*/*.npy"))
    if not items:
        raise PNIError(f"no anomaly_map/<type>/<stem>.npy files in {cat_dir}")
    return items


def _read_mask(path: Path, defect_type: str, shape: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        if defect_type in NORMAL_TYPES:
            return np.zeros(shape, dtype=bool)
        raise PNIError(f"missing ground-truth mask {path}")
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise PNIError(f"cannot read {path}")
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > 0


def convert(
    before: str | os.PathLike,
    after: str | os.PathLike,
    is_btad: bool = False,
    is_mvtec_small: bool = False,
    categories: Sequence[str] | None = None,
) -> list[Entry]:
    """Write the ravel folder ``after`` from the ensemble folder ``before``; return the index.

    ``is_mvtec_small`` does not change the conversion (it uses MVTec's order); it exists
    for the original's command lines. Stale ravel files beyond the new count are removed.
    """
    del is_mvtec_small
    before, after = Path(before), Path(after)
    found = list(categories) if categories else find_categories(before)
    order = category_order(found, is_btad)
    items = {cat: category_items(before / cat) for cat in order}
    for cat in order:  # every input exists before the first file is written
        for t, s in items[cat]:
            img_file = before / cat / "test" / t / f"{s}.png"
            if not img_file.is_file():
                raise PNIError(f"missing test image {img_file} for {before / cat / 'anomaly_map' / t / (s + '.npy')}")
            mask_file = before / cat / "ground_truth" / t / f"{s}_mask.png"
            if t not in NORMAL_TYPES and not mask_file.is_file():
                raise PNIError(f"missing ground-truth mask {mask_file}")
    entries: list[Entry] = []
    i = 0
    for cat in order:
        cat_dir = before / cat
        for t, s in items[cat]:
            npy = cat_dir / "anomaly_map" / t / f"{s}.npy"
            try:
                amap = load_npy(npy)
            except (OSError, ValueError) as exc:
                raise PNIError(f"cannot read {npy}: {exc}") from None
            if amap.ndim != 2:
                raise PNIError(f"{npy}: expected a 2-D map, got shape {amap.shape}")
            if not np.all(np.isfinite(amap)) or amap.min() < -1e-4 or amap.max() > 1 + 1e-4:
                raise PNIError(f"{npy}: map values must lie in [0, 1] (normalised ensemble map)")
            img_file = cat_dir / "test" / t / f"{s}.png"
            if not img_file.is_file():
                raise PNIError(f"missing test image {img_file} for {npy}")
            image = read_rgb(img_file)
            mask = _read_mask(cat_dir / "ground_truth" / t / f"{s}_mask.png", t, amap.shape)
            if image.shape[:2] != amap.shape or mask.shape != amap.shape:
                raise PNIError(f"{img_file}, its mask and {npy} differ in size")
            write_png16(pred_path(after, i), map_to_uint16(amap))
            write_png16(gt_path(after, i), mask.astype(np.uint16) * 65535)
            save_png(image_path(after, i), image)
            entries.append(Entry(i, cat, t, s))
            i += 1
    write_csv(after / INDEX_CSV, INDEX_COLUMNS, [(e.index, e.category, e.defect_type, e.stem) for e in entries])
    stale = [
        p for p in after.iterdir() if (m := _RAVEL_NAME.match(p.name)) and int(m.group(1) or m.group(2)) >= len(entries)
    ]
    for p in stale:
        p.unlink()
    if stale:
        warn(f"removed {len(stale)} stale ravel file(s) from an earlier, larger run in {after}")
    print(f"wrote {len(entries)} images of {len(set(e.category for e in entries))} categories to {after}")
    return entries


def read_index(root: str | os.PathLike) -> list[Entry] | None:
    """Entries of ``<root>/index.csv``, or None when the file is missing."""
    path = Path(root) / INDEX_CSV
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or list(reader.fieldnames) != list(INDEX_COLUMNS):
            raise PNIError(f"{path}: expected header {','.join(INDEX_COLUMNS)}")
        try:
            entries = [Entry(int(r["index"]), r["category"], r["defect_type"], r["stem"]) for r in reader]
        except (TypeError, ValueError) as exc:
            raise PNIError(f"{path}: malformed row ({exc})") from exc
    for e in entries:  # names, never paths (the category names the folder viz/<category>)
        for column in ("category", "defect_type", "stem"):
            check_name(getattr(e, column) or "", f"{path}: {column}")
    return entries
