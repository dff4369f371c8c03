"""``boxmask annotate``: fill in ``segmentation`` for every box of a COCO JSON with a trained model.

Each annotation's mask comes from box-conditioned inference (:mod:`boxmask.modeling.box_conditioned`;
methods.md §1.4, DiscoBox box-conditioned inference in methods.md §6): the dynamic mask head driven by
the controller output at the best FCOS location inside the given box, binarised as CondInst does
(methods.md §1.7) and clipped to the box. The output is the input JSON with, per annotation,
``segmentation`` (compressed RLE at the image size) and ``area`` (mask pixels) replaced; every other
key, record and field is kept, in the same order.

Binarisation fitted to the box (``binarize="box_fit"``, the default): masks of box-supervised models
are conservative (on dsb2018 their area at the model's threshold is ~75 % of the true one), so each
box gets its own threshold: the highest one, at most the model's ``mask_threshold`` and at least
``min_threshold``, at which the binary mask still reaches every row and every column of its box --
the object of a tight box touches all four sides, which is BoxInst's projection constraint
(methods.md §2.3) applied to the final mask (:func:`box_fit_threshold`). ``binarize="fixed"`` uses the
model's threshold for every box.

Never worse than the box: each model mask gets a quality estimate from the mask and the box alone
(:func:`mask_quality`: stability under the threshold, how much of the box's width and height it
reaches, agreement between the candidate locations); below ``fallback_threshold`` the filled box is
kept instead (reason ``low quality``). Small objects: with ``box_size > 0`` each image is scaled by its
own boxes (:class:`~boxmask.data.transforms.BoxAdaptiveResize`) so that a 5–15 px nucleus is drawn on
more than a handful of stride-4 cells. ``OUTPUT.report.json`` lists per annotation where its mask came
from and the quality cues.

No annotation is ever dropped. One the model cannot serve keeps its box as the mask and is counted
by reason in the summary: ``crowd`` (``iscrowd=1``), ``non-finite``, ``zero or negative size``,
``outside the image`` (the boxes :class:`~boxmask.data.coco.CocoInstances` leaves out), ``empty mask``
(nothing above the threshold inside the box), ``low quality`` (see above). A box's pixels are those whose centre lies in the
closed box (:func:`~boxmask.engine.evaluator.boxes_to_masks`); a positive-size box too small to
contain a pixel centre gets the pixels it touches.

Resume: finished images are appended to a sidecar ``OUTPUT.partial.jsonl`` (one JSON line per image
after a header line with a fingerprint of the input JSON, the weights and the settings; flushed per
image, fsynced every ``save_every`` images). A rerun with ``resume=True`` checks the fingerprint, drops
a torn last line, skips the finished images and produces the same output as an uninterrupted run.
The final JSON is written atomically and the sidecar then removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..config import Config
from ..data.coco import CocoInstances
from ..data.collate import make_collate
from ..data.transforms import BoxAdaptiveResize, build_test_transforms
from ..io import atomic_write_json, atomic_write_text
from ..modeling.box_conditioned import LOCATION_RANKS, BoxConditionedModel
from ..ops import aligned_bilinear
from .evaluator import boxes_to_masks, masks_to_rle

__all__ = ["AnnotateError", "BINARIZE_MODES", "FALLBACK_THRESHOLD", "MIN_THRESHOLD", "annotate_dataset", "box_fit_threshold",
           "box_pixels", "mask_quality", "report_path", "sidecar_path"]

SIDECAR_SUFFIX = ".partial.jsonl"
_SIDECAR_VERSION = 1
# Mask pixels (instances x H x W at the original size) binarised at once.
_CHUNK_PIXELS = 1 << 24


class AnnotateError(RuntimeError):
    """``annotate`` cannot continue: e.g. a resume sidecar written for another input, model or settings."""


def sidecar_path(output_json: str | Path) -> Path:
    """The resume sidecar of an output path: ``OUTPUT + ".partial.jsonl"`` in the same folder."""
    p = Path(output_json)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def report_path(output_json: str | Path) -> Path:
    """The per-annotation report of an output path: ``OUTPUT + ".report.json"`` in the same folder."""
    p = Path(output_json)
    return p.with_name(p.name + ".report.json")


def box_pixels(box_xyxy: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """Pixels of a box as a bool ``[H,W]`` mask (original-image pixels).

    Pixels whose centre lies in the closed box (as :func:`~boxmask.engine.evaluator.boxes_to_masks`);
    when that is empty but the box has positive width and height and overlaps the image, the pixels it
    touches (columns ``floor(x1)..ceil(x2)-1``, rows likewise, clipped). Non-finite, empty or
    outside boxes give an all-False mask.
    """
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    mask = boxes_to_masks(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64), height, width)[0]
    if not bool(mask.any()) and all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1:
        c0, c1 = max(math.floor(x1), 0), min(math.ceil(x2), width)
        r0, r1 = max(math.floor(y1), 0), min(math.ceil(y2), height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def _box_problem(ann: dict, width: int, height: int) -> str | None:
    """Why CocoInstances leaves an annotation out (same rules and wording), or None."""
    if ann.get("iscrowd", 0):
        return "crowd"
    x, y, w, h = (float(v) for v in ann["bbox"])
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "non-finite"
    if w <= 0 or h <= 0:
        return "zero or negative size"
    if min(max(x + w, 0.0), width) - min(max(x, 0.0), width) <= 0 or min(max(y + h, 0.0), height) - min(max(y, 0.0), height) <= 0:
        return "outside the image"
    return None


def _xyxy(bbox: list[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def _model_fingerprint(model: BoxConditionedModel) -> str:
    """sha256 over parameter/buffer names, shapes, dtypes and bytes of the state dict."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _label_map(dataset: CocoInstances, meta: dict) -> list[int]:
    """Dataset label → model label: same category name first, else same COCO id, else -1 (unknown)."""
    by_name = {n: i for i, n in enumerate(meta["class_names"])}
    by_id = {c: i for i, c in enumerate(meta["cat_ids"])}
    return [by_name.get(n, by_id.get(c, -1)) for n, c in zip(dataset.class_names, dataset.cat_ids)]


def _read_sidecar(path: Path, fingerprint: dict) -> tuple[list[str], dict[int, dict]]:
    """Valid record lines and records by image id of a sidecar; a torn last line is dropped.

    Raises AnnotateError when the header's fingerprint differs from ``fingerprint``.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        warnings.warn(f"{path}: unreadable header; starting over", stacklevel=3)
        return [], {}
    old = header.get("fingerprint", {}) if isinstance(header, dict) else {}
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        raise AnnotateError(
            f"{path}: resume file was written for a different {', '.join(diff)}; delete it or run without resume"
        )
    kept, records = [], {}
    for k, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            iid = int(rec["image_id"])
            if not isinstance(rec["annotations"], list):
                raise TypeError("annotations must be a list")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            # only a torn write (the last line) can be broken; anything after it is ignored too
            warnings.warn(f"{path}: line {k} is incomplete; redoing that image and any after it", stacklevel=3)
            break
        kept.append(line)
        records[iid] = rec
    return kept, records


def _probabilities(logits: torch.Tensor, image_size: tuple[int, int], orig_size: tuple[int, int],
                   out_stride: int) -> torch.Tensor:
    """Stride-4 logits ``[N,1,Hp/4,Wp/4]`` → float ``[N,H,W]`` mask probabilities at the original size
    (aligned upsampling, crop to the resized image, bilinear resize; methods.md §1.7)."""
    h, w = image_size
    probs = aligned_bilinear(logits.sigmoid(), out_stride)[:, :, :h, :w]
    return F.interpolate(probs, size=orig_size, mode="bilinear", align_corners=False)[:, 0]


#: probability band of the stability cue: the mask at ``t + d`` over the mask at ``t - d``
STABILITY_DELTA = 0.2
#: default of ``annotate_dataset(fallback_threshold=...)``; chosen on a dev split of dsb2018 *training*
#: images with the box-fitted threshold (README "annotate"), never on a val split
FALLBACK_THRESHOLD = 0.3
#: default of ``annotate_dataset(min_threshold=...)``: the lowest threshold the box fit may use
MIN_THRESHOLD = 0.1
#: values of ``annotate_dataset(binarize=...)``
BINARIZE_MODES = ("box_fit", "fixed")


def box_fit_threshold(probs: torch.Tensor, box: torch.Tensor, max_threshold: float,
                      min_threshold: float = MIN_THRESHOLD) -> float:
    """The highest threshold at which a box's binary mask reaches every row and column of the box.

    ``probs > t`` restricted to the box reaches row ``r`` iff ``t`` is below that row's largest probability,
    so the mask touches all four sides (BoxInst's projection constraint, methods.md §2.3, on the final
    mask) iff ``t < t* = min(min_r max_c p, min_c max_r p)`` over the box's rows and columns. Returns
    ``t*`` clamped to ``[min_threshold, max_threshold]``; pixels with ``p >= t`` form the mask when the
    result is below ``max_threshold`` (so the pixel that sets ``t*`` is in), ``p > max_threshold`` otherwise
    (the model's own binarisation, methods.md §1.7).

    Args:
        probs: float ``[H,W]`` mask probabilities in ``[0, 1]`` (original image pixels).
        box: bool ``[H,W]`` the box's pixels (:func:`box_pixels`).
        max_threshold: the model's mask threshold, in ``(0, 1)``.
        min_threshold: the lowest threshold returned, in ``[0, max_threshold]``.

    Returns:
        The threshold as a Python float; ``max_threshold`` when the box has no pixel.

    Raises:
        ValueError: ``min_threshold`` outside ``[0, max_threshold]``.
    """
    if not 0.0 <= min_threshold <= max_threshold:
        raise ValueError(f"box_fit_threshold: min_threshold must be in [0, {max_threshold}], got {min_threshold}")
    rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
    if not len(rows):
        return float(max_threshold)
    # on the box's bounding crop: the full image per box would cost O(H*W) for every nucleus
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = box[r0:r1, c0:c1]
    inside = torch.where(crop, probs[r0:r1, c0:c1], torch.zeros((), dtype=probs.dtype))
    t_star = min(float(inside.amax(1)[crop.any(1)].min()), float(inside.amax(0)[crop.any(0)].min()))
    return float(min(max(t_star, min_threshold), max_threshold))


def _binarize(probs: torch.Tensor, box: torch.Tensor, threshold: float, max_threshold: float) -> torch.Tensor:
    """Binary mask clipped to the box: ``p > t`` at the model's threshold, ``p >= t`` below it (box fit)."""
    return ((probs >= threshold) if threshold < max_threshold else (probs > threshold)) & box


def mask_quality(probs: torch.Tensor, box: torch.Tensor, threshold: float = 0.5,
                 agreement: float = float("nan"), mask: torch.Tensor | None = None) -> dict[str, float]:
    """Per-box quality estimate of a model mask, from the mask and the box alone (no ground truth).

    Cues, each in ``[0, 1]`` (1 = trustworthy):

    * ``stability``: ``|p > t + d| / |p > t - d|`` inside the box (``t`` the mask threshold, ``d`` =
      :data:`STABILITY_DELTA`): a confident mask barely changes when the threshold moves (the stability
      score of Segment Anything, Kirillov et al. 2023, §3 of its appendix), a hesitant one does;
    * ``cover``: the smaller of the fractions of the box's columns and rows that the binary mask reaches:
      the object of a tight box touches all four sides (BoxInst's projection term, methods.md §2.3, on the
      final mask), a fragment or a neighbour's mask does not;
    * ``agreement``: mean IoU of the chosen candidate with the other candidates the model drew for the box
      (:class:`~boxmask.modeling.box_conditioned.BoxConditionedMasks`), taken as 1 when unknown (NaN).

    ``quality = stability * cover * agreement``; ``fill`` (mask pixels over box pixels) is reported too.

    Args:
        probs: float ``[H,W]`` mask probabilities at the original image size.
        box: bool ``[H,W]`` the box's pixels (:func:`box_pixels`).
        threshold: the mask threshold ``t`` in ``[0, 1)`` (the box-fitted one when the mask was fitted).
        agreement: the candidates' agreement, or NaN.
        mask: bool ``[H,W]`` the binary mask that was kept (default ``(probs > threshold) & box``).

    Returns:
        ``{"quality", "stability", "cover", "agreement", "fill"}`` as Python floats; all 0 (quality 0)
        when the mask inside the box is empty or the box has no pixel.
    """
    p = probs[box]
    zero = {"quality": 0.0, "stability": 0.0, "cover": 0.0, "agreement": 0.0, "fill": 0.0}
    if p.numel() == 0:
        return zero
    mask = ((probs > threshold) if mask is None else mask) & box
    area = int(mask.sum())
    if area == 0:
        return zero
    lo = int((p > max(threshold - STABILITY_DELTA, 0.0)).sum())
    hi = int((p > min(threshold + STABILITY_DELTA, 1.0)).sum())
    stability = hi / max(lo, 1)
    rows, cols = box.any(1), box.any(0)
    cover = min(float(mask.any(1)[rows].float().mean()), float(mask.any(0)[cols].float().mean()))
    agree = 1.0 if not math.isfinite(agreement) else float(agreement)
    return {"quality": stability * cover * agree, "stability": stability, "cover": cover, "agreement": agree,
            "fill": area / int(box.sum())}


def _image_record(image_id: int, ann_ids: list[int], boxes_orig: list[tuple], result, image_size, orig_size,
                  out_stride: int, threshold: float, agnostic: list[bool], fallback_threshold: float,
                  binarize: str = "box_fit", min_threshold: float = MIN_THRESHOLD) -> dict:
    """Masks of one image's served annotations as a sidecar record (with their quality cues and the
    threshold each was binarised at)."""
    oh, ow = orig_size
    n = len(ann_ids)
    chunk = max(1, _CHUNK_PIXELS // max(oh * ow, 1))
    agreement = result.agreement
    anns = []
    for s in range(0, n, chunk):
        probs = _probabilities(result.logits[s:s + chunk], image_size, orig_size, out_stride).cpu()
        for j in range(probs.shape[0]):
            i = s + j
            box = box_pixels(boxes_orig[i], oh, ow)
            t = box_fit_threshold(probs[j], box, threshold, min_threshold) if binarize == "box_fit" else threshold
            mask = _binarize(probs[j], box, t, threshold)
            agree = float(agreement[i]) if agreement is not None and len(agreement) > i else float("nan")
            cues = mask_quality(probs[j], box, t, agree, mask)
            source, reason = "model", None
            if not bool(mask.any()):
                mask, source, reason = box, "box", "empty mask"
            elif cues["quality"] < fallback_threshold:
                mask, source, reason = box, "box", "low quality"
            rle = masks_to_rle(mask[None])[0]
            anns.append({"id": int(ann_ids[i]), "segmentation": rle, "area": int(mask.sum()), "source": source,
                         "reason": reason, "nearest": not bool(result.inside[i]), "agnostic": bool(agnostic[i]),
                         "threshold": round(t, 5),
                         "cues": {k: round(v, 5) for k, v in cues.items()}})
    return {"image_id": int(image_id), "annotations": anns}


def annotate_dataset(model: BoxConditionedModel, cfg: Config, meta: dict, ann_file: str | Path, image_dir: str | Path,
                     output_json: str | Path, device: str | torch.device = "cpu", progress: bool = True,
                     resume: bool = True, *, batch_size: int = 1, num_workers: int = 0,
                     save_every: int = 20, rank: str = "score_iou", candidates: int = 5,
                     box_size: float | None = None, box_size_max: int | None = None,
                     fallback_threshold: float = FALLBACK_THRESHOLD, binarize: str = "box_fit",
                     min_threshold: float = MIN_THRESHOLD) -> dict[str, Any]:
    """Write ``ann_file`` with a model mask for every annotation to ``output_json`` (module docstring).

    Images are resized with the test transform of ``cfg`` (``data.test_min_size``/``test_max_size``),
    boxes go through :meth:`~boxmask.modeling.condinst.CondInst.box_conditioned_masks`, masks are
    binarised at the original image size (per box at :func:`box_fit_threshold`, or at
    ``cfg.model.mask_threshold`` with ``binarize="fixed"``) and clipped to the box.
    A box's category is matched to the model's classes by name, else by COCO id; an unknown
    category uses the class-agnostic location score.

    Args:
        model: a trained network with box-conditioned inference (:class:`~boxmask.modeling.box_conditioned.BoxConditionedModel`:
            CondInst or SOLOv2); moved to ``device`` and put in eval mode.
        cfg: its config (from :func:`~boxmask.engine.inference.load_checkpoint`).
        meta: checkpoint meta with ``class_names`` and ``cat_ids`` of the model.
        ann_file: input COCO instances JSON (boxes; existing segmentations are replaced).
        image_dir: folder the ``file_name`` entries are relative to.
        output_json: output path (may equal ``ann_file``; written atomically at the end).
        device: inference device.
        progress: show a tqdm bar over images.
        resume: continue from the sidecar of ``output_json`` if present; False starts over.
        batch_size: images per forward pass; num_workers: DataLoader workers for decoding.
        save_every: fsync the sidecar every this many images (each image is flushed anyway).
        rank: location ranking of :mod:`~boxmask.modeling.box_conditioned` (rule 2)
            (``"score_iou"`` or ``"score"``).
        candidates: FCOS locations tried per box, the mask that fits the box best is kept
            (:meth:`~boxmask.modeling.condinst.CondInst.box_conditioned_masks`, rule 4); 1 = best-ranked only.
        box_size: box-adaptive scale (:class:`~boxmask.data.transforms.BoxAdaptiveResize`): each image is
            scaled up so that the median side of its boxes is at least this many pixels, so that small
            objects get a mask at a resolution that fits them; 0 = the fixed test size; None = the
            model's ``data.box_size``. ``box_size_max``: longer-side bound (None = ``data.box_size_max``).
        fallback_threshold: a model mask whose :func:`mask_quality` is below this is replaced by the
            filled box (reason ``low quality``); 0 keeps every non-empty model mask.
        binarize: ``"box_fit"`` (each box at :func:`box_fit_threshold`, between ``min_threshold`` and the
            model's ``mask_threshold``) or ``"fixed"`` (the model's ``mask_threshold``).
        min_threshold: the lowest threshold of the box fit, in ``[0, mask_threshold]``.

    Besides ``output_json``, writes ``OUTPUT.report.json``: per annotation its ``source`` (``model`` or
    ``box``), the fallback ``reason`` and the quality cues of the model mask (:func:`mask_quality`).

    Returns:
        Summary dict: ``images``, ``annotations`` (records in the JSON), ``from_model``,
        ``box_fallback`` (annotations whose mask is their box), ``box_fallback_reasons``
        (reason → count), ``nearest_p3_location`` (boxes with no FCOS location centre inside, served
        from the nearest P3 location), ``class_agnostic`` (boxes whose category the model does not
        know), ``resumed_images`` (taken from the sidecar) and ``output`` (path).

    Raises:
        DatasetError: the JSON or an image is invalid (names the file and record).
        AnnotateError: the sidecar belongs to another input JSON, model or settings.
        ValueError: an unknown ``rank`` or ``binarize``, ``candidates < 1``, a negative ``box_size``, a
            ``fallback_threshold`` outside ``[0, 1]`` or a ``min_threshold`` outside ``[0, mask_threshold]``.
    """
    if rank not in LOCATION_RANKS:
        raise ValueError(f"annotate: rank must be one of {LOCATION_RANKS}, got {rank!r}")
    if candidates < 1:
        raise ValueError(f"annotate: candidates must be >= 1, got {candidates}")
    box_size = cfg.data.box_size if box_size is None else float(box_size)
    box_size_max = cfg.data.box_size_max if box_size_max is None else int(box_size_max)
    if box_size < 0:
        raise ValueError(f"annotate: box_size must be >= 0, got {box_size}")
    if not 0.0 <= fallback_threshold <= 1.0:
        raise ValueError(f"annotate: fallback_threshold must be in [0, 1], got {fallback_threshold}")
    if binarize not in BINARIZE_MODES:
        raise ValueError(f"annotate: binarize must be one of {BINARIZE_MODES}, got {binarize!r}")
    if not 0.0 <= min_threshold <= cfg.model.mask_threshold:
        raise ValueError(f"annotate: min_threshold must be in [0, {cfg.model.mask_threshold}] (the model's "
                         f"mask_threshold), got {min_threshold}")
    ann_file, output_json = Path(ann_file), Path(output_json)
    device = torch.device(device)
    model = model.to(device).eval()
    if box_size > 0:
        transform = BoxAdaptiveResize(cfg.data.test_min_size, cfg.data.test_max_size, box_size, box_size_max)
    else:
        transform = build_test_transforms(cfg.data.test_min_size, cfg.data.test_max_size)
    dataset = CocoInstances(ann_file, image_dir, transforms=transform, load_masks=False,
                            check_images=cfg.data.check_images, verbose=progress)
    raw_bytes = ann_file.read_bytes()
    data = json.loads(raw_bytes)  # the untouched input (CocoInstances adds iscrowd/area to its copy)
    images = {img["id"]: img for img in data["images"]}
    ann_by_id = {ann["id"]: ann for ann in data["annotations"]}
    label_map = _label_map(dataset, meta)

    fingerprint = {
        "annotations": hashlib.sha256(raw_bytes).hexdigest(),
        "model": _model_fingerprint(model),
        "settings": json.dumps({"test_min_size": cfg.data.test_min_size, "test_max_size": cfg.data.test_max_size,
                                "mask_threshold": cfg.model.mask_threshold, "rank": rank, "candidates": candidates, "classes": meta["class_names"],
                                "box_size": box_size, "box_size_max": box_size_max,
                                "fallback_threshold": fallback_threshold, "stability_delta": STABILITY_DELTA,
                                "binarize": binarize, "min_threshold": min_threshold,
                                "cat_ids": meta["cat_ids"]}, sort_keys=True),
    }
    side = sidecar_path(output_json)
    header = json.dumps({"boxmask_annotate": _SIDECAR_VERSION, "fingerprint": fingerprint})
    done: dict[int, dict] = {}
    kept_lines: list[str] = []
    if resume and side.is_file():
        kept_lines, done = _read_sidecar(side, fingerprint)
        done = {iid: rec for iid, rec in done.items() if iid in images}
    resumed = len(done)
    # start a clean sidecar (header + valid lines) that later lines are appended to
    atomic_write_text(side, "\n".join([header, *kept_lines]) + "\n")

    todo = [i for i, iid in enumerate(dataset.image_ids) if iid not in done]
    loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=make_collate(cfg.data.size_divisibility))
    out_stride = model.mask_out_stride
    threshold = cfg.model.mask_threshold
    bar = tqdm(total=len(dataset), initial=len(dataset) - len(todo), desc="annotate", unit="img", disable=None if progress else True)
    since_sync = 0
    with open(side, "a", encoding="utf-8") as fh:
        for batch in loader:
            labels = [torch.tensor([label_map[int(l)] for l in t["labels"]], dtype=torch.int64) for t in batch.targets]
            if any(len(t["boxes"]) for t in batch.targets):
                results = model.box_conditioned_masks(batch.images.to(device), batch.image_sizes,
                                                      [t["boxes"].to(device) for t in batch.targets],
                                                      [l.to(device) for l in labels], rank=rank,
                                                      candidates=candidates)
            else:
                results = [None] * len(batch)
            for b, iid in enumerate(batch.image_ids):
                ann_ids = batch.targets[b]["ann_ids"].tolist()
                oh, ow = batch.orig_sizes[b]
                boxes_orig = [_xyxy(ann_by_id[a]["bbox"]) for a in ann_ids]
                if ann_ids:
                    rec = _image_record(iid, ann_ids, boxes_orig, results[b], batch.image_sizes[b], (oh, ow),
                                        out_stride, threshold, (labels[b] < 0).tolist(), fallback_threshold,
                                        binarize, min_threshold)
                else:
                    rec = {"image_id": int(iid), "annotations": []}
                done[int(iid)] = rec
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                since_sync += 1
                if since_sync >= save_every:
                    os.fsync(fh.fileno())
                    since_sync = 0
                bar.update(1)
    bar.close()

    served = {a["id"]: a for rec in done.values() for a in rec["annotations"]}
    reasons: Counter[str] = Counter()
    from_model = nearest = agnostic = 0
    out_anns, report = [], []
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        got = served.get(ann["id"])
        if got is None:
            reason = _box_problem(ann, img["width"], img["height"]) or "not served"
            mask = box_pixels(_xyxy(ann["bbox"]), img["height"], img["width"])
            seg, area = masks_to_rle(mask[None])[0], int(mask.sum())
            reasons[reason] += 1
            report.append({"id": ann["id"], "image_id": ann["image_id"], "source": "box", "reason": reason, "cues": None})
        else:
            seg, area = got["segmentation"], got["area"]
            if got["source"] == "model":
                from_model += 1
            else:
                reasons[got["reason"]] += 1
            nearest += bool(got["nearest"])
            agnostic += bool(got["agnostic"])
            report.append({"id": ann["id"], "image_id": ann["image_id"], "source": got["source"],
                           "reason": got["reason"], "cues": got.get("cues"), "threshold": got.get("threshold")})
        out_anns.append({**ann, "segmentation": seg, "area": area})
    output = {**data, "annotations": out_anns}
    atomic_write_json(report_path(output_json), {"fallback_threshold": fallback_threshold, "box_size": box_size,
                                                 "binarize": binarize, "min_threshold": min_threshold,
                                                 "annotations": report})
    atomic_write_json(output_json, output)
    side.unlink(missing_ok=True)
    return {"images": len(data["images"]), "annotations": len(out_anns), "from_model": from_model,
            "box_fallback": sum(reasons.values()), "box_fallback_reasons": dict(sorted(reasons.items())),
            "nearest_p3_location": nearest, "class_agnostic": agnostic, "resumed_images": resumed,
            "output": str(output_json)}
