"""Scoring with a bundle's :class:`~pni.model.PNIModel` behind the numpy interface of
:class:`pni.deploy.onnx_runtime.OnnxScorer`: prediction's default runtime (``--runtime
torch``). Both give one :class:`~pni.maps.MapScores` per image, so that everything after
the maps (:mod:`pni.predict`, :mod:`pni.predict_files`) is the same code for both.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pni.bundle import load_bundle
from pni.maps import MapScores
from pni.model import PNIModel
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
    :meth:`PNIModel.score` (the object the test stage scores with)."""

    def __init__(self, model: PNIModel, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.resize = model.resize
        self.imagesize = model.imagesize

    @torch.no_grad()
    def score(self, images: np.ndarray) -> list[MapScores]:
        """Score a batch ``(N, 3, S, S)`` -> ``N`` :class:`~pni.maps.MapScores`."""
        if len(images) == 0:
            return []
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        return [host_scores(r) for r in self.model.score(batch)]


def load_torch_scorer(
    path: str | os.PathLike, device: str | torch.device = "auto", backbone_weights: str | os.PathLike | None = None
) -> tuple[TorchScorer, dict[str, Any]]:
    """The :class:`TorchScorer` of a bundle folder (:func:`pni.bundle.load_bundle`) on
    ``device`` (``auto``: CUDA when available), and the bundle's manifest."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, manifest = load_bundle(path, backbone_weights)
    return TorchScorer(model, device), manifest
