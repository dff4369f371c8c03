"""``boxmask`` command line: train, eval, predict, annotate, demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

#: default of `annotate --candidates` (kept equal to annotate_dataset's default)
ANNOTATE_CANDIDATES = 5
#: default of `annotate --fallback-threshold` (kept equal to engine.annotate.FALLBACK_THRESHOLD)
ANNOTATE_FALLBACK = 0.5


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    print(f"checkpoint: {summary['checkpoint']}  ({summary['global_step']} steps, {summary['wall_s']:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    from .config import load_config
    from .engine.evaluator import format_ap_table
    from .engine.inference import evaluate_model, load_checkpoint
    from .engine.train import resolve_data_paths

    device = _device(args.device)
    model, cfg, meta = load_checkpoint(args.checkpoint, device)
    if args.overrides:
        cfg = load_config(cfg.to_dict(), args.overrides)
        model.cfg = cfg.model
    paths = resolve_data_paths(cfg)
    ann = args.ann_file or paths["val_json"]
    images = args.images or paths["val_images"]
    if not ann or not images:
        raise SystemExit("eval: no annotation file/images given and the recipe has no val split")
    out = Path(args.output) if args.output else Path(args.checkpoint).resolve().parent.parent / "eval"
    metrics = evaluate_model(model, cfg, meta["cat_ids"], ann, images, device=device, max_dets=args.max_dets,
                             output_dir=out)
    print(format_ap_table({"segm": metrics["model"]["segm"], "bbox": metrics["model"]["bbox"],
                           "segm (boxes filled)": metrics["boxfill"]["segm"]}))
    print(f"results and metrics written to {out}")
    return 0


def cmd_predict(args) -> int:
    from .engine.inference import list_images, load_checkpoint, predict_images

    device = _device(args.device)
    model, cfg, meta = load_checkpoint(args.checkpoint, device)
    images = list_images(args.inputs)
    if not images:
        raise SystemExit("predict: no images found in the inputs")
    path = predict_images(model, cfg, meta, images, args.output, score_threshold=args.score_threshold, device=device,
                          overlays=not args.no_overlays)
    print(f"{len(images)} images ► {path} (overlays in {Path(args.output) / 'overlays'})")
    return 0


def cmd_annotate(args) -> int:
    from .engine.annotate import AnnotateError, annotate_dataset, report_path
    from .engine.inference import load_checkpoint

    device = _device(args.device)
    checkpoint = args.checkpoint
    if args.fit:
        from .engine.fit import FIT_BOX_SIZE, fit_config, fit_dir_for, fit_to_boxes

        box_size = FIT_BOX_SIZE if args.box_size is None else args.box_size
        work = Path(args.fit_dir) if args.fit_dir else fit_dir_for(args.output)
        cfg = fit_config(args.ann_file, args.images, work, checkpoint=checkpoint, recipe=args.fit_recipe,
                         steps=args.fit_steps, image_size=args.fit_image_size, box_size=box_size,
                         overrides=[f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"])
        start = f"from {checkpoint}" if checkpoint else f"from the backbone of {args.fit_recipe or 'the packaged fit recipe'}"
        print(f"fitting to the given boxes ({cfg.solver.max_iters} steps {start}, image size "
              f"{cfg.data.test_min_size}, box-adaptive scale {cfg.data.box_size:g} px) in {work}")
        fit = fit_to_boxes(cfg, resume=not args.no_resume)
        print(f"  fit {fit['state']}: {fit['global_step']} steps, {fit['wall_s']:.0f} s ► {fit['checkpoint']}")
        checkpoint = fit["checkpoint"]
    elif checkpoint is None:
        raise AnnotateError("give a CHECKPOINT, or --fit to train on the given boxes from the pretrained backbone")
    else:
        box_size = args.box_size
    model, cfg, meta = load_checkpoint(checkpoint, device)
    summary = annotate_dataset(model, cfg, meta, args.ann_file, args.images, args.output, device=device,
                               resume=not args.no_resume, rank=args.location_rank,
                               candidates=args.candidates, box_size=box_size,
                               fallback_threshold=args.fallback_threshold)
    reasons = ", ".join(f"{n} {r}" for r, n in summary["box_fallback_reasons"].items()) or "none"
    print(f"{summary['annotations']} annotations on {summary['images']} images ► {summary['output']}")
    print(f"  masks from the model: {summary['from_model']}")
    print(f"  box kept as the mask: {summary['box_fallback']} ({reasons})")
    if summary["nearest_p3_location"]:
        print(f"  boxes with no FCOS location inside (nearest P3 location used): {summary['nearest_p3_location']}")
    if summary["class_agnostic"]:
        print(f"  boxes of a category the model does not know (class-agnostic): {summary['class_agnostic']}")
    if summary["resumed_images"]:
        print(f"  images taken from the interrupted run: {summary['resumed_images']}")
    print(f"  per-annotation source and quality cues: {report_path(args.output)}")
    return 0


def cmd_demo(args) -> int:
    from .config import load_config
    from .engine.evaluator import format_ap_table
    from .engine.inference import list_images, predict_images
    from .engine.train import resolve_data_paths, train
    from .io import atomic_write_json

    out = Path(args.output)
    overrides = [f"trainer.output_dir={out}"] + (args.overrides or [])
    if args.iterations:
        overrides.append(f"solver.max_iters={args.iterations}")
    cfg = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", overrides)
    print(f"boxmask demo: BoxInst ({cfg.model.backbone}) on the bundled DSB2018 nuclei sample, "
          f"{cfg.solver.max_iters} steps on {'GPU' if torch.cuda.is_available() else 'CPU'}; output: {out.resolve()}")
    t0 = time.time()
    summary = train(cfg)
    metrics = summary["metrics"]
    paths = resolve_data_paths(cfg)
    import json

    val_files = [Path(paths["val_images"]) / im["file_name"] for im in json.loads(Path(paths["val_json"]).read_text())["images"]]
    from .engine.inference import load_checkpoint

    model, cfg_loaded, meta = load_checkpoint(summary["checkpoint"], "cpu")
    predict_images(model, cfg_loaded, meta, list_images([str(p) for p in val_files]), out / "predictions",
                   score_threshold=args.score_threshold)
    wall = time.time() - t0
    segm, boxfill = metrics["model"]["segm"], metrics["boxfill"]["segm"]
    atomic_write_json(out / "demo_summary.json", {"wall_s": wall, "metrics": metrics})
    print()
    print(format_ap_table({"segm": segm, "bbox": metrics["model"]["bbox"], "segm (boxes filled)": boxfill}))
    print(f"\nmask AP {segm['AP']:.1f} vs {boxfill['AP']:.1f} for the same detections with their boxes filled "
          f"({wall / 60:.1f} min in all)")
    print(f"overlays: {out / 'predictions' / 'overlays'}\nresults:  {out / 'predictions' / 'results.json'}\n"
          f"checkpoint: {summary['checkpoint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxmask", description="Box-supervised instance segmentation (BoxInst).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (YAML path or packaged name) with key=value overrides")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. solver.max_iters=2000 trainer.devices=2")
    p.add_argument("--resume", help="checkpoint to resume from, or 'last' for OUTPUT_DIR/checkpoints/last.ckpt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="mask/box AP of a checkpoint on a COCO split (default: the recipe's val split)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--ann-file")
    p.add_argument("--images")
    p.add_argument("--max-dets", type=int, default=None)
    p.add_argument("--output")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="masks for images ► COCO results JSON (RLE) + overlay PNGs")
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+", help="image files, folders, or .txt lists of paths")
    p.add_argument("--output", "-o", default="predictions")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("annotate", help="masks for the boxes of a COCO JSON ► the same JSON with RLE segmentations")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="trained boxmask checkpoint; optional with --fit (then the fit starts from the backbone)")
    p.add_argument("--ann-file", required=True, help="COCO instances JSON with the boxes")
    p.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    p.add_argument("--output", "-o", required=True, help="output JSON (resume file beside it: OUTPUT.partial.jsonl)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-resume", action="store_true", help="ignore an interrupted run's progress and start over")
    p.add_argument("--location-rank", choices=("score_iou", "score"), default="score_iou",
                   help="how the FCOS location serving a box is chosen: score x IoU of its regressed box with the "
                        "given box (default), or the score alone")
    p.add_argument("--candidates", type=int, default=ANNOTATE_CANDIDATES,
                   help="FCOS locations tried per box; the mask whose x/y projections fit the box best is kept")
    p.add_argument("--fallback-threshold", type=float, default=ANNOTATE_FALLBACK,
                   help="a model mask whose quality estimate (stability x box cover x candidate agreement, 0-1) "
                        "is below this keeps the filled box instead; 0 keeps every non-empty model mask")
    p.add_argument("--box-size", type=float, default=None,
                   help="scale each image so that its median box side is at least this many pixels (small objects "
                        "get a finer mask); 0 = the model's fixed test size. Default: 32 with --fit, else the "
                        "checkpoint's data.box_size")
    p.add_argument("--fit", action="store_true",
                   help="first train on the given boxes (box supervision only, never their masks), starting from "
                        "CHECKPOINT or from the pretrained backbone; resumable, work folder OUTPUT-stem.fit/")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="training steps of --fit (default: 4 epochs from a checkpoint, 10 from the backbone; "
                        "100/300 to 3000 steps)")
    p.add_argument("--fit-image-size", type=int, default=None,
                   help="shorter side of --fit training before the box-adaptive scale (default: the model's test size)")
    p.add_argument("--fit-recipe", default=None,
                   help="recipe of --fit without a checkpoint (default: boxinst_effnet-lite0_fpn_fit)")
    p.add_argument("--fit-dir", default=None, help="work folder of --fit (default: OUTPUT-stem.fit/ beside the output)")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("demo", help="train BoxInst on the bundled nuclei sample, evaluate, write overlays")
    p.add_argument("--output", "-o", default="boxmask-demo")
    p.add_argument("--iterations", type=int, default=0, help="override the number of training steps")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``boxmask`` console script."""
    from .config import ConfigError
    from .data.coco import DatasetError
    from .engine.annotate import AnnotateError
    from .engine.fit import FitError
    from .engine.inference import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, CheckpointError, AnnotateError, FitError, FileNotFoundError) as exc:
        print(f"boxmask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
