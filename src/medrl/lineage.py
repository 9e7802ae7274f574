"""MLflow lineage: one run per stage execution, with content hashes of inputs and outputs.

``tracked_stage`` opens the run, logs params/tags/input hashes, and on ``finish`` logs the
output hashes and marks the run finished; ``lineage(path)`` walks back from any output file
through the runs that produced it and the runs that produced their inputs.

Credentials never reach MLflow: only declared params, paths and hashes are logged, and the
tracking URI itself (which may carry a password) is never written anywhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medrl.config import flatten, params_hash
from medrl.environment import environment_hash, environment_record
from medrl.io import hash_path
from medrl.redact import install_log_redaction, redact

EXPERIMENT_PREFIX = "medrl-"
ENV_TAG = "medrl.env."  # one tag per environment_record() field
_MAX_PARAM_LEN = 6000  # MLflow's param value limit is 6000 characters


def tracking_uri(workspace: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the workspace (git-ignored)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def code_version() -> str:
    """git commit of the medrl source tree (+'-dirty'), or the package version outside git."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True, timeout=10)
            return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    from medrl import __version__

    return f"medrl-{__version__}"


def _client(workspace: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(workspace)
    mlflow.set_tracking_uri(uri)
    install_log_redaction()  # MLflow's handlers exist now; its messages carry the URI
    if not uri.startswith("sqlite:"):
        return RetryingClient(MlflowClient(tracking_uri=uri))
    with _sqlite_init_lock(uri):
        for attempt in range(5):
            try:
                # builds (and on a new file migrates) the store
                return RetryingClient(MlflowClient(tracking_uri=uri))
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(2.0 * (attempt + 1))
    raise AssertionError("unreachable")


# Messages of the errors a busy store gives (sqlite through SQLAlchemy or behind `mlflow server`).
_TRANSIENT = ("database is locked", "database table is locked", "database is busy")


def retry_budget_s() -> float:
    """Seconds an MLflow write keeps retrying a locked store (MEDRL_MLFLOW_RETRY_S, default 120)."""
    try:
        return max(0.0, float(os.environ.get("MEDRL_MLFLOW_RETRY_S", "120")))
    except ValueError:
        return 120.0


def is_transient(e: BaseException) -> bool:
    return any(m in str(e).lower() for m in _TRANSIENT)


def with_retry(fn, *args: Any, budget_s: float | None = None, what: str = "", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried with exponential backoff (0.5 s doubling to 10 s) while it
    fails with a transient "database is locked" error, for at most ``budget_s`` seconds
    (default ``retry_budget_s()``); any other error, or the last one, is raised. sqlite itself
    already waits out short locks (MLflow sets a 20 s busy timeout per call)."""
    deadline = time.monotonic() + (retry_budget_s() if budget_s is None else budget_s)
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
            print(f"[medrl] mlflow {what or getattr(fn, '__name__', 'call')}: store busy ({redact(e)[:120]}); "
                  f"retrying in {delay:.1f}s", file=sys.stderr)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


class RetryingClient:
    """An MlflowClient whose every call goes through ``with_retry``: a store locked for longer
    than sqlite's busy timeout (another stage's long write, a backup) delays a stage's lineage
    writes instead of failing them. A failed call was rolled back, so retrying it is safe."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return with_retry(attr, *args, what=name, **kwargs)

        return call


def terminate_run(client: Any, run_id: str, status: str) -> None:
    """Close a run as ``status``, retrying a locked store for longer than ordinary writes (a run
    must never stay RUNNING); if even that fails, warn and let the caller's error propagate."""
    inner = getattr(client, "_client", client)
    try:
        with_retry(inner.set_terminated, run_id, status=status, budget_s=max(60.0, 3 * retry_budget_s()),
                   what="set_terminated")
    except Exception as e:
        print(f"[medrl] mlflow: could not mark run {run_id} {status} ({redact(e)}); it may show as RUNNING",
              file=sys.stderr)


@contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Build a sqlite store one process at a time.

    Two stages starting together on a new mlflow.db (``snakemake --cores 2``, two SLURM jobs)
    otherwise race in MLflow's schema migration and one fails ("duplicate column name",
    "Online migration expected to match one row"). The lock (in the temp dir, so nothing
    appears in the workspace) serialises processes on one host; the retry in ``_client``
    covers another host migrating the same file on a shared filesystem."""
    import fcntl
    import hashlib
    import tempfile

    db = uri.split(":///", 1)[-1]
    key = hashlib.sha256(str(Path(db).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"medrl-mlflow-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiment_id(client, name: str, workspace: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if tracking_uri(workspace).startswith("sqlite:"):
        # keep artifacts beside the sqlite store instead of ./mlruns of whatever cwd
        artifacts = (Path(workspace).resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created concurrently by another stage
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _relpath(p: Path, workspace: Path) -> str:
    p = Path(p)
    try:
        return p.resolve().relative_to(Path(workspace).resolve()).as_posix()
    except ValueError:
        return p.resolve().as_posix()


@dataclass
class StageRun:
    """Handle given to a running stage: log metrics/artifacts to its MLflow run."""

    client: Any
    run_id: str
    workspace: Path
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            batch.append(Metric(key=_metric_key(k), value=fv, timestamp=now, step=step or 0))
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def record_outputs(self, outs: dict[str, Path] | list[Path],
                       sources: dict[str, Path] | list[Path] | None = None) -> dict[str, str]:
        """Log the outputs' content hashes under their final paths ``outs``. ``sources`` (same
        roles) are the files to hash when they are not in place yet: workflow/entry.py records
        a stage's temp outputs before renaming them, so no output is ever promoted without its
        lineage (the hash is of content only, the same after the rename)."""
        named = _named(outs)
        src = _named(sources) if sources is not None else named
        self.outputs = {_relpath(p, self.workspace): hash_path(src[role]) for role, p in named.items()}
        self.client.set_tag(self.run_id, "medrl.outputs", json.dumps(self.outputs, sort_keys=True))
        for role, p in named.items():
            self.client.log_param(self.run_id, f"out.{role}"[:250], self.outputs[_relpath(p, self.workspace)])
        return self.outputs


def _named(paths: dict[str, Path] | list[Path]) -> dict[str, Path]:
    """Role -> path; params are keyed by role (not file name) so runs of different wildcard
    values line up column by column in the MLflow compare view."""
    if isinstance(paths, dict):
        return {k: Path(v) for k, v in paths.items()}
    return {str(i): Path(p) for i, p in enumerate(paths)}


def _metric_key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; map anything else to _
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in k)[:250]


@contextmanager
def tracked_stage(
    stage: str,
    track: str,
    *,
    workspace: Path,
    params: dict[str, Any],
    deps: dict[str, Path] | list[Path],
    wildcards: dict[str, str] | None = None,
    device: str = "cpu",
) -> Iterator[StageRun]:
    """Open an MLflow run for one stage execution; FAILED if the block raises, KILLED if it is
    interrupted (KeyboardInterrupt / SystemExit), so a cancelled job never stays RUNNING."""
    client = _client(workspace)
    exp_id = _experiment_id(client, f"{EXPERIMENT_PREFIX}{track}", workspace)
    wildcards = wildcards or {}
    run_name = stage + "".join(f"[{v}]" for v in wildcards.values())
    tags = {
        "mlflow.runName": run_name,
        "medrl.stage": stage,
        "medrl.track": track,
        "medrl.wildcards": json.dumps(wildcards, sort_keys=True),
        "medrl.git_commit": code_version(),
        "medrl.params_hash": params_hash(params),
    }
    env = environment_record(device)
    tags.update({f"{ENV_TAG}{k}": v for k, v in env.items()})
    tags["medrl.env_hash"] = environment_hash(env)
    tags.update({f"medrl.wildcard.{k}": v for k, v in wildcards.items()})
    run = client.create_run(exp_id, tags=tags, run_name=run_name)
    handle = StageRun(client=client, run_id=run.info.run_id, workspace=Path(workspace))
    try:
        from mlflow.entities import Param

        flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(params).items()}
        named = _named(deps)
        handle.inputs = {_relpath(p, workspace): hash_path(p) for p in named.values()}
        for role, p in named.items():
            flat[f"in.{role}"[:250]] = handle.inputs[_relpath(p, workspace)]
        plist = [Param(k[:250], v[:_MAX_PARAM_LEN]) for k, v in flat.items()]
        for i in range(0, len(plist), 90):
            client.log_batch(handle.run_id, params=plist[i : i + 90])
        client.set_tag(handle.run_id, "medrl.inputs", json.dumps(handle.inputs, sort_keys=True))
        yield handle
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM from Snakemake/SLURM (see workflow/entry.py)
        terminate_run(client, handle.run_id, "KILLED")
        raise
    except BaseException:
        terminate_run(client, handle.run_id, "FAILED")
        raise
    try:
        client.set_tag(handle.run_id, "medrl.lineage", json.dumps(
            {"stage": stage, "wildcards": wildcards, "inputs": handle.inputs, "outputs": handle.outputs},
            sort_keys=True)[:8000])
        client.set_terminated(handle.run_id, status="FINISHED")
    except BaseException as e:  # still locked after the retries, or interrupted: not FINISHED
        terminate_run(client, handle.run_id, "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise


# ----------------------------------------------------------------------------- queries


@dataclass
class RunInfo:
    run_id: str
    stage: str
    wildcards: dict[str, str]
    experiment: str
    start_time: int
    inputs: dict[str, str]
    outputs: dict[str, str]
    params: dict[str, str]
    git_commit: str
    env: dict[str, str] = field(default_factory=dict)
    env_hash: str = "?"


def _all_stage_runs(client) -> list[RunInfo]:
    exps = [e for e in client.search_experiments() if e.name.startswith(EXPERIMENT_PREFIX)]
    out: list[RunInfo] = []
    for e in exps:
        token = None
        while True:
            page = client.search_runs([e.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                      max_results=1000, page_token=token)
            for r in page:
                t = r.data.tags
                if "medrl.outputs" not in t:
                    continue
                out.append(RunInfo(
                    run_id=r.info.run_id, stage=t.get("medrl.stage", "?"),
                    wildcards=json.loads(t.get("medrl.wildcards", "{}")), experiment=e.name,
                    start_time=r.info.start_time, inputs=json.loads(t.get("medrl.inputs", "{}")),
                    outputs=json.loads(t["medrl.outputs"]),
                    params={k: v for k, v in r.data.params.items() if not k.startswith(("in.", "out."))},
                    git_commit=t.get("medrl.git_commit", "?"),
                    env={k[len(ENV_TAG):]: v for k, v in t.items() if k.startswith(ENV_TAG)},
                    env_hash=t.get("medrl.env_hash", "?")))
            token = page.token
            if not token:
                break
    return sorted(out, key=lambda r: r.start_time, reverse=True)


def find_producer(path: str | Path, workspace: Path, runs: list[RunInfo] | None = None,
                  digest: str | None = None) -> tuple[RunInfo, str] | None:
    """The newest finished run whose declared output is ``path`` or contains it.

    With ``digest``, only a run that recorded exactly that content hash counts."""
    if runs is None:
        runs = _all_stage_runs(_client(workspace))
    rel = _relpath(Path(path), workspace)
    for run in runs:
        for out, h in run.outputs.items():
            if (rel == out or rel.startswith(out.rstrip("/") + "/")) and (digest is None or h == digest):
                return run, out
    return None


def run_id_of(path: str | Path, workspace: Path) -> str | None:
    """Run id of the stage execution that produced the current content of ``path``."""
    declared = find_producer(path, workspace)
    if declared is None:
        return None
    run, out = declared
    current = hash_path(Path(workspace) / out) if (Path(workspace) / out).exists() else None
    return run.run_id if current == run.outputs[out] else None


def lineage(path: str | Path, workspace: Path) -> list[dict[str, Any]]:
    """Chain of stage runs that produced ``path``, depth-first back to the sources.

    Each entry: depth, stage, run_id, output, hash, current (does the file on disk still
    have the recorded hash), params, inputs."""
    client = _client(workspace)
    runs = _all_stage_runs(client)
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()

    def visit(p: str, depth: int, digest: str | None) -> None:
        found = find_producer(p, workspace, runs, digest)
        if found is None:
            chain.append({"depth": depth, "stage": None, "output": _relpath(Path(p), workspace), "hash": digest})
            return
        run, out = found
        on_disk = Path(workspace) / out
        current = on_disk.exists() and hash_path(on_disk) == run.outputs[out]
        chain.append({"depth": depth, "stage": run.stage, "wildcards": run.wildcards, "run_id": run.run_id,
                      "experiment": run.experiment, "output": out, "hash": run.outputs[out], "current": current,
                      "git_commit": run.git_commit, "params": run.params, "inputs": run.inputs,
                      "env": run.env, "env_hash": run.env_hash,
                      "repeat": run.run_id in seen})
        if run.run_id in seen:
            return
        seen.add(run.run_id)
        for dep, h in sorted(run.inputs.items()):
            # recorded paths are relative to the workspace, not to the caller's cwd
            visit(str(Path(workspace) / dep), depth + 1, h)

    visit(str(path), 0, None)
    return chain


def format_lineage(chain: list[dict[str, Any]]) -> str:
    lines = []
    for e in chain:
        pad = "  " * e["depth"]
        if e["stage"] is None:
            lines.append(f"{pad}- {e['output']}  (no recorded producer; hash {str(e['hash'])[:12]})")
            continue
        wc = "".join(f"[{v}]" for v in e["wildcards"].values())
        state = "current" if e["current"] else "STALE (file changed since this run)"
        lines.append(f"{pad}- {e['output']}  sha256 {e['hash'][:12]}  {state}")
        lines.append(f"{pad}  produced by stage {e['stage']}{wc}  run {e['run_id']}  ({e['experiment']}, code {e['git_commit'][:12]})")
        if e.get("repeat"):
            lines.append(f"{pad}    (run shown above)")
            continue
        for k, v in sorted(e["params"].items()):
            lines.append(f"{pad}    param {k} = {v}")
        for dep, h in sorted(e["inputs"].items()):
            lines.append(f"{pad}    input {dep}  sha256 {h[:12]}")
        env = " ".join(f"{k.removeprefix('pkg.')}={v}" for k, v in sorted(e.get("env", {}).items()))
        lines.append(f"{pad}    environment {e.get('env_hash', '?')}: {env or 'not recorded'}")
    envs = environments(chain)
    if len(envs) > 1:
        lines.append(f"WARNING: the runs behind this output ran in {len(envs)} different environments:")
        lines += [f"  environment {h}: {', '.join(stages)}" for h, stages in sorted(envs.items())]
    return "\n".join(lines)


def environments(chain: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{environment hash: the stage runs of the chain recorded in it}; more than one key means
    the output mixes results computed under different package versions, devices or dtypes."""
    out: dict[str, list[str]] = {}
    for e in chain:
        if e["stage"] is not None and not e.get("repeat"):
            name = e["stage"] + "".join(f"[{v}]" for v in e["wildcards"].values())
            out.setdefault(e.get("env_hash", "?"), []).append(name)
    return out
