"""Scoring with ``model.onnx`` through onnxruntime: numpy in, numpy out, no torch.

:class:`OnnxScorer` loads the graph :mod:`pni.deploy.onnx_export` writes and scores batches
of preprocessed images (:func:`pni.data.images.input_array`) into one
:class:`~pni.maps.MapScores` per image, the fields :class:`pni.scoring.ImageScores` has
(``maps[m]``, ``image[m]``, ``coarse[m]``), as numpy arrays and floats. This module imports
numpy, Pillow and onnxruntime only (never torch, Lightning or faiss), so prediction runs on a
machine without them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pni.data.images import first_line
from pni.errors import PNIError
from pni.maps import MAP_NAMES, MapScores

ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"  # the initializers, only when the graph would pass protobuf's 2 GB
FORMAT = "pni-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("maps", "image_scores", "coarse_maps")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OnnxScorer:
    """``model.onnx`` in an onnxruntime session: ``score(images)`` with ``images`` float32
    ``(N, 3, imagesize, imagesize)`` -> ``N`` :class:`MapScores`.

    ``threads``: onnxruntime's intra-op threads (``None``: its default, one per physical
    core); ``providers``: execution providers in order of preference (default: the CPU's).
    Checks only that the file is a PNI graph of this format (the bundle's manifest vouches
    for its sha256). A missing, unreadable or foreign file is a one-line PNIError naming it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise PNIError(
                f"scoring with {ONNX_FILE} needs onnxruntime ({first_line(exc)}): pip install onnxruntime "
                "(see requirements-deploy.txt)"
            ) from None

        self.path = Path(path)
        if not self.path.is_file():
            raise PNIError(
                f"no ONNX graph {self.path}: export the model with export_model.py --onnx to run it with onnxruntime"
            )
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime's own exception types derive from Exception only
            raise PNIError(f"cannot load ONNX graph {self.path}: {first_line(exc)}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("pni.format") != FORMAT or meta.get("pni.format_version") != str(FORMAT_VERSION):
            raise PNIError(
                f"{self.path} is not a PNI ONNX graph of format version {FORMAT_VERSION}; "
                "export the model again with export_model.py --onnx"
            )
        if meta.get("pni.maps") != ",".join(MAP_NAMES):
            raise PNIError(f"{self.path} gives the maps {meta.get('pni.maps')!r}, not {','.join(MAP_NAMES)}")
        self.metadata = dict(meta)
        self.imagesize = int(meta["pni.imagesize"])
        self.resize = int(meta["pni.resize"])
        self.providers = self.session.get_providers()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph's outputs for ``images`` ``(N, 3, S, S)``: maps ``(N, 4, S, S)``, image
        scores ``(N, 4)``, coarse maps ``(N, 4, R, C)`` (float32, MAP_NAMES order)."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        expected = (3, self.imagesize, self.imagesize)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise PNIError(f"{self.path} scores images of shape (N, {', '.join(map(str, expected))}), got {x.shape}")
        maps, image, coarse = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return maps, image, coarse

    def score(self, images: np.ndarray) -> list[MapScores]:
        """Score a batch ``(N, 3, S, S)`` -> ``N`` :class:`MapScores`."""
        if len(images) == 0:
            return []
        maps, image, coarse = self.run(images)
        return [
            MapScores(
                coarse={m: coarse[i, j] for j, m in enumerate(MAP_NAMES)},
                maps={m: maps[i, j] for j, m in enumerate(MAP_NAMES)},
                image={m: float(image[i, j]) for j, m in enumerate(MAP_NAMES)},
            )
            for i in range(len(maps))
        ]
