"""Greedy k-center coresets (PatchCore) and the faiss indexes that store them (docs/METHOD.md, section 3).

The feature bank is streamed in chunks through a sparse random projection; the greedy
selection then keeps one ``(N,)`` vector of distances to the chosen set, so memory stays
O(N * projected_dim), never N x N.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch
from sklearn.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim

from pni.io import atomic_path

JL_EPS = 0.9
PAIRWISE_EPS = 1e-6
"""``torch.nn.functional.pairwise_distance``'s ``eps``, which the original's greedy search used."""


def projection_matrix(n_samples: int, dim: int, seed: int, eps: float = JL_EPS) -> torch.Tensor | None:
    """Sparse random projection ``(dim, d)`` with ``d`` from Johnson-Lindenstrauss at ``eps``.

    Returns ``None`` when ``d >= dim`` (projecting would not reduce anything), in which case
    the greedy search runs on the features themselves.
    """
    d = int(johnson_lindenstrauss_min_dim(n_samples, eps=eps))
    if d >= dim:
        return None
    proj = SparseRandomProjection(n_components=d, random_state=seed)
    proj.fit(np.zeros((1, dim), dtype=np.float32))
    return torch.from_numpy(proj.components_.toarray().astype(np.float32)).T.contiguous()


def project_chunks(
    chunks: Iterable[np.ndarray | torch.Tensor],
    n_total: int,
    matrix: torch.Tensor | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Stream feature chunks ``(n_i, E)`` through ``matrix`` ``(E, d)`` into one
    preallocated row-major ``(n_total, d)`` tensor on ``device``.

    Row-major, as the original's projected features: the greedy search reads each point's
    ``d`` values together (the distance to a centre by direct differences).
    """
    out: torch.Tensor | None = None
    start = 0
    if matrix is not None:
        matrix = matrix.to(device)
    for chunk in chunks:
        x = torch.as_tensor(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk)
        x = x.to(device=device, dtype=torch.float32)
        y = x @ matrix if matrix is not None else x
        if out is None:
            out = torch.empty((n_total, y.shape[1]), dtype=torch.float32, device=device)
        if start + len(y) > n_total:
            raise ValueError(f"expected {n_total} feature rows, got more")
        out[start : start + len(y)] = y
        start += len(y)
    if out is None or start != n_total:
        raise ValueError(f"expected {n_total} feature rows, got {start}")
    return out


def squared_distances(
    points: torch.Tensor,
    centre: torch.Tensor,
    out: torch.Tensor,
    pool: ThreadPoolExecutor | None = None,
    workers: int = 1,
) -> None:
    """``out[i] = sum_j (points[i, j] - centre[j])^2`` by direct differences, in one pass
    over ``points``.

    points ``(N, d)`` row-major, centre ``(d,)``, out ``(N,)`` of the points' dtype.
    float32 on the CPU: faiss's SIMD kernel (``fvec_L2sqr_ny``, lane-wise sums, as accurate
    as ``F.pairwise_distance``), in ``workers`` slices over ``pool``'s threads when given
    (faiss releases the GIL). Otherwise ``torch.cdist`` without the matrix-product expansion.
    """
    n, d = points.shape
    if points.device.type == "cpu" and points.dtype == torch.float32:
        x, c, o = points.numpy(), centre.contiguous().numpy(), out.numpy()

        def part(s: int, e: int) -> None:
            ptr = faiss.swig_ptr
            faiss.fvec_L2sqr_ny(ptr(o[s:e]), ptr(c), ptr(x[s:e]), d, e - s)  # type: ignore[attr-defined]

        if pool is None or workers < 2 or n < 1 << 14:
            part(0, n)
            return
        bounds = np.linspace(0, n, workers + 1).astype(np.int64).tolist()
        for f in [pool.submit(part, s, e) for s, e in zip(bounds[:-1], bounds[1:])]:
            f.result()
        return
    dist = torch.cdist(points, centre[None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
    torch.mul(dist, dist, out=out)


def greedy_order(
    points: torch.Tensor,
    n_select: int,
    start_index: int,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> torch.Tensor:
    """Approximate greedy k-center from the point ``start_index``: repeatedly take the point
    farthest (Euclidean) from the start and the points chosen so far. The start point itself
    is not part of the selection (the original's first pick is the point farthest from it).

    The original's arithmetic: the distance to each new centre ``c`` is
    ``F.pairwise_distance(x, c) = ||x - c + eps||`` (``eps`` = :data:`PAIRWISE_EPS` added to every
    difference) from direct differences, never ``|x|^2 - 2 x.c + |c|^2`` (which cancels badly for
    features far from the origin and parts near-ties the other way); the chosen point is
    ``torch.argmax`` (first index among equal maxima) of the minimum over the centres.

    points ``(N, d)`` (row-major; other layouts are copied once) -> LongTensor ``(n_select,)``
    of row indices in selection order.
    """
    n, d = points.shape
    if not 0 < n_select < n:
        raise ValueError(f"cannot select {n_select} of {n} points besides the start point")
    points = points.contiguous()
    device, dtype = points.device, points.dtype
    # ||x - c + eps||^2 = ||x - c||^2 + 2 eps (sum_j x_j - sum_j c_j) + d eps^2: the eps terms
    # from float64 row sums (in blocks: no temporary of the bank's size), so that only
    # ||x - c||^2 needs a pass over the bank.
    row_sums = torch.empty(n, dtype=torch.float64, device=device)
    for s in range(0, n, 1 << 13):
        row_sums[s : s + (1 << 13)] = points[s : s + (1 << 13)].sum(dim=1, dtype=torch.float64)
    eps_terms = row_sums * (2 * PAIRWISE_EPS) + d * PAIRWISE_EPS**2
    shift = torch.empty(n, dtype=torch.float64, device=device)
    min_dist = torch.full((n,), float("inf"), dtype=dtype, device=device)
    dist = torch.empty(n, dtype=dtype, device=device)
    selected = torch.empty(n_select, dtype=torch.long, device=device)
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads) if device.type == "cpu" and threads > 1 else None

    def add_centre(idx: torch.Tensor) -> None:
        squared_distances(points, points[idx], dist, pool, threads)  # the one pass over the bank
        torch.add(eps_terms, row_sums[idx], alpha=-2 * PAIRWISE_EPS, out=shift)
        dist.add_(shift).sqrt_()  # the sum in float64, rounded once; then as F.pairwise_distance
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[idx] = -1.0  # centres never win (guards rounding)

    try:
        add_centre(torch.tensor(start_index, device=device))
        steps: Iterable[int] = range(n_select)
        if progress is not None:
            steps = progress(steps)
        for step in steps:
            idx = torch.argmax(min_dist)
            selected[step] = idx
            if step + 1 < n_select:
                add_centre(idx)
    finally:
        if pool is not None:
            pool.shutdown()
    return selected.cpu()


def greedy_coreset(
    chunks: Callable[[], Iterator[np.ndarray]],
    n_total: int,
    dim: int,
    n_select: int,
    seed: int,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> torch.Tensor:
    """Project the features given by ``chunks()`` (a fresh iterator of ``(n_i, dim)`` arrays
    covering ``n_total`` rows) and return ``n_select`` greedy k-center indices."""
    matrix = projection_matrix(n_total, dim, seed)
    projected = project_chunks(chunks(), n_total, matrix, device)
    start = int(np.random.default_rng(seed).integers(n_total))
    return greedy_order(projected, n_select, start, progress)


# ---------------------------------------------------------------- faiss indexes


def build_index(vectors: np.ndarray | torch.Tensor) -> faiss.Index:
    """A flat L2 faiss index holding ``vectors`` ``(K, E)``."""
    v = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors
    v = np.ascontiguousarray(v, dtype=np.float32)
    index = faiss.IndexFlatL2(v.shape[1])
    index.add(v)
    return index


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write a faiss index atomically."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: str | os.PathLike) -> faiss.Index:
    """Read a faiss index written by :func:`save_index` (or the original code)."""
    return faiss.read_index(str(Path(path)))


def index_vectors(index: faiss.Index) -> np.ndarray:
    """All vectors stored in a flat index, ``(K, E)`` float32."""
    return index.reconstruct_n(0, index.ntotal)


def use_gpu_index(index: faiss.Index) -> faiss.Index:
    """Move ``index`` to the GPU when faiss-gpu and CUDA are present, else return it."""
    if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index)
    return index


def nearest_ids(index: faiss.Index, queries: np.ndarray | torch.Tensor, chunk: int = 65536) -> np.ndarray:
    """Id of the nearest index entry for each query row ``(N, E)`` -> ``(N,)`` int64."""
    q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries
    out = np.empty(len(q), dtype=np.int64)
    for s in range(0, len(q), chunk):
        block = np.ascontiguousarray(q[s : s + chunk], dtype=np.float32)
        _, ids = index.search(block, 1)
        out[s : s + chunk] = ids[:, 0]
    return out
