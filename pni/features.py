"""Patch features: ImageNet backbones cut after the last needed layer, plus PatchCore-style
local aggregation (docs/METHOD.md, section 2).

``PatchFeatureExtractor(images)`` maps a batch ``(B, 3, H, W)`` to ``(B, R, C, E)``, where
``R x C`` is the grid of the first requested layer (stride 8 for ``layer2``) and ``E`` is
``target_embed_dimension``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from pni.errors import PNIError
from pni.io import file_sha256, load_weights_only


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where its ImageNet weights come from."""

    builder: str  # torchvision.models function name
    weights_enum: str  # torchvision weights enum (IMAGENET1K_V1 is used)
    layer_nodes: dict  # our layer name -> torchvision node name


_RESNET_NODES = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
_DENSENET_NODES = {
    "layer1": "features.denseblock1",
    "layer2": "features.denseblock2",
    "layer3": "features.denseblock3",
    "layer4": "features.denseblock4",
}

BACKBONES: dict[str, BackboneSpec] = {
    "WR101": BackboneSpec("wide_resnet101_2", "Wide_ResNet101_2_Weights", _RESNET_NODES),
    "WR50": BackboneSpec("wide_resnet50_2", "Wide_ResNet50_2_Weights", _RESNET_NODES),
    "R18": BackboneSpec("resnet18", "ResNet18_Weights", _RESNET_NODES),
    "R34": BackboneSpec("resnet34", "ResNet34_Weights", _RESNET_NODES),
    "R50": BackboneSpec("resnet50", "ResNet50_Weights", _RESNET_NODES),
    "R101": BackboneSpec("resnet101", "ResNet101_Weights", _RESNET_NODES),
    "R152": BackboneSpec("resnet152", "ResNet152_Weights", _RESNET_NODES),
    "RNX101": BackboneSpec("resnext101_32x8d", "ResNeXt101_32X8D_Weights", _RESNET_NODES),
    "DN201": BackboneSpec("densenet201", "DenseNet201_Weights", _DENSENET_NODES),
}


RANDOM_INIT_SEED = 0


def weights_file_name(backbone: str) -> str:
    """File name of torchvision's IMAGENET1K_V1 checkpoint for ``backbone``."""
    spec = BACKBONES[backbone]
    url = getattr(tvm, spec.weights_enum).IMAGENET1K_V1.url
    return os.path.basename(url)


def hub_checkpoint_dir() -> Path:
    """The torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# torchvision's DenseNet checkpoints use the old "norm.1" key style.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _fix_densenet_keys(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        match = _DENSENET_OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def weights_file(name: str, weights_path: str | os.PathLike | None = None) -> Path:
    """The ImageNet weights file of backbone ``name``: ``weights_path``, else the torch hub
    cache's ``<torchvision file name>``; a missing file is a PNIError saying where to put it."""
    if name not in BACKBONES:
        raise PNIError(f"--backbone: unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    if weights_path is None:
        candidate = hub_checkpoint_dir() / weights_file_name(name)
        if not candidate.is_file():
            raise PNIError(
                f"no ImageNet weights for {name}: put {weights_file_name(name)} in {hub_checkpoint_dir()} "
                f"(or pass --backbone_weights PATH, or --random_init for a test run)"
            )
        return candidate
    path = Path(weights_path)
    if not path.is_file():
        raise PNIError(f"--backbone_weights: file not found: {path}")
    return path


_digests: dict[tuple[str, int, int], str] = {}


def weights_digest(name: str, weights_path: str | os.PathLike | None = None, random_init: bool = False) -> str:
    """What decides the backbone's weights, for the settings records: ``random_init`` or
    ``sha256:<first 16 hex digits>`` of the weights file (see :func:`weights_file`)."""
    if random_init and weights_path is None:
        return "random_init"
    path = weights_file(name, weights_path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = "sha256:" + file_sha256(path)[:16]
    return _digests[key]


def load_backbone(name: str, weights_path: str | os.PathLike | None = None, random_init: bool = False) -> nn.Module:
    """Build a torchvision backbone with ImageNet weights, never downloading them.

    Weights come from ``weights_path`` if given, else from the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/<torchvision file name>``). ``random_init`` keeps the
    random initialisation (for tests and offline demos).
    """
    if name not in BACKBONES:
        raise PNIError(f"--backbone: unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if random_init and weights_path is None:
        # Every stage (and every process) must see the same random backbone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return getattr(tvm, spec.builder)(weights=None).eval()
    model = getattr(tvm, spec.builder)(weights=None)
    weights_path = weights_file(name, weights_path)
    state = load_weights_only(weights_path, "backbone weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PNIError(f"{weights_path} does not hold a state dict for {name} ({spec.builder})")
    if spec.builder.startswith("densenet"):
        state = _fix_densenet_keys(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PNIError(f"{weights_path} does not fit {name} ({spec.builder}): {first}") from None
    return model.eval()


class PatchFeatureExtractor(nn.Module):
    """Backbone up to the last requested layer + local patch aggregation.

    forward: images ``(B, 3, H, W)`` -> features ``(B, R, C, E)`` with ``R x C`` the grid of
    the first layer in ``layers`` and ``E = target_embed_dimension``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        backbone_name: str,
        layers: Sequence[str] = ("layer2", "layer3"),
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        patchsize: int = 5,
    ) -> None:
        super().__init__()
        nodes = BACKBONES[backbone_name].layer_nodes
        unknown = [layer for layer in layers if layer not in nodes]
        if unknown:
            raise PNIError(f"--layer_index: unknown layer(s) {unknown}; choose from {list(nodes)}")
        self.backbone_name = backbone_name
        self.layers = list(layers)
        # create_feature_extractor traces the model and drops everything after the last node.
        self.body = create_feature_extractor(backbone, {nodes[layer]: layer for layer in self.layers})
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.patchsize = patchsize
        self.eval()

    def train(self, mode: bool = True) -> PatchFeatureExtractor:  # always frozen, BN in eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Under autocast the backbone runs in reduced precision; the aggregation always runs
        in float32 (averages of many rounded values, not rounded again), so the features are
        float32 whatever the precision."""
        if images.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN's reduced-precision convolutions run about twice as fast on channels-last input
            images = images.contiguous(memory_format=torch.channels_last)
        maps = self.body(images)
        with torch.autocast(images.device.type, enabled=False):
            return self._aggregate(
                [maps[layer].to(dtype=torch.float32, memory_format=torch.contiguous_format) for layer in self.layers]
            )

    def _aggregate(self, per_layer: list[torch.Tensor]) -> torch.Tensor:
        ref_h, ref_w = per_layer[0].shape[-2:]
        pooled = []
        for fmap in per_layer:
            b, _, h, w = fmap.shape
            vec = pooled_patches(fmap, self.patchsize, self.pretrain_embed_dimension)  # (B, h, w, D)
            if (h, w) != (ref_h, ref_w):
                # Pooling over the feature axis and bilinear resizing over the grid are both
                # linear on different axes, so they commute: pooling first is the same as
                # resizing every neighbourhood element (docs/METHOD.md, section 2), at a fraction of the cost.
                vec = F.interpolate(
                    vec.permute(0, 3, 1, 2), size=(ref_h, ref_w), mode="bilinear", align_corners=False
                ).permute(0, 2, 3, 1)
            pooled.append(vec.reshape(b * ref_h * ref_w, -1))
        stacked = torch.stack(pooled, dim=1)  # (B*P, L, pretrain_dim)
        feats = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), self.target_embed_dimension)
        return feats.reshape(per_layer[0].shape[0], ref_h, ref_w, self.target_embed_dimension)


def pooled_patches(fmap: torch.Tensor, patchsize: int, dim: int) -> torch.Tensor:
    """Every ``patchsize x patchsize`` neighbourhood (zero padding, stride 1) flattened in
    ``(C, dy, dx)`` order and adaptive-average-pooled to ``dim`` values.

    fmap ``(B, C, h, w)`` -> ``(B, h, w, dim)``; the same numbers as pooling each vector of
    :func:`local_patches` with ``F.adaptive_avg_pool1d``, but pooled along the unfolded axis
    in place, without first transposing the ``C * patchsize^2``-times larger neighbourhoods.
    """
    b, _, h, w = fmap.shape
    unfolded = F.unfold(fmap, kernel_size=patchsize, padding=(patchsize - 1) // 2, stride=1)  # (B, C*ps*ps, h*w)
    pooled = F.adaptive_avg_pool2d(unfolded[:, None], (dim, h * w))[:, 0]  # (B, dim, h*w): same bins, same sums
    return pooled.transpose(1, 2).reshape(b, h, w, dim)


def patch_padding(patchsize: int) -> int:
    """Half-width of the ``patchsize x patchsize`` aggregation window: the zero padding of
    :func:`local_patches`, and the grid border whose positions are not "interior"."""
    return (patchsize - 1) // 2


def local_patches(fmap: torch.Tensor, patchsize: int) -> torch.Tensor:
    """Every ``patchsize x patchsize`` neighbourhood (zero padding, stride 1).

    fmap ``(B, C, h, w)`` -> ``(B, h, w, C, patchsize, patchsize)``.
    """
    b, c, h, w = fmap.shape
    pad = patch_padding(patchsize)
    unfolded = F.unfold(fmap, kernel_size=patchsize, padding=pad, stride=1)  # (B, C*ps*ps, h*w)
    return unfolded.reshape(b, c, patchsize, patchsize, h, w).permute(0, 4, 5, 1, 2, 3)


def build_feature_extractor(
    backbone_name: str,
    layers: Sequence[str] = ("layer2", "layer3"),
    pretrain_embed_dimension: int = 1024,
    target_embed_dimension: int = 1024,
    patchsize: int = 5,
    weights_path: str | os.PathLike | None = None,
    random_init: bool = False,
) -> PatchFeatureExtractor:
    """Load the backbone (see :func:`load_backbone`) and wrap it for patch features."""
    backbone = load_backbone(backbone_name, weights_path=weights_path, random_init=random_init)
    return PatchFeatureExtractor(
        backbone, backbone_name, layers, pretrain_embed_dimension, target_embed_dimension, patchsize
    )
