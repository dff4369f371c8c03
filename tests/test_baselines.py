"""Boxes-given baselines of the quality benchmark (``bench/baselines.py``): GrabCut inside a box, the filled GT
box, mean mask IoU per annotation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from boxmask.data.coco import DatasetError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from baselines import (  # noqa: E402
    annotations_to_results,
    filled_box_annotations,
    grabcut_annotations,
    grabcut_mask,
    mask_ious,
    mean_mask_iou,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 80, 96
CY, CX, R = 40, 44, 18  # red disk centre (row, col) and radius in pixels


def disk_mask() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - CY) ** 2 + (xx - CX) ** 2 <= R**2


def two_colour_image(seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8 RGB: a red disk on a blue background, both with Gaussian noise (sigma 25)."""
    rng = np.random.default_rng(seed)
    img = np.empty((H, W, 3), np.float64)
    img[:] = (20, 40, 190)
    img[disk_mask()] = (200, 30, 30)
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# Box around the disk with a few pixels of margin, xyxy.
DISK_BOX = (CX - R - 4, CY - R - 5, CX + R + 5, CY + R + 4)


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def box_rle(x0: int, y0: int, w: int, h: int, height: int, width: int) -> dict:
    m = np.zeros((height, width), bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return rle(m)


# ---------------------------------------------------------------- grabcut_mask


def test_grabcut_recovers_disk_and_stays_in_box():
    img = two_colour_image()
    mask = grabcut_mask(img, DISK_BOX)
    assert mask.dtype == np.bool_ and mask.shape == (H, W)
    assert iou(mask, disk_mask()) > 0.9
    x1, y1, x2, y2 = DISK_BOX
    outside = np.ones((H, W), bool)
    outside[y1:y2, x1:x2] = False
    assert not mask[outside].any()
    # the filled box would score far lower: GrabCut really separated the colours
    filled = ~outside
    assert iou(filled, disk_mask()) < 0.75


def test_grabcut_tensor_chw_equals_array_hwc_and_is_reproducible():
    img = two_colour_image(seed=3)
    a = grabcut_mask(img, DISK_BOX)
    b = grabcut_mask(torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.tensor(DISK_BOX, dtype=torch.float32))
    c = grabcut_mask(img, DISK_BOX)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_grabcut_degenerate_boxes_fall_back_to_filled_box():
    img = two_colour_image()
    # 1 pixel wide: columns whose centre is in [10, 11] → column 10 only, rows 5..24
    thin = grabcut_mask(img, (10.0, 5.0, 11.0, 25.0))
    expected = np.zeros((H, W), bool)
    expected[5:25, 10] = True
    assert np.array_equal(thin, expected)
    # the whole image leaves no background sample for the GMMs → the filled (whole) image
    assert grabcut_mask(img, (0, 0, W, H)).all()
    # a box beyond the image clips to nothing
    assert not grabcut_mask(img, (W + 5, 0, W + 30, 20)).any()


def test_grabcut_rejects_bad_input():
    img = two_colour_image()
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        grabcut_mask(img.transpose(2, 0, 1), DISK_BOX)
    with pytest.raises(TypeError, match="uint8"):
        grabcut_mask(img.astype(np.float32), DISK_BOX)
    with pytest.raises(ValueError, match="4 finite"):
        grabcut_mask(img, (1, 2, 3))
    with pytest.raises(ValueError, match="iterations"):
        grabcut_mask(img, DISK_BOX, iterations=0)


# ---------------------------------------------------------------- COCO-file baselines


@pytest.fixture()
def coco_dir(tmp_path):
    """Two images: the disk image (disk + a small square) and a blank one with a crowd region."""
    Image.fromarray(two_colour_image()).save(tmp_path / "disk.png")
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(tmp_path / "blank.png")
    x1, y1, x2, y2 = DISK_BOX
    data = {
        "images": [{"id": 7, "file_name": "disk.png", "height": H, "width": W},
                   {"id": 9, "file_name": "blank.png", "height": 30, "width": 40}],
        "categories": [{"id": 3, "name": "disk"}, {"id": 5, "name": "square"}],
        "annotations": [
            {"id": 11, "image_id": 7, "category_id": 3, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
             "area": float(disk_mask().sum()), "segmentation": rle(disk_mask())},
            {"id": 12, "image_id": 9, "category_id": 5, "bbox": [2, 3, 4, 5], "iscrowd": 0, "area": 20.0,
             "segmentation": [[2, 3, 6, 3, 6, 8, 2, 8]]},
            {"id": 13, "image_id": 9, "category_id": 5, "bbox": [20, 10, 10, 10], "iscrowd": 1, "area": 100.0,
             "segmentation": box_rle(20, 10, 10, 10, 30, 40)},
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return tmp_path, path, data


def test_filled_box_annotations_equal_the_boxes(coco_dir):
    _, path, _ = coco_dir
    res = filled_box_annotations(path)
    assert [r["ann_id"] for r in res] == [11, 12]  # crowd annotation 13 left out
    assert [(r["image_id"], r["category_id"], r["score"]) for r in res] == [(7, 3, 1.0), (9, 5, 1.0)]
    assert res[1]["bbox"] == [2.0, 3.0, 4.0, 5.0]
    m = mask_utils.decode(res[1]["segmentation"]).astype(bool)
    expected = np.zeros((30, 40), bool)
    expected[3:8, 2:6] = True  # rows 3..7, columns 2..5: the 4 x 5 box
    assert np.array_equal(m, expected)
    x1, y1, x2, y2 = DISK_BOX
    m0 = mask_utils.decode(res[0]["segmentation"]).astype(bool)
    assert m0.shape == (H, W) and m0.sum() == (x2 - x1) * (y2 - y1) and m0[y1:y2, x1:x2].all()
    assert [r["ann_id"] for r in filled_box_annotations(path, image_ids=[9])] == [12]


def test_grabcut_annotations_and_mean_iou(coco_dir):
    tmp, path, _ = coco_dir
    res = grabcut_annotations(path, tmp, progress=False)
    assert [r["ann_id"] for r in res] == [11, 12]
    assert all(r["score"] == 1.0 and r["segmentation"]["size"] == [r_h, r_w]
               for r, (r_h, r_w) in zip(res, [(H, W), (30, 40)]))
    # the disk is recovered; the flat grey square has nothing to separate → filled-box fallback
    ious = mask_ious(path, res)
    assert ious[0] > 0.9
    assert res[1].get("grabcut_fallback") == "empty" and ious[1] == pytest.approx(1.0)
    assert "grabcut_fallback" not in res[0]
    boxes = filled_box_annotations(path)
    assert mean_mask_iou(path, res) > mean_mask_iou(path, boxes)


def test_grabcut_annotations_names_a_mismatched_image(coco_dir):
    tmp, path, data = coco_dir
    data["images"][1]["width"] = 41
    bad = tmp / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="blank.png.*40x30"):
        grabcut_annotations(bad, tmp, progress=False)


def test_annotations_to_results_converts_polygons(coco_dir):
    _, path, _ = coco_dir
    res = annotations_to_results(path)
    assert [r["ann_id"] for r in res] == [11, 12]
    assert isinstance(res[1]["segmentation"]["counts"], str)
    m = mask_utils.decode(res[1]["segmentation"]).astype(bool)
    assert m[3:8, 2:6].all() and m.sum() >= 20  # polygon rasterised at the image size
    assert mean_mask_iou(path, res) == pytest.approx(1.0)  # GT masks against themselves


# ---------------------------------------------------------------- mean_mask_iou hand cases


@pytest.fixture()
def square_gt(tmp_path):
    """Image 1 (10x12): ann 1 = 4x4 square at (2,2); ann 2 = 2x3 box at (8,5); ann 3 crowd."""
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 12}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 4, 4], "iscrowd": 0, "area": 16,
             "segmentation": box_rle(2, 2, 4, 4, 10, 12)},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 1, "area": 4,
             "segmentation": box_rle(0, 0, 2, 2, 10, 12)},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [8, 5, 2, 3], "iscrowd": 0, "area": 6,
             "segmentation": [[8, 5, 10, 5, 10, 8, 8, 8]]},
        ],
    }
    path = tmp_path / "sq.json"
    path.write_text(json.dumps(data))
    return path


def test_mean_mask_iou_hand_case(square_gt):
    half = box_rle(2, 2, 2, 4, 10, 12)  # left half of the 4x4 square: IoU 8/16 = 0.5
    # 2x3 box shifted right by one column: intersection 1x3 = 3, union 9 → 1/3
    shifted = box_rle(9, 5, 2, 3, 10, 12)
    by_id = [{"image_id": 1, "segmentation": shifted, "ann_id": 2}, {"image_id": 1, "segmentation": half, "ann_id": 1}]
    assert mask_ious(square_gt, by_id) == pytest.approx([1 / 3, 0.5])
    assert mean_mask_iou(square_gt, by_id) == pytest.approx((0.5 + 1 / 3) / 2)
    # without ann_id: matched with the non-crowd annotations in file order (1, then 2)
    by_order = [{"image_id": 1, "segmentation": half}, {"image_id": 1, "segmentation": shifted}]
    assert mean_mask_iou(square_gt, by_order) == pytest.approx((0.5 + 1 / 3) / 2)
    assert np.isnan(mean_mask_iou(square_gt, []))


def test_mean_mask_iou_errors(square_gt):
    half = box_rle(2, 2, 2, 4, 10, 12)
    with pytest.raises(ValueError, match="by order"):
        mean_mask_iou(square_gt, [{"image_id": 1, "segmentation": half}])
    with pytest.raises(ValueError, match="all or none"):
        mean_mask_iou(square_gt, [{"image_id": 1, "segmentation": half, "ann_id": 1}, {"image_id": 1, "segmentation": half}])
    with pytest.raises(ValueError, match="ann_id 99"):
        mean_mask_iou(square_gt, [{"image_id": 1, "segmentation": half, "ann_id": 99}])
    with pytest.raises(ValueError, match="result 0.*size"):
        mean_mask_iou(square_gt, [{"image_id": 1, "segmentation": box_rle(0, 0, 1, 1, 10, 13), "ann_id": 1}])
    with pytest.raises(ValueError, match="image 2"):
        mean_mask_iou(square_gt, [{"image_id": 2, "segmentation": half, "ann_id": 1}])
