"""Multi-scale deformable attention (Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End
Object Detection", ICLR 2021, Eq. 3), in pure PyTorch.

The building block of the Mask2Former pixel decoder used by Box2Mask-T (methods.md §4.1). The references
ship the sampling core as a CUDA extension; here it is one ``grid_sample`` call per level, so it runs
(and is differentiable) wherever PyTorch runs, with no compile step (design.md, "Choices already made").

Notation: ``B`` batch, ``Q`` queries, ``M`` heads, ``D`` channels per head, ``L`` levels, ``P`` sampling
points per head and level, ``S = sum_l H_l * W_l`` flattened positions of all levels (each level
row-major, ``s = y * W_l + x``, levels concatenated in order). Normalised coordinates are ``(x, y)`` in
``[0, 1]`` with 0 and 1 on the outer edges of a map: the centre of pixel ``(i, j)`` of level ``l`` is
``((j + 0.5) / W_l, (i + 0.5) / H_l)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "ms_deform_attn_sample"]


def _level_sizes(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    """``[(H_l, W_l)]`` as Python ints from an integer ``[L, 2]`` tensor; ValueError otherwise."""
    if not isinstance(spatial_shapes, Tensor) or spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be an [L, 2] tensor of (H, W), got {_shape(spatial_shapes)}")
    if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype.is_complex or spatial_shapes.dtype == torch.bool:
        raise ValueError(f"spatial_shapes must be an integer tensor, got {spatial_shapes.dtype}")
    if spatial_shapes.shape[0] < 1:
        raise ValueError("spatial_shapes must hold at least one level")
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if any(h < 1 or w < 1 for h, w in sizes):
        raise ValueError(f"every level needs H, W >= 1, got {sizes}")
    return sizes


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def ms_deform_attn_sample(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The sampling core of multi-scale deformable attention (Deformable DETR, Zhu et al. ICLR 2021, Eq. 3):
    ``out[b, q, m] = sum_l sum_k A[b, q, m, l, k] * x_l(p[b, q, m, l, k])`` per head ``m``, where ``x_l(p)``
    is the bilinear interpolation of head ``m``'s values of level ``l`` at the normalised point ``p``.

    Bilinear interpolation uses the 4 pixel centres around the point; neighbours outside the map count as
    zero (``grid_sample`` with ``padding_mode="zeros"``, ``align_corners=False``), so a point more than half
    a pixel outside a map contributes nothing and one on the border ring is faded towards zero.
    Differentiable in ``value``, ``sampling_locations`` and ``attention_weights`` (the gradient in the
    location is piecewise constant and jumps where the point crosses a pixel centre's row or column).

    Args:
        value: float ``[B, S, M, D]``, per-head values of all levels, flattened row-major and concatenated
            in level order.
        spatial_shapes: integer (int64) ``[L, 2]``, ``(H_l, W_l)`` in pixels of each level, on any device
            (it is read as Python ints).
        sampling_locations: float ``[B, Q, M, L, P, 2]``, normalised ``(x, y)``: ``[0, 1]`` spans the map
            edge to edge (pixel centre of column ``j`` at ``(j + 0.5) / W_l``); values outside are allowed.
        attention_weights: float ``[B, Q, M, L, P]``, the weights ``A`` (callers softmax them over ``L*P``;
            they are used as given).

    Returns:
        ``[B, Q, M * D]`` in the dtype of ``value``, heads major (channel ``m * D + d``).

    Raises:
        ValueError: a tensor has the wrong number of dims, ``B``/``M``/``L``/``Q``/``P`` disagree between
            the inputs, ``S != sum_l H_l * W_l``, or ``spatial_shapes`` is not a positive integer ``[L, 2]``.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, heads, head_dim], got {_shape(value)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be [B, Q, heads, L, P, 2], got {_shape(sampling_locations)}")
    sizes = _level_sizes(spatial_shapes)
    b, s, m, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    if sampling_locations.shape[:4] != (b, q, m, len(sizes)):
        raise ValueError(
            f"sampling_locations {_shape(sampling_locations)} does not match B={b}, heads={m}, "
            f"L={len(sizes)} (value {_shape(value)}, spatial_shapes {_shape(spatial_shapes)})"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be [B, Q, heads, L, P] = {tuple(sampling_locations.shape[:-1])}, "
            f"got {_shape(attention_weights)}"
        )
    total = sum(h * w for h, w in sizes)
    if s != total:
        raise ValueError(f"value has S={s} positions but spatial_shapes {sizes} sum to {total}")

    # One grid_sample per level over B*M maps of D channels; queries x points form the output "image".
    levels = value.split([h * w for h, w in sizes], dim=1)
    grids = sampling_locations.to(value.dtype) * 2 - 1  # grid_sample wants [-1, 1] edge to edge
    grids = grids.permute(0, 2, 3, 1, 4, 5).reshape(b * m, n_levels, q, n_points, 2)
    samples = []
    for lvl, (h, w) in enumerate(sizes):
        fmap = levels[lvl].permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        samples.append(
            F.grid_sample(fmap, grids[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*M, D, Q, P]
    sampled = torch.stack(samples, dim=3)  # [B*M, D, Q, L, P]
    weights = attention_weights.to(value.dtype).permute(0, 2, 1, 3, 4).reshape(b * m, 1, q, n_levels, n_points)
    out = (sampled * weights).sum(dim=(3, 4))  # [B*M, D, Q]
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, Zhu et al. ICLR 2021, Eq. 3):
    ``MSDeformAttn(z_q, p_q, {x_l}) = W_o [ sum_l sum_k A_mlqk * W_v x_l(p_q + dp_mlqk) ]_m`` where the
    offsets ``dp`` and the weights ``A`` (softmax over the ``L * P`` samples of a head) are linear in the
    query ``z_q``.

    Offsets are predicted in pixels of each level and divided by ``(W_l, H_l)`` before they are added to the
    normalised reference point, so one unit of offset is one pixel of the level it samples.

    Initialisation as in the authors' release: ``sampling_offsets`` weight 0 and bias a fixed direction
    grid (head ``h`` points at angle ``2*pi*h / n_heads``, scaled so ``max(|x|, |y|) = 1``, point ``k`` of
    every level at ``k + 1`` times that), so at init the samples form rays around the reference point;
    ``attention_weights`` weight and bias 0 (uniform attention); ``value_proj`` and ``output_proj``
    xavier-uniform with bias 0.

    Args:
        d_model: channels ``C`` of queries, values and output (256 in Mask2Former).
        n_levels: feature levels ``L`` (3 in the Mask2Former pixel decoder, 4 in Deformable DETR).
        n_heads: attention heads ``M``; ``d_model`` must be divisible by it.
        n_points: sampling points ``P`` per head and level.

    Attributes:
        d_model, n_levels, n_heads, n_points: as given.
        sampling_offsets: ``Linear(C, M*L*P*2)``, offsets ``(dx, dy)`` in level pixels, laid out
            ``[M, L, P, 2]``.
        attention_weights: ``Linear(C, M*L*P)``, logits laid out ``[M, L, P]``.
        value_proj, output_proj: ``Linear(C, C)``.

    Raises:
        ValueError: a size is not a positive int, or ``d_model % n_heads != 0``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        for name, val in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"MSDeformAttn {name} must be a positive int, got {val!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-apply the Deformable DETR initialisation described in the class docstring (in place)."""
        m, n_lvl, n_pts = self.n_heads, self.n_levels, self.n_points
        angles = torch.arange(m, dtype=torch.float64) * (2.0 * math.pi / m)
        dirs = torch.stack([angles.cos(), angles.sin()], dim=-1)
        dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values  # on the unit square, not circle
        scale = torch.arange(1, n_pts + 1, dtype=torch.float64).view(1, 1, n_pts, 1)
        grid = dirs.view(m, 1, 1, 2).expand(m, n_lvl, n_pts, 2) * scale
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
            for lin in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to ``n_points`` learned points per head around its reference point on
        every level.

        Args:
            query: float ``[B, Q, C]`` (content plus positional embedding in the pixel decoder).
            reference_points: float ``[B, Q, L, 2]``, normalised ``(x, y)`` per level (``[0, 1]`` edge to
                edge, as in :func:`ms_deform_attn_sample`).
            value_input: float ``[B, S, C]``, all levels flattened row-major and concatenated,
                ``S = sum_l H_l * W_l``.
            spatial_shapes: integer ``[L, 2]``, ``(H_l, W_l)`` in pixels.
            padding_mask: bool ``[B, S]`` or None; True marks padded positions, whose projected values are
                set to zero so they contribute nothing.

        Returns:
            float ``[B, Q, C]``.

        Raises:
            ValueError: wrong dims or channel count, ``B``/``Q``/``L`` disagree, ``L != n_levels``,
                ``S != sum_l H_l * W_l``, or ``padding_mask`` is not a bool ``[B, S]`` tensor.
        """
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be [B, Q, {self.d_model}], got {_shape(query)}")
        if value_input.dim() != 3 or value_input.shape[-1] != self.d_model:
            raise ValueError(f"value_input must be [B, S, {self.d_model}], got {_shape(value_input)}")
        b, q, _ = query.shape
        s = value_input.shape[1]
        if value_input.shape[0] != b:
            raise ValueError(f"query has B={b} but value_input {_shape(value_input)}")
        sizes = _level_sizes(spatial_shapes)
        if len(sizes) != self.n_levels:
            raise ValueError(f"spatial_shapes has {len(sizes)} levels, the module was built for {self.n_levels}")
        if sum(h * w for h, w in sizes) != s:
            raise ValueError(f"value_input has S={s} positions but spatial_shapes {sizes} sum to "
                             f"{sum(h * w for h, w in sizes)}")
        if reference_points.shape != (b, q, self.n_levels, 2):
            raise ValueError(
                f"reference_points must be [B, Q, L, 2] = {(b, q, self.n_levels, 2)}, got {_shape(reference_points)}"
            )
        if padding_mask is not None and (
            not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool or padding_mask.shape != (b, s)
        ):
            desc = (_shape(padding_mask), getattr(padding_mask, "dtype", None))
            raise ValueError(f"padding_mask must be a bool [B, S] = {(b, s)} tensor, got {desc}")

        m, n_lvl, n_pts = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, q, m, n_lvl, n_pts, 2)
        weights = self.attention_weights(query).view(b, q, m, n_lvl * n_pts).softmax(-1)
        weights = weights.view(b, q, m, n_lvl, n_pts)
        # (W, H) per level: offsets are in level pixels, locations are normalised.
        wh = spatial_shapes.to(device=offsets.device, dtype=offsets.dtype).flip(-1)
        locations = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
