"""Nested config sections (issue 12): ``supervision.sim``, ``supervision.levelset``, ``model.solov2``; old flat
keys are errors that name their new key; configs of old checkpoints are translated."""

from __future__ import annotations

import copy

import pytest
import torch

from boxmask.config import ConfigError, load_config, packaged_config_names, translate_legacy_config
from boxmask.engine.inference import load_checkpoint, read_checkpoint
from boxmask.methods import method_class

OLD_TO_NEW = [
    ("supervision.sim_alpha=0.3", "supervision.sim.alpha"),
    ("supervision.sim_warmup_iters=5", "supervision.sim.warmup_iters"),
    ("supervision.levelset_img_weight=0.1", "supervision.levelset.img_weight"),
    ("model.solo_grids=[40,36,24,16,12]", "model.solov2.grids"),
    ("model.solo_head_channels=64", "model.solov2.head_channels"),
    ("model.matrix_nms_sigma=3.0", "model.solov2.matrix_nms_sigma"),
]


@pytest.mark.parametrize("old,new", OLD_TO_NEW)
def test_an_old_flat_key_is_an_error_naming_its_new_key(old, new):
    with pytest.raises(ConfigError, match=f"renamed '{new}'"):
        load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", [old])
    value = old.split("=")[1]
    obj = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", [f"{new}={value}"])
    for part in new.split("."):
        obj = getattr(obj, part)
    assert str(obj).replace(" ", "") == value or obj == float(value)


def test_nested_values_reach_their_section():
    cfg = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample",
                      ["supervision.sim.alpha=0.3", "supervision.levelset.img_weight=0.1", "model.solov2.sigma=0.3"])
    assert (cfg.supervision.sim.alpha, cfg.supervision.levelset.img_weight, cfg.model.solov2.sigma) == (0.3, 0.1, 0.3)
    # a section is checked by its method (SIM) or its network (SOLOv2), before training
    with pytest.raises(ConfigError, match="supervision.sim.alpha must be in"):
        method_class(load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", ["supervision.type=sim", "supervision.sim.alpha=2"]))
    method_class(load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", ["supervision.sim.alpha=2"]))  # unused: BoxInst
    with pytest.raises(ConfigError, match="model.solov2.sigma"):
        load_config("boxlevelset_effnet-lite0_fpn_dsb2018-sample", ["model.solov2.sigma=-1"])
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", ["supervision.sim.bogus=1"])


def test_mask_largest_component_is_checked():
    assert load_config("box2mask_t_effnet-lite0_nuts").model.mask_largest_component is True
    assert load_config("box2mask_t_R_50_50e").model.mask_largest_component is False  # the paper's post-processing
    with pytest.raises(ConfigError, match="mask2former only, not 'condinst'"):
        load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", ["model.mask_largest_component=true"])
    with pytest.raises(ConfigError, match="mask_largest_component: expected true/false, got 3"):
        load_config("box2mask_t_effnet-lite0_nuts", ["model.mask_largest_component=3"])


def test_the_removed_method_key_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: boxinst\ndata:\n  builtin: sample\n")
    with pytest.raises(ConfigError, match="'method' was removed.*supervision.type"):
        load_config(path)


def _flatten(cfg: dict) -> dict:
    """A recipe dict as written before the nested sections."""
    old = copy.deepcopy(cfg)
    old["method"] = "boxinst"
    sup, model = old["supervision"], old["model"]
    for k, v in sup.pop("sim").items():
        sup[f"sim_{k}"] = v
    for k, v in sup.pop("levelset").items():
        sup[f"levelset_{k}"] = v
    for k, v in model.pop("solov2").items():
        model[k if k.startswith("matrix_nms_") else f"solo_{k}"] = v
    return old


def test_translate_legacy_config_round_trips_every_packaged_recipe():
    for name in packaged_config_names():
        new = load_config(name, validate=False).to_dict()
        old = _flatten(new)
        assert "sim" not in old["supervision"] and "solo_grids" in old["model"]
        assert translate_legacy_config(old) == new, name
        assert translate_legacy_config(new) == new, "a new config is left unchanged"


def test_a_checkpoint_with_a_flat_config_still_loads(boxinst_checkpoint, tmp_path):
    """A checkpoint written before the nested sections (its config flat) loads for eval/predict/annotate."""
    ckpt = torch.load(boxinst_checkpoint, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"] = _flatten(ckpt["hyper_parameters"]["config"])
    old_path = tmp_path / "old.ckpt"
    torch.save(ckpt, old_path)
    assert read_checkpoint(old_path)["hyper_parameters"]["config"] == \
        read_checkpoint(boxinst_checkpoint)["hyper_parameters"]["config"]
    model_old, cfg_old, _ = load_checkpoint(old_path)
    model_new, cfg_new, _ = load_checkpoint(boxinst_checkpoint)
    assert cfg_old == cfg_new
    images = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    with torch.no_grad():
        a = model_old.features(images).mask_feats
        b = model_new.features(images).mask_feats
    assert torch.equal(a, b)
