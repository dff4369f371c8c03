"""CondInst: FCOS + mask branch + dynamic mask head (Tian et al., ECCV 2020; methods.md §1.3–1.7).

BoxInst (CVPR 2021) is this network trained with box-only losses (``boxmask.supervision``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..supervision.base import MaskInstances, MaskSupervision, SupervisionInputs
from .backbones import build_backbone
from .fcos import (Detections, FCOSHead, compute_locations, fcos_inference, fcos_losses, fcos_targets,
                   flatten_levels, level_ranges)
from .fpn import FPN


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample ``[N,C,h,w]`` by an integer ``factor`` to ``[N,C,factor*h,factor*w]`` keeping the
    "sample at the centre of each stride cell" convention (methods.md §1.6, CondInst).

    Replicate-pad 1 px right/bottom, bilinear with ``align_corners=True`` to ``(f*h+1, f*w+1)``,
    replicate-pad ``f//2`` left/top, crop. ``factor == 1`` returns ``x``. Raises ValueError for factor < 1.
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def _conv_norm_relu(cin: int, cout: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MaskBranch(nn.Module):
    """CondInst bottom module (methods.md §1.3): P3–P5 → refine (conv+BN+ReLU) → aligned-upsample to
    P3 and sum → tower of ``num_convs`` conv+BN+ReLU → 1×1 conv to ``out_channels`` (C_mask).

    Input: list of FPN maps (uses the first three, strides 8/16/32). Output: ``[B,C_mask,H/8,W/8]``.
    """

    def __init__(self, in_channels: int, channels: int = 128, num_convs: int = 4, out_channels: int = 16):
        super().__init__()
        self.refine = nn.ModuleList(_conv_norm_relu(in_channels, channels) for _ in range(3))
        self.tower = nn.Sequential(*[_conv_norm_relu(channels, channels) for _ in range(num_convs)])
        self.out = nn.Conv2d(channels, out_channels, 1)
        nn.init.kaiming_uniform_(self.out.weight, a=1)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.refine[0](features[0])
        for i in (1, 2):
            y = self.refine[i](features[i])
            factor = x.shape[-1] // y.shape[-1]
            y = aligned_bilinear(y, factor)[:, :, : x.shape[-2], : x.shape[-1]]
            x = x + y
        return self.out(self.tower(x))


def dynamic_head_num_params(mask_channels: int, channels: int, num_layers: int = 3) -> int:
    """Controller output size: weights and biases of the dynamic 1×1 convs (methods.md §1.4).

    Input has ``mask_channels + 2`` channels (relative x, y). 233 for (16, 8, 3); 169 for (8, 8, 3).
    """
    sizes = _layer_shapes(mask_channels, channels, num_layers)
    return sum(o * i for o, i in sizes) + sum(o for o, _ in sizes)


def _layer_shapes(mask_channels: int, channels: int, num_layers: int) -> list[tuple[int, int]]:
    shapes = []
    cin = mask_channels + 2
    for layer in range(num_layers):
        cout = 1 if layer == num_layers - 1 else channels
        shapes.append((cout, cin))
        cin = cout
    return shapes


class DynamicMaskHead(nn.Module):
    """Per-instance 1×1 convs whose weights come from the controller (methods.md §1.4).

    Parameter layout (AdelaiDet-compatible): ``[W0, W1, W2, b0, b1, b2]`` with ``W_l`` row-major ``(out, in)``.
    """

    def __init__(self, mask_channels: int = 16, channels: int = 8, num_layers: int = 3,
                 feat_stride: int = 8, out_stride: int = 4, strides: tuple[int, ...] = (8, 16, 32, 64, 128)):
        super().__init__()
        self.mask_channels = mask_channels
        self.shapes = _layer_shapes(mask_channels, channels, num_layers)
        self.num_params = dynamic_head_num_params(mask_channels, channels, num_layers)
        self.feat_stride = feat_stride
        self.out_stride = out_stride
        # relative coordinates are normalised by 8 × the level stride (AdelaiDet sizes_of_interest)
        self.register_buffer("soi", torch.tensor([8.0 * s for s in strides]), persistent=False)

    def parse_params(self, params: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``[K,P]`` → per layer weights ``[K,out,in]`` and biases ``[K,out,1]``."""
        k = params.shape[0]
        w_sizes = [o * i for o, i in self.shapes]
        b_sizes = [o for o, _ in self.shapes]
        chunks = torch.split(params, w_sizes + b_sizes, dim=1)
        n = len(self.shapes)
        weights = [chunks[i].reshape(k, o, c) for i, (o, c) in enumerate(self.shapes)]
        biases = [chunks[n + i].reshape(k, o, 1) for i, (o, _) in enumerate(self.shapes)]
        return weights, biases

    def forward(self, mask_feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor, levels: Tensor) -> Tensor:
        """Mask logits for K instances.

        Args:
            mask_feats: ``[B,C_mask,h,w]`` at ``feat_stride`` (8).
            params: ``[K,num_params]`` controller outputs; im_inds: int64 ``[K]``;
            locations: ``[K,2]`` (x, y) pixels of each instance's FCOS location; levels: int64 ``[K]``.
        Returns float ``[K,1,h*f,w*f]`` logits at ``out_stride`` (f = feat_stride/out_stride).
        """
        _, c, h, w = mask_feats.shape
        k = params.shape[0]
        grid = compute_locations(h, w, self.feat_stride, mask_feats.device)  # [hw,2]
        rel = (locations[:, None, :].float() - grid[None]) / self.soi[levels].float()[:, None, None]  # [K,hw,2]
        x = torch.cat([rel.permute(0, 2, 1).to(mask_feats.dtype), mask_feats[im_inds].reshape(k, c, h * w)], dim=1)
        weights, biases = self.parse_params(params.to(x.dtype))
        for i, (wt, b) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(b, wt, x)
            if i < len(weights) - 1:
                x = F.relu(x)
        logits = x.reshape(k, 1, h, w)
        return aligned_bilinear(logits, self.feat_stride // self.out_stride)


@dataclass
class InstancePredictions:
    """Predictions for one image in original-image pixels.

    boxes float32 ``[N,4]`` xyxy; scores float32 ``[N]``; labels int64 ``[N]`` contiguous;
    masks bool ``[N,H,W]`` (original image size).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor


class CondInst(nn.Module):
    """CondInst / BoxInst network (methods.md §1).

    Input images are uint8 RGB ``[B,3,Hp,Wp]`` padded to a multiple of 32; normalisation uses the
    backbone's ``pixel_mean``/``pixel_std``.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = build_backbone(cfg.backbone, weights=cfg.backbone_weights, freeze_at=cfg.freeze_at)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn_channels)
        self.strides = list(self.fpn.strides)
        self.mask_head = DynamicMaskHead(cfg.mask_channels, cfg.dynamic_channels, cfg.dynamic_layers,
                                         strides=tuple(self.strides))
        self.head = FCOSHead(cfg.fpn_channels, num_classes, cfg.head_convs, self.mask_head.num_params,
                             len(self.strides), cfg.prior_prob)
        self.mask_branch = MaskBranch(cfg.fpn_channels, cfg.mask_branch_channels, cfg.mask_branch_convs, cfg.mask_channels)
        # BoxLevelSet's F_ls head (methods.md §3.1), here on the CondInst mask features; training only
        self.level_set_head = (nn.Conv2d(cfg.mask_channels, cfg.level_set_channels, 3, padding=1)
                               if cfg.level_set_channels > 0 else None)
        self.register_buffer("pixel_mean", torch.tensor(self.backbone.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.backbone.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.ranges = level_ranges(cfg.size_of_interest)

    @property
    def mask_out_stride(self) -> int:
        """Stride in pixels of the mask logits of :meth:`detect` and box-conditioned inference (4)."""
        return self.mask_head.out_stride

    # ------------------------------------------------------------------ shared
    def _forward_features(self, images: Tensor, dense_params: bool = True):
        x = (images.float() - self.pixel_mean) / self.pixel_std
        feats = self.fpn(self.backbone(x))
        cls_logits, bbox_reg, ctrness, params = self.head(feats, dense_params)
        mask_feats = self.mask_branch(feats)
        locations = [compute_locations(f.shape[-2], f.shape[-1], s, f.device) for f, s in zip(feats, self.strides)]
        return cls_logits, bbox_reg, ctrness, params, mask_feats, locations

    # ------------------------------------------------------------------ training
    def training_losses(self, images: Tensor, inputs: SupervisionInputs, supervision: MaskSupervision,
                        step: int) -> dict[str, Tensor]:
        """All training losses for one batch.

        Args:
            images: uint8 ``[B,3,Hp,Wp]``.
            inputs: the supervision's view of the batch (boxes, labels; masks only for mask supervision).
            supervision: computes the mask losses from the sampled instances' logits.
            step: global optimisation step (0-based), for warm-ups.
        Returns a dict of fp32 scalar losses whose sum is the training objective.
        """
        cls_logits, bbox_reg, ctrness, params, mask_feats, locations = self._forward_features(images)
        targets = fcos_targets(locations, self.strides, self.ranges, inputs.boxes, inputs.labels,
                               self.num_classes, self.cfg.center_sampling_radius)
        flat_cls = flatten_levels(cls_logits)
        flat_ctr = flatten_levels(ctrness)
        flat_reg = flatten_levels(bbox_reg)
        losses = fcos_losses(flat_cls, flat_reg, flat_ctr, targets, self.num_classes)

        instances = self._sample_instances(flat_cls, flat_ctr, flatten_levels(params), locations, targets, mask_feats,
                                           flat_reg=flat_reg)
        if self.level_set_head is not None:
            f = self.mask_head.feat_stride // self.mask_head.out_stride
            instances.level_set_feats = aligned_bilinear(self.level_set_head(mask_feats), f).float()
        mask_losses = supervision.losses(instances, inputs, step)
        if len(instances) == 0 or self.level_set_head is not None:
            # keep every parameter in the graph (DDP) when a batch has no positives or the supervision
            # does not use the level-set head
            anchor = mask_feats.sum() * 0 + sum(p.sum() for p in params) * 0
            if instances.level_set_feats is not None:
                anchor = anchor + instances.level_set_feats.sum() * 0
            mask_losses = {k: v + anchor for k, v in mask_losses.items()}
        losses.update(mask_losses)
        return losses

    def _sample_instances(self, flat_cls: Tensor, flat_ctr: Tensor, flat_params: Tensor, locations: list[Tensor],
                          targets, mask_feats: Tensor, flat_reg: Tensor | None = None) -> MaskInstances:
        """Pick the positives that get a mask loss (methods.md §1.5) and run the dynamic head on them.

        Besides the logits, the returned :class:`MaskInstances` carries where each positive sits
        (``loc_inds``, ``locations``, ``levels``), the stride-8 ``mask_feats`` and, when ``flat_reg``
        (``[B,L,4]`` ltrb / level stride, levels concatenated) is given, the regressed ``pred_boxes``
        -- what SIM needs to run its teacher at the same positives (methods.md §5.1, §5.4).
        """
        level_of = torch.cat([torch.full((len(l),), i, dtype=torch.int64, device=l.device) for i, l in enumerate(locations)])
        all_locs = torch.cat(locations)
        im_inds, loc_inds = torch.nonzero(targets.gt_inds >= 0, as_tuple=True)
        gt_inds = targets.gt_inds[im_inds, loc_inds]
        k = self.cfg.topk_proposals_per_image
        if k > 0 and len(im_inds):
            with torch.no_grad():
                score = flat_cls[im_inds, loc_inds].detach().sigmoid().max(1).values * flat_ctr[im_inds, loc_inds, 0].detach().sigmoid()
            keep = _topk_per_gt(im_inds, gt_inds, score, k)
            im_inds, loc_inds, gt_inds = im_inds[keep], loc_inds[keep], gt_inds[keep]
        elif self.cfg.max_proposals > 0 and len(im_inds) > self.cfg.max_proposals:
            keep = torch.randperm(len(im_inds), device=im_inds.device)[: self.cfg.max_proposals]
            im_inds, loc_inds, gt_inds = im_inds[keep], loc_inds[keep], gt_inds[keep]
        labels = targets.labels[im_inds, loc_inds]
        locs, levels = all_locs[loc_inds], level_of[loc_inds]
        logits = self.mask_head(mask_feats, flat_params[im_inds, loc_inds], im_inds, locs, levels)
        pred_boxes = None
        if flat_reg is not None:
            # decode as fcos_inference / box_conditioned: distances are in units of the level stride
            level_stride = torch.tensor(self.strides, dtype=torch.float32, device=locs.device)[levels]
            ltrb = flat_reg[im_inds, loc_inds].detach().float() * level_stride[:, None]
            pred_boxes = torch.cat([locs - ltrb[:, :2], locs + ltrb[:, 2:]], dim=1)
        return MaskInstances(logits.float(), im_inds, gt_inds, labels, stride=self.mask_head.out_stride,
                             loc_inds=loc_inds, locations=locs, levels=levels, mask_feats=mask_feats,
                             pred_boxes=pred_boxes)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def detect(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> tuple[list[Detections], list[Tensor]]:
        """FCOS detections and their stride-4 mask logits.

        Returns per image :class:`~boxmask.modeling.fcos.Detections` (resized-image pixels) and float
        mask logits ``[N,1,Hp/4,Wp/4]``.
        """
        cls_logits, bbox_reg, ctrness, params, mask_feats, locations = self._forward_features(images)
        cfg = self.cfg
        dets = fcos_inference(cls_logits, bbox_reg, ctrness, params, locations, self.strides, image_sizes,
                              cfg.score_threshold, cfg.pre_nms_topk, cfg.nms_threshold, cfg.max_detections)
        mask_logits = []
        for b, det in enumerate(dets):
            im_inds = torch.full((len(det.scores),), b, dtype=torch.int64, device=images.device)
            mask_logits.append(self.mask_head(mask_feats, det.params, im_inds, det.locations, det.levels).float())
        return dets, mask_logits

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]]) -> list[InstancePredictions]:
        """Detections with binary masks in original-image pixels (methods.md §1.7)."""
        dets, mask_logits = self.detect(images, image_sizes)
        return [postprocess(det, logits, size, orig, self.mask_head.out_stride, self.cfg.mask_threshold)
                for det, logits, size, orig in zip(dets, mask_logits, image_sizes, orig_sizes)]


def _topk_per_gt(im_inds: Tensor, gt_inds: Tensor, score: Tensor, k_per_image: int) -> Tensor:
    """Indices kept by BoxInst's sampling: per image ``k = max(k_per_image // #GTs with positives, 1)``
    positives per GT, the highest ``score`` first (methods.md §1.5)."""
    keep = []
    for b in im_inds.unique():
        sel = torch.nonzero(im_inds == b).squeeze(1)
        g = gt_inds[sel]
        num_gts = int(g.unique().numel())
        k = max(k_per_image // num_gts, 1)
        order = torch.argsort(score[sel], descending=True)
        order = order[torch.argsort(g[order], stable=True)]  # grouped by GT, best first inside a group
        g_sorted = g[order]
        first = torch.ones_like(g_sorted, dtype=torch.bool)
        first[1:] = g_sorted[1:] != g_sorted[:-1]
        group_start = torch.cummax(torch.where(first, torch.arange(len(order), device=g.device), 0), 0).values
        rank = torch.arange(len(order), device=g.device) - group_start
        keep.append(sel[order[rank < k]])
    return torch.cat(keep) if keep else im_inds.new_zeros(0)


def postprocess(det: Detections, mask_logits: Tensor, image_size: tuple[int, int], orig_size: tuple[int, int],
                out_stride: int = 4, mask_threshold: float = 0.5) -> InstancePredictions:
    """Rescale detections to the original image and binarise masks (methods.md §1.7).

    mask_logits ``[N,1,Hp/s,Wp/s]`` → sigmoid → aligned ×s → crop to ``image_size`` → bilinear to
    ``orig_size`` → ``> mask_threshold``. Boxes are scaled by ``orig/resized`` per axis.
    """
    h, w = image_size
    oh, ow = orig_size
    boxes = det.boxes.clone()
    boxes[:, 0::2] *= ow / w
    boxes[:, 1::2] *= oh / h
    if len(det.scores) == 0:
        masks = torch.zeros(0, oh, ow, dtype=torch.bool, device=boxes.device)
    else:
        probs = aligned_bilinear(mask_logits.sigmoid(), out_stride)[:, :, :h, :w]
        probs = F.interpolate(probs, size=(oh, ow), mode="bilinear", align_corners=False)
        masks = probs[:, 0] > mask_threshold
    return InstancePredictions(boxes, det.scores, det.labels, masks)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network of a recipe: :class:`CondInst` (``model.arch: condinst``, BoxInst/CondInst recipes) or
    :class:`~boxmask.modeling.solov2.SOLOv2` (``model.arch: solov2``, BoxLevelSet recipes).

    Raises ValueError for an unknown ``cfg.arch`` or ``num_classes < 1``.
    """
    if cfg.arch == "solov2":
        from .solov2 import SOLOv2

        return SOLOv2(cfg, num_classes)
    if cfg.arch != "condinst":
        raise ValueError(f"unknown model.arch {cfg.arch!r}")
    return CondInst(cfg, num_classes)
