"""The types every layer shares: what a model hands to a supervision, what a supervision may see of a
batch, and what inference returns.

The ground floor of boxmask next to :mod:`boxmask.ops`: it imports nothing of boxmask, so data, modeling,
supervision, methods and engine can all depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BoxConditionedMasks", "InstancePredictions", "MaskInstances", "QueryOutputs", "SupervisionInputs",
           "TrainOutputs"]


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
    """

    logits: Tensor
    im_inds: Tensor
    gt_inds: Tensor
    labels: Tensor
    stride: int = 4
    level_set_feats: Tensor | None = None

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


@dataclass
class InstancePredictions:
    """Predictions for one image in original-image pixels.

    boxes float32 ``[N,4]`` xyxy; scores float32 ``[N]``; labels int64 ``[N]`` contiguous;
    masks bool ``[N,H,W]`` (original image size).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor


@dataclass
class BoxConditionedMasks:
    """Box-conditioned masks of one image (``N`` given boxes).

    Attributes:
        logits: float32 ``[N,1,Hp/4,Wp/4]`` mask logits at the mask output stride (4) of the padded
            image, same layout as :meth:`CondInst.detect`'s mask logits.
        loc_inds: int64 ``[N]`` chosen location, index into the levels-concatenated locations
            (P3 first, row-major inside a level).
        levels: int64 ``[N]`` FPN level of the chosen location (0 = P3).
        locations: float32 ``[N,2]`` its ``(x, y)`` centre in resized-image pixels.
        scores: float32 ``[N]`` its ``σ(cls)·σ(ctr)`` (for the box's class, or the max over classes).
        inside: bool ``[N]``; False where no location centre was inside the box (rule 3).
        agreement: float32 ``[N]`` in ``[0, 1]``: mean IoU, inside the box at the mask stride, of the
            chosen candidate's binary mask (logit > 0) with those of the other candidates tried for the
            box (rule 4); NaN where only one candidate was tried. A quality cue for ``annotate``'s
            fallback; None when the network does not provide it.
    """

    logits: Tensor
    loc_inds: Tensor
    levels: Tensor
    locations: Tensor
    scores: Tensor
    inside: Tensor
    agreement: Tensor | None = None


@dataclass
class TrainOutputs:
    """What a network's ``forward_train`` returns: its own (detector) losses and the mask logits of the
    positives that a mask supervision turns into mask losses. The network never calls a loss of
    :mod:`boxmask.supervision`; a method (:mod:`boxmask.methods`) does.

    detector_losses: fp32 scalar losses of the detector part (FCOS ``loss_fcos_cls``/``loss_fcos_loc``/
        ``loss_fcos_ctr``; SOLOv2 ``loss_cls``), part of the training objective as they are.
    instance_groups: the sampled positives, one :class:`MaskInstances` per mask stride (CondInst: one group
        at stride 4; SOLOv2: one per stride 4/8/16 that has positives). Never empty: a batch without
        positives gives one group with ``K = 0``. Per-instance-mean mask losses of the groups are combined
        weighted by their instance counts (the mean over all positives).
    anchor: fp32 zero scalar connected to every output head (mask features, kernels/controller, level-set
        head), added to each mask loss so that every parameter is in the graph on every step (DDP), whatever
        the supervision reads.
    """

    detector_losses: dict[str, Tensor]
    instance_groups: list[MaskInstances]
    anchor: Tensor

    def group_weights(self) -> list[float]:
        """Weight of each group: its share of all positives (``1`` each when there are none)."""
        total = sum(len(g) for g in self.instance_groups)
        if total == 0:
            return [1.0] * len(self.instance_groups)
        return [len(g) / total for g in self.instance_groups]


@dataclass
class QueryOutputs:
    """What a query-based network's ``forward_train`` returns (Mask2Former, the network of Box2Mask-T,
    methods.md §4.1): per-query class and mask predictions of every prediction set, unmatched. Matching
    queries to ground truth is part of the supervision (methods.md §4.2), never of the network.

    class_logits: one float ``[B,Q,C+1]`` per prediction set (last column = no-object), the set after the
        query initialisation first and the final decoder layer's last (``1 + decoder_layers`` sets).
    mask_logits: one float ``[B,Q,h,w]`` per prediction set, at ``stride`` on the padded-image grid
        (``h = Hp/stride``, ``w = Wp/stride``), same order as ``class_logits``.
    stride: int, output stride of ``mask_logits`` in pixels (4).
    level_set_feats: float ``[B,C_ls,h,w]`` the level-set feature head on the mask features, or None.
    anchor: fp32 zero scalar connected to every output head, added to each loss so that every parameter is
        in the graph on every step (DDP).
    """

    class_logits: list[Tensor]
    mask_logits: list[Tensor]
    anchor: Tensor
    stride: int = 4
    level_set_feats: Tensor | None = None

    def __len__(self) -> int:
        """Number of prediction sets."""
        return len(self.class_logits)
