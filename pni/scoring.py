"""Per-image anomaly scoring (docs/METHOD.md, section 5): pure torch, device-agnostic, no Lightning/faiss.

Notation: a feature grid has ``R x C`` positions, ``P = R*C``, ``E`` = feature dimension,
``pp = patch_padding(patchsize)``; "interior" positions are rows/cols ``pp..R-pp-1`` (``P_int``
of them, row-major). ``K1`` / ``K2`` = without-edge / with-edge embedding coreset sizes, ``D`` =
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

Entry points: :class:`Scorer` (derives what it needs from the artefacts once, then scores
image after image) and :func:`score_image` (one image, nothing kept). The vectorised kernels
(masked minima, rank counts, k-th smallest values, scratch memory) are in
:mod:`pni.scoring_kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from pni.errors import PNIError
from pni.features import patch_padding
from pni.maps import MAP_NAMES
from pni.scoring_kernels import (
    ChunkDistances,
    ExactEntries,
    PositionMask,
    RankColumns,
    Workspace,
    masked,
    nearest_ids,
    resize_and_blur,
    row_chunks,
)

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
# Grid helpers, PatchCore, masks


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


def blocked_distribution(
    nb_logits: Tensor, temperature_alpha: float, nb_gamma: float, embedding_coreset_size: int, workspace: Workspace
) -> Tensor:
    """The neighbourhood mask over the distribution entries as a blocked indicator: ``(n, D)``
    logits -> ``(n, D)``, 1.0 where ``softmax(logits / alpha)`` is at most ``nb_gamma / K1``
    (the original divides by the embedding coreset size K1, not by D), 0.0 where allowed."""
    scaled = workspace.get("scaled_logits", tuple(nb_logits.shape), nb_logits)
    probs = torch.softmax(torch.div(nb_logits, temperature_alpha, out=scaled), dim=-1)
    out = workspace.get("blocked_distribution", tuple(probs.shape), probs)
    return torch.le(probs, nb_gamma / embedding_coreset_size, out=out)


def position_allowed(prior_rows: Tensor, coor_gamma: float, coreset_size: int) -> Tensor:
    """Allowed embedding entries by id from position-prior rows ``(n, K) -> bool (n, K)``."""
    return prior_rows > coor_gamma / coreset_size


# ---------------------------------------------------------------------------------------------
# The four maps


class Scorer:
    """Scores the images of one ``rows x cols`` feature grid against ``art`` under ``cfg``.

    What scoring derives from the artefacts is derived once, here: each coreset as
    ``[-2 (y - c), |y - c|^2]`` (``c``: the with-edge coreset's mean), the position masks, the
    neighbourhood mask's columns by rank (variant ``original``), and scratch memory (so one
    scorer is not for concurrent use). :class:`pni.model.PNIModel` keeps one per setting.

    Every mask only decides which entry's distance a row takes (the nearest allowed one, the
    k-th nearest, the farthest). Each chunk of rows is one matrix product per coreset,
    ``q = [x - c, 1] @ [-2 (y - c), |y - c|^2]^T``, the squared distance less ``|x - c|^2`` in
    float32; the comparisons it cannot decide within its error bound, and every distance a
    map takes, are computed exactly (float64 direct differences:
    :class:`pni.scoring_kernels.ChunkDistances`). The maps are made in float64 and returned in
    the features' dtype.
    """

    def __init__(self, art: ScoringArtefacts, cfg: ScoringConfig, rows: int, cols: int) -> None:
        if cfg.variant not in VARIANTS:
            raise PNIError(f"--variant must be one of {VARIANTS}, got {cfg.variant!r}")
        parent_share(1, cfg.mask_workers)  # refuses a worker count below 1
        self.art, self.cfg, self.rows, self.cols = art, cfg, rows, cols
        self.pp = patch_padding(cfg.patchsize)
        art.check(rows, cols, art.embedding_with_edge.shape[1])
        self.k1, self.k2 = art.embedding_without_edge.shape[0], art.embedding_with_edge.shape[0]
        self.d = art.distribution_coreset.shape[0]
        if not 1 <= cfg.anomaly_nn <= self.k2:
            raise PNIError(f"--anomaly_nn {cfg.anomaly_nn} must be in 1..{self.k2} (with-edge coreset)")
        self.original = cfg.variant == "original"
        # the lost writes of the original's position-mask loops over ranks (None: all kept)
        self.keep1 = parent_share(self.k1, cfg.mask_workers) if self.original else None
        self.keep2 = parent_share(self.k2, cfg.mask_workers) if self.original else None
        self.centre = art.embedding_with_edge.mean(dim=0)
        dtype = self.centre.dtype
        self.entries = {
            "with_edge": art.embedding_with_edge,
            "without_edge": art.embedding_without_edge,
            "distribution": art.distribution_coreset,
        }
        self.coresets, self.exact_entries = {}, {}
        for name, entries in self.entries.items():
            self.exact_entries[name] = ExactEntries(entries)  # for direct differences
            centred = entries - self.centre
            sq = (centred * centred).sum(dim=1, keepdim=True)
            self.coresets[name] = torch.cat([-2.0 * centred, sq], dim=1)
        self.inner = interior_indices(rows, cols, self.pp, art.position_prior.device)
        gamma = cfg.softmax_coor_gamma
        self.allowed_with_edge = PositionMask(position_allowed(art.position_prior_with_edge, gamma, self.k2), dtype)
        self.allowed_interior = PositionMask(position_allowed(art.position_prior[self.inner], gamma, self.k1), dtype)
        self.rank_columns = (
            RankColumns.build(art.embedding_to_distribution, parent_share(self.d, cfg.mask_workers))
            if self.original
            else None
        )
        self.workspace = Workspace()

    def _distances(self, name: str, x_aug: Tensor, x_sq: Tensor, x: Tensor) -> ChunkDistances:
        """Rows ``[x - c, 1]`` ``(n, E + 1)`` with their ``|x - c|^2`` ``(n,)`` and the features
        ``x`` ``(n, E)`` against coreset ``name``."""
        entries = self.coresets[name]
        q = torch.mm(x_aug, entries.T, out=self.workspace.get("q_" + name, (x.shape[0], entries.shape[0]), x))
        return ChunkDistances(q, x_sq, entries[:, -1], x, self.exact_entries[name], self.workspace)

    def __call__(self, features: Tensor, nb_logits: Tensor) -> ImageScores:
        """Score one image: features ``(R, C, E)``, neighbourhood-MLP logits ``(P_int, D)`` of
        the interior positions (row-major). Distance matrices are built ``cfg.chunk_size``
        rows at a time."""
        rows, cols, e = features.shape
        art, cfg, ws = self.art, self.cfg, self.workspace
        if (rows, cols) != (self.rows, self.cols):
            raise PNIError(f"a {rows}x{cols} feature grid given to the scorer of {self.rows}x{self.cols} grids")
        art.check(rows, cols, e)
        coreset = art.embedding_with_edge
        if {(t.dtype, t.device) for t in (features, nb_logits, coreset)} != {(coreset.dtype, coreset.device)}:
            raise PNIError(
                f"features ({features.dtype}, {features.device}), neighbourhood logits ({nb_logits.dtype}, "
                f"{nb_logits.device}) and artefacts ({coreset.dtype}, {coreset.device}) must share dtype "
                "and device"
            )
        p, inner, p_int = rows * cols, self.inner, self.inner.numel()
        if tuple(nb_logits.shape) != (p_int, self.d):
            raise PNIError(f"neighbourhood logits {tuple(nb_logits.shape)} vs ({p_int}, {self.d})")
        x_all = features.reshape(p, e)
        x_aug = ws.get("x", (p, e + 1), features)  # [x - c, 1]
        torch.sub(x_all, self.centre, out=x_aug[:, :e])
        x_aug[:, e] = 1.0
        x_sq_all = torch.linalg.vector_norm(x_aug[:, :e], dim=1).square_()
        # squared distances (exact, float64) of the entries each map takes
        sq = {name: features.new_empty(n, dtype=torch.float64) for name, n in (("nearest", p), ("coor", p))}
        sq.update((name, features.new_empty(p_int, dtype=torch.float64)) for name in ("nb", "position"))
        # With-edge coreset, all positions: PatchCore and the coor map.
        for s, t in row_chunks(p, cfg.chunk_size):
            dist = self._distances("with_edge", x_aug[s:t], x_sq_all[s:t], x_all[s:t])
            near_ids, _ = dist.nearest()
            sq["nearest"][s:t] = near = dist.exact(None, near_ids)
            ids, v = self.allowed_with_edge.nearest_allowed(dist, s, t)
            sq["coor"][s:t] = dist.values(dist.select(ids, v, self.keep2, near_ids), near_ids, near)
        # Without-edge coreset, interior positions: nb and the position score of nb_coor.
        x_int = x_all.index_select(0, inner)
        x_aug_int = torch.index_select(x_aug, 0, inner, out=ws.get("x_interior", (p_int, e + 1), features))
        x_sq_int = x_sq_all[inner]
        for s, t in row_chunks(p_int, cfg.chunk_size):
            dist = self._distances("without_edge", x_aug_int[s:t], x_sq_int[s:t], x_int[s:t])
            near_ids, _ = dist.nearest()
            near = dist.exact(None, near_ids)
            nb_ids = self._neighbourhood_select(dist, near_ids, x_aug_int[s:t], nb_logits[s:t])
            sq["nb"][s:t] = dist.values(nb_ids, near_ids, near)
            ids, v = self.allowed_interior.nearest_allowed(dist, s, t)
            sq["position"][s:t] = dist.values(dist.select(ids, v, self.keep1, near_ids), near_ids, near)
        g = cfg.prob_gamma
        nearest = sq["nearest"].sqrt()
        nb, pos_score, coor = (g * sq[name].sqrt() - math.log(g) for name in ("nb", "position", "coor"))
        nb_coor = 0.5 * (nb + pos_score)

        # PatchCore image score: the anomaly_nn distances of the highest-scoring position.
        worst, n = int(nearest.argmax()), cfg.anomaly_nn
        repeat = torch.full((n,), worst, device=features.device)  # one row per neighbour
        dist = self._distances("with_edge", x_aug[repeat], x_sq_all[repeat], x_all[repeat])
        knn = dist.exact(None, dist.kth(torch.arange(n, device=features.device), dist.nearest()[0])).sqrt()
        _, image_pc = patchcore_scores(knn[None, None, :])
        image = [float(nb.amax()), float(coor.amax()), float(image_pc[0]), float(nb_coor.amax())]

        r_int, c_int = rows - 2 * self.pp, cols - 2 * self.pp
        coarse = torch.stack(
            [
                pad_interior(nb.reshape(r_int, c_int), self.pp),
                coor.reshape(rows, cols),
                nearest.reshape(rows, cols),
                pad_interior(nb_coor.reshape(r_int, c_int), self.pp),
            ]
        )  # (4, R, C) in MAP_NAMES order, float64
        full = resize_and_blur(coarse, cfg.imagesize, cfg.blursigma).to(features.dtype)
        coarse = coarse.to(features.dtype)
        return ImageScores(
            coarse={n: coarse[j] for j, n in enumerate(MAP_NAMES)},
            maps={n: full[j] for j, n in enumerate(MAP_NAMES)},
            image={n: image[j] for j, n in enumerate(MAP_NAMES)},
        )

    def _neighbourhood_select(
        self, dist: ChunkDistances, nearest_ids: Tensor, x_aug: Tensor, nb_logits: Tensor
    ) -> Tensor:
        """Id ``(n,)`` of the entry the neighbourhood mask selects, from the rows' distances
        ``dist`` to the without-edge coreset, their nearest entries, their rows ``[x - c, 1]``
        and their logits ``(n, D)``."""
        cfg, ws = self.cfg, self.workspace
        blocked_d = blocked_distribution(nb_logits, cfg.softmax_temperature_alpha, cfg.softmax_nb_gamma, self.k1, ws)
        if self.rank_columns is not None:  # original: sorted column k allowed where rank m(k) is
            to_distribution = self._distances("distribution", x_aug, dist.x_sq, dist.x)
            return dist.kth(self.rank_columns.first_allowed(to_distribution, blocked_d, self.k1 - 1), nearest_ids)
        # paper: entry k is allowed where m(k) is
        blocked = torch.index_select(
            blocked_d,
            1,
            self.art.embedding_to_distribution,
            out=ws.get("blocked_embedding", tuple(dist.q.shape), dist.q),
        )
        ids, v = dist.nearest(masked(dist.q, blocked, ws, "masked"))
        return dist.select(ids, v, None, nearest_ids)


def score_image(features: Tensor, nb_logits: Tensor, art: ScoringArtefacts, cfg: ScoringConfig) -> ImageScores:
    """Score one image: features ``(R, C, E)``, nb_logits ``(P_int, D)``. See :class:`Scorer`
    (which keeps what it derives from the artefacts for the next image)."""
    return Scorer(art, cfg, features.shape[0], features.shape[1])(features, nb_logits)
