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

__all__ = ["BoxAdaptiveResize", "build_photometric", "build_train_transforms", "build_test_transforms",
           "sanitize_labels_getter"]

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


def build_photometric(color_jitter: Sequence[float] | None = None, grayscale_prob: float = 0.0,
                      invert_prob: float = 0.0) -> list[v2.Transform]:
    """Photometric augmentation for robustness to unseen imaging (stains, channels, polarity).

    Pipeline (each step only when enabled): ``RandomInvert(invert_prob)`` (uint8 ``255 - x``: bright
    objects on a dark background become dark on bright, as between fluorescence and brightfield
    microscopy) -> ``ColorJitter(brightness, contrast, saturation, hue)`` (factors drawn uniformly from
    ``[max(0, 1 - v), 1 + v]``, hue shift from ``[-hue, hue]`` of a full turn: stain-like colour shifts)
    -> ``RandomGrayscale(grayscale_prob)``. They act on the image only; boxes and masks pass through.
    The BoxInst pairwise loss then compares LAB colours of the augmented image, which is what the
    model sees.

    Args:
        color_jitter: ``[brightness, contrast, saturation, hue]``, the first three >= 0 and hue in
            ``[0, 0.5]``; None or all zeros = no jitter.
        grayscale_prob, invert_prob: probabilities in [0, 1].

    Returns:
        The list of enabled ``v2`` transforms (empty when everything is off).

    Raises:
        ValueError: a jitter list not of length 4, a negative strength, hue > 0.5, or a probability
            outside [0, 1].
    """
    jitter = [0.0] * 4 if color_jitter is None else [float(v) for v in color_jitter]
    if len(jitter) != 4 or any(v < 0 for v in jitter) or jitter[3] > 0.5:
        raise ValueError(f"color_jitter must be [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, got {jitter}")
    for name, p in (("grayscale_prob", grayscale_prob), ("invert_prob", invert_prob)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    out: list[v2.Transform] = []
    if invert_prob > 0:
        out.append(v2.RandomInvert(p=float(invert_prob)))
    if any(v > 0 for v in jitter):
        b, c, s, h = jitter
        out.append(v2.ColorJitter(brightness=b or None, contrast=c or None, saturation=s or None, hue=h or None))
    if grayscale_prob > 0:
        out.append(v2.RandomGrayscale(p=float(grayscale_prob)))
    return out


class BoxAdaptiveResize:
    """Resize an image so that its boxes are large enough for the stride-4 mask head.

    Small objects (nuclei of 5–15 px) get only 1–4 mask cells at the fixed test size, and large images
    are even scaled *down* by it. When the boxes are known (box-supervised training, ``annotate``), each
    image can instead be scaled by its own boxes: scale ``s = max(s_fixed, box_size / m)`` where
    ``s_fixed = min(min_size / short_side, max_size / long_side)`` is the fixed-size rule of
    :func:`build_test_transforms` and ``m`` the median of ``sqrt(w * h)`` over the sample's boxes (input
    pixels); then ``s`` is capped so that the longer side is at most ``max_long_side``, but never below
    ``s_fixed`` (the cap bounds the upscaling only). With ``jitter``, ``s`` is multiplied by a factor drawn uniformly from
    ``[1 - jitter, 1 + jitter]`` (torch's global RNG, so seeded training stays reproducible).

    Call it on the sample dict of :class:`~boxmask.data.coco.CocoInstances` (``image``, ``boxes``, masks
    ...): everything is resized with ``v2.Resize`` (antialiased) to ``(round(h s), round(w s))``.

    Args:
        min_size, max_size: the fixed rule's shorter side and longer-side bound, pixels.
        box_size: target median box side in pixels (> 0).
        max_long_side: bound of the longer side after scaling, pixels.
        jitter: relative scale jitter in ``[0, 1)``; 0 = deterministic (inference).

    Raises:
        ValueError: a non-positive size, ``max_size <= min_size`` or ``jitter`` outside ``[0, 1)``.

    Source: ours (the per-image counterpart of the test-time upscaling in the small-object literature).
    """

    def __init__(self, min_size: int, max_size: int, box_size: float, max_long_side: int, jitter: float = 0.0):
        if min(min_size, max_size, box_size, max_long_side) <= 0 or max_size <= min_size:
            raise ValueError(f"BoxAdaptiveResize: sizes must be positive with max_size > min_size, got min_size="
                             f"{min_size}, max_size={max_size}, box_size={box_size}, max_long_side={max_long_side}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"BoxAdaptiveResize: jitter must be in [0, 1), got {jitter}")
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.box_size, self.max_long_side, self.jitter = float(box_size), int(max_long_side), float(jitter)

    def scale(self, height: int, width: int, boxes: torch.Tensor) -> float:
        """The scale factor for an ``height x width`` image with float ``[N,4]`` xyxy ``boxes`` (pixels)."""
        short, long = min(height, width), max(height, width)
        fixed = min(self.min_size / short, self.max_size / long)
        s = fixed
        if boxes.numel():
            wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).float()
            side = float((wh[:, 0] * wh[:, 1]).sqrt().median())
            if side > 0:
                s = max(fixed, self.box_size / side)
        s = max(min(s, self.max_long_side / long), fixed)
        if self.jitter:
            s *= 1.0 + self.jitter * (2.0 * float(torch.rand(())) - 1.0)
        return s

    def __call__(self, sample: Any) -> Any:
        from torchvision import tv_tensors

        image = sample["image"]
        h, w = image.shape[-2:]
        boxes = sample.get("boxes")
        if boxes is None:
            boxes = torch.zeros(0, 4)
        elif isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
            boxes = v2.functional.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
        s = self.scale(h, w, boxes.as_subclass(torch.Tensor))
        size = [max(1, round(h * s)), max(1, round(w * s))]
        return v2.Resize(size=size, antialias=True)(sample)

    def __repr__(self) -> str:
        return (f"BoxAdaptiveResize(min_size={self.min_size}, max_size={self.max_size}, box_size={self.box_size}, "
                f"max_long_side={self.max_long_side}, jitter={self.jitter})")


def build_train_transforms(min_sizes: Sequence[int], max_size: int, flip_prob: float = 0.5,
                           color_jitter: Sequence[float] | None = None, grayscale_prob: float = 0.0,
                           invert_prob: float = 0.0, box_size: float = 0.0, box_size_max: int = 1600) -> v2.Compose:
    """Multi-scale resize + horizontal flip (+ optional photometric augmentation) for training (methods.md §1.8).

    Pipeline: ``RandomShortestSize(min_sizes, max_size)`` (shorter side = a random choice of
    ``min_sizes`` pixels, scaled down so that the longer side is <= ``max_size``; antialiased) -- or,
    with ``box_size > 0``, :class:`BoxAdaptiveResize` (fixed rule at the middle of ``min_sizes``, ±12.5 %
    jitter) -- -> ``RandomHorizontalFlip(flip_prob)`` -> :func:`build_photometric` (only what is enabled)
    -> ``ClampBoundingBoxes`` -> ``SanitizeBoundingBoxes`` (boxes narrower or lower than 1 px after
    resizing are dropped together with their ``labels``, ``ann_ids``, ``has_mask`` and masks).

    Args:
        min_sizes: candidate shorter-side lengths in pixels, e.g. ``(640, 672, 704, 736, 768, 800)``.
        max_size: upper bound of the longer side in pixels, e.g. 1333.
        flip_prob: probability of a horizontal flip, in [0, 1].
        color_jitter, grayscale_prob, invert_prob: photometric augmentation (:func:`build_photometric`).
        box_size, box_size_max: box-adaptive scale (:class:`BoxAdaptiveResize`); 0 = off.

    Returns:
        A ``v2.Compose`` taking and returning the sample dict.

    Raises:
        ValueError: empty ``min_sizes``, a non-positive size, ``flip_prob`` outside [0, 1], or bad
            photometric settings.
    """
    sizes = [int(s) for s in min_sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"min_sizes must be a non-empty list of positive ints, got {list(min_sizes)}")
    if int(max_size) <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    if not 0.0 <= float(flip_prob) <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if box_size > 0:
        mid = sorted(sizes)[len(sizes) // 2]
        resize = BoxAdaptiveResize(mid, max(int(max_size), mid + 1), box_size, box_size_max, jitter=0.125)
    else:
        resize = v2.RandomShortestSize(min_size=sizes, max_size=int(max_size), antialias=True)
    return v2.Compose(
        [
            resize,
            v2.RandomHorizontalFlip(p=float(flip_prob)),
            *build_photometric(color_jitter, grayscale_prob, invert_prob),
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
