"""Networks: backbones, FPNs, the CondInst and SOLOv2 architectures. They return named outputs
(:class:`~boxmask.structures.TrainOutputs`) and never call a loss; :mod:`boxmask.methods` does."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .box_conditioned import BoxConditionedModel
from .condinst import CondInst
from .mask2former import Mask2Former
from .solov2 import SOLOv2

#: ``model.arch`` -> network class
ARCHITECTURE_CLASSES: dict[str, type[nn.Module]] = {"condinst": CondInst, "solov2": SOLOv2, "mask2former": Mask2Former}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network of a recipe: :class:`CondInst` (``model.arch: condinst``, BoxInst/CondInst/SIM recipes),
    :class:`SOLOv2` (``model.arch: solov2``, BoxLevelSet recipes) or :class:`Mask2Former` (``model.arch:
    mask2former``, Box2Mask-T recipes).

    Raises ValueError for an unknown ``cfg.arch`` or ``num_classes < 1``.
    """
    if cfg.arch not in ARCHITECTURE_CLASSES:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; choose from {sorted(ARCHITECTURE_CLASSES)}")
    return ARCHITECTURE_CLASSES[cfg.arch](cfg, num_classes)


__all__ = ["ARCHITECTURE_CLASSES", "BoxConditionedModel", "CondInst", "Mask2Former", "SOLOv2", "build_model"]
