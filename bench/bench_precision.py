#!/usr/bin/env python
"""``--precision bf16-mixed`` against ``32-true``: the test stage per image and one MLP
training step, each path as the product runs it, in one run; and each bfloat16 figure over
its FLOP bound at the bfloat16 rate measured in the same run.

- Rates: the matrix product of issue 18's table, ``(3600 x 4096) @ (4096 x 2048)`` (the shape
  of the MLP's hidden layers over a test image's windows), in float32 and in bfloat16
  (``torch.mm``), measured before and after the timed work (the larger of the two readings).
- Test stage per image: what ``trainer.test`` runs per image
  (``pni.lightning.ScoringModule.test_step`` around ``pni.model.PNIModel.score``: backbone
  and patch aggregation, the neighbourhood MLP over every interior window, the PNI scoring),
  under ``pni.precision.autocast`` as Lightning's plugin enters it. The backbone is random
  (no download), the coresets are drawn from its features (``bench_inference.py``).
- One MLP training step: what one ``NeighbourhoodModule`` training step runs: a batch of
  windows built by ``pni.lightning.WindowCollate`` from a feature bank (in the dtype the
  precision builds them in), forward and cross-entropy under autocast, backward, and Adam
  with the precision's options (``pni.precision.adam_options``).
- FLOP bounds: the matrix products and convolutions counted with
  ``torch.utils.flop_counter.FlopCounterMode``; the bound of a bfloat16 figure puts the
  backbone's and the MLP's FLOPs at the bfloat16 rate and the scoring's distance products
  (float32 in every precision) at the float32 rate.

The two precisions are timed in turns, image after image and step after step (the fastest
of each), since absolute times on a shared machine drift. Default sizes are the paper's:
WR101 features of a 480 px image (60x60 grid), E = 1024, dp = 4 (80 x 1024 = 81,920 inputs),
10 layers, D = 2048, batches of 2048 windows. The goals (``bench/goals.py``) hold on a CPU
with bf16 matrix units (``pni.precision.cpu_bf16_units``); elsewhere the benchmark says so in
one line and enforces none of them. Last line: the ratios.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401
import goals
import numpy as np
import torch
import torch.nn.functional as F
from bench_inference import artefacts_from_features
from common import add_device_flag, best, machine, pick_device, sync, timeit
from torch.utils.flop_counter import FlopCounterMode

from pni.distributions import NeighbourhoodMLP
from pni.features import build_feature_extractor
from pni.lightning import ScoringModule, WindowCollate
from pni.model import PNIModel
from pni.precision import adam_options, autocast, compute_dtype, cpu_bf16_units
from pni.scoring import MAP_NAMES, ScoringConfig

PRECISIONS = ("32-true", "bf16-mixed")
RATE_SHAPE = (3600, 4096, 2048)  # issue 18's table: (3600 x 4096) @ (4096 x 2048)


def matmul_rate(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int] = RATE_SHAPE) -> float:
    """Measured FLOP/s of one ``(m x k) @ (k x n)`` product in ``dtype`` on ``device``."""
    m, k, n = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    t = best(timeit(lambda: a @ b, device, repeats=3, warmup=1))
    return 2.0 * m * k * n / t


def top_ops(fn, rows: int = 10) -> str:
    """The operators of one call of ``fn`` by self CPU time (torch.profiler), as lines."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return "\n".join(
        f"    {e.key:<40} {e.self_cpu_time_total / 1e6:7.2f} s  {100 * e.self_cpu_time_total / total:5.1f}%  x{e.count}"
        for e in events[:rows]
    )


def flops_of(fn) -> tuple[float, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="WR101")
    p.add_argument("--imagesize", type=int, default=480)
    p.add_argument("--dim", type=int, default=1024, help="target_embed_dimension E")
    p.add_argument("--dist_padding", type=int, default=4)
    p.add_argument("--num_layers", type=int, default=10)
    p.add_argument("--dcs", type=int, default=2048, help="distribution coreset size D")
    p.add_argument("--batch", type=int, default=2048, help="windows per training step (--dist_batchsize)")
    p.add_argument("--bank_images", type=int, default=16, help="images in the training step's feature bank")
    p.add_argument("--train_images", type=int, default=200, help="sizes the coresets (1%% of the patches)")
    p.add_argument("--images", type=int, default=2, help="timed test images per precision (after a warm-up)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per precision (after a warm-up)")
    p.add_argument("--no_goals", action="store_true", help="report missed goals without failing")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print the operators of one bf16 test image and one bf16 training step by self CPU time",
    )
    add_device_flag(p)
    args = p.parse_args(argv)
    device = pick_device(args)
    print(f"machine: {machine(device)}")
    units = cpu_bf16_units() if device.type == "cpu" else "GPU"
    enforce = not args.no_goals and device.type == "cpu" and units is not None
    if device.type == "cpu" and units is None:
        print("this CPU has no bf16 matrix units: bf16-mixed is measured, no bf16 goal is enforced")
    elif device.type != "cpu":
        print("the goals are for CPUs: measured on a GPU, none enforced")

    pp = 2
    extractor = build_feature_extractor(args.backbone, ("layer2", "layer3"), 1024, args.dim, 5, random_init=True)
    extractor.to(device)
    with torch.no_grad():
        feats0 = extractor(torch.randn(1, 3, args.imagesize, args.imagesize, device=device))
    rows, cols = feats0.shape[1:3]
    p_all, p_int = rows * cols, (rows - 2 * pp) * (cols - 2 * pp)
    k1 = max(args.dcs, int(0.01 * args.train_images * p_int))
    k2 = int(0.01 * args.train_images * p_all)
    n_win = (2 * args.dist_padding + 1) ** 2 - 1
    torch.manual_seed(0)
    mlp = NeighbourhoodMLP(n_win * args.dim, args.dcs, args.num_layers).to(device)
    art = artefacts_from_features(feats0[0], k1, k2, args.dcs).to(device)
    model = PNIModel(extractor, mlp, art, ScoringConfig(imagesize=args.imagesize), args.dist_padding, args.imagesize)
    model.to(device)
    print(
        f"size: {args.backbone} at {args.imagesize} px ({rows}x{cols} grid, {p_int} interior windows of "
        f"{n_win}x{args.dim}), MLP {args.num_layers} layers -> {args.dcs}, K1={k1}, K2={k2}, training batch "
        f"{args.batch} from a bank of {args.bank_images} images, device={device}, bf16 units: {units}"
    )

    # ------------------------------------------------------------ test stage: FLOPs per part
    outputs: dict[str, list] = {name: [] for name in PRECISIONS}
    current = {"name": PRECISIONS[0]}

    def sink(meta, result):
        outputs[current["name"]].append({m: result.maps[m].float().cpu() for m in MAP_NAMES})

    module = ScoringModule(model, sink)
    x0 = torch.randn(1, 3, args.imagesize, args.imagesize, device=device)
    with torch.no_grad():
        backbone_flops, feats = flops_of(lambda: extractor(x0))
        mlp_flops, logits = flops_of(lambda: model.nb_logits(feats[0]))
        scorer = model.scorer(feats.shape[1], feats.shape[2], device)  # what PNIModel.score derives once
        scoring_flops, _ = flops_of(lambda: scorer(feats[0], logits))

    def test_parts(precision: str, x: torch.Tensor, parts: dict[str, float]) -> None:
        """The test image's parts one by one (fastest of the calls), as ``PNIModel.score`` runs them."""
        mlp.eval()  # as at test time (the training steps set it to train)
        with torch.no_grad(), autocast(precision, device.type):
            t_features, feats = timed(lambda: extractor(x), device)
            t_mlp, logits = timed(lambda: model.nb_logits(feats[0]), device)
            with torch.autocast(device.type, enabled=False):
                scorer = model.scorer(feats.shape[1], feats.shape[2], device)
                t_scoring, _ = timed(lambda: scorer(feats[0], logits.float()), device)
        times = {"backbone + aggregation": t_features, "MLP": t_mlp, "scoring": t_scoring}
        for k, v in times.items():
            parts[k] = min(parts.get(k, float("inf")), v)

    def test_image(precision: str, x: torch.Tensor) -> float:
        current["name"] = precision
        mlp.eval()  # as at test time: no dropout, running BatchNorm statistics, weights cast once
        batch = {"image": x, "label": torch.zeros(1), "stem": ["x"], "defect_type": ["good"]}
        with autocast(precision, device.type):
            return timed(lambda: module.test_step(batch, 0), device)[0]

    # ------------------------------------------------------------ training step
    gen = np.random.default_rng(0)
    bank = gen.standard_normal((args.bank_images, rows, cols, args.dim), dtype=np.float32)
    bank = np.abs(bank, out=bank)  # features after ReLU and pooling are non-negative
    labels = gen.integers(0, args.dcs, size=(args.bank_images, p_int))
    collates = {
        name: WindowCollate(bank, labels, pp, args.dist_padding, "original", compute_dtype(name)) for name in PRECISIONS
    }
    optimizers = {
        name: torch.optim.Adam(mlp.parameters(), lr=1e-3, **adam_options(name, device.type)) for name in PRECISIONS
    }
    ids_gen = torch.Generator().manual_seed(0)

    def training_step(precision: str, parts: dict[str, float] | None = None) -> float:
        mlp.train()
        ids = torch.randint(0, labels.size, (args.batch,), generator=ids_gen).tolist()
        t_windows, (x, y) = timed(lambda: collates[precision](ids), device)
        x, y = x.to(device), y.to(device)
        with autocast(precision, device.type):
            t_forward, loss = timed(lambda: F.cross_entropy(mlp(x), y), device)
        t_backward, _ = timed(loss.backward, device)

        def step():
            optimizers[precision].step()
            optimizers[precision].zero_grad()

        t_optimizer, _ = timed(step, device)
        times = {"windows": t_windows, "forward": t_forward, "backward": t_backward, "optimizer": t_optimizer}
        if parts is not None:
            for k, v in times.items():
                parts[k] = min(parts.get(k, float("inf")), v)
        return sum(times.values())

    def count_training_flops() -> float:
        mlp.train()
        ids = torch.randint(0, labels.size, (args.batch,), generator=ids_gen).tolist()
        x, y = collates["32-true"](ids)
        flops, _ = flops_of(lambda: F.cross_entropy(mlp(x.to(device)), y.to(device)).backward())
        mlp.zero_grad()
        return flops

    train_flops = count_training_flops()

    # ------------------------------------------------------------ timed, in turns
    dtypes = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
    rates = {name: matmul_rate(device, dtypes[name]) for name in PRECISIONS}
    images = [torch.randn(1, 3, args.imagesize, args.imagesize, device=device) for _ in range(args.images + 1)]
    test_times: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    test_part_times: dict[str, dict[str, float]] = {name: {} for name in PRECISIONS}
    for i, x in enumerate(images):
        for name in PRECISIONS:
            t = test_image(name, x)
            if i > 0:  # the first image warms up
                test_times[name].append(t)
                test_parts(name, x, test_part_times[name])
    step_times: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    parts: dict[str, dict[str, float]] = {name: {} for name in PRECISIONS}
    for i in range(args.steps + 1):
        for name in PRECISIONS:
            t = training_step(name, parts[name] if i > 0 else None)
            if i > 0:
                step_times[name].append(t)
    rates = {name: max(rates[name], matmul_rate(device, dtypes[name])) for name in PRECISIONS}

    # ------------------------------------------------------------ figures
    test = {name: min(v) for name, v in test_times.items()}
    train = {name: min(v) for name, v in step_times.items()}
    fp32_rate, bf16_rate = rates["32-true"], rates["bf16-mixed"]
    test_bound = (backbone_flops + mlp_flops) / bf16_rate + scoring_flops / fp32_rate
    train_bound = train_flops / bf16_rate
    rm, rk, rn = RATE_SHAPE
    print(
        f"matrix-product rate ({rm}x{rk} @ {rk}x{rn} torch.mm): float32 {fp32_rate / 1e9:.0f} GFLOP/s, bfloat16 "
        f"{bf16_rate / 1e9:.0f} GFLOP/s ({bf16_rate / fp32_rate:.1f}x)"
    )
    print(
        f"test image: backbone + aggregation {backbone_flops / 1e9:.0f} GFLOP, MLP {mlp_flops / 1e9:.0f} GFLOP, "
        f"scoring {scoring_flops / 1e9:.0f} GFLOP (float32); bf16 bound {test_bound:.2f} s"
    )
    for name in PRECISIONS:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in test_part_times[name].items())
        print(
            f"  {name}: {test[name]:.2f} s per image (runs: {', '.join(f'{t:.2f}' for t in test_times[name])}; "
            f"fastest part times: {detail})"
        )
    print(f"training step: {train_flops / 1e9:.0f} GFLOP (forward + backward); bf16 bound {train_bound:.2f} s")
    for name in PRECISIONS:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in parts[name].items())
        print(f"  {name}: {train[name]:.2f} s per step (fastest part times: {detail})")
    first = outputs["32-true"][: args.images + 1]
    mixed = outputs["bf16-mixed"][: args.images + 1]
    diffs = []
    for m in MAP_NAMES:
        diff = max(float((a[m] - b[m]).abs().max()) for a, b in zip(first, mixed))
        top = max(float(a[m].abs().max()) for a in first)
        diffs.append(f"{m} {diff / top:.1e}")
    print(
        "bf16-mixed maps against 32-true, largest difference over the largest value (random weights and "
        f"artefacts, so masks flip on near ties: not an accuracy figure): {', '.join(diffs)}"
    )

    # issue 18's table, re-measured (docs/PERFORMANCE.md, "Precision")
    a, b = test_part_times["32-true"], test_part_times["bf16-mixed"]
    table = [
        ("operation", "float32", "bf16 (autocast)", "ratio"),
        (
            f"{rm}x{rk} @ {rk}x{rn} matmul",
            f"{fp32_rate / 1e9:,.0f} GFLOP/s",
            f"{bf16_rate / 1e9:,.0f} GFLOP/s",
            f"{bf16_rate / fp32_rate:.1f}x",
        ),
        (
            f"the MLP over {(rows - 2 * args.dist_padding) * (cols - 2 * args.dist_padding):,} windows (inference)",
            f"{a['MLP']:.2f} s",
            f"{b['MLP']:.2f} s",
            f"{a['MLP'] / b['MLP']:.1f}x",
        ),
        (
            f"{args.backbone} forward + aggregation, {args.imagesize} px",
            f"{a['backbone + aggregation']:.2f} s",
            f"{b['backbone + aggregation']:.2f} s",
            f"{a['backbone + aggregation'] / b['backbone + aggregation']:.1f}x",
        ),
    ] + [
        (what, f"{t['32-true']:.2f} s", f"{t['bf16-mixed']:.2f} s", f"{t['32-true'] / t['bf16-mixed']:.1f}x")
        for what, t in (("test stage per image", test), (f"MLP training step ({args.batch} windows)", train))
    ]
    print("\n".join(["| " + " | ".join(r) + " |" for r in table[:1]] + ["|---|---|---|---|"]))
    print("\n".join("| " + " | ".join(r) + " |" for r in table[1:]))
    if args.profile:
        test_image("bf16-mixed", images[0])  # the MLP's inference-cast weights, again after training
        print("one bf16-mixed test image, operators by self CPU time:")
        print(top_ops(lambda: test_image("bf16-mixed", images[0])))
        print(f"one bf16-mixed training step of {args.batch} windows, operators by self CPU time:")
        print(top_ops(lambda: training_step("bf16-mixed")))

    values = {
        "precision_test_speedup": test["32-true"] / test["bf16-mixed"],
        "precision_training_speedup": train["32-true"] / train["bf16-mixed"],
        "precision_test_flop_bound": test["bf16-mixed"] / test_bound,
        "precision_training_flop_bound": train["bf16-mixed"] / train_bound,
    }
    code = goals.check(values, enforce=enforce)
    print(
        f"precision: bf16-mixed test stage {values['precision_test_speedup']:.2f}x faster "
        f"(goal {goals.GOALS['precision_test_speedup']}x), MLP training step "
        f"{values['precision_training_speedup']:.2f}x (goal {goals.GOALS['precision_training_speedup']}x); "
        f"{values['precision_test_flop_bound']:.2f}x and {values['precision_training_flop_bound']:.2f}x their "
        f"bf16 FLOP bounds (goal {goals.GOALS['precision_test_flop_bound']}x)"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
