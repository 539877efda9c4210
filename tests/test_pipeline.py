"""End to end: train_coreset_distribution.py on a tiny generated dataset."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, aurocs_from_saved, path_flags
from sklearn.metrics import roc_auc_score

import train_coreset_distribution as tcd
from pni.config import build_parser, parse_args
from pni.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_dataset(root / "ds", num_train=4, num_test_per_type=2, image_size=64, categories=["texture"])
    base = path_flags(root / "ds", root) + TINY
    assert tcd.main(base + ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]) == 0
    return root, base


def test_artefacts_have_the_original_names(tiny_run):
    root, _ = tiny_run
    emb = root / "embeddings_layer2+layer3" / "texture" / "R18"
    names = {p.name for p in emb.iterdir()}
    for expected in (
        "embedding_coreset_index_25.faiss",
        "embedding_coreset_index_25_with_edge.faiss",
        "dist_coreset_index_16.faiss",
        "best_model_dp2_dcs16_n3.pt",
        "coor_model_sp25.npy",
        "coor_model_sp25_with_edge.npy",
        "coreset_settings.json",
    ):
        assert expected in names
    assert not any(n.startswith(".") for n in names)  # no temporary or scratch file left
    prior = np.load(emb / "coor_model_sp25_with_edge.npy")
    assert prior.shape[0] == 8 * 8  # R18 layer2 at 64 px: 8 x 8 grid
    np.testing.assert_allclose(prior.sum(1), 1.0, rtol=1e-5)
    ckpt = torch.load(emb / "best_model_dp2_dcs16_n3.pt", weights_only=True)
    assert ckpt["model"]["first_layer.0.weight"].shape == (2048, 24 * 32)


def test_results_layout_and_score_table(tiny_run):
    root, _ = tiny_run
    version = root / "result" / "texture" / "R18" / "anomaly" / "lightning_logs" / "version_0"
    sample = version / "sample"
    stems = sorted(p.name for p in sample.glob("*_gt.npy"))
    assert len(stems) == 8  # 2 good + 2 x 3 defect types
    prefix = sample / stems[0][: -len("_gt.npy")]
    assert np.load(f"{prefix}.npy").shape == (64, 64, 3)
    for m in ("nb", "coor", "patchcore", "nb_coor"):
        amap = np.load(f"{prefix}_amap_{m}.npy", allow_pickle=False)
        assert amap.shape == (64, 64) and amap.dtype == np.float32
        assert Path(f"{prefix}_amap_{m}.jpg").is_file()
    with open(root / "result" / "score_result.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["category"] == "texture"
    with open(version / "image_scores.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    expected = aurocs_from_saved(version)  # scikit-learn on the saved maps, masks and image scores
    assert len(expected) == 8
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, abs=1e-6), key


def test_rerun_without_train_flags_reuses_artefacts(tiny_run):
    root, base = tiny_run
    emb = root / "embeddings_layer2+layer3" / "texture" / "R18"
    before = {p.name: p.stat().st_mtime_ns for p in emb.iterdir()}
    assert tcd.main(base) == 0
    assert {p.name: p.stat().st_mtime_ns for p in emb.iterdir()} == before
    v0 = root / "result" / "texture" / "R18" / "anomaly" / "lightning_logs" / "version_0" / "sample"
    v1 = v0.parent.parent / "version_1" / "sample"
    for f in sorted(v0.glob("*_amap_nb_coor.npy")):  # same artefacts, same maps
        np.testing.assert_allclose(np.load(f), np.load(v1 / f.name), rtol=1e-5, atol=1e-6)
    with open(root / "result" / "score_result.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_incompatible_artefacts_are_refused(tiny_run, capsys):
    _, base = tiny_run
    assert tcd.main(base + ["--dist_coreset_size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--dist_coreset_size 8" in err and "\n" not in err


def test_every_flag_has_the_original_default():
    args = parse_args([])
    expected = dict(
        dataset_path="../dataset/MVTecAD",
        dataset_category="MVTec",
        project_root_path="./result",
        seed=22,
        backbone="WR101",
        layer_index=["layer2", "layer3"],
        pretrain_embed_dimension=1024,
        target_embed_dimension=1024,
        anomaly_nn=3,
        patchsize=5,
        subsampling_percentage=0.01,
        resize=512,
        imagesize=480,
        dist_coreset_size=2048,
        dist_padding=4,
        num_layers=10,
        num_epochs=15,
        learning_rate=1e-3,
        step_size=5,
        dist_batchsize=2048,
        softmax_temperature_alpha=2.0,
        prob_gamma=0.99,
        softmax_nb_gamma=0.5,
        softmax_coor_gamma=0.5,
        blursigma=8.0,
        variant="original",
        mask_workers=8,
        train_coreset=False,
        train_nb_dist=False,
        train_coor_dist=False,
    )
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    helps = [a.help for a in build_parser()._actions if a.dest != "help"]
    assert all(helps)


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--backbone", "VGG"], "--backbone"),
        (["--subsampling_percentage", "1.5"], "--subsampling_percentage"),
        (["--patchsize", "4"], "--patchsize"),
        (["--nb_mask", "other"], "--nb_mask"),
        (["--variant", "official"], "--variant"),
        (["--mask_workers", "0"], "--mask_workers"),
        (["--nb_mask", "paper", "--variant", "original"], "--nb_mask paper means --variant paper"),
        (["--dataset_category", "mvtec2"], "--dataset_category"),
        (["--imagesize", "600"], "--imagesize"),
    ],
)
def test_bad_flag_values_are_refused(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_missing_dataset_is_one_line(tmp_path, capsys):
    code = tcd.main(["--dataset_path", str(tmp_path / "nope"), "--embedding_root_path", str(tmp_path)] + TINY)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and str(tmp_path / "nope") in err and "\n" not in err


def test_report_tables_per_category_and_defect_type(tiny_run):
    from pni.report import latest_run, load_run, per_defect_scores, report

    root, _ = tiny_run
    text = report(root / "result", ["texture"], "R18")
    assert "per category" in text and "texture/hole" in text and "texture/scratch" in text
    rows, samples = load_run(latest_run(root / "result", "texture", "R18"))
    hole = [d for d in per_defect_scores(rows, samples) if d["defect_type"] == "hole"][0]
    keep = [i for i, r in enumerate(rows) if r["defect_type"] in ("good", "hole")]
    expected = roc_auc_score(
        np.concatenate([samples[i]["gt"].reshape(-1) for i in keep]),
        np.concatenate([samples[i]["nb"].reshape(-1) for i in keep]),
    )
    assert hole["n"] == 2 and hole["nb_P-AUROC"] == pytest.approx(expected, abs=1e-12)
    expected = roc_auc_score([int(rows[i]["label"]) for i in keep], [float(rows[i]["coor"]) for i in keep])
    assert hole["coor_I-AUROC"] == pytest.approx(expected, abs=1e-12)


def test_old_nb_mask_flag_maps_to_variant(capsys):
    assert parse_args(["--nb_mask", "official"]).variant == "original"
    assert "--nb_mask official is the old name of --variant original" in capsys.readouterr().err
    args = parse_args(["--nb_mask", "paper", "--variant", "paper"])
    assert args.variant == "paper" and not hasattr(args, "nb_mask")
    assert parse_args(["--variant", "paper"]).variant == "paper"


def test_variant_and_workers_are_recorded(tiny_run):
    root, _ = tiny_run
    version = root / "result" / "texture" / "R18" / "anomaly" / "lightning_logs" / "version_0"
    settings = json.loads((version / "settings.json").read_text())
    assert settings["variant"] == "original" and settings["mask_workers"] == 8
    with open(root / "result" / "score_result.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["variant"] == "original" and row["mask_workers"] == "8"
    emb = root / "embeddings_layer2+layer3" / "texture" / "R18"
    assert json.loads((emb / "nb_settings.json").read_text())["variant"] == "original"
    ckpt = torch.load(emb / "best_model_dp2_dcs16_n3.pt", weights_only=True)
    assert ckpt["settings"]["variant"] == "original"


def test_model_of_the_other_variant_is_refused(tiny_run, capsys):
    _, base = tiny_run
    assert tcd.main(base + ["--variant", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--variant" in err and "\n" not in err


def test_original_format_checkpoint_is_the_original_layout(tiny_run, tmp_path, capsys):
    """A checkpoint as the published code writes it (an argparse Namespace, no layout) is taken
    as the original window layout: accepted under --variant original, refused under paper."""
    import argparse
    import shutil

    root, base = tiny_run
    src = root / "embeddings_layer2+layer3" / "texture" / "R18"
    dst = tmp_path / "embeddings_layer2+layer3" / "texture" / "R18"
    shutil.copytree(src, dst)
    (dst / "nb_settings.json").unlink()
    ours = torch.load(dst / "best_model_dp2_dcs16_n3.pt", weights_only=True)
    namespace = argparse.Namespace(
        backbone="R18",
        layer_index=["layer2", "layer3"],
        pretrain_embed_dimension=48,
        target_embed_dimension=32,
        patchsize=5,
        dist_padding=2,
        dist_coreset_size=16,
        num_layers=3,
        seed=0,
    )
    torch.save(
        {"model": ours["model"], "args": namespace, "train_loss": 1.0, "val_loss": 1.0},
        dst / "best_model_dp2_dcs16_n3.pt",
    )
    moved = ["--embedding_root_path", str(tmp_path), "--project_root_path", str(tmp_path / "result")]
    assert tcd.main(base + moved) == 0
    capsys.readouterr()
    assert tcd.main(base + moved + ["--variant", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert "original window layout" in err and "--variant" in err and "\n" not in err
