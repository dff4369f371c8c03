"""COCO evaluation: results JSON with RLE masks, COCOeval mask/box AP, the box-filled baseline.

Results follow the COCO *results* format (https://cocodataset.org/#format-results):
one dict per detection with ``image_id``, ``category_id`` (the dataset's own id),
``bbox`` ``[x, y, w, h]`` in original-image pixels, ``score`` and, for masks,
``segmentation`` as compressed RLE ``{"size": [H, W], "counts": str}`` so any COCO tool
can read the file.

Metrics come from pycocotools' ``COCOeval`` (``evaluate`` + ``accumulate``), but the
summary numbers are read from ``eval["precision"]`` / ``eval["recall"]`` here at the
requested ``max_dets``: the stock ``summarize()`` fixes AP at 100 detections per image,
which under-reports crowded data such as DSB2018 nuclei (up to 375 objects per image;
see ``shared/data/README.md``).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "masks_to_rle",
    "boxes_to_masks",
    "detections_to_coco",
    "evaluate_coco",
    "format_ap_table",
    "boxfill_results",
    "METRIC_NAMES",
]

#: Keys of each per-IoU-type metrics dict returned by :func:`evaluate_coco`, in table order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")

_IOU_TYPES = ("segm", "bbox")
# Largest number of mask pixels materialised at once in boxfill_results (~64 MiB of bool).
_BOXFILL_CHUNK_PIXELS = 1 << 26


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def masks_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """Encode binary instance masks as COCO compressed RLE with pycocotools ``mask.encode``.

    Args:
        masks: ``[N, H, W]`` binary masks, dtype ``bool`` or an integer type (any non-zero
            value counts as foreground), torch tensor on any device or numpy array.

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}`` (``counts`` decoded to ASCII so the
        list is JSON-serialisable); ``[]`` when ``N == 0``.

    Raises:
        ValueError: ``masks`` is not 3-D.
        TypeError: ``masks`` is floating point (threshold probabilities first; a silent
            ``!= 0`` would turn every soft mask into the full image).
    """
    arr = _to_numpy(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks_to_rle: masks must be [N, H, W], got shape {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"masks_to_rle: masks must be bool or integer, got {arr.dtype}; threshold them first")
    if arr.shape[0] == 0:
        return []
    # pycocotools wants [H, W, N] uint8 in Fortran (column-major) order, 0/1 only.
    fortran = np.asfortranarray((arr != 0).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
        rle["size"] = [int(s) for s in rle["size"]]
    return rles


def boxes_to_masks(boxes: torch.Tensor | np.ndarray, height: int, width: int) -> torch.Tensor:
    """Fill boxes as masks: the "GT box as the mask" / box-filled baseline.

    Pixel convention: pixel ``(x, y)`` (column ``x``, row ``y``, integers) covers the square
    ``[x, x+1) x [y, y+1)`` and is inside box ``(x1, y1, x2, y2)`` when its centre lies in the
    closed box: ``x1 <= x + 0.5 <= x2`` and ``y1 <= y + 0.5 <= y2``. So an integer box
    ``[10, 20, 30, 40]`` fills columns 10..29 and rows 20..39 (area 400 = its box area), the
    same pixels pycocotools rasterises for the rectangle polygon with those corners.
    Boxes with ``x2 < x1`` or ``y2 < y1``, or outside the image, give empty masks.

    Args:
        boxes: ``[N, 4]`` float ``(x1, y1, x2, y2)`` in pixels (tensor or array).
        height, width: mask size ``H``, ``W`` in pixels (>= 0).

    Returns:
        ``[N, H, W]`` bool tensor, on the device of ``boxes`` when it is a tensor, else CPU.
        Memory is ``N*H*W`` bytes; chunk large ``N`` (as :func:`boxfill_results` does).

    Raises:
        ValueError: ``boxes`` is not ``[N, 4]`` or ``height``/``width`` is negative.
    """
    b = boxes if isinstance(boxes, torch.Tensor) else torch.as_tensor(np.asarray(boxes))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes_to_masks: boxes must be [N, 4] xyxy, got shape {tuple(b.shape)}")
    if height < 0 or width < 0:
        raise ValueError(f"boxes_to_masks: height/width must be >= 0, got {height}x{width}")
    b = b.to(torch.float64)
    xs = torch.arange(width, device=b.device, dtype=torch.float64) + 0.5
    ys = torch.arange(height, device=b.device, dtype=torch.float64) + 0.5
    in_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] <= b[:, 2:3])  # [N, W]
    in_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] <= b[:, 3:4])  # [N, H]
    return in_y[:, :, None] & in_x[:, None, :]


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    cat_ids: Sequence[int],
    masks: torch.Tensor | np.ndarray | None = None,
) -> list[dict]:
    """Turn one image's detections into COCO results dicts.

    Args:
        image_id: COCO ``image_id`` of the image (must exist in the GT used for evaluation).
        boxes: ``[N, 4]`` float ``(x1, y1, x2, y2)`` in *original-image* pixels.
        scores: ``[N]`` float confidences in ``[0, 1]``.
        labels: ``[N]`` int contiguous class indices ``0..C-1``.
        cat_ids: ``C`` COCO category ids; label ``l`` becomes ``category_id = cat_ids[l]``.
        masks: optional ``[N, H, W]`` bool masks at original-image size ``H x W``.

    Returns:
        ``N`` dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (plain
        Python ints/floats), plus ``"segmentation"`` (compressed RLE, see
        :func:`masks_to_rle`) when ``masks`` is given.

    Raises:
        ValueError: shapes disagree, or a label is outside ``0..len(cat_ids)-1``; the
            message names ``image_id``.
    """
    b = _to_numpy(boxes)
    if b.size == 0:
        b = np.zeros((0, 4))
    elif b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"image {image_id}: boxes must be [N, 4] xyxy, got shape {tuple(b.shape)}")
    b = b.astype(np.float64)
    s = _to_numpy(scores).astype(np.float64).reshape(-1)
    lab = _to_numpy(labels).reshape(-1)
    n = b.shape[0]
    if s.shape[0] != n or lab.shape[0] != n:
        raise ValueError(f"image {image_id}: {n} boxes but {s.shape[0]} scores and {lab.shape[0]} labels")
    if n and (lab.min() < 0 or lab.max() >= len(cat_ids)):
        raise ValueError(
            f"image {image_id}: labels must be in 0..{len(cat_ids) - 1} (contiguous), got {lab.min()}..{lab.max()}"
        )
    rles = None
    if masks is not None:
        m = _to_numpy(masks)
        if m.ndim != 3 or m.shape[0] != n:
            raise ValueError(f"image {image_id}: masks must be [{n}, H, W], got shape {tuple(m.shape)}")
        rles = masks_to_rle(m)
    out = []
    for i in range(n):
        x1, y1, x2, y2 = (float(v) for v in b[i])
        det = {
            "image_id": int(image_id),
            "category_id": int(cat_ids[int(lab[i])]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(s[i]),
        }
        if rles is not None:
            det["segmentation"] = rles[i]
        out.append(det)
    return out


def _load_results(coco_gt: COCO, anns: list[dict]) -> COCO:
    """``coco_gt.loadRes`` that also accepts an empty list (pycocotools indexes ``anns[0]``)."""
    if anns:
        return coco_gt.loadRes(anns)
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    res.createIndex()
    return res


def _check_results(coco_gt: COCO, results: Sequence[dict], iou_types: Iterable[str]) -> None:
    need_segm = "segm" in iou_types
    needed = ("image_id", "category_id", "score") + (("bbox",) if "bbox" in iou_types else ())
    for i, r in enumerate(results):
        for key in needed:
            if key not in r:
                raise ValueError(f"result {i}: missing '{key}'")
        img = coco_gt.imgs.get(r["image_id"])
        if img is None:
            raise ValueError(f"result {i}: image_id {r['image_id']} is not in the ground truth")
        if r["category_id"] not in coco_gt.cats:
            raise ValueError(f"result {i} (image {r['image_id']}): category_id {r['category_id']} is not in the ground truth")
        if need_segm:
            seg = r.get("segmentation")
            if not isinstance(seg, dict) or "counts" not in seg:
                raise ValueError(
                    f"result {i} (image {r['image_id']}): segm evaluation needs an RLE 'segmentation'; "
                    "pass iou_types=('bbox',) for box-only results"
                )
            if [int(v) for v in seg["size"]] != [int(img["height"]), int(img["width"])]:
                raise ValueError(
                    f"result {i} (image {r['image_id']}): mask size {list(seg['size'])} differs from the "
                    f"image size {[img['height'], img['width']]}; masks must be at original-image size"
                )


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return float(defined.mean()) * 100.0 if defined.size else None


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    iou_types: Sequence[str] = ("segm", "bbox"),
    max_dets: int = 100,
    image_ids: list[int] | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float | None]]:
    """COCO mask and box AP with pycocotools ``COCOeval``, counting up to ``max_dets`` detections per image.

    Runs ``COCOeval.evaluate()`` and ``accumulate()`` with ``params.maxDets = [1, 10, max_dets]``
    and reads the numbers from ``eval["precision"]`` (``[T, R, K, A, M]``) and
    ``eval["recall"]`` (``[T, K, A, M]``) at ``maxDets = max_dets``, averaging like the
    stock summary: AP over IoU 0.50:0.05:0.95, 101 recall points and the categories that
    have ground truth; AP50/AP75 at one IoU; APs/APm/APl over the COCO area ranges
    (< 32², 32²–96², > 96² px²; GT ``area`` field, detection area from the mask for segm,
    from the box for bbox); AR = recall at ``max_dets`` averaged over IoUs and categories.

    For ``segm`` the results' ``bbox`` is dropped before ``loadRes`` so detection areas come
    from the masks (otherwise pycocotools uses the box area for the area ranges).
    ``results`` is not modified; note that pycocotools converts ``coco_gt``'s polygon
    segmentations to RLE in place during segm evaluation (its standard behaviour).

    Args:
        coco_gt: ground truth as a pycocotools ``COCO`` object.
        results: COCO results dicts (see :func:`detections_to_coco`); masks must be RLE at
            the image size. May be empty.
        iou_types: any of ``"segm"``, ``"bbox"``.
        max_dets: detections per image counted (top by score), >= 1. Use >= 400 for DSB2018.
        image_ids: evaluate only these images (default: every GT image).
        verbose: let pycocotools print its progress and tables (silenced otherwise).

    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR"}}`` on the COCO 0–100
        scale. A value is ``None`` when it is not defined (no GT in that area range, or no
        GT at all). Empty ``results`` give 0.0 for every defined value.

    Raises:
        ValueError: unknown IoU type, ``max_dets < 1``, an image id in ``image_ids`` or in
            ``results`` that is not in ``coco_gt``, a result without the needed fields, an
            unknown category, or a mask whose size differs from its image. The message names
            the result index and image.
    """
    iou_types = tuple(iou_types)
    bad = [t for t in iou_types if t not in _IOU_TYPES]
    if bad:
        raise ValueError(f"evaluate_coco: unsupported iou_types {bad}; choose from {_IOU_TYPES}")
    if int(max_dets) != max_dets or max_dets < 1:
        raise ValueError(f"evaluate_coco: max_dets must be an integer >= 1, got {max_dets}")
    max_dets = int(max_dets)
    if image_ids is not None:
        image_ids = [int(i) for i in image_ids]
        missing = [i for i in image_ids if i not in coco_gt.imgs]
        if missing:
            raise ValueError(f"evaluate_coco: image_ids {missing[:10]} are not in the ground truth")
        keep = set(image_ids)
        results = [r for r in results if r.get("image_id") in keep]
    _check_results(coco_gt, results, iou_types)

    max_dets_list = sorted({1, 10, max_dets})
    m_index = max_dets_list.index(max_dets)
    out: dict[str, dict[str, float | None]] = {}
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        for iou_type in iou_types:
            if iou_type == "segm":
                anns = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
            else:
                anns = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
            coco_dt = _load_results(coco_gt, anns)
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            ev.params.maxDets = list(max_dets_list)
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            out[iou_type] = _summarise(ev, m_index)
            if verbose:
                print(f"{iou_type} @ maxDets={max_dets}: {out[iou_type]}")
    return out


def _summarise(ev: COCOeval, m: int) -> dict[str, float | None]:
    """Stock-style AP/AR from ``ev.eval`` at maxDets index ``m`` (methods: COCO detection eval)."""
    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M], -1 where undefined
    recall = ev.eval["recall"]  # [T, K, A, M]
    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    t50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(p.iouThrs - 0.75)))
    a_all = area["all"]
    return {
        "AP": _mean_defined(precision[:, :, :, a_all, m]),
        "AP50": _mean_defined(precision[t50, :, :, a_all, m]),
        "AP75": _mean_defined(precision[t75, :, :, a_all, m]),
        "APs": _mean_defined(precision[:, :, :, area["small"], m]),
        "APm": _mean_defined(precision[:, :, :, area["medium"], m]),
        "APl": _mean_defined(precision[:, :, :, area["large"], m]),
        "AR": _mean_defined(recall[:, :, a_all, m]),
    }


def format_ap_table(metrics: dict[str, dict[str, float | None]], columns: Sequence[str] = METRIC_NAMES[:6]) -> str:
    """Markdown table of :func:`evaluate_coco` output: one row per IoU type, one decimal.

    Args:
        metrics: ``{iou_type: {metric: value}}`` on the 0–100 scale; ``None``/NaN/missing
            values are shown as ``-``.
        columns: metric columns, default ``AP AP50 AP75 APs APm APl``.

    Returns:
        The table as a string (header, separator, one line per IoU type, trailing newline).
        Example::

            | type | AP | AP50 | AP75 | APs | APm | APl |
            |---|---:|---:|---:|---:|---:|---:|
            | segm | 40.0 | 100.0 | 0.0 | 40.0 | - | - |
    """

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{float(v):.1f}"

    lines = [
        "| type | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for iou_type, row in metrics.items():
        lines.append(f"| {iou_type} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def boxfill_results(results: list[dict], coco_gt: COCO) -> list[dict]:
    """The box-filled baseline: the same detections, each with its box filled as its mask.

    Every result's ``bbox`` ``[x, y, w, h]`` becomes the mask of :func:`boxes_to_masks`
    (pixel centres inside ``[x, x+w] x [y, y+h]``) as compressed RLE at the image's size
    from ``coco_gt``. With GT boxes as the detections this is the "GT box itself as the
    mask" reference in ``docs/design.md``: a lower bound any box-supervised mask head must
    beat. Masks are built in chunks of at most ~64 M pixels, so crowded large images
    (DSB2018) do not need ``N*H*W`` memory at once.

    Args:
        results: COCO results dicts with ``image_id`` and ``bbox`` (existing
            ``segmentation`` is replaced); not modified.
        coco_gt: ground truth giving each image's ``height`` and ``width``.

    Returns:
        New list of new dicts, same order, with ``segmentation`` = box RLE.

    Raises:
        ValueError: a result has no ``bbox`` or an ``image_id`` not in ``coco_gt`` (named
            with its index).
    """
    by_image: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        if "bbox" not in r:
            raise ValueError(f"result {i}: missing 'bbox'")
        if r.get("image_id") not in coco_gt.imgs:
            raise ValueError(f"result {i}: image_id {r.get('image_id')} is not in the ground truth")
        by_image[r["image_id"]].append(i)
    out: list[dict | None] = [None] * len(results)
    for image_id, idx in by_image.items():
        img = coco_gt.imgs[image_id]
        h, w = int(img["height"]), int(img["width"])
        xywh = np.array([results[i]["bbox"] for i in idx], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        chunk = max(1, _BOXFILL_CHUNK_PIXELS // max(1, h * w))
        for start in range(0, len(idx), chunk):
            rles = masks_to_rle(boxes_to_masks(xyxy[start : start + chunk], h, w))
            for i, rle in zip(idx[start : start + chunk], rles):
                new = dict(results[i])
                new["segmentation"] = rle
                out[i] = new
    return out  # type: ignore[return-value]
