"""Refinement model (SPEC section 7): key layout, loading, 16-bit PNGs, training, inference, CLI."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from pni.errors import PNIError
from pni.refinement import (RavelRefinementDataset, RefinementNet, SyntheticRefinementDataset,
                            load_refinement_checkpoint, load_refinement_state_dict,
                            make_synthetic_triples, read_map, read_png16,
                            refine_ravel_folder, refinement_loss, save_state_dict, train_step, write_png16,
                            zoom_map)
from pni.refinement.cli import main
from pni.refinement.data import round_to_uint16

SIZE = 32  # model input size in tests (DenseNet-161 at 320 is slow on CPU); ravel files are 40x40
RAVEL = 40


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
    for k in ("decoder.features.decoder_conv0.weight", "decoder.features.decoder_up5.convB.weight",
              "decoder.features.decoder_conv_final.bias"):
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
    assert refinement_loss(batch["mask"], batch["mask"]).item() == 0.0


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


def test_geometry_original_differs_and_category_filter(ravel, bias_model, tmp_path):
    a = RavelRefinementDataset(ravel, SIZE, geometry="aligned")[1]
    o = RavelRefinementDataset(ravel, SIZE, geometry="original")[1]
    assert torch.equal(a["image"], o["image"]) and torch.equal(a["mask"], o["mask"])
    assert not torch.equal(a["amap"], o["amap"])
    assert torch.allclose(o["amap"], zoom_map(a["amap"], 0.9))
    ramp = torch.arange(10.0).view(1, 10).expand(10, 10)
    assert torch.equal(zoom_map(ramp, 1.0), ramp)
    refine_ravel_folder(bias_model, ravel, tmp_path / "al", ["cat_b"], image_size=SIZE, progress=False)
    refine_ravel_folder(bias_model, ravel, tmp_path / "or", ["cat_b"], image_size=SIZE,
                        geometry="original", progress=False)
    assert sorted(p.name for p in (tmp_path / "al").glob("*_pred.png")) == ["00002_pred.png", "00003_pred.png"]
    with open(tmp_path / "al" / "index.csv") as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["cat_b", "cat_b"]
    assert not np.array_equal(read_png16(tmp_path / "al" / "00002_pred.png"),
                              read_png16(tmp_path / "or" / "00002_pred.png"))
    with pytest.raises(PNIError, match="cat_z"):
        RavelRefinementDataset(ravel, SIZE, categories=["cat_z"])


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
    assert len(ds) == 4 and torch.equal(ds[1]["amap"], ds[1]["amap"])
    assert ds[0]["image"].shape == (3, SIZE, SIZE) and ds[0]["mask"].shape == (1, SIZE, SIZE)


def test_cli_train_then_refine(ravel, tmp_path, capsys):
    ckpt, out = tmp_path / "ref.pt", tmp_path / "out"
    with pytest.warns(UserWarning, match="ImageNet weights"):  # no weights offline: random encoders
        rc = main(["--train", "--train_data", "ravel", "--train_data_path", str(ravel), "--input_data_path",
                   str(ravel), "--output_data_path", str(out), "--checkpoint_path", str(ckpt), "--num_epochs", "1",
                   "--batch_size", "2", "--image_size", str(SIZE), "--accelerator", "cpu", "--devices", "1",
                   "--no_progress"])
    assert rc == 0 and ckpt.is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ravel.iterdir())
    rc = main(["--input_data_path", str(ravel), "--output_data_path", str(tmp_path / "o2"),
               "--checkpoint_path", str(ckpt), "--image_size", str(SIZE), "--category", "cat_a", "--no_progress"])
    assert rc == 0 and len(list((tmp_path / "o2").glob("*_pred.png"))) == 2


def test_cli_errors_are_one_line(ravel, tmp_path, capsys):
    rc = main(["--input_data_path", str(ravel), "--output_data_path", str(tmp_path / "o"),
               "--checkpoint_path", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "missing.pt" in err
    assert main(["--image_size", "100"]) == 2


def test_imagenet_backbone_weights_with_old_torchvision_keys(tmp_path):
    import re

    from pni.refinement.model import build_fresh_model

    model = RefinementNet()
    feats = model.encoder1.original_model.features.state_dict()
    # torchvision's released file uses 'norm.1'-style names inside dense layers, plus a classifier
    state = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", f"features.{k}"): v + 1.0
             for k, v in feats.items() if v.is_floating_point()}
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
