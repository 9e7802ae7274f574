"""How often the H=4 evaluator finds each artifact in a sample folder, per lesion, where the
prompt asks for it and where it does not (the tables of NOTEBOOK ISIC-11 / ISIC-12).

    python docs/experiments/isic_artifact_rates.py <workspace> data/samples/isic/sd [data/samples/isic/rl/seed_0 ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from medrl.data.prompts import prompt_to_labels
from medrl.models.classifiers import load_classifier, predict_probs


def artifact_rates(workspace: Path, samples: Path) -> pd.DataFrame:
    """Rows (lesion, artifact): the evaluator's positive rate on images whose prompt asks for the
    artifact and on those whose prompt does not, with their counts."""
    manifest = pd.read_csv(samples / "manifest.csv")
    manifest["path"] = [str(samples / p) for p in manifest["path"]]
    h4 = load_classifier(workspace / "data/models/isic/clf_h4")
    found = predict_probs(h4, manifest) > 0.5
    labels = pd.DataFrame([prompt_to_labels(p) for p in manifest["prompt"]])
    rows = []
    for lesion in ("MEL", "NV"):
        of_lesion = (labels[lesion] == 1).to_numpy()
        for j, head in enumerate(h4.heads):
            asked = (labels[head] == 1).to_numpy()
            rows.append({"lesion": lesion, "artifact": head,
                         "asked": found[of_lesion & asked, j].mean(), "n_asked": int((of_lesion & asked).sum()),
                         "not_asked": found[of_lesion & ~asked, j].mean(), "n_not_asked": int((of_lesion & ~asked).sum())})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("samples", nargs="+", help="sample folders (with manifest.csv), relative to the workspace")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for s in args.samples:
        table = artifact_rates(args.workspace, args.workspace / s)
        print(f"{s}\n{table.round(3).to_string(index=False)}\n")


if __name__ == "__main__":
    main()
