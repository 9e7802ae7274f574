"""Progress bars for long loops (stderr, so stage stdout stays clean)."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(it: Iterable[T] | None = None, *, desc: str = "", total: int | None = None, **kw) -> Iterator[T]:
    """tqdm on stderr with a sensible refresh rate for log files (CI, SLURM)."""
    return tqdm(it, desc=desc, total=total, file=sys.stderr, mininterval=2.0, dynamic_ncols=True, **kw)
