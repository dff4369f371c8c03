"""SIM building blocks: momentum teacher, class prototypes, semantic/instance maps, pseudo masks and their loss.

Li et al., "SIM: Semantic-aware Instance Mask Generation for Box-Supervised Instance Segmentation",
CVPR 2023; details follow methods.md §5.1-5.5, which records where the released code and the paper
differ. Every paper/code difference is exposed as an argument whose default follows the paper (the
recommendation of methods.md §5.5), except where noted. Known code bugs are *not* reproduced: the
prototypes are unit-normalised along the feature axis D (the code normalises along the prototype axis
L, §5.3) and the code-style focal BCE is computed on real logits (the code feeds probabilities, §5.5).

All functions are pure (no module state) and compute in float32 even for bf16/fp16 inputs (float64
stays float64). Everything that builds a *target* -- prototypes, semantic/instance maps, thresholds,
pseudo masks -- runs under ``torch.no_grad``; only :func:`pseudo_mask_loss` is meant to be
differentiated. Typical use per training step (after the student's optimiser step):
:func:`ema_update_` (teacher), :func:`update_prototypes` (per image, with pixels of ``M_bin``), then from
iteration 10k on :func:`semantic_map` + :func:`instance_map` -> ``M_prob = 0.5 M_S + 0.5 M_I`` ->
:func:`pseudo_mask_targets` -> :func:`pseudo_mask_loss`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import as_khw, compute_dtype, row_dice_loss
from .color import neighbor_offsets, shifted_slices

__all__ = [
    "adaptive_high_threshold",
    "ema_update_",
    "feature_similarity",
    "hard_assignment",
    "init_prototypes",
    "instance_map",
    "iou_weights",
    "pseudo_mask_loss",
    "pseudo_mask_targets",
    "semantic_map",
    "sinkhorn_knopp",
    "update_prototypes",
]

_NORM_EPS = 1e-12  # F.normalize floor: a zero vector stays zero instead of becoming NaN


def _check_index(x: Tensor, k: int, name: str, what: str) -> Tensor:
    """Validate an integer ``[K]`` index vector and return it as int64."""
    if x.shape != (k,):
        raise ValueError(f"{name}: {what} must be [K] = [{k}], got {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name}: {what} must be an integer tensor, got {x.dtype}")
    return x.long()


def _group_ids(gt_inds: Tensor, im_inds: Tensor) -> tuple[Tensor, int]:
    """Dense id of each positive's (image, GT) pair: int64 ``[K]`` in ``[0, G)`` and ``G``."""
    if gt_inds.numel() == 0:
        return gt_inds.new_zeros(0), 0
    keys = torch.stack([im_inds, gt_inds.to(im_inds.device)], dim=1)
    uniq, group = torch.unique(keys, dim=0, return_inverse=True)
    return group, int(uniq.shape[0])


# ------------------------------------------------------------------------------------------- §5.1 teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float = 0.9999) -> None:
    """In-place momentum (EMA) update of the teacher from the student (methods.md §5.1).

    For every parameter ``θ_t <- m θ_t + (1 - m) θ_s``; every buffer (BN running statistics,
    ``num_batches_tracked``, ...) is copied from the student. SIM calls this every iteration after the
    student's optimiser step with ``m = 0.9999``. Parameters and buffers are matched by name
    (``named_parameters`` / ``named_buffers``); everything is validated before anything is written, so a
    mismatch leaves the teacher untouched. The student value is cast to the teacher's dtype/device.

    Args:
        teacher: the momentum network, updated in place (its ``requires_grad`` flags are not touched).
        student: the trained network with the same parameter and buffer names and shapes.
        momentum: ``m`` in ``[0, 1]``; 1 keeps the teacher's parameters, 0 copies the student's.

    Returns:
        None.

    Raises:
        ValueError: if ``momentum`` is outside ``[0, 1]``, or the two modules' parameter or buffer
            names or shapes differ.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update_: momentum must be in [0, 1], got {momentum}")
    pairs = []
    for kind, t_items, s_items in (
        ("parameter", teacher.named_parameters(), student.named_parameters()),
        ("buffer", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            missing = sorted(s_dict.keys() - t_dict.keys())
            extra = sorted(t_dict.keys() - s_dict.keys())
            raise ValueError(
                f"ema_update_: {kind} names differ (only in student: {missing[:5]}, only in teacher: {extra[:5]})"
            )
        for name, t in t_dict.items():
            if t.shape != s_dict[name].shape:
                raise ValueError(
                    f"ema_update_: {kind} {name!r} has shape {tuple(t.shape)} in the teacher but "
                    f"{tuple(s_dict[name].shape)} in the student"
                )
            pairs.append((kind, t, s_dict[name]))
    for kind, t, s in pairs:
        s = s.detach().to(device=t.device, dtype=t.dtype)
        if kind == "buffer":
            t.copy_(s)
        else:
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)


# ---------------------------------------------------------------------------------------- §5.3 prototypes


def sinkhorn_knopp(
    logits: Tensor, epsilon: float = 0.05, iterations: int = 3, *, return_plan: bool = False
) -> Tensor:
    """Sinkhorn-Knopp equipartition of N pixels over L prototypes (methods.md §5.3 step 3).

    ``Q = exp(logits / ε)``, normalised to total mass 1, then ``iterations`` rounds of: scale each
    prototype's column so it sums to ``1/L``, then each pixel's row so it sums to ``1/N``. That is the
    entropic optimal-transport plan between uniform marginals (as ``iterations`` grows). The returned
    assignment rescales each pixel's row to sum to 1 (the code's final ``Q *= N``; done as an explicit
    row normalisation so ``iterations = 0`` also gives rows summing to 1). Computed in the log domain
    (``logsumexp`` normalisations), so ``ε = 0.05`` on cosines (exponents up to ±20) cannot overflow.
    Differentiable in ``logits``, although SIM uses it without gradient. The paper's layout ``[L, N]``
    (``Q^T``) is used transposed here: rows are pixels.

    Args:
        logits: float ``[N, L]`` pixel-prototype scores (SIM: cosine similarities in [-1, 1]).
        epsilon: entropy regularisation ``ε > 0`` (SIM: 0.05); smaller means harder assignments.
        iterations: number of (prototype, pixel) normalisation rounds, ``>= 0`` (SIM: 3).
        return_plan: return the transport plan before the final rescale instead of the assignment.

    Returns:
        float32 ``[N, L]`` (float64 for float64 ``logits``), values in [0, 1]. Default: assignment ``Q``
        whose rows (pixels) sum to 1. With ``return_plan``: the plan, whose rows sum to ``1/N`` exactly
        (when ``iterations >= 1``) and whose columns (prototypes) sum to ``1/L`` up to the Sinkhorn
        convergence error (after 3 iterations only approximately). ``[0, L]`` for ``N = 0``.

    Raises:
        ValueError: if ``logits`` is not 2-D with ``L >= 1``, ``epsilon <= 0`` or ``iterations < 0``.
    """
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"sinkhorn_knopp: logits must be [N, L] with L >= 1, got {tuple(logits.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn_knopp: epsilon must be > 0, got {epsilon}")
    if iterations < 0:
        raise ValueError(f"sinkhorn_knopp: iterations must be >= 0, got {iterations}")
    x = logits.to(compute_dtype(logits))
    n, num_protos = x.shape
    if n == 0:
        return x.new_zeros(0, num_protos)
    log_q = x / epsilon
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)  # total mass 1
    log_n, log_l = math.log(n), math.log(num_protos)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_l  # each prototype: 1/L
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_n  # each pixel: 1/N
    if return_plan:
        return log_q.exp()
    return (log_q - torch.logsumexp(log_q, dim=1, keepdim=True)).exp()


def hard_assignment(
    q: Tensor, gumbel_tau: float | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Hard prototype index of each pixel from a soft assignment (methods.md §5.3 step 3).

    Paper (default, ``gumbel_tau=None``): the indicator ``argmax_l q_il``. Code: a hard Gumbel-softmax
    ``F.gumbel_softmax(Q, tau=0.5, hard=True)`` applied to ``Q`` as if it were logits, whose one-hot
    output is ``argmax_l (q_il + g_il)`` with i.i.d. standard Gumbel noise ``g`` -- the temperature
    only scales the soft sample, so it does not change the hard index (it is validated, not used).
    Note that with ``q`` in [0, 1] the unit-scale noise dominates, i.e. the code's assignment is
    close to random; prefer the paper's argmax.

    Args:
        q: float ``[N, L]`` soft assignment (:func:`sinkhorn_knopp`).
        gumbel_tau: ``None`` for argmax (paper) or the Gumbel-softmax temperature ``> 0`` (code: 0.5).
        generator: optional ``torch.Generator`` on ``q``'s device for the Gumbel noise (reproducibility).

    Returns:
        int64 ``[N]`` in ``[0, L)`` on ``q``'s device (empty for ``N = 0``).

    Raises:
        ValueError: if ``q`` is not ``[N, L]`` with ``L >= 1`` or ``gumbel_tau <= 0``.
    """
    if q.dim() != 2 or q.shape[1] < 1:
        raise ValueError(f"hard_assignment: q must be [N, L] with L >= 1, got {tuple(q.shape)}")
    if gumbel_tau is not None and not gumbel_tau > 0:
        raise ValueError(f"hard_assignment: gumbel_tau must be > 0 or None, got {gumbel_tau}")
    if q.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=q.device)
    scores = q.to(compute_dtype(q))
    if gumbel_tau is not None:
        u = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
        # g = -log(-log U); the clamp keeps U in (0, 1) so g is finite
        tiny = torch.finfo(scores.dtype).tiny
        u = u.clamp(min=tiny, max=1.0 - torch.finfo(scores.dtype).eps)
        scores = scores - torch.log(-torch.log(u))
    return scores.argmax(dim=1)


@torch.no_grad()
def init_prototypes(
    num_classes: int,
    num_protos: int = 10,
    dim: int = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Initial class prototypes ``P``: truncated normal (std 0.02), unit-normalised along D (methods.md §5.3).

    The truncation bounds are the ``torch.nn.init.trunc_normal_`` / timm defaults used by the code,
    ``[-2, 2]`` in absolute value (i.e. effectively untruncated at std 0.02). Normalised along the
    feature axis D, as intended -- not along L as the released code does.

    Args:
        num_classes: ``C >= 1`` (the detector's number of classes; set it for custom data, §7).
        num_protos: prototypes per class ``L >= 1`` (SIM: 10).
        dim: feature dimension ``D >= 1`` (SIM: ``C_mask = 16``).
        generator: optional ``torch.Generator`` (on ``device``) for reproducible initialisation.
        device: where to allocate (default: CPU).

    Returns:
        float32 ``[C, L, D]`` with ``||P[c, l, :]||_2 = 1``; no gradient.

    Raises:
        ValueError: if any size is < 1.
    """
    if num_classes < 1 or num_protos < 1 or dim < 1:
        raise ValueError(
            f"init_prototypes: num_classes, num_protos and dim must be >= 1, got {(num_classes, num_protos, dim)}"
        )
    protos = torch.empty(num_classes, num_protos, dim, dtype=torch.float32, device=device)
    nn.init.trunc_normal_(protos, std=0.02, generator=generator)
    return F.normalize(protos, dim=2, eps=_NORM_EPS)


@torch.no_grad()
def update_prototypes(
    prototypes: Tensor,
    feats: Tensor,
    labels: Tensor,
    momentum: float = 0.999,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    centroid_feats: Tensor | None = None,
    gumbel_tau: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One online prototype update from a set of labelled pixels (methods.md §5.3, steps 2-4).

    For each class ``c`` present in ``labels``: the unit-normalised features ``z_i`` of its pixels are
    scored against its ``L`` (normalised) prototypes by cosine similarity, assigned with
    :func:`sinkhorn_knopp` (``ε``, ``iterations``) and :func:`hard_assignment`, and each prototype with at
    least one assigned pixel moves to ``p_l <- normalize(m p_l + (1 - m) f_l)`` with the centroid
    ``f_l = normalize(sum_{i -> l} z_i)``. Prototypes with no assigned pixel, and all prototypes of
    absent classes, are returned bit-identical. Normalisation is along D (unit norm per prototype).

    SIM updates per image, sequentially, with the pixels of that image's positives where
    ``M_bin = [M_I > 0.7] B`` is 1 (step 1, done by the caller) -- call this once per image to match.
    The cross-GPU average of step 5 is also the caller's job.

    Args:
        prototypes: float ``[C, L, D]`` current prototypes (unit norm along D; not modified).
        feats: float ``[N, D]`` pixel features used for the assignment (code: teacher features); they
            are L2-normalised here.
        labels: int64 ``[N]`` class of each pixel, in ``[0, C)``.
        momentum: ``m`` in ``[0, 1]`` (SIM: 0.999).
        epsilon, iterations: Sinkhorn parameters (SIM: 0.05, 3).
        centroid_feats: optional float ``[N, D]`` features the centroids are averaged from (code: the
            student's features, while the assignment uses the teacher's); default ``feats`` (paper).
        gumbel_tau, generator: hard-assignment variant, see :func:`hard_assignment` (default: argmax).

    Returns:
        New float32 ``[C, L, D]`` tensor (float64 for float64 ``prototypes``) on ``prototypes``' device,
        no gradient.

    Raises:
        ValueError: on shape mismatch, labels out of range or ``momentum`` outside ``[0, 1]``.
    """
    if prototypes.dim() != 3:
        raise ValueError(f"update_prototypes: prototypes must be [C, L, D], got {tuple(prototypes.shape)}")
    num_classes, _, dim = prototypes.shape
    if feats.dim() != 2 or feats.shape[1] != dim:
        raise ValueError(f"update_prototypes: feats must be [N, D] with D = {dim}, got {tuple(feats.shape)}")
    n = feats.shape[0]
    labels = _check_index(labels, n, "update_prototypes", "labels")
    if centroid_feats is not None and centroid_feats.shape != feats.shape:
        raise ValueError(
            f"update_prototypes: centroid_feats shape {tuple(centroid_feats.shape)} != feats {tuple(feats.shape)}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"update_prototypes: momentum must be in [0, 1], got {momentum}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"update_prototypes: labels must be in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    dtype = compute_dtype(prototypes)
    device = prototypes.device
    new = prototypes.detach().to(dtype).clone()
    z = F.normalize(feats.detach().to(device=device, dtype=dtype), dim=1, eps=_NORM_EPS)
    zc = z if centroid_feats is None else F.normalize(
        centroid_feats.detach().to(device=device, dtype=dtype), dim=1, eps=_NORM_EPS
    )
    labels = labels.to(device)
    for c in torch.unique(labels).tolist():
        sel = labels == c
        protos_c = new[c]  # [L, D]
        cos = z[sel] @ F.normalize(protos_c, dim=1, eps=_NORM_EPS).T  # [N_c, L]
        q = sinkhorn_knopp(cos, epsilon, iterations)
        assign = hard_assignment(q, gumbel_tau, generator)
        sums = torch.zeros_like(protos_c).index_add_(0, assign, zc[sel])  # [L, D]
        counts = torch.bincount(assign, minlength=protos_c.shape[0])
        hit = counts > 0
        centroids = F.normalize(sums[hit], dim=1, eps=_NORM_EPS)
        # only the hit prototypes are rewritten, so the others stay bit-identical
        new[c, hit] = F.normalize(momentum * protos_c[hit] + (1.0 - momentum) * centroids, dim=1, eps=_NORM_EPS)
    return new


# ------------------------------------------------------------------------------------- §5.4 pseudo masks


@torch.no_grad()
def semantic_map(feats: Tensor, prototypes_of_class: Tensor, temperature: float | None = 0.1) -> Tensor:
    """Semantic map ``M_S = sigmoid(max_l cos(z_i, p_l) / τ)`` of each positive (methods.md §5.4).

    ``z`` are the teacher's mask features of the positive's image at stride 4, unit-normalised along
    D; ``p_l`` are the L prototypes of the positive's class (normalised here too, so the score is a true
    cosine). Paper: ``τ = 0.1``; ``temperature=None`` reproduces the code (no temperature, i.e. values
    confined to ``[σ(-1), σ(1)] = [0.27, 0.73]``). The max over prototypes is accumulated one
    prototype at a time, so no ``[K, L, h, w]`` tensor is built.

    Args:
        feats: float ``[K, D, h, w]`` features per positive (e.g. ``teacher_feats[im_inds]``).
        prototypes_of_class: float ``[K, L, D]`` prototypes of each positive's class
            (e.g. ``prototypes[labels]``).
        temperature: ``τ > 0`` or ``None`` (code).

    Returns:
        float32 ``[K, h, w]`` (float64 for float64 ``feats``) in (0, 1); no gradient.

    Raises:
        ValueError: on shape mismatch or ``temperature <= 0``.
    """
    if feats.dim() != 4:
        raise ValueError(f"semantic_map: feats must be [K, D, h, w], got {tuple(feats.shape)}")
    k, dim, h, w = feats.shape
    if prototypes_of_class.dim() != 3 or prototypes_of_class.shape[0] != k or prototypes_of_class.shape[2] != dim:
        raise ValueError(
            f"semantic_map: prototypes_of_class must be [K, L, D] = [{k}, L, {dim}], "
            f"got {tuple(prototypes_of_class.shape)}"
        )
    if prototypes_of_class.shape[1] < 1:
        raise ValueError("semantic_map: need at least one prototype per class (L >= 1)")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"semantic_map: temperature must be > 0 or None, got {temperature}")
    dtype = compute_dtype(feats)
    z = F.normalize(feats.to(dtype), dim=1, eps=_NORM_EPS).reshape(k, dim, h * w)
    p = F.normalize(prototypes_of_class.to(device=feats.device, dtype=dtype), dim=2, eps=_NORM_EPS)
    best = None
    for l in range(p.shape[1]):  # noqa: E741 - l indexes prototypes as in the paper
        cos = torch.bmm(p[:, l : l + 1], z)[:, 0]  # [K, h*w]
        best = cos if best is None else torch.maximum(best, cos)
    if temperature is not None:
        best = best / temperature
    return best.sigmoid().reshape(k, h, w)


@torch.no_grad()
def iou_weights(pred_boxes: Tensor, gt_boxes: Tensor, mu: float = 5.0) -> Tensor:
    """Instance-map weights ``w_k = exp(μ IoU(pred_k, gt_k))`` of the paper (methods.md §5.4).

    Elementwise (row k with row k) IoU of ``(x1, y1, x2, y2)`` boxes; a degenerate pair with zero union
    has IoU 0. Not in the released code (it averages the positives uniformly). The weights need no
    normalisation: :func:`instance_map` divides by their sum per GT.

    Args:
        pred_boxes: float ``[K, 4]`` xyxy boxes predicted by the (teacher) detector at each positive.
        gt_boxes: float ``[K, 4]`` xyxy box of each positive's GT (same units).
        mu: ``μ`` (paper: 5).

    Returns:
        float32 ``[K]`` in ``[1, exp(μ)]`` (for ``μ >= 0``); no gradient.

    Raises:
        ValueError: if the inputs are not both ``[K, 4]``.
    """
    if pred_boxes.dim() != 2 or pred_boxes.shape[1] != 4 or pred_boxes.shape != gt_boxes.shape:
        raise ValueError(
            f"iou_weights: pred_boxes and gt_boxes must both be [K, 4], got {tuple(pred_boxes.shape)} "
            f"and {tuple(gt_boxes.shape)}"
        )
    dtype = torch.float64 if pred_boxes.dtype == torch.float64 else torch.float32
    a = pred_boxes.to(dtype)
    b = gt_boxes.to(device=a.device, dtype=dtype)
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    union = area_a + area_b - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(union))
    return torch.exp(mu * iou)


@torch.no_grad()
def instance_map(
    probs: Tensor, gt_inds: Tensor, im_inds: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Instance map ``M_I``: per positive, the weighted mean teacher mask of its GT's positives (methods.md §5.4).

    Positives are grouped by (image, GT index); every positive of a group gets the same map
    ``sum_j w_j p_j / sum_j w_j`` over the group's positives j. ``weights=None`` gives the plain mean
    (released code); the paper uses ``w = exp(5 IoU(pred box, gt box))``, see :func:`iou_weights`.

    Args:
        probs: float ``[K, h, w]`` or ``[K, 1, h, w]`` teacher mask probabilities in [0, 1].
        gt_inds: int64 ``[K]`` GT index of each positive inside its image.
        im_inds: int64 ``[K]`` image index of each positive.
        weights: optional float ``[K]`` strictly positive weights.

    Returns:
        float32 ``[K, h, w]`` (float64 for float64 ``probs``) in [0, 1]; no gradient.

    Raises:
        ValueError: on shape mismatch or non-positive weights.
    """
    p = as_khw(probs, "instance_map", "probs")
    k = p.shape[0]
    gt_inds = _check_index(gt_inds, k, "instance_map", "gt_inds").to(p.device)
    im_inds = _check_index(im_inds, k, "instance_map", "im_inds").to(p.device)
    if weights is None:
        w = p.new_ones(k)
    else:
        if weights.shape != (k,):
            raise ValueError(f"instance_map: weights must be [K] = [{k}], got {tuple(weights.shape)}")
        w = weights.to(device=p.device, dtype=p.dtype)
        if k and not bool((w > 0).all()):
            raise ValueError("instance_map: weights must be > 0")
    if k == 0:
        return p.clone()
    group, num_groups = _group_ids(gt_inds, im_inds)
    num = p.new_zeros(num_groups, *p.shape[1:]).index_add_(0, group, p * w[:, None, None])
    den = p.new_zeros(num_groups).index_add_(0, group, w)
    return (num / den[:, None, None])[group]


@torch.no_grad()
def adaptive_high_threshold(
    m_prob: Tensor,
    m_inst: Tensor,
    box_masks: Tensor,
    gt_inds: Tensor,
    im_inds: Tensor,
    high_range: tuple[float, float] = (0.7, 0.8),
    inst_thr: float = 0.7,
) -> Tensor:
    """Adaptive upper threshold ``τ_high`` of each positive (methods.md §5.4).

    Per positive k: ``n_k = #{i in box : M_I,i > inst_thr}``; sort ``M_prob B`` (all h*w values, zeros
    outside the box) in descending order and take the value at 0-based index ``n_k`` (the
    ``(n_k + 1)``-th largest; the index is clamped to the last element). Those values are averaged over
    the positives of the same (image, GT) and the mean is clamped to ``high_range``.

    Args:
        m_prob: float ``[K, h, w]`` mixed map ``M_prob = (1 - α) M_S + α M_I`` in [0, 1].
        m_inst: float ``[K, h, w]`` instance map ``M_I`` (:func:`instance_map`).
        box_masks: ``[K, h, w]`` 0/1 box masks of each positive's GT.
        gt_inds, im_inds: int64 ``[K]`` GT and image index of each positive.
        high_range: ``(lo, hi)`` clamp of ``τ_high`` (SIM: (0.7, 0.8)), ``lo <= hi``.
        inst_thr: threshold on ``M_I`` that counts the confident pixels (SIM: 0.7).

    Returns:
        float32 ``[K]`` (float64 for float64 ``m_prob``) in ``high_range``, equal within a GT; no gradient.

    Raises:
        ValueError: on shape mismatch or ``high_range[0] > high_range[1]``.
    """
    mp = as_khw(m_prob, "adaptive_high_threshold", "m_prob")
    k, h, w = mp.shape
    mi = as_khw(m_inst, "adaptive_high_threshold", "m_inst").to(mp.device)
    if mi.shape != mp.shape:
        raise ValueError(f"adaptive_high_threshold: m_inst shape {tuple(m_inst.shape)} != m_prob {tuple(mp.shape)}")
    if box_masks.shape != mp.shape:
        raise ValueError(
            f"adaptive_high_threshold: box_masks must be [K, h, w] = {(k, h, w)}, got {tuple(box_masks.shape)}"
        )
    lo, hi = (float(v) for v in high_range)
    if lo > hi:
        raise ValueError(f"adaptive_high_threshold: high_range must be (lo, hi) with lo <= hi, got {high_range}")
    gt_inds = _check_index(gt_inds, k, "adaptive_high_threshold", "gt_inds").to(mp.device)
    im_inds = _check_index(im_inds, k, "adaptive_high_threshold", "im_inds").to(mp.device)
    if k == 0 or h * w == 0:
        return mp.new_full((k,), lo)
    box = box_masks.to(device=mp.device, dtype=mp.dtype)
    n = ((mi > inst_thr) & (box > 0.5)).flatten(1).sum(dim=1)  # [K] int64
    ranked = (mp * box).flatten(1).sort(dim=1, descending=True).values
    value = ranked.gather(1, n.clamp(max=h * w - 1)[:, None])[:, 0]
    group, num_groups = _group_ids(gt_inds, im_inds)
    total = mp.new_zeros(num_groups).index_add_(0, group, value)
    count = mp.new_zeros(num_groups).index_add_(0, group, torch.ones_like(value))
    return (total / count).clamp(lo, hi)[group]


@torch.no_grad()
def pseudo_mask_targets(
    m_prob: Tensor,
    m_inst: Tensor,
    box_masks: Tensor,
    gt_inds: Tensor,
    im_inds: Tensor,
    low: float = 0.4,
    high_range: tuple[float, float] = (0.7, 0.8),
    inst_thr: float = 0.7,
) -> tuple[Tensor, Tensor]:
    """Pseudo mask and its valid (non-ignored) region from the mixed map (methods.md §5.4).

    With ``τ_high`` from :func:`adaptive_high_threshold` (per positive, shared within a GT):
    ``target = [M_prob > τ_high] B`` and ``valid = ([M_prob > τ_high] or [M_prob < low]) B``; pixels with
    ``low <= M_prob <= τ_high`` and everything outside the box are ignored.

    Args:
        m_prob: float ``[K, h, w]`` (or ``[K, 1, h, w]``) mixed map ``M_prob`` in [0, 1].
        m_inst: float ``[K, h, w]`` instance map ``M_I``.
        box_masks: ``[K, h, w]`` 0/1 box masks of each positive's GT.
        gt_inds, im_inds: int64 ``[K]`` GT and image index of each positive.
        low: ``τ_low`` (SIM: 0.4).
        high_range: clamp of the adaptive ``τ_high`` (SIM: (0.7, 0.8)).
        inst_thr: ``M_I`` threshold of the confident-pixel count (SIM: 0.7).

    Returns:
        ``(target, valid)``: float32 ``[K, h, w]`` of 0/1 and bool ``[K, h, w]``; ``target <= valid``.

    Raises:
        ValueError: on shape mismatch or an invalid ``high_range``.
    """
    tau = adaptive_high_threshold(m_prob, m_inst, box_masks, gt_inds, im_inds, high_range, inst_thr)
    mp = as_khw(m_prob, "pseudo_mask_targets", "m_prob")
    in_box = box_masks.to(mp.device) > 0.5
    above = mp > tau[:, None, None]
    target = (above & in_box).to(torch.float32)
    valid = (above | (mp < low)) & in_box
    return target, valid


# --------------------------------------------------------------------------------------------- §5.5 loss


def pseudo_mask_loss(
    mask_logits: Tensor,
    target: Tensor,
    valid: Tensor,
    mode: str = "paper",
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """SIM pseudo-mask loss of the student's mask logits (methods.md §5.5).

    ``mode="paper"`` (default): per instance k with ``W`` = ``valid``,
    ``BCE_k = sum W * BCEWithLogits(z, t) / sum W`` plus ``dice_k`` on the valid pixels
    (``1 - 2 sum(p t W) / (sum((p W)^2) + sum((t W)^2) + 1e-5)``, the BoxInst dice), then the mean over
    all K instances; an instance with no valid pixel contributes 0 (it has no supervision).
    Multiply by ``λ1 = 0.5`` and enable after the 10k warm-up (caller).

    ``mode="code"``: focal-style BCE over all instances and pixels,
    ``sum W α_t (1 - p_t)^γ BCE / (sum W + 1)`` with ``p = σ(z)``, ``p_t = p t + (1-p)(1-t)``,
    ``α_t = α t + (1-α)(1-t)``. The released code passes *probabilities* into the BCE-with-logits
    (and into the focal factor); that bug is not reproduced -- real logits are used. The code weights it
    ``0.3 min(iter / 270000, 1)`` (caller).

    Invalid pixels have weight zero in both modes: their logits get zero gradient and do not change
    the value. Targets and the valid mask carry no gradient.

    Args:
        mask_logits: ``[K, 1, h, w]`` or ``[K, h, w]`` student mask logits at stride 4, any float dtype.
        target: ``[K, h, w]`` 0/1 pseudo mask (:func:`pseudo_mask_targets`).
        valid: ``[K, h, w]`` bool (or 0/1) valid region.
        mode: ``"paper"`` or ``"code"``.
        alpha, gamma: focal parameters of ``mode="code"`` (0.25, 2).

    Returns:
        float32 scalar (float64 for float64 logits), ``>= 0``; ``mask_logits.sum() * 0`` when ``K == 0``
        (stays connected to the graph).

    Raises:
        ValueError: on shape mismatch or an unknown ``mode``.
    """
    logits = as_khw(mask_logits, "pseudo_mask_loss", "mask_logits")
    if mode not in ("paper", "code"):
        raise ValueError(f"pseudo_mask_loss: mode must be 'paper' or 'code', got {mode!r}")
    if target.shape != logits.shape:
        raise ValueError(f"pseudo_mask_loss: target shape {tuple(target.shape)} != mask logits {tuple(logits.shape)}")
    if valid.shape != logits.shape:
        raise ValueError(f"pseudo_mask_loss: valid shape {tuple(valid.shape)} != mask logits {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    t = target.detach().to(device=logits.device, dtype=logits.dtype)
    wgt = valid.detach().to(device=logits.device, dtype=logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    if mode == "code":
        p = logits.sigmoid()
        p_t = p * t + (1.0 - p) * (1.0 - t)
        a_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        return (wgt * a_t * (1.0 - p_t).pow(gamma) * bce).sum() / (wgt.sum() + 1.0)
    n_valid = wgt.sum(dim=(1, 2))
    bce_k = (bce * wgt).sum(dim=(1, 2)) / n_valid.clamp(min=1.0)
    dice_k = row_dice_loss((logits.sigmoid() * wgt).flatten(1), (t * wgt).flatten(1))
    # an instance without valid pixels would otherwise add a constant dice of 1
    per_instance = torch.where(n_valid > 0, bce_k + dice_k, torch.zeros_like(bce_k))
    return per_instance.mean()


@torch.no_grad()
def feature_similarity(feats: Tensor, dilation: int = 2) -> Tensor:
    """Feature affinity ``S^feat_ij = exp(-||z_i - z_j||_2)`` to the 8 dilated neighbours (methods.md §5.2).

    The released SIM code multiplies this into BoxInst's colour similarity (the pairwise edges are
    ``[S^feat S^LAB >= 0.1] B``); the paper does not mention it. ``z`` are the teacher's mask features
    upsampled to the mask stride, as given (not normalised, like the code). No gradient.

    Args:
        feats: float ``[B, D, h, w]`` features at the mask stride (stride 4 for CondInst).
        dilation: neighbour dilation in cells, as for :func:`~boxmask.supervision.color.lab_color_similarity`.

    Returns:
        float32 ``[B, 8, h, w]`` in ``(0, 1]``; channel ``o`` is the neighbour at ``neighbor_offsets(dilation)[o]``,
        0 where the neighbour is outside the map.

    Raises:
        ValueError: if ``feats`` is not 4-D.
    """
    if feats.dim() != 4:
        raise ValueError(f"feature_similarity: feats must be [B, D, h, w], got {tuple(feats.shape)}")
    z = feats.float()
    bsz, _, h, w = z.shape
    out = z.new_zeros((bsz, 8, h, w))
    for o, (dy, dx) in enumerate(neighbor_offsets(dilation)):
        (ys_c, xs_c), (ys_n, xs_n) = shifted_slices(dy, dx, h, w)
        dist = torch.linalg.vector_norm(z[:, :, ys_c, xs_c] - z[:, :, ys_n, xs_n], dim=1)
        out[:, o, ys_c, xs_c] = torch.exp(-dist)
    return out
