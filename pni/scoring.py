"""Per-image anomaly scoring (docs/METHOD.md, section 5): pure torch, device-agnostic, no Lightning/faiss.

Notation: a feature grid has ``R x C`` positions, ``P = R*C``, ``E`` = feature dimension,
``pp = (patchsize-1)//2``; "interior" positions are rows/cols ``pp..R-pp-1`` (``P_int`` of
them, row-major). ``K1`` / ``K2`` = without-edge / with-edge embedding coreset sizes, ``D`` =
distribution coreset size. ``d(i, k)`` is the Euclidean (not squared) distance and
``prob = g * exp(-g * d)`` with ``g = prob_gamma``.

Masked scores: the original computes ``-log(max_k(mask * prob))`` with the farthest entry
always allowed. Since ``prob`` decreases with ``d`` and is positive, that equals
``g * d_min_allowed - log(g)``, which is what we compute (no ``exp`` that could underflow to
zero and give ``inf``).

Variants (``ScoringConfig.variant``): ``"original"`` reproduces the published code, quirks
included: the rank/id mix-up of its neighbourhood mask, and its lost parallel writes (it
fills each mask in a ``pymp.Parallel(mask_workers)`` loop over plain numpy arrays, so only
the parent's share of the loop, the first ``ceil(n / mask_workers)`` iterations, takes
effect: see :func:`parent_share`). ``"paper"`` is the method as the paper describes it.

Entry point: :func:`score_image` (one image) or :func:`score_batch` (``B`` images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from pni.errors import PNIError
from pni.maps import MAP_NAMES

VARIANTS: tuple[str, ...] = ("original", "paper")


@dataclass
class ScoringConfig:
    """Scoring settings: the original's flags of the same names, plus ``variant``,
    ``mask_workers`` and ``chunk_size``.

    ``variant``: ``"original"`` (the published code, its quirks included) or ``"paper"``;
    ``mask_workers``: the worker count of the original's parallel mask loops whose lost
    writes ``"original"`` reproduces (8 as published; 1 = the serial semantics);
    ``chunk_size`` = number of feature rows whose distance matrices are held at once
    (``None``: all rows of the batch at once).
    """

    anomaly_nn: int = 3
    patchsize: int = 5
    prob_gamma: float = 0.99
    softmax_temperature_alpha: float = 2.0
    softmax_nb_gamma: float = 0.5
    softmax_coor_gamma: float = 0.5
    variant: str = "original"
    mask_workers: int = 8
    imagesize: int = 480
    blursigma: float = 8.0
    chunk_size: int | None = 2048


@dataclass
class ScoringArtefacts:
    """Trained artefacts used to score test images (all tensors on one device).

    embedding_without_edge: (K1, E); embedding_with_edge: (K2, E); distribution_coreset:
    (D, E); embedding_to_distribution: (K1,) long, ``m(k)`` = id of the distribution entry
    nearest to embedding entry ``k``; position_prior: (P, K1), interior variant;
    position_prior_with_edge: (P, K2).
    """

    embedding_without_edge: Tensor
    embedding_with_edge: Tensor
    distribution_coreset: Tensor
    embedding_to_distribution: Tensor
    position_prior: Tensor
    position_prior_with_edge: Tensor
    # tensors derived once per scoring setting (see _prepare); not an artefact
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        embedding_without_edge: Tensor,
        embedding_with_edge: Tensor,
        distribution_coreset: Tensor,
        position_prior: Tensor,
        position_prior_with_edge: Tensor,
        chunk_size: int | None = None,
    ) -> ScoringArtefacts:
        """Assemble the artefacts, computing ``embedding_to_distribution`` once."""
        m = nearest_ids(embedding_without_edge, distribution_coreset, chunk_size)
        return cls(
            embedding_without_edge,
            embedding_with_edge,
            distribution_coreset,
            m,
            position_prior,
            position_prior_with_edge,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ScoringArtefacts:
        """Copy to ``device``; floating tensors are also cast to ``dtype`` when given."""
        out = {}
        for f in fields(self):
            if not f.init:
                continue
            t: Tensor = getattr(self, f.name)
            out[f.name] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return ScoringArtefacts(**out)

    def check(self, rows: int, cols: int, feature_dim: int) -> None:
        """Raise :class:`PNIError` if the artefacts do not fit an ``rows x cols x E`` grid."""
        k1, e1 = self.embedding_without_edge.shape
        k2, e2 = self.embedding_with_edge.shape
        d, e3 = self.distribution_coreset.shape
        p = rows * cols
        problems = []
        if {e1, e2, e3} != {feature_dim}:
            problems.append(f"feature dims {e1}/{e2}/{e3} (coresets) vs {feature_dim} (test)")
        if tuple(self.embedding_to_distribution.shape) != (k1,):
            shape = tuple(self.embedding_to_distribution.shape)
            problems.append(f"embedding_to_distribution {shape} vs ({k1},)")
        if tuple(self.position_prior.shape) != (p, k1):
            problems.append(f"position prior {tuple(self.position_prior.shape)} vs ({p}, {k1})")
        if tuple(self.position_prior_with_edge.shape) != (p, k2):
            shape = tuple(self.position_prior_with_edge.shape)
            problems.append(f"with-edge position prior {shape} vs ({p}, {k2})")
        if d == 0 or k1 == 0 or k2 == 0:
            problems.append("empty coreset")
        if problems:
            raise PNIError(
                f"scoring artefacts do not match the test features ({rows}x{cols} grid): " + "; ".join(problems)
            )


@dataclass
class ImageScores:
    """Scores of one image, each a dict keyed by :data:`MAP_NAMES`.

    coarse: (R, C) maps (nb and nb_coor edge-padded); maps: (imagesize, imagesize) resized and
    blurred maps; image: image-level scores (computed on the coarse maps).
    """

    coarse: dict[str, Tensor] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)
    image: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Distances and grid helpers


def _row_chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
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
    for s, e in _row_chunks(x.shape[0], chunk_size):
        xs = x[s:e]
        sq = (xs * xs).sum(dim=1, keepdim=True) + y_sq - 2.0 * (xs @ y.T)
        out[s:e] = sq.clamp_min_(0.0).sqrt_()
    return out


def nearest_ids(x: Tensor, y: Tensor, chunk_size: int | None = None) -> Tensor:
    """Id of the nearest row of ``y`` (K, E) for each row of ``x`` (N, E) -> (N,) long."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s, e in _row_chunks(x.shape[0], chunk_size):
        out[s:e] = pairwise_distances(x[s:e], y).argmin(dim=1)
    return out


def interior_indices(rows: int, cols: int, pp: int, device: torch.device | str | None = None) -> Tensor:
    """Flat row-major indices (P_int,) of the positions at least ``pp`` from every border."""
    if rows <= 2 * pp or cols <= 2 * pp:
        raise PNIError(f"feature grid {rows}x{cols} has no interior for patchsize {2 * pp + 1}")
    r = torch.arange(pp, rows - pp, device=device)
    c = torch.arange(pp, cols - pp, device=device)
    return (r[:, None] * cols + c[None, :]).reshape(-1)


def pad_interior(map_int: Tensor, pp: int) -> Tensor:
    """Edge-pad (replicate) interior maps ``(..., R-2pp, C-2pp) -> (..., R, C)``."""
    if pp == 0:
        return map_int
    lead = map_int.shape[:-2]
    x = map_int.reshape(-1, 1, *map_int.shape[-2:])
    x = F.pad(x, (pp, pp, pp, pp), mode="replicate")
    return x.reshape(*lead, *x.shape[-2:])


# ---------------------------------------------------------------------------------------------
# Scores


def patchcore_scores(knn_dist: Tensor) -> tuple[Tensor, Tensor]:
    """PatchCore scores from ascending k-NN distances ``(..., P, n)``.

    Returns the pixel scores ``(..., P)`` (nearest distance) and the image score ``(...)``
    ``w * s*``: ``s*`` = max over positions of the nearest distance and
    ``w = 1 - exp(s*) / sum_j exp(d_j)`` over that position's ``n`` distances (``w = 1`` if
    ``n == 1``).
    """
    pixel = knn_dist[..., 0]
    s_star, arg = pixel.max(dim=-1)
    if knn_dist.shape[-1] == 1:
        return pixel, s_star
    n_b = knn_dist.gather(-2, arg[..., None, None].expand(*arg.shape, 1, knn_dist.shape[-1]))
    ratio = torch.softmax(n_b.squeeze(-2), dim=-1)[..., 0]  # exp(s*)/sum exp(d_j), stably
    return pixel, (1.0 - ratio) * s_star


def parent_share(n: int, workers: int) -> int:
    """Iterations of an ``n``-iteration loop that take effect under the original's
    ``pymp.Parallel(workers)``: pymp splits the loop into ``workers`` contiguous chunks (the
    first ``n % workers`` one longer) and only the parent process, which runs the first chunk,
    writes into the plain numpy masks, so iterations ``0 .. ceil(n / workers) - 1`` count."""
    if workers < 1:
        raise PNIError(f"--mask_workers must be at least 1, got {workers}")
    return -(-n // workers)


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


def _take_rows(q: Tensor, rows: Tensor, workspace: Workspace | None) -> Tensor:
    """``q[rows]``, in scratch memory when there is a workspace."""
    if workspace is None:
        return q.index_select(0, rows)
    return torch.index_select(q, 0, rows, out=workspace.get("rows", (rows.numel(), q.shape[1]), q))


BLOCKED = 1e30  # added to the entries a mask blocks: larger than any distance, finite in float32


def blocked_indicator(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``1.0`` where ``allowed`` is False, ``0.0`` where True. Masks are applied as
    ``q + BLOCKED * indicator``: on the CPU, float arithmetic runs several times faster than
    ``torch.where`` on a bool mask (whose speed also depends on the mask's density)."""
    return (~allowed).to(dtype)


def _masked_min(q: Tensor, blocked: Tensor, workspace: Workspace | None, name: str) -> Tensor:
    """Row minimum of ``q`` over the entries whose ``blocked`` indicator (:func:`blocked_indicator`)
    is 0 (``inf`` where every entry is blocked)."""
    out = workspace.get(name, tuple(q.shape), q) if workspace is not None else None
    best = torch.add(q, blocked, alpha=BLOCKED, out=out).amin(dim=1)
    return best.masked_fill_(best >= 0.5 * BLOCKED, float("inf"))


def _count_below(q: Tensor, bound: Tensor, workspace: Workspace | None, name: str) -> Tensor:
    """Entries of each row of ``q`` ``(n, K)`` below that row's ``bound`` ``(n,)``, as floats
    (exact: below 2^24); comparing into a float buffer and summing it is several times
    faster on the CPU than summing a bool tensor."""
    out = workspace.get(name, tuple(q.shape), q) if workspace is not None else torch.empty_like(q)
    return torch.lt(q, bound[:, None], out=out).sum(dim=1)


def select_position(
    q: Tensor,
    allowed: Tensor | None,
    keep: int | None = None,
    row_min: Tensor | None = None,
    workspace: Workspace | None = None,
    nearest_allowed: Tensor | None = None,
) -> Tensor:
    """Per row, the value of ``q`` at the entry a position mask selects: ``(n, K), (n, K) bool
    -> (n,)``. ``q`` is any per-row increasing function of the distance (the distance itself,
    or the squared distance less a row constant).

    The selected entry is the nearest allowed one; when ``keep`` is given, only if it is among
    the ``keep`` nearest (the original's position masks, whose loop over ranks loses all but
    the first :func:`parent_share` of its writes); otherwise, and when nothing is allowed, the
    farthest entry (the original's fallback: the last sorted column is always allowed).
    ``row_min``: ``q``'s row minimum, if known (a row whose nearest entry is allowed needs no
    rank); ``workspace``: scratch memory for the ``(n, K)`` temporaries;
    ``nearest_allowed``: the row minimum over the allowed entries (``inf`` where none), if
    known, instead of ``allowed``.
    """
    n = q.shape[0]
    if nearest_allowed is None:
        best = _masked_min(q, blocked_indicator(allowed, q.dtype), workspace, "masked")
    else:
        best = nearest_allowed.clone()
    found = torch.isfinite(best)
    if keep is not None and keep < q.shape[1]:
        ranked = found if row_min is None else found & (best > row_min)
        rows = torch.nonzero(ranked).squeeze(1)
        if rows.numel() > n // 4:  # counting every row is cheaper than copying most of them
            found &= _count_below(q, best, workspace, "below") < keep
        elif rows.numel():
            found[rows] = _count_below(_take_rows(q, rows, workspace), best[rows], workspace, "below") < keep
    if not bool(found.all()):
        rows = torch.nonzero(~found).squeeze(1)
        best = best.index_put((rows,), _take_rows(q, rows, workspace).amax(dim=1))
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
            return _masked_min(q, self.dense[start:stop], workspace, "masked")
        ids = self.ids[start:stop]
        picked = (
            q.gather(1, ids)
            if workspace is None
            else torch.gather(q, 1, ids, out=workspace.get("picked", tuple(ids.shape), q))
        )
        return picked.amin(dim=1).masked_fill_(self.empty[start:stop], float("inf"))


def _blocked_distribution(
    nb_logits: Tensor, temperature_alpha: float, nb_gamma: float, embedding_coreset_size: int, workspace: Workspace
) -> Tensor:
    """The neighbourhood mask over the distribution entries as a blocked indicator: ``(n, D)``
    logits -> ``(n, D)``, 1.0 where ``softmax(logits / alpha)`` is at most ``nb_gamma / K1``
    (the original divides by the embedding coreset size K1, not by D), 0.0 where allowed."""
    probs = torch.softmax(nb_logits / temperature_alpha, dim=-1)
    out = workspace.get("blocked_distribution", tuple(probs.shape), probs)
    return torch.le(probs, nb_gamma / embedding_coreset_size, out=out)


def position_allowed(prior_rows: Tensor, coor_gamma: float, coreset_size: int) -> Tensor:
    """Allowed embedding entries by id from position-prior rows ``(n, K) -> bool (n, K)``."""
    return prior_rows > coor_gamma / coreset_size


@dataclass(frozen=True)
class RankColumns:
    """The original neighbourhood mask as a function of distribution ranks.

    Its column ``k`` (the k-th nearest embedding entry) is allowed where the ``m(k)``-th
    nearest distribution entry is, and only ``m(k) < parent_share(D, workers)`` is ever
    written, so the first allowed column of a row is the smallest ``first[r]`` over its
    allowed ranks ``r``, with ``first[r] = min{k : m(k) = r}``, or the last column ``K1 - 1``
    (always allowed) when there is none. ``first``: (R,) long, ``K1 - 1`` where no column
    maps to ``r``.

    ``increasing``: every rank below ``R`` has a column and ``first`` increases with the rank
    (as when the distribution coreset is a prefix of the embedding coreset, which gives
    ``m(k) = k`` for ``k < D``); then the first allowed column is ``first`` at the rank of the
    nearest allowed distribution entry, and nothing needs sorting.
    """

    first: Tensor
    increasing: bool

    @classmethod
    def build(cls, embedding_to_distribution: Tensor, distribution_size: int, mask_workers: int) -> RankColumns:
        m = embedding_to_distribution
        k1 = m.shape[0]
        ranks = parent_share(distribution_size, mask_workers)
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
            nearest = _masked_min(q_dist, blocked_dist, workspace, "masked_dist")
            rank = _count_below(q_dist, nearest, workspace, "below_dist").long()  # of the nearest allowed entry
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
        out[rows] = _take_rows(q, rows, workspace).amax(dim=1)
    pending = (k > 0) & ~last
    bound = 16
    while bool(pending.any()):
        bound = min(bound, width)
        rows = torch.nonzero(pending & (k < bound)).squeeze(1)
        if rows.numel():
            nearest = _take_rows(q, rows, workspace).topk(bound, dim=1, largest=False, sorted=True).values
            out[rows] = nearest.gather(1, k[rows, None])[:, 0]
        pending &= k >= bound
        bound *= 8
    return out


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


# ---------------------------------------------------------------------------------------------
# Top level


@dataclass
class _Prepared:
    """What scoring derives from the artefacts once per setting (cached on them): each coreset
    as ``[-2 y, |y|^2]`` (entries shifted by a common centre, see :func:`pairwise_distances`),
    the position masks, the neighbourhood mask's columns by rank, and scratch memory."""

    centre: Tensor  # (E,)
    coresets: dict[str, Tensor]  # name -> (K, E + 1)
    allowed_with_edge: PositionMask  # (P, K2)
    allowed_interior: PositionMask  # (P_int, K1), the interior positions' rows
    inner: Tensor  # (P_int,) flat interior positions
    rank_columns: RankColumns | None  # variant 'original'
    workspace: Workspace


def _prepare(art: ScoringArtefacts, cfg: ScoringConfig, rows: int, cols: int) -> _Prepared:
    pp = (cfg.patchsize - 1) // 2
    key = (rows, cols, pp, cfg.softmax_coor_gamma, cfg.variant, cfg.mask_workers)
    if key in art._derived:
        return art._derived[key]
    centre = art.embedding_with_edge.mean(dim=0)
    dtype = centre.dtype
    coresets = {}
    for name, entries in (
        ("with_edge", art.embedding_with_edge),
        ("without_edge", art.embedding_without_edge),
        ("distribution", art.distribution_coreset),
    ):
        centred = entries - centre
        coresets[name] = torch.cat([-2.0 * centred, (centred * centred).sum(dim=1, keepdim=True)], dim=1)
    inner = interior_indices(rows, cols, pp, art.position_prior.device)
    k1, k2 = art.embedding_without_edge.shape[0], art.embedding_with_edge.shape[0]
    prepared = _Prepared(
        centre=centre,
        coresets=coresets,
        allowed_with_edge=PositionMask(
            position_allowed(art.position_prior_with_edge, cfg.softmax_coor_gamma, k2), dtype
        ),
        allowed_interior=PositionMask(position_allowed(art.position_prior[inner], cfg.softmax_coor_gamma, k1), dtype),
        inner=inner,
        rank_columns=(
            RankColumns.build(art.embedding_to_distribution, art.distribution_coreset.shape[0], cfg.mask_workers)
            if cfg.variant == "original"
            else None
        ),
        workspace=Workspace(),
    )
    art._derived[key] = prepared
    return prepared


def _distance(q: Tensor, x_sq: Tensor) -> Tensor:
    """Euclidean distances from squared distances less ``|x|^2`` and ``|x|^2``."""
    return (q + x_sq).clamp_min_(0.0).sqrt_()


def score_batch(features: Tensor, nb_logits: Tensor, art: ScoringArtefacts, cfg: ScoringConfig) -> list[ImageScores]:
    """Score ``B`` images.

    features: (B, R, C, E) patch features; nb_logits: (B, P_int, D) neighbourhood-MLP logits
    of the interior positions (row-major). Distance matrices are built ``cfg.chunk_size`` rows
    at a time. Returns one :class:`ImageScores` per image.

    Every mask only decides which entry's distance a row takes (the nearest allowed one, the
    k-th nearest, the farthest), so each chunk is held as squared distances less the row
    constant ``|x|^2``, ``|y|^2 - 2 x.y``, one matrix product ``[x, 1] @ [-2y, |y|^2]^T``;
    only the selected values become distances.
    """
    b, rows, cols, e = features.shape
    art.check(rows, cols, e)
    coreset = art.embedding_with_edge
    if {(t.dtype, t.device) for t in (features, nb_logits, coreset)} != {(coreset.dtype, coreset.device)}:
        raise PNIError(
            f"features ({features.dtype}, {features.device}), neighbourhood logits ({nb_logits.dtype}, "
            f"{nb_logits.device}) and artefacts ({coreset.dtype}, {coreset.device}) must share dtype "
            "and device"
        )
    if cfg.variant not in VARIANTS:
        raise PNIError(f"--variant must be one of {VARIANTS}, got {cfg.variant!r}")
    parent_share(1, cfg.mask_workers)  # refuses a worker count below 1
    p = rows * cols
    pp = (cfg.patchsize - 1) // 2
    prep = _prepare(art, cfg, rows, cols)
    inner, ws = prep.inner, prep.workspace
    p_int = inner.numel()
    k1 = art.embedding_without_edge.shape[0]
    k2 = art.embedding_with_edge.shape[0]
    d = art.distribution_coreset.shape[0]
    if tuple(nb_logits.shape) != (b, p_int, d):
        raise PNIError(f"neighbourhood logits {tuple(nb_logits.shape)} vs ({b}, {p_int}, {d})")
    if not 1 <= cfg.anomaly_nn <= k2:
        raise PNIError(f"--anomaly_nn {cfg.anomaly_nn} must be in 1..{k2} (with-edge coreset)")
    g = cfg.prob_gamma
    original = cfg.variant == "original"
    keep1 = parent_share(k1, cfg.mask_workers) if original else None
    keep2 = parent_share(k2, cfg.mask_workers) if original else None

    def sq_distances(x: Tensor, name: str) -> Tensor:  # (n, E + 1) -> (n, K)
        entries = prep.coresets[name]
        return torch.mm(x, entries.T, out=ws.get("q_" + name, (x.shape[0], entries.shape[0]), x))

    nearest = features.new_empty(b, p)  # PatchCore pixel scores: nearest with-edge distance
    coor = features.new_empty(b, p)
    nb = features.new_empty(b, p_int)
    pos_score = features.new_empty(b, p_int)
    for i in range(b):
        x_all = ws.get("x", (p, e + 1), features)  # [x - centre, 1]
        torch.sub(features[i].reshape(p, e), prep.centre, out=x_all[:, :e])
        x_all[:, e] = 1.0
        x_sq_all = torch.linalg.vector_norm(x_all[:, :e], dim=1).square_()
        # With-edge coreset, all positions: PatchCore and the coor map.
        for s, t in _row_chunks(p, cfg.chunk_size):
            q = sq_distances(x_all[s:t], "with_edge")
            q_min = q.amin(dim=1)
            nearest[i, s:t] = _distance(q_min, x_sq_all[s:t])
            best = prep.allowed_with_edge.nearest_allowed(q, s, t, ws)
            coor[i, s:t] = _distance(select_position(q, None, keep2, q_min, ws, best), x_sq_all[s:t])
        # Without-edge coreset, interior positions: nb and the position score of nb_coor.
        x_int = torch.index_select(x_all, 0, inner, out=ws.get("x_interior", (p_int, e + 1), features))
        x_sq_int = x_sq_all[inner]
        for s, t in _row_chunks(p_int, cfg.chunk_size):
            q = sq_distances(x_int[s:t], "without_edge")
            q_min = q.amin(dim=1)
            blocked_d = _blocked_distribution(
                nb_logits[i, s:t], cfg.softmax_temperature_alpha, cfg.softmax_nb_gamma, k1, ws
            )
            if original:
                q_d = sq_distances(x_int[s:t], "distribution")
                first = prep.rank_columns.first_allowed(q_d, blocked_d, k1 - 1, ws)
                nb[i, s:t] = _distance(kth_smallest(q, first, q_min, ws), x_sq_int[s:t])
            else:  # entry k is allowed where m(k) is
                blocked = torch.index_select(
                    blocked_d, 1, art.embedding_to_distribution, out=ws.get("blocked_embedding", tuple(q.shape), q)
                )
                best = _masked_min(q, blocked, ws, "masked")
                nb[i, s:t] = _distance(select_position(q, None, None, q_min, ws, best), x_sq_int[s:t])
            best = prep.allowed_interior.nearest_allowed(q, s, t, ws)
            pos_score[i, s:t] = _distance(select_position(q, None, keep1, q_min, ws, best), x_sq_int[s:t])
    nb = g * nb - math.log(g)
    pos_score = g * pos_score - math.log(g)
    coor = g * coor - math.log(g)

    # PatchCore image score: the anomaly_nn distances of each image's highest-scoring position.
    worst = nearest.argmax(dim=1)
    x = torch.cat([features.reshape(b, p, e)[torch.arange(b), worst] - prep.centre, features.new_ones(b, 1)], dim=1)
    q = x @ prep.coresets["with_edge"].T  # (B, K2)
    knn = _distance(
        q.topk(cfg.anomaly_nn, dim=1, largest=False, sorted=True).values,
        torch.linalg.vector_norm(x[:, :e], dim=1).square_()[:, None],
    )
    _, image_pc = patchcore_scores(knn[:, None, :])
    nb_coor = 0.5 * (nb + pos_score)
    image = torch.stack([nb.amax(dim=1), coor.amax(dim=1), image_pc, nb_coor.amax(dim=1)], dim=1)

    r_int, c_int = rows - 2 * pp, cols - 2 * pp
    coarse = torch.stack(
        [
            pad_interior(nb.reshape(b, r_int, c_int), pp),
            coor.reshape(b, rows, cols),
            nearest.reshape(b, rows, cols),
            pad_interior(nb_coor.reshape(b, r_int, c_int), pp),
        ],
        dim=1,
    )  # (B, 4, R, C) in MAP_NAMES order
    full = resize_and_blur(coarse.reshape(b * 4, rows, cols), cfg.imagesize, cfg.blursigma)
    full = full.reshape(b, 4, cfg.imagesize, cfg.imagesize)

    image_list = image.tolist()
    return [
        ImageScores(
            coarse={n: coarse[i, j] for j, n in enumerate(MAP_NAMES)},
            maps={n: full[i, j] for j, n in enumerate(MAP_NAMES)},
            image={n: float(image_list[i][j]) for j, n in enumerate(MAP_NAMES)},
        )
        for i in range(b)
    ]


def score_image(features: Tensor, nb_logits: Tensor, art: ScoringArtefacts, cfg: ScoringConfig) -> ImageScores:
    """Score one image: features (R, C, E), nb_logits (P_int, D). See :func:`score_batch`."""
    return score_batch(features[None], nb_logits[None], art, cfg)[0]
