"""The ``boxmask`` command line: train ► eval ► predict on the bundled sample, and clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from boxmask.cli import main
from boxmask.config import ConfigError, load_config
from boxmask.data.sample import sample_paths
from boxmask.engine.visualize import SHEET_FILL, SHEET_PADDING, SHEET_TILE

from helpers import TINY, assert_eval_output_consistent


@pytest.fixture(scope="module")
def checkpoint(boxinst_checkpoint, tmp_path_factory):
    """The session's 2-step BoxInst checkpoint (trained by ``boxmask train``), copied with its recipe's
    ``model.score_threshold`` set to 0 so that the barely trained model returns detections."""
    ckpt = torch.load(boxinst_checkpoint, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"]["model"]["score_threshold"] = 0.0
    path = tmp_path_factory.mktemp("cli_ckpt") / "model_final.ckpt"
    torch.save(ckpt, path)
    return path


def test_predict_writes_rle_results_and_overlays(checkpoint, tmp_path, capsys):
    images = sample_paths()["image_dir"]
    files = sorted(images.iterdir())[:2]
    out = tmp_path / "pred"
    rc = main(["predict", str(checkpoint), str(files[0]), str(files[1]), "-o", str(out), "--score-threshold", "0.0",
               "--device", "cpu"])
    assert rc == 0
    records = json.loads((out / "images.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert [r["file_name"] for r in records] == [str(f) for f in files]
    assert len(results) > 0, "an untrained model with threshold 0 still returns detections"
    sizes = {r["id"]: (r["height"], r["width"]) for r in records}
    for r in results:
        m = mask_utils.decode(r["segmentation"])
        assert m.shape == sizes[r["image_id"]]
        assert r["category_id"] == 1 and 0.0 <= r["score"] <= 1.0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f.stem + ".png" for f in files)
    assert sheet_tiles(out / "contact_sheet.png") == (2, 1, 2)


def sheet_tiles(path) -> tuple[int, int, int]:
    """(tiles holding an image, rows, columns) of a contact sheet; empty slots are uniformly SHEET_FILL."""
    sheet = np.asarray(Image.open(path).convert("RGB"))
    step = SHEET_TILE + SHEET_PADDING
    rows, cols = (sheet.shape[0] - SHEET_PADDING) // step, (sheet.shape[1] - SHEET_PADDING) // step
    assert sheet.shape[:2] == (rows * step + SHEET_PADDING, cols * step + SHEET_PADDING)
    filled = 0
    for r in range(rows):
        for c in range(cols):
            y, x = SHEET_PADDING + r * step, SHEET_PADDING + c * step
            filled += bool((sheet[y:y + SHEET_TILE, x:x + SHEET_TILE] != SHEET_FILL).any())
    return filled, rows, cols


def test_predict_contact_sheet_is_capped(checkpoint, tmp_path, capsys):
    files = sorted(sample_paths()["image_dir"].iterdir())[:5]
    out = tmp_path / "pred"
    rc = main(["predict", str(checkpoint), *map(str, files), "-o", str(out), "--no-overlays", "--contact-sheet", "3",
               "--device", "cpu", "--max-dets", "4", "--score-threshold", "0.0"])
    assert rc == 0
    assert not (out / "overlays").exists()
    assert sheet_tiles(out / "contact_sheet.png") == (3, 2, 2)  # 3 of the 5 images, one empty slot
    assert len(json.loads((out / "images.json").read_text())) == 5
    per_image = {}
    for r in json.loads((out / "results.json").read_text()):
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert per_image and max(per_image.values()) <= 4  # --max-dets caps the model's output
    assert "contact_sheet.png (first 3 images)" in capsys.readouterr().out


def test_eval_short_output_option_and_max_dets(checkpoint, tmp_path):
    assert main(["eval", str(checkpoint), "-o", str(tmp_path), "--device", "cpu", "--max-dets", "150"]) == 0
    # the AP numbers are COCOeval's at maxDets 150 of the written results
    assert_eval_output_consistent(tmp_path, sample_paths()["val_json"], max_dets=150)
    per_image = {}
    for r in json.loads((tmp_path / "results.json").read_text()):
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) > 100, "--max-dets above the model's 100 must raise its detection cap"


def test_eval_prints_ap_table(checkpoint, tmp_path, capsys):
    rc = main(["eval", str(checkpoint), "--output", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| segm |" in text and "| bbox |" in text and "boxes filled" in text
    metrics = assert_eval_output_consistent(tmp_path, sample_paths()["val_json"])
    assert set(metrics) == {"model", "boxfill"}
    # the printed table shows those numbers
    assert f"{metrics['model']['segm']['AP']:.1f}" in text and f"{metrics['model']['bbox']['AP']:.1f}" in text
    # and they are those of the in-process evaluation of the same checkpoint
    from boxmask.engine.inference import evaluate_model, load_checkpoint

    model, cfg, meta = load_checkpoint(checkpoint)
    p = sample_paths()
    assert evaluate_model(model, cfg, meta["cat_ids"], p["val_json"], p["image_dir"], progress=False) == metrics


def test_train_reports_bad_dataset_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "a.png", "wid')
    rc = main(["train", "boxinst_effnet-lite0_fpn_dsb2018-sample", *TINY, "data.builtin=", f"data.train_json={bad}",
               f"data.train_images={tmp_path}", f"trainer.output_dir={tmp_path / 'o'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(bad) in err


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", ["solver.base_lrr=0.1"])
    with pytest.raises(ConfigError, match="neither a file nor a packaged recipe"):
        load_config("no_such_recipe")
    cfg = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", ["solver.base_lr=0.02", "data.min_sizes=[320,352]"])
    assert cfg.solver.base_lr == 0.02 and cfg.data.min_sizes == [320, 352]


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "nope.ckpt")])
    assert rc == 2
    assert "nope.ckpt" in capsys.readouterr().err


def test_checkpoint_restores_identical_predictions(checkpoint):
    from boxmask.engine.inference import load_checkpoint

    model, cfg, meta = load_checkpoint(checkpoint)
    assert meta["class_names"] == ["nucleus"] and meta["cat_ids"] == [1]
    x = torch.randint(0, 255, (1, 3, 160, 160), dtype=torch.uint8)
    a = model.predict(x, [(160, 160)], [(160, 160)])[0]
    model2, _, _ = load_checkpoint(checkpoint)
    b = model2.predict(x, [(160, 160)], [(160, 160)])[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)
