"""Flag and input problems of the command lines: exit code 2, one ``error:`` line naming the
flag or file, found before any training, and nothing written or half-written.

Through the real entry points (``train_coreset_distribution.main``, the ``analysis_code``
scripts; a subprocess where the exit code and stderr of the script matter), with the
session's shared tiny run (``tiny_run``) where trained artefacts or results are needed.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import CATEGORY, REPO, TINY, TRAIN, artefact_dir, expect_one_error, load_cli, logs_dir, snapshot_tree
from PIL import Image
from scipy import ndimage

import train_coreset_distribution as tcd
from pni.config import parse_args
from pni.data.datasets import build_datasets
from pni.errors import PNIError

# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--imagesize", "96", "--resize", "64"], ["--imagesize (96) must not exceed --resize (64)"]),
        (["--random_init", "--backbone_weights", "w.pth"], ["--random_init", "--backbone_weights"]),
        (["--patchsize", "4"], ["--patchsize"]),
        (["--backbone", "VGG"], ["--backbone"]),
        (["--num_layers", "1"], ["--num_layers", ">= 2"]),  # the MLP has an input and an output layer
    ],
)
def test_conflicting_or_bad_flags_are_one_line(argv, fragments, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for f in fragments:
        assert f in err


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


def test_flag_typo_keeps_the_trained_model(tiny_run, tmp_path, capsys):
    emb = tiny_run.copy_artefacts(tmp_path)
    before = snapshot_tree(emb)
    typos = [["--strategy", "dpp"], ["--devices", "0"], ["--accelerator", "foo"], ["--devices", "x"]]
    if not torch.cuda.is_available():
        typos.append(["--accelerator", "gpu"])
    for typo in typos:
        for stages in (["--train_nb_dist"], TRAIN):
            expect_one_error(
                tcd.main,
                tiny_run.argv(*stages, *typo, emb_root=tmp_path, project=tmp_path / "r"),
                capsys,
                typo[0],
                typo[1],
            )
            assert snapshot_tree(emb) == before  # byte for byte, settings records included
    assert not (tmp_path / "r").exists()
    assert tcd.main(tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r")) == 0  # still accepted
    capsys.readouterr()


def test_blur_wider_than_the_image_is_refused_and_normal_blurs_match_scipy(tiny_run, capsys):
    from pni.scoring_kernels import gaussian_blur

    expect_one_error(tcd.main, tiny_run.argv("--blursigma", "1e6"), capsys, "--blursigma", "--imagesize (64)")
    with pytest.raises(PNIError, match="--blursigma 1e\\+06 is wider than the 16x16 map"):
        gaussian_blur(torch.zeros(1, 16, 16), 1e6)
    maps = torch.from_numpy(np.random.default_rng(0).random((2, 16, 12), dtype=np.float32))
    for sigma in (0.7, 4.0, 16.0):  # 16: the kernel (radius 64) is wider than the map
        reference = np.stack(
            [ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="reflect", truncate=4.0) for m in maps.numpy()]
        )
        assert np.allclose(gaussian_blur(maps, sigma).numpy(), reference, atol=1e-5), sigma


def test_cli_in_a_subprocess_prints_one_line_and_exit_code_2(tmp_path, capsys):
    """The real script: exit code 2 and exactly one stderr line; a traceback only with --debug."""
    argv = ["--dataset_path", str(tmp_path / "nope"), "--embedding_root_path", str(tmp_path)] + TINY
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PNI_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_coreset_distribution.py")] + argv,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: dataset folder not found: {tmp_path / 'nope'} (set --dataset_path)"
    ]
    assert tcd.main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: dataset folder not found")


# ---------------------------------------------------------------- dataset problems


def test_missing_dataset_is_one_line(tmp_path, capsys):
    code = tcd.main(["--dataset_path", str(tmp_path / "nope"), "--embedding_root_path", str(tmp_path)] + TINY)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and str(tmp_path / "nope") in err and "\n" not in err


def test_missing_dataset_folder(tiny_run, tmp_path, capsys):
    project = tmp_path / "result"
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, dataset=tmp_path / "nope", emb_root=tmp_path, project=project),
        capsys,
        "dataset folder not found",
        str(tmp_path / "nope"),
    )
    assert not project.exists() and not (tmp_path / "embeddings_layer2+layer3").exists()


def test_unknown_category(tiny_run, tmp_path, capsys):
    argv = tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r")
    argv[argv.index("--category") + 1] = "nope"
    expect_one_error(tcd.main, argv, capsys, "unknown MVTec category 'nope'", "available: texture")


def test_category_that_is_a_path_is_refused_before_anything_is_written(tiny_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_run.ds / CATEGORY, foreign)  # holds train/good: a usable "category"
    before = snapshot_tree(tmp_path)
    for name in ("../foreign", str(foreign), ".."):
        argv = tiny_run.argv(*TRAIN, emb_root=tmp_path / "emb", project=tmp_path / "res")
        argv[argv.index("--category") + 1] = name
        expect_one_error(tcd.main, argv, capsys, "--category", name)
    assert snapshot_tree(tmp_path) == before
    with pytest.raises(PNIError, match="--category"):
        build_datasets("MVTec", tiny_run.ds, "../foreign")


def test_empty_training_folder(tiny_run, tmp_path, capsys):
    cat = tiny_run.copy_dataset(tmp_path / "ds")
    for p in (cat / "train" / "good").iterdir():
        p.unlink()
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "no training images in",
        str(cat / "train" / "good"),
    )
    assert not (tmp_path / "embeddings_layer2+layer3").exists() and not (tmp_path / "r").exists()


def test_empty_test_set_is_refused_before_training(tiny_run, tmp_path, capsys):
    cat = tiny_run.copy_dataset(tmp_path / "ds")
    for folder in (cat / "test").iterdir():
        for p in folder.iterdir():
            p.unlink()
    shutil.rmtree(cat / "ground_truth")
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "no test images",
        str(cat / "test"),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_image_without_mask_and_mask_without_image(tiny_run, tmp_path, capsys):
    cat = tiny_run.copy_dataset(tmp_path / "ds")
    mask = cat / "ground_truth" / "hole" / "000_mask.png"
    mask.rename(tmp_path / "away.png")
    expect_one_error(
        tcd.main,
        tiny_run.argv(dataset=tmp_path / "ds", project=tmp_path / "r"),
        capsys,
        "has no mask",
        str(cat / "test" / "hole" / "000.png"),
    )
    (tmp_path / "away.png").rename(mask)
    shutil.copy(mask, cat / "ground_truth" / "hole" / "007_mask.png")
    expect_one_error(
        tcd.main,
        tiny_run.argv(dataset=tmp_path / "ds", project=tmp_path / "r"),
        capsys,
        "has no test image",
        str(cat / "ground_truth" / "hole" / "007_mask.png"),
    )
    assert not (tmp_path / "r").exists()


def test_corrupt_training_png(tiny_run, tmp_path, capsys):
    cat = tiny_run.copy_dataset(tmp_path / "ds")
    bad = cat / "train" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "cannot read image",
        str(bad),
    )
    emb = artefact_dir(tmp_path)
    assert not any(emb.glob("*.faiss")) and not any(emb.glob(".*"))  # nothing half-written, no scratch left
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_truncated_test_png_leaves_no_result_folder(tiny_run, tmp_path, capsys, workers):
    """Decoding fails inside the test DataLoader (in a worker process with --num_workers 1):
    still one line naming the file, and no version folder (complete or partial) is left."""
    cat = tiny_run.copy_dataset(tmp_path / "ds")
    bad = cat / "test" / "scratch" / "000.png"
    bad.write_bytes(bad.read_bytes()[:300])
    project = tmp_path / "r"
    expect_one_error(
        tcd.main,
        tiny_run.argv("--num_workers", workers, dataset=tmp_path / "ds", project=project),
        capsys,
        "cannot read image",
        str(bad),
        "truncated",
    )
    assert list(logs_dir(project).iterdir()) == []
    assert not (project / "score_result.csv").exists()


def test_mask_of_other_size(tiny_run, tmp_path, capsys):
    cat = tiny_run.copy_dataset(tmp_path / "ds")
    mask = cat / "ground_truth" / "stain" / "000_mask.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(mask)
    project = tmp_path / "r"
    expect_one_error(
        tcd.main,
        tiny_run.argv(dataset=tmp_path / "ds", project=project),
        capsys,
        str(mask),
        "48x32",
        str(cat / "test" / "stain" / "000.png"),
    )
    assert not project.exists()  # found from the file headers, before any stage


def test_input_and_flag_problems_are_found_before_training(tiny_run, tmp_path, capsys):
    emb_root = tmp_path / "emb"

    def nothing_trained() -> bool:
        return not any(emb_root.rglob("*.faiss")) and not any(emb_root.rglob("*.pt"))

    cat = tiny_run.copy_dataset(tmp_path / "ds")
    mask = cat / "ground_truth" / "stain" / "000_mask.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(mask)
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=emb_root, project=tmp_path / "r"),
        capsys,
        str(mask),
        "48x32",
        "64x64",
    )
    assert not emb_root.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, emb_root=emb_root, project=blocker / "r"),
        capsys,
        "cannot create output folder",
        "--project_root_path",
        "is a file",
    )
    assert not emb_root.exists()
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, emb_root=emb_root, project=tmp_path / "r", weights=tmp_path / "none.pth"),
        capsys,
        "--backbone_weights",
        "none.pth",
    )
    assert not emb_root.exists()  # not even an empty artefact folder
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, "--anomaly_nn", "1000", emb_root=emb_root, project=tmp_path / "r"),
        capsys,
        "--anomaly_nn 1000",
        "64 entries",
    )
    assert nothing_trained()
    tiny_run.copy_artefacts(tmp_path)
    expect_one_error(
        tcd.main,
        tiny_run.argv("--train_nb_dist", "--anomaly_nn", "65", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "--anomaly_nn 65",
    )
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- output folders


def test_unwritable_output_folders(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    expect_one_error(
        tcd.main,
        tiny_run.argv(project=blocker / "result"),
        capsys,
        "cannot create output folder",
        str(blocker / "result"),
        "--project_root_path",
        "is a file",
    )
    expect_one_error(
        tcd.main,
        tiny_run.argv(*TRAIN, emb_root=blocker / "emb"),
        capsys,
        "cannot create output folder",
        str(blocker / "emb"),
        "--embedding_root_path",
    )
    assert blocker.read_text() == "not a folder"


def test_score_table_with_foreign_header_is_refused_before_scoring(tiny_run, tmp_path, capsys):
    project = tmp_path / "r"
    project.mkdir()
    (project / "score_result.csv").write_text("something,else\n1,2\n")
    expect_one_error(tcd.main, tiny_run.argv(project=project), capsys, str(project / "score_result.csv"), "header")
    assert not logs_dir(project).exists() or list(logs_dir(project).iterdir()) == []


# ---------------------------------------------------------------- analysis scripts


def ensemble_argv(project, ens, *backbones: str, category: str = CATEGORY) -> list[str]:
    return [
        "--project_root_path",
        str(project),
        "--ensemble_root_path",
        str(ens),
        "--category",
        category,
        "--backbone_list",
        *(backbones or ("R18",)),
    ]


def test_ravel_folder_with_a_missing_file(tiny_ravel, tmp_path, capsys):
    rav = tmp_path / "ravel"
    shutil.copytree(tiny_ravel, rav)
    (rav / "00002_gt.png").unlink()
    analyse = load_cli("analysis_amap").main
    expect_one_error(analyse, ["--project_root_path", str(rav), "--calc_pro"], capsys, str(rav / "00002_gt.png"))
    assert not (rav / "score_result.csv").exists()
    shutil.copy(tiny_ravel / "00002_gt.png", rav / "00002_gt.png")
    (rav / "image00003.png").unlink()  # only needed for --visualize: checked before any picture is drawn
    expect_one_error(analyse, ["--project_root_path", str(rav), "--visualize"], capsys, str(rav / "image00003.png"))
    assert not (rav / "viz").exists() and not (rav / "score_result.csv").exists()
    assert load_cli("analysis_amap").main(["--project_root_path", str(rav)]) == 0


def test_ensemble_and_convert_errors_write_nothing(tiny_run, tmp_path, capsys):
    project = tiny_run.copy_project(tmp_path / "project")  # a successful ensemble writes its table there
    ensemble = load_cli("calc_ensemble_score").main
    convert = load_cli("convert_result_format").main
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    expect_one_error(ensemble, ensemble_argv(project, blocker / "ens"), capsys, str(blocker))
    expect_one_error(ensemble, ensemble_argv(project, tmp_path / "ens", "R18", "R34"), capsys, "R34")
    assert not (tmp_path / "ens").exists()
    ens = tmp_path / "ens"
    assert ensemble(ensemble_argv(project, ens)) == 0
    missing = ens / CATEGORY / "test" / "stain" / "000.png"
    missing.rename(tmp_path / "away.png")
    expect_one_error(
        convert,
        ["--before_result_root_dir", str(ens), "--after_result_root_dir", str(tmp_path / "ravel")],
        capsys,
        str(missing),
    )
    assert not (tmp_path / "ravel").exists()
    (tmp_path / "away.png").rename(missing)
    expect_one_error(
        convert,
        ["--before_result_root_dir", str(ens), "--after_result_root_dir", str(blocker / "ravel")],
        capsys,
        str(blocker),
    )


def test_ensemble_refuses_path_like_names(tiny_run, tmp_path, capsys):
    ensemble = load_cli("calc_ensemble_score").main
    project = tiny_run.copy_project(tmp_path / "project")
    ens = tmp_path / "deep" / "ens"
    expect_one_error(ensemble, ensemble_argv(project, ens, category=str(project / CATEGORY)), capsys, "--category")
    expect_one_error(ensemble, ensemble_argv(project, ens, "../R18"), capsys, "--backbone_list")
    table = logs_dir(project) / "version_0" / "image_scores.csv"
    rows = list(csv.reader(table.open(newline="")))
    rows[1][1] = "../../../escape"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    before = snapshot_tree(tmp_path)
    expect_one_error(ensemble, ensemble_argv(project, ens), capsys, str(table), "stem", "escape")
    assert snapshot_tree(tmp_path) == before and not ens.exists()


def test_ravel_index_with_path_like_category(tiny_run, tmp_path, capsys):
    project = tiny_run.copy_project(tmp_path / "project")  # the ensemble writes its table there
    assert load_cli("calc_ensemble_score").main(ensemble_argv(project, tmp_path / "ens")) == 0
    rav = tmp_path / "a" / "ravel"
    assert (
        load_cli("convert_result_format").main(
            ["--before_result_root_dir", str(tmp_path / "ens"), "--after_result_root_dir", str(rav)]
        )
        == 0
    )
    capsys.readouterr()
    index = rav / "index.csv"
    rows = list(csv.reader(index.open(newline="")))
    for row in rows[1:]:
        row[1] = "../../x"
    with index.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    before = snapshot_tree(tmp_path)
    expect_one_error(
        load_cli("analysis_amap").main,
        ["--project_root_path", str(rav), "--visualize"],
        capsys,
        str(index),
        "category",
        "../../x",
    )
    assert snapshot_tree(tmp_path) == before


def test_analysis_size_mismatch_names_both_sizes(tmp_path, capsys):
    from pni.io import write_csv
    from pni.ravel import write_png16

    write_png16(tmp_path / "00000_pred.png", np.zeros((32, 32), np.uint16))
    write_png16(tmp_path / "00000_gt.png", np.zeros((32, 32), np.uint16))
    write_png16(tmp_path / "00001_pred.png", np.zeros((24, 32), np.uint16))
    write_png16(tmp_path / "00001_gt.png", np.zeros((24, 32), np.uint16))
    write_csv(
        tmp_path / "index.csv",
        ("index", "category", "defect_type", "stem"),
        [(0, "c", "good", "a"), (1, "c", "bad", "b")],
    )
    analyse = load_cli("analysis_amap").main
    expect_one_error(
        analyse, ["--project_root_path", str(tmp_path)], capsys, "00001_pred.png is 32x24", "00000_pred.png is 32x32"
    )
    write_png16(tmp_path / "00001_pred.png", np.zeros((32, 32), np.uint16))
    expect_one_error(
        analyse, ["--project_root_path", str(tmp_path)], capsys, "00001_gt.png is 32x24", "00001_pred.png is 32x32"
    )
