"""Deploying without PyTorch: the ONNX graph of a trained model (pni.deploy.onnx_export)
against PNIModel.score, its masked selections against naive references, the torch-free
runtime (pni.deploy.onnx_runtime) and preprocessing (pni.data.images).

Tiny models of both variants are trained and exported once (module fixture); each case
exports a graph for one scoring setting and compares onnxruntime's outputs with torch's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import TINY, TRAIN, path_flags
from PIL import Image

import export_model
import train_coreset_distribution as tcd
from pni.bundle import load_bundle
from pni.data import images as np_images
from pni.data import transforms as torch_transforms
from pni.data.synthetic import make_dataset
from pni.deploy.onnx_export import (
    PNIGraph,
    adaptive_pool_weights,
    export_onnx,
    initializer_report,
    kth_buckets,
    kth_smallest,
    position_select,
)
from pni.deploy.onnx_runtime import ONNX_DATA, ONNX_FILE, OnnxScorer
from pni.errors import PNIError
from pni.maps import MAP_NAMES
from pni.model import ARTEFACT_NAMES, PNIModel
from pni.scoring import ScoringArtefacts, interior_indices, parent_share, position_allowed
from pni.scoring_kernels import ChunkDistances, RankColumns, blocked_indicator, pairwise_distances

REPO = Path(__file__).resolve().parents[1]
MAP_TOLERANCE = 1e-4  # of each map's range
SCORE_TOLERANCE = 1e-5  # relative
BLOCKED_MODULES = ("torch", "torchvision", "pytorch_lightning", "lightning", "lightning_fabric", "faiss")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny texture model per variant, trained and exported as a bundle; the test images
    preprocessed as the model's input."""
    root = tmp_path_factory.mktemp("onnx")
    ds = root / "ds"
    make_dataset(ds, num_train=4, num_test_per_type=2, image_size=64, categories=["texture"])
    out: dict = {"paths": sorted((ds / "texture" / "test").rglob("*.png"))}
    for variant in ("original", "paper"):
        work = root / variant
        flags = path_flags(ds, work) + TINY + ["--variant", variant]
        assert tcd.main(flags + TRAIN) == 0
        assert export_model.main(flags + ["--output", str(work / "bundle")]) == 0
        out[variant] = work / "bundle"
    model, _ = load_bundle(out["original"])
    out["images"] = np.stack([np_images.input_array(np_images.load_image(p), model.resize, 64) for p in out["paths"]])
    return out


def with_config(model: PNIModel, **changes) -> PNIModel:
    """The same trained model (its modules and arrays) scored under other settings."""
    return PNIModel(
        model.extractor,
        model.mlp,
        model.artefacts(),
        dataclasses.replace(model.config, **changes),
        model.dist_padding,
        model.resize,
    )


def permuted_distribution(model: PNIModel) -> PNIModel:
    """The model with its distribution coreset in another order (MLP classes permuted alike):
    ``m(k)`` is then no prefix map, so the original variant's rank columns do not increase."""
    perm = torch.randperm(len(model.distribution_coreset), generator=torch.Generator().manual_seed(3))
    mlp = type(model.mlp)(
        model.mlp.first_layer[0].in_features,
        len(perm),
        num_layers=len(model.mlp.hidden_layers) + 2,
        hidden=model.mlp.first_layer[0].out_features,
    )
    state = dict(model.mlp.state_dict())
    state["last_layer.0.weight"] = state["last_layer.0.weight"][perm]
    state["last_layer.0.bias"] = state["last_layer.0.bias"][perm]
    mlp.load_state_dict(state)
    art = ScoringArtefacts.build(
        model.embedding_without_edge,
        model.embedding_with_edge,
        model.distribution_coreset[perm].contiguous(),
        model.position_prior,
        model.position_prior_with_edge,
    )
    return PNIModel(model.extractor, mlp.eval(), art, model.config, model.dist_padding, model.resize)


def biting(model: PNIModel, images: np.ndarray, **changes) -> PNIModel:
    """Settings whose masks bite: the neighbourhood threshold in the middle of the widest gap
    between neighbouring softmax values near their median (about half the distribution entries
    blocked per position, and no value within rounding of the threshold), the position
    threshold at the 80th percentile of the nonzero prior values."""
    cfg = model.config
    with torch.no_grad():
        feats = model.extractor(torch.from_numpy(images))
        probs = torch.cat([torch.softmax(model.nb_logits(f) / cfg.softmax_temperature_alpha, -1) for f in feats])
    values = np.unique(probs.numpy().ravel())
    mid = len(values) // 2
    window = values[mid - len(values) // 10 : mid + len(values) // 10 + 1]
    gap = int(np.argmax(np.diff(window)))
    nb_threshold = 0.5 * (float(window[gap]) + float(window[gap + 1]))
    k1, k2 = len(model.embedding_without_edge), len(model.embedding_with_edge)
    prior = model.position_prior_with_edge.numpy()
    coor_threshold = float(np.quantile(prior[prior > 0], 0.8))
    return with_config(model, softmax_nb_gamma=nb_threshold * k1, softmax_coor_gamma=coor_threshold * k2, **changes)


def selection_counts(model: PNIModel, images: np.ndarray) -> dict[str, int]:
    """How often each masked path is taken on ``images`` (torch's scoring functions): rows of the
    original's nb map whose first allowed column is neither 0 nor the last, or the last; rows
    of the paper's nb map whose nearest entry is blocked; position-score rows (both priors)
    whose nearest allowed entry falls to the lost-write cut, or that have none allowed."""
    cfg = model.config
    with torch.no_grad():
        feats = model.extractor(torch.from_numpy(images))
    rows, cols, dim = feats.shape[1:]
    inner = interior_indices(rows, cols, model.pad)
    k1, k2, d = len(model.embedding_without_edge), len(model.embedding_with_edge), len(model.distribution_coreset)
    original = cfg.variant == "original"
    counts = dict(first_inner=0, first_last=0, nb_blocked_nearest=0, position_cut=0, position_none=0)
    for f in feats:
        x_all = f.reshape(-1, dim)
        x_int = x_all[inner]
        probs = torch.softmax(model.nb_logits(f) / cfg.softmax_temperature_alpha, -1)
        blocked_d = blocked_indicator(probs > cfg.softmax_nb_gamma / k1, torch.float32)
        d1 = pairwise_distances(x_int, model.embedding_without_edge)
        if original:
            rc = RankColumns.build(model.embedding_to_distribution, parent_share(d, cfg.mask_workers))
            first = rc.first_allowed(ChunkDistances.between(x_int, model.distribution_coreset), blocked_d, k1 - 1)
            counts["first_inner"] += int(((first > 0) & (first < k1 - 1)).sum())
            counts["first_last"] += int((first == k1 - 1).sum())
        else:
            nearest = d1.argmin(dim=1)
            blocked = blocked_d[torch.arange(len(nearest)), model.embedding_to_distribution[nearest]]
            counts["nb_blocked_nearest"] += int(blocked.sum())
        for dist, prior, k in (
            (d1, model.position_prior[inner], k1),
            (pairwise_distances(x_all, model.embedding_with_edge), model.position_prior_with_edge, k2),
        ):
            allowed = position_allowed(prior, cfg.softmax_coor_gamma, k)
            best = torch.where(allowed, dist, torch.inf).amin(dim=1)
            keep = parent_share(k, cfg.mask_workers) if original else k
            counts["position_none"] += int((~torch.isfinite(best)).sum())
            counts["position_cut"] += int((torch.isfinite(best) & ((dist < best[:, None]).sum(1) >= keep)).sum())
    return counts


def compare(scored: list, reference: list) -> None:
    """onnxruntime's maps (and coarse maps) within MAP_TOLERANCE of each map's range from
    torch's, image scores within SCORE_TOLERANCE relative."""
    assert len(scored) == len(reference)
    for got, want in zip(scored, reference):
        for m in MAP_NAMES:
            full, coarse = want.maps[m].numpy(), want.coarse[m].numpy()
            span = float(full.max() - full.min())
            assert got.maps[m].shape == full.shape and got.coarse[m].shape == coarse.shape
            assert np.abs(got.maps[m] - full).max() <= MAP_TOLERANCE * span, m
            assert np.abs(got.coarse[m] - coarse).max() <= MAP_TOLERANCE * span, m
            assert abs(got.image[m] - want.image[m]) <= SCORE_TOLERANCE * abs(want.image[m]), m


# ---------------------------------------------------------------- graph against PNIModel.score

CASES = {
    "original-8": ("original", False, False, {}),
    "original-8-biting": ("original", True, False, {}),
    "original-1-biting": ("original", True, False, {"mask_workers": 1}),
    "original-3-biting-unordered": ("original", True, True, {"mask_workers": 3}),
    "original-1-biting-unordered": ("original", True, True, {"mask_workers": 1}),
    "paper": ("paper", False, False, {}),
    "paper-biting": ("paper", True, False, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_scores_as_torch(trained, tmp_path, case):
    variant, bite, unordered, changes = CASES[case]
    images = trained["images"]
    model, _ = load_bundle(trained[variant])
    if unordered:
        model = permuted_distribution(model)
    model = biting(model, images, **changes) if bite else with_config(model, **changes)
    counts = selection_counts(model, images)
    graph = PNIGraph(model)
    if unordered:
        assert not graph.rank_columns.increasing
    elif variant == "original":
        assert graph.rank_columns.increasing
    if bite:  # the masks decide: each path of the static formulation is taken
        workers = model.config.mask_workers
        assert counts["position_none"] > 0, counts
        if variant == "original":
            assert counts["first_inner"] > 0 and graph.buckets, counts  # TopK over the rows NonZero picks
            assert (counts["position_cut"] > 0) == (workers > 1), counts  # the lost writes' rank cut
            assert (counts["first_last"] > 0) or workers < 8, counts  # no allowed rank among the written ones
        else:
            assert counts["nb_blocked_nearest"] > 0, counts
    reference = model.score(torch.from_numpy(images))
    names = export_onnx(model, tmp_path)
    assert names == [ONNX_FILE] and sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE]
    scorer = OnnxScorer(tmp_path / ONNX_FILE)
    assert scorer.imagesize == model.imagesize and scorer.resize == model.resize
    compare(scorer.score(images), reference)  # the whole batch in one run
    compare([scorer.score(images[i : i + 1])[0] for i in range(3)], reference[:3])  # batch of one


@pytest.mark.parametrize("variant", ["original", "paper"])
def test_graph_file_holds_each_array_once(trained, tmp_path, variant):
    model, _ = load_bundle(trained[variant])
    export_onnx(model, tmp_path)
    path = tmp_path / ONNX_FILE
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    # the bundle's arrays as they are (the exporter keeps one of equal arrays: in the tiny model the
    # distribution coreset is the without-edge one); the original variant reads m(k) through its
    # rank columns only
    needed = [n for n in ARTEFACT_NAMES if variant == "paper" or n != "embedding_to_distribution"]
    for name in needed:
        array = getattr(model, name).numpy()
        assert any(np.array_equal(a, array) and a.dtype == array.dtype for a in inits.values()), name
    if variant == "original":
        first = RankColumns.build(
            model.embedding_to_distribution, parent_share(len(model.distribution_coreset), 8)
        ).first
        assert np.array_equal(inits["first_columns"], first.numpy())
    report = initializer_report(path)
    assert report["repeated"] == []
    bundle_bytes = sum(
        (trained[variant] / f).stat().st_size for f in ("arrays.safetensors", "mlp.safetensors", "backbone.safetensors")
    )
    assert 0.95 * bundle_bytes <= report["file_bytes"] <= 1.05 * bundle_bytes + 2**20
    largest_tensor = max(t.numel() * t.element_size() for t in [*model.state_dict().values()])
    assert max(a.nbytes for a in inits.values()) <= largest_tensor  # nothing per position was folded in
    assert {p.key: p.value for p in proto.metadata_props}["pni.variant"] == variant
    [graph_input] = proto.graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a dynamic batch
    assert [o.name for o in proto.graph.output] == ["maps", "image_scores", "coarse_maps"]


def test_graph_with_external_data(trained, tmp_path):
    """Above 2 GB the initializers go to model.onnx.data (forced here on the tiny model)."""
    model, _ = load_bundle(trained["paper"])
    (tmp_path / "a").mkdir()
    assert export_onnx(model, tmp_path / "a", external_data=True) == [ONNX_FILE, ONNX_DATA]
    assert (tmp_path / "a" / ONNX_FILE).stat().st_size < 2**20 < (tmp_path / "a" / ONNX_DATA).stat().st_size
    onnx.checker.check_model(str(tmp_path / "a" / ONNX_FILE))
    images = trained["images"][:2]
    compare(OnnxScorer(tmp_path / "a" / ONNX_FILE).score(images), model.score(torch.from_numpy(images)))
    assert export_onnx(model, tmp_path / "a") == [ONNX_FILE]  # replaced by one file: no stale data left
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ONNX_FILE]


# ---------------------------------------------------------------- masked selections, exactly


def _export_function(fn, args: tuple, path: Path) -> ort.InferenceSession:
    class Wrapped(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    names = [f"x{i}" for i in range(len(args))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on constants
        torch.onnx.export(
            Wrapped(),
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            dynamic_axes={n: {0: "n"} for n in names},
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_kth_buckets_by_hand():
    assert kth_buckets([0, 1, 5, 15, 16, 200, 999, 1000], 1001) == [(1, 16, 16), (16, 128, 17), (128, 1000, 1000)]
    assert kth_buckets([0, 7, 7], 8) == []  # only the minimum and the maximum
    assert kth_buckets([3, 20], 16) == [(1, 15, 4)]  # k in 1..14 only


def test_kth_smallest_matches_a_sort(tmp_path):
    rng = np.random.default_rng(0)
    width = 300
    q = rng.normal(size=(2, 60, width)).astype(np.float32)
    possible = [0, 1, 9, 15, 16, 100, 127, 128, 250, width - 1]
    buckets = kth_buckets(possible, width)
    assert len(buckets) == 3
    k = rng.choice([0, 1, 9, 100, 250, width - 1], size=(2, 60))  # nothing in 128..249's neighbours but 250
    want = np.argsort(q, axis=-1, kind="stable")[np.arange(2)[:, None], np.arange(60)[None, :], k]
    got = kth_smallest(torch.from_numpy(q), torch.from_numpy(k), buckets).numpy()
    assert np.array_equal(got, want)
    session = _export_function(
        lambda a, b: kth_smallest(a, b, buckets), (torch.from_numpy(q), torch.from_numpy(k)), tmp_path / "k.onnx"
    )
    assert np.array_equal(session.run(None, {"x0": q, "x1": k})[0], want)
    only_ends = np.where(k < 128, 0, width - 1)  # buckets with no rows: NonZero finds nothing
    want_ends = np.where(only_ends == 0, q.argmin(-1), q.argmax(-1))
    assert np.array_equal(session.run(None, {"x0": q, "x1": only_ends})[0], want_ends)


@pytest.mark.parametrize("keep", [None, 1, 3])
def test_position_select_matches_a_loop(tmp_path, keep):
    rng = np.random.default_rng(1)
    n, width = 40, 12
    q = rng.normal(size=(2, n, width)).astype(np.float32)
    allowed = rng.random((n, width)) < 0.3
    allowed[:4] = False  # nothing allowed: the farthest entry
    want = np.empty((2, n), dtype=np.int64)
    for b in range(2):
        for i in range(n):
            order = list(np.argsort(q[b, i]))
            ranks = [r for r, k in enumerate(order) if allowed[i, k]]
            ok = ranks and (keep is None or ranks[0] < keep)
            want[b, i] = order[ranks[0]] if ok else order[-1]
    got = position_select(torch.from_numpy(q), torch.from_numpy(allowed), keep).numpy()
    assert np.array_equal(got, want)
    session = _export_function(
        lambda a: position_select(a, torch.from_numpy(allowed), keep), (torch.from_numpy(q),), tmp_path / "p.onnx"
    )
    assert np.array_equal(session.run(None, {"x0": q})[0], want)


@pytest.mark.parametrize("n_in, n_out", [(3200, 48), (12800, 1024), (1152, 256), (48, 100), (7, 7), (96, 64)])
def test_adaptive_pool_as_a_matrix(n_in, n_out):
    x = torch.randn(5, n_in, generator=torch.Generator().manual_seed(0))
    w = adaptive_pool_weights(n_in, n_out)
    g = n_in // w.shape[0]
    got = (x.reshape(5, g, -1) @ w).reshape(5, n_out)
    want = torch.nn.functional.adaptive_avg_pool1d(x[:, None, :], n_out)[:, 0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the torch-free runtime

_BLOCKER = f"""
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED_MODULES!r}:
            raise ImportError("blocked in this test: " + name)
sys.meta_path.insert(0, _NoTorch())
"""

_SCORE_WITHOUT_TORCH = """
import json
import numpy as np
try:
    import torch
    raise SystemExit("torch imported despite the blocker")
except ImportError:
    pass
from pni.data.images import CropGeometry, input_array, load_image
from pni.deploy.onnx_runtime import OnnxScorer
from pni.maps import MAP_NAMES
scorer = OnnxScorer(sys.argv[1])
paths = sys.argv[3:]
x = np.stack([input_array(load_image(p), scorer.resize, scorer.imagesize) for p in paths])
out = scorer.score(x)
np.save(sys.argv[2], np.stack([[o.maps[m] for m in MAP_NAMES] for o in out]))
g = CropGeometry.of(100, 70, scorer.resize, scorer.imagesize)
assert g.to_input(out[0].maps["nb"]).shape == (70, 100)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
print(json.dumps({{"loaded": loaded, "providers": scorer.providers, "scores": [o.image for o in out]}}))
"""


def test_runtime_runs_without_torch(trained, tmp_path):
    model, _ = load_bundle(trained["paper"])
    export_onnx(model, tmp_path)
    paths = [str(p) for p in trained["paths"][:3]]
    script = _BLOCKER + _SCORE_WITHOUT_TORCH.format(blocked=BLOCKED_MODULES)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / ONNX_FILE), str(tmp_path / "maps.npy"), *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["providers"] == ["CPUExecutionProvider"]
    reference = model.score(torch.from_numpy(trained["images"][:3]))
    maps = np.load(tmp_path / "maps.npy")
    for got, scores, want in zip(maps, result["scores"], reference):
        for j, m in enumerate(MAP_NAMES):
            span = float(want.maps[m].max() - want.maps[m].min())
            assert np.abs(got[j] - want.maps[m].numpy()).max() <= MAP_TOLERANCE * span
            assert abs(scores[m] - want.image[m]) <= SCORE_TOLERANCE * abs(want.image[m])


def test_runtime_refuses_what_it_cannot_run(tmp_path, trained):
    with pytest.raises(PNIError, match="--onnx"):
        OnnxScorer(tmp_path / ONNX_FILE)
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(PNIError, match="cannot load ONNX graph .*broken.onnx"):
        OnnxScorer(tmp_path / "broken.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    foreign = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [x],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(PNIError, match="not a PNI ONNX graph"):
        OnnxScorer(tmp_path / "foreign.onnx")
    model, _ = load_bundle(trained["paper"])
    export_onnx(model, tmp_path)
    scorer = OnnxScorer(tmp_path / ONNX_FILE)
    with pytest.raises(PNIError, match=r"images of shape \(N, 3, 64, 64\)"):
        scorer.score(np.zeros((1, 3, 32, 32), np.float32))
    assert scorer.score(np.zeros((0, 3, 64, 64), np.float32)) == []


# ---------------------------------------------------------------- preprocessing, bit for bit


def _image(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)


@pytest.mark.parametrize(
    "width, height, resize, size, mode",
    [
        (37, 53, 31, 29, "RGB"),
        (53, 37, 31, 31, "L"),
        (101, 61, 64, 63, "RGBA"),
        (64, 64, 64, 64, "RGB"),  # no resize
        (17, 200, 40, 33, "P"),
        (301, 211, 128, 127, "I;16"),
        (33, 35, 17, 40, "RGB"),  # crop larger than the resized image: zero padding
        (640, 480, 512, 480, "LA"),
    ],
)
def test_input_array_is_torchvisions_tensor(width, height, resize, size, mode):
    from torchvision import transforms as T

    img = _image(np.random.default_rng(width * height), width, height, mode)
    rgb = np_images.to_rgb(img)
    got = np_images.input_array(rgb, resize, size)
    torchvision_chain = T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean=np_images.IMAGENET_MEAN, std=np_images.IMAGENET_STD),
        ]
    )
    want = torchvision_chain(rgb).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape == (3, size, size)
    assert np.array_equal(got, want)
    assert np.array_equal(torch_transforms.image_transform(resize, size)(rgb).numpy(), want)  # the datasets' tensors


def test_input_array_refuses_other_modes():
    with pytest.raises(PNIError, match="mode L"):
        np_images.input_array(Image.new("L", (8, 8)), 8, 8)
