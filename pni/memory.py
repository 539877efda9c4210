"""Memory budgets: how many rows (images, positions, feature rows) to process at once.

The feature bank, the extraction batches, the neighbourhood windows and the distance
matrices are all processed in pieces whose size comes from the memory available on the
device that holds them (``MemAvailable`` on the host, free memory on a CUDA device), so a
full-size category fits a 24 GiB CPU machine and larger machines use larger pieces.
``PNI_MEMORY_BUDGET_BYTES`` overrides the available memory (tests, shared machines).
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import torch

GiB = 2**30


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory that can still be allocated on ``device`` (host memory for CPU / ``None``)."""
    override = os.environ.get("PNI_MEMORY_BUDGET_BYTES")
    if override:
        return int(float(override))
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other POSIX systems: free physical pages
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def rows_for(
    bytes_per_row: float,
    fraction: float = 0.25,
    device: torch.device | str | None = None,
    lo: int = 1,
    hi: int | None = None,
    budget: int | None = None,
) -> int:
    """How many rows of ``bytes_per_row`` fit in ``fraction`` of the available memory
    (or in ``budget`` bytes), clipped to ``[lo, hi]``."""
    if budget is None:
        budget = int(available_bytes(device) * fraction)
    n = int(budget // max(1.0, float(bytes_per_row)))
    n = max(lo, n)
    return min(n, hi) if hi is not None else n


def scoring_rows(widest_coreset: int, device: torch.device | str | None = None) -> int:
    """Feature rows whose distance matrices ``pni.scoring`` holds at once: about six
    ``(rows, widest_coreset)`` float32 matrices and one float64 (the product that orders dense
    bands) in 1/8 of the free memory of the scoring device, 256 to 16,384 rows."""
    return rows_for(8 * 4 * widest_coreset, fraction=0.125, device=device, lo=256, hi=16384)


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a file-backed memory map from this process (they stay in
    the page cache, written back to the file by the kernel); a no-op for anything else.

    Streaming a memory-mapped feature bank would otherwise leave every page mapped into the
    process, and its resident size would grow to the whole bank.
    """
    if not sys.platform.startswith("linux"):
        return  # MADV_DONTNEED keeps shared file pages' contents on Linux; elsewhere, do nothing
    mm = getattr(array, "_mmap", None)
    if getattr(array, "mode", None) not in ("r", "r+", "w+"):
        return  # copy-on-write maps ("c") would lose their changes
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


def trim_heap() -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; a no-op
    elsewhere). Large temporaries freed by one stage otherwise stay in the process's
    resident size while the next stage allocates its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
