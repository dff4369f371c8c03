"""Box-conditioned masks and ``boxmask annotate``: location choice, every annotation kept, valid RLE
inside its box, crowd/degenerate boxes kept as box masks, exact resume, CLI."""

import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from boxmask.cli import main
from boxmask.data.coco import CocoInstances
from boxmask.data.collate import collate_batch
from boxmask.data.sample import sample_paths
from boxmask.data.transforms import build_test_transforms
from boxmask.engine.annotate import AnnotateError, annotate_dataset, box_pixels, sidecar_path
from boxmask.engine.inference import load_checkpoint
from boxmask.modeling.condinst import CondInstFeatures
from boxmask.ops import projection_terms
from boxmask.modeling.condinst import CondInst, postprocess
from boxmask.modeling.fcos import Detections, compute_locations

from helpers import tiny_cfg


# ---------------------------------------------------------------------------------------------------
# location choice on crafted head outputs
# ---------------------------------------------------------------------------------------------------


def _logit(p):
    return math.log(p / (1 - p))


def _crafted_model(monkeypatch, tmp_path):
    """A CondInst whose forward returns hand-set scores on a 64x64 image, and whose dynamic head
    returns, for each instance, a map filled with the flat index of the location it was given."""
    cfg = tiny_cfg(tmp_path)
    model = CondInst(cfg.model, num_classes=2).eval()
    strides = model.strides  # 8..128
    sizes = [(max(64 // s, 1), max(64 // s, 1)) for s in strides]  # 8x8, 4x4, 2x2, 1x1, 1x1
    num_params = model.mask_head.num_params
    cls = [torch.full((1, 2, h, w), -10.0) for h, w in sizes]
    ctr = [torch.zeros(1, 1, h, w) for h, w in sizes]
    params, offset = [], 0
    for h, w in sizes:
        p = torch.zeros(1, num_params, h, w)
        p[0, 0] = torch.arange(offset, offset + h * w, dtype=torch.float32).reshape(h, w)
        params.append(p)
        offset += h * w
    locations = [compute_locations(h, w, s, torch.device("cpu")) for (h, w), s in zip(sizes, strides)]

    def put(level, x, y, c, p_cls, p_ctr):
        s = strides[level]
        col, row = (x - s // 2) // s, (y - s // 2) // s
        cls[level][0, c, row, col] = _logit(p_cls)
        ctr[level][0, 0, row, col] = _logit(p_ctr)

    put(0, 12, 12, 0, 0.9, 0.1)     # P3 idx 9:  class 0, score 0.09
    put(1, 24, 24, 0, 0.6, 0.9)     # P4 idx 69: class 0, score 0.54
    put(0, 20, 12, 1, 0.99, 0.99)   # P3 idx 10: class 1, score 0.98
    put(0, 52, 52, 0, 0.999, 0.999)  # P3 idx 54: best class-0 score, but outside boxes A and B
    put(1, 40, 40, 0, 0.95, 0.95)   # P4 idx 74: on the corner of box B (closed box), outside box A
    mask_feats = torch.zeros(1, model.cfg.mask_channels, 8, 8)
    reg = [torch.zeros(1, 4, h, w) for h, w in sizes]  # stride-normalised l,t,r,b; zero unless a test sets it
    monkeypatch.setattr(model, "features", lambda images: CondInstFeatures(cls, reg, ctr, params, mask_feats, locations))
    model._crafted_reg = reg
    calls = []

    def fake_head(feats, prm, im_inds, locs, levels):
        calls.append((prm[:, 0].clone(), locs.clone(), levels.clone(), im_inds.clone()))
        return prm[:, 0].reshape(-1, 1, 1, 1).expand(-1, 1, 16, 16).clone()

    monkeypatch.setattr(model.mask_head, "forward", fake_head)
    return model, calls


BOX_A = [0.0, 0.0, 39.0, 39.0]
BOX_B = [24.0, 24.0, 40.0, 40.0]
BOX_TINY = [30.5, 30.5, 31.5, 31.5]  # no location centre inside; nearest P3 centre to (31, 31) is (28, 28)


def _mask_logits(model, *args, **kwargs) -> list[torch.Tensor]:
    """The box-conditioned mask logits ``[N_i,1,Hp/4,Wp/4]`` per image."""
    return [r.logits for r in model.box_conditioned_masks(*args, **kwargs)]


def test_box_conditioned_masks_picks_best_location_inside_each_box(monkeypatch, tmp_path):
    model, calls = _crafted_model(monkeypatch, tmp_path)
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    boxes = [torch.tensor([BOX_A, BOX_B, BOX_TINY])]
    out = _mask_logits(model, images, [(64, 64)], boxes, [torch.tensor([0, 0, 0])], rank="score", candidates=1)
    assert out[0].shape == (3, 1, 16, 16)
    # A: sigma(cls0)*sigma(ctr) is 0.54 at P4 (24,24) > 0.09 at P3 (12,12); (52,52) and (40,40) are outside
    # B: (40,40) lies on B's corner and wins; tiny: nearest P3 location (28,28) = row 3, col 3
    assert out[0][:, 0, 0, 0].tolist() == [69.0, 74.0, 27.0]
    chosen, locs, levels, _ = calls[-1]
    assert locs.tolist() == [[24.0, 24.0], [40.0, 40.0], [28.0, 28.0]]
    assert levels.tolist() == [1, 1, 0]
    # unknown class (None, or a label outside [0, C)): class-agnostic max -> the class-1 location (20,12)
    for labels in (None, [torch.tensor([-1, 0, 0])]):
        assert _mask_logits(model, images, [(64, 64)], boxes, labels, rank="score",
                               candidates=1)[0][0, 0, 0, 0].item() == 10.0


def test_box_conditioned_masks_score_iou_prefers_the_location_that_regresses_the_given_box(monkeypatch, tmp_path):
    model, _ = _crafted_model(monkeypatch, tmp_path)
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    reg = model._crafted_reg
    # P4 (24,24) (score 0.54) regresses a neighbour's box (16,16,64,64); P3 (12,12) (score 0.09) regresses exactly A
    reg[1][0, :, 1, 1] = torch.tensor([8.0, 8.0, 40.0, 40.0]) / 16
    reg[0][0, :, 1, 1] = torch.tensor([12.0, 12.0, 27.0, 27.0]) / 8
    box_a = [torch.tensor([BOX_A])]
    labels = [torch.tensor([0])]
    # IoU(P4 box, A) = 23*23/(39*39 + 48*48 - 23*23) = 0.1605 -> 0.54*0.1605 = 0.0867 < 0.09*1.0
    assert _mask_logits(model, images, [(64, 64)], box_a, labels, candidates=1)[0][0, 0, 0, 0].item() == 9.0
    assert _mask_logits(model, images, [(64, 64)], box_a, labels, rank="score",
                           candidates=1)[0][0, 0, 0, 0].item() == 69.0
    res = model.box_conditioned_masks(images, [(64, 64)], box_a, labels, candidates=1)[0]
    assert res.scores.item() == pytest.approx(0.09, rel=1e-5)  # reported score is the FCOS score, no IoU factor
    with pytest.raises(ValueError, match="rank must be one of"):
        _mask_logits(model, images, [(64, 64)], box_a, labels, rank="iou")


def test_box_conditioned_masks_candidates_keep_the_mask_that_fits_the_box(monkeypatch, tmp_path):
    model, calls = _crafted_model(monkeypatch, tmp_path)
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def head(feats, prm, im_inds, locs, levels):
        calls.append(prm[:, 0].clone())
        out = torch.full((len(prm), 1, 16, 16), -10.0)
        out[prm[:, 0] == 9, :, :10, :10] = 10.0  # P3 (12,12) draws exactly box A (cells 0..9 at stride 4)
        out[prm[:, 0] == 69, :, 2:5, 2:5] = 10.0  # P4 (24,24), the best-ranked, draws a fragment
        return out

    monkeypatch.setattr(model.mask_head, "forward", head)
    box_a, labels = [torch.tensor([BOX_A])], [torch.tensor([0])]
    one = model.box_conditioned_masks(images, [(64, 64)], box_a, labels, rank="score", candidates=1)[0]
    assert one.loc_inds.tolist() == [69]
    two = model.box_conditioned_masks(images, [(64, 64)], box_a, labels, rank="score", candidates=2)[0]
    assert two.loc_inds.tolist() == [9] and two.scores.item() == pytest.approx(0.09, rel=1e-5)
    assert (two.logits[0, 0, :10, :10] == 10).all() and two.logits.shape == (1, 1, 16, 16)
    assert sorted(calls[-1].tolist()) == [9.0, 69.0]
    # a box with no location inside has one candidate (its nearest P3 location) whatever k is
    tiny = model.box_conditioned_masks(images, [(64, 64)], [torch.tensor([BOX_TINY, BOX_A])],
                                 [torch.tensor([0, 0])], rank="score", candidates=3)[0]
    assert tiny.loc_inds.tolist() == [27, 9] and tiny.inside.tolist() == [False, True]
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        model.box_conditioned_masks(images, [(64, 64)], box_a, labels, candidates=0)


def test_projection_terms_are_zero_for_the_box_and_grows_for_fragments():
    box = torch.zeros(1, 8, 8)
    box[0, 2:6, 1:7] = 1
    exact = torch.where(box > 0, 20.0, -20.0)
    frag = torch.full((1, 8, 8), -20.0)
    frag[0, 3:4, 3:4] = 20.0
    fits = projection_terms(torch.cat([exact, frag]), torch.cat([box, box]))
    assert fits[0].item() == pytest.approx(0.0, abs=1e-5)
    # fragment: x projection 1 of 6 columns -> dice 1 - 2/7; y projection 1 of 4 rows -> 1 - 2/5
    assert fits[1].item() == pytest.approx((1 - 2 / 7) + (1 - 2 / 5), rel=1e-4)


def test_box_conditioned_masks_batch_with_an_image_without_boxes(monkeypatch, tmp_path):
    model, calls = _crafted_model(monkeypatch, tmp_path)
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    out = _mask_logits(model, images, [(64, 64)], [torch.zeros(0, 4)], None)
    assert out[0].shape == (0, 1, 16, 16) and not calls
    with pytest.raises(ValueError, match="1 images but 2 box lists"):
        _mask_logits(model, images, [(64, 64)], [torch.zeros(0, 4)] * 2)


# ---------------------------------------------------------------------------------------------------
# annotate with a (2-step) trained model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(boxinst_checkpoint):
    model, cfg, meta = load_checkpoint(boxinst_checkpoint)
    # the 2-step model's mask probabilities sit around 0.4-0.6: a lower threshold gives a mix of
    # model masks and empty masks (box fallback), so both paths are exercised
    cfg.model.mask_threshold = 0.45
    return boxinst_checkpoint, model, cfg, meta


def _inside_box_rounded(mask, bbox):
    x, y, w, h = bbox
    ys, xs = np.nonzero(mask)
    return (xs.min() >= math.floor(x) and xs.max() <= math.ceil(x + w) - 1
            and ys.min() >= math.floor(y) and ys.max() <= math.ceil(y + h) - 1)


def test_annotate_keeps_every_annotation_with_valid_rle_inside_its_box(trained, tmp_path):
    _, model, cfg, meta = trained
    p = sample_paths()
    out = tmp_path / "val_masks.json"
    # fallback off and the model's threshold: every non-empty model mask is kept as CondInst's post-processing
    # makes it (the box-fitted threshold is tested in test_annotate_fit.py)
    summary = annotate_dataset(model, cfg, meta, p["val_json"], p["image_dir"], out, progress=False, fallback_threshold=0.0,
                               binarize="fixed")
    src = json.loads(p["val_json"].read_text())
    got = json.loads(out.read_text())
    assert {k: v for k, v in got.items() if k != "annotations"} == {k: v for k, v in src.items() if k != "annotations"}
    assert [a["id"] for a in got["annotations"]] == [a["id"] for a in src["annotations"]]
    for a, b in zip(got["annotations"], src["annotations"]):
        assert set(a) == set(b)
        assert (a["bbox"], a["category_id"], a["image_id"], a["iscrowd"]) == (b["bbox"], b["category_id"], b["image_id"], b["iscrowd"])
    assert summary["annotations"] == len(src["annotations"]) == 355 and summary["images"] == 12
    assert summary["from_model"] > 0 and summary["from_model"] + summary["box_fallback"] == 355
    assert set(summary["box_fallback_reasons"]) <= {"empty mask"}
    assert not sidecar_path(out).exists()

    sizes = {im["id"]: (im["height"], im["width"]) for im in src["images"]}
    for a in got["annotations"]:
        assert isinstance(a["segmentation"]["counts"], str)
        m = mask_utils.decode(a["segmentation"])
        assert m.shape == sizes[a["image_id"]]
        assert m.sum() == a["area"] > 0
        assert _inside_box_rounded(m, a["bbox"]), a["id"]

    # the model masks are CondInst's post-processing (methods.md §1.7) of the box-conditioned logits, clipped
    ds = CocoInstances(p["val_json"], p["image_dir"], transforms=build_test_transforms(cfg.data.test_min_size, cfg.data.test_max_size),
                       check_images=False, verbose=False)
    batch = collate_batch([ds[0]])
    t = batch.targets[0]
    logits = _mask_logits(model, batch.images, batch.image_sizes, [t["boxes"]], [t["labels"]])[0]
    n = len(t["boxes"])
    det = Detections(t["boxes"], torch.ones(n), t["labels"], torch.zeros(n, 1), torch.zeros(n, 2), torch.zeros(n, dtype=torch.int64))
    expected = postprocess(det, logits, batch.image_sizes[0], batch.orig_sizes[0], 4, cfg.model.mask_threshold).masks
    by_id = {a["id"]: a for a in got["annotations"]}
    for aid, pred in zip(t["ann_ids"].tolist(), expected):
        bx, by, bw, bh = by_id[aid]["bbox"]
        box = box_pixels((bx, by, bx + bw, by + bh), *batch.orig_sizes[0])
        clipped = pred & box
        want = clipped if clipped.any() else box
        assert np.array_equal(mask_utils.decode(by_id[aid]["segmentation"]).astype(bool), want.numpy()), aid


def _crafted_json(tmp_path):
    """The first val image with its annotations plus crowd, degenerate, tiny and unknown-class boxes."""
    src = json.loads(sample_paths()["val_json"].read_text())
    image = src["images"][0]
    anns = [a for a in src["annotations"] if a["image_id"] == image["id"]][:3]
    for a in anns:
        a.pop("segmentation")  # a box-only input
        a["note"] = "kept"
    base = dict(image_id=image["id"], category_id=1, iscrowd=0)
    extra = [
        dict(base, id=9001, bbox=[10, 10, 30, 20], iscrowd=1,
             segmentation={"size": [image["height"], image["width"]], "counts": "0"}),  # crowd
        dict(base, id=9002, bbox=[50, 50, 0, 10]),  # zero width
        dict(base, id=9003, bbox=[400, 400, 10, 10]),  # outside the 256x256 image
        dict(base, id=9004, bbox=[100.6, 100.6, 0.3, 0.3]),  # positive size, no pixel centre inside
        dict(base, id=9005, bbox=[60, 60, 20, 20], category_id=7),  # category the model does not know
    ]
    data = {"info": src["info"], "extra_key": {"kept": True}, "images": [image],
            "categories": src["categories"] + [{"id": 7, "name": "other"}], "annotations": extra[:1] + anns + extra[1:]}
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(data))
    return path, data


def test_crowd_and_degenerate_boxes_are_kept_with_their_box_as_mask(trained, tmp_path):
    _, model, cfg, meta = trained
    path, data = _crafted_json(tmp_path)
    out = tmp_path / "out.json"
    with pytest.warns(UserWarning, match="skipped 2 invalid box"):
        summary = annotate_dataset(model, cfg, meta, path, sample_paths()["image_dir"], out, progress=False)
    got = json.loads(out.read_text())
    assert got["extra_key"] == {"kept": True} and got["categories"] == data["categories"]
    assert [a["id"] for a in got["annotations"]] == [a["id"] for a in data["annotations"]]
    by_id = {a["id"]: a for a in got["annotations"]}
    assert all(by_id[a["id"]]["note"] == "kept" for a in data["annotations"][1:4])
    crowd = mask_utils.decode(by_id[9001]["segmentation"])
    assert crowd.shape == (256, 256) and crowd.sum() == by_id[9001]["area"] == 600  # cols 10..39, rows 10..29
    assert crowd[10:30, 10:40].all()
    for aid in (9002, 9003):
        assert mask_utils.decode(by_id[aid]["segmentation"]).sum() == by_id[aid]["area"] == 0
    tiny = mask_utils.decode(by_id[9004]["segmentation"])
    assert tiny.sum() == 1 and tiny[100, 100] == 1  # the one pixel the box touches
    assert summary["annotations"] == 8 and summary["from_model"] + summary["box_fallback"] == 8
    assert summary["box_fallback_reasons"]["crowd"] == 1
    assert summary["box_fallback_reasons"]["zero or negative size"] == 1
    assert summary["box_fallback_reasons"]["outside the image"] == 1
    assert summary["nearest_p3_location"] >= 1 and summary["class_agnostic"] == 1


def test_interrupted_run_resumes_to_the_same_output(trained, tmp_path, monkeypatch):
    _, model, cfg, meta = trained
    p = sample_paths()
    straight = tmp_path / "straight.json"
    annotate_dataset(model, cfg, meta, p["val_json"], p["image_dir"], straight, progress=False)

    out = tmp_path / "resumed.json"
    real = model.box_conditioned_masks
    calls, dying = [], [True]

    def dies_on_fifth_image(*args, **kwargs):
        calls.append(1)
        if dying[0] and len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "box_conditioned_masks", dies_on_fifth_image)
    with pytest.raises(KeyboardInterrupt):
        annotate_dataset(model, cfg, meta, p["val_json"], p["image_dir"], out, progress=False, save_every=1)
    side = sidecar_path(out)
    assert not out.exists() and side.is_file()
    assert len(side.read_text().splitlines()) == 1 + 4  # header + 4 finished images
    with open(side, "a") as f:
        f.write('{"image_id": 3, "annotations": [{"id"')  # a torn write at the kill

    calls.clear()
    dying[0] = False
    with pytest.warns(UserWarning, match="line 6 is incomplete"):
        summary = annotate_dataset(model, cfg, meta, p["val_json"], p["image_dir"], out, progress=False)
    assert summary["resumed_images"] == 4 and len(calls) == 8  # only the 8 unfinished images ran
    assert json.loads(out.read_text()) == json.loads(straight.read_text())
    assert not side.exists()


def test_resume_refuses_a_sidecar_of_another_input(trained, tmp_path):
    _, model, cfg, meta = trained
    p = sample_paths()
    out = tmp_path / "out.json"
    side = sidecar_path(out)
    side.write_text(json.dumps({"boxmask_annotate": 1, "fingerprint": {"annotations": "0" * 64}}) + "\n")
    with pytest.raises(AnnotateError, match="different annotations"):
        annotate_dataset(model, cfg, meta, p["val_json"], p["image_dir"], out, progress=False)
    summary = annotate_dataset(model, cfg, meta, p["val_json"], p["image_dir"], out, progress=False, resume=False)
    assert summary["resumed_images"] == 0 and out.is_file() and not side.exists()


def test_cli_annotate(trained, tmp_path, capsys):
    ckpt = trained[0]
    path, _ = _crafted_json(tmp_path)
    out = tmp_path / "cli.json"
    with pytest.warns(UserWarning):
        rc = main(["annotate", str(ckpt), "--ann-file", str(path), "--images", str(sample_paths()["image_dir"]),
                   "-o", str(out), "--device", "cpu", "--no-resume"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "8 annotations on 1 images" in text and "1 crowd" in text
    assert len(json.loads(out.read_text())["annotations"]) == 8
    rc = main(["annotate", str(ckpt), "--ann-file", str(tmp_path / "missing.json"), "--images", str(tmp_path),
               "-o", str(out), "--device", "cpu"])
    assert rc == 2 and "missing.json" in capsys.readouterr().err
