"""The training feature bank: the feature grid ``(R, C, E)`` of every training image in one
preallocated array ``(N, R, C, E)`` (``--feature_bank_dtype``), or a memory map when it is
large or other processes read it; extracted on the Lightning device in batches sized to
the free memory. Stages 1 to 3 of :mod:`pni.pipeline` read it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pni.artefacts import test_hook
from pni.config import Settings
from pni.console import Progress
from pni.lightning import FeatureBankModule, IndexedDataset, interruptible
from pni.memory import available_bytes
from pni.runtime import build_trainer, images_per_batch, on_gpu, probe_extractor

IN_MEMORY_BANK_BYTES = int(os.environ.get("PNI_IN_MEMORY_BANK_BYTES", 4 * 2**30))


class _TestHookCallback(pl.Callback):
    """Calls :func:`test_hook` ``feature_batch`` after each batch of training features (the
    tests' interruption point inside Lightning's predict loop)."""

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        test_hook("feature_batch")


def extract_bank(
    settings: Settings,
    extractor: Any,
    train_ds: Dataset,
    scratch: Path | None,
    module_cls: type[FeatureBankModule] = FeatureBankModule,
    on_disk: bool = False,
    probed: tuple[torch.Tensor, int | None] | None = None,
    progress: Progress | None = None,
    **module_kwargs: Any,
) -> tuple[np.ndarray, FeatureBankModule]:
    """Run the extractor over the training set into a preallocated bank ``(N, R, C, E)``
    (``--feature_bank_dtype``): an array, or a memory map in folder ``scratch`` when it is larger
    than ``IN_MEMORY_BANK_BYTES`` or ``on_disk`` (other processes open it). ``probed``: the
    result of :func:`pni.runtime.probe_extractor` on the first training image, if the caller
    already has it. ``progress`` gains one unit per extraction batch."""
    probe, per_image = probed if probed is not None else probe_extractor(extractor, train_ds[0]["image"])
    dtype = np.dtype(settings.coreset.feature_bank_dtype)
    shape = (len(train_ds),) + tuple(probe.shape[1:])  # type: ignore[arg-type]  # (torch's Dataset: no __len__)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    bank: np.ndarray
    if nbytes > IN_MEMORY_BANK_BYTES or on_disk:
        if scratch is None:
            raise RuntimeError("a memory-mapped feature bank needs a scratch folder")
        bank = np.lib.format.open_memmap(scratch / "train_features.npy", mode="w+", dtype=dtype, shape=shape)
    else:
        bank = np.empty(shape, dtype=dtype)
    module = module_cls(extractor, bank, **module_kwargs)
    # Extraction temporaries of a batch: at most a quarter of the bank (at least 256 MiB) on
    # the host, so the stage's peak stays near the bank's own size; half the free GPU memory.
    accelerator = settings.runtime.accelerator
    budget = None if on_gpu(accelerator) else min(available_bytes() // 4, max(256 * 2**20, nbytes // 4))
    loader = DataLoader(
        IndexedDataset(train_ds),
        batch_size=images_per_batch(settings.features.imagesize, accelerator, per_image, budget),
        shuffle=False,
        num_workers=settings.data.num_workers,
    )
    if progress is not None:
        progress.add_total(len(loader))
    # the backbone under the run's precision (autocast); the features handed on stay float32
    trainer = build_trainer(
        settings.runtime,
        progress,
        devices=1,
        strategy="auto",
        precision=settings.runtime.precision,
        callbacks=[_TestHookCallback()],
    )
    interruptible(trainer.predict, module, loader, return_predictions=False)
    return bank, module


def bank_on_disk(settings: Settings) -> bool:
    """The bank goes to a file when DDP ranks train the MLP on it (they open it read-only)."""
    return settings.runtime.ddp and settings.stages.train_nb_dist
