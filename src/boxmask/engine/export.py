"""ONNX export of boxmask checkpoints and inference with onnxruntime (``boxmask export``, ``--onnx``).

The exported graph is the whole model, post-processing included, so that it runs where PyTorch is not
installed:

* **input** ``images``: uint8 ``[B, 3, H, W]`` RGB, 0..255, every image of the batch the same size (resize
  them first, e.g. with the shorter side at ``test_min_size`` of the metadata). The graph pads the batch
  with zeros to a multiple of ``size_divisibility`` (32) at the bottom/right, as the PyTorch data
  collation does, and normalises with the backbone's ``pixel_mean``/``pixel_std``.
* **outputs**, ``K`` = the ``max_dets`` export option, rows sorted by score (descending), only the first
  ``num_dets[b]`` rows of image ``b`` are detections (the rest: boxes and scores 0, labels -1, masks 0):

  - ``boxes`` float32 ``[B, K, 4]``: xyxy in input pixels (CondInst: the FCOS boxes clipped to the input;
    SOLOv2: the tight boxes of the binary masks at input resolution, ``x2``/``y2`` = last column/row + 1);
  - ``scores`` float32 ``[B, K]`` in [0, 1];
  - ``labels`` int64 ``[B, K]``: contiguous class index (``class_names`` / ``cat_ids`` of the metadata);
  - ``masks`` float32 ``[B, K, H, W]``: mask probabilities at input resolution (the model's stride-4 masks
    upsampled as the PyTorch path does), or uint8 0/1 masks (``prob > mask_threshold``) when exported with
    ``binary_masks=True``;
  - ``num_dets`` int64 ``[B]``.

The post-processing in the graph is the eager one written with fixed-size tensors: CondInst (BoxInst,
CondInst, mixed, SIM) -- FCOS decoding, per-level top ``pre_nms_topk`` above ``score_threshold``,
class-aware NMS (ONNX ``NonMaxSuppression`` over (image, class), at most ``K`` kept per class so that it stops
early), top ``K``, the controller at the ``K`` kept locations only, the dynamic mask head with relative
coordinates as batched matmuls over the detections, aligned upsampling as two ``Resize`` ops; SOLOv2
(BoxLevelSet) -- point NMS, top ``pre_nms_topk`` cells, kernels × mask features (plus the position prior
of ``model.solov2.position_prior``, computed from the dynamic input size), mask-area filter,
maskness, Matrix NMS (gaussian) as batched matmuls, top ``K``. Exported with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``): it needs no ``onnxscript`` and takes our ``symbolic`` functions.

Metadata (``metadata_props`` of the ONNX model, strings; JSON where structured): ``boxmask_version``,
``family`` (``condinst`` / ``solov2``), ``method``, ``class_names``, ``cat_ids``, ``pixel_mean``,
``pixel_std`` (0..255 scale, RGB), ``mask_threshold``, ``score_threshold``, ``max_dets``, ``masks``
(``probabilities`` / ``binary``), ``size_divisibility``, ``test_min_size``, ``test_max_size``,
``input_size`` (``[H, W]`` or ``dynamic``), ``outputs`` and ``config`` (the checkpoint's resolved recipe).

``onnx`` and ``onnxruntime`` are the optional extra ``export`` (``pip install "boxmask[export]"``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from ..modeling.condinst import CondInst
from ..structures import InstancePredictions
from ..modeling.solov2 import MASK_FEAT_STRIDE, SOLO_HEAD_STRIDES, SOLOv2, point_nms, position_prior_logits
from ..ops import aligned_bilinear, tight_boxes

#: supported ``model.arch`` values → the families of the issue (what ``boxmask export`` accepts)
FAMILIES = {"condinst": "CondInst family (BoxInst, CondInst, mixed, SIM)", "solov2": "SOLOv2 family (BoxLevelSet)"}
#: graph input and output names
INPUT_NAMES = ("images",)
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "num_dets")
#: default ONNX opset (GroupNorm decomposes, NonMaxSuppression, Resize with align_corners)
DEFAULT_OPSET = 17
_EXTRA_HINT = 'pip install "boxmask[export]" (or pip install -e ".[export]" in a checkout)'


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported, an ONNX file that is not a boxmask export, a wrong input,
    or the optional ``export`` extra (onnx, onnxruntime) missing."""


def require_onnx(runtime_only: bool = False):
    """Import and return ``(onnx, onnxruntime)`` (``onnx`` is None with ``runtime_only``).

    Raises :class:`ExportError` naming the extra to install when one of them is missing.
    """
    try:
        import onnxruntime
        onnx = None
        if not runtime_only:
            import onnx
    except ImportError as exc:
        raise ExportError(f"ONNX export/inference needs the optional packages onnx and onnxruntime "
                          f"({exc.name} is not installed): {_EXTRA_HINT}") from exc
    return onnx, onnxruntime


def _pad_to_multiple(images: Tensor, divisor: int) -> Tensor:
    """uint8/float ``[B,3,H,W]`` → float ``[B,3,Hp,Wp]`` zero-padded bottom/right to multiples of ``divisor``
    (traced sizes: the padding follows the input size of a dynamic graph)."""
    h, w = images.shape[-2:]
    ph = (divisor - h % divisor) % divisor
    pw = (divisor - w % divisor) % divisor
    return F.pad(images.float(), (0, pw, 0, ph))


def _topk_padded(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of ``scores`` ``[B,N]`` along dim 1 for any ``N`` (also ``N < k``): values ``[B,k]``, sorted
    descending, and indices ``[B,k]`` clamped to ``N-1``; slots beyond ``N`` get the value -1."""
    pad = torch.full_like(scores[:, :1], -1.0).expand(-1, k)
    values, idx = torch.cat([scores, pad], dim=1).topk(k, dim=1)
    return values, torch.minimum(idx, torch.full_like(idx, scores.shape[1] - 1))


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` ``[B,N,D]`` gathered at ``idx`` int64 ``[B,K]`` → ``[B,K,D]``."""
    return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))


class _ClassNMS(torch.autograd.Function):
    """Greedy NMS per (image, class) keeping at most ``max_per_class`` boxes of each: ONNX ``NonMaxSuppression``
    with its batch and class axes (see :func:`class_nms_keep`)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, class_scores: Tensor, iou_threshold: float, max_per_class: int) -> Tensor:  # noqa: D102
        selected = []
        for b in range(class_scores.shape[0]):
            for c in range(class_scores.shape[1]):
                cand = torch.nonzero(class_scores[b, c] >= 0).squeeze(1)
                keep = cand[nms(boxes[b, cand], class_scores[b, c, cand], iou_threshold)][:max_per_class]
                selected.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1))
        return torch.cat(selected) if selected else boxes.new_zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, class_scores, iou_threshold: float, max_per_class: int):  # noqa: D102
        return g.op("NonMaxSuppression", boxes, class_scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([-0.5], dtype=torch.float32)), center_point_box_i=0)


def class_nms_keep(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, num_classes: int,
                   iou_threshold: float, max_per_class: int) -> Tensor:
    """Which candidates survive class-aware greedy NMS (torchvision ``nms`` semantics: suppress IoU >
    ``iou_threshold``), at most ``max_per_class`` per (image, class), the highest scores first.

    Args: boxes float ``[B,N,4]`` xyxy pixels; scores float ``[B,N]`` >= 0; labels int64 ``[B,N]`` in
    ``[0, num_classes)``; valid bool ``[B,N]`` (invalid candidates take no part).
    Returns bool ``[B,N]``. The cap makes ONNX's NMS stop after ``max_per_class`` selections: exact for a caller
    that keeps only the top ``max_per_class`` detections per image (they are among the per-class survivors).
    """
    b, n = scores.shape
    classes = torch.arange(num_classes, device=scores.device)
    member = (labels[:, None, :] == classes[None, :, None]) & valid[:, None, :]  # [B,C,N]
    class_scores = torch.where(member, scores[:, None, :], torch.full_like(member, -1.0, dtype=scores.dtype))
    sel = _ClassNMS.apply(boxes, class_scores, float(iou_threshold), int(max_per_class))
    flat = sel[:, 0] * n + sel[:, 2]
    # (x * 0, not zeros_like: onnxruntime's constant folding breaks Shape→ConstantOfShape of a static graph)
    zero = scores.reshape(-1) * 0
    return zero.scatter(0, flat, (zero + 1)[: flat.shape[0]]).reshape(b, n) > 0


class _AlignedUpsampleCrop(torch.autograd.Function):
    """``aligned_bilinear(x, factor)[..., :h, :w]`` with ``(h, w)`` the size of ``like``, optionally thresholded,
    exported as ``Resize`` ops (see :func:`aligned_upsample_crop`)."""

    @staticmethod
    def forward(ctx, x: Tensor, like: Tensor, factor: int, fixed_size: bool, threshold: float | None) -> Tensor:  # noqa: D102
        h, w = like.shape[-2:]
        up = aligned_bilinear(x, factor)[..., :h, :w]
        return up if threshold is None else (up > threshold).to(torch.uint8)

    @staticmethod
    def symbolic(g, x, like, factor: int, fixed_size: bool, threshold: float | None):  # noqa: D102
        def const(values, dtype=torch.int64):
            return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

        def resize(t, sizes=None, scale=None):
            empty = const([], torch.float32)
            args = (empty, empty, sizes) if sizes is not None else (empty, const([1, 1, scale, scale], torch.float32))
            return g.op("Resize", t, *args, mode_s="linear", coordinate_transformation_mode_s="asymmetric",
                        nearest_mode_s="floor")

        def above(t, value):
            return g.op("Cast", g.op("Greater", t, const([value], torch.float32)), to_i=2)  # uint8

        if factor == 4 and fixed_size:
            # y = x(j/4 - 1/2) = asym x2 of (asym x2 of x, shifted by one pixel): two resizes of exactly the
            # output size, no full-resolution crop (the 1-px crop of the shift only drops clamped samples)
            half = g.op("Pad", resize(x, scale=2.0), const([0, 0, 1, 1, 0, 0, -1, -1]), mode_s="edge")
            up = resize(half, scale=2.0)
            return up if threshold is None else above(up, threshold)
        # general case: y[j] = x(j/f - 1/2) clamped = asymmetric resize of x edge-padded by 1, at j + f/2
        padded = g.op("Pad", x, const([0, 0, 1, 1, 0, 0, 1, 1]), mode_s="edge")
        up = resize(padded, sizes=g.op("Mul", g.op("Shape", padded), const([1, 1, factor, factor])))
        hw = g.op("Slice", g.op("Shape", like), const([2]), const([4]))
        offset = const([factor // 2, factor // 2])
        up = g.op("Slice", up, offset, g.op("Add", hw, offset), const([2, 3]))
        return up if threshold is None else above(up, threshold)


def aligned_upsample_crop(x: Tensor, like: Tensor, factor: int, fixed_size: bool = False,
                          threshold: float | None = None) -> Tensor:
    """:func:`~boxmask.modeling.condinst.aligned_bilinear` of ``x`` float ``[N,C,h,w]`` by the integer ``factor``,
    cropped to the spatial size ``(H, W)`` of ``like`` (``H <= factor*h``, ``W <= factor*w``): float
    ``[N,C,H,W]``, or with ``threshold`` the uint8 0/1 masks ``upsampled > threshold``.

    Eager: exactly ``aligned_bilinear(x, factor)[..., :H, :W]`` (then the comparison). Exported (TorchScript
    ONNX exporter) as ``asymmetric`` linear ``Resize`` ops equal to it to float rounding (2e-7), without the
    eager chain's full-resolution pad and crops, which cost 2-3x the resize itself in onnxruntime:

    * ``fixed_size`` (a static-size graph with ``H == 4h`` and ``W == 4w``, ``factor == 4``): two x2 resizes
      and a one-pixel shift between them, nothing at full resolution but the last resize;
    * otherwise (any size, dynamic graphs): edge pad by 1, one resize, one crop.
    """
    return _AlignedUpsampleCrop.apply(x, like, int(factor), bool(fixed_size),
                                      None if threshold is None else float(threshold))


class CondInstExport(nn.Module):
    """Export wrapper of a :class:`~boxmask.modeling.condinst.CondInst` (BoxInst, CondInst, mixed, SIM).

    ``forward(images)`` takes uint8 ``[B,3,H,W]`` and returns ``(boxes, scores, labels, masks, num_dets)`` as
    documented in the module docstring, equal to :meth:`CondInst.predict` with ``orig_sizes = (H, W)`` up to
    float rounding (boxes in input pixels, masks before thresholding).

    Args:
        model: the network in eval mode (its ``cfg`` thresholds are used).
        max_dets: ``K``, detections per image in the output (>= 1, <= 5 × ``pre_nms_topk``).
        size_divisibility: padding multiple (``data.size_divisibility``, 32).
        binary_masks: output uint8 ``prob > mask_threshold`` masks instead of probabilities.
        static_size: the graph is traced for one input size only (not ``--dynamic``): allows the cheaper mask
            upsampling of :func:`aligned_upsample_crop` when the size is a multiple of the mask stride.
    Raises ValueError for an out-of-range ``max_dets``.
    """

    def __init__(self, model: CondInst, max_dets: int, size_divisibility: int = 32, binary_masks: bool = False,
                 static_size: bool = False):
        super().__init__()
        cfg = model.cfg
        if not 1 <= max_dets <= cfg.pre_nms_topk * len(model.strides):
            raise ValueError(f"max_dets must be in [1, {cfg.pre_nms_topk * len(model.strides)}], got {max_dets}")
        self.model, self.max_dets, self.divisor, self.binary = model, int(max_dets), int(size_divisibility), binary_masks
        self.static_size = static_size

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        m, cfg = self.model, self.model.cfg
        b = images.shape[0]
        h, w = images.shape[-2:]
        # the controller runs at the K kept locations only (FCOSHead.controller_at), not densely
        f = m.features(_pad_to_multiple(images, self.divisor), dense_params=False)
        cls_logits, bbox_reg, ctrness, box_feats, mask_feats, locations = (f.cls_logits, f.bbox_reg, f.ctrness,
                                                                            f.params, f.mask_feats, f.locations)
        k_pre = cfg.pre_nms_topk
        all_boxes, all_scores, all_valid, all_labels, all_locidx, all_locs, all_levels = [], [], [], [], [], [], []
        for level, (cl, rg, ct) in enumerate(zip(cls_logits, bbox_reg, ctrness)):
            c = cl.shape[1]
            cls_p = cl.float().flatten(2).transpose(1, 2).sigmoid()  # [B,L,C]
            ctr_p = ct.float().flatten(2).transpose(1, 2).sigmoid()  # [B,L,1]
            cand = (cls_p * ctr_p).flatten(1)  # [B,L*C], location-major as the eager nonzero()
            masked = torch.where(cand > cfg.score_threshold, cand, torch.full_like(cand, -1.0))
            top, idx = _topk_padded(masked, k_pre)  # above-threshold candidates first
            valid = top > cfg.score_threshold
            loc_idx, lab = idx // c, idx % c
            reg = _gather_rows(rg.float().flatten(2).transpose(1, 2), loc_idx) * m.strides[level]
            loc = locations[level][loc_idx]  # [B,k,2]
            x1 = (loc[..., 0] - reg[..., 0]).clamp(min=0).clamp(max=w)
            y1 = (loc[..., 1] - reg[..., 1]).clamp(min=0).clamp(max=h)
            x2 = (loc[..., 0] + reg[..., 2]).clamp(min=0).clamp(max=w)
            y2 = (loc[..., 1] + reg[..., 3]).clamp(min=0).clamp(max=h)
            all_boxes.append(torch.stack([x1, y1, x2, y2], dim=2))
            all_scores.append(top.clamp(min=0).sqrt())
            all_valid.append(valid & (x2 > x1) & (y2 > y1))
            all_labels.append(lab)
            all_locidx.append(loc_idx)
            all_locs.append(loc)
            all_levels.append(torch.full_like(lab, level))
        boxes, scores, valid = torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_valid, 1)
        labels, levels = torch.cat(all_labels, 1), torch.cat(all_levels, 1)
        n = boxes.shape[1]
        kept = class_nms_keep(boxes, scores, labels, valid, m.num_classes, cfg.nms_threshold, self.max_dets)
        final = torch.where(kept & valid, scores, torch.full_like(scores, -1.0))
        top, idx = final.topk(self.max_dets, dim=1)
        is_det = top >= 0
        num_dets = is_det.to(torch.int64).sum(1)
        det_boxes = _gather_rows(boxes, idx) * is_det[..., None]
        det_labels = torch.where(is_det, torch.gather(labels, 1, idx), torch.full_like(idx, -1))
        det_locs = _gather_rows(torch.cat(all_locs, 1), idx)
        det_levels = torch.gather(levels, 1, idx)
        det_params = m.head.controller_at(box_feats, det_levels, torch.gather(torch.cat(all_locidx, 1), 1, idx)).float()
        k = self.max_dets
        im_inds = torch.arange(b, device=images.device)[:, None].expand(-1, k).reshape(-1)
        logits = m.mask_head(mask_feats, det_params.reshape(b * k, -1), im_inds, det_locs.reshape(b * k, 2),
                             det_levels.reshape(-1)).float()
        # zeroing padding rows before the (linear) upsampling is exact and 16x cheaper than after it
        small = logits.sigmoid() * is_det.reshape(b * k, 1, 1, 1).to(logits.dtype)
        # [B,K,h,w] layout: onnxruntime's Resize is ~1.6x faster than on [B*K,1,h,w]
        hs, ws = small.shape[-2:]
        small = small.reshape(b, k, hs, ws)
        f = m.mask_head.out_stride
        # (sizes are Python ints here only when traced for a static graph)
        fixed = self.static_size and (int(h), int(w)) == (f * int(hs), f * int(ws))
        masks = aligned_upsample_crop(small, images, f, fixed, cfg.mask_threshold if self.binary else None)
        return det_boxes, top.clamp(min=0), det_labels, masks, num_dets


def _batched_matrix_nms_sorted(masks: Tensor, area: Tensor, labels: Tensor, scores: Tensor, active: Tensor,
                               sigma: float) -> Tensor:
    """Gaussian Matrix NMS (:func:`~boxmask.modeling.matrix_nms.matrix_nms`) of a batch whose candidates are
    already sorted by score (descending): masks float 0/1 ``[B,N,P]``, area ``[B,N]``, labels ``[B,N]``,
    scores ``[B,N]``, active bool ``[B,N]`` (inactive candidates suppress nothing). Returns the decayed
    scores ``[B,N]`` in the same order."""
    inter = torch.bmm(masks, masks.transpose(1, 2))
    iou = inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-6)
    ar = torch.arange(masks.shape[1], device=masks.device)
    above = ar[:, None] < ar[None, :]  # row i scored higher than column j
    same = (labels[:, :, None] == labels[:, None, :]) & above[None] & active[:, :, None]
    decay_iou = iou * same.to(iou.dtype)
    comp = decay_iou.max(dim=1).values[:, :, None]  # [B,N,1]: of row i
    ratio = torch.exp(-sigma * (decay_iou.square() - comp.square()))
    return scores * ratio.min(dim=1).values


class SOLOv2Export(nn.Module):
    """Export wrapper of a :class:`~boxmask.modeling.solov2.SOLOv2` (BoxLevelSet).

    ``forward(images)`` takes uint8 ``[B,3,H,W]`` and returns ``(boxes, scores, labels, masks, num_dets)`` as
    documented in the module docstring, equal to :meth:`SOLOv2.predict` with ``orig_sizes = (H, W)`` up to
    float rounding. Arguments as :class:`CondInstExport`; ``max_dets`` <= ``pre_nms_topk``.
    """

    def __init__(self, model: SOLOv2, max_dets: int, size_divisibility: int = 32, binary_masks: bool = False):
        super().__init__()
        cfg = model.cfg
        if not 1 <= max_dets <= cfg.pre_nms_topk:
            raise ValueError(f"max_dets must be in [1, {cfg.pre_nms_topk}] (model.pre_nms_topk), got {max_dets}")
        self.model, self.max_dets, self.divisor, self.binary = model, int(max_dets), int(size_divisibility), binary_masks
        self.register_buffer("level_stride", torch.cat([torch.full((s * s,), float(SOLO_HEAD_STRIDES[l]))
                                                        for l, s in enumerate(cfg.solov2.grids)]), persistent=False)
        # position prior: cell centres as fractions of the padded input and 1 / grid size, per cell (the pixel
        # sizes depend on the dynamic input size, so they are computed in the graph as SOLOv2.cell_geometry does)
        frac, inv = [], []
        for s in cfg.solov2.grids:
            idx = (torch.arange(s, dtype=torch.float32) + 0.5) / s
            fy, fx = torch.meshgrid(idx, idx, indexing="ij")
            frac.append(torch.stack([fx.flatten(), fy.flatten()], 1))
            inv.append(torch.full((s * s,), 1.0 / s))
        self.register_buffer("cell_frac", torch.cat(frac), persistent=False)
        self.register_buffer("cell_inv", torch.cat(inv), persistent=False)

    def _prior(self, weights: Tensor, cells: Tensor, mask_feats: Tensor) -> Tensor:
        """Position-prior logits float ``[B,k,h*w]`` of the selected cells (``SOLOv2._masks``): ``weights``
        ``[B,k,P]`` (the kernels' prior columns), ``cells`` int64 ``[B,k]``, ``mask_feats`` ``[B,E,h,w]``."""
        stride = float(MASK_FEAT_STRIDE)
        # pixel centres from cumulative sums: dynamic in the exported graph (no Python ints)
        ys = (torch.ones_like(mask_feats[0, 0, :, 0], dtype=torch.float32).cumsum(0) - 0.5) * stride  # [h]
        xs = (torch.ones_like(mask_feats[0, 0, 0, :], dtype=torch.float32).cumsum(0) - 0.5) * stride  # [w]
        hp, wp = ys[-1] + 0.5 * stride, xs[-1] + 0.5 * stride  # padded input size, pixels
        centres = self.cell_frac[cells] * torch.stack([wp, hp])  # [B,k,2]
        sizes = (hp + wp) * self.cell_inv[cells] / 2  # [B,k]
        return position_prior_logits(weights, centres, sizes, xs, ys)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        m, cfg = self.model, self.model.cfg
        b = images.shape[0]
        h, w = images.shape[-2:]
        f = m.features(_pad_to_multiple(images, self.divisor))
        cates, kernels, mask_feats = f.cates, f.kernels, f.mask_feats
        hp, wp = mask_feats.shape[-2] * m.mask_out_stride, mask_feats.shape[-1] * m.mask_out_stride
        probs = torch.cat([point_nms(c.float().sigmoid()).flatten(2).transpose(1, 2) for c in cates], 1)  # [B,N,C]
        kern = torch.cat([k.flatten(2).transpose(1, 2) for k in kernels], 1)  # [B,N,E]
        c = probs.shape[2]
        flat = probs.flatten(1)
        masked = torch.where(flat > cfg.score_threshold, flat, torch.full_like(flat, -1.0))
        k_pre = cfg.pre_nms_topk
        top, idx = _topk_padded(masked, k_pre)
        cells, labels = idx // c, idx % c
        feats = mask_feats.float().flatten(2)  # [B,E,P]
        sel_kern = _gather_rows(kern, cells).to(feats.dtype)
        e = feats.shape[1]
        mask_logits = torch.bmm(sel_kern[..., :e], feats)  # [B,k,P]
        if m.prior_channels:
            mask_logits = mask_logits + self._prior(sel_kern[..., e:], cells, mask_feats)
        mask_probs = mask_logits.sigmoid()
        bin_masks = (mask_probs > cfg.mask_threshold).to(mask_probs.dtype)
        area = bin_masks.sum(2)
        active = (top > cfg.score_threshold) & (area > self.level_stride[cells])
        maskness = (mask_probs * bin_masks).sum(2) / area.clamp(min=1)
        scores = torch.where(active, top * maskness, torch.full_like(top, -1.0))
        # sort by score for Matrix NMS (inactive last)
        scores, order = scores.topk(k_pre, dim=1)
        active = torch.gather(active, 1, order)
        labels, area, cells = torch.gather(labels, 1, order), torch.gather(area, 1, order), torch.gather(cells, 1, order)
        mask_probs, bin_masks = _gather_rows(mask_probs, order), _gather_rows(bin_masks, order)
        decayed = _batched_matrix_nms_sorted(bin_masks, area, labels, scores, active, cfg.solov2.matrix_nms_sigma)
        keep = active & (decayed >= cfg.solov2.matrix_nms_filter)
        final = torch.where(keep, decayed, torch.full_like(decayed, -1.0))
        top, sel = final.topk(self.max_dets, dim=1)
        is_det = torch.gather(keep, 1, sel)
        num_dets = is_det.to(torch.int64).sum(1)
        k = self.max_dets
        det_probs = _gather_rows(mask_probs, sel).reshape(b * k, 1, mask_feats.shape[-2], mask_feats.shape[-1])
        up = F.interpolate(det_probs, size=(hp, wp), mode="bilinear", align_corners=False)[:, 0, :h, :w]
        up = up.reshape(b, k, up.shape[-2], up.shape[-1]) * is_det[..., None, None]
        binary = up > cfg.mask_threshold
        cols = binary.any(2)  # [B,K,W]
        rows = binary.any(3)  # [B,K,H]
        xs = torch.arange(cols.shape[-1], device=images.device, dtype=torch.float32)
        ys = torch.arange(rows.shape[-1], device=images.device, dtype=torch.float32)
        big = torch.full_like(cols, 1, dtype=torch.float32) * 1e9
        x1 = torch.where(cols, xs + 0 * big, big).min(2).values
        y1 = torch.where(rows, ys + 0 * big[..., :1], big[..., :1].expand_as(rows)).min(2).values
        x2 = (cols.to(torch.float32) * (xs + 1)).max(2).values
        y2 = (rows.to(torch.float32) * (ys + 1)).max(2).values
        nonempty = cols.any(2)
        boxes = torch.stack([x1, y1, x2, y2], dim=2) * nonempty[..., None].to(torch.float32)
        det_labels = torch.where(is_det, torch.gather(labels, 1, sel), torch.full_like(sel, -1))
        masks = binary.to(torch.uint8) if self.binary else up
        return boxes, torch.where(is_det, top, torch.zeros_like(top)), det_labels, masks, num_dets


def export_wrapper(model: nn.Module, max_dets: int, size_divisibility: int = 32, binary_masks: bool = False,
                   static_size: bool = False) -> nn.Module:
    """The export wrapper of a network: :class:`CondInstExport` (``static_size`` as there) or :class:`SOLOv2Export`.

    Raises :class:`ExportError` for a network of another family."""
    if isinstance(model, SOLOv2):
        return SOLOv2Export(model, max_dets, size_divisibility, binary_masks).eval()
    if isinstance(model, CondInst):
        return CondInstExport(model, max_dets, size_divisibility, binary_masks, static_size).eval()
    raise ExportError(f"no ONNX export for a {type(model).__name__} network; supported: {', '.join(FAMILIES.values())}")


def checkpoint_family(path: str | Path) -> str:
    """``model.arch`` of a boxmask checkpoint if it can be exported (a key of :data:`FAMILIES`).

    Raises :class:`~boxmask.engine.inference.CheckpointError` for an unreadable or non-boxmask file and
    :class:`ExportError` for an architecture without an export (e.g. a future ``mask2former``)."""
    from .inference import read_checkpoint

    ckpt = read_checkpoint(path)
    cfg = ckpt["hyper_parameters"]["config"]
    arch = (cfg.get("model") or {}).get("arch", "condinst") if isinstance(cfg, dict) else "condinst"
    if arch not in FAMILIES:
        raise ExportError(f"{path}: model.arch {arch!r} is a family boxmask cannot export to ONNX; "
                          f"supported: " + "; ".join(f"{k}: {v}" for k, v in FAMILIES.items()))
    return arch


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("boxmask")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_onnx(checkpoint: str | Path, output: str | Path, image_size: tuple[int, int] | None = None,
                dynamic: bool = False, max_dets: int | None = None, binary_masks: bool = False,
                opset: int = DEFAULT_OPSET, batch_size: int = 1, overrides: list[str] | None = None) -> dict:
    """Export a checkpoint to an ONNX file with post-processing and metadata (module docstring).

    Args:
        checkpoint: a boxmask checkpoint of the CondInst or SOLOv2 family.
        output: the ``.onnx`` path (folders created).
        image_size: ``(H, W)`` of the input; default the test size of the recipe for a square image
            (``test_min_size`` × ``test_min_size``). With ``dynamic`` only the size traced for the export.
        dynamic: batch, height and width are dynamic axes (any size; the graph pads to the divisor).
        max_dets: ``K`` (default the recipe's ``model.max_detections``).
        binary_masks: output uint8 masks instead of probabilities.
        opset: ONNX opset (>= 11).
        batch_size: batch of the traced input (the fixed batch of a non-dynamic export).
        overrides: ``section.key=value`` overrides of the checkpoint's recipe (e.g. ``model.score_threshold``).
    Returns the metadata written (dict of JSON-decoded values) plus ``path``.
    Raises :class:`ExportError` (missing extra, unknown family, bad sizes), ``CheckpointError``.
    """
    require_onnx()
    checkpoint_family(checkpoint)
    from ..config import load_config
    from .inference import load_checkpoint

    model, cfg, meta = load_checkpoint(checkpoint, "cpu")
    if overrides:
        cfg = load_config(cfg.to_dict(), overrides)
        model.cfg = cfg.model
    return export_model(model, cfg, meta, output, image_size=image_size, dynamic=dynamic, max_dets=max_dets,
                        binary_masks=binary_masks, opset=opset, batch_size=batch_size)


def export_model(model: nn.Module, cfg, meta: dict, output: str | Path, image_size: tuple[int, int] | None = None,
                 dynamic: bool = False, max_dets: int | None = None, binary_masks: bool = False,
                 opset: int = DEFAULT_OPSET, batch_size: int = 1) -> dict:
    """Export an in-memory network (``model.cfg`` thresholds) to ONNX: :func:`export_onnx` without the file.

    ``cfg`` is its :class:`~boxmask.config.Config` (stored as the ``config`` metadata), ``meta`` has
    ``class_names``, ``cat_ids`` (and optionally ``global_step``). Other
    arguments, return value and errors as :func:`export_onnx`.
    """
    onnx, _ = require_onnx()
    model = model.cpu().eval()
    if image_size is None:
        image_size = (cfg.data.test_min_size, cfg.data.test_min_size)
    h, w = (int(v) for v in image_size)
    if h < 1 or w < 1 or batch_size < 1:
        raise ExportError(f"image size and batch must be positive, got {h}x{w}, batch {batch_size}")
    k = int(max_dets or cfg.model.max_detections)
    try:
        wrapper = export_wrapper(model, k, cfg.data.size_divisibility, binary_masks, static_size=not dynamic)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    example = torch.randint(0, 256, (batch_size, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    dyn = None
    if dynamic:
        dyn = {"images": {0: "batch", 2: "height", 3: "width"}, "boxes": {0: "batch"}, "scores": {0: "batch"},
               "labels": {0: "batch"}, "masks": {0: "batch", 2: "height", 3: "width"}, "num_dets": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the TorchScript exporter
        kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
        torch.onnx.export(wrapper, (example,), str(out), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dyn, opset_version=opset, do_constant_folding=True, **kwargs)
    metadata = {
        "boxmask_version": _version(), "family": cfg.model.arch, "method": cfg.supervision.type,
        "class_names": list(meta["class_names"]), "cat_ids": list(meta["cat_ids"]),
        "pixel_mean": [float(v) for v in model.pixel_mean.flatten()], "pixel_std": [float(v) for v in model.pixel_std.flatten()],
        "mask_threshold": float(model.cfg.mask_threshold), "score_threshold": float(model.cfg.score_threshold),
        "max_dets": k, "masks": "binary" if binary_masks else "probabilities",
        "size_divisibility": int(cfg.data.size_divisibility), "test_min_size": int(cfg.data.test_min_size),
        "test_max_size": int(cfg.data.test_max_size), "input_size": "dynamic" if dynamic else [h, w],
        "input": "images uint8 [B,3,H,W] RGB 0..255",
        "outputs": "boxes f32 [B,K,4] xyxy input px; scores f32 [B,K]; labels i64 [B,K] (-1 = padding); "
                   "masks [B,K,H,W] f32 probabilities or u8 0/1; num_dets i64 [B]",
        "checkpoint_step": int(meta.get("global_step", 0)),
    }
    # the recipe as exported (overrides applied: --onnx eval/predict read the graph's thresholds from it)
    metadata["config"] = cfg.to_dict()
    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "boxmask"
    proto.producer_version = metadata["boxmask_version"]
    onnx.save(proto, str(out))
    return {**metadata, "path": str(out)}


def read_hyper_parameters(checkpoint: str | Path) -> dict:
    """The ``hyper_parameters`` dict of a checkpoint (config as a plain dict)."""
    from .inference import read_checkpoint

    hp = dict(read_checkpoint(checkpoint)["hyper_parameters"])
    cfg = hp.get("config")
    if not isinstance(cfg, dict) and hasattr(cfg, "to_dict"):
        hp["config"] = cfg.to_dict()
    return hp


def read_metadata(path: str | Path) -> dict:
    """The boxmask metadata of an exported model, JSON values decoded (strings kept as they are).

    Raises :class:`ExportError` when the file is missing, unreadable, or not a boxmask export."""
    _, ort = require_onnx(runtime_only=True)
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX model not found")
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure means a bad file
        raise ExportError(f"{path}: cannot load the ONNX model ({exc})") from exc
    return _decode_metadata(path, sess.get_modelmeta().custom_metadata_map)


def _decode_metadata(path, raw: dict) -> dict:
    if "boxmask_version" not in raw or "family" not in raw:
        raise ExportError(f"{path}: not a boxmask ONNX export (no boxmask metadata)")
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


class OnnxModel:
    """An exported boxmask model run by onnxruntime, with the interface the inference engine uses.

    :meth:`predict` has the signature and results of ``CondInst.predict`` / ``SOLOv2.predict``, so
    :func:`~boxmask.engine.inference.predict_dataset`, :func:`~boxmask.engine.inference.predict_images` and
    :func:`~boxmask.engine.inference.evaluate_model` run it unchanged.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx`.
        providers: onnxruntime execution providers (default CPU).
        threads: intra-op threads of onnxruntime (0 = its default: the physical cores).
    Attributes: ``metadata`` (dict), ``cfg`` (the :class:`~boxmask.config.Config` of the checkpoint, with the
    export's thresholds), ``meta`` (``class_names``, ``cat_ids``, ``global_step`` as ``load_checkpoint``).
    Raises :class:`ExportError` (missing extra, not a boxmask export).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
        _, ort = require_onnx(runtime_only=True)
        from ..config import load_config, translate_legacy_config

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: ONNX model not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{self.path}: cannot load the ONNX model ({exc})") from exc
        self.metadata = _decode_metadata(self.path, self.session.get_modelmeta().custom_metadata_map)
        self.cfg = load_config(translate_legacy_config(self.metadata["config"]))
        self.cfg.model.backbone_weights = "none"
        self.meta = {"class_names": list(self.metadata["class_names"]), "cat_ids": list(self.metadata["cat_ids"]),
                     "global_step": int(self.metadata.get("checkpoint_step", 0))}
        self.input_size = self.metadata["input_size"]
        self.max_dets = int(self.metadata["max_dets"])
        #: optional cap (<= max_dets) on the detections :meth:`predict` returns per image (``predict --max-dets``)
        self.max_detections: int | None = None

    def eval(self) -> "OnnxModel":
        """No-op (the engine calls ``model.eval()``); returns self."""
        return self

    def run(self, images: Tensor) -> dict[str, Tensor]:
        """Run the graph on uint8 ``[B,3,H,W]`` (numpy or torch); returns the named outputs as CPU tensors.

        Raises :class:`ExportError` for a wrong dtype/shape, or a size other than a static export's."""
        x = images.cpu().numpy() if isinstance(images, Tensor) else images
        if x.dtype.name != "uint8" or x.ndim != 4 or x.shape[1] != 3:
            raise ExportError(f"images must be uint8 [B,3,H,W], got {x.dtype} {list(x.shape)}")
        if self.input_size != "dynamic" and list(x.shape[2:]) != list(self.input_size):
            raise ExportError(f"{self.path.name} was exported for {self.input_size[0]}x{self.input_size[1]} inputs, "
                              f"got {x.shape[2]}x{x.shape[3]} (export with --dynamic for any size)")
        outs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: x})
        return {name: torch.from_numpy(o) for name, o in zip(OUTPUT_NAMES, outs)}

    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]]) -> list[InstancePredictions]:
        """Detections with binary masks in original-image pixels, as the PyTorch models' ``predict``.

        Args:
            images: uint8 ``[B,3,Hp,Wp]`` (a padded batch); image ``b`` is cropped to ``image_sizes[b]`` and run
                alone (the graph pads it again, with the same zeros).
            image_sizes / orig_sizes: per image ``(h, w)`` resized / original.
        Masks: the graph's probabilities bilinearly resized to ``orig_sizes`` (as the PyTorch path) and
        thresholded at the export's ``mask_threshold``; boxes scaled by ``orig/resized`` (CondInst) or the tight
        boxes of the final masks (SOLOv2).
        """
        thr = float(self.metadata["mask_threshold"])
        out = []
        for b, ((h, w), (oh, ow)) in enumerate(zip(image_sizes, orig_sizes)):
            r = self.run(images[b:b + 1, :, :h, :w].contiguous())
            n = int(r["num_dets"][0])
            if self.max_detections is not None:
                n = min(n, int(self.max_detections))
            boxes, scores, labels = r["boxes"][0, :n].float(), r["scores"][0, :n].float(), r["labels"][0, :n]
            raw = r["masks"][0, :n]
            binary = self.metadata.get("masks") == "binary"
            if n == 0:
                masks = torch.zeros(0, oh, ow, dtype=torch.bool)
            elif binary and (oh, ow) == (h, w):
                masks = raw.bool()
            else:
                probs = raw.float()
                if binary:
                    probs = probs * (thr + 1.0) / 2.0 + 0.0  # 1 → above, 0 → below the threshold after resizing
                if (oh, ow) != (h, w):  # (a same-size bilinear resize is the identity)
                    probs = F.interpolate(probs[:, None], size=(oh, ow), mode="bilinear", align_corners=False)[:, 0]
                masks = torch.from_numpy(probs.contiguous().numpy() > thr)  # numpy's compare: ~3x torch's here
            if self.metadata["family"] == "solov2":
                boxes = tight_boxes(masks)
            else:
                boxes = boxes.clone()
                boxes[:, 0::2] *= ow / w
                boxes[:, 1::2] *= oh / h
            out.append(InstancePredictions(boxes, scores, labels.to(torch.int64), masks))
        return out


def load_onnx(path: str | Path, threads: int = 0, providers: list[str] | None = None) -> tuple[OnnxModel, object, dict]:
    """``(OnnxModel, config, meta)`` of an exported model: the ONNX counterpart of
    :func:`~boxmask.engine.inference.load_checkpoint` (arguments as :class:`OnnxModel`). Raises :class:`ExportError`."""
    model = OnnxModel(path, providers=providers, threads=threads)
    return model, model.cfg, model.meta
