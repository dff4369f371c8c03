"""Tests for boxmask.supervision.sim: Sinkhorn, teacher EMA, prototypes, SIM maps, pseudo masks and loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from boxmask.supervision.sim import (
    adaptive_high_threshold,
    ema_update_,
    hard_assignment,
    init_prototypes,
    instance_map,
    iou_weights,
    pseudo_mask_loss,
    pseudo_mask_targets,
    semantic_map,
    sinkhorn_knopp,
    update_prototypes,
)

torch.set_num_threads(1)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _cosine_logits(n: int, num_protos: int, g: torch.Generator, dim: int = 16) -> torch.Tensor:
    z = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    p = F.normalize(torch.randn(num_protos, dim, generator=g), dim=1)
    return z @ p.T


def _reference_sinkhorn(logits: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The code's exp-domain algorithm in the paper's [L, N] layout, float64 (fine for cosine logits)."""
    q = torch.exp(logits.double() / eps).T
    num_protos, n = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / num_protos
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).T


# ------------------------------------------------------------------------------------------ Sinkhorn


@pytest.mark.parametrize("n,num_protos", [(1, 10), (7, 3), (50, 10), (300, 10), (3, 10), (40, 1)])
def test_sinkhorn_plan_has_uniform_marginals(n, num_protos):
    g = torch.Generator().manual_seed(n * 100 + num_protos)
    logits = _cosine_logits(n, num_protos, g)
    plan = sinkhorn_knopp(logits, epsilon=0.05, iterations=100, return_plan=True)
    assert plan.shape == (n, num_protos) and plan.dtype == torch.float32
    assert torch.allclose(plan.sum(dim=0), torch.full((num_protos,), 1.0 / num_protos), atol=1e-4, rtol=0)
    assert torch.allclose(plan.sum(dim=1), torch.full((n,), 1.0 / n), atol=1e-4, rtol=0)
    assert float(plan.sum()) == pytest.approx(1.0, abs=1e-5)


def test_sinkhorn_marginals_on_raw_random_logits():
    g = torch.Generator().manual_seed(3)
    for n, num_protos in [(20, 5), (64, 10)]:
        logits = torch.randn(n, num_protos, generator=g)
        plan = sinkhorn_knopp(logits, epsilon=0.5, iterations=200, return_plan=True)
        assert torch.allclose(plan.sum(dim=0), torch.full((num_protos,), 1.0 / num_protos), atol=1e-4, rtol=0)
        assert torch.allclose(plan.sum(dim=1), torch.full((n,), 1.0 / n), atol=1e-4, rtol=0)


def test_sinkhorn_three_iterations_matches_reference_and_pixel_marginals_exact():
    g = torch.Generator().manual_seed(1)
    logits = _cosine_logits(37, 10, g).double()
    q = sinkhorn_knopp(logits, 0.05, 3)
    assert q.dtype == torch.float64
    assert torch.allclose(q, _reference_sinkhorn(logits, 0.05, 3), atol=1e-12, rtol=1e-9)
    assert torch.allclose(q.sum(dim=1), torch.ones(37, dtype=torch.float64), atol=1e-12)
    plan = sinkhorn_knopp(logits, 0.05, 3, return_plan=True)
    assert torch.allclose(plan.sum(dim=1), torch.full((37,), 1 / 37, dtype=torch.float64), atol=1e-12)
    # the prototype marginals approach 1/L as iterations grow
    errs = [float((sinkhorn_knopp(logits, 0.05, it, return_plan=True).sum(0) - 0.1).abs().max()) for it in (1, 3, 10)]
    assert errs[0] > errs[1] > errs[2]


def test_sinkhorn_stable_and_edge_cases():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(30, 4, generator=g) * 1000.0  # exponents ~ 2e4 / 0.05: exp() would overflow
    q = sinkhorn_knopp(logits, 0.05, 3)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(dim=1), torch.ones(30), atol=1e-5)
    q0 = sinkhorn_knopp(torch.zeros(5, 3), 0.05, iterations=0)  # no iterations: rows still sum to 1
    assert torch.allclose(q0, torch.full((5, 3), 1.0 / 3))
    assert sinkhorn_knopp(torch.zeros(0, 10)).shape == (0, 10)
    assert sinkhorn_knopp(torch.zeros(0, 10), return_plan=True).shape == (0, 10)
    assert sinkhorn_knopp(torch.randn(4, 3, dtype=torch.bfloat16)).dtype == torch.float32


def test_sinkhorn_bad_inputs():
    with pytest.raises(ValueError, match="sinkhorn_knopp"):
        sinkhorn_knopp(torch.zeros(5))
    with pytest.raises(ValueError, match="L >= 1"):
        sinkhorn_knopp(torch.zeros(5, 0))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(5, 3), epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.zeros(5, 3), iterations=-1)


# ------------------------------------------------------------------------------------ hard assignment


def test_hard_assignment_argmax_and_gumbel():
    q = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]])
    idx = hard_assignment(q)
    assert idx.dtype == torch.int64 and idx.tolist() == [1, 0, 2]
    assert hard_assignment(torch.zeros(0, 3)).shape == (0,)
    # Gumbel variant: reproducible with a generator, ~uniform on a uniform q, argmax on a peaked q
    flat = torch.full((4000, 4), 0.25)
    a = hard_assignment(flat, gumbel_tau=0.5, generator=torch.Generator().manual_seed(0))
    b = hard_assignment(flat, gumbel_tau=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.int64
    counts = torch.bincount(a, minlength=4)
    assert counts.min() > 850 and counts.max() < 1150
    peaked = torch.tensor([[0.0, 100.0, 0.0]]).repeat(50, 1)
    assert (hard_assignment(peaked, 0.5, torch.Generator().manual_seed(1)) == 1).all()
    with pytest.raises(ValueError, match="gumbel_tau"):
        hard_assignment(q, gumbel_tau=0.0)
    with pytest.raises(ValueError, match="hard_assignment"):
        hard_assignment(torch.zeros(3))


# ---------------------------------------------------------------------------------------------- EMA


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_update_equals_formula_and_copies_buffers():
    torch.manual_seed(0)
    teacher, student = _tiny_net(), _tiny_net()
    # dyadic values with m = 0.75: every product and sum is exact in float32, so any order of ops agrees
    with torch.no_grad():
        for p in list(teacher.parameters()) + list(student.parameters()):
            p.copy_(torch.randint(-16, 16, p.shape).float() / 4)
    student.train()
    student(torch.randn(5, 3))  # moves the student's running stats and num_batches_tracked
    t_before = {k: v.clone() for k, v in teacher.named_parameters()}
    s_params = dict(student.named_parameters())
    ema_update_(teacher, student, momentum=0.75)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, 0.75 * t_before[name] + 0.25 * s_params[name]), name
        assert p.requires_grad and p.grad is None and p.grad_fn is None
    for (name, tb), (_, sb) in zip(teacher.named_buffers(), student.named_buffers()):
        assert torch.equal(tb, sb), name
    assert int(teacher[1].num_batches_tracked) == 1


def test_ema_update_default_momentum_and_extremes():
    torch.manual_seed(1)
    teacher, student = _tiny_net(), _tiny_net()
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student)
    for p, p0, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(p.detach(), 0.9999 * p0 + 0.0001 * s.detach(), rtol=0, atol=1e-7)
    ema_update_(teacher, student, momentum=0.0)
    for p, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(p, s)


def test_ema_update_rejects_mismatch_without_writing():
    teacher, student = _tiny_net(), _tiny_net()
    before = [p.detach().clone() for p in teacher.parameters()]
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="shape"):
        ema_update_(teacher, other)
    with pytest.raises(ValueError, match="names differ"):
        ema_update_(teacher, nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(teacher, student, momentum=1.5)
    for p, p0 in zip(teacher.parameters(), before):
        assert torch.equal(p, p0)


# ---------------------------------------------------------------------------------------- prototypes


def test_init_prototypes_unit_norm_along_d():
    protos = init_prototypes(3, 10, 16, generator=torch.Generator().manual_seed(0))
    assert protos.shape == (3, 10, 16) and protos.dtype == torch.float32 and not protos.requires_grad
    assert torch.allclose(protos.norm(dim=2), torch.ones(3, 10), atol=1e-5)
    again = init_prototypes(3, 10, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(protos, again)
    with pytest.raises(ValueError, match="init_prototypes"):
        init_prototypes(0)


def test_update_keeps_unit_norm_and_untouched_prototypes():
    g = torch.Generator().manual_seed(0)
    protos = init_prototypes(3, 10, 16, generator=g)
    for _ in range(5):
        feats = torch.randn(60, 16, generator=g)
        labels = torch.randint(0, 2, (60,), generator=g) * 2  # classes 0 and 2; class 1 never present
        new = update_prototypes(protos, feats, labels, momentum=0.9)
        assert new.shape == protos.shape and not new.requires_grad
        assert torch.allclose(new.norm(dim=2), torch.ones(3, 10), atol=1e-5)  # along D, not along L
        assert torch.equal(new[1], protos[1])
        assert not torch.equal(new[0], protos[0])
        protos = new
    # N < L: at most N prototypes get a pixel; the others are returned bit-identical
    feats = torch.randn(2, 16, generator=g)
    new = update_prototypes(protos, feats, torch.tensor([0, 0]), momentum=0.5)
    changed = (new[0] != protos[0]).any(dim=1)
    assert 1 <= int(changed.sum()) <= 2
    assert torch.equal(new[0, ~changed], protos[0, ~changed])
    # no pixels: nothing moves
    assert torch.equal(update_prototypes(protos, torch.zeros(0, 16), torch.zeros(0, dtype=torch.long)), protos)


def test_prototype_moves_toward_its_pixels():
    dim, num_protos = 8, 3
    eye = torch.eye(dim)
    protos = torch.stack([eye[:num_protos], F.normalize(torch.ones(num_protos, dim), dim=1)])  # [2, 3, 8]
    g = torch.Generator().manual_seed(5)
    # 4 pixels near each of e0, e1, e2 (balanced, so the equipartition keeps the natural assignment)
    feats, centroids = [], []
    for lidx in range(num_protos):
        f = eye[lidx] + 0.3 * eye[3 + lidx] + 0.05 * torch.randn(4, dim, generator=g)
        feats.append(f)
        centroids.append(F.normalize(F.normalize(f, dim=1).sum(0), dim=0))
    feats = torch.cat(feats)
    new = update_prototypes(protos, feats, torch.zeros(12, dtype=torch.long), momentum=0.5)
    for lidx in range(num_protos):
        before = float(protos[0, lidx] @ centroids[lidx])
        after = float(new[0, lidx] @ centroids[lidx])
        assert after > before + 0.01
        expected = F.normalize(0.5 * protos[0, lidx] + 0.5 * centroids[lidx], dim=0)
        assert torch.allclose(new[0, lidx], expected, atol=1e-6)
    assert torch.equal(new[1], protos[1])
    # centroid_feats (code: student features) replace the averaged features, not the assignment
    other = -feats
    new2 = update_prototypes(protos, feats, torch.zeros(12, dtype=torch.long), momentum=0.0, centroid_feats=other)
    for lidx in range(num_protos):
        assert torch.allclose(new2[0, lidx], -centroids[lidx], atol=1e-6)


def test_update_prototypes_bad_inputs():
    protos = init_prototypes(2, 4, 8)
    with pytest.raises(ValueError, match="feats"):
        update_prototypes(protos, torch.zeros(5, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        update_prototypes(protos, torch.zeros(5, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        update_prototypes(protos, torch.zeros(5, 8), torch.full((5,), 2))
    with pytest.raises(ValueError, match="prototypes"):
        update_prototypes(protos[0], torch.zeros(5, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="momentum"):
        update_prototypes(protos, torch.zeros(5, 8), torch.zeros(5, dtype=torch.long), momentum=-0.1)


# ---------------------------------------------------------------------------------------- semantic map


def test_semantic_map_hand_case():
    feats = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 3)
    protos = torch.tensor([[[2.0, 4.0, 4.0], [0.0, 0.0, 1.0]]])  # p0 has the direction of pixel 0
    m = semantic_map(feats, protos, temperature=0.1)
    assert m.shape == (1, 1, 3) and m.dtype == torch.float32
    expected = torch.tensor([_sig(10.0), _sig(-20.0 / 3), _sig(20.0 / 3)]).reshape(1, 1, 3)
    assert torch.allclose(m, expected, atol=1e-6)
    code = semantic_map(feats, protos, temperature=None)
    assert torch.allclose(code, torch.tensor([_sig(1.0), _sig(-2 / 3), _sig(2 / 3)]).reshape(1, 1, 3), atol=1e-6)
    # features scaled per pixel give the same map (cosine)
    assert torch.allclose(semantic_map(feats * 7.0, protos), m, atol=1e-6)


def test_semantic_map_bad_inputs():
    with pytest.raises(ValueError, match="feats"):
        semantic_map(torch.zeros(2, 3, 4), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="prototypes_of_class"):
        semantic_map(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="temperature"):
        semantic_map(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 3), temperature=0.0)


# ---------------------------------------------------------------------------------------- instance map


def test_iou_weights_hand_and_torchvision():
    gt = torch.tensor([[0.0, 0, 10, 10]] * 3 + [[20.0, 20, 40, 40]] * 2)
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 40, 40], [50, 50, 60, 60]])
    w = iou_weights(pred, gt)
    expected = torch.tensor([math.exp(5.0), math.exp(2.5), math.exp(5.0 / 3), math.exp(5.0), 1.0])
    assert torch.allclose(w, expected, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 30], 1)
    xy = torch.rand(20, 2, generator=g) * 50
    b = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 30], 1)
    assert torch.allclose(iou_weights(a, b, mu=1.0), box_iou(a, b).diagonal().exp(), rtol=1e-5)
    assert float(iou_weights(torch.zeros(1, 4), torch.zeros(1, 4))) == 1.0  # zero union -> IoU 0
    with pytest.raises(ValueError, match="iou_weights"):
        iou_weights(torch.zeros(3, 4), torch.zeros(2, 4))


def test_instance_map_weighted_hand_case():
    gt = torch.tensor([[0.0, 0, 10, 10]] * 3 + [[20.0, 20, 40, 40]] * 2 + [[0.0, 0, 10, 10]])
    pred = torch.tensor(
        [[0.0, 0, 10, 10], [0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 40, 40], [50, 50, 60, 60], [0, 0, 10, 10]]
    )
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.3, 0.6]])[:, None, :]
    gt_inds = torch.tensor([0, 0, 0, 1, 1, 0])
    im_inds = torch.tensor([0, 0, 0, 0, 0, 1])  # the last positive: same GT index, other image
    m = instance_map(probs, gt_inds, im_inds, iou_weights(pred, gt, mu=5.0))
    assert m.shape == (6, 1, 2) and m.dtype == torch.float32
    w0, w1, w2 = math.exp(5), math.exp(2.5), math.exp(5 / 3)
    s = w0 + w1 + w2
    g0 = torch.tensor([(w0 + 0.5 * w2) / s, (w1 + 0.5 * w2) / s])
    g1 = (math.exp(5) * torch.tensor([0.2, 0.8]) + torch.tensor([0.9, 0.1])) / (math.exp(5) + 1)
    expected = torch.stack([g0, g0, g0, g1, g1, torch.tensor([0.3, 0.6])])[:, None, :]
    assert torch.allclose(m, expected, atol=1e-6)
    # code: plain mean
    plain = instance_map(probs[:, :, None], gt_inds, im_inds)  # [K, 1, h, w] input accepted
    assert plain.shape == (6, 1, 2)
    assert torch.allclose(plain[0, 0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(plain[3, 0], torch.tensor([0.55, 0.45]))
    assert torch.allclose(plain[5, 0], torch.tensor([0.3, 0.6]))
    empty = torch.zeros(0, dtype=torch.long)
    assert instance_map(torch.zeros(0, 4, 4), empty, empty).shape == (0, 4, 4)


def test_instance_map_bad_inputs():
    probs = torch.rand(3, 4, 4)
    idx = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="gt_inds"):
        instance_map(probs, torch.zeros(2, dtype=torch.long), idx)
    with pytest.raises(ValueError, match="integer"):
        instance_map(probs, idx, torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        instance_map(probs, idx, idx, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="probs"):
        instance_map(torch.rand(3, 2, 4, 4), idx, idx)


# ------------------------------------------------------------------------------- thresholds / pseudo masks


def _threshold_case():
    box = torch.tensor([1.0, 1, 1, 1, 1, 0]).expand(4, 6)[:, None, :].clone()  # [4, 1, 6]: last pixel outside
    m_prob = torch.tensor(
        [
            [0.95, 0.90, 0.76, 0.50, 0.30, 0.99],  # n = 2 -> 3rd largest in-box value 0.76
            [0.90, 0.74, 0.72, 0.20, 0.10, 0.50],  # n = 1 -> 0.74; GT mean 0.75
            [0.71, 0.65, 0.30, 0.90, 0.40, 0.95],  # n = 5 -> index 5 = 0 (outside box) -> clamp 0.7
            [0.99, 0.79, 0.81, 0.10, 0.50, 0.20],  # n = 0 -> max 0.99 -> clamp 0.8
        ]
    )[:, None, :]
    m_inst = torch.tensor(
        [
            [0.80, 0.75, 0.60, 0.20, 0.10, 0.90],
            [0.72, 0.30, 0.20, 0.10, 0.00, 0.00],
            [0.90, 0.90, 0.90, 0.90, 0.90, 0.90],
            [0.00, 0.00, 0.00, 0.00, 0.00, 0.00],
        ]
    )[:, None, :]
    gt_inds = torch.tensor([0, 0, 1, 0])
    im_inds = torch.tensor([0, 0, 0, 1])
    return m_prob, m_inst, box, gt_inds, im_inds


def test_adaptive_threshold_hand_case():
    m_prob, m_inst, box, gt_inds, im_inds = _threshold_case()
    tau = adaptive_high_threshold(m_prob, m_inst, box, gt_inds, im_inds)
    assert torch.allclose(tau, torch.tensor([0.75, 0.75, 0.70, 0.80]), atol=1e-6)
    # the index n is clamped to the last element when every pixel is confident
    full = torch.ones(1, 1, 2)
    zero = torch.tensor([0])
    tau = adaptive_high_threshold(torch.tensor([[[0.9, 0.75]]]), full * 0.9, full, zero, zero)
    assert torch.allclose(tau, torch.tensor([0.75]))


def test_pseudo_mask_targets_hand_case():
    m_prob, m_inst, box, gt_inds, im_inds = _threshold_case()
    target, valid = pseudo_mask_targets(m_prob, m_inst, box, gt_inds, im_inds)
    assert target.shape == (4, 1, 6) and target.dtype == torch.float32 and valid.dtype == torch.bool
    expected_target = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0]], dtype=torch.float32
    )[:, None, :]
    expected_valid = torch.tensor(
        [[1, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0], [1, 0, 1, 1, 0, 0]], dtype=torch.bool
    )[:, None, :]
    assert torch.equal(target, expected_target)
    assert torch.equal(valid, expected_valid)
    assert bool((target <= valid.float()).all())


def test_pseudo_mask_targets_bad_inputs():
    m_prob, m_inst, box, gt_inds, im_inds = _threshold_case()
    with pytest.raises(ValueError, match="box_masks"):
        pseudo_mask_targets(m_prob, m_inst, box[:, :, :5], gt_inds, im_inds)
    with pytest.raises(ValueError, match="m_inst"):
        pseudo_mask_targets(m_prob, m_inst[:3], box, gt_inds, im_inds)
    with pytest.raises(ValueError, match="high_range"):
        pseudo_mask_targets(m_prob, m_inst, box, gt_inds, im_inds, high_range=(0.8, 0.7))
    with pytest.raises(ValueError, match="im_inds"):
        pseudo_mask_targets(m_prob, m_inst, box, gt_inds, im_inds[:2])


# ------------------------------------------------------------------------------------------------- loss


def _loss_case():
    # pixel 0: p = 0.5, t = 1; pixel 1: p = 0.75, t = 0; pixel 2: ignored
    logits = torch.tensor([[[0.0, math.log(3.0), 2.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0, 1.0]]])
    valid = torch.tensor([[[True, True, False]]])
    return logits, target, valid


def test_pseudo_mask_loss_paper_hand_value():
    logits, target, valid = _loss_case()
    loss = pseudo_mask_loss(logits, target, valid)
    bce = (math.log(2.0) + math.log(4.0)) / 2
    dice = 1.0 - 2 * 0.5 / (0.25 + 0.5625 + 1.0 + 1e-5)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(bce + dice, rel=1e-5)
    # a second instance without valid pixels contributes 0 to the mean over K
    logits2 = torch.cat([logits, torch.randn(1, 1, 3)])
    valid2 = torch.cat([valid, torch.zeros_like(valid)])
    loss2 = pseudo_mask_loss(logits2[:, None], torch.cat([target, target]), valid2)
    assert loss2.item() == pytest.approx((bce + dice) / 2, rel=1e-5)


def test_pseudo_mask_loss_code_hand_value():
    logits, target, valid = _loss_case()
    loss = pseudo_mask_loss(logits, target, valid, mode="code")
    px0 = 0.25 * 0.5**2 * math.log(2.0)
    px1 = 0.75 * 0.75**2 * math.log(4.0)
    assert loss.item() == pytest.approx((px0 + px1) / (2 + 1), rel=1e-5)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_pseudo_mask_loss_ignores_invalid_pixels_and_has_finite_grads(mode):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 1, 5, 6, generator=g) * 4).requires_grad_()
    target = (torch.rand(3, 5, 6, generator=g) > 0.5).float()
    valid = torch.rand(3, 5, 6, generator=g) > 0.4
    loss = pseudo_mask_loss(logits, target, valid, mode=mode)
    loss.backward()
    grad = logits.grad[:, 0]
    assert torch.isfinite(grad).all() and (grad[~valid] == 0).all() and grad[valid].abs().sum() > 0
    changed = logits.detach().clone()
    changed[:, 0][~valid] = torch.randn(int((~valid).sum()), generator=g) * 50
    assert float(pseudo_mask_loss(changed, target, valid, mode=mode)) == pytest.approx(loss.item(), rel=1e-6)
    extreme = torch.tensor([[[100.0, -100.0], [-100.0, 100.0]]], requires_grad=True)
    extreme_target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    out = pseudo_mask_loss(extreme, extreme_target, torch.ones(1, 2, 2, dtype=torch.bool), mode)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(extreme.grad).all()


def test_pseudo_mask_loss_empty_and_bad_inputs():
    logits = torch.zeros(0, 1, 4, 4, requires_grad=True)
    loss = pseudo_mask_loss(logits, torch.zeros(0, 4, 4), torch.zeros(0, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    x = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="target"):
        pseudo_mask_loss(x, torch.zeros(2, 4, 5), torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        pseudo_mask_loss(x, x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode"):
        pseudo_mask_loss(x, x, x.bool(), mode="focal")
    with pytest.raises(ValueError, match="mask_logits"):
        pseudo_mask_loss(torch.zeros(2, 2, 4, 4), x, x.bool())
