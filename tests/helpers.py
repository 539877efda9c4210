"""Test infrastructure shared by the test files: the tiny run's flags, the run wrapper
(:class:`TinyRun`), the one-error-line check of a CLI (:func:`expect_one_error`), a folder's
snapshot (:func:`snapshot_tree`) and the analysis CLIs."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "texture"


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


def path_flags(dataset: Path, root: Path, category: str = CATEGORY, project: Path | None = None) -> list[str]:
    """The data and output flags of a run on ``category`` of ``dataset``, writing artefacts
    under ``root`` and results to ``project`` (default ``root/result``)."""
    return [
        "--dataset_path",
        str(dataset),
        "--category",
        category,
        "--project_root_path",
        str(project if project is not None else root / "result"),
        "--embedding_root_path",
        str(root),
    ]


TRAIN = ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]
MAPS = ("nb", "coor", "patchcore", "nb_coor")


def artefact_dir(emb_root: Path, backbone: str = "R18", category: str = CATEGORY) -> Path:
    """Where a run with ``--embedding_root_path emb_root`` keeps its artefacts."""
    return emb_root / "embeddings_layer2+layer3" / category / backbone


def logs_dir(project: Path, backbone: str = "R18", category: str = CATEGORY) -> Path:
    """Where a run with ``--project_root_path project`` puts its ``version_N`` folders."""
    return project / category / backbone / "anomaly" / "lightning_logs"


class TinyRun:
    """A tiny run on the ``texture`` category and its folders under ``root``: the dataset
    (``ds``), the artefacts (``emb``), the test run's results (``project``, ``version``) and,
    when exported, the bundle. Trained from ``weights`` (a ResNet-18 state dict file) when
    given, else from a random initialisation (``--random_init``).

    The session's shared run (conftest fixture ``tiny_run``) is read-only: a test that
    changes files copies what it changes first (:meth:`copy_to`, :meth:`copy_dataset`,
    :meth:`copy_artefacts`, :meth:`copy_project`)."""

    def __init__(self, root: Path, weights: Path | None = None) -> None:
        self.root = root
        self.weights = weights

    @property
    def ds(self) -> Path:
        return self.root / "ds"

    @property
    def project(self) -> Path:
        return self.root / "result"

    @property
    def emb(self) -> Path:
        return artefact_dir(self.root)

    @property
    def logs(self) -> Path:
        return logs_dir(self.project)

    @property
    def version(self) -> Path:
        return self.logs / "version_0"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def calibration(self) -> Path:
        """10 good images the model never saw (another seed of the built-in dataset)."""
        return self.root / "more" / CATEGORY / "test" / "good"

    def argv(
        self,
        *extra: str,
        dataset: Path | None = None,
        emb_root: Path | None = None,
        project: Path | None = None,
        weights: Path | None = None,
    ) -> list[str]:
        """The command line of this run (``TINY``'s settings), ``extra`` flags last; the
        keywords put the dataset, artefacts, results or backbone weights elsewhere."""
        weights = weights or self.weights
        return (
            path_flags(dataset or self.ds, emb_root or self.root, project=project or self.project)
            + tiny_flags(random_init=weights is None)
            + (["--backbone_weights", str(weights)] if weights else [])
            + list(extra)
        )

    def copy_to(self, dest: Path) -> TinyRun:
        """A writable copy of the whole run under ``dest``."""
        shutil.copytree(self.root, dest)
        return TinyRun(dest, self.weights)

    def copy_dataset(self, dest: Path) -> Path:
        """Copy the dataset to ``dest``; returns the category folder ``dest/texture``."""
        shutil.copytree(self.ds, dest)
        return dest / CATEGORY

    def copy_artefacts(self, dest_root: Path, backbone: str = "R18") -> Path:
        """Copy the artefacts to ``dest_root``'s artefact folder of ``backbone``; returns it."""
        dest = artefact_dir(dest_root, backbone)
        shutil.copytree(self.emb, dest)
        return dest

    def copy_project(self, dest: Path) -> Path:
        """Copy the results (``--project_root_path``) to ``dest``; returns ``dest``."""
        shutil.copytree(self.project, dest)
        return dest

    def predict_argv(self, bundle: Path, output: Path, *extra: str) -> list[str]:
        """predict.py on the good test images with the bundle ``bundle``, writing to ``output``."""
        test_good = self.ds / CATEGORY / "test" / "good"
        flags = ["--model", str(bundle), "--input", str(test_good), "--output", str(output), "--accelerator", "cpu"]
        return flags + list(extra)


def expect_one_error(main: Callable[[list[str]], int], argv: Sequence[str], capsys, *fragments: str) -> str:
    """Run a CLI ``main`` that must fail: exit code 2 (returned or argparse's SystemExit),
    exactly one stderr line starting ``error:`` and holding every fragment, no traceback on
    stderr or stdout. Returns that line."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2, captured.err
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot_tree(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` ('' for a folder); empty when
    ``path`` does not exist. Equal snapshots: the same names, folders and bytes."""
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(path.rglob("*"))
    }


def score_rows(project: Path) -> list[dict[str, str]]:
    """The rows of ``project/score_result.csv`` without their ``version`` column."""
    with open(project / "score_result.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "version"} for r in csv.DictReader(fh)]


def assert_same_results(dir_a: Path, dir_b: Path) -> None:
    """Two test runs of the shared tiny run's dataset saved the same arrays (every
    ``sample/*.npy``, dtype and bits) and the same ``image_scores.csv``."""
    import numpy as np

    def arrays(version_dir: Path) -> dict:
        return {p.name: np.load(p, allow_pickle=False) for p in sorted((version_dir / "sample").glob("*.npy"))}

    def table(version_dir: Path) -> list[list[str]]:
        with open(version_dir / "image_scores.csv", newline="") as fh:
            return list(csv.reader(fh))

    a, b = arrays(dir_a), arrays(dir_b)
    assert a.keys() == b.keys() and len(a) == 8 * 6  # 8 test images x (image, gt, 4 maps)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert table(dir_a) == table(dir_b)


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
