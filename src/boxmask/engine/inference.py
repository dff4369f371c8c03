"""Inference over datasets or image files, COCO evaluation of a model, checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, load_config, translate_legacy_config
from ..data.coco import CocoInstances, read_image_rgb
from ..data.collate import collate_batch, make_collate
from ..data.transforms import build_test_transforms
from ..modeling import build_model, to_memory_format
from .evaluator import boxes_to_masks, detections_to_coco, evaluate_coco


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a boxmask checkpoint."""


def read_checkpoint(path: str | Path) -> dict:
    """The raw dict of a boxmask (Lightning) checkpoint on the CPU, with ``hyper_parameters`` (``config``,
    ``class_names``) and ``state_dict`` checked. The ``config`` of a checkpoint written before the nested
    config sections is translated to them (:func:`~boxmask.config.translate_legacy_config`), so old
    checkpoints still load for eval/predict/annotate/export. Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "config" not in hp or "class_names" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a boxmask checkpoint (no hyper_parameters/config or state_dict)")
    if isinstance(hp["config"], dict):
        hp["config"] = translate_legacy_config(hp["config"])
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild the model of a boxmask (Lightning) checkpoint.

    Returns ``(model in eval mode on device, config, meta)`` where meta has ``class_names``,
    ``cat_ids`` and ``global_step``. The backbone is built without pretrained weights (the checkpoint
    holds them). The weights take the memory format the model trained in (``trainer.channels_last``), so
    its outputs equal the training module's bit for bit. Raises :class:`CheckpointError` naming the file.
    """
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    cfg = load_config(hp["config"])
    cfg.model.backbone_weights = "none"
    model = build_model(cfg.model, len(hp["class_names"]))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.to(device).eval()
    to_memory_format(model, cfg.trainer.channels_last)
    meta = {"class_names": list(hp["class_names"]), "cat_ids": list(hp["cat_ids"]),
            "global_step": int(ckpt.get("global_step", 0))}
    return model, cfg, meta


#: class-logit layers (rows = classes) of the architectures: remapped by class name in :func:`load_model_weights`
CLASS_LAYERS = ("head.cls_logits.", "head.cate_pred.")


def load_model_weights(model: torch.nn.Module, path: str | Path, class_names: list[str]) -> dict[str, list[str]]:
    """Initialise ``model`` (built for ``class_names``) from the network weights of a boxmask checkpoint.

    Every tensor whose name and shape match is copied. The class-logit layers (:data:`CLASS_LAYERS`) are
    copied row by row by class name, so a checkpoint trained on other or reordered classes still gives its
    known classes; rows of classes it does not know keep their fresh (prior-probability) initialisation.

    Returns ``{"missing": [...], "skipped": [...]}``: names not in the checkpoint, and names whose shape
    differs (left as initialised). Raises :class:`CheckpointError` naming the file when it is not a boxmask
    checkpoint or its architecture differs (no tensor name in common).
    """
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    old = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    own = model.state_dict()
    if not set(old) & set(own):
        raise CheckpointError(f"{path}: its network has no parameter in common with model.arch={getattr(model.cfg, 'arch', '?')}")
    old_rows = {n: i for i, n in enumerate(hp["class_names"])}
    new, missing, skipped = {}, [], []
    for name, target in own.items():
        if name not in old:
            missing.append(name)
            continue
        src = old[name]
        if name.startswith(CLASS_LAYERS) and list(hp["class_names"]) != list(class_names):
            if src.shape[1:] != target.shape[1:]:
                skipped.append(name)
                continue
            t = target.clone()
            for i, cname in enumerate(class_names):
                if cname in old_rows:
                    t[i] = src[old_rows[cname]]
            new[name] = t
        elif src.shape == target.shape:
            new[name] = src
        else:
            skipped.append(name)
    model.load_state_dict(new, strict=False)
    return {"missing": missing, "skipped": skipped}


def eval_dataset(cfg: Config, ann_file: str | Path, image_dir: str | Path) -> CocoInstances:
    """A COCO split with the test-time resize of ``cfg`` (no masks loaded: they are read by COCOeval)."""
    return CocoInstances(ann_file, image_dir, transforms=build_test_transforms(cfg.data.test_min_size, cfg.data.test_max_size),
                         load_masks=False, check_images=cfg.data.check_images)


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset: CocoInstances, cat_ids: list[int], device: str | torch.device = "cpu",
                    batch_size: int = 1, num_workers: int = 0, progress: bool = True,
                    size_divisibility: int = 32) -> tuple[list[dict], list[dict]]:
    """Run the model over a dataset.

    Returns ``(results, boxfill_results)`` in COCO results format (RLE masks at the original image
    size); ``boxfill_results`` are the same detections with each box filled as its mask.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=make_collate(size_divisibility))
    results, boxfill = [], []
    # disable=None: tqdm turns itself off when stderr is not a terminal (no \r redraws in log files)
    for batch in tqdm(loader, desc="inference", disable=None if progress else True, unit="batch"):
        preds = model.predict(batch.images.to(device), batch.image_sizes, batch.orig_sizes)
        for image_id, orig, pred in zip(batch.image_ids, batch.orig_sizes, preds):
            boxes, scores, labels = pred.boxes.cpu(), pred.scores.cpu(), pred.labels.cpu()
            results += detections_to_coco(image_id, boxes, scores, labels, cat_ids, masks=pred.masks.cpu())
            boxfill += detections_to_coco(image_id, boxes, scores, labels, cat_ids, masks=boxes_to_masks(boxes, *orig))
    return results, boxfill


def evaluate_model(model: torch.nn.Module, cfg: Config, cat_ids: list[int], ann_file: str | Path, image_dir: str | Path,
                   device: str | torch.device = "cpu", max_dets: int | None = None, progress: bool = True,
                   output_dir: str | Path | None = None) -> dict:
    """Mask and box AP of a model on a COCO split, plus the box-filled baseline.

    Returns ``{"model": {"segm": {...}, "bbox": {...}}, "boxfill": {"segm": {...}}}`` on the COCO 0–100
    scale. With ``output_dir``, writes ``results.json`` and ``results_boxfill.json`` there.
    """
    from ..io import atomic_write_json

    dataset = eval_dataset(cfg, ann_file, image_dir)
    results, boxfill = predict_dataset(model, dataset, cat_ids, device, progress=progress,
                                       size_divisibility=cfg.data.size_divisibility)
    max_dets = max_dets or cfg.trainer.eval_max_dets
    gt = dataset.gt_coco()
    metrics = {"model": evaluate_coco(gt, results, ("segm", "bbox"), max_dets=max_dets, image_ids=dataset.image_ids),
               "boxfill": evaluate_coco(gt, boxfill, ("segm",), max_dets=max_dets, image_ids=dataset.image_ids)}
    if output_dir is not None:
        out = Path(output_dir)
        atomic_write_json(out / "results.json", results)
        atomic_write_json(out / "results_boxfill.json", boxfill)
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand folders (sorted, image suffixes only) and ``.txt`` lists (one path per line) into image
    paths. Raises FileNotFoundError naming a missing input."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix.lower() == ".txt" and p.is_file():
            paths += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image, folder or list")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such image")
    return paths


#: default number of images tiled into ``predict``'s contact sheet
CONTACT_SHEET_MAX = 64


@torch.no_grad()
def predict_images(model: torch.nn.Module, cfg: Config, meta: dict, images: list[Path], output_dir: str | Path,
                   score_threshold: float = 0.3, device: str | torch.device = "cpu", overlays: bool = True,
                   progress: bool = True, contact_sheet: int = CONTACT_SHEET_MAX) -> Path:
    """Predict masks for image files; write ``results.json`` (COCO results, RLE masks),
    ``images.json`` (the COCO ``images`` list: id ↔ file), with ``overlays`` one PNG per image
    under ``overlays/``, and ``contact_sheet.png``: the overlays of the first ``contact_sheet`` images
    as one captioned grid (0 = no sheet). Detections below ``score_threshold`` are dropped. Returns the
    results path. Unreadable images raise :class:`~boxmask.data.coco.DatasetError` naming the file
    (before any work is done).
    """
    from ..io import atomic_write_json
    from .visualize import contact_sheet as make_sheet
    from .visualize import contact_tile, draw_instances, save_png

    out = Path(output_dir)
    transform = build_test_transforms(cfg.data.test_min_size, cfg.data.test_max_size)
    from torchvision import tv_tensors

    decoded = []
    for path in images:  # decode everything first: a bad file fails before any output is written
        decoded.append(read_image_rgb(path))
    results, image_records, tiles = [], [], []
    for image_id, (path, image) in enumerate(tqdm(list(zip(images, decoded)), desc="predict",
                                                  disable=None if progress else True), start=1):
        h, w = image.shape[-2:]
        sample = transform({"image": tv_tensors.Image(image), "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                            "labels": torch.zeros(0, dtype=torch.int64), "ann_ids": torch.zeros(0, dtype=torch.int64),
                            "image_id": image_id, "orig_size": (h, w)})
        batch = collate_batch([sample], cfg.data.size_divisibility)
        pred = model.predict(batch.images.to(device), batch.image_sizes, batch.orig_sizes)[0]
        keep = pred.scores >= score_threshold
        boxes, scores, labels, masks = pred.boxes[keep].cpu(), pred.scores[keep].cpu(), pred.labels[keep].cpu(), pred.masks[keep].cpu()
        results += detections_to_coco(image_id, boxes, scores, labels, meta["cat_ids"], masks=masks)
        image_records.append({"id": image_id, "file_name": str(path), "height": h, "width": w})
        if overlays or len(tiles) < contact_sheet:
            drawn = draw_instances(image, masks, boxes, labels, scores, meta["class_names"])
            if overlays:
                save_png(out / "overlays" / f"{path.stem}.png", drawn)
            if len(tiles) < contact_sheet:  # tiles are small: the sheet costs little memory
                tiles.append(contact_tile(drawn, f"{path.name}  {len(scores)} det"))
    if tiles:
        save_png(out / "contact_sheet.png", make_sheet(tiles))
    atomic_write_json(out / "images.json", image_records)
    atomic_write_json(out / "results.json", results)
    return out / "results.json"


def dump_metrics_line(path: str | Path, record: dict) -> None:
    """Append one JSON line to ``path`` (creating folders)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(record) + "\n")
