"""Test oracle: the original's three mask loops run under real ``pymp.Parallel``.

Imports numpy and pymp only (pymp forks, and a fork deadlocks once torch or faiss has used
OpenMP in the process), so the tests run it in a fresh interpreter:

    python pymp_original_masks.py FOLDER WORKERS [WORKERS ...]

FOLDER holds ``feat.npy`` (P, E), ``inner.npy`` (P_int,) interior positions, ``logits.npy``
(P_int, D), ``emb1.npy`` (K1, E), ``emb2.npy`` (K2, E), ``dcs.npy`` (D, E), ``prior1.npy``
(P, K1), ``prior2.npy`` (P, K2) and ``config.json`` (prob_gamma, softmax_temperature_alpha,
softmax_nb_gamma, softmax_coor_gamma). For each worker count it writes
``coor_w<W>.npy`` (P,), ``nb_w<W>.npy`` and
``pos_w<W>.npy`` (P_int,).

The loops follow the published code's structure: every coreset entry of a position sorted
by distance (its faiss search with k = all entries), masks that are plain numpy arrays
filled inside ``pymp.Parallel(W)`` loops, over ranks for the position masks and over
distribution ids for the neighbourhood mask, the last (farthest) column set afterwards,
and the score ``-log(max(prob_sorted * mask))``.

``bench/bench_scoring.py`` times the same loops (:func:`original_scores`) after faiss
searches, with :class:`Serial` in place of ``pymp.Parallel`` (one process, every write
kept: the semantics of ``--mask_workers 1``).
"""

import json
import sys

import numpy as np
import pymp


def sorted_search(x, y):
    """Distances (Euclidean) and ids of every row of ``y`` for each row of ``x``, ascending."""
    d = np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    ids = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, ids, axis=1), ids


class Serial:
    """Stands in for ``pymp.Parallel(1)`` without its process-sharing set-up: the loop runs
    in this process and every iteration's writes are kept."""

    def __init__(self, workers=1):
        if workers != 1:
            raise ValueError("Serial runs one worker")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def range(*args):
        return range(*args)


def position_mask(prior_rows, ids, gamma, workers, parallel=pymp.Parallel):
    k = ids.shape[1]
    rows = np.arange(len(ids))
    mask = np.zeros(ids.shape, dtype=bool)  # a plain array: the workers' writes are lost
    with parallel(workers) as p:
        for rank in p.range(k):
            mask[:, rank] = prior_rows[rows, ids[:, rank]] > gamma / k
    mask[:, -1] = True
    return mask


def neighbourhood_mask(allowed_by_rank, m, k1, workers, parallel=pymp.Parallel):
    mask = np.zeros((len(allowed_by_rank), k1), dtype=bool)
    with parallel(workers) as p:
        for j in p.range(allowed_by_rank.shape[1]):  # distribution ids
            mask[:, m == j] = allowed_by_rank[:, j][:, None]
    mask[:, -1] = True
    return mask


def score(dist_sorted, mask, g):
    return -np.log(np.max(g * np.exp(-g * dist_sorted) * mask, axis=1))


def original_scores(searches, logits, m, prior1_interior, prior2, cfg, workers, parallel=pymp.Parallel):
    """coor ``(P,)``, nb and the position score of nb_coor ``(P_int,)`` from the sorted
    searches ``{'with_edge': (d2, ids2), 'without_edge': (d1, ids1), 'distribution': ids_d}``
    (Euclidean distances, ascending, and entry ids)."""
    g = cfg["prob_gamma"]
    d2, ids2 = searches["with_edge"]
    d1, ids1 = searches["without_edge"]
    k1 = ids1.shape[1]
    z = logits / cfg["softmax_temperature_alpha"]
    soft = np.exp(z - z.max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    allowed_by_rank = np.take_along_axis(soft, searches["distribution"], axis=1) > cfg["softmax_nb_gamma"] / k1
    coor = score(d2, position_mask(prior2, ids2, cfg["softmax_coor_gamma"], workers, parallel), g)
    nb = score(d1, neighbourhood_mask(allowed_by_rank, m, k1, workers, parallel), g)
    pos = score(d1, position_mask(prior1_interior, ids1, cfg["softmax_coor_gamma"], workers, parallel), g)
    return coor, nb, pos


def main(folder, worker_counts):
    def load(name):
        return np.load(f"{folder}/{name}.npy")

    feat, inner, logits = load("feat"), load("inner"), load("logits")
    emb1, emb2, dcs, prior1, prior2 = load("emb1"), load("emb2"), load("dcs"), load("prior1"), load("prior2")
    with open(f"{folder}/config.json") as fh:
        cfg = json.load(fh)
    x = feat[inner]
    searches = {
        "with_edge": sorted_search(feat, emb2),
        "without_edge": sorted_search(x, emb1),
        "distribution": sorted_search(x, dcs)[1],
    }
    m = np.argmin(((emb1[:, None, :] - dcs[None, :, :]) ** 2).sum(-1), axis=1)
    for workers in worker_counts:
        coor, nb, pos = original_scores(searches, logits, m, prior1[inner], prior2, cfg, workers)
        for name, value in (("coor", coor), ("nb", nb), ("pos", pos)):
            np.save(f"{folder}/{name}_w{workers}.npy", value)


if __name__ == "__main__":
    main(sys.argv[1], [int(w) for w in sys.argv[2:]])
