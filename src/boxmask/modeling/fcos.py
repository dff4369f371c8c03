"""FCOS detector head, target assignment, losses and box post-processing (methods.md §1.2).

Source: Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019, with the
AdelaiDet defaults used by CondInst/BoxInst (centre sampling radius 1.5, stride-normalised ReLU
regression, centerness on the box tower, GIoU loss, score ``sqrt(cls * ctr)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

INF = 1e8


class Scale(nn.Module):
    """Learnable scalar multiplier (one per FPN level), initialised to ``init``."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32 if channels % 32 == 0 else 16, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """FCOS head shared over P3–P7 with the CondInst controller.

    Args:
        in_channels: FPN channels (256 in the papers).
        num_classes: foreground classes C.
        num_convs: convs per tower (4).
        num_params: controller outputs per location (233 for BoxInst's dynamic head).
        num_levels: FPN levels (5).
        prior_prob: focal-loss prior for the classification bias (0.01).

    ``forward(features)`` takes ``list[Tensor [B,in_channels,H_l,W_l]]`` and returns four lists over
    levels: class logits ``[B,C,H_l,W_l]``, box distances ``[B,4,H_l,W_l]`` (l,t,r,b divided by the
    level stride, >= 0 by ReLU), centerness logits ``[B,1,H_l,W_l]`` and controller outputs
    ``[B,num_params,H_l,W_l]``. All float32 (or the autocast dtype). With ``dense_params=False`` the fourth
    list holds the bbox-tower features ``[B,in_channels,H_l,W_l]`` instead, for :meth:`controller_at`.
    """

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, num_params: int = 233,
                 num_levels: int = 5, prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = _tower(in_channels, num_convs)
        self.bbox_tower = _tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.controller = nn.Conv2d(in_channels, num_params, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor], dense_params: bool = True):
        logits, bbox_reg, ctrness, params = [], [], [], []
        for level, feature in enumerate(features):
            cls_feat = self.cls_tower(feature)
            box_feat = self.bbox_tower(feature)
            logits.append(self.cls_logits(cls_feat))
            ctrness.append(self.ctrness(box_feat))
            bbox_reg.append(F.relu(self.scales[level](self.bbox_pred(box_feat))))
            params.append(self.controller(box_feat) if dense_params else box_feat)
        return logits, bbox_reg, ctrness, params

    def controller_at(self, box_feats: list[Tensor], levels: Tensor, loc_idx: Tensor) -> Tensor:
        """The controller evaluated at a few locations only: equal (to float rounding) to gathering the dense
        controller output, without convolving every location of every level (inference keeps ~100).

        Args:
            box_feats: per level the bbox-tower features ``[B,in_channels,H_l,W_l]`` (``forward(...,
                dense_params=False)`` returns them in place of the controller outputs).
            levels: int64 ``[B,K]``, the FPN level index of each location (0 = P3).
            loc_idx: int64 ``[B,K]``, the row-major location index within its level (``y*W_l + x``).
        Returns float ``[B,K,num_params]``. Raises ValueError when the controller is not a 3x3, stride-1,
        padding-1 convolution (the only form the gather below reproduces).
        """
        conv = self.controller
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1) \
                or conv.groups != 1:
            raise ValueError("controller_at needs a 3x3 stride-1 padding-1 controller convolution")
        b, k = levels.shape
        dy = torch.tensor([-1, -1, -1, 0, 0, 0, 1, 1, 1], device=levels.device)
        dx = torch.tensor([-1, 0, 1, -1, 0, 1, -1, 0, 1], device=levels.device)
        patches = None
        for level, feat in enumerate(box_feats):
            c, h, w = feat.shape[1:]
            idx = loc_idx.clamp(max=h * w - 1)  # (locations of other levels: any in-range index, masked below)
            row, col = idx // w, idx % w
            flat = F.pad(feat, (1, 1, 1, 1)).flatten(2)  # zero padding as the convolution's
            taps = (row[..., None] + 1 + dy) * (w + 2) + (col[..., None] + 1 + dx)  # [B,K,9]
            got = torch.gather(flat, 2, taps.reshape(b, 1, k * 9).expand(-1, c, -1))  # [B,C,K*9]
            got = got.reshape(b, c, k, 9).permute(0, 2, 1, 3).reshape(b, k, c * 9)  # (c, ky, kx) as the weight
            patches = got if patches is None else torch.where((levels == level)[..., None], got, patches)
        return patches @ conv.weight.reshape(conv.out_channels, -1).t() + conv.bias


def compute_locations(h: int, w: int, stride: int, device: torch.device) -> Tensor:
    """Image-plane centres of a ``h x w`` feature map: float32 ``[h*w, 2]`` as (x, y) pixels,
    ``(i*stride + stride//2)`` row-major (methods.md §1.2)."""
    xs = torch.arange(w, dtype=torch.float32, device=device) * stride + stride // 2
    ys = torch.arange(h, dtype=torch.float32, device=device) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def level_ranges(size_of_interest: list[int]) -> list[tuple[float, float]]:
    """``[64,128,256,512]`` → ``[(-1,64),(64,128),(128,256),(256,512),(512,INF)]``."""
    bounds = [-1.0] + [float(s) for s in size_of_interest] + [INF]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


@dataclass
class FCOSTargets:
    """Per-location targets for a batch, levels concatenated (L = Σ H_l·W_l).

    labels: int64 ``[B,L]``, ``num_classes`` for background.
    reg: float32 ``[B,L,4]`` l,t,r,b divided by the level stride.
    gt_inds: int64 ``[B,L]`` index of the assigned GT within its image, -1 for background.
    """

    labels: Tensor
    reg: Tensor
    gt_inds: Tensor


@torch.no_grad()
def fcos_targets(locations: list[Tensor], strides: list[int], ranges: list[tuple[float, float]],
                 gt_boxes: list[Tensor], gt_labels: list[Tensor], num_classes: int,
                 radius: float = 1.5) -> FCOSTargets:
    """Assign every location of every level to at most one GT box (methods.md §1.2).

    Args:
        locations: per level float ``[L_l,2]`` (x, y) pixels from :func:`compute_locations`.
        strides: per level stride in pixels.
        ranges: per level ``(lo, hi]`` bounds on ``max(l,t,r,b)`` in pixels.
        gt_boxes: per image float ``[N_i,4]`` xyxy pixels (resized image coordinates).
        gt_labels: per image int64 ``[N_i]`` in ``[0, num_classes)``.
        radius: centre-sampling radius in strides (positives within ``radius*stride`` of the box
            centre, clipped to the box); ``<= 0`` uses the whole box.

    Ambiguous locations go to the GT with the smallest area. Returns :class:`FCOSTargets`.
    """
    device = locations[0].device
    num_per_level = [len(loc) for loc in locations]
    locs = torch.cat(locations, 0)
    level_stride = torch.cat([torch.full((n,), float(s), device=device) for n, s in zip(num_per_level, strides)])
    lo = torch.cat([torch.full((n,), r[0], device=device) for n, r in zip(num_per_level, ranges)])
    hi = torch.cat([torch.full((n,), r[1], device=device) for n, r in zip(num_per_level, ranges)])
    xs, ys = locs[:, 0:1], locs[:, 1:2]
    labels_out, reg_out, inds_out = [], [], []
    for boxes, labels in zip(gt_boxes, gt_labels):
        num_locs = len(locs)
        if len(boxes) == 0:
            labels_out.append(torch.full((num_locs,), num_classes, dtype=torch.int64, device=device))
            reg_out.append(torch.zeros(num_locs, 4, device=device))
            inds_out.append(torch.full((num_locs,), -1, dtype=torch.int64, device=device))
            continue
        boxes = boxes.float()
        l = xs - boxes[None, :, 0]
        t = ys - boxes[None, :, 1]
        r = boxes[None, :, 2] - xs
        b = boxes[None, :, 3] - ys
        reg = torch.stack([l, t, r, b], dim=2)  # [L,N,4]
        if radius > 0:
            cx = (boxes[:, 0] + boxes[:, 2]) / 2
            cy = (boxes[:, 1] + boxes[:, 3]) / 2
            rad = level_stride[:, None] * radius
            x0 = torch.maximum(cx[None] - rad, boxes[None, :, 0])
            y0 = torch.maximum(cy[None] - rad, boxes[None, :, 1])
            x1 = torch.minimum(cx[None] + rad, boxes[None, :, 2])
            y1 = torch.minimum(cy[None] + rad, boxes[None, :, 3])
            inside = torch.stack([xs - x0, ys - y0, x1 - xs, y1 - ys], 2).min(2).values > 0
        else:
            inside = reg.min(2).values > 0
        max_reg = reg.max(2).values
        in_range = (max_reg >= lo[:, None]) & (max_reg <= hi[:, None])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(num_locs, -1).clone()
        area[~(inside & in_range)] = INF
        min_area, gt_ind = area.min(1)
        fg = min_area < INF
        lab = labels[gt_ind].clone()
        lab[~fg] = num_classes
        gt_ind[~fg] = -1
        reg_t = reg[torch.arange(num_locs, device=device), gt_ind.clamp(min=0)] / level_stride[:, None]
        labels_out.append(lab)
        reg_out.append(reg_t)
        inds_out.append(gt_ind)
    return FCOSTargets(torch.stack(labels_out), torch.stack(reg_out), torch.stack(inds_out))


def centerness_target(reg: Tensor) -> Tensor:
    """``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` for ``reg [N,4]`` (l,t,r,b > 0) → ``[N]``."""
    lr = reg[:, [0, 2]]
    tb = reg[:, [1, 3]]
    c = (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
    return torch.sqrt(c.clamp(min=0))


def reduce_mean(x: Tensor) -> Tensor:
    """Average a tensor over DDP processes (identity without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def flatten_levels(maps: list[Tensor]) -> Tensor:
    """``list[[B,C,H_l,W_l]]`` → ``[B, Σ H_l W_l, C]`` (level-major, row-major inside a level)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


def fcos_losses(cls_logits: Tensor, bbox_reg: Tensor, ctrness: Tensor, targets: FCOSTargets,
                num_classes: int) -> dict[str, Tensor]:
    """FCOS losses (methods.md §1.2): focal classification (α 0.25, γ 2) ÷ mean #positives,
    GIoU box loss weighted by the centerness target ÷ its mean sum, centerness BCE ÷ mean #positives.

    Args:
        cls_logits: ``[B,L,C]``; bbox_reg: ``[B,L,4]`` stride-normalised; ctrness: ``[B,L,1]``.
        targets: from :func:`fcos_targets`.
    Returns ``{"loss_fcos_cls", "loss_fcos_box", "loss_fcos_ctr"}`` scalars (fp32).
    """
    cls_logits = cls_logits.float().reshape(-1, num_classes)
    bbox_reg = bbox_reg.float().reshape(-1, 4)
    ctrness = ctrness.float().reshape(-1)
    labels = targets.labels.reshape(-1)
    reg_t = targets.reg.reshape(-1, 4)
    pos = torch.nonzero(labels != num_classes).squeeze(1)
    num_pos = reduce_mean(torch.tensor(float(len(pos)), device=cls_logits.device)).clamp(min=1.0)
    onehot = torch.zeros_like(cls_logits)
    onehot[pos, labels[pos]] = 1.0
    loss_cls = sigmoid_focal_loss(cls_logits, onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
    if len(pos) == 0:
        zero = bbox_reg.sum() * 0 + ctrness.sum() * 0
        return {"loss_fcos_cls": loss_cls, "loss_fcos_box": zero, "loss_fcos_ctr": zero}
    reg_p = bbox_reg[pos]
    reg_tp = reg_t[pos]
    ctr_t = centerness_target(reg_tp)
    ctr_sum = reduce_mean(ctr_t.sum()).clamp(min=1e-6)
    # boxes relative to the location: (-l, -t, r, b)
    pred_boxes = torch.cat([-reg_p[:, :2], reg_p[:, 2:]], 1)
    tgt_boxes = torch.cat([-reg_tp[:, :2], reg_tp[:, 2:]], 1)
    giou = generalized_box_iou_loss(pred_boxes, tgt_boxes, reduction="none")
    loss_box = (giou * ctr_t).sum() / ctr_sum
    loss_ctr = F.binary_cross_entropy_with_logits(ctrness[pos], ctr_t, reduction="sum") / num_pos
    return {"loss_fcos_cls": loss_cls, "loss_fcos_box": loss_box, "loss_fcos_ctr": loss_ctr}


@dataclass
class Detections:
    """FCOS detections of one image after NMS (resized-image pixel coordinates).

    boxes float ``[N,4]`` xyxy; scores float ``[N]`` in [0,1] (``sqrt(cls*ctr)``); labels int64 ``[N]``;
    params float ``[N,P]`` controller outputs; locations float ``[N,2]`` (x, y) pixels;
    levels int64 ``[N]`` FPN level index (0 = P3).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    params: Tensor
    locations: Tensor
    levels: Tensor


@torch.no_grad()
def fcos_inference(cls_logits: list[Tensor], bbox_reg: list[Tensor], ctrness: list[Tensor], params: list[Tensor],
                   locations: list[Tensor], strides: list[int], image_sizes: list[tuple[int, int]],
                   score_threshold: float = 0.05, pre_nms_topk: int = 1000, nms_threshold: float = 0.6,
                   max_detections: int = 100) -> list[Detections]:
    """Decode FCOS outputs into per-image detections (methods.md §1.2 inference).

    Threshold on ``σ(cls)·σ(ctr)``, top ``pre_nms_topk`` per level, boxes = location ∓ distances × stride
    clipped to the image, score ``sqrt(σ(cls)·σ(ctr))``, class-aware NMS (torchvision ``batched_nms``),
    top ``max_detections``.
    """
    batch = cls_logits[0].shape[0]
    out = []
    for b in range(batch):
        all_boxes, all_scores, all_labels, all_params, all_locs, all_levels = [], [], [], [], [], []
        h, w = image_sizes[b]
        for level, (cl, rg, ct, pr) in enumerate(zip(cls_logits, bbox_reg, ctrness, params)):
            num_classes = cl.shape[1]
            cls_p = cl[b].float().permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
            ctr_p = ct[b].float().permute(1, 2, 0).reshape(-1).sigmoid()
            scores = cls_p * ctr_p[:, None]
            keep = torch.nonzero(scores > score_threshold)
            if len(keep) == 0:
                continue
            cand = scores[keep[:, 0], keep[:, 1]]
            if len(cand) > pre_nms_topk:
                cand, top = cand.topk(pre_nms_topk)
                keep = keep[top]
            loc_idx, lab = keep[:, 0], keep[:, 1]
            reg = rg[b].float().permute(1, 2, 0).reshape(-1, 4)[loc_idx] * strides[level]
            loc = locations[level][loc_idx]
            boxes = torch.stack([loc[:, 0] - reg[:, 0], loc[:, 1] - reg[:, 1], loc[:, 0] + reg[:, 2], loc[:, 1] + reg[:, 3]], 1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            all_boxes.append(boxes)
            all_scores.append(cand.sqrt())
            all_labels.append(lab)
            all_params.append(pr[b].float().permute(1, 2, 0).reshape(-1, pr.shape[1])[loc_idx])
            all_locs.append(loc)
            all_levels.append(torch.full_like(lab, level))
        if not all_boxes:
            dev = cls_logits[0].device
            num_params = params[0].shape[1]
            out.append(Detections(torch.zeros(0, 4, device=dev), torch.zeros(0, device=dev),
                                  torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, num_params, device=dev),
                                  torch.zeros(0, 2, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)))
            continue
        boxes = torch.cat(all_boxes)
        scores = torch.cat(all_scores)
        labels = torch.cat(all_labels)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        idx = torch.nonzero(valid).squeeze(1)
        keep = idx[batched_nms(boxes[idx], scores[idx], labels[idx], nms_threshold)][:max_detections]
        out.append(Detections(boxes[keep], scores[keep], labels[keep], torch.cat(all_params)[keep],
                              torch.cat(all_locs)[keep], torch.cat(all_levels)[keep]))
    return out
