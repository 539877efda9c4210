"""The test-time transforms as torch tensors, and mask loading (docs/METHOD.md, section 1).

Images: resize the shorter side to ``resize`` (bilinear), centre-crop ``imagesize``,
ImageNet normalisation: :func:`pni.data.images.input_array` (numpy and Pillow, shared with
prediction through onnxruntime) as a tensor. Image files are read by
:func:`pni.data.images.load_image`. Masks: any value > 0 is a defect; the same geometry,
then a pixel is defective only where the resized mask is exactly 1 (see
:func:`mask_transform`).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pni.data.images import IMAGENET_MEAN, IMAGENET_STD, first_line, input_array, is_wide, open_decoded, wide_to_uint8
from pni.errors import PNIError


def load_mask(path: str | os.PathLike, binarize: bool = True) -> Image.Image:
    """Load a mask as an 8-bit single-channel ("L") image.

    ``binarize=True`` (the default, for every dataset) maps every raw pixel value > 0 to 255
    before any resizing, so that 0/1, 0/128 and 0/255 masks (and 16-bit or palette ones) mean
    the same; ``binarize=False`` keeps the grey values (16-bit masks scaled to 8 bits).
    """
    img = open_decoded(path)
    if binarize:
        if img.mode in ("LA", "La"):
            img = img.convert("L")
        elif img.mode in ("RGBA", "RGBa", "PA"):
            img = img.convert("RGB")
        raw = np.asarray(img)  # palette images give indices, which is what we want
        if raw.ndim == 3:
            raw = raw.max(axis=2)
        return Image.fromarray(np.where(raw > 0, 255, 0).astype(np.uint8))
    if is_wide(img):
        return Image.fromarray(wide_to_uint8(img))
    if img.mode == "L":
        return img
    try:
        return img.convert("L")
    except (OSError, ValueError) as exc:
        raise PNIError(f"cannot convert mask {path} (mode {img.mode}) to grayscale: {first_line(exc)}") from exc


class _InputTensor:
    """Picklable (for DataLoader workers) :func:`image_transform`."""

    def __init__(self, resize: int, imagesize: int) -> None:
        self.resize, self.imagesize = resize, imagesize

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(input_array(img, self.resize, self.imagesize))


def image_transform(resize: int = 512, imagesize: int = 480) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> float32 tensor 3 x imagesize x imagesize, ImageNet-normalised: the
    array of :func:`pni.data.images.input_array` (bit for bit torchvision's ``Resize`` +
    ``CenterCrop`` + ``ToTensor`` + ``Normalize``)."""
    return _InputTensor(resize, imagesize)


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
