"""Reading resumable training checkpoints without getting stuck on a corrupt one.

A checkpoint torn by a crash (a truncated safetensors or torch file, an empty state.json)
would otherwise fail with a bare ``SafetensorError`` / ``OSError`` naming no file, and fail
again on every rerun until someone deletes it by hand. ``read_or_set_aside`` reads it; when
that fails it warns (naming the file and the reason), renames it to ``<name>.corrupt`` and
returns None, so the trainer falls back to an older checkpoint or starts afresh.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, TypeVar

from medrl.errors import DataError

T = TypeVar("T")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be read and was set aside (renamed ``<name>.corrupt``)."""


class CorruptCheckpoint(Exception):
    """Raised by checkpoint readers for an unreadable file; the message names the file."""


def _read_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError,
                                       KeyError, TypeError, UnicodeDecodeError, CorruptCheckpoint]
    try:
        from safetensors import SafetensorError

        errs.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def reading(path: Path, fn: Callable[[], T]) -> T:
    """``fn()`` (which reads ``path``), with any read error re-raised as CorruptCheckpoint naming
    ``path``: safetensors and torch do not say which file they choked on."""
    try:
        return fn()
    except DataError:
        raise
    except _read_errors() as e:
        raise CorruptCheckpoint(f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None


def set_aside(path: Path, reason: str) -> Path:
    """Rename the checkpoint ``path`` (file or directory) to ``<name>.corrupt`` (replacing an older
    one) and warn, naming it and ``reason``. Returns the new path."""
    path = Path(path)
    aside = path.with_name(path.name + ".corrupt")
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    elif aside.exists() or aside.is_symlink():
        aside.unlink()
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process of the launch set it aside first
        pass
    msg = f"{path}: corrupt checkpoint ({reason}); moved it to {aside.name} and resuming without it"
    print(f"[medrl] warning: {msg}", file=sys.stderr)
    warnings.warn(msg, CorruptCheckpointWarning, stacklevel=3)
    return aside


def read_or_set_aside(path: Path, reader: Callable[[Path], T]) -> T | None:
    """``reader(path)``; None when ``path`` does not exist, or when reading it fails with a read
    or format error (the checkpoint is then set aside, see ``set_aside``). A DataError (e.g. a
    checkpoint written with other params, a decision for the caller) propagates."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return reader(path)
    except DataError:
        raise
    except _read_errors() as e:
        reason = str(e) if isinstance(e, CorruptCheckpoint) else f"{type(e).__name__}: {str(e)[:300]}"
        set_aside(path, reason)
        return None


# ----------------------------------------------------------------------------- rotation

LATEST, PREVIOUS = "latest", "previous"


def new_checkpoint_dir(ckpt_dir: Path) -> Path:
    """An empty hidden temp directory in ``ckpt_dir`` to write a checkpoint into (then ``install``)."""
    import tempfile

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{LATEST}.", suffix=".tmp", dir=ckpt_dir))


def install(tmp: Path, ckpt_dir: Path) -> None:
    """Make the completely written checkpoint ``tmp`` the new ``ckpt_dir/latest``; the old latest
    becomes ``previous`` (replacing the one before). A crash at any point leaves at least one
    complete checkpoint, which ``read_latest`` finds."""
    latest, prev = Path(ckpt_dir) / LATEST, Path(ckpt_dir) / PREVIOUS
    if latest.is_dir():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(latest, prev)
    os.replace(tmp, latest)


def read_latest(ckpt_dir: Path, reader: Callable[[Path], T]) -> T | None:
    """``reader`` of ``ckpt_dir/latest``, or of ``ckpt_dir/previous`` when latest is missing or
    unreadable (then set aside, with a warning); None when neither is readable."""
    for name in (LATEST, PREVIOUS):
        got = read_or_set_aside(Path(ckpt_dir) / name, reader)
        if got is not None:
            return got
    return None
