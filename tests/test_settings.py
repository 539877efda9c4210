"""Typed settings (pni.config): the flags' defaults (the original's) and old names, the
settings built once from the flags, their flat flag view (what the settings records hold),
the derived window facts, the bundle manifest's settings sections, the MLP-size check, the
DDP merge of test rows and the streaming CSV writer."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from pni.bundle import manifest_settings, settings_from_manifest
from pni.config import (
    FeatureSettings,
    InputDigests,
    NeighbourhoodSettings,
    build_export_parser,
    build_parser,
    build_predict_parser,
    export_settings_from_flags,
    parse_args,
    predict_settings_from_flags,
    settings_from_flags,
)
from pni.distributed import gather_by_index
from pni.distributions import NeighbourhoodMLP, window_count
from pni.errors import PNIError
from pni.features import patch_padding
from pni.io import CsvStream
from pni.scoring import ScoringConfig

FLAGS = [
    "--dataset_path",
    "/data/mvtec",
    "--category",
    "screw",
    "--backbone",
    "R18",
    "--layer_index",
    "layer2",
    "layer3",
    "--patchsize",
    "3",
    "--dist_padding",
    "2",
    "--variant",
    "paper",
    "--max_train_images",
    "7",
    "--devices",
    "1",
    "--train_nb_dist",
]


def test_flat_view_is_the_parsed_flags():
    """Settings.flags() holds every parsed flag under its name with its value (what
    settings.json held when it was written from the flags themselves), plus ``ddp``."""
    args = parse_args(FLAGS)
    flags = settings_from_flags(args).flags()
    assert flags == {**vars(args), "ddp": False}
    assert flags["layer_index"] == ["layer2", "layer3"] and flags["max_train_images"] == 7
    assert flags["variant"] == "paper" and flags["train_nb_dist"] is True and flags["devices"] == "1"


def test_digests_and_ddp_are_set_by_replacing():
    settings = settings_from_flags(parse_args(FLAGS))
    assert "training_set_digest" not in settings.flags()
    later = dataclasses.replace(
        settings,
        digests=InputDigests("random_init", "abc123"),
        runtime=dataclasses.replace(settings.runtime, ddp=True, strategy="ddp"),
    )
    flags = later.flags()
    assert flags["backbone_weights_digest"] == "random_init" and flags["training_set_digest"] == "abc123"
    assert flags["ddp"] is True and flags["strategy"] == "ddp"
    assert settings.flags()["ddp"] is False  # the original is untouched (frozen)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1  # type: ignore[misc]


def test_groups_and_derived_values():
    s = settings_from_flags(parse_args(FLAGS))
    assert s.features.layers == ("layer2", "layer3") and s.features.pad == 1
    assert s.neighbourhood.window_count == 24 and s.neighbourhood.input_size(32) == 24 * 32
    assert s.neighbourhood.dropped_slot == 12  # paper: the centre of the 5x5 window
    assert dataclasses.replace(s.neighbourhood, variant="original").dropped_slot == 13  # its right neighbour
    assert s.scoring == ScoringConfig(patchsize=3, variant="paper", imagesize=480, chunk_size=None)
    assert s.embedding_dir == Path("./embeddings_layer2+layer3/screw/R18")
    assert s.coreset.file_names["distribution"] == "dist_coreset_index_2048.faiss"
    assert s.coreset.file_names["with_edge"] == "embedding_coreset_index_1_with_edge.faiss"
    assert [patch_padding(p) for p in (1, 3, 5, 7)] == [0, 1, 2, 3]
    assert [window_count(dp) for dp in (1, 2, 4)] == [8, 24, 80]


def test_settings_that_disagree_are_refused():
    s = settings_from_flags(parse_args(FLAGS))
    with pytest.raises(ValueError, match="patchsize"):
        dataclasses.replace(s, features=dataclasses.replace(s.features, patchsize=5))
    with pytest.raises(ValueError, match="variant"):
        dataclasses.replace(s, neighbourhood=dataclasses.replace(s.neighbourhood, variant="original"))


def test_export_and_predict_settings():
    args = parse_args(FLAGS + ["--output", "out", "--calibration_dir", "a", "b"], build_export_parser())
    export = export_settings_from_flags(args)
    assert export.output == "out" and export.calibration_dir == ("a", "b") and export.target_fpr == 0.01
    assert "output" not in settings_from_flags(args).flags()
    args = build_predict_parser().parse_args(
        ["--model", "m", "--input", "x.png", "dir", "--output", "o", "--map", "nb", "--image_threshold", "0.5"]
    )
    predict = predict_settings_from_flags(args)
    assert predict.inputs == ("x.png", "dir") and predict.map_name == "nb" and predict.image_threshold == "0.5"
    assert predict.batch_size is None and predict.accelerator == "auto"


# The "features", "neighbourhood" and "scoring" sections of a format-1 manifest.json as
# export_model.py wrote them before the settings were typed (keys and order included).
FORMAT_1_SECTIONS = json.loads(
    """{
  "features": {"backbone": "R18", "layers": ["layer2", "layer3"], "pretrain_embed_dimension": 48,
    "target_embed_dimension": 32, "patchsize": 5, "resize": 64, "imagesize": 64},
  "neighbourhood": {"dist_padding": 2, "window_layout": "original", "dropped_slot": 13, "num_layers": 3,
    "classes": 16},
  "scoring": {"anomaly_nn": 3, "patchsize": 5, "prob_gamma": 0.99, "softmax_temperature_alpha": 2.0,
    "softmax_nb_gamma": 0.5, "softmax_coor_gamma": 0.5, "variant": "original", "mask_workers": 8,
    "imagesize": 64, "blursigma": 1.0}
}"""
)


def test_manifest_sections_of_format_1_read_and_write_back_unchanged(tmp_path):
    features, neighbourhood, scoring = settings_from_manifest(FORMAT_1_SECTIONS, tmp_path / "manifest.json")
    assert features == FeatureSettings("R18", ("layer2", "layer3"), 48, 32, 5, 64, 64)
    assert neighbourhood == NeighbourhoodSettings(2, 3, "original")
    assert scoring == ScoringConfig(imagesize=64, blursigma=1.0, chunk_size=None)
    written = manifest_settings(features, neighbourhood, scoring, 16)
    assert json.dumps(written) == json.dumps(FORMAT_1_SECTIONS)  # same keys, order and values


def test_manifest_with_a_foreign_window_layout_is_refused(tmp_path):
    bad = json.loads(json.dumps(FORMAT_1_SECTIONS))
    bad["neighbourhood"]["dropped_slot"] = 12
    with pytest.raises(PNIError, match="window layout"):
        settings_from_manifest(bad, tmp_path / "manifest.json")


def test_mlp_fits_its_window_features_and_classes():
    mlp = NeighbourhoodMLP(8 * 6, 5, num_layers=3, hidden=16)  # dp 1: 3x3 window less one slot, E = 6
    assert mlp.in_features == 48 and mlp.num_classes == 5 and mlp.num_layers == 3
    assert mlp.fits(1, 6, 5)
    assert not mlp.fits(2, 6, 5) and not mlp.fits(1, 4, 5) and not mlp.fits(1, 6, 4)


def test_gather_by_index_without_a_process_group_orders_and_drops_repeats():
    assert gather_by_index([2, 0, 1, 0], ["c", "a", "b", "a again"]) == ["a", "b", "c"]


def test_csv_stream_writes_under_a_hidden_name_until_closed(tmp_path):
    target = tmp_path / "rows.csv"
    stream = CsvStream(target, ("a", "b"))
    stream.write([1, "x,y"])
    assert not target.exists()
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".rows.tmp-")]
    assert hidden == [stream.tmp] and stream.tmp.suffix == ".csv"
    stream.close()
    stream.close()  # harmless
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
    with open(target, newline="") as fh:
        assert list(csv.reader(fh)) == [["a", "b"], ["1", "x,y"]]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_csv_stream_keeps_every_complete_row_after_an_interruption(tmp_path):
    target = tmp_path / "rows.csv"
    with pytest.raises(KeyboardInterrupt):
        with CsvStream(target, ("i", "square")) as stream:
            for i in range(5):
                if i == 3:
                    raise KeyboardInterrupt
                stream.write([i, i * i])
    with open(target, newline="") as fh:
        assert list(csv.reader(fh)) == [["i", "square"], ["0", "0"], ["1", "1"], ["2", "4"]]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_every_flag_has_the_original_default():
    args = parse_args([])
    expected = dict(
        dataset_path="../dataset/MVTecAD",
        dataset_category="MVTec",
        project_root_path="./result",
        seed=22,
        backbone="WR101",
        layer_index=["layer2", "layer3"],
        pretrain_embed_dimension=1024,
        target_embed_dimension=1024,
        anomaly_nn=3,
        patchsize=5,
        subsampling_percentage=0.01,
        resize=512,
        imagesize=480,
        dist_coreset_size=2048,
        dist_padding=4,
        num_layers=10,
        num_epochs=15,
        learning_rate=1e-3,
        step_size=5,
        dist_batchsize=2048,
        softmax_temperature_alpha=2.0,
        prob_gamma=0.99,
        softmax_nb_gamma=0.5,
        softmax_coor_gamma=0.5,
        blursigma=8.0,
        variant="original",
        mask_workers=8,
        train_coreset=False,
        train_nb_dist=False,
        train_coor_dist=False,
    )
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    helps = [a.help for a in build_parser()._actions if a.dest != "help"]
    assert all(helps)


def test_old_nb_mask_flag_maps_to_variant(capsys):
    assert parse_args(["--nb_mask", "official"]).variant == "original"
    assert "--nb_mask official is the old name of --variant original" in capsys.readouterr().err
    args = parse_args(["--nb_mask", "paper", "--variant", "paper"])
    assert args.variant == "paper" and not hasattr(args, "nb_mask")
    assert parse_args(["--variant", "paper"]).variant == "paper"
