"""Tests for boxmask.io (atomic writes), engine.evaluator (RLE, COCOeval, box-filled baseline), engine.visualize."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from boxmask.engine.evaluator import (
    boxes_to_masks,
    boxfill_results,
    detections_to_coco,
    evaluate_coco,
    format_ap_table,
    masks_to_rle,
)
from boxmask.engine.visualize import draw_instances, instance_colors, save_png
import boxmask.io
from boxmask.io import atomic_torch_save, atomic_write_json, atomic_write_text

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------- helpers


def make_coco(images: list[tuple[int, int, int]], anns: list[dict], cat_ids=(3, 7)) -> COCO:
    """COCO GT from (id, height, width) images and partial annotations (ids/areas filled in)."""
    full = []
    for k, a in enumerate(anns, start=1):
        a = dict(a)
        a.setdefault("iscrowd", 0)
        a["id"] = k
        img = next(i for i in images if i[0] == a["image_id"])
        rle = _ann_rle(a["segmentation"], img[1], img[2])
        a.setdefault("area", float(mask_utils.area(rle)))
        a.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        full.append(a)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, h, w in images],
        "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
        "annotations": full,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _ann_rle(seg, h, w):
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    return seg


def square_rle(h, w, x, y, size):
    m = np.zeros((1, h, w), dtype=bool)
    m[0, y : y + size, x : x + size] = True
    return masks_to_rle(m)[0]


def gt_as_results(coco: COCO, shift_x: int = 0) -> list[dict]:
    """Every GT annotation as a detection with score 1, mask optionally rolled right by shift_x px."""
    out = []
    for ann in coco.dataset["annotations"]:
        m = coco.annToMask(ann).astype(bool)
        if shift_x:
            m = np.roll(m, shift_x, axis=1)
        x, y, w, h = ann["bbox"]
        out.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [x + shift_x, y, w, h],
                "score": 1.0,
                "segmentation": masks_to_rle(m[None])[0],
            }
        )
    return out


@pytest.fixture()
def mixed_gt() -> COCO:
    """Three images, two categories (ids 3 and 7), polygon and RLE masks, all areas < 32^2."""
    images = [(1, 48, 64), (2, 40, 50), (5, 48, 64)]
    anns = [
        {"image_id": 1, "category_id": 3, "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},
        {"image_id": 1, "category_id": 7, "segmentation": [[40, 5, 60, 25, 40, 40]]},
        {"image_id": 2, "category_id": 3, "segmentation": square_rle(40, 50, 5, 5, 12)},
        {"image_id": 5, "category_id": 7, "segmentation": square_rle(48, 64, 30, 20, 15)},
        {"image_id": 5, "category_id": 3, "segmentation": [[2, 2, 14, 2, 14, 30, 2, 30]]},
    ]
    return make_coco(images, anns)


# ---------------------------------------------------------------- RLE / boxes


def test_masks_to_rle_round_trip():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 20, 30, generator=g) > 0.6
    rles = masks_to_rle(masks)
    assert len(rles) == 3
    for rle, m in zip(rles, masks):
        assert rle["size"] == [20, 30]
        assert isinstance(rle["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), m.numpy())
    json.dumps(rles)  # JSON-serialisable
    # uint8 numpy with 255 foreground encodes the same as bool
    rles_u8 = masks_to_rle(masks.numpy().astype(np.uint8) * 255)
    assert [r["counts"] for r in rles_u8] == [r["counts"] for r in rles]
    assert masks_to_rle(np.zeros((0, 5, 6), dtype=bool)) == []
    with pytest.raises(TypeError):
        masks_to_rle(masks.float())
    with pytest.raises(ValueError):
        masks_to_rle(masks[0])


def test_boxes_to_masks_hand_case():
    boxes = torch.tensor(
        [
            [1.0, 2.0, 4.0, 3.0],  # centres x 1.5,2.5,3.5 ; y 2.5 -> cols 1..3, row 2
            [0.4, 0.6, 1.6, 1.4],  # y centres 0.5, 1.5 both outside [0.6, 1.4] -> empty
            [0.5, 0.5, 0.5, 0.5],  # degenerate box through pixel (0,0)'s centre -> that pixel
            [3.0, 1.0, 2.0, 4.0],  # x2 < x1 -> empty
        ]
    )
    m = boxes_to_masks(boxes, 5, 6)
    assert m.dtype == torch.bool and m.shape == (4, 5, 6)
    expected0 = torch.zeros(5, 6, dtype=torch.bool)
    expected0[2, 1:4] = True
    assert torch.equal(m[0], expected0)
    assert not m[1].any()
    assert m[2].sum() == 1 and m[2, 0, 0]
    assert not m[3].any()
    # integer box = same pixels as the pycocotools rectangle polygon
    poly = mask_utils.decode(mask_utils.frPyObjects([[10, 10, 30, 10, 30, 20, 10, 20]], 48, 64))[:, :, 0]
    np.testing.assert_array_equal(boxes_to_masks(np.array([[10.0, 10.0, 30.0, 20.0]]), 48, 64)[0].numpy(), poly.astype(bool))


def test_detections_to_coco_fields():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]])
    masks = torch.zeros(2, 64, 48, dtype=torch.bool)
    masks[0, 20:60, 10:30] = True
    dets = detections_to_coco(9, boxes, torch.tensor([0.9, 0.25]), torch.tensor([1, 0]), [3, 7], masks)
    assert dets[0]["bbox"] == [10.0, 20.0, 20.0, 40.0]
    assert dets[0]["category_id"] == 7 and dets[1]["category_id"] == 3
    assert dets[0]["image_id"] == 9 and isinstance(dets[0]["image_id"], int)
    assert dets[0]["score"] == pytest.approx(0.9) and isinstance(dets[0]["score"], float)
    assert mask_utils.area(dets[0]["segmentation"]) == 800
    assert dets[1]["segmentation"]["size"] == [64, 48]
    json.dumps(dets)
    no_mask = detections_to_coco(9, boxes, torch.tensor([0.9, 0.25]), torch.tensor([1, 0]), [3, 7])
    assert "segmentation" not in no_mask[0]
    assert detections_to_coco(9, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), [3, 7]) == []
    with pytest.raises(ValueError, match="image 9"):
        detections_to_coco(9, boxes, torch.tensor([0.9, 0.25]), torch.tensor([2, 0]), [3, 7])


# ---------------------------------------------------------------- COCOeval


def test_gt_as_results_gives_ap_100(mixed_gt):
    metrics = evaluate_coco(mixed_gt, gt_as_results(mixed_gt))
    for t in ("segm", "bbox"):
        for k in ("AP", "AP50", "AP75", "APs", "AR"):
            assert metrics[t][k] == pytest.approx(100.0), (t, k)
        # every object is small: medium/large have no GT -> not defined
        assert metrics[t]["APm"] is None and metrics[t]["APl"] is None
    json.dumps(metrics)


def test_evaluate_does_not_modify_results(mixed_gt):
    results = gt_as_results(mixed_gt)
    before = json.dumps(results)
    evaluate_coco(mixed_gt, results)
    assert json.dumps(results) == before


def test_shifted_prediction_hand_computed_ap():
    # 10x10 squares shifted by 2 px: IoU = 80 / 120 = 0.667 -> matched at IoU 0.50..0.65 (4 of 10).
    gt = make_coco(
        [(1, 40, 40), (2, 40, 40)],
        [
            {"image_id": 1, "category_id": 3, "segmentation": square_rle(40, 40, 5, 5, 10)},
            {"image_id": 2, "category_id": 3, "segmentation": square_rle(40, 40, 20, 10, 10)},
        ],
    )
    perfect = evaluate_coco(gt, gt_as_results(gt))
    shifted = evaluate_coco(gt, gt_as_results(gt, shift_x=2))
    for t in ("segm", "bbox"):
        assert perfect[t]["AP"] == pytest.approx(100.0)
        assert shifted[t]["AP"] == pytest.approx(40.0)
        assert shifted[t]["AP50"] == pytest.approx(100.0)
        assert shifted[t]["AP75"] == pytest.approx(0.0)
        assert shifted[t]["AR"] == pytest.approx(40.0)


def test_empty_results_give_zeros(mixed_gt):
    metrics = evaluate_coco(mixed_gt, [])
    for t in ("segm", "bbox"):
        for k in ("AP", "AP50", "AP75", "APs", "AR"):
            assert metrics[t][k] == 0.0
        assert metrics[t]["APl"] is None


def test_max_dets_really_counts():
    # 150 separate 6x6 squares in one image, detected perfectly. With 100 detections counted,
    # recall = 100/150 and precision is 1 up to it: AP = (recall points 0.00..0.66 -> 67 of 101).
    anns = []
    for k in range(150):
        r, c = divmod(k, 15)
        anns.append({"image_id": 1, "category_id": 3, "segmentation": square_rle(100, 150, 10 * c, 10 * r, 6)})
    gt = make_coco([(1, 100, 150)], anns)
    results = gt_as_results(gt)
    for i, r in enumerate(results):
        r["score"] = 1.0 - i * 1e-3
    m100 = evaluate_coco(gt, results, max_dets=100)
    m200 = evaluate_coco(gt, results, max_dets=200)
    for t in ("segm", "bbox"):
        assert m100[t]["AR"] == pytest.approx(100 * 100 / 150)
        assert m100[t]["AP"] == pytest.approx(100 * 67 / 101)
        assert m200[t]["AR"] == pytest.approx(100.0)
        assert m200[t]["AP"] == pytest.approx(100.0)


def test_image_ids_restrict_evaluation(mixed_gt):
    results = [r for r in gt_as_results(mixed_gt) if r["image_id"] != 2]  # image 2's object missed
    everything = evaluate_coco(mixed_gt, results, iou_types=("bbox",))
    assert everything["bbox"]["AR"] < 100.0
    only = evaluate_coco(mixed_gt, results, iou_types=("bbox",), image_ids=[1, 5])
    assert set(only) == {"bbox"}
    assert only["bbox"]["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="99"):
        evaluate_coco(mixed_gt, results, image_ids=[99])


def test_bad_results_are_named(mixed_gt):
    good = gt_as_results(mixed_gt)
    with pytest.raises(ValueError, match="result 0: image_id 42"):
        evaluate_coco(mixed_gt, [dict(good[0], image_id=42)])
    with pytest.raises(ValueError, match="result 1 .*segmentation"):
        evaluate_coco(mixed_gt, [good[0], {k: v for k, v in good[1].items() if k != "segmentation"}])
    # box-only results are fine for bbox evaluation
    box_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in good]
    assert evaluate_coco(mixed_gt, box_only, iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="mask size"):
        evaluate_coco(mixed_gt, [dict(good[0], segmentation=square_rle(10, 10, 0, 0, 3))])
    with pytest.raises(ValueError):
        evaluate_coco(mixed_gt, good, iou_types=("keypoints",))


def test_format_ap_table():
    table = format_ap_table(
        {
            "segm": {"AP": 40.0, "AP50": 100.0, "AP75": 0.0, "APs": 40.04, "APm": None, "APl": None, "AR": 40.0},
            "bbox": {"AP": 66.3366, "AP50": 100.0, "AP75": 99.95, "APs": 1.0, "APm": 2.0, "APl": 3.0, "AR": 1.0},
        }
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| type | AP | AP50 | AP75 | APs | APm | APl |"
    assert lines[2] == "| segm | 40.0 | 100.0 | 0.0 | 40.0 | - | - |"
    assert lines[3] == "| bbox | 66.3 | 100.0 | 100.0 | 1.0 | 2.0 | 3.0 |"


# ---------------------------------------------------------------- box-filled baseline


def test_boxfill_rectangle_gt_is_perfect():
    gt = make_coco(
        [(1, 48, 64)],
        [
            {"image_id": 1, "category_id": 3, "segmentation": square_rle(48, 64, 4, 6, 12)},
            {"image_id": 1, "category_id": 7, "segmentation": [[30, 10, 55, 10, 55, 40, 30, 40]]},
        ],
    )
    dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in gt_as_results(gt)]
    filled = boxfill_results(dets, gt)
    assert all("segmentation" not in d for d in dets)  # input untouched
    assert [f["bbox"] for f in filled] == [d["bbox"] for d in dets]
    m = evaluate_coco(gt, filled)
    assert m["segm"]["AP"] == pytest.approx(100.0)
    assert m["bbox"]["AP"] == pytest.approx(100.0)


def test_boxfill_disk_gt_lowers_segm_ap():
    h = w = 40
    yy, xx = np.mgrid[:h, :w]
    disk = ((xx - 20) ** 2 + (yy - 20) ** 2 <= 10**2)[None]
    gt = make_coco([(1, h, w)], [{"image_id": 1, "category_id": 3, "segmentation": masks_to_rle(disk)[0]}])
    filled = boxfill_results(gt_as_results(gt), gt)
    box_mask = mask_utils.decode(filled[0]["segmentation"]).astype(bool)
    iou = (box_mask & disk[0]).sum() / (box_mask | disk[0]).sum()
    assert 0.70 <= iou < 0.75  # 317 / 441 px: a disk fills ~pi/4 of its box, less when discretised
    m = evaluate_coco(gt, filled)
    # matched at IoU thresholds 0.50, 0.55, 0.60, 0.65, 0.70 -> 5 of 10
    assert m["segm"]["AP"] == pytest.approx(50.0)
    assert m["bbox"]["AP"] == pytest.approx(100.0)


# ---------------------------------------------------------------- overlays


def test_draw_instances_changes_mask_pixels_only():
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    masks = torch.zeros(1, 60, 80, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    boxes = torch.tensor([[10.0, 10.0, 40.0, 30.0]])
    out = draw_instances(image, masks, boxes, torch.tensor([1]), torch.tensor([0.93]), ["a", "b"], alpha=0.5)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    color = torch.tensor(instance_colors([1])[0], dtype=torch.float32)
    inside = out[:, 20, 25].float()  # mask interior, clear of the box outline and label text
    assert torch.allclose(inside, (0.5 * color).round(), atol=1.0)
    assert torch.equal(out[:, 45:, 50:], image[:, 45:, 50:])  # far outside: untouched
    assert torch.equal(image, torch.zeros_like(image))  # input not modified
    again = draw_instances(image, masks, boxes, torch.tensor([1]), torch.tensor([0.93]), ["a", "b"], alpha=0.5)
    assert torch.equal(out, again)  # deterministic
    empty = draw_instances(image, torch.zeros(0, 60, 80, dtype=torch.bool), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0), ["a"])
    assert torch.equal(empty, image)
    with pytest.raises(ValueError):
        draw_instances(image, None, boxes, torch.tensor([5]), None, ["a", "b"])


def test_instance_colors_per_class_and_instance():
    c = instance_colors([0, 0, 1])
    assert c == instance_colors([0, 0, 1])
    assert c[0] != c[1]  # same class, different instance
    assert c[0] != c[2]
    assert all(0 <= v <= 255 for rgb in c for v in rgb)


def test_save_png_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8, generator=g)
    path = save_png(tmp_path / "sub" / "x.png", img)
    back = np.asarray(Image.open(path))
    np.testing.assert_array_equal(back, img.permute(1, 2, 0).numpy())
    assert os.listdir(tmp_path / "sub") == ["x.png"]


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_json_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a" / "metrics.json"
    atomic_write_json(path, {"AP": 1.5}, indent=2)
    assert json.loads(path.read_text()) == {"AP": 1.5}
    with pytest.raises(TypeError, match="metrics.json"):
        atomic_write_json(path, {"AP": {1, 2}})
    assert json.loads(path.read_text()) == {"AP": 1.5}
    assert os.listdir(path.parent) == ["metrics.json"]
    atomic_write_json(path, [1, None])
    assert path.read_text() == "[1, null]"


def test_atomic_text_and_torch_save(tmp_path):
    p = atomic_write_text(tmp_path / "deep" / "er" / "t.txt", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    # a new file gets the usual 0o666 & ~umask, not mkstemp's private 0o600
    assert p.stat().st_mode & 0o777 == 0o666 & ~boxmask.io._UMASK

    ckpt = tmp_path / "ck" / "last.ckpt"
    atomic_torch_save({"w": torch.arange(4)}, ckpt)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("nope")

    with pytest.raises(RuntimeError, match="nope"):
        atomic_torch_save({"bad": Unpicklable()}, ckpt)
    assert torch.equal(torch.load(ckpt)["w"], torch.arange(4))
    assert os.listdir(ckpt.parent) == ["last.ckpt"]
