#!/usr/bin/env python
"""Run every benchmark (``make bench``) one after the other and print their figures as a
Markdown table (the one in docs/PERFORMANCE.md).

Each benchmark is its own process and prints its ratio as its last line; see the
docstring of each ``bench/bench_*.py`` for what it measures. ``--quick`` runs them at tiny
sizes (a smoke test: the figures mean nothing). Default sizes take about 5-10 minutes on
2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = {
    "scoring": ("bench_scoring.py", ">= 100x faster, maps within 1e-4"),
    "coreset": ("bench_coreset.py", "<= 3x one pass"),
    "inference": ("bench_inference.py", "<= 2x the FLOP bound"),
    "memory": ("bench_memory.py", "<= 1.5x the bank"),
    "predict": ("bench_predict.py", "<= 1.2x the test stage per image; memory flat (<= 1.1x) from 10 to 200 images"),
}

QUICK = {
    "scoring": ["--rows", "12", "--cols", "12", "--dim", "32", "--k1", "200", "--k2", "200", "--dcs", "64",
                "--loop_positions", "2", "--numpy_positions", "4", "--repeats", "1"],
    "coreset": ["--n", "20000", "--dim", "16", "--iterations", "5", "--repeats", "2"],
    "inference": ["--backbone", "R18", "--imagesize", "64", "--dim", "64", "--num_layers", "3", "--dcs", "64",
                  "--dist_padding", "2", "--images", "1"],
    "memory": ["--images", "6", "--imagesize", "64", "--dist_coreset_size", "16", "-p", "0.05"],
    "predict": ["--image_size", "64", "--train", "4", "--small", "1", "--large", "2", "--memory", "2", "6",
                "--train_flags", "--backbone R18 --random_init --resize 64 --imagesize 64 --pretrain_embed_dimension 48 "
                "--target_embed_dimension 32 -p 0.25 --dist_coreset_size 16 --dist_padding 2 --num_layers 3 "
                "--num_epochs 1 --step_size 1 --dist_batchsize 64 --blursigma 1"],
}


def run_one(name: str, extra: list[str], quick: bool) -> dict:
    script, goal = BENCHES[name]
    cmd = [sys.executable, str(HERE / script)] + (QUICK[name] if quick else []) + extra
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    machine = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("machine:")), "")
    return {"bench": name, "figure": lines[-1] if lines and proc.returncode == 0 else f"FAILED ({proc.returncode})",
            "goal": goal, "seconds": seconds, "machine": machine, "ok": proc.returncode == 0}


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
        extra = []
        if args.device and name in ("scoring", "coreset", "inference", "predict"):
            extra = ["--device", args.device]
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
