"""ONNX export (issue 15): onnxruntime outputs equal the PyTorch outputs for both exported families, at two
input sizes of one dynamic model; metadata round trip; ``eval --onnx`` / ``predict --onnx`` equal the PyTorch
path; clear errors (unknown family, missing extra, wrong input)."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import onnxruntime  # the export tests must run in CI (``.[test]`` installs the export extra)

from boxmask.cli import main
from boxmask.config import load_config
from boxmask.data.coco import read_image_rgb
from boxmask.data.sample import sample_paths
from boxmask.engine.export import (ExportError, OnnxModel, aligned_upsample_crop, export_onnx, read_metadata,
                                   require_onnx)
from boxmask.engine.inference import load_checkpoint
from boxmask.modeling import build_model
from boxmask.ops import aligned_bilinear
from boxmask.modeling.fcos import flatten_levels
from boxmask.modeling.solov2 import point_nms

from helpers import TINY

SOLO = ["model.arch=solov2", "model.solov2.head_channels=32", "model.mask_channels=16", "model.level_set_channels=0"]
#: recipe overrides of each exported family variant (SOLOv2 with and without the position prior)
VARIANTS = {"condinst": [], "solov2": SOLO, "solov2_prior": SOLO + ["model.solov2.position_prior=true"]}
#: the two input sizes the one dynamic model is run at (H, W); neither a multiple of 32
SIZES = ((160, 200), (216, 264))
#: candidate detections per image above the crafted score threshold (before NMS)
CANDIDATES_PER_IMAGE = 40


def _sample_batch(size: tuple[int, int], n: int = 4) -> torch.Tensor:
    """uint8 [n,3,H,W]: the first n images of the bundled sample resized to ``size``."""
    files = sorted(sample_paths()["image_dir"].iterdir())[:n]
    imgs = [F.interpolate(read_image_rgb(f)[None].float(), size=size, mode="bilinear", antialias=True)[0] for f in files]
    return torch.stack(imgs).round().clamp(0, 255).to(torch.uint8)


def _pad32(images: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[-2:]
    return F.pad(images, (0, (-w) % 32, 0, (-h) % 32))


def _candidate_scores(model, images: torch.Tensor) -> torch.Tensor:
    """Per-image candidate scores the family thresholds: σ(cls)·σ(ctr) (CondInst) or point-NMS'ed category
    probabilities (SOLOv2), ``[B, N]``."""
    with torch.no_grad():
        f = model.features(_pad32(images))
        if model.cfg.arch == "solov2":
            return torch.cat([point_nms(c.sigmoid()).flatten(1) for c in f.cates], 1)
        return (flatten_levels(f.cls_logits).sigmoid() * flatten_levels(f.ctrness).sigmoid()).flatten(1)


def crafted_checkpoint(path, family: str, seed: int = 0) -> str:
    """A randomly initialised network of a packaged sample recipe with crisp masks and spread-out scores: the
    class/mask output layers get larger random weights, and the score threshold is set so that about
    ``CANDIDATES_PER_IMAGE`` candidates per sample image pass it (real detections, fewer than the cap)."""
    extra = VARIANTS[family]
    cfg = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", TINY + extra + ["model.max_detections=50"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, 1)
    # batch-norm statistics of the sample images (as a trained network has): features of a sane scale
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model.features(_pad32(_sample_batch(SIZES[0])))
    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h = model.head
        if family.startswith("solov2"):
            h.cate_pred.weight.normal_(0, 0.3, generator=g)
            h.kernel_pred.weight.normal_(0, 3.0, generator=g)
        else:
            h.cls_logits.weight.normal_(0, 0.3, generator=g)
            h.ctrness.weight.normal_(0, 0.3, generator=g)
            h.bbox_pred.weight.normal_(0, 0.05, generator=g)
            h.bbox_pred.bias.fill_(0.5)
            h.controller.weight.normal_(0, 0.05, generator=g)
    scores = _candidate_scores(model, _sample_batch(SIZES[0]))
    ranked = scores.sort(1, descending=True).values
    # halfway between two candidates of one image: no candidate sits at the threshold
    mids = (ranked[:, CANDIDATES_PER_IMAGE - 1] + ranked[:, CANDIDATES_PER_IMAGE]) / 2
    cfg.model.score_threshold = float(mids.sort().values[len(mids) // 2])
    ckpt = {"hyper_parameters": {"config": cfg.to_dict(), "class_names": ["nucleus"], "cat_ids": [1]},
            "state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "global_step": 0}
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """(checkpoint, dynamic ONNX path) of each family."""
    d = tmp_path_factory.mktemp(f"export_{request.param}")
    ckpt = crafted_checkpoint(d / "model.ckpt", request.param)
    onnx_path = d / "model.onnx"
    export_onnx(ckpt, onnx_path, image_size=SIZES[0], dynamic=True)
    return ckpt, onnx_path


def _pytorch_reference(model, images: torch.Tensor) -> list[dict]:
    """The PyTorch path at input resolution: per image boxes, scores, labels, mask probabilities and binary
    masks (``predict`` with original size = input size; probabilities as its post-processing computes them)."""
    h, w = images.shape[-2:]
    padded = _pad32(images)
    sizes = [(h, w)] * len(images)
    preds = model.predict(padded, sizes, sizes)
    if model.cfg.arch == "solov2":
        probs = [p for _, _, p in model.predict_probs(padded, sizes)]
    else:
        _, logits = model.detect(padded, sizes)
        probs = [aligned_bilinear(lg.sigmoid(), model.mask_out_stride)[:, 0, :h, :w] for lg in logits]
    return [{"boxes": p.boxes, "scores": p.scores, "labels": p.labels, "probs": pr, "masks": p.masks}
            for p, pr in zip(preds, probs)]


def assert_same_detections(ref: dict, onnx: dict, thr: float) -> None:
    """Same detections after sorting (matched one-to-one by score and box), boxes within 1e-3 px, mask
    probabilities within 1e-3, binary masks identical except at <= 0.1 % of the pixels."""
    n = len(ref["scores"])
    assert len(onnx["scores"]) == n
    if n == 0:
        return
    cost = ((ref["scores"][:, None] - onnx["scores"][None]).abs() * 100
            + (ref["boxes"][:, None] - onnx["boxes"][None]).abs().sum(2)).numpy()
    rows, cols = linear_sum_assignment(cost)
    cols = torch.as_tensor(cols)
    assert torch.equal(ref["labels"], onnx["labels"][cols])
    # SOLOv2's maskness and Matrix NMS decay count binary stride-4 mask pixels: one pixel at the threshold
    # moves a score by ~score/area (area in stride-4 pixels), hence that on top of 1e-3 rather than float rounding
    area4 = (ref["masks"].flatten(1).sum(1) / 16).clamp(min=1)
    assert ((ref["scores"] - onnx["scores"][cols]).abs() <= 1e-3 + ref["scores"] / area4).all()
    assert (ref["boxes"] - onnx["boxes"][cols]).abs().max() <= 1e-3
    probs = onnx["probs"][cols]
    assert (ref["probs"] - probs).abs().max() <= 1e-3
    flipped = (ref["masks"] != (probs > thr)).float().mean().item()
    assert flipped <= 1e-3, f"{flipped:.2%} of the mask pixels differ"


def test_onnxruntime_equals_pytorch_at_two_sizes_of_one_dynamic_model(exported):
    ckpt, onnx_path = exported
    model, cfg, _ = load_checkpoint(ckpt)
    runner = OnnxModel(onnx_path)
    assert runner.metadata["input_size"] == "dynamic"
    total = below_cap = 0
    for size in SIZES:
        images = _sample_batch(size)
        out = runner.run(images)  # the 4 images as one batch
        assert out["masks"].shape == (4, 50, *size) and out["masks"].dtype == torch.float32
        assert out["boxes"].shape == (4, 50, 4) and out["labels"].dtype == torch.int64
        refs = _pytorch_reference(model, images)
        for b, ref in enumerate(refs):
            n = int(out["num_dets"][b])
            assert n > 0, "the compared detections must be real"
            below_cap += n < 50
            assert (out["labels"][b, n:] == -1).all() and (out["scores"][b, n:] == 0).all()
            onnx = {"boxes": out["boxes"][b, :n], "scores": out["scores"][b, :n], "labels": out["labels"][b, :n],
                    "probs": out["masks"][b, :n]}
            assert_same_detections(ref, onnx, cfg.model.mask_threshold)
            total += n
        # one image alone: the batch does not change an image's detections
        alone = runner.run(images[2:3])
        assert int(alone["num_dets"][0]) == int(out["num_dets"][2])
        assert torch.allclose(alone["scores"][0], out["scores"][2], atol=1e-5)
    assert total >= 8 * 5
    assert below_cap > 0, "some image must have fewer detections than the cap (padding rows exercised)"


def test_static_export_metadata_round_trip_and_input_errors(tmp_path):
    ckpt = crafted_checkpoint(tmp_path / "m.ckpt", "condinst")
    path = tmp_path / "static.onnx"
    written = export_onnx(ckpt, path, image_size=(160, 192), max_dets=20, binary_masks=True)
    meta = read_metadata(path)
    model, cfg, ck_meta = load_checkpoint(ckpt)
    assert meta["class_names"] == ck_meta["class_names"] == ["nucleus"] and meta["cat_ids"] == [1]
    assert meta["pixel_mean"] == pytest.approx(model.pixel_mean.flatten().tolist())
    assert meta["pixel_std"] == pytest.approx(model.pixel_std.flatten().tolist())
    assert meta["mask_threshold"] == cfg.model.mask_threshold and meta["score_threshold"] == pytest.approx(cfg.model.score_threshold)
    assert meta["boxmask_version"] == written["boxmask_version"] and meta["boxmask_version"] != ""
    assert meta["family"] == "condinst" and meta["method"] == "boxinst"
    assert meta["input_size"] == [160, 192] and meta["max_dets"] == 20 and meta["masks"] == "binary"
    assert load_config(meta["config"]).to_dict() == cfg.to_dict()
    runner = OnnxModel(path)
    out = runner.run(_sample_batch((160, 192), 1))
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape == (1, 20, 160, 192)
    with pytest.raises(ExportError, match="exported for 160x192"):
        runner.run(_sample_batch((192, 192), 1))
    with pytest.raises(ExportError, match="uint8"):
        runner.run(_sample_batch((160, 192), 1).float())
    not_ours = tmp_path / "other.onnx"
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(not_ours))
    with pytest.raises(ExportError, match="not a boxmask ONNX export"):
        read_metadata(not_ours)


class _Upsample(torch.nn.Module):
    def __init__(self, fixed: bool, threshold):
        super().__init__()
        self.fixed, self.threshold = fixed, threshold

    def forward(self, small, like):
        return aligned_upsample_crop(small, like, 4, self.fixed, self.threshold)


@pytest.mark.parametrize("fixed", [True, False])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_exported_mask_upsampling_equals_aligned_bilinear(tmp_path, fixed, threshold):
    """Both ONNX forms of the final mask upsampling (static size = 4x the mask size: two x2 resizes; otherwise
    pad, resize, crop) equal the eager ``aligned_bilinear`` + crop (+ threshold), including the borders."""
    import onnx

    small = torch.rand(1, 5, 12, 10, generator=torch.Generator().manual_seed(0))
    small[0, :, 0, :] = 0.0  # steep borders: a wrong offset or clamp shows at the edges
    small[0, :, :, -1] = 1.0
    sizes = [(48, 40)] if fixed else [(48, 40), (45, 37), (41, 33)]
    path = tmp_path / "up.onnx"
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    dyn = None if fixed else {"like": {2: "h", 3: "w"}, "out": {2: "h", 3: "w"}}
    torch.onnx.export(_Upsample(fixed, threshold), (small, torch.zeros(1, 1, *sizes[0])), str(path),
                      input_names=["small", "like"], output_names=["out"], dynamic_axes=dyn, opset_version=17, **kwargs)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Resize") == (2 if fixed else 1) and ("Slice" in ops) != fixed
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}  # (a static graph does not read ``like``)
    for h, w in sizes:
        ref = aligned_bilinear(small, 4)[..., :h, :w]
        feeds = {"small": small.numpy(), "like": np.zeros((1, 1, h, w), np.float32)}
        got = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        assert got.shape == (1, 5, h, w)
        if threshold is None:
            assert got.dtype == np.float32 and np.abs(got - ref.numpy()).max() < 1e-5
        else:
            assert got.dtype == np.uint8
            want = (ref > threshold).numpy()
            near = (ref - threshold).abs().numpy() < 1e-6  # float-rounding ties may go either way
            assert ((got.astype(bool) == want) | near).all() and want.mean() > 0.2


def test_unknown_family_checkpoint_is_a_clear_error(tmp_path, capsys):
    cfg = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", TINY).to_dict()
    cfg["model"]["arch"] = "mask2former"
    path = tmp_path / "m2f.ckpt"
    torch.save({"hyper_parameters": {"config": cfg, "class_names": ["a"], "cat_ids": [1]}, "state_dict": {}}, path)
    rc = main(["export", str(path), "-o", str(tmp_path / "x.onnx")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mask2former" in err and "condinst" in err and "solov2" in err
    assert not (tmp_path / "x.onnx").exists()


def test_missing_extra_names_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(ExportError, match=r"boxmask\[export\]"):
        require_onnx()
    rc = main(["predict", "--onnx", str(tmp_path / "m.onnx"), str(tmp_path), "-o", str(tmp_path / "p")])
    assert rc == 2 and "boxmask[export]" in capsys.readouterr().err


def test_cli_export_then_eval_and_predict_with_onnx_equal_pytorch(tmp_path, capsys):
    ckpt = crafted_checkpoint(tmp_path / "m.ckpt", "condinst")
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", ckpt, "-o", str(onnx_path), "--dynamic"]) == 0
    assert "onnx" in capsys.readouterr().out
    # eval on the bundled sample's val split (the recipe's), PyTorch and onnxruntime
    assert main(["eval", ckpt, "-o", str(tmp_path / "ev_pt"), "--device", "cpu"]) == 0
    assert main(["eval", "--onnx", str(onnx_path), "-o", str(tmp_path / "ev_ort")]) == 0
    pt = json.loads((tmp_path / "ev_pt" / "metrics.json").read_text())
    ort = json.loads((tmp_path / "ev_ort" / "metrics.json").read_text())
    res_pt = json.loads((tmp_path / "ev_pt" / "results.json").read_text())
    res_ort = json.loads((tmp_path / "ev_ort" / "results.json").read_text())
    assert len(res_pt) == len(res_ort) > 12, "real detections on the 12 val images"
    assert sorted(r["score"] for r in res_pt) == pytest.approx(sorted(r["score"] for r in res_ort), abs=1e-4)
    for kind in ("segm", "bbox"):
        assert abs(pt["model"][kind]["AP"] - ort["model"][kind]["AP"]) <= 0.1
        assert abs(pt["model"][kind]["AP50"] - ort["model"][kind]["AP50"]) <= 0.1
    # predict: same results and the same overlay files
    files = sorted(sample_paths()["image_dir"].iterdir())[:2]
    for flag, out in (([ckpt], "pr_pt"), (["--onnx", str(onnx_path)], "pr_ort")):
        assert main(["predict", *flag, *map(str, files), "-o", str(tmp_path / out), "--score-threshold", "0",
                     "--device", "cpu"]) == 0
    a = json.loads((tmp_path / "pr_pt" / "results.json").read_text())
    b = json.loads((tmp_path / "pr_ort" / "results.json").read_text())
    assert len(a) == len(b) > 0
    assert sorted(p.name for p in (tmp_path / "pr_ort" / "overlays").iterdir()) == \
        sorted(p.name for p in (tmp_path / "pr_pt" / "overlays").iterdir())
    assert (tmp_path / "pr_ort" / "contact_sheet.png").is_file()
    assert main(["eval"]) == 2 and "CKPT or --onnx" in capsys.readouterr().err
    assert np.isfinite(pt["model"]["segm"]["AP"])
