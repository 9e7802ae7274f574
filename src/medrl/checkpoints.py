"""Resumable training checkpoints: the one way every trainer writes and reads its state.

``save_train_state`` writes a ``TrainState`` (tensors as safetensors, optimizer-like state with
torch.save, the rest JSON) completely into a temp directory and rotates it in as
``<ckpt_dir>/latest`` (the old one becomes ``previous``). ``load_train_state`` reads it back only
when it was written with the same configuration.

A checkpoint torn by a crash (a truncated safetensors or torch file, an empty state.json)
would otherwise fail with a bare ``SafetensorError`` / ``OSError`` naming no file, and fail
again on every rerun until someone deletes it by hand. ``read_or_set_aside`` reads it; when
that fails it warns (naming the file and the reason), renames it to ``<name>.corrupt`` and
returns None, so the trainer falls back to an older checkpoint or starts afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

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


# ----------------------------------------------------------------------------- training state

STATE_JSON, FILES = "state.json", "files"


@dataclass
class TrainState:
    """What a trainer needs to continue exactly where it stopped."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> <group>.safetensors
    objects: dict[str, Any] = field(default_factory=dict)  # <name>.pt: optimizer / scheduler state, read weights_only
    meta: dict[str, Any] = field(default_factory=dict)  # JSON: step or epoch, loss history
    files: dict[str, Any] = field(default_factory=dict)  # name -> Path (saved) or bytes (loaded), hash-checked


def fingerprint(**kw: Any) -> str:
    """Short hash of a run's configuration, for a config too long to store in the checkpoint as is."""
    return hashlib.sha256(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_json(config: dict[str, Any]) -> dict[str, Any]:
    # JSON turns tuples into lists and unknown objects into strings; compare after the same round trip
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _write_state(d: Path, state: TrainState, config: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    for group, tensors in state.tensors.items():
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(d / f"{group}.safetensors"))
    for name, obj in state.objects.items():
        torch.save(obj, d / f"{name}.pt")
    digests = {}
    if state.files:
        (d / FILES).mkdir()
    for name, src in state.files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        (d / FILES / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    record = {"config": _as_json(config), "meta": state.meta, "files": digests,
              "tensors": sorted(state.tensors), "objects": sorted(state.objects)}
    (d / STATE_JSON).write_text(json.dumps(record, default=float))


def save_train_state(ckpt_dir: Path, state: TrainState, config: dict[str, Any]) -> None:
    """Write ``state`` with the run's ``config`` as ``ckpt_dir/latest``, atomically: written
    completely in a temp directory, then rotated in (``install``)."""
    tmp = new_checkpoint_dir(Path(ckpt_dir))
    try:
        _write_state(tmp, state, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install(tmp, Path(ckpt_dir))


def _read_state(d: Path) -> tuple[dict[str, Any], TrainState]:
    import torch
    from safetensors.torch import load_file

    if not (d / STATE_JSON).is_file():
        raise CorruptCheckpoint(f"{d / STATE_JSON}: missing")
    record = reading(d / STATE_JSON, lambda: json.loads((d / STATE_JSON).read_text()))
    if not isinstance(record, dict) or not {"config", "meta", "files", "tensors", "objects"} <= set(record):
        raise CorruptCheckpoint(f"{d / STATE_JSON}: incomplete checkpoint state")
    state = TrainState(meta=record["meta"])
    for group in record["tensors"]:
        f = d / f"{group}.safetensors"
        state.tensors[group] = reading(f, lambda f=f: load_file(str(f)))
    for name in record["objects"]:
        f = d / f"{name}.pt"
        state.objects[name] = reading(f, lambda f=f: torch.load(f, map_location="cpu", weights_only=True))
    for name, digest in record["files"].items():
        f = d / FILES / name
        data = reading(f, f.read_bytes)
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptCheckpoint(f"{f}: content does not match the hash recorded in {STATE_JSON}")
        state.files[name] = data
    return record["config"], state


def load_train_state(ckpt_dir: Path, config: dict[str, Any], *, on_mismatch: Literal["restart", "raise"] = "restart",
                     defaults: dict[str, Any] | None = None) -> TrainState | None:
    """The state saved by ``save_train_state`` in ``ckpt_dir`` (``latest``, or ``previous`` when
    latest is unreadable; an unreadable one is set aside with a warning). None when there is none,
    or when it was written with another ``config``: then a warning and a fresh start, or, with
    ``on_mismatch="raise"``, a DataError. ``defaults`` fill keys an older checkpoint's config
    lacks (a setting added since, whose default that run used)."""
    want = _as_json(config)

    def read(d: Path) -> TrainState | bool:
        saved, state = _read_state(d)
        saved = {**_as_json(defaults or {}), **saved}
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        if not diff:
            return state
        if on_mismatch == "raise":
            raise DataError(f"{d}: checkpoint was written with different settings "
                            f"{[(k, saved.get(k), want.get(k)) for k in diff]}; expected the same values to resume "
                            f"(delete {d.parent} to start over)")
        warnings.warn(f"{d}: checkpoint was written with different settings ({diff}); starting from scratch")
        return False

    return read_latest(Path(ckpt_dir), read) or None


def discard_train_state(ckpt_dir: Path) -> None:
    """Delete ``ckpt_dir`` once the trainer's outputs are safely written."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
