"""Helpers shared by the workflow tests: small workspaces, engine environments, and views of
the stage graph as each engine (DVC, Snakemake) sees it.

A workspace is what ARCHITECTURE.md calls one: a directory holding copies of Snakefile,
dvc.yaml and workflow/, plus a params.yaml (the repository's, deep-merged with
tests/params_small.yaml), made a git + DVC repository so both engines run in it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
VENV_BIN = Path(sys.executable).parent  # the interpreter running pytest (.venv/bin)

# The cheap data stages (seconds each on the small params) and the outputs that request them.
CHEAP_STAGES = ("download_isic", "download_cxr", "tokenizer_isic", "tokenizer_cxr", "prepare_isic", "prepare_cxr")
CHEAP_TARGETS = ("data/models/isic/tokenizer", "data/prepared/isic", "data/prepared/cxr")

# Environment variables that must not leak from the developer's shell into a test engine run.
_SCRUB = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_EXPERIMENT_NAME",
          "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "SNAKEMAKE_PROFILE", "RANK", "LOCAL_RANK", "WORLD_SIZE")


# ----------------------------------------------------------------------------- params


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def small_params(overrides: dict | None = None) -> dict:
    """The repository's params.yaml with tests/params_small.yaml (and ``overrides``) merged in."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    small = yaml.safe_load((TESTS / "params_small.yaml").read_text()) or {}
    return deep_merge(deep_merge(base, small), overrides or {})


def set_param(params_file: Path, dotted: str, value: Any) -> None:
    """Change one key of a params.yaml in place (the file is rewritten by yaml.safe_dump)."""
    raw = yaml.safe_load(params_file.read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"{params_file}: no key {dotted!r}")
    node[leaf] = value
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


# ----------------------------------------------------------------------------- processes


def engine_env(workspace: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for DVC / Snakemake / entry.py subprocesses.

    The venv's bin comes first on PATH (the generated commands call plain ``python``),
    MLflow/SLURM settings of the caller's shell are dropped, and torch uses one thread."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "GIT_AUTHOR_NAME": "medrl-test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "medrl-test", "GIT_COMMITTER_EMAIL": "test@localhost",
    })
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its full output (pytest shows it)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or engine_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(map(str, cmd))}` in {cwd} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- workspaces

_WS_GITIGNORE = """\
/mlflow.db
/mlartifacts/
/.snakemake/
/data/.ckpt/
__pycache__/
"""


def make_workspace(root: Path, params: dict | None = None, *, dvc: bool = True) -> Path:
    """Create a workspace at ``root``: Snakefile, dvc.yaml, workflow/, small params.yaml, git + DVC."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", root / "Snakefile")
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    shutil.copytree(REPO / "workflow", root / "workflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)
    raw = params if params is not None else small_params()
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / ".gitignore").write_text(_WS_GITIGNORE)
    env = engine_env(root)
    run(["git", "init", "-q"], root, env)
    if dvc:
        run([str(VENV_BIN / "dvc"), "init", "-q"], root, env)
        run([str(VENV_BIN / "dvc"), "config", "core.analytics", "false"], root, env)
    return root


# ----------------------------------------------------------------------------- MLflow server


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite backend and a local artifact store."""

    def __init__(self, root: Path, startup_timeout: float = 120.0):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "server.log"
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
        env = engine_env()
        self._logf = self.log.open("w")
        # own process group: stop() ends the server and the worker it spawns, nothing else
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy after {timeout:.0f}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._logf.close()


# ----------------------------------------------------------------------------- engine views

_DVC_VIEW = textwrap.dedent("""
    import json, sys
    from dvc.repo import Repo
    from dvc.dependency.param import ParamsDependency
    out = []
    with Repo(sys.argv[1]) as repo:
        for st in repo.index.stages:
            deps, params = [], []
            for d in st.deps:
                if isinstance(d, ParamsDependency):
                    params += list(d.params)
                else:
                    deps.append(d.def_path)
            out.append({"name": st.addressing, "cmd": st.cmd, "deps": sorted(deps),
                        "outs": sorted(o.def_path for o in st.outs), "params": sorted(params)})
    print(json.dumps(out))
""")

_SMK_VIEW = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import DAGSettings, OutputSettings, Quietness, ResourceSettings
    root = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(root / "workflow"))
    from state import job_name
    out = []
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wapi = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=root / "Snakefile", workdir=root)
        wapi.dag(DAGSettings(targets={sys.argv[2]}, forceall=True))
        wf = wapi._workflow
        wf._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        wf._build_dag()
        for job in wf.dag.jobs:
            if job.rule.name in ("all", "all_seeds"):
                continue
            wc = dict(job.wildcards_dict)
            out.append({"name": job_name(job.rule.name, wc), "rule": job.rule.name,
                        "wildcards": wc, "cmd": job.shellcmd, "deps": sorted(map(str, job.input)),
                        "outs": sorted(map(str, job.output)), "params": sorted(job.params.medrl),
                        "resources": {k: v for k, v in job.resources.items() if isinstance(v, (int, str))}})
    print(json.dumps(out))
""")


def dvc_stages(workspace: Path) -> dict[str, dict]:
    """Every DVC stage (foreach expanded: ``rl_cxr@full-s0``) as DVC itself parses dvc.yaml."""
    proc = run([sys.executable, "-c", _DVC_VIEW, str(workspace)], workspace, timeout=120)
    return {s["name"]: s for s in json.loads(proc.stdout)}


def snakemake_jobs(workspace: Path, env: dict[str, str] | None = None, target: str = "all") -> dict[str, dict]:
    """Every job of ``snakemake TARGET`` (forced), keyed ``rule`` or ``rule@job`` (state.job_name:
    ``rl_cxr@full-s0``), via snakemake.api."""
    proc = run([sys.executable, "-c", _SMK_VIEW, str(workspace), target], workspace, env=env, timeout=120)
    return {j["name"]: j for j in json.loads(proc.stdout.strip().splitlines()[-1])}


def snakemake_planned(workspace: Path, targets: list[str], *extra: str,
                      env: dict[str, str] | None = None) -> dict[str, str]:
    """{job name (``rule`` / ``rule@job``, as state.job_name: ``rl_cxr@full-s0``): reason} of the
    jobs ``snakemake -n`` would run."""
    sys.path.insert(0, str(REPO / "workflow"))
    from state import job_name

    # targets first: options such as --rerun-triggers take several values
    proc = run([str(VENV_BIN / "snakemake"), "-n", "--cores", "1", *targets, *extra], workspace, env=env, timeout=120)
    jobs: list[dict[str, str]] = []
    for line in (proc.stderr + "\n" + proc.stdout).splitlines():
        s = line.strip()
        m = re.fullmatch(r"(?:local)?rule (\w+):", s)
        if m:
            jobs.append({"rule": m.group(1), "wildcards": {}, "reason": ""})
        elif jobs and s.startswith("wildcards:"):
            jobs[-1]["wildcards"] = dict(tuple(x.strip() for x in kv.split("=", 1)) for kv in s[10:].split(","))
        elif jobs and s.startswith("reason:"):
            jobs[-1]["reason"] = s[7:].strip()
    return {job_name(j["rule"], j["wildcards"]): j["reason"] for j in jobs if j["rule"] not in ("all", "all_seeds")}


def dvc_status(workspace: Path, targets: list[str] | None = None) -> dict[str, Any]:
    """``dvc status --json``: {stage name: [changes]} for the stages that are not up to date."""
    proc = run([str(VENV_BIN / "dvc"), "status", "--json", *(targets or [])], workspace, timeout=120)
    return json.loads(proc.stdout or "{}")


def mlflow_stage_runs(tracking_uri: str) -> list[Any]:
    """Every run in the medrl-* experiments of a tracking store (any status)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments() if e.name.startswith("medrl-")]
    return client.search_runs(exps, max_results=1000) if exps else []


# ----------------------------------------------------------------------------- reproducibility

# Output fields that hold wall-clock times, so they differ between any two runs; excluded by
# name when two builds are compared (everything else must be identical).
TIMING_KEYS = frozenset({"seconds", "seconds_per_epoch", "train_seconds", "reward_seconds_per_epoch",
                         "seconds_per_sample", "cost_ratio_paired_over_bank", "cost_ratio_paired_shared_over_bank"})
TIMING_COLUMNS = frozenset({"epoch_time_s", "trajectories_per_s", "base_comparison_s", "Reward s/sample",
                            "Reward s/epoch"})
# Rendered tables whose only differing cells are a timing column of their CSV (compared above).
TIMING_TABLES = frozenset({"cxrl_rlcf_modes.md", "cxrl_rlcf_modes.tex"})


def _drop_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_keys(v) for k, v in node.items() if k not in TIMING_KEYS}
    if isinstance(node, list):
        return [_drop_keys(v) for v in node]
    return node


def _run_ids(workspace: Path) -> set[str]:
    return {r.info.run_id for r in mlflow_stage_runs(f"sqlite:///{workspace / 'mlflow.db'}")}


def normalized_outputs(workspace: Path) -> dict[str, str]:
    """{path: digest} of every file in every declared output of the workspace's stages, with the
    timing fields named above removed and the workspace's MLflow run ids (unique to each run by
    design; tables cite them) replaced by ``<run>``; hidden files (engine markers) skipped."""
    import hashlib

    import pandas as pd

    sys.path.insert(0, str(workspace / "workflow"))
    from state import stage_outputs  # the workspace's own copy of the stage graph

    from medrl.config import load_params

    run_ids = _run_ids(workspace)
    out: dict[str, str] = {}
    for outs in stage_outputs(load_params(workspace / "params.yaml")).values():
        for rel in outs:
            root = workspace / rel
            files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
            for f in files:
                if any(part.startswith(".") for part in f.relative_to(workspace).parts) or f.name in TIMING_TABLES:
                    continue
                if f.suffix == ".json":
                    text = json.dumps(_drop_keys(json.loads(f.read_text())), sort_keys=True)
                elif f.suffix == ".csv":
                    df = pd.read_csv(f, dtype=str, keep_default_na=False)
                    text = df.drop(columns=[c for c in df.columns if c in TIMING_COLUMNS]).to_csv(index=False)
                elif f.suffix in (".md", ".tex"):
                    text = f.read_text()
                else:
                    out[f.relative_to(workspace).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
                    continue
                for rid in run_ids:
                    text = text.replace(rid, "<run>")
                data = text.encode()
                out[f.relative_to(workspace).as_posix()] = hashlib.sha256(data).hexdigest()
    return out
