"""What a run writes: the artefacts under the original's names, the result folders and score
tables (AUROCs recomputed with scikit-learn from the saved files), reruns that reuse the
artefacts, seeded determinism, images of other encodings, test sets without defects, good
images or ground truth, and the per-defect-type report.

With the session's shared tiny run (``tiny_run``); runs that write go to ``tmp_path``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CATEGORY,
    MAPS,
    TRAIN,
    artefact_dir,
    assert_same_results,
    aurocs_from_saved,
    load_cli,
    logs_dir,
    score_rows,
)
from PIL import Image
from sklearn.metrics import roc_auc_score

import train_coreset_distribution as tcd
from pni import coreset as cs
from pni.errors import PNIError

SCORES = [f"{m}_{k}" for m in MAPS for k in ("P-AUROC", "I-AUROC")]


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_and_capture(main, argv, capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of a CLI ``main``."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- files and tables


def test_artefacts_have_the_original_names(tiny_run):
    emb = tiny_run.emb
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
    version = tiny_run.version
    sample = version / "sample"
    stems = sorted(p.name for p in sample.glob("*_gt.npy"))
    assert len(stems) == 8  # 2 good + 2 x 3 defect types
    prefix = sample / stems[0][: -len("_gt.npy")]
    assert np.load(f"{prefix}.npy").shape == (64, 64, 3)
    for m in MAPS:
        amap = np.load(f"{prefix}_amap_{m}.npy", allow_pickle=False)
        assert amap.shape == (64, 64) and amap.dtype == np.float32
        assert Path(f"{prefix}_amap_{m}.jpg").is_file()
    rows = read_csv(tiny_run.project / "score_result.csv")
    assert len(rows) == 1 and rows[0]["category"] == "texture"
    assert len(read_csv(version / "image_scores.csv")) == 8
    expected = aurocs_from_saved(version)  # scikit-learn on the saved maps, masks and image scores
    assert len(expected) == 8
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, abs=1e-6), key


def test_report_tables_per_category_and_defect_type(tiny_run):
    from pni.report import latest_run, load_run, per_defect_scores, report

    text = report(tiny_run.project, ["texture"], "R18")
    assert "per category" in text and "texture/hole" in text and "texture/scratch" in text
    rows, samples = load_run(latest_run(tiny_run.project, "texture", "R18"))
    hole = [d for d in per_defect_scores(rows, samples) if d["defect_type"] == "hole"][0]
    keep = [i for i, r in enumerate(rows) if r["defect_type"] in ("good", "hole")]
    expected = roc_auc_score(
        np.concatenate([samples[i]["gt"].reshape(-1) for i in keep]),
        np.concatenate([samples[i]["nb"].reshape(-1) for i in keep]),
    )
    assert hole["n"] == 2 and hole["nb_P-AUROC"] == pytest.approx(expected, abs=1e-12)
    expected = roc_auc_score([int(rows[i]["label"]) for i in keep], [float(rows[i]["coor"]) for i in keep])
    assert hole["coor_I-AUROC"] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- reruns and determinism


def test_rerun_without_train_flags_reuses_artefacts(tiny_run, tmp_path):
    run = tiny_run.copy_to(tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in run.emb.iterdir()}
    assert tcd.main(run.argv()) == 0
    assert {p.name: p.stat().st_mtime_ns for p in run.emb.iterdir()} == before
    v0 = run.version / "sample"
    v1 = v0.parent.parent / "version_1" / "sample"
    for f in sorted(v0.glob("*_amap_nb_coor.npy")):  # same artefacts, same maps
        np.testing.assert_allclose(np.load(f), np.load(v1 / f.name), rtol=1e-5, atol=1e-6)
    assert len(read_csv(run.project / "score_result.csv")) == 2


def test_same_seed_same_maps_and_scores(tiny_run, tmp_path, capsys):
    project = tmp_path / "r"
    assert tcd.main(tiny_run.argv(*TRAIN, emb_root=tmp_path, project=project)) == 0
    capsys.readouterr()
    assert_same_results(tiny_run.version, logs_dir(project) / "version_0")
    assert score_rows(project) == score_rows(tiny_run.project)[:1]
    a, b = tiny_run.emb, artefact_dir(tmp_path)
    for name in (
        "embedding_coreset_index_25.faiss",
        "embedding_coreset_index_25_with_edge.faiss",
        "dist_coreset_index_16.faiss",
    ):
        assert np.array_equal(cs.index_vectors(cs.load_index(a / name)), cs.index_vectors(cs.load_index(b / name)))
    for name in ("coor_model_sp25.npy", "coor_model_sp25_with_edge.npy"):
        assert np.array_equal(np.load(a / name), np.load(b / name))
    sa = torch.load(a / "best_model_dp2_dcs16_n3.pt", weights_only=True)["model"]
    sb = torch.load(b / "best_model_dp2_dcs16_n3.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- unusual test sets


def test_grayscale_16bit_and_rgba_images_are_accepted(tiny_run, tmp_path, capsys):
    cat = tiny_run.copy_dataset(tmp_path / "ds")
    gray = cat / "test" / "good" / "000.png"
    Image.open(gray).convert("L").save(gray)
    wide = cat / "test" / "hole" / "000.png"
    Image.fromarray(np.asarray(Image.open(wide).convert("L")).astype(np.uint16) * 257).save(wide)
    assert Image.open(wide).mode.startswith("I")
    rgba = cat / "test" / "scratch" / "000.png"
    Image.open(rgba).convert("RGBA").save(rgba)
    mask = cat / "ground_truth" / "scratch" / "000_mask.png"  # 16-bit mask too
    Image.fromarray(np.asarray(Image.open(mask)).astype(np.uint16) * 257).save(mask)
    project = tmp_path / "r"
    assert tcd.main(tiny_run.argv(dataset=tmp_path / "ds", project=project)) == 0
    sample = logs_dir(project) / "version_0" / "sample"
    for name in ("good_000", "hole_000"):
        image = np.load(sample / f"{name}.npy")
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    reference = np.load(tiny_run.version / "sample" / "scratch_000_gt.npy")
    assert np.array_equal(np.load(sample / "scratch_000_gt.npy"), reference) and reference.any()


@pytest.mark.parametrize("keep", ["good", "defects"])
def test_one_class_test_set_writes_nan_with_one_note_and_keeps_the_maps(tiny_run, tmp_path, capsys, keep):
    cat = tiny_run.copy_dataset(tmp_path / "ds")  # a copy: the same training images are accepted
    for extra in [*(cat / "test").glob("*/001.png"), *(cat / "ground_truth").glob("*/001_mask.png")]:
        extra.unlink()  # one test image per folder
    if keep == "good":
        for folder in ("hole", "scratch", "stain"):
            shutil.rmtree(cat / "test" / folder)
            shutil.rmtree(cat / "ground_truth" / folder)
    else:
        for p in (cat / "test" / "good").iterdir():
            p.unlink()
    project = tmp_path / "r"
    code, out, err = run_and_capture(tcd.main, tiny_run.argv(dataset=tmp_path / "ds", project=project), capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(notes) == 1 and "undefined, written as nan" in notes[0], err
    (row,) = read_csv(project / "score_result.csv")
    for column in SCORES:
        undefined = keep == "good" or column.endswith("I-AUROC")
        assert (row[column] == "nan") == undefined, (column, row[column])
    sample = logs_dir(project) / "version_0" / "sample"
    n_images = 1 if keep == "good" else 3
    assert len(list(sample.glob("*_amap_nb_coor.npy"))) == n_images
    # the ensemble of that run: the same single note, the same nan columns
    code, out, err = run_and_capture(
        load_cli("calc_ensemble_score").main,
        [
            "--project_root_path",
            str(project),
            "--ensemble_root_path",
            str(tmp_path / "ens"),
            "--category",
            CATEGORY,
            "--backbone_list",
            "R18",
        ],
        capsys,
    )
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(notes) == 1 and f"category {CATEGORY} has" in notes[0] and "written as nan" in notes[0], err
    (row,) = read_csv(project / "ensemble_score_result.csv")
    for column in SCORES:
        assert (row[column] == "nan") == (keep == "good" or column.endswith("I-AUROC")), (column, row[column])
    assert len(list((tmp_path / "ens" / CATEGORY / "anomaly_map").rglob("*.npy"))) == n_images


def test_test_folder_without_ground_truth_gives_image_level_results(tiny_run, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_run.ds, ds)
    shutil.rmtree(ds / "texture" / "ground_truth")
    project = tmp_path / "result"
    assert tcd.main(tiny_run.argv(dataset=ds, project=project)) == 0
    out = capsys.readouterr().out
    assert "image-level results only" in out
    row = read_csv(project / "score_result.csv")[0]
    reference = read_csv(tiny_run.project / "score_result.csv")[0]
    for m in MAPS:
        assert row[f"{m}_P-AUROC"] == ""
        assert row[f"{m}_I-AUROC"] == reference[f"{m}_I-AUROC"]


def test_non_finite_map_is_one_line_naming_the_image(tmp_path):
    from pni.collector import ResultCollector
    from pni.scoring import ImageScores

    maps = {m: torch.zeros(8, 8) for m in MAPS}
    maps["coor"][3, 3] = float("nan")
    result = ImageScores(maps=maps, image={m: 0.0 for m in maps})
    meta = {
        "image": torch.zeros(3, 8, 8),
        "mask": torch.zeros(1, 8, 8),
        "defect_type": "hole",
        "stem": "007",
        "label": 1,
        "path": "/data/hole/007.png",
    }
    with pytest.raises(PNIError, match=r"the coor map of /data/hole/007.png has NaN"):
        ResultCollector(tmp_path)(meta, result)
    assert list(tmp_path.iterdir()) == []
