"""CondInst pieces: aligned upsampling, dynamic mask head, FCOS targets, positive sampling, schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from boxmask.config import SolverConfig
from boxmask.engine.module import StepBatchSampler, lr_factor
from boxmask.modeling.condinst import DynamicMaskHead, _topk_per_gt, aligned_bilinear, dynamic_head_num_params
from boxmask.modeling.fcos import centerness_target, compute_locations, fcos_targets, level_ranges


def test_aligned_bilinear_matches_definition():
    # methods.md §1.6: fine pixel i samples coarse coordinate (i - f//2) / f, replicated at the borders
    h, w, f = 3, 4, 2
    xs = torch.arange(w, dtype=torch.float64) * 8 + 4
    x = xs.view(1, 1, 1, w).expand(1, 1, h, w).contiguous()
    up = aligned_bilinear(x, f)
    assert up.shape == (1, 1, h * f, w * f)
    coarse = ((torch.arange(w * f, dtype=torch.float64) - f // 2) / f).clamp(0, w - 1)
    assert torch.allclose(up[0, 0, 0], coarse * 8 + 4)
    assert torch.allclose(up[0, 0, -1], coarse * 8 + 4)
    assert torch.equal(aligned_bilinear(x, 1), x)
    with pytest.raises(ValueError):
        aligned_bilinear(x, 0)


def test_aligned_bilinear_factor4_constant_and_shape():
    x = torch.full((2, 3, 5, 7), 1.5)
    up = aligned_bilinear(x, 4)
    assert up.shape == (2, 3, 20, 28)
    assert torch.allclose(up, torch.full_like(up, 1.5))


def test_dynamic_head_param_counts():
    assert dynamic_head_num_params(16, 8, 3) == 233  # AdelaiDet BoxInst
    assert dynamic_head_num_params(8, 8, 3) == 169  # CondInst
    assert dynamic_head_num_params(16, 16, 3) == 593  # mmdet BoxInst
    assert DynamicMaskHead(16, 8, 3).num_params == 233


def test_dynamic_head_matches_grouped_conv_reference():
    torch.manual_seed(0)
    head = DynamicMaskHead(mask_channels=4, channels=3, num_layers=3)
    feats = torch.randn(2, 4, 5, 6)
    k = 3
    params = torch.randn(k, head.num_params)
    im_inds = torch.tensor([0, 1, 1])
    locs = torch.tensor([[12.0, 20.0], [4.0, 4.0], [40.0, 36.0]])
    levels = torch.tensor([0, 1, 2])
    out = head(feats, params, im_inds, locs, levels)
    assert out.shape == (k, 1, 10, 12)
    # reference: grouped 1x1 conv with AdelaiDet's [W0,W1,W2,b0,b1,b2] layout
    grid = compute_locations(5, 6, 8, feats.device)
    soi = torch.tensor([64.0, 128.0, 256.0])
    refs = []
    for i in range(k):
        rel = ((locs[i][None] - grid) / soi[levels[i]]).t().reshape(2, 5, 6)
        x = torch.cat([rel, feats[im_inds[i]]], 0)[None]
        p = params[i]
        sizes = [3 * 6, 3 * 3, 1 * 3, 3, 3, 1]
        w0, w1, w2, b0, b1, b2 = torch.split(p, sizes)
        x = F.relu(F.conv2d(x, w0.view(3, 6, 1, 1), b0))
        x = F.relu(F.conv2d(x, w1.view(3, 3, 1, 1), b1))
        x = F.conv2d(x, w2.view(1, 3, 1, 1), b2)
        refs.append(aligned_bilinear(x, 2))
    assert torch.allclose(out, torch.cat(refs), atol=1e-5)


def test_fcos_targets_crafted_case():
    strides = [8, 16]
    locs = [compute_locations(8, 8, 8, torch.device("cpu")), compute_locations(4, 4, 16, torch.device("cpu"))]
    ranges = level_ranges([32])  # P3: max(l,t,r,b) in (-1,32], P4: (32, inf)
    # a small box (P3) and a big box (P4); location (20,20) is P3 cell (2,2)
    boxes = torch.tensor([[10.0, 10.0, 34.0, 30.0], [0.0, 0.0, 64.0, 64.0]])
    labels = torch.tensor([1, 0])
    t = fcos_targets(locs, strides, ranges, [boxes], [labels], num_classes=2, radius=1.5)
    lab = t.labels[0]
    p3 = lab[:64].view(8, 8)
    # small box centre (22,20); radius 12 px → x in (10,34), y in (10,30) clipped to the box → centres 12..28
    expected = torch.full((8, 8), 2)
    for yi in range(8):
        for xi in range(8):
            x, y = xi * 8 + 4, yi * 8 + 4
            if 10 < x < 34 and 10 < y < 30:
                expected[yi, xi] = 1
    assert torch.equal(p3, expected)
    # regression target at (20,20) for box 0, divided by stride 8: l=10,t=10,r=14,b=10
    idx = 2 * 8 + 2
    assert torch.allclose(t.reg[0, idx], torch.tensor([10.0, 10.0, 14.0, 10.0]) / 8)
    assert t.gt_inds[0, idx] == 0
    # big box: every P3 location near its centre has max(l,t,r,b) > 32, so it lives on P4 only, where
    # the centre region (radius 1.5*16 around (32,32)) holds the centres 24 and 40 on each axis
    p4 = lab[64:].view(4, 4)
    expected4 = torch.full((4, 4), 2)
    expected4[1:3, 1:3] = 0
    assert torch.equal(p4, expected4)
    assert torch.allclose(t.reg[0, 64 + 1 * 4 + 1], torch.tensor([24.0, 24.0, 40.0, 40.0]) / 16)
    # no image-level boxes → all background
    t2 = fcos_targets(locs, strides, ranges, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], 2)
    assert (t2.labels == 2).all() and (t2.gt_inds == -1).all()


def test_fcos_ambiguity_goes_to_smallest_box():
    locs = [compute_locations(4, 4, 8, torch.device("cpu"))]
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0]])
    t = fcos_targets(locs, [8], [(-1.0, 1e8)], [boxes], [torch.tensor([0, 1])], 2, radius=0)
    # location (12,12) is inside both → the small box (index 1)
    assert t.gt_inds[0, 1 * 4 + 1] == 1
    assert t.gt_inds[0, 0] == 0  # (4,4) only in the big box


def test_centerness_target():
    reg = torch.tensor([[1.0, 2.0, 1.0, 2.0], [1.0, 1.0, 3.0, 1.0]])
    assert torch.allclose(centerness_target(reg), torch.tensor([1.0, math.sqrt(1 / 3)]))


def test_topk_per_gt_sampling():
    im = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    gt = torch.tensor([0, 0, 0, 1, 1, 0, 0])
    score = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.4, 0.6])
    keep = _topk_per_gt(im, gt, score, 4)  # image 0: 2 GTs → k=2 each; image 1: 1 GT → k=4
    assert sorted(keep.tolist()) == [1, 2, 3, 4, 5, 6]
    keep = _topk_per_gt(im, gt, score, 2)  # image 0: k=1 per GT; image 1: k=2
    assert sorted(keep.tolist()) == [1, 3, 5, 6]


def test_lr_schedule():
    s = SolverConfig(base_lr=0.01, warmup_iters=10, warmup_factor=0.001, steps=[20, 30], gamma=0.1)
    assert lr_factor(0, s) == pytest.approx(0.001)
    assert lr_factor(5, s) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, s) == 1.0
    assert lr_factor(19, s) == 1.0
    assert lr_factor(20, s) == pytest.approx(0.1)
    assert lr_factor(35, s) == pytest.approx(0.01)


def test_step_sampler_is_a_function_of_the_step():
    full = list(StepBatchSampler(5, 2, 6, seed=3))
    resumed = list(StepBatchSampler(5, 2, 6, start_step=4, seed=3))
    assert full[4:] == resumed
    # every epoch visits every index once
    idx = [i for b in full for i, _ in b]
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:10]) == list(range(5))
    # two ranks see disjoint samples in a step
    r0 = list(StepBatchSampler(8, 2, 2, seed=0, rank=0, world_size=2))
    r1 = list(StepBatchSampler(8, 2, 2, seed=0, rank=1, world_size=2))
    assert not set(i for i, _ in r0[0]) & set(i for i, _ in r1[0])


def test_controller_at_equals_the_dense_controller_at_those_locations():
    """``FCOSHead.controller_at`` (the export's sparse controller) equals the dense 3x3 controller output gathered
    at the same (level, location), including border locations where the convolution reads zero padding."""
    from boxmask.modeling.fcos import FCOSHead

    torch.manual_seed(0)
    head = FCOSHead(16, 3, num_convs=1, num_params=7, num_levels=3)
    torch.nn.init.normal_(head.controller.weight)  # not the tiny 0.01 init: make errors visible
    torch.nn.init.normal_(head.controller.bias)
    feats = [torch.randn(2, 16, h, w) for h, w in ((8, 6), (4, 3), (2, 2))]
    _, _, _, dense = head(feats)
    _, _, _, box_feats = head(feats, dense_params=False)
    assert [f.shape for f in box_feats] == [f.shape for f in feats]
    levels = torch.tensor([[0, 0, 0, 1, 2, 1], [2, 0, 1, 0, 2, 1]])
    loc_idx = torch.tensor([[0, 47, 13, 11, 3, 0], [1, 5, 6, 42, 0, 7]])  # corners, borders and interior
    got = head.controller_at(box_feats, levels, loc_idx)
    assert got.shape == (2, 6, 7)
    for b in range(2):
        for k in range(6):
            ref = dense[int(levels[b, k])][b].flatten(1)[:, int(loc_idx[b, k])]
            torch.testing.assert_close(got[b, k], ref, rtol=1e-5, atol=1e-5)
    head.controller = torch.nn.Conv2d(16, 7, 1)
    with pytest.raises(ValueError, match="3x3"):
        head.controller_at(box_feats, levels, loc_idx)
