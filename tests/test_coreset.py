"""Greedy k-center selection and faiss index files."""
import math

import numpy as np
import torch
from sklearn.random_projection import SparseRandomProjection

from pni import coreset as cs
from reference import brute_force_farthest_point, greedy_start, jl_min_dim


def test_greedy_order_equals_brute_force():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(300, 16)).astype(np.float64)
    ours = cs.greedy_order(torch.from_numpy(pts), 40, start_index=17)
    assert ours.tolist() == brute_force_farthest_point(pts, 40, 17)
    assert 17 not in ours.tolist()
    # the first pick is the point farthest from the start
    assert ours[0] == np.argmax(((pts - pts[17]) ** 2).sum(1))


def test_johnson_lindenstrauss_size():
    """The projected size is the bound 4 ln(n) / (eps^2/2 - eps^3/3) at eps 0.9, truncated to an
    integer as scikit-learn's 'auto' size (which the original used) does."""
    for n, by_hand in ((1000, 170.56), (1_440_000, 350.13)):
        bound = 4 * math.log(n) / (0.9 ** 2 / 2 - 0.9 ** 3 / 3)
        assert bound == jl_min_dim(n, 0.9) and round(bound, 2) == by_hand
        assert cs.projection_matrix(n, 1024, seed=0).shape == (1024, math.floor(bound))


def test_greedy_coreset_projects_and_streams_chunks():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(4, 250, 512)).astype(np.float32)  # 4 "images" of 250 patches
    n = 1000
    sel = cs.greedy_coreset(lambda: iter(feats), n, 512, 30, seed=5)
    # expected: scikit-learn's sparse random projection of the size above, seeded, then the
    # brute-force greedy order from a start point (whichever the seed drew; not selected)
    projection = SparseRandomProjection(n_components=170, random_state=5).fit(np.zeros((1, 512)))
    projected = projection.transform(feats.reshape(n, 512).astype(np.float64))
    start = greedy_start(projected, sel.tolist())
    assert start is not None and start not in sel.tolist()
    assert sel.tolist() == brute_force_farthest_point(projected, 30, start)
    # same seed, same selection; the shorter selection is a prefix of the longer one
    again = cs.greedy_coreset(lambda: iter(feats), n, 512, 10, seed=5)
    assert again.tolist() == sel[:10].tolist()
    # another seed: another projection and start point
    assert cs.greedy_coreset(lambda: iter(feats), n, 512, 30, seed=6).tolist() != sel.tolist()


def test_no_projection_when_it_would_not_reduce():
    assert cs.projection_matrix(1000, 16, seed=0) is None


def test_faiss_round_trip_and_nearest(tmp_path):
    rng = np.random.default_rng(3)
    entries = rng.normal(size=(50, 8)).astype(np.float32)
    cs.save_index(cs.build_index(entries), tmp_path / "a.faiss")
    assert [p.name for p in tmp_path.iterdir()] == ["a.faiss"]  # no temporary left behind
    index = cs.load_index(tmp_path / "a.faiss")
    np.testing.assert_array_equal(cs.index_vectors(index), entries)
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    expected = ((queries[:, None] - entries[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(cs.nearest_ids(index, queries, chunk=7), expected)
