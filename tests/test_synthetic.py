"""The built-in synthetic dataset (pni.data.synthetic)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pni.data.synthetic as synthetic
from pni.data import build_datasets, list_categories
from pni.data.synthetic import CATEGORIES, CATEGORY_TABLE, main, make_dataset
from pni.errors import PNIError

SMALL = dict(num_train=2, num_test_per_type=2, image_size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = _files(make_dataset(tmp_path / "a", seed=3, **SMALL))
    b = _files(make_dataset(tmp_path / "b", seed=3, **SMALL))
    assert a == b and any(k.endswith(".png") for k in a)
    c = _files(make_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a.keys() == c.keys() and a != c
    # Running again in place with the same settings rewrites identical files.
    assert _files(make_dataset(tmp_path / "a", seed=3, **SMALL)) == a


def test_default_dataset_layout_masks_and_loading(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "syn")
    assert (root / "README.txt").is_file()
    assert list_categories("MVTec", root) == sorted(CATEGORIES)
    for cat, defects in CATEGORIES.items():
        assert len(list((root / cat / "train" / "good").glob("*.png"))) == 16
        assert sorted(p.name for p in (root / cat / "test").iterdir()) == sorted(("good",) + defects)
        for d in defects:
            for mpath in sorted((root / cat / "ground_truth" / d).glob("*_mask.png")):
                m = np.asarray(Image.open(mpath))
                assert m.shape == (128, 128) and set(np.unique(m)) == {0, 255}, mpath
            assert len(list((root / cat / "ground_truth" / d).glob("*_mask.png"))) == 4
        # The demo geometry (resize 128, crop 112) keeps every defect.
        _, test = build_datasets("MVTec", root, cat, resize=128, imagesize=112)
        assert len(test) == 4 * (len(defects) + 1)
        for i in range(len(test)):
            item = test[i]
            assert item["image"].shape == (3, 112, 112)
            assert (item["mask"].sum() > 0) == (item["label"] == 1), (cat, item["stem"])


def _orientation(gray: np.ndarray) -> float:
    """> 0 when variation runs along rows (vertical stripes), < 0 for horizontal."""
    gx = np.abs(np.diff(gray, axis=1)).mean()
    gy = np.abs(np.diff(gray, axis=0)).mean()
    return float(gx - gy)


def test_defects_are_what_they_claim(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "syn", categories=["layered", "stripes"], num_train=1, num_test_per_type=4)
    for i in range(4):
        # stripes/inconsistent: the masked square has the other orientation.
        img = np.asarray(Image.open(root / "stripes/test/inconsistent" / f"{i:03d}.png")).astype(float).mean(2)
        m = np.asarray(Image.open(root / "stripes/ground_truth/inconsistent" / f"{i:03d}_mask.png")) > 0
        ys, xs = np.nonzero(m)
        inside = img[ys.min() + 1 : ys.max(), xs.min() + 1 : xs.max()]
        outside = img[:, : xs.min() - 1] if xs.min() > 20 else img[:, xs.max() + 2 :]
        assert _orientation(inside) * _orientation(outside) < 0
        # layered/misplaced: the patch holds the texture of the other half (brick red vs grass green).
        rgb = np.asarray(Image.open(root / "layered/test/misplaced" / f"{i:03d}.png")).astype(float)
        m = np.asarray(Image.open(root / "layered/ground_truth/misplaced" / f"{i:03d}_mask.png")) > 0
        red_minus_green = (rgb[..., 0] - rgb[..., 1])[m].mean()
        in_top_half = np.nonzero(m)[0].mean() < 64
        assert (red_minus_green < 0) == in_top_half
        # layered/shifted: a full-width band next to the middle of the image
        m = np.asarray(Image.open(root / "layered/ground_truth/shifted" / f"{i:03d}_mask.png")) > 0
        rows = np.nonzero(m.any(1))[0]
        assert m[rows].all() and rows.max() - rows.min() + 1 >= 128 // 5
        assert rows.min() <= 64 + 4 <= rows.max() + 1 or rows.min() - 1 <= 64 - 4 <= rows.max() + 1
    assert not (root / "texture").exists()


def _darkest_spot(path: Path) -> np.ndarray:
    """(row, col) / image side of the darkest 15 x 15 box: the board's component."""
    from scipy.ndimage import uniform_filter

    gray = np.asarray(Image.open(path)).astype(float).mean(2)
    local = uniform_filter(gray, size=15, mode="nearest")
    return (np.array(np.unravel_index(np.argmin(local), local.shape)) + 0.5) / gray.shape[0]


def test_board_component_sits_at_a_normal_place_unless_moved(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "syn", categories=["board"], num_train=8, num_test_per_type=6)
    normal, moved = np.array([[0.375, 0.375], [0.625, 0.625]]), np.array([[0.375, 0.625], [0.625, 0.375]])

    def nearest(spot: np.ndarray, places: np.ndarray) -> float:
        return float(np.abs(places - spot).max(axis=1).min())

    seen = set()
    for path in sorted((root / "board" / "train" / "good").glob("*.png")) + sorted(
        (root / "board" / "test" / "good").glob("*.png")
    ):
        spot = _darkest_spot(path)
        assert nearest(spot, normal) <= 3 / 128, path  # jitter 1/64 of the side, plus the box
        seen.add(int(np.abs(normal - spot).max(axis=1).argmin()))
    assert len(seen) == 2  # both product variants occur
    for i in range(6):
        spot = _darkest_spot(root / "board" / "test" / "moved" / f"{i:03d}.png")
        assert nearest(spot, moved) <= 3 / 128
        m = np.asarray(Image.open(root / "board" / "ground_truth" / "moved" / f"{i:03d}_mask.png")) > 0
        ys, xs = np.nonzero(m)
        assert np.abs(np.array([ys.mean(), xs.mean()]) / 128 + 0.5 / 128 - spot).max() <= 3 / 128
        assert min(ys.min(), xs.min(), 127 - ys.max(), 127 - xs.max()) >= 36  # far from the border
        assert 250 <= m.sum() <= 380  # a disc of diameter 20 (314 pixels)


def test_cli_and_settings_guard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = ["--output_path", str(out), "--num_train", "1", "--num_test_per_type", "1", "--image_size", "48"]
    assert main(args) == 0
    assert capsys.readouterr().out == f"wrote synthetic dataset to {out}\n"
    assert main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {out / 'texture'} already exists with other settings; use another --output_path or --overwrite\n"
    )
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    with pytest.raises(PNIError):
        make_dataset(tmp_path / "x", image_size=8)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    def run(*flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pni.data.synthetic", "--output_path", str(tmp_path / "out"), *flags]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    for flags, message in [
        (("--image_size", "8"), "error: --image_size must be at least 32, got 8"),
        (("--categories", "nope"), "error: argument --categories: invalid choice: 'nope'"),
        (("--num_train", "x"), "error: argument --num_train: invalid int value: 'x'"),
    ]:
        proc = run(*flags)
        assert proc.returncode == 2, flags
        assert proc.stdout == "" and proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "out" / "texture").exists()


def _flat(text: str) -> str:
    return " ".join(text.split())


_NUMBER_WORDS = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six", 7: "Seven", 8: "Eight"}


def test_docstring_and_readme_are_made_from_the_category_table(tmp_path: Path) -> None:
    assert [spec.name for spec in CATEGORY_TABLE] == ["texture", "layered", "stripes", "board"]
    assert CATEGORIES == {spec.name: tuple(spec.defects) for spec in CATEGORY_TABLE}
    doc = synthetic.__doc__ or ""
    # The number of categories is spelled out once, and right.
    assert re.findall(r"(\w+) categories", doc) == [_NUMBER_WORDS[len(CATEGORY_TABLE)]]
    assert "{" not in doc  # every placeholder filled
    bullets = re.findall(r"^- ``(\w+)``: ", doc, flags=re.M)
    assert bullets == list(CATEGORIES)
    readme = (
        make_dataset(tmp_path / "syn", categories=["stripes"], num_train=1, num_test_per_type=1) / "README.txt"
    ).read_text()
    section = readme.split("Categories\n----------\n", 1)[1]
    assert re.findall(r"^(\w+) {2,}", section, flags=re.M) == list(CATEGORIES)  # every category, even unwritten ones
    for spec in CATEGORY_TABLE:
        doc_item = _flat(doc.split(f"- ``{spec.name}``: ", 1)[1].split("\n- ", 1)[0].split("\n\n", 1)[0])
        readme_item = _flat(section.split(f"\n{spec.name} ", 1)[-1].split("\n\n", 1)[0])
        for text in (spec.normal, spec.found_by):
            assert _flat(text) in doc_item and _flat(text) in readme_item, (spec.name, text)
        for name, what in spec.defects.items():
            assert f"``{name}``, {_flat(what)}" in doc_item, (spec.name, name)
            assert re.search(rf"(^| ){name}: +{re.escape(_flat(what))}\.", readme_item), (spec.name, name)
        # No other category's defect types leak into this one's description.
        others = {d for other in CATEGORY_TABLE if other is not spec for d in other.defects}
        assert not {d for d in others if f"``{d}``" in doc_item or f"{d}:" in readme_item}


def test_readme_demo_table_lists_the_same_categories_and_defect_types() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    demo = text.split("## The demo", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^ *\| `(\w+)` \|[^|\n]*\|([^|\n]*)\|$", demo, flags=re.M)
    listed = {name: set(re.findall(r"`(\w+)`", defects)) for name, defects in rows}
    assert listed == {name: set(defects) for name, defects in CATEGORIES.items()}
