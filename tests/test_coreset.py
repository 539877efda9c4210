"""Greedy k-center selection and faiss index files."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import brute_force_farthest_point, greedy_start, jl_min_dim
from sklearn.random_projection import SparseRandomProjection

from pni import coreset as cs


def test_greedy_order_equals_brute_force():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(300, 16)).astype(np.float64)
    ours = cs.greedy_order(torch.from_numpy(pts), 40, start_index=17)
    assert ours.tolist() == brute_force_farthest_point(pts, 40, 17)
    assert 17 not in ours.tolist()
    # the first pick is the point farthest from the start
    assert ours[0] == np.argmax(((pts - pts[17]) ** 2).sum(1))


def original_greedy_order(points: torch.Tensor, n_select: int, start: int, eps: float = 1e-6) -> list[int]:
    """The original's loop, step by step: distances to the newest centre by
    ``F.pairwise_distance`` (direct differences, ``||x - c + eps||``), ``torch.min`` with the
    distances so far, ``torch.argmax`` (first index among equal maxima)."""
    min_distances, idx, chosen = None, start, []
    for _ in range(n_select):
        d = F.pairwise_distance(points, points[idx : idx + 1], eps=eps)
        min_distances = d if min_distances is None else torch.min(min_distances, d)
        idx = int(torch.argmax(min_distances))
        chosen.append(idx)
    return chosen


def expansion_greedy_order(points: torch.Tensor, n_select: int, start: int) -> list[int]:
    """The same loop with squared distances from the expansion ``|x|^2 - 2 x.c + |c|^2`` (the
    arithmetic pni.coreset used before issue 19), in the points' dtype."""
    sq = (points * points).sum(dim=1)
    min_distances, idx, chosen = None, start, []
    for _ in range(n_select):
        d = (points @ points[idx]) * -2.0 + sq + sq[idx]
        min_distances = d if min_distances is None else torch.minimum(min_distances, d)
        min_distances[[start, *chosen]] = -1.0
        idx = int(torch.argmax(min_distances))
        chosen.append(idx)
    return chosen


def on_a_line(positions: list[float], dim: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Points ``(len(positions), dim)`` at ``positions`` on the first axis, zeros elsewhere: every
    product and sum of the expansion has one rounding at most, whatever the order of a BLAS."""
    pts = torch.zeros(len(positions), dim, dtype=dtype)
    pts[:, 0] = torch.tensor(positions, dtype=dtype)
    return pts


def test_greedy_order_near_tie_as_the_original():
    """Issue 19: start 100, first pick 70 (farthest); then 85 (15 from both centres) and 115 plus
    2 float32 ulps (15.0000153 from 100) differ by a relative 1.1e-6. Direct differences (the
    original's F.pairwise_distance, and float64) pick 115.0000153; the float32 expansion, whose
    squares near 1e4 round by 1e-3, takes 85 first and so the rest of the order differs too."""
    far = float(np.float32(115) + 2 * np.spacing(np.float32(115)))
    pts = on_a_line([100, 70, 85, far, 92, 108, 77])
    original = original_greedy_order(pts, 5, start=0)
    assert original == [1, 3, 2, 5, 4]
    assert cs.greedy_order(pts, 5, start_index=0).tolist() == original
    # a near-tie at step 1 ...
    d = torch.stack([F.pairwise_distance(pts, pts[i : i + 1]) for i in (0, 1)]).min(dim=0).values
    assert 1e-6 < (d[3] - d[2]) / d[2] < 1.2e-6
    # ... that float64 resolves as the original does, and the expansion the other way
    assert original_greedy_order(pts.double(), 5, start=0) == original
    assert expansion_greedy_order(pts, 5, start=0) == [1, 2, 3, 4, 5]


def test_greedy_order_eps_parts_an_exact_tie():
    """From 100 and 70, the points 85 and 115 are both exactly 15 away. The original's
    ``||x - c + eps||`` makes 115 (difference +15) 15 + 1e-6 and 85 (difference -15 to 100)
    15 - 1e-6, two float32 ulps apart: 115 is taken. Without eps (or by the expansion, exact
    here) the tie goes to the first index, 85."""
    pts = on_a_line([100, 70, 85, 115])
    assert original_greedy_order(pts, 3, start=0) == [1, 3, 2]
    assert original_greedy_order(pts, 3, start=0, eps=0.0) == [1, 2, 3]
    assert expansion_greedy_order(pts, 3, start=0) == [1, 2, 3]
    assert cs.greedy_order(pts, 3, start_index=0).tolist() == [1, 3, 2]
    # float64 points (the torch.cdist branch): the same eps
    assert cs.greedy_order(pts.double(), 3, start_index=0).tolist() == [1, 3, 2]


@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_order_far_from_origin_as_the_original(threads):
    """Features far from the origin (all near 20 in each of 16 dims): 300 greedy steps over
    20,000 points equal the original's loop (the expansion's squares near 6400 round by 5e-4,
    enough to part its near-ties). With 2 threads the bank is measured in slices."""
    g = torch.Generator().manual_seed(7)
    pts = torch.randn(20_000, 16, generator=g) + 20
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = cs.greedy_order(pts, 300, start_index=11).tolist()
    finally:
        torch.set_num_threads(before)
    assert ours == original_greedy_order(pts, 300, start=11)


def test_squared_distances_direct_differences():
    """faiss's kernel (float32, CPU) and torch.cdist (other dtypes) against float64 sums of
    squared differences, for points far from the origin."""
    g = torch.Generator().manual_seed(8)
    pts = torch.randn(5000, 35, generator=g) + 30
    truth = ((pts.double() - pts[9].double()) ** 2).sum(dim=1)
    out = torch.empty(5000)
    cs.squared_distances(pts, pts[9], out)
    assert out[9] == 0
    np.testing.assert_allclose(out.double(), truth, rtol=3e-7)
    out64 = torch.empty(5000, dtype=torch.float64)
    cs.squared_distances(pts.double(), pts[9].double(), out64)
    np.testing.assert_allclose(out64, truth, rtol=1e-13)


def test_johnson_lindenstrauss_size():
    """The projected size is the bound 4 ln(n) / (eps^2/2 - eps^3/3) at eps 0.9, truncated to an
    integer as scikit-learn's 'auto' size (which the original used) does."""
    for n, by_hand in ((1000, 170.56), (1_440_000, 350.13)):
        bound = 4 * math.log(n) / (0.9**2 / 2 - 0.9**3 / 3)
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


def test_project_chunks_row_major():
    """One preallocated row-major bank (the greedy search reads a point's values together),
    each chunk's rows ``x @ matrix`` in place."""
    rng = np.random.default_rng(4)
    chunks = [rng.normal(size=(n, 64)).astype(np.float32) for n in (5, 11, 1)]
    matrix = torch.from_numpy(rng.normal(size=(64, 9)).astype(np.float32))
    bank = cs.project_chunks(iter(chunks), 17, matrix)
    assert bank.shape == (17, 9) and bank.is_contiguous()
    expected = np.concatenate(chunks).astype(np.float64) @ matrix.double().numpy()
    np.testing.assert_allclose(bank.numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        cs.project_chunks(iter(chunks), 16, matrix)


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


@pytest.mark.parametrize("dist_coreset_size", [3, 9])
def test_coreset_stage_sizes_prefix_and_interior_rows(tmp_path, dist_coreset_size):
    """``build_coresets`` with an extractor whose every feature is unique, so that each saved
    vector names its image and position: ``int(sp*N)`` interior entries, ``int(sp*N)`` entries
    with edge, ``dist_coreset_size`` distribution entries; the interior and distribution
    coresets are prefixes of one greedy order over the interior features (of
    ``max(int(sp*N), dist_coreset_size)`` points), the with-edge one a greedy order over all."""
    from pni import pipeline
    from pni.config import parse_args, settings_from_flags

    n_img, rows, cols, dim, pad = 3, 6, 6, 5, 1
    table = np.random.default_rng(0).normal(size=(n_img * rows * cols, dim)).astype(np.float32)
    ids = np.arange(n_img * rows * cols).reshape(n_img, rows, cols)
    train_ds = [{"image": torch.from_numpy(ids[i]).float()[None].repeat(3, 1, 1)} for i in range(n_img)]

    def extractor(images):  # (B, 3, R, C) -> (B, R, C, E): the table row of each position's id
        return torch.from_numpy(table)[images[:, 0].round().long()]

    settings = settings_from_flags(
        parse_args(
            [
                "--patchsize",
                "3",
                "-p",
                "0.125",
                "--dist_coreset_size",
                str(dist_coreset_size),
                "--target_embed_dimension",
                str(dim),
                "--accelerator",
                "cpu",
                "--devices",
                "1",
            ]
        )
    )
    pipeline.build_coresets(settings, extractor, train_ds, tmp_path, tmp_path)

    def positions(name):  # (image, row, col) of every saved vector
        index = cs.load_index(tmp_path / name)
        vectors = cs.index_vectors(index)
        found = [np.flatnonzero((table == v).all(axis=1)) for v in vectors]
        assert all(len(f) == 1 for f in found)
        return [np.unravel_index(int(f[0]), ids.shape) for f in found]

    without = positions("embedding_coreset_index_12.faiss")
    with_edge = positions("embedding_coreset_index_12_with_edge.faiss")
    distribution = positions(f"dist_coreset_index_{dist_coreset_size}.faiss")
    n_without, n_with = n_img * (rows - 2 * pad) * (cols - 2 * pad), n_img * rows * cols  # 48, 108
    assert (len(without), len(with_edge), len(distribution)) == (
        int(0.125 * n_without),
        int(0.125 * n_with),
        dist_coreset_size,
    )
    assert all(pad <= r < rows - pad and pad <= c < cols - pad for _, r, c in without + distribution)
    longer = max(without, distribution, key=len)
    assert len(longer) == max(int(0.125 * n_without), dist_coreset_size)
    assert min(without, distribution, key=len) == longer[: min(len(without), len(distribution))]

    interior = [(i, r, c) for i in range(n_img) for r in range(pad, rows - pad) for c in range(pad, cols - pad)]
    points = table[[ids[p] for p in interior]].astype(np.float64)
    assert greedy_start(points, [interior.index(p) for p in longer]) is not None
    everything = [(i, r, c) for i in range(n_img) for r in range(rows) for c in range(cols)]
    assert greedy_start(table.astype(np.float64), [everything.index(p) for p in with_edge]) is not None
    assert any(not (pad <= r < rows - pad and pad <= c < cols - pad) for _, r, c in with_edge)
