"""End-to-end training behaviour: box supervision never reads masks, exact resume, CPU DDP,
and a real-data run whose mask AP beats its own box-filled detections."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from boxmask.config import load_config
from boxmask.engine.module import BoxMaskModule, supervision_inputs
from boxmask.engine.train import train

from helpers import TINY, sample_batch, tiny_cfg


def test_box_supervision_never_reads_gt_masks(tmp_path, garbage_masks):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    module = BoxMaskModule(cfg.to_dict(), ["nucleus"], [1])
    module.model.eval()  # fixed BN statistics so two forward passes are comparable
    batch = sample_batch(load_masks=True)
    assert batch.targets[0]["masks"].any(), "the real masks were loaded"
    garbage = garbage_masks(batch, flip_has_mask=True)
    losses = []
    for b in (batch, garbage):
        inputs = supervision_inputs(b, module.method.reads_gt_masks)
        assert inputs.masks is None and inputs.has_mask is None
        losses.append({k: v.item() for k, v in module.compute_losses(inputs, 5).items()})
    assert losses[0] == losses[1]
    assert losses[0]["loss_proj"] > 0 and losses[0]["loss_pairwise"] > 0


@pytest.mark.parametrize("recipe", ["boxinst_effnet-lite0_fpn_dsb2018-sample", "box2mask_t_effnet-lite0_dsb2018-sample"])
def test_channels_last_changes_only_rounding(tmp_path, recipe):
    """trainer.channels_last puts every 4-D weight (and so every convolution output) in NHWC; the losses and
    their gradients equal the NCHW network's up to float rounding."""
    torch.set_num_threads(1)
    batch = sample_batch(load_masks=False)
    out = {}
    for cl in (False, True):
        cfg = load_config(recipe, TINY + [f"trainer.output_dir={tmp_path}", f"trainer.channels_last={cl}",
                                          "model.backbone_weights=none"])
        torch.manual_seed(0)
        module = BoxMaskModule(cfg.to_dict(), ["nucleus"], [1])
        module.model.eval()
        convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
        # NHWC: the channel dimension has stride 1 (ambiguous for 1x1 kernels and one input channel, left out)
        assert convs and all((w.stride(1) == 1) == cl for w in convs if w.shape[1] > 1 and w.shape[2:] != (1, 1))
        losses = module.compute_losses(supervision_inputs(batch, False), 5)
        sum(losses.values()).backward()
        out[cl] = ({k: v.item() for k, v in losses.items()},
                   {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = out[False], out[True]
    assert l0.keys() == l1.keys() and all(l1[k] == pytest.approx(l0[k], rel=1e-4, abs=1e-6) for k in l0)
    assert g0.keys() == g1.keys()
    # biases feeding a GroupNorm get ~0 gradient (the norm removes them): only rounding noise there
    scale = max(g.abs().max().item() for g in g0.values())
    worst = 0.0
    for n in g0:
        big = g0[n].abs().max().item()
        if big > 1e-6 * scale:
            # summation order differs through the layers, and the deformable-attention offsets' gradients go
            # through bilinear sampling positions
            worst = max(worst, (g0[n] - g1[n]).abs().max().item() / big)
    print(f"worst relative gradient difference {worst:.2e}")
    assert worst <= 1e-2


def _params(ckpt_path):
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return sd, {k: v for k, v in sd["state_dict"].items()}


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    straight = train(tiny_cfg(tmp_path / "a", "solver.max_iters=4"))
    first = train(tiny_cfg(tmp_path / "b", "solver.max_iters=2"))
    assert first["global_step"] == 2
    resumed = train(tiny_cfg(tmp_path / "b", "solver.max_iters=4"), resume="last")
    assert straight["global_step"] == resumed["global_step"] == 4
    a, pa = _params(straight["checkpoint"])
    b, pb = _params(resumed["checkpoint"])
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.allclose(pa[k].float(), pb[k].float(), atol=1e-6, rtol=1e-5), k
    # LR schedule and optimizer state continued too
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 4
    # the logged losses of steps 3-4 match the uninterrupted run
    def losses(d):
        import csv
        out = {}
        for f in sorted((Path(d) / "logs" / "csv").glob("version_*/metrics.csv")):
            out.update({int(r["step"]): float(r["loss"]) for r in csv.DictReader(open(f)) if r.get("loss")})
        return out
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in (2, 3):
        assert la[step] == pytest.approx(lb[step], rel=1e-5)


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "boxmask.cli", "train", "boxinst_effnet-lite0_fpn_dsb2018-sample", *TINY,
           f"trainer.output_dir={out}", "solver.max_iters=3", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.cpu_threads=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3
    ckpt = torch.load(out / "checkpoints" / "model_final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    # both ranks took part: Lightning announces each member of the process group
    assert "MEMBER: 1/2" in proc.stdout + proc.stderr and "MEMBER: 2/2" in proc.stdout + proc.stderr
