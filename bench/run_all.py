#!/usr/bin/env python
"""Run every benchmark (``make bench``) one after the other, print their figures as a
Markdown table (the one in docs/PERFORMANCE.md), and fail when one misses a goal.

Each benchmark is its own process, prints its figure as its last line and exits non-zero
when a figure misses its goal (``bench/goals.py``); see the docstring of each
``bench/bench_*.py`` for what it measures. ``--quick`` runs them at tiny sizes without
enforcing the goals (a smoke test: the figures mean nothing). Default sizes take about
5-10 minutes on 2 CPU cores.

A new benchmark: a ``bench_<name>.py`` that ends with its figure and ``goals.check``, a line
in ``BENCHES`` below, its goals in ``goals.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import goals

HERE = Path(__file__).resolve().parent


class Bench(NamedTuple):
    script: str
    quick: list[str]  # tiny-size flags for --quick and the smoke tests
    goals: str  # prefix of its goals' names in goals.GOALS
    takes_device: bool = True


# the tiny backbone and MLP of the benchmarks that run both (--quick)
TINY_MLP = "--backbone R18 --imagesize 64 --dim 64 --num_layers 3 --dcs 64 --dist_padding 2".split()

BENCHES: dict[str, Bench] = {
    "scoring": Bench(
        "bench_scoring.py",
        ["--rows", "12", "--cols", "12", "--dim", "32", "--k1", "200", "--k2", "200", "--dcs", "64", "--repeats", "1"],
        "scoring",
    ),
    "coreset": Bench(
        "bench_coreset.py", ["--n", "20000", "--dim", "16", "--iterations", "5", "--repeats", "2"], "coreset"
    ),
    "inference": Bench("bench_inference.py", [*TINY_MLP, "--images", "1"], "inference"),
    "precision": Bench(
        "bench_precision.py",
        [*TINY_MLP, "--batch", "64", "--bank_images", "2", "--images", "1", "--steps", "1"],
        "precision",
    ),
    "memory": Bench(
        "bench_memory.py",
        ["--images", "6", "--imagesize", "64", "--dist_coreset_size", "16", "-p", "0.05"],
        "memory",
        takes_device=False,
    ),
    "predict": Bench(
        "bench_predict.py",
        [
            "--image_size",
            "64",
            "--train",
            "4",
            "--small",
            "1",
            "--large",
            "2",
            "--memory",
            "2",
            "6",
            "--train_flags",
            "--backbone R18 --random_init --resize 64 --imagesize 64 "
            "--pretrain_embed_dimension 48 --target_embed_dimension 32 -p 0.25 "
            "--dist_coreset_size 16 --dist_padding 2 --num_layers 3 --num_epochs 1 "
            "--step_size 1 --dist_batchsize 64 --blursigma 1",
            "--paper_backbone",
            "R18",
            "--paper_imagesize",
            "64",
            "--paper_dim",
            "32",
            "--paper_dist_padding",
            "2",
            "--paper_num_layers",
            "3",
            "--paper_dcs",
            "16",
            "--paper_train_images",
            "100",
            "--paper_images",
            "1",
        ],
        "predict",
    ),
}


def run_one(name: str, extra: list[str], quick: bool) -> dict:
    bench = BENCHES[name]
    cmd = [sys.executable, str(HERE / bench.script)] + (bench.quick + ["--no_goals"] if quick else []) + extra
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    machine = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("machine:")), "")
    missed = any(ln.startswith("goal missed:") for ln in lines)
    figure = lines[-1] if lines else ""
    if proc.returncode != 0:
        figure = f"GOAL MISSED: {figure}" if missed and figure else f"FAILED ({proc.returncode})"
    return {
        "bench": name,
        "figure": figure,
        "goal": goals.describe(bench.goals),
        "seconds": seconds,
        "machine": machine,
        "ok": proc.returncode == 0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--device", default=None, help="passed to the benchmarks that take it (auto, cpu, cuda)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = []
    for name in names:
        extra = ["--device", args.device] if args.device and BENCHES[name].takes_device else []
        results.append(run_one(name, extra, args.quick))
        print(flush=True)
    print(f"machine: {results[0]['machine'] if results else ''}")
    print("| benchmark | measured (last line) | goal | run time |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['bench']} | {r['figure']} | {r['goal']} | {r['seconds']:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
