"""Artefact bookkeeping shared by the stages: file names, settings records, coreset digests,
scratch and partial result folders, and loading a category's saved artefacts (refused when
they do not fit the settings), for the test stage and ``export_model.py``.

Interruptions: every file is written under a temporary name and renamed. Before a stage
rewrites its artefacts its settings file is replaced by an "incomplete" mark, and the real
settings are written only after the last artefact, so a run killed half-way leaves nothing
that a later run would trust. The position priors and the neighbourhood model record a
digest of the coresets they were made from. Test results are written to a hidden
``lightning_logs/.version_<k>.partial-*`` folder that becomes ``version_<k>`` only when
complete (and is removed when scoring fails).

Test hook: the environment variable ``PNI_TEST_KILL_AT=<point>`` kills the process with
SIGKILL (or the signal named by ``PNI_TEST_SIGNAL``, e.g. ``SIGINT``) at one of
``feature_batch`` (after the first batch of training features, inside Lightning),
``coreset_index`` (after the first coreset file), ``nb_checkpoint`` (after the first saved
MLP checkpoint), ``coor_prior`` (after the first position prior) or ``test_sample`` (after
the first scored test image); the tests use it to check that an interrupted run can be
re-run, and that Ctrl-C gives exit code 130 at every stage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pni import coreset as cs
from pni.config import InputDigests, Settings
from pni.data.datasets import training_set_digest
from pni.distributions import (
    NeighbourhoodMLP,
    checkpoint_layout,
    load_mlp_checkpoint,
    mlp_file_name,
    mlp_from_state_dict,
    position_prior_file_name,
)
from pni.errors import PNIError
from pni.features import weights_digest
from pni.io import left_by_killed_run, load_json, load_npy, make_dir, owner_tag, save_json
from pni.results import run_dir, version_dirs

log = logging.getLogger("pni")

# Settings that make artefacts of one stage incompatible with another run's flags.
FEATURE_KEYS = (
    "dataset_category",
    "category",
    "backbone",
    "layer_index",
    "pretrain_embed_dimension",
    "target_embed_dimension",
    "patchsize",
    "resize",
    "imagesize",
    "random_init",
    "max_train_images",
    "feature_bank_dtype",
    "backbone_weights_digest",
    "training_set_digest",
)

# Settings derived from the inputs rather than given as flags (set by the pipeline before
# any stage runs): the flag to name when they differ, and what they are a digest of.
DERIVED_SETTINGS = {
    "backbone_weights_digest": ("--backbone_weights", "weights"),
    "training_set_digest": ("--dataset_path", "training images"),
}


CORESET_KEYS = FEATURE_KEYS + ("subsampling_percentage", "dist_coreset_size", "seed")


# ``variant`` decides the MLP's window layout (pni.distributions.dropped_slot).
NB_KEYS = CORESET_KEYS + ("dist_padding", "num_layers", "variant")


COOR_KEYS = CORESET_KEYS + ("dist_padding",)


# Settings of the original's checkpoints (a dict of its flags) that must match the flags:
# only those that change what the model means (its seed or epochs do not).
ORIGINAL_NB_KEYS = (
    "backbone",
    "layer_index",
    "pretrain_embed_dimension",
    "target_embed_dimension",
    "patchsize",
    "dist_padding",
    "dist_coreset_size",
    "num_layers",
)


STAGE_FLAGS = {
    "coreset_settings.json": "--train_coreset",
    "nb_settings.json": "--train_nb_dist",
    "coor_settings.json": "--train_coor_dist",
}


DIGEST_KEY = "coreset_digest"


def settings_of(settings: Settings, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` in the flat view of ``settings`` (:meth:`Settings.flags`); the
    :data:`DERIVED_SETTINGS` only once set (the pipeline sets them before any stage; export
    does not)."""
    flags = settings.flags()
    return {k: flags[k] for k in keys if k not in DERIVED_SETTINGS or k in flags}


def mlp_file(settings: Settings) -> str:
    """File name of the neighbourhood model (the original's)."""
    nb = settings.neighbourhood
    return mlp_file_name(nb.dist_padding, settings.coreset.dist_coreset_size, nb.num_layers)


def input_digests(settings: Settings, train_ds: Dataset) -> InputDigests:
    """The :data:`DERIVED_SETTINGS` of a run: the digests of the backbone weights and of the
    training images ``train_ds`` (a dataset of :mod:`pni.data.datasets`, or a Subset of one)."""
    features = settings.features
    samples = (
        [train_ds.dataset.samples[i] for i in train_ds.indices]  # type: ignore[attr-defined]
        if isinstance(train_ds, torch.utils.data.Subset)
        else train_ds.samples  # type: ignore[attr-defined]
    )
    return InputDigests(
        weights_digest(features.backbone, features.backbone_weights, features.random_init),
        training_set_digest(samples, settings.data.dataset_path),
    )


def test_hook(point: str) -> None:
    """``PNI_TEST_KILL_AT=<point>`` kills this process at ``point`` (see the module docstring)."""
    if os.environ.get("PNI_TEST_KILL_AT") == point:
        name = os.environ.get("PNI_TEST_SIGNAL", "SIGKILL")
        print(f"PNI_TEST_KILL_AT={point}: sending {name} to the process", flush=True)
        os.kill(os.getpid(), getattr(signal, name, signal.SIGTERM))


def coreset_digest(coresets: dict[str, np.ndarray]) -> str:
    """A short digest of the coreset vectors, recorded by the stages built on them."""
    h = hashlib.sha256()
    for key in sorted(coresets):
        h.update(key.encode())
        h.update(np.ascontiguousarray(coresets[key], dtype=np.float32).tobytes())
    return h.hexdigest()[:20]


def remove_stale(folder: Path, pattern: str) -> None:
    """Remove the folders ``folder/<pattern>`` whose name holds ``-<host>~<pid>-`` of a process
    of this host that no longer exists (scratch space or partial results of a killed run)."""
    for p in folder.glob(pattern) if folder.is_dir() else ():
        if p.is_dir() and left_by_killed_run(p.name):
            log.info("removing %s, left by a killed run", p)
            shutil.rmtree(p, ignore_errors=True)


def begin_stage(path: Path) -> None:
    """Mark a stage's artefacts as being rewritten, before the first of them is touched."""
    save_json(path, {"incomplete": True, "note": "a run stopped while writing these artefacts"})


def stage_flag(path: Path) -> str:
    return STAGE_FLAGS.get(path.name, "its --train_* flag")


def compare_settings(saved: dict, settings: Settings, keys: tuple[str, ...]) -> str:
    """``--flag new (saved: old)`` for every key of :func:`settings_of` in ``saved`` that differs."""
    wanted = settings_of(settings, keys)
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in wanted.items()}
    saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in saved.items()}
    diff = {k: (saved[k], wanted[k]) for k in wanted if k in saved and saved[k] != wanted[k]}

    def describe(key: str, old: Any, new: Any) -> str:
        if key in DERIVED_SETTINGS:
            flag, what = DERIVED_SETTINGS[key]
            return f"{flag} (other {what}: {new}, saved: {old})"
        return f"--{key} {new} (saved: {old})"

    return ", ".join(describe(k, old, new) for k, (old, new) in diff.items())


def check_settings(path: Path, settings: Settings, keys: tuple[str, ...], what: str, digest: str | None = None) -> None:
    """Refuse the artefacts beside ``path`` if its settings differ from the flags, if an
    earlier run stopped while writing them, or (``digest``) if they were made from other
    coresets than the current ones."""
    if not path.is_file():
        return  # artefacts from the original code carry no settings record
    try:
        saved = load_json(path)
    except (OSError, ValueError) as exc:
        raise PNIError(f"cannot read {path}: {exc}; re-run with {stage_flag(path)}") from None
    if not isinstance(saved, dict) or saved.get("incomplete"):
        raise PNIError(
            f"{what} in {path.parent} are incomplete (an earlier run stopped while writing them); "
            f"re-run with {stage_flag(path)}"
        )
    detail = compare_settings(saved, settings, keys)
    if detail:
        raise PNIError(
            f"{what} in {path.parent} were made with other settings: {detail}; "
            f"re-run with {stage_flag(path)} or change the flags back"
        )
    if digest is not None and saved.get(DIGEST_KEY) not in (None, digest):
        raise PNIError(
            f"{what} in {path.parent} were made from other coresets than the ones there now "
            f"(see {path.name}); re-run with {stage_flag(path)}"
        )


def new_version_dir(project_root: str | os.PathLike, category: str, backbone: str) -> Path:
    """A hidden ``lightning_logs/.version_<k>.partial-*`` folder for a new test run of
    ``category`` with ``backbone`` (see :func:`publish_version_dir`); ``version_dirs`` and the
    analysis scripts ignore it."""
    logs = make_dir(run_dir(project_root, category, backbone) / "lightning_logs", "--project_root_path")
    existing = [int(p.name.split("_")[1]) for p in version_dirs(project_root, category, backbone)]
    k = max(existing, default=-1) + 1
    remove_stale(logs, ".version_*.partial-*")
    try:
        partial = Path(tempfile.mkdtemp(prefix=f".version_{k}.partial-{owner_tag()}-", dir=logs))
    except OSError as exc:
        raise PNIError(f"cannot write to folder {logs}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    partial.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder should not be
    return partial


def publish_version_dir(partial: Path) -> Path:
    """Rename a complete partial folder to the next free ``version_<k>``."""
    logs = partial.parent
    k = (
        max((int(p.name.split("_")[1]) for p in logs.glob("version_*") if p.name.split("_")[1].isdigit()), default=-1)
        + 1
    )
    for attempt in range(100):
        target = logs / f"version_{k + attempt}"
        if target.exists():
            continue
        try:
            os.rename(partial, target)
        except OSError:
            if target.exists():
                continue  # another run took this number just now
            raise
        return target
    raise PNIError(f"cannot find a free version_<k> folder name in {logs}")


def check_saved_stages(settings: Settings, out_dir: Path) -> None:
    """Before any work: the stages that will be loaded rather than trained must have their
    files, and settings that fit the flags (coreset digests are compared once the coresets
    are final). Saves finding out after hours of training."""
    stages = [
        (
            settings.stages.train_coreset,
            "coreset_settings.json",
            CORESET_KEYS,
            "coresets",
            [out_dir / n for n in settings.coreset.file_names.values()],
            "coreset",
        ),
        (
            settings.stages.train_nb_dist,
            "nb_settings.json",
            NB_KEYS,
            "neighbourhood model",
            [out_dir / mlp_file(settings)],
            "neighbourhood model",
        ),
        (
            settings.stages.train_coor_dist,
            "coor_settings.json",
            COOR_KEYS,
            "position priors",
            [out_dir / position_prior_file_name(settings.coreset.subsampling_percentage, e) for e in (False, True)],
            "position prior",
        ),
    ]
    for trained, settings_name, keys, what, files, noun in stages:
        if trained:
            continue
        check_settings(out_dir / settings_name, settings, keys, what)
        for path in files:
            if not path.is_file():
                raise PNIError(f"missing {noun} {path} (run with {STAGE_FLAGS[settings_name]} to make it)")


# ---------------------------------------------------------------- loading a category's artefacts


def load_coresets(settings: Settings, out_dir: Path) -> dict[str, np.ndarray]:
    """The three coresets as arrays ``(K, E)``."""
    settings_path = out_dir / "coreset_settings.json"
    check_settings(settings_path, settings, CORESET_KEYS, "coresets")
    dim, dcs = settings.features.target_embed_dimension, settings.coreset.dist_coreset_size
    names = settings.coreset.file_names
    out = {}
    for key, name in names.items():
        path = out_dir / name
        if not path.is_file():
            raise PNIError(f"missing coreset {path} (run with --train_coreset to make it)")
        try:
            out[key] = cs.index_vectors(cs.load_index(path))
        except Exception as exc:
            raise PNIError(f"cannot read coreset {path}: {str(exc).splitlines()[0]}") from None
        if out[key].ndim != 2 or out[key].shape[1] != dim:
            raise PNIError(f"{path} holds {out[key].shape[-1]}-dim features, but --target_embed_dimension is {dim}")
    if len(out["distribution"]) != dcs:
        raise PNIError(
            f"{out_dir / names['distribution']} holds {len(out['distribution'])} "
            f"entries, but --dist_coreset_size is {dcs}"
        )
    if settings_path.is_file():
        recorded = load_json(settings_path).get(DIGEST_KEY)
        if recorded is not None and recorded != coreset_digest(out):
            raise PNIError(
                f"the coreset files in {out_dir} are not the ones {settings_path.name} was written for "
                "(replaced or copied from another run?); re-run with --train_coreset"
            )
    return out


def load_position_priors(settings: Settings, out_dir: Path, coresets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The two position priors ``(P, K)``, refused if their settings or coresets do not fit."""
    check_settings(out_dir / "coor_settings.json", settings, COOR_KEYS, "position priors", coreset_digest(coresets))
    out = {}
    for with_edge, key in ((False, "without_edge"), (True, "with_edge")):
        path = out_dir / position_prior_file_name(settings.coreset.subsampling_percentage, with_edge)
        if not path.is_file():
            raise PNIError(f"missing position prior {path} (run with --train_coor_dist to make it)")
        try:
            prior = load_npy(path)
        except (OSError, ValueError) as exc:
            raise PNIError(f"cannot read position prior {path}: {exc}; re-run with --train_coor_dist") from None
        if prior.ndim != 2 or prior.shape[1] != len(coresets[key]):
            raise PNIError(
                f"{path} has shape {prior.shape}, but the coreset has {len(coresets[key])} entries; "
                "re-run with --train_coor_dist"
            )
        out[key] = prior
    return out


def load_neighbourhood_model(settings: Settings, out_dir: Path, coresets: dict[str, np.ndarray]) -> NeighbourhoodMLP:
    """The neighbourhood MLP, refused if its settings (``nb_settings.json`` and those stored in
    the checkpoint itself), its coresets or its layer sizes do not fit the flags."""
    nb = settings.neighbourhood
    digest = coreset_digest(coresets)
    check_settings(out_dir / "nb_settings.json", settings, NB_KEYS, "neighbourhood model", digest)
    path = out_dir / mlp_file(settings)
    ckpt = load_mlp_checkpoint(path)
    saved = ckpt.get("settings") or {}
    original = "args" in ckpt and "model" in ckpt and DIGEST_KEY not in saved
    layout = checkpoint_layout(saved, original)
    if layout != nb.variant:
        raise PNIError(
            f"neighbourhood model {path} was trained with the {layout} window layout, but --variant is "
            f"{nb.variant}; use --variant {layout} or re-run with --train_nb_dist"
        )
    detail = compare_settings(saved, settings, ORIGINAL_NB_KEYS if original else NB_KEYS)
    if detail:
        raise PNIError(
            f"neighbourhood model {path} was made with other settings: {detail}; "
            "re-run with --train_nb_dist or change the flags back"
        )
    if saved.get(DIGEST_KEY) not in (None, digest):
        raise PNIError(
            f"neighbourhood model {path} was made from other coresets than the ones in {out_dir}; "
            "re-run with --train_nb_dist"
        )
    try:
        mlp = mlp_from_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, AttributeError, IndexError) as exc:
        raise PNIError(f"{path} is not a valid neighbourhood model: {str(exc).splitlines()[0]}") from None
    dim = settings.features.target_embed_dimension
    if not mlp.fits(nb.dist_padding, dim, len(coresets["distribution"])):
        raise PNIError(
            f"neighbourhood model {path} (input {mlp.in_features}, {mlp.num_classes} classes) does not fit "
            f"--dist_padding {nb.dist_padding}, --target_embed_dimension {dim}, --dist_coreset_size "
            f"{settings.coreset.dist_coreset_size}; re-run with --train_nb_dist"
        )
    return mlp
