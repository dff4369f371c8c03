"""Tests for boxmask.modeling.solo_targets (SOLOv2 grid targets from boxes, methods.md §3.2)."""

from __future__ import annotations

import math

import pytest
import torch

from boxmask.modeling.solo_targets import (
    SOLO_GRID_NUMS,
    SOLO_MASK_STRIDES,
    SOLO_SCALE_RANGES,
    box_mask_areas,
    level_box_masks,
    solo_targets,
)
from boxmask.supervision.boxinst import box_masks_at_stride

torch.set_num_threads(1)

NUM_CLASSES = 5
# 720 x 1440 splits into whole cells on every default grid: cell (h, w) = (18, 36), (20, 40), (30, 60),
# (45, 90), (60, 120) pixels for S = 40, 36, 24, 16, 12
HW = (720, 1440)


def _cells(num_grid: int, rows, cols) -> list[int]:
    return sorted(i * num_grid + j for i in rows for j in cols)


def _check_consistent(level, num_grid: int, labels: torch.Tensor):
    assert level.labels.shape == (num_grid, num_grid) and level.labels.dtype == torch.int64
    assert level.pos_inds.dtype == torch.int64 and level.pos_gt_inds.dtype == torch.int64
    flat = level.labels.flatten()
    torch.testing.assert_close(level.pos_inds, torch.nonzero(flat != NUM_CLASSES).squeeze(1))
    torch.testing.assert_close(flat[level.pos_inds], labels[level.pos_gt_inds])


def test_hand_built_image_levels_and_cells():
    boxes = torch.tensor([
        [80.0, 80.0, 120.0, 120.0],      # A: sqrt(wh) 40  -> level 0 only
        [360.0, 260.0, 440.0, 340.0],    # B: 80  -> levels 0 and 1 (ranges overlap on [48, 96])
        [100.0, 440.0, 1300.0, 560.0],   # C: 379.5 -> levels 2 and 3, wide: clipped to centre ±1
        [525.0, 145.0, 1325.0, 595.0],   # D: 600 -> levels 3 and 4
    ])
    labels = torch.tensor([2, 0, 1, 3])
    out = solo_targets(boxes, labels, HW, NUM_CLASSES)
    assert len(out) == 5
    expected = {
        # level: [(gt, cells)] hand-computed with cell = floor(c * S / size)
        0: [(0, _cells(40, [5], [2])),                       # centre (100, 100), region ±4 px
            (1, _cells(40, [16, 17], [10, 11]))],            # centre (400, 300), region ±8 px
        1: [(1, _cells(36, [14, 15], [9, 10]))],
        # C centre (700, 500), half (120, 12): columns 9..13 on S=24 limited to centre col 11 ±1
        2: [(2, _cells(24, [16, 17], [10, 11, 12]))],
        # S=16: C columns 6..9 limited to 6..8 (centre col 7); D (925, 370) half (80, 45): 3 x 3 cells
        3: [(2, _cells(16, [10, 11], [6, 7, 8])),
            (3, _cells(16, [7, 8, 9], [9, 10, 11]))],
        4: [(3, _cells(12, [5, 6], [7, 8]))],
    }
    for lvl, (level, num_grid) in enumerate(zip(out, SOLO_GRID_NUMS)):
        _check_consistent(level, num_grid, labels)
        got = sorted(zip(level.pos_inds.tolist(), level.pos_gt_inds.tolist()))
        want = sorted((c, g) for g, cells in expected[lvl] for c in cells)
        assert got == want, f"level {lvl}"
        # background everywhere else
        assert (level.labels.flatten() == NUM_CLASSES).sum().item() == num_grid ** 2 - len(want)


def test_conflicting_cells_go_to_the_later_gt():
    # two 80 x 80 boxes 10 px apart, centres (140, 143) and (150, 143): same cells on levels 0 and 1
    first = [100.0, 103.0, 180.0, 183.0]
    second = [110.0, 103.0, 190.0, 183.0]
    for boxes, labels, winner in [([first, second], [0, 1], 1), ([second, first], [1, 0], 1)]:
        out = solo_targets(torch.tensor(boxes), torch.tensor(labels), HW, NUM_CLASSES)
        assert out[0].pos_inds.tolist() == _cells(40, [7, 8], [3, 4])
        assert out[1].pos_inds.tolist() == _cells(36, [6, 7], [3])
        for level in out[:2]:
            assert (level.pos_gt_inds == winner).all()
            assert (level.labels.flatten()[level.pos_inds] == labels[winner]).all()
        assert all(len(level.pos_inds) == 0 for level in out[2:])


def test_tiny_boxes_are_skipped():
    boxes = torch.tensor([
        [10.0, 10.0, 12.0, 12.0],    # full-res box mask 3 x 3 = 9 px < 10: skipped
        [10.5, 10.5, 11.5, 11.9],    # 2 x 2 px: skipped
        [200.0, 200.0, 201.0, 204.0],  # 2 x 5 = 10 px: kept (sqrt(wh) = 2 -> level 0)
    ])
    torch.testing.assert_close(box_mask_areas(boxes, HW), torch.tensor([9.0, 4.0, 10.0], dtype=torch.float64))
    out = solo_targets(boxes, torch.tensor([1, 2, 3]), HW, NUM_CLASSES)
    assert out[0].pos_gt_inds.tolist() == [2]
    assert out[0].pos_inds.tolist() == _cells(40, [202 * 40 // 720], [200 * 40 // 1440])
    assert all(len(level.pos_inds) == 0 for level in out[1:])
    # a higher threshold drops the third box too
    out = solo_targets(boxes, torch.tensor([1, 2, 3]), HW, NUM_CLASSES, min_mask_area=11)
    assert all(len(level.pos_inds) == 0 for level in out)


def test_empty_gt_is_all_background():
    out = solo_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), HW, NUM_CLASSES)
    assert len(out) == len(SOLO_GRID_NUMS)
    for level, num_grid in zip(out, SOLO_GRID_NUMS):
        assert level.labels.shape == (num_grid, num_grid)
        assert (level.labels == NUM_CLASSES).all()
        assert level.pos_inds.shape == (0,) and level.pos_gt_inds.shape == (0,)


def test_centre_on_the_image_border_stays_on_the_grid():
    # box hanging over the right/bottom border: centre cell clamped to S - 1
    boxes = torch.tensor([[1400.0, 690.0, 1480.0, 750.0]])
    out = solo_targets(boxes, torch.tensor([4]), HW, NUM_CLASSES)
    assert out[0].pos_inds.tolist() == _cells(40, [39], [39])


def _reference_loop(boxes, labels, hw, num_grids, ranges, sigma, min_area):
    """Per-object loop in the reference's style (GT order, later objects overwrite), in Python floats."""
    hp, wp = hw
    out = []
    for num_grid, (lo, hi) in zip(num_grids, ranges):
        owner = [[-1] * num_grid for _ in range(num_grid)]
        for g, (x1, y1, x2, y2) in enumerate(boxes):
            if not lo <= math.sqrt(max((x2 - x1) * (y2 - y1), 0.0)) <= hi:
                continue
            area = max(min(math.floor(x2), wp - 1) - max(math.floor(x1), 0) + 1, 0) * \
                max(min(math.floor(y2), hp - 1) - max(math.floor(y1), 0) + 1, 0)
            if area < min_area:
                continue
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            hw_, hh = sigma * (x2 - x1) / 2, sigma * (y2 - y1) / 2
            ci = min(max(math.floor(cy * num_grid / hp), 0), num_grid - 1)
            cj = min(max(math.floor(cx * num_grid / wp), 0), num_grid - 1)
            top = max(max(0, math.floor((cy - hh) * num_grid / hp)), ci - 1)
            down = min(min(num_grid - 1, math.floor((cy + hh) * num_grid / hp)), ci + 1)
            left = max(max(0, math.floor((cx - hw_) * num_grid / wp)), cj - 1)
            right = min(min(num_grid - 1, math.floor((cx + hw_) * num_grid / wp)), cj + 1)
            for i in range(top, down + 1):
                for j in range(left, right + 1):
                    owner[i][j] = g
        flat = [o for row in owner for o in row]
        out.append([(k, o, labels[o]) for k, o in enumerate(flat) if o >= 0])
    return out


def test_random_boxes_match_reference_loop():
    g = torch.Generator().manual_seed(3)
    hw = (640, 960)
    for _ in range(5):
        n = 25
        xy = torch.rand(n, 2, generator=g) * torch.tensor([hw[1], hw[0]])
        wh = torch.exp(torch.rand(n, 2, generator=g) * math.log(1500.0)) + 1.0
        boxes = torch.cat([xy, xy + wh], 1).double()
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        out = solo_targets(boxes, labels, hw, NUM_CLASSES)
        ref = _reference_loop(boxes.tolist(), labels.tolist(), hw, SOLO_GRID_NUMS, SOLO_SCALE_RANGES, 0.2, 10)
        for level, num_grid, want in zip(out, SOLO_GRID_NUMS, ref):
            _check_consistent(level, num_grid, labels)
            got = list(zip(level.pos_inds.tolist(), level.pos_gt_inds.tolist(),
                           level.labels.flatten()[level.pos_inds].tolist()))
            assert got == want


def test_box_mask_areas_and_level_masks_match_box_masks_at_stride():
    boxes = torch.tensor([[3.2, 5.7, 40.9, 30.1], [-4.0, 10.0, 20.0, 70.0], [50.0, 50.0, 80.0, 60.0],
                          [10.0, 10.0, 5.0, 20.0]])
    hw = (64, 96)
    full = box_masks_at_stride(boxes, hw, 1)
    torch.testing.assert_close(box_mask_areas(boxes, hw), full.sum((1, 2)).double())
    for stride in sorted(set(SOLO_MASK_STRIDES)):
        masks = level_box_masks(boxes, hw, stride)
        assert masks.shape == (4, 64 // stride, 96 // stride)
        torch.testing.assert_close(masks, full[:, stride // 2::stride, stride // 2::stride])


def test_errors():
    with pytest.raises(ValueError):
        solo_targets(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64), HW, NUM_CLASSES)
    with pytest.raises(ValueError):
        solo_targets(torch.zeros(2, 4), torch.zeros(3, dtype=torch.int64), HW, NUM_CLASSES)
    with pytest.raises(ValueError):
        solo_targets(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), HW, NUM_CLASSES, num_grids=(40,))
    with pytest.raises(ValueError):
        solo_targets(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), HW, NUM_CLASSES, sigma=-0.1)
