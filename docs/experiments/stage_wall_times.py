"""Wall time of every stage a workspace ran, from its MLflow store (each stage execution is one
run: start and end time, `stage_seconds`), and the span from the first stage's start to the
last one's end. Runs that did not finish are listed with their status and left out of the sums.

    python docs/experiments/stage_wall_times.py <workspace> [--csv out.csv]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient


def stage_runs(workspace: Path) -> pd.DataFrame:
    db = workspace / "mlflow.db"
    if not db.is_file():
        raise SystemExit(f"{db}: no MLflow store; run the workflow in {workspace} first")
    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    rows = []
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id], max_results=10_000):
            t = r.data.tags
            if "medrl.stage" not in t:
                continue
            rows.append({
                "stage": t["mlflow.runName"], "track": t.get("medrl.track", ""), "status": r.info.status,
                "start": pd.Timestamp(r.info.start_time, unit="ms"),
                "end": pd.Timestamp(r.info.end_time, unit="ms") if r.info.end_time else pd.NaT,
                "stage_seconds": r.data.metrics.get("stage_seconds"),
            })
    if not rows:
        raise SystemExit(f"{db}: no stage runs")
    return pd.DataFrame(rows).sort_values("start").reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--csv", type=Path, help="also write the per-stage table here")
    a = ap.parse_args()
    d = stage_runs(a.workspace)
    d["seconds"] = (d["end"] - d["start"]).dt.total_seconds()
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        print(d[["stage", "track", "status", "start", "seconds", "stage_seconds"]].to_string(index=False))
    done = d[d["status"] == "FINISHED"]
    for track, g in done.groupby("track"):
        print(f"{track}: {len(g)} stages, {g['seconds'].sum() / 60:.1f} stage-minutes")
    span = (done["end"].max() - done["start"].min()).total_seconds()
    print(f"finished stages: {len(done)} of {len(d)}; {done['seconds'].sum() / 60:.1f} stage-minutes; "
          f"span first start -> last end {span / 3600:.2f} h ({span / 60:.0f} min)")
    if a.csv:
        d.to_csv(a.csv, index=False)


if __name__ == "__main__":
    main()
