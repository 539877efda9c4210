"""Atomic file writing, locked CSV appends, output-folder and file-name checks.

Every artefact is written to a temporary name in the destination folder and then
renamed, so an interrupted run never leaves a half-written file under the final name.
Temporary names carry ``<host>~<pid>`` of the writing process; the first write of a later
process into the same folder removes those left by killed processes of this host.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Literal, TextIO

import numpy as np
from filelock import FileLock

from pni.errors import PNIError

_OWNER = re.compile(r"-([^-~]+)~(\d+)-")
_STALE_TEMP = re.compile(r"^\..*\.tmp-([^-~]+)~(\d+)-")
_swept_folders: set[str] = set()  # folders this process has cleared of stale temporary files


def owner_tag() -> str:
    """``<host>~<pid>``: put in the names of temporary files and folders so that a later run
    can tell those of killed runs (same host, process gone) from those of running ones."""
    return f"{socket.gethostname().replace('-', '_').replace('~', '_')}~{os.getpid()}"


def left_by_killed_run(name: str, pattern: re.Pattern = _OWNER) -> bool:
    """True when ``name`` holds the :func:`owner_tag` of a process of this host that no longer
    exists (never for other hosts, live processes or names without a tag)."""
    owner = pattern.search(name)
    if owner is None or owner.group(1) != owner_tag().split("~")[0]:
        return False
    try:
        os.kill(int(owner.group(2)), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def remove_stale_temp_files(folder: Path) -> None:
    """Remove the temporary files of :func:`atomic_path` that killed processes left in ``folder``."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and left_by_killed_run(entry.name, _STALE_TEMP) and entry.is_file():
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


_NAME_RULE = "a single file or folder name (not empty, '.' or '..', no '/' or '\\')"


def is_single_name(name: str) -> bool:
    """True when ``name`` is one path component: joined to a folder, it stays inside it."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and not os.path.isabs(name)


def check_name(name: str, what: str) -> str:
    """``name`` if :func:`is_single_name`, else a PNIError naming ``what`` (a flag, or the file
    the name was read from). Every name that becomes part of an output path goes through this."""
    if not is_single_name(name):
        raise PNIError(f"{what} {name!r} must be {_NAME_RULE}")
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (``mkstemp``/``mkdtemp`` make
    it private)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def _temp_file_beside(path: Path, suffix: str | None = None) -> Path:
    """A new empty hidden file ``.<stem>.tmp-<owner>-*<suffix>`` in ``path``'s folder (made
    if needed, and cleared of those killed processes left), with the usual file mode."""
    make_dir(path.parent)
    if str(path.parent) not in _swept_folders:
        _swept_folders.add(str(path.parent))
        remove_stale_temp_files(path.parent)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{owner_tag()}-", suffix=sfx, dir=path.parent)
    except OSError as exc:
        raise PNIError(f"cannot write to folder {path.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    set_default_mode(tmp_path)  # mkstemp makes 0600; artefacts get the usual mode
    return tmp_path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so that libraries which
    infer the format from the extension (numpy, PIL, cv2) still work.
    """
    path = Path(path)
    tmp_path = _temp_file_beside(path, suffix)
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


def check_output_dir(path: str | os.PathLike, flag: str | None = None) -> None:
    """Before any work: refuse (PNIError) an output folder that could not be created or written
    to; creates nothing."""
    path = Path(path)
    where = f" (from {flag})" if flag else ""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise PNIError(f"cannot create output folder {path}{where}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "write to" if existing == path else "create"
        raise PNIError(f"cannot {verb} output folder {path}{where}: no write permission in {existing}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (through the lock file ``.<name>.lock`` beside it)
    while the block runs: processes that append to the same file take turns."""
    path = Path(path)
    make_dir(path.parent)
    try:
        lock = FileLock(str(path.parent / f".{path.name}.lock"))
        lock.acquire()
    except OSError as exc:
        raise PNIError(f"cannot lock {path} for writing: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        lock.release()


_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_weights_only(
    path: str | os.PathLike, what: str, safe_globals: Sequence[Any] = (), map_location: Any = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` (tensors and plain containers, plus
    ``safe_globals``): a file that would run code when loaded, or that is not a torch file,
    is a one-line PNIError ``cannot read <what> <path>: <reason>``."""
    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is a user-file error
        text = _ANSI.sub("", str(exc))
        unsafe = _UNSAFE_GLOBAL.search(text)
        if unsafe is not None:
            reason = (
                f"it holds a Python object ({unsafe.group(1)}) that loading would have to run; "
                "refused (only tensors and plain containers are read)"
            )
        elif "Weights only load failed" in text:
            reason = "it holds Python objects beyond tensors and plain containers; refused"
        else:
            reason = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PNIError(f"cannot read {what} {path}: {reason}") from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically (never pickled)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError(f"refusing to save an object array to {path}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap_mode: Literal["r+", "r", "w+", "c"] | None = None) -> np.ndarray:
    """Load a ``.npy`` file without ever unpickling; an empty or truncated file raises
    ValueError (numpy raises EOFError for those), like any other unreadable content."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
    except EOFError as exc:
        raise ValueError(f"{path} is empty or truncated ({exc or 'no data'})") from None


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


def check_csv_header(path: str | os.PathLike, header: Sequence[str]) -> None:
    """Refuse (PNIError naming the file) an existing CSV file whose first row is not ``header``;
    called before a run does the work whose rows it then could not append."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        first = next(csv.reader(fh), None)
    if first is not None and first != list(header):
        raise PNIError(
            f"{path}: existing header {first} differs from {list(header)}; "
            "move the old file away or use another --project_root_path"
        )


def append_csv_rows(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Append ``rows`` to a CSV file, writing ``header`` first if the file is new.

    The whole file is rewritten through a temporary name, so a crash never leaves a
    truncated CSV, under a lock (:func:`locked`), so that processes appending to the same
    file at the same time keep every row. An existing file with a different header is an
    error (PNIError).
    """
    path = Path(path)
    rows = [list(r) for r in rows]
    with locked(path):
        check_csv_header(path, header)
        existing: list[list[str]] = []
        if path.exists():
            with open(path, newline="") as fh:
                existing = list(csv.reader(fh))
        if not existing:
            existing = [list(header)]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerows(existing)
                w.writerows(rows)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a complete CSV file (header + rows) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(header))
            w.writerows([list(r) for r in rows])


class CsvStream:
    """A CSV file written row by row: under a temporary name beside ``path`` (as
    :func:`atomic_path` names them), renamed onto ``path`` by :meth:`close`, also after an
    interruption, so ``path`` holds ``header`` and every row written, each complete. Closing
    twice is harmless; usable as a context manager."""

    def __init__(self, path: str | os.PathLike, header: Sequence[str]) -> None:
        self.path = Path(path)
        self.tmp = _temp_file_beside(self.path)
        self._file: TextIO | None = open(self.tmp, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(list(header))

    def write(self, row: Iterable[Any]) -> None:
        """Append one row."""
        self._writer.writerow(list(row))

    def close(self) -> None:
        """Rename the rows written so far onto ``path``."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        os.replace(self.tmp, self.path)

    def __enter__(self) -> CsvStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
