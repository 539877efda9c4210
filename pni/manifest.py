"""A model bundle's manifest, read and checked without torch: :func:`read_manifest` (every
file listed there with its sha256), the bundle's file names and format version, and the
hidden folders an export leaves while it replaces a bundle (see :mod:`pni.bundle`, which
writes bundles and loads their model with torch).

Prediction through onnxruntime (:mod:`pni.predict`, ``runtime="onnxruntime"``) reads the
manifest here and scores with the bundle's ``model.onnx`` (:func:`onnx_graph`), so it never
imports torch.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path
from typing import Any

from pni import __version__
from pni.config import DEFAULT_PRECISION, PRECISIONS
from pni.deploy.onnx_runtime import ONNX_FILE
from pni.errors import PNIError
from pni.io import file_sha256, left_by_killed_run
from pni.maps import MAP_NAMES

FORMAT = "pni-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
MLP = "mlp.safetensors"
BACKBONE = "backbone.safetensors"
ONNX = ONNX_FILE  # with export_model.py --onnx (and model.onnx.data, its weights, past 2 GB)


def is_bundle(folder: Path) -> bool:
    """True when ``folder`` holds a manifest of ours (its ``format`` field, as :func:`read_manifest` checks)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def temp_folder_pattern(out: Path, kind: str) -> str:
    """Glob of the ``partial``/``old`` temporary folders of bundle ``out`` (beside it)."""
    return glob.escape(f".{out.name}.{kind}-") + "*"


def orphaned_bundle(out: Path) -> Path | None:
    """Where an export killed between its two renames left the previous bundle of a missing
    ``out`` (a hidden ``.<name>.old-*`` folder of a dead process), else None."""
    if out.exists() or out.is_symlink() or not out.parent.is_dir():
        return None
    found = [
        old / out.name
        for old in sorted(out.parent.glob(temp_folder_pattern(out, "old")))
        if left_by_killed_run(old.name) and is_bundle(old / out.name)
    ]
    return found[-1] if found else None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of bundle folder ``path``: a PNI bundle of this format version,
    with the settings prediction reads (backbone weights, thresholds, heat-map scale), whose
    listed files are all there with their recorded sha256 (else one-line PNIError naming the
    file and key)."""
    root = Path(path)
    if not root.exists():
        orphan = orphaned_bundle(root)
        hint = f" (an export killed while replacing it left the previous bundle in {orphan})" if orphan else ""
        raise PNIError(f"model bundle not found: {root}{hint}")
    manifest_path = root / MANIFEST
    if not root.is_dir() or not manifest_path.is_file():
        raise PNIError(f"{root} is not a PNI model bundle (a folder with {MANIFEST}, written by export_model.py)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PNIError(f"cannot read {manifest_path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PNIError(f"{manifest_path} is not a PNI model bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PNIError(
            f"{manifest_path}: bundle format version {manifest.get('format_version')!r}, but PNI "
            f"{__version__} reads version {FORMAT_VERSION}; export the model again with this version"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or ARRAYS not in files or MLP not in files:
        raise PNIError(f"{manifest_path} lists no {ARRAYS} and {MLP}; the bundle is incomplete")
    weights = manifest.get("backbone_weights")
    if not isinstance(weights, dict) or not all(
        isinstance(weights.get(k), (str, type(None))) for k in ("file", "sha256")
    ):
        raise PNIError(
            f'{manifest_path}: "backbone_weights" must be an object with the weights\' "file" and "sha256"; '
            "export the model again"
        )
    precision = manifest.get("precision", DEFAULT_PRECISION)
    if precision not in PRECISIONS:
        raise PNIError(
            f'{manifest_path}: "precision" must be one of {", ".join(PRECISIONS)} (the precision the bundle was '
            f"calibrated under), got {precision!r}; export the model again"
        )
    if weights.get("included") and BACKBONE not in files:
        raise PNIError(f"{manifest_path} says the backbone is included but lists no {BACKBONE}")
    thresholds = manifest.get("thresholds")
    for m in MAP_NAMES:
        entry = thresholds.get(m) if isinstance(thresholds, dict) else None
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), dict) for k in ("image", "pixel", "heatmap")
        ):
            raise PNIError(f"{manifest_path} lacks the calibrated thresholds of the {m} map; export the model again")
        for key in ("image", "pixel", "image_best_f1", "pixel_best_f1"):
            value = entry[key].get("value") if isinstance(entry.get(key), dict) else None
            required = key in ("image", "pixel") or entry.get(key) is not None  # best-F1 ones may be null
            if required and not (_finite(value) and value != 0):
                raise PNIError(
                    f'{manifest_path}: "thresholds" -> "{m}" -> "{key}" lacks a finite nonzero "value"; '
                    "export the model again"
                )
        low, high = entry["heatmap"].get("low"), entry["heatmap"].get("high")
        if not (_finite(low) and _finite(high) and high > low):
            raise PNIError(
                f'{manifest_path}: "thresholds" -> "{m}" -> "heatmap" needs numbers "low" < "high"; '
                "export the model again"
            )
    for name, digest in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise PNIError(f"{manifest_path} lists a file outside the bundle: {name!r}")
        file = root / name
        if not file.is_file():
            raise PNIError(f"bundle file missing: {file}")
        if file_sha256(file) != digest:
            raise PNIError(
                f"{file} does not match its sha256 in {MANIFEST} (altered or corrupt); export the model again"
            )
    return manifest


def bundle_precision(manifest: dict[str, Any]) -> str:
    """The precision the bundle of the checked ``manifest`` was calibrated under (its
    ``"precision"``; ``32-true`` for a manifest without one, as every bundle before the key)."""
    return str(manifest.get("precision", DEFAULT_PRECISION))


def _finite(value: Any) -> bool:
    """A JSON number (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def onnx_graph(path: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """The ``model.onnx`` of bundle folder ``path`` (whose checked ``manifest`` lists it);
    a bundle exported without ``--onnx`` is a one-line PNIError saying so."""
    if ONNX not in manifest["files"]:
        raise PNIError(
            f"bundle {path} has no {ONNX}: export it with export_model.py --onnx to predict with --runtime onnxruntime"
        )
    return Path(path) / ONNX
