"""Box2Mask-T (Li et al., arXiv 2212.01579; methods.md §4): the Mask2Former network trained from boxes by
box-level bipartite matching, CE, box projection and level-set (+ LCM) losses on every prediction set.

The network (:class:`~boxmask.modeling.mask2former.Mask2Former`) returns unmatched per-query predictions
(:class:`~boxmask.structures.QueryOutputs`); matching queries to boxes is part of the supervision
(:class:`~boxmask.supervision.box2mask.Box2MaskTSupervision`), which sees boxes only."""

from __future__ import annotations

from ..config import Config, ConfigError
from ..supervision.base import MaskSupervision
from ..supervision.box2mask import Box2MaskTSupervision
from .base import Method

__all__ = ["Box2MaskTMethod"]


class Box2MaskTMethod(Method):
    """``supervision.type: box2mask_t``: :class:`~boxmask.supervision.box2mask.Box2MaskTSupervision` (its
    fields: ``supervision.box2mask_t``) on ``model.arch: mask2former``, box labels only."""

    key = "box2mask_t"
    title = "Box2Mask-T"
    architectures = ("mask2former",)
    config_section = "supervision.box2mask_t"
    # a query-based model needs far more than a few hundred steps (README "Box2Mask-T")
    short_box_fit = False

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        cfg.supervision.box2mask_t.validate()
        if cfg.supervision.box2mask_t.deep_weight > 0 and cfg.model.mask2former.level_set_channels <= 0:
            raise ConfigError("supervision.type=box2mask_t with a deep level-set term needs the level-set feature "
                              "head: set model.mask2former.level_set_channels (Box2Mask-T: 1) or "
                              "supervision.box2mask_t.deep_weight=0")

    def build_supervision(self) -> MaskSupervision:
        return Box2MaskTSupervision(self.cfg.supervision.box2mask_t)
