"""Paired held-out differences between two CXR models' metrics (their metrics.json, written by
`metrics_cxr` with shared bootstrap draws), e.g. a variant rerun in another workspace against
the anchor:

    python docs/experiments/cxr_heldout_diff.py <a/metrics.json> <b/metrics.json> [--weights 1,10,10]

With r_diag in both files (metrics written since 2026-12-01), the combined reward
l_align*r_align + l_diag*r_diag + l_consist*similarity is compared too, with the weights
given or those a variant's metrics.json stores (``reward.weights``): a - b with b the anchor
is the held-out RLCF reward of a.
"""
from __future__ import annotations

import argparse
import json

from medrl.metrics.bootstrap import diff_from_boot
from medrl.metrics.cxr_eval import combined_reward

PATHS = {"r_align": ["r_align"], "r_diag": ["r_diag"], "AUROC (avg)": ["auroc", "avg"], "similarity": ["similarity"],
         "FID": ["fid"], "MS-SSIM": ["msssim"]}


def _get(m: dict, path: list[str]) -> dict | None:
    for k in path:
        m = m.get(k) if isinstance(m, dict) else None
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--weights", help="l_align,l_diag,l_consist (default: a's or b's reward.weights)")
    args = ap.parse_args()
    a, b = (json.load(open(p)) for p in (args.a, args.b))
    for name, path in PATHS.items():
        ma, mb = _get(a, path), _get(b, path)
        if ma is None or mb is None:
            print(f"{name:12s} (not in both files)")
            continue
        d = diff_from_boot(ma, mb, where=name)
        print(f"{name:12s} a {ma['value']:.3f}  b {mb['value']:.3f}  a-b {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    if args.weights:
        w = dict(zip(("l_align", "l_diag", "l_consist"), map(float, args.weights.split(","))))
    else:
        w = (_get(a, ["reward", "weights"]) or _get(b, ["reward", "weights"]))
    if w is None or "r_diag" not in a or "r_diag" not in b:
        return
    ra, rb = (combined_reward(m, w) for m in (a, b))
    d = diff_from_boot(ra, rb, where="reward")
    print(f"{'reward':12s} a {ra['value']:.3f}  b {rb['value']:.3f}  a-b {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
          f"  (weights {w['l_align']:g}, {w['l_diag']:g}, {w['l_consist']:g})")


if __name__ == "__main__":
    main()
