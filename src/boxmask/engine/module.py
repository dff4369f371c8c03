"""Lightning glue: the training module, deterministic step-indexed sampling, optimiser and schedule.

Source for the schedule: detectron2 ``WarmupMultiStepLR`` semantics (methods.md §1.8).
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..config import Config, SolverConfig, load_config
from ..data.collate import Batch
from ..io import atomic_torch_save
from ..methods import method_class
from ..modeling import build_model, to_memory_format
from ..structures import SupervisionInputs


def lr_factor(step: int, solver: SolverConfig) -> float:
    """LR multiplier at 0-based ``step``: linear warm-up from ``warmup_factor`` over ``warmup_iters``,
    then ×``gamma`` at each of ``steps`` (detectron2 WarmupMultiStepLR)."""
    factor = solver.gamma ** bisect.bisect_right(sorted(solver.steps), step)
    if step < solver.warmup_iters:
        alpha = step / solver.warmup_iters
        factor *= solver.warmup_factor * (1 - alpha) + alpha
    return factor


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
# learned query / level embeddings take the norm layers' decay (Mask2Former: no decay on either)
_NO_DECAY_TYPES = (*_NORM_TYPES, nn.Embedding)


def build_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW with weight decay ``solver.weight_decay_norm`` on normalisation layers and
    embeddings, and the learning rate ``base_lr * solver.backbone_lr_factor`` on ``model.backbone`` (when the
    factor is not 1; Mask2Former / Box2Mask-T: 0.1, methods.md §4.4).

    Raises ValueError for an unknown optimiser name.
    """
    backbone = getattr(model, "backbone", None)
    slow = ({id(p) for p in backbone.parameters()}
            if isinstance(backbone, nn.Module) and solver.backbone_lr_factor != 1.0 else set())
    # (no decay, backbone LR) -> params; the first two groups always exist (stable layout for resumed optimisers)
    buckets: dict[tuple[bool, bool], list] = {(False, False): [], (True, False): []}
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            buckets.setdefault((isinstance(module, _NO_DECAY_TYPES), id(p) in slow), []).append(p)
    groups = []
    for (no_decay, is_slow), params in sorted(buckets.items()):
        group = {"params": params, "weight_decay": solver.weight_decay_norm if no_decay else solver.weight_decay}
        if is_slow:
            group["lr"] = solver.base_lr * solver.backbone_lr_factor
        groups.append(group)
    if solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=solver.base_lr, momentum=solver.momentum)
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=solver.base_lr, betas=tuple(solver.betas))
    raise ValueError(f"unknown optimizer {solver.optimizer!r}")


def supervision_inputs(batch: Batch, with_masks: bool) -> SupervisionInputs:
    """The supervision's view of a batch; ground-truth masks are included only if ``with_masks``."""
    masks = has_mask = None
    if with_masks:
        masks = [t["masks"] for t in batch.targets]
        has_mask = [t.get("has_mask", torch.ones(len(t["labels"]), dtype=torch.bool)) for t in batch.targets]
    return SupervisionInputs(images=batch.images, image_sizes=batch.image_sizes, orig_sizes=batch.orig_sizes,
                             boxes=[t["boxes"] for t in batch.targets], labels=[t["labels"] for t in batch.targets],
                             masks=masks, has_mask=has_mask)


class BoxMaskModule(L.LightningModule):
    """Trains a model with its method (:mod:`boxmask.methods`, chosen by ``supervision.type``).
    Hyper-parameters (saved in checkpoints): the recipe as a dict, the class names and the COCO category id
    of each contiguous label.

    Attributes: ``model`` (the network, ``model.*`` keys: all that
    :func:`~boxmask.engine.inference.load_checkpoint` rebuilds), ``method`` (a
    :class:`~boxmask.methods.base.Method`) and ``supervision`` (the method's supervision; an ``nn.Module``
    when it has state, e.g. SIM's prototypes and copy-paste bank, so that state is checkpointed and restored
    on ``--resume``). A method's :meth:`~boxmask.methods.base.Method.setup` may register more networks here
    (SIM: ``teacher``). The module never branches on the method: it calls its hooks.
    """

    def __init__(self, config: dict, class_names: list[str], cat_ids: list[int]):
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = load_config(config)
        method_cls = method_class(self.cfg)  # the recipe's checks before anything is built
        self.model = build_model(self.cfg.model, len(class_names))
        if self.cfg.model.init_checkpoint:
            from .inference import load_model_weights

            report = load_model_weights(self.model, self.cfg.model.init_checkpoint, list(class_names))
            if report["missing"] or report["skipped"]:
                warnings.warn(f"{self.cfg.model.init_checkpoint}: {len(report['missing'])} tensors not in the "
                              f"checkpoint, {len(report['skipped'])} of another shape (kept as initialised): "
                              f"{(report['missing'] + report['skipped'])[:6]}", stacklevel=2)
        to_memory_format(self.model, self.cfg.trainer.channels_last)
        # built after the network: the random initialisation order (network, then e.g. SIM's prototypes) is fixed
        self.method = method_cls(self.cfg, len(class_names))
        self.supervision = self.method.supervision
        self.method.setup(self)

    def train(self, mode: bool = True):
        """``nn.Module.train``, then the method's :meth:`~boxmask.methods.base.Method.on_train_mode` hook."""
        super().train(mode)
        method = getattr(self, "method", None)  # train() may run before __init__ has set it
        if method is not None:
            method.on_train_mode(self, mode)
        return self

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The optimiser step, then the method's :meth:`~boxmask.methods.base.Method.after_optimizer_step` hook.

        Done here rather than in ``on_train_batch_end`` because Lightning runs the callbacks' batch-end
        hooks (e.g. the step checkpoint) before the module's: a checkpoint must see e.g. SIM's updated teacher.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.method.after_optimizer_step(self)

    def batch_inputs(self, batch: Batch, step: int) -> SupervisionInputs:
        """What the method may see of ``batch`` at ``step``: ground-truth masks only if the method reads them,
        after the method's batch-level augmentation (:meth:`~boxmask.methods.base.Method.prepare_inputs`)."""
        return self.method.prepare_inputs(supervision_inputs(batch, self.method.reads_gt_masks), step)

    def compute_losses(self, inputs: SupervisionInputs, step: int) -> dict:
        """All training losses of one prepared batch (fp32 scalars whose sum is the objective)."""
        return self.method.losses(self.model, inputs, step)

    def training_step(self, batch: Batch, batch_idx: int):
        step = int(self.global_step)
        losses = self.compute_losses(self.batch_inputs(batch, step), step)
        total = sum(losses.values())
        bs = batch.images.shape[0]
        self.log_dict({k: v.detach() for k, v in losses.items()}, on_step=True, batch_size=bs)
        self.log("loss", total.detach(), on_step=True, prog_bar=True, batch_size=bs)
        return total

    def configure_optimizers(self):
        solver = self.cfg.solver
        opt = build_optimizer(self.model, solver)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, solver))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


class SeededDataset(Dataset):
    """Wraps a dataset so item ``(index, seed)`` runs its random transforms under ``seed``:
    augmentations then depend only on the step, which makes ``--resume`` continue exactly."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class StepBatchSampler(Sampler):
    """Batches for optimisation steps ``[start_step, max_iters)``, a pure function of the step.

    Step ``s`` on process ``rank`` of ``world_size`` takes samples ``g = (s*world_size + rank)*batch_size + j``
    of an endless stream of per-epoch permutations (seeded by ``seed + epoch``). Yields lists of
    ``(dataset index, sample seed)`` for :class:`SeededDataset`. ``start_step`` may be a callable
    (e.g. reading the trainer's global step), evaluated whenever a new iterator starts.
    """

    def __init__(self, dataset_len: int, batch_size: int, max_iters: int, start_step: int | Callable[[], int] = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if dataset_len <= 0:
            raise ValueError("the training set is empty")
        self.n, self.bs, self.max_iters = dataset_len, batch_size, max_iters
        # a callable is read at each new iterator: Lightning may start a fresh epoch after a resume
        self._start = start_step if callable(start_step) else (lambda: start_step)
        self.seed, self.rank, self.world = seed, rank, world_size
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    @property
    def start(self) -> int:
        """First step the next iterator yields."""
        return int(self._start())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.max_iters):
            batch = []
            for j in range(self.bs):
                g = (step * self.world + self.rank) * self.bs + j
                batch.append((self._perm(g // self.n)[g % self.n], (self.seed * 1_000_003 + g) % (2**31)))
            yield batch

    def __len__(self) -> int:
        return max(self.max_iters - self.start, 0)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file and renames it into place, so an
    interrupted save never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, path)
