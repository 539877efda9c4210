"""Scoring with a bundle's :class:`~pni.model.PNIModel` behind the numpy interface of
:class:`pni.deploy.onnx_runtime.OnnxScorer`: prediction's default runtime (``--runtime
torch``). Both give one :class:`~pni.maps.MapScores` per image, so that everything after
the maps (:mod:`pni.predict`, :mod:`pni.predict_files`) is the same code for both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pni.bundle import load_bundle
from pni.config import DEFAULT_PRECISION
from pni.manifest import MANIFEST, bundle_precision
from pni.maps import MapScores
from pni.model import PNIModel
from pni.precision import autocast, bundle_run_precision
from pni.scoring import ImageScores


def host_scores(result: ImageScores) -> MapScores:
    """``result`` with its maps as float32 numpy arrays on the host."""
    return MapScores(
        coarse={m: t.detach().float().cpu().numpy() for m, t in result.coarse.items()},
        maps={m: t.detach().float().cpu().numpy() for m, t in result.maps.items()},
        image={m: float(v) for m, v in result.image.items()},
    )


class TorchScorer:
    """``model`` on ``device``: ``score(images)`` with ``images`` float32
    ``(N, 3, imagesize, imagesize)`` (numpy) -> ``N`` :class:`~pni.maps.MapScores`, through
    :meth:`PNIModel.score` (the object the test stage scores with), its backbone and MLP under
    ``precision``'s autocast (:mod:`pni.precision`; distances and maps stay float32)."""

    def __init__(self, model: PNIModel, device: str | torch.device = "cpu", precision: str = DEFAULT_PRECISION) -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.model = model.to(self.device)
        self.resize = model.resize
        self.imagesize = model.imagesize

    @torch.no_grad()
    def score(self, images: np.ndarray) -> list[MapScores]:
        """Score a batch ``(N, 3, S, S)`` -> ``N`` :class:`~pni.maps.MapScores`."""
        if len(images) == 0:
            return []
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        with autocast(self.precision, self.device.type):
            results = self.model.score(batch)
        return [host_scores(r) for r in results]


def load_torch_scorer(
    path: str | os.PathLike,
    device: str | torch.device = "auto",
    backbone_weights: str | os.PathLike | None = None,
    precision: str | None = None,
    runs_on: str | None = None,
) -> tuple[TorchScorer, dict[str, Any]]:
    """The :class:`TorchScorer` of a bundle folder (:func:`pni.bundle.load_bundle`) on
    ``device`` (``auto``: CUDA when available), and the bundle's manifest. ``precision``:
    ``None`` runs the bundle in the precision it was calibrated under (its manifest's);
    checked for ``runs_on``, the device type the model will run on (default: ``device``'s;
    ``predict.py`` loads on the CPU and Lightning moves it)."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, manifest = load_bundle(path, backbone_weights)
    target = runs_on or torch.device(device).type
    chosen = bundle_run_precision(precision, bundle_precision(manifest), str(Path(path) / MANIFEST), target)
    return TorchScorer(model, device, chosen), manifest
