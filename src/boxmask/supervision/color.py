"""Colour similarity for BoxInst's pairwise term (methods.md §2.2), on the training device.

Everything here is a pure function on tensors, batched, and computed in float32 whatever the
input dtype. Shapes use ``B`` images, padded size ``Hp x Wp`` and ``h = Hp // s``, ``w = Wp // s``.

Neighbourhood convention (shared with :mod:`boxmask.supervision.boxinst`): a 3x3 kernel with
dilation ``d`` and its centre removed gives 8 neighbours ``j = i + (dy, dx)`` in ``F.unfold``
order (row-major over the kernel)::

    (-d,-d) (-d,0) (-d,d) (0,-d) (0,d) (d,-d) (d,0) (d,d)

No ``unfold`` is used: each neighbour is handled with two shifted slices of the same map
(:func:`shifted_slices`), so nothing bigger than the ``[B, 8, h, w]`` output is materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NEIGHBOR_OFFSETS",
    "NEIGHBOR_OFFSETS_UNIT",
    "bottom_rows_to_remove",
    "neighbor_offsets",
    "shifted_slices",
    "rgb_to_lab",
    "image_validity_masks",
    "lab_color_similarity",
]

#: The 8 (dy, dx) offsets of a 3x3 kernel without its centre, dilation 1, ``F.unfold`` order.
NEIGHBOR_OFFSETS_UNIT: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1), (0, 1),
    (1, -1), (1, 0), (1, 1),
)

#: Alias of :data:`NEIGHBOR_OFFSETS_UNIT` (dilation 1); ``neighbor_offsets(d)`` scales it by ``d``.
NEIGHBOR_OFFSETS = NEIGHBOR_OFFSETS_UNIT

# sRGB (D65) -> XYZ, the matrix scikit-image uses (``skimage.color.colorconv.xyz_from_rgb``).
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# Reference white D65, 2-degree observer (skimage ``xyz_tristimulus_values("D65", "2")``).
_WHITE_D65_2 = (0.95047, 1.0, 1.08883)


def neighbor_offsets(dilation: int = 2) -> tuple[tuple[int, int], ...]:
    """The 8 ``(dy, dx)`` neighbour offsets for ``dilation``, in ``F.unfold`` order (see module doc)."""
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    d = dilation
    return tuple((dy * d, dx * d) for dy, dx in NEIGHBOR_OFFSETS_UNIT)


def _axis_slices(n: int, delta: int) -> tuple[slice, slice]:
    """Slices (centre, neighbour) along one axis of length ``n`` for a shift ``delta``.

    ``x[centre]`` and ``x[neighbour]`` have the same length and ``neighbour = centre + delta``
    element-wise; positions whose neighbour falls outside ``[0, n)`` are excluded. Empty when
    ``|delta| >= n``.
    """
    m = max(n - abs(delta), 0)
    if delta >= 0:
        return slice(0, m), slice(n - m, n)
    return slice(n - m, n), slice(0, m)


def shifted_slices(dy: int, dx: int, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``((ys_c, xs_c), (ys_n, xs_n))`` so that ``x[..., ys_n, xs_n]`` is the neighbour at
    offset ``(dy, dx)`` of every centre in ``x[..., ys_c, xs_c]`` (only pairs inside the map)."""
    ys_c, ys_n = _axis_slices(h, dy)
    xs_c, xs_n = _axis_slices(w, dx)
    return (ys_c, xs_c), (ys_n, xs_n)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB -> CIE-LAB (D65, 2-degree observer), the formula of ``skimage.color.rgb2lab``.

    Args:
        rgb: ``[..., 3, H, W]`` RGB in 0..255, uint8 or float (any float dtype).
    Returns:
        float32 ``[..., 3, H, W]`` with channels (L, a, b), on ``rgb``'s device.
    Raises:
        ValueError: if dim -3 is not 3 channels.
    """
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"expected [..., 3, H, W], got {tuple(rgb.shape)}")
    c = rgb.to(torch.float32) / 255.0
    lin = torch.where(c > 0.04045, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
    r, g, b = lin.unbind(dim=-3)
    xyz = []
    for row, white in zip(_XYZ_FROM_RGB, _WHITE_D65_2):
        t = (row[0] * r + row[1] * g + row[2] * b) / white
        # t > 0.008856 on that branch, so the real cube root is pow(t, 1/3).
        f = torch.where(t > 0.008856, t.clamp_min(0.008856).pow(1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
        xyz.append(f)
    fx, fy, fz = xyz
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)


def bottom_rows_to_remove(resized_h: int, orig_h: int, pixels: int = 10) -> int:
    """Rows to drop at the bottom of a resized image: ``int(pixels * resized_h / orig_h)``.

    AdelaiDet ``BOTTOM_PIXELS_REMOVED`` scaling (methods.md §2.2-5): ``pixels`` original-image rows
    (10 for COCO, 0 for data without the artefact) expressed in resized pixels, truncated.
    Raises ValueError if a height is not positive or ``pixels < 0``.
    """
    if resized_h <= 0 or orig_h <= 0:
        raise ValueError(f"heights must be positive, got resized_h={resized_h}, orig_h={orig_h}")
    if pixels < 0:
        raise ValueError(f"pixels must be >= 0, got {pixels}")
    return int(pixels * resized_h / orig_h)


def image_validity_masks(
    image_sizes: Sequence[tuple[int, int]],
    padded_hw: tuple[int, int],
    bottom_rows: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool ``[B, Hp, Wp]``: True on each real (resized) image, False on padding and on the
    bottom ``bottom_rows[b]`` rows of image ``b`` (COCO annotation artefact, methods.md §2.2-5).

    ``image_sizes[b] = (h_b, w_b)`` is the resized image size inside the padded ``(Hp, Wp)`` batch;
    ``bottom_rows`` (see :func:`bottom_rows_to_remove`) defaults to no removal.
    Raises ValueError if an image is larger than the padded size, if ``bottom_rows`` has another
    length than ``image_sizes``, or if a ``bottom_rows`` entry is negative.
    """
    hp, wp = int(padded_hw[0]), int(padded_hw[1])
    if bottom_rows is None:
        bottom_rows = [0] * len(image_sizes)
    if len(bottom_rows) != len(image_sizes):
        raise ValueError(f"bottom_rows has {len(bottom_rows)} entries for {len(image_sizes)} images")
    out = torch.zeros((len(image_sizes), hp, wp), dtype=torch.bool, device=device)
    for b, ((h, w), n_rm) in enumerate(zip(image_sizes, bottom_rows)):
        if not (0 <= h <= hp and 0 <= w <= wp):
            raise ValueError(f"image {b}: size {(h, w)} does not fit the padded size {(hp, wp)}")
        if n_rm < 0:
            raise ValueError(f"image {b}: bottom_rows={n_rm} must be >= 0")
        out[b, : max(int(h) - int(n_rm), 0), : int(w)] = True
    return out


def _downsample_truncate(images: Tensor, stride: int) -> Tensor:
    """``avg_pool2d(s, s)`` then truncation to integers, like the reference's uint8 cast."""
    sums = F.avg_pool2d(images.to(torch.float32), stride, stride, divisor_override=1)
    if not images.dtype.is_floating_point:
        # Integer pixels: the block sums are exact integers; integer division == floor of the mean.
        return torch.div(sums.round().to(torch.int64), stride * stride, rounding_mode="floor").to(torch.float32)
    return torch.floor(sums / float(stride * stride))


def lab_color_similarity(
    images: Tensor,
    valid: Tensor | None = None,
    stride: int = 4,
    dilation: int = 2,
) -> Tensor:
    """BoxInst colour similarity ``S_ij = exp(-||lab_i - lab_j||_2 / 2) * V_j`` at stride ``s``.

    Args:
        images: uint8 ``[B, 3, Hp, Wp]`` RGB, 0..255, zero padded (float 0..255 also accepted).
        valid: bool ``[B, Hp, Wp]`` image-validity mask (:func:`image_validity_masks`);
            ``None`` means everything is valid.
        stride: mask output stride ``s``; ``Hp`` and ``Wp`` must be multiples of it.
        dilation: neighbour dilation ``d``.
    Returns:
        float32 ``[B, 8, Hp/s, Wp/s]`` on the images' device; channel ``o`` is the neighbour at
        ``neighbor_offsets(d)[o]``. Neighbours outside the map, or invalid, give 0. The validity
        of the neighbour is point-sampled at ``[s//2::s, s//2::s]``; the centre is not gated here.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, Hp, Wp], got {tuple(images.shape)}")
    bsz, _, hp, wp = images.shape
    s = int(stride)
    if s < 1 or hp % s or wp % s:
        raise ValueError(f"padded size {(hp, wp)} must be a multiple of stride {stride}")
    h, w = hp // s, wp // s
    if valid is None:
        v = torch.ones((bsz, h, w), dtype=torch.float32, device=images.device)
    else:
        if tuple(valid.shape) != (bsz, hp, wp):
            raise ValueError(f"valid must be [B, Hp, Wp] = {(bsz, hp, wp)}, got {tuple(valid.shape)}")
        v = valid[:, s // 2 :: s, s // 2 :: s].to(device=images.device, dtype=torch.float32)

    lab = rgb_to_lab(_downsample_truncate(images, s))  # [B, 3, h, w] float32
    out = torch.zeros((bsz, 8, h, w), dtype=torch.float32, device=images.device)
    for o, (dy, dx) in enumerate(neighbor_offsets(dilation)):
        (ys_c, xs_c), (ys_n, xs_n) = shifted_slices(dy, dx, h, w)
        diff = lab[:, :, ys_c, xs_c] - lab[:, :, ys_n, xs_n]
        dist = torch.linalg.vector_norm(diff, dim=1)
        out[:, o, ys_c, xs_c] = torch.exp(-0.5 * dist) * v[:, ys_n, xs_n]
    return out


# Private alias kept for callers that use the underscore name.
_shift_slices = shifted_slices
