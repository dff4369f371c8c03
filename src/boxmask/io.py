"""Atomic file writes for results, checkpoints and overlays.

Every writer here puts the data into a temporary file in the *same* folder as the
target, flushes and ``fsync``s it, then renames it over the target with
:func:`os.replace` (atomic on POSIX and on Windows for same-volume renames). A reader
therefore sees either the old file or the complete new one, never a half-written file,
even when the process is killed mid-write (e.g. a SLURM time limit during a checkpoint).
If anything fails before the rename, the temporary file is removed and the old target is
left untouched. Missing parent folders are created.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save"]


def _umask() -> int:
    # os.umask can only be read by setting it; do it once, at import (single-threaded then).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Run ``write(f)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    The new file gets the mode of the file it replaces, or ``0o666 & ~umask`` for a new
    file (``mkstemp`` alone would leave it at ``0o600``).

    Raises:
        IsADirectoryError: ``path`` is an existing folder.
        Whatever ``write`` raises; the temp file is removed and the old ``path`` kept.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: is a folder, cannot write a file there")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every OS/filesystem, so best effort.
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Args:
        path: target file; parent folders are created.
        data: the complete file content (``bytes``, ``bytearray`` or ``memoryview``).

    Returns:
        The target as a :class:`pathlib.Path`.

    Raises:
        TypeError: ``data`` is not bytes-like (checked before anything is written).
        IsADirectoryError: ``path`` is an existing folder.
        OSError: the folder cannot be created or written; the old file is kept.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{path}: atomic_write_bytes needs bytes, got {type(data).__name__}")
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write the string ``text`` to ``path`` atomically, encoded with ``encoding`` (UTF-8 by default).

    Line endings are written as given (no platform translation).

    Raises:
        TypeError: ``text`` is not a ``str``.
        UnicodeEncodeError: ``text`` cannot be encoded; nothing is written.
        IsADirectoryError, OSError: as :func:`atomic_write_bytes`.
    """
    if not isinstance(text, str):
        raise TypeError(f"{path}: atomic_write_text needs str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Serialise ``obj`` with :func:`json.dumps` and write it to ``path`` atomically (UTF-8).

    The object is serialised completely *before* any file is opened, so a value that is
    not JSON-serialisable leaves no temporary file and the old ``path`` content intact.
    ``NaN``/``inf`` floats are written as Python's ``json`` does (``NaN``, ``Infinity``),
    which strict JSON parsers reject; callers wanting strict JSON should map them to
    ``None`` first (as :func:`boxmask.engine.evaluator.evaluate_coco` does).

    Args:
        path: target file; parent folders are created.
        obj: JSON-serialisable object (dict, list, str, int, float, bool, None).
        indent: passed to :func:`json.dumps`; ``None`` gives the compact one-line form.

    Raises:
        TypeError: ``obj`` (or something inside it) is not JSON-serialisable; the message
            names ``path``. Nothing is written.
        ValueError: ``obj`` contains a circular reference. Nothing is written.
        IsADirectoryError, OSError: as :func:`atomic_write_bytes`.
    """
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
    except TypeError as e:
        raise TypeError(f"{path}: cannot serialise to JSON: {e}") from e
    if indent is not None:
        text += "\n"
    return atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with :func:`torch.save` to ``path`` atomically (checkpoints, state dicts).

    ``torch.save`` streams straight into the temporary file, so no second in-memory copy
    of a large checkpoint is made. Argument order follows ``torch.save(obj, f)``.

    Raises:
        Whatever ``torch.save`` raises (e.g. ``pickle.PicklingError`` for an unpicklable
            object); the temp file is removed and the old ``path`` kept.
        IsADirectoryError, OSError: as :func:`atomic_write_bytes`.
    """
    import torch  # local import: keep `boxmask.io` importable without loading torch

    return _atomic_write(path, lambda f: torch.save(obj, f))
