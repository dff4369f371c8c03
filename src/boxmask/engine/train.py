"""Training driver: datasets ► Lightning Trainer ► checkpoints, logs ► evaluation on the val split."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from ..config import Config
from ..console import is_terminal
from ..data.coco import CocoInstances
from ..data.collate import make_collate
from ..data.transforms import build_train_transforms
from ..io import atomic_write_json, atomic_write_text
from ..methods import method_class
from .module import AtomicCheckpointIO, BoxMaskModule, SeededDataset, StepBatchSampler
from .progress import PlainProgressLog

log = logging.getLogger(__name__)


def resolve_data_paths(cfg: Config) -> dict:
    """Train/val JSON and image folders of a recipe (``data.builtin: sample`` → the bundled DSB2018 subset)."""
    if cfg.data.builtin:
        if cfg.data.builtin != "sample":
            raise ValueError(f"data.builtin must be 'sample' or empty, got {cfg.data.builtin!r}")
        from ..data.sample import sample_paths

        p = sample_paths()
        return {"train_json": p["train_json"], "train_images": p["image_dir"], "val_json": p["val_json"], "val_images": p["image_dir"]}
    return {"train_json": cfg.data.train_json, "train_images": cfg.data.train_images,
            "val_json": cfg.data.val_json, "val_images": cfg.data.val_images}


class _DataModule(L.LightningDataModule):
    """Train loader whose batches are a function of the global step (exact resume, DDP sharding)."""

    def __init__(self, cfg: Config, dataset: CocoInstances):
        super().__init__()
        self.cfg = cfg
        self.dataset = dataset

    def train_dataloader(self):
        trainer = self.trainer
        sampler = StepBatchSampler(len(self.dataset), self.cfg.data.batch_size, self.cfg.solver.max_iters,
                                   start_step=lambda: int(trainer.global_step), seed=self.cfg.trainer.seed,
                                   rank=trainer.global_rank, world_size=trainer.world_size)
        workers = self.cfg.data.num_workers
        return DataLoader(SeededDataset(self.dataset), batch_sampler=sampler, num_workers=workers,
                          collate_fn=make_collate(self.cfg.data.size_divisibility),
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)


class _StepCheckpoint(L.Callback):
    """Writes ``checkpoints/last.ckpt`` every ``every`` steps and at the end of training (atomic)."""

    def __init__(self, dirpath: Path, every: int):
        self.dirpath, self.every = dirpath, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step < trainer.max_steps:
            trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)
        trainer.save_checkpoint(self.dirpath / "model_final.ckpt", weights_only=False)


def trainer_rank_zero() -> bool:
    """True in the process of global rank 0 (also before the process group exists)."""
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _precision(cfg: Config) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    accel = cfg.trainer.accelerator
    if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def train(cfg: Config, resume: str | Path | None = None, progress: bool | None = None) -> dict:
    """Train the recipe ``cfg``; optionally resume from a checkpoint (``"last"`` = ``output_dir/checkpoints/last.ckpt``).

    Writes under ``cfg.trainer.output_dir``: ``config.yaml``, ``checkpoints/{last,model_final}.ckpt``,
    TensorBoard and CSV logs (``logs/{tensorboard,csv}/version_N``, a new version per run or resume), and (rank 0, if ``eval_after_train``) ``eval/metrics.json``.
    Returns ``{"wall_s", "global_step", "checkpoint", "metrics"}``. Dataset problems raise
    :class:`~boxmask.data.coco.DatasetError` before training starts.

    Progress (``progress``, default ``cfg.trainer.progress_bar``): a tqdm bar when stdout is a terminal,
    otherwise one plain line every ``cfg.trainer.progress_every`` steps (:class:`PlainProgressLog`);
    ``progress=False`` shows neither.
    """
    import yaml

    out = Path(cfg.trainer.output_dir)
    if cfg.trainer.cpu_threads > 0:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    paths = resolve_data_paths(cfg)
    # a box-supervised recipe never loads masks: they are not even decoded
    needs_masks = method_class(cfg).reads_gt_masks
    train_set = CocoInstances(paths["train_json"], paths["train_images"],
                              transforms=build_train_transforms(cfg.data.min_sizes, cfg.data.max_size, cfg.data.flip_prob,
                                                                cfg.data.color_jitter, cfg.data.grayscale_prob,
                                                                cfg.data.invert_prob, cfg.data.box_size,
                                                                cfg.data.box_size_max),
                              load_masks=needs_masks, check_images=cfg.data.check_images)
    stats = train_set.stats
    log.info("train set: %d images, %d boxes, %d without a mask", stats.get("images", 0), stats.get("boxes", 0),
             stats.get("without_mask", 0))
    if needs_masks and trainer_rank_zero():
        with_mask = stats.get("boxes", 0) - stats.get("without_mask", 0)
        print(f"{cfg.supervision.type} supervision: {with_mask} of {stats.get('boxes', 0)} instances have a mask")
    module = BoxMaskModule(cfg.to_dict(), train_set.class_names, train_set.cat_ids)
    ckpt_dir = out / "checkpoints"
    if resume == "last":
        resume = ckpt_dir / "last.ckpt"
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"{resume}: checkpoint to resume from not found")
    show_progress = cfg.trainer.progress_bar if progress is None else progress
    # a bar on a terminal; in a log file its \r redraws would pile up, so plain lines there
    bar = show_progress and is_terminal(sys.stdout)
    callbacks = [_StepCheckpoint(ckpt_dir, cfg.trainer.checkpoint_every), LearningRateMonitor("step")]
    if bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    elif show_progress:
        callbacks.append(PlainProgressLog(cfg.trainer.progress_every or cfg.trainer.log_every))
    trainer = L.Trainer(
        max_steps=cfg.solver.max_iters, max_epochs=-1, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes, strategy=cfg.trainer.strategy, precision=_precision(cfg),
        gradient_clip_val=cfg.solver.grad_clip or None, gradient_clip_algorithm="norm",
        log_every_n_steps=cfg.trainer.log_every, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        logger=[TensorBoardLogger(out / "logs", name="tensorboard"), CSVLogger(out / "logs", name="csv")],
        enable_checkpointing=False, enable_progress_bar=bar, enable_model_summary=False,
        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out,
    )
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if show_progress:
            print(f"training {cfg.solver.max_iters} steps ({'resumed, ' if resume else ''}batch {cfg.data.batch_size} x "
                  f"{trainer.world_size} process(es)) on {trainer.strategy.root_device}, precision "
                  f"{trainer.precision}", flush=True)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Checkpoint directory.*exists and is not empty.*")
        if module.method.keeps_modules_in_eval:  # e.g. SIM's momentum teacher, in eval mode on purpose
            warnings.filterwarnings("ignore", r".*module\(s\) in eval mode at the start of training.*")
        trainer.fit(module, datamodule=_DataModule(cfg, train_set), ckpt_path=str(resume) if resume else None)
    wall = time.time() - t0
    summary = {"wall_s": wall, "global_step": int(trainer.global_step), "checkpoint": str(ckpt_dir / "model_final.ckpt"),
               "metrics": None}
    if trainer.is_global_zero and cfg.trainer.eval_after_train and paths["val_json"]:
        from .evaluator import format_ap_table
        from .inference import evaluate_model

        device = module.device
        model = module.model.to(device).eval()
        metrics = evaluate_model(model, cfg, train_set.cat_ids, paths["val_json"], paths["val_images"], device=device,
                                 progress=show_progress, output_dir=out / "eval")
        summary["metrics"] = metrics
        print(format_ap_table({"segm": metrics["model"]["segm"], "bbox": metrics["model"]["bbox"],
                               "segm (boxes filled)": metrics["boxfill"]["segm"]}))
    if trainer.is_global_zero:
        atomic_write_json(out / "summary.json", summary)
    return summary
