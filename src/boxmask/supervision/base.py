"""The seam between a model and its mask supervision.

A supervision receives the per-instance mask logits of the sampled positives and a
:class:`SupervisionInputs` view of the batch. In box-supervised mode that view is built without
ground-truth masks (``masks is None``), so a box-supervised loss cannot read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MaskInstances:
    """Sampled positive instances of a batch with their mask logits.

    logits: float ``[K,1,h,w]`` mask logits at ``stride`` on the padded-image grid
        (``h = Hp/stride``, ``w = Wp/stride``).
    im_inds: int64 ``[K]`` image index in the batch.
    gt_inds: int64 ``[K]`` index of the assigned GT inside its image.
    labels: int64 ``[K]`` class of the assigned GT.
    stride: int, output stride of ``logits`` in pixels (4).
    level_set_feats: float ``[B,C_ls,h,w]`` per-image level-set features ``F_ls`` at ``stride``, or
        None (only models with ``model.level_set_channels > 0`` produce them).

    The remaining fields are filled by CondInst (None for other models); supervisions that need to
    re-run a network at the same positives (SIM's teacher, methods.md §5.1) read them:

    loc_inds: int64 ``[K]`` index of each positive into the levels-concatenated FCOS locations
        (``flatten_levels`` order: P3 row-major, then P4, ...).
    locations: float32 ``[K,2]`` (x, y) image pixels of each positive's FCOS location.
    levels: int64 ``[K]`` FPN level index (0 = P3) of each positive.
    mask_feats: float ``[B,C_mask,h8,w8]`` the mask-branch output at stride 8 (``h8 = Hp/8``), still
        attached to the graph; detach it when it is only read as a target.
    pred_boxes: float32 ``[K,4]`` xyxy resized-image pixels: the box each positive regresses
        (``location -/+ ltrb * level stride``), detached.
    """

    logits: Tensor
    im_inds: Tensor
    gt_inds: Tensor
    labels: Tensor
    stride: int = 4
    level_set_feats: Tensor | None = None
    loc_inds: Tensor | None = None
    locations: Tensor | None = None
    levels: Tensor | None = None
    mask_feats: Tensor | None = None
    pred_boxes: Tensor | None = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def gt_rows(self, per_image_counts: list[int]) -> Tensor:
        """int64 ``[K]`` row of each positive's GT in the images' concatenated per-GT tensors
        (e.g. ``torch.cat(inputs.boxes)``), given the number of GTs of each image; on the logits' device."""
        counts = torch.tensor([0] + list(per_image_counts), device=self.logits.device)
        return (torch.cumsum(counts, 0)[:-1][self.im_inds] + self.gt_inds).long()


@dataclass
class SupervisionInputs:
    """What a supervision may see of a batch.

    images: uint8 ``[B,3,Hp,Wp]`` RGB, zero padded (un-normalised).
    image_sizes / orig_sizes: per image ``(h, w)`` after resize (before padding) / of the file.
    boxes: per image float ``[N_i,4]`` xyxy in resized pixels; labels: int64 ``[N_i]``.
    masks: per image bool ``[N_i,h,w]`` or ``None``; always ``None`` for box supervision.
    has_mask: per image bool ``[N_i]`` or ``None``.
    pasted / paste_masks: per image bool ``[N_i]`` / bool ``[N_i,Hp,Wp]`` (rows of non-pasted objects all
    False), set only by SIM's copy-paste (:meth:`MaskSupervision.prepare_inputs`) on objects it pasted
    from its memory bank -- their masks come from the teacher, never from the ground truth.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    orig_sizes: list[tuple[int, int]]
    boxes: list[Tensor]
    labels: list[Tensor]
    masks: list[Tensor] | None = None
    has_mask: list[Tensor] | None = None
    pasted: list[Tensor] | None = None
    paste_masks: list[Tensor] | None = None


class MaskSupervision:
    """Interface: ``losses(instances, inputs, step) -> dict[str, Tensor]`` (fp32 scalars).

    ``uses_gt_masks`` tells the model whether ``SupervisionInputs.masks`` may be filled in.
    """

    uses_gt_masks: bool = False

    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare_inputs(self, inputs: SupervisionInputs, step: int) -> SupervisionInputs:
        """Batch-level augmentation owned by the supervision, before the model's forward (default: none).

        SIM overrides it with its online copy-paste (methods.md §5.6): the returned view's ``images``,
        ``boxes`` and ``labels`` are what the model is trained on.
        """
        return inputs
