"""Refine every map of a ravel folder and write a complete, scorable ravel folder.

``aligned`` (default): ``refined = model(image, map)`` at ``image_size``, resized back
(bilinear) to the ravel size, ``out = blend*refined + (1-blend)*map`` (map at ravel size),
clipped to [0,1], written as uint16 ``{i:05d}_pred.png`` (rounded); gt files are copied.
``original``: the original code's steps (``pni.refinement.geometry``): the model sees the
zoomed map ``z``, the blend is taken in the zoomed frame at 240 px and ``_pred.png`` and
``_gt.png`` are written at 480 px, whatever the ravel size.
Either way images and ``index.csv`` (rows of the selected categories) are copied, file names kept.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pni.console import Progress
from pni.errors import PNIError
from pni.io import make_dir, write_csv, write_with
from pni.ravel import INDEX_COLUMNS, INDEX_CSV, gt_path, image_path, pred_path, read_index, write_png16

from .data import RavelRefinementDataset, read_map, round_to_uint16
from .geometry import original_outputs
from .model import RefinementNet


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def blend_maps(refined: np.ndarray, amap: np.ndarray, blend_weight: float) -> np.ndarray:
    """``blend*refined + (1-blend)*amap`` clipped to [0,1]; (H,W) float arrays -> float64."""
    out = blend_weight * refined.astype(np.float64) + (1.0 - blend_weight) * amap.astype(np.float64)
    return np.clip(out, 0.0, 1.0)


def check_refine_paths(input_path: str | os.PathLike, output_path: str | os.PathLike, blend_weight: float) -> None:
    """Refuse (PNIError naming the flag) a blend weight outside [0, 1] or an output folder that
    is the input folder."""
    if not 0.0 <= blend_weight <= 1.0:
        raise PNIError(f"--blend_weight must be in [0, 1], got {blend_weight}")
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise PNIError(f"--output_data_path must differ from --input_data_path ({input_path})")


@torch.no_grad()
def refine_ravel_folder(
    model: RefinementNet,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    categories: Sequence[str] | None = None,
    blend_weight: float = 0.1,
    image_size: int = 320,
    geometry: str = "aligned",
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    progress: Progress | None = None,
) -> int:
    """Write the refined ravel folder ``output_path``; returns the number of maps written.
    ``progress`` (optional) counts batches."""
    src, dst = Path(input_path), Path(output_path)
    check_refine_paths(src, dst, blend_weight)
    dataset = RavelRefinementDataset(src, image_size, categories, geometry, require_gt=False)
    make_dir(dst, "--output_data_path")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = torch.device(device)
    model = model.to(device).eval()
    written = 0
    if progress:
        progress.add_total(len(loader))
    for batch in progress.track(loader) if progress else loader:
        refined = model(batch["image"].to(device), batch["amap"].to(device)).float().cpu()  # (B,1,S,S)
        for k, index in enumerate(batch["index"].tolist()):
            entry = dataset.entries[written + k]
            assert entry.index == index
            has_gt = gt_path(src, index).is_file()
            if geometry == "original":
                pred16, gt16 = original_outputs(
                    batch["amap"][k, 0].numpy(), refined[k, 0].numpy(), batch["mask"][k, 0].numpy(), blend_weight
                )
                write_png16(pred_path(dst, index), pred16)
                if has_gt:
                    write_png16(gt_path(dst, index), gt16)
            else:
                amap = read_map(pred_path(src, index))  # (H,W) at ravel size
                full = F.interpolate(refined[k : k + 1], size=amap.shape, mode="bilinear", align_corners=False)
                out = blend_maps(full[0, 0].numpy(), amap, blend_weight)
                write_png16(pred_path(dst, index), round_to_uint16(out))
                if has_gt:
                    copy_file(gt_path(src, index), gt_path(dst, index))
            copy_file(image_path(src, index), image_path(dst, index))
        written += len(batch["index"])
    if read_index(src) is not None:  # carry index.csv over, limited to the refined entries
        write_csv(
            dst / INDEX_CSV, INDEX_COLUMNS, [(e.index, e.category, e.defect_type, e.stem) for e in dataset.entries]
        )
    return written
