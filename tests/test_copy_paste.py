"""Tests for boxmask.supervision.copy_paste: SIM memory bank, instance selection and pasting (§5.6)."""

from __future__ import annotations

import io

import pytest
import torch

from boxmask.supervision.copy_paste import (
    MemoryBank,
    PasteEntry,
    box_masks_full_res,
    paste_entry,
    paste_masks_and_scores,
    paste_instances,
    select_instances,
)

torch.set_num_threads(1)

H, W = 10, 12


def _image(seed: int, h: int = H, w: int = W) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _rect(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """bool [h, w] with rows r0..r1-1 and cols c0..c1-1 set."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def _entry(seed: int, n: int = 2, h: int = H, w: int = W) -> PasteEntry:
    g = torch.Generator().manual_seed(seed)
    return PasteEntry(
        image=_image(seed, h, w),
        masks=torch.rand(n, h, w, generator=g) > 0.5,
        labels=torch.arange(n) + seed,
        scores=torch.rand(n, generator=g),
    )


# ---------------------------------------------------------------- box masks


def test_box_masks_full_res_pixel_convention():
    boxes = torch.tensor([[1.0, 2.0, 4.0, 5.0],      # integer: cols 1..3, rows 2..4
                          [0.5, 1.2, 2.5, 3.0],      # fractional: cols 0..2, rows 1..2
                          [9.0, 8.0, 20.0, 30.0],    # clipped to the grid
                          [3.0, 3.0, 3.0, 6.0]])     # zero width: empty
    m = box_masks_full_res(boxes, (H, W))
    assert m.dtype == torch.bool and m.shape == (4, H, W)
    assert torch.equal(m[0], _rect(H, W, (2, 5), (1, 4)))
    assert torch.equal(m[1], _rect(H, W, (1, 3), (0, 3)))
    assert torch.equal(m[2], _rect(H, W, (8, 10), (9, 12)))
    assert not m[3].any()
    with pytest.raises(ValueError, match="boxes must be"):
        box_masks_full_res(torch.zeros(2, 5), (H, W))


# ---------------------------------------------------------------- pasting


def test_fully_covered_object_is_dropped_partly_covered_box_shrinks():
    image, src_image = _image(0), _image(1)
    boxes = torch.tensor([[2.0, 2.0, 5.0, 5.0],     # A: rows 2..4, cols 2..4
                          [6.0, 1.0, 11.0, 8.0]])   # B: rows 1..7, cols 6..10
    labels = torch.tensor([3, 7])
    box_masks = box_masks_full_res(boxes, (H, W))
    # one paste covers A completely (rows 1..6, cols 1..6) and B's columns 6 (rows 1..6 of 1..7: partial),
    # a second one covers B's right part, columns 9..11 over all rows
    p0 = _rect(H, W, (1, 7), (1, 7))
    p1 = _rect(H, W, (0, H), (9, 12))
    res = paste_instances(image, boxes, labels, box_masks, src_image, torch.stack([p0, p1]), torch.tensor([5, 9]))

    assert torch.equal(res.kept, torch.tensor([1]))           # A dropped
    assert torch.equal(res.src_kept, torch.tensor([0, 1]))
    assert torch.equal(res.labels, torch.tensor([7, 5, 9]))
    assert torch.equal(res.pasted, torch.tensor([False, True, True]))
    # B's visible part: cols 6..8 minus (rows 1..6, col 6) -> col 6 only at row 7; cols 7..8 rows 1..7
    expected_b = _rect(H, W, (1, 8), (6, 11)) & ~p0 & ~p1
    assert torch.equal(res.masks[0], expected_b)
    assert res.boxes[0].tolist() == [6.0, 1.0, 9.0, 8.0]      # hand-computed tight box, x2 = last col + 1
    # pasted boxes: p0 is not covered by p1 (cols 1..6 vs 9..11)
    assert res.boxes[1].tolist() == [1.0, 1.0, 7.0, 7.0]
    assert res.boxes[2].tolist() == [9.0, 0.0, 12.0, 10.0]
    assert torch.equal(res.masks[1], p0) and torch.equal(res.masks[2], p1)
    assert res.boxes.dtype == torch.float32 and res.labels.dtype == torch.int64
    assert res.masks.dtype == torch.bool and res.masks.shape == (3, H, W)


def test_image_pixels_under_paste_equal_source_elsewhere_unchanged():
    image, src_image = _image(2), _image(3)
    image_before, src_before = image.clone(), src_image.clone()
    g = torch.Generator().manual_seed(0)
    src_masks = torch.rand(3, H, W, generator=g) > 0.7
    boxes = torch.tensor([[0.0, 0.0, 6.0, 6.0]])
    res = paste_instances(image, boxes, torch.tensor([1]), None, src_image, src_masks, torch.tensor([0, 1, 2]))
    union = src_masks.any(0)
    assert union.any() and (~union).any()
    assert torch.equal(res.image[:, union], src_image[:, union])
    assert torch.equal(res.image[:, ~union], image[:, ~union])
    # inputs untouched
    assert torch.equal(image, image_before) and torch.equal(src_image, src_before)


def test_partial_cover_of_box_corner_keeps_box_but_not_mask():
    image, src_image = _image(4), _image(5)
    boxes = torch.tensor([[6.0, 1.0, 11.0, 8.0]])
    corner = _rect(H, W, (0, 3), (5, 8))  # covers rows 1..2 x cols 6..7 of the box
    res = paste_instances(image, boxes, torch.tensor([0]), None, src_image, corner[None], torch.tensor([1]))
    assert res.boxes[0].tolist() == [6.0, 1.0, 11.0, 8.0]
    assert int(res.masks[0].sum()) == 5 * 7 - 2 * 2


def test_fractional_box_keeps_unoccluded_subpixel_edges():
    image, src_image = _image(6), _image(7)
    boxes = torch.tensor([[2.5, 1.25, 8.75, 6.5]])   # box mask: cols 2..8, rows 1..6
    paste = _rect(H, W, (0, H), (6, 12))             # occludes cols 6..11
    res = paste_instances(image, boxes, torch.tensor([0]), None, src_image, paste[None], torch.tensor([1]))
    assert res.boxes[0].tolist() == [2.5, 1.25, 6.0, 6.5]
    # an untouched box is returned unchanged
    res2 = paste_instances(image, boxes, torch.tensor([0]), None, src_image, _rect(H, W, (8, 10), (0, 2))[None],
                           torch.tensor([1]))
    assert res2.boxes[0].tolist() == [2.5, 1.25, 8.75, 6.5]
    assert torch.equal(res2.masks[0], box_masks_full_res(boxes, (H, W))[0])


def test_later_pastes_occlude_earlier_ones_and_duplicates_collapse():
    image, src_image = _image(8), _image(9)
    boxes = torch.zeros(0, 4)
    p0 = _rect(H, W, (0, 4), (0, 4))
    p1 = _rect(H, W, (2, 6), (0, 6))   # covers p0's rows 2..3
    res = paste_instances(image, boxes, torch.zeros(0, dtype=torch.int64), None, src_image,
                          torch.stack([p0, p1]), torch.tensor([4, 6]))
    assert res.boxes.tolist() == [[0.0, 0.0, 4.0, 2.0], [0.0, 2.0, 6.0, 6.0]]
    assert torch.equal(res.masks[0], _rect(H, W, (0, 2), (0, 4)))
    assert res.pasted.all() and res.kept.numel() == 0
    # the same instance drawn twice (sampling with replacement) -> a single pasted object
    res = paste_instances(image, boxes, torch.zeros(0, dtype=torch.int64), None, src_image,
                          torch.stack([p0, p1, p0]), torch.tensor([4, 6, 4]))
    assert torch.equal(res.src_kept, torch.tensor([1, 2]))
    assert res.boxes.tolist() == [[0.0, 2.0, 6.0, 6.0], [0.0, 0.0, 4.0, 4.0]]
    assert torch.equal(res.labels, torch.tensor([6, 4]))


def test_no_source_instances_is_identity():
    image, src_image = _image(10), _image(11)
    boxes = torch.tensor([[1.0, 1.0, 5.0, 4.0], [3.0, 2.0, 9.0, 9.0]])
    res = paste_instances(image, boxes, torch.tensor([1, 2]), None, src_image,
                          torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))
    assert torch.equal(res.image, image)
    assert torch.equal(res.boxes, boxes)
    assert torch.equal(res.kept, torch.tensor([0, 1])) and not res.pasted.any()


def test_min_area_drops_small_remainders():
    image, src_image = _image(12), _image(13)
    boxes = torch.tensor([[0.0, 0.0, 3.0, 1.0]])     # 3 pixels: row 0, cols 0..2
    paste = _rect(H, W, (0, 3), (0, 1))              # 3 pixels (col 0, rows 0..2), covers one of them
    args = (image, boxes, torch.tensor([0]), None, src_image, paste[None], torch.tensor([1]))
    res = paste_instances(*args, min_area=2)
    assert res.kept.tolist() == [0] and res.boxes[0].tolist() == [1.0, 0.0, 3.0, 1.0]
    res = paste_instances(*args, min_area=3)        # 2 remaining pixels < 3: dropped; the paste stays
    assert res.kept.numel() == 0 and res.src_kept.tolist() == [0]
    assert res.boxes.tolist() == [[0.0, 0.0, 1.0, 3.0]]


def test_min_area_applies_to_pasted_objects_too():
    image, src_image = _image(14), _image(15)
    tiny = _rect(H, W, (5, 6), (5, 7))               # 2 pixels
    res = paste_instances(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), None, src_image,
                          tiny[None], torch.tensor([1]), min_area=3)
    assert res.src_kept.numel() == 0 and res.masks.shape == (0, H, W)
    # the pixels are pasted nevertheless
    assert torch.equal(res.image[:, tiny], src_image[:, tiny])


@pytest.mark.parametrize("src_hw", [(14, 16), (6, 8), (12, 9)])
def test_source_of_other_size_is_anchored_top_left_and_cropped(src_hw):
    hs, ws = src_hw
    image, src_image = _image(16), _image(17, hs, ws)
    # one instance straddling the target's bottom-right border (if the source is larger), one in the
    # source's last row (outside the target when the source is taller)
    inst = torch.zeros(2, hs, ws, dtype=torch.bool)
    inst[0, 3:hs, 4:ws] = True
    inst[1, hs - 1, 0] = True
    res = paste_instances(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), None, src_image,
                          inst, torch.tensor([1, 2]))
    ch, cw = min(H, hs), min(W, ws)
    expected0 = torch.zeros(H, W, dtype=torch.bool)
    expected0[3:ch, 4:cw] = True
    assert torch.equal(res.masks[0], expected0)
    assert res.boxes[0].tolist() == [4.0, 3.0, float(cw), float(ch)]
    inside = hs <= H
    assert res.src_kept.tolist() == ([0, 1] if inside else [0])   # cropped-away instance dropped
    union = res.masks.any(0)
    assert torch.equal(res.image[:, union], src_image[:, :ch, :cw][:, union[:ch, :cw]])
    assert torch.equal(res.image[:, ~union], image[:, ~union])


def test_paste_instances_errors():
    image, src = _image(18), _image(19)
    boxes, labels = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([1])
    bm = box_masks_full_res(boxes, (H, W))
    sm, sl = torch.zeros(1, H, W, dtype=torch.bool), torch.tensor([2])
    with pytest.raises(ValueError, match="image must be uint8"):
        paste_instances(image.float(), boxes, labels, bm, src, sm, sl)
    with pytest.raises(ValueError, match=r"image must be \[3, H, W\]"):
        paste_instances(image[:2], boxes, labels, bm, src, sm, sl)
    with pytest.raises(ValueError, match="boxes must be"):
        paste_instances(image, boxes[:, :3], labels, bm, src, sm, sl)
    with pytest.raises(ValueError, match="labels must be"):
        paste_instances(image, boxes, torch.tensor([1, 2]), bm, src, sm, sl)
    with pytest.raises(ValueError, match="box_masks must be"):
        paste_instances(image, boxes, labels, bm[:, :-1], src, sm, sl)
    with pytest.raises(ValueError, match="box_masks must be bool"):
        paste_instances(image, boxes, labels, bm.float(), src, sm, sl)
    with pytest.raises(ValueError, match="box_masks has 2 objects"):
        paste_instances(image, boxes, labels, bm.repeat(2, 1, 1), src, sm, sl)
    with pytest.raises(ValueError, match="src_masks must be"):
        paste_instances(image, boxes, labels, bm, _image(20, 8, 8), sm, sl)
    with pytest.raises(ValueError, match="src_labels must be"):
        paste_instances(image, boxes, labels, bm, src, sm, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer dtype"):
        paste_instances(image, boxes, labels, bm, src, sm, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="min_area"):
        paste_instances(image, boxes, labels, bm, src, sm, sl, min_area=0)


# ---------------------------------------------------------------- entries and bank


def test_paste_entry_validation_and_nbytes():
    e = PasteEntry(_image(0), torch.zeros(4, H, W, dtype=torch.bool), torch.arange(4, dtype=torch.int32),
                   torch.rand(4, dtype=torch.float64))
    assert e.labels.dtype == torch.int64 and e.scores.dtype == torch.float32
    assert e.num_instances == 4
    assert e.nbytes == (3 + 4) * H * W + 4 * 8 + 4 * 4
    with pytest.raises(ValueError, match="image must be uint8"):
        PasteEntry(_image(0).float(), e.masks, e.labels, e.scores)
    with pytest.raises(ValueError, match="masks must be"):
        PasteEntry(_image(0), e.masks[:, :, :-1], e.labels, e.scores)
    with pytest.raises(ValueError, match="masks must be bool"):
        PasteEntry(_image(0), e.masks.float(), e.labels, e.scores)
    with pytest.raises(ValueError, match="labels must be"):
        PasteEntry(_image(0), e.masks, e.labels[:3], e.scores)
    with pytest.raises(ValueError, match="scores must be"):
        PasteEntry(_image(0), e.masks, e.labels, e.scores[:, None])
    with pytest.raises(ValueError, match="scores must have a float dtype"):
        PasteEntry(_image(0), e.masks, e.labels, e.labels)


def _entry_from_probs(image, probs, box_masks, labels, max_instances=None):
    return paste_entry(image, *paste_masks_and_scores(probs, box_masks), labels, max_instances)


def test_paste_entry_from_teacher_probabilities():
    probs = torch.zeros(3, H, W)
    probs[0, 0:4, 0:4] = 0.9
    probs[0, 0:2, 0:2] = 0.8
    probs[0, 5:8, 5:8] = 0.95                         # outside instance 0's box: ignored
    probs[1] = 0.6                                    # never above 0.7: dropped
    probs[2, 2:3, 2:5] = 1.0
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 12.0, 10.0], [0.0, 0.0, 12.0, 10.0]])
    e = _entry_from_probs(_image(1), probs, box_masks_full_res(boxes, (H, W)), torch.tensor([5, 6, 7]))
    # the non-empty instances, highest score first
    assert e.labels.tolist() == [7, 5]
    assert torch.equal(e.masks[0], _rect(H, W, (2, 3), (2, 5)))
    assert torch.equal(e.masks[1], _rect(H, W, (0, 4), (0, 4)))
    assert e.scores[0].item() == pytest.approx(1.0)
    assert e.scores[1].item() == pytest.approx((12 * 0.9 + 4 * 0.8) / 16)
    # at most max_instances, the best ones; nothing left -> no entry
    one = _entry_from_probs(_image(1), probs, box_masks_full_res(boxes, (H, W)), torch.tensor([5, 6, 7]), 1)
    assert one.labels.tolist() == [7]
    assert _entry_from_probs(_image(1), probs[1:2], box_masks_full_res(boxes[1:2], (H, W)), torch.tensor([6])) is None
    with pytest.raises(ValueError, match="scores must be"):
        paste_entry(_image(1), torch.zeros(2, H, W, dtype=torch.bool), torch.zeros(3), torch.tensor([0, 1]))


def test_bank_fifo_order_capacity_and_copy():
    bank = MemoryBank(capacity=3)
    assert len(bank) == 0 and not bank.full
    entries = [_entry(i) for i in range(5)]
    for i, e in enumerate(entries):
        bank.push(e)
        assert len(bank) == min(i + 1, 3)
    assert bank.full
    assert [int(e.labels[0]) for e in bank.entries] == [2, 3, 4]      # oldest first, 0 and 1 evicted
    for stored, orig in zip(bank.entries, entries[2:]):
        assert torch.equal(stored.image, orig.image) and torch.equal(stored.masks, orig.masks)
        assert stored.image.device.type == "cpu"
        assert stored.image.data_ptr() != orig.image.data_ptr()
    # a copy: in-place changes of the pushed tensors do not reach the bank
    entries[4].image.zero_()
    entries[4].masks.fill_(True)
    assert bank.entries[-1].image.any() and not bank.entries[-1].masks.all()
    with pytest.raises(ValueError, match="capacity"):
        MemoryBank(0)
    with pytest.raises(TypeError):
        bank.push({"image": _image(0)})


def test_bank_push_copies_batch_views_independently():
    # SIM code quirk: the same dict appended for every image of a batch -> identical entries
    batch = torch.stack([_image(0), _image(1)])
    masks = torch.zeros(2, 1, H, W, dtype=torch.bool)
    bank = MemoryBank(4)
    for b in range(2):
        bank.push(PasteEntry(batch[b], masks[b], torch.tensor([b]), torch.tensor([0.9])))
    a, b = bank.entries
    assert torch.equal(a.image, batch[0]) and torch.equal(b.image, batch[1])
    assert a.image.untyped_storage().nbytes() == 3 * H * W     # not the whole batch storage


def test_bank_nbytes_bounded():
    cap, n, h, w = 4, 3, 16, 20
    bank = MemoryBank(cap)
    bound = cap * ((3 + n) * h * w + 12 * n)
    for i in range(10):
        bank.push(_entry(i, n=n, h=h, w=w))
        assert bank.nbytes <= bound
    assert bank.nbytes == bound  # full bank of equal-size entries: exactly the worst case


def test_bank_sample_uniform_and_reproducible():
    bank = MemoryBank(4)
    with pytest.raises(ValueError, match="empty"):
        bank.sample()
    for i in range(4):
        bank.push(_entry(i))
    g = torch.Generator().manual_seed(0)
    counts = [0] * 4
    for _ in range(2000):
        counts[int(bank.sample(g).labels[0])] += 1
    assert all(400 < c < 600 for c in counts), counts
    s1 = [int(bank.sample(torch.Generator().manual_seed(5)).labels[0]) for _ in range(3)]
    assert len(set(s1)) == 1


def test_bank_state_dict_round_trip():
    bank = MemoryBank(3)
    for i in range(4):
        bank.push(_entry(i, n=i % 3))
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = MemoryBank(3)
    restored.load_state_dict(state)
    assert len(restored) == len(bank) and restored.full
    for a, b in zip(bank.entries, restored.entries):
        for name in ("image", "masks", "labels", "scores"):
            ta, tb = getattr(a, name), getattr(b, name)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)
    # same future behaviour: sampling and eviction
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert all(torch.equal(bank.sample(ga).image, restored.sample(gb).image) for _ in range(5))
    bank.push(_entry(9))
    restored.push(_entry(9))
    assert [int(e.labels[0]) if e.num_instances else -1 for e in bank.entries] == \
           [int(e.labels[0]) if e.num_instances else -1 for e in restored.entries]
    # restored entries do not alias the state dict
    state["entries"][-1]["image"].zero_()
    assert restored.entries[1].image.any()
    with pytest.raises(ValueError, match="capacity"):
        MemoryBank(5).load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="malformed"):
        MemoryBank(3).load_state_dict({"capacity": 3, "entries": [{"image": _image(0)}]})


# ---------------------------------------------------------------- instance selection


@pytest.mark.parametrize("n_obj,expected", [(0, 0), (1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (7, 3), (40, 3)])
def test_select_instances_count_code_rule(n_obj, expected):
    idx = select_instances(torch.rand(n_obj), torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and idx.shape == (expected,)
    assert ((idx >= 0) & (idx < max(n_obj, 1))).all()


@pytest.mark.parametrize("n_obj,expected", [(1, 1), (3, 1), (7, 1), (8, 2), (12, 3), (100, 3)])
def test_select_instances_count_paper_quarter(n_obj, expected):
    assert select_instances(torch.rand(n_obj), fraction=0.25).numel() == expected


def test_select_instances_probability_proportional_to_score_cubed():
    scores = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.0])  # score^3 / sum = .01, .08, .27, .64, 0
    g = torch.Generator().manual_seed(123)
    draws = torch.cat([select_instances(scores, g, fraction=1.0, max_instances=5) for _ in range(8000)])
    assert draws.numel() == 40000
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert freq[4] == 0                                 # zero-score instance never drawn
    assert torch.allclose(freq, torch.tensor([0.01, 0.08, 0.27, 0.64, 0.0], dtype=torch.float64), atol=0.01)
    # same generator state -> same draw
    a = select_instances(scores, torch.Generator().manual_seed(7), fraction=1.0, max_instances=5)
    b = select_instances(scores, torch.Generator().manual_seed(7), fraction=1.0, max_instances=5)
    assert torch.equal(a, b)


def test_select_instances_all_zero_scores_uniform():
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([select_instances(torch.zeros(4), g, fraction=1.0, max_instances=4) for _ in range(1000)])
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)


def test_select_instances_errors():
    with pytest.raises(ValueError, match="1-D float"):
        select_instances(torch.rand(2, 2))
    with pytest.raises(ValueError, match="1-D float"):
        select_instances(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        select_instances(torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        select_instances(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="fraction"):
        select_instances(torch.rand(3), fraction=0.0)
    with pytest.raises(ValueError, match="max_instances"):
        select_instances(torch.rand(3), max_instances=0)
    with pytest.raises(ValueError, match="power"):
        select_instances(torch.rand(3), power=-1.0)


# ---------------------------------------------------------------- end to end


def test_bank_select_paste_end_to_end():
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(2)
    for i in range(2):
        probs = torch.rand(4, 14, 16, generator=g)
        boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 14.0], [2.0, 6.0, 9.0, 12.0],
                              [10.0, 0.0, 16.0, 5.0]])
        bank.push(_entry_from_probs(_image(30 + i, 14, 16), probs, box_masks_full_res(boxes, (14, 16)),
                                    torch.arange(4)))
    assert bank.full
    entry = bank.sample(g)
    idx = select_instances(entry.scores, g)
    tgt_boxes = torch.tensor([[1.0, 1.0, 6.0, 5.0], [5.0, 3.0, 12.0, 9.0]])
    res = paste_instances(_image(40), tgt_boxes, torch.tensor([0, 1]), None, entry.image, entry.masks[idx],
                          entry.labels[idx])
    k = res.boxes.shape[0]
    assert res.masks.shape == (k, H, W) and res.labels.shape == res.pasted.shape == (k,)
    assert res.pasted.sum() == res.src_kept.numel() >= 1
    # every box is the tight box of its visible mask (integer inputs)
    for box, mask in zip(res.boxes.tolist(), res.masks):
        ys, xs = mask.nonzero(as_tuple=True)
        assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
