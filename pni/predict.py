"""Use a trained model on new images: :func:`load_model` (the Python API), the
:class:`Predictor` it returns and its :class:`Prediction` per image (what ``predict.py``
writes to files: :mod:`pni.predict_files`).

Both score through a runtime (:mod:`pni.deploy`): ``torch``, :meth:`pni.model.PNIModel.score`
(the object the test stage uses), or ``onnxruntime``, the bundle's ``model.onnx``. Everything
else is shared numpy/Pillow code: the input (:func:`pni.data.images.input_array`), bringing
the maps back to each input image's own pixels (undoing the resize and the centre crop; what
the crop cut off is "not inspected") and the bundle's calibrated thresholds: an image is
defective when its score is above the image threshold, a pixel when its score is above the
pixel threshold; defect regions are the 8-connected components of the defect mask.
Normalised scores divide by the threshold in use (1.0 = the threshold).

This module imports no torch: ``runtime="onnxruntime"`` runs without it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from pni.config import DEFAULT_PRECISION, RUNTIMES
from pni.data.images import CropGeometry, first_line, input_array, load_image, to_rgb
from pni.deploy.onnx_runtime import OnnxScorer
from pni.errors import PNIError
from pni.manifest import onnx_graph, read_manifest
from pni.maps import MAP_NAMES, MapScores
from pni.viz import draw_contours, jet

ONNX_BATCH_PIXELS = 480 * 480  # see onnx_batch_size
THRESHOLD_KEYS = {
    "image": {"fpr": "image", "best_f1": "image_best_f1"},
    "pixel": {"fpr": "pixel", "best_f1": "pixel_best_f1"},
}


class ImageScorer(Protocol):
    """A runtime's scorer (:class:`pni.deploy.torch_runtime.TorchScorer`,
    :class:`pni.deploy.onnx_runtime.OnnxScorer`): the input geometry (``resize``, then a
    centre crop of ``imagesize``) and ``score(images)``, float32 ``(N, 3, imagesize,
    imagesize)`` -> one :class:`~pni.maps.MapScores` per image."""

    resize: int
    imagesize: int

    def score(self, images: np.ndarray) -> list[MapScores]: ...


@dataclass
class Region:
    """A connected defect region in input-image pixels: bounding box ``[x0, x1) x [y0, y1)``,
    its area (pixels), its highest pixel score (raw, and divided by the pixel threshold) and
    where that is."""

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak_score: float
    peak_normalised: float
    peak_x: int
    peak_y: int


@dataclass
class Prediction:
    """One image's answer. ``score``: the image score of ``map_name``; ``scores`` /
    ``normalised``: of all four maps; ``maps``: float32 ``(height, width)`` in the input's
    pixels, NaN where not inspected (only ``map_name`` unless all were asked for); ``mask``:
    bool, the pixels above the pixel threshold; ``inspected``: ``(x0, y0, x1, y1)``, the part
    of the input the model saw (x1, y1 exclusive)."""

    path: str | None
    width: int
    height: int
    map_name: str
    verdict: str
    score: float
    score_normalised: float
    scores: dict[str, float]
    normalised: dict[str, float]
    image_threshold: float
    pixel_threshold: float
    maps: dict[str, np.ndarray]
    mask: np.ndarray
    regions: list[Region] = field(default_factory=list)
    inspected: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def is_defective(self) -> bool:
        return self.verdict == "defective"


def as_rgb_image(image: Any, name: str = "image") -> Image.Image:
    """A path, PIL image or array (HxW, HxWx3 or HxWx4; uint8, uint16, bool or float in [0, 1])
    as an 8-bit RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image, name)
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise PNIError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise PNIError(f"{name}: unsupported array type {arr.dtype} (use uint8, uint16, bool or float in [0, 1])")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)), name)


def find_regions(mask: np.ndarray, amap: np.ndarray, pixel_threshold: float) -> list[Region]:
    """8-connected components of ``mask`` with their box, area and peak of ``amap``."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    boxes = ndimage.find_objects(labels)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = ndimage.maximum(amap, labels, index)
    where = ndimage.maximum_position(amap, labels, index)
    return [
        Region(
            int(b[1].start),
            int(b[0].start),
            int(b[1].stop),
            int(b[0].stop),
            int(a),
            float(p),
            float(p) / pixel_threshold,
            int(w[1]),
            int(w[0]),
        )
        for b, a, p, w in zip(boxes, areas, peaks, where)
    ]


def threshold_choice(level: str, choice: str | float) -> str | float:
    """``--{level}_threshold`` checked: ``fpr``, ``best_f1`` or a raw score > 0 and finite
    (scores are divided by it); else one-line PNIError naming the flag."""
    if isinstance(choice, str) and choice in THRESHOLD_KEYS[level]:
        return choice
    try:
        value = float(choice)
    except (TypeError, ValueError):
        raise PNIError(f"--{level}_threshold must be fpr, best_f1 or a number, got {choice!r}") from None
    if not 0 < value < math.inf:
        raise PNIError(f"--{level}_threshold must be fpr, best_f1 or a score > 0 and finite, got {choice!r}")
    return value


def check_choices(map_name: str, image_threshold: str | float, pixel_threshold: str | float) -> None:
    """Refuse (one-line PNIError naming the flag) a map or threshold choice :class:`Predictor`
    cannot use, before the bundle is loaded."""
    if map_name not in MAP_NAMES:
        raise PNIError(f"--map must be one of {', '.join(MAP_NAMES)}, got {map_name!r}")
    threshold_choice("image", image_threshold)
    threshold_choice("pixel", pixel_threshold)


class Predictor:
    """A loaded bundle ready to predict: see :func:`load_model`."""

    def __init__(
        self,
        scorer: ImageScorer,
        manifest: dict[str, Any],
        map_name: str = "nb_coor",
        image_threshold: str | float = "fpr",
        pixel_threshold: str | float = "fpr",
        path: str | os.PathLike | None = None,
    ) -> None:
        check_choices(map_name, image_threshold, pixel_threshold)
        self.scorer = scorer
        self.manifest = manifest
        self.path = path
        self.map_name = map_name
        self.image_thresholds = {m: self._threshold("image", m, image_threshold) for m in MAP_NAMES}
        self.pixel_threshold = self._threshold("pixel", map_name, pixel_threshold)
        self.heatmap = manifest["thresholds"][map_name]["heatmap"]

    def input(self, image: Image.Image) -> np.ndarray:
        """An RGB image as the scorer's input ``(3, imagesize, imagesize)`` (resize, centre
        crop, normalisation: :func:`pni.data.images.input_array`)."""
        return input_array(image, self.scorer.resize, self.scorer.imagesize)

    def _threshold(self, level: str, map_name: str, choice: str | float) -> float:
        """The ``level`` ("image"/"pixel") threshold of ``map_name``: ``fpr``, ``best_f1`` or a
        raw score (which applies to the chosen map; the others keep their ``fpr`` one)."""
        flag = f"--{level}_threshold"
        choice = threshold_choice(level, choice)
        if not isinstance(choice, str):
            if map_name == self.map_name:
                return float(choice)
            choice = "fpr"
        entry = (self.manifest.get("thresholds") or {}).get(map_name, {}).get(THRESHOLD_KEYS[level][choice])
        if entry is None:
            what = "defective images with masks" if level == "pixel" else "defective images"
            raise PNIError(
                f"{flag} {choice}: bundle {self.path} has no such threshold for {map_name} (the export "
                f"had no {what}); use fpr or a number"
            )
        return float(entry["value"])

    # ------------------------------------------------------------ one image

    def finish(
        self, result: MapScores, original: np.ndarray, path: str | None = None, all_maps: bool = True
    ) -> Prediction:
        """A scored image's :class:`Prediction`; ``original``: the input as uint8 HxWx3."""
        height, width = original.shape[:2]
        geometry = CropGeometry.of(width, height, self.scorer.resize, self.scorer.imagesize)
        names = MAP_NAMES if all_maps else (self.map_name,)
        maps = {m: geometry.to_input(result.maps[m]) for m in names}
        scores = {m: float(result.image[m]) for m in MAP_NAMES}
        normalised = {m: scores[m] / self.image_thresholds[m] for m in MAP_NAMES}
        amap = maps[self.map_name]
        with np.errstate(invalid="ignore"):
            mask = amap > self.pixel_threshold  # NaN (not inspected) is never defective
        m = self.map_name
        return Prediction(
            path,
            width,
            height,
            m,
            "defective" if scores[m] > self.image_thresholds[m] else "good",
            scores[m],
            normalised[m],
            scores,
            normalised,
            self.image_thresholds[m],
            self.pixel_threshold,
            maps,
            mask,
            find_regions(mask, amap, self.pixel_threshold),
            geometry.inspected_box(),
        )

    def overlay(self, prediction: Prediction, original: np.ndarray) -> np.ndarray:
        """The chosen map on a FIXED colour scale (the bundle's calibration: blue = the median
        good pixel, green = the pixel threshold, red = twice as far above) blended over the
        image, defect regions outlined in white, what was not inspected greyed out."""
        amap = prediction.maps[prediction.map_name]
        low, high = self.heatmap["low"], self.heatmap["high"]
        inspected = np.isfinite(amap)
        colour = jet(np.where(inspected, (amap - low) / (high - low), 0.0)).astype(np.float32)
        image = original.astype(np.float32)
        out = np.where(inspected[..., None], 0.5 * image + 0.5 * colour, 0.35 * image + np.float32(0.65 * 128))
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        thickness = max(1, round(min(prediction.width, prediction.height) / 256))
        return draw_contours(out, prediction.mask, (255, 255, 255), thickness)

    # ------------------------------------------------------------ Python API

    def predict(self, images: Any, batch_size: int | None = None) -> Prediction | list[Prediction]:
        """Predict one image or a list of them: paths, PIL images or arrays (see
        :func:`as_rgb_image`), ``batch_size`` at a time (None: 8 with torch, which scores in
        memory-sized chunks; :func:`onnx_batch_size` with onnxruntime). Returns one
        :class:`Prediction` (a list for a list), with all four maps."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if batch_size is None:
            batch_size = onnx_batch_size(self.scorer.imagesize) if isinstance(self.scorer, OnnxScorer) else 8
        out: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rgb = [as_rgb_image(x, f"image {start + i}") for i, x in enumerate(chunk)]
            batch = np.stack([self.input(img) for img in rgb])
            for x, img, result in zip(chunk, rgb, self.scorer.score(batch)):
                path = str(x) if isinstance(x, (str, os.PathLike)) else None
                out.append(self.finish(result, np.asarray(img), path))
        return out[0] if single else out


def onnx_batch_size(imagesize: int) -> int:
    """Images per onnxruntime run: :data:`ONNX_BATCH_PIXELS` worth of input pixels (one image
    at 480 px and above), as the graph holds each image's distance matrices at once."""
    return max(1, min(32, ONNX_BATCH_PIXELS // imagesize**2))


def require_torch() -> None:
    """The torch runtime needs PyTorch: where it cannot be imported, one-line PNIError
    pointing to the onnxruntime runtime."""
    try:
        import torch  # noqa: F401  # imported here only
    except ImportError as exc:
        raise PNIError(
            f"runtime torch needs PyTorch, which cannot be imported here ({first_line(exc)}): predict with "
            "--runtime onnxruntime (runtime='onnxruntime'), from a bundle exported with --onnx"
        ) from None


def load_scorer(
    path: str | os.PathLike,
    runtime: str = "torch",
    device: str = "auto",
    backbone_weights: str | os.PathLike | None = None,
    precision: str | None = None,
    runs_on: str | None = None,
) -> tuple[ImageScorer, dict[str, Any]]:
    """The scorer of a bundle folder in ``runtime`` and the bundle's checked manifest:
    ``torch`` (:func:`pni.deploy.torch_runtime.load_torch_scorer`, on ``device``, in
    ``precision``, default the bundle's; ``runs_on``: see there) or ``onnxruntime`` (the
    bundle's ``model.onnx``, float32, on the CPU; imports no torch; ``precision`` must be
    ``None`` or ``32-true``)."""
    if runtime == "torch":
        require_torch()
        from pni.deploy.torch_runtime import load_torch_scorer

        return load_torch_scorer(path, device, backbone_weights, precision, runs_on)
    if runtime == "onnxruntime":
        if str(device) not in ("auto", "cpu"):
            raise PNIError(f"runtime onnxruntime runs on the CPU (CPUExecutionProvider), not on {device}")
        check_onnx_precision(precision)
        manifest = read_manifest(path)
        return OnnxScorer(onnx_graph(path, manifest)), manifest
    raise PNIError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def check_onnx_precision(precision: str | None) -> None:
    """``model.onnx`` is a float32 graph: onnxruntime takes no mixed precision (one-line
    PNIError naming the flag)."""
    if precision not in (None, DEFAULT_PRECISION):
        raise PNIError(
            f"--precision {precision} applies to --runtime torch: --runtime onnxruntime runs model.onnx in float32"
        )


def load_model(
    path: str | os.PathLike,
    device: str = "auto",
    map_name: str = "nb_coor",
    image_threshold: str | float = "fpr",
    pixel_threshold: str | float = "fpr",
    backbone_weights: str | os.PathLike | None = None,
    runtime: str = "torch",
    precision: str | None = None,
) -> Predictor:
    """Load a model bundle (written by ``export_model.py``) for prediction.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``...; ``map_name``: the map
    that decides (``nb_coor``, ``nb``, ``coor``, ``patchcore``); thresholds: ``fpr`` (from good
    images at the export's target false-positive rate), ``best_f1`` or a raw score;
    ``backbone_weights``: the weights file when the bundle does not include them;
    ``runtime``: ``torch`` or ``onnxruntime`` (the bundle's ``model.onnx`` from
    ``export_model.py --onnx``, on the CPU, without torch; it holds the backbone weights);
    ``precision``: of the backbone and MLP with ``torch`` (``32-true``, ``bf16-mixed``, the
    fast path on CPUs with bf16 matrix units, or ``16-mixed`` on a GPU); ``None``: the one the
    bundle was calibrated under (its manifest's ``precision``, ``32-true`` for older bundles).
    onnxruntime runs ``model.onnx`` in float32.
    """
    check_choices(map_name, image_threshold, pixel_threshold)
    scorer, manifest = load_scorer(path, runtime, device, backbone_weights, precision)
    return Predictor(scorer, manifest, map_name, image_threshold, pixel_threshold, path)
