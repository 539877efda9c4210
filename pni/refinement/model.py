"""Pixel-wise refinement network (docs/METHOD.md, section 7) and its checkpoint loading.

The network improves a finished anomaly map from ``(image, map)``:

- ``encoder1``: a full torchvision DenseNet-161 ``features`` stack for the ImageNet-normalised
  image; ``encoder2``: only the DenseNet-161 stem (``conv0, norm0, relu0, pool0``) for the map
  repeated to 3 channels (not normalised). The two stems are averaged after the first max-pool,
  then ``encoder1``'s dense blocks 1-4 with their transitions, ``norm5`` and a ReLU run
  (2208 channels, stride 32).
- ``decoder``: a 1x1 conv to 768 channels, five up blocks (bilinear x2, 1x1 conv halving the
  channels ``convA``, ReLU, 3x3 conv ``convB``, ReLU), then a 1x1 conv to one channel.
- output = input map + network output (residual).

State-dict key layout (identical to the original checkpoint's)::

    encoder1.original_model.features.<torchvision densenet161 feature keys>
        e.g. encoder1.original_model.features.conv0.weight,
             encoder1.original_model.features.denseblock1.denselayer1.norm1.weight, ...
    encoder2.original_model.features.{conv0,norm0}.*
    decoder.features.decoder_conv0.{weight,bias}
    decoder.features.decoder_up{1..5}.convA.{weight,bias}
    decoder.features.decoder_up{1..5}.convB.{weight,bias}
    decoder.features.decoder_conv_final.{weight,bias}

The original's encoder2 may hold a whole DenseNet-161 (and both encoders its classifier);
those unused keys are ignored when loading (``load_refinement_state_dict``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet161

from pni.errors import PNIError
from pni.io import load_weights_only

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_CHANNELS = 2208
DECODER_CHANNELS = 768
NUM_UP_BLOCKS = 5
STRIDE = 2**NUM_UP_BLOCKS  # 32
DENSENET161_FILE_GLOB = "densenet161-*.pth"


class _OriginalModel(nn.Module):
    """Holds ``features`` so that keys read ``<encoder>.original_model.features.*``."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features


def _densenet161_stem() -> nn.Sequential:
    """DenseNet-161 stem (as torchvision builds it): (B,3,H,W) -> (B,96,H/4,W/4)."""
    conv0 = nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv0.weight)
    return nn.Sequential(
        OrderedDict(
            conv0=conv0,
            norm0=nn.BatchNorm2d(96),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    )


class ImageEncoder(nn.Module):
    """``encoder1``: the full DenseNet-161 feature stack (weights=None; load weights separately)."""

    def __init__(self) -> None:
        super().__init__()
        self.original_model = _OriginalModel(densenet161(weights=None).features)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,96,H/4,W/4): conv0, norm0, relu0, pool0."""
        f = self.original_model.features
        for name in ("conv0", "norm0", "relu0", "pool0"):
            x = getattr(f, name)(x)
        return x

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """(B,96,H/4,W/4) -> (B,2208,H/32,W/32): dense blocks 1-4, transitions, norm5, ReLU."""
        f = self.original_model.features
        for name in (
            "denseblock1",
            "transition1",
            "denseblock2",
            "transition2",
            "denseblock3",
            "transition3",
            "denseblock4",
            "norm5",
        ):
            x = getattr(f, name)(x)
        return F.relu(x)


class MapEncoder(nn.Module):
    """``encoder2``: the DenseNet-161 stem only, for the 3-channel map."""

    def __init__(self) -> None:
        super().__init__()
        self.original_model = _OriginalModel(_densenet161_stem())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,96,H/4,W/4)."""
        return self.original_model.features(x)


class UpBlock(nn.Module):
    """Bilinear x2, 1x1 ``convA`` (c -> c/2), ReLU, 3x3 ``convB`` (c/2 -> c/2), ReLU."""

    def __init__(self, in_channels: int, align_corners: bool = True) -> None:
        super().__init__()
        out = in_channels // 2
        self.convA = nn.Conv2d(in_channels, out, kernel_size=1)
        self.convB = nn.Conv2d(out, out, kernel_size=3, padding=1)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,c,h,w) -> (B,c/2,2h,2w)."""
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=self.align_corners)
        return F.relu(self.convB(F.relu(self.convA(x))))


class Decoder(nn.Module):
    """(B,2208,H/32,W/32) -> (B,1,H,W); modules live in ``decoder.features``."""

    def __init__(self, align_corners: bool = True) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["decoder_conv0"] = nn.Conv2d(ENCODER_CHANNELS, DECODER_CHANNELS, kernel_size=1)
        ch = DECODER_CHANNELS
        for i in range(1, NUM_UP_BLOCKS + 1):
            layers[f"decoder_up{i}"] = UpBlock(ch, align_corners)
            ch //= 2
        final = nn.Conv2d(ch, 1, kernel_size=1)  # 24 -> 1
        # Zero-init the last conv: a fresh model starts as the identity on the map.
        nn.init.zeros_(final.weight)
        assert final.bias is not None  # Conv2d(bias=True)
        nn.init.zeros_(final.bias)
        layers["decoder_conv_final"] = final
        self.features = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class RefinementNet(nn.Module):
    """Residual refinement of an anomaly map.

    ``forward(image, amap)``: image (B,3,H,W) ImageNet-normalised, amap (B,1,H,W) in [0,1]
    -> refined map (B,1,H,W) = amap + decoder(features). H, W should be multiples of 32
    (the network output is resized to (H,W) bilinearly otherwise). Trained at 320x320.
    ``align_corners`` is the decoder's bilinear upsampling mode (True, as in DenseDepth,
    whose ``convA/convB`` naming the original follows).
    """

    def __init__(self, align_corners: bool = True) -> None:
        super().__init__()
        self.encoder1 = ImageEncoder()
        self.encoder2 = MapEncoder()
        self.decoder = Decoder(align_corners)

    def forward(self, image: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        stem = 0.5 * (self.encoder1.stem(image) + self.encoder2(amap.expand(-1, 3, -1, -1)))
        out = self.decoder(self.encoder1.body(stem))
        if out.shape[-2:] != amap.shape[-2:]:
            out = F.interpolate(out, size=amap.shape[-2:], mode="bilinear", align_corners=False)
        return amap + out


# ----------------------------------------------------------------------------- checkpoints

_OPTIONAL_SUFFIXES = (".num_batches_tracked",)
_IGNORABLE_PREFIXES = ("encoder1.original_model.", "encoder2.original_model.")


def _unwrap_state_dict(obj: Any, source: str) -> OrderedDict[str, torch.Tensor]:
    """Accept a raw state dict or a dict with 'model'/'state_dict'; strip ``module.``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PNIError(f"{source}: not a refinement state dict (nor a dict with 'model'/'state_dict')")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in obj.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    return out


def load_refinement_state_dict(
    model: RefinementNet, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Load ``state`` (original key layout) into ``model``, strict on the keys it uses.

    Unused encoder keys (encoder2's dense blocks, classifiers) are ignored; other unknown
    keys give a warning. Missing required keys or shape mismatches raise one ``PNIError``.
    """
    state = _unwrap_state_dict(state, source)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    bad_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    unexpected = [k for k in state if k not in own]
    if missing or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {'; '.join(bad_shape[:2])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise PNIError(f"{source}: not a refinement checkpoint in the expected layout: " + ", ".join(parts))
    strange = [k for k in unexpected if not k.startswith(_IGNORABLE_PREFIXES)]
    if strange:
        warnings.warn(f"{source}: ignoring {len(strange)} unknown keys (e.g. {', '.join(strange[:3])})", stacklevel=2)
    merged = {k: state.get(k, own[k]) for k in own}
    model.load_state_dict(merged, strict=True)


def load_refinement_checkpoint(
    path: str | os.PathLike, model: RefinementNet | None = None, map_location: str | torch.device = "cpu"
) -> RefinementNet:
    """Build (or fill) a ``RefinementNet`` from a checkpoint file, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise PNIError(f"refinement checkpoint not found: {path} (pass --checkpoint_path)")
    obj = load_weights_only(path, "refinement checkpoint", map_location=map_location)
    model = model if model is not None else RefinementNet()
    load_refinement_state_dict(model, obj, source=str(path))
    return model


_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def find_cached_densenet161() -> Path | None:
    """The torchvision DenseNet-161 ImageNet file in the torch hub cache, if present."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    hits = sorted(folder.glob(DENSENET161_FILE_GLOB)) if folder.is_dir() else []
    return hits[0] if hits else None


def load_imagenet_backbone(model: RefinementNet, weights_path: str | os.PathLike) -> None:
    """Load torchvision DenseNet-161 ImageNet weights into both encoders (stem of encoder2).

    Accepts torchvision's file (old ``norm.1`` style keys are renamed as torchvision does;
    BN ``num_batches_tracked`` may be absent) or a state dict whose keys start with ``features.``.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise PNIError(f"--backbone_weights: file not found: {path}")
    raw = load_weights_only(path, "DenseNet-161 weights")
    raw = _unwrap_state_dict(raw, str(path))
    feats = {}
    for k, v in raw.items():
        k = _OLD_DENSENET_KEY.sub(r"\1\2", k)
        if k.startswith("features."):
            feats[k[len("features.") :]] = v
    enc1 = model.encoder1.original_model.features
    try:
        enc1.load_state_dict(feats, strict=True)
    except RuntimeError as exc:
        raise PNIError(f"{path}: not DenseNet-161 ImageNet weights ({str(exc).splitlines()[0]})") from exc
    stem_keys = model.encoder2.original_model.features.state_dict().keys()
    # strict=False only because old files lack BN ``num_batches_tracked`` (kept at its default)
    model.encoder2.original_model.features.load_state_dict({k: feats[k] for k in stem_keys if k in feats}, strict=False)


def build_fresh_model(backbone_weights: str | os.PathLike | None = None, use_hub_cache: bool = True) -> RefinementNet:
    """A new ``RefinementNet`` with ImageNet encoders from ``backbone_weights`` or the hub cache.

    Without either, the encoders keep their random initialisation (a warning says so).
    """
    model = RefinementNet()
    path = Path(backbone_weights) if backbone_weights else (find_cached_densenet161() if use_hub_cache else None)
    if path is not None:
        load_imagenet_backbone(model, path)
    else:
        warnings.warn(
            "no DenseNet-161 ImageNet weights (--backbone_weights or torch hub cache "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}): encoders start from random init",
            stacklevel=2,
        )
    return model
