"""Reliability: bad inputs give one error line and leave nothing half-written, interrupted
runs can be re-run, runs are deterministic, and no result is ever unpickled.

Everything goes through the real entry points (``train_coreset_distribution.main`` and the
``analysis_code`` scripts; a subprocess where exit codes, stderr or a SIGKILL matter). One
tiny trained run (module fixture) provides the artefacts that most cases reuse.
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MAPS, REPO, TINY, TRAIN, load_cli
from PIL import Image

import train_coreset_distribution as tcd
from pni import coreset as cs
from pni.config import parse_args, settings_from_flags
from pni.data.synthetic import make_dataset
from pni.errors import PNIError

CAT = "texture"


def argv_for(dataset: Path, emb_root: Path, project: Path, *extra: str) -> list[str]:
    return (
        [
            "--dataset_path",
            str(dataset),
            "--category",
            CAT,
            "--project_root_path",
            str(project),
            "--embedding_root_path",
            str(emb_root),
        ]
        + TINY
        + list(extra)
    )


def emb_dir(emb_root: Path, backbone: str = "R18") -> Path:
    return emb_root / "embeddings_layer2+layer3" / CAT / backbone


def logs_dir(project: Path, backbone: str = "R18") -> Path:
    return project / CAT / backbone / "anomaly" / "lightning_logs"


def tree(path: Path) -> dict[str, int]:
    """Relative path -> mtime of everything under ``path`` (empty when it does not exist)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


class Trained:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ds = root / "ds"
        self.emb_root = root
        self.project = root / "result"

    def argv(
        self, *extra: str, dataset: Path | None = None, emb_root: Path | None = None, project: Path | None = None
    ) -> list[str]:
        return argv_for(dataset or self.ds, emb_root or self.emb_root, project or self.project, *extra)

    @property
    def emb(self) -> Path:
        return emb_dir(self.emb_root)

    def copy_dataset(self, dest: Path) -> Path:
        shutil.copytree(self.ds, dest)
        return dest / CAT

    def copy_artefacts(self, dest_root: Path, backbone: str = "R18") -> Path:
        dest = emb_dir(dest_root, backbone)
        shutil.copytree(self.emb, dest)
        return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("reliability")
    make_dataset(root / "ds", num_train=4, num_test_per_type=1, image_size=64, categories=[CAT])
    run = Trained(root)
    assert tcd.main(run.argv(*TRAIN)) == 0
    return run


def fails(argv, capsys, *fragments: str, main=tcd.main) -> str:
    """Run a CLI that must fail: exit code 2, exactly one ``error:`` line containing every
    fragment, no traceback. Returns that line."""
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2, captured.err
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def results_of(version_dir: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p, allow_pickle=False) for p in sorted((version_dir / "sample").glob("*.npy"))}


def scores_of(version_dir: Path) -> list[list[str]]:
    with open(version_dir / "image_scores.csv", newline="") as fh:
        return list(csv.reader(fh))


def score_rows(project: Path) -> list[dict[str, str]]:
    with open(project / "score_result.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "version"} for r in csv.DictReader(fh)]


def assert_same_results(dir_a: Path, dir_b: Path) -> None:
    a, b = results_of(dir_a), results_of(dir_b)
    assert a.keys() == b.keys() and len(a) == 4 * 6  # 4 test images x (image, gt, 4 maps)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert scores_of(dir_a) == scores_of(dir_b)


# ---------------------------------------------------------------- data errors


def test_missing_dataset_folder(trained, tmp_path, capsys):
    project = tmp_path / "result"
    fails(
        trained.argv(*TRAIN, dataset=tmp_path / "nope", emb_root=tmp_path, project=project),
        capsys,
        "dataset folder not found",
        str(tmp_path / "nope"),
    )
    assert not project.exists() and not (tmp_path / "embeddings_layer2+layer3").exists()


def test_unknown_category(trained, tmp_path, capsys):
    argv = trained.argv(emb_root=tmp_path, project=tmp_path / "r")
    argv[argv.index("--category") + 1] = "nope"
    fails(argv, capsys, "unknown MVTec category 'nope'", "available: texture")


def test_empty_training_folder(trained, tmp_path, capsys):
    cat = trained.copy_dataset(tmp_path / "ds")
    for p in (cat / "train" / "good").iterdir():
        p.unlink()
    fails(
        trained.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "no training images in",
        str(cat / "train" / "good"),
    )
    assert not (tmp_path / "embeddings_layer2+layer3").exists() and not (tmp_path / "r").exists()


def test_image_without_mask_and_mask_without_image(trained, tmp_path, capsys):
    cat = trained.copy_dataset(tmp_path / "ds")
    mask = cat / "ground_truth" / "hole" / "000_mask.png"
    mask.rename(tmp_path / "away.png")
    fails(
        trained.argv(dataset=tmp_path / "ds", project=tmp_path / "r"),
        capsys,
        "has no mask",
        str(cat / "test" / "hole" / "000.png"),
    )
    (tmp_path / "away.png").rename(mask)
    shutil.copy(mask, cat / "ground_truth" / "hole" / "007_mask.png")
    fails(
        trained.argv(dataset=tmp_path / "ds", project=tmp_path / "r"),
        capsys,
        "has no test image",
        str(cat / "ground_truth" / "hole" / "007_mask.png"),
    )
    assert not (tmp_path / "r").exists()


def test_corrupt_training_png(trained, tmp_path, capsys):
    cat = trained.copy_dataset(tmp_path / "ds")
    bad = cat / "train" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    fails(
        trained.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "cannot read image",
        str(bad),
    )
    emb = emb_dir(tmp_path)
    assert not any(emb.glob("*.faiss")) and not any(emb.glob(".*"))  # nothing half-written, no scratch left
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_truncated_test_png_leaves_no_result_folder(trained, tmp_path, capsys, workers):
    """Decoding fails inside the test DataLoader (in a worker process with --num_workers 1):
    still one line naming the file, and no version folder (complete or partial) is left."""
    cat = trained.copy_dataset(tmp_path / "ds")
    bad = cat / "test" / "scratch" / "000.png"
    bad.write_bytes(bad.read_bytes()[:300])
    project = tmp_path / "r"
    fails(
        trained.argv("--num_workers", workers, dataset=tmp_path / "ds", project=project),
        capsys,
        "cannot read image",
        str(bad),
        "truncated",
    )
    assert list(logs_dir(project).iterdir()) == []
    assert not (project / "score_result.csv").exists()


def test_mask_of_other_size(trained, tmp_path, capsys):
    cat = trained.copy_dataset(tmp_path / "ds")
    mask = cat / "ground_truth" / "stain" / "000_mask.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(mask)
    project = tmp_path / "r"
    fails(
        trained.argv(dataset=tmp_path / "ds", project=project),
        capsys,
        str(mask),
        "48x32",
        str(cat / "test" / "stain" / "000.png"),
    )
    assert not project.exists()  # found from the file headers, before any stage


def test_grayscale_16bit_and_rgba_images_are_accepted(trained, tmp_path, capsys):
    cat = trained.copy_dataset(tmp_path / "ds")
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
    assert tcd.main(trained.argv(dataset=tmp_path / "ds", project=project)) == 0
    sample = logs_dir(project) / "version_0" / "sample"
    for name in ("good_000", "hole_000"):
        image = np.load(sample / f"{name}.npy")
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    reference = np.load(logs_dir(trained.project) / "version_0" / "sample" / "scratch_000_gt.npy")
    assert np.array_equal(np.load(sample / "scratch_000_gt.npy"), reference) and reference.any()


# ---------------------------------------------------------------- artefacts and flags


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--imagesize", "32", "--resize", "32"], ["--imagesize 32 (saved: 64)", "--train_coreset"]),
        (["--target_embed_dimension", "16"], ["--target_embed_dimension 16 (saved: 32)"]),
        (["--dist_padding", "1"], ["neighbourhood model", "--dist_padding 1 (saved: 2)"]),
    ],
)
def test_artefacts_made_with_other_settings_are_refused(trained, tmp_path, capsys, extra, fragments):
    project = tmp_path / "r"
    if extra[0] == "--dist_padding":
        shutil.copy(trained.emb / "best_model_dp2_dcs16_n3.pt", trained.emb / "best_model_dp1_dcs16_n3.pt")
    try:
        fails(trained.argv(*extra, project=project), capsys, str(trained.emb), *fragments)
    finally:
        (trained.emb / "best_model_dp1_dcs16_n3.pt").unlink(missing_ok=True)
    assert not project.exists()


def test_shape_checks_without_settings_files(trained, tmp_path, capsys):
    """Settings records removed (as for the original's artefacts): the shapes still catch
    another --target_embed_dimension or --imagesize, before anything is written."""
    emb = trained.copy_artefacts(tmp_path)
    for p in emb.glob("*.json"):
        p.unlink()
    project = tmp_path / "r"
    fails(
        trained.argv("--target_embed_dimension", "16", emb_root=tmp_path, project=project),
        capsys,
        "32-dim features",
        "--target_embed_dimension is 16",
        str(emb),
    )
    fails(
        trained.argv("--imagesize", "32", "--resize", "32", emb_root=tmp_path, project=project),
        capsys,
        "best_model_dp2_dcs16_n3.pt",
        "--imagesize 32 (saved: 64)",
    )  # the checkpoint's own record
    # an original-style checkpoint (argparse Namespace, no image size): the grid check remains
    ckpt = emb / "best_model_dp2_dcs16_n3.pt"
    state = torch.load(ckpt, weights_only=True)
    original_args = argparse.Namespace(
        **{k: v for k, v in state["settings"].items() if k not in ("imagesize", "resize", "coreset_digest")}
    )
    torch.save({"model": state["model"], "args": original_args, "train_loss": 1.0, "val_loss": 1.0}, ckpt)
    fails(
        trained.argv("--imagesize", "48", "--resize", "48", emb_root=tmp_path, project=project),
        capsys,
        "cover 64 grid positions",
        "--imagesize 48",
        "6x6",
    )
    fails(
        trained.argv("--imagesize", "32", "--resize", "32", emb_root=tmp_path, project=project),
        capsys,
        "--imagesize 32 gives a 4x4 grid, too small for --patchsize 5",
    )
    assert not project.exists()  # refused before any output folder is made


def test_artefacts_of_another_backbone_are_refused(trained, tmp_path, capsys):
    emb = trained.copy_artefacts(tmp_path, backbone="R34")  # copied by hand into the R34 folder
    argv = trained.argv(emb_root=tmp_path, project=tmp_path / "r")
    argv[argv.index("--backbone") + 1] = "R34"
    fails(argv, capsys, "--backbone R34 (saved: R18)", str(emb))
    for p in emb.glob("*.json"):
        p.unlink()
    # without any settings file the checkpoint's own record still tells
    fails(argv, capsys, "neighbourhood model", "best_model_dp2_dcs16_n3.pt", "--backbone R34 (saved: R18)")


def test_replaced_coreset_file_is_refused(trained, tmp_path, capsys):
    emb = trained.copy_artefacts(tmp_path)
    path = emb / "embedding_coreset_index_25.faiss"
    vectors = cs.index_vectors(cs.load_index(path))
    cs.save_index(cs.build_index(vectors[::-1].copy()), path)
    fails(trained.argv(emb_root=tmp_path, project=tmp_path / "r"), capsys, "coreset files", str(emb), "--train_coreset")
    # the other stages record which coresets they were made from
    coreset_json = emb / "coreset_settings.json"
    coreset_json.unlink()
    fails(
        trained.argv(emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "position priors",
        "other coresets",
        "--train_coor_dist",
    )


@pytest.mark.parametrize(
    "name,flag",
    [
        ("dist_coreset_index_16.faiss", "--train_coreset"),
        ("best_model_dp2_dcs16_n3.pt", "--train_nb_dist"),
        ("coor_model_sp25_with_edge.npy", "--train_coor_dist"),
    ],
)
def test_missing_artefact_without_train_flag(trained, tmp_path, capsys, name, flag):
    emb = trained.copy_artefacts(tmp_path)
    (emb / name).unlink()
    fails(trained.argv(emb_root=tmp_path, project=tmp_path / "r"), capsys, str(emb / name), flag)
    assert not (tmp_path / "r").exists()


def test_no_artefacts_at_all(trained, tmp_path, capsys):
    fails(trained.argv(emb_root=tmp_path, project=tmp_path / "r"), capsys, "missing coreset", "--train_coreset")
    assert list(tmp_path.iterdir()) == []  # not even an empty artefact folder


def test_corrupt_artefacts(trained, tmp_path, capsys):
    emb = trained.copy_artefacts(tmp_path)
    (emb / "best_model_dp2_dcs16_n3.pt").write_bytes(b"not a checkpoint")
    fails(
        trained.argv(emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "cannot read neighbourhood model",
        "best_model_dp2_dcs16_n3.pt",
    )
    (emb / "embedding_coreset_index_25.faiss").write_bytes(b"garbage")
    fails(
        trained.argv(emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "cannot read coreset",
        "embedding_coreset_index_25.faiss",
    )


def test_empty_position_prior_is_one_line(trained, tmp_path, capsys):
    emb = trained.copy_artefacts(tmp_path)
    priors = sorted(emb.glob("*.npy"))
    assert priors
    priors[0].write_bytes(b"")  # numpy raises EOFError for an empty .npy
    fails(
        trained.argv(emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "cannot read position prior",
        priors[0].name,
        "empty",
    )


def test_unwritable_output_folders(trained, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    fails(
        trained.argv(project=blocker / "result"),
        capsys,
        "cannot create output folder",
        str(blocker / "result"),
        "--project_root_path",
        "is a file",
    )
    fails(
        trained.argv(*TRAIN, emb_root=blocker / "emb"),
        capsys,
        "cannot create output folder",
        str(blocker / "emb"),
        "--embedding_root_path",
    )
    assert blocker.read_text() == "not a folder"


def test_score_table_with_foreign_header_is_refused_before_scoring(trained, tmp_path, capsys):
    project = tmp_path / "r"
    project.mkdir()
    (project / "score_result.csv").write_text("something,else\n1,2\n")
    fails(trained.argv(project=project), capsys, str(project / "score_result.csv"), "header")
    assert not logs_dir(project).exists() or list(logs_dir(project).iterdir()) == []


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


# ---------------------------------------------------------------- analysis scripts


@pytest.fixture(scope="module")
def ravel_folder(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ravel")
    assert (
        load_cli("calc_ensemble_score").main(
            [
                "--project_root_path",
                str(trained.project),
                "--ensemble_root_path",
                str(out / "ens"),
                "--category",
                CAT,
                "--backbone_list",
                "R18",
                "--version_num",
                "1",
            ]
        )
        == 0
    )
    assert (
        load_cli("convert_result_format").main(
            ["--before_result_root_dir", str(out / "ens"), "--after_result_root_dir", str(out / "ravel")]
        )
        == 0
    )
    return out / "ravel"


def test_ravel_folder_with_a_missing_file(ravel_folder, tmp_path, capsys):
    rav = tmp_path / "ravel"
    shutil.copytree(ravel_folder, rav)
    (rav / "00002_gt.png").unlink()
    fails(
        ["--project_root_path", str(rav), "--calc_pro"],
        capsys,
        str(rav / "00002_gt.png"),
        main=load_cli("analysis_amap").main,
    )
    assert not (rav / "score_result.csv").exists()
    shutil.copy(ravel_folder / "00002_gt.png", rav / "00002_gt.png")
    (rav / "image00003.png").unlink()  # only needed for --visualize: checked before any picture is drawn
    fails(
        ["--project_root_path", str(rav), "--visualize"],
        capsys,
        str(rav / "image00003.png"),
        main=load_cli("analysis_amap").main,
    )
    assert not (rav / "viz").exists() and not (rav / "score_result.csv").exists()
    assert load_cli("analysis_amap").main(["--project_root_path", str(rav)]) == 0


def test_ensemble_and_convert_errors_write_nothing(trained, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    fails(
        [
            "--project_root_path",
            str(trained.project),
            "--ensemble_root_path",
            str(blocker / "ens"),
            "--category",
            CAT,
            "--backbone_list",
            "R18",
        ],
        capsys,
        str(blocker),
        main=load_cli("calc_ensemble_score").main,
    )
    fails(
        [
            "--project_root_path",
            str(trained.project),
            "--ensemble_root_path",
            str(tmp_path / "ens"),
            "--category",
            CAT,
            "--backbone_list",
            "R18",
            "R34",
        ],
        capsys,
        "R34",
        main=load_cli("calc_ensemble_score").main,
    )
    assert not (tmp_path / "ens").exists()
    ens = tmp_path / "ens"
    assert (
        load_cli("calc_ensemble_score").main(
            [
                "--project_root_path",
                str(trained.project),
                "--ensemble_root_path",
                str(ens),
                "--category",
                CAT,
                "--backbone_list",
                "R18",
            ]
        )
        == 0
    )
    missing = ens / CAT / "test" / "stain" / "000.png"
    missing.rename(tmp_path / "away.png")
    fails(
        ["--before_result_root_dir", str(ens), "--after_result_root_dir", str(tmp_path / "ravel")],
        capsys,
        str(missing),
        main=load_cli("convert_result_format").main,
    )
    assert not (tmp_path / "ravel").exists()
    (tmp_path / "away.png").rename(missing)
    fails(
        ["--before_result_root_dir", str(ens), "--after_result_root_dir", str(blocker / "ravel")],
        capsys,
        str(blocker),
        main=load_cli("convert_result_format").main,
    )


# ---------------------------------------------------------------- interruptions


def test_stage_interrupted_in_process_is_never_trusted(trained, tmp_path, capsys, monkeypatch):
    """Rebuilding coresets with another seed stops after the first coreset file: the old
    coreset_settings.json (other seed) must not make the mix of old and new files usable."""
    import pni.pipeline as pipeline

    emb = trained.copy_artefacts(tmp_path)

    def interrupt(point):
        if point == "coreset_index":
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "test_hook", interrupt)
    assert tcd.main(trained.argv(*TRAIN, "--seed", "23", emb_root=tmp_path, project=tmp_path / "r")) == 130
    capsys.readouterr()
    monkeypatch.undo()
    assert not any(p.name.startswith(".") for p in emb.iterdir())
    for seed in ("22", "23"):
        fails(
            trained.argv("--seed", seed, emb_root=tmp_path, project=tmp_path / "r"),
            capsys,
            "coresets",
            "incomplete",
            "--train_coreset",
        )


def test_killed_run_can_be_rerun_with_the_same_results(trained, tmp_path, capsys):
    """SIGKILL in the middle of the MLP stage (PNI_TEST_KILL_AT hook), then the same command
    again: it completes, and maps and scores equal those of the uninterrupted run."""
    project = tmp_path / "r"
    argv = trained.argv(*TRAIN, emb_root=tmp_path, project=project)
    env = {**os.environ, "PNI_TEST_KILL_AT": "nb_checkpoint", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_coreset_distribution.py")] + argv,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "PNI_TEST_KILL_AT=nb_checkpoint" in proc.stdout
    emb = emb_dir(tmp_path)
    assert (emb / "best_model_dp2_dcs16_n3.pt").is_file()  # a checkpoint of an unfinished training
    assert any(p.name.startswith(".scratch-") for p in emb.iterdir())  # removed by the re-run
    assert not logs_dir(project).exists()
    # without --train_nb_dist the half-trained model is refused, whatever else is there
    fails(
        trained.argv(emb_root=tmp_path, project=project), capsys, "neighbourhood model", "incomplete", "--train_nb_dist"
    )
    assert tcd.main(argv) == 0
    capsys.readouterr()
    assert [p.name for p in logs_dir(project).iterdir()] == ["version_0"]
    assert_same_results(logs_dir(trained.project) / "version_0", logs_dir(project) / "version_0")
    assert score_rows(project) == score_rows(trained.project)[:1]
    assert not any(p.name.startswith(".") for p in emb.iterdir())


def test_killed_test_stage_leaves_no_version_folder(trained, tmp_path, capsys):
    """SIGKILL after the first scored image: only a hidden partial folder remains, which the
    ensemble ignores; the next run publishes a complete version folder."""
    project = tmp_path / "r"
    env = {**os.environ, "PNI_TEST_KILL_AT": "test_sample", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_coreset_distribution.py")] + trained.argv(project=project),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = list(logs_dir(project).iterdir())
    assert len(left) == 1 and left[0].name.startswith(".version_0.partial-")
    fails(
        [
            "--project_root_path",
            str(project),
            "--ensemble_root_path",
            str(tmp_path / "ens"),
            "--category",
            CAT,
            "--backbone_list",
            "R18",
        ],
        capsys,
        "no test run found",
        main=load_cli("calc_ensemble_score").main,
    )
    assert tcd.main(trained.argv(project=project)) == 0
    capsys.readouterr()
    assert [p.name for p in logs_dir(project).iterdir()] == ["version_0"]  # the killed run's folder removed
    assert_same_results(logs_dir(trained.project) / "version_0", logs_dir(project) / "version_0")


# ---------------------------------------------------------------- determinism


def test_same_seed_same_maps_and_scores(trained, tmp_path, capsys):
    project = tmp_path / "r"
    assert tcd.main(trained.argv(*TRAIN, emb_root=tmp_path, project=project)) == 0
    capsys.readouterr()
    assert_same_results(logs_dir(trained.project) / "version_0", logs_dir(project) / "version_0")
    assert score_rows(project) == score_rows(trained.project)[:1]
    a, b = trained.emb, emb_dir(tmp_path)
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


# ---------------------------------------------------------------- no pickle


def test_reading_results_never_unpickles(trained, ravel_folder, monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    real_np_load = np.load

    def np_load(*args, **kwargs):
        if kwargs.get("allow_pickle"):
            refuse()
        return real_np_load(*args, **kwargs)

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(pickle, "_Unpickler", RefusingUnpickler)
    monkeypatch.setattr(np, "load", np_load)

    from pni import artefacts
    from pni.analysis import analyse
    from pni.distributions import load_mlp_checkpoint
    from pni.results import read_sample

    version = logs_dir(trained.project) / "version_0"
    rows = scores_of(version)[1:]
    for defect_type, stem, *_ in rows:
        sample = read_sample(version / "sample", defect_type, stem)
        assert sample["image"].shape == (64, 64, 3) and all(sample[m].shape == (64, 64) for m in MAPS)
    settings = settings_from_flags(parse_args(trained.argv()))
    coresets = artefacts.load_coresets(settings, trained.emb)
    artefacts.load_position_priors(settings, trained.emb, coresets)
    artefacts.load_neighbourhood_model(settings, trained.emb, coresets)
    assert "model" in load_mlp_checkpoint(trained.emb / "best_model_dp2_dcs16_n3.pt")
    rav = tmp_path / "ravel"
    shutil.copytree(ravel_folder, rav)
    assert analyse(rav, calc_pro=True, quiet=True)[-1]["category"] == "average"
    # and a whole test run that loads the saved artefacts
    assert tcd.main(trained.argv(project=tmp_path / "r")) == 0
    capsys.readouterr()


def test_checkpoint_refuses_pickled_code(tmp_path, capsys):
    """A checkpoint that would run code when unpickled is refused with one line, not run."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "best_model_dp2_dcs16_n3.pt"
    torch.save({"model": {}, "evil": Evil()}, path)
    from pni.distributions import load_mlp_checkpoint

    with pytest.raises(PNIError, match="cannot read neighbourhood model"):
        load_mlp_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
