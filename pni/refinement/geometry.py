"""The original refinement code's geometry (``--geometry original``, docs/METHOD.md section 7).

For one ravel sample the original code, at its fixed 320 px input size:

0. resizes the image to 320 px with PIL's BILINEAR (``pil_resize_bilinear``) and the ravel
   map and mask with NEAREST (``nearest_resize``);
1. zooms the map: its centre ``[11:-11, 11:-11]`` (298 px) upsampled back to 320 px, bilinear
   with ``align_corners=True`` (``zoom_map``); ``pred = net(image, z)`` (= z + residual);
2. ``z16 = uint16(clip(65535*z))``, ``p16 = uint16(clip(65535*pred))``, truncating (``to_codes``);
3. resizes ``z16`` to 240 px and ``p16`` to 256 px, then crops ``p16[8:-8, 8:-8]`` (240 px);
4. blends ``uint16(0.1*p + 0.9*z)`` in float32 (truncating), resizes it to 480 px and writes
   it; the mask becomes ``uint16(65535*mask_320)`` resized to 240 then 480 px
   (``original_outputs``). Steps 3 and 4 resize with NEAREST.

NEAREST is PIL's on 16-bit images (the ravel PNGs and the uint16 arrays above), which takes
the source pixel under each output pixel's centre, ``floor((j + 0.5) * n_in / n_out)``: torch's
``nearest-exact``, not its ``nearest``. ``nearest_resize`` computes that index exactly in
integers. (PIL's NEAREST on 32-bit or float images rounds differently at exact ties, e.g.
26 of 240 rows and columns at 320 -> 240 px: resizing float maps with it would not give the
original's files.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pni.errors import PNIError

GEOMETRIES = ("aligned", "original")
INPUT_SIZE = 320  # the original's model input size
ZOOM_CROP = 11  # map[11:-11, 11:-11]: 298 of 320 px
BLEND_SIZE = 240  # z16 is resized to it
PRED_SIZE = 256  # p16 is resized to it, then cropped ...
PRED_CROP = 8  # ... [8:-8] to BLEND_SIZE
OUTPUT_SIZE = 480  # written _pred.png / _gt.png size
CODE_SCALE = 65535


def check_geometry(geometry: str, image_size: int) -> None:
    """Raise ``PNIError`` for an unknown geometry, or ``original`` at another size than 320."""
    if geometry not in GEOMETRIES:
        raise PNIError(f"--geometry must be one of {', '.join(GEOMETRIES)}, got {geometry}")
    if geometry == "original" and image_size != INPUT_SIZE:
        raise PNIError(
            f"--geometry original reproduces the original's fixed {INPUT_SIZE} px steps: "
            f"--image_size must be {INPUT_SIZE}, got {image_size}"
        )


def nearest_resize(array: np.ndarray, size: int) -> np.ndarray:
    """(H,W) array -> (size,size), same dtype: output pixel j takes input pixel
    ``floor((j + 0.5) * n / size)`` on each axis (pixel centres, exact integer arithmetic)."""
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {array.shape}")
    j = np.arange(size, dtype=np.int64)
    rows = np.minimum((2 * j + 1) * array.shape[0] // (2 * size), array.shape[0] - 1)
    cols = np.minimum((2 * j + 1) * array.shape[1] // (2 * size), array.shape[1] - 1)
    return array[np.ix_(rows, cols)]


def pil_resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """(H,W,3) uint8 RGB -> (size,size,3) uint8 with PIL's BILINEAR."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.shape[:2] == (size, size):
        return image.copy()
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def zoom_map(amap: torch.Tensor, crop: int = ZOOM_CROP) -> torch.Tensor:
    """Crop ``crop`` px from every side and zoom back, bilinear with align_corners=True.

    amap: (..., H, W) float -> (..., H, W). At 320 px: the centre 298 px back to 320 px.
    """
    h, w = amap.shape[-2:]
    if min(h, w) <= 2 * crop + 1:
        raise PNIError(f"a {h}x{w} map is too small to crop {crop} px from each side")
    lead = amap.shape[:-2]
    centre = amap[..., crop : h - crop, crop : w - crop].reshape(-1, 1, h - 2 * crop, w - 2 * crop)
    out = F.interpolate(centre, size=(h, w), mode="bilinear", align_corners=True)
    return out.reshape(*lead, h, w)


def to_codes(values: np.ndarray) -> np.ndarray:
    """float32 map -> ``uint16(clip(65535*values, 0, 65535))``, product in float32, truncated."""
    scaled = np.float32(CODE_SCALE) * np.asarray(values, dtype=np.float32)
    return np.clip(scaled, 0, CODE_SCALE).astype(np.uint16)


def original_outputs(
    zoomed: np.ndarray, pred: np.ndarray, mask: np.ndarray, blend_weight: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-4: the written ``(_pred, _gt)`` uint16 arrays, ``OUTPUT_SIZE`` square.

    zoomed, pred: (320,320) float32 model input map ``z`` and model output; mask: (320,320)
    in {0,1}. The blend is ``blend_weight*p + (1-blend_weight)*z`` in float32.
    """
    z = nearest_resize(to_codes(zoomed), BLEND_SIZE).astype(np.float32)
    p = nearest_resize(to_codes(pred), PRED_SIZE)[PRED_CROP:-PRED_CROP, PRED_CROP:-PRED_CROP]
    blended = np.float32(blend_weight) * p.astype(np.float32) + np.float32(1.0 - blend_weight) * z
    refined = np.clip(blended, 0, CODE_SCALE).astype(np.uint16)
    gt = nearest_resize(to_codes(mask), BLEND_SIZE)
    return nearest_resize(refined, OUTPUT_SIZE), nearest_resize(gt, OUTPUT_SIZE)
