"""The built-in ``board/moved`` defect is one that only position information catches, at the
demo's own settings (issue 12): plain PatchCore is close to chance on it, the position map
(``coor``) and ``nb_coor`` separate it from the normal images with room to spare.

The settings are read from scripts/demo.sh, so a change of the demo's settings, of the
generator or of the scoring that loses the property fails here. One seeded run of the
whole pipeline on the board category (16 training images, 8 + 8 test images)."""

import csv
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pni.config import parse_args, settings_from_flags
from pni.data.synthetic import make_dataset
from pni.pipeline import run

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"


def demo_flags() -> list[str]:
    """The demo's PNI settings: the ``PNI_FLAGS=( ... )`` array of scripts/demo.sh."""
    found = re.search(r"^PNI_FLAGS=\((.*?)\)", DEMO.read_text(), re.S | re.M)
    assert found, "scripts/demo.sh should define its settings as PNI_FLAGS=( ... )"
    return shlex.split(found.group(1))


@pytest.fixture(scope="module")
def board_scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    make_dataset(root / "ds", num_train=16, num_test_per_type=8, categories=["board"])
    settings = settings_from_flags(
        parse_args(
            ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]
            + demo_flags()
            + [
                "--dataset_path",
                str(root / "ds"),
                "--category",
                "board",
                "--project_root_path",
                str(root / "result"),
                "--embedding_root_path",
                str(root),
                "--random_init",
                "--accelerator",
                "cpu",
            ]
        )
    )
    result = run(settings)
    with open(Path(result["version_dir"]) / "image_scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = np.array([int(r["label"]) for r in rows])
    assert labels.sum() == 8 and len(labels) == 16
    return labels, {m: np.array([float(r[m]) for r in rows]) for m in ("coor", "patchcore", "nb_coor")}


def test_plain_patchcore_hardly_sees_the_moved_component(board_scores):
    labels, scores = board_scores
    assert roc_auc_score(labels, scores["patchcore"]) <= 0.72  # issue 12 asks <= 0.75


@pytest.mark.parametrize("name", ["coor", "nb_coor"])
def test_the_position_maps_catch_every_moved_component_with_a_margin(board_scores, name):
    labels, scores = board_scores
    assert roc_auc_score(labels, scores[name]) == 1.0  # issue 12 asks >= 0.95
    # every moved component scores at least 1.5x the highest normal image
    assert scores[name][labels == 1].min() >= 1.5 * scores[name][labels == 0].max()


def test_the_demo_passes_its_settings_array_to_every_category():
    flags = demo_flags()
    assert "--layer_index" in flags and not any("$" in f for f in flags)
    assert '"${PNI_FLAGS[@]}"' in DEMO.read_text().split("train_coreset_distribution.py", 1)[1].split("done", 1)[0]
