#!/usr/bin/env python
"""Prediction per image against the test stage's, on the same model and images, in one run;
and the peak memory of ``predict.py`` at 10 and at 200 images.

Set-up: the built-in dataset (``texture``), a small model trained on it (the demo's settings
by default: ResNet-18, random init, 128 px) and exported with ``export_model.py``. Then, in
this process, the test stage (``train_coreset_distribution.py`` without ``--train_*`` flags)
and ``predict.py`` each run on a small and a large test set of the same images; the time
per image is the difference of the two runs divided by the difference in images (model
loading, start-up and the other fixed costs cancel). Each side writes what it always
writes: the test stage its per-image ``.npy`` maps, JPEG heat maps and AUROCs, ``predict.py``
its overlay, mask and CSV rows. Memory: ``predict.py`` on 10 and on 200 images in batches of
the same size (so that the batch's working set is the same), the peak resident size of this
process during each run (reset before it). Last line: both ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import common  # noqa: F401
import goals
from common import add_device_flag, machine, mib, peak_rss_bytes, pick_device, reset_peak_rss

import export_model  # noqa: E402
import predict as predict_cli  # noqa: E402
import train_coreset_distribution as tcd  # noqa: E402
from pni.data.synthetic import make_dataset  # noqa: E402

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
        quiet(export_model.main, train_argv(sets["large"]) + ["--output", str(work / "bundle")])
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    values = {"predict_per_image": per_pred / per_test, "predict_memory": peaks[high] / peaks[low]}
    code = goals.check(values, enforce=not args.no_goals)
    print(
        f"prediction per image: {values['predict_per_image']:.2f}x the test stage's (goal "
        f"{goals.GOALS['predict_per_image']}x); peak memory at {high} images {values['predict_memory']:.2f}x that "
        f"at {low} (goal {goals.GOALS['predict_memory']}x)"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
