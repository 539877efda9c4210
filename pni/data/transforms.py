"""Image and mask loading and the test-time transforms (docs/METHOD.md, section 1).

Images: resize the shorter side to ``resize`` (bilinear), centre-crop ``imagesize``,
ImageNet normalisation. Masks: any value > 0 is a defect; the same geometry, then a pixel
is defective only where the resized mask is exactly 1 (see :func:`mask_transform`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pni.errors import PNIError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Modes whose pixel values are integers wider than 8 bits (16-bit PNG/TIFF).
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_decoded(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path``; any failure is a one-line PNIError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notes
            with Image.open(path) as img:
                img.load()  # decode now: truncated files fail here, not later
                return img.copy()
    except FileNotFoundError as exc:
        raise PNIError(f"image file not found: {path}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PNIError(f"cannot read image {path}: {first_line(exc)}") from exc


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit (or 32-bit int / float) single-channel image -> uint8 array HxW."""
    arr = np.asarray(img)
    if img.mode == "F":
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load any image file as 8-bit RGB (grayscale, 16-bit, palette, RGBA converted)."""
    return to_rgb(_open_decoded(path), path)


def to_rgb(img: Image.Image, name: str | os.PathLike = "image") -> Image.Image:
    """A decoded PIL image as 8-bit RGB (grayscale, 16-bit, palette, RGBA converted; alpha
    dropped); ``name`` (the file) appears in the error if it cannot be converted."""
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        return Image.fromarray(_wide_to_uint8(img)).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        if img.mode in ("PA", "P") and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")  # alpha is dropped
    except (OSError, ValueError) as exc:
        raise PNIError(f"cannot convert image {name} (mode {img.mode}) to RGB: {first_line(exc)}") from exc


def load_mask(path: str | os.PathLike, binarize: bool = True) -> Image.Image:
    """Load a mask as an 8-bit single-channel ("L") image.

    ``binarize=True`` (the default, for every dataset) maps every raw pixel value > 0 to 255
    before any resizing, so that 0/1, 0/128 and 0/255 masks (and 16-bit or palette ones) mean
    the same; ``binarize=False`` keeps the grey values (16-bit masks scaled to 8 bits).
    """
    img = _open_decoded(path)
    if binarize:
        if img.mode in ("LA", "La"):
            img = img.convert("L")
        elif img.mode in ("RGBA", "RGBa", "PA"):
            img = img.convert("RGB")
        raw = np.asarray(img)  # palette images give indices, which is what we want
        if raw.ndim == 3:
            raw = raw.max(axis=2)
        return Image.fromarray(np.where(raw > 0, 255, 0).astype(np.uint8))
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        return Image.fromarray(_wide_to_uint8(img))
    if img.mode == "L":
        return img
    try:
        return img.convert("L")
    except (OSError, ValueError) as exc:
        raise PNIError(f"cannot convert mask {path} (mode {img.mode}) to grayscale: {first_line(exc)}") from exc


def image_transform(resize: int = 512, imagesize: int = 480) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> float32 tensor 3 x imagesize x imagesize, ImageNet-normalised."""
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(imagesize),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


class _TruncatedMask:
    """Picklable (for DataLoader workers) mask geometry + truncation; see mask_transform."""

    def __init__(self, resize: int, imagesize: int) -> None:
        self.geometry = T.Compose(
            [
                T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
                T.CenterCrop(imagesize),
                T.ToTensor(),
            ]
        )

    def __call__(self, mask: Image.Image) -> torch.Tensor:
        if mask.mode != "L":
            raise ValueError(f"mask_transform expects an 'L' image, got mode {mask.mode}")
        value = self.geometry(mask)  # 1xHxW in [0, 1]; 255 maps to exactly 1.0
        return torch.trunc(value).clamp_(0, 1)


def mask_transform(resize: int = 512, imagesize: int = 480) -> Callable[[Image.Image], torch.Tensor]:
    """8-bit "L" mask -> float32 tensor 1 x imagesize x imagesize with values in {0, 1}.

    The mask is resized bilinearly like the image and scaled to 0..1; a pixel is
    defective only where that value is exactly 1. This copies the original code, which
    casts the interpolated float mask to int (truncation): boundary pixels with
    partial coverage become normal, so masks are slightly eroded. Kept on purpose so that
    pixel metrics match the published numbers.
    """
    return _TruncatedMask(resize, imagesize)


def denormalize(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Undo ImageNet normalisation: tensor 3xHxW -> uint8 array HxWx3 (RGB).

    Rounds to the nearest integer (the original truncates), so normalising a uint8
    image and denormalising it gives the same bytes back.
    """
    x = torch.as_tensor(image).detach().to("cpu", torch.float64)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"denormalize expects a 3xHxW image, got shape {tuple(x.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    x = (x * std + mean) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


@dataclass(frozen=True)
class CropGeometry:
    """Where the model's ``size x size`` input lies in an image of ``width x height`` pixels:
    the image is resized (shorter side to ``resize``, bilinear) to ``resized_width x
    resized_height`` and centre-cropped at ``(top, left)``, as :func:`image_transform` does.
    """

    width: int
    height: int
    resized_width: int
    resized_height: int
    top: int
    left: int
    size: int

    @classmethod
    def of(cls, width: int, height: int, resize: int, size: int) -> CropGeometry:
        """The geometry of torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` on a
        ``width x height`` image (their rounding rules)."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = resize, int(resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if new_w < size or new_h < size:
            raise PNIError(f"image of {width}x{height} resized to {new_w}x{new_h} is smaller than the {size} px crop")
        return cls(
            width, height, new_w, new_h, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0)), size
        )

    def _axis(self, n_in: int, n_resized: int, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per input pixel along one axis: the two crop pixels it interpolates between, the
        weight of the second, and whether its centre lies inside the crop."""
        u = (np.arange(n_in, dtype=np.float64) + 0.5) * (n_resized / n_in) - 0.5 - offset
        inside = (u >= -0.5) & (u <= self.size - 0.5)
        u = np.clip(u, 0.0, self.size - 1)
        i0 = np.floor(u).astype(np.int64)
        i1 = np.minimum(i0 + 1, self.size - 1)
        return i0, i1, (u - i0).astype(np.float32), inside

    def to_input(self, maps: np.ndarray) -> np.ndarray:
        """Maps ``(..., size, size)`` in the crop's pixels -> ``(..., height, width)`` float32 in
        the input image's pixels (bilinear, pixel centres aligned); NaN where the crop cut the
        image off (not inspected)."""
        maps = np.asarray(maps, dtype=np.float32)
        y0, y1, wy, inside_y = self._axis(self.height, self.resized_height, self.top)
        x0, x1, wx, inside_x = self._axis(self.width, self.resized_width, self.left)
        rows = maps[..., y0, :] * (1.0 - wy)[:, None] + maps[..., y1, :] * wy[:, None]
        out = rows[..., x0] * (1.0 - wx) + rows[..., x1] * wx
        out[..., ~inside_y, :] = np.nan
        out[..., ~inside_x] = np.nan
        return out

    def inspected_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the inspected input pixels (x1, y1 exclusive)."""
        ys = np.flatnonzero(self._axis(self.height, self.resized_height, self.top)[3])
        xs = np.flatnonzero(self._axis(self.width, self.resized_width, self.left)[3])
        return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1
