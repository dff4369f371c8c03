"""Quality benchmark: box-supervised vs mask-supervised instance segmentation on a COCO-format dataset,
in two tracks on its val split, in one run.

* ``end_to_end``: train BoxInst (box labels, ``supervision.type=boxinst``) and CondInst (mask labels,
  ``supervision.type=full``) with the same model, schedule and seed on the train split; evaluate both
  (mask AP, box AP) plus BoxInst's own detections with their boxes filled as masks
  (``boxinst_boxfill``, which isolates what the mask head adds).
  Methods: ``boxinst``, ``condinst``, ``boxinst_boxfill``; ``boxlevelset`` and ``boxlevelset_boxfill``
  train BoxLevelSet (SOLOv2-style network + level-set supervision, recipe
  ``boxlevelset_effnet-lite0_fpn_nuts``: AdamW) on the same data, schedule length, backbone and seed;
  ``solov2_full`` (real masks) and ``solov2_boxinst`` (BoxInst's losses) train that recipe's network with
  another supervision, as controls (``ratio_over_solov2_full`` on ``boxlevelset`` / ``solov2_boxinst``).
  ``box2mask_t`` and ``box2mask_t_boxfill`` train Box2Mask-T (Mask2Former network, recipe
  ``box2mask_t_effnet-lite0_nuts``, ``--max-dets`` queries), ``mask2former_full`` the same network on real
  masks (its ``ratio_box_over_mask`` reference).
* ``boxes_given``: the ground-truth boxes are the input (as when a user annotates a box-labelled
  dataset) and every box gets one mask: the filled GT box (``filled_box``), OpenCV GrabCut initialised
  with the box (``grabcut``, 5 iterations), and ``boxmask annotate`` with the trained BoxInst
  (``boxinst_annotate``), CondInst (``condinst_annotate``), BoxLevelSet (``boxlevelset_annotate``) and Box2Mask-T
  (``box2mask_t_annotate``). Mask AP (all scores 1.0) and the mean
  IoU of each mask with the GT mask of its box (``mean_mask_IoU``). ``--grabcut-max-images N`` runs
  the whole track on the first N val images (JSON order), since GrabCut costs 0.2–0.8 s per instance
  on a CPU core.

* ``boxinst_annotate_fit``: ``boxmask annotate --fit`` -- the trained BoxInst model is first fitted to the
  evaluated images' boxes (box losses only; :mod:`boxmask.engine.fit`), then draws their masks.
  Every annotate method also gets a ``*_nofallback`` row (fallback threshold 0: every non-empty model
  mask kept) and a calibration table of its quality estimate (``bench/results/calibration_<run>_<method>.json``:
  per bin of the estimate, the mean IoU with the GT of the model mask and of the filled box).
* Domain shift: ``--train-kinds fluorescence`` trains on the train images of that kind only (kinds from
  ``DATASET/image_kinds.json``); rows are then reported for the group ``all``, each image kind and (boxes
  given) each COCO size bucket, with ``shift`` true where the evaluated images include a kind the model
  never saw. ``--max-images-per-kind N`` runs the boxes-given track on the first N val images of each kind.

    python bench/quality.py --dataset ../shared/data/nuts --iterations 600 --image-size 512
    python bench/quality.py --dataset ../shared/data/dsb2018 --max-dets 400 --grabcut-max-images 30
    python bench/quality.py --dataset ../shared/data/dsb2018 --iterations 300 --image-size 448 --max-dets 400 \
        --train-kinds fluorescence --max-images-per-kind 10 --methods boxinst boxinst_boxfill filled_box grabcut \
        boxinst_annotate boxinst_annotate_fit

Each row is one JSON line, printed and appended to ``bench/results/quality.jsonl``: ``benchmark``
("quality"), ``track``, ``run`` (``<dataset>_<backbone>_<size>_<iterations>``), ``dataset``, ``split``,
``method``, ``supervision`` (box, mask, none), ``backbone``, ``image_size``, ``iterations`` (the run's
training budget, also on rows of untrained methods), ``batch_size``, ``max_dets``, ``mask_AP``,
``mask_AP50``, ``mask_AP75``, ``mask_APs/m/l``, ``box_AP``, ``box_AP50`` (COCO 0–100; box AP null in
the boxes-given track where the boxes are the GT), ``mean_mask_IoU`` (boxes-given rows, in percent
0–100 like the APs; null otherwise), ``ratio_box_over_mask`` (mask AP of the box-supervised model over
the mask-supervised one: on ``boxinst``, ``boxlevelset`` and their ``_annotate`` rows; null otherwise), ``images`` and
``instances`` evaluated, ``box_fallbacks`` (boxes-given masks that fell back to the filled box),
``location_rank`` (annotate rows: ``--location-rank``), ``device`` (where the method ran), ``wall_s`` (end to end: training + val evaluation; boxes given: making
the masks, without training), ``train_wall_s`` (annotate rows: training of their model), ``commit``,
``date``, ``config``; ``group`` (``all``, an image kind, or ``small``/``medium``/``large``: then ``mask_AP``
is COCO's APs/APm/APl and the IoU fields cover that bucket's instances), ``shift``; boxes-given rows also
``box_mean_mask_IoU`` (the filled box's mean IoU on the same instances), ``worse_than_box`` (share of
instances whose mask has a lower IoU than their filled box), ``s_per_image`` (``wall_s`` per image; for
``*_annotate_fit`` the fit included), ``fallback_threshold``, ``box_size``, ``binarize`` (``--binarize``),
``annotate_wall_s``, and for
fitted rows ``fit_steps``, ``fit_wall_s``. The run's Markdown table is printed and written to
``bench/results/quality_<dataset>.md``.

The dataset folder must hold ``images/`` and ``annotations/instances_{train,val}.json``. Trainings go
to ``--output/<run>/{boxinst,condinst}``; with ``--reuse`` a finished training there with the same
config is loaded instead of retrained.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from boxmask.config import load_config, translate_legacy_config
from boxmask.data.coco import subset_images
from boxmask.engine.train import train

ROOT = Path(__file__).resolve().parents[1]

TRACKS = ("end_to_end", "boxes_given")
#: method → (track, supervision, trained model it needs or None)
METHODS = {
    "boxinst": ("end_to_end", "box", "boxinst"),
    "condinst": ("end_to_end", "mask", "condinst"),
    "boxinst_boxfill": ("end_to_end", "box", "boxinst"),
    "filled_box": ("boxes_given", "none", None),
    "grabcut": ("boxes_given", "none", None),
    "boxinst_annotate": ("boxes_given", "box", "boxinst"),
    "boxinst_annotate_fit": ("boxes_given", "box", "boxinst"),
    "condinst_annotate": ("boxes_given", "mask", "condinst"),
    "boxlevelset": ("end_to_end", "box", "boxlevelset"),
    "boxlevelset_boxfill": ("end_to_end", "box", "boxlevelset"),
    "boxlevelset_annotate": ("boxes_given", "box", "boxlevelset"),
    "solov2_full": ("end_to_end", "mask", "solov2_full"),
    "solov2_boxinst": ("end_to_end", "box", "solov2_boxinst"),
    "sim": ("end_to_end", "box", "sim"),
    "sim_boxfill": ("end_to_end", "box", "sim"),
    "sim_annotate": ("boxes_given", "box", "sim"),
    # Box2Mask-T (issue 14) and its mask-supervised Mask2Former on the same network
    "box2mask_t": ("end_to_end", "box", "box2mask_t"),
    "box2mask_t_boxfill": ("end_to_end", "box", "box2mask_t"),
    "box2mask_t_annotate": ("boxes_given", "box", "box2mask_t"),
    "mask2former_full": ("end_to_end", "mask", "mask2former_full"),
}
#: trained model → (packaged recipe, recipe overrides); the run's data/schedule overrides apply to all
MODELS = {
    "boxinst": ("boxinst_effnet-lite0_fpn_nuts", ["supervision.type=boxinst"]),
    "condinst": ("boxinst_effnet-lite0_fpn_nuts", ["supervision.type=full"]),
    "boxlevelset": ("boxlevelset_effnet-lite0_fpn_nuts", []),
    # controls of the SOLOv2-style network (issue 13): real masks, and BoxInst's losses, same recipe
    "solov2_full": ("boxlevelset_effnet-lite0_fpn_nuts", ["supervision.type=full", "model.level_set_channels=0"]),
    "solov2_boxinst": ("boxlevelset_effnet-lite0_fpn_nuts", ["supervision.type=boxinst", "model.level_set_channels=0",
                                                            "supervision.projection_weight=1.0"]),
    "sim": ("sim_effnet-lite0_fpn_nuts", []),
    "box2mask_t": ("box2mask_t_effnet-lite0_nuts", []),
    "mask2former_full": ("box2mask_t_effnet-lite0_nuts", ["supervision.type=full"]),
}
#: methods whose rows are the model's detections with their boxes filled
BOXFILL = {"boxinst_boxfill", "boxlevelset_boxfill", "sim_boxfill", "box2mask_t_boxfill"}
#: set-prediction models: one query per possible detection (``--max-dets`` queries)
QUERY_MODELS = {"box2mask_t", "mask2former_full"}


def schedule_overrides(kind: str, iterations: int) -> list[str]:
    """Per-model overrides that scale with the schedule: SIM's pseudo-mask/copy-paste warm-up is the
    pairwise warm-up (a third of the run, as 10k of BoxInst's 30k-90k), and its teacher momentum
    keeps a time constant of a tenth of the run, 1/(1-m) = iterations/10 (paper: 0.9999 over 90k steps;
    at 600 steps the paper's momentum would leave the teacher ≈ the initial network)."""
    if kind != "sim":
        return []
    warmup = max(1, iterations // 3)
    momentum = 1.0 - 10.0 / max(iterations, 20)
    return [f"supervision.sim.warmup_iters={warmup}", f"supervision.sim.teacher_momentum={momentum:.6g}"]


def git_commit() -> str:
    """Short commit of the working tree, ``-dirty`` when it has uncommitted changes (outside ``bench/results``)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(cpu: bool = False) -> str:
    """GPU name, or (no GPU, or ``cpu=True``) the CPU model and the number of torch threads."""
    if torch.cuda.is_available() and not cpu:
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def multiscale(size: int) -> list[int]:
    """Training shorter sides around ``size`` (±12.5 %, multiples of 32)."""
    return sorted({max(32, round(size * f / 32) * 32) for f in (0.875, 1.0, 1.125)})


def _num(v):
    """JSON-safe number: NaN/inf → None."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _ap_fields(segm: dict | None, bbox: dict | None) -> dict:
    segm, bbox = segm or {}, bbox or {}
    return {"mask_AP": segm.get("AP"), "mask_AP50": segm.get("AP50"), "mask_AP75": segm.get("AP75"),
            "mask_APs": segm.get("APs"), "mask_APm": segm.get("APm"), "mask_APl": segm.get("APl"),
            "box_AP": bbox.get("AP"), "box_AP50": bbox.get("AP50")}


def _ratio(num, den):
    return None if num is None or den is None or den <= 0 else num / den


def subset_val(val_json: Path, max_images: int, out_dir: Path) -> tuple[Path, dict]:
    """The val COCO JSON, or (``max_images > 0``) a copy with only its first ``max_images`` images and their
    annotations, written to ``out_dir``. Returns ``(path, {"image_ids", "instances", "max_per_image"})``."""
    data = json.loads(val_json.read_text())
    if max_images > 0 and max_images < len(data["images"]):
        data["images"] = data["images"][:max_images]
        keep = {img["id"] for img in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        path = out_dir / f"{val_json.stem}_first{max_images}.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    else:
        path = val_json
    per_image: dict = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    return path, {"image_ids": [img["id"] for img in data["images"]], "instances": sum(per_image.values()),
                  "max_per_image": max(per_image.values(), default=0)}


SIZE_BUCKETS = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, float("inf")))


def size_bucket(area: float) -> str:
    """COCO size bucket of a GT ``area`` (px²): small < 32², medium < 96², large otherwise."""
    return next(name for name, lo, hi in SIZE_BUCKETS if lo <= area < hi)


def _shifted(train_kinds: list[str] | None, group_kinds: set) -> bool:
    """True when the evaluated images include a kind the model never saw in training."""
    return bool(train_kinds) and any(k not in set(train_kinds) for k in group_kinds)


def subset_by_kind_first(val_json: Path, kinds: dict[str, str], per_kind: int, out_dir: Path) -> Path:
    """A copy of ``val_json`` with the first ``per_kind`` images (JSON order) of each kind and their annotations."""
    data = json.loads(val_json.read_text())
    taken: dict[str, int] = {}
    keep = []
    for im in data["images"]:
        k = kinds.get(im["file_name"], "unknown")
        if taken.get(k, 0) < per_kind:
            taken[k] = taken.get(k, 0) + 1
            keep.append(im)
    data = subset_images(data, keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{val_json.stem}_first{per_kind}_per_kind.json"
    path.write_text(json.dumps(data))
    return path


def load_kinds(path: Path) -> dict[str, str]:
    """``file_name → kind`` from an ``image_kinds.json`` (``{"images": {file_name: {"kind": ...}}}``), or {}."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {name: rec["kind"] for name, rec in data.get("images", {}).items()}


def subset_by_kind(ann_json: Path, kinds: dict[str, str], keep: set[str], out_dir: Path) -> Path:
    """A copy of ``ann_json`` with only the images whose kind is in ``keep`` (and their annotations).

    Raises SystemExit when an image has no kind or nothing is left."""
    data = json.loads(ann_json.read_text())
    missing = [im["file_name"] for im in data["images"] if im["file_name"] not in kinds]
    if missing:
        raise SystemExit(f"quality: {len(missing)} images of {ann_json} have no kind (e.g. {missing[0]})")
    data = subset_images(data, [im for im in data["images"] if kinds[im["file_name"]] in keep])
    if not data["images"]:
        raise SystemExit(f"quality: no image of kind {sorted(keep)} in {ann_json}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{ann_json.stem}_{'+'.join(sorted(keep))}.json"
    path.write_text(json.dumps(data))
    return path


#: inference-only keys of the model section: a reused training whose record differs only in these is evaluated
#: again with the new values (``ensure_metrics``), not trained again
INFERENCE_KEYS = ("mask_largest_component",)


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    # output_dir is where the record was found: spelled relative or absolute, it names the same folder
    for key in ("eval_after_train", "progress_bar", "output_dir"):
        d["trainer"].pop(key, None)
    for key in INFERENCE_KEYS:
        d["model"].pop(key, None)
    for key in ("train_json", "train_images", "val_json", "val_images"):  # relative to the working directory
        if d["data"].get(key):
            d["data"][key] = str(Path(d["data"][key]).resolve())
    return d


def train_or_reuse(cfg, reuse: bool) -> dict:
    """Train ``cfg`` (timing training + val evaluation) or, with ``reuse``, load the record of a finished
    training of the same config from ``output_dir/bench_train.json``.
    Returns ``{"wall_s", "train_s", "global_step", "checkpoint", "metrics", "reused"}``."""
    from boxmask.io import atomic_write_json

    out = Path(cfg.trainer.output_dir)
    record_path = out / "bench_train.json"
    if reuse and record_path.is_file():
        rec = json.loads(record_path.read_text())
        # through load_config: fields added since the record was written take their defaults; records from
        # before the method-seam redesign are translated as old checkpoints are
        old = load_config(translate_legacy_config(rec["config"])).to_dict()
        if (_comparable(old) == _comparable(cfg.to_dict()) and Path(rec["checkpoint"]).is_file()
                and rec["global_step"] == cfg.solver.max_iters):
            print(f"reusing {out} ({rec['global_step']} steps)")
            changed = {k: getattr(cfg.model, k) for k in INFERENCE_KEYS if old["model"][k] != getattr(cfg.model, k)}
            if changed:
                print(f"  inference settings changed ({changed}): evaluating its checkpoint again")
                return dict(rec, config=cfg.to_dict(), metrics=None, record_path=str(record_path), reused=True)
            return dict(rec, reused=True)
        print(f"{record_path}: different config or unfinished; training again")
    t0 = time.time()
    summary = train(cfg)
    rec = {"config": cfg.to_dict(), "wall_s": time.time() - t0, "train_s": summary["wall_s"],
           "global_step": summary["global_step"], "checkpoint": summary["checkpoint"], "metrics": summary["metrics"]}
    atomic_write_json(record_path, rec, indent=1)
    return dict(rec, reused=False)


def ensure_metrics(rec: dict, cfg, device: torch.device) -> dict:
    """Val metrics of a training record, evaluating its checkpoint (with ``cfg``'s inference settings, results
    into ``output_dir/eval``) when the training did not or when they changed; the record is then rewritten."""
    if rec.get("metrics") is None:
        from boxmask.engine.inference import evaluate_model, load_checkpoint
        from boxmask.engine.train import resolve_data_paths
        from boxmask.io import atomic_write_json

        model, mcfg, meta = load_checkpoint(rec["checkpoint"], device)
        model.cfg = mcfg.model = cfg.model  # equal to the checkpoint's but for INFERENCE_KEYS (train_or_reuse)
        paths = resolve_data_paths(cfg)
        t0 = time.time()
        rec["metrics"] = evaluate_model(model, mcfg, meta["cat_ids"], paths["val_json"], paths["val_images"],
                                        device=device, max_dets=cfg.trainer.eval_max_dets, progress=False,
                                        output_dir=Path(cfg.trainer.output_dir) / "eval")
        rec["wall_s"] = rec["wall_s"] + time.time() - t0
        if rec.get("record_path"):
            atomic_write_json(rec["record_path"], {k: rec[k] for k in ("config", "wall_s", "train_s", "global_step",
                                                                       "checkpoint", "metrics")}, indent=1)
    return rec["metrics"]


def end_to_end_kind_rows(row: dict, eval_dir: Path, val_json: Path, val_data: dict, kinds: dict[str, str],
                         train_kinds: list[str] | None, boxfill: bool, max_dets: int) -> list[dict]:
    """Per image kind copies of an end-to-end row, from the results its training's evaluation wrote."""
    from pycocotools.coco import COCO

    from boxmask.engine.evaluator import evaluate_coco

    path = eval_dir / ("results_boxfill.json" if boxfill else "results.json")
    by_kind: dict[str, list[int]] = {}
    for im in val_data["images"]:
        if im["file_name"] in kinds:
            by_kind.setdefault(kinds[im["file_name"]], []).append(im["id"])
    if len(by_kind) < 2 or not path.is_file():
        return []
    results = json.loads(path.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val_json))
    out = []
    for kind, ids in sorted(by_kind.items()):
        keep = set(ids)
        res = [r for r in results if r["image_id"] in keep]
        m = evaluate_coco(gt, res, ("segm", "bbox"), max_dets=max_dets, image_ids=ids)
        out.append({**row, **_ap_fields(m["segm"], m["bbox"]), "group": kind, "shift": _shifted(train_kinds, {kind}),
                    "images": len(ids), "ratio_box_over_mask": None,
                    "instances": sum(1 for a in val_data["annotations"] if a["image_id"] in keep and not a.get("iscrowd", 0))})
    return out


def _group_stats(gt, results: list[dict], ious: dict, box_iou: dict, ann_ids: set, image_ids: list[int] | None,
                 size_ap: float | None, max_dets: int) -> dict:
    """Mask AP (COCOeval over ``image_ids``, or the all-images size-bucket AP ``size_ap``), mean IoU of the
    results in ``ann_ids``, the filled box's mean IoU on them, and the share of masks worse than their box."""
    from boxmask.engine.evaluator import evaluate_coco

    if image_ids is not None:
        keep = set(image_ids)
        segm = evaluate_coco(gt, [r for r in results if r["image_id"] in keep], ("segm",), max_dets=max_dets,
                             image_ids=image_ids)["segm"]
        fields = _ap_fields(segm, None)
    else:
        fields = _ap_fields({"AP": size_ap}, None)
    mine = [r["ann_id"] for r in results if r["ann_id"] in ann_ids]
    iou = [ious[a] for a in mine]
    boxed = [box_iou[a] for a in mine]
    fields.update(mean_mask_IoU=100.0 * sum(iou) / len(iou) if iou else None,
                  box_mean_mask_IoU=100.0 * sum(boxed) / len(boxed) if boxed else None,
                  worse_than_box=sum(i < b - 1e-9 for i, b in zip(iou, boxed)) / len(iou) if iou else None,
                  instances=len(mine))
    return fields


def calibration_table(records: list[dict], bins=(0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)) -> list[dict]:
    """Mean model-mask IoU and filled-box IoU with the GT per bin of the quality estimate."""
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = [r for r in records if r["quality"] is not None and lo <= r["quality"] < hi]
        if sel:
            out.append({"quality": [lo, min(hi, 1.0)], "n": len(sel),
                        "mask_IoU": sum(r["iou_model"] for r in sel) / len(sel),
                        "box_IoU": sum(r["iou_box"] for r in sel) / len(sel),
                        "mask_better": sum(r["iou_model"] > r["iou_box"] for r in sel) / len(sel)})
    return out


def boxes_given_rows(args, given, trained, cfgs, out, base, empty, val_json, image_dir, kinds, device, use_cuda):
    """Rows of the boxes-given track: every method on the chosen val images, for the group ``all``, each image
    kind and each COCO size bucket; annotate methods also without the fallback (``*_nofallback``), and a
    calibration table of the quality estimate (``bench/results/calibration_<run>_<method>.json``)."""
    from pycocotools.coco import COCO

    from boxmask.engine.annotate import FALLBACK_THRESHOLD, annotate_dataset, report_path
    from baselines import annotations_to_results, filled_box_annotations, grabcut_annotations, mask_ious
    from boxmask.engine.fit import FitError, fit_config, fit_to_boxes
    from boxmask.engine.inference import load_checkpoint

    tau = FALLBACK_THRESHOLD if args.fallback_threshold is None else args.fallback_threshold
    gdir = out / "boxes_given"
    if args.max_images_per_kind > 0 and kinds:
        gt_json = subset_by_kind_first(val_json, kinds, args.max_images_per_kind, gdir)
        gt_json, info = subset_val(gt_json, 0, gdir)
    else:
        gt_json, info = subset_val(val_json, args.grabcut_max_images, gdir)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
    gt_data = json.loads(gt_json.read_text())
    max_dets = max(args.max_dets, info["max_per_image"])
    image_kind = {im["id"]: kinds.get(im["file_name"]) for im in gt_data["images"]}
    anns = [a for a in gt_data["annotations"] if not a.get("iscrowd", 0)]
    ann_size = {a["id"]: size_bucket(float(a["area"])) for a in anns}
    ann_kind = {a["id"]: image_kind[a["image_id"]] for a in anns}
    groups: list[tuple[str, list[int] | None, set]] = [("all", info["image_ids"], set(ann_size))]
    if len({k for k in image_kind.values() if k}) > 1:
        for k in sorted({k for k in image_kind.values() if k}):
            groups.append((k, [i for i, kk in image_kind.items() if kk == k], {a for a, kk in ann_kind.items() if kk == k}))
    for name, _, _ in SIZE_BUCKETS:
        ids = {a for a, b in ann_size.items() if b == name}
        if ids:
            groups.append((name, None, ids))
    print(f"== boxes given: {len(info['image_ids'])} val images, {info['instances']} instances ({gt_json})")
    box_results = filled_box_annotations(gt_json, image_dir)
    box_iou = dict(zip([r["ann_id"] for r in box_results], mask_ious(gt, box_results)))
    box_by_id = {r["ann_id"]: r for r in box_results}
    rows, by_method = [], {}
    n_images = len(info["image_ids"])
    for method in given:
        _, supervision, kind = METHODS[method]
        variants = []  # (name, results, fallbacks, extra fields)
        t0 = time.time()
        dev = device_name(cpu=True)
        extra = {"train_wall_s": None}
        if method == "filled_box":
            variants.append((method, box_results, None, {}))
        elif method == "grabcut":
            # GrabCut does not depend on any model: its masks are cached by the evaluated JSON's content
            import hashlib

            key = hashlib.sha256(gt_json.read_bytes()).hexdigest()[:16]
            cache = Path(args.output) / "grabcut_cache" / f"{key}_it{args.grabcut_iterations}.json"
            if cache.is_file():
                cached = json.loads(cache.read_text())
                results, wall_cached = cached["results"], cached["wall_s"]
                print(f"reusing GrabCut masks from {cache}")
            else:
                results = grabcut_annotations(gt_json, image_dir, progress=True, iterations=args.grabcut_iterations)
                wall_cached = time.time() - t0
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps({"wall_s": wall_cached, "results": results}))
            t0 = time.time() - wall_cached  # the row's wall_s is GrabCut's own time
            variants.append((method, results, sum("grabcut_fallback" in r for r in results), {}))
        else:
            ckpt, box_size = trained[kind]["checkpoint"], args.box_size
            extra = {"train_wall_s": round(trained[kind]["wall_s"], 1), "location_rank": args.location_rank,
                     "candidates": args.candidates}
            if method.endswith("_fit"):
                fcfg = fit_config(gt_json, image_dir, gdir / f"{method}.fit", checkpoint=ckpt, steps=args.fit_steps,
                                  image_size=args.image_size, box_size=args.fit_train_box_size, progress=False,
                                  overrides=[f"trainer.accelerator={'gpu' if use_cuda else 'cpu'}"])
                print(f"== {method}: fitting {fcfg.solver.max_iters} steps on the {n_images} images' boxes")
                try:
                    fit = fit_to_boxes(fcfg, resume=args.reuse)
                except FitError as exc:  # a fit of other settings in the folder: fit again, as trainings do
                    print(f"{exc}; fitting again")
                    fit = fit_to_boxes(fcfg, resume=False)
                ckpt, box_size = fit["checkpoint"], args.fit_box_size
                extra.update(fit_steps=fcfg.solver.max_iters, fit_wall_s=round(fit["wall_s"], 1), fit_state=fit["state"],
                             fit_train_box_size=args.fit_train_box_size)
            model, mcfg, meta = load_checkpoint(ckpt, device)
            t1 = time.time()
            out_json = gdir / f"{method}_{gt_json.name}"
            # one pass without the fallback; the fallback is then applied to the reported cues, which is what
            # annotate_dataset(fallback_threshold=tau) does (tests/test_annotate_fit.py)
            annotate_dataset(model, mcfg, meta, gt_json, image_dir, out_json, device=device, progress=True,
                             resume=False, rank=args.location_rank, candidates=args.candidates, box_size=box_size,
                             fallback_threshold=0.0, binarize=args.binarize)
            extra["annotate_wall_s"] = round(time.time() - t1, 1)
            raw = annotations_to_results(out_json)
            cues = {r["id"]: r["cues"] for r in json.loads(report_path(out_json).read_text())["annotations"]}
            low = {a for a, c in cues.items() if c is not None and c["quality"] < tau}
            fell = [box_by_id[r["ann_id"]] if r["ann_id"] in low else r for r in raw]
            raw_fallbacks = sum(1 for a, c in cues.items() if c is None or c["quality"] == 0.0)
            variants.append((method, fell, len(low | {a for a, c in cues.items() if c is None}),
                             {"fallback_threshold": tau, "box_size": box_size, "binarize": args.binarize}))
            variants.append((f"{method}_nofallback", raw, raw_fallbacks, {"fallback_threshold": 0.0, "box_size": box_size,
                                                                         "binarize": args.binarize}))
            raw_iou = dict(zip([r["ann_id"] for r in raw], mask_ious(gt, raw)))
            records = [{"ann_id": a, "kind": ann_kind.get(a), "size": ann_size.get(a), "iou_model": raw_iou[a],
                        "iou_box": box_iou[a], **(cues.get(a) or {"quality": None})} for a in raw_iou]
            calib = {"run": base["run"], "method": method, "commit": base["commit"], "date": base["date"],
                     "fallback_threshold": tau, "all": calibration_table(records),
                     "by_kind": {k: calibration_table([r for r in records if r["kind"] == k])
                                 for k in sorted({r["kind"] for r in records if r["kind"]})}}
            cpath = ROOT / "bench" / "results" / f"calibration_{base['run']}_{method}.json"
            cpath.write_text(json.dumps(calib, indent=1))
            (gdir / f"{method}_calibration.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
            print(f"calibration of the quality estimate ({method}): {cpath}")
            for b in calib["all"]:
                print(f"  quality {b['quality'][0]:.1f}-{b['quality'][1]:.1f}: n={b['n']:5d}  mask IoU {b['mask_IoU']:.3f}  "
                      f"box IoU {b['box_IoU']:.3f}  mask better {100 * b['mask_better']:.0f} %")
            dev = device_name(cpu=not use_cuda)
        wall = time.time() - t0
        for name, results, fallbacks, fields in variants:
            ious = dict(zip([r["ann_id"] for r in results], mask_ious(gt, results)))
            all_segm = evaluate_coco_quiet(gt, results, max_dets, info["image_ids"])
            for group, image_ids, ann_ids in groups:
                size_ap = {"small": all_segm.get("APs"), "medium": all_segm.get("APm"), "large": all_segm.get("APl")}.get(group)
                stats = _group_stats(gt, results, ious, box_iou, ann_ids, image_ids, size_ap, max_dets)
                group_kinds = ({image_kind[i] for i in image_ids} if image_ids is not None
                               else {ann_kind[a] for a in ann_ids})
                row = {**base, "track": "boxes_given", "method": name, "supervision": supervision, **empty, **stats,
                       **extra, **fields, "group": group, "shift": _shifted(args.train_kinds, group_kinds - {None})}
                row.update(max_dets=max_dets, box_fallbacks=None if fallbacks is None else
                           (fallbacks if group == "all" else None),
                           images=len(image_ids) if image_ids is not None else n_images, device=dev,
                           wall_s=round(wall, 1), s_per_image=round(wall / max(n_images, 1), 3),
                           config=str(out / kind / "config.yaml") if kind else None)
                if group == "all":
                    by_method[name] = row
                rows.append(row)
    for boxed in ("boxinst_annotate", "boxlevelset_annotate", "sim_annotate"):
        if boxed in by_method and "condinst_annotate" in by_method:
            by_method[boxed]["ratio_box_over_mask"] = _ratio(by_method[boxed]["mask_AP"],
                                                             by_method["condinst_annotate"]["mask_AP"])
    return rows


def evaluate_coco_quiet(gt, results: list[dict], max_dets: int, image_ids: list[int]) -> dict:
    """Mask AP fields of ``results`` over ``image_ids`` (:func:`boxmask.engine.evaluator.evaluate_coco`)."""
    from boxmask.engine.evaluator import evaluate_coco

    return evaluate_coco(gt, results, ("segm",), max_dets=max_dets, image_ids=image_ids)["segm"]


def markdown_table(rows: list[dict], header: str) -> str:
    """The run's rows as a Markdown table (one decimal; ``-`` for null)."""

    def f(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [header, "",
             "| track | method | group | shift | supervision | mask AP | AP50 | AP75 | box AP | mean IoU | box/mask | images | wall s |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['track']} | {r['method']} | {r.get('group', 'all')} | {'yes' if r.get('shift') else 'no'} | "
                     f"{r['supervision']} | {f(r['mask_AP'])} | {f(r['mask_AP50'])} | "
                     f"{f(r['mask_AP75'])} | {f(r['box_AP'])} | {f(r['mean_mask_IoU'])} | "
                     f"{f(r['ratio_box_over_mask'], 2)} | {r['images']} | {f(r['wall_s'], 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="folder with images/ and annotations/instances_{train,val}.json")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=512, help="test shorter side; training uses ±12.5 %%")
    ap.add_argument("--max-size", type=int, default=0, help="longer-side cap (default 1.667 × image size)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-dets", type=int, default=100,
                    help="detections per image in COCOeval (>= 400 for dsb2018); the boxes-given track uses at "
                         "least the largest GT count of an image")
    ap.add_argument("--output", default="runs/quality")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.jsonl"))
    ap.add_argument("--markdown", default="", help="table file (default bench/results/quality_<dataset>.md)")
    ap.add_argument("--tracks", nargs="+", choices=TRACKS, default=list(TRACKS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="methods to run (those of an unselected track are skipped)")
    ap.add_argument("--grabcut-max-images", type=int, default=0,
                    help="boxes-given track on the first N val images only (0 = all)")
    ap.add_argument("--grabcut-iterations", type=int, default=5)
    ap.add_argument("--location-rank", choices=("score_iou", "score"), default="score_iou",
                    help="annotate: how the FCOS location serving a given box is chosen")
    ap.add_argument("--candidates", type=int, default=5, help="annotate: FCOS locations tried per box")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="training and annotate device (GrabCut always runs on the CPU)")
    ap.add_argument("--reuse", action="store_true", help="load finished trainings of the same config from --output")
    ap.add_argument("--max-images-per-kind", type=int, default=0,
                    help="boxes-given track on the first N val images of each image kind (needs a kinds file; "
                         "overrides --grabcut-max-images)")
    ap.add_argument("--box-size", type=float, default=0.0,
                    help="inference-only annotate: box-adaptive scale (median box side in px; 0 = fixed test size)")
    ap.add_argument("--fit-box-size", type=float, default=32.0, help="fitted annotate: box-adaptive scale of the masks")
    ap.add_argument("--fit-train-box-size", type=float, default=0.0,
                    help="fitted annotate: box-adaptive scale of the fit's training (0 = the fixed multi-scale sizes)")
    ap.add_argument("--fit-steps", type=int, default=None, help="fitted annotate: training steps (default: scales with "
                                                                   "the images, engine.fit.default_fit_steps)")
    ap.add_argument("--binarize", choices=("box_fit", "fixed"), default="box_fit",
                    help="annotate: per-box threshold fitted to the box (default) or the model's mask_threshold")
    ap.add_argument("--fallback-threshold", type=float, default=None,
                    help="annotate: quality below which the filled box is kept (default: annotate's default)")
    ap.add_argument("--train-kinds", nargs="+", default=None,
                    help="domain-shift track: train only on the train images of these kinds (e.g. fluorescence), "
                         "labelled by --kinds-file; the val split is evaluated whole and per kind")
    ap.add_argument("--kinds-file", default="", help="JSON {'images': {file_name: {'kind': ...}}} "
                                                       "(default: DATASET/image_kinds.json when it exists)")
    ap.add_argument("--tag", default="", help="suffix of the run name (e.g. 'photometric' for a variant's overrides)")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides (key=value), applied to both trainings")
    args = ap.parse_args(argv)

    data = Path(args.dataset)
    name = data.resolve().name
    val_json, image_dir = data / "annotations" / "instances_val.json", data / "images"
    methods = [m for m in METHODS if m in args.methods and METHODS[m][0] in args.tracks]
    if not methods:
        raise SystemExit("quality: no method left to run (check --tracks and --methods)")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    max_size = args.max_size or int(round(args.image_size * 5 / 3))
    kinds = load_kinds(Path(args.kinds_file) if args.kinds_file else data / "image_kinds.json")
    run = f"{name}_{args.backbone}_{args.image_size}_{args.iterations}"
    if args.train_kinds:
        run += "_train-" + "+".join(sorted(args.train_kinds))
    if args.tag:
        run += f"_{args.tag}"
    out = Path(args.output) / run
    train_json = data / "annotations" / "instances_train.json"
    if args.train_kinds:
        if not kinds:
            raise SystemExit(f"quality: --train-kinds needs a kinds file ({data / 'image_kinds.json'} not found)")
        train_json = subset_by_kind(train_json, kinds, set(args.train_kinds), out)
    overrides = [
        f"data.train_json={train_json}", f"data.train_images={image_dir}",
        f"data.val_json={val_json}", f"data.val_images={image_dir}",
        f"data.min_sizes={multiscale(args.image_size)}", f"data.max_size={max_size}",
        f"data.test_min_size={args.image_size}", f"data.test_max_size={max_size}", f"data.batch_size={args.batch_size}",
        f"model.backbone={args.backbone}", f"model.max_detections={args.max_dets}", f"trainer.eval_max_dets={args.max_dets}",
        f"solver.max_iters={args.iterations}", f"solver.steps=[{int(args.iterations * 0.8)}]",
        f"solver.warmup_iters={min(100, args.iterations // 10)}",
        f"supervision.pairwise_warmup_iters={max(1, args.iterations // 3)}",
        "trainer.progress_bar=false", f"trainer.accelerator={'gpu' if use_cuda else 'cpu'}",
    ] + args.overrides
    commit, date = git_commit(), dt.date.today().isoformat()
    base = {"benchmark": "quality", "run": run, "dataset": name, "split": "val", "backbone": args.backbone,
            "image_size": args.image_size, "iterations": args.iterations, "batch_size": args.batch_size,
            "max_dets": args.max_dets, "commit": commit, "date": date}
    empty = {"mean_mask_IoU": None, "ratio_box_over_mask": None, "ratio_over_solov2_full": None, "box_fallbacks": None, "train_wall_s": None}

    # ---- trainings (one per supervision some selected method needs)
    cfgs, trained = {}, {}
    for kind, (recipe, recipe_overrides) in MODELS.items():
        if not any(METHODS[m][2] == kind for m in methods):
            continue
        evaluate = any(METHODS[m][2] == kind and METHODS[m][0] == "end_to_end" for m in methods)
        queries = [f"model.mask2former.num_queries={args.max_dets}"] if kind in QUERY_MODELS else []
        cfgs[kind] = load_config(recipe, recipe_overrides + schedule_overrides(kind, args.iterations) + queries + overrides + [
            f"trainer.output_dir={out / kind}", f"trainer.eval_after_train={evaluate}"])
        print(f"== training {kind} ({recipe}, model.arch={cfgs[kind].model.arch}, "
              f"supervision.type={cfgs[kind].supervision.type}) → {out / kind}")
        trained[kind] = train_or_reuse(cfgs[kind], args.reuse)

    rows: list[dict] = []
    # ---- end to end
    e2e = {}
    for kind in MODELS:
        if kind in trained and any(METHODS[m][2] == kind and METHODS[m][0] == "end_to_end" for m in methods):
            e2e[kind] = ensure_metrics(trained[kind], cfgs[kind], device)
    val_data = json.loads(val_json.read_text())
    n_val = len(val_data["images"])
    n_val_instances = sum(1 for a in val_data["annotations"] if not a.get("iscrowd", 0))
    for method in [m for m in methods if METHODS[m][0] == "end_to_end"]:
        _, supervision, kind = METHODS[method]
        metrics = e2e[kind]
        segm = metrics["boxfill"]["segm"] if method in BOXFILL else metrics["model"]["segm"]
        row = dict(base, track="end_to_end", method=method, supervision=supervision, **_ap_fields(segm, metrics["model"]["bbox"]),
                   **empty, images=n_val, instances=n_val_instances, device=device_name(cpu=not use_cuda),
                   wall_s=round(trained[kind]["wall_s"], 1), config=str(out / kind / "config.yaml"))
        if method in ("boxinst", "boxlevelset", "sim") and "condinst" in e2e:
            row["ratio_box_over_mask"] = _ratio(segm["AP"], e2e["condinst"]["model"]["segm"]["AP"])
        if method in ("boxlevelset", "solov2_boxinst") and "solov2_full" in e2e:  # same network, real masks
            row["ratio_over_solov2_full"] = _ratio(segm["AP"], e2e["solov2_full"]["model"]["segm"]["AP"])
        if method == "box2mask_t" and "mask2former_full" in e2e:  # same network, real masks
            row["ratio_box_over_mask"] = _ratio(segm["AP"], e2e["mask2former_full"]["model"]["segm"]["AP"])
        if kind in QUERY_MODELS:
            row["mask_largest_component"] = cfgs[kind].model.mask_largest_component
        row.update(group="all", shift=_shifted(args.train_kinds, set(kinds.get(im["file_name"]) for im in val_data["images"])))
        rows.append(row)
        rows += end_to_end_kind_rows(row, out / kind / "eval", val_json, val_data, kinds, args.train_kinds,
                                     boxfill=method in BOXFILL, max_dets=args.max_dets)

    # ---- boxes given
    given = [m for m in methods if METHODS[m][0] == "boxes_given"]
    if given:
        rows += boxes_given_rows(args, given, trained, cfgs, out, base, empty, val_json, image_dir, kinds, device, use_cuda)
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path, "a") as f:
        for row in rows:
            line = json.dumps({k: _num(v) for k, v in row.items()})
            print(line)
            f.write(line + "\n")
    header = (f"Quality, {name} val: {args.backbone}, test size {args.image_size}, {args.iterations} iterations, "
              f"batch {args.batch_size}; {device_name(cpu=not use_cuda)}; commit {commit}, {date}. "
              "APs on the COCO 0–100 scale, mean IoU in percent; box/mask = mask AP of the box-supervised model "
              "over the mask-supervised one.")
    table = markdown_table(rows, header)
    print(table)
    md = Path(args.markdown) if args.markdown else ROOT / "bench" / "results" / f"quality_{name}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
