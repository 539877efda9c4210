"""The backbone ensemble (METHOD section 6, ``calc_ensemble_score.py``): the image score is the
mean of each map's top 1% of pixels, averaged over backbones; the pixel ensemble is each
backbone's maps min-max normalised over the category, averaged; the CSV holds their AUROCs."""

import csv

import numpy as np
import pytest
from helpers import MAPS, load_cli
from sklearn.metrics import roc_auc_score

from pni.ensemble import top_fraction_mean

SIZE = 20  # 400 pixels: the top 1% is 4 pixels
BACKBONES = ("WR101", "DN201")
ITEMS = [("crack", "000"), ("crack", "001"), ("hole", "003"), ("good", "000"), ("good", "001"), ("good", "002")]


def test_top_fraction_mean_by_hand():
    maps = np.zeros((2, SIZE, SIZE), np.float32)
    maps[0].flat[[5, 50, 123, 399]] = [4.0, 3.0, 2.0, 9.0]  # the 4 largest of 400
    maps[0].flat[7] = 1.0  # the 5th largest: left out
    maps[1] = -1.0
    maps[1, 0, :3] = [-0.5, 0.5, 0.25]
    np.testing.assert_allclose(top_fraction_mean(maps), [(4 + 3 + 2 + 9) / 4, (0.5 + 0.25 - 0.5 - 1) / 4])
    small = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5)  # 1% of 25 pixels: at least one
    np.testing.assert_allclose(top_fraction_mean(small), [24.0, 49.0])


def write_run(version_dir, rng, scale):
    """One backbone's test run, written the way the test stage writes it (METHOD section 5):
    ``sample/{type}_{stem}[_gt|_amap_{map}].npy`` and ``image_scores.csv``."""
    sample = version_dir / "sample"
    sample.mkdir(parents=True)
    maps, gts = {m: [] for m in MAPS}, []
    for t, s in ITEMS:
        gt = np.zeros((SIZE, SIZE), np.uint8)
        if t != "good":
            gt[4:9, 3 + int(s) : 10] = 1
        np.save(sample / f"{t}_{s}.npy", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        np.save(sample / f"{t}_{s}_gt.npy", gt)
        gts.append(gt)
        for k, m in enumerate(MAPS):
            amap = scale * (rng.random((SIZE, SIZE)) + 0.7 * gt) + k
            if (t, s) == ("good", "001"):
                amap[15:17, 15:17] += 1.5 * scale  # a false positive: neither AUROC is 1
            amap = amap.astype(np.float32)
            np.save(sample / f"{t}_{s}_amap_{m}.npy", amap)
            maps[m].append(amap)
    with open(version_dir / "image_scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["defect_type", "stem", "label", *MAPS])
        for (t, s), *scores in zip(ITEMS, *[maps[m] for m in MAPS]):
            writer.writerow([t, s, int(t != "good")] + [float(x.max()) for x in scores])
    return {m: np.stack(v) for m, v in maps.items()}, np.stack(gts)


def test_ensemble_csv_values_and_maps(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "result"
    runs = {}
    for b, backbone in enumerate(BACKBONES):
        runs[backbone] = write_run(
            root / "bottle" / backbone / "anomaly" / "lightning_logs" / "version_0", rng, scale=1.0 + 3 * b
        )
    ens = tmp_path / "ens"
    assert (
        load_cli("calc_ensemble_score").main(
            [
                "--project_root_path",
                str(root),
                "--ensemble_root_path",
                str(ens),
                "--category",
                "bottle",
                "--backbone_list",
                *BACKBONES,
            ]
        )
        == 0
    )
    with open(root / "ensemble_score_result.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["category"], row["backbone_list"], row["num_images"]) == ("bottle", "WR101 DN201", "6")

    labels = [int(t != "good") for t, _ in ITEMS]
    gt = runs["WR101"][1]
    for m in MAPS:
        # image: mean of the 4 largest pixels of each raw map (a full sort), mean over backbones
        image = np.mean(
            [np.sort(runs[b][0][m].reshape(len(ITEMS), -1), axis=1)[:, -4:].mean(axis=1) for b in BACKBONES], axis=0
        )
        # pixel: each backbone's maps min-max normalised over the category, mean over backbones
        pixel = np.mean(
            [(runs[b][0][m] - runs[b][0][m].min()) / (runs[b][0][m].max() - runs[b][0][m].min()) for b in BACKBONES],
            axis=0,
        )
        assert float(row[f"{m}_I-AUROC"]) == pytest.approx(roc_auc_score(labels, image), abs=1e-6), m
        assert float(row[f"{m}_P-AUROC"]) == pytest.approx(
            roc_auc_score(gt.reshape(-1), pixel.reshape(-1)), abs=1e-6
        ), m
        assert 0.5 < roc_auc_score(labels, image) < 1.0  # a case where ranking matters
        if m == "nb_coor":  # the saved family (--save_type default)
            for j, (t, s) in enumerate(ITEMS):
                np.testing.assert_allclose(
                    np.load(ens / "bottle" / "anomaly_map" / t / f"{s}.npy"), pixel[j], rtol=0, atol=1e-6
                )


def test_foreign_ensemble_table_is_refused_before_any_file(tmp_path, capsys):
    root = tmp_path / "result"
    for b, backbone in enumerate(BACKBONES):
        write_run(
            root / "bottle" / backbone / "anomaly" / "lightning_logs" / "version_0", np.random.default_rng(b), scale=1.0
        )
    table = root / "ensemble_score_result.csv"
    table.write_text("something,else\n1,2\n")
    ens = tmp_path / "ens"
    rc = load_cli("calc_ensemble_score").main(
        [
            "--project_root_path",
            str(root),
            "--ensemble_root_path",
            str(ens),
            "--category",
            "bottle",
            "--backbone_list",
            *BACKBONES,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and str(table) in err and "header" in err
    assert table.read_text() == "something,else\n1,2\n" and not ens.exists()
