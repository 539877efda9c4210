"""Per-image result files and the score table of a test run (docs/METHOD.md, sections 5 and 6).

Layout (see docs/DESIGN.md): ``<project_root>/<category>/<backbone>/anomaly/lightning_logs/
version_<k>/sample/{type}_{stem}[...].npy`` plus ``image_scores.csv`` beside ``sample/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pni.cli import warn
from pni.console import render_table
from pni.io import append_csv_rows, check_csv_header, load_npy, save_npy, write_csv
from pni.maps import MAP_NAMES
from pni.metrics import image_auroc, pixel_auroc
from pni.viz import jet, save_jpeg

SETTING_COLUMNS: tuple[str, ...] = (
    "category",
    "backbone",
    "version",
    "seed",
    "imagesize",
    "subsampling_percentage",
    "anomaly_nn",
    "dist_coreset_size",
    "dist_padding",
    "num_layers",
    "variant",
    "mask_workers",
)
SCORE_COLUMNS: tuple[str, ...] = tuple(f"{m}_{k}" for m in MAP_NAMES for k in ("P-AUROC", "I-AUROC"))


def run_dir(project_root: str | os.PathLike, category: str, backbone: str) -> Path:
    """``<project_root>/<category>/<backbone>/anomaly`` (Lightning's logger save_dir)."""
    return Path(project_root) / category / backbone / "anomaly"


def version_dirs(project_root: str | os.PathLike, category: str, backbone: str) -> list[Path]:
    """Existing ``version_<k>`` folders, oldest first (by k)."""
    logs = run_dir(project_root, category, backbone) / "lightning_logs"
    found = [p for p in logs.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def heatmap_jpeg(path: str | os.PathLike, amap: np.ndarray) -> None:
    """Write a jet heat map (per-image min-max) as JPEG (quality 95, as before)."""
    save_jpeg(path, jet(amap, per_image=True), quality=95)


def write_sample(
    sample_dir: str | os.PathLike,
    defect_type: str,
    stem: str,
    image: np.ndarray,
    gt: np.ndarray,
    maps: Mapping[str, np.ndarray],
    jpeg: bool = True,
) -> None:
    """Write one test image's files: image (uint8 HxWx3), gt (uint8 HxW, 1 = defect) and the
    anomaly maps (float32 HxW) as ``.npy``, plus jet JPEGs of the maps."""
    sample_dir = Path(sample_dir)
    prefix = sample_dir / f"{defect_type}_{stem}"
    save_npy(f"{prefix}.npy", np.asarray(image, dtype=np.uint8))
    save_npy(f"{prefix}_gt.npy", np.asarray(gt, dtype=np.uint8))
    for name, amap in maps.items():
        save_npy(f"{prefix}_amap_{name}.npy", np.asarray(amap, dtype=np.float32))
        if jpeg:
            heatmap_jpeg(f"{prefix}_amap_{name}.jpg", amap)


def read_sample(
    sample_dir: str | os.PathLike, defect_type: str, stem: str, map_names: Sequence[str] = MAP_NAMES
) -> dict[str, np.ndarray]:
    """Read back what :func:`write_sample` wrote (never unpickles)."""
    prefix = Path(sample_dir) / f"{defect_type}_{stem}"
    out = {"image": load_npy(f"{prefix}.npy"), "gt": load_npy(f"{prefix}_gt.npy")}
    for name in map_names:
        out[name] = load_npy(f"{prefix}_amap_{name}.npy")
    return out


IMAGE_SCORE_COLUMNS: tuple[str, ...] = ("defect_type", "stem", "label") + MAP_NAMES


def write_image_scores(path: str | os.PathLike, rows: Sequence[Sequence]) -> None:
    """``image_scores.csv``: one row per test image with each map family's image score."""
    write_csv(path, IMAGE_SCORE_COLUMNS, rows)


def append_score_result(
    path: str | os.PathLike, settings: Mapping[str, object], scores: Mapping[str, float | None]
) -> list:
    """Append one run's row to ``score_result.csv`` (header on creation); return the row."""
    row = [settings.get(c, "") for c in SETTING_COLUMNS] + [
        "" if scores[c] is None else f"{scores[c]:.6f}" for c in SCORE_COLUMNS
    ]  # "": no pixel ground truth
    append_csv_rows(path, list(SETTING_COLUMNS) + list(SCORE_COLUMNS), [row])
    return row


def check_score_result(path: str | os.PathLike) -> None:
    """Refuse (PNIError) an existing ``score_result.csv`` whose header is not ours, before a
    run spends time scoring images it then cannot record."""
    check_csv_header(path, list(SETTING_COLUMNS) + list(SCORE_COLUMNS))


def defined_aurocs(labels: np.ndarray, masks: np.ndarray | None, what: str = "the test set") -> tuple[bool, bool]:
    """Whether image AUROC (labels ``(N,)``: normal and defective images) and pixel AUROC (masks
    ``(N, H, W)``: normal and defective pixels; ``None``: no pixel ground truth, not asked for)
    are defined; one warning line naming ``what`` when either is not (it is then written as NaN)."""
    n_defective = int((np.asarray(labels) > 0).sum())
    image_ok = 0 < n_defective < np.size(labels)
    n_pixels = int(np.count_nonzero(masks)) if masks is not None else 0
    pixel_ok = masks is None or 0 < n_pixels < np.size(masks)
    if not (image_ok and pixel_ok):
        undefined = " and ".join(k for k, ok in (("I-AUROC", image_ok), ("P-AUROC", pixel_ok)) if not ok)
        pixels = f", {n_pixels} defective pixels" if masks is not None else ""
        warn(
            f"{what} has {np.size(labels) - n_defective} normal and {n_defective} defective images{pixels}: "
            f"{undefined} undefined, written as nan"
        )
    return image_ok, pixel_ok


def auroc_scores(
    labels: Sequence[int],
    image_scores: Mapping[str, Sequence[float]],
    masks: Sequence[np.ndarray] | None,
    maps: Mapping[str, Sequence[np.ndarray]],
    what: str = "the test set",
) -> dict[str, float | None]:
    """``{family}_P-AUROC`` and ``{family}_I-AUROC`` of every map family: labels ``(N,)``,
    image scores ``(N,)`` per family, masks and maps ``N x (H, W)``.

    ``masks`` ``None`` (no pixel ground truth): P-AUROC ``None`` (written as an empty cell).
    An AUROC that the images cannot define (no normal or no defective image, no normal or no
    defective pixel) is NaN, announced by one warning line naming ``what``."""
    label_array = np.asarray(labels)
    gt = np.stack(masks) if masks is not None else None
    image_ok, pixel_ok = defined_aurocs(label_array, gt, what)
    out: dict[str, float | None] = {}
    for m in MAP_NAMES:
        if gt is None:
            out[f"{m}_P-AUROC"] = None
        else:
            out[f"{m}_P-AUROC"] = pixel_auroc(gt, np.stack(maps[m])) if pixel_ok else float("nan")
        out[f"{m}_I-AUROC"] = (
            image_auroc(label_array, np.asarray(image_scores[m], dtype=np.float64)) if image_ok else float("nan")
        )
    return out


def variant_label(variant: object, mask_workers: object = "") -> str:
    """``original/8`` (variant and reproduced mask workers) or ``paper`` (no workers)."""
    return f"{variant}/{mask_workers}" if str(variant) == "original" and str(mask_workers) else str(variant)


def format_score_table(rows: Sequence[Mapping[str, object]], first: str = "category", digits: int = 2) -> str:
    """One line per row (named by its ``first`` entry) with P-/I-AUROC of each map family, in %;
    a ``variant`` column (:func:`variant_label`) when the rows carry ``variant``; ``-`` where a
    score is missing (no pixel ground truth)."""
    with_variant = any("variant" in r for r in rows)
    head = (
        [first]
        + (["variant"] if with_variant else [])
        + [f"{m} {k}" for m in MAP_NAMES for k in ("P-AUROC", "I-AUROC")]
    )
    lines = [head]
    for r in rows:
        label = [variant_label(r.get("variant", ""), r.get("mask_workers", ""))] if with_variant else []
        lines.append(
            [str(r[first])]
            + label
            + ["-" if r[c] in (None, "") else f"{100 * float(str(r[c])):.{digits}f}" for c in SCORE_COLUMNS]
        )
    return render_table(lines)
