"""Ensemble -> ravel -> analysis on a tiny fake result tree, through the CLI entry points."""

import csv

import cv2
import numpy as np
import pytest
from helpers import load_cli
from PIL import Image
from skimage.measure import label, regionprops
from sklearn.metrics import auc, roc_auc_score

from pni import ravel
from pni.io import load_npy
from pni.results import MAP_NAMES, write_image_scores, write_sample

SIZE = 16
CATEGORIES = ("zz_custom", "bottle")  # bottle must come first (MVTec order), then the others
BACKBONES = ("WR101", "RNX101")
ITEMS = (("broken", "000"), ("broken", "001"), ("good", "000"), ("good", "001"))


def fake_item(rng, defect_type, stem, scale):
    """Image, mask and maps: defects score high; good/001 has a hot spot (a false positive)."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if defect_type == "broken":
        r = 3 + 5 * int(stem)
        mask[r : r + 4, 4:9] = 1
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


# ----------------------------------------------------------------------------- references from METHOD section 6
# Written from the definitions, one threshold at a time; no pni code.


def best_f1(labels, scores):
    """(threshold, F1) maximising F1 = 2PR/(P+R+1e-6) for ``score >= t``; the lowest threshold on ties."""
    labels, scores = np.ravel(labels).astype(bool), np.ravel(scores)
    best_f, best_t = -1.0, None
    for t in sorted(set(scores.tolist())):
        pred = scores >= t
        tp, fp = int(np.sum(pred & labels)), int(np.sum(pred & ~labels))
        precision, recall = tp / (tp + fp), tp / int(labels.sum())
        f1 = 2 * precision * recall / (precision + recall + 1e-6)
        if f1 > best_f:
            best_f, best_t = f1, t
    return best_t, best_f


def aupro_mvtec(masks, scores, limit=0.3):
    """MVTec AD: PRO = mean over 8-connected regions of the covered fraction, at every distinct
    threshold (score >= t); curve from (0, 0) to (1, 1), trapezoids up to FPR = limit (interpolated
    there), divided by limit."""
    regions = [
        (i, lab == k)
        for i, m in enumerate(masks)
        for lab in [label(m, connectivity=2)]
        for k in range(1, lab.max() + 1)
    ]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(scores.ravel().tolist()), reverse=True):
        pred = scores >= t
        fprs.append(np.sum(pred & normal) / np.sum(normal))
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def aupro_pni(masks, maps, max_steps, limit=0.3):
    """The original PNI code's variant: thresholds max - s*(max-min)/max_steps, prediction score > t;
    a region's overlap counts predicted pixels in its hole-filled footprint over its area; FPR <= limit
    kept, FPR min-max rescaled, area by sklearn's auc."""
    props = [(i, r) for i, m in enumerate(masks) for r in regionprops(label(m, connectivity=2))]
    lo, hi = float(maps.min()), float(maps.max())
    delta = (hi - lo) / max_steps
    normal = ~masks
    fprs, pros = [], []
    for step in range(max_steps):
        pred = maps > hi - step * delta
        fprs.append(np.sum(pred & normal) / np.sum(normal))
        overlaps = []
        for i, r in props:
            y0, x0, y1, x1 = r.bbox
            overlaps.append(np.sum(pred[i, y0:y1, x0:x1][r.image_filled]) / r.area)
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    f, p = fprs[keep], pros[keep]
    return auc((f - f.min()) / (f.max() - f.min()), p)


def reference_row(codes, masks, max_steps=None):
    """Expected score_result.csv values of one category from its uint16 maps and bool masks."""
    labels = masks.reshape(len(masks), -1).any(axis=1)
    img = codes.reshape(len(codes), -1).max(axis=1)
    pix_t, pix_f1 = best_f1(masks, codes)
    img_t, img_f1 = best_f1(labels, img)
    row = {
        "num_images": len(codes),
        "I-AUROC": roc_auc_score(labels, img),
        "P-AUROC": roc_auc_score(masks.ravel(), codes.ravel()),
        "pixel_threshold": (pix_t - codes.min()) / (codes.max() - codes.min()),
        "pixel_F1": pix_f1,
        "image_threshold": img_t / 65535,
        "image_F1": img_f1,
    }
    if max_steps:
        row["AUPRO_MVTec"] = aupro_mvtec(masks, codes)
        row["AUPRO_PNI"] = aupro_pni(masks, codes / 65535, max_steps)
    return row


def read16(path):
    return np.asarray(Image.open(path)).astype(np.int64)


def check_rows(score_csv, expected):
    """score_result.csv against ``{category: reference_row}``, plus the average row."""
    rows = read_csv(score_csv)
    header, body = rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert list(body) == list(expected) + ["average"]
    for cat, want in expected.items():
        for col, value in want.items():
            assert float(body[cat][col]) == pytest.approx(value, abs=2e-6), (cat, col)
    for col in header[2:]:
        mean = np.mean([expected[c][col] for c in expected])
        assert float(body["average"][col]) == pytest.approx(mean, abs=2e-6), col
    assert int(body["average"]["num_images"]) == sum(int(w["num_images"]) for w in expected.values())


def write_ravel(folder, codes, masks, index_rows=None, images=None):
    """A ravel folder written with PIL: 16-bit maps and masks (0/65535), optional images and index.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (code, mask) in enumerate(zip(codes, masks)):
        Image.fromarray(np.asarray(code, np.uint16)).save(folder / f"{i:05d}_pred.png")
        Image.fromarray(np.asarray(mask, np.uint16) * 65535).save(folder / f"{i:05d}_gt.png")
        if images is not None:
            Image.fromarray(images[i]).save(folder / f"image{i:05d}.png")
    if index_rows is not None:
        with open(folder / "index.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["index", "category", "defect_type", "stem"]] + index_rows)
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pni_analysis") / "result"
    truth = build_tree(root, np.random.default_rng(0))
    ens, rav = root / "ensemble_result", root / "ensemble_ravel"
    assert (
        load_cli("calc_ensemble_score").main(
            [
                "--project_root_path",
                str(root),
                "--ensemble_root_path",
                str(ens),
                "--category",
                *CATEGORIES,
                "--backbone_list",
                *BACKBONES,
            ]
        )
        == 0
    )
    assert (
        load_cli("convert_result_format").main(
            ["--before_result_root_dir", str(ens), "--after_result_root_dir", str(rav), "--is_MVtec_small"]
        )
        == 0
    )
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
        rc = load_cli("calc_ensemble_score").main(
            [
                "--project_root_path",
                str(root),
                "--ensemble_root_path",
                str(tmp_path / "e"),
                "--category",
                "bottle",
                "--backbone_list",
                *BACKBONES,
            ]
        )
    finally:
        with open(vdir / "image_scores.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(scores)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "good_001_gt.npy" in err and "RNX101" in err
    assert (
        load_cli("calc_ensemble_score").main(
            ["--project_root_path", str(root), "--category", "bottle", "--version_num", "3", "--backbone_list", "WR101"]
        )
        == 2
    )


def test_ravel_folder(pipeline):
    _, ens, rav, truth = pipeline
    rows = read_csv(rav / "index.csv")
    assert rows[0] == ["index", "category", "defect_type", "stem"]
    expected = [
        [str(i), cat, t, s]
        for i, (cat, (t, s)) in enumerate((c, item) for c in ("bottle", "zz_custom") for item in ITEMS)
    ]
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
        img = np.asarray(Image.open(rav / f"image{i:05d}.png"))
        assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3)
        # RGB order kept: the source image read with PIL, and the image the test tree was made from
        np.testing.assert_array_equal(img, np.asarray(Image.open(ens / cat / "test" / t / f"{s}.png").convert("RGB")))
        np.testing.assert_array_equal(img, truth[(cat, "WR101", t, s)][0])


def test_png16_round_trip(tmp_path):
    a = np.random.default_rng(1).integers(0, 65536, (7, 9), dtype=np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    ravel.write_png16(tmp_path / "x.png", a)
    np.testing.assert_array_equal(ravel.read_png16(tmp_path / "x.png"), a)


def test_analysis(pipeline, capsys):
    _, _, rav, _ = pipeline
    assert (
        load_cli("analysis_amap").main(
            [
                "--project_root_path",
                str(rav),
                "--calc_pro",
                "--visualize",
                "--calc_misclassified_sample",
                "--compare_with_patchcore",
                "--max_steps",
                "200",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "AUPRO_MVTec" in out.out and "nothing compared" in out.err
    rows = read_csv(rav / "score_result.csv")
    header = rows[0]
    assert header == [
        "category",
        "num_images",
        "I-AUROC",
        "P-AUROC",
        "AUPRO_MVTec",
        "AUPRO_PNI",
        "pixel_threshold",
        "pixel_F1",
        "image_threshold",
        "image_F1",
    ]
    expected = {}
    for cat, first in (("bottle", 0), ("zz_custom", 4)):
        idx = range(first, first + len(ITEMS))
        codes = np.stack([read16(rav / f"{i:05d}_pred.png") for i in idx])
        masks = np.stack([read16(rav / f"{i:05d}_gt.png") > 0 for i in idx])
        expected[cat] = reference_row(codes, masks, max_steps=200)
    check_rows(rav / "score_result.csv", expected)
    assert all(0.5 < float(r[header.index("P-AUROC")]) <= 1 for r in rows[1:])
    for cat, first in (("bottle", 0), ("zz_custom", 4)):
        d = rav / "viz" / cat
        for suffix in (
            "",
            "_mask",
            "_amap",
            "_amap_on_img",
            "_img_with_gt",
            "_img_with_mask",
            "_heatmap_on_img_with_mask",
        ):
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


def test_pixel_threshold_on_the_category_scale_and_pictures(tmp_path):
    """Hand-computed: maps span 10000-50000 only. Pixel sweep (score >= t) over 3 defective and
    13 normal pixels: t=50000 P=1 R=1/2, t=45000 P=1/2 R=1/2, t=40000 P=2/3 R=1 (best, F1 0.8),
    t=30000 P=1/2 R=1. Reported: (40000-10000)/(50000-10000) = 0.75 (not 40000/65535 = 0.6104).
    Images: A (defective) max 50000, B (good) max 45000: image threshold 50000/65535, F1 1."""
    codes = np.array(
        [
            [[20000, 30000, 50000, 40000], [20000, 20000, 20000, 20000]],
            [[20000, 45000, 20000, 20000], [10000, 20000, 20000, 20000]],
        ]
    )
    masks = np.array([[[0, 0, 1, 1], [0, 0, 0, 0]], [[0] * 4, [0] * 4]], bool)
    grey = np.full((2, 4, 3), 100, np.uint8)
    root = write_ravel(tmp_path / "r", codes, masks, [[0, "c", "bad", "a"], [1, "c", "good", "b"]], [grey, grey])
    assert load_cli("analysis_amap").main(["--project_root_path", str(root), "--visualize"]) == 0
    rows = read_csv(root / "score_result.csv")
    row = dict(zip(rows[0], rows[1]))
    assert float(row["pixel_threshold"]) == pytest.approx(0.75, abs=1e-6)
    assert float(row["pixel_F1"]) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1 + 1e-6), abs=1e-6)
    assert float(row["image_threshold"]) == pytest.approx(50000 / 65535, abs=1e-6)
    assert float(row["image_F1"]) == pytest.approx(2 / (2 + 1e-6), abs=1e-6)
    assert float(row["I-AUROC"]) == 1.0
    # the pictures outline the pixels with map >= 40000 (the same threshold, in map units)
    for i, region in ((0, [(0, 2), (0, 3)]), (1, [(0, 1)])):
        pic = np.asarray(Image.open(root / "viz" / "c" / f"{i:05d}_img_with_mask.png").convert("RGB"))
        changed = np.argwhere(np.any(pic != grey, axis=2))
        assert sorted(map(tuple, changed.tolist())) == region, i


def test_analysis_known_answers(tmp_path):
    """Two categories, maps in part of 0-65535, masks with a ring (its hole counts for the PNI
    AUPRO only) and two regions in one image; every column against the METHOD references."""
    rng = np.random.default_rng(5)
    codes, masks, rows = [], [], []
    for c, cat in enumerate(("cat_a", "cat_b")):
        for j in range(4):
            mask = np.zeros((12, 12), bool)
            if j == 0:
                mask[2:7, 2:7] = True
                mask[4, 4] = False  # ring
            elif j == 1:
                mask[1:3, 8:11] = True
                mask[8:11, 1:4] = True
            code = rng.integers(6000, 30000, (12, 12)) + mask * rng.integers(0, 25000, (12, 12)) + 3000 * c
            if j == 0:
                code[4, 4] = 56000  # the ring's hole: a normal pixel predicted at every kept threshold
            codes.append(code)
            masks.append(mask)
            rows.append([len(rows), cat, "bad" if mask.any() else "good", f"{j:03d}"])
    root = write_ravel(tmp_path / "r", codes, masks, rows)
    assert load_cli("analysis_amap").main(["--project_root_path", str(root), "--calc_pro", "--max_steps", "50"]) == 0
    expected = {
        cat: reference_row(np.stack(codes[4 * c : 4 * c + 4]), np.stack(masks[4 * c : 4 * c + 4]), 50)
        for c, cat in enumerate(("cat_a", "cat_b"))
    }
    assert expected["cat_a"]["AUPRO_PNI"] != pytest.approx(expected["cat_a"]["AUPRO_MVTec"], abs=1e-3)
    check_rows(root / "score_result.csv", expected)


def write_ensemble_tree(root, layout):
    """An ensemble result folder (``<cat>/{test,ground_truth,anomaly_map}/<type>/``) for ``layout``:
    {category: [(defect_type, stem), ...]}; each map is a constant that encodes its position."""
    for c, (cat, items) in enumerate(layout.items()):
        for k, (t, s) in enumerate(items):
            for sub in ("test", "anomaly_map", "ground_truth"):
                (root / cat / sub / t).mkdir(parents=True, exist_ok=True)
            np.save(root / cat / "anomaly_map" / t / f"{s}.npy", np.full((4, 4), (10 * c + k) / 100, np.float32))
            Image.fromarray(np.full((4, 4, 3), 10 * c + k, np.uint8)).save(root / cat / "test" / t / f"{s}.png")
            if t not in ("ok", "good"):
                Image.fromarray(np.full((4, 4), 255, np.uint8)).save(root / cat / "ground_truth" / t / f"{s}_mask.png")


def test_convert_btad_order(tmp_path):
    layout = {
        "03": [("ok", "b"), ("ko", "a")],
        "00extra": [("ok", "x")],
        "01": [("ok", "z"), ("ko", "y")],
        "02": [("ko", "m")],
    }
    write_ensemble_tree(tmp_path / "ens", layout)
    convert = load_cli("convert_result_format").main
    assert (
        convert(
            [
                "--before_result_root_dir",
                str(tmp_path / "ens"),
                "--after_result_root_dir",
                str(tmp_path / "btad"),
                "--is_BTAD",
            ]
        )
        == 0
    )
    assert read_csv(tmp_path / "btad" / "index.csv")[1:] == [
        ["0", "01", "ko", "y"],
        ["1", "01", "ok", "z"],
        ["2", "02", "ko", "m"],
        ["3", "03", "ko", "a"],
        ["4", "03", "ok", "b"],
        ["5", "00extra", "ok", "x"],
    ]
    # each file holds what its row says: map value (10*c + k)/100 of layout position (c, k)
    for i, (c, k) in enumerate([(2, 1), (2, 0), (3, 0), (0, 1), (0, 0), (1, 0)]):
        assert set(np.unique(read16(tmp_path / "btad" / f"{i:05d}_pred.png"))) == {int((10 * c + k) / 100 * 65535)}
        assert set(np.unique(np.asarray(Image.open(tmp_path / "btad" / f"image{i:05d}.png")))) == {10 * c + k}
    assert (
        convert(["--before_result_root_dir", str(tmp_path / "ens"), "--after_result_root_dir", str(tmp_path / "plain")])
        == 0
    )
    assert [r[1] for r in read_csv(tmp_path / "plain" / "index.csv")[1:]] == ["00extra", "01", "01", "02", "03", "03"]


@pytest.mark.parametrize("flags, borders", [(["--is_BTAD"], {"01": 70, "02": 230}), ([], {"bottle": 83, "cable": 150})])
def test_fallback_category_borders(tmp_path, flags, borders, capsys):
    """No index.csv: the original's test-set sizes split the folder (BTAD 01: 70, 02: 230;
    MVTec bottle: 83, cable: 150)."""
    rng = np.random.default_rng(len(flags))
    n = sum(borders.values())
    masks = np.zeros((n, 2, 2), bool)
    masks[::3, 0, 0] = True
    codes = rng.integers(1000, 30000, (n, 2, 2)) + masks * rng.integers(0, 20000, (n, 2, 2))
    root = write_ravel(tmp_path / "r", codes, masks)
    assert load_cli("analysis_amap").main(["--project_root_path", str(root), *flags]) == 0
    assert "index.csv missing" in capsys.readouterr().err
    expected, start = {}, 0
    for cat, count in borders.items():
        expected[cat] = reference_row(codes[start : start + count], masks[start : start + count])
        start += count
    check_rows(root / "score_result.csv", expected)


def test_visualize_refuses_an_image_of_another_size(tmp_path, capsys):
    codes = np.full((1, 4, 4), 30000)
    root = write_ravel(
        tmp_path / "r", codes, np.ones((1, 4, 4), bool), [[0, "c", "bad", "a"]], [np.zeros((6, 6, 3), np.uint8)]
    )
    assert load_cli("analysis_amap").main(["--project_root_path", str(root), "--visualize"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "image00000.png" in errors[0]
