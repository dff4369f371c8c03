"""Quality benchmark: train BoxInst with box labels only on a COCO-format dataset's train split,
evaluate mask AP / box AP on its val split, and record the same detections with their boxes filled
as masks (``boxinst_boxfill``), which isolates what the mask head adds.

    python bench/quality.py --dataset ../shared/data/nuts --iterations 600 --image-size 512

Prints one JSON line per method and appends them to ``bench/results/quality.jsonl``.
The dataset folder must hold ``images/`` and ``annotations/instances_{train,val}.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from boxmask.config import load_config
from boxmask.engine.train import train

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short commit of the working tree, ``-dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name() -> str:
    """GPU name, or the CPU model and the number of torch threads."""
    if torch.cuda.is_available():
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="folder with images/ and annotations/instances_{train,val}.json")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=512, help="test shorter side; training uses ±12.5 %%")
    ap.add_argument("--max-size", type=int, default=0, help="longer-side cap (default 1.667 × image size)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-dets", type=int, default=100)
    ap.add_argument("--output", default="runs/quality")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.jsonl"))
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides (key=value)")
    args = ap.parse_args(argv)

    data = Path(args.dataset)
    name = data.resolve().name
    max_size = args.max_size or int(round(args.image_size * 5 / 3))
    out = Path(args.output) / f"{name}_{args.backbone}_{args.image_size}_{args.iterations}"
    overrides = [
        f"data.train_json={data / 'annotations' / 'instances_train.json'}", f"data.train_images={data / 'images'}",
        f"data.val_json={data / 'annotations' / 'instances_val.json'}", f"data.val_images={data / 'images'}",
        f"data.min_sizes={multiscale(args.image_size)}", f"data.max_size={max_size}",
        f"data.test_min_size={args.image_size}", f"data.test_max_size={max_size}", f"data.batch_size={args.batch_size}",
        f"model.backbone={args.backbone}", f"model.max_detections={args.max_dets}", f"trainer.eval_max_dets={args.max_dets}",
        f"solver.max_iters={args.iterations}", f"solver.steps=[{int(args.iterations * 0.8)}]",
        f"solver.warmup_iters={min(100, args.iterations // 10)}",
        f"supervision.pairwise_warmup_iters={max(1, args.iterations // 3)}",
        f"trainer.output_dir={out}", "trainer.progress_bar=false",
    ] + args.overrides
    cfg = load_config("boxinst_effnet-lite0_fpn_nuts", overrides)
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    metrics = summary["metrics"]
    base = {"benchmark": "quality", "track": "end_to_end", "dataset": name, "split": "val",
            "backbone": args.backbone, "image_size": args.image_size, "iterations": args.iterations,
            "batch_size": args.batch_size, "max_dets": args.max_dets, "device": device_name(), "wall_s": round(wall, 1),
            "commit": git_commit(), "date": dt.date.today().isoformat(), "config": str(out / "config.yaml")}
    segm, bbox, boxfill = metrics["model"]["segm"], metrics["model"]["bbox"], metrics["boxfill"]["segm"]
    rows = [
        dict(base, method="boxinst", supervision="box", mask_AP=segm["AP"], mask_AP50=segm["AP50"],
             mask_AP75=segm["AP75"], mask_APs=segm["APs"], mask_APm=segm["APm"], mask_APl=segm["APl"], box_AP=bbox["AP"],
             box_AP50=bbox["AP50"]),
        dict(base, method="boxinst_boxfill", supervision="box", mask_AP=boxfill["AP"], mask_AP50=boxfill["AP50"],
             mask_AP75=boxfill["AP75"], mask_APs=boxfill["APs"], mask_APm=boxfill["APm"], mask_APl=boxfill["APl"],
             box_AP=bbox["AP"], box_AP50=bbox["AP50"]),
    ]
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        for row in rows:
            line = json.dumps(row)
            print(line)
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
