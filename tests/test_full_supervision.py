"""Tests for boxmask.supervision.full: GT masks at stride 4, dice loss, full and mixed supervision."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from boxmask.config import SupervisionConfig
from boxmask.methods import method_for
from boxmask.supervision.base import MaskInstances, SupervisionInputs
from boxmask.supervision.boxinst import BoxInstSupervision, box_masks_at_stride, projection_loss
from boxmask.supervision.full import FullMaskSupervision, MixedSupervision, dice_loss, gt_masks_at_stride
from helpers import tiny_cfg

torch.set_num_threads(1)

EPS = 1e-5


# ---------------------------------------------------------------- gt masks at stride


def test_gt_masks_at_stride_hand_case():
    # 5x6 image in an 8x8 padded batch, stride 4: samples at pixels (2,2) (2,6) (6,2) (6,6)
    m = torch.zeros(2, 5, 6, dtype=torch.bool)
    m[0, 2, 2] = True   # -> sample (0, 0)
    m[0, 3, 3] = True   # between samples: dropped
    m[1, 2, 5] = True   # x=5 is not a sample column
    m[1, 4, 2] = True   # y=4 is not a sample row
    out = gt_masks_at_stride([m], (8, 8), 4)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 2)
    assert out[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert out[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    full = torch.ones(1, 5, 6, dtype=torch.bool)
    # rows/cols 6 lie in the padding (image is 5x6): zero there
    assert gt_masks_at_stride([full], (8, 8), 4)[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    full7 = torch.ones(1, 7, 7, dtype=torch.bool)
    assert gt_masks_at_stride([full7], (8, 8), 4)[0].tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("hp,wp,stride", [(32, 40, 4), (37, 45, 4), (24, 16, 8), (9, 7, 1), (12, 10, 3)])
def test_gt_masks_at_stride_equals_pad_then_slice(hp, wp, stride):
    g = torch.Generator().manual_seed(hp * 7 + wp)
    sizes = [(hp, wp), (hp - 3, wp - 5), (hp // 2, wp)]
    masks = [torch.rand(n, h, w, generator=g) > 0.5 for n, (h, w) in zip((2, 0, 3), sizes)]
    ref = []
    for m in masks:
        padded = torch.zeros(m.shape[0], hp, wp)
        padded[:, : m.shape[1], : m.shape[2]] = m.float()
        ref.append(padded[:, stride // 2::stride, stride // 2::stride])
    assert torch.equal(gt_masks_at_stride(masks, (hp, wp), stride), torch.cat(ref))


def test_gt_masks_at_stride_errors():
    with pytest.raises(ValueError, match="exceeds the padded size"):
        gt_masks_at_stride([torch.zeros(1, 9, 8, dtype=torch.bool)], (8, 8))
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        gt_masks_at_stride([torch.zeros(8, 8, dtype=torch.bool)], (8, 8))
    assert gt_masks_at_stride([], (8, 12)).shape == (0, 2, 3)


# ---------------------------------------------------------------- dice


def test_dice_loss_hand_cases():
    logits = torch.zeros(3, 1, 2, 2)  # p = 0.5 everywhere: sum p^2 = 1
    targets = torch.zeros(3, 2, 2)
    targets[0, 0, 0] = 1  # sum pt = 0.5, sum t^2 = 1  -> 1 - 1 / (2 + eps)
    targets[1] = 1        # sum pt = 2,   sum t^2 = 4  -> 1 - 4 / (5 + eps)
    # targets[2] empty:    sum pt = 0                  -> 1
    out = dice_loss(logits, targets)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out.tolist() == pytest.approx([1 - 1 / (2 + EPS), 1 - 4 / (5 + EPS), 1.0], abs=1e-7)
    # a confident correct prediction has ~0 loss; the opposite prediction ~1
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert dice_loss((t * 2 - 1) * 30, t).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_loss((1 - 2 * t) * 30, t).item() == pytest.approx(1.0, abs=1e-5)
    # p = sigmoid(log 3) = 0.75 on a 1x2 map with target [1, 0]: 1 - 1.5 / (1.125 + 1 + eps)
    p_logit = math.log(3.0)
    out = dice_loss(torch.full((1, 1, 1, 2), p_logit), torch.tensor([[[1.0, 0.0]]]))
    assert out.item() == pytest.approx(1 - 1.5 / (2 * 0.75 ** 2 + 1 + EPS), rel=1e-6)


def test_dice_loss_fp32_from_half_and_shapes():
    logits = torch.zeros(2, 1, 3, 3, dtype=torch.bfloat16)
    assert dice_loss(logits, torch.ones(2, 3, 3, dtype=torch.bool)).dtype == torch.float32
    assert dice_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 4, 4)).shape == (0,)
    with pytest.raises(ValueError, match="targets shape"):
        dice_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 3, 4))


def test_dice_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(3, 4, 5, generator=g) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: dice_loss(x, targets), (logits,))


# ---------------------------------------------------------------- supervisions on a synthetic batch


def _synthetic(has_mask_flags, seed=0, requires_grad=False):
    """Two 32x32 images (padded 32x40), 2 + 1 GTs, 4 sampled instances (logits at stride 4)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(2, 3, 32, 40, dtype=torch.uint8)
    images[:, :, :32, :32] = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    images[0, :, 8:20, 4:24] = torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None]
    boxes = [torch.tensor([[4.0, 8.0, 23.0, 19.0], [0.0, 0.0, 15.0, 15.0]]), torch.tensor([[10.0, 6.0, 30.0, 28.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([0])]
    masks = [torch.zeros(2, 32, 32, dtype=torch.bool), torch.zeros(1, 32, 32, dtype=torch.bool)]
    masks[0][0, 8:20, 4:24] = True
    masks[0][1, 2:12, 3:14] = True
    masks[1][0, 10:25, 12:28] = True
    flags = iter(has_mask_flags)
    has_mask = [torch.tensor([next(flags), next(flags)]), torch.tensor([next(flags)])]
    inputs = SupervisionInputs(images=images, image_sizes=[(32, 32), (32, 32)], orig_sizes=[(64, 64), (64, 64)],
                               boxes=boxes, labels=labels, masks=masks, has_mask=has_mask)
    logits = torch.randn(4, 1, 8, 10, generator=g)
    logits.requires_grad_(requires_grad)
    inst = MaskInstances(logits, im_inds=torch.tensor([0, 0, 0, 1]), gt_inds=torch.tensor([0, 0, 1, 0]),
                         labels=torch.tensor([0, 0, 1, 0]), stride=4)
    return inst, inputs


CFG = SupervisionConfig(type="mixed", pairwise_warmup_iters=4, bottom_pixels_removed=0)


def _values(d):
    return {k: v.item() for k, v in d.items()}


def test_full_supervision_hand_computed():
    inst, inputs = _synthetic([True, True, True])
    out = FullMaskSupervision(CFG).losses(inst, inputs, step=0)
    assert set(out) == {"loss_mask"}
    gt = gt_masks_at_stride(inputs.masks, (32, 40), 4)  # GTs in batch order: img0 #0, img0 #1, img1 #0
    per = [dice_loss(inst.logits[i:i + 1], gt[j:j + 1]).item() for i, j in enumerate([0, 0, 1, 2])]
    assert out["loss_mask"].item() == pytest.approx(sum(per) / 4, rel=1e-6)
    # a logit map equal to +-30 x its own GT gives ~0 loss
    perfect = copy.copy(inst)
    perfect.logits = (gt[[0, 0, 1, 2]] * 60 - 30)[:, None]
    assert FullMaskSupervision(CFG).losses(perfect, inputs, 0)["loss_mask"].item() == pytest.approx(0, abs=1e-5)


def test_full_supervision_skips_instances_without_mask():
    inst, inputs = _synthetic([True, False, True])
    gt = gt_masks_at_stride(inputs.masks, (32, 40), 4)
    with pytest.warns(UserWarning, match="no mask annotation"):
        out = FullMaskSupervision(CFG).losses(inst, inputs, 0)
    # instance 2 (img0 GT #1) has no mask: mean over instances 0, 1, 3
    per = [dice_loss(inst.logits[i:i + 1], gt[j:j + 1]).item() for i, j in [(0, 0), (1, 0), (3, 2)]]
    assert out["loss_mask"].item() == pytest.approx(sum(per) / 3, rel=1e-6)


def test_mixed_hand_computed_normalisation():
    # instance 2 (img0 GT #1) and instance 3 (img1 GT #0) are box-only: K = 4, K_m = 2, K_b = 2
    inst, inputs = _synthetic([True, False, False])
    out = MixedSupervision(CFG).losses(inst, inputs, step=1)
    assert set(out) == {"loss_mask", "loss_proj", "loss_pairwise"}
    gt = gt_masks_at_stride(inputs.masks, (32, 40), 4)
    dice_sum = dice_loss(inst.logits[:2], gt[[0, 0]]).sum().item()
    assert out["loss_mask"].item() == pytest.approx(dice_sum / 4, rel=1e-6)
    bm = box_masks_at_stride(torch.cat(inputs.boxes), (32, 40), 4)
    proj_sum = projection_loss(inst.logits[2:], bm[[1, 2]]).item() * 2
    assert out["loss_proj"].item() == pytest.approx(proj_sum / 4, rel=1e-6)
    sub = MaskInstances(inst.logits[2:], inst.im_inds[2:], inst.gt_inds[2:], inst.labels[2:], 4)
    pair_b = BoxInstSupervision(CFG).losses(sub, inputs, 1)["loss_pairwise"].item()
    assert pair_b > 0
    assert out["loss_pairwise"].item() == pytest.approx(pair_b * 2 / 4, rel=1e-6)


def test_mixed_equals_full_when_all_have_masks():
    inst, inputs = _synthetic([True, True, True], seed=3)
    mixed = _values(MixedSupervision(CFG).losses(inst, inputs, 7))
    full = _values(FullMaskSupervision(CFG).losses(inst, inputs, 7))
    assert mixed["loss_mask"] == full["loss_mask"] > 0
    assert mixed["loss_proj"] == 0.0 and mixed["loss_pairwise"] == 0.0


def test_mixed_equals_boxinst_when_none_has_a_mask():
    inst, inputs = _synthetic([False, False, False], seed=4)
    mixed = _values(MixedSupervision(CFG).losses(inst, inputs, 2))
    box = _values(BoxInstSupervision(CFG).losses(inst, inputs, 2))
    assert mixed["loss_proj"] == box["loss_proj"] > 0
    assert mixed["loss_pairwise"] == box["loss_pairwise"] > 0
    assert mixed["loss_mask"] == 0.0


def test_mixed_gradients_split_per_instance():
    inst, inputs = _synthetic([True, False, True], seed=5, requires_grad=True)
    out = MixedSupervision(CFG).losses(inst, inputs, 3)
    sum(out.values()).backward()
    grad = inst.logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    # masked instances 0, 1, 3 get exactly (3/4) x the full-supervision gradient of the same batch
    logits_full = inst.logits.detach().clone().requires_grad_(True)
    full_inst = MaskInstances(logits_full, inst.im_inds, inst.gt_inds, inst.labels, 4)
    with pytest.warns(UserWarning, match="no mask annotation"):
        FullMaskSupervision(CFG).losses(full_inst, inputs, 3)["loss_mask"].backward()
    for i in (0, 1, 3):
        assert torch.allclose(grad[i], logits_full.grad[i] * 3 / 4, atol=1e-7)
    # the box-only instance 2 gets the BoxInst gradient scaled by K_b / K = 1/4, and no dice gradient
    logits_box = inst.logits.detach()[2:3].clone().requires_grad_(True)
    sub = MaskInstances(logits_box, inst.im_inds[2:3], inst.gt_inds[2:3], inst.labels[2:3], 4)
    sum(BoxInstSupervision(CFG).losses(sub, inputs, 3).values()).backward()
    assert torch.allclose(grad[2], logits_box.grad[0] / 4, atol=1e-7)
    assert grad[2].abs().sum() > 0


def test_empty_instances_give_connected_zeros():
    inst, inputs = _synthetic([True, False, True], requires_grad=True)
    empty = MaskInstances(inst.logits[:0], inst.im_inds[:0], inst.gt_inds[:0], inst.labels[:0], 4)
    for sup in (FullMaskSupervision(CFG), MixedSupervision(CFG)):
        out = sup.losses(empty, inputs, 0)
        assert all(v.item() == 0.0 and v.requires_grad for v in out.values())
    assert set(MixedSupervision(CFG).losses(empty, inputs, 0)) == {"loss_mask", "loss_proj", "loss_pairwise"}


def test_missing_masks_raise():
    inst, inputs = _synthetic([True, True, True])
    no_masks = copy.copy(inputs)
    no_masks.masks = None
    for sup in (FullMaskSupervision(CFG), MixedSupervision(CFG)):
        with pytest.raises(ValueError, match="masks is None"):
            sup.losses(inst, no_masks, 0)
    wrong = copy.copy(inputs)
    wrong.masks = [inputs.masks[0][:1], inputs.masks[1]]
    with pytest.raises(ValueError, match="image 0: masks of shape"):
        FullMaskSupervision(CFG).losses(inst, wrong, 0)


def test_mask_methods_build_their_supervision_and_read_masks(tmp_path):
    full = method_for(tiny_cfg(tmp_path, "supervision.type=full"), 1)
    mixed = method_for(tiny_cfg(tmp_path, "supervision.type=mixed"), 1)
    assert isinstance(full.supervision, FullMaskSupervision) and isinstance(mixed.supervision, MixedSupervision)
    assert full.reads_gt_masks and mixed.reads_gt_masks
    assert not method_for(tiny_cfg(tmp_path), 1).reads_gt_masks


# ---------------------------------------------------------------- integration with the model


def test_full_supervision_reads_the_real_masks(tmp_path, garbage_masks):
    """The opposite of the box-supervised guarantee: garbage masks change loss_mask (and nothing else)."""
    from helpers import sample_batch

    from boxmask.engine.module import BoxMaskModule, supervision_inputs

    cfg = tiny_cfg(tmp_path, "supervision.type=full")
    torch.manual_seed(0)
    module = BoxMaskModule(cfg.to_dict(), ["nucleus"], [1])
    assert isinstance(module.supervision, FullMaskSupervision)
    module.model.eval()  # fixed BN statistics so two forward passes are comparable
    batch = sample_batch(load_masks=True)
    garbage = garbage_masks(batch)
    losses = []
    with torch.no_grad():
        for b in (batch, garbage):
            inputs = supervision_inputs(b, module.method.reads_gt_masks)
            assert inputs.masks is not None
            out = module.compute_losses(inputs, 5)
            losses.append({k: v.item() for k, v in out.items()})
    real, bad = losses
    assert "loss_mask" in real and "loss_proj" not in real
    assert math.isfinite(real["loss_mask"]) and 0 < real["loss_mask"] <= 1
    assert abs(real["loss_mask"] - bad["loss_mask"]) > 1e-4
    for k in real:
        if k != "loss_mask":
            assert real[k] == bad[k], k
