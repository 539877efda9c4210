"""Data for the refinement model: ravel folders (docs/METHOD.md, section 6) and synthetic defects.

Ravel folder: ``{i:05d}_pred.png`` (uint16 = map*65535), ``{i:05d}_gt.png`` (uint16 0/65535),
``image{i:05d}.png`` (uint8 RGB) and ``index.csv`` (index, category, defect_type, stem).
PNGs are read with ``cv2.IMREAD_UNCHANGED`` (uint16 stays uint16, exact round trip).

Model inputs are resized to ``image_size`` (320) according to the geometry:

- ``aligned`` (default): image bilinear (antialiased), maps and masks nearest
  (``nearest-exact``, pixel centres); the map and the mask share the image's geometry.
- ``original``: as the original code (docs/METHOD.md section 7, ``pni.refinement.geometry``), at 320 px
  only: image with PIL's BILINEAR, map and mask nearest (pixel centres, as PIL's NEAREST on
  16-bit PNGs); the model input map is then zoomed (centre ``[11:-11]`` back to 320 px), so it
  no longer lines up with image and mask, which are not zoomed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pni.errors import PNIError
from pni.ravel import Entry, gt_path, image_path, pred_path, read_index, read_png16, read_rgb

from .geometry import check_geometry, nearest_resize, pil_resize_bilinear, zoom_map
from .model import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- file IO


def read_map(path: str | os.PathLike) -> np.ndarray:
    """Read a map/mask PNG as float32 (H,W) in [0,1] (16-bit / 65535; 8-bit files count x257)."""
    return read_png16(path).astype(np.float32) / np.float32(65535.0)


def round_to_uint16(amap: np.ndarray) -> np.ndarray:
    """(H,W) float in [0,1] -> uint16 = round(clip(map)*65535).

    Rounds where ``pni.ravel.map_to_uint16`` truncates (as the original's conversion): a map
    read from a ravel file and written back unchanged keeps its exact codes."""
    return np.round(np.clip(amap.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)


# ----------------------------------------------------------------------------- ravel folders


def list_ravel_entries(
    folder: str | os.PathLike, categories: Sequence[str] | None = None, require_gt: bool = True
) -> list[Entry]:
    """Entries of a ravel folder, filtered by category (None / ['all'] = every entry).

    Uses ``index.csv``; without it, entries come from the ``*_pred.png`` files and a
    category filter is an error. Every entry must have its pred, image (and gt) files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PNIError(f"ravel folder not found: {folder}")
    wanted = None if not categories or list(categories) == ["all"] else set(categories)
    entries = read_index(folder)
    if entries is None:
        if wanted is not None:
            raise PNIError(f"{folder}: no index.csv, so --category cannot be applied (use --category all)")
        idx = sorted(int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]_pred.png"))
        entries = [Entry(i, "", "", "") for i in idx]
    else:
        if wanted is not None:
            known = {e.category for e in entries}
            unknown = sorted(wanted - known)
            if unknown:
                raise PNIError(
                    f"--category {' '.join(unknown)}: not in {folder / 'index.csv'} (has {' '.join(sorted(known))})"
                )
            entries = [e for e in entries if e.category in wanted]
    if not entries:
        raise PNIError(f"{folder}: no ravel samples found")
    for e in entries:
        paths = [pred_path(folder, e.index), image_path(folder, e.index)]
        for path in paths + ([gt_path(folder, e.index)] if require_gt else []):
            if not path.is_file():
                raise PNIError(f"{path}: missing (listed for index {e.index})")
    return entries


# ----------------------------------------------------------------------------- tensors


def _normalise(t: torch.Tensor) -> torch.Tensor:
    """(3,H,W) float in [0,1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std


def _uint8_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 RGB -> (3,H,W) float32 in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def image_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """(H,W,3) uint8 RGB -> (3,size,size) float32, bilinear (antialiased), ImageNet-normalised."""
    t = _uint8_to_tensor(image)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp_(
            0.0, 1.0
        )
    return _normalise(t)


def map_to_tensor(amap: np.ndarray, size: int) -> torch.Tensor:
    """(H,W) float map or mask -> (1,size,size) float32, nearest (pixel centres)."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t[None], size=(size, size), mode="nearest-exact")[0]
    return t


def prepare_image(image: np.ndarray, size: int, geometry: str = "aligned") -> torch.Tensor:
    """(H,W,3) uint8 RGB -> (3,size,size) model input image in the requested geometry."""
    check_geometry(geometry, size)
    if geometry == "original":
        return _normalise(_uint8_to_tensor(pil_resize_bilinear(image, size)))
    return image_to_tensor(image, size)


def prepare_mask(mask: np.ndarray, size: int, geometry: str = "aligned") -> torch.Tensor:
    """(H,W) {0,1} mask -> (1,size,size) float32 in the requested geometry (never zoomed)."""
    check_geometry(geometry, size)
    if geometry == "original":
        return torch.from_numpy(nearest_resize(mask.astype(np.float32), size))[None]
    return map_to_tensor(mask, size)


def prepare_map(amap: np.ndarray, size: int, geometry: str = "aligned") -> torch.Tensor:
    """(H,W) map in [0,1] -> (1,size,size) model input map in the requested geometry."""
    check_geometry(geometry, size)
    if geometry == "original":
        return zoom_map(torch.from_numpy(nearest_resize(amap.astype(np.float32), size))[None])
    return map_to_tensor(amap, size)


class RavelRefinementDataset(Dataset):
    """Samples of a ravel folder as model inputs.

    Item: dict(image (3,S,S) ImageNet-normalised, amap (1,S,S) in [0,1] in the chosen
    geometry, mask (1,S,S) in {0,1} (zeros when ``require_gt`` is False and no gt exists),
    index int). S = ``image_size``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        image_size: int = 320,
        categories: Sequence[str] | None = None,
        geometry: str = "aligned",
        require_gt: bool = True,
    ) -> None:
        check_geometry(geometry, image_size)
        self.folder = Path(folder)
        self.entries = list_ravel_entries(folder, categories, require_gt=require_gt)
        self.image_size, self.geometry = image_size, geometry

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        image = read_rgb(image_path(self.folder, e.index))
        amap = read_map(pred_path(self.folder, e.index))
        gt_file = gt_path(self.folder, e.index)  # any non-zero mask value is defect, as everywhere
        mask = (read_map(gt_file) > 0).astype(np.float32) if gt_file.is_file() else np.zeros(amap.shape, np.float32)
        return {
            "image": prepare_image(image, self.image_size, self.geometry),
            "amap": prepare_map(amap, self.image_size, self.geometry),
            "mask": prepare_mask(mask, self.image_size, self.geometry),
            "index": e.index,
        }


# ----------------------------------------------------------------------------- synthetic defects


def _low_freq_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h,w) smooth noise in [0,1]: a random cells x cells grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def _blob_masks(
    rng: np.random.Generator, h: int, w: int, n: int, min_r: float, max_r: float, irregular: bool = True
) -> np.ndarray:
    """(h,w) float32 union of ``n`` irregular elliptic blobs, returned as soft fields in [0,1]."""
    if n == 0:
        return np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.15, 0.85, (2, n, 1, 1)) * np.array([h, w], np.float32).reshape(2, 1, 1, 1)
    ry, rx = rng.uniform(min_r, max_r, (2, n, 1, 1)) * min(h, w)
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    dy, dx = yy[None] - cy, xx[None] - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    field = np.exp(-0.5 * (u * u + v * v) * 4.0)  # (n,h,w), 0.5 at about one radius
    if irregular:
        field = field * (0.6 + 0.8 * _low_freq_noise(rng, h, w, 6))[None]
    return field.max(axis=0).astype(np.float32)


def _scratch_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h,w) float32 {0,1} mask of a straight scratch (a thick segment), vectorised."""
    s = min(h, w)
    p0 = rng.uniform(0.1, 0.9, 2) * np.array([h, w])
    ang = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.15, 0.5) * s
    p1 = np.clip(p0 + length * np.array([np.sin(ang), np.cos(ang)]), 0, [h - 1, w - 1])
    thick = max(1.0, rng.uniform(0.006, 0.02) * s)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    dist = np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))
    return (dist <= thick).astype(np.float32)


def synthesize_defect(
    image: np.ndarray, rng: np.random.Generator, p_normal: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a random synthetic defect (blobs or a scratch) into a normal image.

    image: (H,W,3) uint8 RGB -> (defective image (H,W,3) uint8, mask (H,W) float32 {0,1}).
    With probability ``p_normal`` the image stays normal (empty mask).
    """
    h, w = image.shape[:2]
    if rng.random() < p_normal:
        return image.copy(), np.zeros((h, w), np.float32)
    if rng.random() < 0.6:
        mask = (_blob_masks(rng, h, w, int(rng.integers(1, 3)), 0.03, 0.12) > 0.5).astype(np.float32)
    else:
        mask = _scratch_mask(rng, h, w)
    if mask.sum() == 0:  # tiny blob fell through the threshold: force one pixel region
        mask[h // 2 - 1 : h // 2 + 2, w // 2 - 1 : w // 2 + 2] = 1.0
    img = image.astype(np.float32)
    kind = rng.random()
    if kind < 0.4:  # foreign colour with texture
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        tex = colour[None, None] + rng.normal(0, 20, (h, w, 1)).astype(np.float32)
    elif kind < 0.7:  # content from elsewhere in the image
        tex = np.roll(img, (int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))), axis=(0, 1))
    else:  # darkened / brightened surface
        tex = img * rng.uniform(0.2, 0.6) if rng.random() < 0.5 else img + rng.uniform(60, 140)
    alpha = cv2.GaussianBlur(mask, (0, 0), 1.0)[..., None] * rng.uniform(0.7, 1.0)
    alpha = np.maximum(alpha, mask[..., None] * 0.7)
    out = img * (1 - alpha) + tex * alpha
    return np.clip(out, 0, 255).astype(np.uint8), mask


def imperfect_map(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A noisy, imperfect anomaly map for ``mask``: (H,W) {0,1} -> (H,W) float32 in [0,1].

    Blurred and shifted mask with a random gain, smooth background noise and a few
    false-positive blobs, like the output of a patch-based detector.
    """
    h, w = mask.shape
    s = min(h, w)
    shift = rng.integers(-max(1, s // 40), max(1, s // 40) + 1, 2)
    m: np.ndarray = np.roll(mask.astype(np.float32), tuple(int(x) for x in shift), axis=(0, 1))  # float32 throughout
    m = cv2.GaussianBlur(m, (0, 0), rng.uniform(0.01, 0.04) * s)
    peak = float(m.max())
    if peak > 0:
        m = m / peak * rng.uniform(0.4, 1.0)
    fp = _blob_masks(rng, h, w, int(rng.integers(0, 4)), 0.02, 0.08, irregular=False)
    amap = (
        m
        + fp * rng.uniform(0.1, 0.5)
        + _low_freq_noise(rng, h, w, 8) * rng.uniform(0.05, 0.25)
        + rng.normal(0, 0.02, (h, w)).astype(np.float32)
        + rng.uniform(0.0, 0.15)
    )
    return np.clip(amap, 0.0, 1.0).astype(np.float32)


def _folder_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PNIError(f"--normal_image_dir: folder not found: {folder}")
    items = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not items:
        raise PNIError(f"--normal_image_dir: no images in {folder}")
    return items


def load_normal_images(source: str | os.PathLike | Sequence) -> list:
    """Normal images as a list of paths or arrays: a folder (searched recursively), a list of
    folders, or a list of images (paths or arrays)."""
    if isinstance(source, (str, os.PathLike)):
        return _folder_images(Path(source))
    items = list(source)
    if items and all(isinstance(i, (str, os.PathLike)) and Path(i).is_dir() for i in items):
        return [p for folder in items for p in _folder_images(Path(folder))]
    if not items:
        raise PNIError("no normal images given for synthetic training")
    return items


def make_synthetic_triple(
    image: np.ndarray | str | os.PathLike, rng: np.random.Generator, size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image uint8 (S,S,3), map float32 (S,S), mask float32 (S,S)) from a normal image.

    ``image``: a path or an (H,W,3) uint8 RGB array; resized to ``size`` first if given.
    """
    img = read_rgb(image) if isinstance(image, (str, os.PathLike)) else np.asarray(image, np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if size is not None and img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    defective, mask = synthesize_defect(img, rng)
    return defective, imperfect_map(mask, rng), mask


def make_synthetic_triples(
    images: Sequence, per_image: int = 1, seed: int = 0, size: int | None = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, map, mask) triples from normal images (paths or arrays); see ``make_synthetic_triple``."""
    rng = np.random.default_rng(seed)
    return [make_synthetic_triple(im, rng, size) for im in images for _ in range(per_image)]


class SyntheticRefinementDataset(Dataset):
    """Synthetic defects pasted on normal images, generated on the fly.

    Item ``i`` uses image ``i % len(images)``. With ``fresh=False`` its generator is seeded by
    ``(seed, i)`` (the same item every time); with ``fresh=True`` (training) a draw from
    torch's global generator is mixed in, so each epoch sees new defects while runs stay
    reproducible under a fixed global seed (also in DataLoader workers).
    Items as ``RavelRefinementDataset`` (image, amap, mask, index).
    """

    def __init__(
        self,
        images: str | os.PathLike | Sequence,
        image_size: int = 320,
        per_image: int = 4,
        seed: int = 0,
        geometry: str = "aligned",
        fresh: bool = True,
    ) -> None:
        check_geometry(geometry, image_size)
        self.images = load_normal_images(images)
        self.image_size, self.per_image, self.seed = image_size, per_image, seed
        self.geometry, self.fresh = geometry, fresh

    def __len__(self) -> int:
        return len(self.images) * self.per_image

    def __getitem__(self, i: int) -> dict:
        key = (self.seed, i, int(torch.randint(0, 2**31 - 1, ()))) if self.fresh else (self.seed, i)
        rng = np.random.default_rng(key)
        image, amap, mask = make_synthetic_triple(self.images[i % len(self.images)], rng, self.image_size)
        return {
            "image": prepare_image(image, self.image_size, self.geometry),
            "amap": prepare_map(amap, self.image_size, self.geometry),
            "mask": prepare_mask(mask, self.image_size, self.geometry),
            "index": i,
        }
