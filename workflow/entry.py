"""Run one stage of the graph: ``python workflow/entry.py STAGE [--variant V] [--seed S]``.

The same command is what Snakemake's rules and DVC's stages run (both are generated from
workflow/graph.py). This is the only place that does, for every stage alike:
params validation, MLflow lineage (params, input/output hashes, metrics, small artifacts),
atomic outputs (the stage writes to hidden temp paths renamed into place on success) and a
checkpoint directory that survives a killed run so long stages resume.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from graph import STAGES, Ctx, Stage, fill, grid_jobs, job_key, jobs_of, stage_params  # noqa: E402
from state import declared_params, write_params_file  # noqa: E402

_ARTIFACT_SUFFIXES = {".png", ".json", ".csv", ".md", ".tex"}
_ARTIFACT_MAX_BYTES = 2 << 20


Expanded = dict[str, list[tuple[dict[str, str], Path]]]


def stage_paths(stage: Stage, params, wildcards: dict[str, str]) -> tuple[dict[str, Path], dict[str, Path], Expanded]:
    """Resolve a stage's deps/outs for one job. An aggregate's dep (``stage.expand``) expands over
    its grid: one path stays a plain dep; several are returned as [(wildcards, path)] instead."""
    deps, extra = {}, {}
    for name, tmpl in stage.deps.items():
        if name in stage.expand:
            paths = [(wc, Path(fill(tmpl, wc))) for wc in grid_jobs(params, stage.expand[name])]
            if len(paths) == 1:
                deps[name] = paths[0][1]
            else:
                extra[name] = paths
        else:
            deps[name] = Path(fill(tmpl, wildcards))
    outs = {name: Path(fill(tmpl, wildcards)) for name, tmpl in stage.outs.items()}
    return deps, outs, extra


def temp_path(final: Path) -> Path:
    # deterministic so every process of an `accelerate launch` agrees on it
    return final.with_name(f".{final.name}.partial")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _flat_metrics(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def checkpoint_dir(root: Path, params: dict, deps: list[Path], *, prune: bool) -> Path:
    """The stage's resumable-state directory, keyed by its params and its inputs' file stats:
    ``root/<key>``. A run killed and restarted with the same params and inputs resumes; one
    whose params or inputs changed in between starts afresh instead of continuing a
    checkpoint made for something else. Every process of a launch computes the same key;
    ``prune`` (the main process) deletes the state of other keys."""
    from medrl.config import params_hash
    from medrl.io import stat_signature

    key = params_hash({"params": params, "deps": {str(p): stat_signature(p) for p in deps}})
    ckpt = root / key
    if prune and root.is_dir():
        for old in root.iterdir():
            if old.name != key:
                print(f"[medrl] {root.name}: discarding a checkpoint made with other params or inputs ({old.name})",
                      file=sys.stderr)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    return ckpt


def _check_job(stage: Stage, params, wildcards: dict[str, str]) -> None:
    from medrl.errors import ParamsError

    jobs = jobs_of(stage, params)
    if wildcards not in jobs:
        opts = ", ".join(" ".join(f"--{k} {v}" for k, v in wc.items()) for wc in jobs)
        raise ParamsError(f"params.yaml: stage {stage.name} has no job {wildcards or '(no wildcards)'}; "
                          f"its jobs (from {', '.join(sorted({k for g in stage.foreach for k in g.values()})) or '-'}): "
                          f"{opts or 'no options'}")


def run_stage(name: str, wildcards: dict[str, str] | None = None, workspace: Path | None = None) -> dict:
    import torch

    from medrl.config import load_params
    from medrl.lineage import tracked_stage

    workspace = (workspace or Path.cwd()).resolve()
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; known: {', '.join(sorted(STAGES))}")
    stage = STAGES[name]
    params = load_params(workspace / "params.yaml")
    wildcards = {k: str(v) for k, v in (wildcards or {}).items() if v is not None}
    _check_job(stage, params, wildcards)
    deps, outs, extra = stage_paths(stage, params, wildcards)
    named_deps = dict(deps)
    for k, ps in extra.items():  # an aggregate's expanded deps: role.job (variants.full-s0)
        named_deps.update({f"{k}.{job_key(wc)}": p for wc, p in ps})
    dep_list = list(named_deps.values())
    missing = [str(p) for p in dep_list if not (workspace / p).exists()]
    if missing:
        raise FileNotFoundError(f"stage {name}: missing inputs {missing}; run the upstream stages first")

    torch.set_num_threads(params.run.num_threads)
    rank = int(os.environ.get("RANK", "0"))
    main_process = rank == 0
    tmp_outs = {k: workspace / temp_path(p) for k, p in outs.items()}
    if main_process:
        for t in tmp_outs.values():
            shutil.rmtree(t, ignore_errors=True) if t.is_dir() else t.unlink(missing_ok=True)
    # a wildcard's own params are logged under one key for every value ("...variants.selected.ace"),
    # so the MLflow compare view puts the ablations' settings in the same rows
    sub = declared_params(stage, params, wildcards)
    if main_process:  # Snakemake's rerun trigger for these params (workflow/state.py)
        write_params_file(workspace, stage, params, wildcards)
    ckpt_root = workspace / "data" / ".ckpt" / (name + (f"-{job_key(wildcards)}" if wildcards else ""))
    ckpt = checkpoint_dir(ckpt_root, sub, [workspace / p for p in dep_list], prune=main_process)

    def body(log, log_artifact) -> dict:
        # the stage sees only its declared params (entry.py itself reads run.device / run.num_threads),
        # and paths relative to the workspace when it runs in it (the engines' case), so no output
        # records where the workspace happens to live
        base = Path() if workspace == Path.cwd().resolve() else workspace
        ctx = Ctx(params=stage_params(stage, params, wildcards), deps={k: base / p for k, p in deps.items()},
                  outs={k: base / temp_path(p) for k, p in outs.items()}, wildcards=wildcards, ckpt=ckpt,
                  device=resolve_device(params.run.device), log=log, log_artifact=log_artifact, workspace=workspace,
                  expanded={k: [(wc, base / p) for wc, p in ps] for k, ps in extra.items()})
        t0 = time.time()
        metrics = stage.run(ctx) or {}
        metrics = {**_flat_metrics(metrics), "stage_seconds": time.time() - t0}
        if not main_process:
            return metrics
        for k, t in tmp_outs.items():
            if not t.exists():
                raise RuntimeError(f"stage {name} finished without writing its output {k!r} ({outs[k]})")
        return metrics

    if not main_process:  # extra `accelerate launch` workers: compute, no lineage, no renames
        return body(lambda m, step=None: None, lambda p: None)

    # Lineage first, promotion last: the temp outputs' hashes (content only, so the same after
    # the rename) are recorded under their final paths and the run is FINISHED before anything
    # is renamed into place. A lineage write that fails (store locked past the retries in
    # medrl.lineage) fails the run and leaves the final paths untouched.
    with tracked_stage(name, stage.track, workspace=workspace, params=sub,
                       deps={k: workspace / p for k, p in named_deps.items()}, wildcards=wildcards,
                       device=resolve_device(params.run.device)) as run:
        metrics = body(run.log_metrics, run.log_artifact)
        run.record_outputs({k: workspace / p for k, p in outs.items()}, sources=tmp_outs)
        run.log_metrics(metrics)
        for k, p in outs.items():
            _log_small_artifacts(run, tmp_outs[k], name=p.name)
    _promote(tmp_outs, {k: workspace / p for k, p in outs.items()}, run)
    shutil.rmtree(ckpt_root, ignore_errors=True)
    print(f"[medrl] {name}{''.join(f'[{v}]' for v in wildcards.values())} done in {metrics['stage_seconds']:.1f}s "
          f"(mlflow run {run.run_id})", file=sys.stderr)
    return metrics


def _promote(tmp_outs: dict[str, Path], finals: dict[str, Path], run) -> None:
    """Rename the temp outputs into place (after their lineage is in MLflow). Should a rename
    fail, the run is marked FAILED again so MLflow does not claim outputs that are not there."""
    from medrl.io import replace_path

    try:
        for k, t in tmp_outs.items():
            finals[k].parent.mkdir(parents=True, exist_ok=True)
            replace_path(t, finals[k])
    except BaseException as e:
        from medrl.lineage import terminate_run

        terminate_run(run.client, run.run_id, "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise


def _log_small_artifacts(run, path: Path, name: str | None = None) -> None:
    """Log ``path``'s small files (or ``path`` itself) under ``name`` (default: its own name);
    ``path`` may be a temp output whose final name is ``name``."""
    import tempfile

    name = name or path.name
    if path.is_file():
        if Path(name).suffix in _ARTIFACT_SUFFIXES and path.stat().st_size <= _ARTIFACT_MAX_BYTES:
            with tempfile.TemporaryDirectory() as d:  # logged under its final file name
                shutil.copy2(path, Path(d) / name)
                run.log_artifact(Path(d) / name, artifact_path=name)
        return
    files = sorted(p for p in path.iterdir() if p.is_file())
    picked = [f for f in files if f.suffix in _ARTIFACT_SUFFIXES and f.stat().st_size <= _ARTIFACT_MAX_BYTES][:20]
    for f in picked:
        run.log_artifact(f, artifact_path=name)


def _terminate(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", help="stage name (see workflow/graph.py)")
    ap.add_argument("--variant", help="CXRL variant of a {variant} stage (a key of rl.cxr.variants)")
    ap.add_argument("--seed", type=int, help="RL seed of a {seed} stage (rl.<track>.seed or one of rl.seeds)")
    args = ap.parse_args(argv)
    # Snakemake, DVC and SLURM (scancel, time limit) stop a job with SIGTERM; turn it into an
    # exception so the MLflow run is closed as KILLED and temp outputs are not promoted.
    signal.signal(signal.SIGTERM, _terminate)
    from medrl.redact import run_redacted

    # Never let Python print the traceback: exception texts (MLflow's carry the tracking URI)
    # may hold a URL's user:password or a secret from the environment; print it redacted.
    def stage() -> None:
        run_stage(args.stage, {"variant": args.variant, "seed": args.seed})

    return run_redacted(stage)


if __name__ == "__main__":
    raise SystemExit(main())
