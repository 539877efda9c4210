"""Where and how the stages run: Lightning Trainers built from the runtime settings, the
memory probe that sizes image batches, and the feature-grid checks made before any work.

Used by the pipeline's stages, by ``export_model.py`` (calibration scoring) and by
``predict.py``; everything here takes the settings objects of :mod:`pni.config` or plain
values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch

from pni import distributed
from pni.cli import parse_devices
from pni.config import FeatureSettings, RuntimeSettings
from pni.console import Progress, trainer_progress
from pni.errors import PNIError
from pni.memory import available_bytes


def build_trainer(
    runtime: RuntimeSettings,
    progress: Progress | None = None,
    callbacks: Sequence[pl.Callback] = (),
    **kwargs: Any,
) -> pl.Trainer:
    """A Trainer for one stage on ``runtime``'s accelerator and devices, shown as ``progress``
    (see :func:`pni.console.trainer_progress`), with ``callbacks`` besides the progress bar's;
    ``kwargs`` override the Trainer's arguments (``devices``, ``strategy``, ``precision``...)."""
    shown = trainer_progress(progress)
    defaults: dict[str, Any] = dict(
        accelerator=runtime.accelerator,
        devices=parse_devices(runtime.devices),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=False,
        enable_progress_bar=shown["enable_progress_bar"],
        callbacks=list(shown.get("callbacks", [])) + list(callbacks),
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def check_trainer_flags(runtime: RuntimeSettings) -> None:
    """Before any work: ``--accelerator``, ``--devices`` and ``--strategy`` name something this
    machine has, and Lightning accepts the trainers the stages will build from them."""
    distributed.check_devices(runtime.accelerator, runtime.devices)
    try:
        build_trainer(runtime, devices=1, strategy="auto")
        build_trainer(runtime, precision=runtime.precision, **distributed.devices_and_strategy(runtime))
    except Exception as exc:  # noqa: BLE001 - Lightning's configuration errors
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise PNIError(
            f"--accelerator {runtime.accelerator} --devices {runtime.devices} --strategy {runtime.strategy}: {text}"
        ) from None


def on_gpu(accelerator: str) -> bool:
    """True when ``accelerator`` runs on a CUDA GPU that this machine has."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def probe_extractor(
    extractor: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor
) -> tuple[torch.Tensor, int | None]:
    """Features ``(1, R, C, E)`` of one image ``(3, H, W)`` and an estimate of the extraction
    temporaries per image (bytes; None for an extractor without a backbone ``body``): the
    patch neighbourhoods of every layer on its own grid (they are pooled before layer grids
    are aligned), about twice over."""
    shapes: dict[str, tuple[int, ...]] = {}
    body = getattr(extractor, "body", None)
    hook = None
    if isinstance(body, torch.nn.Module):
        hook = body.register_forward_hook(
            lambda _m, _i, out: (
                shapes.update({k: tuple(v.shape) for k, v in out.items()}) if isinstance(out, dict) else None
            )
        )
    try:
        probe = extractor(image[None])
    finally:
        if hook is not None:
            hook.remove()
    if not shapes:
        return probe, None
    ps2 = getattr(extractor, "patchsize", 1) ** 2
    return probe, 2 * 4 * ps2 * sum(s[1] * s[2] * s[3] for s in shapes.values())


def images_per_batch(
    imagesize: int, accelerator: str, per_image_bytes: int | None = None, budget: int | None = None
) -> int:
    """Images per batch of ``imagesize`` px: ~8 of 480 px (more for small images), fewer when
    their temporaries (``per_image_bytes`` each) would not fit ``budget`` (default: a quarter
    of the host's available memory, half the GPU's free memory when ``accelerator`` runs on one)."""
    default = max(1, min(32, int(8 * (480 / imagesize) ** 2)))
    if not per_image_bytes:
        return default
    if budget is None:
        budget = available_bytes("cuda") // 2 if on_gpu(accelerator) else available_bytes() // 4
    return max(1, min(default, int(budget // per_image_bytes)))


def check_grid_size(features: FeatureSettings, n_rows: int, n_cols: int) -> None:
    """The ``n_rows x n_cols`` feature grid must have interior positions for ``--patchsize``."""
    if n_rows <= 2 * features.pad or n_cols <= 2 * features.pad:
        raise PNIError(
            f"--imagesize {features.imagesize} gives a {n_rows}x{n_cols} grid, too small for "
            f"--patchsize {features.patchsize}"
        )


def check_test_grid(
    features: FeatureSettings, extractor: torch.nn.Module, priors: dict[str, np.ndarray], where: Path
) -> int | None:
    """The feature grid of ``--imagesize`` must have interior positions and match the rows of
    the position priors in folder ``where`` (which carry no image size of their own).
    Returns the estimated extraction temporaries per image (see :func:`probe_extractor`)."""
    device = next(extractor.parameters(), torch.empty(0)).device
    with torch.no_grad():
        probe, per_image = probe_extractor(
            extractor, torch.zeros(3, features.imagesize, features.imagesize, device=device)
        )
        n_rows, n_cols = probe.shape[1:3]
    check_grid_size(features, n_rows, n_cols)
    n_positions = len(priors["with_edge"])
    if n_rows * n_cols != n_positions or len(priors["without_edge"]) != n_positions:
        raise PNIError(
            f"the position priors in {where} cover {n_positions} grid positions, but "
            f"--imagesize {features.imagesize} gives a {n_rows}x{n_cols} grid; re-run with --train_coor_dist "
            "or change the flags back"
        )
    return per_image
