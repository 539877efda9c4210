"""Backbones, weight loading and patch aggregation."""
import pytest
import torch
import torch.nn.functional as F

from pni.errors import PNIError
from pni.features import (
    BACKBONES,
    PatchFeatureExtractor,
    build_feature_extractor,
    hub_checkpoint_dir,
    load_backbone,
    local_patches,
    resize_patch_grid,
    weights_file_name,
)


def small_extractor(name="R18", **kw):
    return build_feature_extractor(name, pretrain_embed_dimension=48, target_embed_dimension=32,
                                   random_init=True, **kw)


def test_output_shape_and_batch_independence():
    fe = small_extractor()
    x = torch.randn(4, 3, 64, 64)
    full = fe(x)
    assert full.shape == (4, 8, 8, 32)
    singles = torch.cat([fe(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, singles, rtol=1e-4, atol=1e-5)


def test_aggregation_matches_naive_reference():
    """One position's feature equals pooling its zero-padded neighbourhoods by hand."""
    fe = small_extractor(patchsize=3)
    x = torch.randn(1, 3, 64, 64)
    maps = fe.body(x)
    l2, l3 = maps["layer2"][0], maps["layer3"][0]  # (C2, 8, 8), (C3, 4, 4)
    r, c = 5, 2
    p2 = F.pad(l2, (1, 1, 1, 1))[:, r:r + 3, c:c + 3].reshape(-1)
    # layer3: every neighbourhood element is interpolated on its own grid
    u3 = F.pad(l3, (1, 1, 1, 1))
    shifted = torch.stack([u3[:, i:i + 4, j:j + 4] for i in range(3) for j in range(3)], dim=1)  # (C3, 9, 4, 4)
    up = F.interpolate(shifted.reshape(-1, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)
    p3 = up.reshape(l3.shape[0], 9, 8, 8)[:, :, r, c].reshape(-1)
    v = torch.stack([F.adaptive_avg_pool1d(p[None, None], 48)[0, 0] for p in (p2, p3)])
    expected = F.adaptive_avg_pool1d(v.reshape(1, 1, -1), 32)[0, 0]
    torch.testing.assert_close(fe(x)[0, r, c], expected, rtol=1e-4, atol=1e-5)


def test_local_patches_layout():
    fmap = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = local_patches(fmap, 3)
    assert patches.shape == (1, 4, 4, 2, 3, 3)
    torch.testing.assert_close(patches[0, 1, 1, 1], fmap[0, 1, 0:3, 0:3])
    assert patches[0, 0, 0, 0, 0, 0] == 0  # zero padding


def test_checkpoint_through_backbone_weights_gives_identical_features(tmp_path):
    torch.manual_seed(3)
    model = load_backbone("R18", random_init=True)
    for p in model.parameters():  # make it differ from the fixed random init
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    a = PatchFeatureExtractor(model, "R18", pretrain_embed_dimension=48, target_embed_dimension=32)
    b = build_feature_extractor("R18", pretrain_embed_dimension=48, target_embed_dimension=32, weights_path=path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(b(x), small_extractor()(x))


def test_hub_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model = load_backbone("R18", random_init=True)
    target = hub_checkpoint_dir() / weights_file_name("R18")
    target.parent.mkdir(parents=True)
    torch.save(model.state_dict(), target)
    loaded = load_backbone("R18")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_missing_weights_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PNIError) as err:
        load_backbone("WR101")
    msg = str(err.value)
    assert "wide_resnet101_2-32ee1156.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "\n" not in msg


def test_wrong_checkpoint_is_refused(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(load_backbone("R34", random_init=True).state_dict(), path)
    with pytest.raises(PNIError, match="does not fit R18"):
        load_backbone("R18", weights_path=path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PNIError, match="cannot read"):
        load_backbone("R18", weights_path=bad)


def test_densenet_layers_map_to_dense_blocks(tmp_path):
    fe = small_extractor("DN201")
    assert set(fe.body.return_nodes if hasattr(fe.body, "return_nodes") else []) <= {"layer2", "layer3"}
    maps = fe.body(torch.randn(1, 3, 64, 64))
    assert maps["layer2"].shape[1:] == (512, 8, 8)  # denseblock2 of DenseNet-201
    assert maps["layer3"].shape[1:] == (1792, 4, 4)  # denseblock3
    # old-style torchvision DenseNet keys ("norm.1") load through --backbone_weights
    model = load_backbone("DN201", random_init=True)
    state = {k.replace("norm1", "norm.1").replace("conv1", "conv.1") if "denselayer" in k else k: v
             for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "dn.pth")
    reloaded = load_backbone("DN201", weights_path=tmp_path / "dn.pth")
    assert torch.equal(reloaded.features.denseblock1.denselayer1.norm1.weight,
                       model.features.denseblock1.denselayer1.norm1.weight)


def test_all_backbones_known():
    assert set(BACKBONES) == {"WR101", "WR50", "R18", "R34", "R50", "R101", "R152", "RNX101", "DN201"}
    for name in BACKBONES:
        assert weights_file_name(name).endswith(".pth")


def test_extractor_stops_after_last_layer():
    fe = small_extractor("R18")
    names = {n for n, _ in fe.body.named_modules()}
    assert not any(n.startswith("layer4") or n == "fc" for n in names)


def test_pooling_before_resize_equals_resizing_every_neighbourhood_element():
    """The SPEC's order (resize each neighbourhood element, then pool) gives the same features."""
    fe = small_extractor()
    x = torch.randn(2, 3, 64, 64)
    maps = fe.body(x)
    ref_hw = maps["layer2"].shape[-2:]
    pooled = []
    for layer in ("layer2", "layer3"):
        patches = local_patches(maps[layer], fe.patchsize)
        if patches.shape[1:3] != ref_hw:
            patches = resize_patch_grid(patches, tuple(ref_hw))
        pooled.append(F.adaptive_avg_pool1d(patches.reshape(-1, 1, patches[0, 0, 0].numel()), 48).squeeze(1))
    stacked = torch.stack(pooled, dim=1)
    expected = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), 32).reshape(2, 8, 8, 32)
    torch.testing.assert_close(fe(x), expected, rtol=1e-4, atol=1e-5)
