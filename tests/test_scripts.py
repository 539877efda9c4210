"""The evaluate_amap_on_*.sh scripts (METHOD section 8).

One real end-to-end run of the MVTec WR101 script on a tiny generated dataset (backbone,
sizes and output folders overridden through the scripts' environment variables, everything
under tmp_path), and the command lines of every script checked with a stand-in interpreter
that only records its arguments.
"""

import csv
import os
import subprocess
import sys

import pytest
from helpers import REPO, tiny_flags

from pni.data.synthetic import make_dataset

SCRIPTS = REPO / "scripts"
TINY = " ".join(tiny_flags(backbone=None, num_epochs=1))  # the scripts give --backbone
TRAIN_FLAGS = ["--train_coreset", "--train_nb_dist", "--train_coor_dist"]
MVTEC = (
    "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper"
).split()
VISA = ("candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum").split()
ENSEMBLE = ["WR101", "RNX101", "DN201"]


def run_script(name, timeout=900, **env):
    full = dict(os.environ)  # conftest's MPLCONFIGDIR / TORCH_HOME go along
    full.setdefault("MPLBACKEND", "Agg")
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPTS / name)], env=full, capture_output=True, text=True, timeout=timeout)


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- real run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    make_dataset(root / "ds", num_train=4, num_test_per_type=2, image_size=64, categories=["texture"])
    env = dict(
        PYTHON=sys.executable,
        DATASET_PATH=root / "ds",
        RESULT_ROOT=root / "result",
        EMBEDDING_ROOT=root,
        CATEGORIES="texture",
        BACKBONES="R18",
        EXTRA_ARGS=TINY,
    )
    proc = run_script("evaluate_amap_on_MVTecAD_WR101.sh", **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, env, proc


def test_wr101_script_runs_every_stage(tiny):
    root, _, proc = tiny
    result = root / "result"
    rows = read_rows(result / "score_result.csv")
    assert [r["category"] for r in rows] == ["texture"]
    assert (result / "ensemble_score_result.csv").is_file()
    assert (result / "texture" / "R18" / "anomaly" / "lightning_logs" / "version_0" / "sample").is_dir()
    assert (root / "embeddings_layer2+layer3" / "texture" / "R18").is_dir()
    ens = result / "ensemble_result" / "texture"
    assert len(list((ens / "anomaly_map").glob("*/*.npy"))) == 8
    ravel = result / "ensemble_ravel"
    assert len(list(ravel.glob("*_pred.png"))) == 8
    analysed = read_rows(ravel / "score_result.csv")
    assert [r["category"] for r in analysed] == ["texture", "average"]
    assert "AUPRO_MVTec" in analysed[0] and "AUPRO_PNI" in analysed[0]
    viz = ravel / "viz" / "texture"
    for suffix in ("_amap.png", "_amap_on_img.png", "_heatmap_on_img_with_mask.png"):
        assert len(list(viz.glob(f"*{suffix}"))) == 8, suffix
    assert "pictures:" in proc.stdout


def test_skip_train_reuses_saved_artefacts(tiny):
    root, env, _ = tiny
    emb = root / "embeddings_layer2+layer3" / "texture" / "R18"
    before = {p.name: p.stat().st_mtime_ns for p in emb.iterdir()}
    proc = run_script("evaluate_amap_on_MVTecAD_WR101.sh", **{**env, "SKIP_TRAIN": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in emb.iterdir()} == before  # nothing rebuilt
    logs = root / "result" / "texture" / "R18" / "anomaly" / "lightning_logs"
    assert (logs / "version_1" / "sample").is_dir()  # scored again, a new run
    assert len(read_rows(root / "result" / "score_result.csv")) == 2


def test_missing_dataset_stops_before_anything(tmp_path):
    proc = run_script(
        "evaluate_amap_on_MVTecAD_WR101.sh",
        PYTHON=sys.executable,
        DATASET_PATH=tmp_path / "nowhere",
        RESULT_ROOT=tmp_path / "result",
        EMBEDDING_ROOT=tmp_path,
        CATEGORIES="texture",
        BACKBONES="R18",
        EXTRA_ARGS=TINY,
    )
    assert proc.returncode != 0
    assert "nowhere" in proc.stderr
    assert not (tmp_path / "result").exists()


# ----------------------------------------------------------------------------- command lines


@pytest.fixture
def recorder(tmp_path):
    """A stand-in PYTHON that appends its arguments (one call per line) to a log and exits 3
    when they match the regular expression in FAIL_ON."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$CALL_LOG"\n'
        'if [[ -n "${FAIL_ON:-}" && "$*" =~ $FAIL_ON ]]; then exit 3; fi\n'
    )
    stub.chmod(0o755)
    (tmp_path / "ds").mkdir()

    def record(name, **env):
        base = dict(
            PYTHON=stub,
            CALL_LOG=log,
            DATASET_PATH=tmp_path / "ds",
            RESULT_ROOT=tmp_path / "res",
            EMBEDDING_ROOT=tmp_path / "emb",
        )
        proc = run_script(name, timeout=300, **{**base, **env})
        calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls

    return record


def flag(call, name):
    """Value of the last ``name`` flag (argparse's last-wins) and, for lists, all values."""
    i = len(call) - 1 - call[::-1].index(name)
    values = []
    for v in call[i + 1 :]:
        if v.startswith("--"):
            break
        values.append(v)
    return values


CASES = [
    ("evaluate_amap_on_MVTecAD_WR101.sh", "MVTec", MVTEC, ["WR101"], "23", True, False),
    ("evaluate_amap_on_MVTecAD_ensemble.sh", "MVTec", MVTEC, ENSEMBLE, "23", True, False),
    ("evaluate_amap_on_MVTecAD_bottle_ensemble_pretrained.sh", "MVTec", ["bottle"], ENSEMBLE, "23", False, False),
    ("evaluate_amap_on_BTAD_WR101.sh", "BTAD", ["01", "02", "03"], ["WR101"], "23", True, True),
    ("evaluate_amap_on_BTAD_ensemble.sh", "BTAD", ["01", "02", "03"], ENSEMBLE, "23", True, True),
    ("evaluate_amap_on_VisA_WR101.sh", "VisA", VISA, ["WR101"], "23", True, False),
    ("evaluate_amap_on_VisA_ensemble.sh", "VisA", VISA, ENSEMBLE, "23", True, False),
]


@pytest.mark.parametrize("name,dataset,categories,backbones,seed,trains,btad", CASES)
def test_script_command_lines(recorder, tmp_path, name, dataset, categories, backbones, seed, trains, btad):
    proc, calls = recorder(name)
    assert proc.returncode == 0, proc.stderr
    train = [c for c in calls if c[0] == "train_coreset_distribution.py"]
    assert [(flag(c, "--backbone")[0], flag(c, "--category")[0]) for c in train] == [
        (b, c) for b in backbones for c in categories
    ]
    for c in train:
        assert flag(c, "--dataset_category") == [dataset]
        assert flag(c, "--seed") == [seed]
        assert flag(c, "--dataset_path") == [str(tmp_path / "ds")]
        assert flag(c, "--project_root_path") == [str(tmp_path / "res")]
        assert flag(c, "--embedding_root_path") == [str(tmp_path / "emb")]
        assert all((f in c) == trains for f in TRAIN_FLAGS)
    ens, conv, ana = calls[len(train) :]
    assert ens[0] == "analysis_code/calc_ensemble_score.py"
    assert flag(ens, "--backbone_list") == backbones and flag(ens, "--category") == categories
    assert flag(ens, "--ensemble_root_path") == [str(tmp_path / "res" / "ensemble_result")]
    assert conv[0] == "analysis_code/convert_result_format.py"
    assert flag(conv, "--after_result_root_dir") == [str(tmp_path / "res" / "ensemble_ravel")]
    assert ana[0] == "analysis_code/analysis_amap.py"
    assert "--visualize" in ana and "--calc_pro" in ana
    assert ("--is_BTAD" in conv, "--is_BTAD" in ana) == (btad, btad)


def test_overrides_skip_train_and_extra_args(recorder):
    proc, calls = recorder(
        "evaluate_amap_on_BTAD_WR101.sh",
        SKIP_TRAIN="1",
        CATEGORIES="02",
        BACKBONES="R18 R34",
        EXTRA_ARGS="--backbone R50 --resize 64",
    )
    assert proc.returncode == 0, proc.stderr
    train = calls[:2]
    assert all(f not in c for c in train for f in TRAIN_FLAGS)
    assert [flag(c, "--category") for c in train] == [["02"], ["02"]]
    assert all(c[-4:] == ["--backbone", "R50", "--resize", "64"] for c in train)  # last, so they win
    assert [flag(c, "--backbone") for c in train] == [["R50"], ["R50"]]
    assert flag(calls[2], "--backbone_list") == ["R18", "R34"]


def test_a_failing_call_stops_the_script(recorder):
    """set -e: the first failing call ends the script (no ensemble, convert or analysis)."""
    proc, calls = recorder("evaluate_amap_on_VisA_ensemble.sh", FAIL_ON="--category candle .*--backbone RNX101")
    assert proc.returncode == 3
    assert calls[-1][0] == "train_coreset_distribution.py"
    assert flag(calls[-1], "--backbone") == ["RNX101"] and flag(calls[-1], "--category") == ["candle"]
    assert len(calls) == len(VISA) + 1
