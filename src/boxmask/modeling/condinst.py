"""CondInst: FCOS + mask branch + dynamic mask head (Tian et al., ECCV 2020; methods.md §1.3–1.7).

BoxInst (CVPR 2021) is this network trained with box-only losses (``boxmask.supervision``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..ops import aligned_bilinear
from ..structures import BoxConditionedMasks, InstancePredictions, MaskInstances, TrainOutputs
from .backbones import build_backbone
from .box_conditioned import best_fitting_candidates, box_location_candidates, check_box_conditioned_args
from .fcos import (Detections, FCOSHead, compute_locations, fcos_inference, fcos_losses, fcos_targets,
                   flatten_levels, level_ranges)
from .fpn import FPN

__all__ = ["CondInst", "CondInstFeatures", "CondInstPositives", "CondInstTrainOutputs", "DynamicMaskHead", "MaskBranch",
           "dynamic_head_num_params", "postprocess"]

# Instances per dynamic-mask-head call in box-conditioned inference: bounds the [K, C_mask+2, h*w] input.
_HEAD_CHUNK = 64


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
class CondInstFeatures:
    """Dense outputs of one CondInst forward pass (:meth:`CondInst.features`), per FPN level P3..P7.

    cls_logits: ``[B,C,h_l,w_l]`` class logits; bbox_reg: ``[B,4,h_l,w_l]`` ltrb distances in units of the
    level stride; ctrness: ``[B,1,h_l,w_l]`` centre-ness logits; params: ``[B,P,h_l,w_l]`` controller outputs
    (the dynamic mask head's weights), or an empty list when not computed densely; mask_feats:
    ``[B,C_mask,Hp/8,Wp/8]`` mask-branch output at stride 8; locations: float32 ``[h_l*w_l,2]`` (x, y) pixel
    centre of each location (row-major).
    """

    cls_logits: list[Tensor]
    bbox_reg: list[Tensor]
    ctrness: list[Tensor]
    params: list[Tensor]
    mask_feats: Tensor
    locations: list[Tensor]


@dataclass
class CondInstPositives:
    """Where the sampled positives of :meth:`CondInst.forward_train` sit (same order as the instances).

    loc_inds: int64 ``[K]`` index into the levels-concatenated locations (P3 row-major, then P4, ...);
    locations: float32 ``[K,2]`` their (x, y) pixels; levels: int64 ``[K]`` FPN level (0 = P3);
    pred_boxes: float32 ``[K,4]`` xyxy resized-image pixels, the box each positive regresses
    (``location -/+ ltrb * level stride``), detached.
    """

    loc_inds: Tensor
    locations: Tensor
    levels: Tensor
    pred_boxes: Tensor


@dataclass
class CondInstTrainOutputs(TrainOutputs):
    """:class:`~boxmask.structures.TrainOutputs` of CondInst plus what a method may re-use of the forward
    pass (SIM runs its teacher at the same positives, methods.md §5.1): ``features`` (the student's
    :class:`CondInstFeatures`, attached to the graph) and ``positives`` (:class:`CondInstPositives`)."""

    features: CondInstFeatures | None = None
    positives: CondInstPositives | None = None


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
    def fpn_features(self, images: Tensor) -> list[Tensor]:
        """Normalisation, backbone and FPN on uint8 ``[B,3,Hp,Wp]`` images: P3..P7 ``[B,fpn_channels,Hp/s,Wp/s]``."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        return self.fpn(self.backbone(x))

    def head_features(self, feats: list[Tensor], dense_params: bool = True) -> CondInstFeatures:
        """FCOS head and mask branch on FPN features P3..P7 (:meth:`fpn_features`). ``dense_params=False``
        skips the dense controller: ``params`` then holds the box-tower features for
        :meth:`~boxmask.modeling.fcos.FCOSHead.controller_at` (ONNX export)."""
        cls_logits, bbox_reg, ctrness, params = self.head(feats, dense_params)
        mask_feats = self.mask_branch(feats)
        locations = [compute_locations(f.shape[-2], f.shape[-1], s, f.device) for f, s in zip(feats, self.strides)]
        return CondInstFeatures(cls_logits, bbox_reg, ctrness, params, mask_feats, locations)

    def features(self, images: Tensor, dense_params: bool = True) -> CondInstFeatures:
        """One forward pass of backbone, FPN, FCOS head and mask branch on uint8 ``[B,3,Hp,Wp]`` images
        (:meth:`fpn_features` then :meth:`head_features`)."""
        return self.head_features(self.fpn_features(images), dense_params)

    def mask_logits_at(self, feats: CondInstFeatures, im_inds: Tensor, loc_inds: Tensor) -> Tensor:
        """Dynamic-mask-head logits float ``[K,1,Hp/4,Wp/4]`` of the locations ``loc_inds`` (int64 ``[K]``, index
        into the levels-concatenated locations) of images ``im_inds`` (int64 ``[K]``), from ``feats`` (dense
        ``params`` required). Raises IndexError for a location outside the feature maps."""
        flat_params = flatten_levels(feats.params)
        level_of = torch.cat([torch.full((len(l),), i, dtype=torch.int64, device=l.device)
                              for i, l in enumerate(feats.locations)])
        return self.mask_head(feats.mask_feats, flat_params[im_inds, loc_inds], im_inds,
                              torch.cat(feats.locations)[loc_inds], level_of[loc_inds])

    # ------------------------------------------------------------------ training
    def forward_train(self, images: Tensor, boxes: list[Tensor], labels: list[Tensor]) -> CondInstTrainOutputs:
        """Training forward pass: FCOS losses and the mask logits of the sampled positives (methods.md §1.2, §1.5).

        Args:
            images: uint8 ``[B,3,Hp,Wp]``.
            boxes: per image float ``[N_i,4]`` xyxy resized-image pixels; labels: per image int64 ``[N_i]``.
        Returns :class:`CondInstTrainOutputs`: ``detector_losses`` (``loss_fcos_cls``, ``loss_fcos_loc``,
        ``loss_fcos_ctr``), one instance group at stride 4 (with ``level_set_feats`` when the model has the
        level-set head), the DDP anchor, the features and the positives' locations and regressed boxes.
        """
        return self.forward_train_from_fpn(self.fpn_features(images), boxes, labels)

    def forward_train_from_fpn(self, fpn_feats: list[Tensor], boxes: list[Tensor],
                               labels: list[Tensor]) -> CondInstTrainOutputs:
        """:meth:`forward_train` after the FPN: the same outputs from FPN features P3..P7 (the stage seam the
        speed benchmark times separately)."""
        feats = self.head_features(fpn_feats)
        targets = fcos_targets(feats.locations, self.strides, self.ranges, boxes, labels,
                               self.num_classes, self.cfg.center_sampling_radius)
        flat_cls = flatten_levels(feats.cls_logits)
        flat_ctr = flatten_levels(feats.ctrness)
        flat_reg = flatten_levels(feats.bbox_reg)
        losses = fcos_losses(flat_cls, flat_reg, flat_ctr, targets, self.num_classes)
        instances, positives = self._sample_instances(flat_cls, flat_ctr, flatten_levels(feats.params), feats.locations,
                                                      targets, feats.mask_feats, flat_reg)
        anchor = feats.mask_feats.sum() * 0 + sum(p.sum() for p in feats.params) * 0
        if self.level_set_head is not None:
            f = self.mask_head.feat_stride // self.mask_head.out_stride
            instances.level_set_feats = aligned_bilinear(self.level_set_head(feats.mask_feats), f).float()
            anchor = anchor + instances.level_set_feats.sum() * 0
        return CondInstTrainOutputs(losses, [instances], anchor, features=feats, positives=positives)

    def _sample_instances(self, flat_cls: Tensor, flat_ctr: Tensor, flat_params: Tensor, locations: list[Tensor],
                          targets, mask_feats: Tensor, flat_reg: Tensor) -> tuple[MaskInstances, CondInstPositives]:
        """Pick the positives that get a mask loss (methods.md §1.5) and run the dynamic head on them.

        ``flat_reg``: ``[B,L,4]`` ltrb / level stride, levels concatenated, decoded into the positives'
        regressed boxes (as ``fcos_inference``).
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
        level_stride = torch.tensor(self.strides, dtype=torch.float32, device=locs.device)[levels]
        ltrb = flat_reg[im_inds, loc_inds].detach().float() * level_stride[:, None]
        pred_boxes = torch.cat([locs - ltrb[:, :2], locs + ltrb[:, 2:]], dim=1)
        return (MaskInstances(logits.float(), im_inds, gt_inds, labels, stride=self.mask_head.out_stride),
                CondInstPositives(loc_inds, locs, levels, pred_boxes))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def detect(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> tuple[list[Detections], list[Tensor]]:
        """FCOS detections and their stride-4 mask logits.

        Returns per image :class:`~boxmask.modeling.fcos.Detections` (resized-image pixels) and float
        mask logits ``[N,1,Hp/4,Wp/4]``.
        """
        f = self.features(images)
        cfg = self.cfg
        dets = fcos_inference(f.cls_logits, f.bbox_reg, f.ctrness, f.params, f.locations, self.strides, image_sizes,
                              cfg.score_threshold, cfg.pre_nms_topk, cfg.nms_threshold, cfg.max_detections)
        mask_logits = []
        for b, det in enumerate(dets):
            im_inds = torch.full((len(det.scores),), b, dtype=torch.int64, device=images.device)
            mask_logits.append(self.mask_head(f.mask_feats, det.params, im_inds, det.locations, det.levels).float())
        return dets, mask_logits

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]]) -> list[InstancePredictions]:
        """Detections with binary masks in original-image pixels (methods.md §1.7)."""
        dets, mask_logits = self.detect(images, image_sizes)
        return [postprocess(det, logits, size, orig, self.mask_head.out_stride, self.cfg.mask_threshold)
                for det, logits, size, orig in zip(dets, mask_logits, image_sizes, orig_sizes)]


    @torch.no_grad()
    def box_conditioned_masks(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: list[Tensor],
                              labels: list[Tensor] | None = None, rank: str = "score_iou",
                              candidates: int = 5) -> list[BoxConditionedMasks]:
        """Mask logits for given boxes with the chosen locations (methods.md §1.4; DiscoBox box-conditioned
        inference): one forward pass over the batch, then per box the location rule of
        :mod:`boxmask.modeling.box_conditioned` and the dynamic mask head with that location's controller
        parameters. The caller puts the model in eval mode and on the images' device.

        Args:
            images: uint8 ``[B,3,Hp,Wp]`` RGB, zero-padded to a multiple of 32 (see ``collate_batch``).
            image_sizes: per image ``(h, w)`` resized size before padding (the boxes lie inside the image;
                kept for symmetry with :meth:`detect`).
            boxes: per image float ``[N_i,4]`` xyxy in resized-image pixels.
            labels: per image int64 ``[N_i]`` contiguous model classes (-1 = unknown), or None.
            rank: location ranking, one of :data:`~boxmask.modeling.box_conditioned.LOCATION_RANKS` (rule 2).
            candidates: locations tried per box (rule 4; 1 = the best-ranked only).

        Returns:
            One :class:`~boxmask.structures.BoxConditionedMasks` per image (logits ``[N_i,1,Hp/4,Wp/4]``).

        Raises:
            ValueError: ``boxes``/``labels`` do not have one entry per image, a bad box tensor shape, an
                unknown ``rank`` or ``candidates < 1``.
        """
        check_box_conditioned_args(images, boxes, labels, rank, candidates)
        feats = self.features(images)
        locations = feats.locations
        flat_cls = flatten_levels(feats.cls_logits).float()  # [B,L,C]
        pred_boxes = None
        if rank == "score_iou":
            level_stride = torch.cat([torch.full((len(l),), float(s), device=l.device)
                                      for l, s in zip(locations, self.strides)])
            ltrb = flatten_levels(feats.bbox_reg).float() * level_stride[None, :, None]  # [B,L,4] pixels
            locs = torch.cat(locations)[None]
            pred_boxes = torch.cat([locs - ltrb[..., :2], locs + ltrb[..., 2:]], dim=-1)
        flat_ctr = flatten_levels(feats.ctrness).float()  # [B,L,1]
        flat_params = flatten_levels(feats.params)  # [B,L,P]
        all_locs = torch.cat(locations)
        level_of = torch.cat([torch.full((len(l),), i, dtype=torch.int64, device=l.device)
                              for i, l in enumerate(locations)])
        hp, wp = images.shape[-2:]
        out = []
        for b in range(images.shape[0]):
            scores = flat_cls[b].sigmoid() * flat_ctr[b].sigmoid()  # [L,C]
            boxes_b = boxes[b].to(images.device)
            cand, cand_scores, valid, inside = box_location_candidates(
                scores, all_locs, len(locations[0]), boxes_b, None if labels is None else labels[b],
                None if pred_boxes is None else pred_boxes[b], candidates)
            flat_cand = cand[valid]  # row-major: the candidates of box 0 first
            chunks = []
            for s in range(0, len(flat_cand), _HEAD_CHUNK):
                sel = flat_cand[s:s + _HEAD_CHUNK]
                im_inds = torch.full((len(sel),), b, dtype=torch.int64, device=images.device)
                chunks.append(self.mask_head(feats.mask_feats, flat_params[b, sel], im_inds, all_locs[sel],
                                             level_of[sel]).float())
            h, w = feats.mask_feats.shape[-2:]
            f = self.mask_head.feat_stride // self.mask_head.out_stride
            if not chunks:
                logits = torch.zeros(0, 1, h * f, w * f, device=images.device)
                out.append(BoxConditionedMasks(logits, cand[:, 0], level_of[cand[:, 0]], all_locs[cand[:, 0]],
                                               cand_scores[:, 0], inside, logits.new_zeros(0)))
                continue
            logits, pick, agreement = best_fitting_candidates(torch.cat(chunks), valid, boxes_b, (hp, wp),
                                                              self.mask_head.out_stride)
            chosen = cand.gather(1, pick[:, None])[:, 0]
            out.append(BoxConditionedMasks(logits, chosen, level_of[chosen], all_locs[chosen],
                                           cand_scores.gather(1, pick[:, None])[:, 0], inside, agreement))
        return out


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

