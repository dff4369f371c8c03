"""COCO instances dataset with validation at load time.

The dataset reads a COCO *instances* JSON (Lin et al., "Microsoft COCO", ECCV 2014; format at
cocodataset.org/#format-data) and an image folder. Every record is checked once in
``CocoInstances.__init__`` so that a broken file fails before training starts, not mid-epoch.

Box-supervised training (BoxInst, methods.md §2) reads only ``bbox``, ``category_id`` and
``iscrowd``; instance masks are decoded only when ``load_masks=True`` (fully supervised reference,
evaluation, tests).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

__all__ = ["DatasetError", "read_image_rgb", "subset_images", "CocoInstances"]

# Progress bar for the image check only above this many images (small sets stay quiet).
_PROGRESS_MIN_IMAGES = 50
# How many offending ids a warning or error lists before "...".
_MAX_LISTED = 5

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_INT_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DatasetError(ValueError):
    """Invalid dataset input: a malformed COCO JSON record or an unreadable/mismatched image.

    The message always names the file (and, for JSON records, the annotation or image id) and
    the problem, so that the user can fix the data without a debugger.
    """


# --------------------------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------------------------


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit values 0..65535 linearly onto 0..255 (round half up); returns uint8."""
    a = np.clip(arr.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _is_16bit_colour_file(img: Image.Image, path: Path) -> bool:
    """True for 16-bit-per-channel PNG/TIFF files that Pillow would truncate to 8 bits.

    Pillow decodes 16-bit grayscale itself (mode ``I;16``) but silently drops the low byte of
    16-bit RGB(A)/LA PNGs, so those go through OpenCV instead.
    """
    if img.mode in _INT_MODES_16:
        return False
    if img.format == "PNG":
        with open(path, "rb") as fh:
            head = fh.read(26)
        # IHDR: 8-byte signature, 4-byte length, b"IHDR", width, height, then bit depth (byte 24).
        return len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24] == 16
    if img.format == "TIFF":
        bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
        if isinstance(bits, (tuple, list)):
            return any(int(b) == 16 for b in bits)
        return bits is not None and int(bits) == 16
    return False


def _read_16bit_opencv(path: Path) -> np.ndarray:
    """Decode a 16-bit (or 8-bit) image with OpenCV; returns RGB uint8 [H,W,3]."""
    import cv2  # imported lazily: only 16-bit colour files need it

    buf = np.fromfile(str(path), dtype=np.uint8)  # np.fromfile + imdecode copes with non-ASCII paths
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DatasetError(f"{path}: OpenCV could not decode this 16-bit image")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels in (1, 2):  # gray or gray+alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif channels in (3, 4):  # OpenCV gives BGR / BGRA; drop alpha, reorder to RGB
        arr = arr[:, :, 2::-1]
    else:
        raise DatasetError(f"{path}: unsupported channel count {channels}")
    if arr.dtype == np.uint16:
        return _scale_16bit(arr)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    raise DatasetError(f"{path}: unsupported pixel type {arr.dtype} (expected 8- or 16-bit integers)")


def _pillow_to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """Convert a loaded Pillow image of any common mode to RGB uint8 [H,W,3]."""
    mode = img.mode
    if mode in _INT_MODES_16:
        gray = _scale_16bit(np.array(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DatasetError(f"{path}: floating-point images (Pillow mode 'F') are not supported")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in img.info):
        img = img.convert("RGBA")  # palette transparency must be expanded before dropping alpha
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, LA, RGBA (alpha dropped, no compositing), CMYK, YCbCr, P
    return np.array(img, dtype=np.uint8)


def read_image_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file to an 8-bit RGB tensor.

    Pillow decodes the file; 16-bit-per-channel colour PNG/TIFF files are decoded with OpenCV so
    that the low byte is not lost. Conversions: grayscale (``L``, ``1``) is replicated to 3
    channels; ``LA``/``RGBA``/``PA`` lose their alpha channel (no compositing on a background);
    palette (``P``), ``CMYK`` and ``YCbCr`` go through Pillow's RGB conversion; 16-bit values
    ``v`` in 0..65535 become ``round(v * 255 / 65535)`` in 0..255. EXIF orientation is ignored,
    as in COCO (``width``/``height`` in the JSON refer to the stored pixel grid).

    Args:
        path: image file (PNG, JPEG, TIFF, BMP, ... anything Pillow or OpenCV reads).

    Returns:
        ``torch.uint8`` tensor ``[3, H, W]``, channels in RGB order, values 0..255.

    Raises:
        DatasetError: the file is missing, truncated, corrupt or of an unsupported pixel type;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            if _is_16bit_colour_file(img, path):
                arr = _read_16bit_opencv(path)
            else:
                img.load()  # forces a full decode so truncation is detected here
                arr = _pillow_to_rgb_array(img, path)
    except DatasetError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise DatasetError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DatasetError(f"{path}: decoded to an unexpected shape {tuple(arr.shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------
# JSON validation helpers
# --------------------------------------------------------------------------------------------


def subset_images(data: dict[str, Any], images: list[dict[str, Any]], note: str | None = None) -> dict[str, Any]:
    """A COCO instances dict restricted to ``images`` and their annotations.

    Args:
        data: a COCO instances dict (``images``, ``annotations``, ``categories``; other top-level fields are kept).
        images: the image records to keep, in the order they should appear (usually a filtered
            ``data["images"]``).
        note: when given, stored as ``info["subset"]`` so the file says how it was made.

    Returns:
        A new dict; ``categories`` and every other field are shared with ``data``, ``annotations`` holds
        only those whose ``image_id`` is the id of a kept image. ``data`` is not modified.
    """
    ids = {img["id"] for img in images}
    out = dict(data, images=list(images), annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    if note is not None:
        out["info"] = dict(data.get("info") or {}, subset=note)
    return out


def _load_json(path: Path) -> Any:
    """``json.load`` with errors that name the file and the position of a syntax error."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: invalid or truncated JSON at line {exc.lineno}, column {exc.colno} "
            f"(char {exc.pos}): {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _listed(ids: list[Any]) -> str:
    head = ", ".join(str(i) for i in ids[:_MAX_LISTED])
    return head + (", ..." if len(ids) > _MAX_LISTED else "")


def _segmentation_state(seg: Any, height: int, width: int, where: str) -> bool:
    """Check a COCO ``segmentation`` field; returns False when the instance has no mask.

    Accepts polygons (list of flat ``[x0,y0,x1,y1,...]`` lists, >= 3 points each) and RLE
    dicts (``size == [height, width]``, ``counts`` as string or list).
    """
    if seg is None or (isinstance(seg, (list, dict)) and len(seg) == 0):
        return False
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if (
                not isinstance(poly, list)
                or len(poly) < 6
                or len(poly) % 2
                or not all(_is_number(v) and math.isfinite(v) for v in poly)
            ):
                raise DatasetError(
                    f"{where}: polygon {k} of 'segmentation' must be a flat list of >= 6 finite numbers "
                    f"(x, y pairs)"
                )
        return True
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise DatasetError(f"{where}: RLE 'segmentation' needs 'counts' and 'size'")
        size = seg["size"]
        try:
            size_ok = [int(s) for s in size] == [height, width]
        except (TypeError, ValueError):
            size_ok = False
        if not size_ok:
            raise DatasetError(
                f"{where}: RLE size {size} differs from the image height/width [{height}, {width}]"
            )
        if not isinstance(seg["counts"], (str, bytes, list)):
            raise DatasetError(f"{where}: RLE 'counts' must be a string or a list of ints")
        return True
    raise DatasetError(f"{where}: 'segmentation' must be a polygon list or an RLE dict, got {type(seg).__name__}")


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances dataset (boxes, labels and optionally masks), validated at load.

    Class names and count come from the JSON ``categories`` sorted by id; contiguous label ``i``
    corresponds to COCO category id ``self.cat_ids[i]`` and name ``self.class_names[i]``.

    Validation in ``__init__`` (all records, once):

    * missing top-level ``images``/``annotations``/``categories``, an image record without
      ``id``/``file_name``/``width``/``height``, an annotation without ``id``/``bbox``/``image_id``/
      ``category_id``, a duplicate id, an unknown ``category_id`` or ``image_id`` -> ``DatasetError``
      naming the annotation (or image) id;
    * an image file that is missing -> ``DatasetError`` naming the path; with ``check_images``
      every image is fully decoded once (tqdm bar above 50 images) and a corrupt file or a decoded
      size different from the JSON ``width``/``height`` -> ``DatasetError`` naming the file;
    * boxes (COCO ``[x, y, w, h]`` pixels -> ``[x1, y1, x2, y2]``): non-finite values, ``w <= 0`` or
      ``h <= 0``, or no overlap with the image -> skipped, with one ``warnings.warn`` giving the
      count and the first annotation ids; a box partly outside is clipped to
      ``[0, W] x [0, H]`` and counted;
    * ``iscrowd=1`` annotations are not training targets (left out, counted); they stay in
      :meth:`gt_coco` for COCOeval;
    * with ``load_masks``, each kept annotation's ``segmentation`` is checked (polygons, or RLE
      whose ``size`` equals the image size); one without segmentation gets an all-zero mask and
      ``has_mask = False``.

    Images without boxes are allowed (empty targets).

    ``self.stats`` holds counts: ``images``, ``images_without_boxes``, ``annotations`` (records in
    the JSON), ``boxes`` (kept training targets), ``crowd``, ``skipped`` (invalid boxes),
    ``clipped``, ``without_mask`` (only counted when ``load_masks``).

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder that ``file_name`` entries are relative to.
        transforms: callable applied to the sample dict (e.g. :mod:`boxmask.data.transforms`).
        load_masks: decode instance masks with pycocotools (never needed for box supervision).
        check_images: decode every image once at load (slow on big sets, catches bad files early).
        verbose: show the progress bar of the image check.

    Raises:
        DatasetError: see the validation list above.

    Each item is a dict:
        ``"image"``: ``tv_tensors.Image`` uint8 ``[3, H, W]`` RGB;
        ``"boxes"``: ``tv_tensors.BoundingBoxes`` float32 ``[N, 4]`` XYXY pixels, ``canvas_size=(H, W)``;
        ``"labels"``: int64 ``[N]`` in ``0..C-1``; ``"ann_ids"``: int64 ``[N]`` COCO annotation ids;
        ``"masks"``: ``tv_tensors.Mask`` uint8 ``[N, H, W]`` in {0, 1} and ``"has_mask"``: bool ``[N]``
        (both only with ``load_masks``); ``"image_id"``: int; ``"orig_size"``: ``(H, W)``.
        ``transforms(sample)`` is applied last when given.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        load_masks: bool = False,
        check_images: bool = True,
        verbose: bool = True,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.load_masks = bool(load_masks)
        src = str(self.ann_file)

        data = _load_json(self.ann_file)
        if not isinstance(data, dict):
            raise DatasetError(f"{src}: top level must be a JSON object, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(
                    f"{src}: missing top-level key '{key}' (a COCO instances file needs "
                    f"'images', 'annotations' and 'categories')"
                )
            if not isinstance(data[key], list):
                raise DatasetError(f"{src}: '{key}' must be a list, got {type(data[key]).__name__}")

        # Categories -> contiguous labels (sorted by COCO id).
        cats: dict[int, str] = {}
        for k, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise DatasetError(f"{src}: category #{k} needs 'id' and 'name'")
            cid = cat["id"]
            if not isinstance(cid, int) or isinstance(cid, bool):
                raise DatasetError(f"{src}: category #{k} has a non-integer id {cid!r}")
            if cid in cats:
                raise DatasetError(f"{src}: duplicate category id {cid}")
            cats[cid] = str(cat["name"])
        if not cats:
            raise DatasetError(f"{src}: 'categories' is empty; at least one class is needed")
        self.cat_ids: list[int] = sorted(cats)
        self.class_names: list[str] = [cats[c] for c in self.cat_ids]
        self.num_classes: int = len(self.cat_ids)
        cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}

        # Images.
        images: dict[int, dict[str, Any]] = {}
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img:
                raise DatasetError(f"{src}: image record #{k} has no 'id'")
            iid = img["id"]
            if not isinstance(iid, int) or isinstance(iid, bool):
                raise DatasetError(f"{src}: image record #{k} has a non-integer id {iid!r}")
            where = f"{src}: image id {iid}"
            for key in ("file_name", "width", "height"):
                if key not in img:
                    raise DatasetError(f"{where}: missing '{key}'")
            if not all(isinstance(img[key], int) and not isinstance(img[key], bool) and img[key] > 0
                       for key in ("width", "height")):
                raise DatasetError(f"{where}: width/height must be positive integers, got "
                                   f"{img['width']!r}/{img['height']!r}")
            if iid in images:
                raise DatasetError(f"{src}: duplicate image id {iid}")
            images[iid] = img
        self.image_ids: list[int] = list(images)  # JSON order

        # Annotations: structure first, then boxes.
        n_ann = len(data["annotations"])
        per_image: dict[int, list[tuple[list[float], int, int, bool]]] = {i: [] for i in images}
        seen_ann: set[Any] = set()
        skipped: Counter[str] = Counter()
        skipped_ids: list[Any] = []
        n_crowd = n_clipped = n_without_mask = 0
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "id" not in ann:
                raise DatasetError(f"{src}: annotation #{k} has no 'id'")
            aid = ann["id"]
            if not isinstance(aid, int) or isinstance(aid, bool):
                raise DatasetError(f"{src}: annotation #{k} has a non-integer id {aid!r}")
            where = f"{src}: annotation id {aid}"
            if aid in seen_ann:
                raise DatasetError(f"{src}: duplicate annotation id {aid}")
            seen_ann.add(aid)
            for key in ("bbox", "image_id", "category_id"):
                if key not in ann:
                    raise DatasetError(f"{where}: missing '{key}'")
            for key in ("image_id", "category_id"):
                if not isinstance(ann[key], int) or isinstance(ann[key], bool):
                    raise DatasetError(f"{where}: '{key}' must be an integer id, got {ann[key]!r}")
            if ann["category_id"] not in cat_to_label:
                raise DatasetError(
                    f"{where}: category_id {ann['category_id']!r} is not in 'categories' "
                    f"(known ids: {_listed(self.cat_ids)})"
                )
            iid = ann["image_id"]
            if iid not in images:
                raise DatasetError(f"{where}: image_id {iid!r} is not in 'images'")
            bbox = ann["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise DatasetError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
            if ann.get("iscrowd", 0):
                n_crowd += 1
                continue
            width, height = images[iid]["width"], images[iid]["height"]
            x, y, w, h = (float(v) for v in bbox)
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                skipped["non-finite"] += 1
                skipped_ids.append(aid)
                continue
            if w <= 0 or h <= 0:
                skipped["zero or negative size"] += 1
                skipped_ids.append(aid)
                continue
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                skipped["outside the image"] += 1
                skipped_ids.append(aid)
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                n_clipped += 1
            has_mask = True
            if self.load_masks:
                has_mask = _segmentation_state(ann.get("segmentation"), height, width, where)
                n_without_mask += not has_mask
            per_image[iid].append(([x1, y1, x2, y2], cat_to_label[ann["category_id"]], int(aid), has_mask))

        if skipped_ids:
            reasons = ", ".join(f"{n} {r}" for r, n in skipped.items())
            warnings.warn(
                f"{src}: skipped {len(skipped_ids)} invalid box(es) ({reasons}); "
                f"annotation ids {_listed(skipped_ids)}",
                stacklevel=2,
            )

        # Image files: existence always, full decode + size check with check_images.
        self._paths: list[Path] = [self.image_dir / str(images[i]["file_name"]) for i in self.image_ids]
        missing = [p for p in self._paths if not p.is_file()]
        if missing:
            raise DatasetError(
                f"{src}: {len(missing)} image file(s) not found, first: {missing[0]}"
                + (f" (also {_listed([str(p) for p in missing[1:]])})" if len(missing) > 1 else "")
            )
        if check_images:
            self._check_images(images, verbose)

        # Per-image targets as compact arrays (cheap to pickle into DataLoader workers).
        self._sizes: list[tuple[int, int]] = []
        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._ann_ids: list[np.ndarray] = []
        self._has_mask: list[np.ndarray] = []
        for iid in self.image_ids:
            recs = per_image[iid]
            self._sizes.append((images[iid]["height"], images[iid]["width"]))
            self._boxes.append(np.asarray([r[0] for r in recs], dtype=np.float32).reshape(-1, 4))
            self._labels.append(np.asarray([r[1] for r in recs], dtype=np.int64))
            self._ann_ids.append(np.asarray([r[2] for r in recs], dtype=np.int64))
            self._has_mask.append(np.asarray([r[3] for r in recs], dtype=bool))

        n_boxes = sum(len(b) for b in self._boxes)
        self.stats: dict[str, int] = {
            "images": len(self.image_ids),
            "images_without_boxes": sum(len(b) == 0 for b in self._boxes),
            "annotations": n_ann,
            "boxes": n_boxes,
            "crowd": n_crowd,
            "skipped": len(skipped_ids),
            "clipped": n_clipped,
            "without_mask": n_without_mask,
        }

        # COCOeval needs 'area' and 'iscrowd'; fill only what is missing (bbox area as fallback).
        for ann in data["annotations"]:
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        self._coco = COCO()
        self._coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self._coco.createIndex()

    def _check_images(self, images: dict[int, dict[str, Any]], verbose: bool) -> None:
        """Decode every image once; raise DatasetError on a corrupt file or a size mismatch."""
        from tqdm.auto import tqdm

        show = verbose and len(self._paths) > _PROGRESS_MIN_IMAGES
        for iid, path in tqdm(
            list(zip(self.image_ids, self._paths)), desc="checking images", unit="img", disable=not show
        ):
            img = read_image_rgb(path)
            self._check_size(img, path, images[iid]["height"], images[iid]["width"], iid)

    def _check_size(self, img: torch.Tensor, path: Path, height: int, width: int, iid: int) -> None:
        if tuple(img.shape[1:]) != (height, width):
            raise DatasetError(
                f"{path}: decoded size {img.shape[2]}x{img.shape[1]} (WxH) differs from the JSON "
                f"width/height {width}x{height} of image id {iid} in {self.ann_file}"
            )

    def __len__(self) -> int:
        """Number of images (including images without boxes)."""
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load image ``index`` (dataset order, see ``self.image_ids``) and its targets.

        Returns the sample dict described in the class docstring, after ``transforms``.

        Raises:
            DatasetError: the image can no longer be decoded or its size differs from the JSON.
            IndexError: ``index`` out of range.
        """
        index = int(index)
        iid = self.image_ids[index]
        path = self._paths[index]
        height, width = self._sizes[index]
        img = read_image_rgb(path)
        self._check_size(img, path, height, width, iid)

        sample: dict[str, Any] = {
            "image": tv_tensors.Image(img),
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(self._boxes[index].copy()), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(self._labels[index].copy()),
            "ann_ids": torch.from_numpy(self._ann_ids[index].copy()),
        }
        if self.load_masks:
            ann_ids = self._ann_ids[index]
            has_mask = self._has_mask[index]
            masks = np.zeros((len(ann_ids), height, width), dtype=np.uint8)
            for k, (aid, ok) in enumerate(zip(ann_ids.tolist(), has_mask.tolist())):
                if ok:
                    masks[k] = self._coco.annToMask(self._coco.anns[aid])
            sample["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
            sample["has_mask"] = torch.from_numpy(has_mask.copy())
        sample["image_id"] = int(iid)
        sample["orig_size"] = (height, width)
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def gt_coco(self) -> COCO:
        """The pycocotools ``COCO`` object of the whole JSON (crowd and skipped boxes included).

        Use it as the ground truth of ``COCOeval`` (bbox and segm). Missing ``iscrowd`` was set to
        0 and missing ``area`` to the bbox area ``w * h`` (pixels²); nothing else is changed.
        """
        return self._coco

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.ann_file}, images={self.stats['images']}, "
            f"boxes={self.stats['boxes']}, classes={self.num_classes})"
        )
