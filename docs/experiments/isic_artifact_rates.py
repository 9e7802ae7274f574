"""How often the H=4 evaluator finds each artifact in a sample folder, per lesion, where the
prompt asks for it and where it does not (the tables of NOTEBOOK ISIC-11 / ISIC-12).
``--judge h6``: the same under the RL reward's judge, plus the mean reward of the images asked
for the artifact with it found and without (ISIC-14: does the reward favour it?).

    python docs/experiments/isic_artifact_rates.py <workspace> data/samples/isic/sd [data/samples/isic/rl/seed_0 ...] [--judge h6]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from medrl.data.prompts import ARTIFACTS4, prompt_to_labels
from medrl.models.classifiers import load_classifier, predict_probs
from medrl.rewards.isic import match_reward


def artifact_rates(workspace: Path, samples: Path, judge: str = "h4") -> pd.DataFrame:
    """Rows (lesion, artifact): the judge's positive rate on images whose prompt asks for the
    artifact and on those whose prompt does not, with their counts; under the reward's judge
    (h6) also the mean reward of the asked images with the artifact found and without."""
    manifest = pd.read_csv(samples / "manifest.csv")
    manifest["path"] = [str(samples / p) for p in manifest["path"]]
    clf = load_classifier(workspace / f"data/models/isic/clf_{judge}")
    probs = torch.as_tensor(predict_probs(clf, manifest)).float()
    found = (probs > 0.5).numpy()
    labels = pd.DataFrame([prompt_to_labels(p) for p in manifest["prompt"]])
    reward = match_reward(probs, torch.tensor(labels[list(clf.heads)].to_numpy()).float()).numpy()
    rows = []
    for lesion in ("MEL", "NV"):
        of_lesion = (labels[lesion] == 1).to_numpy()
        for head in (h for h in clf.heads if h in ARTIFACTS4):
            j = list(clf.heads).index(head)
            asked = (labels[head] == 1).to_numpy()
            row = {"lesion": lesion, "artifact": head,
                   "asked": found[of_lesion & asked, j].mean(), "n_asked": int((of_lesion & asked).sum()),
                   "not_asked": found[of_lesion & ~asked, j].mean(), "n_not_asked": int((of_lesion & ~asked).sum())}
            if judge == "h6":
                sel = of_lesion & asked
                row.update(reward_found=reward[sel & found[:, j]].mean(), reward_missing=reward[sel & ~found[:, j]].mean())
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("samples", nargs="+", help="sample folders (with manifest.csv), relative to the workspace")
    ap.add_argument("--judge", choices=("h4", "h6"), default="h4", help="h4: the evaluator; h6: the RL reward's judge")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for s in args.samples:
        table = artifact_rates(args.workspace, args.workspace / s, args.judge)
        print(f"{s}\n{table.round(3).to_string(index=False)}\n")


if __name__ == "__main__":
    main()
