"""Interrupted and concurrent runs: a SIGKILL or Ctrl-C at any stage, a stage stopped in the
middle, killed writers and exports, two processes appending to one table. What is left is
never taken for a finished result, the next run cleans up and completes with the same
results, and the messages are one line.

Subprocesses where signals or several processes matter (``PNI_TEST_KILL_AT`` stops a run at
a named point); the session's shared tiny run (``tiny_run``) gives the uninterrupted results
and the artefacts to start from.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    CATEGORY,
    REPO,
    TRAIN,
    artefact_dir,
    assert_same_results,
    expect_one_error,
    load_cli,
    logs_dir,
    score_rows,
    snapshot_tree,
)

import export_model
import predict as predict_cli
import train_coreset_distribution as tcd
from pni.io import atomic_path, owner_tag, save_json


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **extra}


def dead_owner() -> str:
    """An owner tag (pni.io.owner_tag) of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{owner_tag().split('~')[0]}~{proc.pid}"


# ---------------------------------------------------------------- killed runs


def test_killed_run_can_be_rerun_with_the_same_results(tiny_run, tmp_path, capsys):
    """SIGKILL in the middle of the MLP stage (PNI_TEST_KILL_AT hook), then the same command
    again: it completes, and maps and scores equal those of the uninterrupted run."""
    project = tmp_path / "r"
    argv = tiny_run.argv(*TRAIN, emb_root=tmp_path, project=project)
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
    emb = artefact_dir(tmp_path)
    assert (emb / "best_model_dp2_dcs16_n3.pt").is_file()  # a checkpoint of an unfinished training
    assert any(p.name.startswith(".scratch-") for p in emb.iterdir())  # removed by the re-run
    assert not logs_dir(project).exists()
    # without --train_nb_dist the half-trained model is refused, whatever else is there
    expect_one_error(
        tcd.main,
        tiny_run.argv(emb_root=tmp_path, project=project),
        capsys,
        "neighbourhood model",
        "incomplete",
        "--train_nb_dist",
    )
    assert tcd.main(argv) == 0
    capsys.readouterr()
    assert [p.name for p in logs_dir(project).iterdir()] == ["version_0"]
    assert_same_results(tiny_run.version, logs_dir(project) / "version_0")
    assert score_rows(project) == score_rows(tiny_run.project)[:1]
    assert not any(p.name.startswith(".") for p in emb.iterdir())


def test_killed_test_stage_leaves_no_version_folder(tiny_run, tmp_path, capsys):
    """SIGKILL after the first scored image: only a hidden partial folder remains, which the
    ensemble ignores; the next run publishes a complete version folder."""
    project = tmp_path / "r"
    env = {**os.environ, "PNI_TEST_KILL_AT": "test_sample", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_coreset_distribution.py")] + tiny_run.argv(project=project),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = list(logs_dir(project).iterdir())
    assert len(left) == 1 and left[0].name.startswith(".version_0.partial-")
    expect_one_error(
        load_cli("calc_ensemble_score").main,
        [
            "--project_root_path",
            str(project),
            "--ensemble_root_path",
            str(tmp_path / "ens"),
            "--category",
            CATEGORY,
            "--backbone_list",
            "R18",
        ],
        capsys,
        "no test run found",
    )
    assert tcd.main(tiny_run.argv(project=project)) == 0
    capsys.readouterr()
    assert [p.name for p in logs_dir(project).iterdir()] == ["version_0"]  # the killed run's folder removed
    assert_same_results(tiny_run.version, logs_dir(project) / "version_0")


def test_stage_interrupted_in_process_is_never_trusted(tiny_run, tmp_path, capsys, monkeypatch):
    """Rebuilding coresets with another seed stops after the first coreset file: the old
    coreset_settings.json (other seed) must not make the mix of old and new files usable."""
    import pni.pipeline as pipeline

    emb = tiny_run.copy_artefacts(tmp_path)

    def interrupt(point):
        if point == "coreset_index":
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "test_hook", interrupt)
    assert tcd.main(tiny_run.argv(*TRAIN, "--seed", "23", emb_root=tmp_path, project=tmp_path / "r")) == 130
    capsys.readouterr()
    monkeypatch.undo()
    assert not any(p.name.startswith(".") for p in emb.iterdir())
    for seed in ("22", "23"):
        expect_one_error(
            tcd.main,
            tiny_run.argv("--seed", seed, emb_root=tmp_path, project=tmp_path / "r"),
            capsys,
            "coresets",
            "incomplete",
            "--train_coreset",
        )


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize(
    "point,stages",
    [  # stage 3 is our own loop: KeyboardInterrupt reaches run_cli as is
        ("feature_batch", TRAIN),  # stage 1, inside Lightning's predict loop
        ("nb_checkpoint", ["--train_nb_dist"]),  # stage 2, inside trainer.fit
        ("test_sample", []),  # stage 4, inside trainer.test
    ],
)
def test_ctrl_c_exits_130_with_one_line_at_every_stage(tiny_run, tmp_path, point, stages):
    if stages != TRAIN:
        tiny_run.copy_artefacts(tmp_path)
    project = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_coreset_distribution.py")]
        + tiny_run.argv(*stages, emb_root=tmp_path, project=project),
        env=subprocess_env(PNI_TEST_KILL_AT=point, PNI_TEST_SIGNAL="SIGINT"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert f"PNI_TEST_KILL_AT={point}" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith("interrupted") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    logs = logs_dir(project)
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


# ---------------------------------------------------------------- killed writers and exports

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
        env=subprocess_env(),
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


def test_export_replaces_its_bundle_and_removes_temporary_folders_of_killed_exports(tiny_run, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_run.bundle, bundle)
    dead = dead_owner()
    stale = [tmp_path / f".b.partial-{dead}-x1", tmp_path / f".b.old-{dead}-x2"]
    live = tmp_path / f".b.partial-{owner_tag()}-x3"  # a running export's (this process)
    for folder in stale + [live]:
        folder.mkdir()
        (folder / "arrays.safetensors").write_bytes(b"partial")
    export = tiny_run.argv("--output", str(bundle), "--calibration_dir", str(tiny_run.calibration))
    assert export_model.main(export) == 0
    assert not any(p.exists() for p in stale) and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "b"]
    assert json.loads((bundle / "manifest.json").read_text())["format"] == "pni-bundle"


def test_bundle_left_hidden_by_a_killed_export_is_named(tiny_run, tmp_path, capsys):
    """Killed between its two renames, an export leaves the previous bundle only in a hidden
    folder: the next export refuses to go on without it, and predict names it."""
    hidden = tmp_path / f".b.old-{dead_owner()}-x1" / "b"
    shutil.copytree(tiny_run.bundle, hidden)
    bundle = tmp_path / "b"
    expect_one_error(export_model.main, tiny_run.argv("--output", str(bundle)), capsys, str(hidden), "move")
    expect_one_error(
        predict_cli.main, tiny_run.predict_argv(bundle, tmp_path / "out"), capsys, "not found", str(hidden)
    )
    assert snapshot_tree(hidden) == snapshot_tree(tiny_run.bundle) and not bundle.exists()


# ---------------------------------------------------------------- concurrent appends

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
            [sys.executable, "-c", APPENDER, str(table), who, str(go)],
            env=subprocess_env(),
            stderr=subprocess.PIPE,
            text=True,
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
