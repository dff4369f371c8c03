"""Box2Mask-T building blocks: box-level bipartite matching and the local consistency module (LCM).

Li et al., "Box2Mask: Box-supervised Instance Segmentation via Level-set Evolution", arXiv 2212.01579
(Box2Mask-T, the Mask2Former variant); details as specified in methods.md §4.2 (matching) and §4.3 (LCM
inside the level-set loss). Everything here is a pure function on tensors (no modeling/engine imports) and
computes in float32 even for bf16/fp16 inputs (float64 stays float64, for ``torch.autograd.gradcheck``).

Projection dice here differs from BoxInst's :func:`boxmask.ops.projection_terms` in two ways, which is why
:func:`boxmask.ops.row_dice_loss` is not reused: the matching cost is needed for *every* (query, GT) pair
(``[Q, G]``, not one row per matched instance), and it uses Mask2Former's smoothed dice with ``eps`` added
to numerator and denominator (``eps = 1.0``) instead of ``1e-5`` in the denominator only.

Neighbourhood of the LCM: the 8 offsets of :func:`boxmask.supervision.color.neighbor_offsets` (a 3x3 kernel
with ``dilation`` and no centre), taken from a replicate-padded map, so border pixels see copies of the
border instead of zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..ops import compute_dtype
from .color import neighbor_offsets

__all__ = ["box_projection_dice_cost", "lcm_loss", "lcm_refine", "match_queries_to_boxes"]

_STD_EPS = 1e-8  # added to the neighbour standard deviation (methods.md §4.3)
# cap on the channel-mean normalised distance before squaring: (1e18)^2 = 1e36 < float32 max, so the
# softmax logits stay finite even for a flat neighbourhood (std 0) around a differing centre
_MAX_DISTANCE = 1e18


# ------------------------------------------------------------------------ matching (methods.md §4.2)


def _pairwise_dice_cost(u: Tensor, v: Tensor, eps: float) -> Tensor:
    """Smoothed dice loss of every row pair: ``u [Q, L]``, ``v [G, L]`` -> ``[Q, G]``,
    ``1 - (2 sum(u v) + eps) / (sum(u^2) + sum(v^2) + eps)``."""
    inter = u @ v.transpose(0, 1)  # [Q, G]: all pairwise sums of u*v in one matmul
    denom = (u * u).sum(dim=1)[:, None] + (v * v).sum(dim=1)[None, :] + eps
    return 1.0 - (2.0 * inter + eps) / denom


def box_projection_dice_cost(mask_logits: Tensor, box_masks: Tensor, eps: float = 1.0) -> Tensor:
    """Box projection dice cost of every (query, GT) pair (Box2Mask-T matching, methods.md §4.2).

    With ``p = sigmoid(mask_logits)``: ``cost[q, g] = dice(max_y p_q, max_y B_g) + dice(max_x p_q, max_x B_g)``
    where ``max_y`` (max over rows) gives the projection onto the x axis (length ``W``) and ``max_x`` the
    projection onto the y axis (length ``H``), and ``dice(u, t) = 1 - (2 sum(u t) + eps) / (sum(u^2) +
    sum(t^2) + eps)`` (Mask2Former's smoothed dice; Box2Mask paper §3.4 box-level matching, BoxInstSeg
    ``Box2MaskHead`` matcher). Vectorised over all pairs (two ``[Q, L] x [L, G]`` matmuls); differentiable,
    although matching uses it without gradients.

    Args:
        mask_logits: float ``[Q, H, W]`` mask logits of the queries, any float dtype. Box2Mask-T upsamples
            them to the full padded box-mask resolution first (the caller does that).
        box_masks: float or bool ``[G, H, W]`` box masks (1 inside the GT box, 0 outside; soft values in
            ``[0, 1]`` are accepted), same ``H, W`` as ``mask_logits``.
        eps: smoothing constant (>= 0) added to numerator and denominator; 1.0 in Box2Mask-T.

    Returns:
        float32 ``[Q, G]`` (float64 for float64 logits), values in ``[0, 2]`` for box masks in ``[0, 1]``;
        ``[Q, 0]`` / ``[0, G]`` when either side is empty.

    Raises:
        ValueError: if either input is not 3-D, the ``H, W`` differ, or ``eps`` is negative or not finite.
    """
    if mask_logits.dim() != 3 or box_masks.dim() != 3:
        raise ValueError(
            "box_projection_dice_cost: mask_logits must be [Q, H, W] and box_masks [G, H, W], got "
            f"{tuple(mask_logits.shape)} and {tuple(box_masks.shape)}"
        )
    if mask_logits.shape[-2:] != box_masks.shape[-2:]:
        raise ValueError(
            f"box_projection_dice_cost: mask size {tuple(mask_logits.shape[-2:])} != box-mask size "
            f"{tuple(box_masks.shape[-2:])} (upsample the mask logits to the box-mask resolution first)"
        )
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"box_projection_dice_cost: eps must be finite and >= 0, got {eps!r}")
    dtype = compute_dtype(mask_logits)
    probs = mask_logits.to(dtype).sigmoid()
    target = box_masks.to(device=probs.device, dtype=dtype)
    cost_x = _pairwise_dice_cost(probs.amax(dim=1), target.amax(dim=1), eps)  # max over y -> [., W]
    cost_y = _pairwise_dice_cost(probs.amax(dim=2), target.amax(dim=2), eps)  # max over x -> [., H]
    return cost_x + cost_y


@torch.no_grad()
def match_queries_to_boxes(
    class_logits: Tensor,
    mask_logits: Tensor,
    gt_labels: Tensor,
    box_masks: Tensor,
    class_weight: float = 2.0,
    box_weight: float = 5.0,
    eps: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Box-level Hungarian matching of one image's queries to its GT boxes (Box2Mask-T, methods.md §4.2).

    Cost ``C = class_weight * (-softmax(class_logits)[:, gt_labels]) + box_weight * C_box`` with ``C_box``
    from :func:`box_projection_dice_cost`; the minimum-cost one-to-one assignment of
    ``scipy.optimize.linear_sum_assignment`` on the detached float64 CPU cost (Box2Mask paper §3.4,
    Mask2Former's Hungarian matcher with the mask cost replaced by the box projection cost). Queries left
    unmatched are "no object" for the classification loss. Runs under ``torch.no_grad``.

    Args:
        class_logits: float ``[Q, C + 1]`` class logits of the queries; the last column is "no object".
        mask_logits: float ``[Q, H, W]`` mask logits at the box-mask resolution.
        gt_labels: integer ``[G]`` class ids in ``[0, C)``.
        box_masks: float/bool ``[G, H, W]`` box masks of the GTs (0/1).
        class_weight: weight of the class cost (2.0 in Box2Mask-T).
        box_weight: weight of the box projection dice cost (5.0 in Box2Mask-T).
        eps: dice smoothing of :func:`box_projection_dice_cost` (1.0).

    Returns:
        ``(query_idx, gt_idx)``, int64 ``[K]`` each with ``K = min(Q, G)``, on ``class_logits.device``,
        sorted by ascending query index; query ``query_idx[k]`` is matched to GT ``gt_idx[k]``. Two empty
        tensors when ``G == 0`` (or ``Q == 0``).

    Raises:
        ValueError: on shape mismatches (``Q`` or ``G`` disagreeing, ``class_logits`` without a class besides
            "no object", mask sizes differing), non-integer labels or labels outside ``[0, C)``, and when the
            cost has NaN/inf entries (the message names the term: class or box).
    """
    if class_logits.dim() != 2 or class_logits.shape[1] < 2:
        raise ValueError(
            f"match_queries_to_boxes: class_logits must be [Q, C + 1] with C >= 1, got {tuple(class_logits.shape)}"
        )
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    if mask_logits.dim() != 3 or mask_logits.shape[0] != num_queries:
        raise ValueError(
            f"match_queries_to_boxes: mask_logits must be [Q={num_queries}, H, W], got {tuple(mask_logits.shape)}"
        )
    if gt_labels.dim() != 1:
        raise ValueError(f"match_queries_to_boxes: gt_labels must be [G], got {tuple(gt_labels.shape)}")
    if gt_labels.dtype.is_floating_point or gt_labels.dtype.is_complex or gt_labels.dtype == torch.bool:
        raise ValueError(f"match_queries_to_boxes: gt_labels must be integer class ids, got {gt_labels.dtype}")
    num_gts = gt_labels.shape[0]
    if box_masks.dim() != 3 or box_masks.shape[0] != num_gts:
        raise ValueError(
            f"match_queries_to_boxes: box_masks must be [G={num_gts}, H, W], got {tuple(box_masks.shape)}"
        )
    if num_gts and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= num_classes):
        raise ValueError(
            f"match_queries_to_boxes: gt_labels must lie in [0, {num_classes}), got values in "
            f"[{int(gt_labels.min())}, {int(gt_labels.max())}]"
        )
    device = class_logits.device
    if num_gts == 0 or num_queries == 0:
        # still validate the mask sizes, so an empty image does not hide a wiring bug
        box_projection_dice_cost(mask_logits, box_masks, eps)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone()

    probs = class_logits.to(compute_dtype(class_logits)).softmax(dim=-1)
    cost_class = -probs[:, gt_labels.to(device=device, dtype=torch.long)]  # [Q, G]
    cost_box = box_projection_dice_cost(mask_logits, box_masks, eps).to(device=device, dtype=cost_class.dtype)
    cost = class_weight * cost_class + box_weight * cost_box
    if not bool(torch.isfinite(cost).all()):
        bad = [name for name, term in (("class", cost_class), ("box projection dice", cost_box))
               if not bool(torch.isfinite(term).all())]
        problem = " and ".join(bad) + " cost" if bad else f"weights (class {class_weight}, box {box_weight})"
        raise ValueError(
            f"match_queries_to_boxes: non-finite matching cost ({int((~torch.isfinite(cost)).sum())} of "
            f"{cost.numel()} entries); NaN/inf in the {problem}"
        )
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    query_idx = torch.as_tensor(rows, dtype=torch.int64)
    gt_idx = torch.as_tensor(cols, dtype=torch.int64)
    order = torch.argsort(query_idx)  # scipy sorts rows already; make the contract explicit
    return query_idx[order].to(device), gt_idx[order].to(device)


# ------------------------------------------------------------------------ LCM (methods.md §4.3)


def _neighbours(x: Tensor, dilation: int) -> Tensor:
    """The 8 dilated neighbours of every pixel with replicate padding: ``[N, C, h, w] -> [N, C, 8, h, w]``.

    Order as :func:`boxmask.supervision.color.neighbor_offsets`. Replicate (not zero) padding: a border
    pixel's missing neighbours are copies of the border, so they neither pull probabilities towards 0 nor
    look like a colour edge.
    """
    h, w = x.shape[-2:]
    d = dilation
    padded = F.pad(x, (d, d, d, d), mode="replicate")
    return torch.stack(
        [padded[..., d + dy: d + dy + h, d + dx: d + dx + w] for dy, dx in neighbor_offsets(dilation)], dim=2
    )


def _lcm_affinity(image: Tensor, dilation: int, alpha: float) -> Tensor:
    """LCM affinities ``[N, 1, 8, h, w]`` (softmax over the 8 neighbours) of a guide ``[N, C, h, w]``."""
    nbrs = _neighbours(image, dilation)  # [N, C, 8, h, w]
    # per pixel i and channel c: std over its 8 neighbours (unbiased, torch's default, as PAMR)
    std = nbrs.std(dim=2, keepdim=True)  # [N, C, 1, h, w]
    distance = ((nbrs - image.unsqueeze(2)).abs() / (std + _STD_EPS) / alpha).mean(dim=1, keepdim=True)
    # square *after* the channel mean, as written in methods.md §4.3: -mean_c(...)^2
    return torch.softmax(-distance.clamp(max=_MAX_DISTANCE).square(), dim=2)


def _check_lcm_args(name: str, image: Tensor, probs: Tensor, dilation: int, iterations: int, alpha: float) -> None:
    if image.dim() != 4 or probs.dim() != 4:
        raise ValueError(
            f"{name}: image must be [N, C, h, w] and probs [N, K, h, w], got {tuple(image.shape)} and "
            f"{tuple(probs.shape)}"
        )
    if image.shape[0] != probs.shape[0] or image.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"{name}: image {tuple(image.shape)} and probs {tuple(probs.shape)} must share N, h and w"
        )
    neighbor_offsets(dilation)  # validates the dilation (int >= 1)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{name}: iterations must be an int >= 0, got {iterations!r}")
    if not (alpha > 0.0 and alpha < float("inf")):
        raise ValueError(f"{name}: alpha must be finite and > 0, got {alpha!r}")


def lcm_refine(image: Tensor, probs: Tensor, dilation: int = 2, iterations: int = 10, alpha: float = 0.3) -> Tensor:
    """Local consistency module: refine mask probabilities by image-guided local averaging (PAMR-like).

    Box2Mask paper §3.3 (LCM) as written in methods.md §4.3. For every pixel ``i`` and its 8 neighbours
    ``j`` at offset ``dilation`` (replicate padding)::

        a_ij = softmax_j( -( mean_c( |I_i,c - I_j,c| / (std_c(i) + 1e-8) / alpha ) )^2 )
        p_i <- sum_j a_ij p_j        (repeated `iterations` times; a_ij computed once from the image)

    Reading of the formula: ``std_c(i)`` is, per pixel ``i`` and channel ``c``, the standard deviation of
    the 8 neighbour values ``I_j,c`` (the centre is not included; unbiased, divisor 7, torch's default as
    in PAMR); the square is applied *outside* the channel mean, to the channel-averaged normalised
    distance (methods.md writes ``-mean_c(...)^2``). The centre pixel is not its own neighbour, so one
    step replaces ``p_i`` by a weighted mean of its neighbours. A constant image gives uniform weights
    ``1/8``; neighbours across a strong edge get ~0 weight.

    Args:
        image: float ``[N, C, h, w]`` guide (e.g. the normalised image resized to the LCM size, 96x96 in
            Box2Mask-T); any units, the affinity is scale-invariant per neighbourhood.
        probs: float ``[N, K, h, w]`` mask probabilities in ``[0, 1]`` (K instances of image n share its
            affinities).
        dilation: neighbour offset in pixels (2 in Box2Mask-T).
        iterations: number of refinement steps (10); 0 returns ``probs``.
        alpha: temperature of the affinity (0.3).

    Returns:
        float32 ``[N, K, h, w]`` (float64 for float64 probs), values in ``[0, 1]`` (each step is a convex
        combination). Differentiable w.r.t. ``probs`` and ``image``; :func:`lcm_loss` detaches it.

    Raises:
        ValueError: if the inputs are not 4-D or disagree in ``N, h, w``, ``dilation`` is not an int >= 1,
            ``iterations`` is not an int >= 0, or ``alpha`` is not finite and > 0.
    """
    _check_lcm_args("lcm_refine", image, probs, dilation, iterations, alpha)
    dtype = compute_dtype(probs)
    refined = probs.to(dtype)
    if iterations == 0:
        return refined
    affinity = _lcm_affinity(image.to(device=refined.device, dtype=dtype), dilation, alpha)  # [N, 1, 8, h, w]
    for _ in range(iterations):
        refined = (_neighbours(refined, dilation) * affinity).sum(dim=2)
    return refined


def lcm_loss(
    image: Tensor,
    probs: Tensor,
    box_masks: Tensor,
    dilation: int = 2,
    iterations: int = 10,
    alpha: float = 0.3,
) -> Tensor:
    """LCM consistency loss: L1 distance of ``probs`` to their detached LCM refinement inside the boxes.

    ``L = sum |p_ref - p| * B / max(sum B, 1)`` over all images, instances and pixels, with
    ``p_ref = lcm_refine(image, p)`` computed without gradients (a fixed target: the loss pulls ``p`` towards
    its image-consistent refinement, never the refinement towards ``p``). Box2Mask paper §3.3 / methods.md
    §4.3; weighted 0.2 inside Box2Mask-T's level-set loss (the caller applies the weight). The gradient
    w.r.t. ``probs`` is ``sign(p - p_ref) * B / max(sum B, 1)``.

    Args:
        image: float ``[N, C, h, w]`` guide (see :func:`lcm_refine`).
        probs: float ``[N, K, h, w]`` mask probabilities in ``[0, 1]`` (``sigmoid`` of the logits).
        box_masks: float/bool ``[N, K, h, w]`` box masks (1 inside the instance's GT box; soft values act
            as weights).
        dilation, iterations, alpha: as :func:`lcm_refine` (2, 10, 0.3 in Box2Mask-T).

    Returns:
        float32 scalar (float64 for float64 probs), >= 0; ``probs.sum() * 0`` (graph-connected) when there
        are no instances, 0 when ``B`` is empty.

    Raises:
        ValueError: as :func:`lcm_refine`, and if ``box_masks`` does not have the shape of ``probs``.
    """
    _check_lcm_args("lcm_loss", image, probs, dilation, iterations, alpha)
    if box_masks.shape != probs.shape:
        raise ValueError(f"lcm_loss: box_masks must be {tuple(probs.shape)} like probs, got {tuple(box_masks.shape)}")
    p = probs.to(compute_dtype(probs))
    if p.numel() == 0:
        return p.sum() * 0.0
    with torch.no_grad():  # the refinement is a target, not a path for gradients
        target = lcm_refine(image.detach(), p.detach(), dilation, iterations, alpha)
    weights = box_masks.to(device=p.device, dtype=p.dtype)
    return ((target - p).abs() * weights).sum() / weights.sum().clamp(min=1.0)
