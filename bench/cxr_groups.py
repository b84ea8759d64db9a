"""Where in the Shenzhen set are the misses? Mean Dice, recall and precision per hundred of the X-ray number.

Reads the per-case file that ``python -m lib evaluate`` writes (``OUT/cases.json``, or a training run's
``best_val_cases.json``) and groups the Shenzhen cases (``CHNCXR_<number>_<0|1>``) by ``number // 100``; other
cases (Montgomery) form one group. For each group: how many cases, mean Dice, mean recall and precision, how many
cases have recall < 0.9, and the group's share of the split's total Dice loss (sum of 1 - Dice).

    python -m lib evaluate --checkpoint runs/<run>/best.pt --datalist ../shared/data/cxr_lung/datalist.json \
        --split training --out runs/<run>/eval_training
    python bench/cxr_groups.py runs/<run>/eval_training/cases.json runs/<run>/best_val_cases.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def groups(cases: list[dict]) -> list[dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for c in cases:
        m = re.match(r"CHNCXR_(\d+)_\d", str(c["case_id"]))
        by[f"CHNCXR {int(m.group(1)) // 100 * 100:03d}-{int(m.group(1)) // 100 * 100 + 99:03d}" if m
           else "other"].append(c)
    total = sum(1 - c["dice"] for c in cases) or 1.0
    out = []
    for name in sorted(by):
        g = by[name]
        out.append({"group": name, "n": len(g), "dice": sum(c["dice"] for c in g) / len(g),
                    "recall": sum(c["recall"] for c in g) / len(g),
                    "precision": sum(c["precision"] for c in g) / len(g),
                    "recall_below_0.9": sum(c["recall"] < 0.9 for c in g),
                    "share_of_dice_loss": sum(1 - c["dice"] for c in g) / total})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="+", help="cases.json of evaluate, or best_val_cases.json of a training run")
    ap.add_argument("--out", help="write the groups of every file as JSON here")
    a = ap.parse_args()
    report = {}
    for path in a.cases:
        cases = json.load(open(path))
        cases = cases["cases"] if isinstance(cases, dict) else cases
        report[path] = rows = groups(cases)
        mean = sum(c["dice"] for c in cases) / len(cases)
        print(f"{path}: {len(cases)} cases, mean Dice {mean:.4f}")
        print(f"  {'group':<16}{'n':>4}{'Dice':>8}{'recall':>8}{'prec.':>8}{'rec<0.9':>8}{'loss share':>11}")
        for r in rows:
            print(f"  {r['group']:<16}{r['n']:>4}{r['dice']:>8.4f}{r['recall']:>8.4f}{r['precision']:>8.4f}"
                  f"{r['recall_below_0.9']:>8}{r['share_of_dice_loss']:>11.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
