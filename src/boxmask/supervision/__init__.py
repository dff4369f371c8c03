"""Mask supervisions: the losses that train the mask head (box-only or with real masks).

Pure losses on tensors with documented shapes: this package imports neither :mod:`boxmask.modeling` nor
:mod:`boxmask.engine`. Which supervision a recipe uses, and what it may read, is the method's business
(:mod:`boxmask.methods`).
"""

from __future__ import annotations

from .base import MaskInstances, MaskSupervision, SupervisionInputs

__all__ = ["MaskInstances", "MaskSupervision", "SupervisionInputs"]
