"""The built-in ``board/moved`` defect is one that only position information catches, at the
demo's own settings (issue 12): plain PatchCore is close to chance on it, the position map
(``coor``) and ``nb_coor`` separate it from the normal images with room to spare.

The flags are read from scripts/demo.sh, so a change of the demo's settings, of the
generator or of the scoring that loses the property fails here. One seeded run of the
whole pipeline on the board category (16 training images, 8 + 8 test images)."""
import csv
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pni.config import parse_args
from pni.data.synthetic import make_dataset
from pni.pipeline import run

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"
PATH_FLAGS = {"--dataset_path", "--category", "--project_root_path", "--embedding_root_path"}


def demo_flags() -> list[str]:
    """The flags scripts/demo.sh gives train_coreset_distribution.py, without the ones naming
    its folders, the category or shell arrays (weights, --verbose)."""
    text = DEMO.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if "train_coreset_distribution.py" in line]
    assert len(lines) == 1, "scripts/demo.sh should call train_coreset_distribution.py once"
    tokens = shlex.split(lines[0].split("train_coreset_distribution.py", 1)[1])
    flags: list[str] = []
    for token in tokens:
        if "$" in token:
            if flags and flags[-1] in PATH_FLAGS:
                flags.pop()
            continue
        flags.append(token)
    return flags


@pytest.fixture(scope="module")
def board_scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    make_dataset(root / "ds", num_train=16, num_test_per_type=8, categories=["board"])
    flags = demo_flags()
    assert "--layer_index" in flags and "--train_coreset" in flags  # the parse found the real command
    args = parse_args(flags + ["--dataset_path", str(root / "ds"), "--category", "board",
                               "--project_root_path", str(root / "result"), "--embedding_root_path", str(root),
                               "--random_init", "--accelerator", "cpu"])
    result = run(args)
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


def test_the_demo_flags_are_parsed_as_the_demo_passes_them():
    flags = demo_flags()
    assert flags[:3] == ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]
    assert not any("$" in f for f in flags) and not PATH_FLAGS & set(flags)
    assert re.fullmatch(r"\d+", flags[flags.index("--imagesize") + 1])
