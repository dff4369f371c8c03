"""Paths of the bundled demo sample (DSB2018 nuclei subset, CC0 1.0).

The sample lives in ``boxmask/data/sample/dsb2018`` (built by :mod:`boxmask.data.make_sample`):
40 train and 12 val images of 256x256 or 320x256 pixels, one class (``nucleus``), COCO instances
JSON with RLE masks. It is small enough for a CPU demo and for tests.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["sample_paths"]


def sample_paths() -> dict[str, Path]:
    """Locate the bundled DSB2018 demo sample via ``importlib.resources``.

    Works from a source checkout and from an installed (unpacked) wheel; package-data must
    include ``data/sample/**/*``.

    Returns:
        ``{"image_dir": Path, "train_json": Path, "val_json": Path}`` (absolute paths);
        pass them to :class:`boxmask.data.coco.CocoInstances`.

    Raises:
        FileNotFoundError: the sample files are not installed (e.g. package-data missing) or the
            package is imported from a zip archive, where they have no file-system path.
    """
    root = resources.files("boxmask.data") / "sample" / "dsb2018"
    if not isinstance(root, Path):
        raise FileNotFoundError(
            f"boxmask demo sample is inside an archive ({root}); install boxmask unpacked (pip install)"
        )
    paths = {
        "image_dir": root / "images",
        "train_json": root / "annotations" / "instances_train.json",
        "val_json": root / "annotations" / "instances_val.json",
    }
    for key, p in paths.items():
        if not p.exists():
            raise FileNotFoundError(f"boxmask demo sample: {key} not found at {p} (package data not installed?)")
    return {k: p.resolve() for k, p in paths.items()}
