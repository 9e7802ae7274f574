"""Atomic writes, content hashes, image and table IO shared by every module."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from medrl.errors import DataError

# ----------------------------------------------------------------------------- atomic writes


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask has no getter)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mkstemp_path(path: Path, suffix: str) -> str:
    """A temp file beside ``path`` with the mode a plain ``open(path, "w")`` would give (mkstemp
    makes 0600 whatever the umask, which would leave outputs unreadable to the group)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return tmp


def make_temp_dir(parent: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """``tempfile.mkdtemp`` (0700) with the mode a plain ``mkdir`` would give under the umask."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file beside ``path``; rename over it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkstemp_path(path, ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | Path) -> "contextlib.AbstractContextManager[Path]":
    """Yield a temp *path* (not an open file) that is renamed to ``path`` on success.

    For writers that insist on a filename (safetensors, PIL, torch-fidelity)."""
    return _atomic_path(Path(path))


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkstemp_path(path, path.suffix or ".tmp")
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temp sibling; replace ``path`` with it only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.")
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, removing whatever ``dst`` was (file or directory)."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- hashing

_CHUNK = 1 << 20


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _visible_files(root: Path) -> Iterator[Path]:
    """Files under ``root`` in a stable order, skipping hidden entries (names starting with '.')
    so editor/OS droppings and our own temp files do not change a directory's identity."""
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        yield from (Path(d, name) for name in sorted(f for f in files if not f.startswith(".")))


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's sorted (relative path, file hash) list of its
    non-hidden files."""
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: cannot hash, no such file or directory")
    h = hashlib.sha256()
    for full in _visible_files(path):
        h.update(full.relative_to(path).as_posix().encode() + b"\0")
        h.update(hash_file(full).encode() + b"\n")
    return h.hexdigest()


def stat_signature(path: str | Path) -> str:
    """Cheap identity of a file or directory tree: sha256 of (relative path, size, mtime_ns) of
    every non-hidden file. Changes whenever a file is rewritten, without reading any content
    (for keying resumable state on inputs; ``hash_path`` is the content identity)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    for f in [path] if path.is_file() else _visible_files(path):
        st = f.stat()
        rel = f.name if f == path else f.relative_to(path).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- tables


def read_table(path: str | Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV (optionally .gz) and check it has the required columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; expected at least {list(required)}, found {list(df.columns)}")
    return df


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_file(path) as f:
        df.to_csv(f, index=False)


# ----------------------------------------------------------------------------- images


def load_image(path: str | Path, size: int | None = None, mode: str = "RGB") -> torch.Tensor:
    """Read an image as a float tensor in [0, 1], shape (C, H, W); resized to size x size."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable image ({e}); expected a PNG or JPEG") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_pil(img: torch.Tensor) -> Image.Image:
    """(C,H,W) or (H,W) float in [0,1] -> PIL image (L for 1 channel, RGB for 3)."""
    arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray(arr)


def save_image(img: torch.Tensor, path: str | Path) -> None:
    """Save a (C,H,W) [0,1] tensor as PNG, atomically."""
    with atomic_path(path) as tmp:
        to_pil(img).save(tmp, format="PNG")


def image_grid(images: Sequence[torch.Tensor], nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """Tile (C,H,W) images into one (C, H', W') grid (for sample sheets)."""
    from torchvision.utils import make_grid

    return make_grid(torch.stack([i.float() for i in images]), nrow=nrow, padding=pad, pad_value=1.0)
