"""Ensemble -> ravel -> analysis on a tiny fake result tree, through the CLI entry points."""
import csv
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from pni import ravel
from pni.io import load_npy
from pni.results import MAP_NAMES, write_image_scores, write_sample

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
CATEGORIES = ("zz_custom", "bottle")  # bottle must come first (MVTec order), then the others
BACKBONES = ("WR101", "RNX101")
ITEMS = (("broken", "000"), ("broken", "001"), ("good", "000"), ("good", "001"))


def load_cli(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "analysis_code" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_item(rng, defect_type, stem, scale):
    """Image, mask and maps: defects score high; good/001 has a hot spot (a false positive)."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if defect_type == "broken":
        r = 3 + 5 * int(stem)
        mask[r:r + 4, 4:9] = 1
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    maps = {}
    for k, name in enumerate(MAP_NAMES):
        m = rng.random((SIZE, SIZE)).astype(np.float32) * 0.3 + 0.6 * mask + 0.1 * k
        if (defect_type, stem) == ("good", "001"):
            m[10:12, 10:12] = 1.5
        maps[name] = m * scale
    return image, mask, maps


def build_tree(root, rng):
    """Two categories x two backbones; version_0 (older, garbage) and version_1 (newest)."""
    truth = {}
    for cat in CATEGORIES:
        for b, backbone in enumerate(BACKBONES):
            logs = root / cat / backbone / "anomaly" / "lightning_logs"
            for version in (0, 1):
                vdir = logs / f"version_{version}"
                rows = []
                for t, s in ITEMS:
                    image, mask, maps = fake_item(rng, t, s, scale=1.0 + b)
                    if version == 0:
                        maps = {k: rng.random((SIZE, SIZE)).astype(np.float32) for k in maps}
                    else:
                        truth[(cat, backbone, t, s)] = (image, mask, maps)
                    write_sample(vdir / "sample", t, s, image, mask, maps, jpeg=False)
                    rows.append([t, s, int(t != "good")] + [float(maps[k].max()) for k in MAP_NAMES])
                if b == 1:
                    rows = rows[::-1]  # the second backbone lists its files in another order
                write_image_scores(vdir / "image_scores.csv", rows)
    return truth


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pni_analysis") / "result"
    truth = build_tree(root, np.random.default_rng(0))
    ens, rav = root / "ensemble_result", root / "ensemble_ravel"
    assert load_cli("calc_ensemble_score").main([
        "--project_root_path", str(root), "--ensemble_root_path", str(ens), "--category", *CATEGORIES,
        "--backbone_list", *BACKBONES]) == 0
    assert load_cli("convert_result_format").main([
        "--before_result_root_dir", str(ens), "--after_result_root_dir", str(rav), "--is_MVtec_small"]) == 0
    return root, ens, rav, truth


def test_ensemble_outputs(pipeline):
    root, ens, _, truth = pipeline
    rows = read_csv(root / "ensemble_score_result.csv")
    assert rows[0][:4] == ["category", "backbone_list", "version_num", "num_images"]
    assert [r[0] for r in rows[1:]] == list(CATEGORIES)
    assert all(r[1] == "WR101 RNX101" and r[3] == "4" for r in rows[1:])
    for cat in CATEGORIES:
        # expected: per-backbone min-max over the category, then the mean (newest version only)
        norm = []
        for backbone in BACKBONES:
            stack = np.stack([truth[(cat, backbone, t, s)][2]["nb_coor"] for t, s in ITEMS])
            norm.append((stack - stack.min()) / (stack.max() - stack.min()))
        expected = np.mean(norm, axis=0)
        for j, (t, s) in enumerate(ITEMS):
            got = load_npy(ens / cat / "anomaly_map" / t / f"{s}.npy")
            np.testing.assert_allclose(got, expected[j], atol=1e-6)
            assert (ens / cat / "anomaly_map" / t / f"{s}.png").is_file()
            image = cv2.cvtColor(cv2.imread(str(ens / cat / "test" / t / f"{s}.png")), cv2.COLOR_BGR2RGB)
            np.testing.assert_array_equal(image, truth[(cat, "WR101", t, s)][0])
            mask = cv2.imread(str(ens / cat / "ground_truth" / t / f"{s}_mask.png"), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(mask, truth[(cat, "WR101", t, s)][1] * 255)


def test_ensemble_missing_file_is_named(pipeline, tmp_path, capsys):
    root, _, _, _ = pipeline
    vdir = root / "bottle" / "RNX101" / "anomaly" / "lightning_logs" / "version_1"
    scores = read_csv(vdir / "image_scores.csv")
    try:
        with open(vdir / "image_scores.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([r for r in scores if r[:2] != ["good", "001"]])
        rc = load_cli("calc_ensemble_score").main([
            "--project_root_path", str(root), "--ensemble_root_path", str(tmp_path / "e"),
            "--category", "bottle", "--backbone_list", *BACKBONES])
    finally:
        with open(vdir / "image_scores.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(scores)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "good_001_gt.npy" in err and "RNX101" in err
    assert load_cli("calc_ensemble_score").main([
        "--project_root_path", str(root), "--category", "bottle", "--version_num", "3",
        "--backbone_list", "WR101"]) == 2


def test_ravel_folder(pipeline):
    _, ens, rav, _ = pipeline
    rows = read_csv(rav / "index.csv")
    assert rows[0] == ["index", "category", "defect_type", "stem"]
    expected = [[str(i), cat, t, s] for i, (cat, (t, s)) in
                enumerate((c, item) for c in ("bottle", "zz_custom") for item in ITEMS)]
    assert rows[1:] == expected
    for i, _, t, s in expected:
        i = int(i)
        cat = rows[1 + i][1]
        pred = cv2.imread(str(rav / f"{i:05d}_pred.png"), cv2.IMREAD_UNCHANGED)
        assert pred.dtype == np.uint16
        amap = load_npy(ens / cat / "anomaly_map" / t / f"{s}.npy")
        np.testing.assert_array_equal(pred, (np.clip(amap.astype(np.float64), 0, 1) * 65535).astype(np.uint16))
        gt = ravel.read_png16(rav / f"{i:05d}_gt.png")
        assert set(np.unique(gt)) <= {0, 65535} and (gt.any() == (t == "broken"))
        img = cv2.imread(str(rav / f"image{i:05d}.png"), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3)


def test_png16_round_trip(tmp_path):
    a = np.random.default_rng(1).integers(0, 65536, (7, 9), dtype=np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    ravel.write_png16(tmp_path / "x.png", a)
    np.testing.assert_array_equal(ravel.read_png16(tmp_path / "x.png"), a)


def test_analysis(pipeline, capsys):
    _, _, rav, _ = pipeline
    assert load_cli("analysis_amap").main([
        "--project_root_path", str(rav), "--calc_pro", "--visualize", "--calc_misclassified_sample",
        "--compare_with_patchcore", "--max_steps", "200"]) == 0
    out = capsys.readouterr()
    assert "AUPRO_MVTec" in out.out and "nothing compared" in out.err
    rows = read_csv(rav / "score_result.csv")
    header = rows[0]
    assert header == ["category", "num_images", "I-AUROC", "P-AUROC", "AUPRO_MVTec", "AUPRO_PNI",
                      "pixel_threshold", "pixel_F1", "image_threshold", "image_F1"]
    assert [r[0] for r in rows[1:]] == ["bottle", "zz_custom", "average"]
    avg = rows[-1]
    assert avg[1] == "8"
    for c in range(2, len(header)):
        assert float(avg[c]) == pytest.approx(np.mean([float(rows[1][c]), float(rows[2][c])]), abs=1e-6)
    assert all(0.5 < float(r[header.index("P-AUROC")]) <= 1 for r in rows[1:])
    for cat, first in (("bottle", 0), ("zz_custom", 4)):
        d = rav / "viz" / cat
        for suffix in ("", "_mask", "_amap", "_amap_on_img", "_img_with_gt", "_img_with_mask",
                       "_heatmap_on_img_with_mask"):
            assert (d / f"{first:05d}{suffix}.png").is_file(), suffix
        for plot in ("roc_curve.png", "pro_curve.png", "score_histogram.png"):
            assert (d / plot).is_file()
    mis = read_csv(rav / "misclassified_sample_list.csv")
    assert mis[0] == ["category", "index", "defect_type", "stem", "kind", "score", "threshold"]
    assert ["bottle", "3", "good", "001", "FP"] in [r[:5] for r in mis[1:]]


def test_analysis_without_index_needs_category_borders(pipeline, tmp_path, capsys):
    _, _, rav, _ = pipeline
    for p in rav.glob("*.png"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    assert load_cli("analysis_amap").main(["--project_root_path", str(tmp_path)]) == 2
    assert "category border" in capsys.readouterr().err
