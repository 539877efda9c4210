"""Shared helpers of the benchmarks: machine description, timing, memory readings.

Every benchmark measures the two sides of its ratio in the same run (absolute times vary
a lot between runs on shared machines) and prints the ratio as its last line.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("PNI_NO_NETWORK", "1")

import torch  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def machine(device: torch.device | None = None) -> str:
    """One line naming the machine the numbers come from."""
    text = (
        f"{cpu_model()}, {os.cpu_count()} cores, {total_memory_gib():.0f} GiB RAM, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    if device is not None and device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def pick_device(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def best(times: list[float]) -> float:
    """The fastest of several timings: the least disturbed by other load on the machine."""
    return min(times)


def median(times: list[float]) -> float:
    return statistics.median(times)


def gemm_rate(device: torch.device, n: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of one large ``n x n`` matrix product on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t = best(timeit(lambda: a @ b, device, repeats=repeats, warmup=1))
    return 2.0 * n**3 / t


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is None:
        return peak_rss_bytes()
    return kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since start or :func:`reset_peak_rss`)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the peak-RSS counter (Linux ``/proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MiB"
