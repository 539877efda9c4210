"""Numeric precision of the backbone and the neighbourhood MLP (``--precision``).

``32-true`` (the default) runs everything in float32 and reproduces the published code.
``bf16-mixed`` runs the backbone's convolutions and the MLP's matrix products in bfloat16
under ``torch.autocast`` (Lightning's mixed-precision plugin, or :func:`autocast` outside
Lightning), on a GPU or on a CPU: CPUs with bf16 matrix units (Intel AMX) run them several
times faster than float32. ``16-mixed`` (float16) is for GPUs only: a CPU has no fast float16
path, and it is refused there (:func:`check_precision`).

Whatever the precision, the patch aggregation, the features handed on (feature bank,
coresets, scoring), the distances, masks, maps, blur and metrics stay float32: nearest
entries, their ranks and the masks' ties are decided by small distance differences that
bfloat16's 8-bit mantissa would reorder (docs/PERFORMANCE.md, "Precision").

This module holds what the stages and CLIs need to agree on: the capability check
(:func:`cpu_bf16_units`, cached, from torch's own CPU query), the one-line note that
``bf16-mixed`` is available (:func:`precision_note`, :func:`print_note_once`), the refusal
of ``16-mixed`` on a CPU, the dtype windows are built in (:func:`compute_dtype`), the
optimizer options per precision (:func:`adam_options`) and an autocast context for code
that runs outside a Lightning Trainer (:func:`autocast`). No Lightning here.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Mapping
from typing import IO, Any

import torch

from pni.config import DEFAULT_PRECISION, PRECISIONS  # noqa: F401  # defined where no torch is imported
from pni.errors import PNIError

_AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

# The speed-ups quoted by the note, on an Intel Xeon with AMX (torch 2.14.1 CPU), at the paper's
# sizes: one 480 px test image and one MLP training step of 2,048 windows measured 3.3x and
# 4.0x (CPU time of one thread on a busy 2-core machine), the training step 3.1x with 2 threads
# (bench/bench_precision.py); quoted conservatively. TODO-MEASURE: the quiet-machine figures of
# bench/bench_precision.py (docs/PERFORMANCE.md, "Precision").
AMX_TEST_SPEEDUP = 2.5
AMX_TRAINING_SPEEDUP = 3.0


def check_precision(precision: str, device_type: str) -> None:
    """Refuse an unknown ``--precision`` and ``16-mixed`` on a CPU (float16 has no fast CPU
    kernels; Lightning would silently switch to bf16): one line, :class:`PNIError`."""
    if precision not in PRECISIONS:
        raise PNIError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "16-mixed" and device_type == "cpu":
        raise PNIError(
            "--precision 16-mixed is for GPUs: float16 has no fast path on a CPU; "
            "use --precision bf16-mixed (or the default 32-true)"
        )


def check_and_note(precision: str, accelerator: str, note: bool = True) -> None:
    """Before any work in a CLI: :func:`check_precision` on the device ``accelerator`` runs
    on, then (``note``: rank 0 of a DDP run, or a single process) :func:`print_note_once`."""
    device = device_type(accelerator)
    check_precision(precision, device)
    if note:
        print_note_once(precision, device)


def bundle_run_precision(requested: str | None, bundle: str, where: str, device_type: str) -> str:
    """The precision prediction runs a bundle in: ``requested`` (``--precision``,
    ``load_model(precision=...)``), else ``bundle``'s (its manifest's, ``where``). Checked for
    ``device_type`` (:func:`check_precision`); a bundle calibrated under ``16-mixed`` (on a
    GPU) runs on a CPU only when another precision is requested (one-line PNIError)."""
    if requested is not None:
        check_precision(requested, device_type)
        return requested
    if bundle == "16-mixed" and device_type == "cpu":
        raise PNIError(
            f"{where}: the bundle was calibrated under --precision 16-mixed, a GPU precision: on a CPU predict "
            "with --precision bf16-mixed or 32-true (load_model(precision=...))"
        )
    check_precision(bundle, device_type)
    return bundle


def device_type(accelerator: str) -> str:
    """The torch device type a Lightning ``--accelerator`` runs on here: ``cpu``, ``cuda`` or
    ``mps`` (``auto`` picks CUDA, then MPS, as Lightning does)."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "mps":
        return "mps"
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
    return "cpu"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``None`` for ``32-true``)."""
    return _AUTOCAST_DTYPES.get(precision)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the MLP's inputs are built in under ``precision``: the autocast dtype (the
    first layer would cast float32 windows to it anyway), float32 for ``32-true``."""
    return _AUTOCAST_DTYPES.get(precision, torch.float32)


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device_type`` (as Lightning's plugin enters it
    around each step); a null context for ``32-true``. For code outside a Trainer (benchmarks,
    tests); :func:`check_precision` first."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast is running in on ``device_type`` now, or ``None`` when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def adam_options(precision: str, device_type: str) -> dict[str, Any]:
    """Keyword arguments of ``torch.optim.Adam`` for the MLP.

    ``32-true``: ``foreach=True``, the multi-tensor form of the default algorithm (bit-identical
    weights to the default for-loop, which torch picks on a CPU, at about half its time; one
    temporary the size of all parameters). Mixed precision: ``fused=True`` (one pass over each
    parameter, about 10x faster than the for-loop on a CPU, within an ulp of it per step;
    the weights differ from float32 training anyway; CPUs and CUDA devices, elsewhere
    ``foreach``)."""
    if precision in _AUTOCAST_DTYPES and device_type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}


# ---------------------------------------------------------------- CPU capability and the note


def _capabilities() -> Mapping[str, Any]:
    """torch's cached CPU feature query (``torch.cpu.get_capabilities``, cpuinfo), with the
    older private per-feature queries as a fallback; empty when neither exists."""
    query = getattr(torch.cpu, "get_capabilities", None)
    if query is not None:
        try:
            return query()
        except (RuntimeError, OSError):  # pragma: no cover - cpuinfo failed to initialise
            return {}
    caps: dict[str, Any] = {}
    for key, name in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        probe = getattr(torch.cpu, name, None)
        caps[key] = bool(probe()) if probe is not None else False
    return caps


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> str | None:
    """Name of this CPU's bf16 matrix units that torch's oneDNN kernels use under autocast:
    ``"Intel AMX"`` (tile units, bf16 products several times the float32 rate),
    ``"AVX512-BF16"`` (bf16 dot-product instructions, without AMX), or ``None``.

    Read once per process from :func:`torch.cpu.get_capabilities` (tests monkeypatch this
    function). Needs torch built with oneDNN (``torch.backends.mkldnn``), as the CPU wheels are.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    caps = _capabilities()
    if caps.get("amx_bf16"):
        return "Intel AMX"
    if caps.get("avx512_bf16"):
        return "AVX512-BF16"
    return None


def precision_note(precision: str, device_type: str) -> str | None:
    """The ``note:`` line telling a ``32-true`` run on a CPU with bf16 matrix units that
    ``--precision bf16-mixed`` is available and how much faster it is; ``None`` in every
    other case (another precision, a GPU, a CPU without the units)."""
    if precision != "32-true" or device_type != "cpu":
        return None
    units = cpu_bf16_units()
    if units is None:
        return None
    if units == "Intel AMX":
        gain = (
            f"about {AMX_TEST_SPEEDUP:g}x faster test stage and {AMX_TRAINING_SPEEDUP:g}x faster MLP training "
            "on such a CPU"
        )
    else:
        gain = "faster backbone and MLP (not measured on such a CPU: bench/bench_precision.py measures it)"
    return (
        f"note: this CPU has bf16 matrix units ({units}): --precision bf16-mixed runs the backbone and the "
        f"neighbourhood MLP in bfloat16, {gain}; coresets and maps change (README, Precision; the default "
        "32-true reproduces the published code)"
    )


printed_notes: set[str] = set()  # the notes printed in this process


def print_note_once(precision: str, device_type: str, stream: IO[str] | None = None) -> bool:
    """Print :func:`precision_note` (to stderr by default) the first time it applies in this
    process; later calls print nothing. Returns whether it printed."""
    note = precision_note(precision, device_type)
    if note is None or note in printed_notes:
        return False
    printed_notes.add(note)
    print(note, file=stream if stream is not None else sys.stderr, flush=True)
    return True
