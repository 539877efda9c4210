"""Shared CLI behaviour: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Union

from pni.errors import PNIError

Devices = Union[str, int, list[int]]  # Lightning's Trainer(devices=...)

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

    Exit codes: ``main``'s own when it returns an int (1: some inputs failed, the others
    were processed), else 0; 2 for :class:`PNIError` (also when re-raised from a DataLoader
    worker) and operating-system errors about files (unwritable output folder, missing file,
    full disk), with one line naming the file; 130 with one line ``interrupted`` for Ctrl-C.
    Anything else is a bug and keeps its traceback.
    """
    debug = debug or bool(os.environ.get("PNI_DEBUG"))
    try:
        result = main()
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
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """``sys.exit(main())`` for a script's ``__main__``: Ctrl-C anywhere, while importing and
    parsing flags too, is one line ``interrupted`` and exit code 130."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: ... (see --help)``) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parse_devices(devices: str | int | list[int]) -> Devices:
    """'auto' | '2' | '-1' | '0,1' | '[0, 1]' -> 'auto' | 2 | -1 | [0, 1] (Lightning's ``devices``);
    a count below 1 (other than -1, all devices) or a negative index is a PNIError."""
    if not isinstance(devices, str):
        return devices
    s = devices.strip().strip("[]").strip()
    if s in ("auto", ""):
        return "auto"
    problem = (
        f"--devices: expected 'auto', a count >= 1, -1 (all) or a list of device indices like 0,1; got {devices!r}"
    )
    try:
        if "," in s:
            indices = [int(x) for x in s.split(",") if x.strip()]
            if not indices or min(indices) < 0:
                raise PNIError(problem)
            return indices
        count = int(s)
    except ValueError:
        raise PNIError(problem) from None
    if count < 1 and count != -1:
        raise PNIError(problem)
    return count


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
