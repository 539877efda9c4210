"""The test stage's sink: each scored test image becomes its result files (see
:mod:`pni.results`) and the rows and values the AUROCs need."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pni.artefacts import test_hook
from pni.data.transforms import denormalize
from pni.errors import PNIError
from pni.results import MAP_NAMES, auroc_scores, read_sample, write_sample
from pni.scoring import ImageScores


class ResultCollector:
    """Receives each scored test image (``sink`` of :class:`pni.lightning.ScoringModule`):
    writes its files under ``sample_dir`` and keeps what the AUROCs need."""

    def __init__(self, sample_dir: Path) -> None:
        self.sample_dir = sample_dir
        self.rows: list[list[Any]] = []  # [defect_type, stem, label, score per map...] per image
        self.indices: list[int] = []  # position of each row's image in the test set
        self.labels: list[int] = []
        self.image_scores: dict[str, list[float]] = {m: [] for m in MAP_NAMES}
        self.masks: list[np.ndarray] = []
        self.maps: dict[str, list[np.ndarray]] = {m: [] for m in MAP_NAMES}

    def __call__(self, meta: dict, result: ImageScores) -> None:
        maps = {m: result.maps[m].detach().float().cpu().numpy() for m in MAP_NAMES}
        broken = [m for m in MAP_NAMES if not np.isfinite(maps[m]).all()]
        if broken:
            raise PNIError(
                f"the {broken[0]} map of {meta.get('path', meta['stem'])} has NaN or infinite values; "
                "check --prob_gamma, --softmax_temperature_alpha and the backbone weights"
            )
        image = denormalize(meta["image"].cpu())
        gt = (meta["mask"].cpu().numpy()[0] > 0.5).astype(np.uint8)
        defect_type, stem, label = str(meta["defect_type"]), str(meta["stem"]), int(meta["label"])
        write_sample(self.sample_dir, defect_type, stem, image, gt, maps)
        test_hook("test_sample")
        self.rows.append([defect_type, stem, label] + [f"{result.image[m]:.6f}" for m in MAP_NAMES])
        self.indices.append(int(meta["index"]) if "index" in meta else len(self.indices))
        self.labels.append(label)
        self.masks.append(gt)
        for m in MAP_NAMES:
            self.image_scores[m].append(float(result.image[m]))
            self.maps[m].append(maps[m])

    def score_tuples(self) -> list[tuple[float, ...]]:
        """Each image's scores in ``MAP_NAMES`` order."""
        return list(zip(*[self.image_scores[m] for m in MAP_NAMES]))

    def scores(self, with_masks: bool = True) -> dict[str, float | None]:
        """P- and I-AUROC of each map family over the collected images."""
        return auroc_scores(self.labels, self.image_scores, self.masks if with_masks else None, self.maps)


def scores_from_samples(
    sample_dir: Path, rows: Sequence[Sequence[Any]], image_scores: Sequence[Sequence[float]], with_masks: bool = True
) -> dict[str, float | None]:
    """P- and I-AUROC of each map family from the written sample files, the image rows
    (``[defect_type, stem, label, ...]``) and each image's scores in ``MAP_NAMES`` order;
    what rank 0 computes under DDP."""
    samples = [read_sample(sample_dir, str(r[0]), str(r[1])) for r in rows]
    return auroc_scores(
        [int(r[2]) for r in rows],
        {m: [float(v[j]) for v in image_scores] for j, m in enumerate(MAP_NAMES)},
        [smp["gt"] for smp in samples] if with_masks else None,
        {m: [smp[m] for smp in samples] for m in MAP_NAMES},
    )
