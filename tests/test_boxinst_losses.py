"""Tests for boxmask.supervision.boxinst: box masks at stride, projection loss, pairwise loss, warm-up."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from boxmask.supervision.boxinst import (
    box_masks_at_stride,
    pairwise_loss,
    pairwise_warmup_factor,
    projection_loss,
)

torch.set_num_threads(1)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------- box masks


def _literal_box_masks(boxes: torch.Tensor, hp: int, wp: int, stride: int) -> torch.Tensor:
    """methods.md §2.1 verbatim: full-res inclusive fill with int() coords, then [s//2::s, s//2::s]."""
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        full = torch.zeros(hp, wp)
        full[int(y1):int(y2) + 1, int(x1):int(x2) + 1] = 1.0
        out.append(full[stride // 2::stride, stride // 2::stride])
    return torch.stack(out)


@pytest.mark.parametrize("hp,wp,stride", [(32, 48, 4), (37, 45, 4), (40, 24, 8), (9, 7, 1), (12, 10, 3)])
def test_box_masks_at_stride_equals_literal_definition(hp, wp, stride):
    g = torch.Generator().manual_seed(hp * 100 + wp)
    n = 40
    xy1 = torch.rand(n, 2, generator=g) * torch.tensor([wp, hp])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([wp, hp]) * 0.7
    boxes = torch.cat([xy1, xy1 + wh], dim=1)  # fractional, some beyond the border
    edge = torch.tensor(
        [
            [0.0, 0.0, wp - 1.0, hp - 1.0],  # whole image
            [0.0, 0.0, wp + 3.5, hp + 3.5],  # past the border
            [2.0, 2.0, 2.0, 2.0],  # one pixel, on a sample point for stride 4
            [2.9, 1.1, 2.95, 6.99],  # thin, fractional
            [wp - 1.0, hp - 1.0, wp - 0.5, hp - 0.2],  # bottom-right corner pixel
            [3.0, 0.0, 1.0, 5.0],  # x2 < x1: empty
        ]
    )
    boxes = torch.cat([boxes, edge])
    masks = box_masks_at_stride(boxes, (hp, wp), stride=stride)
    assert masks.dtype == torch.float32
    assert torch.equal(masks, _literal_box_masks(boxes, hp, wp, stride))


def test_box_masks_at_stride_hand_case():
    # samples at pixels 2, 6, 10, 14; x in [2, 5] -> column 0; y in [2, 9] -> rows 0, 1
    masks = box_masks_at_stride(torch.tensor([[2.0, 2.0, 5.9, 9.5]]), (16, 16), stride=4)
    expected = torch.zeros(1, 4, 4)
    expected[0, 0:2, 0] = 1.0
    assert torch.equal(masks, expected)
    # a box ending at x = 1.99 covers pixel column 1 only and misses every sample point
    assert box_masks_at_stride(torch.tensor([[0.0, 0.0, 1.99, 15.0]]), (16, 16)).sum() == 0
    assert box_masks_at_stride(torch.zeros(0, 4), (16, 16)).shape == (0, 4, 4)


def test_box_masks_at_stride_rejects_bad_boxes():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        box_masks_at_stride(torch.zeros(3, 5), (16, 16))


# ---------------------------------------------------------------- projection loss


def test_projection_loss_hand_case():
    # probabilities p (h=2, w=3) and box mask B
    #   p = [[0.2, 0.8, 0.5],     B = [[0, 1, 1],
    #        [0.5, 0.2, 0.2]]          [0, 0, 0]]
    p = [[0.2, 0.8, 0.5], [0.5, 0.2, 0.2]]
    logits = torch.tensor([[_logit(v) for v in row] for row in p]).view(1, 1, 2, 3)
    box = torch.tensor([[[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    # x-projection (max over rows): u = [0.5, 0.8, 0.5], v = [0, 1, 1]
    #   sum(uv) = 1.3, sum(u^2) = 0.25 + 0.64 + 0.25 = 1.14, sum(v^2) = 2
    dice_x = 1.0 - 2 * 1.3 / (1.14 + 2.0 + 1e-5)
    # y-projection (max over columns): u = [0.8, 0.5], v = [1, 0]
    #   sum(uv) = 0.8, sum(u^2) = 0.64 + 0.25 = 0.89, sum(v^2) = 1
    dice_y = 1.0 - 2 * 0.8 / (0.89 + 1.0 + 1e-5)
    loss = projection_loss(logits, box)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(dice_x + dice_y, rel=1e-6)
    assert loss.item() == pytest.approx(0.1720 + 0.1534, abs=1e-4)
    # [K, h, w] logits give the same value; K instances are averaged
    assert projection_loss(logits[:, 0], box).item() == pytest.approx(loss.item(), rel=1e-7)
    zero_logits = torch.zeros(1, 1, 2, 3)  # p = 0.5 everywhere
    # x: u = [.5,.5,.5], v = [0,1,1]: 1 - 2*1/(0.75 + 2 + 1e-5); y: u = [.5,.5], v = [1,0]: 1 - 1/(0.5 + 1 + 1e-5)
    second = (1 - 2.0 / (2.75 + 1e-5)) + (1 - 1.0 / (1.5 + 1e-5))
    both = projection_loss(torch.cat([logits, zero_logits]), torch.cat([box, box]))
    assert both.item() == pytest.approx((dice_x + dice_y + second) / 2, rel=1e-6)


def test_projection_loss_is_small_for_a_box_shaped_prediction():
    box = box_masks_at_stride(torch.tensor([[4.0, 8.0, 20.0, 30.0]]), (40, 32))
    logits = (box * 2 - 1) * 20  # confident box-shaped mask
    assert projection_loss(logits, box).item() < 1e-4
    # box covers sample columns x = 6..18 (4 of w = 8) and rows y = 10..30 (6 of h = 10).
    # Inverted mask: every column and row holds a foreground pixel, so u = all ones:
    #   x: 1 - 2*4 / (8 + 4) = 1/3,  y: 1 - 2*6 / (10 + 6) = 1/4
    assert projection_loss(-logits, box).item() == pytest.approx(1 / 3 + 1 / 4, rel=1e-5)
    # empty prediction: u = 0, both dice terms are 1
    assert projection_loss(torch.full_like(logits, -30.0), box).item() == pytest.approx(2.0, rel=1e-5)


def test_projection_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    box = (torch.rand(2, 4, 5, generator=g) > 0.5).double()
    assert torch.autograd.gradcheck(lambda z: projection_loss(z, box), (logits,))


def test_projection_loss_empty_and_errors():
    logits = torch.zeros(0, 1, 4, 4, requires_grad=True)
    loss = projection_loss(logits, torch.zeros(0, 4, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="box_masks shape"):
        projection_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="mask_logits must be"):
        projection_loss(torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 4))


# ---------------------------------------------------------------- pairwise loss


def _unfold_pairwise(logits, similarity, box_masks, thr, dilation):
    """AdelaiDet-style reference: unfold the log-probabilities (zero padding), drop the centre."""
    z = logits if logits.dim() == 4 else logits[:, None]
    k, _, h, w = z.shape

    def unfold_wo_centre(x):
        cols = F.unfold(x, kernel_size=3, dilation=dilation, padding=dilation).view(k, 9, h, w)
        return torch.cat([cols[:, :4], cols[:, 5:]], dim=1)

    log_fg, log_bg = F.logsigmoid(z), F.logsigmoid(-z)
    log_same = torch.logaddexp(log_fg + unfold_wo_centre(log_fg), log_bg + unfold_wo_centre(log_bg))
    weights = (similarity >= thr).to(z.dtype) * box_masks[:, None]
    return (-log_same * weights).sum() / weights.sum().clamp(min=1.0)


def test_pairwise_loss_hand_case_1x5():
    # p = [.5, .8, .5, .2, .5], box = [1, 1, 1, 0, 0], dilation 2 -> only (0,-2) (ch 3) and (0,+2) (ch 4)
    # stay inside a 1-row map.
    logits = torch.tensor([0.0, math.log(4.0), 0.0, -math.log(4.0), 0.0]).view(1, 1, 1, 5)
    box = torch.tensor([[[1.0, 1.0, 1.0, 0.0, 0.0]]])
    sim = torch.zeros(1, 8, 1, 5)
    sim[0, 4, 0, 1] = 0.9  # edge 1 -> 3: counted. P_same = .8*.2 + .2*.8 = .32
    sim[0, 3, 0, 2] = 0.4  # edge 2 -> 0: counted. P_same = .5*.5 + .5*.5 = .5
    sim[0, 4, 0, 0] = 0.2  # below tau = 0.3: ignored
    sim[0, 3, 0, 4] = 0.5  # centre 4 outside the box: ignored
    loss = pairwise_loss(logits, sim, box, color_threshold=0.3, dilation=2)
    # (-ln .32 - ln .5) / 2 = ln(1 / (.32 * .5)) / 2 = ln(6.25) / 2 = ln 2.5
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(2.5), rel=1e-6)
    # threshold is inclusive (S >= tau): lowering tau to 0.2 adds edge 0 -> 2 with P_same = .5
    loss_low = pairwise_loss(logits, sim, box, color_threshold=0.2, dilation=2)
    assert loss_low.item() == pytest.approx((-math.log(0.32) - 2 * math.log(0.5)) / 3, rel=1e-6)


def test_pairwise_loss_normaliser_is_at_least_one():
    logits = torch.tensor([math.log(4.0), -math.log(4.0), 0.0]).view(1, 1, 1, 3)
    sim = torch.zeros(1, 8, 1, 3)
    sim[0, 4, 0, 0] = 1.0  # dilation 1: edge 0 -> 1, P_same = .32
    box = torch.tensor([[[0.5, 0.0, 0.0]]])  # soft centre weight 0.5: sum w = 0.5 -> normaliser 1
    loss = pairwise_loss(logits, sim, box, dilation=1)
    assert loss.item() == pytest.approx(-0.5 * math.log(0.32), rel=1e-6)
    assert pairwise_loss(logits, torch.zeros(1, 8, 1, 3), box, dilation=1).item() == 0.0


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_pairwise_loss_matches_unfold_reference_value_and_grad(dilation):
    g = torch.Generator().manual_seed(10 + dilation)
    k, h, w = 3, 11, 13
    logits = (torch.randn(k, 1, h, w, generator=g) * 3).requires_grad_()
    sim = torch.rand(k, 8, h, w, generator=g)
    sim[:, :, :, :2] *= 0.2  # leave some edges under the threshold
    box = (torch.rand(k, h, w, generator=g) > 0.3).float()
    loss = pairwise_loss(logits, sim, box, 0.3, dilation)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = _unfold_pairwise(ref_logits, sim, box, 0.3, dilation)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_pairwise_loss_per_image_similarity_equals_per_instance():
    g = torch.Generator().manual_seed(31)
    h, w = 9, 10
    im_inds = torch.tensor([1, 0, 1, 2, 1])
    logits = (torch.randn(5, 1, h, w, generator=g, dtype=torch.float64) * 2).requires_grad_()
    sim_img = torch.rand(3, 8, h, w, generator=g, dtype=torch.float64)
    box = (torch.rand(5, h, w, generator=g) > 0.3).double()
    loss = pairwise_loss(logits, sim_img, box, 0.3, 2, im_inds=im_inds)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = pairwise_loss(logits, sim_img[im_inds], box, 0.3, 2)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda z: pairwise_loss(z, sim_img, box, 0.3, 2, im_inds=im_inds), (logits,))
    with pytest.raises(ValueError, match="out of range"):
        pairwise_loss(logits, sim_img[:2], box, im_inds=im_inds)
    with pytest.raises(ValueError, match="im_inds"):
        pairwise_loss(logits, sim_img, box, im_inds=im_inds[:3])


def test_pairwise_loss_border_edges_count_in_normaliser_like_reference():
    # similarity >= tau even where the neighbour leaves the map: reference gives those edges zero loss
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 1, 6, 7, generator=g)
    sim = torch.ones(2, 8, 6, 7)
    box = torch.ones(2, 6, 7)
    torch.testing.assert_close(
        pairwise_loss(logits, sim, box, dilation=2), _unfold_pairwise(logits, sim, box, 0.3, 2), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("dilation", [1, 2])
def test_pairwise_loss_gradcheck_float64(dilation):
    g = torch.Generator().manual_seed(20 + dilation)
    logits = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    sim = torch.rand(2, 8, 5, 6, generator=g, dtype=torch.float64)
    box = (torch.rand(2, 5, 6, generator=g) > 0.4).double()
    assert torch.autograd.gradcheck(lambda z: pairwise_loss(z, sim, box, 0.3, dilation), (logits,))


def test_pairwise_loss_low_precision_inputs_compute_in_float32():
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 1, 6, 6, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    sim = torch.rand(2, 8, 6, 6, generator=g).to(torch.bfloat16)
    box = torch.ones(2, 6, 6, dtype=torch.bfloat16)
    loss = pairwise_loss(logits, sim, box)
    assert loss.dtype == torch.float32
    expected = _unfold_pairwise(logits.detach().float(), sim.float(), box.float(), 0.3, 2)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
    assert projection_loss(logits, box).dtype == torch.float32


def test_pairwise_loss_does_not_use_unfold(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pairwise_loss must not call F.unfold")

    monkeypatch.setattr(torch.nn.functional, "unfold", forbidden)
    logits = torch.randn(1, 1, 5, 5, requires_grad=True)
    pairwise_loss(logits, torch.ones(1, 8, 5, 5), torch.ones(1, 5, 5)).backward()
    assert logits.grad is not None


def test_pairwise_loss_extreme_logits_are_finite():
    logits = torch.tensor([80.0, -80.0, 80.0]).view(1, 1, 1, 3).requires_grad_()
    sim = torch.zeros(1, 8, 1, 3)
    sim[0, 4, 0, 0] = 1.0  # 0 -> 1: opposite confident labels, P_same ~ 2 e^-80, -log P_same ~ 80 - log 2
    loss = pairwise_loss(logits, sim, torch.ones(1, 1, 3), dilation=1)
    assert loss.item() == pytest.approx(80.0 - math.log(2.0), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # d/dz0 = sigmoid(80) - sigmoid(0) = 0.5, d/dz1 = sigmoid(-80) - sigmoid(0) = -0.5
    torch.testing.assert_close(logits.grad.view(3), torch.tensor([0.5, -0.5, 0.0]))


def test_pairwise_loss_empty_and_errors():
    logits = torch.zeros(0, 1, 4, 4, requires_grad=True)
    loss = pairwise_loss(logits, torch.zeros(0, 8, 4, 4), torch.zeros(0, 4, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="similarity must be"):
        pairwise_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 9, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="box_masks must be"):
        pairwise_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 8, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="dilation"):
        pairwise_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 8, 4, 4), torch.zeros(2, 4, 4), dilation=0)


# ---------------------------------------------------------------- warm-up


def test_pairwise_warmup_factor():
    assert pairwise_warmup_factor(0, 10000) == 0.0
    assert pairwise_warmup_factor(2500, 10000) == 0.25
    assert pairwise_warmup_factor(10000, 10000) == 1.0
    assert pairwise_warmup_factor(25000, 10000) == 1.0
    assert pairwise_warmup_factor(5, 0) == 1.0
    with pytest.raises(ValueError):
        pairwise_warmup_factor(-1, 100)
