"""Deploying without PyTorch, end to end: ``export_model.py --onnx`` writes ``model.onnx`` into
the bundle, and ``predict.py --runtime onnxruntime`` (and ``pni.load_model(...,
runtime="onnxruntime")``) gives what ``--runtime torch`` gives, in a fresh process in which
importing torch (or anything the deploy install leaves out) raises ImportError.

A tiny model of each variant is exported with ``--onnx`` once (module fixture: the session's
shared run, and the same trained with ``--variant paper``).
The graph itself against ``PNIModel.score`` under biting masks: tests/test_onnx.py.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import TINY, TRAIN, path_flags
from PIL import Image

import export_model
import predict as predict_cli
import train_coreset_distribution as tcd
from pni.errors import PNIError
from pni.io import file_sha256
from pni.maps import MAP_NAMES

REPO = Path(__file__).resolve().parents[1]
MAP_TOLERANCE = 1e-4  # of each map's range
SCORE_TOLERANCE = 1e-5  # relative
# torch and its stack, and what the deploy install (requirements-deploy.txt) leaves out
BLOCKED = (
    "torch",
    "torchvision",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "faiss",
    "timm",
    "safetensors",
    "sklearn",
    "skimage",
    "matplotlib",
    "onnx",
    "tqdm",
)
VARIANTS = ("original", "paper")

_RUN_BLOCKED = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked in this test: " + name)
sys.meta_path.insert(0, _Blocked())
import predict
code = predict.main(sys.argv[1:])
print(json.dumps({{"code": code, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
"""


def predict_without_torch(argv: list[str], cwd: Path, also: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """``predict.py argv`` in a fresh process where importing anything in BLOCKED (and
    ``also``) fails; its exit code (also checked: nothing blocked was loaded), stdout and
    stderr."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", _RUN_BLOCKED.format(blocked=BLOCKED + also), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr  # the script itself: predict.main returned
    *out, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["loaded"] == [], result
    return result["code"], "\n".join(out), done.stderr


@pytest.fixture(scope="module")
def deployed(tiny_run, tmp_path_factory) -> dict:
    """Per variant a tiny texture model exported with --onnx (``original``: the session's
    shared run; ``paper``: trained here on its dataset); the inputs: the test images and a
    file that is no image."""
    root = tmp_path_factory.mktemp("deploy")
    inputs = root / "inputs"
    shutil.copytree(tiny_run.ds / "texture" / "test", inputs)
    (inputs / "broken.png").write_bytes(b"not an image")
    out: dict = {"root": root, "inputs": inputs}
    assert export_model.main(tiny_run.argv("--output", str(root / "original"), "--onnx")) == 0
    out["original"] = root / "original"
    flags = path_flags(tiny_run.ds, root / "paper_run") + TINY + ["--variant", "paper"]
    assert tcd.main(flags + TRAIN) == 0
    assert export_model.main(flags + ["--output", str(root / "paper"), "--onnx"]) == 0
    out["paper"], out["paper_flags"] = root / "paper", flags
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def one_error(code: int, stderr: str, *fragments: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def summary(stdout: str) -> list[str]:
    """What predict.py prints from its table's header on."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if "score / threshold" in ln)
    return lines[start:]


def close(a: str | float, b: str | float) -> bool:
    return abs(float(a) - float(b)) <= SCORE_TOLERANCE * abs(float(b)) + 1e-6  # + the CSV's last digit


# ---------------------------------------------------------------- the bundle


@pytest.mark.parametrize("variant", VARIANTS)
def test_bundle_lists_model_onnx_with_its_sha256(deployed, variant):
    bundle = deployed[variant]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"] == file_sha256(bundle / "model.onnx")
    assert sorted(manifest["files"]) == sorted(p.name for p in bundle.iterdir() if p.name != "manifest.json")
    onnx.checker.check_model(str(bundle / "model.onnx"), full_check=True)
    proto = onnx.load(str(bundle / "model.onnx"))
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["pni.variant"] == variant and meta["pni.mask_workers"] == str(manifest["scoring"]["mask_workers"])
    # each array stored once: about the size of the bundle's arrays and weights
    weights = sum(
        (bundle / f).stat().st_size for f in ("arrays.safetensors", "mlp.safetensors", "backbone.safetensors")
    )
    assert 0.95 * weights <= (bundle / "model.onnx").stat().st_size <= 1.05 * weights + 2**20


def test_export_onnx_needs_the_onnx_package(deployed, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    code = export_model.main(deployed["paper_flags"] + ["--output", str(tmp_path / "b"), "--onnx"])
    one_error(code, capsys.readouterr().err, "--onnx needs the onnx package")
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- predict.py, both runtimes


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_predicts_as_torch_without_torch(deployed, tmp_path, variant, capsys):
    bundle, inputs = deployed[variant], deployed["inputs"]

    def argv(out: str, *extra: str) -> list[str]:
        return ["--model", str(bundle), "--input", str(inputs), "--output", str(tmp_path / out), "--save_maps", *extra]

    assert predict_cli.main(argv("torch", "--accelerator", "cpu")) == 1  # the broken file
    torch_out = capsys.readouterr().out
    code, onnx_out, stderr = predict_without_torch(argv("onnx", "--runtime", "onnxruntime"), tmp_path)
    assert code == 1, stderr
    assert "error: cannot read image" in stderr and "broken.png" in stderr
    t, o = tmp_path / "torch", tmp_path / "onnx"
    assert summary(onnx_out.replace(str(o), "OUT")) == summary(torch_out.replace(str(t), "OUT"))  # the printed table
    assert read_csv(o / "errors.csv") == read_csv(t / "errors.csv") and len(read_csv(t / "errors.csv")) == 1

    rows_t, rows_o = read_csv(t / "predictions.csv"), read_csv(o / "predictions.csv")
    assert len(rows_t) == 8 and [r["name"] for r in rows_o] == [r["name"] for r in rows_t]
    assert {r["verdict"] for r in rows_t} == {"good", "defective"}
    for a, b in zip(rows_o, rows_t):
        for key in ("path", "width", "height", "verdict", "map", "regions", "image_threshold", "pixel_threshold"):
            assert a[key] == b[key], (key, a, b)
        assert all(a[k] == b[k] for k in a if k.startswith("inspected_"))
        for m in MAP_NAMES:
            assert close(a[f"{m}_score"], b[f"{m}_score"]), (m, a, b)

    maps = {}
    for a in rows_t:
        for m in MAP_NAMES:
            want = np.load(t / "maps" / f"{a['name']}_{m}.npy")
            got = np.load(o / "maps" / f"{a['name']}_{m}.npy")
            span = float(np.nanmax(want) - np.nanmin(want))
            assert np.array_equal(np.isnan(got), np.isnan(want))
            assert np.nanmax(np.abs(got - want)) <= MAP_TOLERANCE * span, (a["name"], m)
            maps[a["name"], m] = want
        mask_t = np.asarray(Image.open(t / "masks" / f"{a['name']}.png"))
        assert np.array_equal(np.asarray(Image.open(o / "masks" / f"{a['name']}.png")), mask_t)
        assert Image.open(o / "overlays" / f"{a['name']}.jpg").size == (int(a["width"]), int(a["height"]))

    regions_t, regions_o = read_csv(t / "regions.csv"), read_csv(o / "regions.csv")
    assert len(regions_t) == sum(int(r["regions"]) for r in rows_t) > 0
    assert len(regions_o) == len(regions_t)
    for a, b in zip(regions_o, regions_t):
        assert [a[k] for k in ("name", "region", "x0", "y0", "x1", "y1", "area")] == [
            b[k] for k in ("name", "region", "x0", "y0", "x1", "y1", "area")
        ]
        assert close(a["peak_score"], b["peak_score"])
        # the peak's place: the same pixel, or one whose score ties with it within rounding
        amap = maps[b["name"], rows_t[0]["map"]]
        at = float(amap[int(a["peak_y"]), int(a["peak_x"])])
        assert (a["peak_x"], a["peak_y"]) == (b["peak_x"], b["peak_y"]) or close(at, b["peak_score"]), (a, b)


def test_onnxruntime_decodes_in_worker_processes(deployed, tmp_path, capsys):
    """--num_workers: the inputs decoded in other processes, the same files and rows."""
    argv = ["--model", str(deployed["paper"]), "--input", str(deployed["inputs"]), "--runtime", "onnxruntime"]
    assert predict_cli.main(argv + ["--output", str(tmp_path / "a"), "--batch_size", "3"]) == 1
    assert predict_cli.main(argv + ["--output", str(tmp_path / "b"), "--batch_size", "3", "--num_workers", "2"]) == 1
    capsys.readouterr()
    for name in ("predictions.csv", "regions.csv", "errors.csv"):
        assert read_csv(tmp_path / "b" / name) == read_csv(tmp_path / "a" / name), name
    assert len(read_csv(tmp_path / "a" / "predictions.csv")) == 8
    masks = sorted(p.name for p in (tmp_path / "a" / "masks").iterdir())
    assert masks == sorted(p.name for p in (tmp_path / "b" / "masks").iterdir()) and len(masks) == 8


def test_onnxruntime_refuses_bundles_it_cannot_use(deployed, tmp_path):
    inputs = deployed["inputs"] / "good"

    def run(bundle: Path, *extra: str) -> tuple[int, str]:
        argv = ["--model", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "out"), *extra]
        code, _, stderr = predict_without_torch(argv + ["--runtime", "onnxruntime"], tmp_path)
        return code, stderr

    # exported without --onnx: its manifest lists no model.onnx
    plain = tmp_path / "plain"
    shutil.copytree(deployed["paper"], plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    (plain / "model.onnx").unlink()
    one_error(*run(plain), str(plain), "no model.onnx", "--onnx")
    # altered: refused by its sha256, as any file of the bundle
    tampered = tmp_path / "tampered"
    shutil.copytree(deployed["paper"], tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "model.onnx").write_bytes(bytes(data))
    one_error(*run(tampered), str(tampered / "model.onnx"), "sha256")
    # onnxruntime runs on the CPU
    one_error(*run(deployed["paper"], "--accelerator", "gpu"), "--runtime onnxruntime", "--accelerator gpu")
    # no onnxruntime installed
    argv = ["--model", str(deployed["paper"]), "--input", str(inputs), "--output", str(tmp_path / "out")]
    code, _, stderr = predict_without_torch(argv + ["--runtime", "onnxruntime"], tmp_path, also=("onnxruntime",))
    one_error(code, stderr, "needs onnxruntime", "requirements-deploy.txt")
    # the default runtime where torch cannot be imported
    code, _, stderr = predict_without_torch(argv, tmp_path)
    one_error(code, stderr, "runtime torch needs PyTorch", "--runtime onnxruntime")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the Python API


def test_load_model_with_onnxruntime(deployed):
    import pni

    paths = sorted((deployed["inputs"] / "hole").glob("*.png")) + sorted((deployed["inputs"] / "good").glob("*.png"))
    wide = np.asarray(Image.open(paths[0]).convert("RGB").resize((160, 64)))  # a crop: NaN outside
    torch_model = pni.load_model(deployed["original"], "cpu")
    onnx_model = pni.load_model(deployed["original"], runtime="onnxruntime")
    assert onnx_model.scorer.providers == ["CPUExecutionProvider"]
    for a, b in zip(onnx_model.predict([*paths, wide]), torch_model.predict([*paths, wide])):
        assert (a.path, a.width, a.height, a.inspected, a.verdict) == (
            b.path,
            b.width,
            b.height,
            b.inspected,
            b.verdict,
        )
        assert all(close(a.scores[m], b.scores[m]) for m in MAP_NAMES)
        assert np.array_equal(a.mask, b.mask) and [r.area for r in a.regions] == [r.area for r in b.regions]
        for m in MAP_NAMES:
            span = float(np.nanmax(b.maps[m]) - np.nanmin(b.maps[m]))
            assert np.nanmax(np.abs(a.maps[m] - b.maps[m])) <= MAP_TOLERANCE * span
    with pytest.raises(PNIError, match="runs on the CPU"):
        pni.load_model(deployed["original"], "cuda", runtime="onnxruntime")
    with pytest.raises(PNIError, match="runtime must be one of torch, onnxruntime"):
        pni.load_model(deployed["original"], runtime="tensorrt")
