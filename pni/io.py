"""Atomic file writing and settings records shared by every stage.

Every artefact is written to a temporary name in the destination folder and then
renamed, so an interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from pni.errors import PNIError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so that libraries which
    infer the format from the extension (numpy, PIL, cv2) still work.
    """
    path = Path(path)
    make_dir(path.parent)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{sfx}", dir=path.parent)
    except OSError as exc:
        raise PNIError(f"cannot write to folder {path.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def make_dir(path: str | os.PathLike, flag: str | None = None) -> Path:
    """Create folder ``path`` (and its parents); failure is a one-line PNIError naming it
    (and the flag that chose it, if given)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = f" (from {flag})" if flag else ""
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else (exc.strerror or str(exc))
        raise PNIError(f"cannot create output folder {path}{where}: {reason}") from exc
    return path


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically (never pickled)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError(f"refusing to save an object array to {path}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """Load a ``.npy`` file without ever unpickling."""
    return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def save_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def load_json(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        return json.load(fh)


def append_csv_rows(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Append ``rows`` to a CSV file, writing ``header`` first if the file is new.

    The whole file is rewritten through a temporary name, so a crash never leaves a
    truncated CSV. An existing file with a different header is an error (PNIError).
    """
    path = Path(path)
    existing: list[list[str]] = []
    if path.exists():
        with open(path, newline="") as fh:
            existing = list(csv.reader(fh))
        if existing and existing[0] != list(header):
            raise PNIError(
                f"{path}: existing header {existing[0]} differs from {list(header)}; "
                "move the old file away or use another --project_root_path"
            )
    if not existing:
        existing = [list(header)]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerows(existing)
            w.writerows([list(r) for r in rows])


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a complete CSV file (header + rows) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(header))
            w.writerows([list(r) for r in rows])
