"""The model bundle: one self-contained folder that scores new images without the dataset
or the embedding folder, and never unpickles anything.

Layout (format version :data:`FORMAT_VERSION`)::

    manifest.json          format, versions, every setting scoring needs, thresholds,
                           calibration figures, the sha256 of every other file
    arrays.safetensors     the scoring artefacts (pni.model.ARTEFACT_NAMES): three coresets,
                           the entry map m(k), both position priors
    mlp.safetensors        the neighbourhood MLP's state dict (original parameter names)
    backbone.safetensors   the backbone layers the features use (only with
                           --include_backbone, or a randomly initialised backbone)
    model.onnx             only with --onnx: the whole model as one ONNX graph, backbone
                           weights included (pni.deploy.onnx_export); model.onnx.data
                           beside it holds its weights when they pass 2 GB

Without ``backbone.safetensors`` the manifest names the weights file and its sha256, found
as in training (``--backbone_weights`` or the torch hub cache). The arrays are plain
tensors and the MLP a plain module, so other exports (ONNX, TorchScript) can start from a
loaded :class:`~pni.model.PNIModel`. The manifest is read and checked by
:func:`pni.manifest.read_manifest`, without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pni import __version__
from pni.artefacts import remove_stale
from pni.config import DEFAULT_PRECISION, FeatureSettings, NeighbourhoodSettings
from pni.deploy.onnx_export import export_onnx
from pni.distributions import dropped_slot, mlp_from_state_dict
from pni.errors import PNIError
from pni.features import hub_checkpoint_dir, weights_file_name
from pni.io import check_output_dir, file_sha256, make_dir, owner_tag, set_default_mode
from pni.manifest import (
    ARRAYS,
    BACKBONE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MLP,
    is_bundle,
    orphaned_bundle,
    read_manifest,
    temp_folder_pattern,
)
from pni.model import ARTEFACT_NAMES, PNIModel
from pni.scoring import ScoringArtefacts, ScoringConfig

_METADATA = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}

# FeatureSettings fields the manifest keeps under "backbone_weights" instead (where the
# weights come from is decided when the bundle is loaded).
WEIGHTS_SOURCE = ("backbone_weights", "random_init")


def manifest_settings(
    features: FeatureSettings, neighbourhood: NeighbourhoodSettings, scoring: ScoringConfig, classes: int
) -> dict[str, Any]:
    """The manifest's "features", "neighbourhood" and "scoring" sections: everything
    :func:`load_bundle` needs to rebuild the model around its arrays (read back by
    :func:`settings_from_manifest`). ``classes``: the MLP's output size (distribution coreset)."""
    scoring_fields = dataclasses.asdict(scoring)
    scoring_fields.pop("chunk_size")  # chosen per device when scoring
    return {
        "features": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(features).items()
            if k not in WEIGHTS_SOURCE
        },
        "neighbourhood": {
            "dist_padding": neighbourhood.dist_padding,
            "window_layout": neighbourhood.variant,
            "dropped_slot": neighbourhood.dropped_slot,
            "num_layers": neighbourhood.num_layers,
            "classes": classes,
        },
        "scoring": scoring_fields,
    }


def settings_from_manifest(
    manifest: dict[str, Any], where: Path
) -> tuple[FeatureSettings, NeighbourhoodSettings, ScoringConfig]:
    """The settings of :func:`manifest_settings` read back from ``manifest`` (of file
    ``where``); the features' weights source is left at its defaults. A missing or mistyped
    setting raises KeyError or TypeError; an MLP window layout that is not its variant's, a
    one-line PNIError."""
    feats, nb = manifest["features"], manifest["neighbourhood"]
    features = FeatureSettings(
        feats["backbone"],
        tuple(feats["layers"]),
        feats["pretrain_embed_dimension"],
        feats["target_embed_dimension"],
        feats["patchsize"],
        feats["resize"],
        feats["imagesize"],
    )
    config = ScoringConfig(**manifest["scoring"], chunk_size=None)
    if nb["window_layout"] != config.variant or nb["dropped_slot"] != dropped_slot(nb["dist_padding"], config.variant):
        raise PNIError(
            f"{where}: the MLP window layout ({nb['window_layout']}, slot "
            f"{nb['dropped_slot']}) is not the one of variant {config.variant}"
        )
    return features, NeighbourhoodSettings(nb["dist_padding"], nb["num_layers"], nb["window_layout"]), config


def model_settings(model: PNIModel) -> dict[str, Any]:
    """The manifest sections of ``model`` (see :func:`manifest_settings`)."""
    ext = model.extractor
    features = FeatureSettings(
        ext.backbone_name,
        tuple(ext.layers),
        ext.pretrain_embed_dimension,
        ext.target_embed_dimension,
        ext.patchsize,
        model.resize,
        model.imagesize,
    )
    neighbourhood = NeighbourhoodSettings(model.dist_padding, model.mlp.num_layers, model.layout)
    return manifest_settings(features, neighbourhood, model.config, model.mlp.num_classes)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def check_output(output: str | os.PathLike) -> Path:
    """Before any work: ``--output`` must be a new or empty folder, or a bundle to replace,
    in a folder we can write to; else one-line PNIError naming it."""
    out = Path(output)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or (any(out.iterdir()) and not is_bundle(out)):
            raise PNIError(
                f"--output {out} exists and is not a PNI model bundle (no {MANIFEST} of export_model.py); "
                "choose a new folder"
            )
    orphan = orphaned_bundle(out)
    if orphan is not None:
        raise PNIError(
            f"--output {out} is missing: an export killed while replacing it left the previous bundle in "
            f"{orphan}; move that back to {out} (or delete it) and run again"
        )
    check_output_dir(out.parent, "--output")
    return out


def write_bundle(
    output: str | os.PathLike,
    model: PNIModel,
    backbone: dict[str, Any],
    provenance: dict[str, Any],
    thresholds: dict[str, Any],
    calibration: dict[str, Any],
    include_backbone: bool,
    onnx: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> Path:
    """Write ``model`` (on the CPU) with its thresholds as a bundle folder ``output`` (checked
    as by :func:`check_output`).

    ``backbone``: ``{file, sha256, random_init, random_init_seed}`` (where the weights came
    from); ``provenance``: the training settings (category, seed, ...); ``onnx``: also write
    ``model.onnx`` (:func:`pni.deploy.onnx_export.export_onnx`), listed with its sha256 like
    every other file; ``precision``: the one the thresholds were calibrated under (the
    manifest's ``"precision"``, prediction's default). The folder is built
    under a temporary name beside ``output`` and renamed; an existing bundle there is
    replaced. Temporary folders left by killed exports of ``output`` are removed.
    """
    out = check_output(output)
    make_dir(out.parent, "--output")
    for kind in ("partial", "old"):
        remove_stale(out.parent, temp_folder_pattern(out, kind))
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{owner_tag()}-", dir=out.parent))
    except OSError as exc:
        raise PNIError(f"cannot write to folder {out.parent}: {exc.strerror or exc}") from None
    try:
        save_file(
            _contiguous({name: getattr(model, name) for name in ARTEFACT_NAMES}), str(tmp / ARRAYS), metadata=_METADATA
        )
        save_file(_contiguous(model.mlp.state_dict()), str(tmp / MLP), metadata=_METADATA)
        backbone = dict(backbone)
        backbone["included"] = bool(include_backbone or backbone.get("random_init"))
        if backbone["included"]:
            save_file(_contiguous(model.extractor.body.state_dict()), str(tmp / BACKBONE), metadata=_METADATA)
        if onnx:
            export_onnx(model, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "precision": precision,
            **model_settings(model),
            "backbone_weights": backbone,
            "training": provenance,
            "thresholds": thresholds,
            "calibration": calibration,
            "files": {name: file_sha256(tmp / name) for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp (and safetensors) make them private
            set_default_mode(p)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{owner_tag()}-", dir=out.parent))
            os.rename(out, old / out.name)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / out.name, out)  # put the previous bundle back
                os.rmdir(old)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tensors(path: Path, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PNIError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    missing = [n for n in (names or ()) if n not in state]
    if missing:
        raise PNIError(f"{path} lacks {', '.join(missing)}")
    return state


def _backbone_weights(root: Path, manifest: dict[str, Any], weights_path: str | os.PathLike | None) -> Path:
    """The backbone weights file a bundle without ``backbone.safetensors`` names, found as in
    training (``weights_path``, else the torch hub cache) and checked against its sha256."""
    info = manifest["backbone_weights"]
    name, digest = info.get("file"), info.get("sha256")
    backbone = manifest["features"]["backbone"]
    if weights_path is not None:
        candidates = [Path(weights_path)]
        if not candidates[0].is_file():
            raise PNIError(f"--backbone_weights: file not found: {weights_path}")
    else:
        candidates = [hub_checkpoint_dir() / n for n in dict.fromkeys([name, weights_file_name(backbone)]) if n]
    for path in candidates:
        if path.is_file():
            if digest and file_sha256(path) != digest:
                raise PNIError(
                    f"backbone weights {path} are not the ones bundle {root} was made with ({name}, "
                    f"sha256 {digest[:16]}...); pass the right file with --backbone_weights"
                )
            return path
    raise PNIError(
        f"bundle {root} needs the backbone weights {name} (sha256 {str(digest)[:16]}...): put the file "
        f"in {hub_checkpoint_dir()} or pass --backbone_weights PATH (or export with --include_backbone)"
    )


def load_bundle(
    path: str | os.PathLike, backbone_weights: str | os.PathLike | None = None
) -> tuple[PNIModel, dict[str, Any]]:
    """The :class:`PNIModel` of a bundle folder (on the CPU) and its manifest. Refuses, with
    one line naming the file, a folder that is not a bundle, of another format version, with
    a missing or altered file, or whose arrays do not fit its settings."""
    root = Path(path)
    manifest = read_manifest(root)
    try:
        features, neighbourhood, config = settings_from_manifest(manifest, root / MANIFEST)
        arrays = _tensors(root / ARRAYS, ARTEFACT_NAMES)
        mlp = mlp_from_state_dict(_tensors(root / MLP))
        included = bool(manifest["backbone_weights"].get("included"))
        weights = None if included else _backbone_weights(root, manifest, backbone_weights)
        extractor = dataclasses.replace(
            features, backbone_weights=None if weights is None else str(weights), random_init=included
        ).build_extractor()
        if included:
            try:
                extractor.body.load_state_dict(_tensors(root / BACKBONE))
            except RuntimeError as exc:
                raise PNIError(
                    f"{root / BACKBONE} does not fit {features.backbone}: {str(exc).strip().splitlines()[0]}"
                ) from None
        model = PNIModel(
            extractor,
            mlp,
            ScoringArtefacts(**{n: arrays[n] for n in ARTEFACT_NAMES}),
            config,
            neighbourhood.dist_padding,
            features.resize,
        )
    except (KeyError, TypeError) as exc:
        raise PNIError(f"{root / MANIFEST} lacks or mistypes a setting ({exc}); export the model again") from None
    except RuntimeError as exc:  # state dicts of the wrong shape
        raise PNIError(f"bundle {root} does not fit its manifest: {str(exc).strip().splitlines()[0]}") from None
    _check_fit(model, root)
    return model, manifest


def _check_fit(model: PNIModel, root: Path) -> None:
    """The arrays must fit the grid the extractor gives at ``imagesize`` and the MLP's sizes."""
    with torch.no_grad():
        _, rows, cols, dim = model.extractor(torch.zeros(1, 3, model.imagesize, model.imagesize)).shape
    try:
        model.artefacts().check(rows, cols, dim)
    except PNIError as exc:
        raise PNIError(f"bundle {root}: {exc}") from None
    mlp = model.mlp
    if not mlp.fits(model.dist_padding, dim, model.artefacts().distribution_coreset.shape[0]):
        raise PNIError(
            f"bundle {root}: the MLP (input {mlp.in_features}, {mlp.num_classes} classes) does not fit its settings"
        )
