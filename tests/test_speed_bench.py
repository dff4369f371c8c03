"""bench/speed.py and bench/reference_losses.py: the benchmark runs end to end at a tiny size and writes
the issue's fields; the reference-style loss path equals ours; the measuring helpers are exact on
hand-computed cases."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from boxmask.methods import supervised_losses

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import speed  # noqa: E402
from reference_losses import ref_pairwise_nll, ref_projection_loss, unfold_without_center  # noqa: E402

from boxmask.supervision.boxinst import BoxInstSupervision, pairwise_loss, projection_loss  # noqa: E402

# small model so every test stays fast on a busy 2-core machine
TINY = ["model.fpn_channels=64", "model.head_convs=1", "model.mask_branch_channels=16", "model.mask_branch_convs=1"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loss_inputs(model_mode: str = "train"):
    cfg = speed.build_bench_config("lite0", TINY)
    batch, num_classes, _ = speed.load_batch("sample", (128, 128), 2)
    torch.manual_seed(0)
    model = speed.build_model(cfg.model, num_classes)
    model.train(model_mode == "train")
    inputs = speed.supervision_inputs(batch, with_masks=False)
    with torch.no_grad():
        _, inst = speed.heads_forward(model, speed.backbone_fpn_forward(model, batch.images), inputs)
    li = speed.LossInputs(inst.logits.detach(), inst.im_inds, inst.gt_inds, inst.labels, inputs, inst.stride)
    return cfg, model, batch, inputs, li


def test_benchmark_writes_issue_fields_and_paths_agree(tmp_path):
    out = tmp_path / "speed.jsonl"
    records = speed.main(["--configs", "lite0", "--image-size", "128", "--reps", "1", "--warmup", "0",
                          "--dataset", "sample", "--device", "cpu", "--threads", "1", "--output", str(out), "--levelset", "--sim",
                          *[a for o in TINY for a in ("--set", o)]])
    lines = out.read_text().splitlines()
    assert len(records) == 1 and len(lines) == 1
    rec = json.loads(lines[0])
    assert rec == json.loads(json.dumps(records[0]))
    missing = [k for k in speed.REQUIRED_FIELDS if k not in rec]
    assert not missing, missing
    assert rec["benchmark"] == "speed" and rec["config"] == "lite0"
    assert rec["batch"] == 2 and rec["image_size"] == [128, 128] and rec["padded_size"] == [128, 128]
    assert rec["mask_size"] == [32, 32] and rec["num_instances"] > 0
    assert rec["device"].startswith("CPU") and "(1 threads)" in rec["device"]
    for key in ("step_s", "backbone_fpn_s", "heads_s", "loss_path_s", "optimizer_s", "ref_loss_path_s",
                "loss_lab_similarity_s", "loss_projection_s", "loss_pairwise_s", "infer_img_per_s"):
        assert isinstance(rec[key], float) and rec[key] > 0, key
    assert rec["loss_speedup"] == pytest.approx(rec["ref_loss_path_s"] / rec["loss_path_s"])
    assert rec["loss_fraction"] == pytest.approx(rec["loss_path_s"] / rec["step_s"])
    assert rec["loss_peak_mem_bytes"] > 0 and rec["ref_loss_peak_mem_bytes"] > 0
    assert rec["loss_mem_ratio"] == pytest.approx(rec["loss_peak_mem_bytes"] / rec["ref_loss_peak_mem_bytes"])
    assert rec["mem_method"] == "torch_profiler_cpu_allocator_events"
    # the reference path keeps several [K, 8, h, w] float tensors alive (unfold copies, edge weights);
    # ours keeps the per-image similarity plus [K, h, w] temporaries. Memory is deterministic.
    k, (h, w) = rec["num_instances"], rec["mask_size"]
    assert rec["ref_loss_peak_mem_bytes"] >= 4 * (k * 8 * h * w * 4)
    assert rec["loss_peak_mem_bytes"] < 3 * (k * 8 * h * w * 4)
    assert rec["loss_mem_ratio"] <= 0.5
    assert rec["loss_max_rel_diff"] <= 1e-4
    assert rec["pairwise_grad_max_rel_diff"] <= 1e-4
    assert set(rec["loss_values"]["ours"]) == set(rec["loss_values"]["ref"]) == {"loss_proj", "loss_pairwise"}
    assert rec["infer_detections_per_img"] == 100  # score threshold 0: the max_detections cap
    assert rec["commit"] and len(rec["date"]) == 10
    assert set(rec["targets"]) == {"loss_speedup>=3", "loss_mem_ratio<=0.5", "loss_max_rel_diff<=1e-4",
                                   "loss_fraction<0.15", "levelset_fraction<=0.3"}
    assert rec["levelset_step_s"] > 0 and rec["levelset_loss_path_s"] > 0 and rec["levelset_loss_peak_mem_bytes"] > 0
    assert rec["levelset_fraction"] == pytest.approx(rec["levelset_loss_path_s"] / rec["levelset_step_s"])
    # SIM: a full bank of the batch's own images (capacity 100), the step ratio over BoxInst's
    assert rec["sim_step_s"] > 0 and rec["sim_bank_entries"] == 100 and rec["sim_bank_bytes"] > 0
    assert rec["sim_overhead"] == pytest.approx(rec["sim_step_s"] / rec["step_s"] - 1.0)


def test_boxlevelset_rows_time_the_level_set_share_of_a_solov2_step(tmp_path):
    out = tmp_path / "speed.jsonl"
    tiny = ["model.fpn_channels=32", "model.solov2.head_channels=32", "model.head_convs=1",
            "model.mask_branch_channels=16", "model.mask_channels=16"]
    (rec,) = speed.main(["--configs", "lite0", "--boxlevelset", "--image-size", "128", "--reps", "1", "--warmup", "0",
                         "--dataset", "sample", "--device", "cpu", "--output", str(out),
                         *[a for o in tiny for a in ("--set", o)]])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec))
    assert rec["benchmark"] == "boxlevelset_step" and rec["recipe"].startswith("boxlevelset_")
    assert rec["boxlevelset_positives"] > 0
    assert 0 < rec["boxlevelset_loss_path_s"] and 0 < rec["boxlevelset_step_s"]
    assert rec["boxlevelset_fraction"] == pytest.approx(rec["boxlevelset_loss_path_s"] / rec["boxlevelset_step_s"])
    assert rec["boxlevelset_loss_peak_mem_bytes"] > 0


def test_box2mask_t_rows_split_the_step(tmp_path):
    out = tmp_path / "speed.jsonl"
    tiny = ["model.mask2former.hidden_dim=32", "model.mask2former.num_queries=6", "model.mask2former.encoder_layers=1",
            "model.mask2former.decoder_layers=2", "model.mask2former.mask_dim=32", "model.mask2former.heads=4",
            "supervision.box2mask_t.work_size=24"]
    (rec,) = speed.main(["--configs", "lite0", "--box2mask-t", "--image-size", "96", "--reps", "1", "--warmup", "0",
                         "--dataset", "sample", "--device", "cpu", "--output", str(out),
                         *[a for o in tiny for a in ("--set", o)]])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec))
    assert rec["benchmark"] == "box2mask_t_step" and rec["recipe"].startswith("box2mask_t_")
    assert rec["queries"] == 6 and rec["decoder_layers"] == 2 and rec["gt_instances"] > 0
    parts = ("backbone", "pixel_decoder", "transformer_decoder", "matching", "losses")
    assert all(rec[f"box2mask_t_{p}_s"] > 0 for p in parts) and rec["box2mask_t_step_s"] > 0


def test_paths_agree_on_varied_logits():
    """Model logits at initialisation are nearly constant; spread them so every edge weight matters."""
    cfg, _, _, _, li = _loss_inputs()
    g = torch.Generator().manual_seed(3)
    li.logits = torch.randn(li.logits.shape, generator=g) * 4.0
    sup = speed.unit_supervision_config(cfg.supervision)
    ours, g_ours = speed.ours_loss_path(li, sup)
    ref, g_ref = speed.ref_loss_path(li, sup)
    assert ours["loss_pairwise"].item() > 0.1
    for key in ("loss_proj", "loss_pairwise"):
        assert ours[key].item() == pytest.approx(ref[key].item(), rel=1e-4), key
    # a changed colour threshold changes the reference's value: the comparison is not vacuous
    ref_thr, _ = speed.ref_loss_path(li, dataclasses.replace(sup, color_threshold=0.6))
    assert abs(ref_thr["loss_pairwise"].item() - ref["loss_pairwise"].item()) > 1e-3
    stages = speed._stage_fns(li, sup)
    assert speed.max_rel_diff(stages["pairwise"](), stages["ref_pairwise"]()) < 1e-4
    # random float logits have no ties, so the whole-path gradients agree as well
    assert speed.max_rel_diff(g_ours, g_ref) < 1e-4


def test_pairwise_and_projection_hand_case():
    """Logits 0 on a 4x4 map, dilation 2: every in-map edge costs -log(1/2); edges leaving the map cost 0
    but count in the normaliser. In-map edges: 4 diagonal offsets x 2*2 + 4 axial offsets x 2*4 = 48 of 128."""
    logits = torch.zeros(1, 1, 4, 4)
    sim = torch.ones(1, 8, 4, 4)
    box = torch.ones(1, 4, 4)
    expected = 48 * math.log(2.0) / 128
    assert pairwise_loss(logits, sim, box).item() == pytest.approx(expected, rel=1e-6)
    nll = ref_pairwise_nll(logits)
    assert nll.shape == (1, 8, 4, 4)
    assert (nll * sim).sum().item() / 128 == pytest.approx(expected, rel=1e-6)
    # p = 1/2 everywhere, box = top-left 2x2: each projection dice = 1 - 2*1 / (4/4 + 2) = 1/3
    box2 = torch.zeros(1, 4, 4)
    box2[0, :2, :2] = 1
    assert ref_projection_loss(logits.sigmoid(), box2[:, None]).item() == pytest.approx(2 / 3, rel=1e-5)
    assert projection_loss(logits, box2).item() == pytest.approx(2 / 3, rel=1e-5)


def test_unfold_without_center_order():
    """Neighbour o is the (dy, dx) tap in row-major order with the centre dropped, zero outside."""
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    nb = unfold_without_center(x, 3, 2)
    assert nb.shape == (1, 1, 8, 5, 5)
    # centre (2, 2): neighbours at (0,0) (0,2) (0,4) (2,0) (2,4) (4,0) (4,2) (4,4)
    assert nb[0, 0, :, 2, 2].tolist() == [0.0, 2.0, 4.0, 10.0, 14.0, 20.0, 22.0, 24.0]
    assert nb[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 10.0, 12.0]


def test_heads_forward_matches_the_models_forward_train():
    """The benchmark's split (backbone_fpn_forward + heads_forward + supervision) is the model's forward."""
    cfg, model, batch, inputs, li = _loss_inputs("eval")  # eval: fixed BN statistics
    sup = BoxInstSupervision(speed.unit_supervision_config(cfg.supervision))
    with torch.no_grad():
        whole = supervised_losses(model, sup, inputs, 0)
        fcos, inst = speed.heads_forward(model, speed.backbone_fpn_forward(model, batch.images), inputs)
        split = {**fcos, **sup.losses(inst, inputs, 0)}
    assert set(whole) == set(split)
    for key in whole:
        assert split[key].item() == pytest.approx(whole[key].item(), rel=1e-5, abs=1e-7), key


def test_cpu_peak_bytes_hand_case():
    mib = 1 << 20

    def fn():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(mib // 2, dtype=torch.uint8)
        del b, c

    assert speed.cpu_peak_bytes(fn) == 3 * mib
    assert speed.cpu_peak_bytes(lambda: None) == 0


def test_parse_image_size_and_unknown_config():
    assert speed.parse_image_size("512") == (512, 512)
    assert speed.parse_image_size("800x1333") == (800, 1333)
    for bad in ("0", "12x", "axb", "1x2x3"):
        with pytest.raises(ValueError):
            speed.parse_image_size(bad)
    with pytest.raises(KeyError, match="unknown benchmark config"):
        speed.build_bench_config("r101")
    with pytest.raises(ValueError, match="reps"):
        speed.time_call(lambda: None, torch.device("cpu"), reps=0, warmup=0)
