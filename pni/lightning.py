"""LightningModules: thin glue that runs the compute modules on the Lightning device,
with Lightning's devices and (for the MLP and test scoring) strategies; what they print is
chosen by the caller (see :mod:`pni.console`).
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pni.coreset import greedy_coreset
from pni.distributions import NeighbourhoodMLP, gather_windows
from pni.features import PatchFeatureExtractor
from pni.memory import available_bytes, release_pages, trim_heap
from pni.model import PNIModel
from pni.precision import DEFAULT_PRECISION, adam_options


def interruptible(trainer_call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``trainer.fit`` / ``.predict`` / ``.test`` (``trainer_call``) so that Ctrl-C stays a
    ``KeyboardInterrupt``: Lightning catches it, cleans up and calls ``sys.exit(1)``, which
    would hide the interruption from the caller (and exit 1 without a message)."""
    trainer = trainer_call.__self__  # type: ignore[attr-defined]  # a bound Trainer method
    try:
        return trainer_call(*args, **kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        with contextlib.suppress(ValueError):  # (not in the main thread)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignored further Ctrl-C
        raise KeyboardInterrupt from None


class IndexedDataset(Dataset):
    """Adds the item's position in the dataset as ``index``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]  # map-style datasets are sized

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["index"] = i
        return item


# ---------------------------------------------------------------- stage 1: feature bank + coreset


class FeatureBankModule(pl.LightningModule):
    """Fills a preallocated feature bank ``(N_img, R, C, E)`` (array or memory map) by
    running the patch feature extractor over a dataset (``trainer.predict``)."""

    def __init__(self, extractor: PatchFeatureExtractor, bank: np.ndarray) -> None:
        super().__init__()
        self.extractor = extractor
        self.bank = bank

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        feats = self.extractor(batch["image"])
        self.bank[batch["index"].cpu().numpy()] = feats.to(torch.float32).cpu().numpy().astype(self.bank.dtype)
        release_pages(self.bank)  # a memory-mapped bank stays in the page cache, not in this process
        return None


class CoresetModule(FeatureBankModule):
    """Feature bank plus greedy k-center selection on the Lightning device, run at the end
    of ``trainer.predict``. After it, ``selections`` holds ``{'with_edge': LongTensor,
    'without_edge': LongTensor}`` of flat indices (see :meth:`flat_rows`)."""

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        bank: np.ndarray,
        pad: int,
        n_select: dict[str, int],
        seed: int,
        track: Callable[[Iterable[int]], Iterable[int]] | None = None,
    ) -> None:
        super().__init__(extractor, bank)
        self.pad = pad
        self.n_select = n_select
        self.seed = seed
        self.track = track  # wraps the greedy steps of each selection (e.g. pni.console.Progress.track)
        self.selections: dict[str, torch.Tensor] = {}

    def flat_rows(self, variant: str) -> Callable[[], Any]:
        """A factory of per-image chunks ``(n_i, E)`` of the bank for one variant."""
        bank, pad = self.bank, self.pad

        def chunks():
            for i in range(bank.shape[0]):
                grid = (
                    bank[i] if variant == "with_edge" else bank[i, pad : bank.shape[1] - pad, pad : bank.shape[2] - pad]
                )
                yield np.asarray(grid, dtype=np.float32).reshape(-1, bank.shape[-1])
                if i % 16 == 15:
                    release_pages(bank)  # streaming a memory map must not make it all resident
            release_pages(bank)

        return chunks

    def on_predict_epoch_end(self) -> None:
        trim_heap()  # the extraction temporaries, before the projected bank is allocated

        n_img, n_rows, n_cols, dim = self.bank.shape
        sizes = {
            "with_edge": n_img * n_rows * n_cols,
            "without_edge": n_img * (n_rows - 2 * self.pad) * (n_cols - 2 * self.pad),
        }
        for variant, n_select in self.n_select.items():
            self.selections[variant] = greedy_coreset(
                self.flat_rows(variant), sizes[variant], dim, n_select, self.seed, self.device, self.track
            )


# ---------------------------------------------------------------- stage 2: neighbourhood MLP


class WindowCollate:
    """Builds a batch of (window features, label) from flat sample ids, reading the stored
    feature grids directly (windows are never materialised for the whole set).

    ``dtype``: of the windows (``pni.precision.compute_dtype``). For bfloat16 the bank is
    converted once, image by image, into a tensor of that dtype held here when it fits
    ``bank_fraction`` of the available memory (half a float32 bank's size); a window batch is
    then one copy of rows. Otherwise every batch is converted from the stored grids.
    """

    def __init__(
        self,
        bank: np.ndarray,
        labels: np.ndarray,
        pad: int,
        dist_padding: int,
        layout: str,
        dtype: torch.dtype = torch.float32,
        bank_fraction: float = 0.25,
    ) -> None:
        self.bank: np.ndarray | torch.Tensor = bank
        self.labels = torch.as_tensor(labels, dtype=torch.long)  # (N_img, P_int)
        self.pad = pad
        self.dist_padding = dist_padding
        self.layout = layout  # window layout (pni.distributions.dropped_slot)
        self.dtype = dtype
        self.cols_int = bank.shape[2] - 2 * pad
        itemsize = torch.empty((), dtype=dtype).element_size()
        if dtype not in (torch.float32, torch.float64) and bank.size * itemsize <= bank_fraction * available_bytes():
            self.bank = bank_as(bank, dtype)

    def __call__(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.as_tensor(ids, dtype=torch.long)
        p_int = self.labels.shape[1]
        img, pos = flat // p_int, flat % p_int
        rows = pos // self.cols_int + self.pad
        cols = pos % self.cols_int + self.pad
        x = gather_windows(self.bank, img, rows, cols, self.dist_padding, self.layout, self.dtype)
        return x, self.labels[img, pos]


def bank_as(bank: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A copy of the bank ``(N_img, R, C, E)`` as a tensor of ``dtype``, converted image by
    image (a memory-mapped bank is streamed, its pages released as it goes)."""
    out = torch.empty(bank.shape, dtype=dtype)
    for i in range(bank.shape[0]):
        out[i].copy_(torch.from_numpy(np.array(bank[i])))  # np.array: a copy (the map may be read-only)
        if i % 16 == 15:
            release_pages(bank)
    release_pages(bank)
    return out


class NeighbourhoodModule(pl.LightningModule):
    """Trains :class:`NeighbourhoodMLP` with cross-entropy, Adam and StepLR; calls
    ``on_best(model, train_loss, val_loss)`` whenever the validation loss improves. Adam's
    implementation follows the Trainer's precision (``pni.precision.adam_options``)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_layers: int,
        learning_rate: float,
        step_size: int,
        on_best: Callable[[torch.nn.Module, float, float], None] | None = None,
    ) -> None:
        super().__init__()
        self.model = NeighbourhoodMLP(in_features, num_classes, num_layers)
        self.learning_rate = learning_rate
        self.step_size = step_size
        self.on_best = on_best
        self.best_val = math.inf
        self._sums = {"train": [0.0, 0], "val": [0.0, 0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        if not torch.is_autocast_enabled(x.device.type):  # windows built for another precision
            x = x.to(next(self.model.parameters()).dtype)
        loss = F.cross_entropy(self.model(x), y)
        self.log(
            f"{split}_loss",
            loss,
            prog_bar=True,
            on_step=split == "train",
            on_epoch=True,
            batch_size=len(y),
            sync_dist=split == "val",
        )
        self._sums[split][0] += float(loss.detach()) * len(y)
        self._sums[split][1] += len(y)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        self._sums["train"] = [0.0, 0]

    def on_validation_epoch_start(self) -> None:
        self._sums["val"] = [0.0, 0]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        logged = self.trainer.callback_metrics.get("val_loss")
        val = float(logged) if logged is not None else self._sums["val"][0] / max(self._sums["val"][1], 1)
        s, n = self._sums["train"]
        train = s / n if n else float("nan")
        if val < self.best_val:
            self.best_val = val
            if self.on_best is not None and self.trainer.is_global_zero:
                self.on_best(self.model, train, val)

    def precision(self) -> str:
        """The Trainer's precision (``32-true`` outside a Trainer)."""
        try:
            return str(self.trainer.precision)
        except RuntimeError:  # not attached to a Trainer
            return DEFAULT_PRECISION

    def configure_optimizers(self):
        options = adam_options(self.precision(), self.device.type)
        opt = torch.optim.Adam(self.model.parameters(), lr=self.learning_rate, **options)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_size, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def split_train_val(n_samples: int, seed: int, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train/validation split of ``range(n_samples)`` (seeded)."""
    perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n_samples * val_fraction)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def window_loader(
    ids: torch.Tensor, collate: WindowCollate, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0
) -> DataLoader:
    return DataLoader(
        ids.tolist(),  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


# ---------------------------------------------------------------- stage 4 and prediction: scoring


class ScoringModule(pl.LightningModule):
    """Scores batches with a :class:`pni.model.PNIModel` (``trainer.test`` in the test stage,
    ``trainer.predict`` for new images) and hands each image's result to
    ``sink(item_meta, result)``; returns nothing per step, so memory stays flat.

    A batch may carry ``error`` (one message per item, empty for readable images): those
    items are not scored and reach the sink with ``result=None``.
    """

    def __init__(self, model: PNIModel, sink: Callable[[dict, Any], None]) -> None:
        super().__init__()
        self.model = model
        self.sink = sink

    @torch.no_grad()
    def _score(self, batch: dict) -> None:
        errors = batch.get("error") or [""] * len(batch["image"])
        ok = [i for i, e in enumerate(errors) if not e]
        images = batch["image"] if len(ok) == len(errors) else batch["image"][ok]
        results = dict(zip(ok, self.model.score(images)))
        for b in range(len(errors)):
            meta = {k: (v[b] if isinstance(v, (list, tuple, torch.Tensor)) else v) for k, v in batch.items()}
            self.sink(meta, results.get(b))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._score(batch)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score(batch)
