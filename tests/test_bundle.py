"""The exported bundle (export_model.py): its files and manifest, the thresholds calibrated
on good images (against a loop, scikit-learn and a hand-worked case), the export's checks of
its output folder, exporting a model trained on own data, and bundles that predict refuses
(not a bundle, missing, altered, corrupt or hand-edited files, backbone weights to find).

With the session's shared tiny run and its bundle (``tiny_run.bundle``), copied where a case
changes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MAPS, TRAIN, expect_one_error, snapshot_tree

import export_model
import predict as predict_cli
import train_coreset_distribution as tcd
from pni.calibration import best_f1_cut, threshold_at_fpr


@pytest.fixture
def copy_bundle(tiny_run, tmp_path):
    def make() -> Path:
        dest = tmp_path / "copy"
        shutil.copytree(tiny_run.bundle, dest)
        return dest

    return make


# ---------------------------------------------------------------- contents


def test_bundle_holds_the_model_and_its_thresholds(tiny_run):
    bundle = tiny_run.bundle
    names = {p.name for p in bundle.iterdir()}
    assert names == {"manifest.json", "arrays.safetensors", "mlp.safetensors", "backbone.safetensors"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "pni-bundle" and manifest["format_version"] == 1
    assert manifest["features"] == {
        "backbone": "R18",
        "layers": ["layer2", "layer3"],
        "pretrain_embed_dimension": 48,
        "target_embed_dimension": 32,
        "patchsize": 5,
        "resize": 64,
        "imagesize": 64,
    }
    assert manifest["neighbourhood"]["window_layout"] == "original" and manifest["neighbourhood"]["dropped_slot"] == 13
    assert manifest["scoring"]["variant"] == "original" and manifest["scoring"]["mask_workers"] == 8
    assert manifest["backbone_weights"]["random_init"] and manifest["backbone_weights"]["included"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    from safetensors.torch import load_file

    arrays = load_file(str(bundle / "arrays.safetensors"))
    assert set(arrays) == {
        "embedding_without_edge",
        "embedding_with_edge",
        "distribution_coreset",
        "embedding_to_distribution",
        "position_prior",
        "position_prior_with_edge",
    }
    assert arrays["distribution_coreset"].shape == (16, 32) and arrays["position_prior"].shape[0] == 8 * 8
    for m in MAPS:  # 10 good calibration images; the 6 defective test images with masks
        t = manifest["thresholds"][m]
        assert t["image"]["good_images"] == 10 and t["image"]["defective_images"] == 6
        assert t["pixel_best_f1"]["defective_images"] == 6 and t["heatmap"]["high"] > t["heatmap"]["low"]


def test_bundle_loads_without_unpickling(tiny_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    import pni

    p = pni.load_model(tiny_run.bundle, "cpu").predict(tiny_run.ds / "texture" / "test" / "good" / "000.png")
    assert p.verdict in ("good", "defective")


# ---------------------------------------------------------------- thresholds


def loop_threshold(scores: list[float], fpr: float) -> float:
    """Reference: the smallest score value t with at most floor(fpr*N) scores > t, plus the
    relative margin 1e-4."""
    allowed = math.floor(fpr * len(scores))
    for t in sorted(set(scores)):
        if sum(s > t for s in scores) <= allowed:
            return t * (1 + 1e-4)
    raise AssertionError


def test_threshold_at_fpr_against_a_loop():
    rng = np.random.default_rng(3)
    assert threshold_at_fpr([5, 1, 4, 2, 3], 0.2) == pytest.approx(4.0004)  # one of five above: 5
    assert threshold_at_fpr([5, 1, 4, 2, 3], 0.01) == pytest.approx(5.0005)
    for n in (1, 2, 7, 30, 101):
        for fpr in (0.01, 0.1, 0.25, 0.5, 0.9):
            scores = list(np.round(rng.gamma(2.0, 1.0, n), 1))  # rounding makes ties
            t = threshold_at_fpr(scores, fpr)
            assert t == pytest.approx(loop_threshold(scores, fpr), rel=1e-12)
            assert sum(s > t for s in scores) <= math.floor(fpr * n)


def test_best_f1_cut_against_sklearn():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(4)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 1.0), 2).astype(np.float32)
    precision, recall, _ = precision_recall_curve(labels, scores)
    best = np.max(2 * precision * recall / (precision + recall + 1e-6))
    cut = best_f1_cut(labels, scores)
    tp = np.sum(labels & (scores > cut))
    p, r = tp / np.sum(scores > cut), tp / labels.sum()
    assert 2 * p * r / (p + r + 1e-6) == pytest.approx(best, abs=1e-9)
    assert not np.any(scores == cut)  # halfway between two scores


def test_calibrate_hand_computed():
    """Four good images scoring 1, 2, 3, 4 (constant 2x2 maps), two defective ones scoring 2.5
    and 5 with one defect pixel each, target rate 25%: every figure by hand."""
    from pni.calibration import CalibrationScores, calibrate

    scores = CalibrationScores()
    for label, value in ((0, 1.0), (0, 2.0), (0, 3.0), (0, 4.0), (1, 2.5), (1, 5.0)):
        mask = np.array([[True, False], [False, False]]) if label else None
        scores.add(label, {m: value for m in MAPS}, {m: np.full((2, 2), value) for m in MAPS}, mask)
    t = calibrate(scores, 0.25)["nb_coor"]
    assert t["image"]["value"] == pytest.approx(3.0003)  # floor(0.25 * 4) = 1 above: the 3rd lowest, + 1e-4
    assert (t["image"]["false_positives"], t["image"]["misses"], t["image"]["miss_rate"]) == (1, 1, 0.5)
    # best F1 2/3 at ">= 5" and at ">= 2.5": the lower one, halfway down to 2
    assert t["image_best_f1"]["value"] == pytest.approx(2.25)
    assert (t["image_best_f1"]["false_positives"], t["image_best_f1"]["misses"]) == (2, 0)
    assert t["image_best_f1"]["f1"] == pytest.approx(2 * 0.5 * 1 / (1.5 + 1e-6))
    pixel = t["pixel"]
    assert pixel["value"] == pytest.approx(3.0003) and pixel["good_images_flagged"] == 1
    # normal pixels: 16 of good images (4 above) + 3 + 3 of the defective ones (3 above)
    assert pixel["pixel_false_positive_rate"] == pytest.approx(7 / 22)
    assert pixel["pixel_miss_rate"] == 0.5  # the defect pixel of the 2.5 image
    assert t["heatmap"]["low"] == 2.5 and t["heatmap"]["high"] == pytest.approx(2.5 + 2 * 0.5003)


def test_calibration_on_good_images_bounds_their_false_positives(tiny_run):
    """Calibrated on N good images the model never saw, at most floor(target_fpr * N) of them
    are called defective (image threshold) or get a flagged pixel (pixel threshold), and the
    manifest says how many."""
    manifest = json.loads((tiny_run.bundle / "manifest.json").read_text())
    assert manifest["calibration"]["good_images"] == {
        "count": 10,
        "source": f"--calibration_dir {tiny_run.calibration}",
        "seen_in_training": False,
    }
    assert manifest["calibration"]["target_fpr"] == 0.25
    import pni

    preds = pni.load_model(tiny_run.bundle, "cpu").predict(sorted(tiny_run.calibration.glob("*.png")))
    for m in MAPS:
        thresholds = manifest["thresholds"][m]
        flagged = sum(p.normalised[m] > 1.0 for p in preds)  # score above the image threshold
        assert flagged <= math.floor(0.25 * 10)
        assert thresholds["image"]["false_positives"] == flagged and thresholds["image"]["good_images"] == 10
        with_pixels = sum(bool((p.maps[m] > thresholds["pixel"]["value"]).any()) for p in preds)
        assert with_pixels <= math.floor(0.25 * 10)
        assert thresholds["pixel"]["good_images_flagged"] == with_pixels
    assert sum(p.is_defective for p in preds) == manifest["thresholds"]["nb_coor"]["image"]["false_positives"]


# ---------------------------------------------------------------- export_model.py


def test_export_prints_the_thresholds_table(tiny_run, tmp_path, capsys):
    assert export_model.main(tiny_run.argv("--output", str(tmp_path / "b"), "--train_coreset")) == 0
    captured = capsys.readouterr()
    assert "--train_coreset ignored" in captured.err
    header = next(ln for ln in captured.out.splitlines() if ln.strip().startswith("map"))
    for column in ("threshold", "value", "good images", "defective images", "false positives", "misses", "F1"):
        assert column in header
    assert "image, FPR 0.01" in captured.out and "pixel, best F1" in captured.out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["calibration"]["good_images"]["count"] == 2  # the good test images by default


def test_only_good_training_images_train_and_export(tiny_run, tmp_path, capsys):
    own = tmp_path / "own"
    shutil.copytree(tiny_run.ds / "texture" / "train", own / "texture" / "train")
    argv = tiny_run.argv(dataset=own, emb_root=tmp_path, project=tmp_path / "result")
    assert tcd.main(argv + TRAIN) == 0
    out = capsys.readouterr().out
    assert "nothing to score, test stage skipped" in out
    assert not (tmp_path / "result").exists()
    assert export_model.main(argv + ["--output", str(tmp_path / "bundle")]) == 0
    captured = capsys.readouterr()
    assert "--calibration_dir" in captured.err and captured.err.startswith("warning:")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["calibration"]["good_images"]["seen_in_training"] is True
    assert manifest["calibration"]["good_images"]["count"] == 4
    assert manifest["calibration"]["defective_images"]["count"] == 0
    assert manifest["thresholds"]["nb_coor"]["image_best_f1"] is None
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(tmp_path / "bundle", tmp_path / "out", "--image_threshold", "best_f1"),
        capsys,
        "--image_threshold best_f1",
        "no such threshold",
    )


def test_export_keeps_a_folder_with_a_foreign_manifest(tiny_run, tmp_path, capsys):
    """A folder that merely holds some manifest.json is not a bundle: refused, left byte for byte."""
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "someone else\'s project", "version": 3}\n')
    (foreign / "notes.txt").write_bytes(b"keep me\n")
    before = snapshot_tree(foreign)
    expect_one_error(
        export_model.main, tiny_run.argv("--output", str(foreign)), capsys, str(foreign), "not a PNI model bundle"
    )
    assert snapshot_tree(foreign) == before
    assert [p.name for p in tmp_path.iterdir()] == ["project"]  # no temporary folder left


@pytest.mark.parametrize("where", ["foreign", "under_a_file", "a_file"])
def test_export_checks_its_output_before_scoring(tiny_run, tmp_path, capsys, monkeypatch, where):
    import pni.export

    def refuse(*args, **kwargs):
        raise AssertionError("calibration images scored before --output was checked")

    monkeypatch.setattr(pni.export, "score_calibration", refuse)
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text("{}")
    output = {
        "foreign": tmp_path / "foreign",
        "under_a_file": tmp_path / "file" / "bundle",
        "a_file": tmp_path / "file",
    }[where]
    expect_one_error(export_model.main, tiny_run.argv("--output", str(output)), capsys, "--output")


# ---------------------------------------------------------------- bundles predict refuses


def test_not_a_bundle(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    expect_one_error(
        predict_cli.main, tiny_run.predict_argv(tiny_run.ds, out), capsys, "is not a PNI model bundle", str(tiny_run.ds)
    )
    expect_one_error(predict_cli.main, tiny_run.predict_argv(tmp_path / "nowhere", out), capsys, "not found")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").write_text('{"format": "something else"}')
    expect_one_error(
        predict_cli.main, tiny_run.predict_argv(tmp_path / "fake", out), capsys, "not a PNI model bundle manifest"
    )
    assert not out.exists()


def test_missing_file(tiny_run, copy_bundle, tmp_path, capsys):
    bundle = copy_bundle()
    (bundle / "mlp.safetensors").unlink()
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(bundle, tmp_path / "out"),
        capsys,
        "bundle file missing",
        str(bundle / "mlp.safetensors"),
    )


def test_altered_file(tiny_run, copy_bundle, tmp_path, capsys):
    bundle = copy_bundle()
    data = bytearray((bundle / "arrays.safetensors").read_bytes())
    data[-5] ^= 0x01
    (bundle / "arrays.safetensors").write_bytes(bytes(data))
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(bundle, tmp_path / "out"),
        capsys,
        str(bundle / "arrays.safetensors"),
        "sha256",
    )


def test_other_format_version(tiny_run, copy_bundle, tmp_path, capsys):
    bundle = copy_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(bundle, tmp_path / "out"),
        capsys,
        str(bundle / "manifest.json"),
        "format version 2",
    )


def test_corrupt_file_with_a_matching_digest(tiny_run, copy_bundle, tmp_path, capsys):
    bundle = copy_bundle()
    (bundle / "arrays.safetensors").write_bytes(b"not safetensors at all")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["arrays.safetensors"] = hashlib.sha256(b"not safetensors at all").hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(bundle, tmp_path / "out"),
        capsys,
        "cannot read",
        str(bundle / "arrays.safetensors"),
    )


def test_layout_cannot_be_changed(tiny_run, copy_bundle, tmp_path, capsys):
    """A manifest claiming the paper variant for an MLP of the original layout is refused."""
    bundle = copy_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["scoring"]["variant"] = "paper"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    expect_one_error(
        predict_cli.main, tiny_run.predict_argv(bundle, tmp_path / "out"), capsys, "window layout", "paper"
    )


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda m: m.update(backbone_weights=None), '"backbone_weights"'),
        (lambda m: m["backbone_weights"].update(sha256=12), '"backbone_weights"'),
        (lambda m: m["thresholds"]["nb_coor"]["image"].pop("value"), '"nb_coor" -> "image"'),
        (lambda m: m["thresholds"]["coor"]["pixel"].update(value="high"), '"coor" -> "pixel"'),
        (lambda m: m["thresholds"]["nb"]["image_best_f1"].update(value=0), '"nb" -> "image_best_f1"'),
        (lambda m: m["thresholds"]["nb_coor"]["heatmap"].pop("low"), '"nb_coor" -> "heatmap"'),
    ],
)
def test_hand_edited_manifest_is_refused_naming_the_key(tiny_run, copy_bundle, tmp_path, capsys, edit, fragment):
    bundle = copy_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(bundle, tmp_path / "out"),
        capsys,
        str(bundle / "manifest.json"),
        fragment,
    )


def test_missing_backbone_weights_named(tiny_run, tmp_path, capsys):
    """A bundle of a pretrained backbone without the weights file names the file to provide."""
    bundle = tmp_path / "copy"
    shutil.copytree(tiny_run.bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["backbone_weights"] = {
        "file": "resnet18-f37072fd.pth",
        "sha256": "ab" * 32,
        "random_init": False,
        "included": False,
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(bundle, tmp_path / "out"),
        capsys,
        "resnet18-f37072fd.pth",
        "--backbone_weights",
    )


def test_backbone_weights_found_as_in_training_and_checked(tiny_run, tmp_path, monkeypatch, capsys):
    """A bundle that names its backbone weights (file name + sha256) instead of including them
    finds them through --backbone_weights or the torch hub cache, and refuses another file."""
    import pni
    from pni.features import load_backbone, weights_file_name

    weights = tmp_path / "weights.pth"
    torch.save(load_backbone("R18", random_init=True).state_dict(), weights)  # what the bundle's model used
    bundle = tmp_path / "named"
    shutil.copytree(tiny_run.bundle, bundle)
    (bundle / "backbone.safetensors").unlink()
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["backbone.safetensors"]
    manifest["backbone_weights"] = {
        "file": weights_file_name("R18"),
        "random_init": False,
        "included": False,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    image = tiny_run.ds / "texture" / "test" / "scratch" / "000.png"
    expected = pni.load_model(tiny_run.bundle, "cpu").predict(image)
    assert pni.load_model(bundle, "cpu", backbone_weights=weights).predict(image).scores == expected.scores
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expect_one_error(
        predict_cli.main, tiny_run.predict_argv(bundle, tmp_path / "out"), capsys, weights_file_name("R18"), str(hub)
    )
    shutil.copy(weights, hub / weights_file_name("R18"))
    assert pni.load_model(bundle, "cpu").predict(image).scores == expected.scores
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(weights, weights_only=True).items()}, other)
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(bundle, tmp_path / "out", "--backbone_weights", str(other)),
        capsys,
        str(other),
        "are not the ones",
    )
