"""The benchmarks' goals, in one place.

Each benchmark measures its figures, then calls :func:`check`, which prints a line for every
goal it misses and returns the exit code: ``make bench`` (``bench/run_all.py``) fails when
any benchmark misses a goal, so a regression is seen. ``--no_goals`` (used by ``--quick``
and the smoke tests, whose tiny sizes say nothing) reports without failing.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    """``value <op> target``; ``what`` names the figure, ``unit`` follows the target in tables."""

    op: str  # ">=" or "<="
    target: float
    what: str
    unit: str = "x"

    def met(self, value: float) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.op](value, self.target)

    def __str__(self) -> str:
        return f"{self.op} {self.target:g}"


GOALS: dict[str, Goal] = {
    # bench_scoring.py: one 60x60 image at the paper's coreset sizes, on 2 CPU cores
    "scoring_vs_original": Goal(
        ">=", 15.0, "speed-up over the original's method (faiss k = all, mask loops)", "x vs the original"
    ),
    "scoring_flop_bound": Goal(
        "<=", 1.5, "scoring time over the FLOP bound of its distance products", "x the FLOP bound"
    ),
    "scoring_map_difference": Goal(
        "<=", 1e-5, "largest map difference from the original's method (float64 distances)", " map difference"
    ),
    "scoring_float64_difference": Goal(
        "<=", 1e-6, "largest map difference from float64 scoring rounded to float32, of the range", " of the range"
    ),
    # bench_coreset.py
    "coreset_pass": Goal("<=", 3.0, "greedy iteration over one pass over the projected bank", "x one pass"),
    # bench_inference.py
    "inference_flop_bound": Goal("<=", 2.0, "one test image end to end over its FLOP bound", "x the FLOP bound"),
    # bench_precision.py: bf16-mixed against 32-true at the paper's sizes, on a CPU with bf16 matrix units
    "precision_test_speedup": Goal(">=", 2.5, "test stage per image, 32-true over bf16-mixed", "x faster"),
    "precision_training_speedup": Goal(">=", 3.0, "MLP training step, 32-true over bf16-mixed", "x faster"),
    "precision_test_flop_bound": Goal(
        "<=", 1.5, "bf16-mixed test stage per image over its FLOP bound at the bf16 rate", "x the FLOP bound"
    ),
    "precision_training_flop_bound": Goal(
        "<=", 1.5, "bf16-mixed MLP training step over its FLOP bound at the bf16 rate", "x the FLOP bound"
    ),
    # bench_memory.py
    "memory_bank": Goal("<=", 1.5, "coreset stage peak memory over the feature bank", "x the bank"),
    # bench_predict.py
    "predict_per_image": Goal("<=", 1.2, "predict.py per image over the test stage per image", "x the test stage"),
    "predict_memory": Goal("<=", 1.1, "predict.py peak memory at 200 images over 10 images", "x at 10 images"),
    "onnx_per_image": Goal(
        "<=", 1.2, "predict.py --runtime onnxruntime per image over --runtime torch (CPUExecutionProvider)", "x torch"
    ),
    "onnx_per_image_paper": Goal(
        "<=", 1.2, "onnxruntime per image over torch at the paper's sizes (CPUExecutionProvider)", "x torch"
    ),
}


def describe(prefix: str) -> str:
    """The goals whose names start with ``prefix``, e.g. ``>= 15x vs the original``."""
    return ", ".join(f"{g}{g.unit}" for name, g in GOALS.items() if name.startswith(prefix))


def check(values: Mapping[str, float], enforce: bool = True) -> int:
    """Print ``goal missed: ...`` for every value that misses its goal; return 1 if one did
    and ``enforce``, else 0."""
    missed = [name for name, value in values.items() if not GOALS[name].met(value)]
    for name in missed:
        goal = GOALS[name]
        print(f"goal missed: {goal.what} is {values[name]:.3g}, goal {goal}" + ("" if enforce else " (not enforced)"))
    return 1 if missed and enforce else 0
