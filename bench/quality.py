"""Quality benchmark: box-supervised vs mask-supervised instance segmentation on a COCO-format dataset,
in two tracks on its val split, in one run.

* ``end_to_end``: train BoxInst (box labels, ``supervision.type=boxinst``) and CondInst (mask labels,
  ``supervision.type=full``) with the same model, schedule and seed on the train split; evaluate both
  (mask AP, box AP) plus BoxInst's own detections with their boxes filled as masks
  (``boxinst_boxfill``, which isolates what the mask head adds).
  Methods: ``boxinst``, ``condinst``, ``boxinst_boxfill``; ``boxlevelset`` and ``boxlevelset_boxfill``
  train BoxLevelSet (SOLOv2-style network + level-set supervision, recipe
  ``boxlevelset_effnet-lite0_fpn_nuts``: AdamW) on the same data, schedule length, backbone and seed.
* ``boxes_given``: the ground-truth boxes are the input (as when a user annotates a box-labelled
  dataset) and every box gets one mask: the filled GT box (``filled_box``), OpenCV GrabCut initialised
  with the box (``grabcut``, 5 iterations), and ``boxmask annotate`` with the trained BoxInst
  (``boxinst_annotate``), CondInst (``condinst_annotate``) and BoxLevelSet (``boxlevelset_annotate``). Mask AP (all scores 1.0) and the mean
  IoU of each mask with the GT mask of its box (``mean_mask_IoU``). ``--grabcut-max-images N`` runs
  the whole track on the first N val images (JSON order), since GrabCut costs 0.2–0.8 s per instance
  on a CPU core.

    python bench/quality.py --dataset ../shared/data/nuts --iterations 600 --image-size 512
    python bench/quality.py --dataset ../shared/data/dsb2018 --max-dets 400 --grabcut-max-images 30

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
``date``, ``config``. The run's Markdown table is printed and written to
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

from boxmask.config import load_config
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
    "condinst_annotate": ("boxes_given", "mask", "condinst"),
    "boxlevelset": ("end_to_end", "box", "boxlevelset"),
    "boxlevelset_boxfill": ("end_to_end", "box", "boxlevelset"),
    "boxlevelset_annotate": ("boxes_given", "box", "boxlevelset"),
    "sim": ("end_to_end", "box", "sim"),
    "sim_boxfill": ("end_to_end", "box", "sim"),
    "sim_annotate": ("boxes_given", "box", "sim"),
}
#: trained model → (packaged recipe, recipe overrides); the run's data/schedule overrides apply to all
MODELS = {
    "boxinst": ("boxinst_effnet-lite0_fpn_nuts", ["supervision.type=boxinst"]),
    "condinst": ("boxinst_effnet-lite0_fpn_nuts", ["supervision.type=full"]),
    "boxlevelset": ("boxlevelset_effnet-lite0_fpn_nuts", []),
    "sim": ("sim_effnet-lite0_fpn_nuts", []),
}
#: methods whose rows are the model's detections with their boxes filled
BOXFILL = {"boxinst_boxfill", "boxlevelset_boxfill", "sim_boxfill"}


def schedule_overrides(kind: str, iterations: int) -> list[str]:
    """Per-model overrides that scale with the schedule: SIM's pseudo-mask/copy-paste warm-up is the
    pairwise warm-up (a third of the run, as 10k of BoxInst's 30k-90k), and its teacher momentum
    keeps a time constant of a tenth of the run, 1/(1-m) = iterations/10 (paper: 0.9999 over 90k steps;
    at 600 steps the paper's momentum would leave the teacher ≈ the initial network)."""
    if kind != "sim":
        return []
    warmup = max(1, iterations // 3)
    momentum = 1.0 - 10.0 / max(iterations, 20)
    return [f"supervision.sim_warmup_iters={warmup}", f"supervision.sim_teacher_momentum={momentum:.6g}"]


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


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    for key in ("eval_after_train", "progress_bar"):
        d["trainer"].pop(key, None)
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
        # through load_config: fields added since the record was written take their defaults
        if (_comparable(load_config(rec["config"]).to_dict()) == _comparable(cfg.to_dict()) and Path(rec["checkpoint"]).is_file()
                and rec["global_step"] == cfg.solver.max_iters):
            print(f"reusing {out} ({rec['global_step']} steps)")
            return dict(rec, reused=True)
        print(f"{record_path}: different config or unfinished; training again")
    t0 = time.time()
    summary = train(cfg)
    rec = {"config": cfg.to_dict(), "wall_s": time.time() - t0, "train_s": summary["wall_s"],
           "global_step": summary["global_step"], "checkpoint": summary["checkpoint"], "metrics": summary["metrics"]}
    atomic_write_json(record_path, rec, indent=1)
    return dict(rec, reused=False)


def ensure_metrics(rec: dict, cfg, device: torch.device) -> dict:
    """Val metrics of a training record, evaluating its checkpoint when the training did not."""
    if rec.get("metrics") is None:
        from boxmask.engine.inference import evaluate_model, load_checkpoint
        from boxmask.engine.train import resolve_data_paths

        model, mcfg, meta = load_checkpoint(rec["checkpoint"], device)
        paths = resolve_data_paths(cfg)
        t0 = time.time()
        rec["metrics"] = evaluate_model(model, mcfg, meta["cat_ids"], paths["val_json"], paths["val_images"],
                                        device=device, max_dets=cfg.trainer.eval_max_dets, progress=False)
        rec["wall_s"] = rec["wall_s"] + time.time() - t0
    return rec["metrics"]


def markdown_table(rows: list[dict], header: str) -> str:
    """The run's rows as a Markdown table (one decimal; ``-`` for null)."""

    def f(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [header, "",
             "| track | method | supervision | mask AP | AP50 | AP75 | box AP | mean IoU | box/mask | images | wall s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['track']} | {r['method']} | {r['supervision']} | {f(r['mask_AP'])} | {f(r['mask_AP50'])} | "
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
    run = f"{name}_{args.backbone}_{args.image_size}_{args.iterations}"
    out = Path(args.output) / run
    overrides = [
        f"data.train_json={data / 'annotations' / 'instances_train.json'}", f"data.train_images={image_dir}",
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
    empty = {"mean_mask_IoU": None, "ratio_box_over_mask": None, "box_fallbacks": None, "train_wall_s": None}

    # ---- trainings (one per supervision some selected method needs)
    cfgs, trained = {}, {}
    for kind, (recipe, recipe_overrides) in MODELS.items():
        if not any(METHODS[m][2] == kind for m in methods):
            continue
        evaluate = any(METHODS[m][2] == kind and METHODS[m][0] == "end_to_end" for m in methods)
        cfgs[kind] = load_config(recipe, recipe_overrides + schedule_overrides(kind, args.iterations) + overrides + [
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
        rows.append(row)

    # ---- boxes given
    given = [m for m in methods if METHODS[m][0] == "boxes_given"]
    if given:
        from pycocotools.coco import COCO

        from boxmask.engine.baselines import annotations_to_results, filled_box_annotations, grabcut_annotations, mean_mask_iou
        from boxmask.engine.evaluator import evaluate_coco

        gdir = out / "boxes_given"
        gt_json, info = subset_val(val_json, args.grabcut_max_images, gdir)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(gt_json))
        max_dets = max(args.max_dets, info["max_per_image"])
        print(f"== boxes given: {len(info['image_ids'])} val images, {info['instances']} instances ({gt_json})")
        by_method = {}
        for method in given:
            _, supervision, kind = METHODS[method]
            t0 = time.time()
            fallbacks, train_wall, dev = None, None, device_name(cpu=True)
            if method == "filled_box":
                results = filled_box_annotations(gt_json, image_dir)
            elif method == "grabcut":
                results = grabcut_annotations(gt_json, image_dir, progress=True, iterations=args.grabcut_iterations)
                fallbacks = sum("grabcut_fallback" in r for r in results)
            else:
                from boxmask.engine.annotate import annotate_dataset
                from boxmask.engine.inference import load_checkpoint

                model, mcfg, meta = load_checkpoint(trained[kind]["checkpoint"], device)
                t0 = time.time()
                out_json = gdir / f"{method}_{gt_json.name}"
                summary = annotate_dataset(model, mcfg, meta, gt_json, image_dir, out_json, device=device, progress=True,
                                           resume=False, rank=args.location_rank, candidates=args.candidates)
                results = annotations_to_results(out_json)
                fallbacks = (summary or {}).get("box_fallback")
                train_wall, dev = round(trained[kind]["wall_s"], 1), device_name(cpu=not use_cuda)
            wall = time.time() - t0
            segm = evaluate_coco(gt, results, ("segm",), max_dets=max_dets, image_ids=info["image_ids"])["segm"]
            miou = _num(mean_mask_iou(gt, results))
            row = dict(base, track="boxes_given", method=method, supervision=supervision, **_ap_fields(segm, None), **empty)
            if kind:
                row["location_rank"] = args.location_rank
                row["candidates"] = args.candidates
            row.update(max_dets=max_dets, mean_mask_IoU=None if miou is None else 100.0 * miou, box_fallbacks=fallbacks,
                       train_wall_s=train_wall, images=len(info["image_ids"]), instances=info["instances"], device=dev,
                       wall_s=round(wall, 1), config=str(out / kind / "config.yaml") if kind else None)
            by_method[method] = row
            rows.append(row)
        for boxed in ("boxinst_annotate", "boxlevelset_annotate", "sim_annotate"):
            if boxed in by_method and "condinst_annotate" in by_method:
                by_method[boxed]["ratio_box_over_mask"] = _ratio(by_method[boxed]["mask_AP"],
                                                                 by_method["condinst_annotate"]["mask_AP"])

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
