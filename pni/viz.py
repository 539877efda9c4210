"""Pictures for analysis: jet heat maps, overlays, contours, ROC/PRO plots, histograms.

Images are RGB ``uint8`` arrays in memory; files are written atomically through
:mod:`pni.io`. Plots use matplotlib's object API with the Agg canvas (no global backend); matplotlib is
imported by the plots alone, so that prediction (overlays, masks) runs without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pni.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ORANGE = (255, 165, 0)
GREEN = (0, 255, 0)
RED = (255, 0, 0)


def to_unit(amap: np.ndarray, per_image: bool = False) -> np.ndarray:
    """Map to [0, 1]: clip, or min-max over this one map when ``per_image``."""
    amap = np.asarray(amap, dtype=np.float32)
    if per_image:
        lo, hi = float(amap.min()), float(amap.max())
        return (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
    return np.clip(amap, 0.0, 1.0)


def jet(amap: np.ndarray, per_image: bool = False) -> np.ndarray:
    """Jet colour map (RGB uint8, HxWx3) of a map with values in [0, 1]."""
    u8 = np.round(to_unit(amap, per_image) * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB from a grey, RGB or RGBA array."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        return image[..., :3].copy()
    return image


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB colour picture over an RGB image: ``(1-alpha)*image + alpha*colour``."""
    out = (1.0 - alpha) * as_rgb(image).astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def tint(image: np.ndarray, mask: np.ndarray, colour: Sequence[int] = RED, alpha: float = 0.4) -> np.ndarray:
    """Tint the pixels of ``mask`` with ``colour``."""
    out = as_rgb(image).copy()
    m = np.asarray(mask, dtype=bool)
    out[m] = np.round((1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)).astype(np.uint8)
    return out


def draw_contours(
    image: np.ndarray, mask: np.ndarray, colour: Sequence[int] = ORANGE, thickness: int = 2
) -> np.ndarray:
    """Draw the outlines of a binary mask on a copy of an RGB image."""
    out = np.ascontiguousarray(as_rgb(image).copy())
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness)
    return out


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB (HxWx3 uint8) or grey (HxW uint8/uint16) image as PNG, atomically."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"cannot write {path}")


def save_jpeg(path: str | os.PathLike, image: np.ndarray, quality: int = 90) -> None:
    """Write an RGB (HxWx3 uint8) image as JPEG, atomically."""
    bgr = cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
            raise OSError(f"cannot write {path}")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save_figure(fig: Figure, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")


def plot_roc(
    path: str | os.PathLike, curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], title: str = ""
) -> None:
    """ROC curves: ``{name: (fpr, tpr, auroc)}``."""
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * area:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title or "ROC")
    ax.legend(loc="lower right")
    _save_figure(fig, path)


def plot_pro(
    path: str | os.PathLike,
    fpr: np.ndarray,
    pro: np.ndarray,
    fpr_limit: float = 0.3,
    aupro: float | None = None,
    title: str = "",
) -> None:
    """MVTec PRO curve up to ``fpr_limit`` (shaded area = AUPRO * fpr_limit)."""
    keep = fpr <= fpr_limit
    f, p = fpr[keep], pro[keep]
    if len(f) < len(fpr):  # close the curve at the limit
        i = int(np.searchsorted(fpr, fpr_limit, side="right"))
        f = np.r_[f, fpr_limit]
        p = np.r_[p, np.interp(fpr_limit, fpr[i - 1 : i + 1], pro[i - 1 : i + 1])]
    fig = _figure(5, 4)
    ax = fig.add_subplot()
    label = "PRO" if aupro is None else f"PRO (AUPRO {100 * aupro:.2f})"
    ax.plot(f, p, label=label)
    ax.fill_between(f, p, alpha=0.2)
    ax.set(
        xlabel="false positive rate",
        ylabel="per-region overlap",
        xlim=(0, fpr_limit),
        ylim=(0, 1.01),
        title=title or "PRO curve",
    )
    ax.legend(loc="lower right")
    _save_figure(fig, path)


def plot_score_histogram(
    path: str | os.PathLike,
    normal: np.ndarray,
    defective: np.ndarray,
    threshold: float | None = None,
    bins: int = 100,
    title: str = "",
    threshold_label: str | None = None,
) -> None:
    """Histogram (density, log scale) of normal vs defective pixel scores; ``threshold`` (in
    the scores' units) is drawn as a line labelled ``threshold_label``."""
    normal, defective = np.ravel(normal), np.ravel(defective)
    nonempty = [v for v in (normal, defective) if v.size]
    lo = min((float(v.min()) for v in nonempty), default=0.0)
    hi = max((float(v.max()) for v in nonempty), default=1.0)
    if not hi > lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for name, values, colour in (("normal", normal, "tab:blue"), ("defective", defective, "tab:red")):
        if values.size:
            h, _ = np.histogram(values, bins=edges, density=True)
            ax.stairs(h, edges, label=f"{name} ({values.size} px)", color=colour, fill=True, alpha=0.4)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=threshold_label or f"threshold {threshold:.4f}")
    ax.set_yscale("log")
    ax.set(xlabel="anomaly score", ylabel="density", title=title or "pixel scores")
    ax.legend()
    _save_figure(fig, path)
