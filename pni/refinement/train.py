"""Refinement loss, one plain training step, checkpoint writing and device selection.

No Lightning here; ``pni.refinement.lightning`` wraps these for multi-device training.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from pni.cli import Devices
from pni.errors import PNIError
from pni.io import atomic_path


def refinement_loss(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5*MSE + 0.25*MSE(horizontal diffs) + 0.25*MSE(vertical diffs); out, mask (B,1,H,W)."""
    mse = F.mse_loss(out, mask)
    dx = F.mse_loss(out[..., :, 1:] - out[..., :, :-1], mask[..., :, 1:] - mask[..., :, :-1])
    dy = F.mse_loss(out[..., 1:, :] - out[..., :-1, :], mask[..., 1:, :] - mask[..., :-1, :])
    return 0.5 * mse + 0.25 * dx + 0.25 * dy


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """One optimisation step on ``batch`` (image (B,3,H,W), amap/mask (B,1,H,W)); returns the loss."""
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(batch["image"].to(device), batch["amap"].to(device))
    loss = refinement_loss(out, batch["mask"].to(device))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s plain state dict (CPU tensors) atomically; loadable with weights_only=True."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def select_device(accelerator: str = "auto", devices: Devices = "auto") -> torch.device:
    """One torch device for inference: ``auto`` = CUDA when available, else CPU.

    With CUDA and a device list, the first listed index is used.
    """
    acc = accelerator.lower()
    if acc == "auto":
        acc = "cuda" if torch.cuda.is_available() else "cpu"
    if acc in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise PNIError(f"--accelerator {accelerator}: no CUDA device is available (use cpu or auto)")
        index = devices[0] if isinstance(devices, (list, tuple)) and devices else 0
        return torch.device(f"cuda:{index}")
    if acc == "cpu":
        return torch.device("cpu")
    if acc == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    raise PNIError(f"--accelerator {accelerator}: expected auto, cpu, gpu/cuda or mps (if available)")
