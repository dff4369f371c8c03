"""The interface of a mask supervision (the types it sees are in :mod:`boxmask.structures`).

A supervision receives the per-instance mask logits of the sampled positives and a
:class:`SupervisionInputs` view of the batch. In box-supervised mode that view is built without
ground-truth masks (``masks is None``), so a box-supervised loss cannot read them.
"""

from __future__ import annotations

from torch import Tensor

from ..structures import MaskInstances, SupervisionInputs

__all__ = ["MaskInstances", "MaskSupervision", "SupervisionInputs"]


class MaskSupervision:
    """Interface: ``losses(instances, inputs, step) -> dict[str, Tensor]`` (fp32 scalars).

    Whether ``SupervisionInputs.masks`` is filled in is decided by the method that uses the supervision
    (``reads_gt_masks`` in :mod:`boxmask.methods`), never by the supervision itself.
    """

    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare_inputs(self, inputs: SupervisionInputs, step: int) -> SupervisionInputs:
        """Batch-level augmentation owned by the supervision, before the model's forward (default: none).

        SIM overrides it with its online copy-paste (methods.md §5.6): the returned view's ``images``,
        ``boxes`` and ``labels`` are what the model is trained on.
        """
        return inputs
