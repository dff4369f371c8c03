"""Overlays of predicted instances (masks, boxes, "class score" labels) and PNG output.

Drawing uses ``torchvision.utils.draw_segmentation_masks`` and ``draw_bounding_boxes``;
colours are deterministic: the hue is fixed by the class, and brightness/saturation vary
with the instance index so touching objects of one class stay distinguishable.
"""

from __future__ import annotations

import colorsys
import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from boxmask.io import atomic_write_bytes

__all__ = ["instance_colors", "draw_instances", "save_png", "contact_tile", "contact_sheet",
           "SHEET_TILE", "SHEET_PADDING", "SHEET_FILL"]

#: contact sheet geometry: tile side and gap (pixels), grey level of the gaps and letterbox bars
SHEET_TILE = 256
SHEET_PADDING = 4
SHEET_FILL = 40

_GOLDEN = 0.618033988749895


def instance_colors(labels: Sequence[int] | torch.Tensor) -> list[tuple[int, int, int]]:
    """Deterministic RGB colours, one per instance.

    Hue = ``(label * golden ratio) mod 1`` (well separated for neighbouring class indices);
    saturation and value cycle with the instance's position ``i`` so instances of one
    class differ. The same ``labels`` always give the same colours.

    Args:
        labels: ``[N]`` int contiguous class indices (>= 0).

    Returns:
        ``N`` tuples ``(r, g, b)`` of ints in ``0..255``.
    """
    labs = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    colors = []
    for i, lab in enumerate(labs):
        hue = (int(lab) * _GOLDEN) % 1.0
        sat = (0.95, 0.75, 0.55)[i % 3]
        val = (1.0, 0.8, 0.9, 0.7)[i % 4]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def draw_instances(
    image: torch.Tensor,
    masks: torch.Tensor | None,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    class_names: Sequence[str],
    alpha: float = 0.5,
) -> torch.Tensor:
    """Draw instance masks (blended), boxes and ``"name 0.93"`` labels on an image.

    Args:
        image: ``[3, H, W]`` (or ``[1, H, W]``, drawn as grey RGB) uint8 image, any device.
        masks: ``[N, H, W]`` bool masks at the image size, or ``None`` for boxes only.
        boxes: ``[N, 4]`` float ``(x1, y1, x2, y2)`` in pixels of ``image``; boxes with
            ``x2 < x1`` (or ``y2 < y1``) are drawn collapsed to a line.
        labels: ``[N]`` int contiguous class indices into ``class_names``.
        scores: ``[N]`` float confidences in ``[0, 1]``, or ``None`` to show names only.
        class_names: names indexed by label.
        alpha: mask opacity in ``[0, 1]`` (0 = invisible).

    Returns:
        New ``[3, H, W]`` uint8 CPU tensor; ``image`` itself is not modified. With ``N == 0``
        a copy of the (RGB) image.

    Raises:
        ValueError: image not uint8 ``[1|3, H, W]``; shapes of masks/boxes/labels/scores
            disagree; a label has no class name; ``alpha`` outside ``[0, 1]``.
    """
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        dtype = image.dtype if isinstance(image, torch.Tensor) else None
        raise ValueError(f"draw_instances: image must be uint8 [3, H, W], got {shape} {dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"draw_instances: alpha must be in [0, 1], got {alpha}")
    img = image.detach().cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    img = img.contiguous().clone()
    h, w = img.shape[1:]

    boxes = boxes.detach().cpu().to(torch.float32).reshape(-1, 4)
    labels = labels.detach().cpu().reshape(-1).to(torch.int64)
    n = boxes.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"draw_instances: {n} boxes but {labels.shape[0]} labels")
    if scores is not None:
        scores = scores.detach().cpu().reshape(-1).to(torch.float32)
        if scores.shape[0] != n:
            raise ValueError(f"draw_instances: {n} boxes but {scores.shape[0]} scores")
    if masks is not None and (masks.ndim != 3 or tuple(masks.shape) != (n, h, w)):
        raise ValueError(f"draw_instances: masks must be [{n}, {h}, {w}], got {tuple(masks.shape)}")
    if n == 0:
        return img
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(
            f"draw_instances: labels {labels.min().item()}..{labels.max().item()} outside the "
            f"{len(class_names)} class names"
        )

    colors = instance_colors(labels)
    if masks is not None:
        img = draw_segmentation_masks(img, masks.detach().cpu().to(torch.bool), alpha=alpha, colors=colors)
    # draw_bounding_boxes rejects x2 < x1; a degenerate box is still worth seeing.
    boxes = torch.stack(
        [boxes[:, 0], boxes[:, 1], torch.maximum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 1], boxes[:, 3])], dim=1
    )
    texts = []
    for i in range(n):
        name = class_names[int(labels[i])]
        texts.append(name if scores is None else f"{name} {float(scores[i]):.2f}")
    width = max(1, round(min(h, w) / 300))
    return draw_bounding_boxes(img, boxes, labels=texts, colors=colors, width=width)


def save_png(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Save a uint8 image tensor as PNG, atomically (encoded with Pillow, then :func:`boxmask.io.atomic_write_bytes`).

    Args:
        path: target ``.png`` file; parent folders are created.
        image: ``[3, H, W]`` RGB or ``[1, H, W]`` grey uint8 tensor (any device).

    Returns:
        The target path.

    Raises:
        ValueError: ``image`` is not uint8 ``[1|3, H, W]``.
    """
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{path}: save_png needs a uint8 [3, H, W] image, got {shape}")
    arr = np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy())
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def contact_tile(image: torch.Tensor, caption: str | None = None, size: int = SHEET_TILE,
                 fill: int = SHEET_FILL) -> torch.Tensor:
    """One tile of a contact sheet: ``image`` scaled to fit a ``size`` x ``size`` square (aspect ratio
    kept, antialiased), centred on ``fill`` grey, with ``caption`` (e.g. the file name) on a dark strip
    at the bottom.

    Args:
        image: ``[3, H, W]`` or ``[1, H, W]`` uint8 image (any device).
        caption: text drawn at the bottom; ``None`` for none. Cut to fit the tile.
        size: tile side in pixels.
        fill: grey level (0-255) of the letterbox bars.

    Returns:
        ``[3, size, size]`` uint8 CPU tensor.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"contact_tile: image must be uint8 [3, H, W], got {tuple(image.shape)} {image.dtype}")
    img = image.detach().cpu().expand(3, -1, -1)
    h, w = img.shape[1:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = TF.resize(img, [nh, nw], antialias=True)
    tile = torch.full((3, size, size), fill, dtype=torch.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    tile[:, top:top + nh, left:left + nw] = small
    if not caption:
        return tile
    pil = Image.fromarray(np.ascontiguousarray(tile.permute(1, 2, 0).numpy()))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    while len(caption) > 1 and draw.textlength(caption, font=font) > size - 6:
        caption = caption[:-2] + "…"
    bottom = draw.textbbox((0, 0), caption, font=font)[3]
    draw.rectangle((0, size - bottom - 6, size, size), fill=(0, 0, 0))
    draw.text((3, size - bottom - 3), caption, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()


def contact_sheet(tiles: Sequence[torch.Tensor], padding: int = SHEET_PADDING, fill: int = SHEET_FILL) -> torch.Tensor:
    """Tiles (from :func:`contact_tile`, all the same size) in a grid of ``ceil(sqrt(n))`` columns,
    row by row, ``padding`` pixels of ``fill`` grey between and around them (``torchvision.utils.make_grid``;
    a single tile is returned as it is). Empty slots of the last row are ``fill`` grey.

    Returns:
        ``[3, H, W]`` uint8 tensor.

    Raises:
        ValueError: no tiles.
    """
    if not tiles:
        raise ValueError("contact_sheet: no tiles")
    cols = math.ceil(math.sqrt(len(tiles)))
    return make_grid(list(tiles), nrow=cols, padding=padding, pad_value=fill)
