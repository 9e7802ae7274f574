"""Small torch Datasets over the normalised / prepared tables (items.csv, pairs.csv, ...)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from medrl.errors import DataError
from medrl.io import load_image


class TableImageDataset(torch.utils.data.Dataset):
    """Rows of a DataFrame -> (image, labels).

    image: float tensor in [0, 1], (3, size, size) for mode "RGB" or (1, size, size) for "L",
    read with ``medrl.io.load_image`` (relative paths resolve against ``root``, default the
    working directory) and passed through ``transform`` if given. labels: float32 tensor of
    ``label_cols`` in order (shape (0,) when there are none); NaN (e.g. "not mentioned" in
    CheXpert columns) is kept unless ``nan_value`` replaces it."""

    def __init__(
        self,
        df: pd.DataFrame,
        path_col: str = "path",
        label_cols: Sequence[str] = (),
        size: int = 64,
        mode: str = "RGB",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        root: str | Path | None = None,
        nan_value: float | None = None,
    ):
        label_cols = list(label_cols)
        missing = [c for c in [path_col, *label_cols] if c not in df.columns]
        if missing:
            raise DataError(f"TableImageDataset: table lacks columns {missing}; found {list(df.columns)}")
        if mode not in ("RGB", "L"):
            raise DataError(f"TableImageDataset: mode={mode!r}; expected 'RGB' or 'L'")
        base = Path(root) if root is not None else None
        self.paths = [Path(p) if base is None or Path(p).is_absolute() else base / p for p in df[path_col].astype(str)]
        try:
            values = df[label_cols].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float32) if label_cols else np.zeros((len(df), 0), np.float32)
        except (ValueError, TypeError) as e:
            raise DataError(f"TableImageDataset: label columns {label_cols} must be numeric ({e})") from None
        if nan_value is not None:
            values = np.nan_to_num(values, nan=nan_value)
        self.labels = torch.from_numpy(np.ascontiguousarray(values))
        self.size, self.mode, self.transform = size, mode, transform
        self.label_cols = label_cols

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = load_image(self.paths[i], size=self.size, mode=self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]
