"""Tests for boxmask.supervision.box2mask: box projection dice cost, box-level Hungarian matching, LCM."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from boxmask.supervision.box2mask import box_projection_dice_cost, lcm_loss, lcm_refine, match_queries_to_boxes

torch.set_num_threads(1)

BIG = 30.0  # logit whose sigmoid is 1 (or 0 for -BIG) up to ~1e-13


def _logits_from_probs(p) -> torch.Tensor:
    return torch.logit(torch.tensor(p, dtype=torch.float64))  # logit(0) = -inf, sigmoid(-inf) = 0 exactly


def _dice(u: torch.Tensor, t: torch.Tensor, eps: float) -> float:
    return float(1 - (2 * (u * t).sum() + eps) / ((u * u).sum() + (t * t).sum() + eps))


# ------------------------------------------------------------------------ box projection dice cost


def test_projection_dice_cost_by_hand():
    # p on a 4x4 grid; x projection (max over rows) = [0, .5, .75, .25], y projection (max over cols) = [0, .5, .75, 0]
    p = [[0, 0, 0, 0],
         [0, 0.5, 0.25, 0.25],
         [0, 0.5, 0.75, 0],
         [0, 0, 0, 0]]
    box_a = torch.zeros(4, 4)
    box_a[1:3, 1:4] = 1  # rows 1-2, cols 1-3: tx = [0,1,1,1], ty = [0,1,1,0]
    box_b = torch.zeros(4, 4)
    box_b[:, 0] = 1  # column 0: tx = [1,0,0,0], ty = [1,1,1,1]
    cost = box_projection_dice_cost(_logits_from_probs([p]), torch.stack([box_a, box_b]).bool(), eps=1.0)
    assert cost.shape == (1, 2) and cost.dtype == torch.float64
    # A, x: sum pt = .5+.75+.25 = 1.5, sum p^2 = .25+.5625+.0625 = .875, sum t^2 = 3 -> 1 - 4/4.875 = 7/39
    # A, y: sum pt = 1.25, sum p^2 = .8125, sum t^2 = 2 -> 1 - 3.5/3.8125 = 5/61
    # B, x: sum pt = 0, sum p^2 = .875, sum t^2 = 1 -> 1 - 1/2.875 = 15/23
    # B, y: sum pt = 1.25, sum p^2 = .8125, sum t^2 = 4 -> 1 - 3.5/5.8125 = 37/93
    expected = [7 / 39 + 5 / 61, 15 / 23 + 37 / 93]
    assert cost[0].tolist() == pytest.approx(expected, abs=1e-12)
    # eps enters numerator and denominator: eps = 0 gives the plain dice (A, x: 1 - 3/3.875; A, y: 1 - 2.5/2.8125)
    cost0 = box_projection_dice_cost(_logits_from_probs([p]), box_a[None], eps=0.0)
    assert float(cost0) == pytest.approx((1 - 3 / 3.875) + (1 - 2.5 / 2.8125), abs=1e-12)


def test_projection_dice_cost_matches_per_pair_loop():
    g = torch.Generator().manual_seed(0)
    q, n_gt, h, w = 5, 4, 7, 11  # h != w: swapped projection axes would be caught
    logits = torch.randn(q, h, w, generator=g) * 3
    boxes = torch.zeros(n_gt, h, w)
    for k, (y0, y1, x0, x1) in enumerate([(0, 3, 1, 6), (2, 7, 0, 11), (4, 5, 8, 10), (1, 6, 3, 4)]):
        boxes[k, y0:y1, x0:x1] = 1
    cost = box_projection_dice_cost(logits, boxes, eps=1.0)
    assert cost.shape == (q, n_gt) and cost.dtype == torch.float32
    probs = logits.sigmoid()
    for i in range(q):
        for j in range(n_gt):
            ref = (_dice(probs[i].amax(0), boxes[j].amax(0), 1.0)  # onto x: [W]
                   + _dice(probs[i].amax(1), boxes[j].amax(1), 1.0))  # onto y: [H]
            assert float(cost[i, j]) == pytest.approx(ref, abs=1e-5)
    # half-precision logits are computed in float32
    assert box_projection_dice_cost(logits.half(), boxes).dtype == torch.float32


def test_projection_dice_cost_rejects_bad_shapes():
    with pytest.raises(ValueError, match="size"):
        box_projection_dice_cost(torch.zeros(2, 4, 4), torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match=r"\[Q, H, W\]"):
        box_projection_dice_cost(torch.zeros(2, 1, 4, 4), torch.zeros(1, 4, 4))


# ------------------------------------------------------------------------ matching


def _half_boxes() -> torch.Tensor:
    """GT 0: left half (cols 0-1) of a 4x4 grid; GT 1: right half (cols 2-3); full height."""
    boxes = torch.zeros(2, 4, 4)
    boxes[0, :, :2] = 1
    boxes[1, :, 2:] = 1
    return boxes


def _three_query_case():
    """q0: full-image mask, class probs (.5, .4 | .1); q1: cols 0-2 mask, (.1, .1 | .8); q2: empty, (.05, .05 | .9)."""
    masks = torch.full((3, 4, 4), -BIG)
    masks[0] = BIG
    masks[1, :, :3] = BIG
    class_logits = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.05, 0.05, 0.9]]).log()
    labels = torch.tensor([0, 1])
    return class_logits, masks, labels, _half_boxes()


def test_three_query_cost_terms_by_hand():
    class_logits, masks, labels, boxes = _three_query_case()
    # full mask vs a half box: x: 1 - (2*2+1)/(4+2+1) = 2/7, y: 1 - (2*4+1)/(4+4+1) = 0
    # cols 0-2 vs left: x: 1 - (2*2+1)/(3+2+1) = 1/6; vs right: x: 1 - (2*1+1)/(3+2+1) = 1/2; y: 0
    # empty vs a half box: x: 1 - 1/(0+2+1) = 2/3, y: 1 - 1/(0+4+1) = 4/5 -> 22/15
    expected_box = torch.tensor([[2 / 7, 2 / 7], [1 / 6, 1 / 2], [22 / 15, 22 / 15]])
    torch.testing.assert_close(box_projection_dice_cost(masks, boxes), expected_box, atol=1e-6, rtol=0)
    expected_class = -torch.tensor([[0.5, 0.4], [0.1, 0.1], [0.05, 0.05]])
    torch.testing.assert_close(-class_logits.softmax(-1)[:, labels], expected_class, atol=1e-6, rtol=0)


def test_matching_beats_greedy():
    class_logits, masks, labels, boxes = _three_query_case()
    # total cost 2*cls + 5*box:   GT0                      GT1
    #   q0               -1.0 + 10/7  = 0.4286     -0.8 + 10/7 = 0.6286
    #   q1               -0.2 + 5/6   = 0.6333     -0.2 + 5/2  = 2.3
    #   q2               -0.1 + 22/3  = 7.2333     -0.1 + 22/3 = 7.2333
    # greedy takes the global minimum q0-GT0 first and is left with q1-GT1: 0.4286 + 2.3 = 2.7286;
    # the optimum is q0-GT1 + q1-GT0 = 0.6286 + 0.6333 = 1.2619
    q_idx, g_idx = match_queries_to_boxes(class_logits, masks, labels, boxes)
    assert q_idx.dtype == torch.int64 and g_idx.dtype == torch.int64
    assert q_idx.tolist() == [0, 1] and g_idx.tolist() == [1, 0]


def test_each_cost_term_drives_the_assignment():
    class_logits, masks, labels, boxes = _three_query_case()
    # class term alone: q0: (-1, -.8), q1: (-.2, -.2), q2: (-.1, -.1) -> q0-GT0 + q1-GT1 = -1.2 beats
    # q0-GT1 + q1-GT0 = -1.0 and q0-GT0 + q2-GT1 = -1.1
    q_idx, g_idx = match_queries_to_boxes(class_logits, masks, labels, boxes, box_weight=0.0)
    assert q_idx.tolist() == [0, 1] and g_idx.tolist() == [0, 1]
    # box term alone: q0: (10/7, 10/7), q1: (5/6, 5/2) -> q0-GT1 + q1-GT0 = 2.26 beats q0-GT0 + q1-GT1 = 3.93
    q_idx, g_idx = match_queries_to_boxes(class_logits, masks, labels, boxes, class_weight=0.0)
    assert q_idx.tolist() == [0, 1] and g_idx.tolist() == [1, 0]
    # a heavy class weight (20) flips the combined cost to the class-term assignment:
    # q0-GT0 + q1-GT1 = (-10 + 10/7) + (-2 + 5/2) = -8.07 < q0-GT1 + q1-GT0 = (-8 + 10/7) + (-2 + 5/6) = -7.74
    q_idx, g_idx = match_queries_to_boxes(class_logits, masks, labels, boxes, class_weight=20.0)
    assert q_idx.tolist() == [0, 1] and g_idx.tolist() == [0, 1]
    # swapping the labels of the two GTs swaps the class-term assignment
    q_idx, g_idx = match_queries_to_boxes(class_logits, masks, labels.flip(0), boxes, box_weight=0.0)
    assert q_idx.tolist() == [0, 1] and g_idx.tolist() == [1, 0]


@pytest.mark.parametrize("q,n_gt", [(5, 3), (2, 4), (3, 3)])
def test_matching_is_optimal_by_brute_force(q, n_gt):
    g = torch.Generator().manual_seed(10 * q + n_gt)
    h, w, c = 6, 8, 4
    class_logits = torch.randn(q, c + 1, generator=g)
    masks = torch.randn(q, h, w, generator=g) * 4
    boxes = (torch.rand(n_gt, h, w, generator=g) > 0.5).float()
    labels = torch.randint(0, c, (n_gt,), generator=g)
    cost = (2.0 * -class_logits.softmax(-1)[:, labels] + 5.0 * box_projection_dice_cost(masks, boxes)).double()
    q_idx, g_idx = match_queries_to_boxes(class_logits, masks, labels, boxes)
    k = min(q, n_gt)
    assert len(q_idx) == len(g_idx) == k
    assert q_idx.tolist() == sorted(q_idx.tolist())
    assert len(set(q_idx.tolist())) == k and len(set(g_idx.tolist())) == k
    best = min(
        sum(float(cost[i, j]) for i, j in (zip(perm, range(n_gt)) if q >= n_gt else zip(range(q), perm)))
        for perm in itertools.permutations(range(max(q, n_gt)), k)
    )
    assert float(cost[q_idx, g_idx].sum()) == pytest.approx(best, abs=1e-9)


def test_matching_without_gts_and_fewer_queries_than_gts():
    class_logits, masks, labels, boxes = _three_query_case()
    q_idx, g_idx = match_queries_to_boxes(class_logits, masks, labels[:0], boxes[:0])
    assert q_idx.shape == (0,) and g_idx.shape == (0,)
    assert q_idx.dtype == torch.int64 and g_idx.dtype == torch.int64
    # Q = 1 < G = 2: the single full-image query (class probs .5 / .4) takes GT0 (cost .4286 < .6286)
    q_idx, g_idx = match_queries_to_boxes(class_logits[:1], masks[:1], labels, boxes)
    assert q_idx.tolist() == [0] and g_idx.tolist() == [0]
    # Q = 2 < G = 3 (GT2 = GT1 with label 0): K = Q = 2
    boxes3 = torch.cat([boxes, boxes[1:]])
    q_idx, g_idx = match_queries_to_boxes(class_logits[1:], masks[1:], torch.tensor([0, 1, 0]), boxes3)
    assert len(q_idx) == 2 and q_idx.tolist() == [0, 1]


def test_matching_runs_without_grad():
    class_logits, masks, labels, boxes = _three_query_case()
    class_logits.requires_grad_(True)
    masks.requires_grad_(True)
    q_idx, _ = match_queries_to_boxes(class_logits, masks, labels, boxes)
    assert not q_idx.requires_grad and class_logits.grad is None


def test_matching_rejects_bad_inputs():
    class_logits, masks, labels, boxes = _three_query_case()  # C = 2 classes
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        match_queries_to_boxes(class_logits, masks, torch.tensor([0, 2]), boxes)  # 2 is "no object"
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        match_queries_to_boxes(class_logits, masks, torch.tensor([-1, 0]), boxes)
    with pytest.raises(ValueError, match="integer"):
        match_queries_to_boxes(class_logits, masks, labels.float(), boxes)
    with pytest.raises(ValueError, match="mask_logits"):
        match_queries_to_boxes(class_logits, masks[:2], labels, boxes)
    with pytest.raises(ValueError, match="box_masks"):
        match_queries_to_boxes(class_logits, masks, labels, boxes[:1])
    with pytest.raises(ValueError, match="size"):
        match_queries_to_boxes(class_logits, masks, labels, boxes[:, :, :3])
    with pytest.raises(ValueError, match="class_logits"):
        match_queries_to_boxes(class_logits[:, :1], masks, labels, boxes)
    bad = masks.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*box projection dice"):
        match_queries_to_boxes(class_logits, bad, labels, boxes)
    bad_cls = class_logits.clone()
    bad_cls[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*class"):
        match_queries_to_boxes(bad_cls, masks, labels, boxes)


# ------------------------------------------------------------------------ LCM


def _neighbour_mean_reference(p: torch.Tensor, d: int) -> torch.Tensor:
    """Plain-loop mean of the 8 neighbours at offset d with clamped (replicate) indices; p [h, w]."""
    h, w = p.shape
    out = torch.zeros_like(p)
    for y in range(h):
        for x in range(w):
            vals = [p[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
                    for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]
            out[y, x] = sum(vals) / 8
    return out


def test_lcm_constant_image_is_neighbour_mean_by_hand():
    p = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    p[0, 0, 0, 0] = 1.0  # a corner: replicate padding copies it into the out-of-map neighbours
    image = torch.full((1, 3, 5, 5), 0.7, dtype=torch.float64)
    out = lcm_refine(image, p, dilation=2, iterations=1)[0, 0]
    # (0,0): neighbours (-2,-2), (-2,0), (0,-2) are clamped to (0,0) -> 3/8
    # (0,2): offset (-2,-2) hits (-2,0), clamped to (0,0), and offset (0,-2) hits (0,0) -> 2/8
    # (2,0) and (1,0): likewise 2/8; (2,2) and (1,1): one neighbour ((0,0), via clamping for (1,1)) -> 1/8
    # (3,3), (4,4), (0,4): no neighbour at (0,0) -> 0
    for (y, x), v in {(0, 0): 3 / 8, (0, 2): 2 / 8, (2, 0): 2 / 8, (1, 0): 2 / 8, (2, 2): 1 / 8,
                      (1, 1): 1 / 8, (3, 3): 0.0, (4, 4): 0.0, (0, 4): 0.0}.items():
        assert float(out[y, x]) == pytest.approx(v, abs=1e-12), (y, x)
    torch.testing.assert_close(out, _neighbour_mean_reference(p[0, 0], 2))


def test_lcm_constant_image_iterates_neighbour_mean():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)
    image = torch.full((2, 3, 6, 7), -1.5, dtype=torch.float64)
    out = lcm_refine(image, probs, dilation=2, iterations=3)
    for n in range(2):
        for k in range(3):
            ref = probs[n, k]
            for _ in range(3):
                ref = _neighbour_mean_reference(ref, 2)
            torch.testing.assert_close(out[n, k], ref)
    torch.testing.assert_close(lcm_refine(image, probs, iterations=0), probs)


def test_lcm_affinity_formula_by_hand():
    # 2-channel 5x5 image, dilation 1: around the centre (2,2) only the neighbour above, (1,2), differs,
    # in channel 0 by 1; channel 1 is flat (difference 0, std 0 -> term 0)
    image = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    image[0, 0, 1, 2] = 1.0
    probs = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    probs[0, 0, 1, 2] = 1.0  # one step puts a_ij of that neighbour into the centre
    alpha = 3.0
    out = float(lcm_refine(image, probs, dilation=1, iterations=1, alpha=alpha)[0, 0, 2, 2])
    std = math.sqrt((1 - 8 * (1 / 8) ** 2) / 7)  # unbiased std of the 8 values (1, 0, ..., 0) = sqrt(1/8)
    z = (1 / (std + 1e-8) / alpha + 0.0) / 2  # mean over the 2 channels, then squared
    expected = math.exp(-z ** 2) / (7 + math.exp(-z ** 2))  # the 7 equal neighbours have exponent 0
    assert out == pytest.approx(expected, abs=1e-9)
    assert out == pytest.approx(0.10265, abs=1e-4)
    # the other readings would give different numbers: squaring inside the channel mean, or population std
    inside = math.exp(-(1 / std / alpha) ** 2 / 2)
    assert abs(out - inside / (7 + inside)) > 0.01
    pop = math.exp(-((1 / math.sqrt(7 / 64) / alpha) / 2) ** 2)
    assert abs(out - pop / (7 + pop)) > 0.002


def test_lcm_does_not_leak_across_an_edge():
    h, w = 12, 12
    image = torch.zeros(1, 3, h, w)
    image[..., 6:] = 1.0  # sharp vertical edge between columns 5 and 6
    probs = torch.zeros(1, 1, h, w)
    probs[..., :6] = 1.0  # the mask follows the edge
    refined = lcm_refine(image, probs)  # dilation 2, 10 iterations, alpha 0.3
    assert float(refined[..., 6:].max()) < 1e-3
    assert float(refined[..., :6].min()) > 1 - 1e-3
    leaked = lcm_refine(torch.zeros_like(image), probs)  # no edge in the guide: the mask blurs across
    assert float(leaked[..., 6].min()) > 0.1 and float(leaked[..., 5].max()) < 0.9


def test_lcm_output_stays_in_unit_interval():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 16, 16, generator=g) * 50
    probs = torch.rand(2, 4, 16, 16, generator=g)
    probs[0, 0] = (probs[0, 0] > 0.5).float()  # exact 0/1 values too
    out = lcm_refine(image, probs)
    assert out.shape == probs.shape and out.dtype == torch.float32
    assert float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6
    assert not torch.allclose(out, probs, atol=1e-2)  # it does change the map


def test_lcm_loss_zero_for_constant_probs():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 10, 10, generator=g)
    box = torch.ones(1, 2, 10, 10)
    assert float(lcm_loss(image, torch.full((1, 2, 10, 10), 0.3), box)) == pytest.approx(0.0, abs=1e-6)
    assert float(lcm_loss(image, torch.rand(1, 2, 10, 10, generator=g), box)) > 0.01


def test_lcm_loss_counts_only_pixels_inside_the_box():
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 10, 10, generator=g)
    probs = torch.rand(1, 2, 10, 10, generator=g)
    diff = (lcm_refine(image, probs) - probs).abs()
    box = torch.zeros(1, 2, 10, 10)
    box[0, 0, 2:5, 3:8] = 1
    box[0, 1, 6:9, 0:4] = 1
    loss = lcm_loss(image, probs, box.bool())
    assert float(loss) == pytest.approx(float((diff * box).sum() / box.sum()), abs=1e-6)
    assert float(loss) != pytest.approx(float(diff.mean()), abs=1e-4)
    one = torch.zeros_like(box)
    one[0, 1, 4, 4] = 1
    assert float(lcm_loss(image, probs, one)) == pytest.approx(float(diff[0, 1, 4, 4]), abs=1e-6)
    assert float(lcm_loss(image, probs, torch.zeros_like(box))) == 0.0


def test_lcm_loss_gradient_does_not_flow_through_the_target():
    g = torch.Generator().manual_seed(5)
    image = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64)
    probs = torch.rand(2, 2, 9, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    box = torch.zeros(2, 2, 9, 9, dtype=torch.float64)
    box[:, :, 1:7, 2:8] = 1
    box[1, 0] = 0
    lcm_loss(image, probs, box).backward()
    target = lcm_refine(image, probs.detach())
    expected = torch.sign(probs.detach() - target) * box / box.sum()
    torch.testing.assert_close(probs.grad, expected)
    # a non-detached target would add the refinement's own Jacobian: a different gradient
    probs2 = probs.detach().clone().requires_grad_(True)
    ((lcm_refine(image, probs2) - probs2).abs() * box).sum().div(box.sum()).backward()
    assert not torch.allclose(probs2.grad, expected)


def test_lcm_rejects_bad_inputs():
    image, probs = torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="share N"):
        lcm_refine(image, torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError, match="dilation"):
        lcm_refine(image, probs, dilation=0)
    with pytest.raises(ValueError, match="alpha"):
        lcm_refine(image, probs, alpha=0.0)
    with pytest.raises(ValueError, match="box_masks"):
        lcm_loss(image, probs, torch.zeros(1, 1, 8, 8))
