"""Artefact compatibility: saved artefacts are used only with the settings, backbone, weights,
variant and training images they were made with (settings records, the checkpoint's own
record, shapes, coreset digests), original-format checkpoints are read as the original
layout, missing, corrupt or replaced files are refused with one line naming the file and the
flag that rebuilds it, and nothing is ever unpickled.

Through ``train_coreset_distribution.main`` with the session's shared tiny run
(``tiny_run``; copied where a case changes artefacts) and, for other weights, a tiny run
trained from a weights file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import MAPS, TRAIN, TinyRun, expect_one_error
from PIL import Image

import train_coreset_distribution as tcd
from pni import coreset as cs
from pni.config import parse_args, settings_from_flags
from pni.errors import PNIError


def save_weights(path: Path, seed: int) -> Path:
    """A ResNet-18 state dict of seed ``seed``: stands for an ImageNet weights file."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run_from_weights_file(tiny_run, tmp_path_factory) -> TinyRun:
    """The shared run's dataset and settings, the backbone read from a weights file (seed 1)."""
    root = tmp_path_factory.mktemp("from_weights")
    run = TinyRun(root, weights=save_weights(root / "weights_a.pth", seed=1))
    tiny_run.copy_dataset(run.ds)
    assert tcd.main(run.argv(*TRAIN)) == 0
    return run


# ---------------------------------------------------------------- settings records


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--imagesize", "32", "--resize", "32"], ["--imagesize 32 (saved: 64)", "--train_coreset"]),
        (["--target_embed_dimension", "16"], ["--target_embed_dimension 16 (saved: 32)"]),
        (["--dist_padding", "1"], ["neighbourhood model", "--dist_padding 1 (saved: 2)"]),
    ],
)
def test_artefacts_made_with_other_settings_are_refused(tiny_run, tmp_path, capsys, extra, fragments):
    emb = tiny_run.copy_artefacts(tmp_path)
    project = tmp_path / "r"
    if extra[0] == "--dist_padding":
        shutil.copy(emb / "best_model_dp2_dcs16_n3.pt", emb / "best_model_dp1_dcs16_n3.pt")
    expect_one_error(tcd.main, tiny_run.argv(*extra, emb_root=tmp_path, project=project), capsys, str(emb), *fragments)
    assert not project.exists()


def test_incompatible_artefacts_are_refused(tiny_run, capsys):
    assert tcd.main(tiny_run.argv("--dist_coreset_size", "8")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--dist_coreset_size 8" in err and "\n" not in err


def test_shape_checks_without_settings_files(tiny_run, tmp_path, capsys):
    """Settings records removed (as for the original's artefacts): the shapes still catch
    another --target_embed_dimension or --imagesize, before anything is written."""
    emb = tiny_run.copy_artefacts(tmp_path)
    for p in emb.glob("*.json"):
        p.unlink()
    project = tmp_path / "r"
    expect_one_error(
        tcd.main,
        tiny_run.argv("--target_embed_dimension", "16", emb_root=tmp_path, project=project),
        capsys,
        "32-dim features",
        "--target_embed_dimension is 16",
        str(emb),
    )
    expect_one_error(
        tcd.main,
        tiny_run.argv("--imagesize", "32", "--resize", "32", emb_root=tmp_path, project=project),
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
    expect_one_error(
        tcd.main,
        tiny_run.argv("--imagesize", "48", "--resize", "48", emb_root=tmp_path, project=project),
        capsys,
        "cover 64 grid positions",
        "--imagesize 48",
        "6x6",
    )
    expect_one_error(
        tcd.main,
        tiny_run.argv("--imagesize", "32", "--resize", "32", emb_root=tmp_path, project=project),
        capsys,
        "--imagesize 32 gives a 4x4 grid, too small for --patchsize 5",
    )
    assert not project.exists()  # refused before any output folder is made


def test_variant_and_workers_are_recorded(tiny_run):
    settings = json.loads((tiny_run.version / "settings.json").read_text())
    assert settings["variant"] == "original" and settings["mask_workers"] == 8
    with open(tiny_run.project / "score_result.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["variant"] == "original" and row["mask_workers"] == "8"
    assert json.loads((tiny_run.emb / "nb_settings.json").read_text())["variant"] == "original"
    ckpt = torch.load(tiny_run.emb / "best_model_dp2_dcs16_n3.pt", weights_only=True)
    assert ckpt["settings"]["variant"] == "original"


def test_model_of_the_other_variant_is_refused(tiny_run, capsys):
    assert tcd.main(tiny_run.argv("--variant", "paper")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--variant" in err and "\n" not in err


def test_original_format_checkpoint_is_the_original_layout(tiny_run, tmp_path, capsys):
    """A checkpoint as the published code writes it (an argparse Namespace, no layout) is taken
    as the original window layout: accepted under --variant original, refused under paper."""
    dst = tiny_run.copy_artefacts(tmp_path)
    (dst / "nb_settings.json").unlink()
    ours = torch.load(dst / "best_model_dp2_dcs16_n3.pt", weights_only=True)
    namespace = argparse.Namespace(
        backbone="R18",
        layer_index=["layer2", "layer3"],
        pretrain_embed_dimension=48,
        target_embed_dimension=32,
        patchsize=5,
        dist_padding=2,
        dist_coreset_size=16,
        num_layers=3,
        seed=0,
    )
    torch.save(
        {"model": ours["model"], "args": namespace, "train_loss": 1.0, "val_loss": 1.0},
        dst / "best_model_dp2_dcs16_n3.pt",
    )
    moved = tiny_run.argv(emb_root=tmp_path, project=tmp_path / "result")
    assert tcd.main(moved) == 0
    capsys.readouterr()
    assert tcd.main(moved + ["--variant", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert "original window layout" in err and "--variant" in err and "\n" not in err


# ---------------------------------------------------------------- another set-up


def test_artefacts_of_another_backbone_are_refused(tiny_run, tmp_path, capsys):
    emb = tiny_run.copy_artefacts(tmp_path, backbone="R34")  # copied by hand into the R34 folder
    argv = tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r")
    argv[argv.index("--backbone") + 1] = "R34"
    expect_one_error(tcd.main, argv, capsys, "--backbone R34 (saved: R18)", str(emb))
    for p in emb.glob("*.json"):
        p.unlink()
    # without any settings file the checkpoint's own record still tells
    expect_one_error(
        tcd.main, argv, capsys, "neighbourhood model", "best_model_dp2_dcs16_n3.pt", "--backbone R34 (saved: R18)"
    )


def test_artefacts_of_other_weights_dtype_or_training_images_are_refused(run_from_weights_file, tmp_path, capsys):
    run = run_from_weights_file
    project = tmp_path / "r"
    other = save_weights(tmp_path / "weights_b.pth", seed=2)
    expect_one_error(
        tcd.main, run.argv(project=project, weights=other), capsys, "--backbone_weights", "other weights", str(run.emb)
    )
    expect_one_error(
        tcd.main,
        TinyRun(run.root).argv(project=project),  # the same folders with --random_init, no weights file
        capsys,
        "--backbone_weights (other weights: random_init",
        "--random_init True (saved: False)",
    )
    expect_one_error(
        tcd.main,
        run.argv("--feature_bank_dtype", "float16", project=project),
        capsys,
        "--feature_bank_dtype float16 (saved: float32)",
    )
    cat = run.copy_dataset(tmp_path / "ds")
    image = cat / "train" / "good" / "001.png"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image, compress_level=0)  # other size
    expect_one_error(
        tcd.main,
        run.argv(dataset=tmp_path / "ds", project=project),
        capsys,
        "--dataset_path (other training images",
        "--train_coreset",
    )
    assert not project.exists()


# ---------------------------------------------------------------- missing, corrupt or replaced files


def test_replaced_coreset_file_is_refused(tiny_run, tmp_path, capsys):
    emb = tiny_run.copy_artefacts(tmp_path)
    path = emb / "embedding_coreset_index_25.faiss"
    vectors = cs.index_vectors(cs.load_index(path))
    cs.save_index(cs.build_index(vectors[::-1].copy()), path)
    argv = tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r")
    expect_one_error(tcd.main, argv, capsys, "coreset files", str(emb), "--train_coreset")
    # the other stages record which coresets they were made from
    coreset_json = emb / "coreset_settings.json"
    coreset_json.unlink()
    expect_one_error(tcd.main, argv, capsys, "position priors", "other coresets", "--train_coor_dist")


@pytest.mark.parametrize(
    "name,flag",
    [
        ("dist_coreset_index_16.faiss", "--train_coreset"),
        ("best_model_dp2_dcs16_n3.pt", "--train_nb_dist"),
        ("coor_model_sp25_with_edge.npy", "--train_coor_dist"),
    ],
)
def test_missing_artefact_without_train_flag(tiny_run, tmp_path, capsys, name, flag):
    emb = tiny_run.copy_artefacts(tmp_path)
    (emb / name).unlink()
    expect_one_error(tcd.main, tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r"), capsys, str(emb / name), flag)
    assert not (tmp_path / "r").exists()


def test_no_artefacts_at_all(tiny_run, tmp_path, capsys):
    expect_one_error(
        tcd.main, tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r"), capsys, "missing coreset", "--train_coreset"
    )
    assert list(tmp_path.iterdir()) == []  # not even an empty artefact folder


def test_corrupt_artefacts(tiny_run, tmp_path, capsys):
    emb = tiny_run.copy_artefacts(tmp_path)
    argv = tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r")
    (emb / "best_model_dp2_dcs16_n3.pt").write_bytes(b"not a checkpoint")
    expect_one_error(tcd.main, argv, capsys, "cannot read neighbourhood model", "best_model_dp2_dcs16_n3.pt")
    (emb / "embedding_coreset_index_25.faiss").write_bytes(b"garbage")
    expect_one_error(tcd.main, argv, capsys, "cannot read coreset", "embedding_coreset_index_25.faiss")


def test_empty_position_prior_is_one_line(tiny_run, tmp_path, capsys):
    emb = tiny_run.copy_artefacts(tmp_path)
    priors = sorted(emb.glob("*.npy"))
    assert priors
    priors[0].write_bytes(b"")  # numpy raises EOFError for an empty .npy
    expect_one_error(
        tcd.main,
        tiny_run.argv(emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "cannot read position prior",
        priors[0].name,
        "empty",
    )


# ---------------------------------------------------------------- no pickle


def test_reading_results_never_unpickles(tiny_run, tiny_ravel, monkeypatch, tmp_path, capsys):
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

    version = tiny_run.version
    with open(version / "image_scores.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    for defect_type, stem, *_ in rows:
        sample = read_sample(version / "sample", defect_type, stem)
        assert sample["image"].shape == (64, 64, 3) and all(sample[m].shape == (64, 64) for m in MAPS)
    settings = settings_from_flags(parse_args(tiny_run.argv()))
    coresets = artefacts.load_coresets(settings, tiny_run.emb)
    artefacts.load_position_priors(settings, tiny_run.emb, coresets)
    artefacts.load_neighbourhood_model(settings, tiny_run.emb, coresets)
    assert "model" in load_mlp_checkpoint(tiny_run.emb / "best_model_dp2_dcs16_n3.pt")
    rav = tmp_path / "ravel"
    shutil.copytree(tiny_ravel, rav)
    assert analyse(rav, calc_pro=True, quiet=True)[-1]["category"] == "average"
    # and a whole test run that loads the saved artefacts
    assert tcd.main(tiny_run.argv(project=tmp_path / "r")) == 0
    capsys.readouterr()


def test_checkpoint_with_pickled_code_is_refused_in_one_short_line(tmp_path):
    """A checkpoint that would run code when unpickled is refused with one line, not run."""
    from pni.distributions import load_mlp_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "best_model_dp2_dcs16_n3.pt"
    torch.save({"model": {}, "evil": Evil()}, path)
    with pytest.raises(PNIError, match="cannot read neighbourhood model") as exc:
        load_mlp_checkpoint(path)
    message = str(exc.value)
    assert message.startswith(f"cannot read neighbourhood model {path}: it holds a Python object (")
    assert "system" in message and "refused" in message and "\n" not in message and len(message) < 300
    assert "weights_only" not in message and not (tmp_path / "pwned").exists()
