"""Mask supervision with real masks: CondInst's dice loss, and mixed box/mask supervision.

* :class:`FullMaskSupervision` -- CondInst (Tian et al., ECCV 2020; methods.md §1): dice loss between
  the sigmoid of each sampled instance's stride-4 mask logits and its ground-truth mask point-sampled
  at stride 4 (AdelaiDet ``bitmasks[:, s//2::s, s//2::s]``).
* :class:`MixedSupervision` -- the BoxInst paper's partially supervised setting (Tian et al.,
  CVPR 2021, §4.3): per instance, the dice loss where its annotation has a mask, the BoxInst
  projection + pairwise losses (methods.md §2.3-2.4, :mod:`boxmask.supervision.boxinst`) where it has
  only a box.

Both read ``SupervisionInputs.masks`` / ``has_mask`` (their methods declare ``reads_gt_masks``); the training engine
fills them only for these supervisions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import SupervisionConfig
from .base import MaskInstances, MaskSupervision, SupervisionInputs
from ..ops import as_khw, row_dice_loss
from .boxinst import BoxInstSupervision

__all__ = ["FullMaskSupervision", "MixedSupervision", "dice_loss", "gt_masks_at_stride"]


def gt_masks_at_stride(masks: Sequence[Tensor], padded_hw: tuple[int, int], stride: int = 4) -> Tensor:
    """Ground-truth instance masks on the padded batch grid, point-sampled at the mask stride.

    Each image's masks are zero padded (bottom/right) to ``padded_hw`` and sampled at pixels
    ``(s//2 + i s, s//2 + j s)`` -- AdelaiDet CondInst ``bitmasks[:, s//2::s, s//2::s]`` (methods.md §1,
    the same grid as :func:`~boxmask.supervision.boxinst.box_masks_at_stride`). The padding is never
    materialised: only the samples that fall inside the image are read.

    Args:
        masks: per image a ``[N_i, h_i, w_i]`` tensor (bool or 0/1 numbers) of the resized, unpadded
            image (``h_i <= Hp``, ``w_i <= Wp``).
        padded_hw: ``(Hp, Wp)`` of the padded batch, pixels.
        stride: mask output stride ``s`` in pixels (CondInst ``MASK_OUT_STRIDE = 4``).

    Returns:
        float32 ``[sum_i N_i, len(range(s//2, Hp, s)), len(range(s//2, Wp, s))]`` of 0/1 values
        (``[sum N_i, Hp/s, Wp/s]`` when divisible), images concatenated in order, on the device of
        ``masks[0]`` (CPU when ``masks`` is empty).

    Raises:
        ValueError: if ``stride < 1``, a mask tensor is not 3-D, or an image is larger than ``padded_hw``.
    """
    if stride < 1:
        raise ValueError(f"gt_masks_at_stride: stride must be >= 1, got {stride}")
    hp, wp = (int(v) for v in padded_hw)
    start = stride // 2
    hs, ws = len(range(start, hp, stride)), len(range(start, wp, stride))
    device = masks[0].device if len(masks) else torch.device("cpu")
    out = []
    for i, m in enumerate(masks):
        if m.dim() != 3:
            raise ValueError(f"gt_masks_at_stride: image {i}: masks must be [N, h, w], got {tuple(m.shape)}")
        n, h, w = m.shape
        if h > hp or w > wp:
            raise ValueError(f"gt_masks_at_stride: image {i}: mask size {(h, w)} exceeds the padded size {(hp, wp)}")
        sampled = torch.zeros((n, hs, ws), dtype=torch.float32, device=device)
        src = m[:, start::stride, start::stride]
        sampled[:, : src.shape[1], : src.shape[2]] = src.to(device=device, dtype=torch.float32)
        out.append(sampled)
    if not out:
        return torch.zeros((0, hs, ws), dtype=torch.float32, device=device)
    return torch.cat(out)


def dice_loss(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Per-instance CondInst dice loss on sigmoid probabilities (methods.md §1; CondInst Eq. 3).

    ``L_k = 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 1e-5)`` with ``p = sigmoid(logits_k)``, sums over
    the ``h x w`` map (eps 1e-5 as AdelaiDet ``dice_coefficient``).

    Args:
        mask_logits: ``[K, 1, h, w]`` or ``[K, h, w]`` mask logits at stride 4, any float dtype;
            computed in float32 (float64 kept, for ``torch.autograd.gradcheck``).
        targets: ``[K, h, w]`` targets in [0, 1] (bool allowed), e.g. from :func:`gt_masks_at_stride`.

    Returns:
        ``[K]`` losses in ``[0, 1]`` (float32, or float64 for float64 logits); ``[0]`` when ``K == 0``.

    Raises:
        ValueError: on a shape mismatch.
    """
    logits = as_khw(mask_logits, "dice_loss")
    if targets.shape != logits.shape:
        raise ValueError(f"dice_loss: targets shape {tuple(targets.shape)} != mask logits {tuple(logits.shape)}")
    return row_dice_loss(logits.sigmoid().flatten(1), targets.to(logits.dtype).flatten(1))


def _instance_targets(instances: MaskInstances, inputs: SupervisionInputs, who: str) -> tuple[Tensor, Tensor]:
    """Stride-4 GT masks ``[K, h, w]`` float32 and has-mask flags bool ``[K]`` of the sampled instances."""
    if inputs.masks is None:
        raise ValueError(
            f"{who} needs ground-truth masks but SupervisionInputs.masks is None: load the dataset with "
            "load_masks=True and build the inputs with supervision_inputs(batch, with_masks=True)"
        )
    if len(inputs.masks) != len(inputs.boxes):
        raise ValueError(f"{who}: {len(inputs.masks)} mask tensors for {len(inputs.boxes)} images")
    for i, (m, b) in enumerate(zip(inputs.masks, inputs.boxes)):
        if m.dim() != 3 or m.shape[0] != b.shape[0]:
            raise ValueError(f"{who}: image {i}: masks of shape {tuple(m.shape)} for {b.shape[0]} boxes")
    device = instances.logits.device
    has_mask = inputs.has_mask
    if has_mask is None:
        has_mask = [torch.ones(len(b), dtype=torch.bool) for b in inputs.boxes]
    elif len(has_mask) != len(inputs.boxes) or any(h.numel() != len(b) for h, b in zip(has_mask, inputs.boxes)):
        raise ValueError(f"{who}: has_mask does not give one flag per box of each image")
    flat = instances.gt_rows([len(b) for b in inputs.boxes])
    padded_hw = tuple(inputs.images.shape[-2:])
    gt = gt_masks_at_stride(inputs.masks, padded_hw, instances.stride).to(device)
    flags = torch.cat([torch.zeros(0, dtype=torch.bool, device=device)]
                      + [h.reshape(-1).to(device=device, dtype=torch.bool) for h in has_mask])
    return gt[flat], flags[flat]


class FullMaskSupervision(MaskSupervision):
    """CondInst mask loss on real masks: ``loss_mask = mean_k dice_k`` over the sampled instances.

    CondInst (methods.md §1): for every sampled positive k (§1.5) with assigned GT g(k),
    ``dice(sigmoid(logits_k), M_g)`` with ``M_g`` the GT mask at stride 4 (:func:`gt_masks_at_stride`),
    averaged over the instances (mask-loss weight 1, as CondInst). Instances whose annotation has no
    mask (``has_mask`` False) get no mask loss and are left out of the mean (a ``UserWarning`` is
    issued once); use :class:`MixedSupervision` to train them from their boxes. When no sampled
    instance has a mask the loss is a zero connected to the graph.

    ``losses`` raises ValueError when ``inputs.masks`` is None or inconsistent with the boxes.
    """

    def __init__(self, cfg: SupervisionConfig | None = None):
        self.cfg = cfg if cfg is not None else SupervisionConfig(type="full")
        self._warned = False

    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        """``{"loss_mask": float32 scalar}``; see the class docstring."""
        logits = instances.logits.float()
        targets, has = _instance_targets(instances, inputs, "FullMaskSupervision")
        if not bool(has.all()) and not self._warned:
            self._warned = True
            warnings.warn("FullMaskSupervision: some instances have no mask annotation and get no mask loss; "
                          "supervision.type=mixed trains them from their boxes", UserWarning, stacklevel=2)
        return {"loss_mask": _mean_dice(logits, targets, has)}


def _mean_dice(logits: Tensor, targets: Tensor, select: Tensor) -> Tensor:
    """Mean dice over the selected instances; a graph-connected zero when none is selected."""
    if not bool(select.any()):
        return logits.sum() * 0.0
    return dice_loss(logits[select], targets[select]).mean()


class MixedSupervision(MaskSupervision):
    """Dice where the annotation has a mask, BoxInst losses where it has only a box.

    The BoxInst paper's partially supervised setting (CVPR 2021, §4.3), per instance. With K sampled
    instances of which ``K_m`` have a mask (set M) and ``K_b = K - K_m`` only a box (set B)::

        loss_mask     = (K_m / K) * Full(M).loss_mask       (mean dice over M)
        loss_proj     = (K_b / K) * BoxInst(B).loss_proj     (mean projection loss over B)
        loss_pairwise = (K_b / K) * BoxInst(B).loss_pairwise (edge-weighted mean over B, with warm-up)

    where ``Full`` is :class:`FullMaskSupervision` and ``BoxInst`` is
    :class:`~boxmask.supervision.boxinst.BoxInstSupervision` (same config: projection/pairwise
    weights, colour threshold, dilation, warm-up), each run on its subset only (the LAB colour
    similarity is computed only for images with a box-only instance). Why this normalisation: the
    dice and projection terms become per-instance sums divided by the total K, so every sampled
    instance weighs ``1/K`` whichever loss it gets, independently of the batch's mask fraction; the
    pairwise term, an average over edges, is scaled by the fraction of box-only instances for the same
    per-instance weight. It gives exactly :class:`FullMaskSupervision`'s ``loss_mask`` (box terms 0)
    when every sampled instance has a mask, and exactly BoxInst's losses (``loss_mask`` 0) when none
    has. The keys are always ``{"loss_mask", "loss_proj", "loss_pairwise"}``; absent terms are zeros
    connected to the graph.

    ``losses`` raises ValueError when ``inputs.masks`` is None or inconsistent with the boxes.
    """

    def __init__(self, cfg: SupervisionConfig | None = None):
        self.cfg = cfg if cfg is not None else SupervisionConfig(type="mixed")
        self._boxinst = BoxInstSupervision(self.cfg)

    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        """``{"loss_mask", "loss_proj", "loss_pairwise"}`` float32 scalars; see the class docstring."""
        logits = instances.logits.float()
        targets, has = _instance_targets(instances, inputs, "MixedSupervision")
        zero = logits.sum() * 0.0
        k = len(instances)
        k_m = int(has.sum())
        k_b = k - k_m
        out = {"loss_mask": zero, "loss_proj": zero, "loss_pairwise": zero}
        if k_m:
            out["loss_mask"] = (k_m / k) * _mean_dice(logits, targets, has)
        if k_b:
            box_only = ~has
            subset = MaskInstances(logits[box_only], instances.im_inds[box_only], instances.gt_inds[box_only],
                                   instances.labels[box_only], stride=instances.stride)
            box_losses = self._boxinst.losses(subset, inputs, step)
            out["loss_proj"] = (k_b / k) * box_losses["loss_proj"]
            out["loss_pairwise"] = (k_b / k) * box_losses["loss_pairwise"]
        return out
