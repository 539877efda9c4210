#!/usr/bin/env python
"""PNI scoring: our vectorised ``pni.scoring.score_image`` against naive loop ports of the
original arithmetic, on the same artefacts, in the same run.

Two naive ports, both written like the loop reference in ``tests/test_scoring.py``
(``naive_scores``): one Python iteration per grid position, and the same arithmetic per
position (distances, ``g*exp(-g*d)``, masks, ``-log max``, the original's rank/id indexing
of the neighbourhood mask):

- ``loop``: the test's reference as it is: Python loops over positions AND coreset entries
  (pure-Python distances over the ``E`` feature values);
- ``numpy``: a loop over positions only, each position vectorised over the coreset entries
  with numpy (closer to the original's per-position loops, which got their distances from
  faiss and then worked position by position).

The naive ports are far too slow for a whole 60x60 grid, so each runs on a sample of
positions spread over the grid (edge and interior) and its time is scaled linearly to the
whole grid: ``t_edge * P + t_interior * P_int`` (per-position costs, measured). Their values
at those positions are compared with the vectorised maps (``coarse`` maps before resize and
blur; the vectorised time includes the resize + blur of the four maps, the naive ones don't).

Default size: a 60x60 grid (480 px, layer2), E = 1024, 7,000 entries in each embedding
coreset, 2,048 distribution entries. Last line: the speed-ups and the largest difference.
"""
from __future__ import annotations

import argparse
import math
import time

import common  # noqa: F401  (sys.path, environment)
import numpy as np
import torch

from common import add_device_flag, best, machine, pick_device, timeit
from pni.scoring import ScoringArtefacts, ScoringConfig, score_image


# ---------------------------------------------------------------------------------------------
# Artefacts that look like trained ones


def make_artefacts(rows, cols, dim, k1, k2, dcs, patchsize, seed=0):
    """Features near the training entries (so nearest distances are small against the
    feature norms, as with real features), logits peaked at the nearest distribution
    entries, sparse normalised position priors. float32 tensors."""
    g = torch.Generator().manual_seed(seed)
    pp = (patchsize - 1) // 2
    p, p_int = rows * cols, (rows - 2 * pp) * (cols - 2 * pp)
    centres = torch.rand(256, dim, generator=g) * 2.0  # non-negative, like pooled ReLU maps

    def around(n, spread):
        pick = torch.randint(0, len(centres), (n,), generator=g)
        return (centres[pick] + spread * torch.randn(n, dim, generator=g)).clamp_min_(0.0)

    emb1 = around(k1, 0.3)
    emb2 = around(k2, 0.3)
    dist = emb1[:dcs].clone()  # the distribution coreset is a prefix of the greedy order
    feat = (emb1[torch.randint(0, k1, (p,), generator=g)] + 0.1 * torch.randn(p, dim, generator=g))
    feat = feat.clamp_min_(0.0).reshape(rows, cols, dim)
    inner = feat[pp:rows - pp, pp:cols - pp].reshape(p_int, dim)
    logits = -3.0 * torch.cdist(inner, dist) / math.sqrt(dim) * 8 + torch.randn(p_int, dcs, generator=g)

    def prior(k):
        counts = torch.zeros(p, k)
        ids = torch.randint(0, k, (p, 24), generator=g)
        counts.scatter_add_(1, ids, torch.rand(p, 24, generator=g) * 4)
        counts[torch.randperm(p, generator=g)[: p // 50]] = 0.0  # some positions never seen
        total = counts.sum(1, keepdim=True)
        return torch.where(total > 0, counts / total.clamp_min(1e-12), counts)

    art = ScoringArtefacts.build(emb1, emb2, dist, prior(k1), prior(k2), chunk_size=2048)
    return feat, logits, art


# ---------------------------------------------------------------------------------------------
# Naive ports (per position), the arithmetic of tests/test_scoring.py::naive_scores


def _dist_py(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _neg_log_max(probs, mask):
    return -math.log(max(p * (1.0 if a else 0.0) for p, a in zip(probs, mask)))


class NaiveLoop:
    """Loops over positions and entries (the test's reference); Python lists of floats."""

    def __init__(self, feat, logits, art, cfg):
        self.cfg = cfg
        self.feat = feat.double().reshape(-1, feat.shape[-1]).tolist()
        self.logits = logits.double().tolist()
        self.emb1 = art.embedding_without_edge.double().tolist()
        self.emb2 = art.embedding_with_edge.double().tolist()
        self.dcs = art.distribution_coreset.double().tolist()
        self.m = art.embedding_to_distribution.tolist()
        self.prior1 = art.position_prior.double().numpy()
        self.prior2 = art.position_prior_with_edge.double().numpy()

    def edge(self, i):
        cfg, g = self.cfg, self.cfg.prob_gamma
        k2 = len(self.emb2)
        d = [_dist_py(self.feat[i], e) for e in self.emb2]
        knn = sorted(d)[: cfg.anomaly_nn]
        probs = [g * math.exp(-g * x) for x in d]
        row = self.prior2[i].tolist()
        mask = [row[k] > cfg.softmax_coor_gamma / k2 for k in range(k2)]
        mask[max(range(k2), key=d.__getitem__)] = True
        return knn[0], _neg_log_max(probs, mask)

    def interior(self, i, j):
        cfg, g = self.cfg, self.cfg.prob_gamma
        k1 = len(self.emb1)
        d = [_dist_py(self.feat[i], e) for e in self.emb1]
        probs = [g * math.exp(-g * x) for x in d]
        z = [v / cfg.softmax_temperature_alpha for v in self.logits[j]]
        zmax = max(z)
        ex = [math.exp(v - zmax) for v in z]
        total = sum(ex)
        allowed_dist = [v / total > cfg.softmax_nb_gamma / k1 for v in ex]
        far = max(range(k1), key=d.__getitem__)
        if cfg.variant == "paper":
            mask = [allowed_dist[self.m[k]] for k in range(k1)]
            mask[far] = True
            nb = _neg_log_max(probs, mask)
        else:
            dd = [_dist_py(self.feat[i], x) for x in self.dcs]
            order = sorted(range(len(self.dcs)), key=dd.__getitem__)
            by_rank = [allowed_dist[order[q]] for q in range(len(self.dcs))]
            mask = [by_rank[self.m[k]] for k in range(k1)]
            mask[-1] = True
            probs_sorted = [g * math.exp(-g * x) for x in sorted(d)]
            nb = _neg_log_max(probs_sorted, mask)
        row = self.prior1[i].tolist()
        pmask = [row[k] > cfg.softmax_coor_gamma / k1 for k in range(k1)]
        pmask[far] = True
        return nb, _neg_log_max(probs, pmask)


class NaiveNumpy:
    """A loop over positions; each position vectorised over the entries with numpy."""

    def __init__(self, feat, logits, art, cfg):
        self.cfg = cfg
        self.feat = feat.double().reshape(-1, feat.shape[-1]).numpy()
        self.logits = logits.double().numpy()
        self.emb1 = art.embedding_without_edge.double().numpy()
        self.emb2 = art.embedding_with_edge.double().numpy()
        self.dcs = art.distribution_coreset.double().numpy()
        self.m = art.embedding_to_distribution.numpy()
        self.prior1 = art.position_prior.double().numpy()
        self.prior2 = art.position_prior_with_edge.double().numpy()

    @staticmethod
    def _score(probs, mask):
        return -np.log(np.max(probs * mask))

    def edge(self, i):
        cfg, g = self.cfg, self.cfg.prob_gamma
        d = np.sqrt(((self.emb2 - self.feat[i]) ** 2).sum(axis=1))
        knn = np.sort(d)[: cfg.anomaly_nn]
        probs = g * np.exp(-g * d)
        mask = self.prior2[i] > cfg.softmax_coor_gamma / len(self.emb2)
        mask[np.argmax(d)] = True
        return float(knn[0]), float(self._score(probs, mask))

    def interior(self, i, j):
        cfg, g = self.cfg, self.cfg.prob_gamma
        k1 = len(self.emb1)
        d = np.sqrt(((self.emb1 - self.feat[i]) ** 2).sum(axis=1))
        probs = g * np.exp(-g * d)
        z = self.logits[j] / cfg.softmax_temperature_alpha
        ex = np.exp(z - z.max())
        allowed_dist = ex / ex.sum() > cfg.softmax_nb_gamma / k1
        far = np.argmax(d)
        if cfg.variant == "paper":
            mask = allowed_dist[self.m].copy()
            mask[far] = True
            nb = self._score(probs, mask)
        else:
            dd = np.sqrt(((self.dcs - self.feat[i]) ** 2).sum(axis=1))
            by_rank = allowed_dist[np.argsort(dd, kind="stable")]
            mask = by_rank[self.m].copy()
            mask[-1] = True
            nb = self._score(g * np.exp(-g * np.sort(d)), mask)
        pmask = self.prior1[i] > cfg.softmax_coor_gamma / k1
        pmask[far] = True
        return float(nb), float(self._score(probs, pmask))


def run_naive(naive, positions, rows, cols, pp, coarse):
    """Time the naive port at ``positions`` (flat indices); compare with the vectorised
    coarse maps. Returns (seconds per edge part, seconds per interior part, {map: max |diff|})."""
    t_edge, t_int = [], []
    diff = {"patchcore": 0.0, "coor": 0.0, "nb": 0.0, "nb_coor": 0.0}
    c_int = cols - 2 * pp
    for i in positions:
        r, c = divmod(int(i), cols)
        t = time.perf_counter()
        pc, coor = naive.edge(int(i))
        t_edge.append(time.perf_counter() - t)
        diff["patchcore"] = max(diff["patchcore"], abs(pc - float(coarse["patchcore"][r, c])))
        diff["coor"] = max(diff["coor"], abs(coor - float(coarse["coor"][r, c])))
        if pp <= r < rows - pp and pp <= c < cols - pp:
            j = (r - pp) * c_int + (c - pp)
            t = time.perf_counter()
            nb, pos = naive.interior(int(i), j)
            t_int.append(time.perf_counter() - t)
            diff["nb"] = max(diff["nb"], abs(nb - float(coarse["nb"][r, c])))
            diff["nb_coor"] = max(diff["nb_coor"], abs(0.5 * (nb + pos) - float(coarse["nb_coor"][r, c])))
    return float(np.mean(t_edge)), float(np.mean(t_int)) if t_int else 0.0, diff


def sample_positions(rows, cols, pp, n, seed=0):
    """``n`` flat positions: the four corners' neighbourhood (edge) and the rest spread over
    the interior."""
    rng = np.random.default_rng(seed)
    edge = [0, cols - 1, (rows - 1) * cols, rows * cols - 1][: max(1, n // 4)]
    n_int = max(1, n - len(edge))
    rr = rng.integers(pp, rows - pp, n_int)
    cc = rng.integers(pp, cols - pp, n_int)
    return edge + list(rr * cols + cc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--cols", type=int, default=60)
    p.add_argument("--dim", type=int, default=1024, help="feature dimension E")
    p.add_argument("--k1", type=int, default=7000, help="without-edge embedding coreset size")
    p.add_argument("--k2", type=int, default=7000, help="with-edge embedding coreset size")
    p.add_argument("--dcs", type=int, default=2048, help="distribution coreset size")
    p.add_argument("--patchsize", type=int, default=5)
    p.add_argument("--variant", default="original", choices=("original", "paper"))
    p.add_argument("--mask_workers", type=int, default=1,
                   help="lost parallel writes reproduced by --variant original (the ports model 1: none)")
    p.add_argument("--loop_positions", type=int, default=6, help="positions run by the pure-loop port")
    p.add_argument("--numpy_positions", type=int, default=40, help="positions run by the numpy port")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the vectorised scoring")
    add_device_flag(p)
    args = p.parse_args(argv)
    device = pick_device(args)
    print(f"machine: {machine(device)}")
    pp = (args.patchsize - 1) // 2
    rows, cols = args.rows, args.cols
    n_pos, n_int = rows * cols, (rows - 2 * pp) * (cols - 2 * pp)
    print(f"size: {rows}x{cols} grid, E={args.dim}, K1={args.k1}, K2={args.k2}, D={args.dcs}, "
          f"variant={args.variant}, mask_workers={args.mask_workers}, device={device}")

    feat, logits, art = make_artefacts(rows, cols, args.dim, args.k1, args.k2, args.dcs, args.patchsize)
    cfg = ScoringConfig(patchsize=args.patchsize, variant=args.variant, mask_workers=args.mask_workers,
                        imagesize=8 * rows)
    feat_d, logits_d, art_d = feat.to(device), logits.to(device), art.to(device)
    result = {}

    def vectorised():
        out = score_image(feat_d, logits_d, art_d, cfg)
        result["out"] = out

    times = timeit(vectorised, device, repeats=args.repeats, warmup=1)
    t_vec = best(times)
    coarse = {k: v.double().cpu() for k, v in result["out"].coarse.items()}
    print(f"vectorised: {t_vec:.3f} s per image (runs: {', '.join(f'{t:.2f}' for t in times)})")

    ratios, diffs = {}, {}
    for name, cls, n in (("loop", NaiveLoop, args.loop_positions), ("numpy", NaiveNumpy, args.numpy_positions)):
        if n <= 0:
            continue
        naive = cls(feat, logits, art, cfg)
        positions = sample_positions(rows, cols, pp, n)
        t_edge, t_int, diff = run_naive(naive, positions, rows, cols, pp, coarse)
        total = t_edge * n_pos + t_int * n_int
        ratios[name], diffs[name] = total / t_vec, max(diff.values())
        print(f"naive {name}: {t_edge * 1e3:.1f} ms (all positions part) + {t_int * 1e3:.1f} ms (interior part) "
              f"per position, measured at {len(positions)} positions; scaled to {n_pos} + {n_int} positions: "
              f"{total:.0f} s per image -> {ratios[name]:.0f}x slower than vectorised; "
              f"max |difference| {max(diff.values()):.1e} ("
              + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) + ")")
    worst = max(diffs.values()) if diffs else float("nan")
    parts = [f"{ratios[k]:.0f}x vs the {k} port" for k in ratios]
    print(f"scoring speed-up: {', '.join(parts)}; max map difference {worst:.1e} (goal >= 100x, <= 1e-4)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
