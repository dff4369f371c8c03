"""Console output of the command line: third-party noise silenced unless ``-v``, terminal detection.

Only messages that tell a user nothing about their data, config or run are silenced: Lightning's
``rank_zero_info`` lines (the "💡 Tip" advertisement, "GPU available: ...", "`Trainer.fit` stopped")
and one deprecation warning raised inside Lightning. Warnings (``rank_zero_warn``, ``UserWarning``s
about a dataset or config) are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator, TextIO

__all__ = ["NOISY_LOGGERS", "NOISY_WARNINGS", "quiet_third_party", "is_terminal"]

#: loggers whose INFO records are Lightning's chatter; their WARNING+ records still pass. Lightning
#: sets the level of ``lightning.pytorch``/``lightning.fabric`` when imported, never of these children,
#: so their levels can be set before Lightning is imported.
NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",  # rank_zero_info: litlogger tip, GPU/TPU available, fit stopped
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "lightning.pytorch.accelerators.cuda",  # "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"
)  # kept: "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" (shows that every DDP process is up)

#: ``(message regex, category)`` of third-party warnings raised by library internals, not by user input
NOISY_WARNINGS = (
    # torch >= 2.10 deprecates LeafSpec; Lightning's _pytree still builds one on every batch transfer
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Within the block, silence :data:`NOISY_LOGGERS` (INFO) and :data:`NOISY_WARNINGS`; restore both after.

    With ``verbose`` nothing is silenced, and boxmask's own INFO log records (dataset statistics etc.)
    are printed to stderr as well.
    """
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        own = logging.getLogger("boxmask")
        level = own.level
        own.addHandler(handler)
        own.setLevel(logging.INFO)
        try:
            yield
        finally:
            own.removeHandler(handler)
            own.setLevel(level)
        return
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message, category in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def is_terminal(stream: TextIO | None = None) -> bool:
    """True if ``stream`` (default ``sys.stdout``, where Lightning's bar writes) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
