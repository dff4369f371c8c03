"""SIM copy-paste in training (methods.md §5.6) and the code's feature-aware affinity (§5.2):
pasting into a batch, the paste loss, filling the memory bank, bank state in the module's state dict."""

from __future__ import annotations

import pytest
import torch

from boxmask.engine.module import BoxMaskModule, supervision_inputs
from boxmask.supervision import sim_supervision
from boxmask.supervision.boxinst import instance_box_masks
from boxmask.supervision.copy_paste import PasteEntry
from boxmask.supervision.sim import feature_similarity, pseudo_mask_loss
from helpers import ALL_BOX_PIXELS, SIM, check_annotate_one_sample_image, sample_batch, tiny_cfg

PASTE = [*SIM, "supervision.sim.bank_size=1", "supervision.sim.paste_prob=1.0"]


def _module(tmp_path, *extra) -> BoxMaskModule:
    torch.manual_seed(0)
    return BoxMaskModule(tiny_cfg(tmp_path, *PASTE, *extra).to_dict(), ["nucleus"], [1])


def _entry(hw: tuple[int, int]) -> PasteEntry:
    """A source image of value 77 with one 40×30 px object at rows 10..39, columns 20..59 (score 0.9)."""
    image = torch.full((3, *hw), 77, dtype=torch.uint8)
    masks = torch.zeros(1, *hw, dtype=torch.bool)
    masks[0, 10:40, 20:60] = True
    return PasteEntry(image, masks, torch.tensor([0]), torch.tensor([0.9]))


def _spy(module):
    captured = {}
    losses = module.supervision.losses

    def spy(instances, inputs, step, sim_inputs=None):
        captured["instances"], captured["inputs"] = instances, inputs
        return losses(instances, inputs, step, sim_inputs)

    module.supervision.losses = spy
    return captured


def test_prepare_inputs_pastes_from_a_full_bank(tmp_path):
    module = _module(tmp_path)
    sup = module.supervision
    batch = sample_batch(load_masks=False)
    inputs = supervision_inputs(batch, False)
    hw = tuple(batch.images.shape[-2:])
    # no-ops: before the warm-up, with a bank that is not full, with paste probability 0
    assert sup.prepare_inputs(inputs, 5) is inputs
    sup.bank.push(_entry(hw))
    assert sup.prepare_inputs(inputs, 0) is inputs, "sim.warmup_iters=1: no paste at step 0"
    images_before = batch.images.clone()
    out = sup.prepare_inputs(inputs, 5)
    assert out is not inputs and torch.equal(batch.images, images_before), "the input batch is not modified"
    assert out.masks is None and out.has_mask is None, "box-only: no ground-truth masks"
    for b in range(len(batch)):
        h, w = batch.image_sizes[b]
        assert out.pasted[b].dtype == torch.bool and int(out.pasted[b].sum()) == 1 and bool(out.pasted[b][-1])
        region = out.images[b][:, 10:min(40, h), 20:min(60, w)]
        assert (region == 77).all(), "the object's pixels are copied"
        outside = torch.ones(hw, dtype=torch.bool)
        outside[10:40, 20:60] = False
        assert torch.equal(out.images[b][:, outside], batch.images[b][:, outside]), "nothing else changes"
        # the pasted object's box is the tight box of its visible mask; its paste mask is exact
        box = out.boxes[b][-1].tolist()
        assert box == [20.0, 10.0, float(min(60, w)), float(min(40, h))]
        pm = out.paste_masks[b]
        assert pm.shape == (len(out.boxes[b]), *hw) and not pm[:-1].any()
        assert int(pm[-1].sum()) == (min(40, h) - 10) * (min(60, w) - 20)
        assert out.labels[b][-1].item() == 0 and len(out.labels[b]) == len(out.boxes[b])
        # originals: fully occluded ones dropped, the others' boxes only shrink
        n_orig = len(out.boxes[b]) - 1
        assert n_orig <= len(inputs.boxes[b])
        for ob in out.boxes[b][:-1]:
            assert any(bool((ob[:2] >= ib[:2] - 1e-4).all() and (ob[2:] <= ib[2:] + 1e-4).all())
                       for ib in inputs.boxes[b])
    cfg_off = tiny_cfg(tmp_path, *PASTE, "supervision.sim.paste_prob=0.0").supervision
    sup.cfg = cfg_off
    assert sup.prepare_inputs(inputs, 5) is inputs


def test_paste_loss_on_pasted_positives(tmp_path):
    module = _module(tmp_path)
    module.model.eval()
    batch = sample_batch(load_masks=False)
    hw = tuple(batch.images.shape[-2:])
    module.supervision.bank.push(_entry(hw))
    captured = _spy(module)
    step = 5
    inputs = module.method.prepare_inputs(supervision_inputs(batch, False), step)
    losses = module.compute_losses(inputs, step)
    inst = captured["instances"]
    assert set(losses) >= {"loss_proj", "loss_pairwise", "loss_pseudo", "loss_paste"}
    # hand computation: positives whose GT is the pasted object, target = paste mask sampled at stride 4
    sel = [k for k in range(len(inst)) if bool(inputs.pasted[int(inst.im_inds[k])][int(inst.gt_inds[k])])]
    assert sel, "the pasted 40×30 object has FCOS positives"
    target = torch.zeros(len(sel), *inst.logits.shape[-2:])
    for i, k in enumerate(sel):
        m = inputs.paste_masks[int(inst.im_inds[k])][int(inst.gt_inds[k])]
        target[i] = m[2::4, 2::4].float()
    # rows 10..39 / columns 20..59 sampled at 2, 6, 10, ...: rows 10..38 → cells 2..9, columns 22..58 → 5..14
    assert int(target[0].sum()) == 8 * 10
    logits = inst.logits.float()[sel]
    expected = pseudo_mask_loss(logits, target, torch.ones_like(target, dtype=torch.bool), "paper")
    assert losses["loss_paste"].item() == pytest.approx(1.0 * expected.item(), rel=1e-5)
    assert losses["loss_paste"].item() > 0
    # gradient reaches the student's mask branch, not the teacher
    module.model.zero_grad()
    losses["loss_paste"].backward()
    assert module.model.mask_branch.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())


def _spy_box_masks(monkeypatch):
    """Records the instances and the ``box_masks`` SIM hands to its BoxInst projection + pairwise losses."""
    captured = {}
    losses = sim_supervision.boxinst_losses

    def spy(cfg, instances, inputs, step, **kwargs):
        captured["instances"], captured["inputs"], captured["box_masks"] = instances, inputs, kwargs.get("box_masks")
        return losses(cfg, instances, inputs, step, **kwargs)

    monkeypatch.setattr(sim_supervision, "boxinst_losses", spy)
    return captured


def _l_shaped_entry(hw: tuple[int, int]) -> PasteEntry:
    """Like :func:`_entry` but the object is an L: its top-right 15×20 px quadrant is cut out, so its paste
    mask differs from its (tight) box mask."""
    entry = _entry(hw)
    masks = entry.masks.clone()
    masks[0, 10:25, 40:60] = False
    return PasteEntry(entry.image, masks, entry.labels, entry.scores)


def test_paste_loss_zero_without_pastes_and_box_masks_replaced(tmp_path, monkeypatch):
    # no paste (probability 0, full bank): loss_paste is a zero connected to the graph, BoxInst gets the plain
    # box masks of the positives
    module = _module(tmp_path, "supervision.sim.paste_prob=0.0")
    module.model.eval()
    batch = sample_batch(load_masks=False)
    hw = tuple(batch.images.shape[-2:])
    module.supervision.bank.push(_l_shaped_entry(hw))
    assert module.supervision.bank.full
    seen = _spy_box_masks(monkeypatch)
    inputs = module.method.prepare_inputs(supervision_inputs(batch, False), 5)
    assert inputs.pasted is None
    losses = module.compute_losses(inputs, 5)
    assert losses["loss_paste"].item() == 0 and losses["loss_paste"].requires_grad
    assert torch.equal(seen["box_masks"], instance_box_masks(seen["instances"], inputs))

    # a paste from the full bank (probability 1): the positives of the pasted object get its paste mask (point-
    # sampled at the mask stride) in place of its box mask; every other positive keeps its box mask
    module = _module(tmp_path)
    module.model.eval()
    module.supervision.bank.push(_l_shaped_entry(hw))
    seen = _spy_box_masks(monkeypatch)
    inputs = module.method.prepare_inputs(supervision_inputs(batch, False), 5)
    assert inputs.pasted is not None and all(bool(p.any()) for p in inputs.pasted)
    losses = module.compute_losses(inputs, 5)
    inst, box_masks = seen["instances"], seen["box_masks"]
    plain = instance_box_masks(inst, inputs)
    pasted = [bool(inputs.pasted[int(inst.im_inds[k])][int(inst.gt_inds[k])]) for k in range(len(inst))]
    assert any(pasted) and not all(pasted), "positives of both the pasted object and the original nuclei"
    for k, is_pasted in enumerate(pasted):
        if is_pasted:
            paste = inputs.paste_masks[int(inst.im_inds[k])][int(inst.gt_inds[k])][2::4, 2::4].float()
            assert torch.equal(box_masks[k], paste), f"positive {k}: its paste mask replaced its box mask"
            assert not torch.equal(box_masks[k], plain[k]), "the L-shaped paste mask is not its box"
        else:
            assert torch.equal(box_masks[k], plain[k]), f"positive {k}: not pasted, keeps its box mask"
    assert losses["loss_paste"].item() > 0


def test_bank_fill_from_teacher_instance_maps(tmp_path):
    module = _module(tmp_path, ALL_BOX_PIXELS, "supervision.sim.bank_size=4", "supervision.sim.bank_max_instances=3")
    module.model.eval()
    batch = sample_batch(load_masks=False)
    captured = _spy(module)
    inputs = supervision_inputs(batch, False)
    module.compute_losses(inputs, 0)
    assert len(module.supervision.bank) == 0, "no bank fill during the warm-up"
    module.compute_losses(inputs, 1)
    inst = captured["instances"]
    bank = module.supervision.bank
    images_with_positives = torch.unique(inst.im_inds).tolist()
    assert len(bank) == len(images_with_positives) >= 1
    for entry, b in zip(bank.entries, images_with_positives):
        assert torch.equal(entry.image, batch.images[b])
        n_gts = len(torch.unique(inst.gt_inds[inst.im_inds == b]))
        assert 1 <= entry.num_instances <= min(3, n_gts)
        assert ((entry.scores > 0) & (entry.scores <= 1)).all()
        assert (entry.scores[:-1] >= entry.scores[1:]).all(), "highest scores kept, in order"
        # threshold 0: every paste mask is (nearly) its whole GT box, and lies inside one GT box
        for m in entry.masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert any(bool((tight[:2] >= box[:2].floor() - 1).all() and (tight[2:] <= box[2:].ceil() + 1).all())
                       for box in batch.targets[b]["boxes"])


def test_bank_is_module_state_and_restores(tmp_path):
    module = _module(tmp_path, "supervision.sim.bank_size=2")
    hw = (64, 96)
    module.supervision.bank.push(_entry(hw))
    state = module.state_dict()
    assert "supervision._extra_state" in state
    other = _module(tmp_path, "supervision.sim.bank_size=2")
    assert len(other.supervision.bank) == 0
    other.load_state_dict(state)
    (restored,) = other.supervision.bank.entries
    assert torch.equal(restored.masks, _entry(hw).masks) and torch.equal(restored.image, _entry(hw).image)
    off = _module(tmp_path, "supervision.sim.copy_paste=false")
    assert off.supervision.bank is None
    with pytest.raises(ValueError, match="sim.copy_paste"):
        off.load_state_dict(state)
    small = _module(tmp_path, "supervision.sim.bank_size=1")
    with pytest.raises(ValueError, match="capacity"):
        small.load_state_dict(state)


def test_feature_similarity_hand_case():
    feats = torch.zeros(1, 2, 3, 5)
    feats[0, 0, :, 3:] = 3.0  # columns 3-4 differ by (3, 4) from the rest: distance 5
    feats[0, 1, :, 3:] = 4.0
    sim = feature_similarity(feats, dilation=1)
    assert sim.shape == (1, 8, 3, 5)
    # channel order follows the unfold order: (dy, dx) = (-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1)
    right = sim[0, 4]  # neighbour (0, +1)
    assert right[1, 0] == pytest.approx(1.0) and right[1, 2] == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert right[1, 4] == 0, "neighbour outside the map"
    assert sim[0, 1, 0, 0] == 0 and sim[0, 1, 1, 0] == pytest.approx(1.0)


def test_feature_aware_pairwise_option(tmp_path):
    """sim.pairwise_features gates the pairwise edges by S_feat * S_LAB: fewer edges, a different loss."""
    batch = sample_batch(load_masks=False)
    out = {}
    for flag in (False, True):
        module = _module(tmp_path, f"supervision.sim.pairwise_features={str(flag).lower()}",
                         "supervision.sim.paste_prob=0.0")
        module.model.eval()
        out[flag] = module.compute_losses(supervision_inputs(batch, False), 5)
    assert out[True]["loss_proj"].item() == pytest.approx(out[False]["loss_proj"].item(), rel=1e-6)
    assert out[True]["loss_pairwise"].item() != pytest.approx(out[False]["loss_pairwise"].item(), rel=1e-3)


def test_cli_train_eval_predict_annotate_with_sim(sim_run, tmp_path, capsys):
    """SIM (copy-paste active) through the same CLI (``boxmask train`` of the session's ``sim_run``); the
    checkpoint loads as the plain CondInst student, the same network as BoxInst's, so inference costs the same."""
    import json

    from boxmask.cli import main
    from boxmask.data.sample import sample_paths
    from boxmask.engine.inference import load_checkpoint
    from boxmask.modeling import build_model

    ckpt = sim_run["checkpoint"]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert len(state["supervision._extra_state"]["bank"]["entries"]) == 2
    model, cfg, _ = load_checkpoint(ckpt)
    assert cfg.supervision.type == "sim"
    plain = build_model(cfg.model, 1)
    assert type(model) is type(plain) and model.state_dict().keys() == plain.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())

    assert main(["eval", str(ckpt), "--output", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert "| segm |" in capsys.readouterr().out
    image = sorted(sample_paths()["image_dir"].iterdir())[0]
    assert main(["predict", str(ckpt), str(image), "-o", str(tmp_path / "pred"), "--score-threshold", "0.0",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "pred" / "results.json").read_text())

    check_annotate_one_sample_image(main, ckpt, tmp_path)


def test_paste_loss_modes_and_pseudo_weight_ramp(tmp_path):
    from boxmask.supervision.sim_supervision import paste_loss

    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    p = logits.sigmoid()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    dice = 1 - 2 * (p * target).sum() / ((p * p).sum() + (target * target).sum() + 1e-5)
    assert paste_loss(logits, target, "paper").item() == pytest.approx(bce + dice.item(), rel=1e-5)
    pt = p * target + (1 - p) * (1 - target)
    at = 0.25 * target + 0.75 * (1 - target)
    focal = (at * (1 - pt) ** 2 * torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target, reduction="none")).sum() / (4 + 1)
    assert paste_loss(logits, target, "code").item() == pytest.approx(focal.item() + dice.item(), rel=1e-5)
    module = _module(tmp_path, "supervision.sim.pseudo_ramp_iters=100", "supervision.sim.pseudo_weight=0.3")
    assert module.supervision.pseudo_weight(50) == pytest.approx(0.15)
    assert module.supervision.pseudo_weight(500) == pytest.approx(0.3)
    assert _module(tmp_path).supervision.pseudo_weight(50) == 0.5
