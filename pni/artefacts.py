"""Artefact bookkeeping shared by the stages: file names, settings records, coreset digests,
scratch and partial result folders.

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

import argparse
import hashlib
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pni.distributions import mlp_file_name, position_prior_file_name
from pni.errors import PNIError
from pni.io import left_by_killed_run, load_json, make_dir, owner_tag, save_json
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


# Settings of the original's checkpoints (an argparse Namespace) that must match the flags:
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


def coreset_file_names(args: argparse.Namespace) -> dict[str, str]:
    sp = int(args.subsampling_percentage * 100)
    return {
        "without_edge": f"embedding_coreset_index_{sp}.faiss",
        "with_edge": f"embedding_coreset_index_{sp}_with_edge.faiss",
        "distribution": f"dist_coreset_index_{args.dist_coreset_size}.faiss",
    }


def settings_of(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` in ``args``; the :data:`DERIVED_SETTINGS` only when ``args``
    carries them (the pipeline sets them before any stage; other callers may not)."""
    return {k: getattr(args, k) for k in keys if k not in DERIVED_SETTINGS or hasattr(args, k)}


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


def compare_settings(saved: dict, args: argparse.Namespace, keys: tuple[str, ...]) -> str:
    """``--flag new (saved: old)`` for every key of :func:`settings_of` in ``saved`` that differs."""
    wanted = settings_of(args, keys)
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in wanted.items()}
    saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in saved.items()}
    diff = {k: (saved[k], wanted[k]) for k in wanted if k in saved and saved[k] != wanted[k]}

    def describe(key: str, old: Any, new: Any) -> str:
        if key in DERIVED_SETTINGS:
            flag, what = DERIVED_SETTINGS[key]
            return f"{flag} (other {what}: {new}, saved: {old})"
        return f"--{key} {new} (saved: {old})"

    return ", ".join(describe(k, old, new) for k, (old, new) in diff.items())


def check_settings(
    path: Path, args: argparse.Namespace, keys: tuple[str, ...], what: str, digest: str | None = None
) -> None:
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
    detail = compare_settings(saved, args, keys)
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


def new_version_dir(args) -> Path:
    """A hidden ``lightning_logs/.version_<k>.partial-*`` folder for a new test run (see
    :func:`publish_version_dir`); ``version_dirs`` and the analysis scripts ignore it."""
    logs = make_dir(
        run_dir(args.project_root_path, args.category, args.backbone) / "lightning_logs", "--project_root_path"
    )
    existing = [int(p.name.split("_")[1]) for p in version_dirs(args.project_root_path, args.category, args.backbone)]
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


def check_saved_stages(args, out_dir: Path) -> None:
    """Before any work: the stages that will be loaded rather than trained must have their
    files, and settings that fit the flags (coreset digests are compared once the coresets
    are final). Saves finding out after hours of training."""
    stages = [
        (
            args.train_coreset,
            "coreset_settings.json",
            CORESET_KEYS,
            "coresets",
            [out_dir / n for n in coreset_file_names(args).values()],
            "coreset",
        ),
        (
            args.train_nb_dist,
            "nb_settings.json",
            NB_KEYS,
            "neighbourhood model",
            [out_dir / mlp_file_name(args.dist_padding, args.dist_coreset_size, args.num_layers)],
            "neighbourhood model",
        ),
        (
            args.train_coor_dist,
            "coor_settings.json",
            COOR_KEYS,
            "position priors",
            [out_dir / position_prior_file_name(args.subsampling_percentage, e) for e in (False, True)],
            "position prior",
        ),
    ]
    for trained, settings_name, keys, what, files, noun in stages:
        if trained:
            continue
        check_settings(out_dir / settings_name, args, keys, what)
        for path in files:
            if not path.is_file():
                raise PNIError(f"missing {noun} {path} (run with {STAGE_FLAGS[settings_name]} to make it)")
