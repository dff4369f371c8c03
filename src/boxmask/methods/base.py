"""The method interface: a method = an architecture + a supervision + its training hooks.

The engine (:class:`~boxmask.engine.module.BoxMaskModule`) drives every method through :class:`Method`
and never branches on a method's name: it builds the batch view a method may see
(:meth:`Method.reads_gt_masks`), lets the method prepare it (:meth:`Method.prepare_inputs`), asks it for
the losses (:meth:`Method.losses`) and calls its hooks around the optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from ..config import Config, ConfigError
from ..structures import MaskInstances, QueryOutputs, SupervisionInputs, TrainOutputs
from ..supervision.base import MaskSupervision

__all__ = ["Method", "combine_mask_losses", "supervised_losses"]


def combine_mask_losses(out: TrainOutputs, group_losses: Callable[[MaskInstances], dict[str, Tensor]]
                        ) -> dict[str, Tensor]:
    """The training objective of one batch: the network's detector losses plus the mask losses of its instance
    groups (``group_losses(group)`` per group), averaged over the groups weighted by their instance counts
    (:meth:`~boxmask.structures.TrainOutputs.group_weights`), each plus the DDP anchor ``out.anchor``.

    Returns a dict of fp32 scalars whose sum is the objective (detector keys first).
    """
    mask_losses: dict[str, Tensor] = {}
    for group, weight in zip(out.instance_groups, out.group_weights()):
        for name, value in group_losses(group).items():
            mask_losses[name] = mask_losses.get(name, 0) + weight * value
    losses = dict(out.detector_losses)
    for name, value in mask_losses.items():
        losses[name] = value + out.anchor
    return losses


def supervised_losses(model: nn.Module, supervision: MaskSupervision, inputs: SupervisionInputs,
                      step: int) -> dict[str, Tensor]:
    """All training losses of ``model`` on one batch with ``supervision`` as the mask loss: its
    ``forward_train`` on ``inputs`` (images, boxes, labels), then :func:`combine_mask_losses` with
    ``supervision.losses(group, inputs, step)``; for a query-based network (``forward_train`` returns
    :class:`~boxmask.structures.QueryOutputs`) ``supervision.losses(outputs, inputs, step)`` on the whole
    set prediction. What :meth:`Method.losses` does for most methods; also for
    benchmarks and tests that wrap a supervision (e.g. to time it)."""
    out = model.forward_train(inputs.images, inputs.boxes, inputs.labels)
    if isinstance(out, QueryOutputs):
        # set prediction (Mask2Former): the supervision matches queries to objects and adds the anchor itself
        return supervision.losses(out, inputs, step)
    return combine_mask_losses(out, lambda group: supervision.losses(group, inputs, step))


class Method:
    """One box-supervised (or mask-supervised) method: which networks it trains, which supervision, what it
    reads of the ground truth, its config checks and its training hooks.

    Subclasses set the class attributes (``supervision_class``, built from ``cfg.supervision``, or override
    :meth:`build_supervision`); methods with state or extra networks (SIM) override the hooks. An instance belongs to one training module.

    Class attributes:
        key: the ``supervision.type`` value that selects the method.
        title: its name in tables and logs (e.g. ``"BoxInst"``).
        architectures: the ``model.arch`` values it trains.
        reads_gt_masks: whether its supervision reads ground-truth masks (``SupervisionInputs.masks``); the
            batch view of a box-supervised method is built without them.
        config_section: the dotted config section that holds its own fields (e.g. ``"supervision.sim"``), or
            None.
        short_box_fit: whether ``annotate --fit`` (a few hundred steps on a user's boxes) may keep this
            method; otherwise the fit trains with BoxInst (mask methods: no masks; SIM: its teacher and
            warm-up need a long run).
        keeps_modules_in_eval: whether :meth:`setup` registers networks that stay in eval mode while training
            (Lightning warns about them otherwise).

    Args:
        cfg: the whole recipe (validated by :meth:`validate` first).
        num_classes: detector classes ``C >= 1``.

    Raises:
        ConfigError: from :meth:`validate`.
    """

    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ("condinst", "solov2")
    reads_gt_masks: ClassVar[bool] = False
    config_section: ClassVar[str | None] = None
    short_box_fit: ClassVar[bool] = True
    keeps_modules_in_eval: ClassVar[bool] = False
    supervision_class: ClassVar[type[MaskSupervision] | None] = None

    def __init__(self, cfg: Config, num_classes: int):
        self.validate(cfg)
        self.cfg = cfg
        self.num_classes = num_classes
        self.supervision = self.build_supervision()

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """What the method needs of the rest of the recipe (the network it trains, ...). Raises ConfigError."""
        if cfg.model.arch not in cls.architectures:
            raise ConfigError(f"supervision.type={cls.key} ({cls.title}) needs model.arch="
                              f"{' or '.join(cls.architectures)}, got {cfg.model.arch!r}")

    def build_supervision(self) -> MaskSupervision:
        """The method's mask supervision (a pure loss; an ``nn.Module`` when it has state to checkpoint):
        ``supervision_class(cfg.supervision)``. Raises NotImplementedError when the subclass sets neither."""
        if self.supervision_class is None:
            raise NotImplementedError(f"{type(self).__name__}: set supervision_class or override build_supervision")
        return self.supervision_class(self.cfg.supervision)

    # ------------------------------------------------------------------ hooks
    def setup(self, module: nn.Module) -> None:
        """Called once by the training module after it has built its network (``module.model``); a method
        that needs more networks registers them on ``module`` here so they are checkpointed. Default: nothing."""

    def on_train_mode(self, module: nn.Module, mode: bool) -> None:
        """Called after ``module.train(mode)`` (e.g. to keep a teacher in eval mode). Default: nothing."""

    def prepare_inputs(self, inputs: SupervisionInputs, step: int) -> SupervisionInputs:
        """Batch-level augmentation before the forward pass (SIM: copy-paste). Default: the supervision's
        :meth:`~boxmask.supervision.base.MaskSupervision.prepare_inputs`."""
        return self.supervision.prepare_inputs(inputs, step)

    def losses(self, model: nn.Module, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        """All training losses for one batch (fp32 scalars whose sum is the objective). Default:
        :func:`supervised_losses` with the method's supervision."""
        return supervised_losses(model, self.supervision, inputs, step)

    def after_optimizer_step(self, module: nn.Module) -> None:
        """Called right after each optimiser step (SIM: the teacher EMA). Default: nothing."""
