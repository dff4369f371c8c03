"""Matrix NMS: parallel soft suppression of instance masks by score decay (methods.md §3.4).

Source: Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020, Sec. 4.3, Eq. 4.
For masks sorted by score (``s_1 >= s_2 >= ...``), the score of mask ``j`` is multiplied by

    decay_j = min_{i < j} f(iou_ij) / f(iou_{*,i}),   iou_{*,i} = max_{k < i} iou_ki,

where only same-class pairs count (other pairs contribute ``f(0) = 1``), ``iou_{*,i}`` ("compensation")
is the largest IoU of ``i`` with a higher-scored same-class mask -- a mask that is itself likely
suppressed suppresses less -- and ``f`` is the decay kernel:

* ``"gaussian"``: ``f(x) = exp(-sigma x^2)``, so ``f(iou)/f(comp) = exp(-sigma (iou^2 - comp^2))``;
* ``"linear"``:   ``f(x) = 1 - x``,          so ``f(iou)/f(comp) = (1 - iou) / (1 - comp)``.

The top-scored mask always keeps ``decay = 1``, and ``decay <= 1`` for every mask (the top mask's row
contributes ``f(iou_1j) <= 1``). Score thresholding, ``nms_pre`` top-k and ``max_per_img`` (BoxLevelSet:
500 / filter 0.025 / 100) are left to the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["matrix_nms", "mask_iou_matrix"]

_KERNELS = ("gaussian", "linear")
_LINEAR_EPS = 1e-6  # floor of 1 - comp in the linear kernel: an exact duplicate (comp = 1) gives 0/0


def mask_iou_matrix(masks: Tensor, mask_area: Tensor | None = None) -> Tensor:
    """Pairwise IoU of binary masks with one matmul of the flattened masks.

    Args:
        masks: ``[N, H, W]`` bool or float 0/1 masks (pixels of any common grid).
        mask_area: optional ``[N]`` foreground pixel counts (``masks.sum((1, 2))``) when the caller already
            has them; must match ``masks``.

    Returns:
        float32 ``[N, N]`` symmetric IoU in ``[0, 1]`` (float64 when ``masks`` is float64); pairs of two
        empty masks get 0 instead of 0/0.

    Raises:
        ValueError: if ``masks`` is not 3-D or ``mask_area`` is not ``[N]``.
    """
    if masks.dim() != 3:
        raise ValueError(f"mask_iou_matrix: masks must be [N, H, W], got {tuple(masks.shape)}")
    n = masks.shape[0]
    # float32 counts are exact up to 2**24 pixels per mask, far above any mask-stride grid
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    flat = masks.reshape(n, -1).to(dtype)
    inter = flat @ flat.T
    if mask_area is None:
        area = flat.sum(dim=1)
    else:
        if mask_area.shape != (n,):
            raise ValueError(f"mask_iou_matrix: mask_area must be [{n}], got {tuple(mask_area.shape)}")
        area = mask_area.to(dtype)
    union = area[:, None] + area[None, :] - inter
    return inter / union.clamp(min=1e-6)


def matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, kernel: str = "gaussian", sigma: float = 2.0,
               mask_area: Tensor | None = None) -> Tensor:
    """Decayed scores of Matrix NMS (SOLOv2 Sec. 4.3, Eq. 4; module docstring for the formula).

    Args:
        masks: ``[N, H, W]`` binary masks (bool or float 0/1), e.g. the ``prob > mask_thr`` masks of the
            candidates at the mask stride.
        labels: int64 ``[N]`` class index of each mask; only same-class pairs suppress each other.
        scores: float ``[N]`` confidence (any order; sorted internally, descending).
        kernel: ``"gaussian"`` (default, BoxLevelSet/SOLOv2) or ``"linear"``.
        sigma: gaussian kernel sharpness (2.0 in SOLOv2 and BoxLevelSet); unused by ``"linear"``.
        mask_area: optional ``[N]`` pixel counts of ``masks`` (the reference passes the already computed
            ``sum_masks``); computed from ``masks`` when ``None``.

    Returns:
        ``[N]`` decayed scores ``scores * decay`` in the dtype of ``scores``, **in the input order**
        (not sorted). ``decay`` lies in ``(0, 1]`` (gaussian) / ``[0, 1]`` (linear) and is exactly 1 for
        the top-scored mask and for masks that overlap no higher-scored mask of their class. Ties in
        ``scores`` are ordered by input index (stable sort): the earlier input counts as higher-scored.
        Empty input returns an empty tensor.

    Raises:
        ValueError: on an unknown ``kernel``, non-positive gaussian ``sigma`` or inconsistent shapes.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"matrix_nms: kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "gaussian" and not sigma > 0:
        raise ValueError(f"matrix_nms: sigma must be > 0, got {sigma}")
    if masks.dim() != 3:
        raise ValueError(f"matrix_nms: masks must be [N, H, W], got {tuple(masks.shape)}")
    n = masks.shape[0]
    if labels.shape != (n,) or scores.shape != (n,):
        raise ValueError(f"matrix_nms: labels and scores must be [{n}], got {tuple(labels.shape)} "
                         f"and {tuple(scores.shape)}")
    if n == 0:
        return scores.clone()

    order = torch.sort(scores, descending=True, stable=True).indices
    iou = mask_iou_matrix(masks[order], None if mask_area is None else mask_area[order])
    lab = labels[order]
    # decay_iou[i, j] = IoU of the higher-scored i (row) with j (column), same class only, i < j
    same_class_above = (lab[:, None] == lab[None, :]).triu(diagonal=1)
    decay_iou = iou * same_class_above
    # compensation of row i: its largest IoU with any higher-scored same-class mask (column max)
    comp = decay_iou.max(dim=0).values[:, None]
    if kernel == "gaussian":
        # exp(-s iou^2) / exp(-s comp^2) in one exp: no underflow-then-divide
        ratio = torch.exp(-sigma * (decay_iou.square() - comp.square()))
    else:
        ratio = (1.0 - decay_iou) / (1.0 - comp).clamp(min=_LINEAR_EPS)
    # rows that are not a same-class higher mask hold f(0)/f(comp_i) >= 1 and never win the min;
    # row 0 (comp = 0) bounds the min by f(iou_0j) <= 1
    decay = ratio.min(dim=0).values
    out = torch.empty_like(scores)
    out[order] = (scores[order].to(decay.dtype) * decay).to(scores.dtype)
    return out
