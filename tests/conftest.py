"""Shared fixtures.

- torch uses one thread (the test machine has 2 cores shared by many processes);
- ``workspace``: a fresh temp workspace (Snakefile, dvc.yaml, workflow/, SMALL params.yaml,
  git + DVC initialised) in which both engines run; ``workspace_factory`` makes more;
- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (sqlite backend, local artifact
  store), healthy before the test starts and stopped after the module.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from medrl_testutil import MlflowServer, make_workspace, small_params  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # a test (or library code it calls) may raise the thread count; restore it after each
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def workspace_factory(tmp_path_factory) -> Callable[..., Path]:
    """``make(name="ws", params_overrides=None, dvc=True) -> Path``: a new small workspace."""

    def make(name: str = "ws", params_overrides: dict | None = None, dvc: bool = True) -> Path:
        root = tmp_path_factory.mktemp(name)
        return make_workspace(root, small_params(params_overrides), dvc=dvc)

    return make


@pytest.fixture
def workspace(workspace_factory) -> Path:
    """A fresh small workspace (git + DVC initialised); outputs land in its data/."""
    return workspace_factory("ws")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1:<free port>; ``.uri`` is its tracking URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()
