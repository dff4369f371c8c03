"""Tests for boxmask.data: COCO loading/validation, image decoding, transforms, collate, sample."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from boxmask.data.coco import CocoInstances, DatasetError, read_image_rgb, subset_images
from boxmask.data.collate import Batch, collate_batch, make_collate
from boxmask.data.sample import sample_paths
from boxmask.data.transforms import build_test_transforms, build_train_transforms

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# helpers: tiny synthetic COCO datasets
# --------------------------------------------------------------------------------------------


def _write_image(path: Path, height: int, width: int, value: int = 100) -> None:
    arr = np.full((height, width, 3), value, dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)  # a marker pixel to follow through flips
    Image.fromarray(arr).save(path)


def _make_dataset(
    tmp_path: Path,
    annotations: list[dict],
    images: list[tuple[int, str, int, int]] | None = None,
    categories: list[dict] | None = None,
    write_images: bool = True,
) -> tuple[Path, Path]:
    """Write a COCO JSON (+ PNG images) under tmp_path; images = [(id, file_name, w, h)]."""
    images = images if images is not None else [(1, "a.png", 64, 48)]
    categories = categories if categories is not None else [{"id": 1, "name": "thing"}]
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if write_images:
        for _, name, w, h in images:
            _write_image(image_dir / name, h, w)
    data = {
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
        "annotations": annotations,
        "categories": categories,
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))  # allow_nan=True: NaN/Infinity are written as such
    return ann_file, image_dir


def _ann(aid: int, bbox: list[float], image_id: int = 1, category_id: int = 1, **extra) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


# --------------------------------------------------------------------------------------------
# JSON validation
# --------------------------------------------------------------------------------------------


def test_truncated_json_names_file_and_position(tmp_path):
    ann_file, image_dir = _make_dataset(tmp_path, [_ann(1, [1, 2, 3, 4])])
    text = ann_file.read_text()
    ann_file.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"instances\.json.*line 1, column \d+"):
        CocoInstances(ann_file, image_dir)


def test_missing_top_level_key(tmp_path):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"broken\.json.*'categories'"):
        CocoInstances(ann_file, tmp_path)


def test_unknown_category_names_annotation_and_category(tmp_path):
    ann_file, image_dir = _make_dataset(tmp_path, [_ann(1, [1, 2, 3, 4]), _ann(77, [1, 2, 3, 4], category_id=9)])
    with pytest.raises(DatasetError, match=r"annotation id 77: category_id 9 is not in 'categories'"):
        CocoInstances(ann_file, image_dir)


def test_unknown_image_id_and_missing_bbox_name_annotation(tmp_path):
    ann_file, image_dir = _make_dataset(tmp_path, [_ann(5, [1, 2, 3, 4], image_id=42)])
    with pytest.raises(DatasetError, match=r"annotation id 5: image_id 42"):
        CocoInstances(ann_file, image_dir)
    bad = _ann(6, [1, 2, 3, 4])
    del bad["bbox"]
    ann_file, image_dir = _make_dataset(tmp_path, [bad])
    with pytest.raises(DatasetError, match=r"annotation id 6: missing 'bbox'"):
        CocoInstances(ann_file, image_dir)


def test_missing_image_file_names_path(tmp_path):
    ann_file, image_dir = _make_dataset(
        tmp_path, [], images=[(1, "a.png", 64, 48), (2, "gone.png", 64, 48)], write_images=False
    )
    _write_image(image_dir / "a.png", 48, 64)
    with pytest.raises(DatasetError, match=r"not found.*gone\.png"):
        CocoInstances(ann_file, image_dir, check_images=False)


def test_corrupt_image_names_file(tmp_path):
    ann_file, image_dir = _make_dataset(tmp_path, [_ann(1, [1, 2, 3, 4])])
    png = (image_dir / "a.png").read_bytes()
    (image_dir / "a.png").write_bytes(png[: len(png) // 2])  # truncated PNG stream
    with pytest.raises(DatasetError, match=r"a\.png: cannot decode image"):
        CocoInstances(ann_file, image_dir)
    (image_dir / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"a\.png"):
        read_image_rgb(image_dir / "a.png")


def test_decoded_size_must_match_json(tmp_path):
    ann_file, image_dir = _make_dataset(tmp_path, [], images=[(1, "a.png", 64, 48)], write_images=False)
    _write_image(image_dir / "a.png", 30, 64)  # JSON says height 48
    with pytest.raises(DatasetError, match=r"a\.png: decoded size 64x30 .* 64x48"):
        CocoInstances(ann_file, image_dir)
    ds = CocoInstances(ann_file, image_dir, check_images=False)  # caught later, still named
    with pytest.raises(DatasetError, match=r"a\.png"):
        ds[0]


# --------------------------------------------------------------------------------------------
# boxes: skipping, clipping, crowd, labels
# --------------------------------------------------------------------------------------------


def test_degenerate_boxes_skipped_with_one_warning(tmp_path):
    anns = [
        _ann(1, [10, 10, 5, 5]),  # valid
        _ann(2, [10, 10, 0, 5]),  # zero width
        _ann(3, [10, 10, 5, -2]),  # negative height
        _ann(4, [float("nan"), 10, 5, 5]),  # non-finite
        _ann(5, [100, 10, 5, 5]),  # entirely right of the 64-px-wide image
        _ann(6, [10, -20, 5, 20]),  # touches y=0 from above: zero height after clipping
    ]
    ann_file, image_dir = _make_dataset(tmp_path, anns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoInstances(ann_file, image_dir)
    msgs = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(msgs) == 1
    assert "skipped 5 invalid box(es)" in msgs[0] and "2, 3, 4, 5, 6" in msgs[0]
    assert ds.stats["skipped"] == 5 and ds.stats["boxes"] == 1 and ds.stats["annotations"] == 6
    sample = ds[0]
    assert sample["ann_ids"].tolist() == [1]
    assert sample["boxes"].tolist() == [[10.0, 10.0, 15.0, 15.0]]


def test_partly_outside_box_is_clipped(tmp_path):
    ann_file, image_dir = _make_dataset(tmp_path, [_ann(1, [-5, 10, 20, 100]), _ann(2, [3, 4, 5, 6])])
    ds = CocoInstances(ann_file, image_dir)  # image 64 wide, 48 high
    assert ds.stats["clipped"] == 1 and ds.stats["skipped"] == 0
    boxes = ds[0]["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
    assert tuple(boxes.canvas_size) == (48, 64)
    assert boxes.tolist() == [[0.0, 10.0, 15.0, 48.0], [3.0, 4.0, 8.0, 10.0]]


def test_crowd_excluded_but_kept_for_eval_and_labels_follow_sorted_category_ids(tmp_path):
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    anns = [
        _ann(1, [1, 1, 4, 4], category_id=7),
        _ann(2, [2, 2, 4, 4], category_id=3),
        _ann(3, [0, 0, 30, 30], category_id=3, iscrowd=1),
    ]
    ann_file, image_dir = _make_dataset(
        tmp_path, anns, images=[(1, "a.png", 64, 48), (2, "b.png", 32, 32)], categories=cats
    )
    ds = CocoInstances(ann_file, image_dir)
    assert ds.class_names == ["three", "seven"] and ds.cat_ids == [3, 7] and ds.num_classes == 2
    assert ds.stats["crowd"] == 1 and ds.stats["boxes"] == 2 and ds.stats["images_without_boxes"] == 1
    s0, s1 = ds[0], ds[1]
    assert s0["labels"].tolist() == [1, 0] and s0["labels"].dtype == torch.int64
    assert s0["ann_ids"].tolist() == [1, 2]
    assert s0["image_id"] == 1 and s0["orig_size"] == (48, 64)
    assert s1["boxes"].shape == (0, 4) and s1["labels"].shape == (0,)
    assert ds.image_ids == [1, 2] and len(ds) == 2
    gt = ds.gt_coco()
    assert sorted(gt.getAnnIds()) == [1, 2, 3] and gt.anns[3]["iscrowd"] == 1
    assert gt.anns[1]["area"] == 16.0  # filled from the bbox for COCOeval


# --------------------------------------------------------------------------------------------
# image decoding
# --------------------------------------------------------------------------------------------


def test_read_image_modes_to_rgb_uint8(tmp_path):
    gray = np.array([[0, 50], [128, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = read_image_rgb(tmp_path / "gray.png")
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 2)
    assert all(out[c].tolist() == gray.tolist() for c in range(3))

    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0  # fully transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = read_image_rgb(tmp_path / "rgba.png")
    assert out.shape == (3, 2, 3) and out[:, 1, 2].tolist() == [10, 20, 30]  # alpha dropped, not composited

    g16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), g16)
    out = read_image_rgb(tmp_path / "g16.png")
    # round(v * 255 / 65535): 0, 255, 127.5 -> 128, 3.89 -> 4
    assert out.dtype == torch.uint8 and out[0].tolist() == [[0, 255], [128, 4]] and torch.equal(out[0], out[2])

    rgb16 = np.stack([g16, 65535 - g16, np.full_like(g16, 514)], axis=-1)  # R, G, B
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    out = read_image_rgb(tmp_path / "c16.png")
    assert out[:, 1, 1].tolist() == [4, 251, 2]  # Pillow alone would truncate 1000 -> 3
    assert out[:, 0, 1].tolist() == [255, 0, 2]


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def _mask_dataset(tmp_path):
    rle_src = np.zeros((48, 64), dtype=np.uint8, order="F")
    rle_src[30:33, 40:44] = 1  # 12 pixels
    rle = mask_utils.encode(rle_src)
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        _ann(1, [10, 10, 10, 10], segmentation=[[10, 10, 20, 10, 20, 20, 10, 20]]),
        _ann(2, [40, 30, 4, 3], segmentation=rle),
        _ann(3, [0, 0, 5, 5]),  # no segmentation
    ]
    return _make_dataset(tmp_path, anns)


def test_masks_not_loaded_by_default(tmp_path):
    ann_file, image_dir = _mask_dataset(tmp_path)
    sample = CocoInstances(ann_file, image_dir)[0]
    assert "masks" not in sample and "has_mask" not in sample


def test_masks_loaded_with_load_masks(tmp_path):
    ann_file, image_dir = _mask_dataset(tmp_path)
    ds = CocoInstances(ann_file, image_dir, load_masks=True)
    assert ds.stats["without_mask"] == 1
    s = ds[0]
    masks = s["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.shape == (3, 48, 64)
    assert masks[0].sum() == 100 and masks[0, 10:20, 10:20].all()  # polygon 10..20 covers pixels 10..19
    assert masks[1].sum() == 12 and masks[1, 30:33, 40:44].all()
    assert masks[2].sum() == 0
    assert s["has_mask"].tolist() == [True, True, False]


def test_bad_rle_size_rejected_at_load(tmp_path):
    rle = mask_utils.encode(np.zeros((10, 10), dtype=np.uint8, order="F"))
    rle["counts"] = rle["counts"].decode("ascii")
    ann_file, image_dir = _make_dataset(tmp_path, [_ann(8, [1, 1, 2, 2], segmentation=rle)])
    CocoInstances(ann_file, image_dir)  # not checked without load_masks
    with pytest.raises(DatasetError, match=r"annotation id 8: RLE size \[10, 10\]"):
        CocoInstances(ann_file, image_dir, load_masks=True)


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------


def _synthetic_sample(h: int = 40, w: int = 60) -> dict:
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0, 0, 0] = 255  # marker at the top-left corner
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 10:30, 5:15] = 1
    return {
        "image": tv_tensors.Image(img),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[5.0, 10.0, 15.0, 30.0], [0.0, 0.0, 0.4, 10.0]]), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.tensor([3, 4]),
        "ann_ids": torch.tensor([11, 12]),
        "masks": tv_tensors.Mask(masks),
        "has_mask": torch.tensor([True, False]),
        "image_id": 5,
        "orig_size": (h, w),
    }


def test_train_transforms_flip_moves_box_image_and_mask():
    out = build_train_transforms([40], 1000, flip_prob=1.0)(_synthetic_sample())  # shorter side 40: scale 1
    assert out["image"].shape == (3, 40, 60)
    assert out["image"][0, 0, 59] == 255 and out["image"][0, 0, 0] == 0  # marker moved to the right edge
    # x' = W - x: [5, 15] -> [45, 55]; the 0.4-px-wide box is removed with all its per-instance rows
    assert out["boxes"].tolist() == [[45.0, 10.0, 55.0, 30.0]]
    assert out["labels"].tolist() == [3] and out["ann_ids"].tolist() == [11]
    assert out["has_mask"].tolist() == [True]
    assert out["masks"].shape == (1, 40, 60) and out["masks"][0, 10:30, 45:55].all() and out["masks"].sum() == 200
    assert out["image_id"] == 5 and out["orig_size"] == (40, 60)


def test_train_transforms_resize_scales_boxes():
    out = build_train_transforms([80], 1000, flip_prob=0.0)(_synthetic_sample())  # scale 2
    assert out["image"].shape == (3, 80, 120)
    # [5, 10, 15, 30] * 2; the second box becomes 0.8 px wide (< 1 px) and is dropped
    assert out["boxes"].tolist() == [[10.0, 20.0, 30.0, 60.0]]
    assert tuple(out["boxes"].canvas_size) == (80, 120)
    capped = build_train_transforms([80], 90, flip_prob=0.0)(_synthetic_sample())  # longer side capped at 90
    assert capped["image"].shape == (3, 60, 90)


@pytest.mark.parametrize(
    "hw, sizes, expected",
    [
        ((600, 800), (512, 1333), (512, 682)),  # shorter side -> 512, 800 * 512 / 600 = 682.7 -> 682
        ((600, 800), (800, 1333), (800, 1066)),
        ((256, 1000), (512, 1333), (341, 1333)),  # 2000 > 1333: longer side capped, 512*1333/2000 = 341.2
        ((256, 1000), (512, 853), (218, 853)),
    ],
)
def test_test_resize_sizes(hw, sizes, expected):
    h, w = hw
    sample = {
        "image": tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)),
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, w, h]]), format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor([0]),
    }
    out = build_test_transforms(*sizes)(sample)
    assert tuple(out["image"].shape[1:]) == expected
    # the full-image box follows the image exactly
    assert torch.allclose(out["boxes"], torch.tensor([[0.0, 0.0, expected[1], expected[0]]]))


def test_transform_argument_errors():
    with pytest.raises(ValueError):
        build_train_transforms([], 1333)
    with pytest.raises(ValueError):
        build_train_transforms([800], 1333, flip_prob=1.5)
    with pytest.raises(ValueError):
        build_test_transforms(800, 800)


# --------------------------------------------------------------------------------------------
# collate
# --------------------------------------------------------------------------------------------


def _plain_sample(h, w, n, value, image_id, with_masks=False):
    s = {
        "image": tv_tensors.Image(torch.full((3, h, w), value, dtype=torch.uint8)),
        "boxes": tv_tensors.BoundingBoxes(torch.ones(n, 4), format="XYXY", canvas_size=(h, w)),
        "labels": torch.zeros(n, dtype=torch.int64),
        "ann_ids": torch.arange(n),
        "image_id": image_id,
        "orig_size": (2 * h, 2 * w),
    }
    if with_masks:
        s["masks"] = tv_tensors.Mask(torch.ones(n, h, w, dtype=torch.uint8))
        s["has_mask"] = torch.ones(n, dtype=torch.bool)
    return s


def test_collate_pads_to_multiple_of_32_with_zeros():
    batch = collate_batch([_plain_sample(50, 70, 2, 7, 1), _plain_sample(64, 33, 0, 9, 2)])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.uint8
    assert (batch.images[0, :, :50, :70] == 7).all() and batch.images[0, :, 50:].sum() == 0
    assert batch.images[0, :, :, 70:].sum() == 0
    assert (batch.images[1, :, :, :33] == 9).all() and batch.images[1, :, :, 33:].sum() == 0
    assert batch.image_sizes == [(50, 70), (64, 33)]
    assert batch.orig_sizes == [(100, 140), (128, 66)] and batch.image_ids == [1, 2]
    t0, t1 = batch.targets
    assert type(t0["boxes"]) is torch.Tensor and t0["boxes"].dtype == torch.float32 and t0["boxes"].shape == (2, 4)
    assert t0["labels"].dtype == torch.int64 and t0["ann_ids"].tolist() == [0, 1]
    assert "masks" not in t0 and "has_mask" not in t0
    assert t1["boxes"].shape == (0, 4)
    moved = batch.to("cpu")
    assert moved.images.data_ptr() == batch.images.data_ptr()  # .to on the same device is a no-op


def test_collate_masks_become_bool_and_make_collate_pickles():
    collate = pickle.loads(pickle.dumps(make_collate(size_divisibility=16)))
    batch = collate([_plain_sample(20, 17, 1, 1, 3, with_masks=True)])
    assert batch.images.shape == (1, 3, 32, 32)
    assert batch.targets[0]["masks"].dtype == torch.bool and batch.targets[0]["masks"].shape == (1, 20, 17)
    assert batch.targets[0]["has_mask"].tolist() == [True]
    with pytest.raises(ValueError):
        collate_batch([])


# --------------------------------------------------------------------------------------------
# bundled sample (+ one real-data check)
# --------------------------------------------------------------------------------------------


def test_subset_images_keeps_only_their_annotations_and_leaves_the_input_alone():
    data = {
        "info": {"year": 2026}, "licenses": [], "categories": [{"id": 3, "name": "nut"}],
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "annotations": [{"id": 10 + k, "image_id": i} for k, i in enumerate((1, 2, 2, 3))],
    }
    before = json.dumps(data)
    sub = subset_images(data, [data["images"][2], data["images"][1]], note="images 3 and 2")
    assert [im["id"] for im in sub["images"]] == [3, 2]
    assert [a["id"] for a in sub["annotations"]] == [11, 12, 13]
    assert sub["categories"] == data["categories"] and sub["licenses"] == []
    assert sub["info"] == {"year": 2026, "subset": "images 3 and 2"}
    assert json.dumps(data) == before
    assert subset_images(data, [])["annotations"] == [] and "subset" not in subset_images(data, [])["info"]


def test_bundled_sample_loads_with_expected_counts():
    paths = sample_paths()
    root = paths["image_dir"].parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 6 * 1024 * 1024
    assert "CC0" in (root / "README.md").read_text()
    expected = {"train_json": (40, 803), "val_json": (12, 355)}
    for key, (n_images, n_boxes) in expected.items():
        ds = CocoInstances(paths[key], paths["image_dir"], verbose=False)
        assert len(ds) == n_images and ds.stats["boxes"] == n_boxes
        assert ds.class_names == ["nucleus"] and ds.num_classes == 1
        assert ds.stats["skipped"] == 0 and ds.stats["crowd"] == 0
        sizes = {(img["width"], img["height"]) for img in ds.gt_coco().dataset["images"]}
        assert sizes <= {(256, 256), (320, 256)}
    ds = CocoInstances(paths["train_json"], paths["image_dir"], transforms=build_train_transforms([256], 512))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=make_collate(32))
    batch = next(iter(loader))
    assert batch.images.shape[0] == 2 and batch.images.shape[2] % 32 == 0 and batch.images.shape[3] % 32 == 0
    assert all(t["boxes"].shape[0] == t["labels"].shape[0] > 0 for t in batch.targets)


def test_real_dsb2018_annotations_validate():
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"
    if not (data / "annotations" / "instances_val.json").is_file():
        pytest.skip(f"real data not found at {data}")
    ds = CocoInstances(data / "annotations" / "instances_val.json", data / "images", check_images=False)
    assert len(ds) == 133 and ds.stats["boxes"] == 5804 and ds.class_names == ["nucleus"]
