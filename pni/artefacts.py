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
SIGKILL at one of ``coreset_index`` (after the first coreset file), ``nb_checkpoint``
(after the first saved MLP checkpoint), ``coor_prior`` (after the first position prior)
or ``test_sample`` (after the first scored test image); the tests use it to check that an
interrupted run can be re-run.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pni.distributions import mlp_file_name, position_prior_file_name
from pni.errors import PNIError
from pni.io import load_json, make_dir, save_json
from pni.results import run_dir, version_dirs

log = logging.getLogger("pni")

# Settings that make artefacts of one stage incompatible with another run's flags.
FEATURE_KEYS = ("dataset_category", "category", "backbone", "layer_index", "pretrain_embed_dimension",
                "target_embed_dimension", "patchsize", "resize", "imagesize", "random_init", "max_train_images")


CORESET_KEYS = FEATURE_KEYS + ("subsampling_percentage", "dist_coreset_size", "seed")


# ``variant`` decides the MLP's window layout (pni.distributions.dropped_slot).
NB_KEYS = CORESET_KEYS + ("dist_padding", "num_layers", "variant")


COOR_KEYS = CORESET_KEYS + ("dist_padding",)


# Settings of the original's checkpoints (an argparse Namespace) that must match the flags:
# only those that change what the model means (its seed or epochs do not).
ORIGINAL_NB_KEYS = ("backbone", "layer_index", "pretrain_embed_dimension", "target_embed_dimension", "patchsize",
                    "dist_padding", "dist_coreset_size", "num_layers")


STAGE_FLAGS = {"coreset_settings.json": "--train_coreset", "nb_settings.json": "--train_nb_dist",
               "coor_settings.json": "--train_coor_dist"}


DIGEST_KEY = "coreset_digest"


def coreset_file_names(args: argparse.Namespace) -> dict[str, str]:
    sp = int(args.subsampling_percentage * 100)
    return {
        "without_edge": f"embedding_coreset_index_{sp}.faiss",
        "with_edge": f"embedding_coreset_index_{sp}_with_edge.faiss",
        "distribution": f"dist_coreset_index_{args.dist_coreset_size}.faiss",
    }


def settings_of(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys}


def test_hook(point: str) -> None:
    """``PNI_TEST_KILL_AT=<point>`` kills this process at ``point`` (see the module docstring)."""
    if os.environ.get("PNI_TEST_KILL_AT") == point:
        print(f"PNI_TEST_KILL_AT={point}: killing the process", flush=True)
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def coreset_digest(coresets: dict[str, np.ndarray]) -> str:
    """A short digest of the coreset vectors, recorded by the stages built on them."""
    h = hashlib.sha256()
    for key in sorted(coresets):
        h.update(key.encode())
        h.update(np.ascontiguousarray(coresets[key], dtype=np.float32).tobytes())
    return h.hexdigest()[:20]


def owner_tag() -> str:
    """``<host>~<pid>``: put in the names of scratch folders so that a later run can tell
    those of killed runs (same host, process gone) from those of running ones."""
    return f"{socket.gethostname().replace('-', '_').replace('~', '_')}~{os.getpid()}"


def remove_stale(folder: Path, pattern: str) -> None:
    """Remove the folders ``folder/<pattern>`` whose name holds ``-<host>~<pid>-`` of a process
    of this host that no longer exists (scratch space or partial results of a killed run)."""
    host = owner_tag().split("~")[0]
    for p in (folder.glob(pattern) if folder.is_dir() else ()):
        owner = re.search(r"-([^-~]+)~(\d+)-", p.name)
        if owner is None or owner.group(1) != host or not p.is_dir():
            continue
        try:
            os.kill(int(owner.group(2)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:
            continue  # exists, owned by someone else
        log.info("removing %s, left by a killed run", p)
        shutil.rmtree(p, ignore_errors=True)


def begin_stage(path: Path) -> None:
    """Mark a stage's artefacts as being rewritten, before the first of them is touched."""
    save_json(path, {"incomplete": True, "note": "a run stopped while writing these artefacts"})


def stage_flag(path: Path) -> str:
    return STAGE_FLAGS.get(path.name, "its --train_* flag")


def compare_settings(saved: dict, args: argparse.Namespace, keys: tuple[str, ...]) -> str:
    """``--flag new (saved: old)`` for every key in ``keys`` and ``saved`` that differs."""
    wanted = settings_of(args, keys)
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in wanted.items()}
    saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in saved.items()}
    diff = {k: (saved[k], wanted[k]) for k in keys if k in saved and saved[k] != wanted[k]}
    return ", ".join(f"--{k} {new} (saved: {old})" for k, (old, new) in diff.items())


def check_settings(path: Path, args: argparse.Namespace, keys: tuple[str, ...], what: str,
                    digest: str | None = None) -> None:
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
        raise PNIError(f"{what} in {path.parent} are incomplete (an earlier run stopped while writing them); "
                       f"re-run with {stage_flag(path)}")
    detail = compare_settings(saved, args, keys)
    if detail:
        raise PNIError(f"{what} in {path.parent} were made with other settings: {detail}; "
                       f"re-run with {stage_flag(path)} or change the flags back")
    if digest is not None and saved.get(DIGEST_KEY) not in (None, digest):
        raise PNIError(f"{what} in {path.parent} were made from other coresets than the ones there now "
                       f"(see {path.name}); re-run with {stage_flag(path)}")


def new_version_dir(args) -> Path:
    """A hidden ``lightning_logs/.version_<k>.partial-*`` folder for a new test run (see
    :func:`publish_version_dir`); ``version_dirs`` and the analysis scripts ignore it."""
    logs = make_dir(run_dir(args.project_root_path, args.category, args.backbone) / "lightning_logs",
                    "--project_root_path")
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
    k = max((int(p.name.split("_")[1]) for p in logs.glob("version_*") if p.name.split("_")[1].isdigit()),
            default=-1) + 1
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
        (args.train_coreset, "coreset_settings.json", CORESET_KEYS, "coresets",
         [out_dir / n for n in coreset_file_names(args).values()], "coreset"),
        (args.train_nb_dist, "nb_settings.json", NB_KEYS, "neighbourhood model",
         [out_dir / mlp_file_name(args.dist_padding, args.dist_coreset_size, args.num_layers)],
         "neighbourhood model"),
        (args.train_coor_dist, "coor_settings.json", COOR_KEYS, "position priors",
         [out_dir / position_prior_file_name(args.subsampling_percentage, e) for e in (False, True)],
         "position prior"),
    ]
    for trained, settings_name, keys, what, files, noun in stages:
        if trained:
            continue
        check_settings(out_dir / settings_name, args, keys, what)
        for path in files:
            if not path.is_file():
                raise PNIError(f"missing {noun} {path} (run with {STAGE_FLAGS[settings_name]} to make it)")
