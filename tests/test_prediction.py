"""Predicting on new images with a bundle: predict.py in a fresh process reproduces the test
stage's maps and scores, the crop's place in the input and the regions in input pixels, the
Python API (pni.load_model) on paths, PIL images and arrays, output names that never
collide, and predict's flags.

With the session's shared tiny run and its bundle (``tiny_run.bundle``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MAPS, REPO, expect_one_error
from PIL import Image

import predict as predict_cli
from pni.data.images import CropGeometry
from pni.errors import PNIError
from pni.scoring import ImageScores


@pytest.fixture(scope="module")
def model(tiny_run):
    import pni

    return pni.load_model(tiny_run.bundle, device="cpu")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_fresh_process_predicts_the_test_stage_numbers(tiny_run, tmp_path):
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
            str(tiny_run.bundle),
            "--input",
            str(tiny_run.ds / "texture" / "test"),
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
    saved = {(r["defect_type"], r["stem"]): r for r in read_csv(tiny_run.version / "image_scores.csv")}
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == len(saved) == 8
    for row in rows:
        key = (Path(row["path"]).parent.name, Path(row["path"]).stem)
        assert row["name"] == f"{key[0]}__{key[1]}"  # stems repeat across folders
        for m in MAPS:
            assert row[f"{m}_score"] == saved[key][m]
            ours = np.load(out / "maps" / f"{row['name']}_{m}.npy", allow_pickle=False)
            theirs = np.load(tiny_run.version / "sample" / f"{key[0]}_{key[1]}_amap_{m}.npy", allow_pickle=False)
            assert ours.shape == theirs.shape == (64, 64)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
        assert (out / "overlays" / f"{row['name']}.jpg").is_file()
        mask = np.asarray(Image.open(out / "masks" / f"{row['name']}.png"))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert int(row["regions"]) == len([r for r in read_csv(out / "regions.csv") if r["name"] == row["name"]])
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no partial CSV left


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


def test_synthetic_defect_lands_on_its_place_in_a_wide_input(model, tiny_run):
    """A dark square pasted into a good texture of 384x128 pixels (three test images side by
    side, doubled): the strongest region and the mask sit on it, in the input's pixels."""
    good = [np.asarray(Image.open(tiny_run.ds / "texture" / "train" / "good" / f"00{i}.png")) for i in (0, 1, 2)]
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


# ---------------------------------------------------------------- Python API and output names


def test_api_takes_paths_pil_images_and_arrays(model, tiny_run, tmp_path):
    path = tiny_run.ds / "texture" / "test" / "hole" / "001.png"
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


def test_colliding_input_names_get_their_own_files_and_rows(tiny_run, tmp_path):
    """a.png and a.jpg, x/a.png and y/a.png next to x__a.png, and a_nb.png (whose a_nb_coor.npy
    is also a's nb_coor map): every input its own overlay, mask, maps and CSV row."""
    inputs = tmp_path / "in"
    (inputs / "x").mkdir(parents=True)
    (inputs / "y").mkdir()
    sources = sorted((tiny_run.ds / "texture" / "test").rglob("*.png"))
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
                str(tiny_run.bundle),
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
            ["--model", str(tiny_run.bundle), "--input", str(inputs), "--output", str(again), "--accelerator", "cpu"]
        )
        == 0
    )
    assert [r["name"] for r in read_csv(again / "predictions.csv")] == names  # deterministic


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--map", "other"], "--map"),
        (["--image_threshold", "median"], "--image_threshold"),
    ],
)
def test_bad_predict_flags(tiny_run, tmp_path, capsys, argv, fragment):
    expect_one_error(
        predict_cli.main, tiny_run.predict_argv(tiny_run.bundle, tmp_path / "out", *argv), capsys, fragment
    )


@pytest.mark.parametrize("flag", ["--image_threshold", "--pixel_threshold"])
@pytest.mark.parametrize("value", ["0", "-1.5", "nan", "inf"])
def test_threshold_flags_must_be_positive_finite_scores(tiny_run, tmp_path, capsys, flag, value):
    expect_one_error(
        predict_cli.main,
        tiny_run.predict_argv(tiny_run.bundle, tmp_path / "out", f"{flag}={value}"),
        capsys,
        flag,
        value,
    )
    assert not (tmp_path / "out").exists()
    import pni

    with pytest.raises(PNIError, match=flag):
        pni.load_model(tiny_run.bundle, "cpu", **{flag[2:]: float(value)})
