"""Mask2Former network of Box2Mask-T (methods.md §4.1, §4.4): shapes of every prediction set, gradients to
every parameter, masked attention, instance inference."""

import dataclasses

import pytest
import torch

from boxmask.config import ModelConfig
from boxmask.modeling.mask2former import (Mask2Former, Mask2FormerConfig, MaskedDecoderLayer,
                                          attention_mask_from_logits, sine_position_encoding)
from boxmask.structures import InstancePredictions, QueryOutputs

TINY_M2F = Mask2FormerConfig(hidden_dim=32, num_queries=4, encoder_layers=2, encoder_ffn=64, decoder_layers=3,
                             decoder_ffn=64, heads=4, n_points=2, mask_dim=16, level_set_channels=1)
B, HP, WP, C = 2, 64, 96, 3


def tiny_model(**model_overrides) -> Mask2Former:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(), backbone="efficientnet_lite0", backbone_weights="none",
                              **model_overrides)
    return Mask2Former(cfg, C, TINY_M2F)


def images(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, HP, WP), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_config_defaults_and_validation():
    d = Mask2FormerConfig()
    assert (d.hidden_dim, d.num_queries, d.encoder_layers, d.encoder_ffn, d.decoder_layers, d.decoder_ffn, d.heads,
            d.n_points, d.n_levels, d.mask_dim, d.level_set_channels, d.dropout) == (
        256, 100, 6, 1024, 9, 2048, 8, 4, 3, 256, 1, 0.0)
    d.validate()
    for bad, match in [({"hidden_dim": 48}, "multiple of 32"), ({"heads": 3}, "divisible by heads"),
                       ({"num_queries": 0}, "num_queries"), ({"n_levels": 4}, "n_levels"),
                       ({"level_set_channels": -1}, "level_set_channels"), ({"dropout": 1.0}, "dropout"),
                       ({"decoder_layers": 2.5}, "decoder_layers")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(d, **bad).validate()
    with pytest.raises(ValueError, match="num_classes"):
        Mask2Former(dataclasses.replace(ModelConfig(), backbone="efficientnet_lite0", backbone_weights="none"), 0,
                    TINY_M2F)


def test_sine_position_encoding():
    pos = sine_position_encoding(3, 5, 8)
    assert pos.shape == (8, 3, 5)
    # first half encodes the row only, second half the column only
    assert torch.allclose(pos[:4, :, 0:1].expand(-1, -1, 5), pos[:4])
    assert torch.allclose(pos[4:, 0:1, :].expand(-1, 3, -1), pos[4:])
    assert not torch.allclose(pos[:4, 0], pos[:4, 1])
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_position_encoding(2, 2, 6)


def test_forward_train_shapes(model):
    model.train()
    out = model.forward_train(images(), [torch.zeros(0, 4)] * B, [torch.zeros(0, dtype=torch.int64)] * B)
    assert isinstance(out, QueryOutputs)
    assert len(out) == 1 + TINY_M2F.decoder_layers == len(out.mask_logits)
    for cls, masks in zip(out.class_logits, out.mask_logits):
        assert cls.shape == (B, TINY_M2F.num_queries, C + 1)
        assert masks.shape == (B, TINY_M2F.num_queries, HP // 4, WP // 4)
        assert torch.isfinite(cls).all() and torch.isfinite(masks).all()
    assert out.stride == model.mask_out_stride == 4
    assert out.level_set_feats.shape == (B, 1, HP // 4, WP // 4)
    assert out.anchor.dtype == torch.float32 and out.anchor.dim() == 0 and out.anchor.item() == 0.0
    # the sets differ: each decoder layer changes the queries
    assert not torch.allclose(out.mask_logits[0], out.mask_logits[-1])


def test_decoder_levels_round_robin_coarsest_first(model):
    seen = []
    hooks = [layer.cross_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[1].shape[1], tuple(kwargs["attn_mask"].shape))), with_kwargs=True)
        for layer in model.decoder.layers]
    try:
        model.forward_train(images(), [], [])
    finally:
        for h in hooks:
            h.remove()
    q, m = TINY_M2F.num_queries, TINY_M2F.heads
    # strides 32, 16, 8 of a 64x96 input: 2x3, 4x6, 8x12 keys
    assert seen == [(s, (B * m, q, s)) for s in (6, 24, 96)]


def test_no_level_set_head():
    model = Mask2Former(dataclasses.replace(ModelConfig(), backbone="efficientnet_lite0", backbone_weights="none"),
                        C, dataclasses.replace(TINY_M2F, level_set_channels=0, n_levels=2))
    assert model.level_set_head is None
    out = model.forward_train(images(), [], [])
    assert out.level_set_feats is None and len(out) == 4


def test_gradients_reach_every_parameter():
    model = tiny_model()
    model.train()
    out = model.forward_train(images(), [], [])
    loss = out.anchor + out.level_set_feats.mean()
    for cls, masks in zip(out.class_logits, out.mask_logits):
        loss = loss + cls.logsumexp(-1).mean() + masks.sigmoid().mean()
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(params) > 50
    missing = [n for n, p in params if p.grad is None]
    assert not missing, missing
    # the sampling offsets of the deformable attention and the query embeddings actually learn
    assert model.pixel_decoder.layers[0].attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert model.decoder.query_embed.weight.grad.abs().sum() > 0
    # anchor alone reaches every head too
    model.zero_grad(set_to_none=True)
    model.forward_train(images(), [], []).anchor.backward()
    assert all(p.grad is not None for _, p in params)


def test_attention_mask_rule():
    logits = torch.full((1, 2, 4, 4), -3.0)
    logits[0, 1, :2] = 3.0  # query 1: top half positive; query 0: all negative
    mask = attention_mask_from_logits(logits, (2, 2), heads=3)
    assert mask.shape == (3, 2, 4) and mask.dtype == torch.bool
    assert not mask[:, 0].any()  # would mask everything -> attends everywhere
    assert (mask[:, 1] == torch.tensor([False, False, True, True])).all()  # sigmoid < 0.5 is masked
    # heads layout: rows b*heads + m
    logits2 = torch.cat([logits, -logits], 0)
    mask2 = attention_mask_from_logits(logits2, (2, 2), heads=3)
    assert (mask2[:3] == mask).all() and (mask2[3:, 1] == torch.tensor([True, True, False, False])).all()


def test_masked_cross_attention_restricts_and_never_nans():
    torch.manual_seed(0)
    layer = MaskedDecoderLayer(16, 32, heads=2).eval()
    tgt, qpos = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    mem, pos = torch.randn(1, 10, 16), torch.randn(1, 10, 16)
    logits = torch.full((1, 3, 2, 5), -1.0)
    logits[0, 0, 0, :2] = 1.0  # query 0 sees keys 0, 1
    logits[0, 1, 1] = 1.0  # query 1 sees keys 5..9
    # query 2 all negative: sees everything
    mask = attention_mask_from_logits(logits, (2, 5), heads=2)
    ref = layer.cross(tgt, mem, mask, pos, qpos)
    assert torch.isfinite(ref).all()
    mem2, pos2 = mem.clone(), pos.clone()
    mem2[0, 2:5] += torch.randn(3, 16) * 5  # outside both query 0's and query 1's masks
    pos2[0, 2:5] += torch.randn(3, 16) * 5
    changed = layer.cross(tgt, mem2, mask, pos2, qpos)
    assert torch.allclose(changed[0, :2], ref[0, :2], atol=1e-6)
    assert not torch.allclose(changed[0, 2], ref[0, 2], atol=1e-3)  # the unmasked query does see them
    mem3 = mem.clone()
    mem3[0, 0] += 5.0  # inside query 0's mask
    assert not torch.allclose(layer.cross(tgt, mem3, mask, pos, qpos)[0, 0], ref[0, 0], atol=1e-3)
    # an all-negative previous mask is the same as no mask at all
    assert torch.allclose(ref[0, 2], layer.cross(tgt, mem, None, pos, qpos)[0, 2], atol=1e-6)


def test_all_negative_masks_in_the_full_model_give_no_nan():
    model = tiny_model()
    with torch.no_grad():  # every mask logit = -mask_dim < 0: every query would mask everything
        model.pixel_decoder.mask_features.weight.zero_()
        model.pixel_decoder.mask_features.bias.fill_(1.0)
        model.decoder.mask_embed[-1].weight.zero_()
        model.decoder.mask_embed[-1].bias.fill_(-1.0)
    out = model.forward_train(images(), [], [])
    assert (out.mask_logits[0] < 0).all()
    assert all(torch.isfinite(c).all() for c in out.class_logits)


def test_predict():
    model = tiny_model(max_detections=5, score_threshold=0.0).eval()
    sizes, origs = [(60, 90), (64, 70)], [(120, 180), (33, 35)]
    preds = model.predict(images(), sizes, origs)
    assert len(preds) == B
    for p, (oh, ow) in zip(preds, origs):
        assert isinstance(p, InstancePredictions)
        n = len(p.scores)
        assert n == 5  # threshold 0 keeps all k = min(5, Q*C) pairs
        assert p.masks.shape == (n, oh, ow) and p.masks.dtype == torch.bool
        assert p.boxes.shape == (n, 4) and p.boxes.dtype == torch.float32
        assert p.labels.dtype == torch.int64 and ((p.labels >= 0) & (p.labels < C)).all()
        assert ((p.scores >= 0) & (p.scores <= 1)).all()
        assert (p.scores[:-1] >= p.scores[1:]).all()
        for box, m in zip(p.boxes, p.masks):
            if not m.any():
                assert (box == 0).all()
                continue
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box[0] == xs.min() and box[1] == ys.min() and box[2] == xs.max() + 1 and box[3] == ys.max() + 1
    # deterministic in eval mode
    again = model.predict(images(), sizes, origs)
    for p, q in zip(preds, again):
        assert torch.equal(p.scores, q.scores) and torch.equal(p.masks, q.masks) and torch.equal(p.labels, q.labels)


def test_predict_scores_follow_the_mask2former_rule():
    model = tiny_model(max_detections=100, score_threshold=0.0).eval()
    imgs = images()
    preds = model.predict(imgs, [(HP, WP)] * B, [(HP, WP)] * B)
    f = model.features(imgs)
    probs = f.class_logits[-1].softmax(-1)[..., :C]
    k = TINY_M2F.num_queries * C
    for b, p in enumerate(preds):
        assert len(p.scores) == k  # max_detections > Q*C: every pair
        up = torch.nn.functional.interpolate(f.mask_logits[-1][b:b + 1], size=(HP, WP), mode="bilinear",
                                             align_corners=False)[0]
        binary = up > 0
        inside = (up.sigmoid() * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
        expected = (probs[b] * inside[:, None]).flatten().sort(descending=True).values
        assert torch.allclose(p.scores, expected, atol=1e-5)
    # a threshold drops low scores
    model.cfg = dataclasses.replace(model.cfg, score_threshold=float(preds[0].scores[3]) + 1e-6)
    assert len(model.predict(imgs, [(HP, WP)] * B, [(HP, WP)] * B)[0].scores) <= 3


def test_largest_component_op():
    from boxmask.ops import largest_component

    m = torch.zeros(4, 6, 8, dtype=torch.bool)
    m[0, 0:2, 0:2] = True          # 4 px
    m[0, 3:6, 4:7] = True          # 9 px: kept
    m[1, 1, 1] = m[1, 2, 2] = True  # diagonal neighbours: one 8-connected component, unchanged
    m[2, 2:4, 2:5] = True          # a single component, unchanged; m[3] empty, unchanged
    out = largest_component(m)
    assert out.dtype == torch.bool and out.shape == m.shape
    expected0 = torch.zeros(6, 8, dtype=torch.bool)
    expected0[3:6, 4:7] = True
    assert torch.equal(out[0], expected0)
    assert torch.equal(out[1:], m[1:])
    assert largest_component(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 5, 5)
    with pytest.raises(ValueError, match="bool"):
        largest_component(m.float())


def test_predict_largest_component_drops_the_far_blob(monkeypatch):
    """One query, two blobs: the flag keeps the larger one; score and box follow the kept mask."""
    model = tiny_model(max_detections=1, score_threshold=0.0).eval()
    q, h4, w4 = TINY_M2F.num_queries, HP // 4, WP // 4
    logits = torch.full((1, q, h4, w4), -10.0)
    logits[0, 0, 2:6, 2:6] = 4.0     # 16 cells, sigmoid ~0.98
    logits[0, 0, 10:12, 18:20] = 1.0  # 4 cells, sigmoid ~0.73
    cls = torch.full((1, q, C + 1), -10.0)
    cls[0, 0, 1] = 10.0
    feats = model.features(images()[:1])
    fake = dataclasses.replace(feats, class_logits=[cls], mask_logits=[logits])
    monkeypatch.setattr(model, "features", lambda imgs: fake)
    size = [(HP, WP)]
    both = model.predict(images()[:1], size, size)[0]
    model.cfg = dataclasses.replace(model.cfg, mask_largest_component=True)
    one = model.predict(images()[:1], size, size)[0]
    assert both.labels.tolist() == one.labels.tolist() == [1]
    far = both.masks[0, 40:48, 72:80]
    assert far.any() and not one.masks[0, 40:48, 72:80].any()  # the far blob is gone
    assert torch.equal(one.masks[0, :32], both.masks[0, :32])  # the large blob is kept as it was
    ys, xs = torch.nonzero(one.masks[0], as_tuple=True)
    assert one.boxes[0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert both.boxes[0, 2] > one.boxes[0, 2] + 40  # the box of both blobs reaches the far one
    assert one.scores[0] > both.scores[0]  # the weaker blob no longer lowers the mean probability inside
