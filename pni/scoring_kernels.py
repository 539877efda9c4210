"""Vectorised kernels behind :mod:`pni.scoring`: distance products and their exact
decisions, masks, rank columns, scratch memory, and the resize-and-blur operators.

A chunk of rows against a coreset is held as ``q`` ``(n, K)``, the squared distance less a
row constant, from one float32 matrix product; :class:`ChunkDistances` turns it into exact
answers (the nearest entry, the nearest allowed one, an entry's rank, the k-th nearest, the
farthest, the whole order): comparisons ``q`` decides within its error bound are taken from
``q``, the others and every returned distance come from float64 direct differences.
Pure torch, device-agnostic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from pni.errors import PNIError

BLOCKED = 1e30  # added to the entries a mask blocks: larger than any distance, finite in float32
# a band of more pairs per row than this is ordered through a float64 product (ChunkDistances._ordering_values)
DIRECT_PAIRS_PER_ROW = 128
PRODUCT_ROWS = 256  # rows per float64 product there
MIN_BLOCK = 64  # columns per block of smallest_two
COUNT_ROWS = 512  # rows per block of the counts (count_below, count_at_most)


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
    """Id of the nearest row of ``y`` (K, E) for each row of ``x`` (N, E) -> (N,) long, by
    exact distances (ties: the lower id)."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s, e in row_chunks(x.shape[0], chunk_size):
        out[s:e] = ChunkDistances.between(x[s:e], y).nearest()[0]
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


def masked(q: Tensor, blocked: Tensor, workspace: Workspace | None, name: str) -> Tensor:
    """``q + BLOCKED * blocked`` (:func:`blocked_indicator`), in scratch memory ``name``."""
    out = workspace.get(name, tuple(q.shape), q) if workspace is not None else None
    return torch.add(q, blocked, alpha=BLOCKED, out=out)


def _count(compare: Callable[..., Tensor], q: Tensor, bound: Tensor, workspace: Workspace | None, name: str) -> Tensor:
    """``compare(q, bound[:, None])`` counted per row, as floats (exact: below 2^24), a block
    of :data:`COUNT_ROWS` rows at a time: comparing into a float buffer that stays in cache
    and summing it is several times faster on the CPU than summing a bool tensor."""
    n, w = q.shape
    step = min(n, COUNT_ROWS)
    buf = workspace.get(name, (step, w), q) if workspace is not None else q.new_empty(step, w)
    out = q.new_empty(n)
    for s in range(0, n, step):
        t = min(n, s + step)
        torch.sum(compare(q[s:t], bound[s:t, None], out=buf[: t - s]), dim=1, out=out[s:t])
    return out


def count_below(q: Tensor, bound: Tensor, workspace: Workspace | None, name: str = "below") -> Tensor:
    """Entries of each row of ``q`` ``(n, K)`` below that row's ``bound`` ``(n,)``, as floats."""
    return _count(torch.lt, q, bound, workspace, name)


def smallest_two(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's smallest value, its column (the first among equal values) and the
    runner-up (the smallest of the other columns; ``inf`` for one column): ``(n,)`` each, from
    ``q`` ``(n, w)``.

    One pass over ``q`` takes the minima of blocks of :data:`MIN_BLOCK` columns; the rest works
    on those minima and on the winning block's columns. ``min(dim=1)`` tracks an index per
    element and runs about three times slower on the CPU, and the runner-up would take a
    second pass."""
    n, w = q.shape
    full = w - w % MIN_BLOCK
    if full < 2 * MIN_BLOCK:
        v, slot = q.min(dim=1)
        return v, slot, q.scatter(1, slot[:, None], math.inf).amin(dim=1)
    block_min = q[:, :full].unflatten(1, (full // MIN_BLOCK, MIN_BLOCK)).amin(dim=2)
    if full < w:  # the last, narrower block
        block_min = torch.cat([block_min, q[:, full:].amin(dim=1, keepdim=True)], dim=1)
    v, block = block_min.min(dim=1)  # the first block holding the minimum
    other_blocks = block_min.scatter_(1, block[:, None], math.inf).amin(dim=1)
    cols = block[:, None] * MIN_BLOCK + torch.arange(MIN_BLOCK, device=q.device)
    inside = cols < w
    within = q.gather(1, cols.clamp_max(w - 1)).masked_fill_(~inside, math.inf)
    _, at = within.min(dim=1)
    runner_up = torch.minimum(within.scatter_(1, at[:, None], math.inf).amin(dim=1), other_blocks)
    return v, block * MIN_BLOCK + at, runner_up


def columns_within(q: Tensor, rows: Tensor, lo: Tensor | None, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs ``(r, c)`` with ``lo[r] <= q[rows[r], c] <= hi[r]`` (``lo`` None: no lower
    limit), ``r`` ascending and ``c`` ascending within each ``r`` (``torch.nonzero``'s order),
    and their values, from ``q`` ``(n, w)``, ``rows`` ``(m,)`` and ``lo``, ``hi`` ``(m,)``.

    Such bands mostly hold a few entries of a row: then only the blocks of :data:`MIN_BLOCK`
    columns whose minimum is at most ``hi`` are searched (``nonzero`` over whole rows costs
    several ns per element on the CPU)."""
    sub = q.index_select(0, rows)
    m, w = sub.shape
    full = w - w % MIN_BLOCK

    def within(values: Tensor, groups: Tensor) -> Tensor:
        hit = values <= hi[groups, None]
        return hit if lo is None else hit.logical_and_(values >= lo[groups, None])

    if full >= 2 * MIN_BLOCK:
        blocks = sub[:, :full].unflatten(1, (full // MIN_BLOCK, MIN_BLOCK))
        searched = blocks.amin(dim=2) <= hi[:, None]
        if 4 * int(searched.sum()) <= searched.numel():  # else as dense as whole rows
            rb, block = torch.nonzero(searched, as_tuple=True)
            values = blocks[rb, block]  # (blocks, MIN_BLOCK)
            at, j = torch.nonzero(within(values, rb), as_tuple=True)
            r, c, v = rb[at], block[at] * MIN_BLOCK + j, values[at, j]
            if full < w:  # the narrower last block, merged in row order
                rt, ct = torch.nonzero(within(sub[:, full:], torch.arange(m, device=q.device)), as_tuple=True)
                order = torch.argsort(torch.cat([r, rt]), stable=True)
                r = torch.cat([r, rt])[order]
                c = torch.cat([c, ct + full])[order]
                v = torch.cat([v, sub[rt, ct + full]])[order]
            return r, c, v
    r, c = torch.nonzero(within(sub, torch.arange(m, device=q.device)), as_tuple=True)
    return r, c, sub[r, c]


# ---------------------------------------------------------------------------------------------
# Exact decisions from the float32 product
#
# ``q = |y - c|^2 - 2 (x - c).(y - c)`` (float32, one matrix product) differs from the exact
# ``|x - y|^2 - fl(|x - c|^2)`` by at most ``tau = expansion_bound(...)`` (docs/METHOD.md,
# "Distances"). A comparison between two entries whose ``q`` differ by more than ``2 tau`` is
# therefore decided by ``q``; the few closer ones, and every distance a map takes, come from
# float64 direct differences ``|x - y|``. Ties between equal distances go to the lower id (the
# order of a stable sort of the distances).


def unit_roundoff(q: Tensor) -> float:
    """``u`` of the arithmetic that made ``q``: half the dtype's epsilon (TF32's for a float32
    product on a CUDA device that allows TF32)."""
    if q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    return torch.finfo(q.dtype).eps / 2


def expansion_bound(x_sq: Tensor, entries_sq_max: float, dim: int, u: float) -> Tensor:
    """``tau`` ``(n,)``: a bound on ``|q - (|x - y|^2 - x_sq)|`` over the entries ``y`` of one
    coreset, from the rows' ``x_sq = |x - c|^2`` ``(n,)``, the entries' largest ``|y - c|^2``,
    the dimension ``E`` and the unit roundoff: ``(4 E + 16) u (|x - c|^2 + max |y - c|^2)``.
    The same sum with one entry's ``|y - c|^2`` bounds that entry's error alone."""
    return expansion_scale(dim, u) * (x_sq + entries_sq_max)


def expansion_scale(dim: int, u: float) -> float:
    """``(4 E + 16) u``: the factor of :func:`expansion_bound`."""
    return (4 * dim + 16) * u


def exact_sq_distances(
    x: Tensor, y: Tensor, rows: Tensor | None, cols: Tensor, workspace: Workspace | None = None
) -> Tensor:
    """``|x[rows] - y[cols]|^2`` ``(m,)`` from float64 ``x`` and ``y`` by direct differences
    (``rows`` None: ``0..m-1``), a few thousand pairs at a time (in scratch memory when there is
    a workspace: a fresh allocation is page-faulted in again every time)."""
    out = torch.empty(cols.numel(), dtype=torch.float64, device=x.device)
    step = max(16, 2**22 // max(1, x.shape[1]))
    for s in range(0, cols.numel(), step):
        c = cols[s : s + step]
        if workspace is None:
            xs = x[s : s + step] if rows is None else x.index_select(0, rows[s : s + step])
            ys = y.index_select(0, c)
        else:
            ys = torch.index_select(y, 0, c, out=workspace.get("exact_y", (c.numel(), y.shape[1]), y))
            xs = x[s : s + step]
            if rows is not None:
                xs = torch.index_select(x, 0, rows[s : s + step], out=workspace.get("exact_x", tuple(ys.shape), x))
        d = torch.cdist(xs[:, None, :], ys[:, None, :], compute_mode="donot_use_mm_for_euclid_dist")
        out[s : s + step] = d.view(-1).square_()
    return out


def count_at_most(q: Tensor, bound: Tensor, workspace: Workspace | None, name: str = "below") -> Tensor:
    """Entries of each row of ``q`` ``(n, K)`` at most that row's ``bound`` ``(n,)``, as floats."""
    return _count(torch.le, q, bound, workspace, name)


def _group_min(groups: Tensor, values: Tensor, ids: Tensor, n: int, width: int) -> Tensor:
    """Per group ``0..n-1``: the id of the smallest ``(value, id)`` pair -> ``(n,)``."""
    best = torch.full((n,), math.inf, dtype=values.dtype, device=values.device)
    best = best.scatter_reduce(0, groups, values, reduce="amin")
    on = values == best[groups]
    first = torch.full((n,), width, dtype=torch.long, device=values.device)
    return first.scatter_reduce(0, groups[on], ids[on], reduce="amin")


def _kth_of_groups(groups: Tensor, values: Tensor, ids: Tensor, k: Tensor) -> Tensor:
    """The id of the ``k[g]``-th smallest ``(value, id)`` pair (0-based, clamped to the group)
    of each group; ``groups`` ascending with ``ids`` ascending within each, ``0..len(k)-1``
    each present."""
    counts = torch.bincount(groups, minlength=k.numel())
    start = torch.cumsum(counts, dim=0) - counts
    slot = torch.arange(groups.numel(), device=groups.device) - start[groups]
    padded = torch.full((k.numel(), int(counts.max())), math.inf, dtype=values.dtype, device=values.device)
    padded[groups, slot] = values
    padded_ids = torch.zeros(padded.shape, dtype=torch.long, device=ids.device)
    padded_ids[groups, slot] = ids
    order = padded.sort(dim=1, stable=True).indices  # ids ascending among equal values
    pick = torch.minimum(k.clamp_min(0), counts - 1)
    return padded_ids.gather(1, order.gather(1, pick[:, None]))[:, 0]


class ExactEntries:
    """A coreset ``(K, E)`` in float64 (``values``, for direct differences) and, made on first
    use and kept, its centred copy for the float64 products of dense bands
    (:meth:`ChunkDistances._ordering_values`): one per scorer, not per chunk."""

    def __init__(self, entries: Tensor) -> None:
        self.values = entries.double()
        self._centred: tuple[Tensor, Tensor, Tensor] | None = None

    def centred(self) -> tuple[Tensor, Tensor, Tensor]:
        """``centre`` ``(E,)`` (the entries' mean), ``b = values - centre`` ``(K, E)`` and
        ``|b|^2`` ``(K,)``."""
        if self._centred is None:
            centre = self.values.mean(dim=0)
            b = self.values - centre
            self._centred = (centre, b, (b * b).sum(dim=1))
        return self._centred


class ChunkDistances:
    """One chunk of rows against one coreset: ``q`` ``(n, K)`` from the float32 product and
    what makes its decisions exact: the rows ``x`` ``(n, E)`` as given and the coreset's
    :class:`ExactEntries` (float64, for direct differences), ``x_sq`` ``(n,)`` = the ``|x - c|^2`` in
    ``q``'s units, the entries' ``entries_sq`` ``(K,)`` = ``|y - c|^2``, and from them the bound
    ``tau`` ``(n,)`` of a row (:func:`expansion_bound`).

    Selections return entry ids; ties between equal distances go to the lower id (the order
    of a stable sort). A selection that ``q`` decides within ``2 tau`` is taken from ``q``;
    among the entries within ``2 tau`` (full passes over ``q`` use ``tau``, with the largest
    ``|y - c|^2``), each entry's own bound, with its own ``|y - c|^2``, leaves fewer to compare by
    exact distances.
    """

    def __init__(
        self,
        q: Tensor,
        x_sq: Tensor,
        entries_sq: Tensor,
        x: Tensor,
        entries: ExactEntries,
        workspace: Workspace | None,
    ) -> None:
        self.q, self.x_sq, self.x, self.ws = q, x_sq, x, workspace
        u, largest_sq = unit_roundoff(q), float(entries_sq.max())
        self.scale = expansion_scale(x.shape[1], u)
        self.entries_sq = entries_sq
        self.max_half = self.scale * largest_sq
        self.tau = expansion_bound(x_sq, largest_sq, x.shape[1], u)
        self.entry_half = self.scale * entries_sq.double()  # (K,) each entry's share of its bound
        self.exact_entries, self.entries = entries, entries.values
        self.n, self.width = q.shape
        self.all = torch.arange(self.n, device=q.device)
        self._x64: Tensor | None = None
        self._product: tuple[Tensor, Tensor, Tensor] | None = None  # (_product_rows)

    @classmethod
    def between(cls, x: Tensor, entries: Tensor, workspace: Workspace | None = None) -> ChunkDistances:
        """All rows ``x`` ``(n, E)`` against ``entries`` ``(K, E)``, centred on the entries' mean."""
        centre = entries.mean(dim=0)
        a, b = x - centre, entries - centre
        a_sq, b_sq = (a * a).sum(dim=1), (b * b).sum(dim=1)
        q = b_sq - 2.0 * (a @ b.T)
        return cls(q, a_sq, b_sq, x, ExactEntries(entries), workspace)

    def exact(self, rows: Tensor | None, cols: Tensor) -> Tensor:
        """Exact squared distances (float64) of the pairs ``(rows, cols)`` (chunk rows, entry
        ids; ``rows`` None: one pair per row)."""
        if self._x64 is None:
            like = self.entries
            x64 = (
                self.ws.get("x64", tuple(self.x.shape), like)
                if self.ws is not None
                else torch.empty_like(self.x, dtype=like.dtype)
            )
            self._x64 = x64.copy_(self.x)
        return exact_sq_distances(self._x64, self.entries, rows, cols, self.ws)

    def values(self, ids: Tensor, known_ids: Tensor, known: Tensor) -> Tensor:
        """Exact squared distances of entries ``ids`` ``(n,)``, one per row, reusing ``known``
        (those of ``known_ids``) where the ids agree."""
        rows = torch.nonzero(ids != known_ids).squeeze(1)
        if 2 * rows.numel() > self.n:  # most rows: measuring all is cheaper than gathering them
            return self.exact(None, ids)
        return known.index_put((rows,), self.exact(rows, ids[rows])) if rows.numel() else known.clone()

    def nearest(self, source: Tensor | None = None, columns: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The nearest entry of each row: ids ``(n,)`` and ``q``'s smallest value ``(n,)``
        (``>= BLOCKED / 2`` where no entry is allowed).

        ``source`` ``(n, w)``: ``q`` with the blocked entries raised by :data:`BLOCKED` (default
        ``q``); ``columns`` ``(n, w)``: the entry id of each of its columns (default: the
        column). Where a second entry comes within both bounds (``2 tau`` at most) of the
        smallest value, those that each entry's own bound leaves are compared exactly."""
        src = self.q if source is None else source
        v, slot, runner_up = smallest_two(src)
        ids = slot if columns is None else columns.gather(1, slot[:, None])[:, 0]
        bound = v + self._either_way(self.x_sq, ids)
        rows = torch.nonzero((runner_up <= bound) & (v < 0.5 * BLOCKED)).squeeze(1)
        if rows.numel():
            r, c, value = columns_within(src, rows, None, bound[rows])
            if columns is not None:
                c = columns[rows[r], c]
            # each entry's own bound: drop those certainly farther than another of the row
            lower, upper = self._interval(rows, r, c, value)
            least_upper = torch.full((rows.numel(),), math.inf, dtype=upper.dtype, device=upper.device)
            least_upper.scatter_reduce_(0, r, upper, reduce="amin")
            keep = lower <= least_upper[r]
            counts = torch.bincount(r[keep], minlength=rows.numel())
            keep &= counts[r] > 1  # one left: the smallest q, already chosen
            r, c = r[keep], c[keep]
            if r.numel():
                open_rows = torch.nonzero(counts > 1).squeeze(1)
                chosen = _group_min(r, self._pair_values(rows, r, c), c, rows.numel(), self.width)
                ids[rows[open_rows]] = chosen[open_rows]
        return ids, v

    def _interval(self, rows: Tensor, r: Tensor, c: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Where the exact ``|x - y|^2 - x_sq`` of the pairs ``(rows[r], c)`` lies, from their
        ``q`` values ``value``: ``value -+`` the pair's own bound (:func:`expansion_bound` with
        entry ``c``'s ``|y - c|^2``), float64 ``(p,)`` each."""
        half = self.scale * self.x_sq.index_select(0, rows).double()[r] + self.entry_half[c]
        value = value.double()
        return value - half, value + half

    def _band(self, q: Tensor, v: Tensor, half: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Entries of ``q`` ``(m, K)`` below ``v - half`` (nearer than the entry at ``q = v``,
        for certain) and at most ``v + half`` (all that may be nearer, and that entry), as
        long ``(m,)``, and the rows where those counts leave something to decide."""
        below = count_below(q, v - half, self.ws).long()
        at_most = count_at_most(q, v + half, self.ws).long()
        return below, at_most, torch.nonzero(at_most - below > 1).squeeze(1)

    def _band_pairs(self, rows: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The entries within ``2 tau`` of ``v`` ``(m,)`` in ``rows``: group (0..m-1), entry id,
        and a squared distance that orders them exactly among themselves (:meth:`_pair_values`)."""
        r, c, _ = columns_within(self.q, rows, v - 2.0 * self.tau[rows], v + 2.0 * self.tau[rows])
        return r, c, self._pair_values(rows, r, c)

    def _pair_values(self, rows: Tensor, r: Tensor, c: Tensor, targets: Tensor | None = None) -> Tensor:
        """Squared distances of the pairs ``(rows[r], c)`` (``r`` ascending) that order them
        exactly within each group, or (``targets`` ``(m,)`` given, exact squared distances, one
        per group) against their group's target: exact distances in groups of at most
        :data:`DIRECT_PAIRS_PER_ROW` pairs, :meth:`_ordering_values` in larger ones."""
        counts = torch.bincount(r, minlength=rows.numel())
        dense = counts > DIRECT_PAIRS_PER_ROW
        if not bool(dense.any()):
            return self.exact(rows[r], c)
        if bool(dense.all()):
            return self._ordering_values(rows, r, c, targets)
        in_dense = dense[r]
        out = torch.empty(c.numel(), dtype=self.entries.dtype, device=c.device)
        few = torch.nonzero(~in_dense).squeeze(1)
        out[few] = self.exact(rows[r[few]], c[few])
        many = torch.nonzero(in_dense).squeeze(1)
        group = torch.cumsum(dense, dim=0) - 1  # a dense group's index among the dense groups
        out[many] = self._ordering_values(
            rows[dense], group[r[many]], c[many], None if targets is None else targets[dense]
        )
        return out

    def _product_rows(self, rows: Tensor) -> tuple[Tensor, Tensor, float]:
        """The float64 product ``|b|^2 - 2 a.b`` ``(n, K)`` made for (at least) ``rows``, the
        rows' ``|a|^2`` ``(n,)`` and ``max |b|^2`` (``a = x - centre``, ``b = entries - centre``)."""
        centre, b, b_sq = self.exact_entries.centred()
        if self._product is None:
            shape = (self.n, self.width)
            q64 = (
                self.ws.get("q64", shape, self.q, torch.float64)
                if self.ws is not None
                else torch.empty(shape, dtype=torch.float64, device=self.q.device)
            )
            a_sq = torch.empty(self.n, dtype=torch.float64, device=self.q.device)
            done = torch.zeros(self.n, dtype=torch.bool, device=self.q.device)
            self._product = (q64, a_sq, done)
        q64, a_sq, done = self._product
        need = torch.unique(rows[~done[rows]])
        for s in range(0, need.numel(), PRODUCT_ROWS):
            idx = need[s : s + PRODUCT_ROWS]
            a = self.x.index_select(0, idx).double() - centre
            a_sq[idx] = (a * a).sum(dim=1)
            q64[idx] = torch.addmm(b_sq, a, b.T, alpha=-2.0)
        done[need] = True
        return q64, a_sq, float(b_sq.max())

    def _ordering_values(self, rows: Tensor, r: Tensor, c: Tensor, targets: Tensor | None) -> Tensor:
        """Squared distances of the pairs ``(rows[r], c)`` (``r`` ascending) from a float64
        product ``|a|^2 + |b|^2 - 2 a.b`` (``a``, ``b`` centred in float64; a row's product is
        made once and kept), within ``tau64`` = ``(4 E + 64) u64 (|a|^2 + max |b|^2)`` of the exact
        ones (the expansion's bound in float64, the centring's rounding in the margin); a pair
        whose value lies within ``2 tau64`` of another of its group (``targets`` None) or of its
        group's target is measured exactly. Every comparison the callers make among these
        values, or against the targets, is then the exact one."""
        q64, a_sq_all, b_sq_max = self._product_rows(rows)
        a_sq = a_sq_all[rows]
        approx = q64[rows[r], c] + a_sq[r]
        tau = (4 * self.x.shape[1] + 64) * (torch.finfo(torch.float64).eps / 2) * (a_sq + b_sq_max)
        if targets is not None:
            flag = (approx - targets[r]).abs() <= 2.0 * tau[r]
        else:
            order = torch.argsort(approx, stable=True)
            order = order[torch.argsort(r[order], stable=True)]  # by group, then by value
            ro, vo = r[order], approx[order]
            close = (ro[1:] == ro[:-1]) & (vo[1:] - vo[:-1] <= 2.0 * tau[ro[1:]])
            flag = torch.zeros(c.numel(), dtype=torch.bool, device=c.device)
            flag[order[1:][close]] = True
            flag[order[:-1][close]] = True
        pick = torch.nonzero(flag).squeeze(1)
        if pick.numel():
            approx[pick] = self.exact(rows[r[pick]], c[pick])
        return approx

    def rank(self, rows: Tensor, ids: Tensor) -> Tensor:
        """Exact rank ``(m,)`` long of entries ``ids`` among the entries of ``rows``, the
        number of entries nearer or as near with a lower id."""
        centre, half = self._target_band(rows, ids)
        if 4 * rows.numel() < self.n:
            below, _, amb = self._band(take_rows(self.q, rows, self.ws), centre, half)
        else:  # counting every row is cheaper than copying most of them
            spread = torch.full_like(self.tau, math.inf).index_put_((rows,), centre)
            below, _, amb = self._band(self.q, spread, torch.zeros_like(self.tau).index_put_((rows,), half))
            below = below[rows]
            flagged = torch.zeros(self.n, dtype=torch.bool, device=rows.device).index_fill_(0, amb, True)
            amb = torch.nonzero(flagged[rows]).squeeze(1)
        if amb.numel():
            rows_a, ids_a, centre_a, half_a = rows[amb], ids[amb], centre[amb], half[amb]
            r, c, value = columns_within(self.q, rows_a, centre_a - half_a, centre_a + half_a)
            # each entry's own bound: entries certainly nearer or farther than the target need
            # no exact distance
            lower, upper = self._interval(rows_a, r, c, value)
            target_lower, target_upper = self._interval(rows_a, self.all[: amb.numel()], ids_a, centre_a)
            before = (upper < target_lower[r]).long()
            open_pairs = torch.nonzero((before == 0) & (lower <= target_upper[r])).squeeze(1)
            if open_pairs.numel():
                targets = self.exact(rows_a, ids_a)
                ro, co = r[open_pairs], c[open_pairs]
                e, target = self._pair_values(rows_a, ro, co, targets), targets[ro]
                before[open_pairs] = ((e < target) | ((e == target) & (co < ids_a[ro]))).long()
            below[amb] = below[amb] + torch.zeros_like(amb).scatter_add_(0, r, before)
        return below

    def _target_band(self, rows: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``q`` of entries ``ids`` in ``rows`` and a half-width ``(m,)`` each: an entry whose
        ``q`` lies further from the first than the second is nearer or farther than that entry
        for certain (its bound and the target's, the largest ``|y - c|^2`` for the former)."""
        return self.q[rows, ids], self._either_way(self.x_sq[rows], ids)

    def _either_way(self, x_sq: Tensor, ids: Tensor) -> Tensor:
        """How far ``q`` ``(m,)`` of another entry may lie from that of entries ``ids`` ``(m,)``,
        in rows of ``x_sq`` ``(m,)``, and the two still be in either order: both bounds, the
        other entry's with the largest ``|y - c|^2``."""
        return self.scale * (2.0 * x_sq + self.entries_sq[ids]) + self.max_half

    def fewer_before(self, rows: Tensor, ids: Tensor, keep: int) -> Tensor:
        """Whether fewer than ``keep`` entries come before entries ``ids`` (see :meth:`rank`)
        in ``rows``, bool ``(m,)``: from ``q``'s counts where they decide it."""
        centre, half = self._target_band(rows, ids)
        if 4 * rows.numel() < self.n:
            at_most = count_at_most(take_rows(self.q, rows, self.ws), centre + half, self.ws)
        else:  # counting every row is cheaper than copying most of them
            spread = torch.full_like(self.tau, -math.inf).index_put_((rows,), centre + half)
            at_most = count_at_most(self.q, spread, self.ws)[rows]
        out = at_most <= keep  # rank <= at_most - 1
        open_rows = torch.nonzero(~out).squeeze(1)
        if open_rows.numel():  # rank >= the entries certainly before it
            sub = take_rows(self.q, rows[open_rows], self.ws)
            below = count_below(sub, centre[open_rows] - half[open_rows], self.ws)
            undecided = open_rows[below < keep]
            if undecided.numel():
                out[undecided] = self.rank(rows[undecided], ids[undecided]) < keep
        return out

    def farthest(self, rows: Tensor) -> Tensor:
        """Id of the farthest entry of each of ``rows`` ``(m,)``."""
        q = take_rows(self.q, rows, self.ws)
        v, ids = q.max(dim=1)
        close = self.width - count_below(q, v - 2.0 * self.tau[rows], self.ws)
        amb = torch.nonzero(close > 1).squeeze(1)
        if amb.numel():
            r, c, e = self._band_pairs(rows[amb], v[amb])
            ids[amb] = -_group_min(r, -e, -c, amb.numel(), self.width)  # the last in a stable sort
        return ids

    def kth(self, k: Tensor, nearest_ids: Tensor) -> Tensor:
        """Id of each row's ``k``-th nearest entry (0-based) ``(n,)``, from the nearest ones
        ``nearest_ids``: the ``k``-th smallest ``q`` (partial sorts of the few nearest
        entries: 16, 128, 1024, ... at a time), exactly among the entries within ``2 tau``."""
        out = nearest_ids.clone()
        last = torch.nonzero(k == self.width - 1).squeeze(1)
        if self.width > 1 and last.numel():
            out[last] = self.farthest(last)
        pending = (k > 0) & (k < self.width - 1)
        bound = 16
        while bool(pending.any()):
            bound = min(bound, self.width)
            rows = torch.nonzero(pending & (k < bound)).squeeze(1)
            if rows.numel():
                q = take_rows(self.q, rows, self.ws)
                top = q.topk(bound, dim=1, largest=False, sorted=True)
                v = top.values.gather(1, k[rows, None])[:, 0]
                out[rows] = top.indices.gather(1, k[rows, None])[:, 0]
                below, _, amb = self._band(q, v, 2.0 * self.tau[rows])
                if amb.numel():
                    r, c, e = self._band_pairs(rows[amb], v[amb])
                    out[rows[amb]] = _kth_of_groups(r, e, c, k[rows[amb]] - below[amb])
            pending &= k >= bound
            bound *= 8
        return out

    def order(self) -> Tensor:
        """Entry ids of each row by exact distance, ties by id ``(n, K)``: ``q``'s order with
        every entry that has a neighbour within ``2 tau`` placed by its exact distance."""
        v, order = self.q.sort(dim=1)
        close = (v[:, 1:] - v[:, :-1]) <= 2.0 * self.tau[:, None]
        near = torch.zeros_like(v, dtype=torch.bool)
        near[:, 1:] |= close
        near[:, :-1] |= close
        r, pos = torch.nonzero(near, as_tuple=True)
        c = order[r, pos]
        keys = self.q.double()
        keys[r, c] = self.exact(r, c) - self.x_sq[r].double()
        return torch.sort(keys, dim=1, stable=True).indices

    def select(self, ids: Tensor, v: Tensor, keep: int | None, nearest_ids: Tensor) -> Tensor:
        """What a position mask selects, ids ``(n,)``: the nearest allowed entry ``ids`` (``q``
        ``v``, ``>= BLOCKED / 2`` where none), only if fewer than ``keep`` entries come before
        it (``keep`` None: always; the original's lost writes), else the farthest entry (the
        original's fallback). ``nearest_ids``: each row's nearest entry (rank 0)."""
        found = v < 0.5 * BLOCKED
        if keep is not None and keep < self.width:
            rows = torch.nonzero(found & (ids != nearest_ids)).squeeze(1)
            if rows.numel():
                found[rows] = self.fewer_before(rows, ids[rows], keep)
        rows = torch.nonzero(~found).squeeze(1)
        return ids.index_put((rows,), self.farthest(rows)) if rows.numel() else ids


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
        # padding: each row's first allowed id, raised by BLOCKED
        pad = torch.arange(width, device=allowed.device)[None, :] >= counts[:, None]
        self.ids = torch.where(pad, ids[:, :1], ids)
        self.padding = BLOCKED * pad.to(dtype)

    def nearest_allowed(self, dist: ChunkDistances, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """The nearest entry allowed at positions ``start..stop-1`` (the rows of ``dist``): ids
        and ``q`` values ``(n,)`` (:meth:`ChunkDistances.nearest`)."""
        q, ws = dist.q, dist.ws
        if self.dense is not None:
            return dist.nearest(masked(q, self.dense[start:stop], ws, "masked"))
        ids = self.ids[start:stop]
        picked = q.gather(1, ids) if ws is None else torch.gather(q, 1, ids, out=ws.get("picked", tuple(ids.shape), q))
        return dist.nearest(picked.add_(self.padding[start:stop]), ids)


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

    def first_allowed(self, dist: ChunkDistances, blocked_dist: Tensor, last_column: int) -> Tensor:
        """First allowed sorted column of each row, ``(n,)`` long: from the distances to the
        distribution entries ``dist`` (exact order), the blocked indicator of the distribution
        entries ``blocked_dist`` ``(n, D)`` (:func:`blocked_indicator`) and the last column ``K1 - 1``."""
        ranks = self.first.shape[0]
        last = self.first.new_tensor(last_column)
        if self.increasing:  # the rank of the nearest allowed distribution entry
            ids, v = dist.nearest(masked(dist.q, blocked_dist, dist.ws, "masked_dist"))
            found = v < 0.5 * BLOCKED
            rank = torch.full_like(ids, ranks)
            rows = torch.nonzero(found).squeeze(1)
            if rows.numel():
                rank[rows] = dist.rank(rows, ids[rows])
            found &= rank < ranks
            return torch.where(found, self.first[rank.clamp_max(ranks - 1)], last)
        order = dist.order()[:, :ranks]
        by_rank = blocked_dist.gather(1, order) == 0  # (n, R): is the r-th nearest entry allowed
        return torch.where(by_rank, self.first[None, :], last).amin(dim=1)


# ---------------------------------------------------------------------------------------------
# Resize and blur


def gaussian_kernel1d(
    sigma: float, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """Normalised Gaussian weights, radius ``int(4*sigma + 0.5)`` (scipy's ``truncate=4``)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _symmetric_index(n: int, radius: int, device: torch.device) -> Tensor:
    # scipy 'reflect' (d c b a | a b c d | d c b a), valid for any radius, even > n.
    i = torch.arange(-radius, n + radius, device=device).remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(..., H, W)`` maps, same shape.

    Border handling is scipy.ndimage's ``mode='reflect'`` (half-sample symmetric: the edge
    value is repeated), which the original's ``gaussian_filter`` uses; torch's own 'reflect'
    padding is scipy's 'mirror', so the padding is done by index here. ``sigma`` may not
    exceed the map's larger side (PNIError), which bounds the padded copy to 9 times the map.
    """
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    if sigma > max(h, w):  # the padding grows with sigma: bound it (a wider blur only flattens the map)
        raise PNIError(f"--blursigma {sigma:g} is wider than the {h}x{w} map; use at most {max(h, w)}")
    kernel = gaussian_kernel1d(sigma, maps.dtype, maps.device)
    r = (kernel.numel() - 1) // 2
    x = maps.reshape(-1, 1, h, w)
    x = x.index_select(3, _symmetric_index(w, r, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _symmetric_index(h, r, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(maps.shape)


@lru_cache(maxsize=32)
def _resize_blur_operator(n_in: int, size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(size, n_in)``: the 1-d bilinear resize (align_corners=False) followed by the blur,
    as a matrix (both are linear and act on the two axes separately)."""
    eye = torch.eye(n_in, dtype=dtype, device=device)
    resized = F.interpolate(eye[None], size=size, mode="linear", align_corners=False)[0]  # row i: e_i resized
    return gaussian_blur(resized[:, None, :], sigma)[:, 0, :].T.contiguous()  # a 1-row map blurs along its row


def resize_and_blur(maps: Tensor, imagesize: int, sigma: float) -> Tensor:
    """Bilinear resize (align_corners=False) then blur: ``(N, R, C) -> (N, S, S)``, as two
    small matrix products."""
    rows = _resize_blur_operator(maps.shape[-2], imagesize, float(sigma), maps.dtype, maps.device)
    cols = _resize_blur_operator(maps.shape[-1], imagesize, float(sigma), maps.dtype, maps.device)
    return rows @ maps @ cols.T
