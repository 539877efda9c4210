"""Using a trained model on new images: the bundle (export_model.py), its calibrated
thresholds, predict.py, the Python API (pni.load_model) and training on own data.

One tiny trained category (module fixture) is exported once; the cases predict with it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import TINY  # the tiny model settings every end-to-end test uses

import export_model
import predict as predict_cli
import train_coreset_distribution as tcd
from pni.calibration import best_f1_cut, threshold_at_fpr
from pni.data.images import CropGeometry
from pni.data.synthetic import make_dataset
from pni.scoring import ImageScores

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]
MAPS = ("nb", "coor", "patchcore", "nb_coor")


class Run:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ds = root / "ds"
        self.bundle = root / "bundle"

    def argv(self, *extra: str, dataset: Path | None = None, emb_root: Path | None = None) -> list[str]:
        return (
            [
                "--dataset_path",
                str(dataset or self.ds),
                "--category",
                "texture",
                "--project_root_path",
                str(self.root / "result"),
                "--embedding_root_path",
                str(emb_root or self.root),
            ]
            + TINY
            + list(extra)
        )

    @property
    def calibration(self) -> Path:
        return self.root / "more" / "texture" / "test" / "good"

    @property
    def version(self) -> Path:
        return self.root / "result" / "texture" / "R18" / "anomaly" / "lightning_logs" / "version_0"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """A tiny trained texture model, exported with thresholds calibrated on 10 good images it
    never saw (another seed of the built-in dataset) at a target false-positive rate of 25%."""
    r = Run(tmp_path_factory.mktemp("predict"))
    make_dataset(r.ds, num_train=4, num_test_per_type=2, image_size=64, categories=["texture"])
    make_dataset(r.root / "more", num_train=1, num_test_per_type=10, image_size=64, seed=7, categories=["texture"])
    assert tcd.main(r.argv(*TRAIN)) == 0
    assert (
        export_model.main(
            r.argv("--output", str(r.bundle), "--calibration_dir", str(r.calibration), "--target_fpr", "0.25")
        )
        == 0
    )
    return r


@pytest.fixture(scope="module")
def model(run):
    import pni

    return pni.load_model(run.bundle, device="cpu")


def one_error(code: int, capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- bundle


def test_bundle_holds_the_model_and_its_thresholds(run):
    names = {p.name for p in run.bundle.iterdir()}
    assert names == {"manifest.json", "arrays.safetensors", "mlp.safetensors", "backbone.safetensors"}
    manifest = json.loads((run.bundle / "manifest.json").read_text())
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
    import hashlib

    for name, digest in manifest["files"].items():
        assert hashlib.sha256((run.bundle / name).read_bytes()).hexdigest() == digest
    from safetensors.torch import load_file

    arrays = load_file(str(run.bundle / "arrays.safetensors"))
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


def test_fresh_process_predicts_the_test_stage_numbers(run, tmp_path):
    """predict.py in a new process on the built-in test images: the four maps within 1e-5 of
    the test stage's, the image scores equal to image_scores.csv; an unreadable file and a
    missing path are reported, the rest predicted, exit status 1."""
    bad = tmp_path / "bad" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "predict.py"),
            "--model",
            str(run.bundle),
            "--input",
            str(run.ds / "texture" / "test"),
            str(bad.parent),
            str(tmp_path / "nope.png"),
            "--output",
            str(out),
            "--save_maps",
            "--accelerator",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = read_csv(out / "errors.csv")
    assert [e["path"] for e in errors] == [str(tmp_path / "nope.png"), str(bad)]
    assert str(bad) in errors[1]["error"] and f"error: {errors[1]['error']}" in proc.stderr.splitlines()
    saved = {(r["defect_type"], r["stem"]): r for r in read_csv(run.version / "image_scores.csv")}
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == len(saved) == 8
    for row in rows:
        key = (Path(row["path"]).parent.name, Path(row["path"]).stem)
        assert row["name"] == f"{key[0]}__{key[1]}"  # stems repeat across folders
        for m in MAPS:
            assert row[f"{m}_score"] == saved[key][m]
            ours = np.load(out / "maps" / f"{row['name']}_{m}.npy", allow_pickle=False)
            theirs = np.load(run.version / "sample" / f"{key[0]}_{key[1]}_amap_{m}.npy", allow_pickle=False)
            assert ours.shape == theirs.shape == (64, 64)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
        assert (out / "overlays" / f"{row['name']}.jpg").is_file()
        mask = np.asarray(Image.open(out / "masks" / f"{row['name']}.png"))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert int(row["regions"]) == len([r for r in read_csv(out / "regions.csv") if r["name"] == row["name"]])
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no partial CSV left


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


def test_calibration_on_good_images_bounds_their_false_positives(run):
    """Calibrated on N good images the model never saw, at most floor(target_fpr * N) of them
    are called defective (image threshold) or get a flagged pixel (pixel threshold), and the
    manifest says how many."""
    manifest = json.loads((run.bundle / "manifest.json").read_text())
    assert manifest["calibration"]["good_images"] == {
        "count": 10,
        "source": f"--calibration_dir {run.calibration}",
        "seen_in_training": False,
    }
    assert manifest["calibration"]["target_fpr"] == 0.25
    import pni

    preds = pni.load_model(run.bundle, "cpu").predict(sorted(run.calibration.glob("*.png")))
    for m in MAPS:
        thresholds = manifest["thresholds"][m]
        flagged = sum(p.normalised[m] > 1.0 for p in preds)  # score above the image threshold
        assert flagged <= math.floor(0.25 * 10)
        assert thresholds["image"]["false_positives"] == flagged and thresholds["image"]["good_images"] == 10
        with_pixels = sum(bool((p.maps[m] > thresholds["pixel"]["value"]).any()) for p in preds)
        assert with_pixels <= math.floor(0.25 * 10)
        assert thresholds["pixel"]["good_images_flagged"] == with_pixels
    assert sum(p.is_defective for p in preds) == manifest["thresholds"]["nb_coor"]["image"]["false_positives"]


def test_export_prints_the_thresholds_table(run, tmp_path, capsys):
    assert export_model.main(run.argv("--output", str(tmp_path / "b"), "--train_coreset")) == 0
    captured = capsys.readouterr()
    assert "--train_coreset ignored" in captured.err
    header = next(ln for ln in captured.out.splitlines() if ln.strip().startswith("map"))
    for column in ("threshold", "value", "good images", "defective images", "false positives", "misses", "F1"):
        assert column in header
    assert "image, FPR 0.01" in captured.out and "pixel, best F1" in captured.out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["calibration"]["good_images"]["count"] == 2  # the good test images by default


# ---------------------------------------------------------------- geometry


def test_crop_geometry_follows_torchvision():
    """The crop's place in the input, checked on ramps through torchvision's own Resize +
    CenterCrop: the value at each crop pixel is the input coordinate it came from."""
    from torchvision import transforms as T

    for width, height, resize, size in ((100, 60, 40, 32), (60, 100, 40, 40), (97, 131, 50, 45), (300, 200, 64, 56)):
        g = CropGeometry.of(width, height, resize, size)
        tf = T.Compose([T.Resize(resize), T.CenterCrop(size)])
        xs = np.asarray(tf(Image.fromarray(np.tile(np.arange(width, dtype=np.float32), (height, 1)), mode="F")))
        ys = np.asarray(
            tf(Image.fromarray(np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width)), mode="F"))
        )
        expect_x = (np.arange(size) + g.left + 0.5) * width / g.resized_width - 0.5
        expect_y = (np.arange(size) + g.top + 0.5) * height / g.resized_height - 0.5
        np.testing.assert_allclose(xs[size // 2, 3:-3], expect_x[3:-3], atol=0.05)
        np.testing.assert_allclose(ys[3:-3, size // 2], expect_y[3:-3], atol=0.05)


def test_regions_and_mask_in_input_pixels_hand_computed(model):
    """A 256x128 input: resized to 128x64, the 64 px crop starts at x = 32 (input x = 64). A
    4x4 block of ones at crop rows 10-13, columns 20-23 lands on input x 104-111, y 20-27."""
    crop = torch.zeros(64, 64)
    crop[10:14, 20:24] = 1.0
    result = ImageScores(maps={m: crop for m in MAPS}, image={m: 1.0 for m in MAPS})
    from pni.predict import Predictor

    predictor = Predictor(model.scorer, model.manifest, "nb_coor", image_threshold=0.5, pixel_threshold=0.5)
    p = predictor.finish(result, np.zeros((128, 256, 3), np.uint8))
    assert (p.width, p.height, p.inspected) == (256, 128, (64, 0, 192, 128))
    assert len(p.regions) == 1
    r = p.regions[0]
    assert (r.x0, r.y0, r.x1, r.y1, r.area) == (104, 20, 112, 28, 64)
    assert r.peak_score == 1.0 and r.peak_normalised == 2.0
    expected = np.zeros((128, 256), bool)
    expected[20:28, 104:112] = True
    assert np.array_equal(p.mask, expected)
    amap = p.maps["nb_coor"]
    assert np.isnan(amap[:, :64]).all() and np.isnan(amap[:, 192:]).all() and np.isfinite(amap[:, 64:192]).all()
    assert p.verdict == "defective" and p.score_normalised == 2.0


def test_synthetic_defect_lands_on_its_place_in_a_wide_input(model, run):
    """A dark square pasted into a good texture of 384x128 pixels (three test images side by
    side, doubled): the strongest region and the mask sit on it, in the input's pixels."""
    good = [np.asarray(Image.open(run.ds / "texture" / "train" / "good" / f"00{i}.png")) for i in (0, 1, 2)]
    wide = np.asarray(Image.fromarray(np.concatenate(good, axis=1)).resize((384, 128), Image.Resampling.BILINEAR))
    wide = wide.copy()
    x0, y0, side = 176, 40, 28  # inside the inspected middle third (x 128-256)
    wide[y0 : y0 + side, x0 : x0 + side] = 15
    p = model.predict(wide)
    assert p.inspected == (128, 0, 256, 128)
    assert p.is_defective and p.regions
    top = max(p.regions, key=lambda r: r.peak_score)
    assert x0 - 16 <= top.peak_x < x0 + side + 16 and y0 - 16 <= top.peak_y < y0 + side + 16
    assert top.x0 <= x0 + side // 2 < top.x1 and top.y0 <= y0 + side // 2 < top.y1
    assert p.mask[y0 + side // 2, x0 + side // 2]
    assert not p.mask[:, :128].any() and not p.mask[:, 256:].any()


# ---------------------------------------------------------------- Python API


def test_api_takes_paths_pil_images_and_arrays(model, run, tmp_path):
    path = run.ds / "texture" / "test" / "hole" / "001.png"
    rgb = Image.open(path).convert("RGB")
    a, b, c = model.predict([path, rgb, np.asarray(rgb)])
    for other in (b, c):
        assert other.scores == a.scores and other.verdict == a.verdict
        for m in MAPS:
            assert np.array_equal(other.maps[m], a.maps[m])
    assert a.path == str(path) and b.path is None
    single = model.predict(str(path))  # alone in its batch: the same up to the last digits
    assert single.scores == pytest.approx(a.scores, rel=1e-5) and single.maps["nb"].shape == (64, 64)
    # RGBA drops alpha; 16-bit grey is the 8-bit grey scaled by 257
    rgba = np.dstack([np.asarray(rgb), np.full((64, 64), 77, np.uint8)])
    grey = np.asarray(rgb.convert("L"))
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    p_rgba, p_grey, p_grey16 = model.predict([tmp_path / "rgba.png", grey, tmp_path / "grey16.png"])
    assert p_rgba.scores == a.scores and p_grey16.scores == p_grey.scores
    with pytest.raises(Exception, match="shape"):
        model.predict(np.zeros((4, 4, 2), np.uint8))


def test_bundle_loads_without_unpickling(run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    import pni

    p = pni.load_model(run.bundle, "cpu").predict(run.ds / "texture" / "test" / "good" / "000.png")
    assert p.verdict in ("good", "defective")


# ---------------------------------------------------------------- bad bundles and flags


@pytest.fixture
def copy_bundle(run, tmp_path):
    def make() -> Path:
        dest = tmp_path / "copy"
        shutil.copytree(run.bundle, dest)
        return dest

    return make


def predict_argv(bundle: Path, run: Run, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(bundle),
        "--input",
        str(run.ds / "texture" / "test" / "good"),
        "--output",
        str(tmp_path / "out"),
        "--accelerator",
        "cpu",
        *extra,
    ]


def test_not_a_bundle(run, tmp_path, capsys):
    one_error(predict_cli.main(predict_argv(run.ds, run, tmp_path)), capsys, "is not a PNI model bundle", str(run.ds))
    one_error(predict_cli.main(predict_argv(tmp_path / "nowhere", run, tmp_path)), capsys, "not found")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").write_text('{"format": "something else"}')
    one_error(
        predict_cli.main(predict_argv(tmp_path / "fake", run, tmp_path)), capsys, "not a PNI model bundle manifest"
    )
    assert not (tmp_path / "out").exists()


def test_missing_file(copy_bundle, run, tmp_path, capsys):
    bundle = copy_bundle()
    (bundle / "mlp.safetensors").unlink()
    one_error(
        predict_cli.main(predict_argv(bundle, run, tmp_path)),
        capsys,
        "bundle file missing",
        str(bundle / "mlp.safetensors"),
    )


def test_altered_file(copy_bundle, run, tmp_path, capsys):
    bundle = copy_bundle()
    data = bytearray((bundle / "arrays.safetensors").read_bytes())
    data[-5] ^= 0x01
    (bundle / "arrays.safetensors").write_bytes(bytes(data))
    one_error(
        predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, str(bundle / "arrays.safetensors"), "sha256"
    )


def test_other_format_version(copy_bundle, run, tmp_path, capsys):
    bundle = copy_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_error(
        predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, str(bundle / "manifest.json"), "format version 2"
    )


def test_corrupt_file_with_a_matching_digest(copy_bundle, run, tmp_path, capsys):
    import hashlib

    bundle = copy_bundle()
    (bundle / "arrays.safetensors").write_bytes(b"not safetensors at all")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["arrays.safetensors"] = hashlib.sha256(b"not safetensors at all").hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_error(
        predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, "cannot read", str(bundle / "arrays.safetensors")
    )


def test_layout_cannot_be_changed(copy_bundle, run, tmp_path, capsys):
    """A manifest claiming the paper variant for an MLP of the original layout is refused."""
    bundle = copy_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["scoring"]["variant"] = "paper"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_error(predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, "window layout", "paper")


def test_missing_backbone_weights_named(run, tmp_path, capsys):
    """A bundle of a pretrained backbone without the weights file names the file to provide."""
    bundle = tmp_path / "copy"
    shutil.copytree(run.bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["backbone_weights"] = {
        "file": "resnet18-f37072fd.pth",
        "sha256": "ab" * 32,
        "random_init": False,
        "included": False,
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_error(
        predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, "resnet18-f37072fd.pth", "--backbone_weights"
    )


def test_backbone_weights_found_as_in_training_and_checked(run, tmp_path, monkeypatch, capsys):
    """A bundle that names its backbone weights (file name + sha256) instead of including them
    finds them through --backbone_weights or the torch hub cache, and refuses another file."""
    import hashlib

    import pni
    from pni.features import load_backbone, weights_file_name

    weights = tmp_path / "weights.pth"
    torch.save(load_backbone("R18", random_init=True).state_dict(), weights)  # what the bundle's model used
    bundle = tmp_path / "named"
    shutil.copytree(run.bundle, bundle)
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
    image = run.ds / "texture" / "test" / "scratch" / "000.png"
    expected = pni.load_model(run.bundle, "cpu").predict(image)
    assert pni.load_model(bundle, "cpu", backbone_weights=weights).predict(image).scores == expected.scores
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    one_error(predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, weights_file_name("R18"), str(hub))
    shutil.copy(weights, hub / weights_file_name("R18"))
    assert pni.load_model(bundle, "cpu").predict(image).scores == expected.scores
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(weights, weights_only=True).items()}, other)
    one_error(
        predict_cli.main(predict_argv(bundle, run, tmp_path, "--backbone_weights", str(other))),
        capsys,
        str(other),
        "are not the ones",
    )


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--map", "other"], "--map"),
        (["--image_threshold", "median"], "--image_threshold"),
    ],
)
def test_bad_predict_flags(run, tmp_path, capsys, argv, fragment):
    try:
        code = predict_cli.main(predict_argv(run.bundle, run, tmp_path, *argv))
    except SystemExit as exc:
        code = exc.code
    one_error(code, capsys, fragment)


# ---------------------------------------------------------------- own data


def test_only_good_training_images_train_and_export(run, tmp_path, capsys):
    own = tmp_path / "own"
    shutil.copytree(run.ds / "texture" / "train", own / "texture" / "train")
    argv = run.argv(dataset=own, emb_root=tmp_path)
    argv[argv.index("--project_root_path") + 1] = str(tmp_path / "result")
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
    one_error(
        predict_cli.main(predict_argv(tmp_path / "bundle", run, tmp_path, "--image_threshold", "best_f1")),
        capsys,
        "--image_threshold best_f1",
        "no such threshold",
    )


def test_test_folder_without_ground_truth_gives_image_level_results(run, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(run.ds, ds)
    shutil.rmtree(ds / "texture" / "ground_truth")
    project = tmp_path / "result"
    argv = run.argv(dataset=ds)
    argv[argv.index("--project_root_path") + 1] = str(project)
    assert tcd.main(argv) == 0
    out = capsys.readouterr().out
    assert "image-level results only" in out
    row = read_csv(project / "score_result.csv")[0]
    reference = read_csv(run.root / "result" / "score_result.csv")[0]
    for m in MAPS:
        assert row[f"{m}_P-AUROC"] == ""
        assert row[f"{m}_I-AUROC"] == reference[f"{m}_I-AUROC"]


# ---------------------------------------------------------------- review fixes


def dead_owner() -> str:
    """An owner tag (pni.io.owner_tag) of a process of this host that has ended."""
    from pni.io import owner_tag

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{owner_tag().split('~')[0]}~{proc.pid}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_keeps_a_folder_with_a_foreign_manifest(run, tmp_path, capsys):
    """A folder that merely holds some manifest.json is not a bundle: refused, left byte for byte."""
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "someone else\'s project", "version": 3}\n')
    (foreign / "notes.txt").write_bytes(b"keep me\n")
    before = snapshot(foreign)
    one_error(export_model.main(run.argv("--output", str(foreign))), capsys, str(foreign), "not a PNI model bundle")
    assert snapshot(foreign) == before
    assert [p.name for p in tmp_path.iterdir()] == ["project"]  # no temporary folder left


@pytest.mark.parametrize("where", ["foreign", "under_a_file", "a_file"])
def test_export_checks_its_output_before_scoring(run, tmp_path, capsys, monkeypatch, where):
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
    one_error(export_model.main(run.argv("--output", str(output))), capsys, "--output")


def test_export_replaces_its_bundle_and_removes_temporary_folders_of_killed_exports(run, tmp_path):
    from pni.io import owner_tag

    bundle = tmp_path / "b"
    shutil.copytree(run.bundle, bundle)
    dead = dead_owner()
    stale = [tmp_path / f".b.partial-{dead}-x1", tmp_path / f".b.old-{dead}-x2"]
    live = tmp_path / f".b.partial-{owner_tag()}-x3"  # a running export's (this process)
    for folder in stale + [live]:
        folder.mkdir()
        (folder / "arrays.safetensors").write_bytes(b"partial")
    assert export_model.main(run.argv("--output", str(bundle), "--calibration_dir", str(run.calibration))) == 0
    assert not any(p.exists() for p in stale) and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "b"]
    assert json.loads((bundle / "manifest.json").read_text())["format"] == "pni-bundle"


def test_bundle_left_hidden_by_a_killed_export_is_named(run, tmp_path, capsys):
    """Killed between its two renames, an export leaves the previous bundle only in a hidden
    folder: the next export refuses to go on without it, and predict names it."""
    hidden = tmp_path / f".b.old-{dead_owner()}-x1" / "b"
    shutil.copytree(run.bundle, hidden)
    bundle = tmp_path / "b"
    one_error(export_model.main(run.argv("--output", str(bundle))), capsys, str(hidden), "move")
    one_error(predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, "not found", str(hidden))
    assert snapshot(hidden) == snapshot(run.bundle) and not bundle.exists()


def test_colliding_input_names_get_their_own_files_and_rows(run, tmp_path):
    """a.png and a.jpg, x/a.png and y/a.png next to x__a.png, and a_nb.png (whose a_nb_coor.npy
    is also a's nb_coor map): every input its own overlay, mask, maps and CSV row."""
    inputs = tmp_path / "in"
    (inputs / "x").mkdir(parents=True)
    (inputs / "y").mkdir()
    sources = sorted((run.ds / "texture" / "test").rglob("*.png"))
    targets = [
        inputs / "a.png",
        inputs / "a.jpg",
        inputs / "x" / "a.png",
        inputs / "y" / "a.png",
        inputs / "x__a.png",
        inputs / "a_nb.png",
    ]
    for source, target in zip(sources, targets):
        Image.open(source).convert("RGB").save(target)
    out = tmp_path / "out"
    assert (
        predict_cli.main(
            [
                "--model",
                str(run.bundle),
                "--input",
                str(inputs),
                "--output",
                str(out),
                "--save_maps",
                "--accelerator",
                "cpu",
            ]
        )
        == 0
    )
    rows = read_csv(out / "predictions.csv")
    assert sorted(r["path"] for r in rows) == sorted(str(t) for t in targets)
    names = [r["name"] for r in rows]
    assert len(set(n.casefold() for n in names)) == len(targets)
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == sorted(names)
    assert sorted(p.stem for p in (out / "masks").iterdir()) == sorted(names)
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(f"{n}_{m}.npy" for n in names for m in MAPS)
    again = tmp_path / "again"
    assert (
        predict_cli.main(
            ["--model", str(run.bundle), "--input", str(inputs), "--output", str(again), "--accelerator", "cpu"]
        )
        == 0
    )
    assert [r["name"] for r in read_csv(again / "predictions.csv")] == names  # deterministic


@pytest.mark.parametrize("flag", ["--image_threshold", "--pixel_threshold"])
@pytest.mark.parametrize("value", ["0", "-1.5", "nan", "inf"])
def test_threshold_flags_must_be_positive_finite_scores(run, tmp_path, capsys, flag, value):
    one_error(predict_cli.main(predict_argv(run.bundle, run, tmp_path, f"{flag}={value}")), capsys, flag, value)
    assert not (tmp_path / "out").exists()
    import pni
    from pni.errors import PNIError

    with pytest.raises(PNIError, match=flag):
        pni.load_model(run.bundle, "cpu", **{flag[2:]: float(value)})


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
def test_hand_edited_manifest_is_refused_naming_the_key(copy_bundle, run, tmp_path, capsys, edit, fragment):
    bundle = copy_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_error(predict_cli.main(predict_argv(bundle, run, tmp_path)), capsys, str(bundle / "manifest.json"), fragment)
