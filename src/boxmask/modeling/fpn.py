"""Feature pyramid P3-P7 on top of C3-C5 (FCOS/CondInst neck, methods.md §1.1)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["FPN", "SOLOFPN"]


class FPN(nn.Module):
    """FPN with P3-P5 from C3-C5 plus P6/P7 (FCOS, Tian et al. 2019 §3.2; methods.md §1.1).

    * Lateral 1x1 conv on each C_i, top-down sum with nearest upsampling to the lower level's
      exact size, 3x3 output conv: P3-P5 (Lin et al. 2017), no normalisation.
    * ``P6 = conv3x3/s2(P5)`` on the FPN *output* P5, ``P7 = conv3x3/s2(ReLU(P6))``
      (AdelaiDet ``TOP_LEVELS=2``; mmdet ``add_extra_convs='on_output'``,
      ``relu_before_extra_convs=True``).
    * Built from :class:`torchvision.ops.FeaturePyramidNetwork` and
      :class:`torchvision.ops.feature_pyramid_network.LastLevelP6P7`; all convs have bias and
      are initialised kaiming-uniform (a=1) with zero bias, as in detectron2/AdelaiDet.

    Args:
        in_channels: channels of C3, C4, C5 (e.g. ``Backbone.out_channels``), three positive ints.
        out_channels: channels of every P level (256 in all references).

    Attributes:
        in_channels: as given.
        out_channels: int, channels of every output level.
        strides: ``[8, 16, 32, 64, 128]`` pixels, for P3..P7.

    Raises:
        ValueError: ``in_channels`` is not three positive ints, or ``out_channels`` < 1.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 3 or not all(isinstance(c, int) and c > 0 for c in in_channels):
            raise ValueError(f"FPN expects the channels of C3, C4, C5 (three positive ints), got {in_channels}")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"FPN out_channels must be a positive int, got {out_channels!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.strides = [8, 16, 32, 64, 128]
        # in == out channels makes LastLevelP6P7 read P5 (the FPN output), not C5.
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Compute P3..P7.

        Args:
            features: ``[C3, C4, C5]``, float ``[B, in_channels[i], H_i, W_i]`` at strides 8, 16, 32.

        Returns:
            ``[P3, P4, P5, P6, P7]``, float ``[B, out_channels, h, w]``; P3-P5 keep the sizes of
            C3-C5; P6 and P7 are ``ceil`` halvings (3x3, stride 2, padding 1) of P5 and P6,
            i.e. ``ceil(H / 64)`` and ``ceil(H / 128)`` for inputs padded to a multiple of 32.

        Raises:
            ValueError: not three 4-D maps, or a map's channel count differs from ``in_channels``.
        """
        if len(features) != 3:
            raise ValueError(f"FPN expects [C3, C4, C5], got {len(features)} feature maps")
        for level, (feat, channels) in enumerate(zip(features, self.in_channels), start=3):
            if feat.dim() != 4 or feat.shape[1] != channels:
                raise ValueError(f"FPN input C{level}: expected [B,{channels},H,W], got {tuple(feat.shape)}")
        named = OrderedDict((f"c{level}", feat) for level, feat in enumerate(features, start=3))
        return list(self.fpn(named).values())


class SOLOFPN(nn.Module):
    """FPN P2-P6 on C2-C5 for SOLOv2 / BoxLevelSet (methods.md §3.1; Wang et al., SOLOv2, NeurIPS 2020).

    Lateral 1x1 convs, top-down nearest upsampling and 3x3 output convs give P2-P5 (strides 4-32,
    ``start_level=0``); ``P6 = max_pool2d(P5, kernel 1, stride 2)`` (mmdet ``num_outs=5`` without extra
    convs). Built from :class:`torchvision.ops.FeaturePyramidNetwork` with
    :class:`torchvision.ops.feature_pyramid_network.LastLevelMaxPool`.

    Args:
        in_channels: channels of C2, C3, C4, C5 (four positive ints, e.g. ``Backbone.out_channels`` of a
            backbone built ``with_c2=True``).
        out_channels: channels of every P level (256 in the reference).

    Attributes:
        strides: ``[4, 8, 16, 32, 64]`` pixels, for P2..P6.

    Raises:
        ValueError: ``in_channels`` is not four positive ints, or ``out_channels`` < 1.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 4 or not all(isinstance(c, int) and c > 0 for c in in_channels):
            raise ValueError(f"SOLOFPN expects the channels of C2, C3, C4, C5 (four positive ints), got {in_channels}")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"SOLOFPN out_channels must be a positive int, got {out_channels!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.strides = [4, 8, 16, 32, 64]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``[C2, C3, C4, C5]`` (float ``[B, in_channels[i], H/s, W/s]``, s = 4, 8, 16, 32) →
        ``[P2, ..., P6]`` float ``[B, out_channels, ., .]``; P6 is ``ceil`` half of P5.

        Raises:
            ValueError: not four 4-D maps, or a channel count differs from ``in_channels``.
        """
        if len(features) != 4:
            raise ValueError(f"SOLOFPN expects [C2, C3, C4, C5], got {len(features)} feature maps")
        for level, (feat, channels) in enumerate(zip(features, self.in_channels), start=2):
            if feat.dim() != 4 or feat.shape[1] != channels:
                raise ValueError(f"SOLOFPN input C{level}: expected [B,{channels},H,W], got {tuple(feat.shape)}")
        named = OrderedDict((f"c{level}", feat) for level, feat in enumerate(features, start=2))
        return list(self.fpn(named).values())
