"""BoxLevelSet supervision losses: Chan-Vese region energy inside the box, low- and high-level targets.

Li et al., "Box-supervised Instance Segmentation with Level Set Evolution", ECCV 2022, and its journal
extension Box2Mask (arXiv 2212.01579); details follow the BoxInstSeg / ECCV code as specified in
methods.md §3.3. The predicted foreground probability ``p = sigmoid(logits)`` plays the role of the
smoothed Heaviside of the level set ``phi``; the energy is evaluated only inside the box ``B``.
All functions are pure and compute in float32 even for bf16/fp16 inputs (float64 stays float64, for
``torch.autograd.gradcheck``). The box projection ("initialisation") term is
:func:`boxmask.supervision.boxinst.projection_loss`, weighted 3.0 by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import SupervisionConfig
from .base import MaskInstances, MaskSupervision, SupervisionInputs
from ..ops import as_khw
from .boxinst import instance_box_masks, projection_loss
from .tree_filter import GridTree, grid_mst, tree_filter

__all__ = ["LevelSetSupervision", "chan_vese_energy", "length_energy", "levelset_loss", "levelset_targets"]

_MEAN_EPS = 1e-5  # floor of the region areas sum(u_f), sum(u_b) in the mean intensities c1, c2


def _pixel_num(box: Tensor) -> Tensor:
    """``max(sum B, 1)`` per instance, ``[K]``: the normaliser of every level-set term."""
    return box.sum(dim=(1, 2)).clamp(min=1.0)


def chan_vese_energy(probs: Tensor, target: Tensor, box_masks: Tensor) -> Tensor:
    """Chan-Vese region energy of each instance inside its box (methods.md §3.3; ECCV'22 Eq. 4).

    With ``u_f = p B``, ``u_b = (1 - p) B`` and ``I = target * B`` (per channel c):
    ``c1 = sum(u_f I) / max(sum u_f, 1e-5)``, ``c2 = sum(u_b I) / max(sum u_b, 1e-5)``,
    ``E = sum_pixels sum_c [(I - c1)^2 u_f + (I - c2)^2 u_b] / C / max(sum B, 1)``.
    Zero when ``I`` is constant on each of the two regions and ``p`` is their indicator. Gradients
    flow to ``probs`` and to ``target`` (the references do not detach the deep target), including
    through ``c1`` and ``c2``.

    Args:
        probs: foreground probabilities in [0, 1], ``[K, h, w]`` or ``[K, 1, h, w]``, any float dtype.
        target: float ``[K, C, h, w]`` image or feature the regions should be homogeneous in.
        box_masks: ``[K, h, w]`` box masks (0/1) of each instance at the same resolution.

    Returns:
        ``[K]`` float32 (float64 for float64 ``probs``), one energy per instance (empty for K = 0).

    Raises:
        ValueError: on shape mismatch.
    """
    p = as_khw(probs, "chan_vese_energy", "probs")
    k, h, w = p.shape
    if target.dim() != 4 or target.shape[0] != k or tuple(target.shape[2:]) != (h, w):
        raise ValueError(
            f"chan_vese_energy: target must be [K, C, h, w] = [{k}, C, {h}, {w}], got {tuple(target.shape)}"
        )
    if box_masks.shape != (k, h, w):
        raise ValueError(f"chan_vese_energy: box_masks must be [K, h, w] = {(k, h, w)}, got {tuple(box_masks.shape)}")
    box = box_masks.to(p.dtype)
    u_f = (p * box)[:, None]
    u_b = ((1.0 - p) * box)[:, None]
    img = target.to(p.dtype) * box[:, None]
    c1 = (u_f * img).sum(dim=(2, 3), keepdim=True) / u_f.sum(dim=(2, 3), keepdim=True).clamp(min=_MEAN_EPS)
    c2 = (u_b * img).sum(dim=(2, 3), keepdim=True) / u_b.sum(dim=(2, 3), keepdim=True).clamp(min=_MEAN_EPS)
    energy = ((img - c1).square() * u_f + (img - c2).square() * u_b).sum(dim=(1, 2, 3))
    return energy / target.shape[1] / _pixel_num(box)


def length_energy(probs: Tensor, box_masks: Tensor) -> Tensor:
    """Length (total variation) regulariser of the ECCV code: ``sum |grad u| / max(sum B, 1)``.

    Summed over the two score maps ``u_f = p B`` and ``u_b = (1 - p) B`` with forward differences
    along h and w (anisotropic TV, no padding). The ECCV repo weights it 1e-5; BoxInstSeg dropped it
    (methods.md §3.3), so :func:`levelset_loss` has it off by default. Not differentiable where two
    neighbours are equal (subgradient 0 there, as ``abs``).

    Args:
        probs: ``[K, h, w]`` or ``[K, 1, h, w]`` foreground probabilities, any float dtype.
        box_masks: ``[K, h, w]`` box masks (0/1).

    Returns:
        ``[K]`` float32 (float64 for float64 ``probs``).

    Raises:
        ValueError: on shape mismatch.
    """
    p = as_khw(probs, "length_energy", "probs")
    if box_masks.shape != p.shape:
        raise ValueError(f"length_energy: box_masks shape {tuple(box_masks.shape)} != probs {tuple(p.shape)}")
    box = box_masks.to(p.dtype)
    total = p.new_zeros(p.shape[0])
    for u in (p * box, (1.0 - p) * box):
        total = total + (u[:, 1:, :] - u[:, :-1, :]).abs().sum(dim=(1, 2))
        total = total + (u[:, :, 1:] - u[:, :, :-1]).abs().sum(dim=(1, 2))
    return total / _pixel_num(box)


def _resize(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) to ``hw``; no copy when already that size."""
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def levelset_targets(
    probs: Tensor,
    images: Tensor,
    level_set_feats: Tensor,
    im_inds: Tensor | None = None,
    *,
    low_sigma: float = 0.02,
    high_sigma: float = 1.0,
    image_tree: GridTree | None = None,
    feat_tree: GridTree | None = None,
) -> tuple[Tensor, Tensor]:
    """Structure-aware deep targets ``(F1, F2)`` of BoxLevelSet's high-level term (methods.md §3.3).

    ``F1 = TreeFilter(p, guide = image, MST(image), sigma = low_sigma)`` with no gradient to the image,
    ``F2 = TreeFilter(F1, guide = F_ls, MST(F_ls), sigma = high_sigma)`` with gradient to ``F_ls``
    through the affinities (the trees themselves are discrete, built without gradient). The trees are
    per image and shared by that image's instances (see :func:`~boxmask.supervision.tree_filter.tree_filter`).

    Args:
        probs: ``[K, h, w]`` or ``[K, 1, h, w]`` foreground probabilities.
        images: ``[B, 3, h, w]`` normalised (ImageNet mean/std) images at the mask size.
        level_set_feats: ``[B, C_ls, h, w]`` level-set features ``F_ls`` at the mask size.
        im_inds: int64 ``[K]`` image of each instance; ``None`` means one image per instance (B = K).
        low_sigma, high_sigma: affinity ranges of the image and feature trees.
        image_tree, feat_tree: prebuilt ``grid_mst(images)`` / ``grid_mst(level_set_feats)`` (e.g. shared
            by several calls at the same size); built here when ``None``.

    Returns:
        ``(F1, F2)``, each float32 ``[K, 1, h, w]`` (float64 for float64 ``probs``).
    """
    p = as_khw(probs, "levelset_targets", "probs")
    img = images.detach().to(p.dtype)
    feats = level_set_feats.to(p.dtype)
    if image_tree is None:
        image_tree = grid_mst(img)
    if feat_tree is None:
        feat_tree = grid_mst(feats)
    f1 = tree_filter(p[:, None], img, image_tree, low_sigma, guide_grad=False, im_inds=im_inds)
    f2 = tree_filter(f1, feats, feat_tree, high_sigma, guide_grad=True, im_inds=im_inds)
    return f1, f2


def levelset_loss(
    mask_logits: Tensor,
    box_masks: Tensor,
    images: Tensor,
    level_set_feats: Tensor,
    im_inds: Tensor | None = None,
    *,
    img_weight: float = 0.05,
    deep_weight: float = 5.0,
    length_weight: float = 0.0,
    low_sigma: float = 0.02,
    high_sigma: float = 1.0,
    image_tree: GridTree | None = None,
    feat_tree: GridTree | None = None,
) -> Tensor:
    """BoxLevelSet level-set loss (methods.md §3.3; ECCV'22 Eq. 4-6, BoxInstSeg ``LevelsetLoss``).

    ``L = mean_k [ img_weight * E(I_img) + deep_weight * E(I_deep) + length_weight * length(p) ]`` with
    ``p = sigmoid(logits)``, :func:`chan_vese_energy` ``E``, ``I_img`` the normalised image of the
    instance's image and ``I_deep = concat(F1, F2) * B`` from :func:`levelset_targets` (not detached,
    as in the references: the deep target also trains ``F_ls`` and, through ``F1``, the mask).
    ``images`` and ``level_set_feats`` are resized bilinearly (``align_corners=False``) to the mask
    size when they differ. Add ``3.0 * projection_loss(mask_logits, box_masks)``
    (:func:`boxmask.supervision.boxinst.projection_loss`) for the full BoxLevelSet mask loss.

    Args:
        mask_logits: ``[K, 1, h, w]`` or ``[K, h, w]`` mask logits, any float dtype.
        box_masks: ``[K, h, w]`` box masks (0/1) at the mask resolution.
        images: ``[B, 3, H', W']`` float images normalised with the ImageNet mean/std (not LAB); no
            gradient flows into them.
        level_set_feats: ``[B, C_ls, H', W']`` level-set head output ``F_ls`` (5 channels in the reference).
        im_inds: int64 ``[K]`` image index of each instance; ``None`` requires ``B == K`` (per instance).
        img_weight, deep_weight: weights of the low- and high-level energies (0.05, 5.0).
        length_weight: weight of :func:`length_energy` (ECCV code 1e-5; default 0 = BoxInstSeg).
        low_sigma, high_sigma: tree-filter ranges (0.02 on the image, 1.0 on ``F_ls``).
        image_tree, feat_tree: optional prebuilt trees at the mask size (see :func:`levelset_targets`).

    Returns:
        float32 scalar (float64 for float64 logits). For ``K == 0`` a zero connected to
        ``mask_logits`` and ``level_set_feats`` (so every parameter gets a gradient under DDP).

    Raises:
        ValueError: on shape mismatch or ``im_inds`` out of range.
    """
    logits = as_khw(mask_logits, "levelset_loss", "mask_logits")
    k, h, w = logits.shape
    if box_masks.shape != (k, h, w):
        raise ValueError(f"levelset_loss: box_masks must be [K, h, w] = {(k, h, w)}, got {tuple(box_masks.shape)}")
    if images.dim() != 4 or level_set_feats.dim() != 4 or images.shape[0] != level_set_feats.shape[0]:
        raise ValueError(
            f"levelset_loss: images [B, 3, H, W] and level_set_feats [B, C, H, W] must share B, got "
            f"{tuple(images.shape)} and {tuple(level_set_feats.shape)}"
        )
    n_img = images.shape[0]
    if im_inds is None:
        if n_img != k:
            raise ValueError(
                f"levelset_loss: without im_inds images must be per instance (B == K = {k}), got B = {n_img}"
            )
    else:
        if im_inds.shape != (k,):
            raise ValueError(f"levelset_loss: im_inds must be [K] = [{k}], got {tuple(im_inds.shape)}")
        if k and (int(im_inds.min()) < 0 or int(im_inds.max()) >= n_img):
            raise ValueError(f"levelset_loss: im_inds out of range for {n_img} images")
        im_inds = im_inds.to(device=logits.device, dtype=torch.long)
    if k == 0:
        return logits.sum() * 0.0 + level_set_feats.sum().to(logits.dtype) * 0.0
    probs = logits.sigmoid()
    box = box_masks.to(logits.dtype)
    img = _resize(images.detach().to(logits.dtype), (h, w))
    feats = _resize(level_set_feats.to(logits.dtype), (h, w))
    f1, f2 = levelset_targets(probs, img, feats, im_inds, low_sigma=low_sigma, high_sigma=high_sigma,
                              image_tree=image_tree, feat_tree=feat_tree)
    img_inst = img if im_inds is None else img[im_inds]
    loss = img_weight * chan_vese_energy(probs, img_inst, box)
    loss = loss + deep_weight * chan_vese_energy(probs, torch.cat([f1, f2], dim=1), box)
    if length_weight:
        loss = loss + length_weight * length_energy(probs, box)
    return loss.mean()


#: ImageNet mean/std on the 0-255 scale: the reference's input normalisation, used for ``I_img``
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)


class LevelSetSupervision(MaskSupervision):
    """BoxLevelSet mask losses on the CondInst network: projection + level-set energies (methods.md §3.3).

    ``loss_proj = projection_weight * projection_loss`` (BoxLevelSet: 3.0) and ``loss_levelset =``
    :func:`levelset_loss` of the sampled instances, with ``I_img`` the ImageNet-normalised RGB image
    bilinearly resized to the mask grid (stride 4 of the padded image) and ``F_ls`` the model's
    level-set head output (``MaskInstances.level_set_feats``, needs ``model.level_set_channels > 0``).
    Uses boxes and images only (its methods never hand it masks). The trees are built per image per step.

    Raises:
        ValueError: from :meth:`losses` when the instances carry no ``level_set_feats``.
    """

    def __init__(self, cfg: SupervisionConfig):
        self.cfg = cfg

    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        feats = instances.level_set_feats
        if feats is None:
            raise ValueError("levelset supervision needs the level-set feature head: set model.level_set_channels "
                             "(BoxLevelSet: 5)")
        logits = instances.logits.float()
        if len(instances) == 0:
            zero = logits.sum() * 0 + feats.sum() * 0
            return {"loss_proj": zero, "loss_levelset": zero}
        h, w = logits.shape[-2:]
        mean = torch.tensor(_IMAGENET_MEAN, device=logits.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=logits.device).view(1, 3, 1, 1)
        used = torch.unique(instances.im_inds)
        # only the images that have instances get a tree; im_inds are remapped onto them
        remap = torch.full((inputs.images.shape[0],), -1, dtype=torch.long, device=logits.device)
        remap[used] = torch.arange(len(used), device=logits.device)
        images = (inputs.images[used].to(logits.device).float() - mean) / std
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        box_masks = instance_box_masks(instances, inputs)
        loss_proj = projection_loss(logits, box_masks)
        loss_ls = levelset_loss(logits, box_masks, images, feats[used], remap[instances.im_inds],
                                img_weight=cfg.levelset.img_weight, deep_weight=cfg.levelset.deep_weight,
                                length_weight=cfg.levelset.length_weight, low_sigma=cfg.levelset.low_sigma,
                                high_sigma=cfg.levelset.high_sigma)
        return {"loss_proj": cfg.projection_weight * loss_proj, "loss_levelset": loss_ls}
