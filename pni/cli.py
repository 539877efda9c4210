"""Shared CLI behaviour: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable

from pni.errors import PNIError


def run_cli(main: Callable[[], Any], debug: bool = False) -> int:
    """Run ``main``; print ``error: ...`` (no traceback unless ``debug``) on bad input."""
    debug = debug or bool(os.environ.get("PNI_DEBUG"))
    try:
        main()
    except PNIError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 2
    return 0
