"""Tests for boxmask.modeling.matrix_nms (SOLOv2 Matrix NMS, Eq. 4)."""

from __future__ import annotations

import math

import pytest
import torch

from boxmask.modeling.matrix_nms import mask_iou_matrix, matrix_nms

torch.set_num_threads(1)


def _strip(width: int, *spans: tuple[int, int]) -> torch.Tensor:
    """``[N, 1, width]`` bool masks, mask ``n`` filled on columns ``spans[n][0] .. spans[n][1] - 1``."""
    m = torch.zeros(len(spans), 1, width, dtype=torch.bool)
    for n, (a, b) in enumerate(spans):
        m[n, 0, a:b] = True
    return m


def _naive_matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """Eq. 4 written with loops over the score-sorted list (only same-class, higher-scored pairs)."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    flat = masks.reshape(n, -1).double()
    def iou(a, b):
        inter = float((flat[a] * flat[b]).sum())
        union = float(flat[a].sum() + flat[b].sum()) - inter
        return inter / union if union > 0 else 0.0
    f = (lambda x: math.exp(-sigma * x * x)) if kernel == "gaussian" else (lambda x: 1.0 - x)
    comp = {}
    for r, i in enumerate(order):
        comp[i] = max([iou(k, i) for k in order[:r] if labels[k] == labels[i]], default=0.0)
    out = torch.empty(n, dtype=torch.float64)
    for r, j in enumerate(order):
        decay = 1.0
        for i in order[:r]:
            if labels[i] == labels[j]:
                decay = min(decay, f(iou(i, j)) / f(comp[i]))
        out[j] = float(scores[j]) * decay
    return out


def test_iou_matrix_values_and_empty_pairs():
    masks = _strip(10, (0, 4), (2, 6), (0, 0), (0, 0))
    iou = mask_iou_matrix(masks)
    assert iou.dtype == torch.float32 and iou.shape == (4, 4)
    assert iou[0, 1].item() == pytest.approx(2 / 6)
    assert iou[0, 0].item() == pytest.approx(1.0)
    assert iou[2, 3].item() == 0.0 and not torch.isnan(iou).any()
    torch.testing.assert_close(iou, iou.T)


def test_duplicate_is_decayed_disjoint_and_other_class_unchanged():
    masks = _strip(20, (0, 5), (0, 5), (10, 15), (0, 5))
    labels = torch.tensor([0, 0, 0, 1])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    out = matrix_nms(masks, labels, scores)
    assert out[0].item() == pytest.approx(0.9)                       # top score: never decayed
    assert out[1].item() == pytest.approx(0.8 * math.exp(-2.0))      # exact duplicate, iou 1
    assert out[2].item() == pytest.approx(0.7)                       # disjoint
    assert out[3].item() == pytest.approx(0.6)                       # same pixels, other class


def test_two_masks_gaussian_hand_computed():
    masks = _strip(8, (0, 3), (1, 4))  # inter 2, union 4: iou 0.5
    out = matrix_nms(masks, torch.tensor([3, 3]), torch.tensor([0.5, 0.9]), sigma=2.0)
    # the second input is the higher-scored one: input order is kept in the output
    assert out[1].item() == pytest.approx(0.9)
    assert out[0].item() == pytest.approx(0.5 * math.exp(-2.0 * 0.25))
    out_s1 = matrix_nms(masks, torch.tensor([3, 3]), torch.tensor([0.5, 0.9]), sigma=1.0)
    assert out_s1[0].item() == pytest.approx(0.5 * math.exp(-0.25))


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_three_masks_with_compensation_hand_computed(kernel):
    # A cols 0-3, B cols 2-5, C cols 3-6: iou(A,B) = 2/6, iou(A,C) = 1/7, iou(B,C) = 3/5
    masks = _strip(10, (0, 4), (2, 6), (3, 7))
    labels = torch.tensor([1, 1, 1])
    scores = torch.tensor([0.9, 0.8, 0.7])
    a, b, c = 1 / 3, 1 / 7, 3 / 5
    out = matrix_nms(masks, labels, scores, kernel=kernel, sigma=2.0)
    if kernel == "gaussian":
        dec_b = math.exp(-2 * a * a)
        # C: min over A (comp 0) and B (comp a); B's compensation softens its suppression
        dec_c = min(math.exp(-2 * b * b), math.exp(-2 * (c * c - a * a)))
        assert dec_c == pytest.approx(math.exp(-2 * (c * c - a * a)))   # B wins the min here
        assert dec_c > math.exp(-2 * c * c)                              # compensation matters
    else:
        dec_b = 1 - a
        dec_c = min(1 - b, (1 - c) / (1 - a))
        assert dec_c == pytest.approx(0.6)
    torch.testing.assert_close(out, torch.tensor([0.9, 0.8 * dec_b, 0.7 * dec_c]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matches_loop_implementation_and_is_order_invariant(kernel):
    g = torch.Generator().manual_seed(0)
    n, h, w = 12, 9, 11
    # random rectangles so that IoUs span (0, 1)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(n):
        y0 = torch.randint(0, h - 2, (1,), generator=g).item()
        x0 = torch.randint(0, w - 2, (1,), generator=g).item()
        y1 = y0 + torch.randint(2, h - y0 + 1, (1,), generator=g).item()
        x1 = x0 + torch.randint(2, w - x0 + 1, (1,), generator=g).item()
        masks[k, y0:y1, x0:x1] = True
    labels = torch.randint(0, 2, (n,), generator=g)
    scores = torch.rand(n, generator=g) * 0.9 + 0.05
    out = matrix_nms(masks, labels, scores, kernel=kernel)
    ref = _naive_matrix_nms(masks, labels.tolist(), scores, kernel=kernel)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    assert (out <= scores + 1e-7).all() and (out >= 0).all()
    assert out[scores.argmax()].item() == pytest.approx(scores.max().item())
    perm = torch.randperm(n, generator=g)
    out_p = matrix_nms(masks[perm], labels[perm], scores[perm], kernel=kernel)
    torch.testing.assert_close(out_p, out[perm])
    # float masks and a given mask_area give the same result
    out_f = matrix_nms(masks.float(), labels, scores, kernel=kernel, mask_area=masks.sum((1, 2)).float())
    torch.testing.assert_close(out_f, out)


def test_linear_kernel_exact_duplicates_are_finite():
    masks = _strip(6, (0, 3), (0, 3), (0, 3))
    out = matrix_nms(masks, torch.zeros(3, dtype=torch.int64), torch.tensor([0.9, 0.8, 0.7]), kernel="linear")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.9, 0.0, 0.0]))


def test_ties_prefer_earlier_input():
    masks = _strip(6, (0, 3), (0, 3))
    out = matrix_nms(masks, torch.tensor([0, 0]), torch.tensor([0.5, 0.5]))
    assert out[0].item() == pytest.approx(0.5)
    assert out[1].item() == pytest.approx(0.5 * math.exp(-2.0))


def test_empty_input_and_errors():
    out = matrix_nms(torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert out.shape == (0,) and out.dtype == torch.float32
    masks = _strip(4, (0, 2))
    with pytest.raises(ValueError):
        matrix_nms(masks, torch.zeros(1, dtype=torch.int64), torch.ones(1), kernel="box")
    with pytest.raises(ValueError):
        matrix_nms(masks, torch.zeros(2, dtype=torch.int64), torch.ones(1))
    with pytest.raises(ValueError):
        matrix_nms(masks[0], torch.zeros(1, dtype=torch.int64), torch.ones(1))
    with pytest.raises(ValueError):
        matrix_nms(masks, torch.zeros(1, dtype=torch.int64), torch.ones(1), sigma=0.0)
