"""Scoring (METHOD section 5): the vectorised code against a naive loop-by-loop reference."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from reference import bilinear_resize, bilinear_weights, full_size_maps, naive_m, naive_scores, pymp_split
from scipy.ndimage import gaussian_filter

import pni.scoring_kernels as scoring_kernels
from pni.errors import PNIError
from pni.features import patch_padding
from pni.scoring import (
    MAP_NAMES,
    Scorer,
    ScoringArtefacts,
    ScoringConfig,
    interior_indices,
    pad_interior,
    parent_share,
    score_image,
)
from pni.scoring_kernels import (
    ChunkDistances,
    PositionMask,
    RankColumns,
    blocked_indicator,
    columns_within,
    gaussian_blur,
    nearest_ids,
    pairwise_distances,
    resize_and_blur,
    smallest_two,
)

R = C = 6
E, K1, K2, D, PS = 8, 21, 26, 11, 3  # patchsize 3 -> pp = 1; no size divisible by 3 or 8
PP = patch_padding(PS)
P = R * C
P_INT = (R - 2 * PP) * (C - 2 * PP)


# ---------------------------------------------------------------------------------------------
# Inputs


def _prior(rng: np.random.Generator, rows: int, k: int, zero_rows: int = 3, density: float = 0.4) -> np.ndarray:
    counts = rng.integers(0, 4, size=(rows, k)) * (rng.random((rows, k)) < density)
    counts[rng.choice(rows, zero_rows, replace=False)] = 0
    sums = counts.sum(axis=1, keepdims=True)
    return np.where(sums > 0, counts / np.maximum(sums, 1), 0.0)


def make_inputs(seed: int = 0, prefix: bool = True, density: float = 0.4):
    """Random features, coresets, logits and priors. ``prefix``: the distribution coreset is
    (close to) the first ``D`` embedding entries, as the greedy order makes it, so that
    ``m(k) = k`` for ``k < D``; otherwise ``D`` entries picked at random, so ``m`` is not.
    ``density``: fraction of nonzero prior counts."""
    rng = np.random.default_rng(seed)
    feat = rng.normal(size=(R, C, E))
    emb2 = rng.normal(size=(K2, E))
    emb1 = rng.normal(size=(K1, E))
    picked = np.arange(D) if prefix else rng.permutation(K1)[:D]
    dcs = emb1[picked] + 0.05 * rng.normal(size=(D, E))
    logits = 6.0 * rng.normal(size=(P_INT, D))
    prior1 = _prior(rng, P, K1, density=density)
    prior2 = _prior(rng, P, K2, density=density)
    return feat, logits, emb1, emb2, dcs, prior1, prior2


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def run_both(inputs, cfg: ScoringConfig):
    feat, logits, emb1, emb2, dcs, prior1, prior2 = inputs
    m = naive_m(emb1, dcs)
    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1), _t(prior2))
    assert art.embedding_to_distribution.tolist() == m.tolist()
    got = score_image(_t(feat), _t(logits), art, cfg)
    want = naive_scores(feat, logits, emb1, emb2, dcs, m, prior1, prior2, cfg)
    return got, want


def assert_matches(got, want):
    coarse, image = want
    for name in MAP_NAMES:
        np.testing.assert_allclose(got.coarse[name].numpy(), coarse[name], rtol=0, atol=1e-5, err_msg=name)
        assert got.image[name] == pytest.approx(image[name], abs=1e-5), name


CFG = ScoringConfig(patchsize=PS, imagesize=16, blursigma=1.5, chunk_size=None)


# ---------------------------------------------------------------------------------------------
# Tests


VARIANT_WORKERS = [("original", 1), ("original", 3), ("original", 8), ("paper", 8)]


@pytest.mark.parametrize("variant,workers", VARIANT_WORKERS)
@pytest.mark.parametrize("anomaly_nn", [1, 3])
@pytest.mark.parametrize("prefix,density", [(True, 0.4), (False, 0.06)])
def test_matches_naive_reference(variant, workers, anomaly_nn, prefix, density, min_blocks):
    """Also with a distribution coreset that is no prefix (the neighbourhood mask's ranks are
    sorted) and sparse priors (kept as lists of allowed ids)."""
    inputs = make_inputs(1, prefix, density)
    cfg = replace(CFG, variant=variant, mask_workers=workers, anomaly_nn=anomaly_nn)
    got, want = run_both(inputs, cfg)
    assert_matches(got, want)
    m = naive_m(inputs[2], inputs[4])
    assert (m[:D].tolist() == list(range(D))) == prefix
    for prior, k in ((inputs[5], K1), (inputs[6], K2)):
        assert (PositionMask(torch.from_numpy(prior > 0.5 / k)).dense is None) == (density < 0.1)
    if anomaly_nn == 1:  # w = 1
        assert got.image["patchcore"] == pytest.approx(want[0]["patchcore"].max(), abs=1e-12)

    # The inputs exercise both outcomes of both masks.
    _, logits, *_, prior1, prior2 = inputs
    soft = torch.softmax(_t(logits) / cfg.softmax_temperature_alpha, dim=1)
    allowed = soft > cfg.softmax_nb_gamma / K1
    assert allowed.any() and not allowed.all()
    assert (prior2 > cfg.softmax_coor_gamma / K2).any()
    assert (prior1.sum(axis=1) == 0).any() and (prior2.sum(axis=1) == 0).any()


def test_lost_writes_change_the_maps():
    """The inputs are such that the original's lost parallel writes matter: with 3 or 8
    workers the reference's coor, nb and nb_coor maps differ from the serial ones."""
    inputs = make_inputs(1)
    feat, logits, emb1, emb2, dcs, prior1, prior2 = inputs
    m = naive_m(emb1, dcs)
    serial, _ = naive_scores(feat, logits, emb1, emb2, dcs, m, prior1, prior2, replace(CFG, mask_workers=1))
    for workers in (3, 8):
        lost, _ = naive_scores(feat, logits, emb1, emb2, dcs, m, prior1, prior2, replace(CFG, mask_workers=workers))
        for name in ("coor", "nb", "nb_coor"):
            assert np.abs(lost[name] - serial[name]).max() > 0.1, (name, workers)
    # ours, at the same inputs: the worker count moves the three masked maps, not patchcore
    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1), _t(prior2))
    ours = {w: score_image(_t(feat), _t(logits), art, replace(CFG, mask_workers=w)).coarse for w in (1, 8)}
    for name in ("coor", "nb", "nb_coor"):
        assert (ours[8][name] - ours[1][name]).abs().max() > 0.1, name
    assert torch.equal(ours[8]["patchcore"], ours[1]["patchcore"])


def test_pymp_split_follows_pymp():
    # pymp's static schedule: the first n % w chunks one longer (checked against pymp 0.5).
    assert [list(r) for r in pymp_split(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [len(r) for r in pymp_split(3, 8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    for n in (1, 7, 8, 11, 26, 2048):
        for w in (1, 3, 8):
            assert parent_share(n, w) == len(pymp_split(n, w)[0])


@pytest.mark.parametrize("variant", ["original", "paper"])
def test_farthest_fallback_when_nothing_allowed(variant):
    feat, logits, emb1, emb2, dcs, prior1, prior2 = make_inputs(2)
    prior1[:] = 0.0
    prior2[:] = 0.0  # all-zero prior rows: only the farthest entry counts
    inputs = (feat, logits, emb1, emb2, dcs, prior1, prior2)
    cfg = replace(CFG, variant=variant, softmax_nb_gamma=float(K1))  # threshold 1: none allowed
    got, want = run_both(inputs, cfg)
    assert_matches(got, want)

    g = cfg.prob_gamma
    d1 = torch.cdist(_t(feat).reshape(P, E), _t(emb1))[interior_indices(R, C, PP)]
    d2 = torch.cdist(_t(feat).reshape(P, E), _t(emb2))
    far1 = (g * d1.amax(1) - math.log(g)).reshape(R - 2 * PP, C - 2 * PP)
    far2 = (g * d2.amax(1) - math.log(g)).reshape(R, C)
    torch.testing.assert_close(got.coarse["coor"], far2)
    torch.testing.assert_close(got.coarse["nb"], pad_interior(far1, PP))
    torch.testing.assert_close(got.coarse["nb_coor"], pad_interior(far1, PP))


def test_original_and_paper_variants():
    inputs = make_inputs(3)
    orig, _ = run_both(inputs, replace(CFG, variant="original", mask_workers=1))
    pap, _ = run_both(inputs, replace(CFG, variant="paper"))
    assert not torch.allclose(orig.coarse["nb"], pap.coarse["nb"])
    assert torch.equal(orig.coarse["coor"], pap.coarse["coor"])  # serial: same position mask

    # When every mask allows every entry (and nothing is lost), all are the nearest-entry score.
    cfg = replace(CFG, softmax_nb_gamma=0.0, softmax_coor_gamma=-1.0, mask_workers=1)
    orig, want_orig = run_both(inputs, replace(cfg, variant="original"))
    pap, want_pap = run_both(inputs, replace(cfg, variant="paper"))
    assert_matches(orig, want_orig)
    assert_matches(pap, want_pap)
    g = cfg.prob_gamma
    d1 = torch.cdist(_t(inputs[0]).reshape(P, E), _t(inputs[2]))[interior_indices(R, C, PP)]
    nearest = (g * d1.amin(1) - math.log(g)).reshape(R - 2 * PP, C - 2 * PP)
    for got in (orig, pap):
        torch.testing.assert_close(got.coarse["nb"], pad_interior(nearest, PP))
        torch.testing.assert_close(got.coarse["nb_coor"], pad_interior(nearest, PP))


@pytest.fixture(params=["rows", "blocks"])
def min_blocks(request, monkeypatch):
    """Both ways minima and bands are found: whole rows (the small widths of these tests), or
    blocks of columns, forced here with blocks of 4 columns (widths 11, 21 and 26 leave a
    narrower last block)."""
    if request.param == "blocks":
        monkeypatch.setattr(scoring_kernels, "MIN_BLOCK", 4)
    return request.param


@pytest.mark.parametrize("width", [1, 2, 7, 127, 128, 129, 200, 256, 300])
def test_smallest_two_and_columns_within_equal_numpy(width):
    """Smallest value, its first column and the runner-up; the columns in a band; on rows
    with repeated values (ties in and across blocks), against numpy."""
    rng = np.random.default_rng(width)
    q = rng.integers(0, 40, size=(50, width)).astype(np.float32)
    q[:5] = 3.0  # whole rows tied
    q[5:10, -1] = -1.0  # the minimum in the last (narrower) block
    v, slot, runner_up = (t.numpy() for t in smallest_two(torch.from_numpy(q)))
    np.testing.assert_array_equal(v, q.min(1))
    np.testing.assert_array_equal(slot, q.argmin(1))  # numpy: the first of equal minima
    second = np.sort(q, axis=1)[:, 1] if width > 1 else np.full(50, np.inf)
    np.testing.assert_array_equal(runner_up, second)
    rows = np.array([0, 3, 5, 7, 8, 20, 49])
    sparse = 100.0 + q  # a few low values per row: few blocks to search
    sparse[rng.random(q.shape) < 0.002] = 50.0
    sparse[rows, -1] = 50.0  # and in the last block
    cases = []
    for values in (q, sparse):
        hi = values[rows].min(1) + rng.integers(0, 6, len(rows))
        cases += [(values, None, hi), (values, hi - 3.0, hi)]
    for values, low, hi in cases:
        hit = values[rows] <= hi[:, None]
        if low is not None:
            hit &= values[rows] >= low[:, None]
        want = np.nonzero(hit)
        r, c, found = columns_within(
            torch.from_numpy(values),
            torch.from_numpy(rows),
            None if low is None else torch.from_numpy(low),
            torch.from_numpy(hi),
        )
        assert [r.tolist(), c.tolist()] == [w.tolist() for w in want]
        assert found.tolist() == values[rows][want].tolist()


@pytest.fixture(params=["direct", "product", "mixed"])
def band_ordering(request, monkeypatch):
    """Both ways a band of near entries is ordered: exact distances of every pair, or (what
    dense bands take) the float64 product with exact distances where values lie close; forced
    here on every band ("product", a few rows per product), or on the bands of more than two
    entries ("mixed": both ways within one call)."""
    if request.param != "direct":
        monkeypatch.setattr(scoring_kernels, "DIRECT_PAIRS_PER_ROW", 0 if request.param == "product" else 2)
        monkeypatch.setattr(scoring_kernels, "PRODUCT_ROWS", 3)
    return request.param


def test_exact_kth_rank_and_order_equal_sorting(band_ordering):
    """The exact k-th nearest entry, ranks and order of :class:`ChunkDistances` against a
    float64 sort, on rows with many near-ties (entries repeated and shifted by 1e-4, features
    far from the origin), for every group of the partial sorts, the first and the last."""
    rng = np.random.default_rng(0)
    base = 40.0 + rng.normal(size=(500, 16))
    y = np.concatenate([base, base[:400], base[:400] + 1e-4 * rng.normal(size=(400, 16))]).astype(np.float32)
    x = (base[rng.integers(0, 500, 300)] + 0.3 * rng.normal(size=(300, 16))).astype(np.float32)
    exact = ((x.astype(np.float64)[:, None] - y.astype(np.float64)[None]) ** 2).sum(-1)
    width = len(y)
    k = rng.integers(0, width, 300)
    k[:100] = rng.integers(0, 12, 100)
    k[100:110] = 0
    k[110:120] = width - 1
    dist = ChunkDistances.between(torch.from_numpy(x), torch.from_numpy(y))
    ids, v = dist.nearest()
    order = np.lexsort((np.broadcast_to(np.arange(width), exact.shape), exact), axis=1)  # by distance, then id
    assert ids.tolist() == order[:, 0].tolist()
    np.testing.assert_allclose(dist.exact(None, ids).numpy(), exact.min(1), rtol=1e-12)
    kth = dist.kth(torch.from_numpy(k), ids).numpy()
    sorted_exact = np.sort(exact, axis=1)[np.arange(300), k]
    np.testing.assert_allclose(exact[np.arange(300), kth], sorted_exact, rtol=1e-12)
    assert kth.tolist() == order[np.arange(300), k].tolist()
    assert dist.order().tolist() == order.tolist()
    pick = torch.from_numpy(order[np.arange(300), k])
    assert dist.rank(dist.all, pick).tolist() == k.tolist()
    assert nearest_ids(torch.from_numpy(x), torch.from_numpy(y), 7).tolist() == order[:, 0].tolist()


def test_each_entry_bound_holds_and_narrows_the_nearest():
    """Each pair's interval ``q -+ (4E + 16) u (|x - c|^2 + |y - c|^2)`` holds its exact value
    (entries whose ``|y - c|^2`` differ a hundredfold), and the nearest entry found through
    these intervals is the exact one (ties: the lower id)."""
    rng = np.random.default_rng(3)
    e = 32
    scales = np.where(rng.random(600) < 0.1, 10.0, 1.0)[:, None]  # a few entries far out
    y = (5.0 + scales * rng.normal(size=(600, e))).astype(np.float32)
    y[300:320] = y[:20]  # exact duplicates
    x = (y[rng.integers(0, 300, 200)] + 0.05 * rng.normal(size=(200, e))).astype(np.float32)
    dist = ChunkDistances.between(torch.from_numpy(x), torch.from_numpy(y))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    exact = ((x64[:, None] - y64[None]) ** 2).sum(-1)
    centre = y.mean(0)  # as ``between`` centres (float32)
    a_sq = ((x - centre) ** 2).sum(1).astype(np.float64)
    b_sq = ((y - centre) ** 2).sum(1).astype(np.float64)
    assert b_sq.max() > 50 * np.median(b_sq)
    r, c = np.meshgrid(np.arange(200), np.arange(600), indexing="ij")
    r, c = torch.from_numpy(r.ravel()), torch.from_numpy(c.ravel())
    lower, upper = dist._interval(dist.all, r, c, dist.q[r, c])
    half = (4 * e + 16) * 2.0**-24 * (a_sq[r.numpy()] + b_sq[c.numpy()])
    np.testing.assert_allclose(((upper - lower) / 2).numpy(), half, rtol=1e-5)
    shifted = exact.ravel() - dist.x_sq.double().numpy()[r.numpy()]  # the exact value of q
    assert (lower.numpy() <= shifted).all() and (shifted <= upper.numpy()).all()
    order = np.lexsort((np.broadcast_to(np.arange(600), exact.shape), exact), axis=1)
    assert dist.nearest()[0].tolist() == order[:, 0].tolist()


@pytest.mark.parametrize("workers", [1, 3])
def test_rank_columns_without_sorting_when_increasing(workers):
    """With ``m(k) = k`` below ``D`` (a prefix distribution coreset) the first allowed column
    comes from the nearest allowed entry's rank; it equals the sorted-ranks answer."""
    rng = np.random.default_rng(1)
    m = torch.cat([torch.arange(D), torch.from_numpy(rng.integers(0, D, K1 - D))])
    columns = RankColumns.build(m, parent_share(D, workers))
    assert columns.increasing
    dist = ChunkDistances.between(
        torch.from_numpy(rng.normal(size=(200, E))), torch.from_numpy(rng.normal(size=(D, E)))
    )
    allowed = torch.from_numpy(rng.random((200, D)) < 0.15)
    allowed[:5] = False
    sorted_ranks = RankColumns(columns.first, increasing=False)
    blocked = blocked_indicator(allowed, torch.float64)
    fast = columns.first_allowed(dist, blocked, K1 - 1)
    assert fast.tolist() == sorted_ranks.first_allowed(dist, blocked, K1 - 1).tolist()
    assert (fast[:5] == K1 - 1).all() and (fast < K1 - 1).any()
    assert not RankColumns.build(m.flip(0), parent_share(D, workers)).increasing


def one_position(emb1, dcs, m, logits, prior1, variant="original", workers=8):
    """The coarse maps of a 1 x 1 grid whose feature is 0 in one dimension, so each distance is
    an entry's value: embedding entries ``emb1`` (K1,), also used as the with-edge coreset with
    the same prior; distribution entries ``dcs`` (D,), their ids ``m`` (K1,) given by hand;
    ``logits`` (D,); ``prior1`` (K1,). Gammas 1 (maps are plain distances), alpha 2, thresholds
    ``0.5 / K1`` (neighbourhood) and ``1 / K`` (position)."""
    col = lambda v: torch.tensor(v, dtype=torch.float64)[:, None]  # noqa: E731
    prior = torch.tensor([prior1], dtype=torch.float64)
    art = ScoringArtefacts(col(emb1), col(emb1), col(dcs), torch.tensor(m), prior, prior)
    cfg = ScoringConfig(
        anomaly_nn=1,
        patchsize=1,
        prob_gamma=1.0,
        softmax_coor_gamma=1.0,
        variant=variant,
        mask_workers=workers,
        imagesize=4,
        blursigma=0.5,
        chunk_size=None,
    )
    got = score_image(
        torch.zeros(1, 1, 1, dtype=torch.float64), torch.tensor([[logits]], dtype=torch.float64)[0], art, cfg
    )
    return {name: got.coarse[name].item() for name in MAP_NAMES}


def test_original_mask_uses_ranks_not_ids():
    # One feature; embedding entries at distances [3, 1, 2] with nearest distribution ids m = [0, 1, 2];
    # distribution entries ranked [2, 0, 1] (distances [2, 3, 1]); only entry 2 (rank 0) is
    # allowed: softmax([0, 0, 20] / 2) = [4.5e-5, 4.5e-5, 1.0] against 0.5 / 3.
    case = dict(emb1=[3.0, 1.0, 2.0], dcs=[2.0, 3.0, 1.0], m=[0, 1, 2], logits=[0.0, 0.0, 20.0], prior1=[1.0, 1.0, 1.0])
    # paper: entry k allowed where m(k) = k is -> entry 2 (d = 2.0).
    assert one_position(**case, variant="paper")["nb"] == pytest.approx(2.0)
    # original, serial: sorted column k allowed where rank m(k) = k is -> column 0 (d = 1.0).
    assert one_position(**case, workers=1)["nb"] == pytest.approx(1.0)


def test_original_lost_writes_by_hand():
    # Neighbourhood: D = 3 distribution entries, 2 workers -> the parent writes ids 0 and 1.
    # Entries' nearest distribution ids m = [2, 1, 0]; all allowed (softmax 1/3 > 0.5/3). Sorted
    # column 0 has m(0) = 2, never written -> False; column 1 (m = 1) written -> 2nd nearest distance.
    case = dict(emb1=[1.0, 2.0, 4.0], dcs=[1.0, 2.0, 3.0], m=[2, 1, 0], logits=[0.0, 0.0, 0.0], prior1=[1.0, 1.0, 1.0])
    assert one_position(**case, workers=2)["nb"] == pytest.approx(2.0)
    assert one_position(**case, workers=1)["nb"] == pytest.approx(1.0)
    # Position: K = 5 entries, 2 workers -> only the 3 nearest can be allowed (threshold 1/5).
    # Allowed ids {3, 4}: id 4 is the 2nd nearest (d 0.5), id 3 the 4th. Then only id 3: not
    # written -> the farthest entry (d 9.0) is the fallback. One distribution entry, allowed,
    # nearest to every entry: nb is the nearest distance, 0.1; nb_coor the mean of nb and position.
    emb1, nb_case = [0.1, 7.0, 9.0, 7.5, 0.5], dict(dcs=[0.1], m=[0] * 5, logits=[0.0])
    for prior, variant, workers, want in (
        ([0, 0, 0, 0.5, 0.5], "original", 2, 0.5),
        ([0, 0, 0, 1, 0], "original", 2, 9.0),
        ([0, 0, 0, 1, 0], "original", 1, 7.5),
        ([0, 0, 0, 1, 0], "paper", 2, 7.5),
    ):
        got = one_position(emb1, prior1=prior, variant=variant, workers=workers, **nb_case)
        assert got["coor"] == pytest.approx(want), (prior, variant, workers)
        assert got["nb"] == pytest.approx(0.1) and got["nb_coor"] == pytest.approx(0.5 * (0.1 + want))
        assert got["patchcore"] == pytest.approx(0.1)


def test_chunk_size_invariance_and_scorer_reuse():
    inputs = make_inputs(4)
    feat, logits, emb1, emb2, dcs, prior1, prior2 = inputs
    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1), _t(prior2), chunk_size=3)
    ref = score_image(_t(feat), _t(logits), art, CFG)
    for chunk in (1, 5, 17, 10_000):
        got = score_image(_t(feat), _t(logits), art, replace(CFG, chunk_size=chunk))
        for name in MAP_NAMES:
            torch.testing.assert_close(got.coarse[name], ref.coarse[name], rtol=0, atol=1e-12)
            torch.testing.assert_close(got.maps[name], ref.maps[name], rtol=0, atol=1e-12)
            assert got.image[name] == pytest.approx(ref.image[name], abs=1e-12)

    # One scorer, image after image (its scratch memory reused), gives each image's own result.
    scorer = Scorer(art, replace(CFG, chunk_size=7), R, C)
    for feat_i, logits_i in ((feat, logits), make_inputs(5)[:2], (feat, logits)):
        got, one = scorer(_t(feat_i), _t(logits_i)), score_image(_t(feat_i), _t(logits_i), art, CFG)
        for name in MAP_NAMES:
            torch.testing.assert_close(got.coarse[name], one.coarse[name])
            torch.testing.assert_close(got.maps[name], one.maps[name])
            assert got.image[name] == pytest.approx(one.image[name], abs=1e-12)


def test_full_size_maps_are_resized_and_blurred():
    inputs = make_inputs(6)
    got, (coarse, _) = run_both(inputs, CFG)
    want = full_size_maps(coarse, CFG.imagesize, CFG.blursigma)
    for name in MAP_NAMES:
        assert got.maps[name].shape == (CFG.imagesize, CFG.imagesize)
        np.testing.assert_allclose(got.maps[name].numpy(), want[name], rtol=0, atol=1e-5, err_msg=name)


def test_reference_bilinear_follows_pil_when_upsampling():
    """The reference's convention (pixel centres aligned, edge pixels repeated) is PIL's
    bilinear filter when enlarging, on float images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.random((5, 7)).astype(np.float32)
    for size in ((16, 16), (12, 21), (480, 480)):
        pil = np.asarray(Image.fromarray(img, mode="F").resize(size[::-1], Image.Resampling.BILINEAR))
        np.testing.assert_allclose(bilinear_resize(img, size), pil, rtol=0, atol=1e-5)
    # by hand: 2 -> 4 pixels samples at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> 1)
    np.testing.assert_allclose(bilinear_weights(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


def test_float32_runs_and_is_close():
    inputs = make_inputs(7)
    got64, _ = run_both(inputs, CFG)
    feat, logits, emb1, emb2, dcs, prior1, prior2 = inputs
    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1), _t(prior2))
    got32 = score_image(_t(feat).float(), _t(logits).float(), art.to(dtype=torch.float32), CFG)
    assert art.to(dtype=torch.float32).embedding_to_distribution.dtype == torch.long
    for name in MAP_NAMES:
        assert got32.maps[name].dtype == torch.float32
        torch.testing.assert_close(got32.coarse[name].double(), got64.coarse[name], rtol=0, atol=1e-4)


def test_pairwise_distances_equals_cdist():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = torch.randn(13, 8, generator=g, dtype=torch.float64)
    want = torch.cdist(x, y)
    for chunk in (None, 1, 7, 50, 1000):
        torch.testing.assert_close(pairwise_distances(x, y, chunk), want, rtol=0, atol=1e-10)
    same = pairwise_distances(y, y)
    assert not torch.isnan(same).any()
    torch.testing.assert_close(same.diagonal(), torch.zeros(13, dtype=torch.float64), rtol=0, atol=1e-6)
    assert nearest_ids(x, y, 4).tolist() == want.argmin(1).tolist()


@pytest.mark.parametrize("shape,sigma", [((20, 23), 2.0), ((9, 11), 4.0), ((32, 32), 8.0)])
def test_blur_equals_scipy_reflect(shape, sigma):
    rng = np.random.default_rng(0)
    img = rng.random(shape)
    want = gaussian_filter(img, sigma=sigma, mode="reflect", truncate=4.0)
    got = gaussian_blur(torch.from_numpy(img), sigma).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    got32 = gaussian_blur(torch.from_numpy(img).float()[None], sigma)[0].numpy()
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5)


def test_resize_and_blur_equals_reference():
    maps = torch.rand(3, 5, 7, dtype=torch.float64)
    got = resize_and_blur(maps, 12, 1.0)
    assert got.shape == (3, 12, 12)
    np.testing.assert_allclose(
        resize_and_blur(maps, 12, 0.0).numpy(), bilinear_resize(maps.numpy(), (12, 12)), rtol=0, atol=1e-12
    )
    want = [
        gaussian_filter(bilinear_resize(m, (12, 12)), sigma=1.0, mode="reflect", truncate=4.0) for m in maps.numpy()
    ]
    np.testing.assert_allclose(got.numpy(), np.stack(want), rtol=0, atol=1e-12)


def test_interior_and_padding():
    idx = interior_indices(4, 5, 1)
    assert idx.tolist() == [6, 7, 8, 11, 12, 13]
    assert interior_indices(3, 3, 0).tolist() == list(range(9))
    padded = pad_interior(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 1)
    assert padded.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    with pytest.raises(PNIError):
        interior_indices(4, 4, 2)


def test_mismatched_artefacts_raise():
    feat, logits, emb1, emb2, dcs, prior1, prior2 = make_inputs(8)
    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1[:-1]), _t(prior2))
    with pytest.raises(PNIError, match="position prior"):
        score_image(_t(feat), _t(logits), art, CFG)
    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1), _t(prior2))
    with pytest.raises(PNIError, match="variant"):
        score_image(_t(feat), _t(logits), art, replace(CFG, variant="other"))
    with pytest.raises(PNIError, match="mask_workers"):
        score_image(_t(feat), _t(logits), art, replace(CFG, mask_workers=0))
    with pytest.raises(PNIError, match="logits"):
        score_image(_t(feat), _t(logits[:-1]), art, CFG)
    for variant in ("original", "paper"):  # float32 logits with float64 features and artefacts
        with pytest.raises(PNIError, match="must share dtype and device"):
            score_image(_t(feat), _t(logits).float(), art, replace(CFG, variant=variant))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    inputs = make_inputs(9)
    feat, logits, emb1, emb2, dcs, prior1, prior2 = inputs
    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1), _t(prior2))
    cpu = score_image(_t(feat), _t(logits), art, CFG)
    gpu = score_image(_t(feat).cuda(), _t(logits).cuda(), art.to("cuda"), CFG)
    for name in MAP_NAMES:
        assert gpu.maps[name].is_cuda
        torch.testing.assert_close(gpu.maps[name].cpu(), cpu.maps[name])
        assert gpu.image[name] == pytest.approx(cpu.image[name], abs=1e-9)


def test_float32_distances_stay_accurate_for_large_feature_norms():
    """ReLU features share a large mean: the norm expansion must not lose the small distances."""
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(256, generator=g) * 2.5
    y = (mean + 0.1 * torch.randn(300, 256, generator=g)).relu()
    x = (mean + 0.1 * torch.randn(50, 256, generator=g)).relu()
    ref = torch.cdist(x.double(), y.double())
    assert (pairwise_distances(x, y).double() - ref).abs().max() < 1e-5


def test_vectorised_equals_the_original_loops_under_real_pymp(tmp_path):
    """The original's mask loops, run under real ``pymp.Parallel`` (forked processes whose
    writes into plain numpy arrays are lost) in a fresh interpreter that imports only numpy
    and pymp, give the maps of ``variant='original'`` for 1, 3 and 8 workers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    feat, logits, emb1, emb2, dcs, prior1, prior2 = make_inputs(1)
    inner = interior_indices(R, C, PP).numpy()
    arrays = dict(
        feat=feat.reshape(P, E), inner=inner, logits=logits, emb1=emb1, emb2=emb2, dcs=dcs, prior1=prior1, prior2=prior2
    )
    for name, value in arrays.items():
        np.save(tmp_path / f"{name}.npy", value)
    keys = ("prob_gamma", "softmax_temperature_alpha", "softmax_nb_gamma", "softmax_coor_gamma")
    (tmp_path / "config.json").write_text(json.dumps({k: getattr(CFG, k) for k in keys}))
    oracle = Path(__file__).parent / "oracles" / "pymp_original_masks.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(oracle), str(tmp_path), "1", "3", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr

    art = ScoringArtefacts.build(_t(emb1), _t(emb2), _t(dcs), _t(prior1), _t(prior2))
    r_int = R - 2 * PP
    outcomes = {}
    for workers in (1, 3, 8):
        got = score_image(_t(feat), _t(logits), art, replace(CFG, mask_workers=workers))
        coor = np.load(tmp_path / f"coor_w{workers}.npy").reshape(R, C)
        nb = np.load(tmp_path / f"nb_w{workers}.npy").reshape(r_int, r_int)
        nb_coor = 0.5 * (nb + np.load(tmp_path / f"pos_w{workers}.npy").reshape(r_int, r_int))
        np.testing.assert_allclose(got.coarse["coor"].numpy(), coor, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.coarse["nb"].numpy()[PP:-PP, PP:-PP], nb, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.coarse["nb_coor"].numpy()[PP:-PP, PP:-PP], nb_coor, rtol=0, atol=1e-5)
        assert got.image["nb"] == pytest.approx(nb.max(), abs=1e-5)
        assert got.image["nb_coor"] == pytest.approx(nb_coor.max(), abs=1e-5)
        assert got.image["coor"] == pytest.approx(coor.max(), abs=1e-5)
        outcomes[workers] = (coor, nb)
    # the forked writes really were lost: fewer workers, other maps
    for workers in (3, 8):
        assert not np.allclose(outcomes[workers][0], outcomes[1][0])
        assert not np.allclose(outcomes[workers][1], outcomes[1][1])


def near_tie_inputs(seed: int, duplicate_distribution: bool):
    """float32 inputs full of near-ties: two clusters far from the origin and from each other
    (so ``|x - c|^2`` is large against the distances), every coreset with exact duplicates
    and near-duplicates (a few float32 ulps apart) of its entries; the distribution coreset
    is the first ``D`` without-edge entries (with ``duplicate_distribution``, one of them
    twice, so that a rank has no column and the rank columns do not increase)."""
    rng = np.random.default_rng(seed)
    centres = 30.0 * rng.normal(size=(2, E))

    def coreset(n_base):
        base = centres[rng.integers(0, 2, n_base)] + rng.normal(size=(n_base, E))
        dup = base[rng.choice(n_base, 4, replace=False)]
        near = base[rng.choice(n_base, 4, replace=False)] + 3e-6 * rng.normal(size=(4, E))
        return np.concatenate([base, dup, near])[rng.permutation(n_base + 8)]

    emb1, emb2 = coreset(K1 - 8), coreset(K2 - 8)
    dcs = emb1[:D].copy()
    if duplicate_distribution:
        dcs[D - 1] = dcs[2]
    feat = emb2[rng.integers(0, K2, P)] + 0.7 * rng.normal(size=(P, E))
    logits = 6.0 * rng.normal(size=(P_INT, D))
    arrays = (feat.reshape(R, C, E), logits, emb1, emb2, dcs, _prior(rng, P, K1), _prior(rng, P, K2))
    return tuple(a.astype(np.float32) for a in arrays)


@pytest.mark.parametrize("duplicate_distribution", [False, True])
@pytest.mark.parametrize("variant,workers", [("original", 1), ("original", 8), ("paper", 1), ("paper", 8)])
def test_near_ties_within_1e6_of_a_float64_reference(
    variant, workers, duplicate_distribution, band_ordering, min_blocks
):
    """float32 scoring of near-tied inputs: maps within 1e-6 of their range from the float64
    loops of ``tests/reference.py`` on the same float32 values, though the float32 expansion
    alone misses these distances by more than 1e-4."""
    inputs = near_tie_inputs(11, duplicate_distribution)
    feat, logits, emb1, emb2, dcs, prior1, prior2 = inputs
    wide = [a.astype(np.float64) for a in inputs]
    cfg = replace(CFG, variant=variant, mask_workers=workers)
    m = naive_m(wide[2], wide[4])
    art = ScoringArtefacts.build(*(torch.from_numpy(a) for a in (emb1, emb2, dcs, prior1, prior2)))
    assert art.embedding_to_distribution.tolist() == m.tolist()
    assert RankColumns.build(art.embedding_to_distribution, parent_share(D, workers)).increasing != (
        duplicate_distribution and workers == 1
    )
    got = score_image(torch.from_numpy(feat), torch.from_numpy(logits), art, cfg)
    coarse, image = naive_scores(*wide[:5], m, *wide[5:], cfg)
    full = full_size_maps(coarse, cfg.imagesize, cfg.blursigma)
    for name in MAP_NAMES:
        span = float(full[name].max() - full[name].min())
        assert got.maps[name].dtype == torch.float32
        assert np.abs(got.maps[name].double().numpy() - full[name]).max() <= 1e-6 * span, name
        assert np.abs(got.coarse[name].double().numpy() - coarse[name]).max() <= 1e-6 * span, name
        assert abs(got.image[name] - image[name]) <= 1e-6 * span, name
    # the float32 expansion alone (centred, as before) is far off on these inputs
    x = torch.from_numpy(feat).reshape(P, E)
    expansion = pairwise_distances(x, torch.from_numpy(emb2)).double()
    assert (expansion - torch.cdist(x.double(), torch.from_numpy(emb2).double())).abs().max() > 1e-4
