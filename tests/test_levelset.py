"""Tests for boxmask.supervision.levelset: Chan-Vese energy, length term, BoxLevelSet loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from boxmask.supervision.levelset import chan_vese_energy, length_energy, levelset_loss, levelset_targets
from boxmask.supervision.tree_filter import grid_mst, tree_filter

torch.set_num_threads(1)


def _two_region_case(h: int = 10, w: int = 12):
    """Box rows 1..8, cols 1..10; inside it a 'object' (cols 1..5) of colour a and background of colour b."""
    box = torch.zeros(1, h, w)
    box[:, 1:9, 1:11] = 1.0
    obj = torch.zeros(1, h, w)
    obj[:, 1:9, 1:6] = 1.0
    a = torch.tensor([0.9, -0.3, 0.2])[:, None, None]
    b = torch.tensor([-0.5, 0.7, 1.1])[:, None, None]
    image = (obj * a + (1 - obj) * b)[None]  # [1, 3, h, w]
    return box, obj, image


# ------------------------------------------------------------------------ Chan-Vese energy


def test_constant_regions_give_zero_energy():
    box, obj, image = _two_region_case()
    image = image + 5.0 * (1 - box)[:, None]  # anything outside the box is ignored
    energy = chan_vese_energy(obj, image, box)
    assert energy.shape == (1,) and energy.dtype == torch.float32
    assert float(energy) == pytest.approx(0.0, abs=1e-7)


def test_correct_segmentation_has_lowest_energy():
    box, obj, image = _two_region_case()
    g = torch.Generator().manual_seed(0)
    image = image + 0.05 * torch.randn(image.shape, generator=g)
    shifted = torch.roll(obj, shifts=3, dims=2)
    candidates = {
        "correct": obj,
        "inverted": 1 - obj,  # Chan-Vese is symmetric in fg/bg: same energy
        "shifted": shifted,
        "half": torch.full_like(obj, 0.5),
        "soft_correct": 0.2 + 0.6 * obj,
    }
    e = {name: float(chan_vese_energy(p, image, box)) for name, p in candidates.items()}
    assert e["inverted"] == pytest.approx(e["correct"], rel=1e-5)
    assert e["correct"] < e["soft_correct"] < e["half"]
    assert e["correct"] < 0.1 * e["shifted"]
    assert e["correct"] < 0.1 * e["half"]


def test_chan_vese_hand_computed_1x4():
    # pixels I = [0, 1, 2, 3], box B = [1, 1, 1, 0], p = [1, 0.5, 0, 0.9]
    # u_f = pB = [1, .5, 0, 0], u_b = (1-p)B = [0, .5, 1, 0], I*B = [0, 1, 2, 0]
    # c1 = (0*1 + 1*.5) / 1.5 = 1/3,  c2 = (1*.5 + 2*1) / 1.5 = 5/3
    # fg: (0 - 1/3)^2 * 1 + (1 - 1/3)^2 * .5 = 1/9 + 2/9 = 1/3
    # bg: (1 - 5/3)^2 * .5 + (2 - 5/3)^2 * 1 = 2/9 + 1/9 = 1/3
    # E = (1/3 + 1/3) / C / sum(B) = (2/3) / 1 / 3 = 2/9
    probs = torch.tensor([[[1.0, 0.5, 0.0, 0.9]]])
    box = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    image = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])
    assert float(chan_vese_energy(probs, image, box)) == pytest.approx(2 / 9, rel=1e-6)
    # a second, constant channel adds no energy but halves the channel mean: (2/3 + 0) / 2 / 3 = 1/9
    two = torch.cat([image, torch.full_like(image, 5.0)], dim=1)
    assert float(chan_vese_energy(probs[:, None], two, box)) == pytest.approx(1 / 9, rel=1e-6)
    # length: u_f = [1, .5, 0, 0] -> |.5| + |.5| + 0 = 1;  u_b = [0, .5, 1, 0] -> .5 + .5 + 1 = 2;  (1 + 2) / 3 = 1
    assert float(length_energy(probs, box)) == pytest.approx(1.0, rel=1e-6)


def test_chan_vese_hand_computed_2x2_empty_foreground():
    # p = 0 everywhere: u_f = 0 so c1 = 0 / max(0, 1e-5) = 0 and the fg term vanishes;
    # box = all 4 pixels, I = [[1, 2], [3, 4]]: c2 = 10 / 4 = 2.5, bg = 2.25 + .25 + .25 + 2.25 = 5, E = 5 / 4
    probs = torch.zeros(1, 2, 2)
    box = torch.ones(1, 2, 2)
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert float(chan_vese_energy(probs, image, box)) == pytest.approx(1.25, rel=1e-6)


def test_outside_box_does_not_matter():
    g = torch.Generator().manual_seed(1)
    k, c, h, w = 3, 4, 9, 8
    box = torch.zeros(k, h, w)
    box[0, 2:7, 1:5] = 1
    box[1, 0:4, 3:8] = 1
    box[2, 5:9, 0:8] = 1
    probs = torch.rand(k, h, w, generator=g)
    target = torch.randn(k, c, h, w, generator=g)
    other_p = torch.where(box > 0, probs, torch.rand(k, h, w, generator=g))
    other_t = torch.where(box[:, None] > 0, target, torch.randn(k, c, h, w, generator=g))
    e = chan_vese_energy(probs, target, box)
    assert torch.allclose(chan_vese_energy(other_p, other_t, box), e, atol=1e-6)
    # the length term sees the box edge (u jumps to 0 outside) but not the values outside
    assert torch.allclose(length_energy(other_p, box), length_energy(probs, box), atol=1e-6)


def test_chan_vese_dtypes_and_shapes():
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(2, 1, 5, 6, generator=g)
    target = torch.randn(2, 3, 5, 6, generator=g)
    box = torch.ones(2, 5, 6)
    e32 = chan_vese_energy(probs, target, box)
    e_bf16 = chan_vese_energy(probs.bfloat16(), target.bfloat16(), box)
    assert e_bf16.dtype == torch.float32 and torch.allclose(e_bf16, e32, rtol=0.05)
    assert chan_vese_energy(probs.double(), target, box).dtype == torch.float64
    assert chan_vese_energy(probs[:0], target[:0], box[:0]).shape == (0,)
    with pytest.raises(ValueError):
        chan_vese_energy(probs, target[:, :, :4], box)
    with pytest.raises(ValueError):
        chan_vese_energy(probs, target, box[:1])
    with pytest.raises(ValueError):
        length_energy(probs, box[:, :4])


def test_chan_vese_and_length_gradcheck():
    g = torch.Generator().manual_seed(3)
    k, c, h, w = 2, 2, 4, 5
    box = torch.zeros(k, h, w, dtype=torch.float64)
    box[0, 1:4, 1:5] = 1
    box[1] = 1
    probs = (0.1 + 0.8 * torch.rand(k, h, w, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randn(k, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: chan_vese_energy(p, t, box), (probs, target))
    assert torch.autograd.gradcheck(lambda p: length_energy(p, box), (probs,))


# ------------------------------------------------------------------------ level-set loss


def _loss_inputs(seed: int = 4, k: int = 3, b: int = 2, h: int = 6, w: int = 7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, 1, h, w, generator=g, dtype=dtype)
    box = torch.zeros(k, h, w, dtype=dtype)
    for i in range(k):
        box[i, i % 2: h - 1, (i + 1) % 3: w - i % 2] = 1
    images = torch.randn(b, 3, h, w, generator=g, dtype=dtype)
    feats = torch.randn(b, 5, h, w, generator=g, dtype=dtype)
    im_inds = torch.arange(k) % b
    return logits, box, images, feats, im_inds


def test_levelset_loss_matches_its_definition():
    logits, box, images, feats, im_inds = _loss_inputs()
    loss = levelset_loss(logits, box, images, feats, im_inds, length_weight=1e-5)
    p = logits.sigmoid()
    f1 = tree_filter(p, images, grid_mst(images), 0.02, im_inds=im_inds)
    f2 = tree_filter(f1, feats, grid_mst(feats), 1.0, im_inds=im_inds)
    expected = (0.05 * chan_vese_energy(p, images[im_inds], box)
                + 5.0 * chan_vese_energy(p, torch.cat([f1, f2], 1) * box[:, None], box)
                + 1e-5 * length_energy(p, box)).mean()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    # per-image trees shared through im_inds == trees built on per-instance copies
    per_instance = levelset_loss(logits, box, images[im_inds], feats[im_inds])
    assert torch.allclose(levelset_loss(logits, box, images, feats, im_inds), per_instance, rtol=1e-5, atol=1e-7)
    # prebuilt trees give the same value
    prebuilt = levelset_loss(logits, box, images, feats, im_inds, image_tree=grid_mst(images),
                             feat_tree=grid_mst(feats))
    assert torch.allclose(prebuilt, per_instance, rtol=1e-5, atol=1e-7)
    # bf16 logits are computed in float32
    assert levelset_loss(logits.bfloat16(), box, images, feats, im_inds).dtype == torch.float32


def test_levelset_loss_resizes_image_and_features():
    logits, box, images, feats, im_inds = _loss_inputs(h=6, w=8)
    big_img = F.interpolate(images, size=(12, 16), mode="nearest")
    big_feat = F.interpolate(feats, size=(12, 16), mode="nearest")
    loss = levelset_loss(logits, box, big_img, big_feat, im_inds)
    ref = levelset_loss(logits, box, F.interpolate(big_img, size=(6, 8), mode="bilinear", align_corners=False),
                        F.interpolate(big_feat, size=(6, 8), mode="bilinear", align_corners=False), im_inds)
    assert torch.allclose(loss, ref, rtol=1e-6)


def test_levelset_loss_gradcheck():
    logits, box, images, feats, im_inds = _loss_inputs(seed=5, k=3, b=2, h=4, w=5, dtype=torch.float64)
    logits.requires_grad_(True)
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z, f: levelset_loss(z, box, images, f, im_inds, length_weight=0.0), (logits, feats)
    )
    # gradients reach the level-set features only through the high-level tree filter
    images.requires_grad_(True)
    levelset_loss(logits, box, images, feats, im_inds).backward()
    assert images.grad is None and feats.grad is not None and feats.grad.abs().sum() > 0


def test_levelset_targets_shapes():
    logits, box, images, feats, im_inds = _loss_inputs()
    f1, f2 = levelset_targets(logits.sigmoid(), images, feats, im_inds)
    assert f1.shape == f2.shape == (3, 1, 6, 7)
    assert (f1 >= 0).all() and (f1 <= 1).all()  # a normalised filter of probabilities stays in [0, 1]


def test_levelset_loss_empty_is_connected_zero():
    logits, box, images, feats, im_inds = _loss_inputs()
    z = logits[:0].clone().requires_grad_(True)
    f = feats.clone().requires_grad_(True)
    loss = levelset_loss(z, box[:0], images, f, im_inds[:0])
    assert loss.dim() == 0 and float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert f.grad is not None and float(f.grad.abs().sum()) == 0.0


def test_levelset_loss_shape_errors():
    logits, box, images, feats, im_inds = _loss_inputs()
    with pytest.raises(ValueError):
        levelset_loss(logits, box[:, :5], images, feats, im_inds)
    with pytest.raises(ValueError):
        levelset_loss(logits, box, images, feats)  # B = 2 != K = 3 without im_inds
    with pytest.raises(ValueError):
        levelset_loss(logits, box, images, feats, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        levelset_loss(logits, box, images, feats[:1], im_inds)
