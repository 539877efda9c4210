"""Several processes on Lightning's DDP strategy (``--devices N --strategy ddp``).

How a run is shared out: the feature bank and the coresets (stage 1) and the position
priors (stage 3) are made by rank 0 alone, before any other process exists. The
neighbourhood MLP (stage 2, ``trainer.fit``) and the test-set scoring (stage 4,
``trainer.test``) run on every rank: each trains on its share of the windows (DDP averages
the gradients) and scores its share of the test images, writing their result files; rank 0
then gathers the image rows, reads the maps back for the AUROCs and writes the tables.

Lightning's ``ddp`` strategy starts ranks 1..N-1 by running the same command line again
(with ``LOCAL_RANK`` set) when the first DDP trainer starts, so everything before that
point runs again in each of them. :func:`is_child` tells those re-runs apart; they skip the
rank-0-only stages and every write, take the values rank 0 decided (the feature bank file,
the result folder) from the environment or from a broadcast (:func:`shared`), and wait at
:func:`barrier` for rank 0's artefacts. ``ddp_spawn`` is refused: it would pickle the
feature bank and the stage callbacks into each process. One machine (``--num_nodes`` is
not offered); the training artefacts must be on a file system every rank can read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from pni.cli import Devices, parse_devices
from pni.config import RuntimeSettings
from pni.errors import PNIError
from pni.io import load_npy

T = TypeVar("T")

ENV_RUN = "PNI_DDP_RUN"
ENV_PREFIX = "PNI_DDP_"


def _device_count(text: Devices) -> int | None:
    """Devices asked for by ``--devices`` (``None``: 'auto' / -1, Lightning decides)."""
    devices = parse_devices(text)
    if isinstance(devices, str) or devices == -1:
        return None  # "auto"
    return devices if isinstance(devices, int) else len(devices)


def configure(runtime: RuntimeSettings) -> RuntimeSettings:
    """Decide from ``--devices``/``--strategy`` whether this run uses several processes:
    ``runtime`` with ``ddp`` set (and the strategy it implies). ``--devices N`` (N > 1) alone
    means ``--strategy ddp``; without either, one device is used even where several are present."""
    strategy = str(runtime.strategy)
    count = _device_count(runtime.devices)
    if strategy.startswith("ddp"):
        if strategy not in ("ddp", "ddp_find_unused_parameters_true"):
            raise PNIError(f"--strategy {strategy} is not supported; use --strategy ddp (see pni/distributed.py)")
        ddp = count != 1
    elif strategy == "auto":
        ddp = count is not None and count > 1
        if ddp:
            strategy = "ddp"
    else:
        ddp = False  # a single-device strategy named by the user
    if ddp and not is_child():
        os.environ[ENV_RUN] = "1"
    return dataclasses.replace(runtime, strategy=strategy, ddp=ddp)


def check_devices(accelerator: str, devices: Devices) -> None:
    """Before any work: this machine has what ``--accelerator`` and ``--devices`` ask for
    (a one-line PNIError naming the flag otherwise)."""
    wanted = parse_devices(devices)
    acc = accelerator.lower()
    if acc == "auto" and torch.cuda.is_available():
        acc = "cuda"
    if acc in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise PNIError(
                f"--accelerator {accelerator}: no CUDA GPU is available on this machine; "
                "use --accelerator cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if isinstance(wanted, list) and max(wanted) >= count or isinstance(wanted, int) and wanted > count:
            raise PNIError(f"--devices {devices}: this machine has {count} CUDA device(s) (indices 0..{count - 1})")
    elif acc == "mps":
        if not torch.backends.mps.is_available():
            raise PNIError(
                f"--accelerator {accelerator}: MPS is not available on this machine; use --accelerator cpu (or auto)"
            )
    elif isinstance(wanted, list):
        raise PNIError(
            f"--devices {devices}: a list of device indices needs --accelerator gpu; on the CPU give a "
            "count of processes"
        )


def devices_and_strategy(runtime: RuntimeSettings) -> dict[str, Any]:
    """Trainer keywords for the stages that may run on several processes (MLP training and
    test scoring); without DDP, ``--devices auto`` means one device."""
    devices = parse_devices(runtime.devices)
    if not runtime.ddp and (devices == "auto" or devices == -1):
        devices = 1
    return {"devices": devices, "strategy": runtime.strategy}


def is_child() -> bool:
    """True in a process that Lightning's DDP launcher started (global rank > 0)."""
    if os.environ.get(ENV_RUN) != "1":
        return False
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 or int(os.environ.get("NODE_RANK", "0") or 0) > 0


def initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    if initialised():
        return torch.distributed.get_rank()
    return 1 if is_child() else 0


def shared(key: str, make: Callable[[], str]) -> str:
    """A string made by rank 0 (``make()``) and the same on every rank.

    Before the process group exists, rank 0 puts it in the environment, which the ranks
    Lightning starts later inherit; afterwards it is broadcast.
    """
    name = ENV_PREFIX + key.upper()
    if initialised():
        box = [make() if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return str(box[0])
    if is_child():
        if name not in os.environ:
            raise PNIError(f"rank {rank()}: {name} was not set by rank 0")
        return os.environ[name]
    value = str(make())
    if os.environ.get(ENV_RUN) == "1":
        os.environ[name] = value
    return value


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if initialised():
        torch.distributed.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not initialised():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_by_index(indices: Sequence[int], items: Sequence[T]) -> list[T]:
    """Every rank's ``items`` (``items[j]`` belongs to dataset position ``indices[j]``), once
    per position, in position order: the distributed sampler repeats a few positions to give
    every rank as many. Without a process group, ``items`` sorted by index."""
    merged: dict[int, T] = {}
    for part in gather(list(zip(indices, items))):
        for index, item in part:
            merged.setdefault(int(index), item)
    return [merged[i] for i in sorted(merged)]


def share_bank(bank: np.ndarray | None) -> np.ndarray:
    """Rank 0's memory-mapped feature bank ``bank``, opened read-only by the other ranks (its
    path is handed over in the environment before they start; they pass ``None``)."""
    if is_child():
        return load_npy(shared("bank", lambda: ""), mmap_mode="r")
    if not isinstance(bank, np.memmap) or bank.filename is None:
        raise RuntimeError("the feature bank must be a memory map under DDP")
    path = bank.filename
    bank.flush()
    shared("bank", lambda: str(path))
    return bank
