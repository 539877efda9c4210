"""Metrics against sklearn and slow, direct threshold-by-threshold references."""

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import auc, roc_auc_score

from pni import metrics


# ---------------------------------------------------------------- slow references
def slow_aupro_mvtec(masks, maps, limit=0.3):
    """Every distinct score as threshold (pred = score >= t), regions per image (8-conn.)."""
    labelled = [measure.label(m, connectivity=2) for m in masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fracs = [pred[i][lab == r].mean() for i, lab in enumerate(labelled) for r in range(1, lab.max() + 1)]
        pros.append(float(np.mean(fracs)))
        fprs.append(float(pred[~masks].mean()))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at) / 2
            break
    return area / limit


def slow_aupro_pni(masks, maps, max_steps=2000, limit=0.3):
    """The original PNI loop (cal_pro_metric_new), threshold by threshold."""
    max_th, min_th = float(maps.max()), float(maps.min())
    delta = (max_th - min_th) / max_steps
    props = [measure.regionprops(measure.label(m, connectivity=2)) for m in masks]
    fprs, pros = [], []
    for step in range(max_steps):
        thred = max_th - step * delta
        binary = maps > thred
        pro = []
        for i, image_props in enumerate(props):
            for prop in image_props:
                x0, y0, x1, y1 = prop.bbox
                crop = binary[i][x0:x1, y0:y1]
                pro.append(np.logical_and(crop, prop.image_filled).sum() / prop.area)
        pros.append(np.mean(pro))
        fprs.append(np.logical_and(~masks, binary).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    idx = fprs <= limit
    f = fprs[idx]
    f = (f - f.min()) / (f.max() - f.min())
    return auc(f, pros[idx])


def brute_best_f1(labels, scores):
    best = (-1.0, None)
    for t in np.unique(scores):  # ascending: strict '>' keeps the lowest threshold on ties
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        p = tp / (tp + fp)
        r = tp / labels.sum()
        f1 = 2 * p * r / (p + r + 1e-6)
        if f1 > best[0]:
            best = (f1, t)
    return best[1], best[0]


def random_case(rng, n=3, h=12, w=12, decimals=None):
    masks = np.zeros((n, h, w), bool)
    masks[0, 2:7, 2:7] = True
    masks[0, 3:6, 3:6] = False  # ring with a hole ...
    masks[0, 4, 4] = True  # ... and a region nested in the hole
    masks[0, 9, 9] = masks[0, 10, 10] = True  # diagonal pair: one 8-connected region
    masks[1] = rng.random((h, w)) < 0.15
    maps = rng.random((n, h, w)) + 0.4 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


# ---------------------------------------------------------------- AUROC / F1
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_auroc_equals_sklearn(decimals):
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.3
    s = rng.random(500) + 0.5 * y
    if decimals is not None:
        s = np.round(s, decimals)
    assert metrics.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    masks, maps = random_case(rng, decimals=decimals)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_integer_and_float_scores_agree():
    rng = np.random.default_rng(2)
    masks, maps = random_case(rng)
    codes = (maps / maps.max() * 65535).astype(np.uint16)
    f = codes.astype(np.float64)
    assert metrics.pixel_auroc(masks, codes) == pytest.approx(metrics.pixel_auroc(masks, f), abs=1e-12)
    assert metrics.aupro_mvtec(masks, codes) == pytest.approx(metrics.aupro_mvtec(masks, f), abs=1e-12)
    assert metrics.best_f1_threshold(masks, codes) == pytest.approx(metrics.best_f1_threshold(masks, f))


def test_roc_curve_points():
    fpr, tpr, thr = metrics.roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thr[0] == np.inf and thr[-1] == 0.1


@pytest.mark.parametrize("decimals", [None, 1])
def test_best_f1_matches_brute_force(decimals):
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.2
    s = rng.random(300) + 0.4 * y
    if decimals is not None:
        s = np.round(s, decimals)
    thr, f1 = metrics.best_f1_threshold(y, s)
    bthr, bf1 = brute_best_f1(y, s)
    assert f1 == pytest.approx(bf1, abs=1e-12)
    assert thr == bthr


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError):
        metrics.image_auroc([0, 0], [0.1, 0.2])


# ---------------------------------------------------------------- AUPRO, MVTec definition
def test_aupro_mvtec_perfect_and_reversed():
    masks, _ = random_case(np.random.default_rng(4))
    assert metrics.aupro_mvtec(masks, masks.astype(float)) == pytest.approx(1.0)
    assert metrics.aupro_mvtec(masks, 1.0 - masks) == pytest.approx(0.0)


def test_aupro_mvtec_two_regions_closed_form():
    masks = np.zeros((2, 2, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # region A: diagonal pair (8-connected)
    masks[1, 1, 3] = True  # region B
    maps = np.zeros((2, 2, 4))
    maps[0, 0, 0] = 0.9  # A1
    maps[0, 0, 1] = 0.8  # normal
    maps[1, 1, 3] = 0.7  # B
    maps[0, 0, 2] = 0.6  # normal
    maps[1, 0, 0] = 0.5  # normal
    maps[1, 0, 1] = 0.4  # normal: FPR 4/13 > 0.3, interpolation inside a flat PRO segment
    maps[0, 1, 1] = 0.3  # A2
    n = 13
    expected = ((1 / n) * 0.25 + (0.3 - 1 / n) * 0.75) / 0.3
    assert metrics.aupro_mvtec(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert slow_aupro_mvtec(masks, maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed,decimals", [(5, None), (6, 1), (7, 2)])
def test_aupro_mvtec_matches_slow(seed, decimals):
    masks, maps = random_case(np.random.default_rng(seed), decimals=decimals)
    assert metrics.aupro_mvtec(masks, maps) == pytest.approx(slow_aupro_mvtec(masks, maps), abs=1e-6)
    lim = 0.1
    assert metrics.aupro_mvtec(masks, maps, lim) == pytest.approx(slow_aupro_mvtec(masks, maps, lim), abs=1e-6)


def test_pro_curve_end_points():
    masks, maps = random_case(np.random.default_rng(8))
    fpr, pro, thr = metrics.pro_curve(masks, maps)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(thr) <= 0)


# ---------------------------------------------------------------- AUPRO, PNI definition
@pytest.mark.parametrize("seed,decimals", [(9, None), (10, 2)])
def test_aupro_pni_matches_slow_loop(seed, decimals):
    masks, maps = random_case(np.random.default_rng(seed), decimals=decimals)
    fast = metrics.aupro_pni(masks, maps, max_steps=2000)
    assert np.isfinite(fast)
    assert fast == pytest.approx(slow_aupro_pni(masks, maps, 2000), abs=1e-9)
    assert metrics.aupro_pni(masks, maps, 37) == pytest.approx(slow_aupro_pni(masks, maps, 37), abs=1e-9)


def test_aupro_pni_hole_filled_overlap():
    # a ring whose hole is normal: predicting only the hole gives the ring PRO 1/8 (hole/area)
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 1:4, 1:4] = True
    masks[0, 2, 2] = False
    maps = np.zeros((1, 5, 5))
    maps[0, 2, 2] = 1.0
    fpr, pro, thr = metrics.pni_pro_curve(masks, maps, max_steps=4)
    assert pro[1] == pytest.approx(1 / 8) and fpr[1] == pytest.approx(1 / 17)


def test_aupro_pni_without_false_positives_is_nan():
    masks, _ = random_case(np.random.default_rng(11))
    assert np.isnan(metrics.aupro_pni(masks, masks.astype(float)))


def test_float32_path_with_negative_scores_and_signed_zero():
    rng = np.random.default_rng(12)
    masks, maps = random_case(rng, decimals=1)
    maps32 = (maps - 0.7).astype(np.float32)
    maps32[0, 0, :3] = -0.0
    maps32[1, 0, :3] = 0.0
    ref = maps32.astype(np.float64)
    assert metrics.aupro_mvtec(masks, maps32) == pytest.approx(slow_aupro_mvtec(masks, ref), abs=1e-9)
    assert metrics.pixel_auroc(masks, maps32) == pytest.approx(roc_auc_score(masks.ravel(), ref.ravel()), abs=1e-12)
    thr, f1 = metrics.best_f1_threshold(masks, maps32)
    assert (thr, f1) == pytest.approx(brute_best_f1(masks.ravel(), ref.ravel()))
