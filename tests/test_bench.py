"""Smoke test of the benchmarks: each runs at a tiny size and prints a ratio as its last
line. Times are never asserted (they mean nothing at these sizes)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from run_all import BENCHES, QUICK  # noqa: E402

RATIO = re.compile(r"\d+(?:\.\d+)?x\b")


def run(args, timeout=900):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_runs_and_ends_with_a_ratio(name):
    proc = run([str(ROOT / "bench" / BENCHES[name][0])] + QUICK[name] + (["--device", "cpu"] if name != "memory"
                                                                        else []))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("machine:")
    assert RATIO.search(lines[-1]) and "goal" in lines[-1], lines[-1]


def test_run_all_prints_a_table(tmp_path):
    proc = run([str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "coreset", "--json", str(tmp_path / "r.json")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| coreset | coreset greedy iteration:" in proc.stdout
    assert (tmp_path / "r.json").is_file()
