"""Mask2Former, the network of Box2Mask-T (methods.md §4.1, §4.4).

Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022 (Sec. 3.2:
masked attention; Sec. 3.3: multi-scale high-resolution features, round-robin levels, order of the
decoder sub-layers; Sec. 4.1: MSDeformAttn pixel decoder with 6 layers, 9 decoder layers, 100 queries),
with the box-supervised training of Li et al., "Box2Mask: Box-supervised Instance Segmentation via Level-set
Evolution", arXiv 2212.01579 (Sec. 3.4 Box2Mask-T: the same network plus a level-set feature head).

Layout (strides in pixels of the padded input):

* backbone C2-C5 (strides 4, 8, 16, 32);
* :class:`MSDeformPixelDecoder`: the ``n_levels`` coarsest of C3-C5 are projected to ``hidden_dim`` and
  refined together by ``encoder_layers`` deformable-attention layers (:class:`DeformableEncoderLayer`);
  the finer backbone maps are fused top-down FPN-style into the mask features ``F_mask``
  ``[B, mask_dim, Hp/4, Wp/4]``;
* :class:`MaskedAttentionDecoder`: ``num_queries`` learned queries, ``decoder_layers`` layers of masked
  cross-attention (to the encoder levels round-robin, coarsest first) → self-attention → FFN; a shared
  prediction head after the query initialisation and after every layer gives ``1 + decoder_layers`` sets of
  class logits ``[B, Q, C+1]`` and mask logits ``[B, Q, Hp/4, Wp/4]``;
* level-set head (Box2Mask-T): conv3x3 ``mask_dim → level_set_channels`` on ``F_mask``.

The network never matches queries to ground truth and never computes a loss: matching (methods.md §4.2)
and losses (§4.3) belong to the supervision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..config import Mask2FormerConfig, ModelConfig
from ..ops import largest_component, tight_boxes
from ..structures import BoxConditionedMasks, InstancePredictions, QueryOutputs
from .backbones import build_backbone
from .box_conditioned import best_fitting_candidates, check_box_conditioned_args
from .ms_deform_attn import MSDeformAttn

__all__ = ["DeformableEncoderLayer", "Mask2Former", "Mask2FormerConfig", "Mask2FormerFeatures",
           "MaskedAttentionDecoder", "MaskedDecoderLayer", "MSDeformPixelDecoder", "attention_mask_from_logits",
           "sine_position_encoding"]

#: output stride of the mask features and of the training mask logits, pixels
MASK_STRIDE = 4
# queries per upsampling step in predict: bounds the [n, H, W] float maps at the original size
_PREDICT_CHUNK = 32


def sine_position_encoding(height: int, width: int, channels: int, device: torch.device | None = None,
                           dtype: torch.dtype = torch.float32, temperature: float = 10000.0) -> Tensor:
    """2-D sine positional encoding of a ``height x width`` map (DETR, Carion et al. ECCV 2020 Sec. A.4, as
    used by Mask2Former's pixel decoder and transformer decoder with ``normalize=True``).

    Pixel centres are normalised to ``(i + 0.5) / height * 2 pi`` (rows) and likewise for columns, so a
    map's encoding spans the same range whatever its size; the first ``channels / 2`` channels encode the
    row, the rest the column, each alternating ``sin``/``cos`` at frequencies ``temperature^(-2k / (C/2))``.

    Args:
        height, width: map size (>= 1). channels: ``C``, a multiple of 4.
    Returns float ``[C, height, width]`` in ``dtype`` on ``device``.
    Raises ValueError when ``channels`` is not a positive multiple of 4.
    """
    if channels <= 0 or channels % 4:
        raise ValueError(f"sine_position_encoding needs channels a positive multiple of 4, got {channels}")
    half = channels // 2
    k = torch.arange(half, device=device, dtype=torch.float32)
    freqs = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / half)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    even = (torch.arange(half, device=device) % 2 == 0)[:, None]

    def encode(v: Tensor) -> Tensor:  # [n] -> [half, n]
        a = v[None] / freqs[:, None]
        return torch.where(even, a.sin(), a.cos())

    pos_y = encode(ys)[:, :, None].expand(half, height, width)
    pos_x = encode(xs)[:, None, :].expand(half, height, width)
    return torch.cat([pos_y, pos_x], 0).to(dtype)


def attention_mask_from_logits(mask_logits: Tensor, size: tuple[int, int], heads: int) -> Tensor:
    """Mask2Former's masked-attention mask (Cheng et al. CVPR 2022 Sec. 3.2.1, Eq. 2): the previous mask
    logits are resized (bilinear, ``align_corners=False``) to the key level's ``size`` and every position
    with ``sigmoid(logit) < 0.5`` (``logit < 0``) is masked out; a query whose mask would mask every position
    attends everywhere instead (no all ``-inf`` softmax row, so no NaN).

    Args:
        mask_logits: float ``[B, Q, h, w]`` mask logits (any stride); treated as constants (detached).
        size: ``(H_l, W_l)`` of the key level, pixels of that level.
        heads: attention heads ``M`` of the cross-attention.
    Returns bool ``[B*M, Q, H_l*W_l]`` (row ``b*M + m``, the layout of ``nn.MultiheadAttention``'s 3-D
    ``attn_mask``), True = not allowed to attend.
    """
    b, q = mask_logits.shape[:2]
    logits = F.interpolate(mask_logits.detach().float(), size=size, mode="bilinear", align_corners=False)
    masked = (logits < 0).flatten(2)  # [B, Q, S]
    masked = masked & ~masked.all(-1, keepdim=True)
    return masked[:, None].expand(b, heads, q, masked.shape[-1]).reshape(b * heads, q, masked.shape[-1])


def _xavier_linear(cin: int, cout: int) -> nn.Linear:
    lin = nn.Linear(cin, cout)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class DeformableEncoderLayer(nn.Module):
    """One pixel-decoder encoder layer (Mask2Former Sec. 4.1 / Deformable DETR, Zhu et al. ICLR 2021 Sec. 4.1):
    multi-scale deformable self-attention (query = feature + position, sampled from the features), then a
    ReLU FFN, each with a residual and a post-norm LayerNorm.

    Args: ``dim`` channels C, ``ffn`` FFN hidden width, ``heads``, ``n_levels``, ``n_points``, ``dropout``.
    """

    def __init__(self, dim: int, ffn: int, heads: int, n_levels: int, n_points: int, dropout: float = 0.0):
        super().__init__()
        self.attn = MSDeformAttn(dim, n_levels, heads, n_points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(_xavier_linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 _xavier_linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        """``src``/``pos`` float ``[B, S, C]`` (all levels flattened row-major, concatenated), reference points
        float ``[B, S, L, 2]`` normalised ``(x, y)``, ``spatial_shapes`` int64 ``[L, 2]`` → float ``[B, S, C]``."""
        src = self.norm1(src + self.drop1(self.attn(src + pos, reference_points, src, spatial_shapes)))
        return self.norm2(src + self.drop2(self.ffn(src)))


def _conv_gn(cin: int, cout: int, kernel: int, relu: bool) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    layers: list[nn.Module] = [conv, nn.GroupNorm(32, cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MSDeformPixelDecoder(nn.Module):
    """Mask2Former's multi-scale deformable-attention pixel decoder (Cheng et al. CVPR 2022 Sec. 4.1;
    methods.md §4.1).

    * the ``n_levels`` coarsest backbone maps (of C3-C5) → 1x1 conv + GroupNorm(32) to ``hidden_dim``;
    * plus sine positional encoding and a learned per-level embedding (position input only),
      ``encoder_layers`` × :class:`DeformableEncoderLayer` over all levels at once, each position's reference
      point its own pixel centre on every level (images are zero padded; no padding mask);
    * the finer backbone maps (C2 for ``n_levels = 3``), top-down: lateral 1x1 conv + GN, plus the coarser
      output upsampled (bilinear), then 3x3 conv + GN + ReLU; a final 1x1 conv gives the mask features.

    Args:
        in_channels: backbone channels of C2-C5 (strides 4, 8, 16, 32).
        cfg: :class:`Mask2FormerConfig` (validated by the caller).

    Shapes: input ``[C2, C3, C4, C5]`` float ``[B, in_channels[i], Hp/s, Wp/s]``; output
    ``(mask_features [B, mask_dim, Hp/4, Wp/4], multi_scale [B, hidden_dim, H_l, W_l] × n_levels)``, the
    encoder outputs coarsest first.
    """

    def __init__(self, in_channels: list[int], cfg: Mask2FormerConfig):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"MSDeformPixelDecoder needs the channels of C2-C5, got {in_channels}")
        d, n_lvl = cfg.hidden_dim, cfg.n_levels
        self.hidden_dim, self.n_levels = d, n_lvl
        self.num_fine = 4 - n_lvl  # backbone levels fused FPN-style, finest first
        enc_channels = list(in_channels[self.num_fine:])[::-1]  # coarsest first
        self.input_proj = nn.ModuleList()
        for c in enc_channels:
            conv = nn.Conv2d(c, d, 1)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(32, d)))
        self.level_embed = nn.Parameter(torch.empty(n_lvl, d))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList([DeformableEncoderLayer(d, cfg.encoder_ffn, cfg.heads, n_lvl, cfg.n_points,
                                                            cfg.dropout) for _ in range(cfg.encoder_layers)])
        self.lateral = nn.ModuleList([_conv_gn(c, d, 1, relu=False) for c in in_channels[:self.num_fine]])
        self.output = nn.ModuleList([_conv_gn(d, d, 3, relu=True) for _ in range(self.num_fine)])
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    @staticmethod
    def reference_points(sizes: list[tuple[int, int]], n_levels: int, device: torch.device,
                         dtype: torch.dtype) -> Tensor:
        """Normalised pixel centres ``((j + 0.5) / W_l, (i + 0.5) / H_l)`` of every position of every level
        (row-major, levels concatenated), the same point repeated for each of ``n_levels`` levels: float
        ``[1, S, n_levels, 2]``."""
        pts = []
        for h, w in sizes:
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            pts.append(torch.stack([gx.flatten(), gy.flatten()], -1))
        return torch.cat(pts)[None, :, None, :].expand(1, -1, n_levels, 2)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if len(feats) != 4:
            raise ValueError(f"MSDeformPixelDecoder expects [C2, C3, C4, C5], got {len(feats)} maps")
        enc_in = feats[self.num_fine:][::-1]
        srcs, poss, sizes = [], [], []
        for lvl, (x, proj) in enumerate(zip(enc_in, self.input_proj)):
            y = proj(x)
            b, c, h, w = y.shape
            sizes.append((h, w))
            srcs.append(y.flatten(2).transpose(1, 2))
            pos = sine_position_encoding(h, w, c, y.device, y.dtype).flatten(1).t()
            poss.append((pos + self.level_embed[lvl].to(y.dtype))[None].expand(b, -1, -1))
        src, pos = torch.cat(srcs, 1), torch.cat(poss, 1)
        shapes = torch.tensor(sizes, dtype=torch.int64, device=src.device)
        ref = self.reference_points(sizes, self.n_levels, src.device, src.dtype).expand(src.shape[0], -1, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes)
        outs = [t.transpose(1, 2).reshape(t.shape[0], self.hidden_dim, h, w)
                for t, (h, w) in zip(src.split([h * w for h, w in sizes], 1), sizes)]
        y = outs[-1]
        for i in range(self.num_fine - 1, -1, -1):  # top-down over the finer backbone maps
            lat = self.lateral[i](feats[i])
            y = self.output[i](lat + F.interpolate(y, size=lat.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_features(y), outs


class MaskedDecoderLayer(nn.Module):
    """One Mask2Former transformer-decoder layer (Cheng et al. CVPR 2022 Sec. 3.2.1 and 3.3, "optimization
    improvements": cross-attention before self-attention, no dropout, post-norm).

    masked cross-attention (``nn.MultiheadAttention``, query = target + query position, key = memory +
    position, value = memory) → residual + LayerNorm → self-attention (query = key = target + query position,
    value = target) → residual + LayerNorm → ReLU FFN → residual + LayerNorm.

    Args: ``dim`` channels C, ``ffn`` FFN hidden width, ``heads``, ``dropout``.
    """

    def __init__(self, dim: int, ffn: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(_xavier_linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 _xavier_linear(ffn, dim))
        self.norm_cross, self.norm_self, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def cross(self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        """The masked cross-attention sub-layer with its residual and norm: ``tgt`` float ``[B, Q, C]``,
        ``memory``/``pos`` ``[B, S, C]``, ``query_pos`` ``[B, Q, C]``, ``attn_mask`` bool ``[B*heads, Q, S]``
        (True = masked; no row may be all True, see :func:`attention_mask_from_logits`) or None →
        ``[B, Q, C]``."""
        out = self.cross_attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm_cross(tgt + self.drop(out))

    def forward(self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor,
                query_pos: Tensor) -> Tensor:
        """Shapes as :meth:`cross`; returns float ``[B, Q, C]``."""
        tgt = self.cross(tgt, memory, attn_mask, pos, query_pos)
        q = tgt + query_pos
        tgt = self.norm_self(tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        return self.norm_ffn(tgt + self.drop(self.ffn(tgt)))


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder with its prediction head (Cheng et al. CVPR 2022 Sec. 3.2-3.3;
    methods.md §4.1).

    Learned query features and query positional embeddings (``num_queries``); memory level ``l`` = encoder
    output + sine position (key only) + learned level embedding; layer ``i`` attends to level
    ``i mod n_levels`` (coarsest first) under the mask of the previous prediction set
    (:func:`attention_mask_from_logits`). The shared head (LayerNorm → class ``Linear(C, num_classes + 1)``;
    mask-embedding MLP of 3 layers → ``mask_dim``; mask logits ``einsum(embedding, F_mask)``) runs after the
    query initialisation and after every layer.

    Args: ``cfg`` :class:`Mask2FormerConfig`, ``num_classes`` C (the last logit column is no-object).
    """

    def __init__(self, cfg: Mask2FormerConfig, num_classes: int):
        super().__init__()
        d = cfg.hidden_dim
        self.heads, self.n_levels = cfg.heads, cfg.n_levels
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(cfg.n_levels, d)
        self.layers = nn.ModuleList([MaskedDecoderLayer(d, cfg.decoder_ffn, cfg.heads, cfg.dropout)
                                     for _ in range(cfg.decoder_layers)])
        self.norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d),
                                        nn.ReLU(inplace=True), nn.Linear(d, cfg.mask_dim))

    def predict_heads(self, tgt: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """The shared head: ``tgt`` float ``[B, Q, C]``, ``mask_features`` ``[B, E, h, w]`` → (class logits
        ``[B, Q, num_classes + 1]``, mask logits ``[B, Q, h, w]``)."""
        out = self.norm(tgt)
        masks = torch.einsum("bqe,behw->bqhw", self.mask_embed(out), mask_features)
        return self.class_embed(out), masks

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``multi_scale``: ``n_levels`` float ``[B, C, H_l, W_l]`` coarsest first; ``mask_features``
        ``[B, E, Hp/4, Wp/4]`` → (class logits, mask logits), one each per prediction set
        (``1 + decoder_layers``)."""
        if len(multi_scale) != self.n_levels:
            raise ValueError(f"MaskedAttentionDecoder expects {self.n_levels} levels, got {len(multi_scale)}")
        b = mask_features.shape[0]
        memory, pos, sizes = [], [], []
        for lvl, x in enumerate(multi_scale):
            _, c, h, w = x.shape
            sizes.append((h, w))
            memory.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl].to(x.dtype))
            pos.append(sine_position_encoding(h, w, c, x.device, x.dtype).flatten(1).t()[None].expand(b, -1, -1))
        tgt = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        cls, masks = self.predict_heads(tgt, mask_features)
        class_logits, mask_logits = [cls], [masks]
        for i, layer in enumerate(self.layers):
            lvl = i % self.n_levels
            attn_mask = attention_mask_from_logits(masks, sizes[lvl], self.heads)
            tgt = layer(tgt, memory[lvl], attn_mask, pos[lvl], query_pos)
            cls, masks = self.predict_heads(tgt, mask_features)
            class_logits.append(cls)
            mask_logits.append(masks)
        return class_logits, mask_logits


@dataclass
class Mask2FormerFeatures:
    """Outputs of one Mask2Former forward pass (:meth:`Mask2Former.features`).

    class_logits: ``1 + decoder_layers`` float ``[B, Q, C+1]``; mask_logits: as many float
    ``[B, Q, Hp/4, Wp/4]``; mask_features: ``F_mask`` float ``[B, mask_dim, Hp/4, Wp/4]``.
    """

    class_logits: list[Tensor]
    mask_logits: list[Tensor]
    mask_features: Tensor


class Mask2Former(nn.Module):
    """Box2Mask-T's Mask2Former network (module docstring; methods.md §4.1, §4.4; Cheng et al. CVPR 2022;
    Box2Mask arXiv 2212.01579 Sec. 3.4).

    Input images are uint8 RGB ``[B,3,Hp,Wp]`` zero padded to a multiple of 32, normalised with the
    backbone's ``pixel_mean``/``pixel_std``. Interface as the other networks: :meth:`forward_train`,
    :meth:`predict` and ``mask_out_stride``.

    Args:
        cfg: the model recipe: ``backbone``, ``backbone_weights``, ``freeze_at`` build the backbone (with C2),
            ``max_detections`` and ``score_threshold`` are used by :meth:`predict`.
        num_classes: ``C`` >= 1.
        m2f: the network sizes; default ``cfg.mask2former`` when ModelConfig has that section, else
            :class:`Mask2FormerConfig` ``()``.

    Raises:
        ValueError: ``num_classes < 1`` or an invalid ``m2f`` (:meth:`Mask2FormerConfig.validate`).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, m2f: Mask2FormerConfig | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        m2f = m2f if m2f is not None else getattr(cfg, "mask2former", None) or Mask2FormerConfig()
        m2f.validate()
        self.cfg, self.m2f, self.num_classes = cfg, m2f, num_classes
        self.backbone = build_backbone(cfg.backbone, weights=cfg.backbone_weights, freeze_at=cfg.freeze_at,
                                       with_c2=True)
        self.pixel_decoder = MSDeformPixelDecoder(list(self.backbone.out_channels), m2f)
        self.decoder = MaskedAttentionDecoder(m2f, num_classes)
        self.level_set_head = (nn.Conv2d(m2f.mask_dim, m2f.level_set_channels, 3, padding=1)
                               if m2f.level_set_channels > 0 else None)
        self.register_buffer("pixel_mean", torch.tensor(self.backbone.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.backbone.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def mask_out_stride(self) -> int:
        """Stride of the mask logits in pixels of the padded input (4)."""
        return MASK_STRIDE

    def features(self, images: Tensor) -> Mask2FormerFeatures:
        """One forward pass on uint8 ``[B,3,Hp,Wp]`` images (``Hp``, ``Wp`` multiples of 32):
        :class:`Mask2FormerFeatures`."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        mask_features, multi_scale = self.pixel_decoder(self.backbone(x))
        class_logits, mask_logits = self.decoder(multi_scale, mask_features)
        return Mask2FormerFeatures(class_logits, mask_logits, mask_features)

    def forward_train(self, images: Tensor, boxes: list[Tensor], labels: list[Tensor]) -> QueryOutputs:
        """Training forward pass (methods.md §4.1): every prediction set, unmatched.

        Args:
            images: uint8 ``[B,3,Hp,Wp]``.
            boxes, labels: per image float ``[N_i,4]`` / int64 ``[N_i]``; unused (matching queries to them is
                the supervision's job, methods.md §4.2), kept for the interface of the other networks.
        Returns :class:`~boxmask.structures.QueryOutputs`: ``1 + decoder_layers`` sets of class logits
        ``[B,Q,C+1]`` and mask logits ``[B,Q,Hp/4,Wp/4]``, ``level_set_feats`` ``[B,level_set_channels,Hp/4,Wp/4]``
        (None without the head), ``anchor`` an fp32 zero tied to every output.
        """
        f = self.features(images)
        level_set = self.level_set_head(f.mask_features) if self.level_set_head is not None else None
        outputs = f.class_logits + f.mask_logits + ([level_set] if level_set is not None else [])
        anchor = sum(t.float().sum() for t in outputs) * 0.0
        return QueryOutputs(class_logits=f.class_logits, mask_logits=f.mask_logits, anchor=anchor,
                            stride=MASK_STRIDE, level_set_feats=level_set)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]]) -> list[InstancePredictions]:
        """Mask2Former instance inference on the final prediction set (methods.md §4.4; Cheng et al. CVPR 2022,
        instance post-processing of the released code), NMS-free.

        Per image: class probabilities = softmax over ``C+1``, no-object dropped; the top
        ``k = min(cfg.max_detections, Q*C)`` (query, class) pairs; their mask logits upsampled ×4 (bilinear) to
        the padded size, cropped to ``image_sizes[b]``, resized (bilinear) to ``orig_sizes[b]``; mask = logit
        > 0, with ``cfg.mask_largest_component`` cut to its largest 8-connected component
        (:func:`boxmask.ops.largest_component`; not in the reference); score = class probability × mean
        ``sigmoid(logit)`` inside the mask (0 for an empty mask); detections with score <
        ``cfg.score_threshold`` are dropped (pairs whose class probability is already below it are never
        upsampled); sorted by score. Boxes are the tight boxes of the masks
        (:func:`boxmask.ops.tight_boxes`: ``x2`` = last column + 1, pixels; zeros for an empty mask).
        The caller puts the model in eval mode.

        Args:
            images: uint8 ``[B,3,Hp,Wp]``; image_sizes / orig_sizes: per image ``(h, w)`` resized / original.
        Returns one :class:`~boxmask.structures.InstancePredictions` per image: boxes float32 ``[N,4]``
        (original pixels), scores float32 ``[N]`` in ``[0, 1]``, labels int64 ``[N]`` in ``[0, C)``, masks bool
        ``[N, H_orig, W_orig]``, ``N <= k``.
        """
        f = self.features(images)
        cls, masks = f.class_logits[-1].float(), f.mask_logits[-1].float()
        hp, wp = images.shape[-2:]
        c = self.num_classes
        k_max = int(getattr(self.cfg, "max_detections", 100))
        thr = getattr(self.cfg, "score_threshold", None)
        out = []
        for b, ((h, w), (oh, ow)) in enumerate(zip(image_sizes, orig_sizes)):
            probs = cls[b].softmax(-1)[:, :c]
            top, idx = probs.flatten().topk(min(k_max, probs.numel()))
            queries, labels = torch.div(idx, c, rounding_mode="floor"), idx % c
            if thr is not None:  # score <= class probability: these can never pass
                keep = top >= thr
                top, queries, labels = top[keep], queries[keep], labels[keep]
            bins, scores = [], []
            for sel in torch.arange(len(queries), device=images.device).split(_PREDICT_CHUNK):
                up = F.interpolate(masks[b, queries[sel]][:, None], size=(hp, wp), mode="bilinear",
                                   align_corners=False)[:, :, :h, :w]
                up = F.interpolate(up, size=(oh, ow), mode="bilinear", align_corners=False)[:, 0]
                binary = up > 0
                if getattr(self.cfg, "mask_largest_component", False):
                    binary = largest_component(binary)
                inside = (up.sigmoid() * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
                bins.append(binary)
                scores.append(top[sel] * inside)
            binary = torch.cat(bins) if bins else torch.zeros(0, oh, ow, dtype=torch.bool, device=images.device)
            score = torch.cat(scores) if scores else torch.zeros(0, device=images.device)
            keep = torch.nonzero(score >= thr).squeeze(1) if thr is not None else torch.arange(len(score),
                                                                                              device=score.device)
            keep = keep[score[keep].argsort(descending=True)]
            binary = binary[keep]
            out.append(InstancePredictions(tight_boxes(binary), score[keep].float(), labels[keep].long(), binary))
        return out

    @torch.no_grad()
    def box_conditioned_masks(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: list[Tensor],
                              labels: list[Tensor] | None = None, rank: str = "score_iou",
                              candidates: int = 5) -> list[BoxConditionedMasks]:
        """Mask logits for given boxes (``annotate``; the rule of :mod:`boxmask.modeling.box_conditioned`
        adapted to queries): the final prediction set's queries are ranked per box by the probability of
        the box's class (the max over the object classes when the class is unknown) times, with
        ``rank="score_iou"``, the IoU of the query mask's tight box (logit > 0, stride 4) with the given
        box -- queries regress no box, their mask tells which object they serve; the ``candidates`` best
        each draw their mask and the one with the smallest BoxInst projection term against the box is
        kept. ``loc_inds`` are query indices, ``levels`` zeros and ``locations`` the box centres.

        Arguments, returns and errors as :meth:`boxmask.modeling.condinst.CondInst.box_conditioned_masks`.
        """
        check_box_conditioned_args(images, boxes, labels, rank, candidates)
        f = self.features(images)
        probs = f.class_logits[-1].float().softmax(-1)[..., :-1]  # [B,Q,C] without no-object
        masks = f.mask_logits[-1].float()  # [B,Q,h,w]
        hp, wp = images.shape[-2:]
        num_q, num_c = probs.shape[1:]
        k = min(candidates, num_q)
        out = []
        for b in range(images.shape[0]):
            bx = boxes[b].to(images.device).float()
            n = len(bx)
            agnostic = probs[b].max(1).values  # [Q]
            if labels is not None and n:
                lab = labels[b].to(images.device).long()
                known = (lab >= 0) & (lab < num_c)
                score = torch.where(known[:, None], probs[b][:, lab.clamp(0, num_c - 1)].t(), agnostic[None])
            else:
                score = agnostic[None].expand(n, num_q)
            if rank == "score_iou" and n:
                query_boxes = tight_boxes(masks[b] > 0) * MASK_STRIDE
                score = score * box_iou(bx, query_boxes)
            top_scores, top_q = score.topk(k, dim=1) if n else (score.new_zeros(0, k), score.new_zeros(0, k).long())
            valid = torch.ones(n, k, dtype=torch.bool, device=images.device)
            logits, pick, agreement = best_fitting_candidates(masks[b][top_q.reshape(-1)][:, None], valid, bx,
                                                              (hp, wp), MASK_STRIDE)
            centres = torch.stack(((bx[:, 0] + bx[:, 2]) / 2, (bx[:, 1] + bx[:, 3]) / 2), 1)
            out.append(BoxConditionedMasks(logits, top_q.gather(1, pick[:, None])[:, 0],
                                           torch.zeros(n, dtype=torch.int64, device=images.device), centres,
                                           top_scores.gather(1, pick[:, None])[:, 0],
                                           torch.ones(n, dtype=torch.bool, device=images.device), agreement))
        return out
