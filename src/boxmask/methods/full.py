"""Mask-supervised references on the same networks: CondInst's dice loss on real masks (``full``), and
mixed box/mask supervision (``mixed``; methods.md §1, §2)."""

from __future__ import annotations

from ..supervision.base import MaskSupervision
from ..supervision.box2mask import Box2MaskTFullSupervision
from ..supervision.full import FullMaskSupervision, MixedSupervision
from .base import Method

__all__ = ["FullMethod", "MixedMethod"]


class FullMethod(Method):
    """``supervision.type: full``: dice loss on the ground-truth masks (CondInst; on SOLOv2, its mask-supervised
    control); on Mask2Former, Mask2Former's own mask matching and BCE + dice losses
    (:class:`~boxmask.supervision.box2mask.Box2MaskTFullSupervision`, the reference of Box2Mask-T). Reads
    ground-truth masks."""

    key = "full"
    title = "CondInst"
    architectures = ("condinst", "solov2", "mask2former")
    supervision_class = FullMaskSupervision
    reads_gt_masks = True
    short_box_fit = False

    def build_supervision(self) -> MaskSupervision:
        # a set-prediction network needs a matching loss; the per-positive dice of the others has no matching
        if self.cfg.model.arch == "mask2former":
            self.cfg.supervision.box2mask_t.validate()
            return Box2MaskTFullSupervision(self.cfg.supervision.box2mask_t)
        return super().build_supervision()


class MixedMethod(Method):
    """``supervision.type: mixed``: dice where an annotation has a mask, BoxInst losses where it has only a
    box. Reads ground-truth masks (and ``has_mask``)."""

    key = "mixed"
    title = "mixed"
    supervision_class = MixedSupervision
    reads_gt_masks = True
    short_box_fit = False
