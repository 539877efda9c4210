"""Use a trained model on new images: :func:`load_model` (the Python API) and
:func:`predict_files` (what ``predict.py`` runs).

Both score through :meth:`pni.model.PNIModel.score`, the object the test stage uses, then
bring the maps back to each input image's own pixels (undoing the resize and the centre
crop; what the crop cut off is "not inspected") and apply the bundle's calibrated
thresholds: an image is defective when its score is above the image threshold, a pixel
when its score is above the pixel threshold; defect regions are the 8-connected components
of the defect mask. Normalised scores divide by the threshold in use (1.0 = the threshold).
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from pni.bundle import load_bundle
from pni.cli import one_line
from pni.data.datasets import IMAGE_EXTENSIONS
from pni.data.transforms import CropGeometry, load_image, to_rgb
from pni.errors import PNIError
from pni.io import check_output_dir, make_dir, save_npy, write_csv
from pni.model import PNIModel
from pni.results import render_table
from pni.scoring import MAP_NAMES, ImageScores
from pni.viz import draw_contours, jet, save_jpeg, save_png

THRESHOLD_KEYS = {
    "image": {"fpr": "image", "best_f1": "image_best_f1"},
    "pixel": {"fpr": "pixel", "best_f1": "pixel_best_f1"},
}
PREDICTION_COLUMNS = (
    "name",
    "path",
    "width",
    "height",
    "verdict",
    "map",
    "score",
    "score_normalised",
    "image_threshold",
    "pixel_threshold",
    "regions",
    "inspected_x0",
    "inspected_y0",
    "inspected_x1",
    "inspected_y1",
) + tuple(f"{m}_{k}" for m in MAP_NAMES for k in ("score", "normalised"))
SUMMARY_ROWS = 20
REGION_COLUMNS = ("name", "region", "x0", "y0", "x1", "y1", "area", "peak_score", "peak_normalised", "peak_x", "peak_y")


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
        model: PNIModel,
        manifest: dict[str, Any],
        map_name: str = "nb_coor",
        image_threshold: str | float = "fpr",
        pixel_threshold: str | float = "fpr",
        device: str | torch.device = "cpu",
        path: str | os.PathLike | None = None,
    ) -> None:
        check_choices(map_name, image_threshold, pixel_threshold)
        self.model = model
        self.manifest = manifest
        self.path = path
        self.map_name = map_name
        self.device = torch.device(device)
        self.image_thresholds = {m: self._threshold("image", m, image_threshold) for m in MAP_NAMES}
        self.pixel_threshold = self._threshold("pixel", map_name, pixel_threshold)
        self.heatmap = manifest["thresholds"][map_name]["heatmap"]
        self.transform = model.transform()

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
        self, result: ImageScores, original: np.ndarray, path: str | None = None, all_maps: bool = True
    ) -> Prediction:
        """A scored image's :class:`Prediction`; ``original``: the input as uint8 HxWx3."""
        height, width = original.shape[:2]
        geometry = CropGeometry.of(width, height, self.model.resize, self.model.imagesize)
        names = MAP_NAMES if all_maps else (self.map_name,)
        maps = {m: geometry.to_input(result.maps[m].detach().float().cpu().numpy()) for m in names}
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

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 8) -> Prediction | list[Prediction]:
        """Predict one image or a list of them: paths, PIL images or arrays (see
        :func:`as_rgb_image`). Returns one :class:`Prediction` (a list for a list), with all
        four maps."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rgb = [as_rgb_image(x, f"image {start + i}") for i, x in enumerate(chunk)]
            batch = torch.stack([self.transform(img) for img in rgb]).to(self.device)
            for x, img, result in zip(chunk, rgb, self.model.score(batch)):
                path = str(x) if isinstance(x, (str, os.PathLike)) else None
                out.append(self.finish(result, np.asarray(img), path))
        return out[0] if single else out


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "auto",
    map_name: str = "nb_coor",
    image_threshold: str | float = "fpr",
    pixel_threshold: str | float = "fpr",
    backbone_weights: str | os.PathLike | None = None,
) -> Predictor:
    """Load a model bundle (written by ``export_model.py``) for prediction.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``...; ``map_name``: the map
    that decides (``nb_coor``, ``nb``, ``coor``, ``patchcore``); thresholds: ``fpr`` (from good
    images at the export's target false-positive rate), ``best_f1`` or a raw score;
    ``backbone_weights``: the weights file when the bundle does not include them.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_choices(map_name, image_threshold, pixel_threshold)
    model, manifest = load_bundle(path, backbone_weights)
    return Predictor(model.to(device), manifest, map_name, image_threshold, pixel_threshold, device, path)


# ---------------------------------------------------------------- predict.py


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (every image file below, sorted) and glob patterns -> the image paths
    (first occurrence kept) and ``(input, error)`` for inputs that name nothing."""
    paths: list[Path] = []
    missing: list[tuple[str, str]] = []
    for text in inputs:
        p = Path(text)
        if p.is_dir():
            found = sorted(
                q
                for q in p.rglob("*")
                if q.is_file()
                and q.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
            if not found:
                missing.append((text, f"no image files in folder {text}"))
            paths += found
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(text):
            found = sorted(Path(q) for q in glob.glob(text, recursive=True) if Path(q).is_file())
            if not found:
                missing.append((text, f"no file matches {text}"))
            paths += found
        else:
            missing.append((text, f"input not found: {text}"))
    return list(dict.fromkeys(paths)), missing


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct file-name-safe name per input, the same for the same inputs: its stem, or for
    stems that occur more than once its path below the common folder of those inputs, ``/``
    written ``__``. A name whose output files (``<name>.jpg``, ``<name>.png``,
    ``<name>_<map>.npy``; letter case ignored) another input's already have gets ``_<ext>``
    (the input's extension), then ``_2``, ``_3``..."""
    stems = [p.stem for p in paths]
    counts = Counter(stems)
    repeated = [p.resolve() for p, s in zip(paths, stems) if counts[s] > 1]
    if repeated:
        common = Path(os.path.commonpath([str(p.parent) for p in repeated]))
        stems = [
            s if counts[s] == 1 else "__".join(p.resolve().with_suffix("").relative_to(common).parts)
            for s, p in zip(stems, paths)
        ]
    taken: set[str] = set()
    names = []
    for path, stem in zip(paths, stems):
        extension = path.suffix.lstrip(".")
        candidates = itertools.chain(
            [stem], [f"{stem}_{extension}"] if extension else [], (f"{stem}_{k}" for k in itertools.count(2))
        )
        name = next(c for c in candidates if not _output_files(c) & taken)
        taken |= _output_files(name)
        names.append(name)
    return names


def _output_files(name: str) -> set[str]:
    """The files :class:`PredictionWriter` writes for ``name`` (case-folded, for file systems
    that ignore case)."""
    return {
        n.casefold()
        for n in (f"overlays/{name}.jpg", f"masks/{name}.png", *(f"maps/{name}_{m}.npy" for m in MAP_NAMES))
    }


class InputImages(Dataset):
    """Decodes input images for prediction. Items: ``image`` (the model's input tensor),
    ``original`` (uint8 HxWx3), ``path``, ``index``, ``error`` (empty, or why the file could
    not be read: then ``image`` is zeros and the item is not scored)."""

    def __init__(self, paths: Sequence[Path], model: PNIModel) -> None:
        self.paths = list(paths)
        self.transform = model.transform()
        self.size = model.imagesize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = str(self.paths[i])
        try:
            img = load_image(path)
            return {"image": self.transform(img), "original": np.asarray(img), "path": path, "index": i, "error": ""}
        except PNIError as exc:
            return {
                "image": torch.zeros(3, self.size, self.size),
                "original": None,
                "path": path,
                "index": i,
                "error": one_line(exc),
            }


def collate_inputs(items: list[dict]) -> dict:
    """Stack the input tensors; keep originals, paths and errors as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        **{k: [it[k] for it in items] for k in ("original", "path", "error")},
    }


class _CsvStream:
    """A CSV written row by row under a hidden name, renamed onto ``path`` by :meth:`close`
    (also after an interruption: every row written is complete)."""

    def __init__(self, path: Path, header: Sequence[str]) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        self.fh = open(self.tmp, "w", newline="")
        self.writer = csv.writer(self.fh)
        self.writer.writerow(header)

    def write(self, row: Iterable[Any]) -> None:
        self.writer.writerow(list(row))

    def close(self) -> None:
        self.fh.close()
        os.replace(self.tmp, self.path)


class PredictionWriter:
    """Sink of :class:`pni.lightning.ScoringModule`: writes each image's outputs as it comes
    (so memory does not grow with the number of images)."""

    def __init__(self, predictor: Predictor, out_dir: Path, names: Sequence[str], save_maps: bool) -> None:
        self.predictor = predictor
        self.out_dir = out_dir
        self.names = list(names)
        self.save_maps = save_maps
        for sub in ("overlays", "masks") + (("maps",) if save_maps else ()):
            make_dir(out_dir / sub, "--output")
        self.predictions = _CsvStream(out_dir / "predictions.csv", PREDICTION_COLUMNS)
        self.regions = _CsvStream(out_dir / "regions.csv", REGION_COLUMNS)
        self.errors: list[tuple[str, str]] = []
        self.summary: list[list[str]] = []  # the first SUMMARY_ROWS images, for the printed table
        self.counts = {"good": 0, "defective": 0}

    def failed(self, path: str, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.errors.append((path, message))

    def __call__(self, meta: dict, result: ImageScores | None) -> None:
        if result is None:
            self.failed(meta["path"], meta["error"])
            return
        name = self.names[int(meta["index"])]
        original = meta["original"]
        p = self.predictor.finish(result, original, meta["path"], all_maps=self.save_maps)
        save_jpeg(self.out_dir / "overlays" / f"{name}.jpg", self.predictor.overlay(p, original))
        save_png(self.out_dir / "masks" / f"{name}.png", p.mask.astype(np.uint8) * 255)
        if self.save_maps:
            for m, amap in p.maps.items():
                save_npy(self.out_dir / "maps" / f"{name}_{m}.npy", amap)
        self.predictions.write(
            [
                name,
                p.path,
                p.width,
                p.height,
                p.verdict,
                p.map_name,
                f"{p.score:.6f}",
                f"{p.score_normalised:.4f}",
                f"{p.image_threshold:.6f}",
                f"{p.pixel_threshold:.6f}",
                len(p.regions),
                *p.inspected,
            ]
            + [v for m in MAP_NAMES for v in (f"{p.scores[m]:.6f}", f"{p.normalised[m]:.4f}")]
        )
        for i, r in enumerate(p.regions):
            self.regions.write(
                [
                    name,
                    i,
                    r.x0,
                    r.y0,
                    r.x1,
                    r.y1,
                    r.area,
                    f"{r.peak_score:.6f}",
                    f"{r.peak_normalised:.4f}",
                    r.peak_x,
                    r.peak_y,
                ]
            )
        self.counts[p.verdict] += 1
        if len(self.summary) < SUMMARY_ROWS:
            self.summary.append([name, p.verdict, f"{p.score_normalised:.3f}", str(len(p.regions))])

    def close(self) -> None:
        self.predictions.close()
        self.regions.close()
        write_csv(self.out_dir / "errors.csv", ("path", "error"), self.errors)


def predict_files(args) -> int:
    """``predict.py``: predict every input image into ``args.output``; returns the number of
    inputs that could not be read (reported on stderr and in ``errors.csv``)."""
    # Lightning only here: the Python API (load_model) runs without it.
    from pni.console import Progress
    from pni.lightning import ScoringModule, interruptible
    from pni.pipeline import _batch_size, _probe, _trainer

    check_choices(args.map, args.image_threshold, args.pixel_threshold)
    check_output_dir(args.output, "--output")
    paths, missing = expand_inputs(args.input)
    if not paths and not missing:
        raise PNIError("--input: no image given")
    predictor = load_model(
        args.model, "cpu", args.map, args.image_threshold, args.pixel_threshold, args.backbone_weights
    )
    model = predictor.model
    out_dir = make_dir(args.output, "--output")
    writer = PredictionWriter(predictor, out_dir, output_names(paths), args.save_maps)
    for text, message in missing:
        writer.failed(text, message)
    try:
        if paths:
            batch = args.batch_size
            if batch is None:
                _, per_image = _probe(model.extractor, torch.zeros(3, model.imagesize, model.imagesize))
                batch = _batch_size(_trainer_flags(model, args), per_image)
            loader = DataLoader(
                InputImages(paths, model),
                batch_size=batch,
                shuffle=False,
                num_workers=args.num_workers,
                collate_fn=collate_inputs,
            )
            with Progress(f"predicting {len(paths)} images with {args.model} ({predictor.map_name} map)") as bar:
                trainer = _trainer(_trainer_flags(model, args), bar, devices=1)
                interruptible(trainer.predict, ScoringModule(model, writer), loader, return_predictions=False)
    finally:
        writer.close()
    done = writer.counts["defective"] + writer.counts["good"]
    if writer.summary:
        print(render_table([["image", "verdict", "score / threshold", "regions"]] + writer.summary))
    if done > len(writer.summary):
        print(f"... and {done - len(writer.summary)} more in predictions.csv")
    print(
        f"{done} images: {writer.counts['defective']} defective, {writer.counts['good']} good"
        + (f"; {len(writer.errors)} could not be read (errors.csv)" if writer.errors else "")
    )
    print(f"predictions: {out_dir / 'predictions.csv'}, regions: {out_dir / 'regions.csv'}")
    print(
        f"pictures: {out_dir / 'overlays'}/ (heat map on the image, defects outlined), masks: {out_dir / 'masks'}/"
        + (f", maps: {out_dir / 'maps'}/" if args.save_maps else "")
    )
    return len(writer.errors)


def _trainer_flags(model: PNIModel, args: argparse.Namespace) -> argparse.Namespace:
    """The flags the pipeline's batch-size and trainer helpers read."""
    return argparse.Namespace(imagesize=model.imagesize, accelerator=args.accelerator, devices=1)
