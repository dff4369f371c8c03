"""Reference-style BoxInst loss path, the baseline that ``bench/speed.py`` times our losses against.

It follows the structure of the released BoxInst code (AdelaiDet ``condinst.py`` /
``dynamic_mask_head.py``, as summarised in methods.md §2.1-2.4), written for this benchmark rather
than copied:

* colour similarity (methods.md §2.2): ``avg_pool2d(4, 4)`` of the un-normalised image, cast to
  ``uint8`` (truncation), **scikit-image** ``rgb2lab`` on the CPU one image at a time (float64),
  back to the device, then an ``F.unfold``-based 3x3/dilation-2 neighbourhood without its centre,
  ``S = exp(-||lab_i - lab_j|| / 2)`` times the unfolded image-validity mask; the per-image tensor is
  replicated once per ground-truth box and then gathered per instance;
* box masks (§2.1): one full-resolution ``[Hp, Wp]`` bitmask per box filled with Python ``int``
  slices, point-sampled at ``[2::4, 2::4]``;
* projection loss (§2.3): dice of the max-projections, eps 1e-5;
* pairwise loss (§2.4): ``-log P_same`` for every (pixel, neighbour) pair via ``F.unfold`` of the
  log-probabilities, with an explicit max-shifted log-sum-exp, ``[K, 8, h, w]`` edge weights
  ``[S >= tau] * B(centre)`` and ``sum(w * nll) / max(sum(w), 1)``.

Everything is kept deliberately in that style (Python loops over images and boxes, ``unfold``
copies, autograd through every intermediate): it is what the speed benchmark measures against, and
its loss values must equal :class:`boxmask.supervision.boxinst.BoxInstSupervision`'s within 1e-4
relative on the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb2lab
from torch import Tensor

__all__ = [
    "ref_box_bitmasks",
    "ref_boxinst_losses",
    "ref_color_similarity",
    "ref_image_masks",
    "ref_pairwise_nll",
    "ref_projection_loss",
    "unfold_without_center",
]


def unfold_without_center(x: Tensor, kernel_size: int = 3, dilation: int = 2) -> Tensor:
    """Neighbours of every pixel by ``F.unfold`` with "same" zero padding, centre dropped.

    Args:
        x: float ``[N, C, h, w]``.
        kernel_size: odd kernel size k (BoxInst: 3).
        dilation: kernel dilation in pixels of ``x`` (BoxInst: 2).

    Returns:
        ``[N, C, k*k - 1, h, w]``; neighbour ``o`` is the kernel tap ``o`` in row-major order with the
        centre skipped (the order of :func:`boxmask.supervision.color.neighbor_offsets`).
        Out-of-map neighbours are 0.

    Raises:
        ValueError: ``x`` not 4-D or ``kernel_size`` even.
    """
    if x.dim() != 4:
        raise ValueError(f"unfold_without_center: expected [N, C, h, w], got {tuple(x.shape)}")
    if kernel_size % 2 != 1:
        raise ValueError(f"unfold_without_center: kernel_size must be odd, got {kernel_size}")
    n, c, h, w = x.shape
    pad = (kernel_size + (dilation - 1) * (kernel_size - 1)) // 2
    cols = F.unfold(x, kernel_size=kernel_size, padding=pad, dilation=dilation)
    cols = cols.reshape(n, c, kernel_size * kernel_size, h, w)
    centre = kernel_size * kernel_size // 2
    return torch.cat((cols[:, :, :centre], cols[:, :, centre + 1:]), dim=2)


def ref_image_masks(padded_hw: tuple[int, int], image_sizes: Sequence[tuple[int, int]],
                    orig_sizes: Sequence[tuple[int, int]], bottom_pixels_removed: int,
                    device: torch.device | str) -> Tensor:
    """Image-validity masks, one image at a time (methods.md §2.2-5).

    1 on each resized image, 0 on the zero padding and on the bottom
    ``int(bottom_pixels_removed * h / orig_h)`` rows of the image.

    Args:
        padded_hw: ``(Hp, Wp)`` of the batch, pixels.
        image_sizes / orig_sizes: per image ``(h, w)`` after resize / of the file, pixels.
        bottom_pixels_removed: original-image rows to drop at the bottom (COCO: 10).
        device: where to build the masks.

    Returns:
        float32 ``[B, Hp, Wp]`` of 0/1.
    """
    masks = []
    for (h, w), (oh, _) in zip(image_sizes, orig_sizes):
        m = torch.ones((int(h), int(w)), dtype=torch.float32, device=device)
        removed = int(bottom_pixels_removed * float(h) / float(oh))
        if removed > 0:
            m[-removed:, :] = 0
        masks.append(F.pad(m, (0, padded_hw[1] - int(w), 0, padded_hw[0] - int(h)), value=0.0))
    return torch.stack(masks)


def ref_color_similarity(images: Tensor, image_masks: Tensor, stride: int = 4, kernel_size: int = 3,
                         dilation: int = 2) -> Tensor:
    """Per-image LAB colour similarity with scikit-image on the CPU (methods.md §2.2).

    Args:
        images: uint8 ``[B, 3, Hp, Wp]`` RGB 0..255 (zero padded), any device; ``Hp, Wp`` multiples of
            ``stride``.
        image_masks: float ``[B, Hp, Wp]`` validity masks (:func:`ref_image_masks`).
        stride: mask output stride (4).
        kernel_size / dilation: neighbourhood (3 / 2).

    Returns:
        float32 ``[B, 8, Hp/stride, Wp/stride]`` on ``images``' device:
        ``exp(-||lab_i - lab_j||_2 / 2) * valid_j``.
    """
    pooled = F.avg_pool2d(images.float(), kernel_size=stride, stride=stride, padding=0)
    start = stride // 2
    sampled_masks = image_masks[:, start::stride, start::stride]
    out = []
    for b in range(pooled.shape[0]):
        # the references convert on the host, per image, every iteration
        rgb = pooled[b].byte().permute(1, 2, 0).cpu().numpy()
        lab = torch.as_tensor(rgb2lab(rgb), device=images.device, dtype=torch.float32)
        lab = lab.permute(2, 0, 1)[None]  # [1, 3, h, w]
        neighbours = unfold_without_center(lab, kernel_size, dilation)  # [1, 3, 8, h, w]
        diff = lab[:, :, None] - neighbours
        similarity = torch.exp(-torch.norm(diff, dim=1) * 0.5)  # [1, 8, h, w]
        valid = unfold_without_center(sampled_masks[b][None, None], kernel_size, dilation)
        valid = torch.max(valid, dim=1)[0]  # [1, 8, h, w]
        out.append(similarity * valid)
    return torch.cat(out)


def ref_box_bitmasks(boxes: Tensor, padded_hw: tuple[int, int], stride: int = 4) -> Tensor:
    """Box masks at the mask stride via one full-resolution bitmask per box (methods.md §2.1).

    Args:
        boxes: float ``[N, 4]`` xyxy in padded-image pixels (>= 0).
        padded_hw: ``(Hp, Wp)``.
        stride: mask output stride (4).

    Returns:
        float32 ``[N, Hp/stride, Wp/stride]`` of 0/1 on ``boxes``' device.
    """
    hp, wp = padded_hw
    start = stride // 2
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        full = torch.zeros((hp, wp), dtype=torch.float32, device=boxes.device)
        full[int(y1):int(y2) + 1, int(x1):int(x2) + 1] = 1.0
        out.append(full[start::stride, start::stride])
    if not out:
        return torch.zeros((0, len(range(start, hp, stride)), len(range(start, wp, stride))), device=boxes.device)
    return torch.stack(out)


def _dice(x: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.flatten(1)
    target = target.flatten(1)
    inter = (x * target).sum(dim=1)
    union = (x ** 2.0).sum(dim=1) + (target ** 2.0).sum(dim=1) + eps
    return 1.0 - 2.0 * inter / union


def ref_projection_loss(mask_scores: Tensor, gt_bitmasks: Tensor) -> Tensor:
    """Projection loss on probabilities (methods.md §2.3).

    Args:
        mask_scores: float ``[K, 1, h, w]`` sigmoid probabilities.
        gt_bitmasks: float ``[K, 1, h, w]`` box masks.

    Returns:
        scalar ``mean_k [dice(max_y p, max_y B) + dice(max_x p, max_x B)]``.
    """
    loss_x = _dice(mask_scores.max(dim=2, keepdim=True)[0], gt_bitmasks.max(dim=2, keepdim=True)[0])
    loss_y = _dice(mask_scores.max(dim=3, keepdim=True)[0], gt_bitmasks.max(dim=3, keepdim=True)[0])
    return (loss_x + loss_y).mean()


def ref_pairwise_nll(mask_logits: Tensor, kernel_size: int = 3, dilation: int = 2) -> Tensor:
    """``-log P_same`` for every pixel and its 8 neighbours, through ``F.unfold`` (methods.md §2.4).

    Args:
        mask_logits: float ``[K, 1, h, w]``.

    Returns:
        ``[K, 8, h, w]``; out-of-map neighbours have log-probabilities 0 (zero padding), so their
        ``-log P_same`` is 0.
    """
    log_fg = F.logsigmoid(mask_logits)
    log_bg = F.logsigmoid(-mask_logits)
    log_fg_nb = unfold_without_center(log_fg, kernel_size, dilation)
    log_bg_nb = unfold_without_center(log_bg, kernel_size, dilation)
    both_fg = log_fg[:, :, None] + log_fg_nb
    both_bg = log_bg[:, :, None] + log_bg_nb
    top = torch.max(both_fg, both_bg)
    log_same = torch.log(torch.exp(both_fg - top) + torch.exp(both_bg - top)) + top
    return -log_same[:, 0]


def ref_boxinst_losses(mask_logits: Tensor, im_inds: Tensor, gt_inds: Tensor, images: Tensor,
                       image_sizes: Sequence[tuple[int, int]], orig_sizes: Sequence[tuple[int, int]],
                       boxes: Sequence[Tensor], *, stride: int = 4, bottom_pixels_removed: int = 10,
                       color_threshold: float = 0.3, kernel_size: int = 3, dilation: int = 2) -> dict[str, Tensor]:
    """The whole reference-style BoxInst mask-loss path for one batch (no warm-up, weights 1).

    Args:
        mask_logits: float ``[K, 1, h, w]`` logits at ``stride`` of the sampled instances.
        im_inds / gt_inds: int64 ``[K]`` image of each instance and its GT index inside that image.
        images: uint8 ``[B, 3, Hp, Wp]`` RGB, zero padded.
        image_sizes / orig_sizes: per image ``(h, w)`` after resize / of the file.
        boxes: per image float ``[N_i, 4]`` xyxy in resized pixels.
        stride, bottom_pixels_removed, color_threshold, kernel_size, dilation: BoxInst settings
            (4, 10, 0.3, 3, 2).

    Returns:
        ``{"loss_proj": scalar, "loss_pairwise": scalar}``.
    """
    padded_hw = (int(images.shape[-2]), int(images.shape[-1]))
    device = mask_logits.device
    image_masks = ref_image_masks(padded_hw, image_sizes, orig_sizes, bottom_pixels_removed, device)
    per_image = ref_color_similarity(images, image_masks, stride, kernel_size, dilation)
    # one copy of the image's similarity per GT box, as the references store it on the GT instances
    gt_similarity = torch.cat([per_image[b:b + 1].repeat(len(bx), 1, 1, 1) for b, bx in enumerate(boxes)])
    gt_bitmasks = torch.cat([ref_box_bitmasks(bx.to(device), padded_hw, stride) for bx in boxes])
    first_gt = np.cumsum([0] + [len(bx) for bx in boxes])[:-1]
    global_inds = torch.as_tensor(first_gt, device=device)[im_inds] + gt_inds
    inst_bitmasks = gt_bitmasks[global_inds].unsqueeze(1)  # [K, 1, h, w]
    inst_similarity = gt_similarity[global_inds]  # [K, 8, h, w]

    loss_proj = ref_projection_loss(mask_logits.sigmoid(), inst_bitmasks)
    nll = ref_pairwise_nll(mask_logits, kernel_size, dilation)
    weights = (inst_similarity >= color_threshold).float() * inst_bitmasks
    loss_pair = (nll * weights).sum() / weights.sum().clamp(min=1.0)
    return {"loss_proj": loss_proj, "loss_pairwise": loss_pair}
