"""Test infrastructure shared by the test files: the tiny run's flags and the analysis CLIs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def tiny_flags(backbone: str | None = "R18", random_init: bool = True, num_epochs: int = 2) -> list[str]:
    """A whole run in seconds: ResNet-18 at 64 px (an 8 x 8 grid), 32-dim features, a 3-layer
    MLP trained for ``num_epochs`` on 16 distribution entries. ``backbone`` None: no
    ``--backbone`` flag (the scripts give their own); ``random_init`` False: the caller gives
    ``--backbone_weights``."""
    return (
        (["--backbone", backbone] if backbone else [])
        + (["--random_init"] if random_init else [])
        + [
            "--resize",
            "64",
            "--imagesize",
            "64",
            "--pretrain_embed_dimension",
            "48",
            "--target_embed_dimension",
            "32",
            "-p",
            "0.25",
            "--dist_coreset_size",
            "16",
            "--dist_padding",
            "2",
            "--num_layers",
            "3",
            "--num_epochs",
            str(num_epochs),
            "--step_size",
            "1",
            "--dist_batchsize",
            "64",
            "--blursigma",
            "1",
            "--accelerator",
            "cpu",
        ]
    )


TINY = tiny_flags()


def path_flags(dataset: Path, root: Path, category: str = "texture") -> list[str]:
    """The data and output flags of a run on ``category`` of ``dataset``, writing results to
    ``root/result`` and artefacts under ``root``."""
    return [
        "--dataset_path",
        str(dataset),
        "--category",
        category,
        "--project_root_path",
        str(root / "result"),
        "--embedding_root_path",
        str(root),
    ]


TRAIN = ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]
MAPS = ("nb", "coor", "patchcore", "nb_coor")


def load_cli(name: str) -> ModuleType:
    """Import ``analysis_code/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "analysis_code" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aurocs_from_saved(version_dir: Path) -> dict[str, float]:
    """``{map}_P-AUROC`` and ``{map}_I-AUROC`` recomputed with scikit-learn from a test run's
    saved files alone: ``sample/{type}_{stem}_gt.npy`` and ``_amap_{map}.npy`` (all pixels of
    all images) and ``image_scores.csv`` (labels and image scores)."""
    import csv

    import numpy as np
    from sklearn.metrics import roc_auc_score

    with open(version_dir / "image_scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sample = version_dir / "sample"
    gt = np.stack([np.load(sample / f"{r['defect_type']}_{r['stem']}_gt.npy") for r in rows])
    labels = [int(r["label"]) for r in rows]
    assert labels == [int(r["defect_type"] != "good") for r in rows]
    out = {}
    for m in MAPS:
        maps = np.stack([np.load(sample / f"{r['defect_type']}_{r['stem']}_amap_{m}.npy") for r in rows])
        out[f"{m}_P-AUROC"] = roc_auc_score(gt.reshape(-1), maps.reshape(-1))
        out[f"{m}_I-AUROC"] = roc_auc_score(labels, [float(r[m]) for r in rows])
    return out
