"""Reliability, round two: names that would be paths, concurrent result rows, flag typos next
to a trained model, masks of any encoding, artefacts of another set-up, undefined metrics,
bounded blur memory, temporary files of killed runs, Ctrl-C at every stage, checks before
training, and the messages themselves.

Everything goes through the real entry points (a subprocess where exit codes, signals or
several processes matter). One tiny run trained from a weights file (module fixture)
provides the artefacts and results that most cases reuse.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import REPO, TRAIN, load_cli, tiny_flags
from PIL import Image
from scipy import ndimage

import train_coreset_distribution as tcd
from pni.data.datasets import build_datasets
from pni.data.synthetic import make_dataset
from pni.errors import PNIError
from pni.io import atomic_path, owner_tag, save_json

CAT = "texture"
TINY = tiny_flags(random_init=False)  # each run names its --backbone_weights
SCORES = [f"{m}_{k}" for m in ("nb", "coor", "patchcore", "nb_coor") for k in ("P-AUROC", "I-AUROC")]


def save_weights(path: Path, seed: int) -> Path:
    """A ResNet-18 state dict of seed ``seed``: stands for an ImageNet weights file."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def tree(path: Path) -> dict[str, bytes]:
    """Relative path -> bytes (folders: b'') of everything under ``path``."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"") for p in sorted(path.rglob("*"))}


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **extra}


class Run:
    """The trained fixture: dataset, weights file, artefacts and one test run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ds = root / "ds"
        self.weights = root / "weights_a.pth"
        self.project = root / "result"

    @property
    def emb(self) -> Path:
        return self.root / "embeddings_layer2+layer3" / CAT / "R18"

    def argv(
        self,
        *extra: str,
        dataset: Path | None = None,
        emb_root: Path | None = None,
        project: Path | None = None,
        weights: bool = True,
    ) -> list[str]:
        return (
            [
                "--dataset_path",
                str(dataset or self.ds),
                "--category",
                CAT,
                "--embedding_root_path",
                str(emb_root or self.root),
                "--project_root_path",
                str(project or self.project),
            ]
            + TINY
            + (["--backbone_weights", str(self.weights)] if weights else [])
            + list(extra)
        )

    def copy_artefacts(self, dest_root: Path) -> Path:
        dest = dest_root / "embeddings_layer2+layer3" / CAT / "R18"
        shutil.copytree(self.emb, dest)
        return dest

    def copy_dataset(self, dest: Path) -> Path:
        shutil.copytree(self.ds, dest)
        return dest / CAT


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("robustness")
    make_dataset(root / "ds", num_train=4, num_test_per_type=1, image_size=64, categories=[CAT])
    trained = Run(root)
    save_weights(trained.weights, seed=1)
    assert tcd.main(trained.argv(*TRAIN)) == 0
    return trained


def call(main, argv, capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of a CLI ``main`` (argparse's SystemExit included)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(main, argv, capsys, *fragments: str) -> str:
    """The CLI must exit 2 with exactly one ``error:`` line holding every fragment, no traceback."""
    code, out, err = call(main, argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- 1. names that would be paths


def test_category_that_is_a_path_is_refused_before_anything_is_written(run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    shutil.copytree(run.ds / CAT, foreign)  # holds train/good: a usable "category"
    before = tree(tmp_path)
    for name in ("../foreign", str(foreign), ".."):
        argv = run.argv(*TRAIN, emb_root=tmp_path / "emb", project=tmp_path / "res")
        argv[argv.index("--category") + 1] = name
        one_error(tcd.main, argv, capsys, "--category", name)
    assert tree(tmp_path) == before
    with pytest.raises(PNIError, match="--category"):
        build_datasets("MVTec", run.ds, "../foreign")


def test_ensemble_refuses_path_like_names(run, tmp_path, capsys):
    ensemble = load_cli("calc_ensemble_score").main
    project = tmp_path / "project"
    shutil.copytree(run.project, project)
    ens = tmp_path / "deep" / "ens"
    one_error(
        ensemble,
        [
            "--project_root_path",
            str(project),
            "--ensemble_root_path",
            str(ens),
            "--category",
            str(project / CAT),
            "--backbone_list",
            "R18",
        ],
        capsys,
        "--category",
    )
    one_error(
        ensemble,
        [
            "--project_root_path",
            str(project),
            "--ensemble_root_path",
            str(ens),
            "--category",
            CAT,
            "--backbone_list",
            "../R18",
        ],
        capsys,
        "--backbone_list",
    )
    table = project / CAT / "R18" / "anomaly" / "lightning_logs" / "version_0" / "image_scores.csv"
    rows = list(csv.reader(table.open(newline="")))
    rows[1][1] = "../../../escape"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    before = tree(tmp_path)
    one_error(
        ensemble,
        [
            "--project_root_path",
            str(project),
            "--ensemble_root_path",
            str(ens),
            "--category",
            CAT,
            "--backbone_list",
            "R18",
        ],
        capsys,
        str(table),
        "stem",
        "escape",
    )
    assert tree(tmp_path) == before and not ens.exists()


def test_ravel_index_with_path_like_category(run, tmp_path, capsys):
    assert (
        load_cli("calc_ensemble_score").main(
            [
                "--project_root_path",
                str(run.project),
                "--ensemble_root_path",
                str(tmp_path / "ens"),
                "--category",
                CAT,
                "--backbone_list",
                "R18",
            ]
        )
        == 0
    )
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
    before = tree(tmp_path)
    one_error(
        load_cli("analysis_amap").main,
        ["--project_root_path", str(rav), "--visualize"],
        capsys,
        str(index),
        "category",
        "../../x",
    )
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- 2. concurrent appends

APPENDER = """
import sys, time, pathlib
from pni.results import SCORE_COLUMNS, append_score_result
path, who, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
for i in range(300):
    append_score_result(path, {"category": f"{who}{i}"}, {c: 0.5 for c in SCORE_COLUMNS})
"""


def test_two_processes_appending_keep_every_row(tmp_path):
    table, go = tmp_path / "score_result.csv", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(table), who, str(go)], env=env(), stderr=subprocess.PIPE, text=True
        )
        for who in "ab"
    ]
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    lines = table.read_text().splitlines()
    assert lines[0].startswith("category,backbone,version") and sum(line == lines[0] for line in lines) == 1
    with table.open(newline="") as fh:
        written = sorted(r["category"] for r in csv.DictReader(fh))
    assert written == sorted(f"{who}{i}" for who in "ab" for i in range(300))
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------- 3. a flag typo next to a trained model


def test_flag_typo_keeps_the_trained_model(run, tmp_path, capsys):
    emb = run.copy_artefacts(tmp_path)
    before = tree(emb)
    typos = [["--strategy", "dpp"], ["--devices", "0"], ["--accelerator", "foo"], ["--devices", "x"]]
    if not torch.cuda.is_available():
        typos.append(["--accelerator", "gpu"])
    for typo in typos:
        for stages in (["--train_nb_dist"], TRAIN):
            one_error(
                tcd.main, run.argv(*stages, *typo, emb_root=tmp_path, project=tmp_path / "r"), capsys, typo[0], typo[1]
            )
            assert tree(emb) == before  # byte for byte, settings records included
    assert not (tmp_path / "r").exists()
    assert tcd.main(run.argv(emb_root=tmp_path, project=tmp_path / "r")) == 0  # still accepted
    capsys.readouterr()


# ---------------------------------------------------------------- 4. masks of any encoding


def test_masks_of_any_encoding_give_the_same_ground_truth(tmp_path):
    cat = tmp_path / "ds" / "parts"
    rng = np.random.default_rng(0)
    (cat / "train" / "good").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(cat / "train" / "good" / "0.png")
    box = np.zeros((32, 32), np.uint8)
    box[8:20, 10:26] = 1
    encodings = {
        "255": Image.fromarray(box * 255),
        "1": Image.fromarray(box),
        "128": Image.fromarray(box * 128),
        "16bit_1": Image.fromarray(box.astype(np.uint16)),
        "16bit_65535": Image.fromarray(box.astype(np.uint16) * 65535),
        "rgb_1": Image.fromarray(np.dstack([box] * 3)),
        "palette_1": Image.fromarray(box, mode="L"),
    }
    encodings["palette_1"] = Image.new("P", (32, 32))
    encodings["palette_1"].putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 = red
    encodings["palette_1"].putdata(box.reshape(-1).tolist())
    for name, mask in encodings.items():
        (cat / "test" / "bad").mkdir(parents=True, exist_ok=True)
        (cat / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(cat / "test" / "bad" / f"{name}.png")
        mask.save(cat / "ground_truth" / "bad" / f"{name}_mask.png")
    assert Image.open(cat / "ground_truth" / "bad" / "16bit_1_mask.png").mode.startswith("I")
    # The original's rule on a 0/255 mask: bilinear resize, defective where the value stays 255.
    reference = np.asarray(Image.fromarray(box * 255).resize((48, 48), Image.Resampling.BILINEAR)) == 255
    assert reference.sum() > 100
    _, test = build_datasets("MVTec", tmp_path / "ds", "parts", resize=48, imagesize=48)
    for item in test:
        assert item["label"] == 1
        assert np.array_equal(item["mask"][0].numpy() == 1, reference), item["stem"]
        assert set(np.unique(item["mask"].numpy())) == {0.0, 1.0}


# ---------------------------------------------------------------- 5. artefacts of another set-up


def test_artefacts_of_other_weights_dtype_or_training_images_are_refused(run, tmp_path, capsys):
    project = tmp_path / "r"
    other = save_weights(tmp_path / "weights_b.pth", seed=2)
    argv = run.argv(project=project)
    argv[argv.index("--backbone_weights") + 1] = str(other)
    one_error(tcd.main, argv, capsys, "--backbone_weights", "other weights", str(run.emb))
    one_error(
        tcd.main,
        run.argv("--random_init", project=project, weights=False),
        capsys,
        "--backbone_weights (other weights: random_init",
        "--random_init True (saved: False)",
    )
    one_error(
        tcd.main,
        run.argv("--feature_bank_dtype", "float16", project=project),
        capsys,
        "--feature_bank_dtype float16 (saved: float32)",
    )
    cat = run.copy_dataset(tmp_path / "ds")
    image = cat / "train" / "good" / "001.png"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image, compress_level=0)  # other size
    one_error(
        tcd.main,
        run.argv(dataset=tmp_path / "ds", project=project),
        capsys,
        "--dataset_path (other training images",
        "--train_coreset",
    )
    assert not project.exists()


# ---------------------------------------------------------------- 6. undefined metrics, unusable test sets


@pytest.mark.parametrize("keep", ["good", "defects"])
def test_one_class_test_set_writes_nan_with_one_note_and_keeps_the_maps(run, tmp_path, capsys, keep):
    cat = run.copy_dataset(tmp_path / "ds")  # a copy: the same training images are accepted
    if keep == "good":
        for folder in ("hole", "scratch", "stain"):
            shutil.rmtree(cat / "test" / folder)
            shutil.rmtree(cat / "ground_truth" / folder)
    else:
        for p in (cat / "test" / "good").iterdir():
            p.unlink()
    project = tmp_path / "r"
    code, out, err = call(tcd.main, run.argv(dataset=tmp_path / "ds", project=project), capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(notes) == 1 and "undefined, written as nan" in notes[0], err
    with (project / "score_result.csv").open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    for column in SCORES:
        undefined = keep == "good" or column.endswith("I-AUROC")
        assert (row[column] == "nan") == undefined, (column, row[column])
    sample = project / CAT / "R18" / "anomaly" / "lightning_logs" / "version_0" / "sample"
    n_images = 1 if keep == "good" else 3
    assert len(list(sample.glob("*_amap_nb_coor.npy"))) == n_images
    # the ensemble of that run: the same single note, the same nan columns
    code, out, err = call(
        load_cli("calc_ensemble_score").main,
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
    )
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(notes) == 1 and f"category {CAT} has" in notes[0] and "written as nan" in notes[0], err
    with (project / "ensemble_score_result.csv").open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    for column in SCORES:
        assert (row[column] == "nan") == (keep == "good" or column.endswith("I-AUROC")), (column, row[column])
    assert len(list((tmp_path / "ens" / CAT / "anomaly_map").rglob("*.npy"))) == n_images


def test_empty_test_set_is_refused_before_training(run, tmp_path, capsys):
    cat = run.copy_dataset(tmp_path / "ds")
    for folder in (cat / "test").iterdir():
        for p in folder.iterdir():
            p.unlink()
    shutil.rmtree(cat / "ground_truth")
    one_error(
        tcd.main,
        run.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "no test images",
        str(cat / "test"),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_non_finite_map_is_one_line_naming_the_image(tmp_path):
    from pni.collector import ResultCollector
    from pni.scoring import ImageScores

    maps = {m: torch.zeros(8, 8) for m in ("nb", "coor", "patchcore", "nb_coor")}
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


# ---------------------------------------------------------------- 7. bounded blur


def test_blur_wider_than_the_image_is_refused_and_normal_blurs_match_scipy(run, capsys):
    from pni.scoring import gaussian_blur

    one_error(tcd.main, run.argv("--blursigma", "1e6"), capsys, "--blursigma", "--imagesize (64)")
    with pytest.raises(PNIError, match="--blursigma 1e\\+06 is wider than the 16x16 map"):
        gaussian_blur(torch.zeros(1, 16, 16), 1e6)
    maps = torch.from_numpy(np.random.default_rng(0).random((2, 16, 12), dtype=np.float32))
    for sigma in (0.7, 4.0, 16.0):  # 16: the kernel (radius 64) is wider than the map
        reference = np.stack(
            [ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="reflect", truncate=4.0) for m in maps.numpy()]
        )
        assert np.allclose(gaussian_blur(maps, sigma).numpy(), reference, atol=1e-5), sigma


# ---------------------------------------------------------------- 8. temporary files of killed runs

KILLED_WRITER = """
import os, signal, sys
from pni.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half of it")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "settings.json")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (left,) = [p for p in tmp_path.iterdir()]
    assert left.name.startswith(".settings.tmp-") and left.read_text() == "half of it"
    alive = tmp_path / f".other.tmp-{owner_tag()}-x1y2.json"  # this (running) process's: kept
    alive.write_text("in progress")
    save_json(tmp_path / "other.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "other.json"])
    with atomic_path(tmp_path / "third.npy") as tmp:
        assert tmp.name.startswith(f".third.tmp-{owner_tag()}-") and tmp.suffix == ".npy"


# ---------------------------------------------------------------- 9. Ctrl-C


@pytest.mark.parametrize(
    "point,stages",
    [  # stage 3 is our own loop: KeyboardInterrupt reaches run_cli as is
        ("feature_batch", TRAIN),  # stage 1, inside Lightning's predict loop
        ("nb_checkpoint", ["--train_nb_dist"]),  # stage 2, inside trainer.fit
        ("test_sample", []),  # stage 4, inside trainer.test
    ],
)
def test_ctrl_c_exits_130_with_one_line_at_every_stage(run, tmp_path, point, stages):
    if stages != TRAIN:
        run.copy_artefacts(tmp_path)
    project = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_coreset_distribution.py")]
        + run.argv(*stages, emb_root=tmp_path, project=project),
        env=env(PNI_TEST_KILL_AT=point, PNI_TEST_SIGNAL="SIGINT"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert f"PNI_TEST_KILL_AT={point}" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith("interrupted") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    logs = project / CAT / "R18" / "anomaly" / "lightning_logs"
    assert not logs.exists() or list(logs.iterdir()) == []  # no partial result folder left


def test_interruptible_gives_back_the_keyboard_interrupt_lightning_swallows():
    import pytorch_lightning as pl

    from pni.lightning import interruptible

    class Interrupted(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            raise KeyboardInterrupt

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer():
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    loader = torch.utils.data.DataLoader(torch.zeros(4, 2), batch_size=2)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # what Lightning does on its own
            trainer().fit(Interrupted(), loader)
        with pytest.raises(KeyboardInterrupt):
            interruptible(trainer().fit, Interrupted(), loader)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    finally:
        signal.signal(signal.SIGINT, handler)


# ---------------------------------------------------------------- 10. checks before training


def test_input_and_flag_problems_are_found_before_training(run, tmp_path, capsys):
    emb_root = tmp_path / "emb"

    def nothing_trained() -> bool:
        return not any(emb_root.rglob("*.faiss")) and not any(emb_root.rglob("*.pt"))

    cat = run.copy_dataset(tmp_path / "ds")
    mask = cat / "ground_truth" / "stain" / "000_mask.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(mask)
    one_error(
        tcd.main,
        run.argv(*TRAIN, dataset=tmp_path / "ds", emb_root=emb_root, project=tmp_path / "r"),
        capsys,
        str(mask),
        "48x32",
        "64x64",
    )
    assert not emb_root.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_error(
        tcd.main,
        run.argv(*TRAIN, emb_root=emb_root, project=blocker / "r"),
        capsys,
        "cannot create output folder",
        "--project_root_path",
        "is a file",
    )
    assert not emb_root.exists()
    one_error(
        tcd.main,
        run.argv(*TRAIN, "--backbone_weights", str(tmp_path / "none.pth"), emb_root=emb_root, project=tmp_path / "r"),
        capsys,
        "--backbone_weights",
        "none.pth",
    )
    assert not emb_root.exists()  # not even an empty artefact folder
    one_error(
        tcd.main,
        run.argv(*TRAIN, "--anomaly_nn", "1000", emb_root=emb_root, project=tmp_path / "r"),
        capsys,
        "--anomaly_nn 1000",
        "64 entries",
    )
    assert nothing_trained()
    run.copy_artefacts(tmp_path)
    one_error(
        tcd.main,
        run.argv("--train_nb_dist", "--anomaly_nn", "65", emb_root=tmp_path, project=tmp_path / "r"),
        capsys,
        "--anomaly_nn 65",
    )
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- 11. messages


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
    one_error(
        analyse, ["--project_root_path", str(tmp_path)], capsys, "00001_pred.png is 32x24", "00000_pred.png is 32x32"
    )
    write_png16(tmp_path / "00001_pred.png", np.zeros((32, 32), np.uint16))
    one_error(
        analyse, ["--project_root_path", str(tmp_path)], capsys, "00001_gt.png is 32x24", "00001_pred.png is 32x32"
    )


def test_refused_pickle_is_one_short_line(tmp_path):
    from pni.distributions import load_mlp_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "best_model_dp2_dcs16_n3.pt"
    torch.save({"model": {}, "evil": Evil()}, path)
    with pytest.raises(PNIError) as exc:
        load_mlp_checkpoint(path)
    message = str(exc.value)
    assert message.startswith(f"cannot read neighbourhood model {path}: it holds a Python object (")
    assert "system" in message and "refused" in message and "\n" not in message and len(message) < 300
    assert "weights_only" not in message and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- 12. docs and packaging


def test_product_files_do_not_point_outside_the_repository():
    files = ["README.md", "Makefile", "pyproject.toml", *map(str, Path(REPO).glob("*.py"))]
    files += [
        str(p)
        for d in ("pni", "analysis_code", "scripts", "docs")
        for p in (REPO / d).rglob("*")
        if p.suffix in (".py", ".sh", ".md")
    ]
    offenders = [f for f in files if "../shared/" in (REPO / f).read_text()]
    assert offenders == []
    assert (REPO / "docs" / "METHOD.md").is_file()
