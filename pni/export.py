"""``export_model.py``: a trained category's artefacts -> a model bundle with calibrated
thresholds (see :mod:`pni.bundle` and :mod:`pni.calibration`).

The artefacts are found and checked exactly as the pipeline loads them for its test stage,
the model is the same :class:`~pni.model.PNIModel`, and the calibration images are scored
through it before it is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import ConcatDataset, DataLoader, Subset

from pni.artefacts import DIGEST_KEY, NB_KEYS, check_saved_stages, coreset_digest, settings_of
from pni.bundle import FORMAT_VERSION, check_output, write_bundle
from pni.calibration import CalibrationScores, calibrate, format_thresholds
from pni.cli import warn
from pni.config import embedding_dir
from pni.console import Progress
from pni.data.datasets import NORMAL, AnomalyDataset, Sample, build_datasets
from pni.errors import PNIError
from pni.features import RANDOM_INIT_SEED, build_feature_extractor, hub_checkpoint_dir, weights_file_name
from pni.io import file_sha256
from pni.lightning import IndexedDataset, ScoringModule, interruptible
from pni.maps import MAP_NAMES
from pni.model import PNIModel, scoring_config
from pni.pipeline import (
    _batch_size,
    _check_grid,
    _precision,
    _trainer,
    load_coresets,
    load_neighbourhood_model,
    load_position_priors,
)
from pni.predict import expand_inputs

TRAIN_FLAGS = ("train_coreset", "train_nb_dist", "train_coor_dist")


def backbone_source(args: argparse.Namespace) -> dict[str, Any]:
    """Where the backbone weights came from: a file (name and sha256) or the seeded random
    initialisation."""
    if args.random_init:
        return {"file": None, "sha256": None, "random_init": True, "random_init_seed": RANDOM_INIT_SEED}
    path = (
        Path(args.backbone_weights)
        if args.backbone_weights
        else hub_checkpoint_dir() / weights_file_name(args.backbone)
    )
    return {"file": path.name, "sha256": file_sha256(path), "random_init": False, "random_init_seed": None}


def calibration_set(args: argparse.Namespace) -> tuple[Any, list[int], list[bool], dict[str, Any]]:
    """The images to calibrate on: good ones (``--calibration_dir``, else the good test images,
    else, with a warning, the training images) and the test split's defective ones. Returns
    the dataset, each item's label and whether it has a mask, and a description."""
    train_ds, test_ds = build_datasets(
        args.dataset_category, args.dataset_path, args.category, resize=args.resize, imagesize=args.imagesize
    )
    test_good = [i for i, s in enumerate(test_ds.samples) if s.label == 0]
    test_bad = [i for i, s in enumerate(test_ds.samples) if s.label == 1]
    seen = False
    if args.calibration_dir:
        paths, missing = expand_inputs(args.calibration_dir)
        if missing:
            raise PNIError(f"--calibration_dir: {missing[0][1]}")
        good: Any = AnomalyDataset(
            [Sample(str(p), None, 0, NORMAL, p.stem) for p in paths], args.resize, args.imagesize
        )
        good_source = f"--calibration_dir {' '.join(args.calibration_dir)}"
    elif test_good:
        good = Subset(test_ds, test_good)
        good_source = f"good test images of {Path(args.dataset_path) / args.category}"
    else:
        good = train_ds
        seen = True
        good_source = f"training images of {Path(args.dataset_path) / args.category} (seen in training)"
        warn(
            f"no good images to calibrate on besides the training images of {args.category}: the thresholds are "
            "calibrated on those, which the model has seen, so expect more false positives on new good images; "
            "pass --calibration_dir DIR (good images not used in training)"
        )
    with_masks = bool(test_bad) and test_ds.has_masks
    dataset = ConcatDataset([good, Subset(test_ds, test_bad)])
    labels = [0] * len(good) + [1] * len(test_bad)
    has_mask = [False] * len(good) + [with_masks] * len(test_bad)
    info = {
        "target_fpr": args.target_fpr,
        "good_images": {"count": len(good), "source": good_source, "seen_in_training": seen},
        "defective_images": {
            "count": len(test_bad),
            "with_masks": with_masks,
            "source": f"defective test images of {Path(args.dataset_path) / args.category}" if test_bad else None,
        },
    }
    return dataset, labels, has_mask, info


def score_calibration(
    args: argparse.Namespace, model: PNIModel, dataset, labels: list[int], has_mask: list[bool], per_image: int | None
) -> CalibrationScores:
    """Score the calibration images with ``model`` on the Lightning device."""
    scores = CalibrationScores()

    def sink(meta: dict, result) -> None:
        i = int(meta["index"])
        mask = (meta["mask"].cpu().numpy()[0] > 0.5) if has_mask[i] else None
        scores.add(labels[i], result.image, {m: result.maps[m].detach().float().cpu().numpy() for m in MAP_NAMES}, mask)

    loader = DataLoader(
        IndexedDataset(dataset), batch_size=_batch_size(args, per_image), shuffle=False, num_workers=args.num_workers
    )
    with Progress(f"export: scoring {len(dataset)} calibration images") as bar:
        trainer = _trainer(args, bar, devices=1, precision=_precision(args))
        interruptible(trainer.predict, ScoringModule(model, sink), loader, return_predictions=False)
    return scores


def export(args: argparse.Namespace) -> Path:
    """Write the bundle of the category the flags name; returns its folder."""
    check_output(args.output)  # before any work: a foreign folder or an unwritable place
    given = [f"--{f}" for f in TRAIN_FLAGS if getattr(args, f)]
    if given:
        print(f"note: export_model.py trains nothing; {' '.join(given)} ignored", file=sys.stderr)
        for f in TRAIN_FLAGS:
            setattr(args, f, False)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    out_dir = embedding_dir(args)
    check_saved_stages(args, out_dir)
    coresets = load_coresets(args, out_dir)
    priors = load_position_priors(args, out_dir, coresets)
    mlp = load_neighbourhood_model(args, out_dir, coresets)
    extractor = build_feature_extractor(
        args.backbone,
        args.layer_index,
        args.pretrain_embed_dimension,
        args.target_embed_dimension,
        args.patchsize,
        args.backbone_weights,
        args.random_init,
    )
    per_image = _check_grid(args, extractor, priors)
    model = PNIModel.from_arrays(extractor, mlp, coresets, priors, scoring_config(args), args.dist_padding, args.resize)
    dataset, labels, has_mask, info = calibration_set(args)
    print(
        f"[{args.category}] calibrating on {info['good_images']['count']} good and "
        f"{info['defective_images']['count']} defective images",
        flush=True,
    )
    scores = score_calibration(args, model, dataset, labels, has_mask, per_image)
    thresholds = calibrate(scores, args.target_fpr)
    provenance = {
        **settings_of(args, NB_KEYS),
        "mask_workers": args.mask_workers,
        DIGEST_KEY: coreset_digest(coresets),
        "embedding_dir": str(out_dir),
    }
    bundle = write_bundle(
        args.output, model.cpu(), backbone_source(args), provenance, thresholds, info, args.include_backbone
    )
    size = sum(p.stat().st_size for p in bundle.iterdir())
    print(format_thresholds(thresholds, args.target_fpr))
    print(
        f"good images: {info['good_images']['source']}; defective: {info['defective_images']['count']}"
        + (" with masks" if info["defective_images"]["with_masks"] else "")
    )
    print(
        f"bundle: {bundle} (format {FORMAT_VERSION}, {len(list(bundle.iterdir()))} files, "
        f"{size / 2**20:.1f} MiB); predict with: python predict.py --model {bundle} --input IMAGES --output DIR"
    )
    return bundle
