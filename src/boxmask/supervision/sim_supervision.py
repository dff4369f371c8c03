"""SIM supervision: BoxInst losses + momentum teacher + class prototypes + pseudo-mask loss.

Li et al., "SIM: Semantic-aware Instance Mask Generation for Box-Supervised Instance Segmentation",
CVPR 2023 (methods.md §5.1-5.5, §5.7). This module wires the pure building blocks of
:mod:`boxmask.supervision.sim` into a :class:`~boxmask.supervision.base.MaskSupervision`; the training
engine (:class:`~boxmask.engine.module.BoxMaskModule`) owns the teacher network and its EMA update.
The online weakly-supervised copy-paste of SIM (§5.6, ``L_paste``) is not wired into training yet:
this supervision has no ``loss_paste`` term and never modifies the batch. The feature-aware pairwise
affinity of the released code (§5.2, not in the paper) is not used either: the pairwise term is
BoxInst's colour-only one with ``supervision.color_threshold``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SIM_INSTANCE_MAPS, SIM_PSEUDO_LOSSES, SupervisionConfig
from ..modeling.fcos import flatten_levels
from .base import MaskInstances, MaskSupervision, SupervisionInputs
from .boxinst import BoxInstSupervision, instance_box_masks
from .sim import (init_prototypes, instance_map, iou_weights, pseudo_mask_loss, pseudo_mask_targets, semantic_map,
                  update_prototypes)

__all__ = ["SIMSupervision"]

_NORM_EPS = 1e-12  # F.normalize floor, as in boxmask.supervision.sim


def _upsample_normalised(mask_feats: Tensor, size: tuple[int, int]) -> Tensor:
    """Stride-8 mask features ``[B,D,h8,w8]`` -> float32 ``[B,D,h,w]`` at stride 4, unit norm along D.

    Plain bilinear with ``align_corners=False`` (the SIM code's ``F.interpolate(scale_factor=2)``,
    methods.md §5.2) -- not CondInst's aligned bilinear -- then L2-normalised per pixel (§5.3-5.4).
    """
    up = F.interpolate(mask_feats.detach().float(), size=size, mode="bilinear", align_corners=False)
    return F.normalize(up, dim=1, eps=_NORM_EPS)


def _instance_gt_boxes(instances: MaskInstances, inputs: SupervisionInputs) -> Tensor:
    """float32 ``[K,4]`` xyxy box (resized-image pixels) of each positive's GT, on the logits' device."""
    device = instances.logits.device
    counts = torch.tensor([0] + [len(b) for b in inputs.boxes], device=device)
    offsets = torch.cumsum(counts, 0)[:-1]
    boxes = torch.cat(inputs.boxes).to(device).float() if inputs.boxes else torch.zeros(0, 4, device=device)
    return boxes[offsets[instances.im_inds] + instances.gt_inds]


class SIMSupervision(nn.Module, MaskSupervision):
    """SIM mask losses on CondInst: BoxInst's projection + pairwise, plus the pseudo-mask loss (methods.md §5).

    State: the class prototypes ``P`` as the persistent buffer ``prototypes`` (float32 ``[C, L, D]``,
    ``C`` = detector classes, ``L = supervision.sim_num_prototypes``, ``D = model.mask_channels``; unit
    norm along D; initialised by :func:`~boxmask.supervision.sim.init_prototypes`), so they are saved in
    and restored from checkpoints with the training module. The momentum teacher is *not* a submodule:
    the engine owns it (``BoxMaskModule.teacher``, EMA-updated after each optimiser step) and hands a
    reference over with :meth:`set_teacher`, so it is saved once, under ``teacher.*``.

    Per step, :meth:`losses` returns ``{"loss_proj", "loss_pairwise", "loss_pseudo"}`` (float32 scalars):

    1. BoxInst projection + pairwise losses, exactly as :class:`~boxmask.supervision.boxinst.BoxInstSupervision`
       (same config fields, pairwise warm-up and colour threshold).
    2. Without gradient, the full teacher forward on ``inputs.images`` (``teacher._forward_features``);
       its dynamic mask head at the student's positives (same ``im_inds``/``loc_inds``/``locations``/
       ``levels``, i.e. the same GT assignment, §5.1) gives teacher mask probabilities ``p'``
       ``[K, h4, w4]``; its stride-8 mask features are bilinearly upsampled ×2 (align_corners False) and
       L2-normalised: ``Z'`` ``[B, D, h4, w4]``. The full teacher is run, not the code's teacher head on
       student features (§5.1 code quirk).
    3. Instance map ``M_I`` (:func:`~boxmask.supervision.sim.instance_map`): mean of ``p'`` over the
       positives of the same GT, weighted by ``exp(μ IoU(pred box, gt box))``
       (``sim_instance_map="iou"``, paper; the boxes are the *student's* regressed boxes at the positive,
       ``MaskInstances.pred_boxes`` -- the teacher's are nearly identical at m = 0.9999) or uniform
       (``"mean"``, code).
    4. Prototype update, every step (also during the warm-up), per image in batch order: for each
       class present among the image's positives, the pixels of ``M_bin = [M_I > sim_inst_threshold] B``
       (``B`` = the GT box mask at stride 4), united over that class's positives so a pixel counts once,
       are assigned to the class's prototypes by Sinkhorn-Knopp on the teacher features ``Z'``; the
       centroids average the *student's* mask features upsampled the same way (as the released code,
       §5.3 step 4), and :func:`~boxmask.supervision.sim.update_prototypes` moves the hit prototypes with
       momentum ``sim_prototype_momentum``. Then, under ``torch.distributed``, the prototypes are
       all-reduce-averaged over processes and re-normalised along D (§5.3 step 5) -- on every rank
       every step, also when a rank has no positives, so the collective never deadlocks.
    5. From ``step >= sim_warmup_iters`` (0-based global step): ``M_S`` = semantic map of ``Z'`` against
       the (just updated) prototypes of each positive's class (temperature ``sim_temperature``; 0 = code,
       none), ``M_prob = (1 - α) M_S + α M_I`` (``α = sim_alpha``), pseudo mask and valid region by
       :func:`~boxmask.supervision.sim.pseudo_mask_targets` (``sim_low_threshold``, ``sim_high_range``,
       ``sim_inst_threshold``), and ``loss_pseudo = sim_pseudo_weight * pseudo_mask_loss(student
       logits, target, valid, sim_pseudo_loss)``. Before that, ``loss_pseudo`` is a zero connected to
       the logits, so the loss keys (and Lightning's logged metrics) never change.

    Not wired yet: SIM's online copy-paste (§5.6, ``λ2 L_paste``) and the code-only feature-aware
    pairwise affinity (§5.2). All maps and targets are float32 on the logits' device; only
    ``loss_pseudo`` (besides the BoxInst terms) carries gradient, to the student's logits.

    Args:
        cfg: supervision config with ``type == "sim"`` and the ``sim_*`` fields.
        num_classes: detector classes ``C >= 1`` (size of the prototype bank).
        mask_channels: ``D``, the CondInst mask-branch output channels (``model.mask_channels``).

    Raises:
        ValueError: for ``num_classes``/``mask_channels < 1`` or an unknown ``sim_instance_map`` /
            ``sim_pseudo_loss``.
    """

    uses_gt_masks = False

    def __init__(self, cfg: SupervisionConfig, num_classes: int, mask_channels: int):
        super().__init__()
        if num_classes < 1 or mask_channels < 1:
            raise ValueError(f"SIMSupervision: num_classes and mask_channels must be >= 1, got "
                             f"{num_classes} and {mask_channels}")
        if cfg.sim_instance_map not in SIM_INSTANCE_MAPS:
            raise ValueError(f"SIMSupervision: sim_instance_map must be one of {SIM_INSTANCE_MAPS}, "
                             f"got {cfg.sim_instance_map!r}")
        if cfg.sim_pseudo_loss not in SIM_PSEUDO_LOSSES:
            raise ValueError(f"SIMSupervision: sim_pseudo_loss must be one of {SIM_PSEUDO_LOSSES}, "
                             f"got {cfg.sim_pseudo_loss!r}")
        self.cfg = cfg
        self.boxinst = BoxInstSupervision(cfg)  # a plain object: no state of its own
        self.register_buffer("prototypes", init_prototypes(num_classes, cfg.sim_num_prototypes, mask_channels))
        self._set_teacher_ref(None)

    def _set_teacher_ref(self, teacher: nn.Module | None) -> None:
        # object.__setattr__ bypasses nn.Module registration: the teacher must not become a submodule
        # (it would be saved twice and moved/trained as part of the supervision)
        object.__setattr__(self, "_teacher", teacher)

    def set_teacher(self, teacher: nn.Module) -> None:
        """Use ``teacher`` (a :class:`~boxmask.modeling.condinst.CondInst`, EMA copy of the student) from now on.

        Only a reference is kept; the caller owns the teacher (device placement, EMA, checkpointing).
        """
        self._set_teacher_ref(teacher)

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher set by :meth:`set_teacher` (None before)."""
        return self._teacher

    def extra_repr(self) -> str:
        c, l, d = self.prototypes.shape
        return f"prototypes=[{c}, {l}, {d}], warmup_iters={self.cfg.sim_warmup_iters}"

    # ------------------------------------------------------------------ losses
    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int) -> dict[str, Tensor]:
        """BoxInst losses + ``loss_pseudo`` for one batch (see the class docstring for the steps).

        Args:
            instances: sampled positives from CondInst: ``logits`` float ``[K,1,h4,w4]`` and the
                ``loc_inds``/``locations``/``levels``/``mask_feats`` (and, for ``sim_instance_map="iou"``,
                ``pred_boxes``) fields.
            inputs: the box-only view of the batch (uint8 ``images``, per-image ``boxes``/``labels``).
            step: 0-based global optimisation step (warm-ups).

        Returns:
            ``{"loss_proj", "loss_pairwise", "loss_pseudo"}``, float32 scalars.

        Raises:
            ValueError: if a CondInst field is missing or the teacher was not set.
        """
        cfg = self.cfg
        out = self.boxinst.losses(instances, inputs, step)
        logits = instances.logits.float()
        # a +0 (not -0, which logs oddly) that keeps the logits in the graph
        zero = logits.new_zeros(()) + 0.0 * logits.sum()
        if len(instances) == 0:
            self._sync_prototypes()  # every rank must join the collective
            out["loss_pseudo"] = zero
            return out
        self._check_inputs(instances)
        with torch.no_grad():
            size = tuple(logits.shape[-2:])
            t_probs, t_feats = self._teacher_outputs(inputs.images, instances, size)
            box_masks = instance_box_masks(instances, inputs)
            weights = None
            if cfg.sim_instance_map == "iou":
                weights = iou_weights(instances.pred_boxes, _instance_gt_boxes(instances, inputs), cfg.sim_iou_mu)
            m_inst = instance_map(t_probs, instances.gt_inds, instances.im_inds, weights)
            self._update_prototypes(instances, m_inst, box_masks, t_feats, size)
        self._sync_prototypes()
        if step < cfg.sim_warmup_iters:
            out["loss_pseudo"] = zero
            return out
        with torch.no_grad():
            m_sem = self._semantic_maps(instances, t_feats)
            m_prob = (1.0 - cfg.sim_alpha) * m_sem + cfg.sim_alpha * m_inst
            target, valid = pseudo_mask_targets(m_prob, m_inst, box_masks, instances.gt_inds, instances.im_inds,
                                                cfg.sim_low_threshold, tuple(cfg.sim_high_range),
                                                cfg.sim_inst_threshold)
        out["loss_pseudo"] = cfg.sim_pseudo_weight * pseudo_mask_loss(logits, target, valid, cfg.sim_pseudo_loss)
        return out

    def _check_inputs(self, instances: MaskInstances) -> None:
        missing = [name for name in ("loc_inds", "locations", "levels", "mask_feats")
                   if getattr(instances, name) is None]
        if self.cfg.sim_instance_map == "iou" and instances.pred_boxes is None:
            missing.append("pred_boxes")
        if missing:
            raise ValueError(f"SIMSupervision: the model did not provide MaskInstances.{', '.join(missing)}; "
                             "SIM needs CondInst positives (model.arch=condinst)")
        if self._teacher is None:
            raise ValueError("SIMSupervision: no teacher; call set_teacher(teacher_model) before computing losses")

    @torch.no_grad()
    def _teacher_outputs(self, images: Tensor, instances: MaskInstances, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Teacher mask probabilities float32 ``[K,h4,w4]`` at the student's positives and unit-norm
        teacher features float32 ``[B,D,h4,w4]`` (methods.md §5.1)."""
        teacher = self._teacher
        _, _, _, params, mask_feats, _ = teacher._forward_features(images)
        flat_params = flatten_levels(params)
        if int(instances.loc_inds.max()) >= flat_params.shape[1]:
            raise ValueError(f"SIMSupervision: loc_inds reach {int(instances.loc_inds.max())} but the teacher has "
                             f"{flat_params.shape[1]} locations; teacher and student must be the same network")
        logits = teacher.mask_head(mask_feats, flat_params[instances.im_inds, instances.loc_inds], instances.im_inds,
                                   instances.locations, instances.levels)
        if tuple(logits.shape[-2:]) != size:
            raise ValueError(f"SIMSupervision: teacher mask logits are {tuple(logits.shape[-2:])}, student {size}")
        return logits.float().sigmoid()[:, 0], _upsample_normalised(mask_feats, size)

    @torch.no_grad()
    def _update_prototypes(self, instances: MaskInstances, m_inst: Tensor, box_masks: Tensor, t_feats: Tensor,
                           size: tuple[int, int]) -> None:
        """Per-image prototype update from the ``M_bin`` pixels (methods.md §5.3 steps 1-4), in place."""
        cfg = self.cfg
        m_bin = (m_inst > cfg.sim_inst_threshold) & (box_masks > 0.5)  # [K,h,w]
        if not bool(m_bin.any()):
            return
        s_feats = _upsample_normalised(instances.mask_feats, size)  # student features for the centroids
        im_inds, labels = instances.im_inds, instances.labels
        protos = self.prototypes
        for b in torch.unique(im_inds).tolist():
            in_image = im_inds == b
            assign, centroid, pixel_labels = [], [], []
            for c in torch.unique(labels[in_image]).tolist():
                pixels = m_bin[in_image & (labels == c)].any(dim=0)  # [h,w]: a pixel counts once per class
                n = int(pixels.sum())
                if n == 0:
                    continue
                assign.append(t_feats[b][:, pixels].T)  # [n, D]
                centroid.append(s_feats[b][:, pixels].T)
                pixel_labels.append(torch.full((n,), c, dtype=torch.int64, device=protos.device))
            if assign:
                protos = update_prototypes(protos, torch.cat(assign), torch.cat(pixel_labels),
                                           cfg.sim_prototype_momentum, cfg.sim_sinkhorn_epsilon,
                                           cfg.sim_sinkhorn_iters, centroid_feats=torch.cat(centroid))
        self.prototypes.copy_(protos)

    @torch.no_grad()
    def _sync_prototypes(self) -> None:
        """All-reduce-average the prototypes over processes and re-normalise along D (methods.md §5.3 step 5).

        A no-op without an initialised ``torch.distributed`` process group of size > 1.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        dist.all_reduce(self.prototypes, op=dist.ReduceOp.SUM)
        # the mean of unit vectors is shorter than 1; restore the unit-norm invariant
        self.prototypes.copy_(F.normalize(self.prototypes / dist.get_world_size(), dim=2, eps=_NORM_EPS))

    @torch.no_grad()
    def _semantic_maps(self, instances: MaskInstances, t_feats: Tensor) -> Tensor:
        """``M_S`` float32 ``[K,h4,w4]`` (methods.md §5.4), computed once per (image, class) pair and
        gathered per positive (no ``[K, D, h, w]`` feature copy)."""
        num_classes = self.prototypes.shape[0]
        keys = instances.im_inds * num_classes + instances.labels
        pairs, pair_of = torch.unique(keys, return_inverse=True)
        temperature = self.cfg.sim_temperature if self.cfg.sim_temperature > 0 else None
        maps = semantic_map(t_feats[pairs // num_classes], self.prototypes[pairs % num_classes], temperature)
        return maps[pair_of]
