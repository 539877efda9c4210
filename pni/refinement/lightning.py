"""Thin Lightning glue for training the refinement model (loss and model live elsewhere)."""

from __future__ import annotations

import os
from collections.abc import Sized

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pni.console import Progress, trainer_progress
from pni.lightning import interruptible

from .model import RefinementNet
from .train import Devices, refinement_loss, save_state_dict


class RefinementModule(pl.LightningModule):
    """Adam(``learning_rate``) on ``refinement_loss``; batches as the refinement datasets give them."""

    def __init__(self, model: RefinementNet, learning_rate: float = 1e-4) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate

    def forward(self, image: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        return self.model(image, amap)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = refinement_loss(self.model(batch["image"], batch["amap"]), batch["mask"])
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)


class SaveStateDict(pl.Callback):
    """After each training epoch, write the model's plain state dict atomically (rank zero only)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, RefinementModule):
            raise TypeError(f"SaveStateDict needs a RefinementModule, got {type(pl_module).__name__}")
        if trainer.is_global_zero:
            save_state_dict(pl_module.model, self.path)


def fit_refinement(
    model: RefinementNet,
    dataset: Dataset,
    checkpoint_path: str | os.PathLike,
    num_epochs: int = 1,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    accelerator: str = "auto",
    devices: Devices = "auto",
    num_workers: int = 0,
    progress: Progress | None = None,
) -> RefinementNet:
    """Train ``model`` on ``dataset`` with Lightning; the checkpoint is rewritten every epoch.
    ``progress`` counts training batches (None: no bar; see :mod:`pni.console`)."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"fit_refinement needs a dataset with a length, got {type(dataset).__name__}")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=len(dataset) > batch_size,
        persistent_workers=False,
    )
    module = RefinementModule(model, learning_rate)
    shown = trainer_progress(progress or None)
    callbacks = [SaveStateDict(checkpoint_path)] + shown.pop("callbacks", [])
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        max_epochs=num_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(loader))),
        callbacks=callbacks,
        **shown,
    )
    interruptible(trainer.fit, module, loader)
    return module.model
