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

The losses of every prediction set of the query-based network (:class:`Box2MaskTSupervision`, box labels only,
methods.md §4.2-4.3) and the mask-supervised Mask2Former reference (:class:`Box2MaskTFullSupervision`) are
built from these pieces and from :mod:`boxmask.supervision.levelset` / :mod:`boxmask.supervision.tree_filter`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..config import Box2MaskTConfig, ConfigError
from ..ops import aligned_bilinear, box_masks_at_stride, compute_dtype, projection_terms
from ..structures import QueryOutputs, SupervisionInputs
from .base import MaskSupervision
from .color import neighbor_offsets
from .full import dice_loss, gt_masks_at_stride
from .levelset import _IMAGENET_MEAN, _IMAGENET_STD, _resize, chan_vese_energy, levelset_targets
from .tree_filter import grid_mst

__all__ = ["Box2MaskTConfig", "Box2MaskTFullSupervision", "Box2MaskTSupervision", "box_projection_dice_cost",
           "lcm_affinity", "lcm_loss", "lcm_refine", "match_queries_to_boxes", "match_queries_to_masks"]

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


def lcm_affinity(image: Tensor, dilation: int = 2, alpha: float = 0.3) -> Tensor:
    """LCM affinities ``[N, 1, 8, h, w]`` (softmax over the 8 neighbours, dilation ``dilation``, replicate
    padding) of a float guide ``[N, C, h, w]``: the ``a_ij`` of :func:`lcm_refine` (methods.md §4.3)."""
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


def lcm_refine(image: Tensor, probs: Tensor, dilation: int = 2, iterations: int = 10, alpha: float = 0.3,
               affinity: Tensor | None = None) -> Tensor:
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
        affinity: the affinities ``[N, 1, 8, h, w]`` of ``image`` computed before (:func:`lcm_affinity`), so
            that a guide shared by several calls is analysed once; None computes them.

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
    if affinity is None:
        affinity = lcm_affinity(image.to(device=refined.device, dtype=dtype), dilation, alpha)  # [N, 1, 8, h, w]
    affinity = affinity.to(device=refined.device, dtype=dtype)
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
    affinity: Tensor | None = None,
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
        dilation, iterations, alpha, affinity: as :func:`lcm_refine` (2, 10, 0.3 in Box2Mask-T).

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
    num, den = _lcm_sums(image, p, box_masks, dilation, iterations, alpha, affinity)
    return num.sum() / den.sum().clamp(min=1.0)


def _lcm_sums(image: Tensor, p: Tensor, box_masks: Tensor, dilation: int, iterations: int, alpha: float,
              affinity: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-row numerator ``sum |p_ref - p| B`` and denominator ``sum B`` of :func:`lcm_loss`, each ``[N]``,
    so that callers can reduce over any grouping of the rows (Box2Mask-T: one group per prediction set)."""
    with torch.no_grad():  # the refinement is a target, not a path for gradients
        target = lcm_refine(image.detach(), p.detach(), dilation, iterations, alpha,
                            None if affinity is None else affinity.detach())
    weights = box_masks.to(device=p.device, dtype=p.dtype)
    return ((target - p).abs() * weights).flatten(1).sum(1), weights.flatten(1).sum(1)


# ------------------------------------------------------------------------ Box2Mask-T losses (methods.md §4.2-4.3)
#
# Everything below consumes a query-based network's :class:`~boxmask.structures.QueryOutputs` (all prediction
# sets, unmatched) and a :class:`~boxmask.structures.SupervisionInputs` view of the batch.



def _check_query_outputs(who: str, out: QueryOutputs, inputs: SupervisionInputs) -> tuple[int, int, int, int]:
    """Shape checks shared by both supervisions; returns ``(B, Q, h, w)``."""
    if len(out.class_logits) == 0 or len(out.class_logits) != len(out.mask_logits):
        raise ValueError(f"{who}: need one mask_logits per class_logits (>= 1 prediction set), got "
                         f"{len(out.class_logits)} and {len(out.mask_logits)}")
    b, q, h, w = out.mask_logits[0].shape if out.mask_logits[0].dim() == 4 else (None,) * 4
    if b is None:
        raise ValueError(f"{who}: mask_logits must be [B, Q, h, w], got {tuple(out.mask_logits[0].shape)}")
    for s, (cls, msk) in enumerate(zip(out.class_logits, out.mask_logits)):
        if msk.shape != (b, q, h, w):
            raise ValueError(f"{who}: set {s}: mask_logits {tuple(msk.shape)} != set 0's {(b, q, h, w)}")
        if cls.dim() != 3 or cls.shape[:2] != (b, q) or cls.shape[2] < 2:
            raise ValueError(f"{who}: set {s}: class_logits must be [B={b}, Q={q}, C + 1 >= 2], got "
                             f"{tuple(cls.shape)}")
    if inputs.images.dim() != 4 or inputs.images.shape[0] != b:
        raise ValueError(f"{who}: images {tuple(inputs.images.shape)} do not match the batch size {b}")
    hp, wp = inputs.images.shape[-2:]
    if (h * out.stride, w * out.stride) != (hp, wp):
        raise ValueError(f"{who}: mask logits {h}x{w} at stride {out.stride} do not cover the padded images "
                         f"{hp}x{wp}")
    if len(inputs.boxes) != b or len(inputs.labels) != b:
        raise ValueError(f"{who}: {len(inputs.boxes)} box and {len(inputs.labels)} label tensors for {b} images")
    for i, (bx, lb) in enumerate(zip(inputs.boxes, inputs.labels)):
        if bx.dim() != 2 or bx.shape[1] != 4 or lb.shape != (bx.shape[0],):
            raise ValueError(f"{who}: image {i}: boxes must be [N, 4] and labels [N], got {tuple(bx.shape)} "
                             f"and {tuple(lb.shape)}")
    return b, q, h, w


def _classification_loss(class_logits: Tensor, matches: list[tuple[Tensor, Tensor]], labels: list[Tensor],
                         no_object_weight: float) -> Tensor:
    """Mask2Former CE over all queries of one set: matched -> GT class, others -> no-object (class ``C``).

    ``sum_i w_{t_i} CE_i / sum_i w_{t_i}`` over the ``B * Q`` queries with ``w = 1`` for objects and
    ``no_object_weight`` for no-object (``F.cross_entropy`` with class weights, mean reduction).
    """
    logits = class_logits.to(compute_dtype(class_logits))
    b, q, c1 = logits.shape
    target = torch.full((b, q), c1 - 1, dtype=torch.long, device=logits.device)
    for i, (q_idx, g_idx) in enumerate(matches):
        target[i, q_idx] = labels[i].to(device=logits.device, dtype=torch.long)[g_idx]
    weight = torch.ones(c1, dtype=logits.dtype, device=logits.device)
    weight[-1] = no_object_weight
    return F.cross_entropy(logits.reshape(b * q, c1), target.reshape(-1), weight=weight)


def _gather_matched(mask_logits: Tensor, matches: list[tuple[Tensor, Tensor]], per_image: list[Tensor]
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Matched mask logits ``[K, h, w]`` (compute dtype), their per-GT targets ``[K, ...]`` and image ids ``[K]``."""
    logits = mask_logits.to(compute_dtype(mask_logits))
    device = logits.device
    rows, targets, im = [], [], []
    for i, (q_idx, g_idx) in enumerate(matches):
        rows.append(logits[i, q_idx.to(device)])
        targets.append(per_image[i].to(device=device, dtype=logits.dtype)[g_idx.to(device)])
        im.append(torch.full((len(q_idx),), i, dtype=torch.long, device=device))
    return torch.cat(rows), torch.cat(targets), torch.cat(im)


class _SetSupervision(MaskSupervision):
    """What both Box2Mask-T supervisions share: the validated config, and ``losses`` = the per-set losses of
    :meth:`losses_per_set` summed over the prediction sets, each key plus ``out.anchor`` (float32)."""

    def __init__(self, cfg: Box2MaskTConfig | None = None):
        self.cfg = cfg if cfg is not None else Box2MaskTConfig()
        self.cfg.validate()

    def losses_per_set(self, out: QueryOutputs, inputs: SupervisionInputs, step: int) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def losses(self, out: QueryOutputs, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        """The keys of :meth:`losses_per_set` as float32 scalars summed over all prediction sets, each plus
        ``out.anchor``. ``step`` is unused (Box2Mask-T has no warm-up)."""
        per_set = self.losses_per_set(out, inputs, step)
        anchor = out.anchor.float()
        return {key: sum(d[key] for d in per_set) + anchor for key in per_set[0]}


class Box2MaskTSupervision(_SetSupervision):
    """Box2Mask-T supervision: box-level matching and the box-only losses of every prediction set.

    For each prediction set ``s`` of :class:`~boxmask.structures.QueryOutputs` (matched independently, as
    Mask2Former's auxiliary losses):

    1. **Matching** (methods.md §4.2), per image: :func:`match_queries_to_boxes` with cost
       ``match_class_weight * (-softmax[gt]) + match_box_weight * C_box``; ``C_box`` compares the mask logits
       upsampled by :func:`~boxmask.ops.aligned_bilinear` to the full padded resolution with the full-resolution
       binary box masks (:func:`~boxmask.ops.box_masks_at_stride` at stride 1: §2.1's ``M_full``), or -- with
       ``match_full_resolution=False`` -- the stride-4 logits with the stride-4 box masks below.
    2. ``loss_ce = class_weight * CE`` over all ``B * Q`` queries (matched -> GT class, others -> no-object
       with weight ``no_object_weight``), divided by the sum of the targets' class weights.
    3. ``loss_proj = projection_weight * mean_k proj_k`` over the matched masks of the batch, ``proj_k`` the
       BoxInst projection dice (§2.3, eps 1e-5, :func:`~boxmask.ops.projection_terms`) against the box mask
       ``B`` = bilinear (``align_corners=False``) downsample of ``M_full`` to the mask grid (soft borders, §4.3).
    4. ``loss_levelset = levelset_weight * ( mean_k [img_weight E_k(I_img) + deep_weight E_k(I_deep)]
       + lcm_weight L_LCM )`` with ``p = sigmoid``, ``E`` :func:`~boxmask.supervision.levelset.chan_vese_energy`
       inside ``B``; ``I_img`` the ImageNet-normalised image resized to the mask grid; ``I_deep = (F1, F2)``
       from :func:`~boxmask.supervision.levelset.levelset_targets` computed on ``p``, the image and
       ``level_set_feats`` all bilinearly resized to ``work_size x work_size`` and the result resized back;
       ``L_LCM`` = :func:`lcm_loss` at ``work_size`` (``B`` resized too), one global normalisation
       ``sum |p_ref - p| B / max(sum B, 1)`` over the set's matched instances. The two trees (image and
       features) are built once per step and shared by all sets.

    The keys ``loss_ce``, ``loss_proj``, ``loss_levelset`` are sums over the sets (weight 1 each), each plus
    ``out.anchor``; :meth:`losses_per_set` gives the per-set terms for logging. Images without GT boxes
    contribute only no-object CE terms; a set without matches gets ``loss_proj = loss_levelset = 0`` connected
    to its mask logits (and ``level_set_feats``). Box mode: reads images, boxes and labels only -- never
    ``inputs.masks`` / ``has_mask``. All loss math in float32 (float64 inputs stay float64).
    """

    # ---------------------------------------------------------------- batch-level targets

    def _box_targets(self, out: QueryOutputs, inputs: SupervisionInputs, device: torch.device
                     ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: full-resolution binary box masks ``[N, Hp, Wp]`` (None unless matching at full
        resolution) and their bilinear downsample to the mask grid ``[N, h, w]`` (float32)."""
        hp, wp = (int(v) for v in inputs.images.shape[-2:])
        h, w = hp // out.stride, wp // out.stride
        full, soft = [], []
        for boxes in inputs.boxes:
            m_full = box_masks_at_stride(boxes.to(device=device, dtype=torch.float32), (hp, wp), stride=1)
            soft.append(_resize(m_full[:, None], (h, w))[:, 0] if len(m_full) else m_full.new_zeros(0, h, w))
            full.append(m_full if self.cfg.match_full_resolution else None)
        return full, soft

    def _match_set(self, class_logits: Tensor, mask_logits: Tensor, inputs: SupervisionInputs, stride: int,
                   full: list[Tensor], soft: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        cfg = self.cfg
        matches = []
        with torch.no_grad():
            for i in range(class_logits.shape[0]):
                logits = mask_logits[i].detach()
                if cfg.match_full_resolution and len(inputs.labels[i]):  # no GT: nothing to upsample for
                    logits = aligned_bilinear(logits[None].to(compute_dtype(logits)), stride)[0]
                    targets = full[i]
                else:
                    targets = soft[i]
                matches.append(match_queries_to_boxes(
                    class_logits[i].detach(), logits, inputs.labels[i], targets,
                    class_weight=cfg.match_class_weight, box_weight=cfg.match_box_weight, eps=cfg.match_eps))
        return matches

    def matches(self, out: QueryOutputs, inputs: SupervisionInputs) -> list[list[tuple[Tensor, Tensor]]]:
        """The Hungarian assignment of every set and image: ``result[s][i] = (query_idx, gt_idx)`` (int64 ``[K]``
        each, ascending query index), exactly what :meth:`losses` uses."""
        _check_query_outputs("Box2MaskTSupervision", out, inputs)
        device = out.mask_logits[-1].device
        full, soft = self._box_targets(out, inputs, device)
        return [self._match_set(c, m, inputs, out.stride, full, soft)
                for c, m in zip(out.class_logits, out.mask_logits)]

    def _levelset_context(self, out: QueryOutputs, inputs: SupervisionInputs, h: int, w: int,
                          device: torch.device) -> dict:
        """Set-independent level-set inputs of the images that have GT boxes: normalised image on the mask grid
        and at ``work_size``, ``level_set_feats`` at ``work_size``, both trees, and the image -> row remap."""
        cfg = self.cfg
        n_img = inputs.images.shape[0]
        used = torch.tensor([i for i in range(n_img) if len(inputs.boxes[i])], dtype=torch.long, device=device)
        remap = torch.full((n_img,), -1, dtype=torch.long, device=device)
        remap[used] = torch.arange(len(used), device=device)
        mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
        images = (inputs.images.to(device)[used].float() - mean) / std
        img_mask = _resize(images, (h, w))
        ctx = {"remap": remap, "img_mask": img_mask}
        work = (cfg.work_size, cfg.work_size)
        if cfg.deep_weight > 0 or cfg.lcm_weight > 0:
            ctx["img_work"] = _resize(img_mask, work)
        if cfg.lcm_weight > 0 and cfg.lcm_iterations > 0:
            with torch.no_grad():  # per image once, shared by every prediction set and instance
                ctx["lcm_affinity"] = lcm_affinity(ctx["img_work"], cfg.lcm_dilation, cfg.lcm_alpha)
        if cfg.deep_weight > 0:
            feats = _resize(out.level_set_feats.to(device)[used].float(), work)
            ctx["feats_work"] = feats
            ctx["image_tree"] = grid_mst(ctx["img_work"])
            ctx["feat_tree"] = grid_mst(feats)
        return ctx

    def _levelset_losses(self, matched: list[tuple[Tensor, Tensor, Tensor]], ctx: dict) -> list[Tensor]:
        """Level-set loss of each prediction set from its matched ``(logits [K_s, h, w], box masks [K_s, h, w],
        image ids [K_s])``, every ``K_s >= 1``.

        Every term is per instance (the trees and LCM affinities are per image and shared), so the sets are
        concatenated and filtered in one pass, then reduced per set: the values are those of one pass per set,
        with a single run of the tree filters' sequential depth loop instead of one per set (a GPU step was
        launch-bound on those loops, 0.9 s per Lite0 step on an H200).
        """
        cfg = self.cfg
        logits = torch.cat([m[0] for m in matched])
        box = torch.cat([m[1] for m in matched])
        im = torch.cat([m[2] for m in matched])
        sizes = torch.tensor([len(m[0]) for m in matched], device=logits.device)
        set_of = torch.repeat_interleave(torch.arange(len(matched), device=logits.device), sizes)
        h, w = logits.shape[-2:]
        rows = ctx["remap"][im]
        probs = logits.sigmoid()
        per_inst = cfg.img_weight * chan_vese_energy(probs, ctx["img_mask"].to(probs.dtype)[rows], box)
        work = (cfg.work_size, cfg.work_size)
        probs_work = _resize(probs[:, None], work)
        if cfg.deep_weight > 0:
            f1, f2 = levelset_targets(probs_work, ctx["img_work"], ctx["feats_work"], rows,
                                      low_sigma=cfg.low_sigma, high_sigma=cfg.high_sigma,
                                      image_tree=ctx["image_tree"], feat_tree=ctx["feat_tree"])
            deep = _resize(torch.cat([f1, f2], dim=1), (h, w))
            per_inst = per_inst + cfg.deep_weight * chan_vese_energy(probs, deep, box)
        loss = per_inst.new_zeros(len(matched)).index_add(0, set_of, per_inst) / sizes.to(per_inst.dtype)
        if cfg.lcm_weight > 0:
            num, den = _lcm_sums(ctx["img_work"].to(probs_work.dtype)[rows], probs_work, _resize(box[:, None], work),
                                 cfg.lcm_dilation, cfg.lcm_iterations, cfg.lcm_alpha,
                                 ctx["lcm_affinity"][rows] if "lcm_affinity" in ctx else None)
            num = num.new_zeros(len(matched)).index_add(0, set_of, num)
            den = den.new_zeros(len(matched)).index_add(0, set_of, den)
            loss = loss + cfg.lcm_weight * num / den.clamp(min=1.0)
        return list(loss.unbind(0))

    # ---------------------------------------------------------------- losses

    def losses_per_set(self, out: QueryOutputs, inputs: SupervisionInputs, step: int) -> list[dict[str, Tensor]]:
        """Weighted ``{"loss_ce", "loss_proj", "loss_levelset"}`` of each prediction set (no anchor)."""
        cfg = self.cfg
        _, _, h, w = _check_query_outputs("Box2MaskTSupervision", out, inputs)
        feats = out.level_set_feats
        need_feats = cfg.levelset_weight > 0 and cfg.deep_weight > 0
        if need_feats and feats is None:
            raise ValueError("Box2MaskTSupervision: the deep level-set term needs QueryOutputs.level_set_feats "
                             "(the level-set head on the mask features); set deep_weight=0 to train without it")
        if feats is not None and (feats.dim() != 4 or feats.shape[0] != out.mask_logits[0].shape[0]
                                  or tuple(feats.shape[-2:]) != (h, w)):
            raise ValueError(f"Box2MaskTSupervision: level_set_feats must be [B, C, {h}, {w}], got "
                             f"{tuple(feats.shape)}")
        device = out.mask_logits[-1].device
        full, soft = self._box_targets(out, inputs, device)
        results, matched = [], {}
        for s, (class_logits, mask_logits) in enumerate(zip(out.class_logits, out.mask_logits)):
            matches = self._match_set(class_logits, mask_logits, inputs, out.stride, full, soft)
            loss_ce = cfg.class_weight * _classification_loss(class_logits, matches, inputs.labels,
                                                              cfg.no_object_weight)
            logits, box, im = _gather_matched(mask_logits, matches, soft)
            zero = mask_logits.to(compute_dtype(mask_logits)).sum() * 0.0
            if len(logits) == 0:
                loss_proj = zero
                loss_ls = zero + (feats.float().sum() * 0.0 if feats is not None else 0.0)
            else:
                loss_proj = cfg.projection_weight * projection_terms(logits, box).mean()
                loss_ls = zero
                if cfg.levelset_weight > 0:
                    matched[s] = (logits, box, im)
            results.append({"loss_ce": loss_ce, "loss_proj": loss_proj, "loss_levelset": loss_ls})
        if matched:  # all sets in one pass (see _levelset_losses)
            ctx = self._levelset_context(out, inputs, h, w, device)
            for s, loss in zip(matched, self._levelset_losses(list(matched.values()), ctx)):
                results[s]["loss_levelset"] = cfg.levelset_weight * loss
        return results



# ------------------------------------------------------------------------ mask-supervised reference (Mask2Former)


def _pairwise_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE of every (query, GT) pair: ``logits [Q, L]``, ``targets [G, L]`` -> ``[Q, G]``."""
    pos = F.softplus(-logits)  # -log sigmoid(x): loss where t = 1
    neg = F.softplus(logits)   # -log(1 - sigmoid(x)): loss where t = 0
    return (pos @ targets.transpose(0, 1) + neg @ (1.0 - targets).transpose(0, 1)) / logits.shape[1]


@torch.no_grad()
def match_queries_to_masks(
    class_logits: Tensor,
    mask_logits: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    class_weight: float = 2.0,
    bce_weight: float = 5.0,
    dice_weight: float = 5.0,
    eps: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Mask2Former's Hungarian matching of one image's queries to its GT masks (mask-supervised reference).

    ``C = class_weight * (-softmax[gt]) + bce_weight * meanBCE(logits_q, M_g) + dice_weight * dice(p_q, M_g)``,
    with ``dice`` the smoothed ``1 - (2 sum(p t) + eps) / (sum(p^2) + sum(t^2) + eps)`` and all pixels of the
    given grid (stride 4 here; Mask2Former samples 12544 points instead).

    Args:
        class_logits: float ``[Q, C + 1]``; mask_logits: float ``[Q, h, w]``; gt_labels: int ``[G]`` in
            ``[0, C)``; gt_masks: ``[G, h, w]`` 0/1.

    Returns:
        ``(query_idx, gt_idx)`` int64 ``[min(Q, G)]`` each, ascending query index; empty when ``G == 0``.

    Raises:
        ValueError: on shape mismatches, labels out of range or a non-finite cost.
    """
    if class_logits.dim() != 2 or class_logits.shape[1] < 2:
        raise ValueError(f"match_queries_to_masks: class_logits must be [Q, C + 1], got {tuple(class_logits.shape)}")
    q, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    if mask_logits.dim() != 3 or mask_logits.shape[0] != q:
        raise ValueError(f"match_queries_to_masks: mask_logits must be [Q={q}, h, w], got {tuple(mask_logits.shape)}")
    g = gt_labels.shape[0] if gt_labels.dim() == 1 else -1
    if g < 0 or gt_masks.dim() != 3 or gt_masks.shape[0] != g or gt_masks.shape[1:] != mask_logits.shape[1:]:
        raise ValueError(f"match_queries_to_masks: need gt_labels [G] and gt_masks [G, {mask_logits.shape[1]}, "
                         f"{mask_logits.shape[2]}], got {tuple(gt_labels.shape)} and {tuple(gt_masks.shape)}")
    device = class_logits.device
    if g and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= num_classes):
        raise ValueError(f"match_queries_to_masks: gt_labels must lie in [0, {num_classes})")
    if g == 0 or q == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    dtype = compute_dtype(mask_logits)
    logits = mask_logits.to(dtype).flatten(1)
    targets = gt_masks.to(device=logits.device, dtype=dtype).flatten(1)
    cost_class = -class_logits.to(dtype).softmax(-1)[:, gt_labels.to(device=device, dtype=torch.long)]
    cost = (class_weight * cost_class.to(logits.device) + bce_weight * _pairwise_bce_cost(logits, targets)
            + dice_weight * _pairwise_dice_cost(logits.sigmoid(), targets, eps))
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("match_queries_to_masks: non-finite matching cost (NaN/inf in the logits?)")
    rows, cols = linear_sum_assignment(cost.cpu().double().numpy())
    query_idx = torch.as_tensor(rows, dtype=torch.int64)
    gt_idx = torch.as_tensor(cols, dtype=torch.int64)
    order = torch.argsort(query_idx)
    return query_idx[order].to(device), gt_idx[order].to(device)


class Box2MaskTFullSupervision(_SetSupervision):
    """Mask-supervised Mask2Former reference for Box2Mask-T's network (the upper bound the paper compares to).

    Per prediction set: :func:`match_queries_to_masks` against the GT masks point-sampled at the mask stride
    (:func:`~boxmask.supervision.full.gt_masks_at_stride`) with weights ``match_class_weight`` /
    ``mask_bce_weight`` / ``mask_dice_weight`` (eps ``match_eps``); ``loss_ce`` as
    :class:`Box2MaskTSupervision`; ``loss_mask_bce = mask_bce_weight * mean_k meanBCE_k`` and
    ``loss_mask_dice = mask_dice_weight * mean_k dice_k`` (:func:`~boxmask.supervision.full.dice_loss`,
    CondInst dice, eps 1e-5) over the matched masks. Keys summed over the sets, each plus ``out.anchor``;
    zero-match sets give graph-connected zeros for the mask terms.

    Reads ``inputs.masks``; every GT needs a mask (``has_mask`` all True or None).
    """

    def _gt_masks(self, inputs: SupervisionInputs, stride: int, device: torch.device) -> list[Tensor]:
        who = "Box2MaskTFullSupervision"
        if inputs.masks is None:
            raise ValueError(f"{who} needs ground-truth masks but SupervisionInputs.masks is None (box-only "
                             "data: use Box2MaskTSupervision)")
        if len(inputs.masks) != len(inputs.boxes):
            raise ValueError(f"{who}: {len(inputs.masks)} mask tensors for {len(inputs.boxes)} images")
        for i, (m, b) in enumerate(zip(inputs.masks, inputs.boxes)):
            if m.dim() != 3 or m.shape[0] != b.shape[0]:
                raise ValueError(f"{who}: image {i}: masks of shape {tuple(m.shape)} for {b.shape[0]} boxes")
        if inputs.has_mask is not None and not all(bool(h.all()) for h in inputs.has_mask):
            raise ValueError(f"{who}: some GTs have no mask annotation (has_mask False); every GT needs a mask")
        padded_hw = tuple(inputs.images.shape[-2:])
        return [gt_masks_at_stride([m], padded_hw, stride).to(device) for m in inputs.masks]

    def matches(self, out: QueryOutputs, inputs: SupervisionInputs) -> list[list[tuple[Tensor, Tensor]]]:
        """``result[s][i] = (query_idx, gt_idx)`` of every set and image, as used by :meth:`losses`."""
        _check_query_outputs("Box2MaskTFullSupervision", out, inputs)
        gt = self._gt_masks(inputs, out.stride, out.mask_logits[-1].device)
        return [self._match_set(c, m, inputs, gt) for c, m in zip(out.class_logits, out.mask_logits)]

    def _match_set(self, class_logits: Tensor, mask_logits: Tensor, inputs: SupervisionInputs,
                   gt: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        cfg = self.cfg
        return [match_queries_to_masks(class_logits[i].detach(), mask_logits[i].detach(), inputs.labels[i], gt[i],
                                       class_weight=cfg.match_class_weight, bce_weight=cfg.mask_bce_weight,
                                       dice_weight=cfg.mask_dice_weight, eps=cfg.match_eps)
                for i in range(class_logits.shape[0])]

    def losses_per_set(self, out: QueryOutputs, inputs: SupervisionInputs, step: int) -> list[dict[str, Tensor]]:
        """Weighted ``{"loss_ce", "loss_mask_bce", "loss_mask_dice"}`` of each prediction set (no anchor)."""
        cfg = self.cfg
        _check_query_outputs("Box2MaskTFullSupervision", out, inputs)
        gt = self._gt_masks(inputs, out.stride, out.mask_logits[-1].device)
        results = []
        for class_logits, mask_logits in zip(out.class_logits, out.mask_logits):
            matches = self._match_set(class_logits, mask_logits, inputs, gt)
            loss_ce = cfg.class_weight * _classification_loss(class_logits, matches, inputs.labels,
                                                              cfg.no_object_weight)
            logits, targets, _ = _gather_matched(mask_logits, matches, gt)
            if len(logits) == 0:
                zero = mask_logits.to(compute_dtype(mask_logits)).sum() * 0.0
                loss_bce, loss_dice = zero, zero
            else:
                bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
                loss_bce = cfg.mask_bce_weight * bce.mean()
                loss_dice = cfg.mask_dice_weight * dice_loss(logits, targets).mean()
            results.append({"loss_ce": loss_ce, "loss_mask_bce": loss_bce, "loss_mask_dice": loss_dice})
        return results

