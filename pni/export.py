"""``export_model.py``: a trained category's artefacts -> a model bundle with calibrated
thresholds (see :mod:`pni.bundle` and :mod:`pni.calibration`).

The artefacts are found and checked exactly as the pipeline loads them for its test stage,
the model is the same :class:`~pni.model.PNIModel`, and the calibration images are scored
through it before it is written (with ``--onnx``, also as ``model.onnx``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from pni.artefacts import (
    DIGEST_KEY,
    NB_KEYS,
    check_saved_stages,
    coreset_digest,
    load_coresets,
    load_neighbourhood_model,
    load_position_priors,
    settings_of,
)
from pni.bundle import FORMAT_VERSION, check_output, write_bundle
from pni.calibration import CalibrationScores, calibrate, format_thresholds
from pni.cli import warn
from pni.config import ExportSettings, FeatureSettings, Settings, StageSettings
from pni.console import Progress
from pni.data.datasets import NORMAL, AnomalyDataset, Sample, build_datasets
from pni.errors import PNIError
from pni.features import RANDOM_INIT_SEED, hub_checkpoint_dir, weights_file_name
from pni.io import file_sha256
from pni.lightning import IndexedDataset, ScoringModule, interruptible
from pni.maps import MAP_NAMES
from pni.model import PNIModel
from pni.precision import check_and_note
from pni.predict_files import expand_inputs
from pni.runtime import build_trainer, check_test_grid, images_per_batch
from pni.scoring import ImageScores


def backbone_source(features: FeatureSettings) -> dict[str, Any]:
    """Where the backbone weights came from: a file (name and sha256) or the seeded random
    initialisation."""
    if features.random_init:
        return {"file": None, "sha256": None, "random_init": True, "random_init_seed": RANDOM_INIT_SEED}
    path = (
        Path(features.backbone_weights)
        if features.backbone_weights
        else hub_checkpoint_dir() / weights_file_name(features.backbone)
    )
    return {"file": path.name, "sha256": file_sha256(path), "random_init": False, "random_init_seed": None}


def calibration_set(
    settings: Settings, export: ExportSettings
) -> tuple[Dataset, list[int], list[bool], dict[str, Any]]:
    """The images to calibrate on: good ones (``--calibration_dir``, else the good test images,
    else, with a warning, the training images) and the test split's defective ones. Returns
    the dataset, each item's label and whether it has a mask, and a description."""
    data, features = settings.data, settings.features
    train_ds, test_ds = build_datasets(
        data.dataset_category, data.dataset_path, data.category, resize=features.resize, imagesize=features.imagesize
    )
    test_good = [i for i, s in enumerate(test_ds.samples) if s.label == 0]
    test_bad = [i for i, s in enumerate(test_ds.samples) if s.label == 1]
    seen = False
    good: Dataset
    category_dir = Path(data.dataset_path) / data.category
    if export.calibration_dir:
        paths, missing = expand_inputs(export.calibration_dir)
        if missing:
            raise PNIError(f"--calibration_dir: {missing[0][1]}")
        good = AnomalyDataset(
            [Sample(str(p), None, 0, NORMAL, p.stem) for p in paths], features.resize, features.imagesize
        )
        good_source = f"--calibration_dir {' '.join(export.calibration_dir)}"
    elif test_good:
        good = Subset(test_ds, test_good)
        good_source = f"good test images of {category_dir}"
    else:
        good = train_ds
        seen = True
        good_source = f"training images of {category_dir} (seen in training)"
        warn(
            f"no good images to calibrate on besides the training images of {data.category}: the thresholds are "
            "calibrated on those, which the model has seen, so expect more false positives on new good images; "
            "pass --calibration_dir DIR (good images not used in training)"
        )
    with_masks = bool(test_bad) and test_ds.has_masks
    dataset: Dataset = ConcatDataset([good, Subset(test_ds, test_bad)])
    n_good = len(good)
    labels = [0] * n_good + [1] * len(test_bad)
    has_mask = [False] * n_good + [with_masks] * len(test_bad)
    info = {
        "target_fpr": export.target_fpr,
        "good_images": {"count": n_good, "source": good_source, "seen_in_training": seen},
        "defective_images": {
            "count": len(test_bad),
            "with_masks": with_masks,
            "source": f"defective test images of {category_dir}" if test_bad else None,
        },
    }
    return dataset, labels, has_mask, info


def score_calibration(
    settings: Settings,
    model: PNIModel,
    dataset: Dataset,
    labels: list[int],
    has_mask: list[bool],
    per_image: int | None,
) -> CalibrationScores:
    """Score the calibration images with ``model`` on the Lightning device."""
    scores = CalibrationScores()
    runtime = settings.runtime

    def sink(meta: dict, result: ImageScores) -> None:
        i = int(meta["index"])
        mask = (meta["mask"].cpu().numpy()[0] > 0.5) if has_mask[i] else None
        scores.add(labels[i], result.image, {m: result.maps[m].detach().float().cpu().numpy() for m in MAP_NAMES}, mask)

    batch = images_per_batch(settings.features.imagesize, runtime.accelerator, per_image)
    loader = DataLoader(IndexedDataset(dataset), batch_size=batch, shuffle=False, num_workers=settings.data.num_workers)
    with Progress(f"export: scoring {len(labels)} calibration images") as bar:
        trainer = build_trainer(runtime, bar, devices=1, precision=runtime.precision)
        interruptible(trainer.predict, ScoringModule(model, sink), loader, return_predictions=False)
    return scores


def export(settings: Settings, export: ExportSettings) -> Path:
    """Write the bundle of the category ``settings`` name (with ``export``'s output folder
    and calibration); returns its folder."""
    check_and_note(settings.runtime.precision, settings.runtime.accelerator)  # before any work
    check_output(export.output)  # before any work: a foreign folder or an unwritable place
    if export.onnx and importlib.util.find_spec("onnx") is None:
        raise PNIError("--onnx needs the onnx package: pip install onnx (see requirements.txt)")
    given = [f"--{f.name}" for f in dataclasses.fields(settings.stages) if getattr(settings.stages, f.name)]
    if given:
        print(f"note: export_model.py trains nothing; {' '.join(given)} ignored", file=sys.stderr)
        settings = dataclasses.replace(settings, stages=StageSettings())
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    out_dir = settings.embedding_dir
    check_saved_stages(settings, out_dir)
    coresets = load_coresets(settings, out_dir)
    priors = load_position_priors(settings, out_dir, coresets)
    mlp = load_neighbourhood_model(settings, out_dir, coresets)
    extractor = settings.features.build_extractor()
    per_image = check_test_grid(settings.features, extractor, priors, out_dir)
    model = PNIModel.from_arrays(
        extractor,
        mlp,
        coresets,
        priors,
        settings.scoring,
        settings.neighbourhood.dist_padding,
        settings.features.resize,
    )
    dataset, labels, has_mask, info = calibration_set(settings, export)
    print(
        f"[{settings.data.category}] calibrating on {info['good_images']['count']} good and "
        f"{info['defective_images']['count']} defective images",
        flush=True,
    )
    scores = score_calibration(settings, model, dataset, labels, has_mask, per_image)
    thresholds = calibrate(scores, export.target_fpr)
    provenance = {
        **settings_of(settings, NB_KEYS),
        "mask_workers": settings.scoring.mask_workers,
        DIGEST_KEY: coreset_digest(coresets),
        "embedding_dir": str(out_dir),
    }
    with Progress(f"export: writing the bundle{' and model.onnx' if export.onnx else ''}"):
        bundle = write_bundle(
            export.output,
            model.cpu(),
            backbone_source(settings.features),
            provenance,
            thresholds,
            info,
            export.include_backbone,
            export.onnx,
            settings.runtime.precision,
        )
    size = sum(p.stat().st_size for p in bundle.iterdir())
    print(format_thresholds(thresholds, export.target_fpr))
    print(
        f"good images: {info['good_images']['source']}; defective: {info['defective_images']['count']}"
        + (" with masks" if info["defective_images"]["with_masks"] else "")
    )
    print(
        f"bundle: {bundle} (format {FORMAT_VERSION}, {len(list(bundle.iterdir()))} files, "
        f"{size / 2**20:.1f} MiB, calibrated under --precision {settings.runtime.precision}); "
        f"predict with: python predict.py --model {bundle} --input IMAGES --output DIR"
        + (" [--runtime onnxruntime]" if export.onnx else "")
    )
    return bundle
