"""Typed configuration: dataclasses, YAML recipes and dotted ``key=value`` overrides.

A recipe is a YAML file whose top-level keys mirror :class:`Config` (``data``, ``model``,
``supervision``, ``solver``, ``trainer``). Unknown keys are errors, so a typo never passes
silently. Packaged recipes (``src/boxmask/configs/*.yaml``) can be named without a path; a recipe's
first comment line is its one-line description (``boxmask recipes``, :mod:`boxmask.recipes`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


#: ``supervision.type`` values, one per method (:mod:`boxmask.methods` says what each one is and reads)
SUPERVISION_TYPES = ("boxinst", "full", "mixed", "levelset", "sim", "box2mask_t")

#: ``supervision.sim.instance_map`` choices: paper exp(mu IoU)-weighted mean / code plain mean (methods.md §5.4)
SIM_INSTANCE_MAPS = ("iou", "mean")
#: ``supervision.sim.pseudo_loss`` choices: paper BCE + dice / code focal-style BCE (methods.md §5.5)
SIM_PSEUDO_LOSSES = ("paper", "code")


class ConfigError(ValueError):
    """A recipe or override is malformed (unknown key, wrong type, missing file)."""


@dataclass
class DataConfig:
    """Datasets and augmentation (sizes in pixels)."""

    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    #: "sample" uses the bundled DSB2018 subset for both splits (paths above are ignored).
    builtin: str = ""
    min_sizes: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    #: photometric augmentation in training (off by default; :func:`boxmask.data.transforms.build_photometric`):
    #: ColorJitter strengths [brightness, contrast, saturation, hue] (torchvision ranges: the first three
    #: >= 0, hue in [0, 0.5]), and the probabilities of a grayscale copy and of an inverted image
    #: (dark-on-bright <-> bright-on-dark, e.g. brightfield vs fluorescence microscopy)
    color_jitter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    grayscale_prob: float = 0.0
    invert_prob: float = 0.0
    #: box-adaptive scale (training and ``annotate``; :class:`boxmask.data.transforms.BoxAdaptiveResize`):
    #: each image is scaled up so that the median side sqrt(w*h) of its boxes is at least this many
    #: pixels (never below the fixed-size rule above; longer side at most ``box_size_max``); 0 = off.
    #: End-to-end eval/predict never use it (no boxes at test time); ``annotate --fit`` turns it on
    box_size: float = 0.0
    box_size_max: int = 1600
    size_divisibility: int = 32
    #: images per device per step
    batch_size: int = 2
    num_workers: int = 2
    check_images: bool = True


#: model architectures: CondInst (FCOS + dynamic mask head, methods.md §1) and SOLOv2 (BoxLevelSet, §3.1)
ARCHITECTURES = ("condinst", "solov2", "mask2former")


@dataclass
class SOLOv2Config:
    """``model.solov2``: the SOLOv2-style network of BoxLevelSet (methods.md §3.1, §3.4; Wang et al. 2020)."""

    #: channels of the category/kernel branches (512 in the reference)
    head_channels: int = 512
    #: grid number S per level P2..P6
    grids: list[int] = field(default_factory=lambda: [40, 36, 24, 16, 12])
    #: inclusive sqrt(w*h) range per level, pixels of the resized image
    scale_ranges: list[list[float]] = field(
        default_factory=lambda: [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]])
    #: centre-region scale (SOLO's epsilon)
    sigma: float = 0.2
    #: octaves of Fourier position features (sin/cos of 2^k*pi*u, k < this, u the cell-centre position
    #: in [-1, 1]) given to the kernel branch after the S x S resize and to F_mask's last conv; 0 = the reference
    #: (linear coordinates only)
    coord_freqs: int = 0
    #: a position prior in the dynamic kernel: each cell's mask logits get ``sum_k w_k R_k`` besides ``K · F_mask``,
    #: with ``R`` = a constant and Gaussians of the distance to the cell centre (sigma 0.5, 1, 2, 4 cell sizes) and
    #: ``w`` predicted by the kernel branch (initialised to ``-2 + 4 g_1``: a one-cell blob). Not in SOLOv2: it
    #: gives the linear kernel what CondInst's relative coordinates give its mask head. false = the reference;
    #: the short Lite0 BoxLevelSet recipes set true (issue 13: it is what lets them learn in a few hundred steps)
    position_prior: bool = False
    #: Matrix NMS gaussian kernel sigma and the score kept after the decay
    matrix_nms_sigma: float = 2.0
    matrix_nms_filter: float = 0.025

    def validate(self, where: str = "model.solov2") -> None:
        """Value checks. Raises :class:`ConfigError`."""
        if len(self.grids) != 5 or len(self.scale_ranges) != 5:
            raise ConfigError(f"{where}.grids and {where}.scale_ranges need one entry per level P2..P6 (5), got "
                              f"{len(self.grids)} and {len(self.scale_ranges)}")
        if any(len(r) != 2 or not 0 <= r[0] <= r[1] for r in self.scale_ranges):
            raise ConfigError(f"{where}.scale_ranges must be [lo, hi] pairs with 0 <= lo <= hi, got {self.scale_ranges}")
        if any(g < 1 for g in self.grids):
            raise ConfigError(f"{where}.grids must be positive, got {self.grids}")
        if not 0 <= self.coord_freqs <= 12:
            raise ConfigError(f"{where}.coord_freqs must be in [0, 12], got {self.coord_freqs}")
        if not self.sigma > 0 or self.head_channels < 1:
            raise ConfigError(f"{where}.sigma must be > 0 and {where}.head_channels >= 1, got {self.sigma} and "
                              f"{self.head_channels}")


@dataclass
class Mask2FormerConfig:
    """``model.mask2former``: sizes of the Mask2Former network (defaults = Mask2Former R-50 / Box2Mask-T,
    methods.md §4.1 and §4.5; Cheng et al. CVPR 2022 Sec. 4.1).

    Attributes:
        hidden_dim: channels of the pixel decoder and of the queries (256).
        num_queries: learned object queries ``Q`` (100).
        encoder_layers: deformable-attention encoder layers of the pixel decoder (6).
        encoder_ffn: hidden width of the encoder FFN (1024).
        decoder_layers: masked-attention decoder layers (9); the network makes ``1 + decoder_layers``
            prediction sets.
        heads: attention heads of encoder and decoder (8).
        n_points: sampling points per head and level of the deformable attention (4).
        n_levels: backbone levels in the deformable encoder, the coarsest of C3-C5 (3 = strides 8/16/32);
            the decoder cycles through them.
        mask_dim: channels of the mask features and of the mask embeddings (256).
        decoder_ffn: hidden width of the decoder FFN (2048).
        level_set_channels: channels of Box2Mask-T's level-set feature head ``F_ls`` (1; 0 = no head).
        dropout: dropout of attention and FFN (0.0).
    """

    hidden_dim: int = 256
    num_queries: int = 100
    encoder_layers: int = 6
    encoder_ffn: int = 1024
    decoder_layers: int = 9
    decoder_ffn: int = 2048
    heads: int = 8
    n_points: int = 4
    n_levels: int = 3
    mask_dim: int = 256
    level_set_channels: int = 1
    dropout: float = 0.0

    def validate(self, where: str = "model.mask2former") -> None:
        """Value checks.

        Raises:
            ConfigError: a size is not an int of the allowed range (``level_set_channels >= 0``, ``n_levels``
                in 1..3, the others >= 1), ``hidden_dim`` is not a multiple of 32 (GroupNorm(32) groups) or of
                ``heads``, or ``dropout`` is outside ``[0, 1)``.
        """
        for name in ("hidden_dim", "num_queries", "encoder_layers", "encoder_ffn", "decoder_layers",
                     "decoder_ffn", "heads", "n_points", "n_levels", "mask_dim", "level_set_channels"):
            val = getattr(self, name)
            lowest = 0 if name == "level_set_channels" else 1
            if isinstance(val, bool) or not isinstance(val, int) or val < lowest:
                raise ConfigError(f"{where}.{name} must be an int >= {lowest}, got {val!r}")
        if self.n_levels > 3:
            raise ConfigError(f"{where}.n_levels must be 1, 2 or 3 (of backbone C3-C5), got {self.n_levels}")
        if self.hidden_dim % 32:
            raise ConfigError(f"{where}.hidden_dim must be a multiple of 32 (GroupNorm with 32 groups), "
                             f"got {self.hidden_dim}")
        if self.hidden_dim % self.heads:
            raise ConfigError(f"{where}.hidden_dim ({self.hidden_dim}) must be divisible by heads ({self.heads})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class ModelConfig:
    """CondInst = backbone ► FPN P3–P7 ► FCOS head + mask branch + dynamic mask head (methods.md §1);
    ``arch: solov2`` = backbone ► FPN P2–P6 ► SOLOv2 category/kernel branches + unified mask features
    (BoxLevelSet, methods.md §3.1). The section ``solov2`` holds that architecture's own fields; for it
    ``mask_branch_channels``/``mask_channels`` are the mask-feature branch's inner/output channels (the
    output is also the dynamic kernel dimension) and ``head_convs`` the branch depth."""

    #: "condinst" or "solov2"
    arch: str = "condinst"
    backbone: str = "resnet50"
    #: "imagenet", a local file path, or "none" (random init).
    backbone_weights: str = "imagenet"
    #: a boxmask checkpoint whose network weights start the training (fine-tuning, e.g. ``annotate --fit``);
    #: applied after ``backbone_weights``. Class-logit rows are matched by class name (a class the
    #: checkpoint does not know keeps its fresh initialisation); "" = off
    init_checkpoint: str = ""
    freeze_at: int = 2
    fpn_channels: int = 256
    head_convs: int = 4
    prior_prob: float = 0.01
    center_sampling_radius: float = 1.5
    #: upper bounds of max(l,t,r,b) per level P3..P6 (P7 unbounded), pixels
    size_of_interest: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    mask_branch_channels: int = 128
    mask_branch_convs: int = 4
    #: C_mask: 16 for BoxInst, 8 for CondInst
    mask_channels: int = 16
    dynamic_channels: int = 8
    dynamic_layers: int = 3
    #: BoxInst: top-k positives per image used for the mask losses (-1 = off)
    topk_proposals_per_image: int = 64
    #: CondInst: random positives per device (-1 = off)
    max_proposals: int = -1
    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_threshold: float = 0.6
    max_detections: int = 100
    mask_threshold: float = 0.5
    #: inference: cut each predicted mask to its largest 8-connected component before its score and box are
    #: taken (``arch: mask2former`` only; False = the reference's post-processing). The Lite0 Box2Mask-T
    #: recipes set True, chosen on a nuts dev split of train images (README)
    mask_largest_component: bool = False
    #: channels of the level-set feature head F_ls (BoxLevelSet: 5; 0 = no head). Required by
    #: ``supervision.type=levelset``; a conv3x3 on the mask-branch output, upsampled to stride 4
    level_set_channels: int = 0
    #: the SOLOv2 network's own fields (``arch: solov2``; methods.md §3.1, §3.4)
    solov2: SOLOv2Config = field(default_factory=lambda: SOLOv2Config())
    #: the Mask2Former network's own fields (``arch: mask2former``, Box2Mask-T; methods.md §4.1)
    mask2former: Mask2FormerConfig = field(default_factory=lambda: Mask2FormerConfig())


@dataclass
class LevelSetConfig:
    """``supervision.levelset``: weights and target sharpness of BoxLevelSet's energies (methods.md §3.3)."""

    #: weight of the energy on the input image (low-level target, §3.3)
    img_weight: float = 0.05
    #: weight of the energy on the tree-filtered deep features F_ls (high-level target, §3.3)
    deep_weight: float = 5.0
    #: weight of the curve-length (smoothness) term; 0 in the reference
    length_weight: float = 0.0
    #: tree-filter sigmas of the low-level (image) and high-level (deep) targets
    low_sigma: float = 0.02
    high_sigma: float = 1.0


@dataclass
class SIMConfig:
    """``supervision.sim``: SIM (methods.md §5; defaults = paper values, "code" notes the released-code variant)."""

    #: teacher EMA momentum per optimiser step (§5.1)
    teacher_momentum: float = 0.9999
    #: prototypes per class L and their EMA momentum (§5.3)
    num_prototypes: int = 10
    prototype_momentum: float = 0.999
    #: Sinkhorn-Knopp entropy epsilon and iterations of the prototype assignment (§5.3)
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    #: semantic-map temperature tau (paper 0.1); 0 = code: no temperature (§5.4)
    temperature: float = 0.1
    #: instance map: "iou" = paper exp(mu IoU)-weighted mean, "mean" = code plain mean (§5.4)
    instance_map: str = "iou"
    iou_mu: float = 5.0
    #: M_prob = (1 - alpha) M_S + alpha M_I (§5.4)
    alpha: float = 0.5
    #: tau_low, clamp range of the adaptive tau_high, and the M_I threshold of the confident pixels
    #: (counts for tau_high and M_bin = [M_I > thr] B of the prototype update) (§5.3-5.4)
    low_threshold: float = 0.4
    high_range: list[float] = field(default_factory=lambda: [0.7, 0.8])
    inst_threshold: float = 0.7
    #: lambda_1 of the pseudo-mask loss and its form: "paper" (BCE + dice) or "code" (focal BCE) (§5.5)
    pseudo_weight: float = 0.5
    pseudo_loss: str = "paper"
    #: code: the pseudo-mask weight ramps as pseudo_weight * min(step / this, 1) (code 270000 with
    #: weight 0.3); 0 = paper, constant weight (§5.5)
    pseudo_ramp_iters: int = 0
    #: iterations with BoxInst losses only; the pseudo-mask loss is on from this step (0-based) (§5.4)
    warmup_iters: int = 10000
    #: online weakly-supervised copy-paste (§5.6): on/off, FIFO bank size (paper 100, code 50), at most
    #: this many (highest-score) instances stored per bank entry (bounds the bank's memory, see
    #: SIMSupervision), paste probability per step once the bank is full, share of an entry's instances
    #: pasted (code 0.5, paper 0.25) and their maximum, lambda_2 of the paste loss
    copy_paste: bool = True
    bank_size: int = 100
    bank_max_instances: int = 20
    paste_prob: float = 0.5
    paste_fraction: float = 0.5
    paste_max: int = 3
    paste_weight: float = 1.0
    #: code-only feature-aware pairwise affinity (§5.2): pairwise edges use S_feat * S_LAB >= color_threshold
    #: (the code sets color_threshold 0.1 with it); False = paper/BoxInst colour-only affinity
    pairwise_features: bool = False

    def validate(self, where: str = "supervision.sim") -> None:
        """Value checks (methods.md §5). Raises :class:`ConfigError`."""
        if self.instance_map not in SIM_INSTANCE_MAPS:
            raise ConfigError(f"{where}.instance_map must be one of {list(SIM_INSTANCE_MAPS)}, got {self.instance_map!r}")
        if self.pseudo_loss not in SIM_PSEUDO_LOSSES:
            raise ConfigError(f"{where}.pseudo_loss must be one of {list(SIM_PSEUDO_LOSSES)}, got {self.pseudo_loss!r}")
        for name in ("teacher_momentum", "prototype_momentum", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{where}.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_prototypes < 1:
            raise ConfigError(f"{where}.num_prototypes must be >= 1, got {self.num_prototypes}")
        if not self.sinkhorn_epsilon > 0 or self.sinkhorn_iters < 0:
            raise ConfigError(f"{where}.sinkhorn_epsilon must be > 0 and sinkhorn_iters >= 0, got "
                              f"{self.sinkhorn_epsilon} and {self.sinkhorn_iters}")
        if self.temperature < 0:
            raise ConfigError(f"{where}.temperature must be >= 0 (0 = no temperature), got {self.temperature}")
        if len(self.high_range) != 2 or not self.high_range[0] <= self.high_range[1]:
            raise ConfigError(f"{where}.high_range must be [lo, hi] with lo <= hi, got {self.high_range}")
        if self.warmup_iters < 0:
            raise ConfigError(f"{where}.warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.pseudo_ramp_iters < 0:
            raise ConfigError(f"{where}.pseudo_ramp_iters must be >= 0, got {self.pseudo_ramp_iters}")
        for name in ("bank_size", "bank_max_instances", "paste_max"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.paste_prob <= 1.0:
            raise ConfigError(f"{where}.paste_prob must be in [0, 1], got {self.paste_prob}")
        if not 0.0 < self.paste_fraction <= 1.0:
            raise ConfigError(f"{where}.paste_fraction must be in (0, 1], got {self.paste_fraction}")
        if self.paste_weight < 0:
            raise ConfigError(f"{where}.paste_weight must be >= 0, got {self.paste_weight}")


@dataclass
class Box2MaskTConfig:
    """Weights of Box2Mask-T's matching and losses (defaults: methods.md §4.5, BoxInstSeg ``Box2MaskHead``)."""

    #: weight of the classification CE (over all queries of a set)
    class_weight: float = 2.0
    #: CE class weight of the "no object" class (objects: 1); the CE is divided by the sum of the weights
    no_object_weight: float = 0.1
    #: weight of the box projection dice loss (eps 1e-5) on the matched masks
    projection_weight: float = 5.0
    #: weight of the whole level-set loss, and inside it the image / deep energies and the LCM term
    levelset_weight: float = 1.0
    img_weight: float = 0.05
    deep_weight: float = 5.0
    lcm_weight: float = 0.2
    #: Hungarian matching cost: class and box-projection-dice weights, dice smoothing eps
    match_class_weight: float = 2.0
    match_box_weight: float = 5.0
    match_eps: float = 1.0
    #: True (methods.md §4.2): the box cost compares the mask logits upsampled (aligned bilinear) to the full
    #: padded resolution with the full-resolution box masks; False: at the mask stride against the bilinear
    #: stride-4 box masks of the losses (16x less memory and work, an approximation of the reference)
    match_full_resolution: bool = True
    #: side of the square grid the tree filters and the LCM work on (96x96)
    work_size: int = 96
    #: local consistency module: neighbour dilation, refinement iterations, affinity temperature
    lcm_dilation: int = 2
    lcm_iterations: int = 10
    lcm_alpha: float = 0.3
    #: tree-filter ranges of the image tree and of the level-set-feature tree (as BoxLevelSet, §3.3)
    low_sigma: float = 0.02
    high_sigma: float = 1.0
    #: mask-supervised reference (:class:`Box2MaskTFullSupervision`): BCE and dice weights, used for both the
    #: matching cost and the losses (Mask2Former)
    mask_bce_weight: float = 5.0
    mask_dice_weight: float = 5.0

    def validate(self, where: str = "supervision.box2mask_t") -> None:
        """Value checks. Raises :class:`~boxmask.config.ConfigError` (a ValueError) naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "match_full_resolution":
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}.{f.name} must be a bool, got {value!r}")
            elif f.name in ("work_size", "lcm_dilation", "lcm_iterations"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{where}.{f.name} must be an int, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0.0 <= float(value) < float("inf")):
                raise ConfigError(f"{where}.{f.name} must be a finite number >= 0, got {value!r}")
        for name in ("no_object_weight", "lcm_alpha", "low_sigma", "high_sigma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name} must be > 0, got {getattr(self, name)!r}")
        if self.work_size < 2:
            raise ConfigError(f"{where}.work_size must be >= 2, got {self.work_size}")
        if self.lcm_dilation < 1:
            raise ConfigError(f"{where}.lcm_dilation must be >= 1, got {self.lcm_dilation}")
        if self.lcm_iterations < 0:
            raise ConfigError(f"{where}.lcm_iterations must be >= 0, got {self.lcm_iterations}")


@dataclass
class SupervisionConfig:
    """Which mask supervision trains the mask head (methods.md §2)."""

    #: the method (:mod:`boxmask.methods`): "boxinst" (box labels only), "full" (CondInst dice on real masks),
    #: "mixed" (dice where an annotation has a mask, BoxInst losses where it has only a box), "levelset" (box
    #: labels only: BoxLevelSet's projection + Chan-Vese energies, either network), "sim" (box labels only:
    #: BoxInst losses + SIM's teacher/prototype pseudo-mask loss, methods.md §5; CondInst only)
    type: str = "boxinst"
    pairwise_dilation: int = 2
    color_threshold: float = 0.3
    pairwise_warmup_iters: int = 10000
    #: original-image rows ignored at the bottom (COCO artefact); 0 for non-COCO data
    bottom_pixels_removed: int = 10
    projection_weight: float = 1.0
    pairwise_weight: float = 1.0
    #: BoxLevelSet's level-set energies (methods.md §3.3; BoxLevelSet uses projection_weight 3.0)
    levelset: LevelSetConfig = field(default_factory=lambda: LevelSetConfig())
    #: SIM's teacher, prototypes, pseudo-mask loss and copy-paste (methods.md §5)
    sim: SIMConfig = field(default_factory=lambda: SIMConfig())
    #: Box2Mask-T's matching and loss weights (methods.md §4.2-4.3; also its mask-supervised reference)
    box2mask_t: Box2MaskTConfig = field(default_factory=lambda: Box2MaskTConfig())


@dataclass
class SolverConfig:
    """Optimiser and iteration-based LR schedule (methods.md §1.8)."""

    optimizer: str = "sgd"
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_iters: int = 90000
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    #: max global gradient norm; 0 disables clipping
    grad_clip: float = 0.0
    #: learning-rate multiplier of the backbone (Mask2Former / Box2Mask-T: 0.1, methods.md §4.4; 1 = off)
    backbone_lr_factor: float = 1.0


@dataclass
class TrainerConfig:
    """Lightning trainer, checkpoints, logging and evaluation."""

    output_dir: str = "runs/boxinst"
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    #: "auto" = bf16-mixed on CUDA, 32-true on CPU
    precision: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 20
    seed: int = 0
    #: evaluate on the val split after training
    eval_after_train: bool = True
    eval_max_dets: int = 100
    #: show training progress: a bar on a terminal, else (a log file) one plain line every
    #: ``progress_every`` steps with step, loss, lr, it/s and ETA (0 = every ``log_every`` steps)
    progress_bar: bool = True
    progress_every: int = 0
    #: torch CPU threads per process (0 = torch default)
    cpu_threads: int = 0
    #: run the network in the channels-last (NHWC) memory format (training, and inference from its
    #: checkpoints): oneDNN's depthwise and 3x3 convolution backward passes are much faster so on the CPU
    #: (BoxInst lite0 step at 384 px, 2 threads: ~20 % less time), and CUDA tensor cores prefer it; the
    #: numbers differ from NCHW only by float rounding
    channels_last: bool = True


@dataclass
class Config:
    """A whole recipe. The method is ``supervision.type`` (:mod:`boxmask.methods`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return asdict(self)


def _legacy_keys() -> dict[tuple[type, str], str]:
    """Flat keys of recipes written before the nested sections (issue 12), by (section type, old key):
    their new dotted key, or a sentence for a removed key."""
    table: dict[tuple[type, str], str] = {(Config, "method"): "REMOVED: the method is supervision.type"}
    for f in fields(SIMConfig):
        table[(SupervisionConfig, f"sim_{f.name}")] = f"supervision.sim.{f.name}"
    for f in fields(LevelSetConfig):
        table[(SupervisionConfig, f"levelset_{f.name}")] = f"supervision.levelset.{f.name}"
    for f in fields(SOLOv2Config):
        old = f.name if f.name.startswith("matrix_nms_") else f"solo_{f.name}"
        table[(ModelConfig, old)] = f"model.solov2.{f.name}"
    return table


def translate_legacy_config(values: dict) -> dict:
    """A copy of a recipe dict (e.g. the ``config`` of a checkpoint written before the nested sections) with
    its flat keys moved to their nested ones (``supervision.sim_alpha`` -> ``supervision.sim.alpha``,
    ``model.solo_grids`` -> ``model.solov2.grids``, ...) and the removed ``method`` key dropped. A dict
    without such keys is returned unchanged (as a copy)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for (section, old), new in _legacy_keys().items():
        owner = {Config: out, SupervisionConfig: out.get("supervision"), ModelConfig: out.get("model")}[section]
        if not isinstance(owner, dict) or old not in owner:
            continue
        value = owner.pop(old)
        if new.startswith("REMOVED"):
            continue
        _, sub, key = new.split(".")
        nested = owner.setdefault(sub, {})
        nested.setdefault(key, value)
    return out


def _merge_into(obj: Any, values: dict, where: str) -> None:
    names = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in names:
            new = _legacy_keys().get((type(obj), key))
            if new is not None and new.startswith("REMOVED"):
                raise ConfigError(f"{where}: key {key!r} was removed ({new[9:]}); delete it")
            if new is not None:
                raise ConfigError(f"{where}: key {key!r} was renamed {new!r} (nested sections); write it as {new}")
            raise ConfigError(f"{where}: unknown key {key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping, got {value!r}")
            _merge_into(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}.{key}"))


def _coerce(value: Any, current: Any, where: str) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(current, list) and not isinstance(value, list):
        value = [value]
    if current is not None and not isinstance(current, (list, str)) and not isinstance(value, type(current)):
        if isinstance(current, (int, float)) and isinstance(value, str):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(current, str) and value is None:
        return "none"
    if isinstance(current, str) and not isinstance(value, str):
        return str(value)
    return value


def packaged_config_names() -> list[str]:
    """Names of the recipes shipped inside the package (without ``.yaml``)."""
    root = importlib.resources.files("boxmask") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a packaged recipe. Raises :class:`ConfigError` if neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    candidate = importlib.resources.files("boxmask") / "configs" / f"{stem}.yaml"
    if candidate.is_file():
        return Path(str(candidate))
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a file nor a packaged recipe "
        f"(packaged: {', '.join(packaged_config_names())})"
    )


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["solver.base_lr=0.02", "data.min_sizes=[512,640]"]`` into a nested dict.

    Values are parsed as YAML scalars/lists. Raises :class:`ConfigError` on a missing ``=``.
    """
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None,
                validate: bool = True) -> Config:
    """Build a :class:`Config` from defaults, a YAML recipe (path, packaged name or dict) and overrides.

    Raises :class:`ConfigError` for unknown keys, unreadable YAML or bad override syntax, and (with
    ``validate``) for failed cross-field checks (:func:`validate_config`; off to inspect a template
    recipe whose data paths are filled in later).
    """
    cfg = Config()
    if source is not None:
        if isinstance(source, dict):
            values = source
            where = "config"
        else:
            path = resolve_config_path(source)
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
            where = str(path)
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: top level must be a mapping")
        _merge_into(cfg, values, where)
    if overrides:
        _merge_into(cfg, parse_overrides(overrides), "override")
    if validate:
        validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Value checks of every section and the cross-field checks that need no method. Raises :class:`ConfigError`.

    A method checks its own section and what it needs of the rest of the recipe (SIM: ``supervision.sim``
    and the CondInst network; BoxLevelSet: the level-set head) itself (:func:`boxmask.methods.method_class`),
    before any training starts.
    """
    if cfg.supervision.type not in SUPERVISION_TYPES:
        raise ConfigError(f"supervision.type {cfg.supervision.type!r} unknown; choose from {list(SUPERVISION_TYPES)}")
    if cfg.model.arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch {cfg.model.arch!r} unknown; choose from {list(ARCHITECTURES)}")
    if cfg.model.arch == "solov2":
        cfg.model.solov2.validate()
    if cfg.model.arch == "mask2former":
        cfg.model.mask2former.validate()
    if cfg.model.mask_largest_component and cfg.model.arch != "mask2former":
        raise ConfigError(f"model.mask_largest_component is implemented for model.arch mask2former only, "
                          f"not {cfg.model.arch!r}")
    if cfg.solver.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"solver.optimizer must be 'sgd' or 'adamw', got {cfg.solver.optimizer!r}")
    if not cfg.solver.backbone_lr_factor >= 0:
        raise ConfigError(f"solver.backbone_lr_factor must be >= 0, got {cfg.solver.backbone_lr_factor}")
    if cfg.solver.max_iters <= 0:
        raise ConfigError("solver.max_iters must be positive")
    if cfg.data.batch_size <= 0:
        raise ConfigError("data.batch_size must be positive")
    jitter = cfg.data.color_jitter
    if len(jitter) != 4 or any(v < 0 for v in jitter) or jitter[3] > 0.5:
        raise ConfigError(f"data.color_jitter must be [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5, "
                          f"got {jitter}")
    if cfg.data.box_size < 0 or cfg.data.box_size_max <= 0:
        raise ConfigError(f"data.box_size must be >= 0 and data.box_size_max > 0, got {cfg.data.box_size} and "
                          f"{cfg.data.box_size_max}")
    for name in ("grayscale_prob", "invert_prob"):
        if not 0.0 <= getattr(cfg.data, name) <= 1.0:
            raise ConfigError(f"data.{name} must be in [0, 1], got {getattr(cfg.data, name)}")
    if cfg.data.size_divisibility % 32:
        raise ConfigError("data.size_divisibility must be a multiple of 32 (P7 has stride 128 on /32 padding via ceil)")
    if not cfg.data.builtin and not cfg.data.train_json:
        raise ConfigError("data.train_json is empty and data.builtin is not set")
    if cfg.trainer.progress_every < 0:
        raise ConfigError(f"trainer.progress_every must be >= 0 (0 = trainer.log_every), got {cfg.trainer.progress_every}")
