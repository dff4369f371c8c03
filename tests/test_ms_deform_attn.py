"""Tests for boxmask.modeling.ms_deform_attn: the sampling core (vs explicit per-point bilinear loops, hand
values, gradcheck) and the MSDeformAttn module (init, offset normalisation, padding mask, errors)."""

from __future__ import annotations

import math

import pytest
import torch

from boxmask.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_sample

torch.set_num_threads(1)


def _naive_sample(value, shapes, loc, attn):
    """Eq. 3 core by explicit loops: per point, bilinear over the 4 neighbouring pixel centres, zero outside."""
    b_n, _, m_n, d = value.shape
    _, q_n, _, l_n, p_n, _ = loc.shape
    starts = [0]
    for h, w in shapes.tolist():
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b_n, q_n, m_n * d, dtype=value.dtype)
    for b in range(b_n):
        for q in range(q_n):
            for m in range(m_n):
                acc = torch.zeros(d, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes.tolist()):
                    for p in range(p_n):
                        # pixel-centre coordinates: centre of column j sits at j
                        x = float(loc[b, q, m, lvl, p, 0]) * w - 0.5
                        y = float(loc[b, q, m, lvl, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(d, dtype=value.dtype)
                        for yy, xx, wt in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                                           (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample = sample + wt * value[b, starts[lvl] + yy * w + xx, m]
                        acc = acc + attn[b, q, m, lvl, p] * sample
                out[b, q, m * d:(m + 1) * d] = acc
    return out


def _random_case(seed, b=2, q=4, m=2, d=3, shapes=((3, 5), (2, 2)), p=3):
    g = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    s = int((shapes_t[:, 0] * shapes_t[:, 1]).sum())
    value = torch.randn(b, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(b, q, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    attn = torch.rand(b, q, m, len(shapes), p, generator=g, dtype=torch.float64)
    attn = attn / attn.sum(dim=(-2, -1), keepdim=True)
    return value, shapes_t, loc, attn


# ---------------------------------------------------------------------------------- sampling core


def test_sample_matches_naive_loops_incl_outside_and_pixel_centres():
    value, shapes, loc, attn = _random_case(0)
    # level 0 is 3x5, level 1 is 2x2: plant exact pixel centres, far-outside and border-ring points
    loc[0, 0, 0, 0, 0] = torch.tensor([(2 + 0.5) / 5, (1 + 0.5) / 3])
    loc[1, 2, 1, 1, 1] = torch.tensor([(0 + 0.5) / 2, (1 + 0.5) / 2])
    loc[0, 1, 1, 0, 2] = torch.tensor([-0.5, 0.4])  # fully outside: contributes 0
    loc[1, 3, 0, 1, 0] = torch.tensor([0.5, 1.7])  # fully outside
    loc[0, 3, 0, 1, 2] = torch.tensor([-0.1, 0.6])  # within half a pixel of the left edge: faded
    loc[1, 0, 1, 0, 1] = torch.tensor([1.05, 1.1])  # past the bottom-right corner centre
    out = ms_deform_attn_sample(value, shapes, loc, attn)
    ref = _naive_sample(value, shapes, loc, attn)
    assert out.shape == (2, 4, 2 * 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the case is not degenerate: the out-of-range points are really there and change the result
    assert ((loc < 0) | (loc > 1)).any(-1).sum() >= 10
    assert out.abs().min() > 0


def test_sample_fully_outside_point_contributes_nothing():
    value, shapes, loc, attn = _random_case(1, b=1, q=1, m=1, p=1)
    loc[..., 0] = -0.7
    assert torch.equal(ms_deform_attn_sample(value, shapes, loc, attn), torch.zeros(1, 1, 3, dtype=torch.float64))


def test_sample_hand_values_pixel_centre_and_midpoint():
    h, w = 2, 3
    value = torch.arange(h * w * 2, dtype=torch.float64).view(1, h * w, 1, 2) * 1.5 + 1.0  # pixel (i,j) at i*w+j
    shapes = torch.tensor([[h, w]])
    ones = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)

    def at(x, y):
        loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
        return ms_deform_attn_sample(value, shapes, loc, ones)[0, 0]

    pix = value[0, :, 0].view(h, w, 2)
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(at((j + 0.5) / w, (i + 0.5) / h), pix[i, j], rtol=0, atol=1e-12)
    # halfway between horizontal neighbours (1,0)-(1,1) and vertical neighbours (0,2)-(1,2)
    torch.testing.assert_close(at(1.0 / w, 1.5 / h), (pix[1, 0] + pix[1, 1]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(at(2.5 / w, 1.0 / h), (pix[0, 2] + pix[1, 2]) / 2, rtol=0, atol=1e-12)
    # the attention weight scales the sample
    loc = torch.tensor([0.5 / w, 0.5 / h], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    torch.testing.assert_close(ms_deform_attn_sample(value, shapes, loc, ones * 0.25)[0, 0], pix[0, 0] * 0.25)


def test_sample_gradients_flow_gradcheck():
    value, shapes, loc, attn = _random_case(2, b=1, q=2, m=2, d=2, shapes=((2, 3), (1, 2)), p=2)
    # finite differences need points away from the kinks: integer pixel-centre coordinates (also just outside)
    frac = torch.stack([loc[..., 0, :, :, 0] * 3, loc[..., 1, :, :, 0] * 2], dim=-3)  # x in pixel units
    fy = torch.stack([loc[..., 0, :, :, 1] * 2, loc[..., 1, :, :, 1] * 1], dim=-3)
    for c in (frac, fy):
        dist = ((c - 0.5) - torch.round(c - 0.5)).abs()
        assert dist.min() > 1e-3, "pick another seed: a point sits on a kink"
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn_sample(v, shapes, lo, a), (value, loc, attn), eps=1e-6, atol=1e-6
    )
    out = ms_deform_attn_sample(value, shapes, loc, attn)
    out.square().sum().backward()
    for t in (value, loc, attn):
        assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("what", ["value_dims", "locations_dims", "heads", "levels", "batch", "weights", "total",
                                  "shapes_float", "shapes_dims", "shapes_zero"])
def test_sample_shape_errors(what):
    value, shapes, loc, attn = _random_case(3, b=1, q=2, m=2, d=2, shapes=((2, 3), (1, 2)), p=2)
    if what == "value_dims":
        value = value.flatten(2)
    elif what == "locations_dims":
        loc = loc[..., 0]
    elif what == "heads":
        value = torch.cat([value, value[:, :, :1]], dim=2)
    elif what == "levels":
        shapes = shapes[:1]
    elif what == "batch":
        value = torch.cat([value, value])
    elif what == "weights":
        attn = attn[..., :1]
    elif what == "total":
        value = value[:, :-1]
    elif what == "shapes_float":
        shapes = shapes.double()
    elif what == "shapes_dims":
        shapes = shapes.flatten()
    elif what == "shapes_zero":
        shapes = torch.tensor([[2, 3], [0, 2]])
    with pytest.raises(ValueError):
        ms_deform_attn_sample(value, shapes, loc, attn)


# ---------------------------------------------------------------------------------- MSDeformAttn

_SHAPES = torch.tensor([[4, 6], [2, 3]])  # S = 30


def _module_inputs(seed, b=2, q=5, c=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, q, c, generator=g, dtype=dtype)
    ref = torch.rand(b, q, 2, 2, generator=g, dtype=dtype)
    value_in = torch.randn(b, 30, c, generator=g, dtype=dtype)
    return query, ref, value_in


def test_module_output_shape_and_init():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    query, ref, value_in = _module_inputs(0, dtype=torch.float32)
    out = attn(query, ref, value_in, _SHAPES)
    assert out.shape == (2, 5, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()

    grid = attn.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    torch.testing.assert_close(grid[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(grid[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)  # 90 degrees
    torch.testing.assert_close(grid[2, 1, 2], torch.tensor([-3.0, 0.0]), atol=1e-6, rtol=0)  # 180 deg, point 3
    torch.testing.assert_close(grid.abs().amax(-1), torch.arange(1.0, 4.0).expand(4, 2, 3))  # max(|x|,|y|) = k+1
    torch.testing.assert_close(grid[:, 0], grid[:, 1])  # same grid on every level
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    for lin in (attn.value_proj, attn.output_proj):
        assert lin.bias.abs().sum() == 0 and lin.weight.abs().sum() > 0
        bound = math.sqrt(6.0 / (16 + 16))  # xavier-uniform
        assert lin.weight.abs().max() <= bound

    # 8 heads on the unit square: head 1 points at 45 degrees -> (1, 1)
    grid8 = MSDeformAttn(d_model=16, n_levels=1, n_heads=8, n_points=1).sampling_offsets.bias.detach().view(8, 2)
    torch.testing.assert_close(grid8[1], torch.tensor([1.0, 1.0]))


def test_module_matches_eq3_with_offsets_in_level_pixels():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).double()
    with torch.no_grad():  # non-trivial offsets and attention, so the per-level (W, H) scaling matters
        for lin in (attn.sampling_offsets, attn.attention_weights):
            lin.weight.normal_(0, 0.5)
            lin.bias.normal_(0, 1.0)
    query, ref, value_in = _module_inputs(1, b=2, q=3, c=8)
    out = attn(query, ref, value_in, _SHAPES)

    value = attn.value_proj(value_in).view(2, 30, 2, 4)
    off = attn.sampling_offsets(query).view(2, 3, 2, 2, 2, 2)
    wts = attn.attention_weights(query).view(2, 3, 2, 4).softmax(-1).view(2, 3, 2, 2, 2)
    loc = ref[:, :, None, :, None, :].expand(2, 3, 2, 2, 2, 2).clone()
    for lvl, (h, w) in enumerate(_SHAPES.tolist()):
        loc[..., lvl, :, 0] += off[..., lvl, :, 0] / w
        loc[..., lvl, :, 1] += off[..., lvl, :, 1] / h
    ref_out = attn.output_proj(_naive_sample(value.detach(), _SHAPES, loc.detach(), wts.detach()))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)


def test_module_padding_mask_zeroes_padded_values():
    torch.manual_seed(1)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3).double()
    with torch.no_grad():
        attn.value_proj.bias.normal_()  # a padded position would otherwise still leak the bias
    query, ref, value_in = _module_inputs(2)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, 3 * 6:4 * 6] = True  # last row of level 0
    mask[1, 24:] = True  # all of level 1
    changed = value_in.clone()
    changed[mask] = torch.randn(int(mask.sum()), 16, dtype=torch.float64) * 10

    out = attn(query, ref, value_in, _SHAPES, padding_mask=mask)
    assert torch.equal(out, attn(query, ref, changed, _SHAPES, padding_mask=mask))
    # without the mask the padded values are sampled (so the check above is not vacuous) ...
    assert not torch.allclose(attn(query, ref, value_in, _SHAPES), attn(query, ref, changed, _SHAPES))
    # ... and masking equals zeroing the projected values there
    zeroed = attn.value_proj(value_in).masked_fill(mask[..., None], 0.0).view(2, 30, 4, 4)
    off = attn.sampling_offsets(query).view(2, 5, 4, 2, 3, 2)
    wts = attn.attention_weights(query).view(2, 5, 4, 6).softmax(-1).view(2, 5, 4, 2, 3)
    wh = torch.tensor([[6.0, 4.0], [3.0, 2.0]], dtype=torch.float64)
    loc = ref[:, :, None, :, None, :] + off / wh[:, None, :]
    torch.testing.assert_close(out, attn.output_proj(ms_deform_attn_sample(zeroed, _SHAPES, loc, wts)))


def test_module_gradients_reach_all_parameters():
    torch.manual_seed(2)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3).double()
    query, ref, value_in = _module_inputs(3)
    query.requires_grad_(True)
    ref.requires_grad_(True)
    attn(query, ref, value_in, _SHAPES).square().sum().backward()
    # at init the offset/attention weights are 0, but their gradients are not
    for name, prm in attn.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    assert ref.grad.abs().sum() > 0
    assert query.grad.abs().sum() == 0  # the query only acts through those zero-initialised weights
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.1)
    query.grad = None
    attn(query, ref, value_in, _SHAPES).square().sum().backward()
    assert query.grad.abs().sum() > 0


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    for kwargs in ({"n_levels": 0}, {"n_points": -1}, {"d_model": 0}, {"n_heads": 2.0}):
        with pytest.raises(ValueError):
            MSDeformAttn(**kwargs)


@pytest.mark.parametrize("what", ["S", "levels", "ref_shape", "query_channels", "value_channels", "batch",
                                  "mask_dtype", "mask_shape", "shapes_float"])
def test_module_forward_errors(what):
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3).double()
    query, ref, value_in = _module_inputs(4)
    shapes, mask = _SHAPES, None
    if what == "S":
        value_in = value_in[:, :-1]
    elif what == "levels":
        shapes = torch.tensor([[4, 6], [2, 3], [1, 1]])
        value_in = torch.cat([value_in, value_in[:, :1]], dim=1)
    elif what == "ref_shape":
        ref = ref[:, :, :1]
    elif what == "query_channels":
        query = query[..., :8]
    elif what == "value_channels":
        value_in = value_in[..., :8]
    elif what == "batch":
        value_in = value_in[:1]
    elif what == "mask_dtype":
        mask = torch.zeros(2, 30)
    elif what == "mask_shape":
        mask = torch.zeros(2, 29, dtype=torch.bool)
    elif what == "shapes_float":
        shapes = _SHAPES.float()
    with pytest.raises(ValueError):
        attn(query, ref, value_in, shapes, padding_mask=mask)
