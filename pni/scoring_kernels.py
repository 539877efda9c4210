"""Vectorised kernels behind :mod:`pni.scoring`: distance products, masked row minima, rank
counts and k-th smallest values over ``(n, K)`` matrices, and the scratch memory they reuse.

Every kernel works on ``q``, any per-row increasing function of the distance (the distance
itself, or the squared distance less a row constant, as :mod:`pni.scoring` holds it): a mask
only decides which entry's distance a row takes. Pure torch, device-agnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCKED = 1e30  # added to the entries a mask blocks: larger than any distance, finite in float32


def row_chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``chunk_size`` rows covering ``n`` (``None``: one)."""
    step = n if chunk_size is None else max(1, int(chunk_size))
    return [(s, min(s + step, n)) for s in range(0, n, max(step, 1))]


def pairwise_distances(x: Tensor, y: Tensor, chunk_size: int | None = None) -> Tensor:
    """Euclidean distances ``(N, E) x (K, E) -> (N, K)`` via matrix products.

    Rows of ``x`` are processed ``chunk_size`` at a time (``None``: all at once). Both sides
    are first shifted by the mean of ``y``: distances do not change, but the norms in
    ``|x|^2 + |y|^2 - 2 x.y`` shrink from the features' magnitude (~40 for ReLU features)
    to their spread, which keeps float32 results within ~1e-6 instead of ~1e-4.
    """
    centre = y.mean(dim=0)
    x = x - centre
    y = y - centre
    y_sq = (y * y).sum(dim=1)
    out = x.new_empty(x.shape[0], y.shape[0])
    for s, e in row_chunks(x.shape[0], chunk_size):
        xs = x[s:e]
        sq = (xs * xs).sum(dim=1, keepdim=True) + y_sq - 2.0 * (xs @ y.T)
        out[s:e] = sq.clamp_min_(0.0).sqrt_()
    return out


def nearest_ids(x: Tensor, y: Tensor, chunk_size: int | None = None) -> Tensor:
    """Id of the nearest row of ``y`` (K, E) for each row of ``x`` (N, E) -> (N,) long."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s, e in row_chunks(x.shape[0], chunk_size):
        out[s:e] = pairwise_distances(x[s:e], y).argmin(dim=1)
    return out


class Workspace:
    """Scratch tensors reused from chunk to chunk and image to image: on the CPU a fresh
    allocation of tens of MB is page-faulted in again every time, which costs as much as the
    arithmetic done in it. Not for concurrent use."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A contiguous tensor of ``shape`` on ``like``'s device (``dtype``: ``like``'s), its
        contents undefined; the same memory as the previous call with this ``name``."""
        dtype = dtype or like.dtype
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(size, dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:size].view(shape)


def take_rows(q: Tensor, rows: Tensor, workspace: Workspace | None) -> Tensor:
    """``q[rows]``, in scratch memory when there is a workspace."""
    if workspace is None:
        return q.index_select(0, rows)
    return torch.index_select(q, 0, rows, out=workspace.get("rows", (rows.numel(), q.shape[1]), q))


def blocked_indicator(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``1.0`` where ``allowed`` is False, ``0.0`` where True. Masks are applied as
    ``q + BLOCKED * indicator``: on the CPU, float arithmetic runs several times faster than
    ``torch.where`` on a bool mask (whose speed also depends on the mask's density)."""
    return (~allowed).to(dtype)


def masked_min(q: Tensor, blocked: Tensor, workspace: Workspace | None, name: str = "masked") -> Tensor:
    """Row minimum of ``q`` over the entries whose ``blocked`` indicator (:func:`blocked_indicator`)
    is 0 (``inf`` where every entry is blocked)."""
    out = workspace.get(name, tuple(q.shape), q) if workspace is not None else None
    best = torch.add(q, blocked, alpha=BLOCKED, out=out).amin(dim=1)
    return best.masked_fill_(best >= 0.5 * BLOCKED, float("inf"))


def count_below(q: Tensor, bound: Tensor, workspace: Workspace | None, name: str = "below") -> Tensor:
    """Entries of each row of ``q`` ``(n, K)`` below that row's ``bound`` ``(n,)``, as floats
    (exact: below 2^24); comparing into a float buffer and summing it is several times
    faster on the CPU than summing a bool tensor."""
    out = workspace.get(name, tuple(q.shape), q) if workspace is not None else torch.empty_like(q)
    return torch.lt(q, bound[:, None], out=out).sum(dim=1)


def select_position(
    q: Tensor,
    nearest_allowed: Tensor,
    keep: int | None = None,
    row_min: Tensor | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """Per row, the value of ``q`` ``(n, K)`` at the entry a position mask selects, from the
    row minimum over the allowed entries ``nearest_allowed`` ``(n,)`` (``inf`` where none) -> ``(n,)``.

    The selected entry is the nearest allowed one; when ``keep`` is given, only if it is among
    the ``keep`` nearest (the original's position masks, whose loop over ranks loses all but
    the first ``parent_share`` of its writes); otherwise, and when nothing is allowed, the
    farthest entry (the original's fallback: the last sorted column is always allowed).
    ``row_min``: ``q``'s row minimum, if known (a row whose nearest entry is allowed needs no
    rank); ``workspace``: scratch memory for the ``(n, K)`` temporaries.
    """
    n = q.shape[0]
    best = nearest_allowed.clone()
    found = torch.isfinite(best)
    if keep is not None and keep < q.shape[1]:
        ranked = found if row_min is None else found & (best > row_min)
        rows = torch.nonzero(ranked).squeeze(1)
        if rows.numel() > n // 4:  # counting every row is cheaper than copying most of them
            found &= count_below(q, best, workspace) < keep
        elif rows.numel():
            found[rows] = count_below(take_rows(q, rows, workspace), best[rows], workspace) < keep
    if not bool(found.all()):
        rows = torch.nonzero(~found).squeeze(1)
        best = best.index_put((rows,), take_rows(q, rows, workspace).amax(dim=1))
    return best


class PositionMask:
    """The entries a position prior allows at each grid position (``prior > gamma / K``), kept
    as padded lists of entry ids when they are few (so that the nearest allowed entry is a
    gather of those columns rather than a pass over all ``K``), else as a ``(P, K)`` blocked
    indicator of ``dtype`` (:func:`blocked_indicator`)."""

    def __init__(self, allowed: Tensor, dtype: torch.dtype = torch.float32) -> None:
        counts = allowed.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        self.dense: Tensor | None = None  # blocked indicator (P, K)
        if width == 0 or 4 * width > allowed.shape[1]:
            self.dense = blocked_indicator(allowed, dtype)
            return
        rows, cols = torch.nonzero(allowed, as_tuple=True)  # row-major: each row's ids in order
        start = torch.cumsum(counts, dim=0) - counts
        slot = torch.arange(rows.numel(), device=allowed.device) - start[rows]
        ids = torch.zeros(allowed.shape[0], width, dtype=torch.long, device=allowed.device)
        ids[rows, slot] = cols
        # pad with each row's first allowed id (a repeat does not change the minimum)
        pad = torch.arange(width, device=allowed.device)[None, :] >= counts[:, None]
        self.ids = torch.where(pad, ids[:, :1], ids)
        self.empty = counts == 0

    def nearest_allowed(self, q: Tensor, start: int, stop: int, workspace: Workspace | None = None) -> Tensor:
        """Row minimum of ``q`` ``(n, K)`` over the entries allowed at positions
        ``start..stop-1`` (``inf`` where none is)."""
        if self.dense is not None:
            return masked_min(q, self.dense[start:stop], workspace)
        ids = self.ids[start:stop]
        picked = (
            q.gather(1, ids)
            if workspace is None
            else torch.gather(q, 1, ids, out=workspace.get("picked", tuple(ids.shape), q))
        )
        return picked.amin(dim=1).masked_fill_(self.empty[start:stop], float("inf"))


@dataclass(frozen=True)
class RankColumns:
    """The original neighbourhood mask as a function of distribution ranks.

    Its column ``k`` (the k-th nearest embedding entry) is allowed where the ``m(k)``-th
    nearest distribution entry is, and only ranks ``m(k) < R`` are ever written (``R``: the
    parent's share of the loop over distribution ids), so the first allowed column of a row
    is the smallest ``first[r]`` over its allowed ranks ``r``, with ``first[r] = min{k : m(k) = r}``,
    or the last column ``K1 - 1`` (always allowed) when there is none. ``first``: (R,) long,
    ``K1 - 1`` where no column maps to ``r``.

    ``increasing``: every rank below ``R`` has a column and ``first`` increases with the rank
    (as when the distribution coreset is a prefix of the embedding coreset, which gives
    ``m(k) = k`` for ``k < D``); then the first allowed column is ``first`` at the rank of the
    nearest allowed distribution entry, and nothing needs sorting.
    """

    first: Tensor
    increasing: bool

    @classmethod
    def build(cls, embedding_to_distribution: Tensor, ranks: int) -> RankColumns:
        """From ``m`` (K1,) long and the number ``R`` of written ranks."""
        m = embedding_to_distribution
        k1 = m.shape[0]
        written = m < ranks
        first = torch.full((ranks,), k1 - 1, dtype=torch.long, device=m.device)
        first.scatter_reduce_(0, m[written], torch.arange(k1, device=m.device)[written], reduce="amin")
        has_column = torch.zeros(ranks, dtype=torch.bool, device=m.device)
        has_column[m[written]] = True
        increasing = bool(has_column.all()) and bool((first[1:] >= first[:-1]).all())
        return cls(first, increasing)

    def first_allowed(
        self, q_dist: Tensor, blocked_dist: Tensor, last_column: int, workspace: Workspace | None = None
    ) -> Tensor:
        """First allowed sorted column of each row, ``(n,)`` long: from ``q_dist`` ``(n, D)``,
        an increasing function of the distances to the distribution entries, the blocked
        indicator of the distribution entries ``blocked_dist`` ``(n, D)``
        (:func:`blocked_indicator`) and the last column ``K1 - 1``."""
        ranks = self.first.shape[0]
        last = self.first.new_tensor(last_column)
        if self.increasing:
            nearest = masked_min(q_dist, blocked_dist, workspace, "masked_dist")
            rank = count_below(q_dist, nearest, workspace, "below_dist").long()  # of the nearest allowed entry
            found = torch.isfinite(nearest) & (rank < ranks)
            return torch.where(found, self.first[rank.clamp_max(ranks - 1)], last)
        if ranks < q_dist.shape[1]:
            order = q_dist.topk(ranks, dim=1, largest=False, sorted=True).indices
        else:
            order = q_dist.argsort(dim=1)
        by_rank = blocked_dist.gather(1, order) == 0  # (n, R): is the r-th nearest entry allowed
        return torch.where(by_rank, self.first[None, :], last).amin(dim=1)


def kth_smallest(q: Tensor, k: Tensor, row_min: Tensor | None = None, workspace: Workspace | None = None) -> Tensor:
    """The ``k[i]``-th smallest value (0-based) of each row of ``q``: ``(n, K), (n,) -> (n,)``.

    Rows are grouped by ``k``: the smallest (``row_min``, if known) and the largest by one
    reduction each, the others by partial sorts of the few nearest entries (16, 128, 1024, ...
    at a time), so rows that need a small ``k`` never pay for those that need a large one.
    """
    n, width = q.shape
    out = q.amin(dim=1) if row_min is None else row_min.clone()
    last = k == width - 1
    if width > 1 and bool(last.any()):
        rows = torch.nonzero(last).squeeze(1)
        out[rows] = take_rows(q, rows, workspace).amax(dim=1)
    pending = (k > 0) & ~last
    bound = 16
    while bool(pending.any()):
        bound = min(bound, width)
        rows = torch.nonzero(pending & (k < bound)).squeeze(1)
        if rows.numel():
            nearest = take_rows(q, rows, workspace).topk(bound, dim=1, largest=False, sorted=True).values
            out[rows] = nearest.gather(1, k[rows, None])[:, 0]
        pending &= k >= bound
        bound *= 8
    return out
