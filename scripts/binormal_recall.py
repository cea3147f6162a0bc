#!/usr/bin/env python
"""The recall a predictor of a given AUROC can reach when it flags a given fraction of the neurons, in a
binormal model of its scores: inactive neurons' scores ~ N(0, 1), active ones' ~ N(mu, 1) with
mu = sqrt(2) * Phi^-1(AUROC) (the AUROC of two unit normals mu apart); the threshold is set so that the expected
flagged fraction is `flagged`. A check of whether a measured recall is what the predictor's quality and its
candidate budget imply (docs/BENCHMARKS.md, "Sparse decode end to end").

  python scripts/binormal_recall.py --auroc 0.93 --active 0.12 --flagged 0.17
"""

from __future__ import annotations

import argparse
import sys
from statistics import NormalDist


def recall(auroc: float, active: float, flagged: float) -> float:
    """Fraction of the active neurons flagged (see the module doc)."""
    if not (0.5 <= auroc < 1 and 0 < active < 1 and 0 < flagged < 1):
        raise ValueError(f"auroc {auroc} (0.5 to 1), active {active} and flagged {flagged} (0 to 1)")
    unit = NormalDist()
    mu = 2 ** 0.5 * unit.inv_cdf(auroc)

    def flagged_at(t: float) -> float:
        return (1 - active) * (1 - unit.cdf(t)) + active * (1 - unit.cdf(t - mu))

    lo, hi = -10.0, 10.0  # flagged_at falls as the threshold rises: bisect for flagged_at(t) = flagged
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flagged_at(mid) > flagged else (lo, mid)
    return 1 - unit.cdf(lo - mu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--auroc", type=float, required=True)
    ap.add_argument("--active", type=float, required=True, help="fraction of neurons truly active")
    ap.add_argument("--flagged", type=float, required=True, help="fraction the predictor flags")
    args = ap.parse_args()
    print(f"AUROC {args.auroc}, {args.active:.1%} active, {args.flagged:.1%} flagged: "
          f"recall {recall(args.auroc, args.active, args.flagged):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
