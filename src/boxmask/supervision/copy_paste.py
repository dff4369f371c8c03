"""SIM online weakly-supervised copy-paste: paste-mask memory bank, instance selection, pasting.

Li et al., "SIM: Semantic-aware Instance Mask Generation for Box-Supervised Instance Segmentation",
CVPR 2023, Sec. 3.4; details follow the released code as summarised in methods.md §5.6 (defaults
table §5.8). The teacher's binarised masks of the current batch (``M_I > 0.7`` ∧ full-resolution box
mask, at the padded input resolution) are stored with their un-normalised image in a FIFO bank
(:class:`MemoryBank` of :class:`PasteEntry`). Once the bank is full, each image of an iteration may
receive 1-3 instances of a random entry (:func:`select_instances`, probability ∝ score³), pasted
without blending (:func:`paste_instances`); the occluded parts of existing objects are removed and
their boxes recomputed, fully occluded objects are dropped, pasted objects are flagged for
``L_paste``.

Everything here is plain tensor code without autograd (masks are already binarised), meant for the
CPU data path; all coordinates are pixels of the padded input image, boxes are ``(x1, y1, x2, y2)``
with the exclusive pixel convention of :func:`box_masks_full_res` (a box ``[x1, x2)`` covers pixel
columns ``floor(x1) .. ceil(x2) - 1``; a tight box of a mask has ``x2 = last column + 1``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops import tight_boxes

__all__ = [
    "MemoryBank",
    "PasteEntry",
    "PasteResult",
    "box_masks_full_res",
    "paste_entry",
    "paste_instances",
    "paste_masks_and_scores",
    "select_instances",
]

# floor(fraction * N) is computed in float64; a tiny slack keeps e.g. 0.29 * 100 = 28.999... at 29
_FLOOR_SLACK = 1e-9


def _is_integer_dtype(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_labels(labels: Tensor, n: int, who: str, name: str = "labels") -> Tensor:
    """``[n]`` integer labels -> int64; ValueError otherwise."""
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{who}: {name} must be [{n}], got {tuple(labels.shape)}")
    if not _is_integer_dtype(labels):
        raise ValueError(f"{who}: {name} must have an integer dtype, got {labels.dtype}")
    return labels.to(torch.int64)


def _check_image(image: Tensor, who: str, name: str = "image") -> tuple[int, int]:
    """``[3, H, W]`` uint8 -> ``(H, W)``; ValueError otherwise."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{who}: {name} must be [3, H, W], got {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        raise ValueError(f"{who}: {name} must be uint8 (un-normalised pixels), got {image.dtype}")
    return int(image.shape[1]), int(image.shape[2])


def _check_masks(masks: Tensor, hw: tuple[int, int], who: str, name: str = "masks") -> int:
    """``[N, H, W]`` bool matching ``hw`` -> ``N``; ValueError otherwise."""
    if masks.dim() != 3 or tuple(masks.shape[1:]) != tuple(hw):
        raise ValueError(f"{who}: {name} must be [N, {hw[0]}, {hw[1]}], got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"{who}: {name} must be bool, got {masks.dtype}")
    return int(masks.shape[0])


@dataclass
class PasteEntry:
    """One memory-bank entry: an image and the binary paste masks of its instances (methods.md §5.6).

    Attributes:
        image: uint8 ``[3, H, W]``, the padded, **un-normalised** input image (pixel values 0-255).
        masks: bool ``[N, H, W]``, the paste masks at the same (input) resolution, pixels.
        labels: int64 ``[N]`` class indices (any integer dtype is accepted and cast to int64).
        scores: float32 ``[N]`` mask scores in ``[0, 1]`` = mean teacher probability inside each paste
            mask (any float dtype is accepted and cast to float32).

    The tensors may live on any (common) device; :meth:`MemoryBank.push` stores a CPU copy. ``N = 0``
    is allowed (nothing to paste). The per-image boxes of the paper's entry are not stored: a pasted
    object's box is the tight box of its mask (:func:`paste_instances`).

    Raises:
        ValueError: on a wrong shape or dtype, or tensors on different devices.
    """

    image: Tensor
    masks: Tensor
    labels: Tensor
    scores: Tensor

    def __post_init__(self) -> None:
        hw = _check_image(self.image, "PasteEntry")
        n = _check_masks(self.masks, hw, "PasteEntry")
        self.labels = _check_labels(self.labels, n, "PasteEntry")
        if self.scores.dim() != 1 or self.scores.shape[0] != n:
            raise ValueError(f"PasteEntry: scores must be [{n}], got {tuple(self.scores.shape)}")
        if not self.scores.is_floating_point():
            raise ValueError(f"PasteEntry: scores must have a float dtype, got {self.scores.dtype}")
        self.scores = self.scores.to(torch.float32)
        devices = {t.device for t in (self.image, self.masks, self.labels, self.scores)}
        if len(devices) != 1:
            raise ValueError(f"PasteEntry: all tensors must be on one device, got {sorted(map(str, devices))}")

    @property
    def num_instances(self) -> int:
        """``N``, the number of stored instances."""
        return int(self.masks.shape[0])

    @property
    def nbytes(self) -> int:
        """Tensor payload in bytes: ``3·H·W + N·H·W`` (uint8 image, bool masks) ``+ 12·N`` (labels, scores)."""
        return sum(t.numel() * t.element_size() for t in (self.image, self.masks, self.labels, self.scores))

    def to_cpu_copy(self) -> PasteEntry:
        """A detached, contiguous CPU copy that shares no storage with this entry."""
        def cp(t: Tensor) -> Tensor:
            # copy=True: .cpu() alone would alias a CPU tensor the caller may later modify in place
            return t.detach().to("cpu", copy=True).contiguous()

        return PasteEntry(cp(self.image), cp(self.masks), cp(self.labels), cp(self.scores))

    def as_dict(self) -> dict[str, Tensor]:
        """``{"image", "masks", "labels", "scores"}`` -> the (not copied) tensors."""
        return {"image": self.image, "masks": self.masks, "labels": self.labels, "scores": self.scores}


def paste_masks_and_scores(probs: Tensor, box_masks: Tensor, threshold: float = 0.7) -> tuple[Tensor, Tensor]:
    """Paste masks ``[probs > threshold] ∧ box_masks`` (bool ``[N,H,W]``) and their scores, the mean of
    ``probs`` inside each mask (float32 ``[N]``, 0 for an empty mask), on ``probs``' device (methods.md §5.6)."""
    masks = (probs > threshold) & box_masks.to(probs.device)
    area = masks.sum(dim=(1, 2))
    return masks, (probs.float() * masks).sum(dim=(1, 2)) / area.clamp(min=1)


def paste_entry(image: Tensor, masks: Tensor, scores: Tensor, labels: Tensor,
                max_instances: int | None = None) -> PasteEntry | None:
    """A bank entry from an image and its paste masks (methods.md §5.6, first item): instances whose paste mask
    is empty are left out (they could not be pasted), then at most ``max_instances`` of the highest score are
    kept (None = all; ties keep the earlier instance first in score order).

    Args:
        image: uint8 ``[3, H, W]``, padded un-normalised input image.
        masks: bool ``[N, H, W]`` paste masks and scores float ``[N]`` (:func:`paste_masks_and_scores`).
        labels: integer ``[N]`` class indices.
        max_instances: bound on the entry's instances (SIM: ``supervision.sim.bank_max_instances``).

    Returns:
        A :class:`PasteEntry` with ``N' <= N`` instances on ``image``'s device (not yet copied to CPU), or None
        when every mask is empty.

    Raises:
        ValueError: on wrong shapes or dtypes.
    """
    hw = _check_image(image, "paste_entry")
    n = _check_masks(masks, hw, "paste_entry")
    if scores.shape != (n,):
        raise ValueError(f"paste_entry: scores must be [{n}], got {tuple(scores.shape)}")
    labels = _check_labels(labels, n, "paste_entry")
    keep = torch.nonzero(masks.flatten(1).any(dim=1)).flatten()
    if len(keep) == 0:
        return None
    order = scores[keep].argsort(descending=True)
    keep = keep[order if max_instances is None else order[:max_instances]]
    dev = image.device
    labels = labels.to(keep.device)
    return PasteEntry(image, masks[keep].to(dev), labels[keep].to(dev), scores[keep].to(dev))


class MemoryBank:
    """FIFO memory bank of :class:`PasteEntry` for SIM copy-paste (methods.md §5.6, §5.8).

    Holds at most ``capacity`` entries (paper: 100, released code ``LENGTH``: 50); pushing into a full
    bank evicts the oldest entry. Entries are stored as CPU copies -- unlike the released code, which
    appended the same dict object for all images of a batch so that those entries ended up identical.

    Memory: :attr:`nbytes` is bounded by ``capacity · max_entry_bytes`` where an entry holds
    ``(3 + N)·H·W + 12·N`` bytes (uint8 image, bool masks, int64 labels, float32 scores), i.e. the worst
    case is ``≈ capacity × (3 + N) × H × W`` bytes for the largest padded size ``H × W`` and instance
    count ``N``; e.g. 50 entries of 1344×800 with 10 instances ≈ 0.70 GB of host memory.

    Args:
        capacity: maximum number of entries, ``>= 1``.

    Raises:
        ValueError: if ``capacity < 1``.
    """

    def __init__(self, capacity: int = 50) -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"MemoryBank: capacity must be a positive integer, got {capacity!r}")
        self.capacity = int(capacity)
        self._entries: deque[PasteEntry] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        """Whether ``capacity`` entries are stored (SIM pastes only from a full bank)."""
        return len(self._entries) == self.capacity

    @property
    def entries(self) -> tuple[PasteEntry, ...]:
        """The stored entries, oldest first (read-only view; do not modify their tensors in place)."""
        return tuple(self._entries)

    @property
    def nbytes(self) -> int:
        """Total tensor payload in bytes (sum of :attr:`PasteEntry.nbytes`); see the class docstring."""
        return sum(e.nbytes for e in self._entries)

    def push(self, entry: PasteEntry) -> None:
        """Append a detached CPU copy of ``entry``, evicting the oldest entry when full.

        Raises:
            TypeError: if ``entry`` is not a :class:`PasteEntry`.
        """
        if not isinstance(entry, PasteEntry):
            raise TypeError(f"MemoryBank.push: expected a PasteEntry, got {type(entry).__name__}")
        self._entries.append(entry.to_cpu_copy())

    def clear(self) -> None:
        """Remove all entries."""
        self._entries.clear()

    def sample(self, generator: torch.Generator | None = None) -> PasteEntry:
        """A uniformly drawn stored entry (not a copy: treat it as read-only).

        Args:
            generator: CPU ``torch.Generator`` for reproducibility (``None``: the global RNG).

        Raises:
            ValueError: if the bank is empty.
        """
        if not self._entries:
            raise ValueError("MemoryBank.sample: the bank is empty")
        idx = int(torch.randint(len(self._entries), (), generator=generator))
        return self._entries[idx]

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: ``{"capacity": int, "entries": [dict of CPU tensors], oldest first}``.

        Only ints, lists, dicts and tensors, so it survives ``torch.save`` / ``torch.load(weights_only=True)``.
        The tensors are the stored ones (not copies), as for ``nn.Module.state_dict``.
        """
        return {"capacity": self.capacity, "entries": [e.as_dict() for e in self._entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the entries (copied to CPU) and their order from :meth:`state_dict`.

        Raises:
            ValueError: if ``state`` is malformed, its capacity differs from this bank's, or it holds
                more entries than the capacity (a silent truncation would not be an exact resume).
        """
        if not isinstance(state, dict) or "capacity" not in state or "entries" not in state:
            raise ValueError("MemoryBank.load_state_dict: expected a dict with 'capacity' and 'entries'")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"MemoryBank.load_state_dict: checkpoint capacity {state['capacity']} "
                             f"!= bank capacity {self.capacity}")
        if len(state["entries"]) > self.capacity:
            raise ValueError(f"MemoryBank.load_state_dict: {len(state['entries'])} entries exceed the "
                             f"capacity {self.capacity}")
        entries = []
        for i, d in enumerate(state["entries"]):
            try:
                entries.append(PasteEntry(d["image"], d["masks"], d["labels"], d["scores"]).to_cpu_copy())
            except (KeyError, TypeError) as err:
                raise ValueError(f"MemoryBank.load_state_dict: entry {i} is malformed ({err!r})") from err
        self._entries = deque(entries, maxlen=self.capacity)


def select_instances(scores: Tensor, generator: torch.Generator | None = None, fraction: float = 0.5,
                     max_instances: int = 3, power: float = 3.0) -> Tensor:
    """Indices of the instances to paste from one entry (methods.md §5.6).

    ``n = clamp(floor(fraction · N), 1, max_instances)`` indices drawn **with replacement** with
    probability ``∝ score ** power`` (released code: fraction 0.5, max 3, power 3). The paper's "a
    quarter of the instances, 1-3 per image" is ``fraction=0.25``. If every weight is 0 (all scores 0,
    or underflow) the draw is uniform. A repeated index pastes the same pixels twice, which
    :func:`paste_instances` reduces to a single pasted object.

    Args:
        scores: ``[N]`` float mask scores ``>= 0`` (any device; computed on CPU in float64).
        generator: CPU ``torch.Generator`` (``None``: the global RNG).
        fraction: share of the instances, in ``(0, 1]``.
        max_instances: upper bound on ``n``, ``>= 1``.
        power: exponent of the score weighting, ``>= 0`` (0: uniform).

    Returns:
        int64 CPU ``[n]`` indices into ``scores``; ``[0]`` when ``N == 0``.

    Raises:
        ValueError: if ``scores`` is not 1-D float, has negative or non-finite values, or an argument is
            out of range.
    """
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"select_instances: scores must be a 1-D float tensor, got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"select_instances: fraction must be in (0, 1], got {fraction}")
    if int(max_instances) != max_instances or max_instances < 1:
        raise ValueError(f"select_instances: max_instances must be a positive integer, got {max_instances!r}")
    if not (math.isfinite(power) and power >= 0):
        raise ValueError(f"select_instances: power must be finite and >= 0, got {power}")
    num = scores.shape[0]
    if num == 0:
        return torch.zeros(0, dtype=torch.int64)
    w = scores.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("select_instances: scores must be finite and >= 0")
    n = min(max(math.floor(fraction * num + _FLOOR_SLACK), 1), int(max_instances))
    w = w.pow(power)
    if not w.sum() > 0:
        w = torch.ones_like(w)  # all-zero scores: no preference
    return torch.multinomial(w, n, replacement=True, generator=generator)


def box_masks_full_res(boxes: Tensor, hw: tuple[int, int]) -> Tensor:
    """Filled box masks at full (input) resolution, exclusive pixel convention.

    Box ``(x1, y1, x2, y2)`` covers pixel columns ``floor(x1) .. ceil(x2) - 1`` and rows
    ``floor(y1) .. ceil(y2) - 1`` (every pixel ``[c, c+1)`` the box's extent reaches into; for integer
    boxes exactly ``x1 .. x2 - 1``), clipped to the grid. So the tight box of the mask is
    ``(floor x1, floor y1, ceil x2, ceil y2)`` with ``x2 = last column + 1``. (The §2.1/§3.2 target masks
    use an inclusive ``floor(x2)`` end instead; this helper is for copy-paste only.)

    Args:
        boxes: ``[M, 4]`` float ``(x1, y1, x2, y2)`` in input pixels.
        hw: ``(H, W)`` of the input image, pixels.

    Returns:
        bool ``[M, H, W]`` on ``boxes``' device; an empty box (``x2 <= floor(x1)``) gives an empty mask.

    Raises:
        ValueError: if ``boxes`` is not ``[M, 4]`` or ``hw`` is negative.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"box_masks_full_res: boxes must be [M, 4] xyxy, got {tuple(boxes.shape)}")
    h, w = (int(v) for v in hw)
    if h < 0 or w < 0:
        raise ValueError(f"box_masks_full_res: hw must be non-negative, got {hw}")
    b = boxes.detach().to(torch.float64)
    lo, hi = b[:, :2].floor(), b[:, 2:].ceil()
    ys = torch.arange(h, device=boxes.device, dtype=torch.float64)
    xs = torch.arange(w, device=boxes.device, dtype=torch.float64)
    in_y = (ys[None] >= lo[:, 1:2]) & (ys[None] < hi[:, 1:2])
    in_x = (xs[None] >= lo[:, 0:1]) & (xs[None] < hi[:, 0:1])
    return in_y[:, :, None] & in_x[:, None, :]


@dataclass
class PasteResult:
    """Output of :func:`paste_instances` (``K = M' + P'``: kept originals first, then kept pastes).

    Attributes:
        image: uint8 ``[3, H, W]``, the target image with the pasted pixels.
        boxes: float ``[K, 4]`` xyxy pixels (dtype of the input boxes; float32 if they were integer).
        labels: int64 ``[K]``.
        masks: bool ``[K, H, W]``: the visible part of each object (for originals: box mask minus the
            pasted pixels; for pastes: source mask minus later pastes).
        pasted: bool ``[K]``, True for pasted objects (they get ``L_paste``, §5.6).
        kept: int64 ``[M']`` indices of the surviving original objects, in order.
        src_kept: int64 ``[P']`` indices into the source masks of the surviving pasted objects, in order.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    masks: Tensor
    pasted: Tensor
    kept: Tensor
    src_kept: Tensor


def paste_instances(image: Tensor, boxes: Tensor, labels: Tensor, box_masks: Tensor | None,
                    src_image: Tensor, src_masks: Tensor, src_labels: Tensor, min_area: int = 1) -> PasteResult:
    """Paste source instances onto a target image without blending (SIM copy-paste, methods.md §5.6).

    * Source instances are pasted in order, later ones on top: the target pixels under the union of the
      source masks take the source image's values, all other pixels are unchanged. The source (image
      and masks) is anchored at the **top-left** corner and cropped to the target size ``H × W``; where
      the source is smaller nothing is pasted (padded images of different batches differ in size).
    * Box supervision: existing objects have no masks, so their "mask" is the filled box mask
      (``box_masks``, :func:`box_masks_full_res`; ``None`` builds it from ``boxes``). Each loses the pixels
      covered by the pastes; its box becomes the tight box of the remaining pixels (``x2 = last column +
      1``) intersected with its original box -- for integer boxes exactly the tight box; non-occluded
      (sub-pixel) edges keep their value, and an untouched box inside the image is returned unchanged.
    * Objects with fewer than ``min_area`` remaining pixels are dropped -- original ones (fully
      occluded) and pasted ones alike: a pasted instance fully covered by a later paste (e.g. an index
      drawn twice by :func:`select_instances`) or cropped away would otherwise be an empty target.
    * Pasted objects get the tight box of their visible mask and ``pasted = True``.

    The inputs are not modified.

    Args:
        image: uint8 ``[3, H, W]`` target image (padded, un-normalised).
        boxes: ``[M, 4]`` xyxy target boxes, pixels.
        labels: integer ``[M]`` target classes.
        box_masks: bool ``[M, H, W]`` filled target box masks, or ``None``. Pixels outside the box
            would be clipped away from the recomputed box.
        src_image: uint8 ``[3, Hs, Ws]`` source image (a :class:`PasteEntry` image).
        src_masks: bool ``[P, Hs, Ws]`` masks of the selected source instances (e.g.
            ``entry.masks[select_instances(entry.scores, g)]``).
        src_labels: integer ``[P]`` their classes.
        min_area: minimum number of visible pixels to keep an object, ``>= 1``.

    Returns:
        :class:`PasteResult` on ``image``'s device (sources are moved there).

    Raises:
        ValueError: on wrong shapes/dtypes or ``min_area < 1``.
    """
    who = "paste_instances"
    hw = _check_image(image, who)
    h, w = hw
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{who}: boxes must be [M, 4] xyxy, got {tuple(boxes.shape)}")
    m = boxes.shape[0]
    labels = _check_labels(labels, m, who)
    if box_masks is None:
        box_masks = box_masks_full_res(boxes, hw)
    if _check_masks(box_masks, hw, who, "box_masks") != m:
        raise ValueError(f"{who}: box_masks has {box_masks.shape[0]} objects, boxes {m}")
    src_hw = _check_image(src_image, who, "src_image")
    p = _check_masks(src_masks, src_hw, who, "src_masks")
    src_labels = _check_labels(src_labels, p, who, "src_labels")
    if int(min_area) != min_area or min_area < 1:
        raise ValueError(f"{who}: min_area must be an integer >= 1, got {min_area!r}")

    dev = image.device
    out_dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    box_masks = box_masks.to(dev)
    labels = labels.to(dev)
    # anchor the source at the top-left, crop to / pad up to the target size
    ch, cw = min(h, src_hw[0]), min(w, src_hw[1])
    src_img = image.clone()
    src_img[:, :ch, :cw] = src_image[:, :ch, :cw].to(dev)
    src = torch.zeros(p, h, w, dtype=torch.bool, device=dev)
    src[:, :ch, :cw] = src_masks[:, :ch, :cw].to(dev)

    # visible part of paste i = its mask minus the pastes after it (later pastes lie on top)
    vis = src.clone()
    covered = torch.zeros(h, w, dtype=torch.bool, device=dev)
    for i in range(p - 1, -1, -1):
        vis[i] &= ~covered
        covered |= src[i]
    out_image = torch.where(covered[None], src_img, image)

    remaining = box_masks & ~covered[None]
    keep_orig = remaining.sum(dim=(1, 2)) >= min_area
    keep_src = vis.sum(dim=(1, 2)) >= min_area
    kept = keep_orig.nonzero().flatten()
    src_kept = keep_src.nonzero().flatten()

    rem = remaining[kept]
    orig = boxes.detach().to(dev, torch.float64)[kept]
    tight = tight_boxes(rem).to(torch.float64)
    # intersect with the original box: the pixel grid only knows integer edges, the annotation may not
    new_orig = torch.cat([torch.maximum(tight[:, :2], orig[:, :2]), torch.minimum(tight[:, 2:], orig[:, 2:])], dim=1)
    pasted_masks = vis[src_kept]
    pasted_boxes = tight_boxes(pasted_masks).to(torch.float64)

    k_orig, k_src = kept.numel(), src_kept.numel()
    return PasteResult(
        image=out_image,
        boxes=torch.cat([new_orig, pasted_boxes]).to(out_dtype),
        labels=torch.cat([labels[kept], src_labels.to(dev)[src_kept]]),
        masks=torch.cat([rem, pasted_masks]),
        pasted=torch.cat([torch.zeros(k_orig, dtype=torch.bool, device=dev),
                          torch.ones(k_src, dtype=torch.bool, device=dev)]),
        kept=kept,
        src_kept=src_kept,
    )
