"""BoxInst supervision: box masks at the mask stride, projection loss, pairwise colour loss.

Tian et al., "BoxInst: High-Performance Instance Segmentation with Box Annotations", CVPR 2021;
details follow the AdelaiDet code as specified in methods.md §2.1, §2.3, §2.4. All functions are pure,
take per-instance mask logits at stride 4 (CondInst ``MASK_OUT_STRIDE``) and compute in float32 even
when the logits are bf16/fp16 (float64 logits stay float64, for ``torch.autograd.gradcheck``).

The pairwise loss is the memory hot spot of BoxInst (methods.md §2.6): instead of ``F.unfold``
copies it loops over the 8 neighbour offsets with aligned slices and uses a hand-written backward,
so besides its inputs it keeps only a few ``[K, h, w]`` temporaries alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..config import SupervisionConfig
from ..ops import as_khw, box_masks_at_stride, projection_terms
from .base import MaskInstances, MaskSupervision, SupervisionInputs
from .color import _shift_slices, image_validity_masks, lab_color_similarity, neighbor_offsets

__all__ = [
    "BoxInstSupervision",
    "boxinst_losses",
    "box_masks_at_stride",
    "instance_box_masks",
    "pairwise_loss",
    "pairwise_warmup_factor",
    "projection_loss",
    "projection_terms",
]

def instance_box_masks(instances: MaskInstances, inputs: SupervisionInputs) -> Tensor:
    """Box mask of each sampled instance's GT at the instance stride (:func:`box_masks_at_stride`).

    Args:
        instances: sampled positives (``im_inds``, ``gt_inds``, ``stride``; logits give the device).
        inputs: the batch view with per-image ``boxes`` (resized-image pixels) and the padded ``images``.

    Returns:
        float32 ``[K, Hp/stride, Wp/stride]`` of 0/1 on the logits' device.
    """
    device = instances.logits.device
    boxes = torch.cat(inputs.boxes).to(device).float() if inputs.boxes else torch.zeros(0, 4, device=device)
    box_masks = box_masks_at_stride(boxes, tuple(inputs.images.shape[-2:]), instances.stride)
    return box_masks[instances.gt_rows([len(b) for b in inputs.boxes])]


def projection_loss(mask_logits: Tensor, box_masks: Tensor) -> Tensor:
    """BoxInst projection (unary) loss: dice between max-projections of mask and box (methods.md §2.3).

    With ``p = sigmoid(logits)``: ``L = mean_k [dice(max_y p_k, max_y B_k) + dice(max_x p_k, max_x B_k)]``
    where ``dice(u, v) = 1 - 2 sum(uv) / (sum(u^2) + sum(v^2) + 1e-5)`` (BoxInst paper Eq. 2-3;
    AdelaiDet ``compute_project_term``). Mean over all K instances (per-device positives).

    Args:
        mask_logits: ``[K, 1, h, w]`` or ``[K, h, w]`` mask logits at stride 4, any float dtype.
        box_masks: ``[K, h, w]`` box masks of each instance's GT (0/1, :func:`box_masks_at_stride`).

    Returns:
        float32 scalar (float64 for float64 logits); ``mask_logits.sum() * 0`` when ``K == 0``
        (stays connected to the graph).

    Raises:
        ValueError: on shape mismatch.
    """
    terms = projection_terms(mask_logits, box_masks)
    if terms.shape[0] == 0:
        return mask_logits.sum().to(terms.dtype) * 0.0
    return terms.mean()


def _channel(similarity: Tensor, k: int, im_inds: Tensor | None) -> Tensor:
    """Neighbour channel ``k`` of each instance: ``[K, h, w]`` from a per-instance ``[K, 8, h, w]`` or,
    with ``im_inds``, a per-image ``[B, 8, h, w]`` similarity (one ``[K, h, w]`` gather, not ``[K, 8, h, w]``)."""
    return similarity[:, k] if im_inds is None else similarity[im_inds, k]


def _edge_weights(similarity_k: Tensor, box_masks: Tensor, threshold: float) -> Tensor:
    """``[S >= tau] * B(centre)`` for one neighbour channel; float32 ``[K, h, w]``."""
    return (similarity_k >= threshold).to(box_masks.dtype) * box_masks


class _PairwiseNLL(torch.autograd.Function):
    """Weighted mean of ``-log P_same`` over the 8 dilated edges, with an analytic backward.

    ``d(-log P_same)/dz_i = sigmoid(z_i) - sigmoid(z_i + z_j)`` (and symmetrically for ``z_j``), since
    ``P(both fg | same) = p_i p_j / P_same = sigmoid(z_i + z_j)``. Only the inputs are saved; forward and
    backward each loop over the offsets, so peak extra memory is a few ``[K, h, w]`` tensors.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, similarity: Tensor, box_masks: Tensor, im_inds: Tensor | None,
                threshold: float, dilation: int) -> Tensor:
        _, h, w = logits.shape
        log_fg = F.logsigmoid(logits)
        log_bg = F.logsigmoid(-logits)
        total = logits.new_zeros(())
        weight_sum = logits.new_zeros(())
        for k, (dy, dx) in enumerate(neighbor_offsets(dilation)):
            weights = _edge_weights(_channel(similarity, k, im_inds), box_masks, threshold)
            # edges leaving the map count in the normaliser but have zero loss (reference: log-probs
            # zero padded, so log P_same = logaddexp(log p_i, log(1 - p_i)) = 0)
            weight_sum = weight_sum + weights.sum()
            (cy, cx), (ny, nx) = _shift_slices(dy, dx, h, w)
            log_same = torch.logaddexp(log_fg[:, cy, cx] + log_fg[:, ny, nx],
                                       log_bg[:, cy, cx] + log_bg[:, ny, nx])
            total = total - (log_same * weights[:, cy, cx]).sum()
        norm = weight_sum.clamp(min=1.0)
        ctx.save_for_backward(logits, similarity, box_masks, norm, im_inds)
        ctx.threshold = threshold
        ctx.dilation = dilation
        return total / norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, similarity, box_masks, norm, im_inds = ctx.saved_tensors
        _, h, w = logits.shape
        probs = logits.sigmoid()
        grad = torch.zeros_like(logits)
        for k, (dy, dx) in enumerate(neighbor_offsets(ctx.dilation)):
            (cy, cx), (ny, nx) = _shift_slices(dy, dx, h, w)
            weights = _edge_weights(_channel(similarity, k, im_inds)[:, cy, cx], box_masks[:, cy, cx], ctx.threshold)
            q_fg = torch.sigmoid(logits[:, cy, cx] + logits[:, ny, nx])
            grad[:, cy, cx] += weights * (probs[:, cy, cx] - q_fg)
            grad[:, ny, nx] += weights * (probs[:, ny, nx] - q_fg)
        grad *= grad_out / norm
        return grad, None, None, None, None, None


def pairwise_loss(
    mask_logits: Tensor,
    similarity: Tensor,
    box_masks: Tensor,
    color_threshold: float = 0.3,
    dilation: int = 2,
    im_inds: Tensor | None = None,
) -> Tensor:
    """BoxInst pairwise colour-affinity loss (methods.md §2.4; BoxInst paper Eq. 5).

    For each instance k, pixel i and neighbour j (8 offsets of :func:`~boxmask.supervision.color.neighbor_offsets`
    with ``dilation``): ``P_same = p_i p_j + (1 - p_i)(1 - p_j)``, computed in log space as
    ``log P_same = logaddexp(logsig(z_i) + logsig(z_j), logsig(-z_i) + logsig(-z_j))``;
    weights ``w_ij = [S_ij >= tau] * B_k(i)`` (only the centre pixel is gated by the box);
    ``L = sum w_ij (-log P_same) / max(sum w_ij, 1)`` over all instances and edges. Edges whose
    neighbour lies outside the map contribute zero loss (as the reference's zero-padded unfold).
    No ``F.unfold``: the 8 offsets are visited with aligned slices, and the backward is analytic,
    so no ``[K, 8, h, w]`` intermediate is stored. Gradients flow to ``mask_logits`` only (through both
    end points of every edge); ``similarity`` and ``box_masks`` are targets. Multiply the result by
    :func:`pairwise_warmup_factor` during training.

    Args:
        mask_logits: ``[K, 1, h, w]`` or ``[K, h, w]`` mask logits at stride 4, any float dtype.
        similarity: colour similarity (:func:`~boxmask.supervision.color.lab_color_similarity`), values in
            [0, 1]: ``[K, 8, h, w]`` per instance, or ``[B, 8, h, w]`` per image together with ``im_inds``
            (cheaper: no ``[K, 8, h, w]`` copy is made; many instances share an image).
        box_masks: ``[K, h, w]`` box masks of each instance's GT (0/1, :func:`box_masks_at_stride`).
        color_threshold: similarity threshold tau (BoxInst: 0.3).
        dilation: neighbour dilation in stride-4 cells; must match the one used for ``similarity``.
        im_inds: optional int64 ``[K]`` image index of each instance into a per-image ``similarity``.

    Returns:
        float32 scalar (float64 for float64 logits); ``mask_logits.sum() * 0`` when ``K == 0``.
        Not twice differentiable.

    Raises:
        ValueError: on shape mismatch, a similarity without 8 channels or ``im_inds`` out of range.
    """
    logits = as_khw(mask_logits, "pairwise_loss")
    k, h, w = logits.shape
    if im_inds is None:
        if similarity.shape != (k, 8, h, w):
            raise ValueError(
                f"pairwise_loss: similarity must be [K, 8, h, w] = {(k, 8, h, w)}, got {tuple(similarity.shape)}"
            )
    else:
        if similarity.dim() != 4 or tuple(similarity.shape[1:]) != (8, h, w):
            raise ValueError(
                f"pairwise_loss: per-image similarity must be [B, 8, h, w] with (h, w) = {(h, w)}, "
                f"got {tuple(similarity.shape)}"
            )
        if im_inds.shape != (k,):
            raise ValueError(f"pairwise_loss: im_inds must be [K] = [{k}], got {tuple(im_inds.shape)}")
        if k and (int(im_inds.min()) < 0 or int(im_inds.max()) >= similarity.shape[0]):
            raise ValueError(f"pairwise_loss: im_inds out of range for {similarity.shape[0]} images")
        im_inds = im_inds.to(device=similarity.device, dtype=torch.long)
    if box_masks.shape != (k, h, w):
        raise ValueError(
            f"pairwise_loss: box_masks must be [K, h, w] = {(k, h, w)}, got {tuple(box_masks.shape)}"
        )
    neighbor_offsets(dilation)  # validates dilation before the autograd function runs
    if k == 0:
        return logits.sum() * 0.0
    return _PairwiseNLL.apply(
        logits,
        similarity.detach().to(logits.dtype),
        box_masks.detach().to(logits.dtype),
        im_inds,
        float(color_threshold),
        dilation,
    )


def pairwise_warmup_factor(step: int, warmup_iters: int) -> float:
    """Linear warm-up of the pairwise loss weight: ``min(step / warmup_iters, 1)`` (methods.md §2.4).

    BoxInst uses ``warmup_iters = 10000``. AdelaiDet counts forward passes starting at 1 (its first
    step already has factor 1e-4); pass ``global_step + 1`` to reproduce that.

    Args:
        step: training iteration (>= 0).
        warmup_iters: warm-up length in iterations; ``<= 0`` disables warm-up (factor 1.0).

    Returns:
        float in ``[0, 1]``.

    Raises:
        ValueError: if ``step < 0``.
    """
    if step < 0:
        raise ValueError(f"pairwise_warmup_factor: step must be >= 0, got {step}")
    if warmup_iters <= 0:
        return 1.0
    return min(step / warmup_iters, 1.0)


class BoxInstSupervision(MaskSupervision):
    """BoxInst mask losses: projection + colour pairwise with linear warm-up (methods.md §2).

    Uses only boxes and the un-normalised image; the methods that use it build their batch view without
    ground-truth masks (:mod:`boxmask.methods`). Colour similarity is computed once per image per step on the
    training device.
    """

    def __init__(self, cfg: SupervisionConfig):
        self.cfg = cfg

    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        """``{"loss_proj", "loss_pairwise"}`` (float32 scalars, weighted; pairwise with its warm-up):
        :func:`boxinst_losses` with each positive's box mask and the colour similarity of its image."""
        return boxinst_losses(self.cfg, instances, inputs, step)


def boxinst_losses(cfg: SupervisionConfig, instances: MaskInstances, inputs: SupervisionInputs, step: int,
                   box_masks: Tensor | None = None, similarity_scale: Tensor | None = None) -> dict[str, Tensor]:
    """BoxInst's weighted projection and pairwise losses (methods.md §2.3-2.4) of one batch.

    Args:
        cfg: weights, colour threshold, dilation, pairwise warm-up, ``bottom_pixels_removed``.
        instances: sampled positives, ``logits`` ``[K,1,h,w]`` at ``instances.stride``.
        inputs: box-only batch view (uint8 ``images``, per-image ``boxes``).
        step: 0-based global step (pairwise warm-up; AdelaiDet counts from 1).
        box_masks: optional float ``[K,h,w]`` 0/1 masks in place of each positive's box mask (SIM's pasted
            objects use their paste mask, methods.md §5.6); default: :func:`instance_box_masks`.
        similarity_scale: optional float ``[B,8,h,w]`` in ``[0,1]`` multiplied into the colour similarity
            before the threshold (SIM's feature-aware affinity, methods.md §5.2).

    Returns:
        ``{"loss_proj", "loss_pairwise"}``, float32 scalars (graph-connected zeros when ``K == 0``).

    Raises:
        ValueError: if an override has the wrong shape.
    """
    logits = instances.logits.float()
    if len(instances) == 0:
        zero = logits.sum() * 0
        return {"loss_proj": zero, "loss_pairwise": zero}
    stride = instances.stride
    padded_hw = tuple(inputs.images.shape[-2:])
    device = logits.device
    bottom_rows = [int(cfg.bottom_pixels_removed * h / oh) for (h, _), (oh, _) in zip(inputs.image_sizes, inputs.orig_sizes)]
    valid = image_validity_masks(inputs.image_sizes, padded_hw, bottom_rows, device)
    used = torch.unique(instances.im_inds)
    similarity = torch.zeros(len(inputs.boxes), 8, padded_hw[0] // stride, padded_hw[1] // stride, device=device)
    similarity[used] = lab_color_similarity(inputs.images[used], valid[used], stride, cfg.pairwise_dilation)
    if similarity_scale is not None:
        if similarity_scale.shape != similarity.shape:
            raise ValueError(f"boxinst_losses: similarity_scale must be {tuple(similarity.shape)}, "
                             f"got {tuple(similarity_scale.shape)}")
        similarity = similarity * similarity_scale.to(similarity)
    inst_box_masks = instance_box_masks(instances, inputs) if box_masks is None else box_masks.float()
    if inst_box_masks.shape != logits.shape[:1] + logits.shape[-2:]:
        raise ValueError(f"boxinst_losses: box_masks must be {tuple(logits.shape[:1] + logits.shape[-2:])}, "
                         f"got {tuple(inst_box_masks.shape)}")
    loss_proj = projection_loss(logits, inst_box_masks)
    loss_pair = pairwise_loss(logits, similarity, inst_box_masks, cfg.color_threshold, cfg.pairwise_dilation,
                              im_inds=instances.im_inds)
    # AdelaiDet counts iterations from 1
    warm = pairwise_warmup_factor(step + 1, cfg.pairwise_warmup_iters)
    return {"loss_proj": cfg.projection_weight * loss_proj, "loss_pairwise": cfg.pairwise_weight * warm * loss_pair}
