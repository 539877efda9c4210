"""The trained model as one object: everything that turns an image into PNI's four maps.

:class:`PNIModel` holds the feature extractor (backbone + patch aggregation), the
neighbourhood MLP with its window layout, the scoring artefacts (three coresets, the entry
map ``m(k)``, both position priors) as buffers, the :class:`~pni.scoring.ScoringConfig`
and the image geometry (``resize``, ``imagesize``). The test stage
(:func:`pni.pipeline.run_test`), the model bundle (:mod:`pni.bundle`) and prediction
(:mod:`pni.predict`) all score through :meth:`PNIModel.score`, so they cannot drift apart.

Plain ``nn.Module`` on tensors, no Lightning: ``pni.lightning.ScoringModule`` runs it on the
Lightning device. The MLP's window layout is the variant's (``config.variant``); there is
no way to pair a model with another layout.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pni.data.transforms import image_transform
from pni.distributions import NeighbourhoodMLP, dropped_slot, grid_windows, window_count
from pni.features import PatchFeatureExtractor, patch_padding
from pni.memory import rows_for, scoring_rows
from pni.scoring import ImageScores, Scorer, ScoringArtefacts, ScoringConfig, interior_indices

ARTEFACT_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ScoringArtefacts))


class PNIModel(nn.Module):
    """A trained PNI model: images ``(B, 3, imagesize, imagesize)`` (ImageNet-normalised, as
    :meth:`transform` makes them) -> one :class:`~pni.scoring.ImageScores` per image.

    ``config.chunk_size`` ``None``: distance matrices are built in row chunks sized from the
    free memory of the device the model runs on (chosen once per device).
    """

    # buffers registered from ScoringArtefacts (the ones the chunk sizing reads)
    embedding_with_edge: Tensor
    embedding_without_edge: Tensor
    distribution_coreset: Tensor

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        mlp: NeighbourhoodMLP,
        artefacts: ScoringArtefacts,
        config: ScoringConfig,
        dist_padding: int,
        resize: int,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.mlp = mlp.eval()
        for name in ARTEFACT_NAMES:
            self.register_buffer(name, getattr(artefacts, name).detach().contiguous())
        self.config = config
        self.dist_padding = int(dist_padding)
        self.resize = int(resize)
        self._chunks: dict[torch.device, int] = {}
        self._scorer: tuple[tuple, Scorer] | None = None  # the one cache of what scoring derives
        dropped_slot(self.dist_padding, self.layout)  # refuses an unknown variant now

    @classmethod
    def from_arrays(
        cls,
        extractor: PatchFeatureExtractor,
        mlp: NeighbourhoodMLP,
        coresets: dict[str, np.ndarray],
        priors: dict[str, np.ndarray],
        config: ScoringConfig,
        dist_padding: int,
        resize: int,
    ) -> PNIModel:
        """From the stage artefacts: ``coresets`` ``{without_edge, with_edge, distribution}``
        ``(K, E)`` and ``priors`` ``{without_edge, with_edge}`` ``(P, K)``; computes ``m(k)``."""
        artefacts = ScoringArtefacts.build(
            torch.as_tensor(coresets["without_edge"]),
            torch.as_tensor(coresets["with_edge"]),
            torch.as_tensor(coresets["distribution"]),
            torch.as_tensor(priors["without_edge"]),
            torch.as_tensor(priors["with_edge"]),
        )
        return cls(extractor, mlp, artefacts, config, dist_padding, resize)

    # ------------------------------------------------------------ settings

    @property
    def layout(self) -> str:
        """The MLP's window layout: the variant's (``pni.distributions.dropped_slot``)."""
        return self.config.variant

    @property
    def imagesize(self) -> int:
        return self.config.imagesize

    @property
    def pad(self) -> int:
        return patch_padding(self.config.patchsize)

    def artefacts(self) -> ScoringArtefacts:
        """The scoring artefacts (the model's buffers, on its device)."""
        return ScoringArtefacts(**{name: getattr(self, name) for name in ARTEFACT_NAMES})

    def scorer(self, rows: int, cols: int, device: torch.device) -> Scorer:
        """The :class:`~pni.scoring.Scorer` of ``rows x cols`` feature grids on ``device``:
        the same object from call to call while the buffers, the settings and the grid stay
        (it holds what scoring derives from the artefacts, and its scratch memory)."""
        cfg = self._config_on(device)
        buffers = tuple(getattr(self, name) for name in ARTEFACT_NAMES)
        # the cached scorer keeps its tensors alive, so their addresses identify them (and
        # their versions count in-place changes, as load_state_dict makes)
        key = (tuple((t.data_ptr(), t._version) for t in buffers), dataclasses.astuple(cfg), rows, cols)
        if self._scorer is None or self._scorer[0] != key:
            self._scorer = (key, Scorer(self.artefacts(), cfg, rows, cols))
        return self._scorer[1]

    def transform(self) -> Callable:
        """RGB PIL image -> the model's input tensor (resize, centre crop, normalisation)."""
        return image_transform(self.resize, self.imagesize)

    def train(self, mode: bool = True) -> PNIModel:  # a trained model: dropout and BN stay in eval
        return super().train(False)

    # ------------------------------------------------------------ scoring

    def _config_on(self, device: torch.device) -> ScoringConfig:
        if self.config.chunk_size is not None:
            return self.config
        if device not in self._chunks:
            # ~6 temporaries of (rows x coreset size) float32 in at most 1/8 of the free memory
            widest = max(
                len(self.embedding_with_edge), len(self.embedding_without_edge) + len(self.distribution_coreset)
            )
            self._chunks[device] = scoring_rows(widest, device)
        return dataclasses.replace(self.config, chunk_size=self._chunks[device])

    @torch.no_grad()
    def nb_logits(self, grid: Tensor, window_chunk: int | None = None) -> Tensor:
        """Neighbourhood MLP logits at the interior positions of one grid ``(R, C, E)`` ->
        ``(P_int, D)``; windows built chunk by chunk."""
        positions = interior_indices(grid.shape[0], grid.shape[1], self.pad, grid.device)
        chunk = window_chunk
        if chunk is None:  # windows (float32) + the first layer's output, in 1/8 of the free memory
            n_win = window_count(self.dist_padding)
            chunk = rows_for(
                4 * (n_win * grid.shape[-1] + 4 * self.mlp.hidden_features),
                fraction=0.125,
                device=grid.device,
                lo=64,
                hi=8192,
            )
        out = [
            self.mlp(grid_windows(grid, positions[s : s + chunk], self.dist_padding, self.layout))
            for s in range(0, len(positions), chunk)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def score(self, images: Tensor) -> list[ImageScores]:
        """Score a batch ``(B, 3, imagesize, imagesize)`` -> ``B`` results (maps on the
        images' device). Under autocast the backbone and the MLP run in reduced precision;
        distances, masks and maps always in float32."""
        if images.shape[0] == 0:
            return []
        feats = self.extractor(images)
        scorer = self.scorer(feats.shape[1], feats.shape[2], feats.device)
        out = []
        for b in range(feats.shape[0]):
            logits = self.nb_logits(feats[b])
            with torch.autocast(device_type=feats.device.type, enabled=False):
                out.append(scorer(feats[b].float(), logits.float()))
        return out
