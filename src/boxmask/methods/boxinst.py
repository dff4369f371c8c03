"""BoxInst (Tian et al., CVPR 2021; methods.md §2): the projection and colour-pairwise losses from boxes only.

Trains CondInst (the paper) or the SOLOv2 network (a control of the BoxLevelSet benchmark).
"""

from __future__ import annotations

from ..supervision.boxinst import BoxInstSupervision
from .base import Method

__all__ = ["BoxInstMethod"]


class BoxInstMethod(Method):
    """``supervision.type: boxinst``: :class:`~boxmask.supervision.boxinst.BoxInstSupervision`, box labels only."""

    key = "boxinst"
    title = "BoxInst"
    supervision_class = BoxInstSupervision
