"""Shared fixtures: small trained checkpoints built once per session and shared by the CLI, annotate and SIM
tests. Plain helpers and constants (``TINY``, ``tiny_cfg``, the garbage-mask helper, ...) are in
``helpers.py``; no test module imports another test module."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from helpers import SIM_RUN, TINY, with_garbage_masks

# The suite runs on one CPU thread: tiny models are faster that way on the 2-core CI machine and the
# exact-resume/equality tests rely on it. (This used to be a side effect of importing test_sim_training.)
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The files that hold the slow real-data trainings run first (each file's own order kept): under the README's
    ``-n 2 --dist loadfile --no-loadscope-reorder`` each starts at once on its own worker while the other
    worker takes the short tests, instead of one starting last and setting the suite's length alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def garbage_masks():
    """The garbage-mask helper: ``garbage_masks(batch, flip_has_mask=False)`` is a deep copy of ``batch``
    whose GT masks are random noise."""
    return with_garbage_masks


@pytest.fixture(scope="session")
def boxinst_checkpoint(tmp_path_factory):
    """A 2-step BoxInst (CondInst network) checkpoint of the tiny sample recipe, trained through
    ``boxmask train``; shared by the CLI and annotate tests (read-only: copy it before changing it)."""
    from boxmask.cli import main

    out = tmp_path_factory.mktemp("boxinst_run")
    with _threads(1):
        rc = main(["train", "boxinst_effnet-lite0_fpn_dsb2018-sample", *TINY, f"trainer.output_dir={out}",
                   "solver.max_iters=2"])
    assert rc == 0
    ckpt = out / "checkpoints" / "model_final.ckpt"
    assert ckpt.is_file() and (out / "config.yaml").is_file() and any((out / "logs" / "csv").glob("version_*/metrics.csv"))
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2
    return ckpt


#: an untrained SOLOv2 detects only with these: score threshold 0 and no Matrix NMS filter
SOLOV2_LOOSE = ["model.score_threshold=0.0", "model.mask_threshold=0.3", "model.solov2.matrix_nms_filter=0.0"]


@pytest.fixture(scope="session")
def boxlevelset_checkpoint(tmp_path_factory):
    """A 2-step BoxLevelSet (SOLOv2 network) checkpoint of the tiny sample recipe (``SOLOV2_LOOSE`` inference
    thresholds), trained through ``boxmask train``; shared by the SOLOv2 CLI/annotate tests (read-only)."""
    from boxmask.cli import main

    out = tmp_path_factory.mktemp("boxlevelset_run")
    with _threads(1):
        rc = main(["train", "boxlevelset_effnet-lite0_fpn_dsb2018-sample", *TINY, "model.solov2.head_channels=32",
                   "model.mask_channels=16", f"trainer.output_dir={out}", "solver.max_iters=2", *SOLOV2_LOOSE])
    assert rc == 0
    ckpt = out / "checkpoints" / "model_final.ckpt"
    assert ckpt.is_file() and json.loads((out / "summary.json").read_text())["global_step"] == 2
    return ckpt


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory):
    """The summary of an uninterrupted 4-step SIM run (``helpers.SIM_RUN``: copy-paste from a 2-entry bank on
    every step after the first; ``model.score_threshold=0`` so that the barely trained student detects), trained
    through ``boxmask train``; shared by the SIM resume, checkpoint
    loading and CLI tests (read-only)."""
    from boxmask.cli import main

    out = tmp_path_factory.mktemp("sim_run")
    with _threads(1):
        rc = main(["train", "boxinst_effnet-lite0_fpn_dsb2018-sample", *TINY, *SIM_RUN, f"trainer.output_dir={out}",
                   "solver.max_iters=4", "model.score_threshold=0.0"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4
    return summary
