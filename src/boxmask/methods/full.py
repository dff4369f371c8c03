"""Mask-supervised references on the same networks: CondInst's dice loss on real masks (``full``), and
mixed box/mask supervision (``mixed``; methods.md §1, §2)."""

from __future__ import annotations

from ..supervision.full import FullMaskSupervision, MixedSupervision
from .base import Method

__all__ = ["FullMethod", "MixedMethod"]


class FullMethod(Method):
    """``supervision.type: full``: dice loss on the ground-truth masks (CondInst; on SOLOv2, its mask-supervised
    control). Reads ground-truth masks."""

    key = "full"
    title = "CondInst"
    supervision_class = FullMaskSupervision
    reads_gt_masks = True
    short_box_fit = False


class MixedMethod(Method):
    """``supervision.type: mixed``: dice where an annotation has a mask, BoxInst losses where it has only a
    box. Reads ground-truth masks (and ``has_mask``)."""

    key = "mixed"
    title = "mixed"
    supervision_class = MixedSupervision
    reads_gt_masks = True
    short_box_fit = False
