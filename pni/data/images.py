"""Image files and the model's input geometry in numpy and Pillow alone (no torch), so that
prediction through onnxruntime (:mod:`pni.deploy.onnx_runtime`) runs where torch is not
installed, and so that both runtimes prepare images and map results back identically.

- :func:`load_image` / :func:`to_rgb`: any image file or decoded PIL image as 8-bit RGB
  (:data:`IMAGE_EXTENSIONS`: the file types datasets and prediction look for).
- :func:`input_array`: an RGB image -> the model's input ``(3, imagesize, imagesize)``
  float32: the shorter side resized to ``resize`` (Pillow's BILINEAR), centre crop, scaled to
  ``[0, 1]``, ImageNet-normalised; bit for bit what torchvision's ``Resize(resize) +
  CenterCrop(imagesize) + ToTensor() + Normalize(IMAGENET_MEAN, IMAGENET_STD)`` gives on a PIL
  image (:func:`pni.data.transforms.image_transform`).
- :class:`CropGeometry`: where that crop lies in the input image, and maps at the crop's
  pixels brought back to the input's.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pni.errors import PNIError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Modes whose pixel values are integers wider than 8 bits (16-bit PNG/TIFF).
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_decoded(path: str | os.PathLike) -> Image.Image:
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


def wide_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit (or 32-bit int / float) single-channel image -> uint8 array HxW."""
    arr = np.asarray(img)
    if img.mode == "F":
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def is_wide(img: Image.Image) -> bool:
    """True for single-channel modes wider than 8 bits (16/32-bit integer, float)."""
    return img.mode in _WIDE_INT_MODES or img.mode == "F"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load any image file as 8-bit RGB (grayscale, 16-bit, palette, RGBA converted)."""
    return to_rgb(open_decoded(path), path)


def to_rgb(img: Image.Image, name: str | os.PathLike = "image") -> Image.Image:
    """A decoded PIL image as 8-bit RGB (grayscale, 16-bit, palette, RGBA converted; alpha
    dropped); ``name`` (the file) appears in the error if it cannot be converted."""
    if is_wide(img):
        return Image.fromarray(wide_to_uint8(img)).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        if img.mode in ("PA", "P") and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")  # alpha is dropped
    except (OSError, ValueError) as exc:
        raise PNIError(f"cannot convert image {name} (mode {img.mode}) to RGB: {first_line(exc)}") from exc


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """``(width, height)`` after resizing the shorter side to ``resize`` (torchvision's
    ``Resize(int)`` rounding: the longer side is truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_offset(length: int, size: int) -> int:
    """Start of a centred ``size`` window in ``length`` pixels (torchvision's ``CenterCrop``)."""
    return int(round((length - size) / 2.0))


def input_array(img: Image.Image, resize: int, imagesize: int) -> np.ndarray:
    """An RGB PIL image -> the model's input, float32 ``(3, imagesize, imagesize)``: shorter
    side resized to ``resize`` (Pillow BILINEAR), centre crop (zero padding where the image is
    smaller, as torchvision's), ``/ 255``, ImageNet normalisation, all in float32 in
    torchvision's order of operations so that the result is bit for bit its tensor."""
    if img.mode != "RGB":
        raise PNIError(f"input_array expects an RGB image, got mode {img.mode} (use to_rgb)")
    width, height = img.size
    new_w, new_h = resized_size(width, height, resize)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    if new_h < imagesize or new_w < imagesize:  # torchvision pads with zeros (more after than before)
        pad_h, pad_w = max(imagesize - new_h, 0), max(imagesize - new_w, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        new_h, new_w = pixels.shape[:2]
    top, left = crop_offset(new_h, imagesize), crop_offset(new_w, imagesize)
    crop = pixels[top : top + imagesize, left : left + imagesize].transpose(2, 0, 1)
    x = crop.astype(np.float32) / np.float32(255.0)
    x -= np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    x /= np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(x)


@dataclass(frozen=True)
class CropGeometry:
    """Where the model's ``size x size`` input lies in an image of ``width x height`` pixels:
    the image is resized (shorter side to ``resize``, bilinear) to ``resized_width x
    resized_height`` and centre-cropped at ``(top, left)``, as :func:`input_array` does.
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
        new_w, new_h = resized_size(width, height, resize)
        if new_w < size or new_h < size:
            raise PNIError(f"image of {width}x{height} resized to {new_w}x{new_h} is smaller than the {size} px crop")
        return cls(width, height, new_w, new_h, crop_offset(new_h, size), crop_offset(new_w, size), size)

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
