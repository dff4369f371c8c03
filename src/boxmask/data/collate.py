"""Batch collation: zero-pad images to a common size divisible by the largest stride.

FCOS/CondInst (methods.md §1.8) pad every batch to a multiple of 32 (the P5 stride; P6/P7 are
obtained by stride-2 convolutions) at the bottom and right, so that pixel coordinates of boxes
are unchanged. BoxInst (methods.md §2.2) pads the un-normalised image with **0**, and the image
validity mask is derived from ``image_sizes``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Batch", "collate_batch", "make_collate"]


def _plain(t: Any) -> torch.Tensor:
    """A tv_tensor (or tensor-like) as a plain ``torch.Tensor`` (shares memory)."""
    t = torch.as_tensor(t)
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


@dataclass
class Batch:
    """A padded batch of images with per-image targets.

    Attributes:
        images: uint8 ``[B, 3, Hp, Wp]`` RGB, 0..255, zero-padded at the bottom/right; ``Hp`` and
            ``Wp`` are multiples of the size divisibility (32 by default).
        image_sizes: per image ``(h, w)`` in pixels after resizing, before padding.
        targets: per image a dict with ``"boxes"`` float32 ``[N, 4]`` XYXY in resized pixels,
            ``"labels"`` int64 ``[N]`` in ``0..C-1``, ``"ann_ids"`` int64 ``[N]``, and, only when the
            sample had masks, ``"masks"`` bool ``[N, h, w]`` and ``"has_mask"`` bool ``[N]``.
        image_ids: COCO image ids.
        orig_sizes: per image ``(H, W)`` in pixels before any transform (for mapping predictions
            back to the original image).
    """

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[dict[str, torch.Tensor]]
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        """Number of images B."""
        return len(self.image_sizes)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> Batch:
        """Copy of the batch with all tensors on ``device``.

        Args:
            device: target device.
            non_blocking: asynchronous copy; default True for CUDA targets (pair it with
                ``pin_memory``), False otherwise (a non-blocking copy to CPU can be read early).

        Returns:
            A new :class:`Batch`; the lists of sizes and ids are shared.
        """
        device = torch.device(device)
        if non_blocking is None:
            non_blocking = device.type == "cuda"
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            image_sizes=self.image_sizes,
            targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
            image_ids=self.image_ids,
            orig_sizes=self.orig_sizes,
        )

    def pin_memory(self) -> Batch:
        """Copy in page-locked memory; called by ``DataLoader(pin_memory=True)``."""
        return Batch(
            images=self.images.pin_memory(),
            image_sizes=self.image_sizes,
            targets=[{k: v.pin_memory() for k, v in t.items()} for t in self.targets],
            image_ids=self.image_ids,
            orig_sizes=self.orig_sizes,
        )


def collate_batch(samples: list[dict[str, Any]], size_divisibility: int = 32) -> Batch:
    """Stack samples of :class:`~boxmask.data.coco.CocoInstances` (after transforms) into a Batch.

    Each image ``[3, h, w]`` is copied into the top-left corner of a zero tensor
    ``[3, Hp, Wp]`` with ``Hp = ceil(max h / d) * d``, ``Wp = ceil(max w / d) * d``
    (``d = size_divisibility``). tv_tensors become plain tensors; masks become bool.

    Args:
        samples: list of sample dicts with ``"image"`` uint8 ``[3, h, w]``, ``"boxes"`` ``[N, 4]``
            XYXY pixels, ``"labels"`` ``[N]``, ``"ann_ids"`` ``[N]`` (optional, empty if absent),
            optional ``"masks"`` ``[N, h, w]`` + ``"has_mask"`` ``[N]``, ``"image_id"`` and
            ``"orig_size"`` ``(H, W)`` (defaults to ``(h, w)``).
        size_divisibility: ``d`` >= 1 in pixels (32 = P5 stride of FCOS/CondInst).

    Returns:
        :class:`Batch`.

    Raises:
        ValueError: empty ``samples``, ``size_divisibility < 1``, an image that is not uint8
            ``[3, h, w]``, or per-instance tensors whose lengths or mask sizes do not match;
            the message names the image id.
    """
    if not samples:
        raise ValueError("collate_batch: empty list of samples")
    d = int(size_divisibility)
    if d < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")

    images = []
    for s in samples:
        img = _plain(s["image"])
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(
                f"image id {s.get('image_id')}: expected a uint8 [3,h,w] image, got {img.dtype} {tuple(img.shape)}"
            )
        images.append(img)
    hp = math.ceil(max(i.shape[1] for i in images) / d) * d
    wp = math.ceil(max(i.shape[2] for i in images) / d) * d
    batch = torch.zeros((len(images), 3, hp, wp), dtype=torch.uint8)
    for b, img in enumerate(images):
        batch[b, :, : img.shape[1], : img.shape[2]].copy_(img)

    targets = []
    for s, img in zip(samples, images):
        h, w = int(img.shape[1]), int(img.shape[2])
        boxes = _plain(s["boxes"]).to(torch.float32).reshape(-1, 4)
        n = boxes.shape[0]
        t = {
            "boxes": boxes,
            "labels": _plain(s["labels"]).to(torch.int64).reshape(-1),
            "ann_ids": _plain(s["ann_ids"]).to(torch.int64).reshape(-1)
            if "ann_ids" in s
            else torch.full((n,), -1, dtype=torch.int64),
        }
        if "masks" in s:
            masks = _plain(s["masks"]).to(torch.bool)
            if masks.shape != (n, h, w):
                raise ValueError(
                    f"image id {s.get('image_id')}: masks of shape {tuple(masks.shape)}, expected {(n, h, w)}"
                )
            t["masks"] = masks
            t["has_mask"] = (
                _plain(s["has_mask"]).to(torch.bool).reshape(-1)
                if "has_mask" in s
                else torch.ones(n, dtype=torch.bool)
            )
        for k, v in t.items():
            if v.shape[0] != n:
                raise ValueError(f"image id {s.get('image_id')}: '{k}' has {v.shape[0]} rows but there are {n} boxes")
        targets.append(t)

    return Batch(
        images=batch,
        image_sizes=[(int(i.shape[1]), int(i.shape[2])) for i in images],
        targets=targets,
        image_ids=[int(s.get("image_id", -1)) for s in samples],
        orig_sizes=[
            tuple(int(v) for v in s["orig_size"]) if "orig_size" in s else (int(i.shape[1]), int(i.shape[2]))
            for s, i in zip(samples, images)
        ],
    )


def make_collate(size_divisibility: int = 32) -> Callable[[list[dict[str, Any]]], Batch]:
    """``collate_fn`` for ``torch.utils.data.DataLoader``: a picklable ``functools.partial`` of
    :func:`collate_batch` (works with worker processes started by ``spawn``).

    Args:
        size_divisibility: see :func:`collate_batch`.

    Raises:
        ValueError: ``size_divisibility < 1``.
    """
    if int(size_divisibility) < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    return functools.partial(collate_batch, size_divisibility=int(size_divisibility))
