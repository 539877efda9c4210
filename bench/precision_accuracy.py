#!/usr/bin/env python
"""Accuracy of ``--precision bf16-mixed`` against ``32-true``, from the CLIs as a user runs them.

For each case (the demo's four categories with the demo's settings, and ``board`` at 256 px
with a random WR50, dp 4, E 1024 and a 10-layer MLP), and for each precision, in folders of
their own: ``train_coreset_distribution.py`` with every ``--train_*`` flag and ``--precision``,
then ``export_model.py`` with the same flags, calibrated on good images of another seed of
the generator (as the demo does). Printed as Markdown: every map's P- and I-AUROC side by
side (from ``score_result.csv``), the largest difference between the two runs' maps (over all
test images, also relative to the float32 map's largest value), and how many test images'
verdicts (image score above the bundle's calibrated image threshold) differ between the two.

    PYTHONPATH=$PWD python bench/precision_accuracy.py --output /tmp/pni_precision
    python bench/precision_accuracy.py --output DIR --cases large --num_epochs 2

A few minutes for the demo's categories on 2 CPU cores; the large case is the slow one (two
MLP trainings at the paper's MLP size). Figures vary with the machine only through the
arithmetic (same seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401
import numpy as np
from common import ROOT, machine

PRECISIONS = ("32-true", "bf16-mixed")
MAPS = ("nb", "coor", "patchcore", "nb_coor")

# scripts/demo.sh's PNI_FLAGS (random backbone: nothing is downloaded)
DEMO_FLAGS = (
    "--backbone R18 --random_init --resize 128 --imagesize 128 --layer_index layer2 --patchsize 3 "
    "--pretrain_embed_dimension 256 --target_embed_dimension 256 --subsampling_percentage 0.1 "
    "--dist_coreset_size 128 --dist_padding 1 --num_layers 3 --num_epochs 4 --step_size 3 "
    "--dist_batchsize 256 --blursigma 2 --seed 22"
).split()
# issue 18's larger case: a WR50-sized random backbone at 256 px, the paper's MLP (dp 4, E 1024, 10 layers)
LARGE_FLAGS = (
    "--backbone WR50 --random_init --resize 256 --imagesize 256 --dist_padding 4 --num_layers 10 "
    "--subsampling_percentage 0.01 --dist_coreset_size 2048 --dist_batchsize 2048 --seed 22"
).split()
DEMO_CATEGORIES = ("texture", "layered", "stripes", "board")


def run(cmd: list[str], log: Path) -> None:
    """Run a CLI of this repository; its output goes to ``log``; a failure stops the script."""
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def make_data(out: Path, name: str, size: int, num_train: int, num_test: int, categories) -> tuple[Path, Path]:
    """The test dataset and a calibration dataset (another seed) of ``categories``."""
    data, calib = out / f"data_{name}", out / f"calib_{name}"
    for path, seed in ((data, 0), (calib, 1)):
        if not (path / "synthetic.json").is_file():
            run(
                ["-m", "pni.data.synthetic", "--output_path", str(path), "--image_size", str(size), "--num_train",
                 str(num_train), "--num_test_per_type", str(num_test), "--seed", str(seed), "--categories",
                 *categories],
                out / "log.txt",
            )  # fmt: skip
    return data, calib


def one_run(out: Path, data: Path, calib: Path, category: str, flags: list[str], precision: str) -> dict:
    """Train, test and export one category under ``precision``; returns what the table needs."""
    root = out / precision
    root.mkdir(parents=True, exist_ok=True)
    common_flags = ["--dataset_path", str(data), "--category", category, "--project_root_path", str(root / "result"),
                    "--embedding_root_path", str(root), "--precision", precision, *flags]  # fmt: skip
    t = time.perf_counter()
    run(["train_coreset_distribution.py", "--train_coreset", "--train_nb_dist", "--train_coor_dist", *common_flags],
        out / "log.txt")  # fmt: skip
    seconds = time.perf_counter() - t
    bundle = root / f"bundle_{category}"
    run(["export_model.py", *common_flags, "--output", str(bundle), "--calibration_dir",
         str(calib / category / "train" / "good")], out / "log.txt")  # fmt: skip
    return read_run(root / "result", category, flags, bundle, seconds)


def test_stage_only(out: Path, data: Path, category: str, flags: list[str]) -> dict:
    """The test stage alone under bf16-mixed on the 32-true run's artefacts (the inference
    arithmetic without the training's different paths); verdicts at the 32-true bundle's
    thresholds."""
    root32 = out / "32-true"
    project = out / "bf16-mixed_test_only" / "result"
    run(["train_coreset_distribution.py", "--dataset_path", str(data), "--category", category, "--project_root_path",
         str(project), "--embedding_root_path", str(root32), "--precision", "bf16-mixed", *flags],
        out / "log.txt")  # fmt: skip
    return read_run(project, category, flags, root32 / f"bundle_{category}", 0.0)


def read_run(project: Path, category: str, flags: list[str], bundle: Path, seconds: float) -> dict:
    """What the table needs of the latest test run of ``category`` in ``project``, verdicts
    at ``bundle``'s calibrated image thresholds."""
    backbone = flags[flags.index("--backbone") + 1]
    runs = sorted(
        (project / category / backbone / "anomaly" / "lightning_logs").glob("version_*"),
        key=lambda p: int(p.name.split("_")[1]),
    )
    version = runs[-1]
    with open(project / "score_result.csv", newline="") as fh:
        row = [r for r in csv.DictReader(fh) if r["category"] == category and r["version"] == version.name][-1]
    with open(version / "image_scores.csv", newline="") as fh:
        images = list(csv.DictReader(fh))
    thresholds = json.loads((bundle / "manifest.json").read_text())["thresholds"]
    return {
        "seconds": seconds,
        "sample": version / "sample",
        "auroc": {f"{m}_{k}": 100 * float(row[f"{m}_{k}"]) for m in MAPS for k in ("P-AUROC", "I-AUROC")},
        "verdicts": {
            m: {f"{r['defect_type']}_{r['stem']}": float(r[m]) > thresholds[m]["image"]["value"] for r in images}
            for m in MAPS
        },
    }


def compare(case: str, category: str, a: dict, b: dict) -> list[str]:
    """Table rows of one category: per map, AUROCs side by side, largest map difference, changed verdicts."""
    rows = []
    for m in MAPS:
        files = sorted(a["sample"].glob(f"*_amap_{m}.npy"))
        diff = max(float(np.abs(np.load(f) - np.load(b["sample"] / f.name)).max()) for f in files)
        top = max(float(np.abs(np.load(f)).max()) for f in files)
        changed = sum(a["verdicts"][m][k] != b["verdicts"][m][k] for k in a["verdicts"][m])
        pa, pb = a["auroc"][f"{m}_P-AUROC"], b["auroc"][f"{m}_P-AUROC"]
        ia, ib = a["auroc"][f"{m}_I-AUROC"], b["auroc"][f"{m}_I-AUROC"]
        rows.append(
            f"| {case} | {category} | {m} | {pa:.2f} | {pb:.2f} | {pb - pa:+.2f} "
            f"| {ia:.2f} | {ib:.2f} | {ib - ia:+.2f} | {diff:.2e} ({diff / top:.1e}) "
            f"| {changed} of {len(a['verdicts'][m])} |"
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="work folder (datasets, runs, bundles, log.txt)")
    p.add_argument("--cases", default="demo,large", help="comma-separated: demo, large")
    p.add_argument("--num_epochs", type=int, default=1, help="MLP epochs of the large case")
    p.add_argument("--large_train", type=int, default=12, help="training images of the large case")
    p.add_argument("--large_test", type=int, default=6, help="test images per type (and good) of the large case")
    p.add_argument(
        "--test_stage_only",
        action="store_true",
        help="also score each case's test set under bf16-mixed with the 32-true artefacts (rows 'bf16 test "
        "stage only': the inference arithmetic alone, verdicts at the 32-true thresholds)",
    )
    p.add_argument(
        "--demo_test",
        type=int,
        default=4,
        help="test images per type (and good) of the demo's categories (4 as the demo; more for AUROCs that "
        "mean something)",
    )
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    cases = []
    if "demo" in args.cases.split(","):
        data, calib = make_data(out, "demo", 128, 16, args.demo_test, DEMO_CATEGORIES)
        cases += [("demo", data, calib, c, DEMO_FLAGS) for c in DEMO_CATEGORIES]
    if "large" in args.cases.split(","):
        data, calib = make_data(out, "large", 256, args.large_train, args.large_test, ["board"])
        flags = LARGE_FLAGS + ["--num_epochs", str(args.num_epochs), "--step_size", str(max(1, args.num_epochs))]
        cases.append(("board 256 px, WR50, dp 4, 10 layers", data, calib, "board", flags))
    table = [
        "| case | category | map | P-AUROC 32-true | bf16-mixed | diff | I-AUROC 32-true | bf16-mixed | diff "
        "| largest map difference (of the largest value) | image verdicts changed |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    times = []
    for case, data, calib, category, flags in cases:
        results = {
            prec: one_run(out / case.split()[0], data, calib, category, list(flags), prec) for prec in PRECISIONS
        }
        table += compare(case, category, results["32-true"], results["bf16-mixed"])
        if args.test_stage_only:
            alone = test_stage_only(out / case.split()[0], data, category, list(flags))
            table += compare(f"{case.split(',')[0]}, bf16 test stage only", category, results["32-true"], alone)
        times.append(f"{category}: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in results.items()))
        print("\n".join(table[-len(MAPS) * (2 if args.test_stage_only else 1) :]), flush=True)
    print("\nrun times (all stages, train_coreset_distribution.py): " + "; ".join(times))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
