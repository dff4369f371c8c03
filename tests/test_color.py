"""Tests for boxmask.supervision.color: LAB conversion, neighbour order, validity masks, colour similarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from boxmask.supervision.color import (
    NEIGHBOR_OFFSETS,
    bottom_rows_to_remove,
    image_validity_masks,
    lab_color_similarity,
    neighbor_offsets,
    rgb_to_lab,
)

skcolor = pytest.importorskip("skimage.color", reason="scikit-image is the LAB reference")

torch.set_num_threads(1)


def _sk_lab(images: torch.Tensor) -> np.ndarray:
    """scikit-image rgb2lab of uint8 [B,3,H,W] -> float64 [B,3,H,W]."""
    arr = images.permute(0, 2, 3, 1).numpy()
    return np.stack([skcolor.rgb2lab(a) for a in arr]).transpose(0, 3, 1, 2)


# ---------------------------------------------------------------- rgb_to_lab


def test_rgb_to_lab_matches_skimage_on_random_uint8():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 19, 23), generator=g, dtype=torch.uint8)
    # make sure the extremes and both sides of the sRGB gamma knee (10.3/255) are present
    images[0, :, 0, :6] = torch.tensor([0, 255, 10, 11, 1, 254], dtype=torch.uint8)
    lab = rgb_to_lab(images)
    assert lab.dtype == torch.float32 and lab.shape == images.shape
    ref = _sk_lab(images)
    assert np.abs(lab.numpy() - ref).max() < 1e-3


def test_rgb_to_lab_all_256_grey_levels_and_known_colours():
    grey = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    ref = _sk_lab(grey)
    assert np.abs(rgb_to_lab(grey).numpy() - ref).max() < 1e-3
    # textbook values: white (100, 0, 0), black (0, 0, 0), sRGB red (53.24, 80.09, 67.20)
    px = torch.tensor([[255, 0, 255], [255, 0, 0], [255, 0, 0]], dtype=torch.uint8).view(3, 1, 3)
    lab = rgb_to_lab(px)[:, 0]  # [3 channels, 3 pixels]
    expected = torch.tensor([[100.0, 0.0, 53.24], [0.0, 0.0, 80.09], [0.0, 0.0, 67.20]])
    torch.testing.assert_close(lab, expected, atol=0.01, rtol=0)


def test_rgb_to_lab_float_input_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 2, 3, 5, 7), generator=g, dtype=torch.uint8)
    lab_u8 = rgb_to_lab(images)
    assert lab_u8.shape == (2, 2, 3, 5, 7)
    torch.testing.assert_close(rgb_to_lab(images.double()), lab_u8, atol=1e-5, rtol=0)
    torch.testing.assert_close(rgb_to_lab(images[1, 0]), lab_u8[1, 0])


def test_rgb_to_lab_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="3, H, W"):
        rgb_to_lab(torch.zeros(1, 4, 5, 5))


# ---------------------------------------------------------------- neighbour order


def test_neighbor_offsets_literal_and_unfold_order():
    assert neighbor_offsets(2) == ((-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2))
    assert neighbor_offsets(1) == NEIGHBOR_OFFSETS
    # unfold channel c (centre dropped) at pixel (y, x) must read pixel (y + dy_c, x + dx_c)
    d, h, w = 2, 7, 8
    img = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    cols = F.unfold(img, kernel_size=3, dilation=d, padding=d).view(9, h, w)
    cols = torch.cat([cols[:4], cols[5:]])
    y, x = 3, 4
    for c, (dy, dx) in enumerate(neighbor_offsets(d)):
        assert cols[c, y, x] == img[0, 0, y + dy, x + dx]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_neighbor_offsets_rejects_bad_dilation(bad):
    with pytest.raises(ValueError, match="dilation"):
        neighbor_offsets(bad)


# ---------------------------------------------------------------- validity masks


def test_image_validity_masks_hand_case():
    valid = image_validity_masks([(5, 7), (8, 4)], (8, 8), [2, 0], device="cpu")
    assert valid.dtype == torch.bool and valid.shape == (2, 8, 8)
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[0, :3, :7] = True  # 5 rows minus the 2 bottom rows
    expected[1, :8, :4] = True
    assert torch.equal(valid, expected)
    # more rows removed than the image has -> nothing valid; None means no removal
    assert not image_validity_masks([(3, 3)], (4, 4), [5]).any()
    assert image_validity_masks([(3, 3)], (4, 4)).sum() == 9


def test_image_validity_masks_errors():
    with pytest.raises(ValueError, match="image 1"):
        image_validity_masks([(4, 4), (9, 4)], (8, 8), [0, 0])
    with pytest.raises(ValueError, match="bottom_rows"):
        image_validity_masks([(4, 4)], (8, 8), [0, 0])
    with pytest.raises(ValueError, match="bottom_rows=-1"):
        image_validity_masks([(4, 4)], (8, 8), [-1])


def test_bottom_rows_to_remove_follows_adelaidet_scaling():
    assert bottom_rows_to_remove(800, 480) == 16  # int(10 * 800 / 480) = int(16.67)
    assert bottom_rows_to_remove(400, 480) == 8  # int(8.33)
    assert bottom_rows_to_remove(800, 480, pixels=0) == 0
    with pytest.raises(ValueError):
        bottom_rows_to_remove(0, 480)


# ---------------------------------------------------------------- colour similarity


def _naive_similarity(images: torch.Tensor, valid: torch.Tensor, stride: int, dilation: int) -> np.ndarray:
    """Per-pixel python loops on scikit-image LAB of the truncated block means (the reference recipe)."""
    b, _, hp, wp = images.shape
    h, w = hp // stride, wp // stride
    blocks = images.double().numpy().reshape(b, 3, h, stride, w, stride).mean(axis=(3, 5))
    lab = np.stack([skcolor.rgb2lab(blk.transpose(1, 2, 0).astype(np.uint8)) for blk in blocks])  # [B,h,w,3]
    v = valid.numpy()[:, stride // 2::stride, stride // 2::stride]
    out = np.zeros((b, 8, h, w))
    offsets = [(dy * dilation, dx * dilation) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for n in range(b):
        for k, (dy, dx) in enumerate(offsets):
            for i in range(h):
                for j in range(w):
                    ni, nj = i + dy, j + dx
                    if 0 <= ni < h and 0 <= nj < w:
                        dist = np.linalg.norm(lab[n, i, j] - lab[n, ni, nj])
                        out[n, k, i, j] = math.exp(-dist / 2) * v[n, ni, nj]
    return out


def _unfold_similarity(images: torch.Tensor, valid: torch.Tensor, stride: int, dilation: int) -> torch.Tensor:
    """AdelaiDet-style unfold reference (zero padding), LAB from rgb_to_lab."""
    pooled = F.avg_pool2d(images.float(), stride, stride).to(torch.uint8)
    lab = rgb_to_lab(pooled)
    b, _, h, w = lab.shape

    def unfold_wo_centre(x):
        cols = F.unfold(x, kernel_size=3, dilation=dilation, padding=dilation).view(x.shape[0], x.shape[1], 9, h, w)
        return torch.cat([cols[:, :, :4], cols[:, :, 5:]], dim=2)

    diff = lab[:, :, None] - unfold_wo_centre(lab)
    sim = torch.exp(-torch.norm(diff, dim=1) * 0.5)
    v = valid[:, None, stride // 2::stride, stride // 2::stride].float()
    return sim * unfold_wo_centre(v)[:, 0]


def test_lab_color_similarity_matches_naive_and_unfold_references():
    g = torch.Generator().manual_seed(2)
    stride, dilation = 4, 2
    images = torch.randint(0, 256, (2, 3, 32, 28), generator=g, dtype=torch.uint8)
    sizes = [(32, 28), (21, 13)]
    images[1, :, 21:, :] = 0  # zero padding of the smaller image
    images[1, :, :, 13:] = 0
    valid = image_validity_masks(sizes, (32, 28), [3, 2])
    sim = lab_color_similarity(images, valid, stride=stride, dilation=dilation)
    assert sim.dtype == torch.float32 and sim.shape == (2, 8, 8, 7)
    ref = _naive_similarity(images, valid, stride, dilation)
    assert np.abs(sim.numpy() - ref).max() < 1e-4
    torch.testing.assert_close(sim, _unfold_similarity(images, valid, stride, dilation), atol=1e-6, rtol=1e-5)
    # padding and bottom rows do zero the neighbour side: image 1, sampled rows >= 5 are invalid
    # ((21 - 2) rows valid; sampled rows at 2, 6, ..., 18 -> 5 valid), so the (+2, 0) neighbour of row 3 is 0
    assert torch.all(sim[1, 6, 3] == 0)
    assert torch.all(sim[1, 6, :3, :2] > 0)


def test_lab_color_similarity_hand_case_truncation_and_contrast():
    # stride 2, 2x3 cells; cell (0, 0) block mean 10.75 -> truncated to 10 (rounding would give 11)
    images = torch.zeros(1, 3, 4, 6, dtype=torch.uint8)
    images[0, :, 0:2, 0:2] = torch.tensor([[10, 11], [11, 11]], dtype=torch.uint8)
    images[0, :, 0:2, 2:4] = 10
    images[0, :, 0:2, 4:6] = 255  # white cell
    valid = torch.ones(1, 4, 6, dtype=torch.bool)
    sim = lab_color_similarity(images, valid, stride=2, dilation=1)
    # neighbour (0, +1) = channel 4: cell (0,0) vs cell (0,1) both grey 10 -> identical LAB -> 1
    assert sim[0, 4, 0, 0] == pytest.approx(1.0, abs=1e-6)
    # cell (0,1) grey 10 vs cell (0,2) white: LAB distance = L difference 100 - L(10)
    l10 = float(rgb_to_lab(torch.full((3, 1, 1), 10, dtype=torch.uint8))[0, 0, 0])
    assert sim[0, 4, 0, 1] == pytest.approx(math.exp(-(100.0 - l10) / 2), rel=1e-4)
    # last column has no right neighbour; first row has no upper neighbours
    assert torch.all(sim[0, 4, :, 2] == 0) and torch.all(sim[0, :3, 0] == 0)
    # row 1 is black everywhere: its horizontal edges are exp(0) = 1
    assert torch.allclose(sim[0, 4, 1, :2], torch.ones(2))


def test_lab_color_similarity_errors():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of stride"):
        lab_color_similarity(images[:, :, :6], torch.ones(1, 6, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must be"):
        lab_color_similarity(images, torch.ones(1, 4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="images must be"):
        lab_color_similarity(images[0], torch.ones(1, 8, 8, dtype=torch.bool))
