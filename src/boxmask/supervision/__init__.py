"""Mask supervisions: the losses that train the mask head (box-only or with real masks)."""

from __future__ import annotations

from ..config import SupervisionConfig
from .base import MaskInstances, MaskSupervision, SupervisionInputs


def build_supervision(cfg: SupervisionConfig) -> MaskSupervision:
    """The supervision named by ``cfg.type``. Raises ValueError for an unknown type."""
    if cfg.type == "boxinst":
        from .boxinst import BoxInstSupervision

        return BoxInstSupervision(cfg)
    if cfg.type in ("full", "mixed"):
        from .full import FullMaskSupervision, MixedSupervision

        return FullMaskSupervision(cfg) if cfg.type == "full" else MixedSupervision(cfg)
    if cfg.type == "levelset":
        from .levelset import LevelSetSupervision

        return LevelSetSupervision(cfg)
    raise ValueError(f"unknown supervision type {cfg.type!r}")


__all__ = ["MaskInstances", "MaskSupervision", "SupervisionInputs", "build_supervision"]
