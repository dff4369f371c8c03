"""``boxmask`` command line: train, eval, predict, annotate, demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

#: default of `annotate --candidates` (kept equal to annotate_dataset's default)
ANNOTATE_CANDIDATES = 5


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
    from .engine.annotate import annotate_dataset
    from .engine.inference import load_checkpoint

    device = _device(args.device)
    model, cfg, meta = load_checkpoint(args.checkpoint, device)
    summary = annotate_dataset(model, cfg, meta, args.ann_file, args.images, args.output, device=device,
                               resume=not args.no_resume, rank=args.location_rank,
                               candidates=args.candidates)
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
    p.add_argument("checkpoint")
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
    from .engine.inference import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, CheckpointError, AnnotateError, FileNotFoundError) as exc:
        print(f"boxmask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
