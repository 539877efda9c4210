"""Command line of ``pixelwise_refinement.py``: refine a ravel folder, or train then refine."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

from pni import console
from pni.cli import ArgumentParser, parse_devices, run_cli
from pni.console import Progress
from pni.errors import PNIError
from pni.io import check_output_dir

from .geometry import GEOMETRIES, INPUT_SIZE, check_geometry
from .infer import check_refine_paths


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Pixel-wise refinement of anomaly maps in a ravel folder (PNI, docs/METHOD.md section 7). "
        "Without --train: load --checkpoint_path and refine --input_data_path into "
        "--output_data_path. With --train: train (from a ravel folder or synthetic defects on "
        "normal images), write --checkpoint_path, then refine if --output_data_path is given."
    )
    p.add_argument(
        "--category",
        nargs="+",
        default=["all"],
        help="categories to process, from the folder's index.csv (default: all)",
    )
    p.add_argument("--input_data_path", default=None, help="ravel folder to refine")
    p.add_argument("--output_data_path", default=None, help="ravel folder to write (must differ from input)")
    p.add_argument(
        "--blend_weight", type=float, default=0.1, help="output = blend*refined + (1-blend)*map (default 0.1)"
    )
    p.add_argument(
        "--geometry",
        choices=GEOMETRIES,
        default="aligned",
        help="aligned (default): the output lines up with image and mask, at the ravel size; "
        "original: the original code's crop, zoom and resizes (480 px output in the zoomed "
        "frame, masks rewritten to match; needs --image_size 320)",
    )
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu (default auto)")
    p.add_argument("--devices", default="auto", help="Lightning devices for training; inference uses one")
    p.add_argument(
        "--checkpoint_path", default="./refinement_model.pt", help="weights to load (inference) or to write (training)"
    )
    p.add_argument("--train", action="store_true", help="train the refinement model")
    p.add_argument(
        "--train_data",
        choices=("ravel", "synthetic"),
        default="ravel",
        help="training data: a ravel folder or synthetic defects on --normal_image_dir",
    )
    p.add_argument("--train_data_path", default=None, help="ravel folder to train on (default: --input_data_path)")
    p.add_argument(
        "--normal_image_dir",
        nargs="+",
        default=None,
        help="folder(s) of normal images for --train_data synthetic (searched recursively)",
    )
    p.add_argument(
        "--samples_per_image", type=int, default=4, help="synthetic samples per normal image per epoch (default 4)"
    )
    p.add_argument("--num_epochs", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument(
        "--image_size",
        type=int,
        default=INPUT_SIZE,
        help=f"model input size (multiple of 32; {INPUT_SIZE} with --geometry original)",
    )
    p.add_argument(
        "--backbone_weights",
        default=None,
        help="DenseNet-161 ImageNet weights for a fresh model (default: torch hub cache if present)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show everything: third-party warnings and Lightning's own output and progress bars",
    )
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Every check that needs no model or data, made before any work (PNIError naming the flag)."""
    if args.image_size <= 0 or args.image_size % 32:
        raise PNIError(f"--image_size must be a positive multiple of 32, got {args.image_size}")
    if args.batch_size < 1 or args.num_epochs < 1:
        raise PNIError("--batch_size and --num_epochs must be at least 1")
    if args.samples_per_image < 1:
        raise PNIError(f"--samples_per_image must be at least 1, got {args.samples_per_image}")
    if args.num_workers < 0:
        raise PNIError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not args.learning_rate > 0:
        raise PNIError(f"--learning_rate must be positive, got {args.learning_rate}")
    check_geometry(args.geometry, args.image_size)
    if args.train:
        check_output_dir(Path(args.checkpoint_path).resolve().parent, "--checkpoint_path")
    if args.output_data_path or not args.train:
        if not args.input_data_path or not args.output_data_path:
            raise PNIError("refining needs --input_data_path and --output_data_path")
        check_refine_paths(args.input_data_path, args.output_data_path, args.blend_weight)
        check_output_dir(args.output_data_path, "--output_data_path")


def run(args: argparse.Namespace) -> None:
    """Execute the parsed command (raises PNIError on user errors)."""
    import pytorch_lightning as pl  # heavy imports after parsing, so --help stays fast

    from .data import RavelRefinementDataset, SyntheticRefinementDataset
    from .infer import refine_ravel_folder
    from .model import build_fresh_model, load_refinement_checkpoint
    from .train import select_device

    check_flags(args)
    devices = parse_devices(args.devices)
    select_device(args.accelerator, devices)  # an unknown or absent accelerator stops here, before any work
    pl.seed_everything(args.seed, workers=True, verbose=False)
    if args.train:
        from .lightning import fit_refinement

        dataset: SyntheticRefinementDataset | RavelRefinementDataset
        if args.train_data == "synthetic":
            if not args.normal_image_dir:
                raise PNIError("--train_data synthetic needs --normal_image_dir")
            dataset = SyntheticRefinementDataset(
                args.normal_image_dir, args.image_size, args.samples_per_image, args.seed, args.geometry
            )
        else:
            path = args.train_data_path or args.input_data_path
            if not path:
                raise PNIError("--train_data ravel needs --train_data_path or --input_data_path")
            if args.output_data_path and not args.train_data_path:
                warnings.warn(
                    "training on the ravel folder that is then refined: its masks are the test "
                    "labels, so scores of the output are optimistic",
                    stacklevel=2,
                )
            dataset = RavelRefinementDataset(path, args.image_size, args.category, args.geometry)
        model = build_fresh_model(args.backbone_weights)
        with Progress(f"refinement: training for {args.num_epochs} epoch(s) on {len(dataset)} samples") as bar:
            model = fit_refinement(
                model,
                dataset,
                args.checkpoint_path,
                args.num_epochs,
                args.learning_rate,
                args.batch_size,
                args.accelerator,
                devices,
                args.num_workers,
                None if args.no_progress else bar,
            )
        print(f"wrote {args.checkpoint_path}")
        if not args.output_data_path:
            return
    else:
        model = load_refinement_checkpoint(args.checkpoint_path)
    with Progress(f"refinement: refining the maps of {args.input_data_path}") as bar:
        n = refine_ravel_folder(
            model,
            args.input_data_path,
            args.output_data_path,
            args.category,
            args.blend_weight,
            args.image_size,
            args.geometry,
            select_device(args.accelerator, devices),
            args.batch_size,
            args.num_workers,
            None if args.no_progress else bar,
        )
    print(f"refined {n} maps -> {args.output_data_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn ``PNIError`` into one stderr line and exit status 2."""
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    return run_cli(lambda: run(args), debug=args.debug)
