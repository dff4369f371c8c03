"""Baselines for the boxes-given setting and the mean mask IoU of per-annotation masks.

When the ground-truth boxes are the input (as when a user annotates a box-labelled dataset with
``boxmask annotate``), a mask method can be compared with two classical references (see
``docs/design.md``, "Figures to beat"):

* **filled box**: the box itself as the mask (:func:`filled_box_annotations`), the lower bound any
  box-supervised mask must beat;
* **GrabCut** (Rother, Kolmogorov & Blake, "GrabCut: interactive foreground extraction using
  iterated graph cuts", SIGGRAPH 2004) initialised with the box, 5 iterations, with OpenCV's
  ``cv2.grabCut`` in ``GC_INIT_WITH_RECT`` mode (:func:`grabcut_mask`,
  :func:`grabcut_annotations`): colour GMMs for the box (probable foreground) and everything
  outside it (sure background), refined by graph cuts. It never marks a pixel outside the box.

Both produce COCO *results* (``image_id``, ``category_id``, ``bbox`` = the GT box, ``score`` 1.0,
compressed-RLE ``segmentation`` at the image size) with one extra key ``ann_id``, the id of the GT
annotation the mask was made for, so that :func:`mean_mask_iou` can compare each mask with its own
GT mask (mask AP alone cannot tell which GT a mask was meant for).

Box pixel convention (same as :func:`boxmask.engine.evaluator.boxes_to_masks`): pixel ``(x, y)``
is inside box ``(x1, y1, x2, y2)`` when its centre ``(x + 0.5, y + 0.5)`` lies in the closed box;
an integer COCO box ``[x, y, w, h]`` thus covers exactly ``w x h`` pixels.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from boxmask.data.coco import DatasetError, read_image_rgb
from boxmask.engine.evaluator import boxes_to_masks, masks_to_rle

__all__ = [
    "grabcut_mask",
    "grabcut_annotations",
    "filled_box_annotations",
    "annotations_to_results",
    "mask_ious",
    "mean_mask_iou",
]

#: GrabCut fits 5-component colour GMMs (OpenCV's fixed ``GMM::componentsCount``); a box with
#: fewer pixels than that inside or outside cannot be modelled and falls back to the filled box.
_GMM_COMPONENTS = 5
#: Boxes narrower or lower than this many pixels (after clipping) are kept as filled boxes.
_MIN_SIDE = 2


# --------------------------------------------------------------------------------------------
# GrabCut
# --------------------------------------------------------------------------------------------


def _image_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[3,H,W]`` uint8 tensor or ``[H,W,3]`` uint8 array → contiguous ``[H,W,3]`` uint8 array (RGB)."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"grabcut_mask: a tensor image must be [3, H, W], got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            raise TypeError(f"grabcut_mask: image must be uint8 (0..255), got {image.dtype}")
        arr = image.detach().cpu().permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"grabcut_mask: an ndarray image must be [H, W, 3] RGB, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise TypeError(f"grabcut_mask: image must be uint8 (0..255), got {arr.dtype}")
    return np.ascontiguousarray(arr)


def _box_pixel_rect(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel columns ``c0..c1`` and rows ``r0..r1`` (inclusive) whose centres lie in the xyxy box, clipped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    c0 = max(0, math.ceil(x1 - 0.5))
    r0 = max(0, math.ceil(y1 - 0.5))
    c1 = min(width - 1, math.floor(x2 - 0.5))
    r1 = min(height - 1, math.floor(y2 - 0.5))
    return c0, r0, c1, r1


def _grabcut(image: torch.Tensor | np.ndarray, box: Sequence[float], iterations: int = 5,
             seed: int = 0) -> tuple[np.ndarray, str | None]:
    """:func:`grabcut_mask` plus why it fell back to the filled box (``None`` when GrabCut's mask is used)."""
    import cv2  # OpenCV is needed only by this baseline

    rgb = _image_hwc(image)
    h, w = rgb.shape[:2]
    b = np.asarray(box.detach().cpu() if isinstance(box, torch.Tensor) else box, dtype=np.float64).reshape(-1)
    if b.shape[0] != 4 or not np.isfinite(b).all():
        raise ValueError(f"grabcut_mask: box must be 4 finite numbers (x1, y1, x2, y2), got {box!r}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"grabcut_mask: iterations must be an integer >= 1, got {iterations}")
    filled = boxes_to_masks(b[None], h, w)[0].numpy()
    c0, r0, c1, r1 = _box_pixel_rect(b, h, w)
    rw, rh = c1 - c0 + 1, r1 - r0 + 1
    if rw < _MIN_SIDE or rh < _MIN_SIDE:
        return filled, "tiny_box"
    inside = rw * rh
    if inside < _GMM_COMPONENTS or h * w - inside < _GMM_COMPONENTS:
        return filled, "no_background" if h * w - inside < _GMM_COMPONENTS else "tiny_box"
    gc = np.zeros((h, w), np.uint8)
    bgd_model = np.zeros((1, 65), np.float64)  # OpenCV's packed 5-component GMM (13 doubles each)
    fgd_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(int(seed))  # GMM initialisation uses k-means++: make each call reproducible
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    cv2.grabCut(bgr, gc, (int(c0), int(r0), int(rw), int(rh)), bgd_model, fgd_model, int(iterations),
                cv2.GC_INIT_WITH_RECT)
    mask = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if not mask.any():
        return filled, "empty"
    return mask, None


def grabcut_mask(image: torch.Tensor | np.ndarray, box: Sequence[float] | np.ndarray | torch.Tensor,
                 iterations: int = 5, seed: int = 0) -> np.ndarray:
    """Foreground mask of the object in ``box`` by OpenCV GrabCut initialised with the box.

    ``cv2.grabCut`` runs in ``GC_INIT_WITH_RECT`` mode on the whole image: pixels outside the
    rectangle are sure background (``GC_BGD``), those inside probable foreground, and after
    ``iterations`` rounds of GMM fitting + graph cut the mask is ``GC_FGD | GC_PR_FGD``
    (Rother et al., SIGGRAPH 2004). The rectangle holds the pixels whose centres lie in the box
    (the :func:`~boxmask.engine.evaluator.boxes_to_masks` convention), clipped to the image, so
    the mask is always inside the filled box. OpenCV's random generator is seeded with ``seed``
    before each call (its k-means++ GMM initialisation), so results do not depend on call order;
    this resets OpenCV's global RNG state.

    Falls back to the filled box (clipped to the image) when GrabCut cannot run or finds nothing:
    a box under 2 pixels wide or high after clipping (or holding fewer than 5 pixels, the GMM
    component count), a box leaving fewer than 5 pixels of background (e.g. the whole image),
    or an empty GrabCut result. A box entirely outside the image gives an empty mask.

    Args:
        image: the image, either a torch ``uint8`` tensor ``[3, H, W]`` or a numpy ``uint8``
            array ``[H, W, 3]``, RGB, values 0..255 (grayscale images replicated to 3 channels,
            as :func:`boxmask.data.coco.read_image_rgb` returns them).
        box: ``(x1, y1, x2, y2)`` in pixels of this image (float; a COCO ``[x, y, w, h]`` box is
            ``(x, y, x + w, y + h)``).
        iterations: GrabCut iterations (>= 1); 5 is the usual baseline setting.
        seed: OpenCV RNG seed set before the call.

    Returns:
        ``[H, W]`` numpy ``bool`` mask.

    Raises:
        ValueError: image not ``[3,H,W]`` (tensor) / ``[H,W,3]`` (array), box not 4 finite
            numbers, or ``iterations < 1``.
        TypeError: image is not ``uint8``.
    """
    return _grabcut(image, box, iterations, seed)[0]


# --------------------------------------------------------------------------------------------
# COCO files → per-annotation baseline results
# --------------------------------------------------------------------------------------------


def _read_coco_json(source: str | Path | dict) -> tuple[dict, str]:
    """Load a COCO JSON (or take a dict) and return ``(data, name for messages)``."""
    if isinstance(source, dict):
        return source, "<coco dict>"
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a valid JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data, str(path)


def _index_coco(data: dict, name: str, image_ids: Sequence[int] | None) -> tuple[dict, list[dict]]:
    """``({image_id: image record}, [non-crowd annotations of the kept images, file order])`` with checks."""
    images: dict[int, dict] = {}
    for k, img in enumerate(data.get("images") or []):
        for key in ("id", "height", "width"):
            if key not in img:
                raise DatasetError(f"{name}: image record #{k} has no '{key}'")
        images[img["id"]] = img
    keep = None if image_ids is None else set(image_ids)
    if keep is not None:
        missing = sorted(keep - set(images))
        if missing:
            raise DatasetError(f"{name}: image ids {missing[:5]} are not in 'images'")
    anns = []
    for k, ann in enumerate(data.get("annotations") or []):
        where = f"{name}: annotation {ann.get('id', f'#{k}')}"
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise DatasetError(f"{where}: missing '{key}'")
        if ann["image_id"] not in images:
            raise DatasetError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        bbox = ann["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise DatasetError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        if ann.get("iscrowd", 0):
            continue
        if keep is None or ann["image_id"] in keep:
            anns.append(ann)
    return images, anns


def _result(ann: dict, rle: dict) -> dict:
    return {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [float(v) for v in ann["bbox"]],
            "score": 1.0, "segmentation": rle, "ann_id": ann["id"]}


def _xywh_to_xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def filled_box_annotations(coco_json_path: str | Path | dict, image_dir: str | Path | None = None,
                           progress: bool = False, image_ids: Sequence[int] | None = None) -> list[dict]:
    """The "GT box as the mask" baseline for every non-crowd annotation of a COCO file.

    Each annotation's ``bbox`` ``[x, y, w, h]`` is filled with
    :func:`~boxmask.engine.evaluator.boxes_to_masks` (pixel centres inside the box) at the image
    size from the JSON's ``images`` record; no image is read.

    Args:
        coco_json_path: COCO instances JSON (path, or the loaded dict).
        image_dir: unused (accepted so that every baseline has the same signature).
        progress: show a tqdm bar over the annotations.
        image_ids: only annotations of these images (default: all images).

    Returns:
        COCO results in annotation file order, one per non-crowd annotation:
        ``{"image_id", "category_id", "bbox" (the GT box), "score": 1.0, "segmentation"
        (compressed RLE ``{"size": [H, W], "counts": str}``), "ann_id"}``.

    Raises:
        DatasetError: missing/unreadable file, an annotation without ``id``/``image_id``/
            ``category_id``/``bbox``, a malformed ``bbox`` or unknown image id (named).
    """
    data, name = _read_coco_json(coco_json_path)
    images, anns = _index_coco(data, name, image_ids)
    out = []
    for ann in tqdm(anns, desc="filled box", disable=not progress, unit="ann"):
        img = images[ann["image_id"]]
        mask = boxes_to_masks(np.array([_xywh_to_xyxy(ann["bbox"])]), int(img["height"]), int(img["width"]))
        out.append(_result(ann, masks_to_rle(mask)[0]))
    return out


def grabcut_annotations(coco_json_path: str | Path | dict, image_dir: str | Path, progress: bool = True,
                        image_ids: Sequence[int] | None = None, iterations: int = 5) -> list[dict]:
    """GrabCut baseline (:func:`grabcut_mask`) for every non-crowd annotation of a COCO file.

    Images are read once each with :func:`boxmask.data.coco.read_image_rgb` from
    ``image_dir / file_name``; every annotation's GT box initialises one GrabCut run on that image.
    About 0.2–0.8 s per instance on one CPU core for 0.5–1 Mpixel images (GrabCut works on the
    whole image).

    Args:
        coco_json_path: COCO instances JSON (path, or the loaded dict); boxes ``[x, y, w, h]``
            in pixels.
        image_dir: folder the images' ``file_name`` is relative to.
        progress: show a tqdm bar over the annotations.
        image_ids: only annotations of these images (default: all images).
        iterations: GrabCut iterations per box.

    Returns:
        COCO results in annotation file order, as :func:`filled_box_annotations`, with the GrabCut
        mask as ``segmentation``; results that fell back to the filled box carry
        ``"grabcut_fallback"`` = ``"tiny_box"``, ``"no_background"`` or ``"empty"``.

    Raises:
        DatasetError: as :func:`filled_box_annotations`; an image record without ``file_name``,
            an unreadable image, or an image whose size differs from its record (all named).
    """
    data, name = _read_coco_json(coco_json_path)
    images, anns = _index_coco(data, name, image_ids)
    by_image: dict[Any, list[int]] = defaultdict(list)
    for i, ann in enumerate(anns):
        by_image[ann["image_id"]].append(i)
    out: list[dict | None] = [None] * len(anns)
    bar = tqdm(total=len(anns), desc="grabcut", disable=not progress, unit="ann")
    for image_id, idx in by_image.items():
        img = images[image_id]
        if "file_name" not in img:
            raise DatasetError(f"{name}: image {image_id} has no 'file_name'")
        path = Path(image_dir) / img["file_name"]
        image = read_image_rgb(path)
        if tuple(image.shape[-2:]) != (int(img["height"]), int(img["width"])):
            raise DatasetError(f"{path}: image is {image.shape[-1]}x{image.shape[-2]} (WxH) but {name} says "
                               f"{img['width']}x{img['height']} for image {image_id}")
        rgb = _image_hwc(image)
        for i in idx:
            mask, fallback = _grabcut(rgb, _xywh_to_xyxy(anns[i]["bbox"]), iterations)
            res = _result(anns[i], masks_to_rle(mask[None])[0])
            if fallback is not None:
                res["grabcut_fallback"] = fallback
            out[i] = res
            bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


def _to_compressed_rle(seg: Any, height: int, width: int, where: str) -> dict:
    """Polygon list, uncompressed RLE or compressed RLE → compressed RLE with ``counts`` as str."""
    if isinstance(seg, list):
        if not seg:
            rle = mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [height, width]:
            raise DatasetError(f"{where}: RLE size {list(seg['size'])} differs from the image size {[height, width]}")
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else dict(seg)
    else:
        raise DatasetError(f"{where}: 'segmentation' must be a polygon list or an RLE dict, got {type(seg).__name__}")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def annotations_to_results(coco_json_path: str | Path | dict, image_ids: Sequence[int] | None = None) -> list[dict]:
    """Turn a COCO file whose annotations carry masks (e.g. ``boxmask annotate`` output) into COCO results.

    Args:
        coco_json_path: COCO instances JSON (path or loaded dict) where every non-crowd annotation
            has a ``segmentation`` (polygons, uncompressed or compressed RLE).
        image_ids: only annotations of these images (default: all).

    Returns:
        One result per non-crowd annotation, file order: ``{"image_id", "category_id", "bbox"
        (the annotation's box), "score": 1.0, "segmentation" (compressed RLE, ``counts`` str),
        "ann_id"}``.

    Raises:
        DatasetError: as :func:`filled_box_annotations`, or an annotation without a
            ``segmentation``, or an RLE whose size differs from its image (named).
    """
    data, name = _read_coco_json(coco_json_path)
    images, anns = _index_coco(data, name, image_ids)
    out = []
    for ann in anns:
        where = f"{name}: annotation {ann['id']}"
        if "segmentation" not in ann:
            raise DatasetError(f"{where}: no 'segmentation'")
        img = images[ann["image_id"]]
        out.append(_result(ann, _to_compressed_rle(ann["segmentation"], int(img["height"]), int(img["width"]), where)))
    return out


# --------------------------------------------------------------------------------------------
# Mean mask IoU
# --------------------------------------------------------------------------------------------


def _as_coco(coco_gt: COCO | str | Path) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    import contextlib
    import io

    path = Path(coco_gt)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))


def mask_ious(coco_gt: COCO | str | Path, results: Sequence[dict]) -> list[float]:
    """IoU of each result mask with the GT mask of the annotation it was made for.

    Matching: a result with an ``ann_id`` key is compared with GT annotation ``ann_id``. When no
    result has ``ann_id``, results are matched by order with the non-crowd annotations of
    ``coco_gt.dataset["annotations"]`` in file order (then their number must be equal). Mixing
    the two is an error. GT masks come from ``COCO.annToRLE`` (polygons or RLE); IoU =
    |pred ∩ gt| / |pred ∪ gt| over pixels (pycocotools ``mask.iou`` with ``iscrowd=0``), and 1.0
    when both masks are empty.

    Args:
        coco_gt: GT as a pycocotools ``COCO`` (or the path of its JSON).
        results: COCO results with an RLE ``segmentation`` (compressed, or uncompressed with
            list ``counts``) at the image size and an ``image_id``.

    Returns:
        IoUs in ``[0, 1]``, one per result, in the order of ``results``.

    Raises:
        ValueError: some but not all results have ``ann_id``; order matching with a different
            number of results; an unknown ``ann_id``; a result whose ``image_id`` differs from its
            annotation's; a missing/non-RLE ``segmentation``; a mask size different from the image
            size (the result index is named).
    """
    gt = _as_coco(coco_gt)
    with_id = [("ann_id" in r) for r in results]
    if any(with_id) and not all(with_id):
        raise ValueError(f"mean_mask_iou: {sum(with_id)} of {len(results)} results have 'ann_id'; all or none must")
    if results and not with_id[0]:
        order = [a for a in gt.dataset.get("annotations", []) if not a.get("iscrowd", 0)]
        if len(order) != len(results):
            raise ValueError(f"mean_mask_iou: matching by order needs one result per non-crowd GT annotation "
                             f"({len(order)}), got {len(results)}; give results an 'ann_id'")
        gt_anns = order
    else:
        gt_anns = []
        for i, r in enumerate(results):
            if r["ann_id"] not in gt.anns:
                raise ValueError(f"mean_mask_iou: result {i}: ann_id {r['ann_id']!r} is not in the ground truth")
            gt_anns.append(gt.anns[r["ann_id"]])
    ious = []
    for i, (r, ann) in enumerate(zip(results, gt_anns)):
        if r.get("image_id") != ann["image_id"]:
            raise ValueError(f"mean_mask_iou: result {i} is for image {r.get('image_id')!r} but its GT annotation "
                             f"{ann['id']} is in image {ann['image_id']}")
        img = gt.imgs[ann["image_id"]]
        h, w = int(img["height"]), int(img["width"])
        seg = r.get("segmentation")
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise ValueError(f"mean_mask_iou: result {i} (image {ann['image_id']}) needs an RLE 'segmentation'")
        if [int(v) for v in seg["size"]] != [h, w]:
            raise ValueError(f"mean_mask_iou: result {i} (image {ann['image_id']}): mask size {list(seg['size'])} "
                             f"differs from the image size {[h, w]}")
        pred = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        target = gt.annToRLE(ann)
        if mask_utils.area(pred) == 0 and mask_utils.area(target) == 0:
            ious.append(1.0)
        else:
            ious.append(float(mask_utils.iou([pred], [target], [0])[0, 0]))
    return ious


def mean_mask_iou(coco_gt: COCO | str | Path, results: Sequence[dict]) -> float:
    """Mean over results of the IoU between each result mask and its own GT mask (:func:`mask_ious`).

    This is the boxes-given quality measure: every GT box yields exactly one mask, so the IoU with
    the GT mask of that box is defined for each (unlike mask AP it ignores scores and duplicates).

    Returns:
        Mean IoU in ``[0, 1]``; ``nan`` for empty ``results``.

    Raises:
        ValueError: as :func:`mask_ious`.
    """
    ious = mask_ious(coco_gt, results)
    return float(np.mean(ious)) if ious else float("nan")
