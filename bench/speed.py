"""Speed benchmark: BoxInst training-step time split by stage, loss-path time and peak memory against
a reference-style implementation, and inference throughput.

    python bench/speed.py --configs r50 lite0 --reps 5 --warmup 2 [--device cuda] [--dataset DIR]

For each config (``r50``: ResNet-50-FPN 256 ch at 800x1333; ``lite0``: EfficientNet-Lite0-FPN with
the head sizes of the packaged recipe ``boxinst_effnet-lite0_fpn_dsb2018-sample`` at 512x512; both
batch 2, random-initialised backbone -- weights do not change the cost) on a real batch (the first
images with boxes of ``--dataset``, default ``../shared/data/nuts`` beside the repo or the bundled
sample, resized to exactly the stated size with their boxes), it measures, as medians over
``--reps`` repetitions after ``--warmup`` untimed ones (``torch.cuda.synchronize`` around each on GPU):

* ``step_s``: one training step as the trainer runs it: forward (bf16 autocast on CUDA, as the
  ``auto`` precision; fp32 on CPU), backward, gradient clipping when the recipe sets it, SGD step;
* the split, each measured on its own with a detached boundary: ``backbone_fpn_s`` (forward +
  backward of backbone and FPN), ``heads_s`` (FCOS head, FCOS target assignment and losses, mask
  branch, instance sampling and dynamic mask head, forward + backward), ``loss_path_s`` (the
  box-supervision losses, below), ``optimizer_s`` (clipping + ``optimizer.step()``); their sum
  ``split_sum_s`` is close to ``step_s`` but not equal (separate launches, no overlap);
* ``loss_path_s``: our box-supervision loss path (``BoxInstSupervision.losses``: LAB + colour
  similarity on the device, box masks, projection loss, pairwise loss; forward + backward to the
  mask logits) and ``ref_loss_path_s``: the reference-style path of ``bench/reference_losses.py``
  (scikit-image ``rgb2lab`` per image on the CPU, ``F.unfold`` similarity and pairwise loss), on the
  same inputs: the mask logits of the sampled instances of one forward pass of the model, the same
  images, sizes and boxes; plus the per-stage times of both paths (``*_lab_similarity_s``,
  ``*_projection_s``, ``*_pairwise_s``);
* ``step_peak_mem_bytes``: bytes allocated by one training step (activations, gradients, temporaries;
  parameters and momentum buffers already exist), and on CUDA ``step_peak_mem_total_bytes``, the
  absolute ``max_memory_allocated`` of the step;
* peak memory (``mem_method``): on CUDA ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before the measured call; on CPU the
  allocation/free events of PyTorch's CPU allocator recorded by ``torch.profiler`` with
  ``profile_memory=True``, summed in event order, the peak of that running sum (bytes allocated
  inside the call and not yet freed). Both count only PyTorch tensors: the host-side NumPy arrays of
  the reference's scikit-image conversion are reported separately (``ref_loss_host_numpy_peak_bytes``,
  ``tracemalloc``), so ``loss_mem_ratio`` is, if anything, in the reference's favour;
* ``loss_max_rel_diff``: the largest ``|ours - ref| / |ref|`` over the projection and pairwise
  losses (weights 1, warm-up done), and ``pairwise_grad_max_rel_diff``: ``max|g_ours - g_ref| / max|g_ref|``
  of the pairwise loss's gradients with respect to the mask logits (the projection loss's gradient is
  not compared: at exact ties of its max -- aligned-bilinear upsampling replicates the border row and
  column -- ``amax`` splits the gradient and ``max(dim)`` gives it to one element, both valid);
* ``infer_img_per_s``: ``model.predict`` on one image at a time in eval mode under ``no_grad``
  (fp32, as ``boxmask predict``), with the score threshold at 0 so every image yields the
  ``max_detections`` (100) instances a trained model gives on a crowded image, masks pasted at the
  stated size.

* with ``--levelset``: the same network with the level-set head trained by ``supervision.type=levelset``
  (BoxLevelSet losses, methods.md §3.3): ``levelset_step_s``, ``levelset_loss_path_s`` (MSTs, tree
  filters, energies and projection, forward + backward), ``levelset_fraction`` (target <= 0.3) and
  ``levelset_loss_peak_mem_bytes``.

* with ``--sim``: the same network trained by ``supervision.type=sim`` (methods.md §5) with every SIM
  path active -- teacher forward, prototype update, pseudo-mask loss, bank fill and copy-paste with
  probability 1 from a full bank, EMA update after the optimiser step -- and ``sim.inst_threshold=0`` so a
  randomly initialised teacher's pixels all count as confident (the worst case; a trained teacher has
  fewer): ``sim_step_s`` and ``sim_overhead = sim_step_s / step_s - 1`` over the BoxInst step of the same
  line. Inference is not timed again: the teacher is training-only, a SIM checkpoint loads as the
  same network as BoxInst's.

* with ``--boxlevelset`` (instead of everything above): one ``benchmark: "boxlevelset_step"`` row per config:
  the packaged BoxLevelSet recipe with the config's backbone and size (SOLOv2 network, level-set head,
  ``supervision.type=levelset``), ``boxlevelset_step_s`` (a whole training step), ``boxlevelset_loss_path_s``
  (every ``LevelSetSupervision.losses`` call of that step, forward + backward, on detached inputs),
  ``boxlevelset_fraction`` (their ratio), ``boxlevelset_positives`` and the loss path's peak memory.
* with ``--box2mask-t`` (instead of everything above): one ``benchmark: "box2mask_t_step"`` row per config: the
  packaged Box2Mask-T recipe with the config's backbone and size (Mask2Former network,
  ``supervision.type=box2mask_t``), ``box2mask_t_step_s`` (a whole training step) and its parts:
  ``box2mask_t_backbone_s``, ``box2mask_t_pixel_decoder_s``, ``box2mask_t_transformer_decoder_s`` (forwards
  with autograd recording), ``box2mask_t_matching_s`` (Hungarian matching of every prediction set) and
  ``box2mask_t_losses_s`` (matching + losses, forward + backward, on detached outputs).
* with ``--inference`` (instead of everything above): inference rows only, ``benchmark: "inference"``, three
  per config: ``runtime`` ``pytorch`` (``model.predict``, eager, fp32, ``torch.set_num_threads(--threads)``) and
  ``onnxruntime`` twice, ``onnx_masks`` ``probabilities`` (the default export) and ``binary``
  (``--binary-masks``): the model exported by ``boxmask.engine.export`` at the stated size, batch 1, run by
  onnxruntime's CPU provider with ``intra_op_num_threads = --threads``, through ``OnnxModel.predict``: crop,
  graph, resize to the image size, threshold; each ``infer_img_per_s`` end to end (uint8 image in, boxes, scores,
  labels and binary masks at the image size out) on the same images, score threshold 0 (up to
  ``max_detections``, 100, instances per image, as above). ``onnx_outputs_match``: the same run's onnxruntime
  outputs equal PyTorch's (same number of detections, matched one-to-one; boxes within 1e-3 px, scores within
  1e-3, binary masks identical except at <= 0.1 % of the pixels). Random-initialised weights, as above
  (the cost does not depend on them; a random network's near-equal scores make the match harder, not easier).

One JSON line per config is printed and appended to ``bench/results/speed.jsonl`` (``--output``).
Targets of the issue: ``loss_speedup >= 3``, ``loss_mem_ratio <= 0.5``, ``loss_max_rel_diff <= 1e-4``,
``loss_fraction < 0.15`` (loss path / step); recorded under ``targets``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from boxmask.config import Config, SupervisionConfig, load_config
from boxmask.data.coco import CocoInstances
from boxmask.data.collate import Batch, collate_batch
from boxmask.data.sample import sample_paths
from boxmask.engine.module import build_optimizer, supervision_inputs
from boxmask.methods import supervised_losses
from boxmask.modeling import build_model, to_memory_format
from boxmask.modeling.condinst import CondInst
from boxmask.structures import MaskInstances, SupervisionInputs
from boxmask.supervision.boxinst import BoxInstSupervision, box_masks_at_stride, pairwise_loss, projection_loss
from boxmask.supervision.color import image_validity_masks, lab_color_similarity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_losses import (ref_box_bitmasks, ref_boxinst_losses, ref_color_similarity,  # noqa: E402
                              ref_image_masks, ref_pairwise_nll, ref_projection_loss)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "speed.jsonl"

#: fields every speed line carries (issue 3), besides the extra ones documented in the module doc
REQUIRED_FIELDS = ("benchmark", "config", "device", "batch", "image_size", "step_s", "loss_path_s", "ref_loss_path_s",
                   "loss_speedup", "loss_peak_mem_bytes", "ref_loss_peak_mem_bytes", "loss_mem_ratio",
                   "loss_max_rel_diff", "infer_img_per_s", "commit", "date")


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark configuration.

    recipe: packaged recipe name or None (library defaults); overrides: dotted ``key=value``
    overrides applied on top; image_size: ``(H, W)`` pixels every image is resized to; batch: images per step.
    """

    recipe: str | None
    overrides: tuple[str, ...]
    image_size: tuple[int, int]
    batch: int


CONFIGS: dict[str, BenchSpec] = {
    # library defaults = AdelaiDet BoxInst R-50-FPN: FPN 256, 4+4 head convs, mask branch 128 x 4, C_mask 16
    "r50": BenchSpec(None, ("data.builtin=sample", "model.backbone=resnet50", "model.backbone_weights=none"),
                     (800, 1333), 2),
    "lite0": BenchSpec("boxinst_effnet-lite0_fpn_dsb2018-sample", ("model.backbone_weights=none",), (512, 512), 2),
}


# ---------------------------------------------------------------------------------------------- environment
def git_commit() -> str:
    """Short commit of the repository, with ``-dirty`` when tracked files have uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_description(device: torch.device) -> str:
    """GPU name for CUDA, else ``"CPU <model> (<n> threads)"`` with torch's intra-op thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises ValueError for a CUDA device on a machine without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def parse_image_size(text: str) -> tuple[int, int]:
    """``"512"`` → ``(512, 512)``; ``"800x1333"`` → ``(800, 1333)`` (height x width, pixels).

    Raises ValueError for anything else or non-positive sizes.
    """
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"image size {text!r}: expected H or HxW in pixels") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"image size {text!r}: expected H or HxW with positive integers")
    return values[0], values[1]


# ---------------------------------------------------------------------------------------------- data
def default_dataset() -> str:
    """``../shared/data/nuts`` beside the repository when present, else ``"sample"`` (bundled DSB2018)."""
    nuts = ROOT.parent / "shared" / "data" / "nuts"
    return str(nuts) if (nuts / "annotations" / "instances_train.json").is_file() else "sample"


def load_batch(dataset: str, image_size: tuple[int, int], batch_size: int,
               size_divisibility: int = 32) -> tuple[Batch, int, str]:
    """The first ``batch_size`` train images that have boxes, resized to exactly ``image_size``.

    Args:
        dataset: ``"sample"`` (bundled DSB2018 subset) or a folder with ``images/`` and
            ``annotations/instances_train.json``.
        image_size: ``(H, W)`` pixels; aspect ratio is not kept (the benchmark states the size).
        batch_size: images in the batch.
        size_divisibility: padding multiple (32).

    Returns:
        ``(batch, num_classes, dataset_name)``; the batch is on the CPU, ``orig_sizes`` are the file sizes.

    Raises:
        FileNotFoundError: the folder lacks the JSON; ValueError: fewer than ``batch_size`` images with boxes.
    """
    if dataset == "sample":
        paths = sample_paths()
        ann, images, name = paths["train_json"], paths["image_dir"], "dsb2018-sample"
    else:
        root = Path(dataset)
        ann, images, name = root / "annotations" / "instances_train.json", root / "images", root.name
        if not ann.is_file():
            raise FileNotFoundError(f"--dataset {dataset}: {ann} not found (need images/ and annotations/instances_train.json)")
    ds = CocoInstances(ann, images, transforms=v2.Resize(image_size, antialias=True), load_masks=False,
                       check_images=False, verbose=False)
    samples = []
    for i in range(len(ds)):
        s = ds[i]
        if len(s["labels"]):
            samples.append(s)
        if len(samples) == batch_size:
            break
    if len(samples) < batch_size:
        raise ValueError(f"{ann}: only {len(samples)} images with boxes, need {batch_size}")
    return collate_batch(samples, size_divisibility), ds.num_classes, name


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``reps`` calls after ``warmup`` untimed calls.

    On CUDA the device is synchronised before and after each call. Raises ValueError if ``reps < 1``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of PyTorch CPU tensors allocated during ``fn()`` and not yet freed.

    Runs ``fn`` under ``torch.profiler.profile(profile_memory=True)``, reads the ``[memory]`` events
    of the CPU allocator from the Chrome trace (``Bytes`` > 0 for an allocation, < 0 for a free),
    orders them by time and returns the maximum of their running sum (>= 0). Frees of blocks
    allocated before the call are not reported by the profiler and so do not lower the sum.
    Memory not allocated through PyTorch (NumPy, Python objects) is not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        trace = json.loads(Path(path).read_text())
    finally:
        os.unlink(path)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    mem = [e for e in events if e.get("name") == "[memory]" and int(e.get("args", {}).get("Device Type", 0)) == 0]
    mem.sort(key=lambda e: (float(e["ts"]), int(e["args"].get("Ev Idx", 0))))
    live = peak = 0
    for e in mem:
        live += int(e["args"]["Bytes"])
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes allocated by ``fn()`` above what was allocated before it, and the method used.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before.
    CPU: :func:`cpu_peak_bytes`.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base), "cuda_max_memory_allocated"
    return cpu_peak_bytes(fn), "torch_profiler_cpu_allocator_events"


def host_numpy_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes traced by ``tracemalloc`` during ``fn()`` (NumPy arrays and Python objects, not torch tensors)."""
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return int(peak)


# ---------------------------------------------------------------------------------------------- model pieces
def backbone_fpn_forward(model: CondInst, images: torch.Tensor) -> list[torch.Tensor]:
    """Normalise uint8 ``[B,3,Hp,Wp]`` images and run backbone + FPN → P3–P7 (:meth:`CondInst.fpn_features`)."""
    return model.fpn_features(images)


def heads_forward(model: CondInst, feats: list[torch.Tensor],
                  inputs: SupervisionInputs) -> tuple[dict[str, torch.Tensor], MaskInstances]:
    """FCOS head + targets + losses, mask branch, BoxInst instance sampling and dynamic mask head on
    FPN features: :meth:`CondInst.forward_train_from_fpn`, the part of a training step between the FPN and
    the mask supervision.

    Returns ``(fcos_losses, instances)``; ``instances.logits`` is float ``[K,1,Hp/4,Wp/4]``.
    """
    out = model.forward_train_from_fpn(feats, inputs.boxes, inputs.labels)
    return out.detector_losses, out.instance_groups[0]


def unit_supervision_config(cfg: SupervisionConfig) -> SupervisionConfig:
    """``cfg`` with loss weights 1 and no pairwise warm-up, so the losses are the raw BoxInst terms."""
    return dataclasses.replace(cfg, projection_weight=1.0, pairwise_weight=1.0, pairwise_warmup_iters=0)


@dataclass
class LossInputs:
    """Inputs shared by both loss paths: detached float32 mask logits ``[K,1,h,w]`` of the sampled
    instances, their image / GT indices and labels (int64 ``[K]``), the batch view and the mask stride."""

    logits: torch.Tensor
    im_inds: torch.Tensor
    gt_inds: torch.Tensor
    labels: torch.Tensor
    inputs: SupervisionInputs
    stride: int = 4


def ours_loss_path(li: LossInputs, cfg: SupervisionConfig,
                   backward: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Our path: ``BoxInstSupervision(cfg).losses`` (+ backward). Returns the losses and d(sum)/d(logits)."""
    logits = li.logits.detach().requires_grad_(backward)
    inst = MaskInstances(logits, li.im_inds, li.gt_inds, li.labels, li.stride)
    losses = BoxInstSupervision(cfg).losses(inst, li.inputs, step=0)
    if backward:
        sum(losses.values()).backward()
    return losses, logits.grad


def ref_loss_path(li: LossInputs, cfg: SupervisionConfig,
                  backward: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Reference-style path (``bench/reference_losses.py``) on the same inputs (+ backward)."""
    logits = li.logits.detach().requires_grad_(backward)
    inp = li.inputs
    losses = ref_boxinst_losses(logits, li.im_inds, li.gt_inds, inp.images, inp.image_sizes, inp.orig_sizes,
                                inp.boxes, stride=li.stride, bottom_pixels_removed=cfg.bottom_pixels_removed,
                                color_threshold=cfg.color_threshold, dilation=cfg.pairwise_dilation)
    if backward:
        sum(losses.values()).backward()
    return losses, logits.grad


def _stage_fns(li: LossInputs, cfg: SupervisionConfig) -> dict[str, Callable[[], object]]:
    """Per-stage closures of both paths: LAB + similarity (+ box masks), projection, pairwise.

    The projection and pairwise closures run forward + backward on a fresh leaf copy of the logits,
    with our similarity and box masks as targets for both paths; the pairwise ones return the
    gradient with respect to the logits.
    """
    inp = li.inputs
    stride, device = li.stride, li.logits.device
    padded_hw = (int(inp.images.shape[-2]), int(inp.images.shape[-1]))
    counts = [len(b) for b in inp.boxes]
    first = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
    gidx = first[li.im_inds] + li.gt_inds
    all_boxes = torch.cat(inp.boxes).float()

    def ours_sim():
        rows = [int(cfg.bottom_pixels_removed * h / oh) for (h, _), (oh, _) in zip(inp.image_sizes, inp.orig_sizes)]
        valid = image_validity_masks(inp.image_sizes, padded_hw, rows, device)
        similarity = lab_color_similarity(inp.images, valid, stride, cfg.pairwise_dilation)
        return similarity, box_masks_at_stride(all_boxes, padded_hw, stride)

    def ref_sim():
        masks = ref_image_masks(padded_hw, inp.image_sizes, inp.orig_sizes, cfg.bottom_pixels_removed, device)
        sim = ref_color_similarity(inp.images, masks, stride, 3, cfg.pairwise_dilation)
        gt_sim = torch.cat([sim[b:b + 1].repeat(n, 1, 1, 1) for b, n in enumerate(counts)])
        return gt_sim[gidx], ref_box_bitmasks(all_boxes, padded_hw, stride)[gidx]

    with torch.no_grad():
        sim, box_masks = ours_sim()
    inst_masks = box_masks[gidx]

    def ours_proj():
        x = li.logits.detach().requires_grad_(True)
        projection_loss(x, inst_masks).backward()

    def ours_pair():
        x = li.logits.detach().requires_grad_(True)
        pairwise_loss(x, sim, inst_masks, cfg.color_threshold, cfg.pairwise_dilation, im_inds=li.im_inds).backward()
        return x.grad

    def ref_proj():
        x = li.logits.detach().requires_grad_(True)
        ref_projection_loss(x.sigmoid(), inst_masks[:, None]).backward()

    def ref_pair():
        x = li.logits.detach().requires_grad_(True)
        weights = (sim[li.im_inds] >= cfg.color_threshold).float() * inst_masks[:, None]
        nll = ref_pairwise_nll(x, 3, cfg.pairwise_dilation)
        ((nll * weights).sum() / weights.sum().clamp(min=1.0)).backward()
        return x.grad

    return {"lab_similarity": ours_sim, "projection": ours_proj, "pairwise": ours_pair,
            "ref_lab_similarity": ref_sim, "ref_projection": ref_proj, "ref_pairwise": ref_pair}


def compare_losses(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, object]:
    """Relative differences of the loss values of the two paths.

    Returns ``loss_max_rel_diff`` (max over the losses of ``|a - b| / max(|b|, 1e-12)``) and
    ``loss_values`` ``{"ours": {...}, "ref": {...}}`` (floats).
    """
    ours = {k: float(v.detach()) for k, v in ours.items()}
    ref = {k: float(v.detach()) for k, v in ref.items()}
    rel = [abs(ours[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref]
    return {"loss_max_rel_diff": max(rel), "loss_values": {"ours": ours, "ref": ref}}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max(max|b|, 1e-12)`` (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


# ---------------------------------------------------------------------------------------------- benchmark
def build_bench_config(name: str, overrides: Sequence[str] = ()) -> Config:
    """The recipe of config ``name`` (see :data:`CONFIGS`) with extra dotted ``overrides``.

    Raises KeyError for an unknown name, :class:`boxmask.config.ConfigError` for a bad override.
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown benchmark config {name!r}; choose from {sorted(CONFIGS)}")
    spec = CONFIGS[name]
    return load_config(spec.recipe, [*spec.overrides, *overrides])


def run_config(name: str, *, device: str = "auto", reps: int = 5, warmup: int = 2, dataset: str | None = None,
               image_size: tuple[int, int] | None = None, batch: int | None = None, overrides: Sequence[str] = (),
               precision: str = "auto", seed: int = 0, log: Callable[[str], None] | None = None,
               levelset: bool = False, sim: bool = False) -> dict:
    """Run the whole benchmark for one config and return its JSON record (see the module doc).

    Args:
        name: a key of :data:`CONFIGS`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        reps / warmup: timed / untimed repetitions of every measurement.
        dataset: ``"sample"`` or a COCO folder; default :func:`default_dataset`.
        image_size / batch: override the config's ``(H, W)`` / batch size (for quick runs).
        overrides: dotted config overrides (e.g. ``model.fpn_channels=64``).
        precision: ``"auto"`` (bf16 autocast on CUDA when supported, else fp16; fp32 on CPU), ``"fp32"``,
            ``"bf16"``, ``"fp16"`` for the training-side forward passes. The loss paths always run in fp32.
        seed: model initialisation seed.
        log: progress callback (e.g. ``print`` to stderr); None for silence.
        levelset: also time the level-set supervision (``levelset_*`` fields, see the module doc).
        sim: also time a SIM training step (``sim_*`` fields, see the module doc).

    Raises:
        KeyError / ValueError: unknown config, bad precision or device, too few images.
    """
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    cfg = build_bench_config(name, overrides)
    spec = CONFIGS[name]
    dev = resolve_device(device)
    hw = tuple(image_size or spec.image_size)
    bsz = int(batch or spec.batch)
    dataset = dataset or default_dataset()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev.type == "cuda" else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in amp_dtype:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")

    def amp():
        if amp_dtype[precision] is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=amp_dtype[precision])

    cpu_batch, num_classes, ds_name = load_batch(dataset, hw, bsz, cfg.data.size_divisibility)
    torch.manual_seed(seed)
    model = to_memory_format(build_model(cfg.model, num_classes).to(dev).train(), cfg.trainer.channels_last)
    opt = build_optimizer(model, cfg.solver)
    sup_cfg = unit_supervision_config(cfg.supervision)
    supervision = BoxInstSupervision(sup_cfg)
    data = cpu_batch.to(dev)
    inputs = supervision_inputs(data, with_masks=False)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = float(cfg.solver.grad_clip)

    def optimizer_part():
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    def train_step():
        opt.zero_grad(set_to_none=True)
        with amp():
            losses = supervised_losses(model, supervision, inputs, 0)
        sum(losses.values()).backward()
        optimizer_part()

    # the loss inputs: the sampled instances of one forward pass (identical for both paths)
    with torch.no_grad(), amp():
        _, inst = heads_forward(model, backbone_fpn_forward(model, data.images), inputs)
    li = LossInputs(inst.logits.detach().float().contiguous(), inst.im_inds, inst.gt_inds, inst.labels, inputs,
                    inst.stride)
    say(f"[{name}] {ds_name} batch {bsz} at {hw[0]}x{hw[1]}: {len(inst)} instances, mask logits {tuple(li.logits.shape)}")

    # correctness first: same inputs, both paths
    ours, _ = ours_loss_path(li, sup_cfg)
    ref, _ = ref_loss_path(li, sup_cfg)
    diffs = compare_losses(ours, ref)
    stages = _stage_fns(li, sup_cfg)
    # the projection gradient is left out: its max over rows/columns has exact ties (aligned-bilinear
    # replicates the border row/column), where amax splits the gradient and max(dim) picks one element
    diffs["pairwise_grad_max_rel_diff"] = max_rel_diff(stages["pairwise"](), stages["ref_pairwise"]())
    say(f"[{name}] losses ours {diffs['loss_values']['ours']} ref {diffs['loss_values']['ref']}")

    # split of the step
    with torch.no_grad(), amp():
        feats0 = backbone_fpn_forward(model, data.images)
    feat_grads = [torch.full_like(f, 1e-3) for f in feats0]
    feats_in = [f.detach().requires_grad_(True) for f in feats0]
    del feats0

    def backbone_part():
        opt.zero_grad(set_to_none=True)
        with amp():
            feats = backbone_fpn_forward(model, data.images)
        torch.autograd.backward(feats, feat_grads)

    def heads_part():
        opt.zero_grad(set_to_none=True)
        for f in feats_in:
            f.grad = None
        with amp():
            losses, instances = heads_forward(model, feats_in, inputs)
        # stand-in upstream gradient for the mask logits: the cost of backward does not depend on it
        (sum(losses.values()) + 1e-3 * instances.logits.sum()).backward()

    times = {}
    say(f"[{name}] timing backbone+FPN, heads, loss paths ...")
    times["backbone_fpn_s"] = time_call(backbone_part, dev, reps, warmup)
    times["heads_s"] = time_call(heads_part, dev, reps, warmup)
    times["loss_path_s"] = time_call(lambda: ours_loss_path(li, sup_cfg), dev, reps, warmup)
    times["ref_loss_path_s"] = time_call(lambda: ref_loss_path(li, sup_cfg), dev, reps, warmup)
    for key, fn in stages.items():
        prefix, stage = ("ref_", key[4:]) if key.startswith("ref_") else ("", key)
        times[f"{prefix}loss_{stage}_s"] = time_call(fn, dev, reps, warmup)
    train_step()  # gradients and momentum buffers exist before timing the optimizer alone
    times["optimizer_s"] = time_call(optimizer_part, dev, reps, warmup)
    say(f"[{name}] timing the training step ...")
    times["step_s"] = time_call(train_step, dev, reps, warmup)

    say(f"[{name}] peak memory ...")
    opt.zero_grad(set_to_none=True)
    loss_mem, mem_method = peak_memory_bytes(lambda: ours_loss_path(li, sup_cfg), dev)
    ref_mem, _ = peak_memory_bytes(lambda: ref_loss_path(li, sup_cfg), dev)
    ref_numpy = host_numpy_peak_bytes(lambda: ref_loss_path(li, sup_cfg))
    step_mem, _ = peak_memory_bytes(train_step, dev)
    step_mem_total = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None

    say(f"[{name}] inference ...")
    model.eval()
    old_thr = model.cfg.score_threshold
    model.cfg.score_threshold = 0.0
    n_dets = []

    def infer_all():
        n_dets.clear()
        for b in range(bsz):
            h, w = data.image_sizes[b]
            preds = model.predict(data.images[b:b + 1], [(h, w)], [(h, w)])
            n_dets.append(len(preds[0].scores))

    try:
        infer_s = time_call(infer_all, dev, reps, warmup) / bsz
    finally:
        model.cfg.score_threshold = old_thr
        model.train()

    step_s = times["step_s"]
    split_sum = times["backbone_fpn_s"] + times["heads_s"] + times["loss_path_s"] + times["optimizer_s"]
    record = {
        "benchmark": "speed",
        "config": name,
        "channels_last": cfg.trainer.channels_last,
        "backbone": cfg.model.backbone,
        "fpn_channels": cfg.model.fpn_channels,
        "dataset": ds_name,
        "device": device_description(dev),
        "torch": torch.__version__,
        "precision": precision,
        "batch": bsz,
        "image_size": [int(hw[0]), int(hw[1])],
        "padded_size": [int(data.images.shape[-2]), int(data.images.shape[-1])],
        "num_instances": int(li.logits.shape[0]),
        "mask_size": [int(li.logits.shape[-2]), int(li.logits.shape[-1])],
        "reps": reps,
        "warmup": warmup,
        **{k: times[k] for k in ("step_s", "backbone_fpn_s", "heads_s", "loss_path_s", "optimizer_s")},
        "split_sum_s": split_sum,
        "loss_fraction": times["loss_path_s"] / step_s,
        "step_peak_mem_bytes": step_mem,
        "step_peak_mem_total_bytes": step_mem_total,
        "loss_lab_similarity_s": times["loss_lab_similarity_s"],
        "loss_projection_s": times["loss_projection_s"],
        "loss_pairwise_s": times["loss_pairwise_s"],
        "ref_loss_path_s": times["ref_loss_path_s"],
        "ref_loss_lab_similarity_s": times["ref_loss_lab_similarity_s"],
        "ref_loss_projection_s": times["ref_loss_projection_s"],
        "ref_loss_pairwise_s": times["ref_loss_pairwise_s"],
        "loss_speedup": times["ref_loss_path_s"] / times["loss_path_s"],
        "loss_peak_mem_bytes": loss_mem,
        "ref_loss_peak_mem_bytes": ref_mem,
        "ref_loss_host_numpy_peak_bytes": ref_numpy,
        "loss_mem_ratio": loss_mem / ref_mem if ref_mem > 0 else None,
        "mem_method": mem_method,
        **diffs,
        "infer_img_per_s": 1.0 / infer_s,
        "infer_detections_per_img": statistics.mean(n_dets) if n_dets else 0,
        "commit": git_commit(),
        "date": dt.date.today().isoformat(),
    }
    if levelset:
        say(f"[{name}] level-set supervision ...")
        record.update(levelset_timing(cfg, num_classes, data, inputs, dev, reps, warmup, seed, amp))
    if sim:
        say(f"[{name}] SIM supervision ...")
        record.update(sim_timing(cfg, num_classes, data, inputs, dev, reps, warmup, seed, amp))
        record["sim_overhead"] = record["sim_step_s"] / record["step_s"] - 1.0
    record["targets"] = {
        "loss_speedup>=3": record["loss_speedup"] >= 3.0,
        "loss_mem_ratio<=0.5": record["loss_mem_ratio"] is not None and record["loss_mem_ratio"] <= 0.5,
        "loss_max_rel_diff<=1e-4": record["loss_max_rel_diff"] <= 1e-4,
        "loss_fraction<0.15": record["loss_fraction"] < 0.15,
    }
    if levelset:
        record["targets"]["levelset_fraction<=0.3"] = record["levelset_fraction"] <= 0.3
    record["wall_s"] = time.perf_counter() - t_start
    return record


def _match_outputs(ref, got) -> bool:
    """True when two lists of ``InstancePredictions`` hold the same detections (see ``--inference``)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    for a, b in zip(ref, got):
        if len(a.scores) != len(b.scores):
            return False
        if len(a.scores) == 0:
            continue
        cost = ((a.scores[:, None] - b.scores[None]).abs() * 100 + (a.boxes[:, None] - b.boxes[None]).abs().sum(2))
        _, cols = linear_sum_assignment(np.asarray(cost.cpu()))
        cols = torch.as_tensor(cols)
        if not torch.equal(a.labels.cpu(), b.labels[cols].cpu()):
            return False
        if (a.boxes.cpu() - b.boxes[cols].cpu()).abs().max() > 1e-3 or (a.scores.cpu() - b.scores[cols].cpu()).abs().max() > 1e-3:
            return False
        if (a.masks.cpu() != b.masks[cols].cpu()).float().mean() > 1e-3:
            return False
    return True


def run_inference(name: str, *, threads: int = 2, reps: int = 5, warmup: int = 2, dataset: str | None = None,
                  image_size: tuple[int, int] | None = None, batch: int | None = None, overrides: Sequence[str] = (),
                  seed: int = 0, log: Callable[[str], None] | None = None) -> list[dict]:
    """Inference rows of config ``name`` on the CPU: PyTorch eager and onnxruntime (module doc, ``--inference``).

    Returns three records (``pytorch``; ``onnxruntime`` with probability and binary masks). Raises KeyError for an unknown config,
    :class:`boxmask.engine.export.ExportError` when onnx/onnxruntime are missing.
    """
    from boxmask.engine.export import OnnxModel, export_model

    say = log or (lambda _msg: None)
    cfg = build_bench_config(name, [*overrides, "model.score_threshold=0.0"])
    spec = CONFIGS[name]
    hw = tuple(image_size or spec.image_size)
    bsz = int(batch or spec.batch)
    dataset = dataset or default_dataset()
    torch.set_num_threads(threads)
    data, num_classes, ds_name = load_batch(dataset, hw, bsz, cfg.data.size_divisibility)
    torch.manual_seed(seed)
    model = to_memory_format(build_model(cfg.model, num_classes).eval(), cfg.trainer.channels_last)
    sizes = [tuple(s) for s in data.image_sizes]

    def predict_all(m):
        return [m.predict(data.images[b:b + 1], [sizes[b]], [sizes[b]])[0] for b in range(bsz)]

    with tempfile.TemporaryDirectory() as tmp:
        say(f"[{name}] export ...")
        t0 = time.perf_counter()
        meta = {"class_names": [f"class{i}" for i in range(num_classes)], "cat_ids": list(range(1, num_classes + 1))}
        export_model(model, cfg, meta, Path(tmp) / "model.onnx", image_size=sizes[0])
        export_s = time.perf_counter() - t0
        export_model(model, cfg, meta, Path(tmp) / "binary.onnx", image_size=sizes[0], binary_masks=True)
        runners = {"probabilities": OnnxModel(Path(tmp) / "model.onnx", threads=threads),
                   "binary": OnnxModel(Path(tmp) / "binary.onnx", threads=threads)}
        with torch.no_grad():
            ref = predict_all(model)
            outputs = {kind: predict_all(r) for kind, r in runners.items()}
        match = {kind: _match_outputs(ref, got) for kind, got in outputs.items()}
        rows = []
        import onnxruntime

        for runtime, kind, m in (("pytorch", None, model), ("onnxruntime", "probabilities", runners["probabilities"]),
                                 ("onnxruntime", "binary", runners["binary"])):
            say(f"[{name}] inference, {runtime} {kind or ''} ...")
            with torch.no_grad():
                infer_s = time_call(lambda: predict_all(m), torch.device("cpu"), reps, warmup) / bsz
            rows.append({
                "benchmark": "inference", "config": name, "channels_last": cfg.trainer.channels_last,
                "backbone": cfg.model.backbone,
                "fpn_channels": cfg.model.fpn_channels, "dataset": ds_name, "weights": "random init",
                "device": device_description(torch.device("cpu")), "runtime": runtime, "onnx_masks": kind,
                "threads": threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "image_size": [int(hw[0]), int(hw[1])], "images": bsz, "reps": reps, "warmup": warmup,
                "infer_img_per_s": 1.0 / infer_s,
                "infer_detections_per_img": statistics.mean(len(p.scores) for p in (outputs[kind] if kind else ref)),
                # pytorch rows: both exports matched; onnxruntime rows: this export matched
                "onnx_outputs_match": match[kind] if kind else all(match.values()), "export_s": export_s,
                "commit": git_commit(), "date": dt.date.today().isoformat(),
            })
    return rows


class _Recording:
    """A box supervision that also keeps every ``MaskInstances`` it is called with (``instances``), so that its
    loss path can be timed again on the same inputs. Reads no masks."""


    def __init__(self, supervision):
        self.supervision, self.instances = supervision, []

    def losses(self, instances, inputs, step):
        self.instances.append(instances)
        return self.supervision.losses(instances, inputs, step)


@dataclasses.dataclass
class _StepSetup:
    spec: BenchSpec
    cfg: Config
    dev: torch.device
    hw: tuple[int, int]
    bsz: int
    ds_name: str
    num_classes: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    data: object
    inputs: object
    params: list


def _recipe_step_setup(table: dict[str, BenchSpec], name: str, device: str, dataset: str | None,
                       image_size: tuple[int, int] | None, batch: int | None, overrides: Sequence[str],
                       seed: int) -> _StepSetup:
    """What a recipe's training-step benchmark starts from (``--boxlevelset``, ``--box2mask-t``): the recipe of
    config ``name`` in ``table`` with ``overrides``, one batch of ``dataset`` at the size, a randomly
    initialised network in train mode on the device, its optimiser, the box-only supervision view. Raises
    KeyError for an unknown config."""
    if name not in table:
        raise KeyError(f"unknown benchmark config {name!r}; choose from {sorted(table)}")
    spec = table[name]
    cfg = load_config(spec.recipe, [*spec.overrides, *overrides])
    dev = resolve_device(device)
    hw = tuple(image_size or spec.image_size)
    bsz = int(batch or spec.batch)
    cpu_batch, num_classes, ds_name = load_batch(dataset or default_dataset(), hw, bsz, cfg.data.size_divisibility)
    torch.manual_seed(seed)
    model = to_memory_format(build_model(cfg.model, num_classes).to(dev).train(), cfg.trainer.channels_last)
    data = cpu_batch.to(dev)
    return _StepSetup(spec, cfg, dev, hw, bsz, ds_name, num_classes, model, build_optimizer(model, cfg.solver), data,
                      supervision_inputs(data, with_masks=False), [p for p in model.parameters() if p.requires_grad])


#: the BoxLevelSet recipe timed by ``--boxlevelset`` for each config (same backbone and input size)
BOXLEVELSET_RECIPES: dict[str, BenchSpec] = {
    "r50": BenchSpec("boxlevelset_R_50_FPN_3x", ("data.builtin=sample", "model.backbone_weights=none"), (800, 1333), 2),
    "lite0": BenchSpec("boxlevelset_effnet-lite0_fpn_dsb2018-sample", ("model.backbone_weights=none",), (512, 512), 2),
}


def run_boxlevelset(name: str, *, device: str = "auto", reps: int = 5, warmup: int = 2, dataset: str | None = None,
                    image_size: tuple[int, int] | None = None, batch: int | None = None,
                    overrides: Sequence[str] = (), seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """The share of BoxLevelSet's level-set loss in a SOLOv2 training step (``--boxlevelset``, module doc).

    The packaged BoxLevelSet recipe of config ``name`` (:data:`BOXLEVELSET_RECIPES`: SOLOv2 network with the
    5-channel level-set head, ``supervision.type=levelset``), random weights, fp32. Times a full training
    step (forward, targets, all losses, backward, clip, optimiser step) and the loss path alone: every call
    of ``LevelSetSupervision.losses`` of that step (one per mask stride group) forward + backward on the
    captured instances' detached logits and ``F_ls`` (MSTs, tree filters, energies, projection). Returns the
    JSON record (``boxlevelset_step_s``, ``boxlevelset_loss_path_s``, ``boxlevelset_fraction``,
    ``boxlevelset_positives``, ``boxlevelset_loss_peak_mem_bytes``). Raises KeyError for an unknown config.
    """
    from boxmask.supervision.levelset import LevelSetSupervision

    say = log or (lambda _msg: None)
    b = _recipe_step_setup(BOXLEVELSET_RECIPES, name, device, dataset, image_size, batch, overrides, seed)
    spec, cfg, dev, hw, bsz, ds_name = b.spec, b.cfg, b.dev, b.hw, b.bsz, b.ds_name
    model, opt, inputs, params = b.model, b.opt, b.inputs, b.params
    supervision = LevelSetSupervision(cfg.supervision)
    recorder = _Recording(supervision)
    captured = recorder.instances

    def step():
        captured.clear()
        opt.zero_grad(set_to_none=True)
        losses = supervised_losses(model, recorder, inputs, 0)
        sum(losses.values()).backward()
        if cfg.solver.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.solver.grad_clip)
        opt.step()

    say(f"[{name}] BoxLevelSet step ...")
    step()
    groups = [(inst, inst.logits.detach().float(), inst.level_set_feats.detach().float()) for inst in captured]

    def loss_path():
        total = 0
        for inst, logits, feats in groups:
            inst.logits = logits.clone().requires_grad_(True)
            inst.level_set_feats = feats.clone().requires_grad_(True)
            total = total + sum(supervision.losses(inst, inputs, 0).values())
        total.backward()

    step_s = time_call(step, dev, reps, warmup)
    say(f"[{name}] level-set loss path ...")
    loss_s = time_call(loss_path, dev, reps, warmup)
    mem, _ = peak_memory_bytes(loss_path, dev)
    return {
        "benchmark": "boxlevelset_step", "config": name, "recipe": spec.recipe, "backbone": cfg.model.backbone,
        "channels_last": cfg.trainer.channels_last,
        "dataset": ds_name, "device": device_description(dev), "torch": torch.__version__, "precision": "fp32",
        "batch": bsz, "image_size": [int(hw[0]), int(hw[1])], "reps": reps, "warmup": warmup,
        "boxlevelset_positives": sum(len(g[1]) for g in groups),
        "boxlevelset_step_s": step_s, "boxlevelset_loss_path_s": loss_s, "boxlevelset_fraction": loss_s / step_s,
        "boxlevelset_loss_peak_mem_bytes": mem, "commit": git_commit(), "date": dt.date.today().isoformat(),
    }


#: the Box2Mask-T recipe timed by ``--box2mask-t`` for each config
BOX2MASK_T_RECIPES: dict[str, BenchSpec] = {
    "r50": BenchSpec("box2mask_t_R_50_50e", ("data.builtin=sample", "model.backbone_weights=none"), (800, 1333), 2),
    "lite0": BenchSpec("box2mask_t_effnet-lite0_nuts", ("data.builtin=sample", "model.backbone_weights=none"),
                       (512, 512), 2),
}


def run_box2mask_t(name: str, *, device: str = "auto", reps: int = 5, warmup: int = 2, dataset: str | None = None,
                   image_size: tuple[int, int] | None = None, batch: int | None = None,
                   overrides: Sequence[str] = (), seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """A Box2Mask-T training step split into its parts (``--box2mask-t``, module doc).

    The packaged recipe of config ``name`` (:data:`BOX2MASK_T_RECIPES`: Mask2Former network,
    ``supervision.type=box2mask_t``), random weights, fp32. Times the whole training step (forward, matching,
    losses, backward, clip, optimiser step) and, forward only with autograd recording as in training, the
    backbone, the pixel decoder and the transformer decoder; the Hungarian matching of every prediction set;
    and the losses (forward + backward on the detached outputs, matching included). Returns the JSON record
    (``box2mask_t_step_s``, ``box2mask_t_backbone_s``, ``box2mask_t_pixel_decoder_s``,
    ``box2mask_t_transformer_decoder_s``, ``box2mask_t_matching_s``, ``box2mask_t_losses_s``). Raises KeyError
    for an unknown config.
    """
    from boxmask.methods import method_for
    from boxmask.structures import QueryOutputs

    say = log or (lambda _msg: None)
    b = _recipe_step_setup(BOX2MASK_T_RECIPES, name, device, dataset, image_size, batch, overrides, seed)
    spec, cfg, dev, hw, bsz, ds_name = b.spec, b.cfg, b.dev, b.hw, b.bsz, b.ds_name
    model, opt, data, inputs, params = b.model, b.opt, b.data, b.inputs, b.params
    supervision = method_for(cfg, b.num_classes).supervision

    def step():
        opt.zero_grad(set_to_none=True)
        losses = supervised_losses(model, supervision, inputs, 0)
        sum(losses.values()).backward()
        if cfg.solver.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.solver.grad_clip)
        opt.step()

    x = (data.images.float() - model.pixel_mean) / model.pixel_std
    feats = model.backbone(x)
    mask_features, multi_scale = model.pixel_decoder(feats)
    out = model.forward_train(data.images, inputs.boxes, inputs.labels)
    detached = QueryOutputs([c.detach() for c in out.class_logits], [m.detach() for m in out.mask_logits],
                            out.anchor.detach(), out.stride,
                            None if out.level_set_feats is None else out.level_set_feats.detach())

    def losses_path():
        fresh = QueryOutputs([c.clone().requires_grad_(True) for c in detached.class_logits],
                             [m.clone().requires_grad_(True) for m in detached.mask_logits], detached.anchor,
                             detached.stride, None if detached.level_set_feats is None
                             else detached.level_set_feats.clone().requires_grad_(True))
        sum(supervision.losses(fresh, inputs, 0).values()).backward()

    say(f"[{name}] Box2Mask-T step ...")
    row = {"box2mask_t_step_s": time_call(step, dev, reps, warmup)}
    say(f"[{name}] parts ...")
    row["box2mask_t_backbone_s"] = time_call(lambda: model.backbone(x), dev, reps, warmup)
    row["box2mask_t_pixel_decoder_s"] = time_call(lambda: model.pixel_decoder(feats), dev, reps, warmup)
    row["box2mask_t_transformer_decoder_s"] = time_call(lambda: model.decoder(multi_scale, mask_features), dev,
                                                        reps, warmup)
    row["box2mask_t_matching_s"] = time_call(lambda: supervision.matches(detached, inputs), dev, reps, warmup)
    row["box2mask_t_losses_s"] = time_call(losses_path, dev, reps, warmup)
    return {
        "benchmark": "box2mask_t_step", "config": name, "recipe": spec.recipe, "backbone": cfg.model.backbone,
        "channels_last": cfg.trainer.channels_last,
        "dataset": ds_name, "device": device_description(dev), "torch": torch.__version__, "precision": "fp32",
        "batch": bsz, "image_size": [int(hw[0]), int(hw[1])], "reps": reps, "warmup": warmup,
        "queries": cfg.model.mask2former.num_queries, "decoder_layers": cfg.model.mask2former.decoder_layers,
        "gt_instances": sum(len(b) for b in inputs.boxes), **row,
        "commit": git_commit(), "date": dt.date.today().isoformat(),
    }


def levelset_timing(cfg: Config, num_classes: int, data, inputs, dev: torch.device, reps: int, warmup: int,
                    seed: int, amp: Callable[[], contextlib.AbstractContextManager]) -> dict:
    """Training step and loss path with ``supervision.type=levelset`` (BoxLevelSet losses on CondInst).

    Same model with the 5-channel level-set head, projection weight 3.0 (methods.md §3.6). Returns
    ``levelset_step_s`` (full step), ``levelset_loss_path_s`` (``LevelSetSupervision.losses`` forward +
    backward on the sampled instances' detached logits and ``F_ls``: MSTs of image and ``F_ls``, two tree
    filters, energies, projection), ``levelset_fraction`` (their ratio) and ``levelset_loss_peak_mem_bytes``.
    """
    from boxmask.supervision.levelset import LevelSetSupervision

    ls_cfg = dataclasses.replace(cfg.model, level_set_channels=5)
    sup_cfg = dataclasses.replace(cfg.supervision, type="levelset", projection_weight=3.0)
    torch.manual_seed(seed)
    model = to_memory_format(build_model(ls_cfg, num_classes).to(dev).train(), cfg.trainer.channels_last)
    opt = build_optimizer(model, cfg.solver)
    supervision = LevelSetSupervision(sup_cfg)
    recorder = _Recording(supervision)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp():
            losses = supervised_losses(model, recorder, inputs, 0)
        sum(losses.values()).backward()
        opt.step()

    step()
    inst = recorder.instances[-1]
    logits0 = inst.logits.detach().float()
    feats0 = inst.level_set_feats.detach().float()

    def loss_path():
        inst.logits = logits0.clone().requires_grad_(True)
        inst.level_set_feats = feats0.clone().requires_grad_(True)
        sum(supervision.losses(inst, inputs, 0).values()).backward()

    step_s = time_call(step, dev, reps, warmup)
    loss_s = time_call(loss_path, dev, reps, warmup)
    mem, _ = peak_memory_bytes(loss_path, dev)
    return {"levelset_step_s": step_s, "levelset_loss_path_s": loss_s, "levelset_fraction": loss_s / step_s,
            "levelset_loss_peak_mem_bytes": mem}


def sim_timing(cfg: Config, num_classes: int, data, inputs, dev: torch.device, reps: int, warmup: int,
               seed: int, amp: Callable[[], contextlib.AbstractContextManager]) -> dict:
    """A full SIM training step on the same network and batch (``sim_step_s``, see the module doc).

    Step = copy-paste (:meth:`SIMSupervision.prepare_inputs`, probability 1, from a bank filled with
    the batch's own images and filled-box masks) + student forward + teacher forward + SIM losses
    (prototype update, pseudo-mask and paste losses, bank fill) + backward + optimiser step + EMA update.
    """
    import copy

    from boxmask.methods.sim import SIMMethod
    from boxmask.supervision.copy_paste import PasteEntry, box_masks_full_res

    sim_cfg = copy.deepcopy(cfg)
    sim_cfg.supervision.type = "sim"
    sim_cfg.supervision.sim = dataclasses.replace(cfg.supervision.sim, warmup_iters=0, inst_threshold=0.0, paste_prob=1.0)
    torch.manual_seed(seed)
    holder = torch.nn.Module()  # stands in for the training module: the method registers its teacher on it
    holder.model = model = to_memory_format(build_model(cfg.model, num_classes).to(dev).train(),
                                            cfg.trainer.channels_last)
    method = SIMMethod(sim_cfg, num_classes)
    method.setup(holder)
    opt = build_optimizer(model, cfg.solver)
    supervision = method.supervision.to(dev)
    hw = tuple(inputs.images.shape[-2:])
    while not supervision.bank.full:
        for b in range(inputs.images.shape[0]):
            boxes = inputs.boxes[b]
            supervision.bank.push(PasteEntry(inputs.images[b], box_masks_full_res(boxes, hw).to(inputs.images.device),
                                             inputs.labels[b], torch.ones(len(boxes), device=inputs.images.device)))

    def step():
        opt.zero_grad(set_to_none=True)
        pasted = method.prepare_inputs(inputs, 1)
        with amp():
            losses = method.losses(model, pasted, 1)
        sum(losses.values()).backward()
        opt.step()
        method.after_optimizer_step(holder)

    return {"sim_step_s": time_call(step, dev, reps, warmup), "sim_bank_entries": len(supervision.bank),
            "sim_bank_bytes": supervision.bank.nbytes}


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI entry point; returns the records it printed and appended."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions before timing")
    ap.add_argument("--dataset", default=None, help="'sample' or a COCO folder (images/, annotations/instances_train.json); "
                    "default ../shared/data/nuts when present, else sample")
    ap.add_argument("--image-size", default=None, help="override every config's size: H or HxW pixels (quick runs)")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override applied to every config (repeatable)")
    ap.add_argument("--levelset", action="store_true",
                    help="also time the level-set supervision (BoxLevelSet losses on the same network)")
    ap.add_argument("--sim", action="store_true",
                    help="also time a SIM training step (teacher, prototypes, pseudo masks, copy-paste)")
    ap.add_argument("--boxlevelset", action="store_true",
                    help="only the BoxLevelSet rows: level-set loss share of a SOLOv2 training step")
    ap.add_argument("--box2mask-t", dest="box2mask_t", action="store_true",
                    help="only the Box2Mask-T rows: a training step split into backbone, pixel decoder, transformer "
                         "decoder, matching and losses")
    ap.add_argument("--inference", action="store_true",
                    help="only the inference rows: PyTorch eager and onnxruntime on the CPU with --threads (default 2)")
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON-lines file to append to")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    image_size = parse_image_size(args.image_size) if args.image_size else None
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []

    def emit(rec: dict) -> None:
        rec.setdefault("overrides", list(args.overrides))  # e.g. trainer.channels_last=false (~20 % on the CPU)
        line = json.dumps(rec)
        print(line, flush=True)
        with out.open("a") as f:
            f.write(line + "\n")
        records.append(rec)

    if args.boxlevelset:
        for name in args.configs:
            emit(run_boxlevelset(name, device=args.device, reps=args.reps, warmup=args.warmup, dataset=args.dataset,
                                 image_size=image_size, batch=args.batch, overrides=args.overrides,
                                 log=lambda m: print(m, file=sys.stderr, flush=True)))
        return records
    if args.box2mask_t:
        for name in args.configs:
            emit(run_box2mask_t(name, device=args.device, reps=args.reps, warmup=args.warmup, dataset=args.dataset,
                                image_size=image_size, batch=args.batch, overrides=args.overrides,
                                log=lambda m: print(m, file=sys.stderr, flush=True)))
        return records
    if args.inference:
        for name in args.configs:
            for rec in run_inference(name, threads=args.threads or 2, reps=args.reps, warmup=args.warmup,
                                     dataset=args.dataset, image_size=image_size, batch=args.batch,
                                     overrides=args.overrides, log=lambda m: print(m, file=sys.stderr, flush=True)):
                emit(rec)
        return records
    for name in args.configs:
        rec = run_config(name, device=args.device, reps=args.reps, warmup=args.warmup, dataset=args.dataset,
                         image_size=image_size, batch=args.batch, overrides=args.overrides, precision=args.precision,
                         log=lambda m: print(m, file=sys.stderr, flush=True), levelset=args.levelset,
                         sim=args.sim)
        emit(rec)
    return records


if __name__ == "__main__":
    main()
