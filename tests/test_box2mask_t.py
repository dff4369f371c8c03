"""Box2Mask-T as a method (issue 14): box supervision never reads masks and reaches every head, the
mask-supervised Mask2Former reference reads them, the optimiser groups of §4.4, train -> checkpoint ->
eval -> predict -> annotate through the CLI, and an exact resume."""

import json

import pytest
import torch

from boxmask.cli import main
from boxmask.config import ConfigError, load_config
from boxmask.data.sample import sample_paths
from boxmask.engine.module import BoxMaskModule, build_optimizer, supervision_inputs
from boxmask.engine.train import train
from boxmask.methods import method_class

from helpers import assert_eval_output_consistent, check_annotate_one_sample_image, losses_real_and_garbage_masks, sample_batch

RECIPE = "box2mask_t_effnet-lite0_dsb2018-sample"
#: a tiny Mask2Former for CPU tests
TINY_M2F = [
    "data.min_sizes=[160]", "data.max_size=320", "data.test_min_size=160", "data.test_max_size=320",
    "data.num_workers=0", "data.check_images=false", "model.backbone_weights=none",
    "model.mask2former.hidden_dim=32", "model.mask2former.num_queries=8", "model.mask2former.encoder_layers=1",
    "model.mask2former.encoder_ffn=64", "model.mask2former.decoder_layers=2", "model.mask2former.decoder_ffn=64",
    "model.mask2former.heads=4", "model.mask2former.mask_dim=32", "model.mask2former.n_points=2",
    "model.score_threshold=0.0", "model.max_detections=8",
    "trainer.progress_bar=false", "trainer.eval_after_train=false", "trainer.accelerator=cpu", "trainer.devices=1",
    "trainer.checkpoint_every=2", "trainer.log_every=1",
]


def m2f_cfg(tmp_path, *extra):
    cfg = load_config(RECIPE, TINY_M2F + [f"trainer.output_dir={tmp_path}", *extra])
    method_class(cfg)
    return cfg


def test_recipes_select_the_method_and_validate():
    for name in (RECIPE, "box2mask_t_effnet-lite0_nuts", "box2mask_t_effnet-lite0_dsb2018", "box2mask_t_R_50_50e"):
        cfg = load_config(name)
        assert method_class(cfg).key == "box2mask_t" and cfg.model.arch == "mask2former"
    with pytest.raises(ConfigError, match="model.arch"):
        method_class(load_config(RECIPE, ["model.arch=condinst"]))
    with pytest.raises(ConfigError, match="level_set_channels"):
        method_class(load_config(RECIPE, ["model.mask2former.level_set_channels=0"]))
    with pytest.raises(ConfigError, match="hidden_dim"):
        load_config(RECIPE, ["model.mask2former.hidden_dim=48"])


def test_box_supervision_never_reads_gt_masks_and_reaches_every_head(tmp_path):
    torch.manual_seed(0)
    module = BoxMaskModule(m2f_cfg(tmp_path).to_dict(), ["nucleus"], [1])
    results = losses_real_and_garbage_masks(module)
    assert {k: v.item() for k, v in results[0].items()} == {k: v.item() for k, v in results[1].items()}
    losses = results[0]
    assert set(losses) == {"loss_ce", "loss_proj", "loss_levelset"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    for name in ("level_set_head", "decoder", "pixel_decoder", "backbone"):
        grads = [p.grad.abs().sum() for p in getattr(module.model, name).parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, name


def test_mask_supervised_reference_reads_the_masks(tmp_path, garbage_masks):
    torch.manual_seed(0)
    module = BoxMaskModule(m2f_cfg(tmp_path, "supervision.type=full").to_dict(), ["nucleus"], [1])
    module.model.eval()
    assert module.method.reads_gt_masks
    batch = sample_batch(load_masks=True)
    real = module.compute_losses(supervision_inputs(batch, True), 5)
    fake = module.compute_losses(supervision_inputs(garbage_masks(batch), True), 5)
    assert set(real) == {"loss_ce", "loss_mask_bce", "loss_mask_dice"}
    assert real["loss_mask_dice"].item() != fake["loss_mask_dice"].item()


def test_optimizer_groups_backbone_lr_and_no_decay_on_embeddings(tmp_path):
    cfg = m2f_cfg(tmp_path)
    module = BoxMaskModule(cfg.to_dict(), ["nucleus"], [1])
    opt = build_optimizer(module.model, cfg.solver)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    backbone = [p for p in module.model.backbone.parameters() if p.requires_grad]
    assert backbone and all(group_of[id(p)]["lr"] == pytest.approx(cfg.solver.base_lr * 0.1) for p in backbone)
    embeddings = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(group_of[id(p)]["weight_decay"] == 0.0 for p in embeddings)
    head = module.model.decoder
    linear = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
    assert group_of[id(linear.weight)]["weight_decay"] == cfg.solver.weight_decay
    assert group_of[id(linear.weight)]["lr"] == pytest.approx(cfg.solver.base_lr)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in module.model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def m2f_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("box2mask_t_run")
    assert main(["train", RECIPE, *TINY_M2F, f"trainer.output_dir={out}", "solver.max_iters=2"]) == 0
    return out / "checkpoints" / "model_final.ckpt"


def test_cli_train_eval_predict_annotate(m2f_checkpoint, tmp_path):
    assert m2f_checkpoint.is_file()
    p = sample_paths()
    ev = tmp_path / "eval"
    assert main(["eval", str(m2f_checkpoint), "-o", str(ev), "--device", "cpu"]) == 0
    metrics = assert_eval_output_consistent(ev, p["val_json"])
    assert set(metrics) == {"model", "boxfill"}
    pred = tmp_path / "pred"
    image = sorted(p["image_dir"].iterdir())[0]
    assert main(["predict", str(m2f_checkpoint), str(image), "-o", str(pred), "--device", "cpu"]) == 0
    results = json.loads((pred / "results.json").read_text())
    assert results and all(0.0 <= r["score"] <= 1.0 for r in results) and len(results) <= 8
    check_annotate_one_sample_image(main, m2f_checkpoint, tmp_path)


def test_box_conditioned_masks_pick_a_query_per_box(m2f_checkpoint):
    from boxmask.engine.inference import load_checkpoint

    model, cfg, _ = load_checkpoint(m2f_checkpoint)
    batch = sample_batch(load_masks=False)
    boxes = [t["boxes"] for t in batch.targets]
    out = model.box_conditioned_masks(batch.images, batch.image_sizes, boxes, [t["labels"] for t in batch.targets],
                                      candidates=3)
    for res, bx in zip(out, boxes):
        n = len(bx)
        assert res.logits.shape == (n, 1, batch.images.shape[-2] // 4, batch.images.shape[-1] // 4)
        assert res.loc_inds.shape == (n,) and int(res.loc_inds.max()) < cfg.model.mask2former.num_queries
        assert bool(res.inside.all()) and torch.isfinite(res.logits).all()
    with pytest.raises(ValueError):
        model.box_conditioned_masks(batch.images, batch.image_sizes, boxes, candidates=0)


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    straight = train(m2f_cfg(tmp_path / "a", "solver.max_iters=4"))
    first = train(m2f_cfg(tmp_path / "b", "solver.max_iters=2"))
    assert first["global_step"] == 2
    resumed = train(m2f_cfg(tmp_path / "b", "solver.max_iters=4"), resume="last")
    assert straight["global_step"] == resumed["global_step"] == 4
    pa = torch.load(straight["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    pb = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.allclose(pa[k].float(), pb[k].float(), atol=1e-6, rtol=1e-5), k
