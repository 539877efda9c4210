"""Refinement model (METHOD section 7): key layout, loading, 16-bit PNGs, training, inference, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pni.errors import PNIError
from pni.refinement import (
    RavelRefinementDataset,
    RefinementNet,
    SyntheticRefinementDataset,
    load_refinement_checkpoint,
    load_refinement_state_dict,
    make_synthetic_triples,
    read_map,
    read_png16,
    refine_ravel_folder,
    refinement_loss,
    save_state_dict,
    train_step,
    write_png16,
)
from pni.refinement.cli import main
from pni.refinement.data import round_to_uint16

SIZE = 32  # model input size in tests (DenseNet-161 at 320 is slow on CPU); ravel files are 40x40
RAVEL = 40
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation


def _smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size,size,3) uint8 smooth random image."""
    import cv2

    small = rng.integers(0, 256, (6, 6, 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def _write_ravel(folder: Path, n: int = 4, size: int = RAVEL, seed: int = 0) -> Path:
    """A tiny ravel folder: n samples over two categories, with index.csv."""
    import cv2

    rng = np.random.default_rng(seed)
    triples = make_synthetic_triples([_smooth_image(rng, size) for _ in range(n)], seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, amap, mask) in enumerate(triples):
        write_png16(folder / f"{i:05d}_pred.png", round_to_uint16(amap))
        write_png16(folder / f"{i:05d}_gt.png", (mask > 0.5).astype(np.uint16) * 65535)
        cv2.imwrite(str(folder / f"image{i:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        rows.append([i, "cat_a" if i < n // 2 else "cat_b", "good" if mask.max() == 0 else "defect", f"{i:03d}"])
    with open(folder / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "category", "defect_type", "stem"])
        w.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def ravel(tmp_path_factory) -> Path:
    return _write_ravel(tmp_path_factory.mktemp("ravel") / "in")


@pytest.fixture(scope="module")
def bias_model() -> RefinementNet:
    """A model whose network output is exactly +0.2 everywhere (final conv: zero weight, bias 0.2)."""
    torch.manual_seed(0)
    m = RefinementNet().eval()
    with torch.no_grad():
        m.decoder.features.decoder_conv_final.bias.fill_(0.2)
    return m


def _randomised(model: RefinementNet, seed: int = 1) -> RefinementNet:
    """Perturb every parameter and BN buffer with seeded noise (so no value keeps its default)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g)
                if "running_var" in name:
                    t.mul_(0.5 + r)
                else:
                    t.add_((r - 0.5) * 0.02)
    return model.eval()


class _ConstantNet(torch.nn.Module):
    """Stands in for the network: the refined map is ``value`` everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, image: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        return torch.full_like(amap, self.value)


class _ElementwiseNet(torch.nn.Module):
    """Stands in for the network: ``pred = 1.5*z + 0.2*image[red] - 0.3``, elementwise (so the
    batch size cannot change a value) and reaching outside [0, 1] (so clipping matters)."""

    def forward(self, image: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        return 1.5 * amap + 0.2 * image[:, :1] - 0.3


def test_png16_round_trip(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    write_png16(tmp_path / "r.png", ramp)
    back = read_png16(tmp_path / "r.png")
    assert back.dtype == np.uint16 and np.array_equal(back, ramp)
    m = read_map(tmp_path / "r.png")
    assert m.dtype == np.float32 and m.min() == 0.0 and m.max() == 1.0
    assert np.array_equal(round_to_uint16(m), ramp)
    from PIL import Image  # Pillow agrees on the stored values

    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")).astype(np.uint16), ramp)


def test_key_layout_and_original_checkpoint_loads(tmp_path):
    src = _randomised(RefinementNet())
    keys = list(src.state_dict())
    assert "encoder1.original_model.features.denseblock4.denselayer24.conv2.weight" in keys
    assert "encoder2.original_model.features.conv0.weight" in keys
    assert not any(k.startswith("encoder2.original_model.features.denseblock") for k in keys)
    for k in (
        "decoder.features.decoder_conv0.weight",
        "decoder.features.decoder_up5.convB.weight",
        "decoder.features.decoder_conv_final.bias",
    ):
        assert k in keys
    assert src.state_dict()["decoder.features.decoder_conv0.weight"].shape == (768, 2208, 1, 1)
    assert src.state_dict()["decoder.features.decoder_conv_final.weight"].shape == (1, 24, 1, 1)
    # Original-style file: DataParallel prefix, wrapped in 'model', encoder2 holding a whole DenseNet.
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.encoder2.original_model.features.denseblock1.denselayer1.conv1.weight"] = torch.zeros(192, 96, 1, 1)
    state["module.encoder1.original_model.classifier.weight"] = torch.zeros(1000, 2208)
    torch.save({"model": state, "epoch": 3}, tmp_path / "orig.pth")
    dst = load_refinement_checkpoint(tmp_path / "orig.pth").eval()
    x, a = torch.randn(2, 3, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        y_src, y_dst = src(x, a), dst(x, a)
    assert y_src.shape == (2, 1, SIZE, SIZE) and not torch.equal(y_src, a)
    assert torch.equal(y_src, y_dst)
    # Our own checkpoints: plain state dict, weights_only loading.
    save_state_dict(src, tmp_path / "ours.pt")
    plain = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert set(plain) == set(keys)
    # Missing required keys: one clear error.
    del state["module.decoder.features.decoder_up3.convA.weight"]
    with pytest.raises(PNIError, match="1 missing keys.*decoder_up3.convA.weight"):
        load_refinement_state_dict(dst, {"state_dict": state}, source="broken.pth")


def test_training_loss_goes_down(ravel):
    torch.manual_seed(0)
    ds = RavelRefinementDataset(ravel, SIZE)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ("image", "amap", "mask")}
    assert batch["mask"].unique().tolist() in ([0.0, 1.0], [0.0])
    model = RefinementNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = [train_step(model, opt, batch) for _ in range(5)]
    assert np.mean(losses[-2:]) < 0.97 * np.mean(losses[:2]), losses


def test_refinement_loss_hand_computed():
    # out - mask = [[0,1,2],[0,0,0]]: MSE 5/6; horizontal-difference error [[1,1],[0,0]]: MSE 1/2;
    # vertical-difference error [[0,-1,-2]]: MSE 5/3. Loss = 0.5*5/6 + 0.25*1/2 + 0.25*5/3 = 23/24.
    out = torch.tensor([[[[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]]])
    mask = torch.tensor([[[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]])
    assert refinement_loss(out, mask).item() == pytest.approx(23 / 24, abs=1e-6)
    # the same sample twice in a batch: means, so unchanged
    assert refinement_loss(out.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1)).item() == pytest.approx(23 / 24)
    # transposed (3x2): horizontal and vertical terms swap (5/3 and 1/2), the same total
    assert refinement_loss(out.transpose(-1, -2), mask.transpose(-1, -2)).item() == pytest.approx(23 / 24)
    # only the map term: a constant offset c has zero differences, loss = 0.5*c^2
    assert refinement_loss(torch.full((1, 1, 4, 5), 0.3), torch.zeros(1, 1, 4, 5)).item() == pytest.approx(0.045)


def test_inference_blend_and_files(ravel, bias_model, tmp_path):
    out0, out1 = tmp_path / "b0", tmp_path / "b1"
    refine_ravel_folder(bias_model, ravel, out0, blend_weight=0.0, image_size=SIZE, batch_size=3, progress=False)
    n = refine_ravel_folder(bias_model, ravel, out1, blend_weight=0.1, image_size=SIZE, progress=False)
    assert n == 4
    names = sorted(p.name for p in ravel.iterdir())
    assert sorted(p.name for p in out0.iterdir()) == names == sorted(p.name for p in out1.iterdir())
    assert (out1 / "index.csv").read_text() == (ravel / "index.csv").read_text()
    for i in range(4):
        src = read_png16(ravel / f"{i:05d}_pred.png")
        assert np.array_equal(read_png16(out0 / f"{i:05d}_pred.png"), src)  # blend 0 = input map
        out = read_png16(out1 / f"{i:05d}_pred.png")
        assert out.shape == src.shape == (RAVEL, RAVEL) and not np.array_equal(out, src)
        assert (out1 / f"image{i:05d}.png").read_bytes() == (ravel / f"image{i:05d}.png").read_bytes()
        assert (out1 / f"{i:05d}_gt.png").read_bytes() == (ravel / f"{i:05d}_gt.png").read_bytes()
    # Ravel size = model size: the network adds exactly 0.2, so blended = map + 0.1*0.2, clipped.
    same = _write_ravel(tmp_path / "same", n=2, size=SIZE, seed=5)
    refine_ravel_folder(bias_model, same, tmp_path / "same_out", image_size=SIZE, progress=False)
    for i in range(2):
        got = read_map(tmp_path / "same_out" / f"{i:05d}_pred.png").astype(np.float64)
        want = np.clip(read_png16(same / f"{i:05d}_pred.png") / 65535.0 + 0.02, 0, 1)
        np.testing.assert_allclose(got, want, atol=1.0 / 65535)


def test_aligned_blend_is_one_tenth_refined(ravel, tmp_path):
    # refined = 0.8 everywhere (resized to the 40 px ravel size it stays 0.8), so each written code is
    # round(65535*(0.1*0.8 + 0.9*code/65535)) = round(0.9*code + 5242.8); masks and images copied.
    refine_ravel_folder(_ConstantNet(0.8), ravel, tmp_path / "out", image_size=SIZE, progress=False)
    for i in range(4):
        code = read_png16(ravel / f"{i:05d}_pred.png").astype(np.float64)
        got = read_png16(tmp_path / "out" / f"{i:05d}_pred.png").astype(np.float64)
        assert got.shape == (RAVEL, RAVEL)
        np.testing.assert_allclose(got, np.round(0.9 * code + 0.1 * 0.8 * 65535), atol=1)
        assert (tmp_path / "out" / f"{i:05d}_gt.png").read_bytes() == (ravel / f"{i:05d}_gt.png").read_bytes()


def test_category_filter(ravel, bias_model, tmp_path):
    refine_ravel_folder(bias_model, ravel, tmp_path / "al", ["cat_b"], image_size=SIZE, progress=False)
    assert sorted(p.name for p in (tmp_path / "al").glob("*_pred.png")) == ["00002_pred.png", "00003_pred.png"]
    with open(tmp_path / "al" / "index.csv") as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["cat_b", "cat_b"]
    with pytest.raises(PNIError, match="cat_z"):
        RavelRefinementDataset(ravel, SIZE, categories=["cat_z"])


def test_aligned_input_size_320(tmp_path):
    """Model inputs at the default 320 px: image bilinear, map and mask nearest (pixel centres)."""
    ravel = _write_ravel(tmp_path / "r", n=2)
    noise = np.random.default_rng(7).integers(0, 256, (RAVEL, RAVEL, 3), dtype=np.uint8)
    Image.fromarray(noise).save(ravel / "image00001.png")  # sharp edges: bilinear and nearest differ
    item = RavelRefinementDataset(ravel)[1]  # 40 px ravel files -> 320 px
    assert item["image"].shape == (3, 320, 320) and item["amap"].shape == item["mask"].shape == (1, 320, 320)
    # 40 -> 320 is x8: nearest repeats every ravel pixel 8x8 times
    code = read_png16(ravel / "00001_pred.png").astype(np.float32) / np.float32(65535)
    np.testing.assert_array_equal(item["amap"][0].numpy(), np.kron(code, np.ones((8, 8), np.float32)))
    gt = (read_png16(ravel / "00001_gt.png") > 0).astype(np.float32)
    assert gt.any()
    np.testing.assert_array_equal(item["mask"][0].numpy(), np.kron(gt, np.ones((8, 8), np.float32)))
    # the image, de-normalised, is PIL's bilinear upsampling up to PIL's two roundings to uint8
    # (after each pass); nearest or align_corners=True would be off by far more on noise
    rgb = np.asarray(Image.open(ravel / "image00001.png").convert("RGB").resize((320, 320), Image.BILINEAR))
    back = item["image"].numpy() * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]
    np.testing.assert_allclose(back.transpose(1, 2, 0) * 255, rgb, atol=1.0 + 1e-3)
    # downsampling 50 -> 320 is not a multiple: pixel-centre nearest, floor((j + 0.5) * 50 / 320)
    amap = np.arange(50 * 50, dtype=np.float32).reshape(50, 50) / 2500
    from pni.refinement.data import prepare_map

    got = prepare_map(amap, 320)[0].numpy()
    src = [int((j + 0.5) * 50 / 320) for j in range(320)]
    np.testing.assert_array_equal(got, amap[np.ix_(src, src)])


# ----------------------------------------------------------------------------- --geometry original


def _pil_nearest(a: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST))


def _codes(x: np.ndarray) -> np.ndarray:
    """uint16(clip(65535*x)): float32 product, truncating cast."""
    return np.clip(np.float32(65535) * x.astype(np.float32), 0, 65535).astype(np.uint16)


def _spec_reference(folder: Path, i: int, net: torch.nn.Module) -> tuple[np.ndarray, np.ndarray, dict]:
    """METHOD section 7's ``--geometry original`` steps for sample ``i``, written out one by one:
    the written (_pred, _gt) arrays and the model inputs."""
    rgb = np.asarray(Image.open(folder / f"image{i:05d}.png").convert("RGB").resize((320, 320), Image.BILINEAR))
    image = (
        torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)
    ) / torch.tensor(STD).view(3, 1, 1)
    map320 = _pil_nearest(np.asarray(Image.open(folder / f"{i:05d}_pred.png")), 320).astype(np.float32) / 65535
    mask320 = (_pil_nearest(np.asarray(Image.open(folder / f"{i:05d}_gt.png")), 320) > 0).astype(np.float32)
    centre = torch.from_numpy(map320[11:-11, 11:-11].copy())[None, None]  # 298 px
    assert centre.shape[-1] == 298
    z = torch.nn.functional.interpolate(centre, size=(320, 320), mode="bilinear", align_corners=True)
    with torch.no_grad():
        pred = net(image[None], z)[0, 0].numpy()
    z = z[0, 0].numpy()
    z16, p16 = _codes(z), _codes(pred)  # step 2
    z240 = _pil_nearest(z16, 240)  # step 3
    p240 = _pil_nearest(p16, 256)[8:-8, 8:-8]
    assert z240.shape == p240.shape == (240, 240)
    refined = np.float32(0.1) * p240.astype(np.float32) + np.float32(0.9) * z240.astype(np.float32)
    out = _pil_nearest(refined.astype(np.uint16), 480)  # step 4
    gt = _pil_nearest(_pil_nearest((65535 * mask320).astype(np.uint16), 240), 480)
    return out, gt, {"image": image, "amap": z, "mask": mask320}


def _bilinear_align_corners(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with align_corners=True, a float64 loop from the definition:
    output pixel j samples input position j*(n-1)/(size-1)."""
    n = a.shape[0]
    out = np.empty((size, size))
    for y in range(size):
        fy = y * (n - 1) / (size - 1)
        y0 = min(int(fy), n - 2)
        wy = fy - y0
        for x in range(size):
            fx = x * (n - 1) / (size - 1)
            x0 = min(int(fx), n - 2)
            wx = fx - x0
            out[y, x] = (1 - wy) * ((1 - wx) * a[y0, x0] + wx * a[y0, x0 + 1]) + wy * (
                (1 - wx) * a[y0 + 1, x0] + wx * a[y0 + 1, x0 + 1]
            )
    return out


@pytest.fixture(scope="module")
def ravel256(tmp_path_factory) -> Path:
    """Three 256 px samples of noise (every source pixel differs from its neighbours, so each
    resize's choice of pixels shows); map codes only in [3000, 41000]; one good sample.
    256 -> 320 and 320 -> 240 hit PIL's NEAREST ties, where it differs from nearest-exact."""
    folder = tmp_path_factory.mktemp("ravel256")
    rng = np.random.default_rng(11)
    for i in range(3):
        Image.fromarray(rng.integers(3000, 41001, (256, 256)).astype(np.uint16)).save(folder / f"{i:05d}_pred.png")
        mask = np.zeros((256, 256), np.uint16)
        if i < 2:
            mask[40 + 60 * i : 120 + 60 * i, 30:200] = 65535
            mask[150:153, 10 + i : 250] = 65535
        Image.fromarray(mask).save(folder / f"{i:05d}_gt.png")
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"image{i:05d}.png")
    with open(folder / "index.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ["index", "category", "defect_type", "stem"],
                [0, "c", "bad", "a"],
                [1, "c", "bad", "b"],
                [2, "c", "good", "c"],
            ]
        )
    return folder


def test_geometry_original_follows_spec_pixel_for_pixel(ravel256, tmp_path):
    net = _ElementwiseNet()
    n = refine_ravel_folder(net, ravel256, tmp_path / "out", geometry="original", batch_size=2, progress=False)
    assert n == 3
    dataset = RavelRefinementDataset(ravel256, geometry="original")
    for i in range(3):
        code = read_png16(ravel256 / f"{i:05d}_pred.png")
        assert 3000 <= code.min() and code.max() <= 41000  # maps that do not span 0-65535
        want_pred, want_gt, inputs = _spec_reference(ravel256, i, net)
        got_pred = np.asarray(Image.open(tmp_path / "out" / f"{i:05d}_pred.png"))
        got_gt = np.asarray(Image.open(tmp_path / "out" / f"{i:05d}_gt.png"))
        assert got_pred.shape == got_gt.shape == (480, 480) and got_pred.dtype == np.uint16
        np.testing.assert_array_equal(got_pred, want_pred)
        np.testing.assert_array_equal(got_gt, want_gt)
        assert (i == 2) == (not got_gt.any())
        assert (tmp_path / "out" / f"image{i:05d}.png").read_bytes() == (ravel256 / f"image{i:05d}.png").read_bytes()
        item = dataset[i]  # training sees the same inputs: zoomed map, unzoomed image and mask
        assert torch.equal(item["image"], inputs["image"])
        np.testing.assert_array_equal(item["amap"][0].numpy(), inputs["amap"])
        np.testing.assert_array_equal(item["mask"][0].numpy(), inputs["mask"])
    # clipping was exercised: the stand-in network leaves [0, 1] on both sides
    with torch.no_grad():
        pred = net(torch.stack([dataset[0]["image"]]), torch.stack([dataset[0]["amap"]]))
    assert pred.min() < 0 and pred.max() > 1
    # the zoom is the centre [11:-11] back to 320 px with align_corners=True (corners kept)
    map320 = _pil_nearest(read_png16(ravel256 / "00000_pred.png"), 320).astype(np.float64) / 65535
    zoom = dataset[0]["amap"][0].numpy()
    assert zoom[0, 0] == pytest.approx(map320[11, 11]) and zoom[-1, -1] == pytest.approx(map320[-12, -12])
    # (torch takes the source position 297/319*j in float32: up to ~1e-5 off on noise; align_corners=False
    # or another crop would be off by ~0.1)
    np.testing.assert_allclose(zoom, _bilinear_align_corners(map320[11:-11, 11:-11], 320), atol=1e-4)


def test_geometry_original_cli_and_size_check(ravel256, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    torch.manual_seed(3)
    save_state_dict(_randomised(RefinementNet()), ckpt)
    rc = main(
        [
            "--input_data_path",
            str(ravel256),
            "--output_data_path",
            str(tmp_path / "o"),
            "--checkpoint_path",
            str(ckpt),
            "--geometry",
            "original",
            "--accelerator",
            "cpu",
            "--no_progress",
        ]
    )
    assert rc == 0
    for i in range(3):
        want_gt = _spec_reference(ravel256, i, _ElementwiseNet())[1]  # the mask does not depend on the net
        np.testing.assert_array_equal(read_png16(tmp_path / "o" / f"{i:05d}_gt.png"), want_gt)
        assert read_png16(tmp_path / "o" / f"{i:05d}_pred.png").shape == (480, 480)
    capsys.readouterr()
    rc = main(
        [
            "--input_data_path",
            str(ravel256),
            "--output_data_path",
            str(tmp_path / "o2"),
            "--checkpoint_path",
            str(ckpt),
            "--geometry",
            "original",
            "--image_size",
            "256",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--image_size must be 320" in err


def test_synthetic_triples_from_normal_images(tmp_path):
    import cv2

    rng = np.random.default_rng(3)
    folder = tmp_path / "normal"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), _smooth_image(rng, 48))
    triples = make_synthetic_triples(sorted(folder.glob("*.png")), per_image=6, seed=1, size=SIZE)
    assert len(triples) == 12
    for image, amap, mask in triples:
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert amap.shape == mask.shape == (SIZE, SIZE) and 0 <= amap.min() and amap.max() <= 1
        assert set(np.unique(mask)) <= {0.0, 1.0}
    defective = [t for t in triples if t[2].any()]
    assert defective and all(t[1][t[2] > 0].mean() > t[1][t[2] == 0].mean() for t in defective)
    ds = SyntheticRefinementDataset(folder, SIZE, per_image=2, seed=0, fresh=False)
    again = SyntheticRefinementDataset(folder, SIZE, per_image=2, seed=0, fresh=False)
    assert (
        len(ds) == 4 and torch.equal(ds[1]["amap"], again[1]["amap"]) and torch.equal(ds[1]["mask"], again[1]["mask"])
    )
    assert not torch.equal(ds[1]["amap"], ds[3]["amap"])  # same normal image, another defect
    other = SyntheticRefinementDataset(folder, SIZE, per_image=2, seed=1, fresh=False)
    assert not torch.equal(ds[1]["amap"], other[1]["amap"])
    assert ds[0]["image"].shape == (3, SIZE, SIZE) and ds[0]["mask"].shape == (1, SIZE, SIZE)


def test_cli_train_then_refine(ravel, tmp_path, capsys):
    ckpt, out = tmp_path / "ref.pt", tmp_path / "out"
    with pytest.warns(UserWarning, match="ImageNet weights"):  # no weights offline: random encoders
        rc = main(
            [
                "--train",
                "--train_data",
                "ravel",
                "--train_data_path",
                str(ravel),
                "--input_data_path",
                str(ravel),
                "--output_data_path",
                str(out),
                "--checkpoint_path",
                str(ckpt),
                "--num_epochs",
                "1",
                "--batch_size",
                "2",
                "--image_size",
                str(SIZE),
                "--accelerator",
                "cpu",
                "--devices",
                "1",
                "--no_progress",
            ]
        )
    assert rc == 0 and ckpt.is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ravel.iterdir())
    rc = main(
        [
            "--input_data_path",
            str(ravel),
            "--output_data_path",
            str(tmp_path / "o2"),
            "--checkpoint_path",
            str(ckpt),
            "--image_size",
            str(SIZE),
            "--category",
            "cat_a",
            "--no_progress",
        ]
    )
    assert rc == 0 and len(list((tmp_path / "o2").glob("*_pred.png"))) == 2


def test_cli_errors_are_one_line(ravel, tmp_path, capsys):
    rc = main(
        [
            "--input_data_path",
            str(ravel),
            "--output_data_path",
            str(tmp_path / "o"),
            "--checkpoint_path",
            str(tmp_path / "missing.pt"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "missing.pt" in err
    assert main(["--image_size", "100"]) == 2


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--samples_per_image", "-1"], "--samples_per_image"),
        (["--num_workers", "-2"], "--num_workers"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--input_data_path", "IN", "--output_data_path", "OUT", "--blend_weight", "1.5"], "--blend_weight"),
        (["--output_data_path", "OUT"], "--input_data_path and --output_data_path"),  # refining needs an input
        (["--input_data_path", "IN", "--output_data_path", "IN"], "--output_data_path must differ"),
        (["--input_data_path", "IN", "--output_data_path", "FILE/out"], "--output_data_path"),
        (["--checkpoint_path", "FILE/ref.pt"], "--checkpoint_path"),
    ],
)
def test_refinement_flags_checked_before_any_work(ravel, tmp_path, capsys, monkeypatch, flags, named):
    """Each bad flag: exit 2, one line naming it, before a model is built (so nothing trains for
    an epoch first) and with nothing written."""
    import pni.refinement.model as refinement_model

    def no_model(*_):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(refinement_model, "build_fresh_model", no_model)
    (tmp_path / "FILE").write_text("a file in the way")
    subs = {
        "IN": str(ravel),
        "OUT": str(tmp_path / "out"),
        "FILE/out": str(tmp_path / "FILE" / "out"),
        "FILE/ref.pt": str(tmp_path / "FILE" / "ref.pt"),
    }
    argv = [
        "--train",
        "--train_data",
        "ravel",
        "--train_data_path",
        str(ravel),
        "--checkpoint_path",
        str(tmp_path / "ref.pt"),
        "--image_size",
        str(SIZE),
        "--accelerator",
        "cpu",
        "--no_progress",
    ]
    rc = main(argv + [subs.get(f, f) for f in flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_masks_of_any_encoding_train_alike(ravel, tmp_path):
    """A ravel mask stored as 0/1 (8- or 16-bit) is the same defect as one stored as 0/65535."""
    import shutil

    copy = tmp_path / "ravel01"
    shutil.copytree(ravel, copy)
    expected = RavelRefinementDataset(ravel, SIZE)
    defects = [i for i in range(4) if read_png16(ravel / f"{i:05d}_gt.png").max() > 0]
    assert defects
    for bits in (np.uint8, np.uint16):
        for i in defects:
            gt = read_png16(ravel / f"{i:05d}_gt.png")
            Image.fromarray((gt > 0).astype(bits)).save(copy / f"{i:05d}_gt.png")
        got = RavelRefinementDataset(copy, SIZE)
        for i in range(len(expected)):
            assert torch.equal(got[i]["mask"], expected[i]["mask"])


def test_imagenet_backbone_weights_with_old_torchvision_keys(tmp_path):
    import re

    from pni.refinement.model import build_fresh_model

    model = RefinementNet()
    feats = model.encoder1.original_model.features.state_dict()
    # torchvision's released file uses 'norm.1'-style names inside dense layers, plus a classifier
    state = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", f"features.{k}"): v + 1.0
        for k, v in feats.items()
        if v.is_floating_point()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    state["classifier.weight"] = torch.zeros(1000, 2208)
    torch.save(state, tmp_path / "densenet161-test.pth")
    fresh = build_fresh_model(tmp_path / "densenet161-test.pth")
    got1 = fresh.encoder1.original_model.features.state_dict()
    got2 = fresh.encoder2.original_model.features.state_dict()
    for k, v in feats.items():
        if v.is_floating_point():
            assert torch.equal(got1[k], v + 1.0), k
    assert torch.equal(got2["conv0.weight"], feats["conv0.weight"] + 1.0)
    assert torch.equal(got2["norm0.running_var"], feats["norm0.running_var"] + 1.0)
    with pytest.raises(PNIError, match="not found"):
        build_fresh_model(tmp_path / "nope.pth")
