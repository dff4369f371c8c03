"""SOLOv2 grid-cell target assignment from GT boxes only (BoxLevelSet / Box2Mask-C, methods.md §3.2).

Source: Wang et al., "SOLO: Segmenting Objects by Locations", ECCV 2020, Sec. 3.1-3.2 (centre
sampling with the scale factor ``epsilon = sigma = 0.2``) and "SOLOv2", NeurIPS 2020, as used by the
BoxLevelSet code (Li et al., ECCV 2022): the GT masks are replaced by filled box masks, so no instance
mask is ever read. Rules, per FPN level ``l`` with grid ``S_l`` and scale range ``[lo_l, hi_l]``:

1. Level assignment: a box goes to every level with ``lo_l <= sqrt(w h) <= hi_l`` (ranges overlap, so
   most boxes go to two levels); ``w = x2 - x1``, ``h = y2 - y1`` in padded-image pixels.
2. Skipping: a box whose full-resolution box mask (methods.md §2.1 fill: ``floor`` coordinates,
   inclusive end, clipped to the padded image) has fewer than ``min_mask_area = 10`` pixels is skipped
   on all levels (the reference's ``seg_mask.sum() < 10``).
3. Centre: the reference uses the centroid of the object mask; for a filled box that is the box centre,
   so we use ``((x1 + x2) / 2, (y1 + y2) / 2)`` directly. (The reference centroid is taken on pixel
   indices of the floored/clipped mask, which can differ by up to ~1 pixel.)
4. Cells: the padded image ``(Hp, Wp)`` is split into ``S x S`` cells; a point ``(x, y)`` lies in cell
   ``(floor(y S / Hp), floor(x S / Wp))``. Positive cells are those covering the centre region of
   half-size ``(sigma w / 2, sigma h / 2)``, clipped to the grid and limited to the centre cell ±1 in
   each direction (at most 3 x 3 cells, always including the centre cell).
5. Conflicts: objects are written in GT order and later ones overwrite earlier ones (as the reference
   loop does), i.e. **a cell claimed by several objects belongs to the one with the largest GT index**.

The reference divides the padded size by the stride-4 mask size ×4 and uses ``(c / W) // (1 / S)``; we
use exact ``floor(c S / W)`` in float64, which differs only for centres/region edges lying exactly on
a cell boundary (where the reference's float rounding picks either side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import box_masks_at_stride

__all__ = [
    "SOLO_GRID_NUMS",
    "SOLO_MASK_STRIDES",
    "SOLO_SCALE_RANGES",
    "SOLOLevelTargets",
    "box_mask_areas",
    "level_box_masks",
    "solo_targets",
]

SOLO_GRID_NUMS: tuple[int, ...] = (40, 36, 24, 16, 12)
SOLO_SCALE_RANGES: tuple[tuple[float, float], ...] = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
# instance-mask output stride per level during training (2x the level's grid-feature size, methods.md §3.1)
SOLO_MASK_STRIDES: tuple[int, ...] = (4, 4, 8, 16, 16)


@dataclass
class SOLOLevelTargets:
    """Targets of one image at one level with grid ``S``.

    labels: int64 ``[S, S]`` category target, ``num_classes`` (background) on negative cells.
    pos_inds: int64 ``[P]`` flat indices ``i * S + j`` of the positive cells, ascending (row-major), i.e.
        the order of ``labels.flatten() != num_classes``.
    pos_gt_inds: int64 ``[P]`` index into the image's GT list ``[G]`` of the object owning each positive.
    """

    labels: Tensor
    pos_inds: Tensor
    pos_gt_inds: Tensor


def box_mask_areas(boxes: Tensor, padded_hw: tuple[int, int]) -> Tensor:
    """Pixel count of each full-resolution box mask (methods.md §2.1), in closed form.

    The mask fills rows ``floor(y1) .. floor(y2)`` and columns ``floor(x1) .. floor(x2)`` (inclusive)
    clipped to ``[0, Hp) x [0, Wp)``; this equals ``box_masks_at_stride(boxes, padded_hw, 1).sum((1, 2))``
    without building the masks.

    Args:
        boxes: ``[G, 4]`` float xyxy in padded-image pixels.
        padded_hw: ``(Hp, Wp)`` in pixels.

    Returns:
        float64 ``[G]`` counts (>= 0; 0 for boxes outside the image or with ``x2 < x1``).

    Raises:
        ValueError: if ``boxes`` is not ``[G, 4]``.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"box_mask_areas: boxes must be [G, 4] xyxy, got {tuple(boxes.shape)}")
    hp, wp = (int(v) for v in padded_hw)
    x1, y1, x2, y2 = boxes.to(torch.float64).floor().unbind(dim=1)
    cols = (x2.clamp(max=wp - 1) - x1.clamp(min=0) + 1).clamp(min=0)
    rows = (y2.clamp(max=hp - 1) - y1.clamp(min=0) + 1).clamp(min=0)
    return cols * rows


def level_box_masks(boxes: Tensor, padded_hw: tuple[int, int], mask_stride: int) -> Tensor:
    """Box-mask targets at one level's mask stride (``SOLO_MASK_STRIDES[l]``: 4, 4, 8, 16, 16).

    Point-sampled box masks of :func:`boxmask.supervision.boxinst.box_masks_at_stride` (sample at
    ``s//2 + i s``). The reference instead rescales the full-resolution mask by ``1 / s`` with bilinear
    interpolation, which can move the mask border by one cell; we keep one box-mask convention for the
    whole library. Index the result with ``pos_gt_inds`` to get each positive cell's target.

    Args:
        boxes: ``[G, 4]`` float xyxy in padded-image pixels.
        padded_hw: ``(Hp, Wp)`` in pixels.
        mask_stride: the level's mask stride in pixels.

    Returns:
        float32 ``[G, ceil((Hp - s//2) / s), ceil((Wp - s//2) / s)]`` (= ``[G, Hp/s, Wp/s]`` when
        divisible) of 0/1 values.

    Raises:
        ValueError: as :func:`box_masks_at_stride` (bad box shape, stride < 1).
    """
    return box_masks_at_stride(boxes, padded_hw, mask_stride)


def _cell(coord: Tensor, size: int, num_grid: int) -> Tensor:
    """Cell index ``floor(coord * S / size)`` (int64, unclamped) of pixel coordinates ``coord`` (float64)."""
    return torch.floor(coord * num_grid / size).to(torch.int64)


@torch.no_grad()
def solo_targets(boxes: Tensor, labels: Tensor, padded_hw: tuple[int, int], num_classes: int,
                 num_grids: tuple[int, ...] = SOLO_GRID_NUMS,
                 scale_ranges: tuple[tuple[float, float], ...] = SOLO_SCALE_RANGES,
                 sigma: float = 0.2, min_mask_area: float = 10) -> list[SOLOLevelTargets]:
    """SOLOv2 category targets and positive cells of one image from its GT boxes (module docstring).

    Args:
        boxes: ``[G, 4]`` float xyxy in pixels of the resized, padded image (``G`` may be 0).
        labels: int64 ``[G]`` classes in ``[0, num_classes)``.
        padded_hw: ``(Hp, Wp)`` of the padded image in pixels (the reference's stride-4 mask size ×4;
            equal for sizes divisible by 32).
        num_classes: foreground classes ``C``; the background label is ``C``.
        num_grids: grid number ``S_l`` per level (BoxLevelSet: 40, 36, 24, 16, 12).
        scale_ranges: inclusive ``(lo, hi)`` per level on ``sqrt(w h)`` in pixels.
        sigma: centre-region scale (SOLO's epsilon, 0.2): half-size ``sigma w / 2`` by ``sigma h / 2``.
        min_mask_area: boxes whose full-resolution box mask has fewer pixels (:func:`box_mask_areas`) are
            skipped.

    Returns:
        one :class:`SOLOLevelTargets` per level, on ``boxes``' device. Conflicting cells go to the
        object with the largest GT index (the reference's overwrite order).

    Raises:
        ValueError: on bad shapes, ``len(num_grids) != len(scale_ranges)`` or ``sigma < 0``.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"solo_targets: boxes must be [G, 4] xyxy, got {tuple(boxes.shape)}")
    if labels.shape != (boxes.shape[0],):
        raise ValueError(f"solo_targets: labels must be [{boxes.shape[0]}], got {tuple(labels.shape)}")
    if len(num_grids) != len(scale_ranges):
        raise ValueError(f"solo_targets: {len(num_grids)} grids but {len(scale_ranges)} scale ranges")
    if sigma < 0:
        raise ValueError(f"solo_targets: sigma must be >= 0, got {sigma}")
    hp, wp = (int(v) for v in padded_hw)
    device = boxes.device
    num_gt = boxes.shape[0]
    # float64 so that cell indices of pixel coordinates are exact
    b = boxes.to(torch.float64)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    scale = (w * h).clamp(min=0).sqrt()
    valid = box_mask_areas(boxes, padded_hw) >= min_mask_area
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2
    half_w = sigma * w / 2
    half_h = sigma * h / 2
    gt_index = torch.arange(num_gt, device=device)

    out = []
    for num_grid, (lo, hi) in zip(num_grids, scale_ranges):
        hit = valid & (scale >= lo) & (scale <= hi)
        # centre cell (clamped so that a centre on the far image border stays on the grid)
        ci = _cell(cy, hp, num_grid).clamp(0, num_grid - 1)
        cj = _cell(cx, wp, num_grid).clamp(0, num_grid - 1)
        # centre region clipped to the grid, then to centre cell ±1 (SOLO's top/down/left/right rule)
        top = torch.maximum(_cell(cy - half_h, hp, num_grid).clamp(min=0), ci - 1)
        down = torch.minimum(_cell(cy + half_h, hp, num_grid).clamp(max=num_grid - 1), ci + 1)
        left = torch.maximum(_cell(cx - half_w, wp, num_grid).clamp(min=0), cj - 1)
        right = torch.minimum(_cell(cx + half_w, wp, num_grid).clamp(max=num_grid - 1), cj + 1)
        rows = torch.arange(num_grid, device=device)
        in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] <= down[:, None])  # [G, S]
        in_cols = (rows[None, :] >= left[:, None]) & (rows[None, :] <= right[:, None])
        covers = in_rows[:, :, None] & in_cols[:, None, :] & hit[:, None, None]  # [G, S, S]
        # "later object overwrites" == the largest covering GT index owns the cell
        owner = torch.where(covers, gt_index[:, None, None], -1).amax(dim=0) if num_gt else \
            torch.full((num_grid, num_grid), -1, dtype=torch.int64, device=device)
        flat_owner = owner.flatten()
        pos_inds = torch.nonzero(flat_owner >= 0).squeeze(1)
        pos_gt_inds = flat_owner[pos_inds]
        cat = torch.full((num_grid * num_grid,), num_classes, dtype=torch.int64, device=device)
        cat[pos_inds] = labels.to(torch.int64)[pos_gt_inds]
        out.append(SOLOLevelTargets(cat.view(num_grid, num_grid), pos_inds, pos_gt_inds))
    return out
