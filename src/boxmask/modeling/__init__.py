"""Networks: backbones, FPNs, the CondInst and SOLOv2 architectures. They return named outputs
(:class:`~boxmask.structures.TrainOutputs`) and never call a loss; :mod:`boxmask.methods` does."""

from __future__ import annotations

import torch
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


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """``model`` (in place, and returned) with its 4-D weights in the channels-last (NHWC) memory format when
    ``channels_last`` (``trainer.channels_last``), else unchanged. A channels-last weight makes a convolution
    run and return NHWC whatever its input's format, so the whole convolutional path follows; oneDNN's
    depthwise and 3x3 convolution backward passes are much faster so on the CPU. Values change only by
    float rounding."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


__all__ = ["ARCHITECTURE_CLASSES", "BoxConditionedModel", "CondInst", "Mask2Former", "SOLOv2", "build_model",
           "to_memory_format"]
