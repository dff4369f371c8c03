"""Training and test transforms (``torchvision.transforms.v2`` only).

The transforms act on the sample dict of :class:`boxmask.data.coco.CocoInstances`: the
``tv_tensors.Image``, ``tv_tensors.BoundingBoxes`` and ``tv_tensors.Mask`` entries move together;
plain tensors (``labels``, ``ann_ids``, ``has_mask``) and Python values pass through, except that
:class:`~torchvision.transforms.v2.SanitizeBoundingBoxes` drops the rows of removed boxes.

Recipe (methods.md §1.8, AdelaiDet/detectron2 defaults for CondInst/BoxInst): multi-scale
training with the shorter side drawn from ``{640, 672, ..., 800}``, longer side at most 1333,
horizontal flip 0.5; test at shorter side 800, max 1333. Padding to a multiple of 32 is done in
:func:`boxmask.data.collate.collate_batch`, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["build_train_transforms", "build_test_transforms", "sanitize_labels_getter"]

# Per-instance entries that must be filtered together with the boxes.
_PER_INSTANCE_KEYS = ("labels", "ann_ids", "has_mask")


def sanitize_labels_getter(sample: Any) -> tuple[torch.Tensor, ...]:
    """Per-instance tensors that ``SanitizeBoundingBoxes`` must filter along with the boxes.

    Args:
        sample: the sample dict (or an ``(image, target_dict)`` pair).

    Returns:
        The tensors under ``"labels"``, ``"ann_ids"`` and ``"has_mask"`` that are present, each
        of shape ``[N]`` (``tv_tensors.Mask`` entries are filtered by torchvision itself).

    Raises:
        TypeError: ``sample`` is neither a dict nor a pair whose second element is a dict.
    """
    if isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict):
        sample = sample[1]
    if not isinstance(sample, dict):
        raise TypeError(f"expected a sample dict, got {type(sample).__name__}")
    return tuple(sample[k] for k in _PER_INSTANCE_KEYS if k in sample)


def build_train_transforms(min_sizes: Sequence[int], max_size: int, flip_prob: float = 0.5) -> v2.Compose:
    """Multi-scale resize + horizontal flip for training (methods.md §1.8).

    Pipeline: ``RandomShortestSize(min_sizes, max_size)`` (shorter side = a random choice of
    ``min_sizes`` pixels, scaled down so that the longer side is <= ``max_size``; antialiased) ->
    ``RandomHorizontalFlip(flip_prob)`` -> ``ClampBoundingBoxes`` -> ``SanitizeBoundingBoxes``
    (boxes narrower or lower than 1 px after resizing are dropped together with their
    ``labels``, ``ann_ids``, ``has_mask`` and masks).

    Args:
        min_sizes: candidate shorter-side lengths in pixels, e.g. ``(640, 672, 704, 736, 768, 800)``.
        max_size: upper bound of the longer side in pixels, e.g. 1333.
        flip_prob: probability of a horizontal flip, in [0, 1].

    Returns:
        A ``v2.Compose`` taking and returning the sample dict.

    Raises:
        ValueError: empty ``min_sizes``, a non-positive size, or ``flip_prob`` outside [0, 1].
    """
    sizes = [int(s) for s in min_sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"min_sizes must be a non-empty list of positive ints, got {list(min_sizes)}")
    if int(max_size) <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    if not 0.0 <= float(flip_prob) <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    return v2.Compose(
        [
            v2.RandomShortestSize(min_size=sizes, max_size=int(max_size), antialias=True),
            v2.RandomHorizontalFlip(p=float(flip_prob)),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=sanitize_labels_getter),
        ]
    )


def build_test_transforms(min_size: int, max_size: int) -> v2.Resize:
    """Single-scale resize for evaluation/inference (methods.md §1.8: 800/1333).

    The shorter side becomes ``min_size`` pixels unless the longer side would then exceed
    ``max_size``; in that case the longer side becomes ``max_size`` and the shorter side
    ``int(max_size * min_size / long_side_after_first_scale)``. (torchvision >= 0.19
    ``Resize(size=int, max_size=...)`` semantics; sizes are truncated with ``int``.) Boxes and masks
    are resized with the image; no box is removed.

    Args:
        min_size: target shorter side in pixels (e.g. 800).
        max_size: upper bound of the longer side in pixels (e.g. 1333); must be > ``min_size``.

    Returns:
        A ``v2.Resize`` (antialiased) taking and returning the sample dict.

    Raises:
        ValueError: non-positive sizes or ``max_size <= min_size`` (torchvision requires the bound
            to be strictly larger than the requested shorter side).
    """
    min_size, max_size = int(min_size), int(max_size)
    if min_size <= 0 or max_size <= 0:
        raise ValueError(f"min_size and max_size must be positive, got {min_size}, {max_size}")
    if max_size <= min_size:
        raise ValueError(f"max_size ({max_size}) must be > min_size ({min_size})")
    return v2.Resize(size=min_size, max_size=max_size, antialias=True)
