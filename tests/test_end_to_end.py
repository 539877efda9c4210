"""End to end, from the saved files: the pipeline runs on a tiny generated category, then
every test image's four maps and image scores are recomputed from what it saved (the faiss
coresets, the two position priors, the MLP checkpoint, the backbone's weights file) with the
references of ``tests/reference.py`` (features from METHOD section 2 on the backbone's raw
layer outputs, the MLP from its state dict, the original's scoring loops, bilinear resize and
scipy's blur) and compared with the saved maps. Artefacts put in each other's place no
longer reproduce them.
"""

from __future__ import annotations

import csv
import itertools
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import reference
import torch
import torchvision
from helpers import MAPS, TINY, TRAIN
from PIL import Image

import train_coreset_distribution as tcd
from pni.data.synthetic import make_dataset

CATEGORY = "texture"
# TINY's settings with the backbone read from a weights file, a distribution coreset longer
# than the interior one (16 of 64 interior patches), and 3 mask workers' lost writes.
FLAGS = [f for f in TINY if f != "--random_init"] + ["--dist_coreset_size", "24", "--mask_workers", "3"]
SCORING = SimpleNamespace(
    anomaly_nn=3,
    patchsize=5,
    prob_gamma=0.99,
    softmax_temperature_alpha=2.0,
    softmax_nb_gamma=0.5,
    softmax_coor_gamma=0.5,
    variant="original",
    mask_workers=3,
)
DP, IMAGESIZE, SIGMA, RESIZE = 2, 64, 1.0, 64
ARRAYS = ("with_edge", "without_edge", "distribution", "prior", "prior_with_edge")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    make_dataset(root / "ds", num_train=4, num_test_per_type=1, image_size=64, categories=[CATEGORY])
    torch.manual_seed(11)
    backbone = torchvision.models.resnet18(weights=None)
    for m in backbone.modules():  # BatchNorm statistics that matter in eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(backbone.state_dict(), root / "r18.pth")
    argv = (
        [
            "--dataset_path",
            str(root / "ds"),
            "--category",
            CATEGORY,
            "--project_root_path",
            str(root / "result"),
            "--embedding_root_path",
            str(root),
            "--backbone_weights",
            str(root / "r18.pth"),
        ]
        + FLAGS
        + TRAIN
    )
    assert tcd.main(argv) == 0
    version = root / "result" / CATEGORY / "R18" / "anomaly" / "lightning_logs" / "version_0"
    with open(version / "image_scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return SimpleNamespace(
        root=root,
        emb=root / "embeddings_layer2+layer3" / CATEGORY / "R18",
        sample=version / "sample",
        rows=rows,
        backbone=root / "r18.pth",
    )


def saved_artefacts(emb) -> dict:
    """The artefacts as files hold them: faiss indexes, .npy priors, the MLP's state dict."""

    def vectors(name):
        index = faiss.read_index(str(emb / name))
        return index.reconstruct_n(0, index.ntotal).astype(np.float64)

    state = torch.load(emb / "best_model_dp2_dcs24_n3.pt", weights_only=True)["model"]
    return {
        "with_edge": vectors("embedding_coreset_index_25_with_edge.faiss"),
        "without_edge": vectors("embedding_coreset_index_25.faiss"),
        "distribution": vectors("dist_coreset_index_24.faiss"),
        "prior": np.load(emb / "coor_model_sp25.npy", allow_pickle=False).astype(np.float64),
        "prior_with_edge": np.load(emb / "coor_model_sp25_with_edge.npy", allow_pickle=False).astype(np.float64),
        "mlp": {k: v.numpy() for k, v in state.items()},
    }


def reference_features(backbone_file, paths) -> np.ndarray:
    """METHOD sections 1 and 2: ``(N, 8, 8, 32)`` features of the images at ``paths``."""
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(backbone_file, weights_only=True))
    images = np.stack([reference.image_tensor(Image.open(p), RESIZE, IMAGESIZE) for p in paths])
    layers = reference.resnet_layer_maps(model, torch.from_numpy(images).float(), ["layer2", "layer3"])
    return reference.patch_features(layers, 5, 48, 32)


@pytest.fixture(scope="module")
def test_features(run):
    paths = [run.root / "ds" / CATEGORY / "test" / r["defect_type"] / f"{r['stem']}.png" for r in run.rows]
    return reference_features(run.backbone, paths)


def recomputed(features: np.ndarray, art: dict, layout: str = "original"):
    """Full-size maps and image scores of one image's ``(R, C, E)`` features (METHOD 4-5)."""
    rows, cols, _ = features.shape
    pad = 2
    windows = np.stack(
        [
            reference.sliced_window(features, r, c, DP, layout)
            for r in range(pad, rows - pad)
            for c in range(pad, cols - pad)
        ]
    )
    logits = reference.mlp_logits(art["mlp"], windows)
    m = reference.naive_m(art["without_edge"], art["distribution"])
    coarse, image = reference.naive_scores(
        features,
        logits,
        art["without_edge"],
        art["with_edge"],
        art["distribution"],
        m,
        art["prior"],
        art["prior_with_edge"],
        SCORING,
    )
    return reference.full_size_maps(coarse, IMAGESIZE, SIGMA), image


def mismatch(run, features, art, layout="original") -> str:
    """The first saved map or image score that the artefacts do not reproduce ('' if all do)."""
    for row, feat in zip(run.rows, features):
        name = f"{row['defect_type']}_{row['stem']}"
        try:
            maps, image = recomputed(feat, art, layout)
        except (IndexError, ValueError) as exc:  # the artefacts do not even fit together
            return f"{name}: {type(exc).__name__}"
        for m in MAPS:
            saved = np.load(run.sample / f"{name}_amap_{m}.npy", allow_pickle=False)
            if saved.shape != maps[m].shape or not np.allclose(saved, maps[m], rtol=1e-4, atol=1e-4):
                return f"{name} {m} map"
            if abs(float(row[m]) - image[m]) > 1e-4 * max(1.0, abs(image[m])):
                return f"{name} {m} image score"
    return ""


def test_maps_recomputed_from_the_saved_files(run, test_features):
    art = saved_artefacts(run.emb)
    assert len(run.rows) == 4
    assert {k: len(art[k]) for k in ARRAYS} == {
        "with_edge": 64,
        "without_edge": 16,
        "distribution": 24,
        "prior": 64,
        "prior_with_edge": 64,
    }
    assert mismatch(run, test_features, art) == ""
    # the saved image and mask are the dataset's (64 px: no resize, no crop)
    for row in run.rows:
        name, stem = row["defect_type"], row["stem"]
        image = np.asarray(Image.open(run.root / "ds" / CATEGORY / "test" / name / f"{stem}.png").convert("RGB"))
        np.testing.assert_array_equal(np.load(run.sample / f"{name}_{stem}.npy"), image)
        gt = np.load(run.sample / f"{name}_{stem}_gt.npy")
        assert gt.any() == (name != "good")


@pytest.mark.parametrize("first,second", list(itertools.combinations(ARRAYS, 2)))
def test_swapped_artefacts_do_not_reproduce_the_maps(run, test_features, first, second):
    art = saved_artefacts(run.emb)
    art[first], art[second] = art[second], art[first]
    assert mismatch(run, test_features, art) != ""


def test_test_time_logits_from_the_saved_mlp(run, test_features):
    """The test stage's MLP input: the windows of every interior position in the original
    layout (centre kept, right-hand neighbour dropped), through the saved MLP in eval mode.
    (The maps alone barely depend on the logits of this tiny, briefly trained MLP.)"""
    from pni.distributions import load_mlp_checkpoint, mlp_from_state_dict
    from pni.model import PNIModel
    from pni.scoring import ScoringArtefacts, ScoringConfig

    art = saved_artefacts(run.emb)
    mlp = mlp_from_state_dict(load_mlp_checkpoint(run.emb / "best_model_dp2_dcs24_n3.pt")["model"])
    arrays = ScoringArtefacts.build(
        *(
            torch.from_numpy(art[k]).float()
            for k in ("without_edge", "with_edge", "distribution", "prior", "prior_with_edge")
        )
    )
    for layout in ("original", "paper"):
        model = PNIModel(None, mlp, arrays, ScoringConfig(patchsize=5, variant=layout), DP, RESIZE)
        for feat in test_features:
            got = model.nb_logits(torch.from_numpy(feat).float()).double().numpy()
            windows = np.stack(
                [reference.sliced_window(feat, r, c, DP, layout) for r in range(2, 6) for c in range(2, 6)]
            )
            np.testing.assert_allclose(got, reference.mlp_logits(art["mlp"], windows), rtol=1e-4, atol=1e-4)
    windows = [
        np.stack(
            [reference.sliced_window(test_features[0], r, c, DP, layout) for r in range(2, 6) for c in range(2, 6)]
        )
        for layout in ("original", "paper")
    ]
    assert (
        np.abs(reference.mlp_logits(art["mlp"], windows[0]) - reference.mlp_logits(art["mlp"], windows[1])).max() > 1e-3
    )


def test_position_priors_recomputed_from_the_training_features(run):
    """METHOD 4: nearest coreset entry of every training position (interior positions and the
    interior coreset; all positions and the with-edge coreset), counted within ``dp``,
    normalised per position."""
    art = saved_artefacts(run.emb)
    paths = sorted((run.root / "ds" / CATEGORY / "train" / "good").glob("*.png"))
    bank = reference_features(run.backbone, paths)  # (4, 8, 8, 32)
    interior = [r * 8 + c for r in range(2, 6) for c in range(2, 6)]
    for key, coreset, positions in (("prior", "without_edge", interior), ("prior_with_edge", "with_edge", range(64))):
        feats = bank.reshape(len(paths), 64, -1)[:, list(positions)]
        labels = ((feats[:, :, None, :] - art[coreset][None, None]) ** 2).sum(-1).argmin(-1)
        counts = reference.position_counts(labels, list(positions), 8, 8, len(art[coreset]), DP)
        expected = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        np.testing.assert_allclose(art[key], expected, rtol=0, atol=1e-6, err_msg=key)
