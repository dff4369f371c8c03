"""Plain helpers and constants shared by several test modules (not a test module: nothing here is collected).

Test modules import from here, never from one another; the shared *fixtures* (the session-scoped trained
checkpoints) are in ``conftest.py``.
"""

import copy
import json
from pathlib import Path

import torch

from boxmask.config import load_config
from boxmask.data.coco import CocoInstances
from boxmask.data.collate import collate_batch
from boxmask.data.sample import sample_paths
from boxmask.data.transforms import build_test_transforms
from boxmask.engine.module import supervision_inputs
from boxmask.methods import method_class

TINY = [
    "data.min_sizes=[160]", "data.max_size=320", "data.test_min_size=160", "data.test_max_size=320",
    "data.num_workers=0", "data.check_images=false",
    "model.backbone_weights=none", "model.fpn_channels=32", "model.head_convs=1",
    "model.mask_branch_channels=16", "model.mask_branch_convs=1",
    "solver.warmup_iters=2", "solver.steps=[3]", "supervision.pairwise_warmup_iters=3",
    "trainer.progress_bar=false", "trainer.eval_after_train=false", "trainer.accelerator=cpu", "trainer.devices=1",
    "trainer.checkpoint_every=2", "trainer.log_every=1",
]


def tiny_cfg(tmp_path, *extra):
    """The tiny sample recipe with ``extra`` overrides, checked as training checks it (config and method)."""
    cfg = load_config("boxinst_effnet-lite0_fpn_dsb2018-sample", TINY + [f"trainer.output_dir={tmp_path}", *extra])
    method_class(cfg)
    return cfg


def sample_batch(load_masks: bool):
    p = sample_paths()
    ds = CocoInstances(p["train_json"], p["image_dir"], transforms=build_test_transforms(160, 320), load_masks=load_masks,
                       check_images=False, verbose=False)
    return collate_batch([ds[0], ds[1]])


def with_garbage_masks(batch, flip_has_mask: bool = False):
    """A deep copy of ``batch`` whose GT masks are random noise (and ``has_mask`` flipped if asked)."""
    garbage = copy.deepcopy(batch)
    g = torch.Generator().manual_seed(1)
    for t in garbage.targets:
        t["masks"] = torch.rand(t["masks"].shape, generator=g) > 0.5
        if flip_has_mask:
            t["has_mask"] = ~t["has_mask"]
    return garbage


def losses_real_and_garbage_masks(module, step: int = 5) -> list[dict]:
    """Training losses of ``module`` (put in eval mode: fixed BN statistics) on the sample batch with its
    real GT masks and with garbage masks; asserts the supervision was handed no masks at all."""
    module.model.eval()
    batch = sample_batch(load_masks=True)
    results = []
    for b in (batch, with_garbage_masks(batch)):
        inputs = supervision_inputs(b, module.method.reads_gt_masks)
        assert inputs.masks is None
        results.append(module.compute_losses(inputs, step))
    return results


def check_annotate_one_sample_image(main, ckpt, tmp_path) -> None:
    """``boxmask annotate`` on the first val image of the bundled sample with its boxes only (no
    segmentation): every box gets a mask."""
    ann = tmp_path / "boxes.json"
    data = json.loads(sample_paths()["val_json"].read_text())
    first = data["images"][0]["id"]
    data["images"] = data["images"][:1]
    data["annotations"] = [{k: v for k, v in a.items() if k != "segmentation"} for a in data["annotations"]
                           if a["image_id"] == first]
    ann.write_text(json.dumps(data))
    masks_json = tmp_path / "masks.json"
    assert main(["annotate", str(ckpt), "--ann-file", str(ann), "--images", str(sample_paths()["image_dir"]),
                 "-o", str(masks_json), "--device", "cpu", "--no-resume"]) == 0
    written = json.loads(masks_json.read_text())["annotations"]
    assert len(written) == len(data["annotations"]) and all("segmentation" in a for a in written)


# SIM (methods.md §5): active from step 1
SIM = ["supervision.type=sim", "supervision.sim.warmup_iters=1"]
# a randomly initialised teacher predicts M_I ~ 0.5, never above the paper's 0.7: with threshold 0 every
# in-box pixel is in M_bin, so the prototypes really move in these short runs
ALL_BOX_PIXELS = "supervision.sim.inst_threshold=0.0"
# a 2-entry bank is full after step 1 (batch of 2); pasting on every later step
SIM_RUN = [*SIM, ALL_BOX_PIXELS, "supervision.sim.teacher_momentum=0.5", "supervision.sim.bank_size=2",
           "supervision.sim.paste_prob=1.0"]


def assert_eval_output_consistent(out_dir, ann_file, max_dets: int = 100) -> dict:
    """The ``metrics.json`` that ``boxmask eval -o out_dir`` wrote equals an in-process COCOeval of the
    ``results.json`` / ``results_boxfill.json`` it wrote next to it (every number, not just its range); the
    results are real detections on the split's images. Returns the metrics."""
    from pycocotools.coco import COCO

    from boxmask.engine.evaluator import evaluate_coco

    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    results = json.loads((out_dir / "results.json").read_text())
    boxfill = json.loads((out_dir / "results_boxfill.json").read_text())
    gt = COCO(str(ann_file))
    assert results and {r["image_id"] for r in results} <= set(gt.getImgIds())
    assert len(boxfill) == len(results)
    expected = {"model": evaluate_coco(gt, results, ("segm", "bbox"), max_dets=max_dets),
                "boxfill": evaluate_coco(gt, boxfill, ("segm",), max_dets=max_dets)}
    assert metrics == expected
    return metrics
