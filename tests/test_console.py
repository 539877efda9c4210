"""What the CLIs print (pni.console): one line per stage, one bar that redraws in place on a
terminal, a few percentage lines in a log, no third-party chatter unless --verbose."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, path_flags

from pni import console
from pni.console import Progress
from pni.data.synthetic import make_dataset

STAGES = ("stage 1/4: coresets", "stage 2/4: neighbourhood MLP", "stage 3/4: position priors", "stage 4/4: scoring")
CHATTER = (
    "Tip:",
    "litlogger",
    "LeafSpec",
    "deprecated",
    "GPU available",
    "TPU available",
    "does not have many workers",
    "Predicting",
    "Epoch ",
    "Testing",
    "it/s",
    "Warning:",
    "warnings.warn",
)


# ----------------------------------------------------------------------------- Progress


def test_log_mode_prints_title_quarters_and_done_without_carriage_returns(monkeypatch):
    monkeypatch.setattr(console, "LOG_INTERVAL_S", 0.0)
    out = io.StringIO()
    with Progress("[cat] stage 2/4: thing", total=8, stream=out, terminal=False) as bar:
        for i in range(8):
            bar.update(1, note=f"epoch {i // 4 + 1}/2")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "[cat] stage 2/4: thing"
    assert [line.split()[0] for line in lines[1:4]] == ["25%", "50%", "75%"]  # one line per quarter, no 100%
    assert "epoch 2/2" in lines[3] and lines[4].startswith("    done in ") and len(lines) == 5


def test_log_mode_keeps_quiet_between_close_updates(monkeypatch):
    monkeypatch.setattr(console, "LOG_INTERVAL_S", 3600.0)  # a quick stage: no percentage line at all
    out = io.StringIO()
    with Progress("quick", total=100, stream=out, terminal=False) as bar:
        for _ in bar.track(range(100)):
            pass
    assert out.getvalue().splitlines()[0] == "quick" and len(out.getvalue().splitlines()) == 2
    assert bar.count == 100


def test_terminal_mode_redraws_one_line_in_place(monkeypatch):
    monkeypatch.setattr(console, "_REDRAW_S", 0.0)
    out = io.StringIO()
    bar = Progress("[cat] stage 1/4: coresets", stream=out, terminal=True)
    bar.add_total(3)
    bar.add_total(1)
    for _ in range(4):
        bar.update()
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # a single line, redrawn with \r
    assert text.count("\r") == 6  # first draw, four updates, the final line
    assert "[########################] 100%" in text
    assert text.split("\r")[-1].startswith("\x1b[K[cat] stage 1/4: coresets  done in ")


def test_a_failing_stage_ends_its_line_without_done():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress("stage", total=2, stream=out, terminal=True):
            raise RuntimeError("boom")
    assert out.getvalue().endswith("\n") and "done" not in out.getvalue()


def test_titled_tables_stand_apart():
    assert console.titled("Scores", "a  b\n1  2") == "\nScores\na  b\n1  2\n"


SETUP_SCRIPT = """
import warnings
from pni import console
console.setup(verbose={verbose})
warnings.warn("old API", DeprecationWarning)
warnings.warn("old API", FutureWarning)
warnings.warn("Your `predict_dataloader` does not have many workers which may be a bottleneck.")
warnings.warn("no weights:\\n using random ones")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_setup_drops_deprecations_and_prints_one_line_warnings(verbose):
    proc = subprocess.run(
        [sys.executable, "-c", SETUP_SCRIPT.format(verbose=verbose)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    if verbose:  # Python's own format, and the Lightning hint is kept
        assert "UserWarning: no weights:" in proc.stderr and "many workers" in proc.stderr
    else:
        assert proc.stderr == "warning: no weights: using random ones\n"


def test_trainer_progress_follows_the_console_mode(monkeypatch):
    assert console.trainer_progress(None) == {"enable_progress_bar": False}
    bar_args = console.trainer_progress(Progress("x", stream=io.StringIO(), terminal=False))
    assert bar_args["enable_progress_bar"] and len(bar_args["callbacks"]) == 1
    monkeypatch.setitem(console._state, "verbose", True)  # what setup(verbose=True) records
    assert console.trainer_progress(None) == {"enable_progress_bar": True}  # Lightning's own bars


# ----------------------------------------------------------------------------- a real run, output in a file


def _cli(args, log: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "w") as fh:  # a file: not a terminal
        return subprocess.run(
            [sys.executable, str(REPO / "train_coreset_distribution.py")] + args,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=900,
        ).returncode


@pytest.fixture(scope="module")
def logged_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    make_dataset(root / "ds", num_train=4, num_test_per_type=1, image_size=64, categories=["texture"])
    base = path_flags(root / "ds", root) + TINY
    assert _cli(base + ["--train_coreset", "--train_nb_dist", "--train_coor_dist"], root / "quiet.log") == 0
    assert _cli(base + ["--verbose"], root / "verbose.log") == 0  # saved artefacts: scoring only
    return (root / "quiet.log").read_text(), (root / "verbose.log").read_text()


def test_a_logged_run_has_one_line_per_stage_and_no_chatter(logged_runs):
    quiet, _ = logged_runs
    assert "\r" not in quiet and "\x1b" not in quiet
    for stage in STAGES:
        assert sum(line.startswith(f"[texture] {stage}") for line in quiet.splitlines()) == 1, stage
    for text in CHATTER:
        assert text not in quiet, text
    lines = quiet.splitlines()
    # between stage titles only indented percentage / done lines; then the table, set apart
    body = lines[: lines.index("")]
    assert all(line.startswith("[texture] stage ") or line.startswith("    ") for line in body), body
    assert sum(line.startswith("    done in ") for line in body) == 4
    # a percentage line is printed when a quarter is crossed, showing the count at that moment
    # (25% if the bar is updated then; later, e.g. 26%, when the last line was under
    # LOG_INTERVAL_S ago): at most one per quarter of each stage, never 100%
    for stage_lines in "\n".join(body).split("[texture] stage ")[1:]:
        shown = [line.split()[0] for line in stage_lines.splitlines()[1:] if line.startswith("    ")]
        assert shown[-1] == "done", stage_lines
        quarters = [int(p.rstrip("%")) // 25 for p in shown[:-1]]
        assert all(p.endswith("%") for p in shown[:-1]) and all(0 < q < 4 for q in quarters), stage_lines
        assert quarters == sorted(set(quarters)), stage_lines
    title = lines.index("[texture] AUROC (%) of the four maps (R18, seed 22)")
    assert lines[title - 1] == "" and lines[title + 1].split()[:2] == ["category", "variant"]


def test_verbose_shows_lightning_s_own_output(logged_runs):
    _, verbose = logged_runs
    assert "GPU available" in verbose  # Lightning's device banner
    assert "Testing" in verbose  # Lightning's own progress bar
    assert "[texture] stage 4/4: scoring" in verbose and "[texture] stage 1/4" not in verbose
