"""bench/dev_split.py: a dev dataset from train images only, in bench/quality.py's layout."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import dev_split  # noqa: E402


def _dataset(root: Path) -> Path:
    images = [{"id": i, "file_name": f"{n}.jpg", "width": 8, "height": 8} for i, n in enumerate([1, 2, 10, 3], 1)]
    anns = [{"id": 10 + i, "image_id": i, "bbox": [1, 1, 3, 3], "category_id": 1, "iscrowd": 0} for i in (1, 2, 3, 3, 4)]
    anns[3]["id"] = 99
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    (root / "annotations" / "instances_val.json").write_text("never read")
    return root


def test_last_images_in_natural_order_are_held_out_with_their_annotations(tmp_path):
    src = _dataset(tmp_path / "src")
    assert dev_split.main(["--dataset", str(src), "--holdout", "1", "--output", str(tmp_path / "dev")]) == 0
    train = json.loads((tmp_path / "dev" / "annotations" / "instances_train.json").read_text())
    val = json.loads((tmp_path / "dev" / "annotations" / "instances_val.json").read_text())
    # natural order 1, 2, 3, 10: "10.jpg" (id 3, two boxes) is the last one
    assert [im["file_name"] for im in val["images"]] == ["10.jpg"]
    assert sorted(a["id"] for a in val["annotations"]) == [13, 99]
    assert sorted(im["file_name"] for im in train["images"]) == ["1.jpg", "2.jpg", "3.jpg"]
    assert sorted(a["image_id"] for a in train["annotations"]) == [1, 2, 4]
    assert train["categories"] == val["categories"] == [{"id": 1, "name": "x"}]
    assert (tmp_path / "dev" / "images").resolve() == (src / "images").resolve()


def test_named_files_and_errors(tmp_path):
    src = _dataset(tmp_path / "src")
    dev_split.main(["--dataset", str(src), "--files", "1.jpg", "3.jpg", "--output", str(tmp_path / "dev")])
    val = json.loads((tmp_path / "dev" / "annotations" / "instances_val.json").read_text())
    assert sorted(im["file_name"] for im in val["images"]) == ["1.jpg", "3.jpg"]
    with pytest.raises(SystemExit, match="not train images.*nope.jpg"):
        dev_split.main(["--dataset", str(src), "--files", "nope.jpg", "--output", str(tmp_path / "d2")])
    with pytest.raises(SystemExit, match="both sides"):
        dev_split.main(["--dataset", str(src), "--holdout", "4", "--output", str(tmp_path / "d3")])
    with pytest.raises(SystemExit, match="not found"):
        dev_split.main(["--dataset", str(tmp_path / "missing"), "--output", str(tmp_path / "d4")])
