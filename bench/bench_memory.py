#!/usr/bin/env python
"""Peak resident memory of the coreset stage against the size of the feature bank.

A child process runs the real stage 1 (``pni.pipeline.build_coresets``: the feature bank
filled through Lightning's predict loop, the sparse random projection, the greedy
selections of both variants, the three faiss files) on random images, and reports its
resident memory: the peak during the stage (``VmHWM``, reset just before it; the parent
also reads the child's ``ru_maxrss``) and the resident size just before it (Python, torch,
the backbone's weights). The figure is the stage's own memory, peak minus that baseline,
divided by the bank's bytes; the absolute peak is printed as well.

Default (reduced scale, about a minute on 2 cores): ResNet-18 (random init) at 224 px
(28x28 grid), E = 1024, 240 training images: a 0.75 GB float32 bank, kept in memory. The
full-size stage (WR101, 400 images of 480 px: a 5.9 GB bank, memory-mapped) is
``--backbone WR101 --imagesize 480 --images 400 --bank memmap`` (hours on 2 cores).
``-p`` and ``--dist_coreset_size`` are lowered from the paper's 0.01 / 2048 only to cut
the greedy iterations; they do not change the memory. Last line: the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401
import goals
import torch
from common import gib, machine, mib, peak_rss_bytes, reset_peak_rss, rss_bytes


class RandomImages(torch.utils.data.Dataset):
    """Seeded random images, made on the fly (nothing on disk)."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, self.size, self.size, generator=g)}


def child(args) -> None:
    from pni import bank as feature_bank
    from pni import pipeline
    from pni.config import parse_args, settings_from_flags

    torch.set_num_threads(args.threads or torch.get_num_threads())
    settings = settings_from_flags(
        parse_args(
            [
                "--backbone",
                args.backbone,
                "--random_init",
                "--resize",
                str(args.imagesize),
                "--imagesize",
                str(args.imagesize),
                "-p",
                str(args.p),
                "--dist_coreset_size",
                str(args.dist_coreset_size),
                "--accelerator",
                args.device,
                "--devices",
                "1",
                "--feature_bank_dtype",
                args.dtype,
                "--category",
                "bench",
            ]
        )
    )
    feature_bank.IN_MEMORY_BANK_BYTES = 0 if args.bank == "memmap" else 1 << 62
    extractor = settings.features.build_extractor()
    data = RandomImages(args.images, args.imagesize)
    with torch.no_grad():
        grid = extractor(data[0]["image"][None]).shape[1:]
    bank_bytes = args.images * int(torch.tensor(grid).prod()) * (2 if args.dtype == "float16" else 4)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        out_dir, scratch = Path(tmp) / "out", Path(tmp) / "scratch"
        out_dir.mkdir()
        scratch.mkdir()
        gc.collect()
        base = rss_bytes()
        resettable = reset_peak_rss()
        t = time.perf_counter()
        bank = pipeline.build_coresets(settings, extractor, data, out_dir, scratch)
        seconds = time.perf_counter() - t
        peak = peak_rss_bytes()
        del bank
    print(
        "RESULT "
        + json.dumps(
            {
                "bank_bytes": bank_bytes,
                "base_rss": base,
                "peak_rss": peak,
                "peak_reset": resettable,
                "seconds": seconds,
                "grid": list(grid),
            }
        ),
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="R18")
    p.add_argument("--imagesize", type=int, default=224)
    p.add_argument("--images", type=int, default=240, help="training images")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="--feature_bank_dtype")
    p.add_argument(
        "--bank",
        default="memory",
        choices=("memory", "memmap"),
        help="bank in RAM or memory-mapped (the pipeline memory-maps banks over 4 GiB)",
    )
    p.add_argument("-p", type=float, default=0.002, help="--subsampling_percentage")
    p.add_argument("--dist_coreset_size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="--accelerator of the child")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scratch", default=None, help="folder for the memory map (default: the system's)")
    p.add_argument("--no_goals", action="store_true", help="report missed goals without failing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    print(f"machine: {machine()}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [a for a in (argv or sys.argv[1:])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed with exit code {proc.returncode}")
    r = json.loads(lines[-1][len("RESULT ") :])
    scale = 1 if sys.platform == "darwin" else 1024
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    peak = r["peak_rss"] if r["peak_reset"] else maxrss
    bank, base = r["bank_bytes"], r["base_rss"]
    rows, cols, dim = r["grid"]
    print(
        f"stage: {args.backbone} at {args.imagesize} px ({rows}x{cols}x{dim}), {args.images} images, "
        f"{args.dtype} bank in {args.bank}: {gib(bank)}; {r['seconds']:.0f} s"
    )
    print(f"resident memory: {mib(base)} before the stage, peak {mib(peak)} during it (child ru_maxrss {mib(maxrss)})")
    print(f"peak / bank: {peak / bank:.2f}x including the process baseline")
    code = goals.check({"memory_bank": (peak - base) / bank}, enforce=not args.no_goals)
    print(
        f"coreset stage peak resident memory: {(peak - base) / bank:.2f}x the feature bank "
        f"(above the process baseline; goal {goals.GOALS['memory_bank']}x)"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
