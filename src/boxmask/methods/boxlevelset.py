"""BoxLevelSet / Box2Mask-C (Li et al., ECCV 2022; methods.md §3): BoxInst's projection term plus Chan-Vese
level-set energies inside each box on the image and on deep features, from boxes only. Trains the SOLOv2
network (the paper) or CondInst; needs the level-set feature head (``model.level_set_channels``)."""

from __future__ import annotations

from ..config import Config, ConfigError
from ..supervision.levelset import LevelSetSupervision
from .base import Method

__all__ = ["BoxLevelSetMethod"]


class BoxLevelSetMethod(Method):
    """``supervision.type: levelset``: :class:`~boxmask.supervision.levelset.LevelSetSupervision` (its fields:
    ``supervision.levelset``)."""

    key = "levelset"
    title = "BoxLevelSet"
    config_section = "supervision.levelset"
    supervision_class = LevelSetSupervision

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        if cfg.model.level_set_channels <= 0:
            raise ConfigError("supervision.type=levelset needs the level-set feature head: set "
                              "model.level_set_channels (BoxLevelSet: 5)")
