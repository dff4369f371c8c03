"""Box-conditioned mask inference: a CondInst/BoxInst mask for each *given* box.

Instead of detecting objects, the network is asked for the mask of a box the user supplies (as in
DiscoBox's box-conditioned inference for auto-labelling, methods.md §6): one forward pass of the
whole network, then for every box one FCOS location is chosen and the dynamic mask head
(methods.md §1.4) runs with that location's controller output, exactly as it would for a detection
made at that location.

Location rule (per box ``(x1, y1, x2, y2)`` in resized-image pixels, label ``c``):

1. candidates are the FCOS locations of every level P3–P7 whose centre ``(x, y)`` lies in the closed
   box, ``x1 <= x <= x2`` and ``y1 <= y <= y2``;
2. the candidate maximising ``σ(cls_c) · σ(ctr)`` is chosen (the FCOS ranking score of methods.md
   §1.2/§1.5); when ``c`` is unknown (no labels, or a label outside ``[0, C)``) the class-agnostic
   ``max_c σ(cls_c) · σ(ctr)`` is used, as in BoxInst's top-k sampling (methods.md §1.5);
3. a box with no location centre inside it (smaller than the P3 stride of 8 px) uses the P3
   location nearest to the box centre (Euclidean; ties go to the lower flat index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .condinst import CondInst
from .fcos import flatten_levels

__all__ = ["BoxConditionedMasks", "select_box_locations", "box_conditioned_masks", "masks_for_boxes"]

# Instances per dynamic-mask-head call: bounds the [K, C_mask+2, h*w] input at large image sizes.
_HEAD_CHUNK = 64


@dataclass
class BoxConditionedMasks:
    """Box-conditioned masks of one image (``N`` given boxes).

    Attributes:
        logits: float32 ``[N,1,Hp/4,Wp/4]`` mask logits at the mask output stride (4) of the padded
            image, same layout as :meth:`CondInst.detect`'s mask logits.
        loc_inds: int64 ``[N]`` chosen location, index into the levels-concatenated locations
            (P3 first, row-major inside a level).
        levels: int64 ``[N]`` FPN level of the chosen location (0 = P3).
        locations: float32 ``[N,2]`` its ``(x, y)`` centre in resized-image pixels.
        scores: float32 ``[N]`` its ``σ(cls)·σ(ctr)`` (for the box's class, or the max over classes).
        inside: bool ``[N]``; False where no location centre was inside the box (rule 3).
    """

    logits: Tensor
    loc_inds: Tensor
    levels: Tensor
    locations: Tensor
    scores: Tensor
    inside: Tensor


def select_box_locations(scores: Tensor, locations: Tensor, num_p3: int, boxes: Tensor,
                         labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Choose one FCOS location per box by the rule in the module docstring.

    Args:
        scores: float ``[L,C]`` ``σ(cls)·σ(ctr)`` of one image, levels concatenated (P3 first).
        locations: float ``[L,2]`` ``(x, y)`` location centres in pixels, same order.
        num_p3: number of P3 locations (the first ``num_p3`` rows), used by the nearest-centre rule.
        boxes: float ``[N,4]`` xyxy pixels (same coordinate frame as ``locations``).
        labels: int64 ``[N]`` contiguous class of each box, or None; entries outside ``[0, C)``
            (e.g. -1) mean "unknown class" and use the max over classes.

    Returns:
        ``(loc_inds int64 [N], chosen scores float [N], inside bool [N])``.

    Raises:
        ValueError: ``boxes`` is not ``[N,4]``, ``labels`` has a different length, or
            ``num_p3`` is not in ``[1, L]``.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N,4] xyxy, got shape {tuple(boxes.shape)}")
    n = boxes.shape[0]
    num_locs, num_classes = scores.shape
    if not 1 <= num_p3 <= num_locs:
        raise ValueError(f"num_p3 must be in [1, {num_locs}], got {num_p3}")
    device = scores.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, scores.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=device)
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
    # scores are in [0,1]; -1 can never win against an inside location
    best_score, best = torch.where(inside_any, per_box, torch.full_like(per_box, -1.0)).max(1)
    inside = inside_any.any(1)
    if not bool(inside.all()):
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        dist = torch.cdist(centres, locations[:num_p3].float())  # [N,num_p3]
        nearest = dist.argmin(1)
        best = torch.where(inside, best, nearest)
        best_score = torch.where(inside, best_score, per_box.gather(1, nearest[:, None])[:, 0])
    return best, best_score, inside


@torch.no_grad()
def box_conditioned_masks(model: CondInst, images: Tensor, image_sizes: list[tuple[int, int]],
                          boxes: list[Tensor], labels: list[Tensor] | None = None) -> list[BoxConditionedMasks]:
    """Mask logits for given boxes with the chosen locations (methods.md §1.4; DiscoBox box-conditioned inference).

    One forward pass of ``model`` (backbone, FPN, FCOS head, mask branch) over the batch, then per box
    the location rule of the module docstring and the dynamic mask head with that location's controller
    parameters. The caller puts ``model`` in eval mode (BatchNorm statistics) and on the images' device.

    Args:
        model: a :class:`CondInst` (BoxInst or CondInst weights).
        images: uint8 ``[B,3,Hp,Wp]`` RGB, zero-padded to a multiple of 32 (see ``collate_batch``).
        image_sizes: per image ``(h, w)`` resized size before padding (not used by the rule: the boxes
            lie inside the image; kept for symmetry with :meth:`CondInst.detect`).
        boxes: per image float ``[N_i,4]`` xyxy in resized-image pixels.
        labels: per image int64 ``[N_i]`` contiguous model classes (-1 = unknown), or None.

    Returns:
        One :class:`BoxConditionedMasks` per image.

    Raises:
        ValueError: ``boxes``/``labels`` do not have one entry per image, or a bad box tensor shape.
    """
    batch = images.shape[0]
    if len(boxes) != batch or (labels is not None and len(labels) != batch):
        raise ValueError(f"{batch} images but {len(boxes)} box lists"
                         + ("" if labels is None else f" and {len(labels)} label lists"))
    cls_logits, _, ctrness, params, mask_feats, locations = model._forward_features(images)
    flat_cls = flatten_levels(cls_logits).float()  # [B,L,C]
    flat_ctr = flatten_levels(ctrness).float()  # [B,L,1]
    flat_params = flatten_levels(params)  # [B,L,P]
    all_locs = torch.cat(locations)
    level_of = torch.cat([torch.full((len(l),), i, dtype=torch.int64, device=l.device) for i, l in enumerate(locations)])
    out = []
    for b in range(batch):
        scores = flat_cls[b].sigmoid() * flat_ctr[b].sigmoid()  # [L,C]
        loc_inds, chosen, inside = select_box_locations(scores, all_locs, len(locations[0]), boxes[b].to(images.device),
                                                        None if labels is None else labels[b])
        n = len(loc_inds)
        chunks = []
        for s in range(0, n, _HEAD_CHUNK):
            sel = loc_inds[s:s + _HEAD_CHUNK]
            im_inds = torch.full((len(sel),), b, dtype=torch.int64, device=images.device)
            chunks.append(model.mask_head(mask_feats, flat_params[b, sel], im_inds, all_locs[sel], level_of[sel]).float())
        if chunks:
            logits = torch.cat(chunks)
        else:
            h, w = mask_feats.shape[-2:]
            f = model.mask_head.feat_stride // model.mask_head.out_stride
            logits = torch.zeros(0, 1, h * f, w * f, device=images.device)
        out.append(BoxConditionedMasks(logits, loc_inds, level_of[loc_inds], all_locs[loc_inds], chosen, inside))
    return out


@torch.no_grad()
def masks_for_boxes(model: CondInst, images: Tensor, image_sizes: list[tuple[int, int]], boxes: list[Tensor],
                    labels: list[Tensor] | None = None) -> list[Tensor]:
    """Mask logits for given boxes: float32 ``[N_i,1,Hp/4,Wp/4]`` per image.

    The box-conditioned inference of DiscoBox (methods.md §6) for CondInst/BoxInst: the dynamic mask head
    (methods.md §1.4) driven by the controller output at the best FCOS location inside each box (rule in
    the module docstring). Binarise like :func:`boxmask.modeling.condinst.postprocess` (methods.md §1.7).
    Arguments and errors as :func:`box_conditioned_masks`.
    """
    return [r.logits for r in box_conditioned_masks(model, images, image_sizes, boxes, labels)]
