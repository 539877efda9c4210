#!/usr/bin/env python
"""Prediction per image against the test stage's, on the same model and images, in one run;
the peak memory of ``predict.py`` at 10 and at 200 images; and onnxruntime against torch
per image, for the demo-size model and at the paper's sizes.

Set-up: the built-in dataset (``texture``), a small model trained on it (the demo's settings
by default: ResNet-18, random init, 128 px) and exported with ``export_model.py``. Then, in
this process, the test stage (``train_coreset_distribution.py`` without ``--train_*`` flags)
and ``predict.py`` each run on a small and a large test set of the same images; the time
per image is the difference of the two runs divided by the difference in images (model
loading, start-up and the other fixed costs cancel). Each side writes what it always
writes: the test stage its per-image ``.npy`` maps, JPEG heat maps and AUROCs, ``predict.py``
its overlay, mask and CSV rows. Memory: ``predict.py`` on 10 and on 200 images in batches of
the same size (so that the batch's working set is the same), the peak resident size of this
process during each run (reset before it).

onnxruntime (``--runtime onnxruntime``, the bundle exported with ``--onnx``, on
onnxruntime's CPUExecutionProvider) against torch (``--runtime torch --accelerator cpu``):
``predict.py`` in a fresh process per run, on the small and the large test set (time per
image from the difference, as above; peak memory: the large run's process). At the paper's
sizes (random WR101 at 480 px, E = 1024, dp = 4, 10 MLP layers, D = 2048, coresets for 200
training images at 1%, built as ``bench_inference.artefacts_from_features`` does; no
training, no download), :class:`~pni.deploy.onnx_runtime.OnnxScorer` against
:meth:`PNIModel.score` (``bench/score_worker.py``, one process each: seconds per image,
batch of one, after a warm-up image; peak memory, loading included), and how far their maps
and image scores lie apart. Both use their default intra-op threads (one per core). Last
line: the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401
import goals
import numpy as np
import torch
from bench_inference import artefacts_from_features
from common import ROOT, add_device_flag, machine, mib, peak_rss_bytes, pick_device, reset_peak_rss
from safetensors.torch import save_file

import export_model  # noqa: E402
import predict as predict_cli  # noqa: E402
import train_coreset_distribution as tcd  # noqa: E402
from pni.data.synthetic import make_dataset  # noqa: E402
from pni.deploy.onnx_export import export_onnx  # noqa: E402
from pni.distributions import NeighbourhoodMLP, window_count  # noqa: E402
from pni.features import build_feature_extractor  # noqa: E402
from pni.model import PNIModel  # noqa: E402
from pni.scoring import ScoringConfig  # noqa: E402

DEMO = [
    "--backbone",
    "R18",
    "--random_init",
    "--resize",
    "128",
    "--imagesize",
    "128",
    "--pretrain_embed_dimension",
    "256",
    "--target_embed_dimension",
    "256",
    "-p",
    "0.1",
    "--dist_coreset_size",
    "128",
    "--dist_padding",
    "2",
    "--num_layers",
    "3",
    "--num_epochs",
    "2",
    "--step_size",
    "3",
    "--dist_batchsize",
    "256",
    "--blursigma",
    "2",
    "--seed",
    "22",
]


def quiet(fn, *args):
    """Run ``fn(*args)`` with its progress bars and tables swallowed; exit code 0 required."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = fn(*args)
    if code != 0:
        raise SystemExit(f"{getattr(fn, '__module__', fn)} failed ({code}): {err.getvalue()[-2000:]}")


def timed(fn, *args) -> float:
    t = time.perf_counter()
    quiet(fn, *args)
    return time.perf_counter() - t


# predict.py in a fresh process that then writes its own peak resident memory (VmHWM) to a file:
# the rusage of a child counts the parent's memory at the fork, which exec does not reset.
_PREDICT_AND_PEAK = """
import sys
import predict
code = predict.main(sys.argv[2:])
with open("/proc/self/status") as fh:
    peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as fh:
    fh.write(str(peak))
sys.exit(code)
"""


def predict_in_process(argv: list[str], log: Path) -> tuple[float, int, int]:
    """``predict.py argv`` in a fresh process (output to ``log``): its wall seconds, exit code
    and peak resident memory (bytes; Linux)."""
    peak_file = log.with_suffix(".peak")
    with open(log, "w") as out:
        t = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-c", _PREDICT_AND_PEAK, str(peak_file), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        seconds = time.perf_counter() - t
    peak = int(peak_file.read_text()) if code == 0 else 0
    return seconds, code, peak


def predict_per_image(bundle: Path, sets: dict[str, Path], counts: dict[str, int], work: Path) -> dict[str, dict]:
    """``predict.py`` per image and peak memory for each runtime on the CPU, each run a fresh
    process: the small and the large test set, time per image from the difference."""
    out = {}
    for runtime in ("torch", "onnxruntime"):
        seconds, peak = {}, 0
        for name in ("small", "large"):
            folder = work / f"rt_{runtime}_{name}"
            argv = ["--model", str(bundle), "--input", str(sets[name] / "texture" / "test"), "--output", str(folder)]
            argv += ["--accelerator", "cpu", "--runtime", runtime]
            log = work / f"rt_{runtime}_{name}.log"
            seconds[name], code, peak = predict_in_process(argv, log)
            if code != 0:
                raise SystemExit(f"predict.py --runtime {runtime} failed ({code}): {log.read_text()[-2000:]}")
        per = (seconds["large"] - seconds["small"]) / (counts["large"] - counts["small"])
        out[runtime] = {"seconds": seconds, "per_image": per, "peak": peak}
    return out


def paper_model(
    backbone: str, imagesize: int, dim: int, dist_padding: int, num_layers: int, dcs: int, train_images: int
):
    """The paper-size model of ``bench_inference.py`` (random backbone, artefacts drawn from
    its features of a random image), and its sizes for ``score_worker.py``."""
    extractor = build_feature_extractor(backbone, ("layer2", "layer3"), 1024, dim, 5, random_init=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats = extractor(torch.randn(1, 3, imagesize, imagesize, generator=gen))
    pp = 2
    rows, cols = feats.shape[1:3]
    k1 = max(dcs, int(0.01 * train_images * (rows - 2 * pp) * (cols - 2 * pp)))
    k2 = int(0.01 * train_images * rows * cols)
    torch.manual_seed(0)
    mlp = NeighbourhoodMLP(window_count(dist_padding) * dim, dcs, num_layers).eval()
    art = artefacts_from_features(feats[0], k1, k2, dcs, pp=pp)
    model = PNIModel(extractor, mlp, art, ScoringConfig(imagesize=imagesize), dist_padding, imagesize)
    spec = dict(
        backbone=backbone,
        imagesize=imagesize,
        dim=dim,
        dist_padding=dist_padding,
        num_layers=num_layers,
        dcs=dcs,
        k1=k1,
        k2=k2,
        positions=rows * cols,
        grid=[rows, cols],
    )
    return model, spec


def paper_sizes(args: argparse.Namespace, work: Path) -> dict:
    """OnnxScorer against PNIModel.score at the paper's sizes, each in its own process."""
    folder = work / "paper"
    folder.mkdir()
    model, spec = paper_model(
        args.paper_backbone,
        args.paper_imagesize,
        args.paper_dim,
        args.paper_dist_padding,
        args.paper_num_layers,
        args.paper_dcs,
        args.paper_train_images,
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "state.safetensors"))
    (folder / "spec.json").write_text(json.dumps(spec))
    t = time.perf_counter()
    export_onnx(model, folder)
    export_seconds = time.perf_counter() - t
    del model
    gc.collect()
    graph = folder / "model.onnx"
    graph_bytes = graph.stat().st_size + sum(p.stat().st_size for p in folder.glob("model.onnx.data"))
    out = {"spec": spec, "export_seconds": export_seconds, "graph_bytes": graph_bytes}
    for runtime, model_file in (("torch", folder / "state.safetensors"), ("onnxruntime", graph)):
        cmd = [sys.executable, str(ROOT / "bench" / "score_worker.py"), "--runtime", runtime]
        cmd += ["--model", str(model_file), "--spec", str(folder / "spec.json")]
        cmd += ["--imagesize", str(spec["imagesize"]), "--images", str(args.paper_images)]
        cmd += ["--maps", str(folder / f"maps_{runtime}.npy")]
        log = folder / f"{runtime}.log"
        with open(log, "w") as stream:
            code = subprocess.call(cmd, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0:
            raise SystemExit(f"score_worker.py --runtime {runtime} failed ({code}): {log.read_text()[-2000:]}")
        out[runtime] = json.loads(log.read_text().strip().splitlines()[-1])
    want, got = np.load(folder / "maps_torch.npy"), np.load(folder / "maps_onnxruntime.npy")
    span = (want.max(axis=(2, 3)) - want.min(axis=(2, 3)))[..., None, None]
    out["map_difference"] = float((np.abs(got - want) / span).max())
    s_want, s_got = np.asarray(out["torch"]["scores"]), np.asarray(out["onnxruntime"]["scores"])
    out["score_difference"] = float((np.abs(s_got - s_want) / np.abs(s_want)).max())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image_size", type=int, default=128, help="size of the generated images")
    p.add_argument("--train", type=int, default=16, help="training images")
    p.add_argument("--small", type=int, default=4, help="test images per type (4 types) of the small run")
    p.add_argument("--large", type=int, default=16, help="test images per type of the large run")
    p.add_argument("--memory", type=int, nargs=2, default=(10, 200), help="image counts of the memory runs")
    p.add_argument(
        "--train_flags",
        default=" ".join(DEMO),
        help="train_coreset_distribution.py flags of the model (default: the demo's)",
    )
    g = p.add_argument_group("onnxruntime against torch at the paper's sizes (see bench_inference.py)")
    g.add_argument("--paper_backbone", default="WR101")
    g.add_argument("--paper_imagesize", type=int, default=480)
    g.add_argument("--paper_dim", type=int, default=1024, help="target_embed_dimension E")
    g.add_argument("--paper_dist_padding", type=int, default=4)
    g.add_argument("--paper_num_layers", type=int, default=10)
    g.add_argument("--paper_dcs", type=int, default=2048, help="distribution coreset size D")
    g.add_argument("--paper_train_images", type=int, default=200, help="sizes the coresets (1%% of the patches)")
    g.add_argument("--paper_images", type=int, default=2, help="timed images (after one warm-up image)")
    p.add_argument("--no_goals", action="store_true", help="report missed goals without failing")
    add_device_flag(p)
    args = p.parse_args(argv)
    device = pick_device(args)
    accelerator = {"cpu": "cpu", "cuda": "gpu"}.get(device.type, "auto")
    print(f"machine: {machine(device)}")
    flags = shlex.split(args.train_flags) + ["--accelerator", accelerator]
    work = Path(tempfile.mkdtemp(prefix="pni-bench-predict-"))
    try:
        sets = {}
        for name, per_type in (("small", args.small), ("large", args.large)):
            sets[name] = make_dataset(
                work / name,
                num_train=args.train,
                num_test_per_type=per_type,
                image_size=args.image_size,
                categories=["texture"],
            )
        n_small, n_large = 4 * args.small, 4 * args.large

        def train_argv(dataset: Path) -> list[str]:
            return [
                "--dataset_path",
                str(dataset),
                "--category",
                "texture",
                "--embedding_root_path",
                str(work),
                "--project_root_path",
                str(work / "result"),
            ] + flags

        quiet(tcd.main, train_argv(sets["large"]) + ["--train_coreset", "--train_nb_dist", "--train_coor_dist"])
        quiet(export_model.main, train_argv(sets["large"]) + ["--output", str(work / "bundle"), "--onnx"])
        print(
            f"model: {' '.join(flags)}; {args.train} training images; test sets of {n_small} and {n_large} "
            f"images of {args.image_size} px"
        )

        def predict_argv(dataset: Path, out: str) -> list[str]:
            return [
                "--model",
                str(work / "bundle"),
                "--input",
                str(dataset / "texture" / "test"),
                "--output",
                str(work / out),
                "--accelerator",
                accelerator,
            ]

        test_t = {name: timed(tcd.main, train_argv(sets[name])) for name in ("small", "large")}
        pred_t = {
            name: timed(predict_cli.main, predict_argv(sets[name], f"pred_{name}")) for name in ("small", "large")
        }
        per_test = (test_t["large"] - test_t["small"]) / (n_large - n_small)
        per_pred = (pred_t["large"] - pred_t["small"]) / (n_large - n_small)
        print(
            f"test stage: {test_t['small']:.2f} s ({n_small} images), {test_t['large']:.2f} s ({n_large}): "
            f"{1000 * per_test:.1f} ms per image"
        )
        print(
            f"predict.py: {pred_t['small']:.2f} s ({n_small} images), {pred_t['large']:.2f} s ({n_large}): "
            f"{1000 * per_pred:.1f} ms per image"
        )

        # Memory: predict.py on copies of the test images, the peak resident size of this process
        # during each run (reset before it; everything imported and cached is there already).
        pool = sorted((sets["large"] / "texture" / "test").rglob("*.png"))
        batch = max(1, min(8, min(args.memory) // 2))  # both runs fill whole batches: the same working set
        peaks = {}
        for count in args.memory:
            folder = work / f"inputs_{count}"
            folder.mkdir()
            for i in range(count):
                shutil.copy(pool[i % len(pool)], folder / f"{i:05d}.png")
            if not reset_peak_rss():
                raise SystemExit("the memory figure needs Linux (/proc/self/clear_refs)")
            quiet(
                predict_cli.main,
                [
                    "--model",
                    str(work / "bundle"),
                    "--input",
                    str(folder),
                    "--output",
                    str(work / f"mem_{count}"),
                    "--accelerator",
                    accelerator,
                    "--batch_size",
                    str(batch),
                ],
            )
            peaks[count] = peak_rss_bytes()
        low, high = args.memory
        print(
            f"predict.py peak memory (batches of {batch}): {mib(peaks[low])} at {low} images, {mib(peaks[high])} "
            f"at {high} images (this process, imports and the model included)"
        )

        # onnxruntime against torch: predict.py on the CPU, each run a fresh process
        runtimes = predict_per_image(work / "bundle", sets, {"small": n_small, "large": n_large}, work)
        graph_mib = (work / "bundle" / "model.onnx").stat().st_size / 2**20
        print(f"model.onnx of this model: {graph_mib:.1f} MiB; onnxruntime's execution provider: CPUExecutionProvider")
        for runtime, r in runtimes.items():
            print(
                f"predict.py --runtime {runtime} (CPU, fresh process): {r['seconds']['small']:.2f} s ({n_small} "
                f"images), {r['seconds']['large']:.2f} s ({n_large}): {1000 * r['per_image']:.1f} ms per image; "
                f"peak memory {mib(r['peak'])}"
            )

        # the paper's sizes
        paper = paper_sizes(args, work)
        spec = paper["spec"]
        print(
            f"paper's sizes: {spec['backbone']} at {spec['imagesize']} px ({spec['grid'][0]}x{spec['grid'][1]} grid), "
            f"E={spec['dim']}, dp={spec['dist_padding']}, MLP {spec['num_layers']} layers -> D={spec['dcs']}, "
            f"K1={spec['k1']}, K2={spec['k2']}; model.onnx {paper['graph_bytes'] / 2**20:.0f} MiB, exported in "
            f"{paper['export_seconds']:.0f} s"
        )
        for runtime in ("torch", "onnxruntime"):
            r = paper[runtime]
            print(
                f"  {r['runtime']}: {min(r['times']):.2f} s per image (runs: "
                f"{', '.join(f'{t:.2f}' for t in r['times'])}; loading {r['load']:.1f} s), peak memory "
                f"{mib(r['peak_rss'])}"
            )
        print(
            f"  maps within {paper['map_difference']:.1e} of their range, image scores within "
            f"{paper['score_difference']:.1e} relative (onnxruntime against torch)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    onnx_demo = runtimes["onnxruntime"]["per_image"] / runtimes["torch"]["per_image"]
    onnx_paper = min(paper["onnxruntime"]["times"]) / min(paper["torch"]["times"])
    values = {
        "predict_per_image": per_pred / per_test,
        "predict_memory": peaks[high] / peaks[low],
        "onnx_per_image": onnx_demo,
        "onnx_per_image_paper": onnx_paper,
    }
    code = goals.check(values, enforce=not args.no_goals)
    print(
        f"prediction per image: {values['predict_per_image']:.2f}x the test stage's (goal "
        f"{goals.GOALS['predict_per_image']}x); peak memory at {high} images {values['predict_memory']:.2f}x that "
        f"at {low} (goal {goals.GOALS['predict_memory']}x); onnxruntime per image {onnx_demo:.2f}x torch's, "
        f"{onnx_paper:.2f}x at the paper's sizes (goal {goals.GOALS['onnx_per_image']}x)"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
