"""Smoke test of the benchmarks: each runs at a tiny size and prints a ratio as its last line.
Times are never asserted (they mean nothing at these sizes); the goal checks are."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import goals  # noqa: E402
import run_all  # noqa: E402
from run_all import BENCHES  # noqa: E402

RATIO = re.compile(r"\d+(?:\.\d+)?x\b")


def run(args, timeout=900):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_runs_and_ends_with_a_ratio(name):
    bench = BENCHES[name]
    proc = run(
        [str(ROOT / "bench" / bench.script)]
        + bench.quick
        + ["--no_goals"]
        + (["--device", "cpu"] if bench.takes_device else [])
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("machine:")
    assert RATIO.search(lines[-1]) and "goal" in lines[-1], lines[-1]
    if name == "scoring":
        assert re.search(r"\d+x vs the original \(goal >= 15x\)$", lines[-1]), lines[-1]
        # the original's method (serial) and ours under --mask_workers 1 give the same maps
        diff = float(re.search(r"maps within (\S+) of the original's method", lines[-1]).group(1))
        assert diff <= 1e-5
        of_range = float(re.search(r"and (\S+) of their range from float64 \(rounded", lines[-1]).group(1))
        assert of_range <= 1e-6


def test_goals_fail_a_benchmark_that_misses_them(capsys):
    assert goals.check({"scoring_vs_original": 15.0, "scoring_flop_bound": 1.5, "memory_bank": 0.7}) == 0
    assert capsys.readouterr().out == ""
    assert goals.check({"scoring_vs_original": 14.9, "scoring_flop_bound": 1.2}) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["goal missed: speed-up over the original's method (faiss k = all, mask loops) is 14.9, goal >= 15"]
    assert goals.check({"scoring_flop_bound": 2.6}, enforce=False) == 0
    assert "(not enforced)" in capsys.readouterr().out


def test_run_all_prints_a_table_and_fails_on_a_missed_goal(tmp_path, monkeypatch, capsys):
    proc = run([str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "coreset", "--json", str(tmp_path / "r.json")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| coreset | coreset greedy iteration:" in proc.stdout
    assert (tmp_path / "r.json").is_file()
    # a benchmark that misses its goal (exit code 1 after 'goal missed') fails the whole run
    script = tmp_path / "bench_fake.py"
    script.write_text(
        "print('machine: test')\nprint('goal missed: x is 2, goal <= 1')\nprint('fake: 2.00x')\nraise SystemExit(1)\n"
    )
    monkeypatch.setitem(BENCHES, "fake", run_all.Bench(str(script), [], "coreset", takes_device=False))
    assert run_all.main(["--only", "fake"]) == 1
    assert "| fake | GOAL MISSED: fake: 2.00x |" in capsys.readouterr().out
