"""Test-wide settings (no network, caches in temporary folders, few threads, seeds) and the
session's shared tiny run.

``tiny_run`` is trained once and exported once per session (see :class:`helpers.TinyRun`
for its folders) and is read-only: a test that changes files copies them first
(``tiny_run.copy_to(tmp_path)`` and friends). Each test that uses it is checked not to have
changed a file of it (names, sizes and modification times), and at the end of the session
every byte is checked."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="pni-tests-")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_TMP, "mpl"))
os.environ["TORCH_HOME"] = os.path.join(_TMP, "torch")
os.environ.setdefault("XDG_CACHE_HOME", os.path.join(_TMP, "cache"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PNI_NO_NETWORK", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import CATEGORY, TRAIN, TinyRun, load_cli, snapshot_tree  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Iterator[TinyRun]:
    """The shared tiny run: the built-in ``texture`` category (4 training images, 2 test
    images per defect type and good), trained with ``TINY``'s settings (random backbone) and
    tested once (``version_0``), then exported to ``bundle`` with thresholds calibrated on 10
    good images it never saw (``calibration``) at a target false-positive rate of 25%."""
    import export_model
    import train_coreset_distribution as tcd
    from pni.data.synthetic import make_dataset

    run = TinyRun(tmp_path_factory.mktemp("tiny_run"))
    make_dataset(run.ds, num_train=4, num_test_per_type=2, image_size=64, categories=[CATEGORY])
    make_dataset(run.root / "more", num_train=1, num_test_per_type=10, image_size=64, seed=7, categories=[CATEGORY])
    assert tcd.main(run.argv(*TRAIN)) == 0
    export = run.argv("--output", str(run.bundle), "--calibration_dir", str(run.calibration), "--target_fpr", "0.25")
    assert export_model.main(export) == 0
    before = snapshot_tree(run.root)
    yield run
    changed = _changes(before, snapshot_tree(run.root))
    assert not changed, f"the shared tiny run was changed (copy it first): {changed}"


def _stat_tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(autouse=True)
def _tiny_run_unchanged(request):
    """Fails the test (at teardown) that changed a file of the shared run."""
    if "tiny_run" not in request.fixturenames:
        yield
        return
    root = request.getfixturevalue("tiny_run").root
    before = _stat_tree(root)
    yield
    changed = _changes(before, _stat_tree(root))
    assert not changed, f"this test changed the shared tiny run (copy it first): {changed}"


@pytest.fixture(scope="session")
def tiny_ravel(tiny_run, tmp_path_factory) -> Path:
    """The shared run's results as a ravel folder (calc_ensemble_score of R18 alone, then
    convert_result_format), read-only like the run."""
    out = tmp_path_factory.mktemp("tiny_ravel")
    project = tiny_run.copy_project(out / "result")  # the ensemble writes its table there
    ensemble = ["--project_root_path", str(project), "--ensemble_root_path", str(out / "ens")]
    ensemble += ["--category", CATEGORY, "--backbone_list", "R18", "--version_num", "1"]
    assert load_cli("calc_ensemble_score").main(ensemble) == 0
    convert = ["--before_result_root_dir", str(out / "ens"), "--after_result_root_dir", str(out / "ravel")]
    assert load_cli("convert_result_format").main(convert) == 0
    return out / "ravel"
