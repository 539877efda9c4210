#!/usr/bin/env python
"""Greedy k-center coreset: time per greedy iteration of ``pni.coreset.greedy_order`` against
the time to stream the projected feature bank once through memory, in the same run.

One greedy iteration has to read every projected feature once (the distance of each point
to the newly chosen centre, by direct differences as the original's F.pairwise_distance),
so one pass over the bank is its lower bound. The stream time is the fastest of a plain
reduction (``points.sum()``) and a matrix-vector product (``points @ v``).

Default: N = 1,000,000 projected points of 128 dims (float32, 0.5 GB). The full-size
stage (400 training images of 480 px: 1.44 M points, d = 350 from Johnson-Lindenstrauss at
eps 0.9) is ``--n 1440000 --dim 350``. Last line: the ratio.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401
import goals
import torch
from common import add_device_flag, best, gib, machine, pick_device, sync, timeit

from pni.coreset import greedy_order, project_chunks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="projected feature rows")
    p.add_argument("--dim", type=int, default=128, help="projected dimension")
    p.add_argument("--iterations", type=int, default=100, help="timed greedy iterations")
    p.add_argument("--repeats", type=int, default=5, help="timed passes for the stream time")
    p.add_argument("--no_goals", action="store_true", help="report missed goals without failing")
    add_device_flag(p)
    args = p.parse_args(argv)
    device = pick_device(args)
    print(f"machine: {machine(device)}")
    g = torch.Generator().manual_seed(0)
    # The layout project_chunks() gives the greedy search (row-major), filled in chunks.
    chunk = 1 << 18
    points = project_chunks(
        (torch.randn(min(chunk, args.n - s), args.dim, generator=g) for s in range(0, args.n, chunk)),
        args.n,
        None,
        device,
    )
    nbytes = points.numel() * points.element_size()
    print(f"projected bank: {args.n} x {args.dim} float32 = {gib(nbytes)} on {device}")

    v = points[0].clone()
    t_sum = best(timeit(lambda: points.sum(), device, repeats=args.repeats))
    t_mv = best(timeit(lambda: points @ v, device, repeats=args.repeats))
    t_stream = min(t_sum, t_mv)
    print(
        f"one pass over the bank: sum {t_sum * 1e3:.1f} ms, matvec {t_mv * 1e3:.1f} ms "
        f"({nbytes / t_stream / 1e9:.1f} GB/s)"
    )

    def greedy(n_select):
        sync(device)
        t = time.perf_counter()
        greedy_order(points, n_select, 1)
        sync(device)
        return time.perf_counter() - t

    greedy(3)  # warm-up
    runs = []
    for _ in range(2):  # per iteration, without the one-off set-up (norms, buffers)
        runs.append((greedy(args.iterations + 1) - greedy(1)) / args.iterations)
    t_iter = best(runs)
    # the stream time once more, after the greedy runs (other load on the machine varies)
    t_stream = min(t_stream, best(timeit(lambda: points.sum(), device, repeats=args.repeats)))
    print(f"greedy: {t_iter * 1e3:.1f} ms per iteration (best of {len(runs)} runs of {args.iterations})")
    code = goals.check({"coreset_pass": t_iter / t_stream}, enforce=not args.no_goals)
    print(
        f"coreset greedy iteration: {t_iter / t_stream:.2f}x the time of one pass over the projected bank "
        f"(goal {goals.GOALS['coreset_pass']}x)"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
