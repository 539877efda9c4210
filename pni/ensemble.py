"""Ensemble of several backbones' test runs (docs/METHOD.md, section 6; ``calc_ensemble_score.py``).

For one category, the k-th newest run (``version_<n>``) of every backbone is read from
``<project_root>/<cat>/<backbone>/anomaly/lightning_logs/version_<n>/sample/``. Files are
matched across backbones by ``(defect_type, stem)``, never by position.

* Pixel ensemble: each backbone's maps are min-max normalised over the whole category
  (one min and one max over all its maps), then averaged over backbones.
* Image ensemble: each raw map's score is the mean of its top 1 % pixels
  (``max(1, int(0.01 * H * W))`` pixels), averaged over backbones.

P-/I-AUROC of all four map families are appended to ``<project_root>/ensemble_score_result.csv``.
For the ``save_type`` family the ensemble is written as an MVTec-like folder:
``<ens>/<cat>/test/<type>/<stem>.png`` (RGB), ``ground_truth/<type>/<stem>_mask.png`` (0/255,
written for normal images too), ``anomaly_map/<type>/<stem>.png`` (jet of the ensemble map)
and ``anomaly_map/<type>/<stem>.npy`` (float32 ensemble map in [0, 1]).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pni import metrics, viz
from pni.cli import warn
from pni.console import print_table
from pni.errors import PNIError
from pni.io import append_csv_rows, check_csv_header, check_name, load_npy, save_npy
from pni.results import MAP_NAMES, SCORE_COLUMNS, defined_aurocs, format_score_table, run_dir, version_dirs

TOP_FRACTION = 0.01
RESULT_CSV = "ensemble_score_result.csv"
RESULT_COLUMNS: tuple[str, ...] = ("category", "backbone_list", "version_num", "num_images") + SCORE_COLUMNS

Key = tuple[str, str]  # (defect_type, stem)


@dataclass
class BackboneRun:
    """One backbone's selected test run of a category."""

    backbone: str
    version_dir: Path
    labels: dict[Key, int | None] = field(default_factory=dict)

    @property
    def sample_dir(self) -> Path:
        return self.version_dir / "sample"

    def path(self, key: Key, suffix: str = "") -> Path:
        """``sample/{type}_{stem}{suffix}.npy``."""
        return self.sample_dir / f"{key[0]}_{key[1]}{suffix}.npy"


def select_version(project_root: str | os.PathLike, category: str, backbone: str, version_num: int = 1) -> Path:
    """The ``version_num``-th newest ``version_<k>`` folder (1 = newest)."""
    if version_num < 1:
        raise PNIError(f"--version_num must be >= 1, got {version_num}")
    found = version_dirs(project_root, category, backbone)
    logs = run_dir(project_root, category, backbone) / "lightning_logs"
    if not found:
        raise PNIError(
            f"no test run found in {logs} (run train_coreset_distribution.py "
            f"--category {category} --backbone {backbone} first)"
        )
    if version_num > len(found):
        raise PNIError(
            f"--version_num {version_num} asks for run {version_num} counted from the newest, but "
            f"{logs} holds only {len(found)}"
        )
    return found[-version_num]


def list_samples(version_dir: Path) -> dict[Key, int | None]:
    """``(defect_type, stem) -> label`` of one run, from ``image_scores.csv``; without it,
    from the ``sample/*_gt.npy`` names split at their last underscore (label unknown)."""
    table = version_dir / "image_scores.csv"
    if table.is_file():
        with open(table, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not {"defect_type", "stem"} <= set(rows[0]):
            raise PNIError(f"{table}: expected columns defect_type,stem,label")
        for r in rows:  # they become file names in the ensemble folder
            check_name(r["defect_type"] or "", f"{table}: defect_type")
            check_name(r["stem"] or "", f"{table}: stem")
        return {
            (r["defect_type"], r["stem"]): (int(float(r["label"])) if r.get("label") not in (None, "") else None)
            for r in rows
        }
    sample = version_dir / "sample"
    names = sorted(p.name[: -len("_gt.npy")] for p in sample.glob("*_gt.npy"))
    if not names:
        raise PNIError(f"no result files (*_gt.npy) in {sample}")
    warn(f"{table} missing: taking (defect_type, stem) from file names in {sample}")
    out: dict[Key, int | None] = {}
    for name in names:
        if "_" not in name:
            raise PNIError(f"cannot split {sample / (name + '_gt.npy')} into defect type and stem")
        t, s = name.rsplit("_", 1)
        out[(t, s)] = None
    return out


def match_runs(runs: Sequence[BackboneRun]) -> list[Key]:
    """Keys common to all runs, sorted; an error names a file one backbone lacks."""
    first = runs[0]
    for run in runs:
        for other in runs:
            missing = set(other.labels) - set(run.labels)
            if missing:
                key = sorted(missing)[0]
                raise PNIError(
                    f"{run.path(key, '_gt')} is missing for backbone {run.backbone} "
                    f"but {other.path(key, '_gt')} exists for {other.backbone} "
                    f"({len(missing)} file(s) differ)"
                )
    keys = sorted(first.labels)
    for run in runs:
        for key in keys:
            for suffix in ("", "_gt") + tuple(f"_amap_{m}" for m in MAP_NAMES):
                if not run.path(key, suffix).is_file():
                    raise PNIError(f"missing result file {run.path(key, suffix)}")
    return keys


def top_fraction_mean(maps: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Mean of each map's ``max(1, int(fraction * H * W))`` largest pixels: (N,H,W) -> (N,)."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(fraction * flat.shape[1]))
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:]
    return top.astype(np.float64).mean(axis=1)


def _load_stack(run: BackboneRun, keys: Sequence[Key], suffix: str) -> np.ndarray:
    arrays = [load_npy(run.path(k, suffix)) for k in keys]
    shape = arrays[0].shape
    for k, a in zip(keys, arrays):
        if a.shape != shape:
            raise PNIError(f"{run.path(k, suffix)} has shape {a.shape}, others {shape}")
    return np.stack(arrays)


def ensemble_category(
    project_root: str | os.PathLike,
    category: str,
    backbones: Sequence[str],
    ensemble_root: str | os.PathLike,
    save_type: str = "nb_coor",
    version_num: int = 1,
) -> dict[str, object]:
    """Ensemble one category; write the ``save_type`` folder; return the score row."""
    if save_type not in MAP_NAMES:
        raise PNIError(f"--save_type must be one of {', '.join(MAP_NAMES)}, got {save_type}")
    if len(set(backbones)) != len(backbones):
        raise PNIError(f"--backbone_list names a backbone twice: {' '.join(backbones)}")
    runs = []
    for b in backbones:
        vdir = select_version(project_root, category, b, version_num)
        runs.append(BackboneRun(b, vdir, list_samples(vdir)))
    keys = match_runs(runs)
    gts = _load_stack(runs[0], keys, "_gt") > 0
    known = [runs[0].labels[k] for k in keys]
    labels = np.array([int(g.any()) if lab is None else lab for g, lab in zip(gts, known)], dtype=np.int64)
    image_ok, pixel_ok = defined_aurocs(labels, gts, f"category {category}")
    row: dict[str, object] = {
        "category": category,
        "backbone_list": " ".join(backbones),
        "version_num": version_num,
        "num_images": len(keys),
    }
    saved: np.ndarray | None = None
    for family in MAP_NAMES:
        pixel = None
        image = np.zeros(len(keys))
        for run in runs:
            maps = _load_stack(run, keys, f"_amap_{family}").astype(np.float32, copy=False)
            if maps.shape != gts.shape:
                raise PNIError(
                    f"{run.path(keys[0], f'_amap_{family}')} has shape {maps.shape[1:]} "
                    f"but the ground truth {gts.shape[1:]}"
                )
            if not np.all(np.isfinite(maps)):
                raise PNIError(f"non-finite values in the {family} maps of {run.sample_dir}")
            image += top_fraction_mean(maps)
            lo, hi = float(maps.min()), float(maps.max())
            maps -= lo
            if hi > lo:
                maps /= hi - lo
            pixel = maps if pixel is None else pixel + maps
        assert pixel is not None  # runs is never empty
        pixel /= len(runs)
        image /= len(runs)
        row[f"{family}_P-AUROC"] = metrics.pixel_auroc(gts, pixel) if pixel_ok else float("nan")
        row[f"{family}_I-AUROC"] = metrics.image_auroc(labels, image) if image_ok else float("nan")
        if family == save_type:
            saved = pixel
        del pixel
    assert saved is not None
    write_ensemble_folder(Path(ensemble_root) / category, runs[0], keys, gts, saved)
    return row


def write_ensemble_folder(
    out: Path, source: BackboneRun, keys: Sequence[Key], gts: np.ndarray, maps: np.ndarray
) -> None:
    """Write test images, masks, jet maps and ``.npy`` maps in the MVTec-like layout."""
    for i, key in enumerate(keys):
        t, s = key
        viz.save_png(out / "test" / t / f"{s}.png", viz.as_rgb(load_npy(source.path(key))))
        viz.save_png(out / "ground_truth" / t / f"{s}_mask.png", gts[i].astype(np.uint8) * 255)
        viz.save_png(out / "anomaly_map" / t / f"{s}.png", viz.jet(maps[i]))
        save_npy(out / "anomaly_map" / t / f"{s}.npy", maps[i].astype(np.float32))


def find_categories(project_root: str | os.PathLike, backbone: str) -> list[str]:
    """Categories under ``project_root`` that hold runs of ``backbone``."""
    root = Path(project_root)
    if not root.is_dir():
        raise PNIError(f"--project_root_path {root} does not exist")
    cats = sorted(p.name for p in root.iterdir() if (p / backbone / "anomaly" / "lightning_logs").is_dir())
    if not cats:
        raise PNIError(f"no category folder with {backbone}/anomaly/lightning_logs in {root}")
    return cats


def run_ensemble(
    project_root: str | os.PathLike,
    ensemble_root: str | os.PathLike,
    categories: Sequence[str] | None,
    backbones: Sequence[str],
    save_type: str = "nb_coor",
    version_num: int = 1,
) -> list[dict[str, object]]:
    """Ensemble every category, append the rows to ``ensemble_score_result.csv``, print the table."""
    if not backbones:
        raise PNIError("--backbone_list is empty")
    for backbone in backbones:
        check_name(backbone, "--backbone_list")
    for category in categories or ():
        check_name(category, "--category")
    cats = list(categories) if categories else find_categories(project_root, backbones[0])
    for cat in cats:  # every category's runs and files exist before the first file is written
        match_runs(
            [
                BackboneRun(b, v, list_samples(v))
                for b in backbones
                for v in [select_version(project_root, cat, b, version_num)]
            ]
        )
    csv_path = Path(project_root) / RESULT_CSV
    check_csv_header(csv_path, RESULT_COLUMNS)  # before the first ensemble file is written
    rows = []
    for cat in cats:
        row = ensemble_category(project_root, cat, backbones, ensemble_root, save_type, version_num)
        rows.append(row)
        values = [row[c] if c not in SCORE_COLUMNS else f"{row[c]:.6f}" for c in RESULT_COLUMNS]
        append_csv_rows(csv_path, RESULT_COLUMNS, [values])
    print_table(f"ensemble of {' '.join(backbones)} (version_num {version_num}): AUROC (%)", format_score_table(rows))
    return rows
