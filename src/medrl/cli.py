"""The ``medrl`` command.

    medrl lineage PATH [--json] [--workspace DIR]   which stage runs produced PATH, back to the sources
    medrl params-check [PATH]                       validate params.yaml (unknown keys, types, paths)
    medrl env [--check-lock F | --write-lock F]     this environment as stages record it; the lock file
    medrl bench ARGS...                             forwarded to medrl.bench.main(ARGS)

The stage graph lives in ``workflow/``; this command knows nothing about it (no stage
listing here: ``snakemake --list-rules`` / ``dvc stage list`` show the stages).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_lineage(args: argparse.Namespace) -> int:
    from medrl.lineage import format_lineage, lineage

    workspace = Path(args.workspace).resolve()
    from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # read first: mlflow.set_tracking_uri sets it
    if not from_env and not (workspace / "mlflow.db").is_file():
        print(f"medrl lineage: no MLflow store at {workspace / 'mlflow.db'} (run a stage first, pass --workspace, "
              "or set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 1
    chain = lineage(args.path, workspace)
    if args.json:
        json.dump(chain, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        print(format_lineage(chain))
    if not chain or chain[0].get("stage") is None:
        # the URI may carry credentials: name the store without printing it
        store = "the store in MLFLOW_TRACKING_URI" if from_env else workspace / "mlflow.db"
        print(f"medrl lineage: no finished stage run in {store} declares {args.path} as (part of) its output",
              file=sys.stderr)
        return 1
    return 0


def _cmd_params_check(args: argparse.Namespace) -> int:
    from medrl.config import load_params
    from medrl.errors import ParamsError

    try:
        load_params(args.path, check_paths=not args.no_paths)
    except ParamsError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(f"{args.path}: OK")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from medrl.environment import check_lock, environment_record, resolve_lock

    if args.write_lock:
        text = resolve_lock(Path(args.project).resolve())
        tmp = Path(args.write_lock).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.write_lock)
        print(f"{args.write_lock}: {len(text.splitlines()) - 2} packages")
        return 0
    if args.check_lock:
        mismatches, extras = check_lock(Path(args.check_lock))
        for line in extras:
            print(f"medrl env: installed but not locked (ignored): {line}", file=sys.stderr)
        for line in mismatches:
            print(f"medrl env: {line}", file=sys.stderr)
        if mismatches:
            print(f"medrl env: the environment differs from {args.check_lock}; reinstall with "
                  f"`pip install --require-hashes -r {args.check_lock}`", file=sys.stderr)
            return 1
        print(f"{args.check_lock}: every locked package installed at its locked version")
        return 0
    for k, v in environment_record().items():
        print(f"{k} = {v}")
    return 0


def _cmd_bench(argv: list[str]) -> int:
    from medrl.bench import main as bench_main  # imported lazily: pulls in the model stack

    return int(bench_main(argv) or 0)


def _cmd_compare_screenshot(args: argparse.Namespace) -> int:
    from medrl.mlflow_view import screenshot_compare

    runs = screenshot_compare(Path(args.workspace), args.track, args.stage, Path(args.out))
    print(f"{args.out}: compare view of {len(runs)} runs of {args.stage}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medrl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lin = sub.add_parser("lineage", help="chain of MLflow stage runs that produced a file or directory")
    lin.add_argument("path", help="a declared output of a stage, or any file inside one")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    lin.add_argument("--workspace", default=".",
                     help="workspace root (holds params.yaml and the default mlflow.db); default: current directory")
    lin.set_defaults(func=_cmd_lineage)

    pc = sub.add_parser("params-check", help="validate a params file; exit 2 naming every bad key")
    pc.add_argument("path", nargs="?", default="params.yaml")
    pc.add_argument("--no-paths", action="store_true", help="skip the checks that path-valued keys exist")
    pc.set_defaults(func=_cmd_params_check)

    env = sub.add_parser("env", help="the environment every stage run records; check or refresh requirements.lock")
    mode = env.add_mutually_exclusive_group()
    mode.add_argument("--check-lock", metavar="LOCK", help="exit 1 if an installed package differs from LOCK")
    mode.add_argument("--write-lock", metavar="LOCK", help="resolve the project's dependencies anew into LOCK")
    env.add_argument("--project", default=".", help="with --write-lock: the directory holding pyproject.toml")
    env.set_defaults(func=_cmd_env)

    cs = sub.add_parser("compare-screenshot",
                        help="PNG of the MLflow UI compare view of one stage's runs (mlflow server on 127.0.0.1 + headless Chromium)")
    cs.add_argument("--track", default="cxr")
    cs.add_argument("--stage", default="metrics_cxr", help="e.g. rl_cxr (training curves) or metrics_cxr (table metrics)")
    cs.add_argument("--out", default="mlflow_compare.png")
    cs.add_argument("--workspace", default=".")
    cs.set_defaults(func=_cmd_compare_screenshot)

    # listed for --help only; main() forwards everything after `bench` untouched
    sub.add_parser("bench", help="benchmarks (medrl.bench); `medrl bench --help` for its options", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    from medrl.redact import run_redacted

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_redacted(lambda: _cmd_bench(argv[1:]))
    args = build_parser().parse_args(argv)
    return run_redacted(lambda: args.func(args))

if __name__ == "__main__":
    raise SystemExit(main())
