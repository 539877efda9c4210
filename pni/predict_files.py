"""``predict.py``'s file handling: input paths (files, folders, glob patterns) -> decoded
images -> the :class:`pni.predict.Predictor`'s scorer -> per-image overlays, masks and maps,
and ``predictions.csv``, ``regions.csv``, ``errors.csv`` in the output folder (see README,
"Use on your own images").

``--runtime torch`` scores with Lightning on its device (:func:`score_with_lightning`: the
Python API (:mod:`pni.predict`) runs without Lightning); ``--runtime onnxruntime`` in a
plain loop over batches (:func:`score_in_batches`), and then nothing here imports torch.
Decoding, preprocessing and everything after the maps are the same code for both."""

from __future__ import annotations

import glob
import itertools
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pni.cli import one_line
from pni.config import PredictSettings
from pni.console import Progress, render_table
from pni.data.images import IMAGE_EXTENSIONS, input_array, load_image
from pni.deploy.onnx_runtime import OnnxScorer
from pni.errors import PNIError
from pni.io import CsvStream, check_output_dir, make_dir, save_npy, write_csv
from pni.maps import MAP_NAMES, MapScores
from pni.predict import (
    ImageScorer,
    Predictor,
    check_choices,
    check_onnx_precision,
    load_scorer,
    onnx_batch_size,
    require_torch,
)
from pni.viz import save_jpeg, save_png

PREDICTION_COLUMNS = (
    "name",
    "path",
    "width",
    "height",
    "verdict",
    "map",
    "score",
    "score_normalised",
    "image_threshold",
    "pixel_threshold",
    "regions",
    "inspected_x0",
    "inspected_y0",
    "inspected_x1",
    "inspected_y1",
) + tuple(f"{m}_{k}" for m in MAP_NAMES for k in ("score", "normalised"))
SUMMARY_ROWS = 20
REGION_COLUMNS = ("name", "region", "x0", "y0", "x1", "y1", "area", "peak_score", "peak_normalised", "peak_x", "peak_y")


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (every image file below, sorted) and glob patterns -> the image paths
    (first occurrence kept) and ``(input, error)`` for inputs that name nothing."""
    paths: list[Path] = []
    missing: list[tuple[str, str]] = []
    for text in inputs:
        p = Path(text)
        if p.is_dir():
            found = sorted(
                q
                for q in p.rglob("*")
                if q.is_file()
                and q.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
            if not found:
                missing.append((text, f"no image files in folder {text}"))
            paths += found
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(text):
            found = sorted(Path(q) for q in glob.glob(text, recursive=True) if Path(q).is_file())
            if not found:
                missing.append((text, f"no file matches {text}"))
            paths += found
        else:
            missing.append((text, f"input not found: {text}"))
    return list(dict.fromkeys(paths)), missing


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct file-name-safe name per input, the same for the same inputs: its stem, or for
    stems that occur more than once its path below the common folder of those inputs, ``/``
    written ``__``. A name whose output files (``<name>.jpg``, ``<name>.png``,
    ``<name>_<map>.npy``; letter case ignored) another input's already have gets ``_<ext>``
    (the input's extension), then ``_2``, ``_3``..."""
    stems = [p.stem for p in paths]
    counts = Counter(stems)
    repeated = [p.resolve() for p, s in zip(paths, stems) if counts[s] > 1]
    if repeated:
        common = Path(os.path.commonpath([str(p.parent) for p in repeated]))
        stems = [
            s if counts[s] == 1 else "__".join(p.resolve().with_suffix("").relative_to(common).parts)
            for s, p in zip(stems, paths)
        ]
    taken: set[str] = set()
    names = []
    for path, stem in zip(paths, stems):
        extension = path.suffix.lstrip(".")
        candidates = itertools.chain(
            [stem], [f"{stem}_{extension}"] if extension else [], (f"{stem}_{k}" for k in itertools.count(2))
        )
        name = next(c for c in candidates if not _output_files(c) & taken)
        taken |= _output_files(name)
        names.append(name)
    return names


def _output_files(name: str) -> set[str]:
    """The files :class:`PredictionWriter` writes for ``name`` (case-folded, for file systems
    that ignore case)."""
    return {
        n.casefold()
        for n in (f"overlays/{name}.jpg", f"masks/{name}.png", *(f"maps/{name}_{m}.npy" for m in MAP_NAMES))
    }


class InputImages:
    """Decodes input images for prediction (a map-style dataset for torch's ``DataLoader``
    too). Items: ``image`` (the model's input, float32 ``(3, imagesize, imagesize)``),
    ``original`` (uint8 HxWx3), ``path``, ``index``, ``error`` (empty, or why the file could
    not be read: then ``image`` is zeros and the item is not scored)."""

    def __init__(self, paths: Sequence[Path], resize: int, imagesize: int) -> None:
        self.paths = list(paths)
        self.resize = resize
        self.size = imagesize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = str(self.paths[i])
        try:
            img = load_image(path)
            image = input_array(img, self.resize, self.size)
            return {"image": image, "original": np.asarray(img), "path": path, "index": i, "error": ""}
        except PNIError as exc:
            return {
                "image": np.zeros((3, self.size, self.size), np.float32),
                "original": None,
                "path": path,
                "index": i,
                "error": one_line(exc),
            }


def collate_inputs(items: list[dict]) -> dict:
    """Stack the input images as one tensor; keep originals, paths and errors as lists."""
    import torch

    return {
        "image": torch.from_numpy(np.stack([it["image"] for it in items])),
        "index": torch.tensor([it["index"] for it in items]),
        **{k: [it[k] for it in items] for k in ("original", "path", "error")},
    }


class PredictionWriter:
    """Called with each image's item (``path``, ``index``, ``original``, ``error``) and its
    :class:`~pni.maps.MapScores` (None: not readable); writes its outputs as they come (so
    memory does not grow with the number of images)."""

    def __init__(self, predictor: Predictor, out_dir: Path, names: Sequence[str], save_maps: bool) -> None:
        self.predictor = predictor
        self.out_dir = out_dir
        self.names = list(names)
        self.save_maps = save_maps
        for sub in ("overlays", "masks") + (("maps",) if save_maps else ()):
            make_dir(out_dir / sub, "--output")
        self.predictions = CsvStream(out_dir / "predictions.csv", PREDICTION_COLUMNS)
        self.regions = CsvStream(out_dir / "regions.csv", REGION_COLUMNS)
        self.errors: list[tuple[str, str]] = []
        self.summary: list[list[str]] = []  # the first SUMMARY_ROWS images, for the printed table
        self.counts = {"good": 0, "defective": 0}

    def failed(self, path: str, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.errors.append((path, message))

    def __call__(self, meta: dict, result: MapScores | None) -> None:
        if result is None:
            self.failed(meta["path"], meta["error"])
            return
        name = self.names[int(meta["index"])]
        original = meta["original"]
        p = self.predictor.finish(result, original, meta["path"], all_maps=self.save_maps)
        save_jpeg(self.out_dir / "overlays" / f"{name}.jpg", self.predictor.overlay(p, original))
        save_png(self.out_dir / "masks" / f"{name}.png", p.mask.astype(np.uint8) * 255)
        if self.save_maps:
            for m, amap in p.maps.items():
                save_npy(self.out_dir / "maps" / f"{name}_{m}.npy", amap)
        self.predictions.write(
            [
                name,
                p.path,
                p.width,
                p.height,
                p.verdict,
                p.map_name,
                f"{p.score:.6f}",
                f"{p.score_normalised:.4f}",
                f"{p.image_threshold:.6f}",
                f"{p.pixel_threshold:.6f}",
                len(p.regions),
                *p.inspected,
            ]
            + [v for m in MAP_NAMES for v in (f"{p.scores[m]:.6f}", f"{p.normalised[m]:.4f}")]
        )
        for i, r in enumerate(p.regions):
            self.regions.write(
                [
                    name,
                    i,
                    r.x0,
                    r.y0,
                    r.x1,
                    r.y1,
                    r.area,
                    f"{r.peak_score:.6f}",
                    f"{r.peak_normalised:.4f}",
                    r.peak_x,
                    r.peak_y,
                ]
            )
        self.counts[p.verdict] += 1
        if len(self.summary) < SUMMARY_ROWS:
            self.summary.append([name, p.verdict, f"{p.score_normalised:.3f}", str(len(p.regions))])

    def close(self) -> None:
        self.predictions.close()
        self.regions.close()
        write_csv(self.out_dir / "errors.csv", ("path", "error"), self.errors)


_worker_inputs: InputImages | None = None  # a decoding process's inputs (decoded_batches)


def _keep_inputs(inputs: InputImages) -> None:
    global _worker_inputs
    _worker_inputs = inputs


def _decode(i: int) -> dict:
    assert _worker_inputs is not None
    return _worker_inputs[i]


def decoded_batches(inputs: InputImages, batch_size: int, workers: int) -> Iterator[list[dict]]:
    """``inputs`` in batches of ``batch_size`` items, decoded by ``workers`` processes (0: in
    this one; started fresh, as this one runs onnxruntime's threads) while the previous batch
    is scored: at most two batches in memory."""
    batches = [range(s, min(s + batch_size, len(inputs))) for s in range(0, len(inputs), batch_size)]
    if workers == 0:
        for batch in batches:
            yield [inputs[i] for i in batch]
        return
    with multiprocessing.get_context("spawn").Pool(workers, _keep_inputs, (inputs,)) as pool:
        pending = None
        for batch in batches:
            ahead = pool.map_async(_decode, batch)
            if pending is not None:
                yield pending.get()
            pending = ahead
        if pending is not None:
            yield pending.get()


def score_in_batches(
    inputs: InputImages, scorer: ImageScorer, writer: PredictionWriter, batch_size: int, workers: int, title: str
) -> None:
    """Score ``inputs`` with ``scorer`` in a plain loop (no torch) and hand each item and its
    scores to ``writer``."""
    with Progress(title, total=len(inputs)) as bar:
        for items in decoded_batches(inputs, batch_size, workers):
            readable = [it for it in items if not it["error"]]
            scores = scorer.score(np.stack([it["image"] for it in readable])) if readable else []
            results = {it["index"]: s for it, s in zip(readable, scores)}
            for it in items:
                writer(it, results.get(it["index"]))
            bar.update(len(items))


def score_with_lightning(
    inputs: InputImages, predictor: Predictor, writer: PredictionWriter, settings: PredictSettings, title: str
) -> None:
    """Score ``inputs`` with the torch runtime's model on the Lightning device
    (``--accelerator``), decoding in ``--num_workers`` DataLoader workers."""
    import torch
    from torch.utils.data import DataLoader

    from pni.config import RuntimeSettings
    from pni.deploy.torch_runtime import TorchScorer, host_scores
    from pni.lightning import ScoringModule, interruptible
    from pni.runtime import build_trainer, images_per_batch, probe_extractor
    from pni.scoring import ImageScores

    assert isinstance(predictor.scorer, TorchScorer)
    model = predictor.scorer.model
    batch = settings.batch_size
    if batch is None:
        _, per_image = probe_extractor(model.extractor, torch.zeros(3, model.imagesize, model.imagesize))
        batch = images_per_batch(model.imagesize, settings.accelerator, per_image)
    loader: DataLoader[dict] = DataLoader(
        inputs,  # type: ignore[arg-type]  # a map-style dataset: __len__ and __getitem__
        batch_size=batch,
        shuffle=False,
        num_workers=settings.num_workers,
        collate_fn=collate_inputs,
    )

    def sink(meta: dict, result: ImageScores | None) -> None:
        writer(meta, None if result is None else host_scores(result))

    with Progress(title) as bar:
        # the backbone and MLP under the scorer's precision (the bundle's unless --precision)
        precision = predictor.scorer.precision
        trainer = build_trainer(
            RuntimeSettings(accelerator=settings.accelerator, precision=precision), bar, devices=1, precision=precision
        )
        interruptible(trainer.predict, ScoringModule(model, sink), loader, return_predictions=False)


def predict_files(settings: PredictSettings) -> int:
    """``predict.py``: predict every input image into ``settings.output``; returns the number
    of inputs that could not be read (reported on stderr and in ``errors.csv``)."""
    check_choices(settings.map_name, settings.image_threshold, settings.pixel_threshold)
    onnx = settings.runtime == "onnxruntime"
    if onnx and settings.accelerator not in ("auto", "cpu"):
        raise PNIError(
            f"--runtime onnxruntime runs on the CPU (CPUExecutionProvider): --accelerator {settings.accelerator} "
            "needs --runtime torch"
        )
    runs_on = None  # the torch runtime's device type (Lightning's); onnxruntime: the CPU, float32
    if onnx:
        check_onnx_precision(settings.precision)
    else:
        require_torch()
        from pni.precision import check_precision, device_type

        runs_on = device_type(settings.accelerator)
        if settings.precision is not None:
            check_precision(settings.precision, runs_on)
    check_output_dir(settings.output, "--output")
    paths, missing = expand_inputs(settings.inputs)
    if not paths and not missing:
        raise PNIError("--input: no image given")
    # loaded on the CPU: Lightning moves it to --accelerator's device
    scorer, manifest = load_scorer(
        settings.model, settings.runtime, "cpu", settings.backbone_weights, settings.precision, runs_on
    )
    predictor = Predictor(
        scorer, manifest, settings.map_name, settings.image_threshold, settings.pixel_threshold, settings.model
    )
    if runs_on is not None:  # the torch runtime: the note once, for the precision it runs in
        from pni.deploy.torch_runtime import TorchScorer
        from pni.precision import print_note_once

        assert isinstance(scorer, TorchScorer)
        print_note_once(scorer.precision, runs_on)
    out_dir = make_dir(settings.output, "--output")
    writer = PredictionWriter(predictor, out_dir, output_names(paths), settings.save_maps)
    for text, message in missing:
        writer.failed(text, message)
    try:
        if paths:
            scorer = predictor.scorer
            inputs = InputImages(paths, scorer.resize, scorer.imagesize)
            title = f"predicting {len(paths)} images with {settings.model} ({predictor.map_name} map"
            if isinstance(scorer, OnnxScorer):
                batch = settings.batch_size or onnx_batch_size(scorer.imagesize)
                title += f", onnxruntime on {', '.join(scorer.providers)})"
                score_in_batches(inputs, scorer, writer, batch, settings.num_workers, title)
            else:
                score_with_lightning(inputs, predictor, writer, settings, title + ")")
    finally:
        writer.close()
    done = writer.counts["defective"] + writer.counts["good"]
    if writer.summary:
        print(render_table([["image", "verdict", "score / threshold", "regions"]] + writer.summary))
    if done > len(writer.summary):
        print(f"... and {done - len(writer.summary)} more in predictions.csv")
    print(
        f"{done} images: {writer.counts['defective']} defective, {writer.counts['good']} good"
        + (f"; {len(writer.errors)} could not be read (errors.csv)" if writer.errors else "")
    )
    print(f"predictions: {out_dir / 'predictions.csv'}, regions: {out_dir / 'regions.csv'}")
    print(
        f"pictures: {out_dir / 'overlays'}/ (heat map on the image, defects outlined), masks: {out_dir / 'masks'}/"
        + (f", maps: {out_dir / 'maps'}/" if settings.save_maps else "")
    )
    return len(writer.errors)
