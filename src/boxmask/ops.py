"""Box and mask geometry shared by several layers (models, supervisions, inference, bench).

The ground floor of boxmask next to :mod:`boxmask.structures`: it imports nothing of boxmask. Every
function is pure and documents its shapes, dtypes and units.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DICE_EPS", "aligned_bilinear", "as_khw", "box_masks_at_stride", "compute_dtype", "projection_terms",
           "row_dice_loss", "tight_boxes"]

#: dice denominator epsilon (AdelaiDet ``dice_coefficient``)
DICE_EPS = 1e-5


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample ``[N,C,h,w]`` by an integer ``factor`` to ``[N,C,factor*h,factor*w]`` keeping the
    "sample at the centre of each stride cell" convention (methods.md §1.6, CondInst).

    Replicate-pad 1 px right/bottom, bilinear with ``align_corners=True`` to ``(f*h+1, f*w+1)``,
    replicate-pad ``f//2`` left/top, crop. ``factor == 1`` returns ``x``. Raises ValueError for factor < 1.
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def box_masks_at_stride(boxes: Tensor, padded_hw: tuple[int, int], stride: int = 4) -> Tensor:
    """Binary box masks point-sampled at the mask stride (methods.md §2.1).

    Definition (AdelaiDet): fill ``M[floor(y1):floor(y2)+1, floor(x1):floor(x2)+1] = 1`` on the
    ``Hp x Wp`` full-resolution grid (inclusive end, clipped to the grid), then sample
    ``M[s//2::s, s//2::s]``. Computed in closed form on the sampled grid -- sample ``(i, j)`` sits at
    pixel ``(s//2 + i s, s//2 + j s)`` and is inside iff ``floor(y1) <= y <= floor(y2)`` and likewise
    for x -- so no full-resolution mask is built. For coordinates >= 0 this equals the reference's
    ``int()`` truncation; negative coordinates are treated geometrically (no Python wrap-around).

    Args:
        boxes: ``[N, 4]`` float ``(x1, y1, x2, y2)`` in pixels of the resized, padded image.
        padded_hw: ``(Hp, Wp)`` of the padded image, pixels.
        stride: mask output stride ``s`` in pixels (BoxInst: 4).

    Returns:
        float32 ``[N, len(range(s//2, Hp, s)), len(range(s//2, Wp, s))]`` (= ``[N, Hp/s, Wp/s]`` when
        divisible) of 0/1 values, on ``boxes``' device.

    Raises:
        ValueError: if ``boxes`` is not ``[N, 4]`` or ``stride < 1``.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"box_masks_at_stride: boxes must be [N, 4] xyxy, got {tuple(boxes.shape)}")
    if stride < 1:
        raise ValueError(f"box_masks_at_stride: stride must be >= 1, got {stride}")
    hp, wp = (int(v) for v in padded_hw)
    start = stride // 2
    # float32 holds pixel indices exactly up to 2**24; fp16/bf16 boxes would not
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    ys = torch.arange(start, hp, stride, device=boxes.device, dtype=dtype)
    xs = torch.arange(start, wp, stride, device=boxes.device, dtype=dtype)
    lo = boxes.to(dtype).floor()
    x1, y1, x2, y2 = lo.unbind(dim=1)
    in_y = (ys[None, :] >= y1[:, None]) & (ys[None, :] <= y2[:, None])
    in_x = (xs[None, :] >= x1[:, None]) & (xs[None, :] <= x2[:, None])
    return (in_y[:, :, None] & in_x[:, None, :]).to(torch.float32)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype losses compute in: float64 for float64 inputs (``torch.autograd.gradcheck``), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_khw(x: Tensor, name: str, what: str = "mask_logits") -> Tensor:
    """``[K, 1, h, w]`` or ``[K, h, w]`` -> ``[K, h, w]`` in :func:`compute_dtype` (float32; float64 kept).

    Raises:
        ValueError: naming the caller ``name`` and the argument ``what`` for any other shape.
    """
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{name}: {what} must be [K, 1, h, w] or [K, h, w], got {tuple(x.shape)}")
    return x.to(compute_dtype(x))


def row_dice_loss(x: Tensor, target: Tensor) -> Tensor:
    """Per-row dice loss ``1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + 1e-5)``: float ``[K, L]`` -> ``[K]`` in
    ``[0, 1]`` for values in ``[0, 1]`` (CondInst Eq. 3 / BoxInst Eq. 2; eps as AdelaiDet ``dice_coefficient``)."""
    inter = (x * target).sum(dim=1)
    union = (x * x).sum(dim=1) + (target * target).sum(dim=1) + DICE_EPS
    return 1.0 - 2.0 * inter / union


def projection_terms(mask_logits: Tensor, box_masks: Tensor) -> Tensor:
    """Per-instance projection term ``dice(max_y p, max_y B) + dice(max_x p, max_x B)`` (methods.md §2.3).

    :func:`boxmask.supervision.boxinst.projection_loss` is its mean; box-conditioned inference ranks candidate masks by it.

    Args:
        mask_logits: ``[K, 1, h, w]`` or ``[K, h, w]`` mask logits, any float dtype.
        box_masks: ``[K, h, w]`` 0/1 box masks.

    Returns:
        float32 ``[K]`` in ``[0, 2]`` (float64 for float64 logits).

    Raises:
        ValueError: on shape mismatch.
    """
    logits = as_khw(mask_logits, "projection_loss")
    if box_masks.shape != logits.shape:
        raise ValueError(
            f"projection_loss: box_masks shape {tuple(box_masks.shape)} != mask logits {tuple(logits.shape)}"
        )
    probs = logits.sigmoid()
    target = box_masks.to(logits.dtype)
    loss_x = row_dice_loss(probs.amax(dim=1), target.amax(dim=1))  # projection onto the x axis
    loss_y = row_dice_loss(probs.amax(dim=2), target.amax(dim=2))  # projection onto the y axis
    return loss_x + loss_y


def largest_component(masks: Tensor) -> Tensor:
    """Each bool mask ``[N, H, W]`` cut to its largest 8-connected component (ties: the first in OpenCV's
    raster-scan labelling). Same shape, dtype and device; empty and single-component masks are unchanged.

    Labelling is OpenCV's ``connectedComponentsWithStats`` on the CPU (the masks are copied there and back).
    Used by Mask2Former inference (``model.mask_largest_component``), where an undertrained query's
    mask often covers parts of other objects.

    Raises:
        ValueError: ``masks`` is not a 3-D bool tensor.
    """
    import cv2

    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool [N, H, W], got {masks.dtype} {tuple(masks.shape)}")
    cpu = masks.cpu().numpy()
    out = cpu.copy()
    for i, m in enumerate(cpu):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.view(np.uint8), connectivity=8)
        if n > 2:  # background + more than one component
            out[i] = labels == 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    return torch.from_numpy(out).to(masks.device)


def tight_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of bool masks ``[N, H, W]``: float32 ``[N, 4]`` ``(first col, first row, last col + 1,
    last row + 1)`` in pixels of the mask grid (the convention of COCO ``[x, y, w, h]`` boxes); all zeros
    for an empty mask."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    cols = masks.any(dim=1).to(torch.uint8)  # [N, W]
    rows = masks.any(dim=2).to(torch.uint8)  # [N, H]
    x1 = cols.argmax(dim=1)
    x2 = w - cols.flip(1).argmax(dim=1)
    y1 = rows.argmax(dim=1)
    y2 = h - rows.flip(1).argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)
    return boxes * cols.any(dim=1, keepdim=True)
