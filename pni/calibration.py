"""Thresholds for new images, calibrated on scored images whose answer is known.

An image (or pixel) is called defective when its score is strictly above the threshold.

- Image threshold at a target false-positive rate ``f``, from ``N`` good images the model was
  not trained on: the ``(N - floor(f*N))``-th lowest good score (plus a relative 1e-4, see
  :data:`RESCORING_MARGIN`), so at most ``floor(f*N)`` of those images score above it.
- Pixel threshold from good images, at the same rate: the same order statistic of each good
  image's largest pixel score, so at most ``floor(f*N)`` good images get a flagged pixel.
- Best-F1 image and pixel thresholds where defective images (and masks) exist: the F1 of
  :func:`pni.metrics.best_f1_from_sweep`, placed halfway between the best cut and the next
  lower score.
- Heat-map colour scale: 0 at the median good pixel score, 0.5 at the pixel threshold, 1 at
  twice that distance above the median (a good part stays blue to cyan).

Every threshold records how many images it comes from and the false-positive and miss rates
it gives on them. Computes with numpy only; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pni.console import render_table
from pni.errors import PNIError
from pni.maps import MAP_NAMES
from pni.metrics import F1_EPS, best_f1_from_sweep, sweep

# Scores of the same image differ in their last digits with the batch it is scored in (CPU
# convolutions), so a threshold taken from a score sits this much (relative) above it.
RESCORING_MARGIN = 1e-4


def threshold_at_fpr(good_scores: Sequence[float] | np.ndarray, target_fpr: float) -> float:
    """Threshold from the scores of ``N`` good images at which at most ``floor(target_fpr * N)``
    of them score strictly above it: the ``(N - floor(target_fpr * N))``-th lowest score, plus
    :data:`RESCORING_MARGIN` of its magnitude."""
    scores = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise PNIError("no good images to calibrate the threshold on")
    allowed = min(int(math.floor(target_fpr * scores.size)), scores.size - 1)
    score = float(scores[scores.size - 1 - allowed])
    return score + RESCORING_MARGIN * abs(score)


def best_f1_cut(labels: np.ndarray, scores: np.ndarray) -> float:
    """Threshold (prediction ``score > t``) with the best F1 of ``labels`` (bool, any shape)
    against ``scores``: halfway between the best cut of :func:`pni.metrics.best_f1_from_sweep`
    (``score >= t``) and the next lower score."""
    sw = sweep(labels, scores)
    cut, _ = best_f1_from_sweep(sw)
    lower = sw.thresholds[sw.thresholds < cut]
    if lower.size:
        return float((float(cut) + float(lower.max())) / 2.0)
    return float(np.nextafter(float(cut), -np.inf))


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def _image_stats(threshold: float, good: np.ndarray, defective: np.ndarray) -> dict[str, Any]:
    fp = int((good > threshold).sum())
    misses = int((defective <= threshold).sum())
    stats = {
        "value": threshold,
        "good_images": int(good.size),
        "defective_images": int(defective.size),
        "false_positives": fp,
        "false_positive_rate": _rate(fp, good.size),
        "misses": misses if defective.size else None,
        "miss_rate": _rate(misses, defective.size),
    }
    if defective.size:
        tp = defective.size - misses
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / defective.size
        stats.update(precision=precision, recall=recall, f1=2 * precision * recall / (precision + recall + F1_EPS))
    return stats


class CalibrationScores:
    """Collects scored calibration images: per image its label (0 good, 1 defective), the
    image score and the ``(H, W)`` map of each family, and its mask (``None`` without one)."""

    def __init__(self) -> None:
        self.labels: list[int] = []
        self.image: dict[str, list[float]] = {m: [] for m in MAP_NAMES}
        self.maps: dict[str, list[np.ndarray]] = {m: [] for m in MAP_NAMES}
        self.masks: list[np.ndarray | None] = []

    def add(
        self, label: int, image_scores: Mapping[str, float], maps: Mapping[str, np.ndarray], mask: np.ndarray | None
    ) -> None:
        self.labels.append(int(label))
        for m in MAP_NAMES:
            self.image[m].append(float(image_scores[m]))
            self.maps[m].append(np.asarray(maps[m], dtype=np.float32))
        self.masks.append(None if mask is None else np.asarray(mask, dtype=bool))

    def __len__(self) -> int:
        return len(self.labels)


def calibrate(scores: CalibrationScores, target_fpr: float) -> dict[str, dict[str, Any]]:
    """Per map family: ``image`` and ``pixel`` thresholds at ``target_fpr`` (good images),
    ``image_best_f1`` (with defective images) and ``pixel_best_f1`` (with masks of every
    defective image), or ``None``; and the ``heatmap`` colour scale ``{low, high}``."""
    labels = np.asarray(scores.labels)
    good = labels == 0
    defective = ~good
    if not good.any():
        raise PNIError("no good images to calibrate the thresholds on")
    with_masks = bool(defective.any()) and all(scores.masks[i] is not None for i in np.flatnonzero(defective))
    out: dict[str, dict[str, Any]] = {}
    for m in MAP_NAMES:
        image = np.asarray(scores.image[m], dtype=np.float64)
        maps = scores.maps[m]
        entry: dict[str, Any] = {}
        thr = threshold_at_fpr(image[good], target_fpr)
        entry["image"] = {
            "method": f"good images, target false-positive rate {target_fpr:g}",
            **_image_stats(thr, image[good], image[defective]),
        }
        if thr <= 0:
            raise PNIError(
                f"the {m} image threshold is {thr:g} (not positive): scores cannot be normalised; "
                "check --prob_gamma (scores are positive for prob_gamma < 1)"
            )
        entry["image_best_f1"] = None
        if defective.any():
            cut = best_f1_cut(labels.astype(bool), image)
            entry["image_best_f1"] = {
                "method": "best F1, good and defective images",
                **_image_stats(cut, image[good], image[defective]),
            }

        peaks = np.array([float(maps[i].max()) for i in range(len(maps))])
        pix = threshold_at_fpr(peaks[good], target_fpr)
        flagged = int((peaks[good] > pix).sum())
        entry["pixel"] = {
            "method": f"good images: largest pixel score, target false-positive rate {target_fpr:g}",
            "value": pix,
            "good_images": int(good.sum()),
            "good_images_flagged": flagged,
            "good_images_flagged_rate": flagged / int(good.sum()),
            **_pixel_stats(pix, scores, m, with_masks),
        }
        entry["pixel_best_f1"] = None
        if with_masks:
            gt = np.stack(
                [np.zeros(amap.shape, bool) if mask is None else mask for amap, mask in zip(maps, scores.masks)]
            )
            cut = best_f1_cut(gt, np.stack(maps))
            entry["pixel_best_f1"] = {
                "method": "best F1, pixels of good and defective images",
                "value": cut,
                "good_images": int(good.sum()),
                **_pixel_stats(cut, scores, m, True),
            }
        low = float(np.median(np.concatenate([maps[i].ravel() for i in np.flatnonzero(good)])))
        high = low + 2.0 * (pix - low)
        entry["heatmap"] = {"low": low, "high": high if high > low else low + max(abs(low), 1.0) * 1e-3}
        out[m] = entry
    return out


def _pixel_stats(threshold: float, scores: CalibrationScores, m: str, with_masks: bool) -> dict[str, Any]:
    """Pixel rates at ``threshold``: false positives over the normal pixels (all pixels of good
    images, and with masks the normal pixels of defective ones); with masks also the miss
    rate, precision, recall and F1 over the defect pixels (else ``None``)."""
    normal = positive = flagged_normal = flagged_positive = 0
    for label, amap, mask in zip(scores.labels, scores.maps[m], scores.masks):
        above = amap > threshold
        if label == 0:
            normal += amap.size
            flagged_normal += int(above.sum())
        elif with_masks:
            assert mask is not None  # with_masks: every defective image has one
            positive += int(mask.sum())
            normal += int((~mask).sum())
            flagged_positive += int((above & mask).sum())
            flagged_normal += int((above & ~mask).sum())
    out: dict[str, Any] = {
        "defective_images": sum(scores.labels) if with_masks else 0,
        "pixel_false_positive_rate": _rate(flagged_normal, normal),
        "pixel_miss_rate": None,
        "precision": None,
        "recall": None,
        "f1": None,
    }
    if with_masks and positive:
        precision = flagged_positive / (flagged_positive + flagged_normal) if flagged_positive + flagged_normal else 0.0
        recall = flagged_positive / positive
        out.update(
            pixel_miss_rate=(positive - flagged_positive) / positive,
            precision=precision,
            recall=recall,
            f1=2 * precision * recall / (precision + recall + F1_EPS),
        )
    return out


def _pct(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{100 * value:.1f}%{unit}"


def format_thresholds(thresholds: Mapping[str, Mapping[str, Any]], target_fpr: float) -> str:
    """The export's table: each map's thresholds, the images they come from and the
    false-positive and miss rates they give on them (image thresholds: over images; pixel
    thresholds: over pixels, and for the good-image one the share of good images with a
    flagged pixel in brackets)."""
    names = {
        "image": f"image, FPR {target_fpr:g}",
        "image_best_f1": "image, best F1",
        "pixel": f"pixel, FPR {target_fpr:g}",
        "pixel_best_f1": "pixel, best F1",
    }
    lines = [["map", "threshold", "value", "good images", "defective images", "false positives", "misses", "F1"]]
    for m, entry in thresholds.items():
        for key, label in names.items():
            t = entry.get(key)
            if t is None:
                continue
            if key.startswith("image"):
                fp, miss = _pct(t["false_positive_rate"]), _pct(t["miss_rate"])
            else:
                fp, miss = _pct(t["pixel_false_positive_rate"], " px"), _pct(t["pixel_miss_rate"], " px")
                if key == "pixel":
                    fp += f" ({_pct(t['good_images_flagged_rate'])} img)"
            f1 = "-" if t.get("f1") is None else f"{t['f1']:.3f}"
            lines.append(
                [m, label, f"{t['value']:.6g}", str(t["good_images"]), str(t["defective_images"] or "-"), fp, miss, f1]
            )
    return render_table(lines)
