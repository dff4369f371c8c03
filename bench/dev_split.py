"""Make a dev dataset from a dataset's *train* split, for choosing settings without touching val.

The dev dataset is a folder in ``bench/quality.py``'s layout: ``images`` (a symlink to the source images),
``annotations/instances_train.json`` (the train images not held out) and ``annotations/instances_val.json``
(the held-out train images). The held-out images are the last ``--holdout`` train images in file-name order
(natural order: ``2.jpg`` before ``10.jpg``), or the file names given with ``--files``.

    python bench/dev_split.py --dataset ../shared/data/nuts --holdout 4 --output runs/dev/nutsdev
    python bench/quality.py --dataset runs/dev/nutsdev --iterations 300 --image-size 256 --output runs/dev \\
        --tag iw1.0 --methods box2mask_t box2mask_t_boxfill box2mask_t_annotate -- supervision.box2mask_t.img_weight=1.0

Raises ``SystemExit`` when the train JSON is missing, a ``--files`` name is not a train image, or the split
leaves either side empty.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from boxmask.data.coco import subset_images
from boxmask.io import atomic_write_json


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def split(train: dict, held_out: set[str]) -> tuple[dict, dict]:
    """(dev-train, dev-val) COCO dicts: the images whose ``file_name`` is in ``held_out`` go to dev-val."""
    dev_train = subset_images(train, [im for im in train["images"] if im["file_name"] not in held_out])
    dev_val = subset_images(train, [im for im in train["images"] if im["file_name"] in held_out])
    return dev_train, dev_val


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="folder with images/ and annotations/instances_train.json")
    ap.add_argument("--holdout", type=int, default=4, help="hold out the last N train images (natural name order)")
    ap.add_argument("--files", nargs="*", default=None, help="hold out these train file names instead")
    ap.add_argument("--output", required=True, help="dev dataset folder to write")
    args = ap.parse_args(argv)

    src = Path(args.dataset).resolve()
    train_json = src / "annotations" / "instances_train.json"
    if not train_json.is_file():
        raise SystemExit(f"dev_split: {train_json} not found")
    train = json.loads(train_json.read_text())
    names = sorted((im["file_name"] for im in train["images"]), key=_natural)
    if args.files:
        unknown = sorted(set(args.files) - set(names))
        if unknown:
            raise SystemExit(f"dev_split: not train images of {train_json}: {unknown}")
        held_out = set(args.files)
    else:
        held_out = set(names[len(names) - args.holdout:]) if args.holdout > 0 else set()
    dev_train, dev_val = split(train, held_out)
    if not dev_train["images"] or not dev_val["images"]:
        raise SystemExit(f"dev_split: {len(dev_train['images'])} dev-train and {len(dev_val['images'])} dev-val "
                         "images; both sides need at least one")
    out = Path(args.output)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(src / "images", target_is_directory=True)
    for name, data in (("train", dev_train), ("val", dev_val)):
        atomic_write_json(out / "annotations" / f"instances_{name}.json", data)
    print(json.dumps({"dev": str(out), "train_images": len(dev_train["images"]), "val_images": len(dev_val["images"]),
                      "val_files": sorted(held_out, key=_natural)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
