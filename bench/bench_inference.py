#!/usr/bin/env python
"""End-to-end inference per test image against its FLOP bound, in the same run.

One test image goes through what ``trainer.test`` runs per image
(``pni.lightning.ScoringModule.test_step`` around ``pni.model.PNIModel.score``): the backbone (WR101, random init, no
download) cut after layer3 and the patch aggregation, the neighbourhood MLP on every
interior window, and the PNI scoring (distance matrices, masks, resize + blur of the four
maps). The FLOPs of the matrix products and convolutions are counted with
``torch.utils.flop_counter.FlopCounterMode``; the bound is those FLOPs divided by the
measured rate of one large matrix product on the same device (``torch.mm``, same run).

Default: 320 px images (a 40x40 grid) to keep the run to about a minute on 2 cores; the
paper's size is ``--imagesize 480`` (60x60). Full-size model otherwise: E = 1024, dp = 4,
10 MLP layers, D = 2048 and coresets sized for 200 training images at 1%. Last line: the
ratio.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401
import goals
import torch
from common import add_device_flag, best, gemm_rate, machine, pick_device, sync
from torch.utils.flop_counter import FlopCounterMode

from pni.distributions import NeighbourhoodMLP, window_count
from pni.features import build_feature_extractor
from pni.lightning import ScoringModule
from pni.model import PNIModel
from pni.scoring import MAP_NAMES, ScoringArtefacts, ScoringConfig, score_image

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def artefacts_from_features(feats, k1, k2, dcs, pp=2, seed=0):
    """Coresets drawn from real extracted features (rows of ``feats`` (R, C, E) plus a little
    noise) and sparse normalised position priors: values like those of a trained model."""
    g = torch.Generator().manual_seed(seed)
    rows, cols, dim = feats.shape
    flat = feats.reshape(-1, dim).float().cpu()
    inner = feats[pp : rows - pp, pp : cols - pp].reshape(-1, dim).float().cpu()
    scale = 0.05 * flat.std()

    def draw(src, n):
        return src[torch.randint(0, len(src), (n,), generator=g)] + scale * torch.randn(n, dim, generator=g)

    emb1, emb2 = draw(inner, k1), draw(flat, k2)

    def prior(k):
        counts = torch.zeros(rows * cols, k)
        counts.scatter_add_(
            1, torch.randint(0, k, (rows * cols, 24), generator=g), torch.rand(rows * cols, 24, generator=g)
        )
        return counts / counts.sum(1, keepdim=True)

    return ScoringArtefacts.build(emb1, emb2, emb1[:dcs].clone(), prior(k1), prior(k2), chunk_size=2048)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="WR101")
    p.add_argument("--imagesize", type=int, default=320)
    p.add_argument("--dim", type=int, default=1024, help="target_embed_dimension E")
    p.add_argument("--dist_padding", type=int, default=4)
    p.add_argument("--num_layers", type=int, default=10)
    p.add_argument("--dcs", type=int, default=2048, help="distribution coreset size D")
    p.add_argument("--train_images", type=int, default=200, help="sizes the coresets (1%% of the patches)")
    p.add_argument("--images", type=int, default=2, help="timed images (after one warm-up image)")
    p.add_argument(
        "--precision",
        default="32",
        choices=("32", "bf16-mixed", "16-mixed"),
        help="autocast for the backbone and MLP (scoring stays float32); reports the map change",
    )
    p.add_argument("--no_goals", action="store_true", help="report missed goals without failing")
    add_device_flag(p)
    args = p.parse_args(argv)
    device = pick_device(args)
    print(f"machine: {machine(device)}")

    extractor = build_feature_extractor(args.backbone, ("layer2", "layer3"), 1024, args.dim, 5, random_init=True)
    pp = 2
    with torch.no_grad():
        rows, cols = extractor(torch.zeros(1, 3, args.imagesize, args.imagesize)).shape[1:3]
    p_all, p_int = rows * cols, (rows - 2 * pp) * (cols - 2 * pp)
    k1 = max(args.dcs, int(0.01 * args.train_images * p_int))
    k2 = int(0.01 * args.train_images * p_all)
    n_win = window_count(args.dist_padding)
    torch.manual_seed(0)
    mlp = NeighbourhoodMLP(n_win * args.dim, args.dcs, args.num_layers).eval().to(device)
    extractor.to(device)
    cfg = ScoringConfig(imagesize=args.imagesize)
    print(
        f"size: {args.backbone} at {args.imagesize} px ({rows}x{cols} grid, {p_int} interior windows of "
        f"{n_win}x{args.dim}), MLP {args.num_layers} layers -> {args.dcs}, K1={k1}, K2={k2}, device={device}, "
        f"precision {args.precision}"
    )

    outputs = []

    def sink(meta, result):
        outputs.append({m: result.maps[m].float().cpu() for m in MAP_NAMES})

    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, args.imagesize, args.imagesize, generator=gen) for _ in range(args.images + 1)]

    def step(x, precision="32"):
        batch = {"image": x.to(device), "label": torch.zeros(1), "stem": ["x"], "defect_type": ["good"]}
        if precision == "32":
            module.test_step(batch, 0)
        else:
            with torch.autocast(device.type, dtype=AUTOCAST[precision]):
                module.test_step(batch, 0)

    # Warm-up image: FLOPs and a per-part breakdown (each part on its own).
    x0 = images[0].to(device)
    parts = {}
    with torch.no_grad():
        for name, fn in (("backbone + aggregation", lambda: extractor(x0)),):
            with FlopCounterMode(display=False) as fc:
                sync(device)
                t = time.perf_counter()
                feats = fn()
                sync(device)
            parts[name] = (fc.get_total_flops(), time.perf_counter() - t)
        art = artefacts_from_features(feats[0], k1, k2, args.dcs).to(device)
        model = PNIModel(extractor, mlp, art, cfg, args.dist_padding, args.imagesize).to(device)
        module = ScoringModule(model, sink)
        with FlopCounterMode(display=False) as fc:
            t = time.perf_counter()
            logits = model.nb_logits(feats[0])
            sync(device)
        parts["neighbourhood MLP"] = (fc.get_total_flops(), time.perf_counter() - t)
        with FlopCounterMode(display=False) as fc:
            t = time.perf_counter()
            score_image(feats[0], logits, art, cfg)
            sync(device)
        parts["scoring"] = (fc.get_total_flops(), time.perf_counter() - t)
    flops = sum(f for f, _ in parts.values())
    rate = gemm_rate(device)

    times = []
    for x in images[1:]:
        sync(device)
        t = time.perf_counter()
        step(x, args.precision)
        sync(device)
        times.append(time.perf_counter() - t)
    rate = max(rate, gemm_rate(device))  # measured before and after the images
    t_img = best(times)
    bound = flops / rate
    print(f"matrix-multiply rate: {rate / 1e9:.1f} GFLOP/s (4096^3 float32 torch.mm)")
    for name, (f, t) in parts.items():
        print(f"  {name}: {f / 1e9:.1f} GFLOP, {t:.2f} s in the warm-up image (bound {f / rate:.2f} s)")
    print(
        f"per image: {t_img:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}); "
        f"{flops / 1e9:.1f} GFLOP -> bound {bound:.2f} s"
    )
    if args.precision != "32":
        ref = []
        for x in images[1:]:
            outputs.clear()
            step(x, "32")
            ref.append(outputs[-1])
        outputs_mixed = []
        for x in images[1:]:
            outputs.clear()
            step(x, args.precision)
            outputs_mixed.append(outputs[-1])
        diff = max(float((a[m] - b[m]).abs().max()) for a, b in zip(ref, outputs_mixed) for m in MAP_NAMES)
        top = max(float(a[m].abs().max()) for a in ref for m in MAP_NAMES)
        print(
            f"{args.precision}: max |map difference| against float32: {diff:.2e} ({diff / top:.1e} of the "
            f"largest map value; keep <= 1e-3)"
        )
    code = goals.check({"inference_flop_bound": t_img / bound}, enforce=not args.no_goals)
    print(f"inference per image: {t_img / bound:.2f}x the FLOP bound (goal {goals.GOALS['inference_flop_bound']}x)")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
