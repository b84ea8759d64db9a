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
    from lib.evaluation import _stats

    def loss(c):  # (Dice is defined in every case but one of two empty masks, which loses nothing)
        return 1 - c["dice"] if c.get("dice") is not None else 0.0

    def mean(g, k):  # evaluate's statistics: the defined values, the others counted (a total miss has no precision,
        st = _stats(c.get(k) for c in g) or {}  # an empty truth no recall: the sums failed on them, a review)
        return st.get("mean"), st.get("undefined", 0)

    total = sum(loss(c) for c in cases) or 1.0
    out = []
    for name in sorted(by):
        g = by[name]
        row = {"group": name, "n": len(g)}
        for k in ("dice", "recall", "precision"):
            row[k], undefined = mean(g, k)
            if undefined:
                row[f"{k}_undefined"] = undefined
        row["recall_below_0.9"] = sum(c.get("recall") is not None and c["recall"] < 0.9 for c in g)
        row["share_of_dice_loss"] = sum(loss(c) for c in g) / total
        out.append(row)
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
        dice = [c["dice"] for c in cases if c.get("dice") is not None]
        print(f"{path}: {len(cases)} cases, mean Dice {sum(dice) / max(len(dice), 1):.4f}")
        print(f"  {'group':<16}{'n':>4}{'Dice':>8}{'recall':>8}{'prec.':>8}{'rec<0.9':>8}{'loss share':>11}")
        def f(v):  # (undefined in every case of the group: a dash)
            return f"{v:>8.4f}" if v is not None else f"{'-':>8}"

        for r in rows:
            print(f"  {r['group']:<16}{r['n']:>4}{f(r['dice'])}{f(r['recall'])}{f(r['precision'])}"
                  f"{r['recall_below_0.9']:>8}{r['share_of_dice_loss']:>11.3f}"
                  + "".join(f"  ({r[k]} without {k.split('_')[0]})" for k in r if k.endswith("_undefined")))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
