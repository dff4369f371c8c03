"""SIM (Li et al., CVPR 2023; methods.md §5): BoxInst losses plus a momentum teacher, class prototypes, a
pseudo-mask loss and online weakly-supervised copy-paste, on CondInst.

The method owns what is not a loss: the teacher network (a copy of the student made at set-up, registered
on the training module as ``teacher`` so checkpoints carry it, kept in eval mode, EMA-updated after every
optimiser step) and the teacher's forward pass at the student's positives, handed to
:class:`~boxmask.supervision.sim_supervision.SIMSupervision` as :class:`~boxmask.supervision.sim_supervision.SIMInputs`.
The prototypes and the copy-paste memory bank are state of the supervision (``supervision.*`` keys).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..config import Config
from ..modeling.condinst import CondInst, CondInstTrainOutputs
from ..structures import MaskInstances, SupervisionInputs
from ..supervision.sim import ema_update_
from ..supervision.sim_supervision import SIMInputs, SIMSupervision, upsample_mask_features
from .base import Method, combine_mask_losses

__all__ = ["SIMMethod", "teacher_inputs"]


@torch.no_grad()
def teacher_inputs(teacher: CondInst, out: CondInstTrainOutputs, images: Tensor, instances: MaskInstances) -> SIMInputs:
    """The teacher's forward pass on ``images`` (uint8 ``[B,3,Hp,Wp]``) and its dynamic mask head at the
    student's positives (``out.positives``, same GT assignment; methods.md §5.1): teacher probabilities
    float32 ``[K,h,w]`` and teacher mask features upsampled to the instances' stride, with the student's
    stride-8 mask features and regressed boxes. The full teacher is run, not the code's teacher head on
    student features (§5.1 code quirk)."""
    feats = teacher.features(images)
    size = tuple(instances.logits.shape[-2:])
    probs = teacher.mask_logits_at(feats, instances.im_inds, out.positives.loc_inds).float().sigmoid()[:, 0]
    return SIMInputs(probs, upsample_mask_features(feats.mask_feats, size), out.features.mask_feats,
                     out.positives.pred_boxes)


class SIMMethod(Method):
    """``supervision.type: sim`` (fields: ``supervision.sim``): CondInst only, box labels only.

    Hooks: :meth:`setup` registers the teacher ``module.teacher`` (a frozen deep copy of ``module.model``);
    :meth:`on_train_mode` keeps it in eval mode (its BN layers use the statistics EMA-copied from the
    student); :meth:`after_optimizer_step` applies ``θ_t <- m θ_t + (1 - m) θ_s`` with
    ``supervision.sim.teacher_momentum``; :meth:`prepare_inputs` is the supervision's copy-paste.
    """

    key = "sim"
    title = "SIM"
    architectures = ("condinst",)
    config_section = "supervision.sim"
    short_box_fit = False
    keeps_modules_in_eval = True

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        cfg.supervision.sim.validate()

    def __init__(self, cfg: Config, num_classes: int):
        super().__init__(cfg, num_classes)
        self.teacher: CondInst | None = None

    def build_supervision(self) -> SIMSupervision:
        return SIMSupervision(self.cfg.supervision, self.num_classes, self.cfg.model.mask_channels)

    def setup(self, module: nn.Module) -> None:
        # the teacher starts as an exact copy of the (possibly pretrained) student
        teacher = copy.deepcopy(module.model)
        teacher.requires_grad_(False)
        teacher.eval()
        module.teacher = teacher
        self.teacher = teacher

    def on_train_mode(self, module: nn.Module, mode: bool) -> None:
        if self.teacher is not None:
            self.teacher.eval()

    def losses(self, model: nn.Module, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        """CondInst's FCOS losses + :class:`~boxmask.supervision.sim_supervision.SIMSupervision` losses with the
        teacher's outputs at the student's positives. Raises ValueError before :meth:`setup`."""
        if self.teacher is None:
            raise ValueError("SIMMethod: no teacher; call setup(module) first")
        out = model.forward_train(inputs.images, inputs.boxes, inputs.labels)

        def group_losses(group: MaskInstances) -> dict[str, Tensor]:
            extra = teacher_inputs(self.teacher, out, inputs.images, group) if len(group) else None
            return self.supervision.losses(group, inputs, step, extra)

        return combine_mask_losses(out, group_losses)

    def after_optimizer_step(self, module: nn.Module) -> None:
        ema_update_(module.teacher, module.model, self.cfg.supervision.sim.teacher_momentum)
