"""Box-conditioned mask inference: a mask for each *given* box (the rule for CondInst/BoxInst; SOLOv2 adapts it).

Instead of detecting objects, the network is asked for the mask of a box the user supplies (as in
DiscoBox's box-conditioned inference for auto-labelling, methods.md §6): one forward pass of the
whole network, then for every box one FCOS location is chosen and the dynamic mask head
(methods.md §1.4) runs with that location's controller output, exactly as it would for a detection
made at that location.

Location rule (per box ``(x1, y1, x2, y2)`` in resized-image pixels, label ``c``):

1. candidates are the FCOS locations of every level P3–P7 whose centre ``(x, y)`` lies in the closed
   box, ``x1 <= x <= x2`` and ``y1 <= y <= y2``;
2. each candidate is ranked by the FCOS score ``σ(cls_c) · σ(ctr)`` (methods.md §1.2/§1.5) -- when
   ``c`` is unknown (no labels, or a label outside ``[0, C)``) by the class-agnostic
   ``max_c σ(cls_c) · σ(ctr)``, as in BoxInst's top-k sampling (methods.md §1.5) -- times, with the
   default ``rank="score_iou"``, the IoU between the box that location regresses and the given box
   (``rank="score"``: the score alone). The IoU factor matters for touching objects (nuclei, nuts):
   a location inside box A can belong to a neighbour B, and its controller then draws B's mask;
   its regressed box tells which object it serves. The best-ranked candidate is chosen;
3. a box with no location centre inside it (smaller than the P3 stride of 8 px) uses the P3
   location nearest to the box centre (Euclidean; ties go to the lower flat index);
4. with ``candidates = k > 1`` the ``k`` best-ranked locations inside the box each draw a mask and the
   one that fits the given box best is kept: the smallest BoxInst projection term (methods.md §2.3,
   dice of the x and y max-projections of the mask against those of the box), ties to the better
   rank. This uses the one thing known for sure, the box, to reject a controller that draws a
   neighbour, a fragment or nothing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..ops import box_masks_at_stride, projection_terms
from ..structures import BoxConditionedMasks

__all__ = ["BoxConditionedModel", "LOCATION_RANKS", "best_fitting_candidates", "box_location_candidates",
           "check_box_conditioned_args"]

#: location ranking rules (module docstring, rule 2)
LOCATION_RANKS = ("score_iou", "score")


def box_location_candidates(scores: Tensor, locations: Tensor, num_p3: int, boxes: Tensor,
                            labels: Tensor | None = None, pred_boxes: Tensor | None = None, k: int = 1,
                            allowed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``k`` best-ranked FCOS locations inside each box (rules 1-3 of the module docstring).

    Args:
        scores: float ``[L,C]`` ``σ(cls)·σ(ctr)`` of one image, levels concatenated (P3 first).
        locations: float ``[L,2]`` ``(x, y)`` location centres in pixels, same order.
        num_p3: number of P3 locations (the first ``num_p3`` rows), used by the nearest-centre rule.
        boxes: float ``[N,4]`` xyxy pixels (same coordinate frame as ``locations``).
        labels: int64 ``[N]`` contiguous class of each box, or None; entries outside ``[0, C)``
            (e.g. -1) mean "unknown class" and use the max over classes.
        pred_boxes: float ``[L,4]`` xyxy box regressed at each location (pixels), or None; when given,
            candidates are ranked by ``score · IoU(pred_box, box)`` instead of the score.

        k: candidates per box (>= 1), best first.
        allowed: optional bool ``[N,L]``: only these locations may serve box ``n`` (SOLOv2: the levels whose
            scale range holds the box); a box with no allowed location inside it falls back to rule 3.

    Returns:
        ``(loc_inds int64 [N,k], scores float [N,k], valid bool [N,k], inside bool [N])``: candidate
        locations best first, their FCOS scores (without the IoU factor), whether each candidate is real
        (a box with fewer than ``k`` location centres inside has invalid trailing entries; a box with none
        has only its nearest P3 location, in column 0), and whether any location centre is inside the box.

    Raises:
        ValueError: ``boxes`` is not ``[N,4]``, ``labels`` has a different length, ``num_p3`` is not in
            ``[1, L]`` or ``k < 1``.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N,4] xyxy, got shape {tuple(boxes.shape)}")
    n = boxes.shape[0]
    num_locs, num_classes = scores.shape
    if not 1 <= num_p3 <= num_locs:
        raise ValueError(f"num_p3 must be in [1, {num_locs}], got {num_p3}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, num_locs)
    device = scores.device
    if n == 0:
        empty = torch.zeros(0, k, dtype=torch.int64, device=device)
        return (empty, scores.new_zeros(0, k), torch.zeros(0, k, dtype=torch.bool, device=device),
                torch.zeros(0, dtype=torch.bool, device=device))
    boxes = boxes.to(device=device, dtype=torch.float32)
    agnostic = scores.max(1).values  # [L]
    if labels is None:
        per_box = agnostic[None].expand(n, -1)
    else:
        labels = labels.to(device=device, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"{labels.shape[0]} labels for {n} boxes")
        known = (labels >= 0) & (labels < num_classes)
        per_box = torch.where(known[:, None], scores[:, labels.clamp(0, num_classes - 1)].t(), agnostic[None])  # [N,L]
    x, y = locations[:, 0].float(), locations[:, 1].float()
    inside_any = ((x[None] >= boxes[:, 0:1]) & (x[None] <= boxes[:, 2:3])
                  & (y[None] >= boxes[:, 1:2]) & (y[None] <= boxes[:, 3:4]))  # [N,L]
    if allowed is not None:
        if allowed.shape != (n, num_locs):
            raise ValueError(f"allowed must be [{n},{num_locs}], got {tuple(allowed.shape)}")
        inside_any = inside_any & allowed.to(device)
    rank = per_box
    if pred_boxes is not None:
        if pred_boxes.shape != (num_locs, 4):
            raise ValueError(f"pred_boxes must be [{num_locs},4], got {tuple(pred_boxes.shape)}")
        rank = per_box * box_iou(boxes, pred_boxes.to(device=device, dtype=torch.float32))
    # ranks are in [0,1]; -1 marks locations outside the box (never ahead of an inside one)
    top_rank, best = torch.where(inside_any, rank, torch.full_like(rank, -1.0)).topk(k, dim=1)
    valid = top_rank >= 0
    inside = inside_any.any(1)
    if not bool(inside.all()):
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        dist = torch.cdist(centres, locations[:num_p3].float())  # [N,num_p3]
        nearest = dist.argmin(1)
        best[:, 0] = torch.where(inside, best[:, 0], nearest)
        valid[:, 0] = True
    return best, per_box.gather(1, best), valid, inside


def check_box_conditioned_args(images: Tensor, boxes: list[Tensor], labels: list[Tensor] | None, rank: str,
                                candidates: int) -> None:
    """The argument checks every ``box_conditioned_masks`` shares. Raises ValueError: ``candidates < 1``, an
    unknown ``rank``, or ``boxes``/``labels`` without one entry per image of ``images`` ``[B,3,Hp,Wp]``."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if rank not in LOCATION_RANKS:
        raise ValueError(f"rank must be one of {LOCATION_RANKS}, got {rank!r}")
    batch = images.shape[0]
    if len(boxes) != batch or (labels is not None and len(labels) != batch):
        raise ValueError(f"{batch} images but {len(boxes)} box lists"
                         + ("" if labels is None else f" and {len(labels)} label lists"))


@runtime_checkable
class BoxConditionedModel(Protocol):
    """What ``annotate`` needs of a network: masks for given boxes (box-conditioned inference) and the stride
    of those masks. :class:`~boxmask.modeling.condinst.CondInst` and :class:`~boxmask.modeling.solov2.SOLOv2`
    implement it, each with its own candidate rule."""

    mask_out_stride: int

    def box_conditioned_masks(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: list[Tensor],
                              labels: list[Tensor] | None = None, rank: str = "score_iou",
                              candidates: int = 5) -> list[BoxConditionedMasks]:
        """Per image a :class:`~boxmask.structures.BoxConditionedMasks` for the given boxes."""
        ...


def best_fitting_candidates(cand_logits: Tensor, valid: Tensor, boxes: Tensor, padded_hw: tuple[int, int],
                            stride: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rule 4: per box, the candidate mask with the smallest projection term (:func:`boxmask.ops.projection_terms`) against the box.

    Args:
        cand_logits: float ``[V,1,h,w]`` logits of the valid candidates, row-major over ``valid`` (box 0's first).
        valid: bool ``[N,k]``; valid candidates are a prefix of each row, ranked best first.
        boxes: float ``[N,4]`` xyxy pixels; padded_hw: ``(Hp, Wp)``; stride: the logits' stride in pixels.

    Returns:
        ``(logits [N,1,h,w], pick int64 [N], agreement float32 [N])``: the chosen candidate's logits, its
        column in ``valid`` (ties keep the better-ranked candidate; with ``k == 1`` the first), and the
        mean IoU inside the box of its binary mask (logit > 0) with the box's other candidates (NaN when
        the box has one candidate; see :class:`BoxConditionedMasks`).
    """
    n, k = valid.shape
    pick = torch.zeros(n, dtype=torch.int64, device=cand_logits.device)
    agreement = torch.full((n,), float("nan"), device=cand_logits.device)
    starts = valid.sum(1).cumsum(0) - valid.sum(1)
    if k > 1 and n:
        owner = torch.arange(n, device=valid.device)[:, None].expand(n, k)[valid]
        box_masks = box_masks_at_stride(boxes.float(), padded_hw, stride)[owner]
        fit = torch.full((n, k), float("inf"), device=cand_logits.device)
        fit[valid] = projection_terms(cand_logits[:, 0], box_masks)
        pick = fit.argmin(1)
        # agreement of the chosen candidate with the others of its box
        binary = (cand_logits[:, 0] > 0) & (box_masks > 0)  # [V,h,w]
        chosen = binary[(starts + pick)[owner]]  # [V,h,w]: each candidate's box's chosen mask
        inter = (binary & chosen).flatten(1).sum(1).float()
        union = (binary | chosen).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        is_other = torch.ones_like(iou, dtype=torch.bool)
        is_other[starts + pick] = False
        total = torch.zeros(n, device=iou.device).index_add_(0, owner, torch.where(is_other, iou, torch.zeros_like(iou)))
        count = torch.zeros(n, device=iou.device).index_add_(0, owner, is_other.float())
        agreement = torch.where(count > 0, total / count.clamp(min=1), agreement)
    # box i's pick-th candidate sits at (valid candidates of boxes < i) + pick in cand_logits
    return cand_logits[starts + pick], pick, agreement
