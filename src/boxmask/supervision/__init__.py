"""Mask supervisions: the losses that train the mask head (box-only or with real masks)."""

from __future__ import annotations

from ..config import SupervisionConfig
from .base import MaskInstances, MaskSupervision, SupervisionInputs


def build_supervision(cfg: SupervisionConfig, num_classes: int | None = None,
                      mask_channels: int | None = None) -> MaskSupervision:
    """The supervision named by ``cfg.type``.

    ``num_classes`` and ``mask_channels`` (``model.mask_channels``) size SIM's prototype bank and are
    required for ``type == "sim"`` only; the SIM supervision also needs ``set_teacher`` before use.
    Raises ValueError for an unknown type or a SIM build without those sizes.
    """
    if cfg.type == "boxinst":
        from .boxinst import BoxInstSupervision

        return BoxInstSupervision(cfg)
    if cfg.type in ("full", "mixed"):
        from .full import FullMaskSupervision, MixedSupervision

        return FullMaskSupervision(cfg) if cfg.type == "full" else MixedSupervision(cfg)
    if cfg.type == "levelset":
        from .levelset import LevelSetSupervision

        return LevelSetSupervision(cfg)
    if cfg.type == "sim":
        if num_classes is None or mask_channels is None:
            raise ValueError("supervision type 'sim' needs num_classes and mask_channels (its prototype bank size)")
        from .sim_supervision import SIMSupervision

        return SIMSupervision(cfg, num_classes, mask_channels)
    raise ValueError(f"unknown supervision type {cfg.type!r}")


__all__ = ["MaskInstances", "MaskSupervision", "SupervisionInputs", "build_supervision"]
