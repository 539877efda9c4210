"""Backbones, weight loading and patch aggregation."""

import numpy as np
import pytest
import reference
import torch
import torchvision

from pni.errors import PNIError
from pni.features import (
    BACKBONES,
    PatchFeatureExtractor,
    build_feature_extractor,
    hub_checkpoint_dir,
    load_backbone,
    local_patches,
    weights_file_name,
)


def small_extractor(name="R18", **kw):
    return build_feature_extractor(name, pretrain_embed_dimension=48, target_embed_dimension=32, random_init=True, **kw)


def test_output_shape_and_batch_independence():
    fe = small_extractor()
    x = torch.randn(4, 3, 64, 64)
    full = fe(x)
    assert full.shape == (4, 8, 8, 32)
    singles = torch.cat([fe(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(full, singles, rtol=1e-4, atol=1e-5)


def perturbed_resnet18(seed: int = 3) -> torch.nn.Module:
    """A torchvision ResNet-18 with random weights and BatchNorm statistics (so eval mode matters)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("patchsize", [3, 5])
def test_features_equal_the_spec_reference(patchsize):
    """Every position's feature equals METHOD section 2 computed from the backbone's raw layer
    outputs: zero-padded neighbourhoods, each layer-3 neighbourhood element bilinearly brought
    to layer 2's grid, adaptive average pooling per layer, then of the concatenation."""
    model = perturbed_resnet18()
    fe = PatchFeatureExtractor(
        model, "R18", pretrain_embed_dimension=48, target_embed_dimension=32, patchsize=patchsize
    )
    x = torch.randn(2, 3, 64, 48)
    expected = reference.patch_features(reference.resnet_layer_maps(model, x, ["layer2", "layer3"]), patchsize, 48, 32)
    assert expected.shape == (2, 8, 6, 32)
    np.testing.assert_allclose(fe(x).double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_reference_pooling_by_hand():
    """The reference's adaptive average pooling: 5 -> 3 averages elements 0-1, 1-3, 3-4."""
    np.testing.assert_allclose(
        reference.adaptive_pool_weights(5, 3) @ np.array([1.0, 2, 4, 8, 16]), [1.5, 14 / 3, 12.0]
    )


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
    model = load_backbone("DN201", random_init=True)
    x = torch.randn(1, 3, 64, 64)
    maps = fe.body(x)
    # reference: DenseNet-201's feature stages run one after the other, outputs of blocks 2 and 3
    expected, h = {}, x
    with torch.no_grad():
        for name, module in model.features.named_children():
            h = module(h)
            if name in ("denseblock2", "denseblock3"):
                expected[name] = h
            if name == "denseblock3":
                break
    assert sorted(maps) == ["layer2", "layer3"]
    assert maps["layer2"].shape[1:] == (512, 8, 8) and maps["layer3"].shape[1:] == (1792, 4, 4)
    torch.testing.assert_close(maps["layer2"], expected["denseblock2"])
    torch.testing.assert_close(maps["layer3"], expected["denseblock3"])
    names = {n for n, _ in fe.body.named_modules()}
    assert "features.denseblock3" in names
    assert not names & {"features.transition3", "features.denseblock4", "features.norm5", "classifier"}
    # old-style torchvision DenseNet keys ("norm.1") load through --backbone_weights
    state = {
        k.replace("norm1", "norm.1").replace("conv1", "conv.1") if "denselayer" in k else k: v
        for k, v in model.state_dict().items()
    }
    torch.save(state, tmp_path / "dn.pth")
    reloaded = load_backbone("DN201", weights_path=tmp_path / "dn.pth")
    assert torch.equal(
        reloaded.features.denseblock1.denselayer1.norm1.weight, model.features.denseblock1.denselayer1.norm1.weight
    )


def test_all_backbones_known():
    assert set(BACKBONES) == {"WR101", "WR50", "R18", "R34", "R50", "R101", "R152", "RNX101", "DN201"}
    for name in BACKBONES:
        assert weights_file_name(name).endswith(".pth")


def test_extractor_stops_after_last_layer():
    fe = small_extractor("R18")
    names = {n for n, _ in fe.body.named_modules()}
    assert not any(n.startswith("layer4") or n == "fc" for n in names)
