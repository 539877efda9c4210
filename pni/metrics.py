"""Evaluation metrics: image/pixel AUROC, best-F1 thresholds and two AUPRO definitions.

Every curve is computed by one sort of the scores (or one histogram, for small integer
maps such as the 16-bit ravel PNGs) followed by cumulative sums; nothing loops over
thresholds. No Lightning, no torch.

AUPRO definitions (docs/METHOD.md, section 6):

* :func:`aupro_mvtec` -- the MVTec AD evaluation code's definition. Ground-truth regions are
  the 8-connected components of each mask. A pixel is predicted defective at threshold
  ``t`` when ``score >= t``; every distinct score is a threshold. PRO(t) = mean over all
  regions of all images of the fraction of the region's pixels predicted defective;
  FPR(t) = fraction of all normal pixels predicted defective. The curve gets (0, 0) and
  (1, 1) end points, is integrated with the trapezoid rule up to FPR = ``fpr_limit``
  (linear interpolation at the limit) and divided by ``fpr_limit``.
* :func:`aupro_pni` -- the original PNI code's definition (``cal_pro_metric_new``).
  ``max_steps`` thresholds ``t_s = max - s * (max - min) / max_steps``, ``s = 0 ..
  max_steps-1`` (float64); a pixel is predicted defective when ``score > t_s``. Regions are
  the 8-connected components of each image's mask. The overlap of a region counts the
  predicted pixels inside the region's *hole-filled* footprint (``regionprops.image_filled``:
  ``binary_fill_holes`` of the region's bounding-box crop with a 3x3 structure), so pixels in
  holes -- normal pixels, or pixels of another region nested in the hole -- count too; it is
  divided by the region's own (unfilled) area, so a region's PRO may exceed 1, exactly as in
  the original. PRO(t_s) = mean of these over all regions; FPR(t_s) = predicted normal
  pixels / all normal pixels. Thresholds with FPR <= ``fpr_limit`` are kept, the FPR axis is
  min-max rescaled (its minimum is 0, so this divides by the largest FPR reached) and PRO is
  integrated with ``sklearn.metrics.auc``. When no kept threshold has a false positive the
  axis cannot be rescaled; the original then yields NaN and so do we.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc as _sk_auc

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "best_f1_threshold",
    "aupro_mvtec",
    "aupro_pni",
    "roc_curve_points",
    "pro_curve",
    "pro_curve_from_sweep",
    "pni_pro_curve",
    "Sweep",
    "sweep",
    "label_regions",
    "auroc_from_sweep",
    "best_f1_from_sweep",
    "aupro_from_sweep",
    "F1_EPS",
]

F1_EPS = 1e-6
_INT_HIST_LIMIT = 1 << 20  # integer scores below this are swept with a histogram
_STRUCT_2D = np.ones((3, 3), dtype=bool)
_STRUCT_STACK = np.zeros((3, 3, 3), dtype=bool)
_STRUCT_STACK[1] = True  # 8-connectivity inside an image, nothing across images


@dataclass
class Sweep:
    """Cumulative counts over distinct thresholds, highest threshold first.

    ``tp[j]``/``fp[j]``: defective/normal elements with ``score >= thresholds[j]``;
    ``pro[j]``: mean over ground-truth regions of the covered fraction (MVTec PRO), or None.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int
    pro: np.ndarray | None = None
    n_regions: int = 0


def _check_finite(scores: np.ndarray) -> None:
    if scores.dtype.kind == "f" and not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")


def _is_small_int(scores: np.ndarray) -> bool:
    return (
        scores.dtype.kind in "ui" and scores.size > 0 and int(scores.min()) >= 0 and int(scores.max()) < _INT_HIST_LIMIT
    )


def _f32_sort_key(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 ``values`` (-0.0 and 0.0 tie)."""
    u = (values.astype(np.float32, copy=False) + np.float32(0.0)).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def _f32_from_key(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.uint32)
    u = np.where(keys & np.uint32(0x80000000), keys & np.uint32(0x7FFFFFFF), ~keys)
    return u.view(np.float32)


def _descending_sums(scores: np.ndarray, ids: np.ndarray, id_weights: np.ndarray | None = None):
    """Sweep helper. ``ids``: 0 for negatives, > 0 for positives (a region id, or 1).

    Returns the distinct scores (descending) and, for each, the number of positives, the
    number of negatives and (with ``id_weights``) the sum of ``id_weights[id]`` over the
    elements scoring at least that much. Small non-negative integer scores use a histogram,
    float32-representable scores one sort of packed (score, id) keys, others an argsort.
    """
    scores = np.ravel(scores)
    ids = np.ravel(ids)
    _check_finite(scores)
    pos_mask = ids > 0
    if _is_small_int(scores):
        nbins = int(scores.max()) + 1
        total = np.bincount(scores, minlength=nbins)
        present = np.flatnonzero(total)[::-1]
        pos_scores = scores[pos_mask]
        pos = np.bincount(pos_scores, minlength=nbins)[present]
        tp = np.cumsum(pos)
        fp = np.cumsum(total[present] - pos)
        ws = None
        if id_weights is not None:
            w = id_weights[ids[pos_mask]]
            ws = np.cumsum(np.bincount(pos_scores, weights=w, minlength=nbins)[present])
        return present.astype(scores.dtype), tp, fp, ws
    if (
        scores.dtype == np.float32
        or scores.dtype == np.float16
        or (scores.dtype.kind == "f" and np.array_equal(scores.astype(np.float32), scores))
    ):
        if ids.size and int(ids.max()) >= 1 << 32:
            raise ValueError("too many regions")
        keys = _f32_sort_key(scores).astype(np.uint64) << np.uint64(32)
        keys |= ids.astype(np.uint64)
        keys.sort()
        keys = keys[::-1]
        hi = (keys >> np.uint64(32)).astype(np.uint32)
        last = np.flatnonzero(np.r_[hi[1:] != hi[:-1], True])
        s_last = _f32_from_key(hi[last])
        del hi
        sorted_ids = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
        del keys
    else:
        order = np.argsort(scores)[::-1]
        s = scores[order]
        last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
        s_last = s[last]
        sorted_ids = ids[order]
    tp = np.cumsum(sorted_ids > 0, dtype=np.int64)[last]
    fp = (last + 1) - tp
    ws = None
    if id_weights is not None:
        w = id_weights[sorted_ids]
        ws = np.cumsum(w, out=w)[last]
    return s_last, tp, fp, ws


def _as_stack(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks).astype(bool, copy=False)
    maps = np.asarray(maps)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    return masks, maps


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected ground-truth regions of a (N, H, W) mask stack, ids unique over the stack."""
    labels, n = ndimage.label(np.asarray(masks, dtype=bool), structure=_STRUCT_STACK)
    return labels, int(n)


def sweep(labels_or_masks, scores, with_pro: bool = False, regions: tuple[np.ndarray, int] | None = None) -> Sweep:
    """Threshold sweep of ``scores`` against binary ground truth (any shape).

    With ``with_pro`` the inputs must be (N, H, W) masks and maps and the MVTec PRO
    (8-connected regions; ``regions`` may pass a precomputed :func:`label_regions`) is
    accumulated as well.
    """
    if with_pro:
        masks, maps = _as_stack(labels_or_masks, scores)
        region_ids, n_regions = regions if regions is not None else label_regions(masks)
        sizes = np.bincount(region_ids.ravel(), minlength=n_regions + 1)
        region_w = np.zeros(n_regions + 1)
        if n_regions:
            region_w[1:] = 1.0 / (sizes[1:] * n_regions)
        thr, tp, fp, pro = _descending_sums(maps, region_ids, region_w)
        return Sweep(thr, tp, fp, int(tp[-1]), int(fp[-1]), pro, n_regions)
    y = np.ravel(np.asarray(labels_or_masks)).astype(bool)
    s = np.ravel(np.asarray(scores))
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    thr, tp, fp, _ = _descending_sums(s, y.view(np.uint8))
    return Sweep(thr, tp, fp, int(tp[-1]), int(fp[-1]))


def _need_both(sw: Sweep, what: str) -> None:
    if sw.n_pos == 0 or sw.n_neg == 0:
        raise ValueError(
            f"{what} needs both normal and defective samples (got {sw.n_neg} normal, {sw.n_pos} defective)"
        )


def auroc_from_sweep(sw: Sweep) -> float:
    """Area under the ROC curve (ties count half, as sklearn's roc_auc_score)."""
    _need_both(sw, "AUROC")
    tpr = np.r_[0.0, sw.tp / sw.n_pos]
    fpr = np.r_[0.0, sw.fp / sw.n_neg]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def roc_curve_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` starting at (0, 0); prediction is ``score >= t``
    (the first threshold is +inf)."""
    sw = sweep(labels, scores)
    _need_both(sw, "ROC curve")
    thr = np.r_[np.inf, sw.thresholds.astype(np.float64)]
    return np.r_[0.0, sw.fp / sw.n_neg], np.r_[0.0, sw.tp / sw.n_pos], thr


def image_auroc(labels, scores) -> float:
    """Image-level AUROC; ``labels`` 1 = defective. Equals sklearn's roc_auc_score."""
    return auroc_from_sweep(sweep(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC over all pixels of all maps. Equals sklearn's roc_auc_score."""
    return auroc_from_sweep(sweep(masks, maps))


def best_f1_from_sweep(sw: Sweep) -> tuple[float, float]:
    """``(threshold, f1)`` maximising F1 = 2PR/(P+R+1e-6) with prediction ``score >= t``;
    the lowest such threshold on ties."""
    if sw.n_pos == 0:
        raise ValueError("best F1 needs at least one defective sample")
    precision = sw.tp / (sw.tp + sw.fp)
    recall = sw.tp / sw.n_pos
    f1 = 2 * precision * recall / (precision + recall + F1_EPS)
    j = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(sw.thresholds[j]), float(f1[j])


def best_f1_threshold(labels, scores) -> tuple[float, float]:
    """``(threshold, f1)``: threshold with the best F1 = 2PR/(P+R+1e-6) for ``score >= t``."""
    return best_f1_from_sweep(sweep(labels, scores))


def _trapezoid_limited(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x <= x_max, interpolating y linearly at x_max
    (as the MVTec AD evaluation code). ``x`` must be non-decreasing."""
    keep = x <= x_max
    area = float(np.sum(np.diff(x[keep]) * (y[keep][1:] + y[keep][:-1])) / 2.0)
    if not np.any(x == x_max):
        i = int(np.searchsorted(x, x_max, side="right"))
        if 0 < i < len(x):
            y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
            area += 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    return area


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MVTec PRO curve ``(fpr, pro, thresholds)`` with end points (0, 0) and (1, 1)
    (thresholds +inf and -inf there)."""
    return pro_curve_from_sweep(sweep(masks, maps, with_pro=True))


def pro_curve_from_sweep(sw: Sweep):
    if sw.pro is None:
        raise ValueError("sweep was computed without PRO")
    if sw.n_regions == 0:
        raise ValueError("AUPRO needs at least one defective region")
    if sw.n_neg == 0:
        raise ValueError("AUPRO needs at least one normal pixel")
    fpr = np.clip(np.r_[0.0, sw.fp / sw.n_neg, 1.0], 0.0, 1.0)
    pro = np.clip(np.r_[0.0, sw.pro, 1.0], 0.0, 1.0)
    thr = np.r_[np.inf, sw.thresholds.astype(np.float64), -np.inf]
    return fpr, pro, thr


def aupro_from_sweep(sw: Sweep, fpr_limit: float = 0.3) -> float:
    """MVTec AUPRO from a sweep computed ``with_pro``."""
    fpr, pro, _ = pro_curve_from_sweep(sw)
    return _trapezoid_limited(fpr, pro, fpr_limit) / fpr_limit


def aupro_mvtec(masks, maps, fpr_limit: float = 0.3) -> float:
    """Standard MVTec AUPRO of ``maps`` (N, H, W) against bool ``masks`` (N, H, W), integrated
    up to ``fpr_limit`` and normalised by it (see the module docstring)."""
    return aupro_from_sweep(sweep(masks, maps, with_pro=True), fpr_limit)


def pni_pro_curve(masks, maps, max_steps: int = 2000, regions: tuple[np.ndarray, int] | None = None):
    """The original PNI code's curve: ``(fpr, pro, thresholds)`` at its ``max_steps``
    equally spaced thresholds (highest first). ``regions`` may pass a precomputed
    :func:`label_regions` result."""
    masks, maps = _as_stack(masks, maps)
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    _check_finite(np.ravel(maps))
    lo, hi = float(maps.min()), float(maps.max())
    delta = (hi - lo) / max_steps
    thr = hi - np.arange(max_steps) * delta
    labels, n_regions = regions if regions is not None else label_regions(masks)
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one defective region")
    normal = np.sort(maps[~masks].astype(np.float64, copy=False))
    if normal.size == 0:
        raise ValueError("AUPRO needs at least one normal pixel")
    fpr = (normal.size - np.searchsorted(normal, thr, side="right")) / normal.size
    # (score, 1/area) for every pixel of every hole-filled region footprint
    scores, weights = [], []
    for r, sl in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[sl][0] == r
        filled = ndimage.binary_fill_holes(region, structure=_STRUCT_2D)
        vals = maps[sl][0][filled]
        scores.append(vals.astype(np.float64, copy=False))
        weights.append(np.full(vals.size, 1.0 / np.count_nonzero(region)))
    s = np.concatenate(scores)
    order = np.argsort(s, kind="stable")
    s = s[order]
    suffix = np.r_[np.cumsum(np.concatenate(weights)[order][::-1])[::-1], 0.0]
    pro = suffix[np.searchsorted(s, thr, side="right")] / n_regions
    return fpr, pro, thr


def aupro_pni(
    masks, maps, max_steps: int = 2000, fpr_limit: float = 0.3, regions: tuple[np.ndarray, int] | None = None
) -> float:
    """The original PNI AUPRO (see the module docstring); NaN when no kept threshold
    produces a false positive."""
    fpr, pro, _ = pni_pro_curve(masks, maps, max_steps, regions)
    keep = fpr <= fpr_limit
    f, p = fpr[keep], pro[keep]
    if f.size < 2 or f.max() == f.min():
        return float("nan")
    f = (f - f.min()) / (f.max() - f.min())
    return float(_sk_auc(f, p))
