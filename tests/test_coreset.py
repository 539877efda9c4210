"""Greedy k-center selection and faiss index files."""
import numpy as np
import torch

from pni import coreset as cs


def brute_force_farthest_point(points: np.ndarray, n_select: int, start: int) -> list[int]:
    """Naive reference: full distance matrix; repeatedly the point farthest from the start and
    the points chosen so far. The start itself is not selected (SPEC section 3)."""
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    centres, chosen = [start], []
    while len(chosen) < n_select:
        nearest_centre = d[:, centres].min(axis=1)
        nearest_centre[centres] = -1
        pick = int(np.argmax(nearest_centre))
        chosen.append(pick)
        centres.append(pick)
    return chosen


def test_greedy_order_equals_brute_force():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(300, 16)).astype(np.float64)
    ours = cs.greedy_order(torch.from_numpy(pts), 40, start_index=17)
    assert ours.tolist() == brute_force_farthest_point(pts, 40, 17)
    assert 17 not in ours.tolist()
    # the first pick is the point farthest from the start
    assert ours[0] == np.argmax(((pts - pts[17]) ** 2).sum(1))


def test_greedy_coreset_projects_and_streams_chunks():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(4, 250, 512)).astype(np.float32)  # 4 "images" of 250 patches
    n = 1000
    matrix = cs.projection_matrix(n, 512, seed=5)
    assert matrix is not None and matrix.shape[0] == 512 and matrix.shape[1] < 512
    sel = cs.greedy_coreset(lambda: iter(feats), n, 512, 30, seed=5)
    projected = (torch.from_numpy(feats.reshape(n, 512)) @ matrix).double().numpy()
    start = int(np.random.default_rng(5).integers(n))
    assert sel.tolist() == brute_force_farthest_point(projected, 30, start)
    # same seed, same selection; the shorter selection is a prefix of the longer one
    again = cs.greedy_coreset(lambda: iter(feats), n, 512, 10, seed=5)
    assert again.tolist() == sel[:10].tolist()


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
