"""SIM training wiring (methods.md §5): config, momentum teacher, prototypes, pseudo-mask loss,
box-only supervision, exact resume and student-only checkpoint loading."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from boxmask.config import ConfigError, SupervisionConfig
from boxmask.engine.inference import load_checkpoint
from boxmask.engine.module import BoxMaskModule, supervision_inputs
from boxmask.engine.train import train
from boxmask.methods import supervised_losses
from boxmask.methods.sim import teacher_inputs
from boxmask.modeling.condinst import CondInst
from boxmask.supervision.boxinst import BoxInstSupervision
from boxmask.supervision.sim_supervision import SIMSupervision
from helpers import ALL_BOX_PIXELS, SIM, SIM_RUN, sample_batch, tiny_cfg


def _module(tmp_path, *extra) -> BoxMaskModule:
    torch.manual_seed(0)
    return BoxMaskModule(tiny_cfg(tmp_path, *SIM, *extra).to_dict(), ["nucleus"], [1])


def _losses(module: BoxMaskModule, batch, step: int) -> dict[str, torch.Tensor]:
    inputs = supervision_inputs(batch, module.method.reads_gt_masks)
    assert inputs.masks is None and inputs.has_mask is None
    return module.compute_losses(inputs, step)


def test_sim_config_defaults_and_validation(tmp_path):
    sup = SupervisionConfig()
    assert (sup.sim.teacher_momentum, sup.sim.num_prototypes, sup.sim.prototype_momentum) == (0.9999, 10, 0.999)
    assert (sup.sim.temperature, sup.sim.instance_map, sup.sim.pseudo_loss, sup.sim.warmup_iters) == (0.1, "iou", "paper", 10000)
    assert sup.sim.high_range == [0.7, 0.8] and sup.sim.pseudo_weight == 0.5
    with pytest.raises(ConfigError, match="model.arch=condinst"):
        tiny_cfg(tmp_path, *SIM, "model.arch=solov2")
    with pytest.raises(ConfigError, match="sim.instance_map"):
        tiny_cfg(tmp_path, *SIM, "supervision.sim.instance_map=median")
    with pytest.raises(ConfigError, match="sim.pseudo_loss"):
        tiny_cfg(tmp_path, *SIM, "supervision.sim.pseudo_loss=dice")
    with pytest.raises(ConfigError, match="sim.high_range"):
        tiny_cfg(tmp_path, *SIM, "supervision.sim.high_range=[0.8,0.7]")
    # non-SIM recipes ignore the sim_* fields
    tiny_cfg(tmp_path, "supervision.sim.pseudo_loss=dice")
    cfg = tiny_cfg(tmp_path, *SIM)
    with pytest.raises(ValueError, match="num_classes"):
        SIMSupervision(cfg.supervision, 0, 16)
    sup = SIMSupervision(cfg.supervision, 3, 16)
    assert isinstance(sup, SIMSupervision) and sup.prototypes.shape == (3, 10, 16)
    assert torch.allclose(sup.prototypes.norm(dim=2), torch.ones(3, 10))


def test_sim_module_owns_teacher_and_prototypes(tmp_path):
    module = _module(tmp_path)
    teacher, student, sup = module.teacher, module.model, module.supervision
    assert isinstance(teacher, CondInst) and teacher is not student and module.method.teacher is teacher
    assert list(sup.children()) == [], "the teacher is not a submodule of the supervision"
    for (nt, pt), (ns, ps) in zip(teacher.named_parameters(), student.named_parameters()):
        assert nt == ns and torch.equal(pt, ps) and not pt.requires_grad
    keys = module.state_dict().keys()
    assert "supervision.prototypes" in keys
    assert {k[len("teacher."):] for k in keys if k.startswith("teacher.")} == set(student.state_dict())
    module.train()
    assert student.training and not teacher.training and not any(m.training for m in teacher.modules())
    opt = module.configure_optimizers()["optimizer"]
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in opt.param_groups for p in g["params"])
    # the other supervisions stay plain objects without a teacher
    plain = BoxMaskModule(tiny_cfg(tmp_path).to_dict(), ["nucleus"], [1])
    assert getattr(plain, "teacher", None) is None and not isinstance(plain.supervision, torch.nn.Module)


def test_teacher_reruns_the_students_positives(tmp_path):
    """A fresh teacher (= student copy) at the same positives reproduces the student's masks exactly."""
    module = _module(tmp_path)
    module.model.eval()  # same BN statistics as the (always eval) teacher
    batch = sample_batch(load_masks=False)
    captured = {}
    forward_train = module.model.forward_train

    def spy(*args):
        captured["out"] = forward_train(*args)
        return captured["out"]

    module.model.forward_train = spy
    _losses(module, batch, 0)
    out = captured["out"]
    inst, pos = out.instance_groups[0], out.positives
    assert len(inst) > 0 and pos.pred_boxes.shape == (len(inst), 4) and out.features.mask_feats.shape[1] == 16
    # the positive's FCOS location lies inside the box it regresses
    assert ((pos.pred_boxes[:, :2] <= pos.locations) & (pos.locations <= pos.pred_boxes[:, 2:])).all()
    sim_inputs = teacher_inputs(module.teacher, out, batch.images, inst)
    probs, feats = sim_inputs.teacher_probs, sim_inputs.teacher_feats
    assert sim_inputs.student_feats is out.features.mask_feats and sim_inputs.pred_boxes is pos.pred_boxes
    assert torch.allclose(probs, inst.logits.sigmoid()[:, 0], atol=1e-6)
    assert feats.shape == (2, 16, *inst.logits.shape[-2:])
    # the features are the student's stride-8 mask features, bilinearly upsampled x2 (not normalised)
    expected = torch.nn.functional.interpolate(out.features.mask_feats.float(), size=feats.shape[-2:], mode="bilinear",
                                               align_corners=False)
    assert torch.allclose(feats, expected, atol=1e-5)


class _Snapshots(L.Callback):
    """Teacher/student parameters before the step and the teacher as a batch-end callback sees it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.teacher_before = {k: v.detach().clone() for k, v in pl_module.teacher.state_dict().items()}
        self.student_before = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # callbacks run before the module's own batch-end hook: the EMA must already be applied
        self.teacher_at_callback = {k: v.detach().clone() for k, v in pl_module.teacher.state_dict().items()}


@pytest.mark.filterwarnings("ignore:.*in eval mode at the start of training")  # the teacher, on purpose
def test_ema_teacher_after_one_optimizer_step(tmp_path):
    m = 0.5  # large enough that a missing or wrong EMA is visible
    module = _module(tmp_path, f"supervision.sim.teacher_momentum={m}")
    with torch.no_grad():  # start from a teacher that differs from the student
        g = torch.Generator().manual_seed(3)
        for p in module.teacher.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    batch = sample_batch(load_masks=False)
    snaps = _Snapshots()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snaps],
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    assert trainer.global_step == 1
    teacher = module.teacher.state_dict()
    student = module.model.state_dict()
    params = {n for n, _ in module.model.named_parameters()}
    moved = 0
    for name in params:
        expected = m * snaps.teacher_before[name] + (1 - m) * student[name]
        assert torch.allclose(teacher[name], expected, atol=1e-7, rtol=1e-6), name
        assert torch.equal(snaps.teacher_at_callback[name], teacher[name]), name
        moved += not torch.equal(student[name], snaps.student_before[name])
    assert moved > 0, "the student was updated"
    teacher_buffers = dict(module.teacher.named_buffers())
    for name, buf in module.model.named_buffers():  # BN statistics are copied, not averaged
        assert torch.equal(teacher_buffers[name], buf), name
    assert all(p.grad is None for p in module.teacher.parameters())
    assert not module.teacher.training


def test_sim_losses_ignore_gt_masks(tmp_path, garbage_masks):
    module = _module(tmp_path, ALL_BOX_PIXELS)
    module.model.eval()  # fixed BN statistics so two forward passes are comparable
    batch = sample_batch(load_masks=True)
    assert batch.targets[0]["masks"].any(), "the real masks were loaded"
    garbage = garbage_masks(batch, flip_has_mask=True)
    protos = module.supervision.prototypes.clone()
    results = []
    for b in (batch, garbage):
        module.supervision.prototypes.copy_(protos)  # each call updates the prototypes: start both alike
        results.append({k: v.item() for k, v in _losses(module, b, 5).items()})
        results[-1]["prototypes"] = module.supervision.prototypes.clone()
    assert torch.equal(results[0].pop("prototypes"), results[1].pop("prototypes"))
    assert results[0] == results[1]
    assert set(results[0]) >= {"loss_proj", "loss_pairwise", "loss_pseudo"}
    assert results[0]["loss_pseudo"] > 0


def test_loss_pseudo_zero_before_warmup_positive_after(tmp_path):
    module = _module(tmp_path, "supervision.sim.warmup_iters=2")
    module.model.eval()
    batch = sample_batch(load_masks=False)
    before = _losses(module, batch, 1)
    after = _losses(module, batch, 2)
    assert before.keys() == after.keys() and "loss_pseudo" in before
    assert before["loss_pseudo"].item() == 0 and before["loss_pseudo"].requires_grad
    assert before["loss_pseudo"].dtype == after["loss_pseudo"].dtype == torch.float32
    assert after["loss_pseudo"].item() > 0 and torch.isfinite(after["loss_pseudo"])
    # the BoxInst terms are untouched by SIM: same values as the BoxInst supervision at the same step
    boxinst = BoxInstSupervision(dataclasses.replace(module.cfg.supervision, type="boxinst"))
    inputs = supervision_inputs(batch, False)
    ref = supervised_losses(module.model, boxinst, inputs, 2)
    for k in ref:
        assert after[k].item() == pytest.approx(ref[k].item(), rel=1e-6, abs=1e-7), k


def test_loss_pseudo_gradients_reach_student_not_teacher(tmp_path):
    module = _module(tmp_path)
    batch = sample_batch(load_masks=False)
    loss = _losses(module, batch, 1)["loss_pseudo"]
    assert loss.item() > 0
    module.model.zero_grad()
    loss.backward()
    mb = [p.grad for p in module.model.mask_branch.parameters()]
    assert all(g is not None for g in mb) and sum(g.abs().sum() for g in mb) > 0, "mask branch gets gradient"
    ctrl = module.model.head.controller.weight.grad
    assert ctrl is not None and ctrl.abs().sum() > 0, "controller (dynamic mask head params) gets gradient"
    assert all(p.grad is None for p in module.teacher.parameters())


def test_prototypes_move_and_stay_unit_norm(tmp_path):
    module = _module(tmp_path, ALL_BOX_PIXELS)
    batch = sample_batch(load_masks=False)
    init = module.supervision.prototypes.clone()
    history = [init]
    for step in range(3):
        _losses(module, batch, step)  # updated every step, also during the warm-up (step 0)
        history.append(module.supervision.prototypes.clone())
    for protos in history:
        assert protos.dtype == torch.float32
        assert torch.allclose(protos.norm(dim=2), torch.ones(protos.shape[:2]), atol=1e-5)
    for a, b in zip(history, history[1:]):
        assert not torch.equal(a, b)


def _sync_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        sup = SIMSupervision(SupervisionConfig(type="sim"), num_classes=2, mask_channels=4)
        sup.prototypes.copy_(F.normalize(torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(rank)), dim=2))
        sup._sync_prototypes()
        # a numpy copy is pickled by value: a torch tensor would travel as a shared-memory handle that the
        # parent can only open while this process is alive, a race under load
        queue.put((rank, sup.prototypes.numpy().copy()))
        dist.destroy_process_group()
    except BaseException as exc:  # report instead of leaving the parent to time out on the queue
        queue.put((rank, f"{type(exc).__name__}: {exc}"))
        raise


def test_prototypes_all_reduce_average_under_ddp(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, str(tmp_path / "pg"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = {r: v for r, v in out.items() if isinstance(v, str)}
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0, 0]
    out = {r: torch.from_numpy(v) for r, v in out.items()}
    mean = sum(F.normalize(torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(r)), dim=2) for r in range(2)) / 2
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], F.normalize(mean, dim=2), atol=1e-6)


# --------------------------------------------------------------------------- training driver / checkpoints

def _assert_same_state(a, b, key: str = "") -> None:
    """Recursive equality of state-dict values (tensors within tolerance; the bank is nested dicts/lists)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), key
        for k in a:
            _assert_same_state(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{key}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, key
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-5), key
    else:
        assert a == b, key


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_sim_resume_continues_exactly(tmp_path, sim_run):
    torch.set_num_threads(1)
    first = train(tiny_cfg(tmp_path, *SIM_RUN, "solver.max_iters=2"))
    assert first["global_step"] == 2
    at2 = _state(first["checkpoint"])["state_dict"]
    resumed = train(tiny_cfg(tmp_path, *SIM_RUN, "solver.max_iters=4"), resume="last")
    assert sim_run["global_step"] == resumed["global_step"] == 4
    pa = _state(sim_run["checkpoint"])["state_dict"]
    pb = _state(resumed["checkpoint"])["state_dict"]
    assert pa.keys() == pb.keys()
    assert "supervision.prototypes" in pa and any(k.startswith("teacher.") for k in pa)
    for k in pa:
        _assert_same_state(pa[k], pb[k], k)
    # the memory bank is in the checkpoint, full at step 2, and refilled by the pasted steps 2-3 after the resume
    bank2, bank4 = at2["supervision._extra_state"]["bank"], pb["supervision._extra_state"]["bank"]
    assert bank2["capacity"] == 2 and len(bank2["entries"]) == 2 and len(bank4["entries"]) == 2
    assert all(e["masks"].shape[0] >= 1 for e in bank4["entries"])
    assert not torch.equal(bank2["entries"][0]["image"], bank4["entries"][0]["image"])
    # and the resumed steps 2-3 really pasted (paste loss logged > 0), like the straight run
    for run in (sim_run, resumed):
        paste = {int(r["step"]): float(r["loss_paste"])
                 for log in Path(run["checkpoint"]).parents[1].glob("logs/csv/version_*/metrics.csv")
                 for r in csv.DictReader(log.open()) if r.get("loss_paste")}
        assert paste[0] == paste[1] == 0 and paste[2] > 0 and paste[3] > 0
    # the compared state is not trivial: the prototypes moved after the resume and the teacher lags the student
    protos = pb["supervision.prototypes"]
    assert not torch.equal(protos, at2["supervision.prototypes"])
    assert torch.allclose(protos.norm(dim=2), torch.ones(protos.shape[:2]), atol=1e-5)
    name = "model.mask_branch.out.weight"
    assert not torch.allclose(pb[name], pb["teacher." + name[len("model."):]])


def test_load_checkpoint_builds_only_the_student(sim_run):
    torch.set_num_threads(1)
    path = sim_run["checkpoint"]
    ckpt = _state(path)
    model, cfg, meta = load_checkpoint(path, "cpu")
    assert isinstance(model, CondInst) and cfg.supervision.type == "sim" and meta["global_step"] == 4
    keys = set(model.state_dict())
    assert keys == {k[len("model."):] for k in ckpt["state_dict"] if k.startswith("model.")}
    assert not any("teacher" in k or "prototypes" in k for k in keys)
    # the full training module restores strictly (teacher + prototypes included)
    module = BoxMaskModule(ckpt["hyper_parameters"]["config"], ["nucleus"], [1])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    batch = sample_batch(load_masks=False)
    with torch.no_grad():
        ours = model.features(batch.images)
        student = module.model.features(batch.images)
        teacher = module.teacher.features(batch.images)
    for name in ("cls_logits", "bbox_reg", "ctrness", "params", "mask_feats"):
        a, b = getattr(ours, name), getattr(student, name)
        for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
            assert torch.equal(x, y), name
    assert not torch.equal(ours.mask_feats, teacher.mask_feats), "the loaded network is the student, not the teacher"
    preds = model.predict(batch.images, batch.image_sizes, batch.orig_sizes)
    ref = module.model.predict(batch.images, batch.image_sizes, batch.orig_sizes)
    for p, r in zip(preds, ref):
        assert torch.equal(p.boxes, r.boxes) and torch.equal(p.scores, r.scores) and torch.equal(p.masks, r.masks)
