"""Issue 17 item 8: outputs get the mode the umask says (tempfile's 0600 / 0700 are not kept)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch

from medrl.io import atomic_dir, atomic_file, atomic_path, replace_path, save_image, write_json, write_table


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_current_umask_reads_without_changing(umask):
    from medrl.io import current_umask

    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_outputs_respect_umask(umask, tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    write_table(pd.DataFrame({"x": [1]}), tmp_path / "t.csv")
    with atomic_file(tmp_path / "f.txt") as f:
        f.write("x")
    with atomic_path(tmp_path / "w.bin") as p:
        p.write_bytes(b"x")
    save_image(torch.zeros(1, 4, 4), tmp_path / "i.png")
    for name in ("m.json", "t.csv", "f.txt", "w.bin", "i.png"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, (name, oct(_mode(tmp_path / name)))
    with atomic_dir(tmp_path / "out") as d:
        (d / "x.json").write_text("{}")
    assert _mode(tmp_path / "out") == 0o777 & ~umask
    # a stage output promoted by entry.py (replace_path) keeps its mode
    with atomic_dir(tmp_path / ".stage.partial") as d:
        write_json(d / "metrics.json", {})
    replace_path(tmp_path / ".stage.partial", tmp_path / "stage")
    assert _mode(tmp_path / "stage") == 0o777 & ~umask
    assert _mode(tmp_path / "stage" / "metrics.json") == 0o666 & ~umask
