"""Shared CLI behaviour: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence, Union

from pni.errors import PNIError

Devices = Union[str, int, Sequence[int]]

# torch's DataLoader re-raises a worker's exception as ``type(exc)(message)`` where the
# message is "Caught <Type> in DataLoader worker process <n>.\nOriginal Traceback ...\n
# <module>.<Type>: <original message>": the user should see only the original message.
_WORKER_PREFIX = re.compile(r"^Caught \w+ in (?:DataLoader worker process \d+|[\w ]+)\.")
_EXC_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?:PNIError|[A-Za-z_]*Error): ")


def one_line(exc: BaseException) -> str:
    """The user-facing message of ``exc`` on one line (DataLoader worker wrapping removed)."""
    text = str(exc).strip()
    if _WORKER_PREFIX.match(text) and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = _EXC_PREFIX.sub("", last, count=1)
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None:
        what = exc.strerror or text
        names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{what}: {names}"
    return " ".join(text.split()) or type(exc).__name__


def run_cli(main: Callable[[], Any], debug: bool = False) -> int:
    """Run ``main``; print ``error: ...`` (no traceback unless ``debug``) on bad input.

    :class:`PNIError` (also when re-raised from a DataLoader worker) and operating-system
    errors about files (unwritable output folder, missing file, full disk) give one line
    naming the file and exit code 2; anything else is a bug and keeps its traceback.
    """
    debug = debug or bool(os.environ.get("PNI_DEBUG"))
    try:
        main()
    except PNIError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: ... (see --help)``) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parse_devices(devices: str | int | Sequence[int]) -> Devices:
    """'auto' | '2' | '0,1' | '[0, 1]' -> 'auto' | 2 | [0, 1] (Lightning's ``devices``)."""
    if not isinstance(devices, str):
        return devices
    s = devices.strip().strip("[]").strip()
    if s in ("auto", ""):
        return "auto"
    try:
        if "," in s:
            return [int(x) for x in s.split(",") if x.strip()]
        return int(s)
    except ValueError:
        raise PNIError(f"--devices: expected 'auto', a count or a list like 0,1; got {devices!r}") from None


def warn(message: str) -> None:
    """Print a one-line warning to stderr."""
    print(f"warning: {message}", file=sys.stderr)


def nan_on_error(fn: Callable[..., float], *args: Any, what: str) -> float:
    """``fn(*args)``, or NaN with a warning when the metric is undefined (``ValueError``,
    e.g. a category with only one class)."""
    try:
        return fn(*args)
    except ValueError as exc:
        warn(f"{what}: {exc}; writing nan")
        return float("nan")
