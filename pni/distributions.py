"""The two learned priors over the coreset (docs/METHOD.md, section 4).

- Neighbourhood: an MLP that reads the features of the window around a position and
  predicts which distribution-coreset entry the centre feature is nearest to. The window
  leaves out one of its ``(2dp+1)^2`` slots: the centre (``paper`` layout, as the paper
  describes) or, as the published code does (``original`` layout), the slot after it, i.e.
  the right-hand neighbour, keeping the centre itself.
- Position: for each grid position, the normalised histogram of nearest embedding-coreset
  ids over the training images, spread over a ``(2*dp+1)^2`` window.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pni.errors import PNIError
from pni.io import atomic_path, load_weights_only
from pni.precision import active_autocast_dtype
from pni.scoring import VARIANTS

HIDDEN_WIDTH = 2048


WINDOW_LAYOUTS = VARIANTS  # the MLP window layout is named after its scoring variant


def window_count(dist_padding: int) -> int:
    """Features in the MLP's input window: the ``(2dp+1)^2`` slots less the dropped one."""
    return (2 * dist_padding + 1) ** 2 - 1


def dropped_slot(dist_padding: int, layout: str = "original") -> int:
    """Row-major slot of the ``(2dp+1)^2`` window that the MLP input leaves out: the centre
    ``((2dp+1)^2 - 1) / 2`` (``paper``) or ``((2dp+1)^2 + 1) // 2``, the right-hand neighbour
    ``(0, +1)`` (``original``: the published code's off-by-one, in training and at test time)."""
    n = window_count(dist_padding) + 1
    if layout == "paper":
        return (n - 1) // 2
    if layout == "original":
        return (n + 1) // 2
    raise PNIError(f"--variant must be one of {WINDOW_LAYOUTS}, got {layout!r}")


def window_offsets(dist_padding: int, layout: str = "original") -> torch.Tensor:
    """Row-major ``(dr, dc)`` offsets of the ``(2dp+1)^2`` window without its
    :func:`dropped_slot`: ``((2dp+1)^2 - 1, 2)`` long."""
    r = torch.arange(-dist_padding, dist_padding + 1)
    grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)
    keep = torch.ones(len(grid), dtype=torch.bool)
    keep[dropped_slot(dist_padding, layout)] = False
    return grid[keep]


def gather_windows(
    grids: np.ndarray | torch.Tensor,
    image_ids: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    dist_padding: int,
    layout: str = "original",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Neighbourhood inputs for a batch of positions.

    grids ``(N_img, R, C, E)`` (array, memory map or tensor); image_ids, rows, cols ``(B,)``
    -> ``(B, ((2dp+1)^2 - 1) * E)``: the features of the window around each position in
    row-major order without the ``layout``'s :func:`dropped_slot`, each position's ``E``
    values contiguous, zeros outside the grid.

    ``dtype`` of the windows: default float32, or the autocast dtype while autocast is on for
    the grids' device (the MLP's first layer would cast float32 windows to it; building them
    in it skips a float32 copy of every window).
    """
    n_img, n_rows, n_cols, dim = grids.shape
    device = grids.device if isinstance(grids, torch.Tensor) else torch.device("cpu")
    if dtype is None:
        dtype = active_autocast_dtype(device.type) or torch.float32
    offsets = window_offsets(dist_padding, layout).to(rows.device)
    rr = rows[:, None] + offsets[None, :, 0]
    cc = cols[:, None] + offsets[None, :, 1]
    valid = (rr >= 0) & (rr < n_rows) & (cc >= 0) & (cc < n_cols)
    rr_c = rr.clamp(0, n_rows - 1)
    cc_c = cc.clamp(0, n_cols - 1)
    ii = image_ids[:, None].expand_as(rr)
    if isinstance(grids, torch.Tensor):
        flat_ids = ((ii * n_rows + rr_c) * n_cols + cc_c).reshape(-1).to(device)
        source = grids.reshape(-1, dim)
        if source.dtype != dtype and len(source) <= len(flat_ids):
            source = source.to(dtype)  # each feature converted once, not once per window it is in
        feats = source.index_select(0, flat_ids).to(dtype).view(*rr.shape, dim)  # a fresh tensor
    elif dtype == torch.float32:  # memory map or array, float32 or float16: one fresh float32 copy
        feats = torch.from_numpy(np.asarray(grids[ii.numpy(), rr_c.numpy(), cc_c.numpy()], dtype=np.float32))
    else:  # a dtype numpy lacks (bfloat16): a few windows at a time through float32
        feats = torch.empty(*rr.shape, dim, dtype=dtype)
        step = max(1, 2**20 // (rr.shape[1] * dim))  # ~4 MiB of float32 at a time
        ii_n, rr_n, cc_n = ii.numpy(), rr_c.numpy(), cc_c.numpy()
        for s in range(0, len(rows), step):
            piece = np.asarray(grids[ii_n[s : s + step], rr_n[s : s + step], cc_n[s : s + step]], dtype=np.float32)
            feats[s : s + step].copy_(torch.from_numpy(piece))
    outside = (~valid).to(feats.device).nonzero(as_tuple=True)
    feats[outside] = 0  # zeros outside the grid (index lists: only those slots are written)
    return feats.reshape(len(rows), -1)


def grid_windows(
    grid: torch.Tensor,
    positions: torch.Tensor,
    dist_padding: int,
    layout: str = "original",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Windows of one image's grid ``(R, C, E)`` at flat ``positions`` ``(B,)`` ->
    ``(B, ((2dp+1)^2 - 1) * E)``; ``dtype`` as in :func:`gather_windows`."""
    n_cols = grid.shape[1]
    zeros = torch.zeros_like(positions)
    return gather_windows(grid[None], zeros, positions // n_cols, positions % n_cols, dist_padding, layout, dtype)


def _bf16_cpu_training(module: nn.Module, x: torch.Tensor) -> bool:
    """Training under bfloat16 autocast on a CPU, with autograd recording."""
    return (
        module.training
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and active_autocast_dtype("cpu") == torch.bfloat16
    )


class _Bf16LinearFunction(torch.autograd.Function):
    """``x @ W^T + b`` in bfloat16 whose backward gives oneDNN contiguous operands: the
    weight gradient as ``grad^T.contiguous() @ x`` (autograd's own ``x^T @ grad`` hands it
    transposed views, which ran at half the rate on AMX), returned in float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            x16 = x.to(torch.bfloat16)
            w16 = weight.to(torch.bfloat16)
            out = x16 @ w16.t() if bias is None else torch.addmm(bias.to(torch.bfloat16), x16, w16.t())
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad = grad.to(torch.bfloat16)
        grad_x = grad_w = grad_b = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ w16).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (grad.t().contiguous() @ x16).to(w_dtype)
            if ctx.needs_input_grad[2]:
                grad_b = grad.sum(0, dtype=torch.float32).to(b_dtype)
        return grad_x, grad_w, grad_b


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T + bias`` in bfloat16 (as autocast's linear), with the faster backward of
    :class:`_Bf16LinearFunction`: ``(B, in)`` -> ``(B, out)`` bfloat16."""
    return _Bf16LinearFunction.apply(x, weight, bias)


_KEEP_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _keep_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(65536, 16)``: row ``v`` holds 2 where bit ``j`` of ``v`` is set, else 0 (2 MiB in bf16)."""
    key = (dtype, device)
    if key not in _KEEP_TABLES:
        values = torch.arange(65536, device=device)[:, None] >> torch.arange(16, device=device)
        _KEEP_TABLES[key] = ((values & 1) * 2).to(dtype)
    return _KEEP_TABLES[key]


def bit_dropout(x: torch.Tensor) -> torch.Tensor:
    """Dropout with ``p = 1/2`` (training): each element kept with probability 1/2 and doubled.
    The mask comes from random bits, 16 elements per 16-bit draw of the global generator,
    expanded by a lookup table; torch's CPU ``bernoulli_`` cost more than a hidden layer's bf16
    matrix product."""
    n = x.numel()
    draws = torch.empty((n + 15) // 16, dtype=torch.long, device=x.device).random_(0, 65536)
    keep = _keep_table(x.dtype, x.device).index_select(0, draws).reshape(-1)[:n].view(x.shape)
    return x * keep


class NeighbourhoodMLP(nn.Module):
    """Neighbourhood prior: window features -> logits over the distribution coreset.

    ``num_layers`` linear layers: hidden ones are Linear -> BatchNorm1d -> ReLU -> Dropout,
    the last maps to ``num_classes`` logits. Parameter names follow the original
    (``first_layer``, ``hidden_layers.<i>``, ``last_layer``) so its checkpoints load.
    forward: ``(B, in_features)`` -> ``(B, num_classes)``. Trained under bfloat16 autocast on
    a CPU, the same layers run through :func:`bf16_linear` and (``dropout`` 1/2)
    :func:`bit_dropout`, the faster forms of what autocast runs; anywhere else (float32,
    GPUs, inference) the modules' own forward.
    """

    def __init__(
        self, in_features: int, num_classes: int, num_layers: int = 10, hidden: int = HIDDEN_WIDTH, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise PNIError(f"--num_layers must be at least 2, got {num_layers}")

        def block(n_in: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout))

        self.first_layer = block(in_features)
        self.hidden_layers = nn.ModuleList([block(hidden) for _ in range(num_layers - 2)])
        self.last_layer = nn.Sequential(nn.Linear(hidden, num_classes))

    @property
    def in_features(self) -> int:
        return cast(nn.Linear, self.first_layer[0]).in_features

    @property
    def hidden_features(self) -> int:
        return cast(nn.Linear, self.first_layer[0]).out_features

    @property
    def num_classes(self) -> int:
        return cast(nn.Linear, self.last_layer[0]).out_features

    @property
    def num_layers(self) -> int:
        return len(self.hidden_layers) + 2

    def fits(self, dist_padding: int, feature_dim: int, num_classes: int) -> bool:
        """True when the MLP reads the windows of half-width ``dist_padding`` over
        ``feature_dim``-dim features and predicts ``num_classes`` distribution entries."""
        return self.in_features == window_count(dist_padding) * feature_dim and self.num_classes == num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _bf16_cpu_training(self, x):
            return self._forward_bf16_cpu(x)
        cast_to = None if self.training or torch.is_grad_enabled() else active_autocast_dtype(x.device.type)
        if cast_to is not None:
            return self._forward_cast_weights(x, cast_to)
        x = self.first_layer(x)
        for layer in self.hidden_layers:
            x = layer(x)
        return self.last_layer(x)

    def train(self, mode: bool = True) -> NeighbourhoodMLP:
        if mode:  # weights cast for inference would go stale while training: free them
            self.__dict__.pop("_cast_cache", None)
        return super().train(mode)

    def _forward_cast_weights(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Inference under autocast: the same operations as autocast's, with the linear layers'
        weights cast to ``dtype`` once and kept (until a weight changes) instead of at every call."""
        for block in (self.first_layer, *self.hidden_layers):
            x = F.linear(x.to(dtype), *self._cast_weights(cast(nn.Linear, block[0]), dtype))
            for layer in list(block)[1:]:
                x = layer(x)
        return F.linear(x.to(dtype), *self._cast_weights(cast(nn.Linear, self.last_layer[0]), dtype))

    def _cast_weights(self, linear: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = (linear.weight, linear.bias)
        key = (dtype, tuple((p.data_ptr(), p._version) for p in params if p is not None))
        cache = self.__dict__.setdefault("_cast_cache", {})
        if id(linear) not in cache or cache[id(linear)][0] != key:
            cache[id(linear)] = (key, tuple(None if p is None else p.detach().to(dtype) for p in params))
        weight, bias = cache[id(linear)][1]
        return weight, bias

    def _forward_bf16_cpu(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.first_layer, *self.hidden_layers):
            linear, norm, relu, dropout = cast(nn.Linear, block[0]), block[1], block[2], cast(nn.Dropout, block[3])
            x = relu(norm(bf16_linear(x, linear.weight, linear.bias)))
            x = bit_dropout(x) if dropout.p == 0.5 else dropout(x)
        last = cast(nn.Linear, self.last_layer[0])
        return bf16_linear(x, last.weight, last.bias)


def mlp_file_name(dist_padding: int, dist_coreset_size: int, num_layers: int) -> str:
    return f"best_model_dp{dist_padding}_dcs{dist_coreset_size}_n{num_layers}.pt"


def save_mlp_checkpoint(
    path: str | os.PathLike, model: nn.Module, settings: dict[str, Any], train_loss: float, val_loss: float
) -> None:
    """Save ``{'model': state_dict, 'settings': dict, 'train_loss', 'val_loss'}`` atomically;
    loadable with ``torch.load(weights_only=True)``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": state, "settings": dict(settings), "train_loss": float(train_loss), "val_loss": float(val_loss)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_mlp_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load an MLP checkpoint (ours or the original's) without unpickling code.

    The original stores an ``argparse.Namespace`` under ``args``; it is allow-listed and
    turned into a plain dict under ``settings``.
    """
    path = Path(path)
    if not path.is_file():
        raise PNIError(f"missing neighbourhood model {path} (run with --train_nb_dist to make it)")
    payload = load_weights_only(path, "neighbourhood model", safe_globals=[argparse.Namespace])
    if not isinstance(payload, dict) or "model" not in payload:
        raise PNIError(f"{path} is not a neighbourhood model checkpoint (no 'model' entry)")
    settings = payload.get("settings")
    if settings is None and "args" in payload:
        settings = vars(payload["args"]) if isinstance(payload["args"], argparse.Namespace) else dict(payload["args"])
    payload["settings"] = settings or {}
    return payload


def checkpoint_layout(saved: dict[str, Any], original_format: bool) -> str:
    """Window layout of a neighbourhood model from its recorded settings: its ``variant``;
    without one, ``original`` for a checkpoint of the original code, and ``paper`` for one
    of ours from before the layout was recorded (those dropped the centre)."""
    recorded = saved.get("variant")
    if recorded is not None:
        return str(recorded)
    return "original" if original_format else "paper"


def mlp_from_state_dict(state: dict[str, torch.Tensor]) -> NeighbourhoodMLP:
    """Rebuild a :class:`NeighbourhoodMLP` whose sizes are read off ``state``."""
    try:
        in_features = state["first_layer.0.weight"].shape[1]
        hidden = state["first_layer.0.weight"].shape[0]
        num_classes = state["last_layer.0.weight"].shape[0]
    except KeyError as exc:
        raise PNIError(f"neighbourhood model state dict lacks {exc}") from None
    n_hidden = len({k.split(".")[1] for k in state if k.startswith("hidden_layers.")})
    model = NeighbourhoodMLP(in_features, num_classes, num_layers=n_hidden + 2, hidden=hidden)
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------- position prior


def position_prior_counts(
    nearest: torch.Tensor,
    grid_shape: tuple[int, int],
    coreset_size: int,
    dist_padding: int,
    positions: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Accumulate the position histogram.

    nearest ``(N_img, Q)``: nearest coreset id of each image at the ``Q`` flat grid
    ``positions`` (default: all ``R*C``). For a position ``(r, c)`` labelled ``k``, one is
    added to ``counts[(r', c'), k]`` for every ``(r', c')`` within ``dist_padding`` of it
    (clipped to the grid). Returns ``counts`` ``(R*C, coreset_size)`` float32.
    """
    n_rows, n_cols = grid_shape
    if positions is None:
        positions = torch.arange(n_rows * n_cols)
    if counts is None:
        counts = torch.zeros(n_rows * n_cols, coreset_size, dtype=torch.float32)
    rows = (positions // n_cols)[None, :].expand_as(nearest)
    cols = (positions % n_cols)[None, :].expand_as(nearest)
    r = torch.arange(-dist_padding, dist_padding + 1)
    labels = nearest.reshape(-1)
    ones = torch.ones(labels.shape[0], dtype=counts.dtype)
    for dr in r.tolist():
        for dc in r.tolist():  # (2dp+1)^2 vectorised passes, each over all images at once
            rr = rows.reshape(-1) + dr
            cc = cols.reshape(-1) + dc
            ok = (rr >= 0) & (rr < n_rows) & (cc >= 0) & (cc < n_cols)
            target = rr[ok] * n_cols + cc[ok]
            counts.index_put_((target, labels[ok]), ones[ok], accumulate=True)
    return counts


def normalise_rows(counts: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum; all-zero rows stay zero."""
    total = counts.sum(dim=1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1e-12), torch.zeros_like(counts))


def position_prior_file_name(subsampling_percentage: float, with_edge: bool) -> str:
    base = f"coor_model_sp{int(subsampling_percentage * 100)}"
    return base + ("_with_edge.npy" if with_edge else ".npy")
