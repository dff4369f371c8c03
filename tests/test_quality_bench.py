"""Helpers of ``bench/quality.py``'s domain-shift and per-group boxes-given track (no training)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402


def test_size_buckets_follow_coco_area_ranges():
    assert [quality.size_bucket(a) for a in (0, 1023.9, 1024, 9215, 9216, 1e6)] == [
        "small", "small", "medium", "medium", "large", "large"]


def test_shift_is_true_only_for_kinds_unseen_in_training():
    assert quality._shifted(["fluorescence"], {"colour"})
    assert quality._shifted(["fluorescence"], {"colour", "fluorescence"})
    assert not quality._shifted(["fluorescence"], {"fluorescence"})
    assert not quality._shifted(None, {"colour"})


def _coco(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 10, "width": 10} for i in range(1, 7)]
    anns = [{"id": 10 + i, "image_id": i, "bbox": [0, 0, 2, 2], "category_id": 1} for i in range(1, 7)]
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "n"}]}))
    kinds = {f"{i}.png": ("colour" if i % 2 else "fluorescence") for i in range(1, 7)}
    return path, kinds


def test_subsets_by_kind(tmp_path):
    path, kinds = _coco(tmp_path)
    first = json.loads(quality.subset_by_kind_first(path, kinds, 2, tmp_path / "a").read_text())
    assert [im["id"] for im in first["images"]] == [1, 2, 3, 4]
    assert [a["image_id"] for a in first["annotations"]] == [1, 2, 3, 4]
    only = json.loads(quality.subset_by_kind(path, kinds, {"fluorescence"}, tmp_path / "b").read_text())
    assert [im["id"] for im in only["images"]] == [2, 4, 6] and len(only["annotations"]) == 3
    with pytest.raises(SystemExit, match="no image of kind"):
        quality.subset_by_kind(path, kinds, {"brightfield"}, tmp_path / "c")
    with pytest.raises(SystemExit, match="have no kind"):
        quality.subset_by_kind(path, {}, {"colour"}, tmp_path / "d")


def test_calibration_table_bins_the_estimate():
    recs = [{"quality": 0.1, "iou_model": 0.2, "iou_box": 0.6}, {"quality": 0.15, "iou_model": 0.4, "iou_box": 0.6},
            {"quality": 0.95, "iou_model": 0.9, "iou_box": 0.7}, {"quality": 1.0, "iou_model": 0.8, "iou_box": 0.7},
            {"quality": None, "iou_model": 0.6, "iou_box": 0.6}]
    table = quality.calibration_table(recs)
    assert [b["n"] for b in table] == [2, 2]
    assert table[0]["mask_IoU"] == pytest.approx(0.3) and table[0]["mask_better"] == 0.0
    assert table[1]["quality"] == [0.9, 1.0] and table[1]["mask_IoU"] == pytest.approx(0.85)
    assert table[1]["mask_better"] == 1.0


def test_group_table_pivots_the_newest_rows_per_method_and_group():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import quality_table

    def row(method, group, ap, iou, shift=False, **kw):
        return {"run": "r", "track": "boxes_given", "method": method, "group": group, "mask_AP": ap,
                "mean_mask_IoU": iou, "shift": shift, **kw}

    rows = [row("boxinst_annotate", "all", 10.0, 50.0), row("boxinst_annotate", "all", 40.0, 70.0, True,
                                                            worse_than_box=0.25, s_per_image=0.5),
            row("boxinst_annotate", "colour", 30.0, 60.0, True), row("filled_box", "all", 35.0, 69.0, True),
            row("filled_box", "small", 33.0, 68.0), {**row("x", "all", 1.0, 1.0), "run": "other"}]
    text = quality_table.group_table(rows, "r").splitlines()
    assert text[0] == "| method | all | colour | small | worse than box (all) | s / image |"
    assert text[2] == "| filled_box | 35.0 / 69.0* | - | 33.0 / 68.0 | - | - |"
    assert text[3] == "| boxinst_annotate | 40.0 / 70.0* | 30.0 / 60.0* | - | 25 % | 0.50 |"
    assert len(text) == 4


def test_reuse_evaluates_again_when_only_inference_settings_changed(tmp_path, monkeypatch):
    from boxmask.config import load_config

    def cfg(*extra):
        return load_config("box2mask_t_effnet-lite0_nuts", [f"trainer.output_dir={tmp_path}", "solver.max_iters=7",
                                                            *extra])

    ckpt = tmp_path / "model_final.ckpt"
    ckpt.write_bytes(b"x")
    trained = cfg("model.mask_largest_component=false")
    record = {"config": trained.to_dict(), "wall_s": 10.0, "train_s": 9.0, "global_step": 7, "checkpoint": str(ckpt),
              "metrics": {"model": {"segm": {"AP": 1.0}}}}
    (tmp_path / "bench_train.json").write_text(json.dumps(record))

    class TrainedAgain(Exception):
        pass

    def train(c):
        raise TrainedAgain

    monkeypatch.setattr(quality, "train", train)

    same = quality.train_or_reuse(cfg("model.mask_largest_component=false"), reuse=True)
    assert same["reused"] and same["metrics"] == record["metrics"]
    changed = quality.train_or_reuse(cfg(), reuse=True)  # the recipe's True
    assert changed["reused"] and changed["metrics"] is None  # ensure_metrics evaluates it again
    assert changed["config"]["model"]["mask_largest_component"] is True
    assert changed["record_path"] == str(tmp_path / "bench_train.json")
    with pytest.raises(TrainedAgain):  # a training setting changed: trained again
        quality.train_or_reuse(cfg("solver.base_lr=0.001"), reuse=True)

    # the same folder and files spelled absolute in the record and relative to the working directory: reused
    monkeypatch.chdir(tmp_path.parent)
    keys = ("train_json", "train_images", "val_json", "val_images")
    record["config"] = cfg(*[f"data.{k}=d/{k}" for k in keys]).to_dict()  # output_dir absolute
    (tmp_path / "bench_train.json").write_text(json.dumps(record))
    spelled = load_config("box2mask_t_effnet-lite0_nuts", [f"trainer.output_dir={tmp_path.name}", "solver.max_iters=7"]
                          + [f"data.{k}={tmp_path.parent / 'd' / k}" for k in keys])
    assert quality.train_or_reuse(spelled, reuse=True)["metrics"] == record["metrics"]
