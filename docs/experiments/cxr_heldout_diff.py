"""Paired held-out differences between two CXR models' metrics (their metrics.json, written by
`metrics_cxr` with shared bootstrap draws), e.g. a variant rerun in another workspace against
the anchor:

    python docs/experiments/cxr_heldout_diff.py <a/metrics.json> <b/metrics.json>
"""
from __future__ import annotations

import json
import sys

from medrl.metrics.bootstrap import diff_from_boot

PATHS = {"r_align": ["r_align"], "AUROC (avg)": ["auroc", "avg"], "similarity": ["similarity"],
         "FID": ["fid"], "MS-SSIM": ["msssim"]}


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = (json.load(open(p)) for p in sys.argv[1:])
    for name, path in PATHS.items():
        ma, mb = a, b
        for k in path:
            ma, mb = ma[k], mb[k]
        d = diff_from_boot(ma, mb, where=name)
        print(f"{name:12s} a {ma['value']:.3f}  b {mb['value']:.3f}  a-b {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")


if __name__ == "__main__":
    main()
