"""Tests for the Box2Mask-T losses of boxmask.supervision.box2mask (methods.md §4.2-4.3): the box-supervised
Box2MaskTSupervision over every prediction set of a query-based network, and the mask-supervised reference
Box2MaskTFullSupervision."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from boxmask.structures import QueryOutputs, SupervisionInputs
from boxmask.supervision.box2mask import (Box2MaskTConfig, Box2MaskTFullSupervision, Box2MaskTSupervision,
                                          match_queries_to_masks)

torch.set_num_threads(1)
# float() of a loss that requires grad is fine in these checks
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")

B, Q, C, SETS, SIZE, STRIDE = 2, 5, 3, 3, 64, 4
H = W = SIZE // STRIDE
BIG = 30.0  # sigmoid(BIG) == 1.0 and sigmoid(-BIG) ~ 1e-13 in float32
KEYS = {"loss_ce", "loss_proj", "loss_levelset"}
FULL_KEYS = {"loss_ce", "loss_mask_bce", "loss_mask_dice"}
# box covering full-res pixels 8..23: its bilinear stride-4 mask is exactly cells 2..5 (samples at 4i+1.5)
GRID_BOX = [8.0, 8.0, 23.5, 23.5]


def _box_cells(y0=2, y1=6, x0=2, x1=6, value=BIG) -> torch.Tensor:
    """Logit map [H, W]: +value on cells [y0:y1, x0:x1], -value elsewhere."""
    m = torch.full((H, W), -value)
    m[y0:y1, x0:x1] = value
    return m


def _outputs(seed: int = 0, batch: int = B, queries: int = Q, classes: int = C, sets: int = SETS,
             dtype=torch.float32) -> QueryOutputs:
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(batch, queries, classes + 1, generator=g).to(dtype).requires_grad_() for _ in range(sets)]
    msk = [(3 * torch.randn(batch, queries, H, W, generator=g)).to(dtype).requires_grad_() for _ in range(sets)]
    feats = torch.randn(batch, 1, H, W, generator=g).to(dtype).requires_grad_()
    anchor = torch.zeros((), requires_grad=True)
    return QueryOutputs(class_logits=cls, mask_logits=msk, anchor=anchor, stride=STRIDE, level_set_feats=feats)


def _inputs(seed: int = 0, boxes=None, labels=None, images=None) -> SupervisionInputs:
    g = torch.Generator().manual_seed(seed)
    if boxes is None:
        boxes = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 22.0, 60.0, 62.0]]),
                 torch.tensor([[10.0, 10.0, 50.0, 40.0]])]
        labels = [torch.tensor([0, 2]), torch.tensor([1])]
    n = len(boxes)
    if images is None:
        images = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    return SupervisionInputs(images=images, image_sizes=[(SIZE, SIZE)] * n, orig_sizes=[(SIZE, SIZE)] * n,
                             boxes=boxes, labels=labels)


def _single(class_logits, mask_logits, feats=None) -> QueryOutputs:
    """One image, one prediction set, from [Q, C+1] class logits and [Q, H, W] mask logits."""
    if feats is None:
        feats = torch.zeros(1, 1, H, W)
    return QueryOutputs(class_logits=[class_logits[None].clone().requires_grad_()],
                        mask_logits=[mask_logits[None].clone().requires_grad_()],
                        anchor=torch.zeros(()), stride=STRIDE, level_set_feats=feats)


def _box_image(inside: int = 200, outside: int = 20) -> torch.Tensor:
    img = torch.full((1, 3, SIZE, SIZE), outside, dtype=torch.uint8)
    img[..., 8:24, 8:24] = inside
    return img


class _Exploding:
    """Stands in for GT masks: any use raises, so a supervision that touches them fails."""

    def _boom(self, *args, **kwargs):
        raise AssertionError("box supervision read the ground-truth masks")

    __len__ = __iter__ = __getitem__ = __bool__ = __getattr__ = _boom


# ------------------------------------------------------------------------ config


def test_config_defaults_and_validation():
    cfg = Box2MaskTConfig()
    expected = dict(class_weight=2.0, no_object_weight=0.1, projection_weight=5.0, levelset_weight=1.0, img_weight=0.05,
                    deep_weight=5.0, lcm_weight=0.2, match_class_weight=2.0, match_box_weight=5.0, match_eps=1.0,
                    work_size=96, lcm_dilation=2, lcm_iterations=10, lcm_alpha=0.3, mask_bce_weight=5.0,
                    mask_dice_weight=5.0)
    assert {k: getattr(cfg, k) for k in expected} == expected
    cfg.validate()
    for bad in (dict(no_object_weight=0.0), dict(projection_weight=-1.0), dict(class_weight=float("nan")),
                dict(work_size=1), dict(work_size=9.5), dict(lcm_dilation=0), dict(lcm_iterations=-1),
                dict(lcm_alpha=0.0), dict(match_full_resolution="yes"), dict(deep_weight=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(cfg, **bad).validate()
        with pytest.raises(ValueError):
            Box2MaskTSupervision(dataclasses.replace(cfg, **bad))


# ------------------------------------------------------------------------ hand cases


def test_classification_loss_by_hand_follows_the_matching():
    # 2 queries, 1 GT of class 0, C = 1: softmax(q0) = [.75, .25], softmax(q1) = [.5, .5]
    cls = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    box = [torch.tensor([GRID_BOX])]
    inputs = _inputs(boxes=box, labels=[torch.tensor([0])])
    sup = Box2MaskTSupervision(Box2MaskTConfig(levelset_weight=0.0))
    # q0's mask is the box, q1's mask is empty: q0 matched -> target (0, no-object)
    masks = torch.stack([_box_cells(), torch.full((H, W), -BIG)])
    losses = sup.losses(_single(cls, masks), inputs, 0)
    expected = 2.0 * (-math.log(0.75) + 0.1 * -math.log(0.5)) / 1.1
    assert float(losses["loss_ce"]) == pytest.approx(expected, rel=1e-6)
    # swap the masks: the box cost outweighs the class cost, q1 is matched -> targets (no-object, 0)
    losses = sup.losses(_single(cls, masks.flip(0)), inputs, 0)
    expected = 2.0 * (0.1 * -math.log(0.25) + -math.log(0.5)) / 1.1
    assert float(losses["loss_ce"]) == pytest.approx(expected, rel=1e-6)


def test_projection_loss_zero_iff_mask_fits_the_box():
    inputs = _inputs(boxes=[torch.tensor([GRID_BOX])], labels=[torch.tensor([0])])
    sup = Box2MaskTSupervision(Box2MaskTConfig(levelset_weight=0.0))
    cls = torch.zeros(1, 2)
    exact = sup.losses(_single(cls, _box_cells()[None]), inputs, 0)
    # 5 * 2 * (1 - 8 / (8 + 1e-5)): only the dice eps is left
    assert float(exact["loss_proj"]) == pytest.approx(5 * 2 * 1e-5 / 8, abs=1e-6)
    assert float(exact["loss_levelset"]) == 0.0  # weight 0
    # a mask strictly inside the box (projections shorter than the box): dice > 0, computed by hand
    inner = sup.losses(_single(cls, _box_cells(3, 5, 3, 5)[None]), inputs, 0)
    # x and y: p-projection = 1 on 2 cells, box projection = 1 on 4 cells -> 1 - 2*2/(2+4) = 1/3 each
    assert float(inner["loss_proj"]) == pytest.approx(5.0 * 2 / 3, rel=1e-4)
    # a mask spilling out of the box is penalised as well
    outer = sup.losses(_single(cls, _box_cells(1, 7, 1, 7)[None]), inputs, 0)
    assert float(outer["loss_proj"]) > 0.5


def test_projection_targets_are_bilinear_soft_box_masks():
    # box over full-res pixels 8..21 (x2 = 21.9): the stride-4 samples at 4i+1.5 see half of cell 5 -> 0.5
    inputs = _inputs(boxes=[torch.tensor([[8.0, 8.0, 21.9, 21.9]])], labels=[torch.tensor([0])])
    sup = Box2MaskTSupervision(Box2MaskTConfig(levelset_weight=0.0))
    soft = _box_cells(2, 6, 2, 6)
    soft[2:6, 5] = 0.0  # logit 0 -> p = 0.5 on the half-covered column and row
    soft[5, 2:6] = 0.0
    fits = sup.losses(_single(torch.zeros(1, 2), soft[None]), inputs, 0)
    assert float(fits["loss_proj"]) < 1e-4
    binary = sup.losses(_single(torch.zeros(1, 2), _box_cells()[None]), inputs, 0)
    assert float(binary["loss_proj"]) > 1e-2


def test_levelset_zero_for_the_box_mask_on_a_piecewise_constant_image():
    # image and level-set features constant inside the box and far from the outside value: every tree-filter
    # path across the box border has affinity 0, so F1 = F2 = 1 inside and all energies and the LCM term vanish
    cfg = Box2MaskTConfig(work_size=H)
    sup = Box2MaskTSupervision(cfg)
    inputs = _inputs(boxes=[torch.tensor([GRID_BOX])], labels=[torch.tensor([0])], images=_box_image())
    feats = torch.zeros(1, 1, H, W)
    feats[..., 2:6, 2:6] = 20.0
    exact = sup.losses(_single(torch.zeros(1, 2), _box_cells()[None], feats.clone().requires_grad_()), inputs, 0)
    assert float(exact["loss_levelset"]) == pytest.approx(0.0, abs=1e-6)
    assert float(exact["loss_proj"]) < 1e-4
    # half the box: the tree-filtered target and the LCM refinement disagree with p -> positive
    half = sup.losses(_single(torch.zeros(1, 2), _box_cells(2, 4, 2, 6)[None], feats.clone().requires_grad_()),
                      inputs, 0)
    assert float(half["loss_levelset"]) > 1e-3
    # and so at the default 96x96 working size, with the resizing in between
    half96 = Box2MaskTSupervision().losses(
        _single(torch.zeros(1, 2), _box_cells(2, 4, 2, 6)[None], feats.clone().requires_grad_()), inputs, 0)
    assert float(half96["loss_levelset"]) > 1e-3


def test_levelset_image_energy_by_hand():
    # deep and LCM terms off: loss = img_weight * E(I_img); the box is split into two halves of different
    # colour and p covers one half exactly -> 0; p = 0.5 everywhere -> E = variance of the image inside the box
    cfg = Box2MaskTConfig(work_size=H, deep_weight=0.0, lcm_weight=0.0, img_weight=1.0)
    sup = Box2MaskTSupervision(cfg)
    img = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)
    img[..., 8:16, 8:24] = 100
    img[..., 16:24, 8:24] = 200
    inputs = _inputs(boxes=[torch.tensor([GRID_BOX])], labels=[torch.tensor([0])], images=img)
    half = sup.losses(_single(torch.zeros(1, 2), _box_cells(2, 4, 2, 6)[None], None), inputs, 0)
    assert float(half["loss_levelset"]) == pytest.approx(0.0, abs=1e-6)
    flat = sup.losses(_single(torch.zeros(1, 2), torch.zeros(1, H, W), None), inputs, 0)
    std = torch.tensor([58.395, 57.12, 57.375])
    var = ((100.0 / std / 2) ** 2).mean()  # each channel: values mean +- 50/std_c, variance (50/std_c)^2
    # E = sum over pixels of (I - c)^2 (0.5 + 0.5) / C / sum(B) = mean variance over channels
    assert float(flat["loss_levelset"]) == pytest.approx(float(var), rel=1e-4)


@pytest.mark.parametrize("term", ["img_weight", "deep_weight", "lcm_weight"])
def test_each_levelset_term_contributes_linearly(term):
    # one term at a time on a textured image, half-box mask: positive, and linear in its weight and in
    # levelset_weight
    only = {name: 0.0 for name in ("img_weight", "deep_weight", "lcm_weight")}
    inputs = _inputs(boxes=[torch.tensor([GRID_BOX])], labels=[torch.tensor([0])],
                     images=torch.randint(0, 256, (1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5),
                                          dtype=torch.uint8))
    feats = torch.randn(1, 1, H, W, generator=torch.Generator().manual_seed(6))
    values = []
    for weight, ls_weight in ((1.0, 1.0), (2.0, 1.0), (1.0, 3.0)):
        cfg = Box2MaskTConfig(work_size=24, levelset_weight=ls_weight, **{**only, term: weight})
        out = _single(torch.zeros(1, 2), _box_cells(2, 4, 2, 6, value=2.0)[None], feats)
        values.append(float(Box2MaskTSupervision(cfg).losses(out, inputs, 0)["loss_levelset"]))
    assert values[0] > 1e-4
    assert values[1] == pytest.approx(2 * values[0], rel=1e-5)
    assert values[2] == pytest.approx(3 * values[0], rel=1e-5)


# ------------------------------------------------------------------------ box mode never reads masks


def test_box_mode_ignores_and_never_reads_gt_masks():
    sup = Box2MaskTSupervision()
    clean = sup.losses(_outputs(), _inputs(), 0)
    g = torch.Generator().manual_seed(7)
    garbage = _inputs()
    garbage.masks = [torch.rand(len(b), SIZE, SIZE, generator=g) > 0.5 for b in garbage.boxes]
    garbage.has_mask = [torch.zeros(len(b), dtype=torch.bool) for b in garbage.boxes]
    noisy = sup.losses(_outputs(), garbage, 0)
    assert set(clean) == KEYS
    for k in KEYS:
        assert torch.equal(clean[k], noisy[k]), k
    exploding = _inputs()
    exploding.masks = _Exploding()
    exploding.has_mask = _Exploding()
    touched = sup.losses(_outputs(), exploding, 0)
    for k in KEYS:
        assert torch.equal(clean[k], touched[k]), k
    # whether GT masks reach a supervision is declared once, by its method
    from boxmask.config import load_config
    from boxmask.methods import method_class
    recipe = "box2mask_t_effnet-lite0_dsb2018-sample"
    assert not method_class(load_config(recipe)).reads_gt_masks
    assert method_class(load_config(recipe, ["supervision.type=full"])).reads_gt_masks


# ------------------------------------------------------------------------ empty images, graph, gradients


def test_zero_gt_batch_gives_zero_mask_losses_connected_to_the_graph():
    out = _outputs()
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    inputs = _inputs(boxes=empty, labels=[torch.zeros(0, dtype=torch.long)] * 2)
    losses = Box2MaskTSupervision().losses(out, inputs, 0)
    assert set(losses) == KEYS
    assert float(losses["loss_proj"]) == 0.0 and float(losses["loss_levelset"]) == 0.0
    # every query is "no object": CE = mean -log softmax[C] (all weights equal), x 2.0, summed over the sets
    expected = sum(2.0 * float(-c.detach().log_softmax(-1)[..., C].mean()) for c in out.class_logits)
    assert float(losses["loss_ce"]) == pytest.approx(expected, rel=1e-5)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    for t in [*out.mask_logits, out.level_set_feats]:
        assert t.grad is not None and float(t.grad.abs().sum()) == 0.0
    assert all(c.grad is not None and float(c.grad.abs().sum()) > 0 for c in out.class_logits)
    assert float(out.anchor.grad) == 3.0


def test_image_without_gt_next_to_one_with_gts():
    inputs = _inputs(boxes=[torch.zeros(0, 4), torch.tensor([[10.0, 10.0, 50.0, 40.0]])],
                     labels=[torch.zeros(0, dtype=torch.long), torch.tensor([2])])
    out = _outputs()
    sup = Box2MaskTSupervision()
    matches = sup.matches(out, inputs)
    assert all(len(m[0][0]) == 0 and len(m[1][0]) == 1 for m in matches)
    losses = sup.losses(out, inputs, 0)
    assert all(float(v) > 0 and math.isfinite(float(v)) for v in losses.values())
    sum(losses.values()).backward()
    for m in out.mask_logits:
        assert float(m.grad[0].abs().sum()) == 0.0 and float(m.grad[1].abs().sum()) > 0


def test_gradients_reach_every_head_and_anchor_is_on_every_loss():
    out = _outputs()
    losses = Box2MaskTSupervision().losses(out, _inputs(), 0)
    for key, loss in losses.items():
        assert loss.dtype == torch.float32 and loss.dim() == 0
        (d_anchor,) = torch.autograd.grad(loss, out.anchor, retain_graph=True)
        assert float(d_anchor) == 1.0, key
    sum(losses.values()).backward()
    for s in range(SETS):
        assert float(out.class_logits[s].grad.abs().sum()) > 0, s
        assert float(out.mask_logits[s].grad.abs().sum()) > 0, s
    assert float(out.level_set_feats.grad.abs().sum()) > 0
    # only matched queries (3 per set: 2 + 1 GTs) get mask gradients
    for s in range(SETS):
        assert int((out.mask_logits[s].grad.abs().flatten(2).sum(2) > 0).sum()) == 3


def test_losses_are_sums_over_the_prediction_sets():
    sup = Box2MaskTSupervision()
    out = _outputs()
    per_set = sup.losses_per_set(out, _inputs(), 0)
    assert len(per_set) == SETS and all(set(d) == KEYS for d in per_set)
    total = sup.losses(out, _inputs(), 0)
    for k in KEYS:
        assert float(total[k]) == pytest.approx(sum(float(d[k]) for d in per_set), rel=1e-6)
        assert len({round(float(d[k]), 6) for d in per_set}) == SETS  # every set contributes its own value
    # each set alone gives its own losses: the level-set pass batched over the sets keeps them apart
    for s in range(SETS):
        alone = QueryOutputs(out.class_logits[s:s + 1], out.mask_logits[s:s + 1], out.anchor, STRIDE,
                             out.level_set_feats)
        only = sup.losses(alone, _inputs(), 0)
        for k in KEYS:
            assert float(only[k]) == pytest.approx(float(per_set[s][k]), rel=1e-5)


def test_low_precision_inputs_give_float32_losses():
    out = _outputs(dtype=torch.bfloat16)
    losses = Box2MaskTSupervision().losses(out, _inputs(), 0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert out.mask_logits[0].grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------ matching


@pytest.mark.parametrize("full_resolution", [True, False])
def test_matching_picks_the_best_fitting_query(full_resolution):
    sup = Box2MaskTSupervision(Box2MaskTConfig(levelset_weight=0.0, match_full_resolution=full_resolution))
    inputs = _inputs(boxes=[torch.tensor([GRID_BOX])], labels=[torch.tensor([1])])
    g = torch.Generator().manual_seed(3)
    masks = 3 * torch.randn(Q, H, W, generator=g)
    cls = torch.zeros(Q, C + 1)
    before = sup.matches(_single(cls, masks), inputs)[0][0]
    proj_before = float(sup.losses(_single(cls, masks), inputs, 0)["loss_proj"])
    for better in range(Q):
        if better == int(before[0][0]):
            continue
        fitted = masks.clone()
        fitted[better] = _box_cells()
        q_idx, g_idx = sup.matches(_single(cls, fitted), inputs)[0][0]
        assert q_idx.tolist() == [better] and g_idx.tolist() == [0]
        assert float(sup.losses(_single(cls, fitted), inputs, 0)["loss_proj"]) < 1e-4 < proj_before


@pytest.mark.parametrize("full_resolution", [True, False])
def test_matching_is_position_sensitive(full_resolution):
    # a wide box (cells y 2..5, x 2..9); decoys: transposed, mirrored left-right, mirrored up-down, empty
    inputs = _inputs(boxes=[torch.tensor([[8.0, 8.0, 39.5, 23.5]])], labels=[torch.tensor([0])])
    masks = torch.stack([_box_cells(2, 10, 2, 6), _box_cells(2, 6, 6, 14), _box_cells(2, 6, 2, 10),
                         _box_cells(10, 14, 2, 10), torch.full((H, W), -BIG)])
    sup = Box2MaskTSupervision(Box2MaskTConfig(match_full_resolution=full_resolution))
    for shift in range(Q):  # wherever the exact query sits
        rolled = masks.roll(shift, dims=0)
        q_idx, _ = sup.matches(_single(torch.zeros(Q, C + 1), rolled), inputs)[0][0]
        assert q_idx.tolist() == [(2 + shift) % Q]


def test_sets_are_matched_independently():
    # set 0: query 1 fits GT 0; set 1: query 4 fits it
    inputs = _inputs(boxes=[torch.tensor([GRID_BOX])], labels=[torch.tensor([0])])
    masks0 = torch.full((Q, H, W), -BIG)
    masks1 = masks0.clone()
    masks0[1] = _box_cells()
    masks1[4] = _box_cells()
    out = QueryOutputs([torch.zeros(1, Q, C + 1)] * 2, [masks0[None], masks1[None]], torch.zeros(()), STRIDE,
                       torch.zeros(1, 1, H, W))
    matches = Box2MaskTSupervision().matches(out, inputs)
    assert [m[0][0].tolist() for m in matches] == [[1], [4]]


def test_input_checks():
    sup = Box2MaskTSupervision()
    out = _outputs()
    out.level_set_feats = None
    with pytest.raises(ValueError, match="level_set_feats"):
        sup.losses(out, _inputs(), 0)
    Box2MaskTSupervision(Box2MaskTConfig(deep_weight=0.0)).losses(out, _inputs(), 0)  # fine without the deep term
    bad = _outputs()
    bad.mask_logits = bad.mask_logits[:-1]
    with pytest.raises(ValueError, match="prediction set"):
        sup.losses(bad, _inputs(), 0)
    small = _inputs()
    small.images = small.images[..., :32, :32]
    with pytest.raises(ValueError, match="padded"):
        sup.losses(_outputs(), small, 0)


# ------------------------------------------------------------------------ mask-supervised reference


def _gt_masks(inputs: SupervisionInputs, seed: int) -> list[torch.Tensor]:
    """Random blobs inside each GT box, full resolution."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for boxes in inputs.boxes:
        m = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            m[k, y1:y2, x1:x2] = torch.rand(y2 - y1, x2 - x1, generator=g) > 0.4
        out.append(m)
    return out


def test_full_supervision_needs_masks():
    with pytest.raises(ValueError, match="masks is None"):
        Box2MaskTFullSupervision().losses(_outputs(), _inputs(), 0)
    inputs = _inputs()
    inputs.masks = _gt_masks(inputs, 0)
    inputs.has_mask = [torch.tensor([True, False]), torch.tensor([True])]
    with pytest.raises(ValueError, match="has_mask"):
        Box2MaskTFullSupervision().losses(_outputs(), inputs, 0)


def test_full_supervision_depends_on_the_masks_and_trains_every_set():
    sup = Box2MaskTFullSupervision()
    a, b = _inputs(), _inputs()
    a.masks, b.masks = _gt_masks(a, 0), _gt_masks(b, 1)
    out = _outputs()
    la = sup.losses(out, a, 0)
    lb = sup.losses(_outputs(), b, 0)
    assert set(la) == FULL_KEYS
    assert float(la["loss_mask_bce"]) != float(lb["loss_mask_bce"])
    assert float(la["loss_mask_dice"]) != float(lb["loss_mask_dice"])
    sum(la.values()).backward()
    for s in range(SETS):
        assert float(out.class_logits[s].grad.abs().sum()) > 0 and float(out.mask_logits[s].grad.abs().sum()) > 0
    assert float(out.anchor.grad) == 3.0


def test_full_supervision_matches_by_mask_and_is_zero_for_a_perfect_query():
    # an L-shaped GT mask inside the box; query 2 is the L, query 0 the full box (same box projections)
    box = torch.tensor([GRID_BOX])
    inputs = _inputs(boxes=[box], labels=[torch.tensor([0])])
    l_mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    l_mask[0, 8:24, 8:12] = True
    l_mask[0, 20:24, 8:24] = True
    inputs.masks = [l_mask]
    masks = torch.full((Q, H, W), -BIG)
    masks[0] = _box_cells()
    masks[2] = -BIG
    masks[2, 2:6, 2] = BIG
    masks[2, 5, 2:6] = BIG
    cls = torch.zeros(Q, C + 1)
    cls[:, 0] = 2.0
    sup = Box2MaskTFullSupervision()
    assert sup.matches(_single(cls, masks), inputs)[0][0][0].tolist() == [2]
    losses = sup.losses(_single(cls, masks), inputs, 0)
    assert float(losses["loss_mask_bce"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_mask_dice"]) == pytest.approx(0.0, abs=1e-4)
    # box supervision cannot tell the L from the box; with the box as the GT mask the full variant picks query 0
    inputs.masks = [torch.zeros(1, SIZE, SIZE, dtype=torch.bool)]
    inputs.masks[0][0, 8:24, 8:24] = True
    assert sup.matches(_single(cls, masks), inputs)[0][0][0].tolist() == [0]


def test_mask_matching_cost_by_hand():
    # 1 GT, 2 queries on a 1x2 grid: cost = -2 softmax + 5 meanBCE + 5 dice(eps 1); query 1 is closer
    logits = torch.tensor([[[0.0, 0.0]], [[2.0, -2.0]]])
    gt = torch.tensor([[[1.0, 0.0]]])
    q_idx, g_idx = match_queries_to_masks(torch.zeros(2, 2), logits, torch.tensor([0]), gt)
    assert q_idx.tolist() == [1] and g_idx.tolist() == [0]
    q_idx, _ = match_queries_to_masks(torch.zeros(2, 2), logits.flip(0), torch.tensor([0]), gt)
    assert q_idx.tolist() == [0]
