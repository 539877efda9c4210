"""Data layer: listing and pairing, decoding odd files and masks of any encoding, transforms (pni.data)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from PIL import Image

from pni.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    build_datasets,
    denormalize,
    image_transform,
    list_categories,
    list_samples,
    load_image,
    load_mask,
    mask_transform,
)
from pni.errors import PNIError


def _write(path: Path, array: np.ndarray, **save_kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kw)
    return path


def _rgb(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _box_mask(y0: int, x0: int, h: int, w: int, size: int = 16) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[y0 : y0 + h, x0 : x0 + w] = 255
    return m


def _mvtec(root: Path, cat: str = "widget") -> Path:
    """Tiny MVTec tree; mask names sort differently from image names ('1' vs '1_0')."""
    c = root / cat
    for i in range(3):
        _write(c / "train" / "good" / f"{i:03d}.png", _rgb(i))
    _write(c / "test" / "good" / "000.png", _rgb(10))
    _write(c / "test" / "crack" / "1.png", _rgb(11))
    _write(c / "test" / "crack" / "1_0.png", _rgb(12))
    _write(c / "ground_truth" / "crack" / "1_mask.png", _box_mask(0, 0, 8, 8))
    _write(c / "ground_truth" / "crack" / "1_0_mask.png", _box_mask(8, 8, 8, 8))
    _write(c / "test" / "bent" / "005.png", _rgb(13))
    _write(c / "ground_truth" / "bent" / "005_mask.png", _box_mask(4, 4, 4, 4))
    return root


# ----------------------------------------------------------------------------- MVTec


def test_mvtec_items_and_order(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    train, test = build_datasets("MVTec", root, "widget", resize=16, imagesize=16)
    assert len(train) == 3 and len(test) == 4
    assert [(s.defect_type, s.stem) for s in test.samples] == [
        ("bent", "005"),
        ("crack", "1"),
        ("crack", "1_0"),
        ("good", "000"),
    ]
    item = test[3]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 16, 16)
    assert item["label"] == 0 and item["defect_type"] == "good" and item["mask"].sum() == 0
    assert train[0]["label"] == 0 and train[0]["mask"].sum() == 0
    assert list_categories("MVTec", root) == ["widget"]


def test_masks_paired_by_stem_not_sort_order(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _, test = build_datasets("MVTec", root, "widget", resize=16, imagesize=16)
    by_stem = {test[i]["stem"]: test[i] for i in range(len(test))}
    for stem, (y0, x0, h, w) in {"1": (0, 0, 8, 8), "1_0": (8, 8, 8, 8), "005": (4, 4, 4, 4)}.items():
        item = by_stem[stem]
        assert item["label"] == 1
        assert Path(item["path"]).stem == stem
        expected = torch.from_numpy(_box_mask(y0, x0, h, w) / 255.0).float()[None]
        assert torch.equal(item["mask"], expected)


def test_missing_mask_is_error_naming_image(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "widget" / "ground_truth" / "crack" / "1_0_mask.png").unlink()
    with pytest.raises(PNIError, match=r"1_0\.png.*no mask"):
        list_samples("MVTec", root, "widget")


def test_mask_without_image_is_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _write(root / "widget" / "ground_truth" / "crack" / "7_mask.png", _box_mask(0, 0, 2, 2))
    with pytest.raises(PNIError, match=r"7_mask\.png"):
        list_samples("MVTec", root, "widget")
    (root / "widget" / "ground_truth" / "crack" / "7_mask.png").unlink()
    _write(root / "widget" / "ground_truth" / "scratch" / "000_mask.png", _box_mask(0, 0, 2, 2))
    with pytest.raises(PNIError, match=r"scratch.000_mask\.png"):
        list_samples("MVTec", root, "widget")


def test_missing_folders_and_unknown_category(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    with pytest.raises(PNIError, match="dataset folder not found"):
        build_datasets("MVTec", tmp_path / "nope", "widget")
    with pytest.raises(PNIError, match=r"unknown MVTec category 'gadget'.*available: widget"):
        build_datasets("MVTec", root, "gadget")
    with pytest.raises(PNIError, match="dataset_category"):
        build_datasets("ImageNet", root, "widget")
    for p in (root / "widget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(PNIError, match=r"no training images in .*train.good"):
        build_datasets("MVTec", root, "widget")


def test_mask_of_other_size_is_error_naming_both(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _write(root / "widget" / "ground_truth" / "bent" / "005_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(PNIError, match=r"005_mask\.png.*8x8.*005\.png.*16x16"):
        build_datasets("MVTec", root, "widget", resize=16, imagesize=16)  # from the headers, before any decoding
    # decoding a sample checks it too (for datasets built from other listings)
    train, test = list_samples("MVTec", root, "widget")
    with pytest.raises(PNIError, match=r"005_mask\.png.*8x8.*005\.png.*16x16"):
        AnomalyDataset(test, 16, 16)[0]


# ----------------------------------------------------------------------------- decoding


def test_corrupt_and_truncated_files_are_errors_naming_them(tmp_path: Path) -> None:
    good = _write(tmp_path / "ok.png", _rgb(0, 64))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    for bad in (truncated, garbage):
        with pytest.raises(PNIError, match=bad.name) as info:
            load_image(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(PNIError, match="missing.png"):
        load_image(tmp_path / "missing.png")

    root = _mvtec(tmp_path / "ds")
    (root / "widget" / "train" / "good" / "001.png").write_bytes(data[:100])
    train, _ = build_datasets("MVTec", root, "widget", resize=16, imagesize=16)
    with pytest.raises(PNIError, match=r"001\.png"):
        train[1]


def test_grayscale_rgba_16bit_palette_become_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 12), dtype=np.uint8)
    files = {
        "gray": _write(tmp_path / "gray.png", gray),
        "rgba": _write(tmp_path / "rgba.png", np.dstack([_rgb(1, 12), np.full((12, 12), 7, np.uint8)])),
        "la": _write(tmp_path / "la.png", np.dstack([gray, gray])),
        "g16": _write(tmp_path / "g16.png", gray.astype(np.uint16) * 257),
        "pal": tmp_path / "pal.png",
    }
    Image.fromarray(_rgb(2, 12)).convert("P").save(files["pal"])
    assert Image.open(files["g16"]).mode.startswith("I")
    tf = image_transform(12, 12)
    for name, path in files.items():
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (12, 12), name
        assert tf(img).shape == (3, 12, 12), name
    # 16-bit values are scaled to 8 bits, grayscale replicated to the three channels.
    for name in ("gray", "g16"):
        arr = np.asarray(load_image(files[name]))
        assert np.array_equal(arr, np.repeat(gray[..., None], 3, axis=2)), name
    assert np.array_equal(np.asarray(load_image(files["rgba"])), _rgb(1, 12))


def test_16bit_and_binarised_masks(tmp_path: Path) -> None:
    m = _box_mask(2, 2, 5, 5, 12)
    p16 = _write(tmp_path / "m16.png", m.astype(np.uint16) * 257)
    assert np.array_equal(np.asarray(load_mask(p16)), m)
    ones = _write(tmp_path / "ones.png", (m > 0).astype(np.uint8) * 3)  # class ids, not 255
    assert np.array_equal(np.asarray(load_mask(ones, binarize=True)), m)


def test_mask_truncation_erodes_like_the_original() -> None:
    mask = Image.fromarray(_box_mask(4, 4, 8, 8, 16))
    # Upsampling: bilinear ramps at the box edges are < 1 and get truncated to 0.
    up = mask_transform(32, 32)(mask)
    reference = np.asarray(mask.resize((32, 32), Image.Resampling.BILINEAR)) == 255
    assert torch.equal(up[0], torch.from_numpy(reference).float())
    nearest = np.asarray(mask.resize((32, 32), Image.Resampling.NEAREST)) == 255
    assert up.sum() < nearest.sum() and not (up[0].numpy().astype(bool) & ~nearest).any()
    assert set(torch.unique(up).tolist()) <= {0.0, 1.0}
    # The 16x16 nearest box loses its outer ring: the first output pixel past each edge
    # mixes 1/4 of the outside zero in (value 191 -> 0.75 -> truncated).
    assert int(up.sum()) == 14 * 14
    # Downsampling a one-pixel line: it disappears entirely (partial coverage everywhere).
    line = np.zeros((16, 16), np.uint8)
    line[8, :] = 255
    assert mask_transform(8, 8)(Image.fromarray(line)).sum() == 0
    # Same geometry as the image: shorter side resized, then centre crop.
    wide = Image.fromarray(np.full((10, 20), 255, np.uint8))
    assert mask_transform(8, 6)(wide).shape == (1, 6, 6)
    assert image_transform(8, 6)(wide.convert("RGB")).shape == (3, 6, 6)


@pytest.mark.parametrize("size,resize,crop", [((37, 53), 24, 20), ((60, 41), 32, 30), ((16, 16), 40, 36)])
def test_transforms_equal_pil_resize_and_centre_crop(size, resize, crop) -> None:
    """Pixel values: PIL's bilinear resize of the shorter side, the centre square, ImageNet
    normalisation (reference); masks the same geometry, defective where the value is 255."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = image_transform(resize, crop)(image)
    assert got.shape == (3, crop, crop)
    np.testing.assert_allclose(got.double().numpy(), reference.image_tensor(image, resize, crop), rtol=0, atol=1e-5)
    mask = Image.fromarray(
        _box_mask(size[1] // 4, size[0] // 3, size[1] // 2, size[0] // 3, size=max(size))[: size[1], : size[0]]
    )
    want = reference.resize_and_crop(mask, resize, crop) == 255
    assert 0 < want.sum() < want.size
    np.testing.assert_array_equal(mask_transform(resize, crop)(mask)[0].numpy(), want.astype(np.float32))


def test_denormalize_round_trip() -> None:
    rgb = _rgb(5, 9)
    x = image_transform(9, 9)(Image.fromarray(rgb))
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert torch.allclose(x, expected / torch.tensor(IMAGENET_STD)[:, None, None], atol=1e-6)
    out = denormalize(x)
    assert out.dtype == np.uint8 and out.shape == (9, 9, 3)
    assert np.array_equal(out, rgb)


# ----------------------------------------------------------------------------- BTAD


def test_btad_layout_and_03_half_split(tmp_path: Path) -> None:
    for cat in ("01", "03"):
        c = tmp_path / cat
        for i in range(5):
            ext = "bmp" if i % 2 else "png"
            _write(c / "train" / "ok" / f"{i:04d}.{ext}", _rgb(i))
        _write(c / "test" / "ok" / "0000.png", _rgb(20))
        _write(c / "test" / "ko" / "0001.bmp", _rgb(21))
        _write(c / "test" / "ko" / "0002.png", _rgb(22))
        _write(c / "ground_truth" / "ko" / "0001.png", _box_mask(0, 0, 16, 4))
        _write(c / "ground_truth" / "ko" / "0002.bmp", _box_mask(0, 0, 4, 16))
    assert list_categories("BTAD", tmp_path) == ["01", "03"]
    train01, test01 = list_samples("BTAD", tmp_path, "01")
    train03, _ = list_samples("BTAD", tmp_path, "03")
    assert [s.stem for s in train01] == ["0000", "0001", "0002", "0003", "0004"]
    assert [s.stem for s in train03] == ["0000", "0001"]
    assert [(s.defect_type, s.stem, s.label) for s in test01] == [
        ("good", "0000", 0),
        ("ko", "0001", 1),
        ("ko", "0002", 1),
    ]
    _, test = build_datasets("BTAD", tmp_path, "01", resize=16, imagesize=16)
    assert test[1]["mask"][0, :, :4].all() and test[1]["mask"].sum() == 64
    assert test[2]["mask"][0, :4, :].all() and test[2]["mask"].sum() == 64


# ----------------------------------------------------------------------------- VisA


def _visa_released(root: Path) -> None:
    rows = []
    for cat in ("candle", "pcb1"):
        d = root / cat / "Data"
        for i in range(3):
            _write(d / "Images" / "Normal" / f"{i:04d}.JPG", _rgb(i), format="JPEG")
            rows.append([cat, "train" if i < 2 else "test", "normal", f"{cat}/Data/Images/Normal/{i:04d}.JPG", ""])
        for i in (0, 1):
            _write(d / "Images" / "Anomaly" / f"{i:03d}.JPG", _rgb(30 + i), format="JPEG")
            mask = (_box_mask(0, 0, 8, 8) > 0).astype(np.uint8) * (i + 1)  # ids, not 255
            _write(d / "Masks" / "Anomaly" / f"{i:03d}.png", mask)
            rows.append(
                [
                    cat,
                    "test",
                    "anomaly",
                    f"{cat}/Data/Images/Anomaly/{i:03d}.JPG",
                    f"{cat}/Data/Masks/Anomaly/{i:03d}.png",
                ]
            )
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)


def test_visa_released_layout_with_split_csv(tmp_path: Path) -> None:
    _visa_released(tmp_path)
    assert list_categories("VisA", tmp_path) == ["candle", "pcb1"]
    train, test = build_datasets("VisA", tmp_path, "pcb1", resize=16, imagesize=16)
    assert [s.stem for s in train.samples] == ["0000", "0001"]
    assert [(s.defect_type, s.stem, s.label) for s in test.samples] == [
        ("bad", "000", 1),
        ("bad", "001", 1),
        ("good", "0002", 0),
    ]
    assert all("pcb1" in s.image_path for s in test.samples)
    for i in (0, 1):  # mask pixels > 0 are defective
        assert torch.equal(test[i]["mask"][0], torch.from_numpy(_box_mask(0, 0, 8, 8) > 0).float())
    assert test[2]["mask"].sum() == 0


def test_visa_released_layout_errors(tmp_path: Path) -> None:
    _visa_released(tmp_path)
    (tmp_path / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(PNIError, match=r"001\.JPG has no mask"):
        list_samples("VisA", tmp_path, "pcb1")
    _write(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "009.png", _box_mask(0, 0, 2, 2))
    with pytest.raises(PNIError, match=r"009\.png has no image"):
        list_samples("VisA", tmp_path, "candle")
    (tmp_path / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(PNIError, match=r"1cls\.csv"):
        list_samples("VisA", tmp_path, "candle")


def test_visa_mvtec_style_layout(tmp_path: Path) -> None:
    c = tmp_path / "capsules"
    for i in range(2):
        _write(c / "train" / "good" / f"{i:03d}.png", _rgb(i))
    _write(c / "test" / "good" / "000.png", _rgb(5))
    _write(c / "test" / "bad" / "000.png", _rgb(6))
    _write(c / "ground_truth" / "bad" / "000.png", (_box_mask(0, 0, 4, 4) > 0).astype(np.uint8))
    assert list_categories("VisA", tmp_path) == ["capsules"]
    train, test = build_datasets("VisA", tmp_path, "capsules", resize=16, imagesize=16)
    assert len(train) == 2 and [s.defect_type for s in test.samples] == ["bad", "good"]
    assert test[0]["label"] == 1 and test[0]["mask"].sum() == 16


def test_masks_of_any_encoding_give_the_same_ground_truth(tmp_path):
    cat = tmp_path / "ds" / "parts"
    rng = np.random.default_rng(0)
    (cat / "train" / "good").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(cat / "train" / "good" / "0.png")
    box = np.zeros((32, 32), np.uint8)
    box[8:20, 10:26] = 1
    encodings = {
        "255": Image.fromarray(box * 255),
        "1": Image.fromarray(box),
        "128": Image.fromarray(box * 128),
        "16bit_1": Image.fromarray(box.astype(np.uint16)),
        "16bit_65535": Image.fromarray(box.astype(np.uint16) * 65535),
        "rgb_1": Image.fromarray(np.dstack([box] * 3)),
        "palette_1": Image.fromarray(box, mode="L"),
    }
    encodings["palette_1"] = Image.new("P", (32, 32))
    encodings["palette_1"].putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 = red
    encodings["palette_1"].putdata(box.reshape(-1).tolist())
    for name, mask in encodings.items():
        (cat / "test" / "bad").mkdir(parents=True, exist_ok=True)
        (cat / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(cat / "test" / "bad" / f"{name}.png")
        mask.save(cat / "ground_truth" / "bad" / f"{name}_mask.png")
    assert Image.open(cat / "ground_truth" / "bad" / "16bit_1_mask.png").mode.startswith("I")
    # The original's rule on a 0/255 mask: bilinear resize, defective where the value stays 255.
    reference = np.asarray(Image.fromarray(box * 255).resize((48, 48), Image.Resampling.BILINEAR)) == 255
    assert reference.sum() > 100
    _, test = build_datasets("MVTec", tmp_path / "ds", "parts", resize=48, imagesize=48)
    for item in test:
        assert item["label"] == 1
        assert np.array_equal(item["mask"][0].numpy() == 1, reference), item["stem"]
        assert set(np.unique(item["mask"].numpy())) == {0.0, 1.0}
