"""``boxmask`` command line: demo, recipes, train, eval, predict, annotate, export.

``boxmask --help`` and ``boxmask COMMAND --help`` are the manual: every option has a help line and
every command an epilog of example commands. Heavy imports (torch, Lightning) happen inside the
commands, so the help and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import textwrap
import time
from pathlib import Path

#: default of `annotate --candidates` (kept equal to annotate_dataset's default)
ANNOTATE_CANDIDATES = 5
#: default of `annotate --fallback-threshold` (kept equal to engine.annotate.FALLBACK_THRESHOLD)
ANNOTATE_FALLBACK = 0.3
#: default of `annotate --min-threshold` (kept equal to engine.annotate.MIN_THRESHOLD)
ANNOTATE_MIN_THRESHOLD = 0.1

#: accepted values of ``--device``
DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


class UsageError(Exception):
    """A command-line value that cannot be used (e.g. ``--device cuda`` without a GPU)."""


def version_string() -> str:
    """``boxmask X.Y.Z (torch A, lightning B, Python C)`` from the installed distributions' metadata."""
    from importlib import metadata

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    py = ".".join(map(str, sys.version_info[:3]))
    return f"boxmask {ver('boxmask')} (torch {ver('torch')}, lightning {ver('lightning')}, Python {py})"


def device_arg(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked, not yet resolved)."""
    if not _DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use {DEVICE_CHOICES}")
    return text


def _check_cuda(name: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available to torch (use --device cpu or auto)")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)")


def _device(name: str):
    """The torch device of a ``--device`` value (``auto``: the first GPU if there is one, else the CPU)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        _check_cuda(name)
    return torch.device(name)


def _apply_train_options(cfg, output: str | None, device: str | None) -> None:
    """``-o``/``--device`` of train/demo onto ``cfg.trainer`` (after the recipe and the overrides)."""
    if output:
        cfg.trainer.output_dir = str(output)
    if device in (None, "auto"):
        return
    if device == "cpu":
        cfg.trainer.accelerator = "cpu"
        return
    _check_cuda(device)
    cfg.trainer.accelerator = "gpu"
    if ":" in device:
        cfg.trainer.devices = [int(device.split(":")[1])]


def _rank_zero() -> bool:
    # Lightning's DDP launcher re-runs this command in each process; only rank 0 reports
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _q(path) -> str:
    return shlex.quote(str(path))


def next_commands(checkpoint: str | Path, cfg) -> list[str]:
    """Commands to run after training ``cfg`` (real paths): eval, predict and annotate."""
    from .engine.train import resolve_data_paths

    paths = {k: (os.path.abspath(v) if v else "") for k, v in resolve_data_paths(cfg).items()}
    out = Path(cfg.trainer.output_dir).resolve()
    ckpt = _q(checkpoint)
    if paths["val_json"] and paths["val_images"]:
        evaluate = f"boxmask eval {ckpt}"
    else:
        evaluate = f"boxmask eval {ckpt} --ann-file VAL.json --images VAL_IMAGES/"
    images = paths["val_images"] or paths["train_images"] or "IMAGES/"
    return [
        evaluate,
        f"boxmask predict {ckpt} {_q(images)} -o {_q(out / 'predictions')}",
        f"boxmask annotate {ckpt} --ann-file {_q(paths['train_json'] or 'BOXES.json')} "
        f"--images {_q(paths['train_images'] or 'IMAGES/')} -o {_q(out / 'annotated.json')}",
    ]


def cmd_train(args) -> int:
    """``boxmask train``: report the recipe and output folder, train, report metrics and next commands."""
    from .config import load_config, resolve_config_path
    from .engine.progress import format_duration
    from .engine.train import train
    from .methods import method_class

    cfg = load_config(args.config, args.overrides)
    method_class(cfg)  # the method's checks, before anything is printed or built
    _apply_train_options(cfg, args.output, args.device)
    out = Path(cfg.trainer.output_dir).resolve()
    ckpt_dir = out / "checkpoints"
    if _rank_zero():
        extra = f" (+ {len(args.overrides)} override(s))" if args.overrides else ""
        print(f"recipe   {resolve_config_path(args.config).resolve()}{extra}")
        print(f"output   {out}   (resolved config: config.yaml)")
        if args.resume:
            print(f"resume   {ckpt_dir / 'last.ckpt' if args.resume == 'last' else Path(args.resume).resolve()}")
    summary = train(cfg, resume=args.resume)
    if not _rank_zero():
        return 0
    ckpt = Path(summary["checkpoint"]).resolve()
    metrics = summary["metrics"]
    if not metrics:  # the AP table printed by train() already ends with a blank line
        print()
    print(f"done     {summary['global_step']} steps in {format_duration(summary['wall_s'])}")
    print(f"model    {ckpt}")
    if metrics:
        segm, bbox, boxfill = metrics["model"]["segm"], metrics["model"]["bbox"], metrics["boxfill"]["segm"]
        print(f"metrics  mask AP {segm['AP']:.1f} (its boxes filled: {boxfill['AP']:.1f}), box AP {bbox['AP']:.1f}"
              f"   ({out / 'eval' / 'metrics.json'})")
    print("next:")
    for line in next_commands(ckpt, cfg):
        print(f"  {line}")
    return 0


def _onnx_model(args):
    """``(OnnxModel, cfg, meta)`` of ``--onnx`` (``--device cuda``: onnxruntime's CUDA provider)."""
    from .engine.export import load_onnx

    providers = None
    if args.device not in (None, "auto", "cpu"):
        from .engine.export import require_onnx

        _, ort = require_onnx(runtime_only=True)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError(f"--device {args.device} with --onnx: this onnxruntime has no CUDA provider "
                             "(install onnxruntime-gpu, or use --device cpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return load_onnx(args.onnx, providers=providers)


def _onnx_overrides(args) -> list[str]:
    """The KEY=VALUE overrides of eval/predict with ``--onnx``: model.* settings live in the graph."""
    overrides = list(getattr(args, "overrides", None) or [])
    if args.checkpoint and "=" in args.checkpoint:  # `eval --onnx M key=value`: argparse took it as CKPT
        overrides.insert(0, args.checkpoint)
        args.checkpoint = None
    fixed = [o for o in overrides if o.startswith("model.")]
    if fixed:
        raise UsageError(f"{', '.join(fixed)}: model settings are fixed in the exported graph; "
                         "export again with the override (boxmask export CKPT ... KEY=VALUE)")
    return overrides


def cmd_eval(args) -> int:
    """``boxmask eval``: COCO AP of a checkpoint (or an ONNX export) on a split; results and metrics to ``-o``."""
    from .config import load_config
    from .engine.evaluator import format_ap_table
    from .engine.inference import evaluate_model, load_checkpoint
    from .engine.train import resolve_data_paths

    if args.onnx:
        overrides = _onnx_overrides(args)
        if args.checkpoint:
            raise UsageError("give a CKPT or --onnx MODEL, not both")
        device = "cpu"
        model, cfg, meta = _onnx_model(args)
        if overrides:
            cfg = load_config(cfg.to_dict(), overrides)
        if args.max_dets and args.max_dets > model.max_dets:
            raise UsageError(f"--max-dets {args.max_dets}: the model was exported with at most {model.max_dets} "
                             "detections per image (boxmask export --max-dets N)")
        default_out = Path(args.onnx).resolve().parent / "eval-onnx"
    elif not args.checkpoint:
        raise UsageError("give a CKPT or --onnx MODEL")
    else:
        device = _device(args.device)
        model, cfg, meta = load_checkpoint(args.checkpoint, device)
        if args.overrides:
            cfg = load_config(cfg.to_dict(), args.overrides)
            model.cfg = cfg.model
        if args.max_dets:
            # COCOeval's maxDets counts only what the model returns: let it return that many
            cfg.model.max_detections = max(cfg.model.max_detections, args.max_dets)
            model.cfg = cfg.model
        default_out = Path(args.checkpoint).resolve().parent.parent / "eval"
    paths = resolve_data_paths(cfg)
    ann = args.ann_file or paths["val_json"]
    images = args.images or paths["val_images"]
    if not ann or not images:
        raise UsageError("no --ann-file/--images given and the checkpoint's recipe has no val split")
    out = Path(args.output) if args.output else default_out
    metrics = evaluate_model(model, cfg, meta["cat_ids"], ann, images, device=device, max_dets=args.max_dets,
                             output_dir=out)
    print(format_ap_table({"segm": metrics["model"]["segm"], "bbox": metrics["model"]["bbox"],
                           "segm (boxes filled)": metrics["boxfill"]["segm"]}))
    print(f"results and metrics written to {out}")
    return 0


def cmd_predict(args) -> int:
    """``boxmask predict``: masks for image files ► results JSON, overlays, contact sheet (PyTorch or ONNX)."""
    from .engine.inference import list_images, load_checkpoint, predict_images

    if args.onnx:
        _onnx_overrides(args)
        # no CKPT with --onnx: every positional is an input
        args.inputs = ([args.checkpoint] if args.checkpoint else []) + list(args.inputs)
        device = "cpu"
        model, cfg, meta = _onnx_model(args)
        if args.max_dets:
            model.max_detections = args.max_dets
    else:
        if not args.checkpoint or not args.inputs:
            raise UsageError("give a CKPT and at least one INPUT (or --onnx MODEL INPUT...)")
        device = _device(args.device)
        model, cfg, meta = load_checkpoint(args.checkpoint, device)
        if args.max_dets:
            cfg.model.max_detections = args.max_dets
            model.cfg = cfg.model
    images = list_images(args.inputs)
    if not images:
        raise UsageError("no images found in the inputs")
    out = Path(args.output)
    path = predict_images(model, cfg, meta, images, out, score_threshold=args.score_threshold, device=device,
                          overlays=not args.no_overlays, contact_sheet=args.contact_sheet)
    print(f"{len(images)} images ► {path}")
    if not args.no_overlays:
        print(f"overlays      {out / 'overlays'}")
    if args.contact_sheet > 0:
        print(f"contact sheet {out / 'contact_sheet.png'} (first {min(len(images), args.contact_sheet)} images)")
    return 0


def cmd_export(args) -> int:
    """``boxmask export``: an ONNX model (post-processing and metadata inside) of a checkpoint."""
    from .engine.export import export_onnx

    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")
    t0 = time.time()
    info = export_onnx(args.checkpoint, out, image_size=tuple(args.image_size) if args.image_size else None,
                       dynamic=args.dynamic, max_dets=args.max_dets, binary_masks=args.binary_masks,
                       opset=args.opset, overrides=args.overrides)
    size = "dynamic batch and size" if args.dynamic else f"batch 1, {info['input_size'][0]}x{info['input_size'][1]}"
    print(f"exported {info['family']} ({info['method']}) ► {out}   ({size}; up to {info['max_dets']} detections; "
          f"{info['masks']} masks; {time.time() - t0:.1f} s)")
    print(f"  input  images uint8 [B,3,H,W] RGB; outputs boxes, scores, labels, masks, num_dets")
    print(f"  run    boxmask predict --onnx {_q(out)} IMAGES... -o preds   |   boxmask eval --onnx {_q(out)}")
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
                         steps=args.fit_steps, image_size=args.fit_image_size, box_size=args.fit_box_size,
                         overrides=[f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"])
        start = f"from {checkpoint}" if checkpoint else f"from the backbone of {args.fit_recipe or 'the packaged fit recipe'}"
        scale = f"box-adaptive scale {cfg.data.box_size:g} px" if cfg.data.box_size else "fixed sizes"
        print(f"fitting to the given boxes ({cfg.solver.max_iters} steps {start}, image size "
              f"{cfg.data.test_min_size}, {scale}) in {work}")
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
                               fallback_threshold=args.fallback_threshold, binarize=args.binarize.replace("-", "_"),
                               min_threshold=args.min_threshold)
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
    """``boxmask demo``: train BoxInst on the bundled sample, evaluate, predict the val images."""
    import torch

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
    _apply_train_options(cfg, None, args.device)
    on_gpu = cfg.trainer.accelerator != "cpu" and torch.cuda.is_available()
    print(f"boxmask demo: BoxInst ({cfg.model.backbone}) on the bundled DSB2018 nuclei sample, "
          f"{cfg.solver.max_iters} steps on {'GPU' if on_gpu else 'CPU'}; output: {out.resolve()}")
    t0 = time.time()
    summary = train(cfg)
    metrics = summary["metrics"]
    paths = resolve_data_paths(cfg)
    import json

    val_files = [Path(paths["val_images"]) / im["file_name"] for im in json.loads(Path(paths["val_json"]).read_text())["images"]]
    from .engine.inference import load_checkpoint

    device = _device(args.device) if args.device else "cpu"
    model, cfg_loaded, meta = load_checkpoint(summary["checkpoint"], device)
    predict_images(model, cfg_loaded, meta, list_images([str(p) for p in val_files]), out / "predictions",
                   score_threshold=args.score_threshold, device=device)
    wall = time.time() - t0
    segm, boxfill = metrics["model"]["segm"], metrics["boxfill"]["segm"]
    atomic_write_json(out / "demo_summary.json", {"wall_s": wall, "metrics": metrics})
    print()
    print(format_ap_table({"segm": segm, "bbox": metrics["model"]["bbox"], "segm (boxes filled)": boxfill}))
    print(f"\nmask AP {segm['AP']:.1f} vs {boxfill['AP']:.1f} for the same detections with their boxes filled "
          f"({wall / 60:.1f} min in all)")
    print(f"overlays: {out / 'predictions' / 'overlays'}\ncontact sheet: {out / 'predictions' / 'contact_sheet.png'}\n"
          f"results:  {out / 'predictions' / 'results.json'}\ncheckpoint: {summary['checkpoint']}")
    return 0


def cmd_recipes(args) -> int:
    """``boxmask recipes [NAME]``: the packaged recipes, or one resolved as YAML."""
    from .recipes import format_recipe_table, list_recipes, resolved_yaml

    if args.name:
        print(resolved_yaml(args.name, args.overrides), end="")
        return 0
    if args.overrides:
        raise UsageError("overrides need a recipe NAME: boxmask recipes NAME key=value ...")
    print("packaged recipes (boxmask train NAME; boxmask recipes NAME prints one with every key):\n")
    print(format_recipe_table(list_recipes()))
    return 0


# ---------------------------------------------------------------------------------------------------- parser

class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions and help lines (never inside a recipe name like ``x_effnet-lite0``),
    keeps multi-line text (the epilogs of examples) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


_FORMATTER = _Formatter

MAIN_EPILOG = """\
getting started:
  boxmask demo                                   # train, evaluate, draw: the bundled sample, ~6 min on a CPU
  boxmask recipes                                # the packaged recipes (method, backbone, dataset)
  boxmask train boxinst_effnet-lite0_fpn_nuts -o runs/nuts
  boxmask predict runs/nuts/checkpoints/model_final.ckpt photos/ -o preds

Every command has its own help and examples: boxmask COMMAND --help.
Output is kept quiet: Lightning's tips and info lines are hidden (-v shows them). Training shows a
progress bar on a terminal and, in a log file (nohup, a cluster job), one plain line every
trainer.progress_every steps (default: trainer.log_every).
"""

TRAIN_EPILOG = """\
examples:
  boxmask train boxinst_effnet-lite0_fpn_dsb2018-sample -o runs/sample solver.max_iters=300
  boxmask train boxinst_effnet-lite0_fpn_nuts -o runs/mine --device cuda:0 \\
      data.train_json=mine/train.json data.train_images=mine/img data.val_json=mine/val.json data.val_images=mine/img
  boxmask train runs/mine/config.yaml --resume last      # continue an interrupted run exactly

The output folder gets config.yaml (the resolved recipe), checkpoints/{last,model_final}.ckpt,
logs/{tensorboard,csv}/ and, with a val split, eval/metrics.json. Every key a recipe can set:
boxmask recipes NAME.
"""

EVAL_EPILOG = """\
examples:
  boxmask eval runs/nuts/checkpoints/model_final.ckpt                 # the recipe's val split
  boxmask eval CKPT --ann-file val.json --images imgs/ --max-dets 400 -o runs/nuts/eval-other
  boxmask eval CKPT data.test_min_size=640 --device cpu                # with a config override
  boxmask eval --onnx nuts.onnx                                        # an exported model, onnxruntime (CPU)

Prints COCO mask AP and box AP (AP, AP50, AP75, APs, APm, APl) and the AP of the same detections
with their boxes filled as masks; writes results.json, results_boxfill.json and metrics.json.
"""

PREDICT_EPILOG = """\
examples:
  boxmask predict CKPT photos/ -o preds
  boxmask predict CKPT a.jpg b.png list.txt --score-threshold 0.5 --device cuda:1
  boxmask predict CKPT photos/ -o preds --no-overlays --contact-sheet 16
  boxmask predict --onnx nuts.onnx photos/ -o preds                      # an exported model, onnxruntime

Writes results.json (COCO results, RLE masks), images.json (image id <-> file), overlays/*.png and
contact_sheet.png (the overlays of the first images in one grid, for a quick look).
"""

EXPORT_EPILOG = """\
examples:
  boxmask export runs/nuts/checkpoints/model_final.ckpt -o nuts.onnx --dynamic
  boxmask export CKPT -o nuts_512.onnx --image-size 512 512 --max-dets 50
  boxmask export CKPT -o nuts.onnx --dynamic model.score_threshold=0.3     # thresholds are baked in

The graph takes uint8 [B,3,H,W] RGB images (one size per batch; resize first, e.g. to the recipe's
test size) and returns boxes [B,K,4] (xyxy, input pixels), scores [B,K], labels [B,K] (-1 = padding),
masks [B,K,H,W] (probabilities, or 0/1 with --binary-masks) and num_dets [B]. Post-processing (NMS or
Matrix NMS, the dynamic mask head, upsampling) is inside; class names, category ids, normalisation,
thresholds and the recipe are in the model's metadata. Needs the extra: pip install "boxmask[export]".
Run it with onnxruntime: boxmask predict --onnx MODEL IMAGES..., boxmask eval --onnx MODEL.
"""

ANNOTATE_EPILOG = """\
examples:
  boxmask annotate CKPT --ann-file boxes.json --images imgs/ -o with_masks.json
  boxmask annotate CKPT --ann-file boxes.json --images imgs/ -o with_masks.json --fit      # fit, then annotate
  boxmask annotate --fit --ann-file boxes.json --images imgs/ -o with_masks.json           # from the backbone

Writes the same COCO JSON with an RLE segmentation for every annotation; boxes it cannot serve, and
masks whose quality estimate is below --fallback-threshold, keep their box as the mask and are
counted in the summary (per annotation in OUTPUT.report.json). Use --fit on images unlike the
model's training data (another microscope, stain or camera): it first trains on the given boxes
(never their masks). An interrupted run resumes (the fit from OUTPUT-stem.fit/checkpoints/last.ckpt,
the masks from OUTPUT.partial.jsonl); --no-resume starts over.
"""

DEMO_EPILOG = """\
examples:
  boxmask demo                                   # ~6 min on a 2-core CPU; output in boxmask-demo/
  boxmask demo -o /tmp/demo --iterations 50      # a shorter run
  boxmask demo --device cuda solver.base_lr=0.02
"""

RECIPES_EPILOG = """\
examples:
  boxmask recipes
  boxmask recipes boxinst_effnet-lite0_fpn_nuts
  boxmask recipes boxinst_effnet-lite0_fpn_nuts solver.max_iters=2000 > my_recipe.yaml   # a recipe to edit
"""


def _add_verbose(p: argparse.ArgumentParser, top: bool = False) -> None:
    # SUPPRESS on the subcommands: `boxmask -v train` is not reset by train's own default
    p.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                   help="also show third-party info lines and warnings (Lightning's tips, device banners) and "
                        "boxmask's own log records")


def _add_device(p: argparse.ArgumentParser, default: str | None = "auto", what: str = "") -> None:
    p.add_argument("--device", type=device_arg, default=default, metavar=DEVICE_CHOICES,
                   help=what or "where the model runs: auto (the first GPU if there is one, else the CPU), cpu, "
                                "cuda or cuda:N (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The ``boxmask`` argument parser (one subparser per command)."""
    from .config import packaged_config_names

    parser = argparse.ArgumentParser(
        prog="boxmask", formatter_class=_FORMATTER, epilog=MAIN_EPILOG,
        description="Box-supervised instance segmentation (BoxInst, BoxLevelSet, SIM): train from COCO box labels, "
                    "evaluate mask AP, predict masks for images, add masks to a box-labelled COCO dataset.")
    parser.add_argument("--version", action="version", version=version_string(),
                        help="print the versions of boxmask, torch, lightning and Python, and exit")
    _add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("demo", help="train BoxInst on the bundled nuclei sample, evaluate, write overlays",
                       description="Train BoxInst (EfficientNet-Lite0-FPN) with box labels on 40 images of the bundled "
                                   "DSB2018 nuclei sample, evaluate on its 12 val images, write overlays.",
                       formatter_class=_FORMATTER, epilog=DEMO_EPILOG)
    p.add_argument("-o", "--output", default="boxmask-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=0, metavar="N",
                   help="override the number of training steps (default: the recipe's 300)")
    p.add_argument("--score-threshold", type=float, default=0.3, metavar="SCORE",
                   help="predictions on the val images below this score are dropped (default: %(default)s)")
    _add_device(p, default=None, what="train and predict on auto, cpu, cuda or cuda:N (default: a GPU if there is "
                                      "one for training, the CPU for the overlays)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the demo recipe, e.g. solver.base_lr=0.02")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("recipes", help="list the packaged recipes, or print one with every key resolved",
                       description="Without NAME: the packaged recipes with method, backbone, dataset and description. "
                                   "With NAME: the recipe over the defaults (and overrides) as YAML, every key "
                                   "`boxmask train` would use.",
                       formatter_class=_FORMATTER, epilog=RECIPES_EPILOG)
    p.add_argument("name", nargs="?", metavar="NAME", help="a packaged recipe name or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="section.key=value overrides applied to NAME")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="train a recipe (packaged name or YAML path) with key=value overrides",
                       description="Train a recipe: a packaged name (see `boxmask recipes`) or a YAML file, with "
                                   "section.key=value overrides. Prints the recipe and output folder at the start, "
                                   "and the metrics and the commands to run next at the end.",
                       formatter_class=_FORMATTER, epilog=TRAIN_EPILOG)
    p.add_argument("config", metavar="RECIPE",
                   help="a YAML recipe path or a packaged recipe name: " + ", ".join(packaged_config_names()))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the recipe, e.g. solver.max_iters=2000 trainer.devices=2")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (sets trainer.output_dir; default: the recipe's)")
    _add_device(p, default=None, what="train on auto, cpu, cuda (the recipe's trainer.devices GPUs) or cuda:N (that "
                                      "one GPU) (default: the recipe's trainer.accelerator, auto = GPUs if any)")
    p.add_argument("--resume", metavar="CKPT", help="checkpoint to resume from, or 'last' for "
                                                   "OUTPUT/checkpoints/last.ckpt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="mask/box AP of a checkpoint on a COCO split (default: the recipe's val split)",
                       description="COCO mask and box AP of a checkpoint, and of its detections with the boxes filled.",
                       formatter_class=_FORMATTER, epilog=EVAL_EPILOG)
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CKPT",
                   help="a checkpoint written by train (e.g. OUTPUT/checkpoints/model_final.ckpt); not with --onnx")
    p.add_argument("--onnx", metavar="MODEL", help="evaluate a model written by `boxmask export` with onnxruntime "
                                                   "(CPU) instead of a checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the checkpoint's recipe, e.g. data.test_min_size=640 model.score_threshold=0.01")
    p.add_argument("--ann-file", metavar="JSON", help="COCO instances JSON with ground-truth masks (default: the "
                                                      "recipe's data.val_json)")
    p.add_argument("--images", metavar="DIR", help="folder the JSON's file_name entries are relative to (default: "
                                                   "the recipe's data.val_images)")
    p.add_argument("--max-dets", type=int, default=None, metavar="N",
                   help="detections per image, in the model's output and in COCOeval's maxDets (default: the "
                        "recipe's trainer.eval_max_dets, 100)")
    p.add_argument("-o", "--output", metavar="DIR", help="folder for results.json and metrics.json (default: "
                                                         "eval/ beside the checkpoints folder; eval-onnx/ beside "
                                                         "an ONNX model)")
    _add_device(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="masks for images ► COCO results JSON (RLE) + overlay PNGs + contact sheet",
                       description="Predict instance masks for image files, folders or lists of paths.",
                       formatter_class=_FORMATTER, epilog=PREDICT_EPILOG)
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CKPT",
                   help="a checkpoint written by train (left out with --onnx)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders, or .txt lists of paths")
    p.add_argument("--onnx", metavar="MODEL", help="predict with a model written by `boxmask export`, run by "
                                                   "onnxruntime (CPU), instead of a checkpoint")
    p.add_argument("-o", "--output", default="predictions", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--score-threshold", type=float, default=0.3, metavar="SCORE",
                   help="detections below this score are dropped (default: %(default)s)")
    p.add_argument("--max-dets", type=int, default=None, metavar="N",
                   help="at most N detections per image (default: the recipe's model.max_detections, 100)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/*.png (one per image)")
    p.add_argument("--contact-sheet", type=int, default=64, metavar="N",
                   help="tile the overlays of the first N images into contact_sheet.png; 0 = no sheet "
                        "(default: %(default)s)")
    _add_device(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="an ONNX model of a checkpoint (post-processing inside) for onnxruntime",
                       description="Export a CondInst-family (BoxInst, CondInst, mixed, SIM) or SOLOv2-family "
                                   "(BoxLevelSet) checkpoint to ONNX: uint8 images in; boxes, scores, labels, masks "
                                   "and num_dets out, with the post-processing and the metadata inside.",
                       formatter_class=_FORMATTER, epilog=EXPORT_EPILOG)
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint written by train")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the checkpoint's recipe baked into the graph, e.g. model.score_threshold=0.3")
    p.add_argument("-o", "--output", metavar="MODEL.onnx", help="output file (default: CKPT with .onnx)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                      help="fixed input size (batch 1); default: the recipe's test size, square")
    size.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--max-dets", type=int, default=None, metavar="K",
                   help="detections per image in the outputs (default: the recipe's model.max_detections, 100)")
    p.add_argument("--binary-masks", action="store_true",
                   help="output 0/1 uint8 masks (prob > mask_threshold) instead of float probabilities")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (default: %(default)s)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("annotate", help="masks for the boxes of a COCO JSON ► the same JSON with RLE segmentations",
                       description="Masks for the boxes of a box-labelled COCO dataset: from a trained checkpoint "
                                   "(inference only), or after fitting the model to the given boxes (--fit).",
                       formatter_class=_FORMATTER, epilog=ANNOTATE_EPILOG)
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CKPT",
                   help="a checkpoint written by train; optional with --fit (then the fit starts from the pretrained "
                        "backbone of --fit-recipe)")
    p.add_argument("--ann-file", required=True, help="COCO instances JSON with the boxes")
    p.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    p.add_argument("--output", "-o", required=True, help="output JSON (resume file beside it: OUTPUT.partial.jsonl)")
    _add_device(p)
    p.add_argument("--no-resume", action="store_true", help="ignore an interrupted run's progress and start over")
    p.add_argument("--location-rank", choices=("score_iou", "score"), default="score_iou",
                   help="how the FCOS location serving a box is chosen: score x IoU of its regressed box with the "
                        "given box (default), or the score alone")
    p.add_argument("--candidates", type=int, default=ANNOTATE_CANDIDATES,
                   help="FCOS locations tried per box; the mask whose x/y projections fit the box best is kept")
    p.add_argument("--fallback-threshold", type=float, default=ANNOTATE_FALLBACK,
                   help="a model mask whose quality estimate (stability x box cover x candidate agreement, 0-1) "
                        "is below this keeps the filled box instead; 0 keeps every non-empty model mask")
    p.add_argument("--binarize", choices=("box-fit", "fixed"), default="box-fit",
                   help="box-fit: each mask at the highest threshold (at most the model's mask_threshold, at least "
                        "--min-threshold) at which it still reaches all four sides of its box; fixed: the model's "
                        "mask_threshold for every box")
    p.add_argument("--min-threshold", type=float, default=ANNOTATE_MIN_THRESHOLD,
                   help="lowest threshold of --binarize box-fit")
    p.add_argument("--box-size", type=float, default=None,
                   help="scale each image so that its median box side is at least this many pixels (small objects "
                        "get a finer mask); 0 = the model's fixed test size. Default: 32 with --fit, else the "
                        "checkpoint's data.box_size")
    p.add_argument("--fit", action="store_true",
                   help="first train on the given boxes (box supervision only, never their masks), starting from "
                        "CHECKPOINT or from the pretrained backbone; resumable, work folder OUTPUT-stem.fit/")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="training steps of --fit (default: 8 epochs from a checkpoint, 10 from the backbone; "
                        "200/300 to 3000 steps)")
    p.add_argument("--fit-image-size", type=int, default=None,
                   help="shorter side of --fit training, ±12.5 %% (default: the model's test size)")
    p.add_argument("--fit-box-size", type=float, default=0.0,
                   help="box-adaptive scale of the --fit training, like --box-size (default 0: the fixed sizes of "
                        "--fit-image-size; 32 matches the drawing scale but costs 5-10x more per step on small "
                        "objects: for a GPU)")
    p.add_argument("--fit-recipe", default=None,
                   help="recipe of --fit without a checkpoint (default: boxinst_effnet-lite0_fpn_fit)")
    p.add_argument("--fit-dir", default=None, help="work folder of --fit (default: OUTPUT-stem.fit/ beside the output)")
    p.set_defaults(func=cmd_annotate)

    for command in sub.choices.values():
        _add_verbose(command)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions reported as one ``boxmask CMD: error: ...`` line (exit status 2) instead of a traceback."""
    from .config import ConfigError
    from .data.coco import DatasetError
    from .engine.annotate import AnnotateError
    from .engine.export import ExportError
    from .engine.fit import FitError
    from .engine.inference import CheckpointError

    return (ConfigError, DatasetError, CheckpointError, AnnotateError, ExportError, FitError, FileNotFoundError,
            UsageError)


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, but KEY=VALUE overrides may also follow an option (``boxmask train RECIPE -o DIR
    a.b=1``): argparse ends a ``nargs="*"`` positional at the first option and would reject the rest. Any other
    leftover argument is the usual argparse error (exit 2)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``boxmask`` console script."""
    from .console import quiet_third_party

    parser = build_parser()
    args = parse_cli(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with quiet_third_party(verbose=args.verbose > 0):
            return args.func(args)
    # evaluated only when an exception is raised: `recipes` and the help never import torch
    except _user_errors() as exc:
        print(f"boxmask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
