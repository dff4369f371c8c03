"""SOLOv2-style network of BoxLevelSet / Box2Mask-C (methods.md §3.1, §3.2, §3.4).

Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020 (Sec. 3: category and kernel
branches on S x S grids, unified mask features, dynamic 1x1 convolution; Sec. 4.3: Matrix NMS), with the
box-supervised training of Li et al., "Box-supervised Instance Segmentation with Level Set Evolution",
ECCV 2022 (targets from boxes only, level-set feature head ``F_ls``).

Layout (strides in pixels of the padded input):

* backbone C2-C5 ► :class:`~boxmask.modeling.fpn.SOLOFPN` P2-P6;
* head inputs ("split feats"): P2 resized ×0.5 (stride 8), P3, P4, P5, P6 resized to P5's size, i.e.
  strides 8, 8, 16, 32, 32; each is resized to its ``S x S`` grid (S = 40, 36, 24, 16, 12);
* :class:`SOLOv2Head`: category branch → ``[B, C, S, S]`` logits; kernel branch (with two coordinate
  channels) → ``[B, E, S, S]`` dynamic 1x1 kernels (no bias);
* :class:`MaskFeatureBranch`: P2-P5 → unified mask features ``F_mask`` ``[B, E, H/4, W/4]``;
* level-set head: conv3x3 ``E → 5`` on ``F_mask`` (training only);
* mask logits of grid cell (i, j): ``K_ij · F_mask`` (a 1x1 conv). For training they are taken at the
  level's mask stride 4, 4, 8, 16, 16 (methods.md §3.1: the reference resizes the stride-4 masks to 2x the
  level's grid-feature size); because the kernel is linear, resizing ``F_mask`` first and then applying the
  kernel gives the same logits at a fraction of the cost.

:meth:`SOLOv2.forward_train` returns one group of positives per mask stride; the method
(:mod:`boxmask.methods`) calls its supervision on each group and averages the losses weighted by the
instance counts, which is the mean over all positives for per-instance means (the projection and
level-set terms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from dataclasses import dataclass

from ..config import ModelConfig
from ..ops import tight_boxes
from ..structures import BoxConditionedMasks, InstancePredictions, MaskInstances, TrainOutputs
from .backbones import build_backbone
from .box_conditioned import best_fitting_candidates, box_location_candidates, check_box_conditioned_args
from .fpn import SOLOFPN
from .matrix_nms import matrix_nms
from .solo_targets import SOLO_MASK_STRIDES, solo_targets

__all__ = ["MaskFeatureBranch", "SOLOv2", "SOLOv2Features", "SOLOv2Head", "coord_features", "fourier_position_features",
           "point_nms", "position_prior_logits"]

#: stride of each head level's input feature (P2 halved, P3, P4, P5, P6 resized to P5), pixels
SOLO_HEAD_STRIDES: tuple[int, ...] = (8, 8, 16, 32, 32)
#: output stride of F_mask and of inference masks, pixels
MASK_FEAT_STRIDE = 4
#: ``model.solov2.position_prior``: Gaussian widths (cell sizes) of the prior channels after the constant one,
#: and the initial weights of [constant, g_0.5, g_1, g_2, g_4]
POSITION_PRIOR_SIGMAS = (0.5, 1.0, 2.0, 4.0)
POSITION_PRIOR_INIT = (-2.0, 0.0, 4.0, 0.0, 0.0)
# instances per kernel x F_mask product at inference: bounds the [n, h*w] logits
_CHUNK = 256


def position_prior_logits(weights: Tensor, centres: Tensor, sizes: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Logits of ``model.solov2.position_prior``: ``w_0 + sum_k w_k exp(-d^2 / (2 (sigma_k s)^2))`` with ``d`` the
    distance of each pixel centre to the kernel's cell centre, ``s`` the cell size and ``sigma_k`` of
    :data:`POSITION_PRIOR_SIGMAS` (not in SOLOv2; issue 13).

    Args:
        weights: ``[..., P]`` prior columns of the kernels, ``P = 1 + len(POSITION_PRIOR_SIGMAS)``.
        centres: float ``[..., 2]`` cell centres (x, y), pixels of the padded input.
        sizes: float ``[...]`` cell sizes, pixels.
        xs, ys: float ``[w]`` / ``[h]`` pixel-centre coordinates of the mask grid, pixels.

    Returns float32 ``[..., h*w]`` (row-major)."""
    d2 = ((xs[None, :] - centres[..., 0, None, None]) ** 2
          + (ys[:, None] - centres[..., 1, None, None]) ** 2).flatten(-2)
    w = weights.float()
    prior = w[..., :1]
    for k, sigma in enumerate(POSITION_PRIOR_SIGMAS):
        prior = prior + w[..., k + 1, None] * torch.exp(-d2 / (2 * (sigma * sizes[..., None]) ** 2))
    return prior


def coord_features(x: Tensor) -> Tensor:
    """Normalised coordinates of a feature map: float ``[B, 2, h, w]`` (x then y), each ``linspace(-1, 1)``
    over the map (SOLO's CoordConv input, Wang et al. 2020 Sec. 3.2), in ``x``'s dtype and device."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])[None].expand(b, -1, -1, -1)


def fourier_position_features(x: Tensor, freqs: int) -> Tensor:
    """Fourier features of the cell-centre position of each sample of ``x`` ``[B, *, h, w]``: float
    ``[B, 4*freqs, h, w]`` in ``x``'s dtype, per octave ``k < freqs`` the channels ``sin(2^k pi u)``,
    ``cos(2^k pi u)``, ``sin(2^k pi v)``, ``cos(2^k pi v)`` with ``u = 2 (j + 0.5) / w - 1`` (columns) and
    ``v`` likewise (rows), so one image point has the same features on every grid that tiles the image.

    Why: a dynamic 1x1 kernel selects an instance by a dot product with ``F_mask``; with these features on
    both sides, ``sum_k cos(w_k (q - p))`` peaks at the kernel's own cell, a match that raw linear
    coordinates give only after the kernel branch has learnt a high-frequency function of position (an
    MLP's spectral bias, Tancik et al., NeurIPS 2020). Not in SOLOv2/BoxLevelSet; ``model.solov2.coord_freqs``.
    """
    b, _, h, w = x.shape
    if freqs <= 0:
        return x.new_zeros(b, 0, h, w)
    u = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) * (2.0 / w) - 1.0
    v = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) * (2.0 / h) - 1.0
    octave = math.pi * 2.0 ** torch.arange(freqs, device=x.device, dtype=torch.float32)
    fu, fv = u[None] * octave[:, None], v[None] * octave[:, None]  # [F, w], [F, h]
    cols = torch.stack([fu.sin(), fu.cos()], 1)[:, :, None, :].expand(-1, -1, h, -1)  # [F, 2, h, w]
    rows = torch.stack([fv.sin(), fv.cos()], 1)[:, :, :, None].expand(-1, -1, -1, w)
    feats = torch.cat([cols, rows], 1).reshape(4 * freqs, h, w)
    return feats.to(x.dtype)[None].expand(b, -1, -1, -1)


def _conv_gn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    nn.init.normal_(conv.weight, std=0.01)
    return nn.Sequential(conv, nn.GroupNorm(min(32, cout), cout), nn.ReLU(inplace=True))


class SOLOv2Head(nn.Module):
    """Category and kernel branches shared over the 5 levels (methods.md §3.1; SOLOv2 Sec. 3.2).

    Per level the input ``[B, C_in, h, w]`` plus 2 coordinate channels is resized (bilinear,
    ``align_corners=False``) to ``S x S``; the kernel branch runs ``num_convs`` × (conv3x3, GN, ReLU) then a
    1x1 conv to ``kernel_dim``; the category branch the same tower on the resized input without the
    coordinates, then a 3x3 conv to ``num_classes`` (bias ``-log((1 - p) / p)``, focal prior ``p``).

    Args:
        in_channels: FPN channels; channels: tower width (512 in the reference); num_convs: tower depth (4);
        kernel_dim: ``E``, channels of ``F_mask``; num_classes: ``C``; num_grids: ``S`` per level;
        prior_prob: focal-loss prior of the category logits (0.01).
    """

    def __init__(self, in_channels: int, channels: int, num_convs: int, kernel_dim: int, num_classes: int,
                 num_grids: list[int], prior_prob: float = 0.01, coord_freqs: int = 0, prior_channels: int = 0):
        super().__init__()
        self.num_grids = list(num_grids)
        self.in_channels, self.coord_freqs = in_channels, coord_freqs
        extra = 2 + 4 * coord_freqs
        self.kernel_tower = nn.Sequential(*[_conv_gn_relu(in_channels + extra if i == 0 else channels, channels)
                                            for i in range(num_convs)])
        self.cate_tower = nn.Sequential(*[_conv_gn_relu(in_channels if i == 0 else channels, channels)
                                          for i in range(num_convs)])
        last = channels if num_convs else in_channels
        self.kernel_pred = nn.Conv2d(last + (0 if num_convs else extra), kernel_dim + prior_channels, 1)
        self.cate_pred = nn.Conv2d(last, num_classes, 3, padding=1)
        for conv in (self.kernel_pred, self.cate_pred):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(self.kernel_pred.bias)
        if prior_channels:
            with torch.no_grad():  # the position prior starts as a one-cell blob: -2 + 4 g(1 cell)
                self.kernel_pred.bias[kernel_dim:] = torch.tensor(POSITION_PRIOR_INIT)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``feats``: 5 maps ``[B, C_in, h_l, w_l]`` → (category logits ``[B, C, S_l, S_l]``, kernels
        ``[B, E, S_l, S_l]``) per level. Raises ValueError for a wrong number of levels."""
        if len(feats) != len(self.num_grids):
            raise ValueError(f"SOLOv2Head: {len(feats)} levels for {len(self.num_grids)} grids")
        cates, kernels = [], []
        for x, s in zip(feats, self.num_grids):
            k = torch.cat([x, coord_features(x)], dim=1)
            k = F.interpolate(k, size=(s, s), mode="bilinear", align_corners=False)
            cates.append(self.cate_pred(self.cate_tower(k[:, : self.in_channels])))
            if self.coord_freqs:
                k = torch.cat([k, fourier_position_features(k, self.coord_freqs)], dim=1)
            kernels.append(self.kernel_pred(self.kernel_tower(k)))
        return cates, kernels


class MaskFeatureBranch(nn.Module):
    """Unified mask features ``F_mask`` at stride 4 (methods.md §3.1; SOLOv2 Sec. 3.2.2).

    Level ``i`` of P2-P5 goes through ``i`` × (conv3x3, GN, ReLU, ×2 bilinear upsampling) (P2: one conv, no
    upsampling); P5 gets 2 coordinate channels first; the four stride-4 maps are summed and a 1x1 conv + GN
    + ReLU gives ``out_channels`` (``E``, the kernel dimension).

    Input: ``[P2, P3, P4, P5]`` float ``[B, C_in, H/s, W/s]``; output float ``[B, E, H/4, W/4]`` (P2's size).
    """

    def __init__(self, in_channels: int, channels: int, out_channels: int, coord_freqs: int = 0):
        super().__init__()
        self.coord_freqs = coord_freqs
        self.levels = nn.ModuleList()
        for i in range(4):
            convs = [_conv_gn_relu((in_channels + 2 if i == 3 else in_channels) if j == 0 else channels, channels)
                     for j in range(max(i, 1))]
            self.levels.append(nn.ModuleList(convs))
        self.pred = _conv_gn_relu(channels + 4 * coord_freqs, out_channels, kernel=1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        total = None
        for i, (x, convs) in enumerate(zip(feats[:4], self.levels)):
            if i == 3:
                x = torch.cat([x, coord_features(x)], dim=1)
            for conv in convs:
                x = conv(x)
                if i > 0:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            total = x if total is None else total + x
        if self.coord_freqs:
            total = torch.cat([total, fourier_position_features(total, self.coord_freqs)], dim=1)
        return self.pred(total)


def point_nms(heat: Tensor) -> Tensor:
    """SOLO's 2x2 "point NMS" on category probabilities: keep a cell only where it equals the max of its
    2x2 window ending at it (``max_pool2d(kernel 2, stride 1, padding 1)`` cropped), else 0.

    heat: float ``[B, C, S, S]`` in [0, 1] → same shape and dtype.
    """
    hmax = F.max_pool2d(heat, kernel_size=2, stride=1, padding=1)[..., :-1, :-1]
    return heat * (hmax == heat).to(heat.dtype)


@dataclass
class SOLOv2Features:
    """Outputs of one SOLOv2 forward pass (:meth:`SOLOv2.features`): per level P2..P6 the category logits
    ``cates`` ``[B,C,S_l,S_l]`` and dynamic kernels ``kernels`` ``[B,E,S_l,S_l]``, and the unified mask
    features ``mask_feats`` ``F_mask`` ``[B,E,Hp/4,Wp/4]``."""

    cates: list[Tensor]
    kernels: list[Tensor]
    mask_feats: Tensor


class SOLOv2(nn.Module):
    """BoxLevelSet's SOLOv2-style network (module docstring; methods.md §3.1-§3.4).

    Input images are uint8 RGB ``[B,3,Hp,Wp]`` padded to a multiple of 32, normalised with the backbone's
    ``pixel_mean``/``pixel_std``. Same interface as :class:`~boxmask.modeling.condinst.CondInst`:
    :meth:`forward_train`, :meth:`predict`, :meth:`box_conditioned_masks` and ``mask_out_stride``.

    Args:
        cfg: the model recipe (``arch: solov2``; fields in :class:`~boxmask.config.ModelConfig`).
        num_classes: ``C`` >= 1.

    Raises:
        ValueError: ``num_classes < 1``.
    """

    mask_out_stride = MASK_FEAT_STRIDE

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = build_backbone(cfg.backbone, weights=cfg.backbone_weights, freeze_at=cfg.freeze_at,
                                       with_c2=True)
        self.fpn = SOLOFPN(self.backbone.out_channels, cfg.fpn_channels)
        self.prior_channels = 1 + len(POSITION_PRIOR_SIGMAS) if cfg.solov2.position_prior else 0
        self.head = SOLOv2Head(cfg.fpn_channels, cfg.solov2.head_channels, cfg.head_convs, cfg.mask_channels,
                               num_classes, cfg.solov2.grids, cfg.prior_prob, cfg.solov2.coord_freqs,
                               self.prior_channels)
        self.mask_branch = MaskFeatureBranch(cfg.fpn_channels, cfg.mask_branch_channels, cfg.mask_channels,
                                             cfg.solov2.coord_freqs)
        self.level_set_head = (nn.Conv2d(cfg.mask_channels, cfg.level_set_channels, 3, padding=1)
                               if cfg.level_set_channels > 0 else None)
        self.register_buffer("pixel_mean", torch.tensor(self.backbone.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.backbone.pixel_std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ shared
    def features(self, images: Tensor) -> SOLOv2Features:
        """One forward pass on uint8 ``[B,3,Hp,Wp]`` images: :class:`SOLOv2Features`."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        p = self.fpn(self.backbone(x))
        mask_feats = self.mask_branch(p[:4])
        split = [F.interpolate(p[0], scale_factor=0.5, mode="bilinear", align_corners=False), p[1], p[2], p[3],
                 F.interpolate(p[4], size=p[3].shape[-2:], mode="bilinear", align_corners=False)]
        cates, kernels = self.head(split)
        return SOLOv2Features(cates, kernels, mask_feats)

    def cell_geometry(self, hp: int, wp: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Centre float32 ``[N,2]`` (x, y pixels) and size float32 ``[N]`` (pixels, mean of width and height) of
        every grid cell of a padded ``hp x wp`` input, levels concatenated (row-major inside a level)."""
        centres, sizes = [], []
        for s in self.cfg.solov2.grids:
            idx = torch.arange(s, device=device, dtype=torch.float32)
            cy, cx = torch.meshgrid((idx + 0.5) * hp / s, (idx + 0.5) * wp / s, indexing="ij")
            centres.append(torch.stack([cx.flatten(), cy.flatten()], dim=1))
            sizes.append(torch.full((s * s,), (hp / s + wp / s) / 2, device=device))
        return torch.cat(centres), torch.cat(sizes)

    def _masks(self, kernels: Tensor, feats: Tensor, centres: Tensor | None = None, sizes: Tensor | None = None,
               stride: int = MASK_FEAT_STRIDE) -> Tensor:
        """Dynamic 1x1 conv: kernels ``[n, E (+ P)]`` on one image's ``feats`` ``[E, h, w]`` → logits ``[n, h, w]``.

        With the position prior (``P > 0`` extra kernel columns) the logits also get ``sum_k w_k R_k`` of the
        prior channels of :data:`POSITION_PRIOR_SIGMAS`, computed on the ``stride`` grid from each kernel's cell
        ``centres`` ``[n,2]`` and ``sizes`` ``[n]`` (pixels)."""
        e, h, w = feats.shape
        logits = kernels[:, :e].to(feats.dtype) @ feats.reshape(e, h * w)
        if self.prior_channels:
            ys = (torch.arange(h, device=feats.device, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(w, device=feats.device, dtype=torch.float32) + 0.5) * stride
            logits = logits + position_prior_logits(kernels[:, e:], centres, sizes, xs, ys).to(logits.dtype)
        return logits.reshape(-1, h, w)

    # ------------------------------------------------------------------ training
    def forward_train(self, images: Tensor, boxes: list[Tensor], labels: list[Tensor]) -> TrainOutputs:
        """Training forward pass (methods.md §3.2): the category loss and the positives' mask logits.

        ``loss_cls``: sigmoid focal loss (α 0.25, γ 2) over every grid cell of every level, summed and
        divided by ``N_pos + 1``. Targets come from :func:`~boxmask.modeling.solo_targets.solo_targets` (boxes
        and labels only). The positives are grouped by their level's mask stride (4, 8 or 16): one
        :class:`~boxmask.structures.MaskInstances` per stride with positives, logits ``K · F_mask`` at that
        stride, sorted by image, all sharing ``level_set_feats`` (``F_ls`` at stride 4) when the model has the
        level-set head; one empty stride-4 group when the batch has no positives. ``model.max_proposals > 0``
        keeps that many random positives per batch.

        Args:
            images: uint8 ``[B,3,Hp,Wp]``.
            boxes: per image float ``[N_i,4]`` xyxy padded-image pixels; labels: per image int64 ``[N_i]``.
        Returns :class:`~boxmask.structures.TrainOutputs`.
        """
        cfg = self.cfg
        f = self.features(images)
        cates, kernels, mask_feats = f.cates, f.kernels, f.mask_feats
        hp, wp = images.shape[-2:]
        batch = images.shape[0]
        ranges = tuple(tuple(float(v) for v in r) for r in cfg.solov2.scale_ranges)
        targets = [solo_targets(boxes[b].to(images.device).float(), labels[b].to(images.device),
                                (hp, wp), self.num_classes, tuple(cfg.solov2.grids), ranges, cfg.solov2.sigma)
                   for b in range(batch)]
        # category loss over all cells of all levels
        flat_cate = torch.cat([c.permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes) for c in cates], dim=1)
        flat_labels = torch.stack([torch.cat([t.labels.flatten() for t in tb]) for tb in targets])
        onehot = F.one_hot(flat_labels, self.num_classes + 1)[..., : self.num_classes].to(torch.float32)
        num_pos = int((flat_labels < self.num_classes).sum())
        loss_cls = sigmoid_focal_loss(flat_cate.float(), onehot, alpha=0.25, gamma=2.0, reduction="sum") / (num_pos + 1)

        # positives: (image, level, cell) → kernel, GT index, label, grouped by mask stride
        groups: dict[int, dict[str, list[Tensor]]] = {}
        centres, sizes = self.cell_geometry(hp, wp, images.device)
        offset = 0
        for level, kern in enumerate(kernels):
            stride = SOLO_MASK_STRIDES[level]
            for b in range(batch):
                t = targets[b][level]
                if len(t.pos_inds) == 0:
                    continue
                g = groups.setdefault(stride, {"kernels": [], "im": [], "gt": [], "labels": [], "cells": []})
                g["cells"].append(t.pos_inds + offset)
                g["kernels"].append(kern[b].flatten(1)[:, t.pos_inds].t())
                g["im"].append(torch.full_like(t.pos_gt_inds, b))
                g["gt"].append(t.pos_gt_inds)
                g["labels"].append(t.labels.flatten()[t.pos_inds])
            offset += cfg.solov2.grids[level] ** 2
        level_set_feats = None
        if self.level_set_head is not None:
            level_set_feats = self.level_set_head(mask_feats).float()
        if cfg.max_proposals > 0:
            groups = _subsample(groups, cfg.max_proposals)

        # keeps every parameter in the graph (DDP) whatever the positives and the supervision use
        anchor = mask_feats.sum() * 0 + sum(k.sum() for k in kernels) * 0
        if level_set_feats is not None:
            anchor = anchor + level_set_feats.sum() * 0
        instance_groups = []
        for stride in sorted(groups):
            g = groups[stride]
            kern = torch.cat(g["kernels"])
            im_inds = torch.cat(g["im"])
            feats = mask_feats
            if stride != MASK_FEAT_STRIDE:
                feats = F.interpolate(mask_feats, size=(hp // stride, wp // stride), mode="bilinear",
                                      align_corners=False)
            cells = torch.cat(g["cells"])
            logits = torch.cat([self._masks(kern[im_inds == b], feats[b], centres[cells[im_inds == b]],
                                            sizes[cells[im_inds == b]], stride) for b in range(batch)])[:, None]
            # the per-image product sorted instances by image: keep that order for the other fields
            order = torch.argsort(im_inds, stable=True)
            instance_groups.append(MaskInstances(logits.float(), im_inds[order], torch.cat(g["gt"])[order],
                                                 torch.cat(g["labels"])[order], stride=stride,
                                                 level_set_feats=level_set_feats))
        if not instance_groups:
            instance_groups.append(MaskInstances(mask_feats.new_zeros(0, 1, hp // MASK_FEAT_STRIDE, wp // MASK_FEAT_STRIDE),
                                                 flat_labels.new_zeros(0), flat_labels.new_zeros(0),
                                                 flat_labels.new_zeros(0), stride=MASK_FEAT_STRIDE,
                                                 level_set_feats=level_set_feats))
        return TrainOutputs({"loss_cls": loss_cls}, instance_groups, anchor)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]]) -> list[InstancePredictions]:
        """Instances with binary masks in original-image pixels (methods.md §3.4; SOLOv2 Sec. 4.3).

        Per image: category probabilities with 2x2 point NMS; cells × classes with probability >
        ``score_threshold`` (at most ``pre_nms_topk`` by probability get a mask); mask probabilities at
        stride 4, binary at ``mask_threshold``; masks with area <= the level's head stride dropped; score ×=
        maskness (mean probability inside the binary mask); the ``pre_nms_topk`` best go through
        :func:`~boxmask.modeling.matrix_nms.matrix_nms` (gaussian, ``solov2.matrix_nms_sigma``); decayed scores >=
        ``solov2.matrix_nms_filter`` are kept, at most ``max_detections``. Probabilities are upsampled ×4
        (bilinear) to the padded size, cropped to ``image_sizes``, resized to ``orig_sizes`` and
        thresholded at ``mask_threshold``. Boxes are the tight boxes of the final masks (``x2`` = last
        column + 1, pixels), zeros for an empty mask.

        Args:
            images: uint8 ``[B,3,Hp,Wp]``; image_sizes / orig_sizes: per image ``(h, w)`` resized / original.
        Returns one :class:`~boxmask.modeling.condinst.InstancePredictions` per image.
        """
        out = []
        for (scores, labels, up), (oh, ow) in zip(self.predict_probs(images, image_sizes), orig_sizes):
            if len(scores) == 0:
                out.append(InstancePredictions(torch.zeros(0, 4, device=images.device),
                                               torch.zeros(0, device=images.device),
                                               torch.zeros(0, dtype=torch.int64, device=images.device),
                                               torch.zeros(0, oh, ow, dtype=torch.bool, device=images.device)))
                continue
            final = F.interpolate(up[:, None], size=(oh, ow), mode="bilinear", align_corners=False)[:, 0] > self.cfg.mask_threshold
            out.append(InstancePredictions(tight_boxes(final), scores, labels, final))
        return out

    @torch.no_grad()
    def predict_probs(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The detections of :meth:`predict` before the resize to the original size: per image
        ``(scores float32 [N], labels int64 [N], mask probabilities float32 [N,h,w])`` at the resized image
        size ``image_sizes[b]`` (upsampled ×4 bilinear to the padded size and cropped), sorted by score."""
        cfg = self.cfg
        f = self.features(images)
        cates, kernels, mask_feats = f.cates, f.kernels, f.mask_feats
        hp, wp = images.shape[-2:]
        out = []
        level_stride = torch.cat([torch.full((s * s,), float(SOLO_HEAD_STRIDES[l]), device=images.device)
                                  for l, s in enumerate(cfg.solov2.grids)])
        centres, sizes = self.cell_geometry(hp, wp, images.device)
        for b, (h, w) in enumerate(image_sizes):
            probs = torch.cat([point_nms(c[b:b + 1].float().sigmoid())[0].flatten(1).t() for c in cates])  # [N,C]
            kern = torch.cat([k[b].flatten(1).t() for k in kernels])  # [N,E]
            cells, labels = torch.nonzero(probs > cfg.score_threshold, as_tuple=True)
            scores = probs[cells, labels]
            if len(scores) > cfg.pre_nms_topk:
                top = scores.topk(cfg.pre_nms_topk).indices
                cells, labels, scores = cells[top], labels[top], scores[top]
            keep_probs = []
            if len(cells):
                mask_probs = torch.cat([self._masks(kern[c], mask_feats[b].float(), centres[c], sizes[c]).sigmoid()
                                        for c in cells.split(_CHUNK)])
                masks = mask_probs > cfg.mask_threshold
                area = masks.sum((1, 2)).float()
                keep = area > level_stride[cells]
                mask_probs, masks, area = mask_probs[keep], masks[keep], area[keep]
                labels, scores = labels[keep], scores[keep]
                maskness = (mask_probs * masks).sum((1, 2)) / area.clamp(min=1)
                scores = scores * maskness
                scores = matrix_nms(masks, labels, scores, sigma=cfg.solov2.matrix_nms_sigma, mask_area=area)
                keep = torch.nonzero(scores >= cfg.solov2.matrix_nms_filter).squeeze(1)
                keep = keep[scores[keep].argsort(descending=True)][: cfg.max_detections]
                labels, scores, keep_probs = labels[keep], scores[keep], mask_probs[keep]
            if len(keep_probs) == 0:
                out.append((torch.zeros(0, device=images.device), torch.zeros(0, dtype=torch.int64, device=images.device),
                            torch.zeros(0, h, w, device=images.device)))
                continue
            up = F.interpolate(keep_probs[:, None], size=(hp, wp), mode="bilinear", align_corners=False)[:, 0, :h, :w]
            out.append((scores.float(), labels, up))
        return out

    @torch.no_grad()
    def box_conditioned_masks(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: list[Tensor],
                              labels: list[Tensor] | None = None, rank: str = "score_iou",
                              candidates: int = 5) -> list[BoxConditionedMasks]:
        """Mask logits for given boxes (box-conditioned inference, as for CondInst in
        :mod:`boxmask.modeling.box_conditioned`).

        Candidates of a box are the grid cells whose centre lies in the box, on the levels its target
        assignment would use (``sqrt(w h)`` inside the level's scale range; every level when none does),
        ranked by the category probability of the box's class (class-agnostic max when unknown); SOLOv2 regresses no
        boxes, so ``rank`` ``"score_iou"`` and ``"score"`` both rank by that probability. A box with no cell
        centre inside uses the nearest cell of the finest grid. The ``candidates`` best each draw a mask
        (their kernel on ``F_mask``) and the one with the smallest BoxInst projection term against the box
        is kept. Returned ``loc_inds`` index the levels-concatenated cells, ``locations`` are cell centres.

        Arguments, returns and errors as :meth:`boxmask.modeling.condinst.CondInst.box_conditioned_masks`.
        """
        check_box_conditioned_args(images, boxes, labels, rank, candidates)
        batch = images.shape[0]
        f = self.features(images)
        cates, kernels, mask_feats = f.cates, f.kernels, f.mask_feats
        hp, wp = images.shape[-2:]
        centres, sizes = self.cell_geometry(hp, wp, images.device)
        level_of = torch.cat([torch.full((s * s,), level, dtype=torch.int64, device=images.device)
                              for level, s in enumerate(self.cfg.solov2.grids)])
        num_finest = self.cfg.solov2.grids[0] ** 2
        out = []
        for b in range(batch):
            scores = torch.cat([c[b].float().sigmoid().flatten(1).t() for c in cates])  # [N,C]
            kern = torch.cat([k[b].flatten(1).t() for k in kernels])
            boxes_b = boxes[b].to(images.device).float()
            cand, cand_scores, valid, inside = box_location_candidates(
                scores, centres, num_finest, boxes_b, None if labels is None else labels[b], None, candidates,
                allowed=self._levels_for_boxes(boxes_b)[:, level_of])
            flat = cand[valid]
            cand_logits = (torch.cat([self._masks(kern[c], mask_feats[b].float(), centres[c], sizes[c])
                                      for c in flat.split(_CHUNK)])[:, None] if len(flat)
                           else mask_feats.new_zeros(0, 1, *mask_feats.shape[-2:]).float())
            logits, pick, agreement = best_fitting_candidates(cand_logits, valid, boxes_b, (hp, wp), MASK_FEAT_STRIDE)
            chosen = cand.gather(1, pick[:, None])[:, 0]
            out.append(BoxConditionedMasks(logits, chosen, level_of[chosen], centres[chosen],
                                           cand_scores.gather(1, pick[:, None])[:, 0], inside, agreement))
        return out


    def _levels_for_boxes(self, boxes: Tensor) -> Tensor:
        """bool ``[N, 5]``: levels whose ``solov2.scale_ranges`` hold ``sqrt(w h)`` of each box (all levels for
        a box that fits none), as in :func:`~boxmask.modeling.solo_targets.solo_targets`."""
        scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
        lo = torch.tensor([r[0] for r in self.cfg.solov2.scale_ranges], device=boxes.device, dtype=scale.dtype)
        hi = torch.tensor([r[1] for r in self.cfg.solov2.scale_ranges], device=boxes.device, dtype=scale.dtype)
        ok = (scale[:, None] >= lo) & (scale[:, None] <= hi)
        return ok | ~ok.any(1, keepdim=True)


def _subsample(groups: dict[int, dict[str, list[Tensor]]], max_total: int) -> dict[int, dict[str, list[Tensor]]]:
    """Keep ``max_total`` random positives over all stride groups (memory cap, off by default)."""
    flat = {s: {key: torch.cat(v) for key, v in g.items()} for s, g in groups.items()}
    sizes = [len(flat[s]["gt"]) for s in sorted(flat)]
    total = sum(sizes)
    if total <= max_total:
        return groups
    device = next(iter(flat.values()))["gt"].device
    chosen = torch.zeros(total, dtype=torch.bool, device=device)
    chosen[torch.randperm(total, device=device)[:max_total]] = True
    out, start = {}, 0
    for s, size in zip(sorted(flat), sizes):
        sel = chosen[start:start + size]
        start += size
        if sel.any():
            out[s] = {key: [v[sel]] for key, v in flat[s].items()}
    return out
