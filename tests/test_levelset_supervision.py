"""Level-set supervision (BoxLevelSet losses) on the CondInst network: box-only, trains every part
it should, and runs through the training driver and checkpoint reload."""

import pytest
import torch

from boxmask.config import ConfigError
from boxmask.engine.inference import load_checkpoint
from boxmask.engine.module import BoxMaskModule
from boxmask.engine.train import train
from boxmask.methods import method_for
from boxmask.supervision.levelset import LevelSetSupervision
from helpers import losses_real_and_garbage_masks, tiny_cfg

LEVELSET = ["supervision.type=levelset", "model.level_set_channels=5", "supervision.projection_weight=3.0"]


def test_levelset_needs_the_level_set_head(tmp_path):
    with pytest.raises(ConfigError, match="model.level_set_channels"):
        tiny_cfg(tmp_path, "supervision.type=levelset")
    cfg = tiny_cfg(tmp_path, *LEVELSET)
    assert isinstance(method_for(cfg, 1).supervision, LevelSetSupervision)


def test_levelset_losses_ignore_gt_masks_and_train_mask_and_level_set_heads(tmp_path):
    cfg = tiny_cfg(tmp_path, *LEVELSET)
    torch.manual_seed(0)
    module = BoxMaskModule(cfg.to_dict(), ["nucleus"], [1])
    results = losses_real_and_garbage_masks(module)
    assert {k: v.item() for k, v in results[0].items()} == {k: v.item() for k, v in results[1].items()}
    losses = results[0]
    assert {"loss_proj", "loss_levelset"} <= set(losses) and "loss_pairwise" not in losses
    assert torch.isfinite(losses["loss_levelset"]) and losses["loss_levelset"].item() > 0
    module.model.zero_grad()
    losses["loss_levelset"].backward()
    head = module.model.level_set_head.weight.grad
    assert head is not None and head.abs().sum() > 0, "F_ls gets a gradient through the deep energy"
    assert module.model.mask_branch.parameters().__next__().grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.head.parameters())  # controller


def test_levelset_training_runs_and_reloads(tmp_path):
    torch.set_num_threads(1)
    summary = train(tiny_cfg(tmp_path, *LEVELSET, "solver.max_iters=2"))
    assert summary["global_step"] == 2
    model, cfg, _ = load_checkpoint(summary["checkpoint"], "cpu")
    assert cfg.supervision.type == "levelset" and model.level_set_head is not None
