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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medrl.config import flatten, params_hash
from medrl.io import hash_path

EXPERIMENT_PREFIX = "medrl-"
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
    if not uri.startswith("sqlite:"):
        return MlflowClient(tracking_uri=uri)
    with _sqlite_init_lock(uri):
        for attempt in range(5):
            try:
                return MlflowClient(tracking_uri=uri)  # builds (and on a new file migrates) the store
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(2.0 * (attempt + 1))
    raise AssertionError("unreachable")


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

    def record_outputs(self, outs: dict[str, Path] | list[Path]) -> dict[str, str]:
        named = _named(outs)
        self.outputs = {_relpath(p, self.workspace): hash_path(p) for p in named.values()}
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
        client.set_terminated(handle.run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(handle.run_id, status="FAILED")
        raise
    client.set_tag(handle.run_id, "medrl.lineage", json.dumps(
        {"stage": stage, "wildcards": wildcards, "inputs": handle.inputs, "outputs": handle.outputs}, sort_keys=True)[:8000])
    client.set_terminated(handle.run_id, status="FINISHED")


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
                    git_commit=t.get("medrl.git_commit", "?")))
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
    return "\n".join(lines)
