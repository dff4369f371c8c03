"""SIM supervision: BoxInst losses + momentum teacher + class prototypes + pseudo-mask loss.

Li et al., "SIM: Semantic-aware Instance Mask Generation for Box-Supervised Instance Segmentation",
CVPR 2023 (methods.md §5.1-5.5, §5.7). This module wires the pure building blocks of
:mod:`boxmask.supervision.sim` into a :class:`~boxmask.supervision.base.MaskSupervision`; the SIM method
(:class:`~boxmask.methods.sim.SIMMethod`) owns the teacher network and its EMA update.
The online weakly-supervised copy-paste (§5.6) lives here too: the memory bank is state of this
module (saved in checkpoints through ``get_extra_state``) and :meth:`SIMSupervision.prepare_inputs`
pastes into the batch before the model's forward. The teacher network itself is the method's
(:mod:`boxmask.methods.sim`): it runs the teacher and hands its outputs over as :class:`SIMInputs`, so this
module stays a pure loss on tensors and imports no network code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dataclasses import dataclass

from ..config import SIM_INSTANCE_MAPS, SIM_PSEUDO_LOSSES, SupervisionConfig
from .base import MaskInstances, MaskSupervision, SupervisionInputs
from ..ops import row_dice_loss
from .boxinst import boxinst_losses, instance_box_masks
from .copy_paste import (MemoryBank, box_masks_full_res, paste_entry, paste_instances, paste_masks_and_scores,
                         select_instances)
from .sim import (feature_similarity, init_prototypes, instance_map, iou_weights, pseudo_mask_loss,
                  pseudo_mask_targets, semantic_map, update_prototypes)

__all__ = ["SIMInputs", "SIMSupervision", "paste_loss", "upsample_mask_features"]

_NORM_EPS = 1e-12  # F.normalize floor, as in boxmask.supervision.sim
_PASTE_SEED = 0x51D  # copy-paste draws use a generator seeded by (this, step, rank): exact resumes
_UPSAMPLE_CHUNK = 32  # instances upsampled to input resolution at once when filling the bank


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def upsample_mask_features(mask_feats: Tensor, size: tuple[int, int]) -> Tensor:
    """Stride-8 mask features ``[B,D,h8,w8]`` -> float32 ``[B,D,h,w]`` at stride 4, detached.

    Plain bilinear with ``align_corners=False`` (the SIM code's ``F.interpolate(scale_factor=2)``,
    methods.md §5.2) -- not CondInst's aligned bilinear.
    """
    return F.interpolate(mask_feats.detach().float(), size=size, mode="bilinear", align_corners=False)


def _upsample_normalised(mask_feats: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`upsample_mask_features`, then L2-normalised per pixel along D (methods.md §5.3-5.4)."""
    return F.normalize(upsample_mask_features(mask_feats, size), dim=1, eps=_NORM_EPS)


def paste_loss(mask_logits: Tensor, paste_masks: Tensor, mode: str = "paper") -> Tensor:
    """SIM paste loss ``L_paste`` of pasted instances against their exact paste masks (methods.md §5.6).

    ``mode="paper"``: :func:`~boxmask.supervision.sim.pseudo_mask_loss` (BCE + dice) with every pixel
    valid; ``mode="code"``: the code's focal-style BCE (same helper) plus the BoxInst dice on the
    probabilities, mean over instances. Multiply by ``λ2 = sim.paste_weight`` (1.0).

    Args:
        mask_logits: float ``[P,1,h,w]`` or ``[P,h,w]`` student mask logits of the pasted positives.
        paste_masks: float/bool ``[P,h,w]`` 0/1 paste masks at the same stride.
        mode: ``"paper"`` or ``"code"``.

    Returns:
        float32 scalar ``>= 0`` (``0`` connected to the graph when ``P == 0``).

    Raises:
        ValueError: on shape mismatch or an unknown mode.
    """
    target = paste_masks.float()
    loss = pseudo_mask_loss(mask_logits, target, torch.ones_like(target, dtype=torch.bool), mode)
    if mode == "code" and target.shape[0] > 0:
        probs = mask_logits.float().reshape(target.shape[0], -1).sigmoid()
        loss = loss + row_dice_loss(probs, target.reshape(target.shape[0], -1).to(probs)).mean()
    return loss


@dataclass
class SIMInputs:
    """What SIM's losses need besides the student's mask logits (methods.md §5.1-5.4), from the method's
    forward passes of student and teacher at the same positives (same order as the :class:`MaskInstances`).

    teacher_probs: float32 ``[K,h,w]`` teacher mask probabilities ``p'`` at the student's positives, at the
        instances' stride; teacher_feats: float32 ``[B,D,h,w]`` teacher mask features upsampled to that
        stride (:func:`upsample_mask_features`), not normalised; student_feats: float ``[B,D,h8,w8]`` the
        student's stride-8 mask-branch output (centroids of the prototype update); pred_boxes: float32 ``[K,4]``
        xyxy resized-image pixels, the box the student regresses at each positive, or None (needed for
        ``sim.instance_map="iou"``).
    """

    teacher_probs: Tensor
    teacher_feats: Tensor
    student_feats: Tensor
    pred_boxes: Tensor | None = None


def _instance_gt_boxes(instances: MaskInstances, inputs: SupervisionInputs) -> Tensor:
    """float32 ``[K,4]`` xyxy box (resized-image pixels) of each positive's GT, on the logits' device."""
    device = instances.logits.device
    boxes = torch.cat(inputs.boxes).to(device).float() if inputs.boxes else torch.zeros(0, 4, device=device)
    return boxes[instances.gt_rows([len(b) for b in inputs.boxes])]


class SIMSupervision(nn.Module, MaskSupervision):
    """SIM mask losses on CondInst: BoxInst's projection + pairwise, plus the pseudo-mask loss (methods.md §5).

    State: the class prototypes ``P`` as the persistent buffer ``prototypes`` (float32 ``[C, L, D]``,
    ``C`` = detector classes, ``L = supervision.sim.num_prototypes``, ``D = model.mask_channels``; unit
    norm along D; initialised by :func:`~boxmask.supervision.sim.init_prototypes`), so they are saved in
    and restored from checkpoints with the training module. The momentum teacher is not part of it: the
    SIM method (:class:`boxmask.methods.sim.SIMMethod`) owns it and passes its outputs in :class:`SIMInputs`.

    Per step, :meth:`losses` returns ``{"loss_proj", "loss_pairwise", "loss_pseudo", "loss_paste"}``
    (float32 scalars):

    1. BoxInst projection + pairwise losses, as :class:`~boxmask.supervision.boxinst.BoxInstSupervision`
       (same config fields, pairwise warm-up and colour threshold); pasted objects use their paste mask
       instead of their box mask (§5.6). With ``sim.pairwise_features`` (code, §5.2) the colour
       similarity is multiplied by :func:`~boxmask.supervision.sim.feature_similarity` of the teacher
       features ``Z'`` before the threshold ``color_threshold`` (the code uses 0.1 with it).
    2. Without gradient (done by the method, given as :class:`SIMInputs`), the full teacher forward on
       ``inputs.images``; its dynamic mask head at the student's positives (same ``im_inds``/``loc_inds``/``locations``/
       ``levels``, i.e. the same GT assignment, §5.1) gives teacher mask probabilities ``p'``
       ``[K, h4, w4]``; its stride-8 mask features are bilinearly upsampled ×2 (align_corners False) and
       L2-normalised: ``Z'`` ``[B, D, h4, w4]``. The full teacher is run, not the code's teacher head on
       student features (§5.1 code quirk).
    3. Instance map ``M_I`` (:func:`~boxmask.supervision.sim.instance_map`): mean of ``p'`` over the
       positives of the same GT, weighted by ``exp(μ IoU(pred box, gt box))``
       (``sim.instance_map="iou"``, paper; the boxes are the *student's* regressed boxes at the positive,
       ``SIMInputs.pred_boxes`` -- the teacher's are nearly identical at m = 0.9999) or uniform
       (``"mean"``, code).
    4. Prototype update, every step (also during the warm-up), per image in batch order: for each
       class present among the image's positives, the pixels of ``M_bin = [M_I > sim.inst_threshold] B``
       (``B`` = the GT box mask at stride 4), united over that class's positives so a pixel counts once,
       are assigned to the class's prototypes by Sinkhorn-Knopp on the teacher features ``Z'``; the
       centroids average the *student's* mask features upsampled the same way (as the released code,
       §5.3 step 4), and :func:`~boxmask.supervision.sim.update_prototypes` moves the hit prototypes with
       momentum ``sim.prototype_momentum``. Then, under ``torch.distributed``, the prototypes are
       all-reduce-averaged over processes and re-normalised along D (§5.3 step 5) -- on every rank
       every step, also when a rank has no positives, so the collective never deadlocks.
    5. From ``step >= sim.warmup_iters`` (0-based global step): ``M_S`` = semantic map of ``Z'`` against
       the (just updated) prototypes of each positive's class (temperature ``sim.temperature``; 0 = code,
       none), ``M_prob = (1 - α) M_S + α M_I`` (``α = sim.alpha``), pseudo mask and valid region by
       :func:`~boxmask.supervision.sim.pseudo_mask_targets` (``sim.low_threshold``, ``sim.high_range``,
       ``sim.inst_threshold``), and ``loss_pseudo = λ1 * pseudo_mask_loss(student logits, target, valid,
       sim.pseudo_loss)`` with ``λ1`` = :meth:`pseudo_weight` (constant, or the code's linear ramp).
       Pasted objects are left out of it (they have an exact target, step 6). Before that, ``loss_pseudo`` is a zero connected to the logits, so the loss keys
       (and Lightning's logged metrics) never change.
    6. Copy-paste (``sim.copy_paste``, §5.6), also from ``sim.warmup_iters`` on:

       * *bank fill* (here, every step): per image, the instance map ``M_I`` of each GT with positives
         is bilinearly upsampled ×4 to the padded input size; paste mask ``= [M_I > sim.inst_threshold]``
         ∧ the full-resolution box mask, score = mean ``M_I`` inside it. Instances with an empty paste
         mask are left out, at most ``sim.bank_max_instances`` highest-score ones are kept, and the
         image (with its masks) is pushed into the FIFO :class:`~boxmask.supervision.copy_paste.MemoryBank`
         of ``sim.bank_size`` entries -- unless no instance is left.
       * *pasting* (:meth:`prepare_inputs`, before the forward): once the bank is full, with probability
         ``sim.paste_prob`` per step, every image of the batch receives ``clamp(floor(sim.paste_fraction
         N), 1, sim.paste_max)`` instances (drawn with replacement, ∝ score³) of one random entry,
         cropped to the image's valid (unpadded) region; occluded objects shrink or are dropped.
       * ``loss_paste = sim.paste_weight · paste_loss(logits, paste mask, sim.pseudo_loss)`` over the
         positives of pasted objects (paste mask point-sampled at the mask stride; :func:`paste_loss`:
         BCE + dice, or the code's focal BCE + dice); zero when none.

       Random draws use a CPU generator seeded by ``(step, rank)`` only, so ``--resume`` continues
       exactly. Under DDP every process keeps its own bank; checkpoints (written by rank 0) hold rank 0's.

    Memory of the bank: an entry is its padded uint8 image plus ``N <= sim.bank_max_instances`` bool masks
    of the same size, ``(3 + N)·Hp·Wp`` bytes, so at most ``sim.bank_size · (3 + sim.bank_max_instances) ·
    Hp · Wp`` bytes of host memory (and checkpoint): ≈ 1.0 GB for 100 entries of 576×768 with 20
    instances, ≈ 0.2 GB with 3 instances. All maps and targets are float32 on the logits' device; only
    ``loss_pseudo`` and ``loss_paste`` (besides the BoxInst terms) carry gradient, to the student's logits.

    Args:
        cfg: supervision config with ``type == "sim"`` and the ``sim_*`` fields.
        num_classes: detector classes ``C >= 1`` (size of the prototype bank).
        mask_channels: ``D``, the CondInst mask-branch output channels (``model.mask_channels``).

    Raises:
        ValueError: for ``num_classes``/``mask_channels < 1`` or an unknown ``sim.instance_map`` /
            ``sim.pseudo_loss``.
    """

    def __init__(self, cfg: SupervisionConfig, num_classes: int, mask_channels: int):
        super().__init__()
        if num_classes < 1 or mask_channels < 1:
            raise ValueError(f"SIMSupervision: num_classes and mask_channels must be >= 1, got "
                             f"{num_classes} and {mask_channels}")
        if cfg.sim.instance_map not in SIM_INSTANCE_MAPS:
            raise ValueError(f"SIMSupervision: sim.instance_map must be one of {SIM_INSTANCE_MAPS}, "
                             f"got {cfg.sim.instance_map!r}")
        if cfg.sim.pseudo_loss not in SIM_PSEUDO_LOSSES:
            raise ValueError(f"SIMSupervision: sim.pseudo_loss must be one of {SIM_PSEUDO_LOSSES}, "
                             f"got {cfg.sim.pseudo_loss!r}")
        self.cfg = cfg
        self.register_buffer("prototypes", init_prototypes(num_classes, cfg.sim.num_prototypes, mask_channels))
        self.bank = MemoryBank(cfg.sim.bank_size) if cfg.sim.copy_paste else None

    def get_extra_state(self) -> dict:
        """The memory bank (:meth:`MemoryBank.state_dict`), so ``state_dict()`` and checkpoints carry it."""
        return {"bank": None if self.bank is None else self.bank.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the memory bank saved by :meth:`get_extra_state`.

        Raises:
            ValueError: if the checkpoint has a bank but copy-paste is off, or a different capacity.
        """
        bank = state.get("bank") if isinstance(state, dict) else None
        if bank is None:
            if self.bank is not None:
                self.bank.clear()
            return
        if self.bank is None:
            raise ValueError("SIMSupervision: the checkpoint holds a copy-paste memory bank but "
                             "supervision.sim.copy_paste is false")
        self.bank.load_state_dict(bank)

    def extra_repr(self) -> str:
        c, l, d = self.prototypes.shape
        bank = "off" if self.bank is None else f"{len(self.bank)}/{self.bank.capacity}"
        return f"prototypes=[{c}, {l}, {d}], warmup_iters={self.cfg.sim.warmup_iters}, bank={bank}"

    # ------------------------------------------------------------------ copy-paste
    def prepare_inputs(self, inputs: SupervisionInputs, step: int) -> SupervisionInputs:
        """SIM's online copy-paste (methods.md §5.6; class docstring, step 6) on a box-only batch view.

        Returns ``inputs`` unchanged when copy-paste is off, before ``sim.warmup_iters``, while the bank
        is not full, or when this step's draw (probability ``1 - sim.paste_prob``) says so; otherwise a
        new view with pasted ``images`` (uint8 ``[B,3,Hp,Wp]``, a copy), updated ``boxes``/``labels`` and
        ``pasted``/``paste_masks`` set. The input tensors are not modified.
        """
        cfg = self.cfg
        if self.bank is None or step < cfg.sim.warmup_iters or not self.bank.full:
            return inputs
        rank, world = _rank_world()
        g = torch.Generator().manual_seed(_PASTE_SEED * 1_000_003 + step * world + rank)
        if float(torch.rand((), generator=g)) >= cfg.sim.paste_prob:
            return inputs
        images = inputs.images.clone()
        boxes, labels, pasted, paste_masks = [], [], [], []
        for b in range(images.shape[0]):
            entry = self.bank.sample(g)
            idx = select_instances(entry.scores, g, cfg.sim.paste_fraction, cfg.sim.paste_max)
            src_masks = entry.masks[idx].clone()
            h, w = inputs.image_sizes[b]
            src_masks[:, h:] = False  # paste into the image only, not its padding
            src_masks[:, :, w:] = False
            res = paste_instances(images[b], inputs.boxes[b], inputs.labels[b], None, entry.image, src_masks,
                                  entry.labels[idx])
            images[b] = res.image
            boxes.append(res.boxes.to(inputs.boxes[b].dtype))
            labels.append(res.labels)
            pasted.append(res.pasted)
            paste_masks.append(res.masks & res.pasted[:, None, None])
        return SupervisionInputs(images=images, image_sizes=inputs.image_sizes, orig_sizes=inputs.orig_sizes,
                                 boxes=boxes, labels=labels, masks=None, has_mask=None, pasted=pasted,
                                 paste_masks=paste_masks)

    @torch.no_grad()
    def _fill_bank(self, instances: MaskInstances, inputs: SupervisionInputs, m_inst: Tensor) -> None:
        """Push one :class:`PasteEntry` per image of the batch (class docstring, step 6, bank fill)."""
        cfg = self.cfg
        hp, wp = inputs.images.shape[-2:]
        for b in torch.unique(instances.im_inds).tolist():
            in_image = torch.nonzero(instances.im_inds == b).flatten()
            gts, first = np.unique(instances.gt_inds[in_image].cpu().numpy(), return_index=True)
            rows = in_image[torch.as_tensor(first, device=in_image.device)]
            gt_boxes = inputs.boxes[b][torch.as_tensor(gts)].to(m_inst.device)
            masks, scores = [], []
            for lo in range(0, len(rows), _UPSAMPLE_CHUNK):
                probs = F.interpolate(m_inst[rows[lo:lo + _UPSAMPLE_CHUNK], None], size=(hp, wp), mode="bilinear",
                                      align_corners=False)[:, 0]
                m, sc = paste_masks_and_scores(probs, box_masks_full_res(gt_boxes[lo:lo + _UPSAMPLE_CHUNK], (hp, wp)),
                                               cfg.sim.inst_threshold)
                masks.append(m)
                scores.append(sc)
            cls = inputs.labels[b].to(m_inst.device)[torch.as_tensor(gts, device=m_inst.device)]
            entry = paste_entry(inputs.images[b], torch.cat(masks), torch.cat(scores), cls, cfg.sim.bank_max_instances)
            if entry is not None:
                self.bank.push(entry)

    # ------------------------------------------------------------------ losses
    def losses(self, instances: MaskInstances, inputs: SupervisionInputs, step: int,
               sim_inputs: SIMInputs | None = None) -> dict[str, Tensor]:
        """BoxInst losses + ``loss_pseudo`` + ``loss_paste`` for one batch (see the class docstring for the steps).

        Args:
            instances: sampled positives: ``logits`` float ``[K,1,h4,w4]``, ``im_inds``, ``gt_inds``, ``labels``.
            inputs: the box-only view of the batch (uint8 ``images``, per-image ``boxes``/``labels``).
            step: 0-based global optimisation step (warm-ups).
            sim_inputs: the teacher's outputs and the student's features at the same positives; may be
                None only when ``K == 0``.

        Returns:
            ``{"loss_proj", "loss_pairwise", "loss_pseudo", "loss_paste"}``, float32 scalars.

        Raises:
            ValueError: ``sim_inputs`` missing (or without ``pred_boxes`` for ``sim.instance_map="iou"``) while
                ``K > 0``, or teacher probabilities of another size than the logits.
        """
        cfg = self.cfg
        logits = instances.logits.float()
        # a +0 (not -0, which logs oddly) that keeps the logits in the graph
        zero = logits.new_zeros(()) + 0.0 * logits.sum()
        if len(instances) == 0:
            out = boxinst_losses(cfg, instances, inputs, step)
            self._sync_prototypes()  # every rank must join the collective
            out.update(loss_pseudo=zero, loss_paste=zero)
            return out
        size = tuple(logits.shape[-2:])
        self._check_inputs(sim_inputs, size)
        with torch.no_grad():
            t_probs, t_feats_raw = sim_inputs.teacher_probs, sim_inputs.teacher_feats
            t_feats = F.normalize(t_feats_raw, dim=1, eps=_NORM_EPS)
            box_masks = instance_box_masks(instances, inputs)
            pasted, paste_targets = self._paste_targets(instances, inputs)
            if pasted is not None:
                box_masks = torch.where(pasted[:, None, None], paste_targets, box_masks)
            scale = feature_similarity(t_feats_raw, cfg.pairwise_dilation) if cfg.sim.pairwise_features else None
        out = boxinst_losses(cfg, instances, inputs, step, box_masks=box_masks, similarity_scale=scale)
        with torch.no_grad():
            weights = None
            if cfg.sim.instance_map == "iou":
                weights = iou_weights(sim_inputs.pred_boxes, _instance_gt_boxes(instances, inputs), cfg.sim.iou_mu)
            m_inst = instance_map(t_probs, instances.gt_inds, instances.im_inds, weights)
            self._update_prototypes(instances, sim_inputs.student_feats, m_inst, box_masks, t_feats, size)
        self._sync_prototypes()
        if step < cfg.sim.warmup_iters:
            out.update(loss_pseudo=zero, loss_paste=zero)
            return out
        with torch.no_grad():
            if self.bank is not None:
                self._fill_bank(instances, inputs, m_inst)
            m_sem = self._semantic_maps(instances, t_feats)
            m_prob = (1.0 - cfg.sim.alpha) * m_sem + cfg.sim.alpha * m_inst
            target, valid = pseudo_mask_targets(m_prob, m_inst, box_masks, instances.gt_inds, instances.im_inds,
                                                cfg.sim.low_threshold, tuple(cfg.sim.high_range),
                                                cfg.sim.inst_threshold)
            if pasted is not None:
                valid = valid & ~pasted[:, None, None]
        out["loss_pseudo"] = self.pseudo_weight(step) * pseudo_mask_loss(logits, target, valid, cfg.sim.pseudo_loss)
        if pasted is not None and bool(pasted.any()):
            sel = torch.nonzero(pasted).flatten()
            out["loss_paste"] = cfg.sim.paste_weight * paste_loss(logits[sel], paste_targets[sel], cfg.sim.pseudo_loss)
        else:
            out["loss_paste"] = zero
        return out

    def pseudo_weight(self, step: int) -> float:
        """λ1 at 0-based ``step``: ``sim.pseudo_weight``, times ``min(step / sim.pseudo_ramp_iters, 1)``
        when the code's ramp is on (methods.md §5.5; the pseudo loss itself starts at ``sim.warmup_iters``)."""
        ramp = self.cfg.sim.pseudo_ramp_iters
        return self.cfg.sim.pseudo_weight * (min(step / ramp, 1.0) if ramp > 0 else 1.0)

    @staticmethod
    def _paste_targets(instances: MaskInstances, inputs: SupervisionInputs) -> tuple[Tensor | None, Tensor | None]:
        """bool ``[K]`` pasted flag and float32 ``[K,h,w]`` paste mask (point-sampled at the mask stride,
        like box masks) of each positive; ``(None, None)`` for a batch without pastes."""
        if inputs.pasted is None or inputs.paste_masks is None:
            return None, None
        device, s = instances.logits.device, instances.stride
        flags = torch.cat([p.to(device) for p in inputs.pasted])
        pasted = flags[instances.gt_rows([len(p) for p in inputs.pasted])]
        h, w = instances.logits.shape[-2:]
        targets = instances.logits.new_zeros((len(instances), h, w), dtype=torch.float32)
        for k in torch.nonzero(pasted).flatten().tolist():
            m = inputs.paste_masks[int(instances.im_inds[k])][int(instances.gt_inds[k])]
            targets[k] = m[s // 2::s, s // 2::s][:h, :w].to(device=device, dtype=torch.float32)
        return pasted, targets

    def _check_inputs(self, sim_inputs: SIMInputs | None, size: tuple[int, ...]) -> None:
        if sim_inputs is None:
            raise ValueError("SIMSupervision: no SIMInputs (teacher outputs) for a batch with positives; the SIM "
                             "method (boxmask.methods.sim) provides them")
        if self.cfg.sim.instance_map == "iou" and sim_inputs.pred_boxes is None:
            raise ValueError("SIMSupervision: sim.instance_map='iou' needs SIMInputs.pred_boxes (CondInst positives)")
        if tuple(sim_inputs.teacher_probs.shape[-2:]) != size:
            raise ValueError(f"SIMSupervision: teacher mask probabilities are {tuple(sim_inputs.teacher_probs.shape[-2:])}, "
                             f"student logits {size}")

    @torch.no_grad()
    def _update_prototypes(self, instances: MaskInstances, student_feats: Tensor, m_inst: Tensor, box_masks: Tensor,
                           t_feats: Tensor, size: tuple[int, int]) -> None:
        """Per-image prototype update from the ``M_bin`` pixels (methods.md §5.3 steps 1-4), in place."""
        cfg = self.cfg
        m_bin = (m_inst > cfg.sim.inst_threshold) & (box_masks > 0.5)  # [K,h,w]
        if not bool(m_bin.any()):
            return
        s_feats = _upsample_normalised(student_feats, size)  # student features for the centroids
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
                                           cfg.sim.prototype_momentum, cfg.sim.sinkhorn_epsilon,
                                           cfg.sim.sinkhorn_iters, centroid_feats=torch.cat(centroid))
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
        temperature = self.cfg.sim.temperature if self.cfg.sim.temperature > 0 else None
        maps = semantic_map(t_feats[pairs // num_classes], self.prototypes[pairs % num_classes], temperature)
        return maps[pair_of]
