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

import torch
import torch.nn.functional as F
from torch import Tensor

from pni.errors import PNIError

MAP_NAMES: tuple[str, ...] = ("nb", "coor", "patchcore", "nb_coor")
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
        return cls(embedding_without_edge, embedding_with_edge, distribution_coreset, m,
                   position_prior, position_prior_with_edge)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> ScoringArtefacts:
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
            raise PNIError("scoring artefacts do not match the test features "
                           f"({rows}x{cols} grid): " + "; ".join(problems))


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


def interior_indices(rows: int, cols: int, pp: int, device: torch.device | str | None = None
                     ) -> Tensor:
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


def masked_score(dist: Tensor, allowed: Tensor, gamma: float, keep: int | None = None) -> Tensor:
    """``-log(max over allowed k of g*exp(-g*d))`` per row: ``(n, K), (n, K) bool -> (n,)``.

    The farthest entry of each row always counts as allowed (the original's fallback), so
    the result is ``g * d_min_allowed - log(g)``. ``keep``: only the ``keep`` nearest entries
    of a row can be allowed at all (the original's position masks, whose loop over ranks
    loses all but the first :func:`parent_share` of its writes); ``None``: every entry.
    """
    if keep is not None and keep < dist.shape[1]:
        near, ids = dist.topk(keep, dim=1, largest=False, sorted=False)
        d_min = torch.where(allowed.gather(1, ids), near, near.new_tensor(float("inf"))).amin(dim=1)
        return gamma * torch.minimum(d_min, dist.amax(dim=1)) - math.log(gamma)
    allowed = allowed.clone()
    allowed.scatter_(1, dist.argmax(dim=1, keepdim=True), True)
    d_min = torch.where(allowed, dist, dist.new_tensor(float("inf"))).amin(dim=1)
    return gamma * d_min - math.log(gamma)


def nb_allowed_distribution(nb_logits: Tensor, temperature_alpha: float, nb_gamma: float,
                            embedding_coreset_size: int) -> Tensor:
    """Allowed distribution entries ``(n, D) -> bool (n, D)``.

    ``softmax(logits / alpha) > nb_gamma / embedding_coreset_size`` (the original divides by
    the embedding coreset size K1, not by D).
    """
    probs = torch.softmax(nb_logits / temperature_alpha, dim=-1)
    return probs > nb_gamma / embedding_coreset_size


def position_allowed(prior_rows: Tensor, coor_gamma: float, coreset_size: int) -> Tensor:
    """Allowed embedding entries by id from position-prior rows ``(n, K) -> bool (n, K)``."""
    return prior_rows > coor_gamma / coreset_size


def position_scores(dist: Tensor, prior_rows: Tensor, coor_gamma: float, gamma: float,
                    variant: str = "original", mask_workers: int = 8) -> Tensor:
    """Position-masked scores ``(n,)`` from distances ``(n, K)`` and prior rows ``(n, K)``.

    Entry ``k`` is allowed where the prior exceeds ``coor_gamma / K``. ``original``: its mask
    loop runs over ranks, so only the ``parent_share(K, mask_workers)`` nearest entries can be
    allowed; ``paper``: any entry.
    """
    k = dist.shape[1]
    keep = parent_share(k, mask_workers) if variant == "original" else None
    return masked_score(dist, position_allowed(prior_rows, coor_gamma, k), gamma, keep)


def nb_scores(dist_emb: Tensor, allowed_dist: Tensor, embedding_to_distribution: Tensor,
              gamma: float, variant: str = "original", dist_distribution: Tensor | None = None,
              mask_workers: int = 8) -> Tensor:
    """Neighbourhood-masked scores ``(n,)``.

    dist_emb: (n, K1) distances to the embedding coreset; allowed_dist: (n, D) bool from
    :func:`nb_allowed_distribution`; embedding_to_distribution: (K1,) ``m(k)``.

    ``paper``: entry ``k`` is allowed where ``m(k)`` is.
    ``original`` (needs dist_distribution (n, D)): the original's indexing. With ``order_i``
    the distribution ids sorted by distance from feature ``i``, the mask at column ``k`` is
    ``allowed_dist[i, order_i[m(k)]]`` and it applies to the k-th NEAREST embedding entry of
    ``i``; its loop over distribution ids ``j`` keeps only the writes of
    ``j < parent_share(D, mask_workers)``, so column ``k`` stays False unless ``m(k)`` is
    below that; the last sorted column (farthest entry) is always allowed.
    """
    m = embedding_to_distribution
    if variant == "paper":
        return masked_score(dist_emb, allowed_dist[:, m], gamma)
    if variant != "original":
        raise PNIError(f"--variant must be one of {VARIANTS}, got {variant!r}")
    if dist_distribution is None:
        raise ValueError("variant 'original' needs dist_distribution")
    allowed_by_rank = allowed_dist.gather(1, dist_distribution.argsort(dim=1))
    written = m < parent_share(allowed_dist.shape[1], mask_workers)  # (K1,)
    mask = allowed_by_rank[:, m] & written[None, :]  # (n, K1), column k = k-th nearest entry
    mask[:, -1] = True
    # The score is the distance in the first allowed sorted column, so only the nearest
    # (largest first allowed column + 1) distances need sorting.
    first = mask.to(torch.uint8).argmax(dim=1)
    k = int(first.max()) + 1 if first.numel() else 1
    nearest = dist_emb.topk(k, dim=1, largest=False, sorted=True).values
    return gamma * nearest.gather(1, first[:, None])[:, 0] - math.log(gamma)


# ---------------------------------------------------------------------------------------------
# Resize and blur


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
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


def resize_and_blur(maps: Tensor, imagesize: int, sigma: float) -> Tensor:
    """Bilinear resize (align_corners=False) then blur: ``(N, R, C) -> (N, S, S)``."""
    x = F.interpolate(maps[:, None], size=(imagesize, imagesize), mode="bilinear",
                      align_corners=False)
    return gaussian_blur(x[:, 0], sigma)


# ---------------------------------------------------------------------------------------------
# Top level


def score_batch(features: Tensor, nb_logits: Tensor, art: ScoringArtefacts,
                cfg: ScoringConfig) -> list[ImageScores]:
    """Score ``B`` images.

    features: (B, R, C, E) patch features; nb_logits: (B, P_int, D) neighbourhood-MLP logits
    of the interior positions (row-major). Distance matrices are built ``cfg.chunk_size`` rows
    at a time. Returns one :class:`ImageScores` per image.
    """
    b, rows, cols, e = features.shape
    art.check(rows, cols, e)
    if cfg.variant not in VARIANTS:
        raise PNIError(f"--variant must be one of {VARIANTS}, got {cfg.variant!r}")
    parent_share(1, cfg.mask_workers)  # refuses a worker count below 1
    device = features.device
    p = rows * cols
    pp = (cfg.patchsize - 1) // 2
    inner = interior_indices(rows, cols, pp, device)
    p_int = inner.numel()
    k1 = art.embedding_without_edge.shape[0]
    k2 = art.embedding_with_edge.shape[0]
    d = art.distribution_coreset.shape[0]
    if tuple(nb_logits.shape) != (b, p_int, d):
        raise PNIError(f"neighbourhood logits {tuple(nb_logits.shape)} vs ({b}, {p_int}, {d})")
    if not 1 <= cfg.anomaly_nn <= k2:
        raise PNIError(f"--anomaly_nn {cfg.anomaly_nn} must be in 1..{k2} (with-edge coreset)")
    g = cfg.prob_gamma

    # With-edge coreset, all positions: PatchCore k-NN and the coor map.
    flat = features.reshape(b * p, e)
    knn = flat.new_empty(b * p, cfg.anomaly_nn)
    coor = flat.new_empty(b * p)
    for s, t in _row_chunks(b * p, cfg.chunk_size):
        dist = pairwise_distances(flat[s:t], art.embedding_with_edge)
        knn[s:t] = dist.topk(cfg.anomaly_nn, dim=1, largest=False, sorted=True).values
        pos = torch.arange(s, t, device=device) % p
        coor[s:t] = position_scores(dist, art.position_prior_with_edge[pos], cfg.softmax_coor_gamma, g,
                                    cfg.variant, cfg.mask_workers)

    # Without-edge coreset, interior positions: nb map and the position score of nb_coor.
    flat_int = features.reshape(b, p, e)[:, inner].reshape(b * p_int, e)
    logits = nb_logits.reshape(b * p_int, d)
    nb = flat.new_empty(b * p_int)
    pos_score = flat.new_empty(b * p_int)
    for s, t in _row_chunks(b * p_int, cfg.chunk_size):
        x = flat_int[s:t]
        dist = pairwise_distances(x, art.embedding_without_edge)
        dist_d = (pairwise_distances(x, art.distribution_coreset)
                  if cfg.variant == "original" else None)
        allowed_d = nb_allowed_distribution(logits[s:t], cfg.softmax_temperature_alpha,
                                            cfg.softmax_nb_gamma, k1)
        nb[s:t] = nb_scores(dist, allowed_d, art.embedding_to_distribution, g, cfg.variant,
                            dist_d, cfg.mask_workers)
        pos = inner[torch.arange(s, t, device=device) % p_int]
        pos_score[s:t] = position_scores(dist, art.position_prior[pos], cfg.softmax_coor_gamma, g,
                                         cfg.variant, cfg.mask_workers)

    pixel_pc, image_pc = patchcore_scores(knn.reshape(b, p, cfg.anomaly_nn))
    nb = nb.reshape(b, p_int)
    nb_coor = 0.5 * (nb + pos_score.reshape(b, p_int))
    coor = coor.reshape(b, p)
    image = torch.stack([nb.amax(dim=1), coor.amax(dim=1), image_pc, nb_coor.amax(dim=1)], dim=1)

    r_int, c_int = rows - 2 * pp, cols - 2 * pp
    coarse = torch.stack([
        pad_interior(nb.reshape(b, r_int, c_int), pp),
        coor.reshape(b, rows, cols),
        pixel_pc.reshape(b, rows, cols),
        pad_interior(nb_coor.reshape(b, r_int, c_int), pp),
    ], dim=1)  # (B, 4, R, C) in MAP_NAMES order
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


def score_image(features: Tensor, nb_logits: Tensor, art: ScoringArtefacts,
                cfg: ScoringConfig) -> ImageScores:
    """Score one image: features (R, C, E), nb_logits (P_int, D). See :func:`score_batch`."""
    return score_batch(features[None], nb_logits[None], art, cfg)[0]
