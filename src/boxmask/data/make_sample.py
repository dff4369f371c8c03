"""Build the bundled demo sample ``boxmask/data/sample/dsb2018`` from the full DSB2018 folder.

Usage::

    python -m boxmask.data.make_sample /path/to/dsb2018 [--out DIR]

The input folder is the COCO conversion of the Kaggle Data Science Bowl 2018 stage-1 nuclei
(BBBC038v1, CC0 1.0) with ``images/``, ``annotations/instances_{train,val}.json`` and
``README.md``. The subset is deterministic (no randomness): from each split keep images of
256x256 or 320x256 pixels with 5..60 nuclei, classify each as *stained* (bright background,
median grey level > 100) or *fluorescent* (dark background), order each kind by file name
(the names are content hashes, so this is an arbitrary but fixed order) and take the first
``--train-stained``/``--train-fluo`` (train) and ``--val-stained``/``--val-fluo`` (val) images.
Image files are copied byte for byte; the JSON keeps every COCO field (ids, ``info``,
``licenses``, ``categories``, RLE ``segmentation``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from boxmask.data.coco import subset_images

SIZES = {(256, 256), (320, 256)}  # (width, height)
MIN_INSTANCES, MAX_INSTANCES = 5, 60
STAINED_MEDIAN_GREY = 100


def image_kind(path: Path) -> str:
    """``"stained"`` (bright background, median grey > 100 of 255) or ``"fluorescent"``."""
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"))
    return "stained" if float(np.median(grey)) > STAINED_MEDIAN_GREY else "fluorescent"


def select(data: dict[str, Any], image_dir: Path, n_stained: int, n_fluo: int) -> list[dict[str, Any]]:
    """Pick ``n_stained`` stained and ``n_fluo`` fluorescent image records (see module docstring).

    Raises:
        SystemExit: fewer candidates of a kind than requested.
    """
    counts: dict[int, int] = {}
    for ann in data["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    by_kind: dict[str, list[dict[str, Any]]] = {"stained": [], "fluorescent": []}
    for img in sorted(data["images"], key=lambda r: r["file_name"]):
        if (img["width"], img["height"]) not in SIZES:
            continue
        if not MIN_INSTANCES <= counts.get(img["id"], 0) <= MAX_INSTANCES:
            continue
        by_kind[image_kind(image_dir / img["file_name"])].append(img)
    chosen = []
    for kind, n in (("stained", n_stained), ("fluorescent", n_fluo)):
        if len(by_kind[kind]) < n:
            raise SystemExit(f"only {len(by_kind[kind])} {kind} candidates, {n} requested")
        chosen += by_kind[kind][:n]
    return sorted(chosen, key=lambda r: r["id"])


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    default_out = Path(__file__).resolve().parent / "sample" / "dsb2018"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dsb2018", type=Path, help="folder with images/, annotations/ and README.md")
    p.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--train-stained", type=int, default=12)
    p.add_argument("--train-fluo", type=int, default=28)
    p.add_argument("--val-stained", type=int, default=4)
    p.add_argument("--val-fluo", type=int, default=8)
    args = p.parse_args(argv)

    src: Path = args.dsb2018
    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary = []
    for split, n_st, n_fl in (("train", args.train_stained, args.train_fluo), ("val", args.val_stained, args.val_fluo)):
        data = json.loads((src / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
        images = select(data, src / "images", n_st, n_fl)
        note = (
            f"boxmask demo sample: {len(images)} of {len(data['images'])} {split} images "
            f"({n_st} stained + {n_fl} fluorescent; 256x256 or 320x256; {MIN_INSTANCES}-{MAX_INSTANCES} nuclei), "
            f"made by boxmask.data.make_sample"
        )
        sub = subset_images(data, images, note)
        for img in images:
            shutil.copyfile(src / "images" / img["file_name"], out / "images" / img["file_name"])
        with open(out / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as fh:
            json.dump(sub, fh, separators=(",", ":"))
            fh.write("\n")
        summary.append(f"- {split}: {len(images)} images ({n_st} stained, {n_fl} fluorescent), "
                       f"{len(sub['annotations'])} nucleus instances")
        print(summary[-1])

    original = (src / "README.md").read_text(encoding="utf-8").rstrip()
    readme = "\n".join(
        [
            "# boxmask demo sample: DSB2018 nuclei subset (CC0 1.0)",
            "",
            "A small, deterministic subset of the DSB2018 COCO conversion, bundled so that",
            "`boxmask demo` and the tests run offline on a CPU in seconds.",
            "",
            *summary,
            "- Selection: images of 256x256 or 320x256 px with 5-60 nuclei; stained (bright background)",
            "  and fluorescent (dark background) kinds mixed; first images of each kind by file name.",
            "- Files: `images/` (copied byte for byte), `annotations/instances_{train,val}.json`",
            "  (COCO instances, segmentation = compressed RLE; original image and annotation ids).",
            "- Rebuild: `python -m boxmask.data.make_sample /path/to/dsb2018`.",
            "- Licence: CC0 1.0 (public domain), as for the full dataset (see below).",
            "",
            "## Source dataset README (copied verbatim)",
            "",
            original,
            "",
        ]
    )
    (out / "README.md").write_text(readme, encoding="utf-8")


if __name__ == "__main__":
    main()
