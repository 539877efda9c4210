"""Analysis of a ravel folder (docs/METHOD.md, section 6; ``analysis_amap.py``).

Per category: I-AUROC (image score = map max; an image is defective when its mask has a
defective pixel), P-AUROC over all pixels, best-F1 thresholds (pixel and image,
F1 = 2PR/(P+R+1e-6), prediction ``score >= threshold``) and, with ``calc_pro``, AUPRO in
both definitions of :mod:`pni.metrics` (columns ``AUPRO_MVTec`` and ``AUPRO_PNI``).
Metrics work on the 16-bit map codes (every distinct code is a threshold). The reported
``pixel_threshold`` is, as in the original, on the category's min-max normalised scale of
the maps, ``(t - min) / (max - min)`` over all pixels of the category's maps; the reported
``image_threshold`` and the misclassified-image scores are on the map scale (code / 65535).
Pictures outline the pixels at or above the same threshold ``t``, in map units.

Category borders come from ``index.csv``; only folders without it fall back to the
original's hard-coded MVTec / BTAD test-set sizes (with a warning).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np

from pni import metrics, viz
from pni.cli import nan_on_error, warn
from pni.console import print_table, render_table
from pni.errors import PNIError
from pni.io import write_csv
from pni.ravel import (
    BTAD_CATEGORIES,
    MVTEC_CATEGORIES,
    Entry,
    gt_path,
    image_path,
    pred_path,
    read_index,
    read_png16,
    read_rgb,
)

MVTEC_TEST_COUNTS: dict[str, int] = {
    "bottle": 83,
    "cable": 150,
    "capsule": 132,
    "carpet": 117,
    "grid": 78,
    "hazelnut": 110,
    "leather": 124,
    "metal_nut": 115,
    "pill": 167,
    "screw": 160,
    "tile": 117,
    "toothbrush": 42,
    "transistor": 100,
    "wood": 79,
    "zipper": 151,
}
BTAD_TEST_COUNTS: dict[str, int] = {"01": 70, "02": 230, "03": 441}
CODE_SCALE = 65535.0
SCORE_CSV = "score_result.csv"
MISCLASSIFIED_CSV = "misclassified_sample_list.csv"
MISCLASSIFIED_COLUMNS: tuple[str, ...] = ("category", "index", "defect_type", "stem", "kind", "score", "threshold")
PRO_COLUMNS: tuple[str, ...] = ("AUPRO_MVTec", "AUPRO_PNI")
THRESHOLD_COLUMNS: tuple[str, ...] = ("pixel_threshold", "image_threshold")
# One row of score_result.csv: category (str), num_images (int), the metrics (float).
ScoreRow = dict[str, Union[str, int, float]]


def score_columns(calc_pro: bool) -> tuple[str, ...]:
    """Columns of ``score_result.csv``."""
    return (
        ("category", "num_images", "I-AUROC", "P-AUROC")
        + (PRO_COLUMNS if calc_pro else ())
        + ("pixel_threshold", "pixel_F1", "image_threshold", "image_F1")
    )


def fallback_entries(root: Path, is_btad: bool, is_mvtec_small: bool) -> list[Entry]:
    """Category borders from the original's hard-coded test-set sizes (no ``index.csv``)."""
    if is_mvtec_small:
        raise PNIError(
            f"{root / 'index.csv'} is missing and the MVTec-small category sizes are "
            "not known; re-run convert_result_format.py to write it"
        )
    n = sum(1 for p in root.glob("*_pred.png") if re.fullmatch(r"\d{5}_pred\.png", p.name))
    if n == 0:
        raise PNIError(f"no {{i:05d}}_pred.png files in {root}")
    counts = BTAD_TEST_COUNTS if is_btad else MVTEC_TEST_COUNTS
    order = BTAD_CATEGORIES if is_btad else MVTEC_CATEGORIES
    entries: list[Entry] = []
    for cat in order:
        if len(entries) == n:
            break
        entries += [Entry(len(entries) + j, cat, "", f"{len(entries) + j:05d}") for j in range(counts[cat])]
    if len(entries) != n:
        raise PNIError(
            f"{root} holds {n} predictions and no index.csv; that count does not end at a "
            f"{'BTAD' if is_btad else 'MVTec'} category border, so categories cannot be told apart"
        )
    warn(
        f"{root / 'index.csv'} missing: using the original's hard-coded "
        f"{'BTAD' if is_btad else 'MVTec'} test-set sizes for category borders"
    )
    return entries


def load_entries(root: Path, is_btad: bool = False, is_mvtec_small: bool = False) -> list[Entry]:
    if not root.is_dir():
        raise PNIError(f"--project_root_path {root} does not exist")
    entries = read_index(root)
    if entries is None:
        entries = fallback_entries(root, is_btad, is_mvtec_small)
    if not entries:
        raise PNIError(f"{root / 'index.csv'} lists no images")
    return entries


def check_files(root: Path, entries: Sequence[Entry], visualize: bool = False) -> None:
    """Every ravel file the analysis will read exists (checked before anything is written)."""
    for e in entries:
        paths = (pred_path(root, e.index), gt_path(root, e.index)) + ((image_path(root, e.index),) if visualize else ())
        for p in paths:
            if not p.is_file():
                raise PNIError(
                    f"missing ravel file {p} ({e.category} {e.defect_type}/{e.stem} in {root / 'index.csv'})"
                    if e.stem and e.defect_type
                    else f"missing ravel file {p}"
                )


def group_by_category(entries: Sequence[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.category, []).append(e)
    return groups


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def load_category(root: Path, entries: Sequence[Entry]) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint16 (N,H,W), masks bool (N,H,W))`` of one category."""
    codes, masks = [], []
    for e in entries:
        for p in (pred_path(root, e.index), gt_path(root, e.index)):
            if not p.is_file():
                raise PNIError(f"missing ravel file {p}")
        codes.append(read_png16(pred_path(root, e.index)))
        masks.append(read_png16(gt_path(root, e.index)) > 0)
        if codes[-1].shape != masks[-1].shape:
            raise PNIError(
                f"{gt_path(root, e.index)} is {_size(masks[-1])} but its map {pred_path(root, e.index)} "
                f"is {_size(codes[-1])}"
            )
        if codes[-1].shape != codes[0].shape:
            raise PNIError(
                f"{pred_path(root, e.index)} is {_size(codes[-1])} but the category's first map "
                f"{pred_path(root, entries[0].index)} is {_size(codes[0])}"
            )
    return np.stack(codes), np.stack(masks)


def normalised_threshold(threshold: float, codes: np.ndarray) -> float:
    """``threshold`` on the min-max scale of ``codes``: ``(t - min) / (max - min)``;
    NaN when the threshold is NaN or every code is the same."""
    lo, hi = float(codes.min()), float(codes.max())
    if not np.isfinite(threshold) or hi == lo:
        return float("nan")
    return (float(threshold) - lo) / (hi - lo)


def analyse_category(
    root: Path,
    category: str,
    entries: Sequence[Entry],
    calc_pro: bool = False,
    max_steps: int = 2000,
    visualize: bool = False,
) -> tuple[ScoreRow, list[list[object]]]:
    """Metrics of one category (and its pictures); returns the row and misclassified images."""
    codes, masks = load_category(root, entries)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    img_codes = codes.reshape(len(codes), -1).max(axis=1)
    row: ScoreRow = {"category": category, "num_images": len(entries)}

    img_sw = metrics.sweep(labels, img_codes)
    row["I-AUROC"] = nan_on_error(metrics.auroc_from_sweep, img_sw, what=f"{category} I-AUROC")
    img_thr, img_f1 = metrics.best_f1_from_sweep(img_sw) if img_sw.n_pos else (float("nan"), float("nan"))
    need_regions = (calc_pro or visualize) and masks.any()
    regions = metrics.label_regions(masks) if need_regions else None
    pix_sw = metrics.sweep(masks, codes, with_pro=bool(need_regions), regions=regions)
    row["P-AUROC"] = nan_on_error(metrics.auroc_from_sweep, pix_sw, what=f"{category} P-AUROC")
    pix_thr, pix_f1 = metrics.best_f1_from_sweep(pix_sw) if pix_sw.n_pos else (float("nan"), float("nan"))
    if calc_pro:
        row["AUPRO_MVTec"] = (
            nan_on_error(metrics.aupro_from_sweep, pix_sw, what=f"{category} AUPRO_MVTec")
            if need_regions
            else float("nan")
        )
        row["AUPRO_PNI"] = (
            nan_on_error(
                metrics.aupro_pni, masks, codes / CODE_SCALE, max_steps, 0.3, regions, what=f"{category} AUPRO_PNI"
            )
            if need_regions
            else float("nan")
        )
    row["pixel_threshold"] = normalised_threshold(pix_thr, codes)
    row["pixel_F1"] = pix_f1
    row["image_threshold"] = img_thr / CODE_SCALE
    row["image_F1"] = img_f1

    misclassified: list[list[object]] = []
    if np.isfinite(img_thr):
        predicted = img_codes >= img_thr
        for j in np.flatnonzero(predicted != labels):
            e = entries[int(j)]
            misclassified.append(
                [
                    category,
                    e.index,
                    e.defect_type,
                    e.stem,
                    "FP" if predicted[j] else "FN",
                    f"{img_codes[j] / CODE_SCALE:.6f}",
                    f"{img_thr / CODE_SCALE:.6f}",
                ]
            )
    if visualize:
        _visualize_category(root, category, entries, codes, masks, pix_thr, pix_sw, img_sw, row)
    return row, misclassified


def _visualize_category(
    root: Path,
    category: str,
    entries: Sequence[Entry],
    codes: np.ndarray,
    masks: np.ndarray,
    pix_thr: float,
    pix_sw: metrics.Sweep,
    img_sw: metrics.Sweep,
    row: ScoreRow,
) -> None:
    out = root / "viz" / category
    for e, code, mask in zip(entries, codes, masks):
        i = f"{e.index:05d}"
        ipath = image_path(root, e.index)
        if not ipath.is_file():
            raise PNIError(f"missing ravel file {ipath}")
        image = read_rgb(ipath)
        if image.shape[:2] != code.shape:
            raise PNIError(
                f"{ipath}: image size {image.shape[:2]} differs from its map "
                f"{pred_path(root, e.index)} {code.shape}; cannot draw one on the other"
            )
        amap = code / CODE_SCALE
        heat = viz.jet(amap)
        pred = code >= pix_thr  # False everywhere when the threshold is nan
        viz.save_png(out / f"{i}.png", image)
        viz.save_png(out / f"{i}_mask.png", mask.astype(np.uint8) * 255)
        viz.save_png(out / f"{i}_amap.png", heat)
        on_img = viz.overlay(image, heat, 0.5)
        viz.save_png(out / f"{i}_amap_on_img.png", on_img)
        viz.save_png(
            out / f"{i}_img_with_gt.png", viz.draw_contours(viz.tint(image, mask, viz.GREEN), mask, viz.GREEN, 1)
        )
        viz.save_png(
            out / f"{i}_img_with_mask.png", viz.draw_contours(viz.tint(image, pred, viz.RED), pred, viz.RED, 1)
        )
        viz.save_png(out / f"{i}_heatmap_on_img_with_mask.png", viz.draw_contours(on_img, pred, viz.ORANGE, 2))
    curves = {}
    for name, sw, key in (("image", img_sw, "I-AUROC"), ("pixel", pix_sw, "P-AUROC")):
        if sw.n_pos and sw.n_neg:
            curves[name] = (np.r_[0.0, sw.fp / sw.n_neg], np.r_[0.0, sw.tp / sw.n_pos], float(row[key]))
    viz.plot_roc(out / "roc_curve.png", curves, title=f"{category} ROC")
    if pix_sw.pro is not None and pix_sw.n_neg:
        fpr, pro, _ = metrics.pro_curve_from_sweep(pix_sw)
        viz.plot_pro(
            out / "pro_curve.png", fpr, pro, 0.3, metrics.aupro_from_sweep(pix_sw), title=f"{category} PRO (MVTec)"
        )
    scores = codes.astype(np.float32) / CODE_SCALE
    finite = np.isfinite(pix_thr)
    viz.plot_score_histogram(
        out / "score_histogram.png",
        scores[~masks],
        scores[masks],
        pix_thr / CODE_SCALE if finite else None,
        title=f"{category} pixel scores",
        threshold_label=(f"threshold {pix_thr / CODE_SCALE:.4f} (normalised {float(row['pixel_threshold']):.4f})")
        if finite
        else None,
    )


def _fmt(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6f}"
    return str(value)


def average_row(rows: Sequence[ScoreRow], columns: Sequence[str]) -> ScoreRow:
    """Mean of every metric column (NaN propagates); ``num_images`` is the total."""
    avg: ScoreRow = {"category": "average", "num_images": sum(int(r["num_images"]) for r in rows)}
    for c in columns[2:]:
        avg[c] = float(np.mean([float(r[c]) for r in rows]))
    return avg


def format_table(rows: Sequence[ScoreRow], columns: Sequence[str]) -> str:
    """Plain-text table; scores in percent, thresholds as in ``score_result.csv``."""
    lines = [list(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r[c]
            if c in ("category", "num_images"):
                cells.append(str(v))
            elif c in THRESHOLD_COLUMNS:
                cells.append(f"{float(v):.4f}")
            else:
                cells.append(f"{100 * float(v):.2f}")
        lines.append(cells)
    return render_table(lines)


def analyse(
    root: str | os.PathLike,
    calc_pro: bool = False,
    visualize: bool = False,
    max_steps: int = 2000,
    calc_misclassified: bool = False,
    is_btad: bool = False,
    is_mvtec_small: bool = False,
    compare_with_patchcore: bool = False,
    quiet: bool = False,
) -> list[ScoreRow]:
    """Analyse every category of a ravel folder; write ``score_result.csv`` (rows + average)."""
    root = Path(root)
    if max_steps < 1:
        raise PNIError(f"--max_steps must be >= 1, got {max_steps}")
    entries = load_entries(root, is_btad, is_mvtec_small)
    check_files(root, entries, visualize)
    columns = score_columns(calc_pro)
    rows, wrong = [], []
    for cat, group in group_by_category(entries).items():
        row, mis = analyse_category(root, cat, group, calc_pro, max_steps, visualize)
        rows.append(row)
        wrong += mis
    table = rows + [average_row(rows, columns)]
    write_csv(root / SCORE_CSV, columns, [[_fmt(r[c]) for c in columns] for r in table])
    if calc_misclassified:
        write_csv(root / MISCLASSIFIED_CSV, MISCLASSIFIED_COLUMNS, wrong)
    if not quiet:
        print_table(
            f"analysis of {root} (%; pixel threshold on the category's min-max scale, image threshold "
            "on the map scale):",
            format_table(table, columns),
        )
        if calc_misclassified:
            print(f"{len(wrong)} misclassified image(s) listed in {root / MISCLASSIFIED_CSV}")
    if compare_with_patchcore:
        _compare_with_patchcore(root, table, columns, calc_pro, max_steps, is_btad, is_mvtec_small)
    return table


def patchcore_candidates(root: Path) -> list[Path]:
    """Where a PatchCore ravel folder beside ``root`` is looked for."""
    return [root.parent / "patchcore_ravel", root.with_name(root.name + "_patchcore")]


def _compare_with_patchcore(
    root: Path,
    ours: list[ScoreRow],
    columns: Sequence[str],
    calc_pro: bool,
    max_steps: int,
    is_btad: bool,
    is_mvtec_small: bool,
) -> None:
    found: Path | None = next((p for p in patchcore_candidates(root) if p.is_dir()), None)
    if found is None:
        warn(
            "--compare_with_patchcore: no PatchCore ravel folder at "
            + " or ".join(str(p) for p in patchcore_candidates(root))
            + "; nothing compared"
        )
        return
    theirs = {
        r["category"]: r for r in analyse(found, calc_pro, False, max_steps, False, is_btad, is_mvtec_small, quiet=True)
    }
    metric_cols = [c for c in columns[2:] if c not in THRESHOLD_COLUMNS and not c.endswith("_F1")]
    head = ["category"] + [f"{c} {who}" for c in metric_cols for who in ("ours", "patchcore")]
    rows = []
    for r in ours:
        other = theirs.get(r["category"])
        if other is None:
            continue
        cells = {"category": r["category"]}
        for c in metric_cols:
            cells[f"{c} ours"], cells[f"{c} patchcore"] = r[c], other[c]
        rows.append(cells)
    lines = [head] + [[str(x["category"])] + [f"{100 * float(x[h]):.2f}" for h in head[1:]] for x in rows]
    print_table(
        f"comparison with PatchCore maps in {found} (scores written to {found / SCORE_CSV}):", render_table(lines)
    )
