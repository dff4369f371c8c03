"""SOLOv2-style network of BoxLevelSet: shapes, target/loss plumbing, box-only training, Matrix NMS
inference and box-conditioned masks."""

from pathlib import Path

import pytest
import torch

from boxmask.methods import method_class, method_for, supervised_losses
import torch.nn.functional as F

from boxmask.config import ConfigError, load_config
from boxmask.engine.module import BoxMaskModule, supervision_inputs
from boxmask.modeling import build_model
from boxmask.modeling.fpn import SOLOFPN
from boxmask.modeling.solo_targets import solo_targets
from boxmask.modeling.solov2 import SOLOv2, SOLOv2Features, coord_features, fourier_position_features, point_nms
from boxmask.structures import SupervisionInputs
from boxmask.supervision.base import MaskSupervision
from helpers import TINY, assert_eval_output_consistent, check_annotate_one_sample_image, losses_real_and_garbage_masks, sample_batch

SOLO = ["model.arch=solov2", "model.solov2.head_channels=32", "model.mask_channels=16", "model.level_set_channels=5",
        "supervision.type=levelset", "supervision.projection_weight=3.0"]


def solo_cfg(tmp_path, *extra):
    cfg = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", TINY + SOLO + [f"trainer.output_dir={tmp_path}", *extra])
    method_class(cfg)
    return cfg


def test_config_checks_the_architecture(tmp_path):
    with pytest.raises(ConfigError, match="model.arch"):
        solo_cfg(tmp_path, "model.arch=yolo")
    with pytest.raises(ConfigError, match="solov2.grids"):
        solo_cfg(tmp_path, "model.solov2.grids=[40,36]")
    with pytest.raises(ConfigError, match="solov2.scale_ranges"):
        solo_cfg(tmp_path, "model.solov2.scale_ranges=[[1,96],[48,192],[96,384],[192,768],[2048,384]]")
    assert isinstance(build_model(solo_cfg(tmp_path).model, 2), SOLOv2)


def test_fpn_heads_and_mask_features_shapes(tmp_path):
    fpn = SOLOFPN([8, 16, 24, 32], 16)
    feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip([8, 16, 24, 32], [1, 2, 4, 8])]
    p = fpn(feats)
    assert [tuple(x.shape[-2:]) for x in p] == [(64, 96), (32, 48), (16, 24), (8, 12), (4, 6)]
    with pytest.raises(ValueError, match="C2, C3, C4, C5"):
        fpn(feats[1:])
    model = SOLOv2(solo_cfg(tmp_path).model, 3)
    f = model.features(torch.zeros(2, 3, 128, 160, dtype=torch.uint8))
    cates, kernels, mask_feats = f.cates, f.kernels, f.mask_feats
    assert [tuple(c.shape) for c in cates] == [(2, 3, s, s) for s in (40, 36, 24, 16, 12)]
    assert [tuple(k.shape) for k in kernels] == [(2, 16, s, s) for s in (40, 36, 24, 16, 12)]
    assert tuple(mask_feats.shape) == (2, 16, 32, 40)  # stride 4
    # focal prior on the category logits
    assert torch.allclose(cates[0].sigmoid().mean(), torch.tensor(0.01), atol=5e-3)


def test_coord_features_and_point_nms():
    c = coord_features(torch.zeros(1, 4, 3, 5))
    assert c.shape == (1, 2, 3, 5)
    assert torch.equal(c[0, 0, 0], torch.linspace(-1, 1, 5)) and torch.equal(c[0, 1, :, 0], torch.linspace(-1, 1, 3))
    heat = torch.tensor([[[[0.1, 0.9, 0.2], [0.3, 0.5, 0.8], [0.1, 0.1, 0.1]]]])
    # a cell survives where it is the max of the 2x2 window ending at it (its upper-left neighbours)
    kept = point_nms(heat)
    expected = torch.tensor([[[[0.1, 0.9, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]]])  # 0.8 sees 0.9
    assert torch.equal(kept, expected)


def test_fourier_position_features_values_grids_and_the_model_option(tmp_path):
    f = fourier_position_features(torch.zeros(2, 7, 3, 4), 2)
    assert f.shape == (2, 8, 3, 4)
    u = torch.tensor([-0.75, -0.25, 0.25, 0.75])  # cell centres of 4 columns in [-1, 1]
    v = torch.tensor([-2 / 3, 0.0, 2 / 3])
    for k in range(2):
        w = torch.pi * 2 ** k
        torch.testing.assert_close(f[0, 4 * k + 0, 1], (w * u).sin())
        torch.testing.assert_close(f[0, 4 * k + 1, 2], (w * u).cos())
        torch.testing.assert_close(f[1, 4 * k + 2, :, 0], (w * v).sin())
        torch.testing.assert_close(f[1, 4 * k + 3, :, 3], (w * v).cos())
    # one image point, one feature vector on every grid: the image centre is the centre of cell 2 of 5 and of
    # cell 7 of 15
    coarse, fine = fourier_position_features(torch.zeros(1, 1, 1, 5), 1), fourier_position_features(torch.zeros(1, 1, 1, 15), 1)
    torch.testing.assert_close(coarse[0, :, 0, 2], fine[0, :, 0, 7])  # both the image centre
    assert fourier_position_features(torch.zeros(1, 1, 2, 2), 0).shape == (1, 0, 2, 2)
    with pytest.raises(ConfigError, match="solov2.coord_freqs"):
        solo_cfg(tmp_path, "model.solov2.coord_freqs=-1")
    model = SOLOv2(solo_cfg(tmp_path, "model.solov2.coord_freqs=3").model, 2)
    f = model.features(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    cates, kernels, mask_feats = f.cates, f.kernels, f.mask_feats
    assert [tuple(k.shape) for k in kernels] == [(1, 16, s, s) for s in (40, 36, 24, 16, 12)]
    assert tuple(mask_feats.shape) == (1, 16, 32, 32)
    assert model.head.kernel_tower[0][0].in_channels == model.head.cate_tower[0][0].in_channels + 2 + 12
    assert model.mask_branch.pred[0].in_channels == model.mask_branch.levels[0][0][0].out_channels + 12


class _Recorder(MaskSupervision):
    """Records the instance groups it is called with; loss = number of instances in the group."""

    def __init__(self):
        self.calls = []

    def losses(self, instances, inputs, step):
        self.calls.append((instances.stride, instances.im_inds.clone(), instances.gt_inds.clone(),
                           tuple(instances.logits.shape)))
        return {"loss_count": instances.logits.sum() * 0 + float(len(instances))}


def test_positives_are_grouped_by_mask_stride_and_losses_weighted_by_count(tmp_path):
    torch.manual_seed(0)
    model = SOLOv2(solo_cfg(tmp_path).model, 2)
    images = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    boxes = [torch.tensor([[10.0, 10, 60, 60], [100, 100, 250, 230]]), torch.tensor([[30.0, 40, 200, 220]])]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    inputs = SupervisionInputs(images, [(256, 256)] * 2, [(256, 256)] * 2, boxes, labels)
    rec = _Recorder()
    losses = supervised_losses(model, rec, inputs, 0)
    expected = {}
    for b in range(2):
        for level, t in enumerate(solo_targets(boxes[b], labels[b], (256, 256), 2)):
            stride = (4, 4, 8, 16, 16)[level]
            if len(t.pos_gt_inds):
                expected.setdefault(stride, []).extend((b, int(g)) for g in t.pos_gt_inds)
    seen = {s: sorted(zip(im.tolist(), gt.tolist())) for s, im, gt, _ in rec.calls}
    assert len(seen) >= 2, "the boxes should reach two mask strides"
    assert seen == {s: sorted(v) for s, v in expected.items()}
    for s, _, _, shape in rec.calls:
        assert shape[1:] == (1, 256 // s, 256 // s)
    sizes = [len(v) for v in expected.values()]
    assert losses["loss_count"].item() == pytest.approx(sum(k * k for k in sizes) / sum(sizes))
    assert losses["loss_cls"].item() > 0


def test_downsampled_mask_features_give_downsampled_logits(tmp_path):
    """Why the training masks at strides 8/16 are taken from resized F_mask: the 1x1 kernel is linear."""
    model = SOLOv2(solo_cfg(tmp_path, "model.mask_channels=8").model, 1)
    feats = torch.randn(8, 32, 48, dtype=torch.float64)
    kernels = torch.randn(5, 8, dtype=torch.float64)
    full = model._masks(kernels, feats)
    small = model._masks(kernels, F.interpolate(feats[None], size=(8, 12), mode="bilinear", align_corners=False)[0])
    assert torch.allclose(small, F.interpolate(full[None], size=(8, 12), mode="bilinear", align_corners=False)[0])


def test_levelset_training_ignores_gt_masks_and_reaches_every_parameter(tmp_path):
    cfg = solo_cfg(tmp_path)
    torch.manual_seed(0)
    module = BoxMaskModule(cfg.to_dict(), ["nucleus"], [1])
    results = losses_real_and_garbage_masks(module)
    assert {k: v.item() for k, v in results[0].items()} == {k: v.item() for k, v in results[1].items()}
    losses = results[0]
    assert set(losses) == {"loss_cls", "loss_proj", "loss_levelset"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert module.model.level_set_head.weight.grad.abs().sum() > 0
    assert module.model.head.kernel_pred.weight.grad.abs().sum() > 0
    assert module.model.head.cate_pred.weight.grad.abs().sum() > 0


def test_boxinst_supervision_also_trains_the_solov2_network(tmp_path):
    """BoxInst's box-only losses on the SOLOv2 network: positive and finite, their gradients reach the
    parts that make SOLOv2's masks (kernel branch and mask-feature branch), and a few SGD steps on them
    lower them."""
    torch.manual_seed(0)
    cfg = solo_cfg(tmp_path, "supervision.type=boxinst", "model.level_set_channels=0")
    module = BoxMaskModule(cfg.to_dict(), ["nucleus"], [1])
    model = module.model.eval()  # fixed normalisation statistics: the steps below compare like with like
    batch = sample_batch(load_masks=False)
    inputs = supervision_inputs(batch, False)
    step = 5  # pairwise_warmup_iters=3 (TINY): the pairwise term is fully on

    def mask_losses():
        losses = supervised_losses(model, module.supervision, inputs, step)
        assert set(losses) == {"loss_cls", "loss_proj", "loss_pairwise"}
        assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
        return losses["loss_proj"] + losses["loss_pairwise"]

    before = mask_losses()
    before.backward()
    for name, p in [("kernel_pred", model.head.kernel_pred.weight),
                    ("mask_branch", next(model.mask_branch.parameters()))]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient from the BoxInst losses to {name}"
    assert model.head.cate_pred.weight.grad is None or model.head.cate_pred.weight.grad.abs().sum() == 0, \
        "the mask losses do not train the category branch"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        mask_losses().backward()
        opt.step()
    with torch.no_grad():
        after = mask_losses()
    assert after.item() < 0.95 * before.item(), (before.item(), after.item())


def test_image_without_boxes_gives_zero_mask_losses(tmp_path):
    model = SOLOv2(solo_cfg(tmp_path).model, 1)
    sup = method_for(solo_cfg(tmp_path), 1).supervision
    images = torch.zeros(1, 3, 128, 128, dtype=torch.uint8)
    inputs = SupervisionInputs(images, [(128, 128)], [(128, 128)], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)])
    losses = supervised_losses(model, sup, inputs, 0)
    assert losses["loss_proj"].item() == 0 and losses["loss_levelset"].item() == 0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _crafted(tmp_path, monkeypatch, mask_feats, cells):
    """A SOLOv2 whose features are replaced: ``cells`` = {(level, i, j): (class, logit, kernel)}."""
    cfg = solo_cfg(tmp_path, "model.mask_channels=2", "model.mask_threshold=0.5", "model.score_threshold=0.1")
    model = SOLOv2(cfg.model, 2).eval()
    cates = [torch.full((1, 2, s, s), -10.0) for s in cfg.model.solov2.grids]
    kernels = [torch.zeros(1, 2, s, s) for s in cfg.model.solov2.grids]
    for (level, i, j), (cls, logit, kernel) in cells.items():
        cates[level][0, cls, i, j] = logit
        kernels[level][0, :, i, j] = torch.tensor(kernel)
    monkeypatch.setattr(model, "features", lambda images: SOLOv2Features(cates, kernels, mask_feats))
    return model


def test_predict_matrix_nms_decays_a_duplicate_and_keeps_a_disjoint_mask(tmp_path, monkeypatch):
    # F_mask channel 0 = +10 on a left square, channel 1 = +10 on a right square, -10 elsewhere
    feats = torch.full((1, 2, 32, 32), -10.0)
    feats[0, 0, 4:12, 4:12] = 10.0
    feats[0, 1, 20:28, 16:30] = 10.0
    cells = {(0, 5, 5): (0, 3.0, [1.0, 0.0]),   # left square, score σ(3) = 0.95
             (0, 5, 7): (0, 1.0, [1.0, 0.0]),   # same mask, same class, σ(1) = 0.73: a duplicate
             (0, 30, 30): (0, 2.0, [0.0, 1.0])}  # disjoint right rectangle, σ(2) = 0.88
    model = _crafted(tmp_path, monkeypatch, feats, cells)
    pred = model.predict(torch.zeros(1, 3, 128, 128, dtype=torch.uint8), [(128, 128)], [(256, 256)])[0]
    s = torch.sigmoid(torch.tensor([3.0, 2.0, 1.0]))
    assert len(pred.scores) == 3
    # maskness is sigmoid(10) for these masks; the disjoint one keeps its score, the duplicate is decayed
    maskness = torch.sigmoid(torch.tensor(10.0))
    assert pred.scores[0].item() == pytest.approx((s[0] * maskness).item(), rel=1e-4)
    assert pred.scores[1].item() == pytest.approx((s[1] * maskness).item(), rel=1e-4)
    assert pred.scores[2].item() == pytest.approx((s[2] * maskness * torch.exp(torch.tensor(-2.0))).item(), rel=1e-4)
    # masks at the original size (×2): left square covers stride-4 cells 4..11 → pixels 32..95 of 256
    left = pred.masks[0]
    assert left.shape == (256, 256)
    rows = torch.nonzero(left.any(1)).squeeze(1)
    assert abs(rows.min().item() - 32) <= 4 and abs(rows.max().item() - 95) <= 4
    assert pred.boxes[0].tolist() == pytest.approx([rows.min().item(), rows.min().item(), rows.max().item() + 1,
                                                    rows.max().item() + 1], abs=4)
    assert torch.equal(pred.masks[0], pred.masks[2])
    assert not (pred.masks[0] & pred.masks[1]).any()


def test_predict_drops_masks_no_larger_than_the_level_stride(tmp_path, monkeypatch):
    feats = torch.full((1, 2, 32, 32), -10.0)
    feats[0, 0, 4, 4:10] = 10.0  # 6 cells at stride 4: <= head stride 8 of level 0 → dropped
    model = _crafted(tmp_path, monkeypatch, feats, {(0, 5, 5): (1, 3.0, [1.0, 0.0])})
    pred = model.predict(torch.zeros(1, 3, 128, 128, dtype=torch.uint8), [(128, 128)], [(128, 128)])[0]
    assert len(pred.scores) == 0 and pred.masks.shape == (0, 128, 128)


def test_box_conditioned_masks_keep_the_candidate_that_fits_the_box(tmp_path, monkeypatch):
    feats = torch.full((1, 2, 32, 32), -10.0)
    feats[0, 0, 4:12, 4:12] = 10.0   # fills the box
    feats[0, 1, 6:8, 6:8] = 10.0     # a fragment inside it
    box = torch.tensor([[16.0, 16.0, 48.0, 48.0]])  # stride-4 cells 4..11, sqrt(wh) = 32 → level 0 only
    # two level-0 cells (grid 40 on 128 px: 3.2 px cells) inside the box; the fragment scores higher
    cells = {(0, 8, 8): (0, 3.0, [0.0, 1.0]), (0, 10, 10): (0, 1.0, [1.0, 0.0]),
             (2, 4, 4): (0, 5.0, [0.0, 1.0])}  # level 2 is not a level of this box: never a candidate
    model = _crafted(tmp_path, monkeypatch, feats, cells)
    images = torch.zeros(1, 3, 128, 128, dtype=torch.uint8)
    one = model.box_conditioned_masks(images, [(128, 128)], [box], [torch.tensor([0])], candidates=1)[0]
    assert one.levels.tolist() == [0] and one.loc_inds.tolist() == [8 * 40 + 8]
    two = model.box_conditioned_masks(images, [(128, 128)], [box], [torch.tensor([0])], candidates=2)[0]
    assert two.loc_inds.tolist() == [10 * 40 + 10] and bool(two.inside[0])
    assert (two.logits[0, 0, 4:12, 4:12] > 0).all() and two.logits.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="candidates"):
        model.box_conditioned_masks(images, [(128, 128)], [box], None, candidates=0)


def test_cli_train_eval_predict_annotate_with_a_boxlevelset_recipe(boxlevelset_checkpoint, tmp_path, capsys):
    import json

    from boxmask.cli import main
    from boxmask.data.sample import sample_paths
    from boxmask.engine.inference import load_checkpoint

    torch.set_num_threads(1)
    ckpt = boxlevelset_checkpoint
    model, cfg, _ = load_checkpoint(ckpt)
    assert isinstance(model, SOLOv2) and cfg.supervision.type == "levelset" and cfg.solver.optimizer == "adamw"

    assert main(["eval", str(ckpt), "--output", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert "| segm |" in capsys.readouterr().out
    assert_eval_output_consistent(tmp_path / "eval", sample_paths()["val_json"])

    image = sorted(sample_paths()["image_dir"].iterdir())[0]
    assert main(["predict", str(ckpt), str(image), "-o", str(tmp_path / "pred"), "--score-threshold", "0.0",
                 "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert results and all(r["category_id"] == 1 for r in results)

    check_annotate_one_sample_image(main, ckpt, tmp_path)


NUTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuts"


@pytest.mark.slow
@pytest.mark.skipif(not (NUTS / "annotations" / "instances_train.json").is_file(), reason=f"{NUTS} not present")
def test_real_data_boxlevelset_training_mask_ap_beats_boxfill(tmp_path):
    """A short CPU run of BoxLevelSet on the real nuts data (14 train / 4 val images, 100 steps at 192-256 px) with
    the packaged recipe: it must learn masks (mask AP >= 30) that add over the same model's detections with their
    boxes filled (the tight boxes of its masks). With the recipe's position prior (issue 13), measured on the
    2-core machine class at one thread, 160 steps: mask AP 52.1 vs 28.9 for the filled boxes (box AP 56.9), 231 s.
    Without it (the recipe before issue 13) the same run gave 15.1 vs 7.6 in 157 s, so the AP floor fails there.
    100 steps (to keep the suite short), 2 threads, twice: 45.4 vs 30.8 (box AP 47.4), 118 s. Now one thread
    (deterministic on a given machine; the README runs the suite on 2 workers), channels-last, under ``-n 2``:
    46.2 vs 30.3 (box AP 49.0), 179 s. The 4 val images make the APs coarse and the run is not bit-stable
    across thread counts or CPUs, hence the wide margins."""
    from boxmask.engine.train import train

    torch.set_num_threads(1)
    cfg = load_config("boxlevelset_effnet-lite0_fpn_nuts",
                      [f"data.train_json={NUTS / 'annotations' / 'instances_train.json'}",
                       f"data.val_json={NUTS / 'annotations' / 'instances_val.json'}",
                       f"data.train_images={NUTS / 'images'}", f"data.val_images={NUTS / 'images'}",
                       "data.min_sizes=[192,224,256]", "data.test_min_size=224", "data.test_max_size=640",
                       "data.num_workers=0", f"trainer.output_dir={tmp_path}", "trainer.progress_bar=false",
                       "solver.max_iters=100", "solver.steps=[80]", "solver.warmup_iters=20"])
    summary = train(cfg)
    m = summary["metrics"]
    segm, boxfill = m["model"]["segm"]["AP"], m["boxfill"]["segm"]["AP"]
    print(f"mask AP {segm:.1f}, box-filled mask AP {boxfill:.1f}, box AP {m['model']['bbox']['AP']:.1f}")
    assert segm >= 30.0
    assert segm > boxfill + 5.0


def test_position_prior_starts_as_a_blob_at_its_cell_and_trains(tmp_path):
    """``model.solov2.position_prior``: with zero mask features each cell's mask is ``-2 + 4 g`` (g the Gaussian of
    the distance to the cell centre, sigma one cell size): positive at the centre, negative two cells away; the
    prior's weights get gradients from the mask loss."""
    torch.manual_seed(0)
    model = SOLOv2(solo_cfg(tmp_path, "model.solov2.position_prior=true").model, 1)
    e = model.cfg.mask_channels
    assert model.head.kernel_pred.out_channels == e + 5
    hp = wp = 128
    centres, sizes = model.cell_geometry(hp, wp, torch.device("cpu"))
    assert centres.shape == (sum(s * s for s in model.cfg.solov2.grids), 2)
    cell = 8 * 40 + 12  # level 0 (S = 40): row 8, column 12
    assert centres[cell].tolist() == pytest.approx([(12 + 0.5) * 128 / 40, (8 + 0.5) * 128 / 40])
    kern = model.head.kernel_pred.bias.detach()[None]  # the kernel of a cell whose tower output is zero
    logits = model._masks(kern, torch.zeros(e, hp // 4, wp // 4), centres[cell:cell + 1], sizes[cell:cell + 1])[0]
    cx, cy = centres[cell]
    ys = (torch.arange(hp // 4) + 0.5) * 4
    xs = (torch.arange(wp // 4) + 0.5) * 4
    d2 = (xs[None] - cx) ** 2 + (ys[:, None] - cy) ** 2
    expected = -2 + 4 * torch.exp(-d2 / (2 * float(sizes[cell]) ** 2))
    torch.testing.assert_close(logits, expected)
    assert logits.max() > 0 and logits[d2 > (2 * sizes[cell]) ** 2].max() < -1.5
    # trains: the mask loss reaches the prior's weights
    images = torch.zeros(1, 3, hp, wp, dtype=torch.uint8)
    inputs = SupervisionInputs(images, [(hp, wp)], [(hp, wp)], [torch.tensor([[20.0, 20, 50, 60]])], [torch.tensor([0])])
    losses = supervised_losses(model, method_for(solo_cfg(tmp_path), 1).supervision, inputs, 0)
    sum(losses.values()).backward()
    assert model.head.kernel_pred.bias.grad[e:].abs().sum() > 0
