"""What a training run writes to a log file: plain progress lines, no third-party chatter, start/end report."""

import logging
import math
import os
import re
import subprocess
import sys
import warnings

from boxmask.config import resolve_config_path
from boxmask.console import quiet_third_party
from boxmask.engine.progress import format_duration

from helpers import TINY

RECIPE = "boxinst_effnet-lite0_fpn_dsb2018-sample"


def test_non_tty_training_writes_plain_quiet_lines(tmp_path):
    out = tmp_path / "run"
    steps, every = 3, 2
    cmd = [sys.executable, "-m", "boxmask.cli", "train", RECIPE, *TINY, f"solver.max_iters={steps}",
           "trainer.progress_bar=true", f"trainer.progress_every={every}", "trainer.eval_after_train=true",
           "-o", str(out), "--device", "cpu"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # bytes, not text=True: universal newlines would turn a \r into \n
    proc = subprocess.run(cmd, capture_output=True, timeout=600, env=env)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    both = stdout + stderr
    assert proc.returncode == 0, both[-3000:]
    assert "\r" not in both
    for noise in ("litlogger", "Tip:", "GPU available", "LeafSpec", "`Trainer.fit` stopped"):
        assert noise not in both, noise

    lines = re.findall(rf"^step (\d+)/{steps}  loss [\d.]+  lr [\d.e-]+  [\d.]+ it/s  ETA [\d:?]+$", stdout, re.M)
    logged = [int(s) for s in lines]
    assert logged == [2, 3]  # every N steps, and the last
    assert len(logged) <= math.ceil(steps / every)
    assert len(re.findall(r"^step ", both, re.M)) == len(logged)

    run = out.resolve()
    ckpt = run / "checkpoints" / "model_final.ckpt"
    assert f"recipe   {resolve_config_path(RECIPE).resolve()}" in stdout
    assert f"output   {run}" in stdout
    assert re.search(r"^metrics  mask AP \d+\.\d \(its boxes filled: \d+\.\d\), box AP \d+\.\d", stdout, re.M)
    tail = stdout[stdout.index("\nnext:\n"):]
    assert f"boxmask eval {ckpt}\n" in tail
    assert f"boxmask predict {ckpt} " in tail and f"-o {run / 'predictions'}" in tail
    assert f"boxmask annotate {ckpt} --ann-file " in tail
    assert stdout.index("recipe   ") < stdout.index("step 2/") < stdout.index("next:")


def test_quiet_third_party_silences_only_the_noise():
    import lightning.pytorch  # noqa: F401 - sets the levels that quiet_third_party must override
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    rz = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rz.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_third_party():
                rank_zero_info("💡 Tip: try installing [litlogger]")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
                warnings.warn("instances_train.json: 3 degenerate boxes skipped", UserWarning)
            assert [str(w.message) for w in caught] == ["instances_train.json: 3 degenerate boxes skipped"]
            assert records == []
            rank_zero_info("restored after the block")  # levels are restored on exit
            assert [r.getMessage() for r in records] == ["restored after the block"]
            with quiet_third_party(verbose=True):
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
                rank_zero_info("verbose shows it")
            assert "LeafSpec" in str(caught[-1].message) and records[-1].getMessage() == "verbose shows it"
    finally:
        rz.removeHandler(handler)


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 + 62, float("nan"), float("inf"))] == \
        ["0:00", "0:59", "1:01", "1:01:02", "?", "?"]
