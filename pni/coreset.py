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


def squared_distances(points: torch.Tensor, centre: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = sum_j (points[i, j] - centre[j])^2`` by direct differences, in one pass
    over ``points``.

    points ``(N, d)`` row-major, centre ``(d,)``, out ``(N,)`` of the points' dtype.
    float32 on the CPU: faiss's SIMD kernel (``fvec_L2sqr_ny``: lane-wise sums, as accurate
    as ``F.pairwise_distance``); otherwise ``torch.cdist`` without the matrix-product expansion.
    """
    n, d = points.shape
    if points.device.type == "cpu" and points.dtype == torch.float32:
        ptr = faiss.swig_ptr
        o, c, x = out.numpy(), centre.contiguous().numpy(), points.numpy()
        faiss.fvec_L2sqr_ny(ptr(o), ptr(c), ptr(x), d, n)  # type: ignore[attr-defined]
        return
    dist = torch.cdist(points, centre[None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
    torch.mul(dist, dist, out=out)


class CentreDistances:
    """The greedy search's update: ``min_dist = min(min_dist, F.pairwise_distance(points, c))``
    for a new centre ``c``, one pass over ``points`` ``(N, d)`` (row-major).

    ``F.pairwise_distance(x, c) = ||x - c + eps||`` (``eps`` = :data:`PAIRWISE_EPS` added to
    every difference) = ``sqrt(||x - c||^2 + 2 eps (sum_j x_j - sum_j c_j) + d eps^2)``: the
    squared norm by direct differences (:func:`squared_distances`), the eps terms from float64
    row sums, added in float64 and rounded once, then the square root in the points' dtype.
    float32 on the CPU: the bank in one slice per thread of ``threads``, each slice measured
    and folded into ``min_dist`` by its own thread (faiss and numpy release the GIL).
    """

    def __init__(self, points: torch.Tensor, threads: int = 1) -> None:
        self.points = points
        n, d = points.shape
        self.d_eps2 = d * PAIRWISE_EPS**2
        # 2 eps sum_j x_j + d eps^2 per point; the centre's part is d eps^2 - this at c
        self.eps_terms = torch.empty(n, dtype=torch.float64, device=points.device)
        for s in range(0, n, 1 << 13):  # in blocks: no temporary of the bank's size
            block = points[s : s + (1 << 13)].sum(dim=1, dtype=torch.float64)
            self.eps_terms[s : s + len(block)] = block * (2 * PAIRWISE_EPS) + self.d_eps2
        self.shift = torch.empty(n, dtype=torch.float64, device=points.device)
        self.dist = torch.empty(n, dtype=points.dtype, device=points.device)
        self.sliced = points.device.type == "cpu" and points.dtype == torch.float32 and threads > 1 and n >= 1 << 14
        self.pool = ThreadPoolExecutor(threads) if self.sliced else None
        self.bounds = np.linspace(0, n, threads + 1).astype(np.int64).tolist()

    def update(self, index: torch.Tensor, min_dist: torch.Tensor) -> None:
        """``min_dist`` ``(N,)`` := its minimum with the distances to ``points[index]``."""
        if self.pool is None:
            squared_distances(self.points, self.points[index], self.dist)  # the pass over the bank
            torch.sub(self.eps_terms, self.eps_terms[index] - self.d_eps2, out=self.shift)
            self.dist.add_(self.shift).sqrt_()  # (the sum in float64, rounded once)
            torch.minimum(min_dist, self.dist, out=min_dist)
            return
        centre_shift = self.d_eps2 - float(self.eps_terms[index])
        arrays = (self.points.numpy(), self.points[index].numpy(), self.eps_terms.numpy(), self.shift.numpy())
        parts = zip(self.bounds[:-1], self.bounds[1:])
        jobs = [
            self.pool.submit(self._slice, *arrays, self.dist.numpy(), min_dist.numpy(), s, e, centre_shift)
            for s, e in parts
        ]
        for job in jobs:
            job.result()

    @staticmethod
    def _slice(
        x: np.ndarray,
        c: np.ndarray,
        eps_terms: np.ndarray,
        shift: np.ndarray,
        dist: np.ndarray,
        min_dist: np.ndarray,
        s: int,
        e: int,
        centre_shift: float,
    ) -> None:
        ptr = faiss.swig_ptr
        faiss.fvec_L2sqr_ny(ptr(dist[s:e]), ptr(c), ptr(x[s:e]), x.shape[1], e - s)  # type: ignore[attr-defined]
        np.add(eps_terms[s:e], centre_shift, out=shift[s:e])
        np.add(dist[s:e], shift[s:e], out=dist[s:e], casting="same_kind")  # in float64, rounded once
        np.sqrt(dist[s:e], out=dist[s:e])
        np.minimum(min_dist[s:e], dist[s:e], out=min_dist[s:e])

    def close(self) -> None:
        """Stop the threads."""
        if self.pool is not None:
            self.pool.shutdown()


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
    ``F.pairwise_distance(x, c) = ||x - c + eps||`` from direct differences
    (:class:`CentreDistances`), never ``|x|^2 - 2 x.c + |c|^2`` (which cancels badly for
    features far from the origin and parts near-ties the other way); the chosen point is
    ``torch.argmax`` (first index among equal maxima) of the minimum over the centres.

    points ``(N, d)`` (row-major; other layouts are copied once) -> LongTensor ``(n_select,)``
    of row indices in selection order.
    """
    n = points.shape[0]
    if not 0 < n_select < n:
        raise ValueError(f"cannot select {n_select} of {n} points besides the start point")
    points = points.contiguous()
    distances = CentreDistances(points, torch.get_num_threads())
    min_dist = torch.full((n,), float("inf"), dtype=points.dtype, device=points.device)
    selected = torch.empty(n_select, dtype=torch.long, device=points.device)

    def add_centre(idx: torch.Tensor) -> None:
        distances.update(idx, min_dist)
        min_dist[idx] = -1.0  # centres never win (guards rounding)

    try:
        add_centre(torch.tensor(start_index, device=points.device))
        steps: Iterable[int] = range(n_select)
        if progress is not None:
            steps = progress(steps)
        for step in steps:
            idx = torch.argmax(min_dist)
            selected[step] = idx
            if step + 1 < n_select:
                add_centre(idx)
    finally:
        distances.close()
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
