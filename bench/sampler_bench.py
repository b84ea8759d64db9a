"""What the sampler returns, measured: Dice of p_final, mean of M samples, last posterior; Euler vs Heun per NFE.

    python bench/sampler_bench.py --checkpoint runs/cxr_dfm/best.pt \
        --datalist ../shared/data/cxr_lung/datalist.json --split validation --limit 20

Every variant goes through the same evaluate_items (sliding windows, Gaussian blending, > 0.5, metrics in the
label's original geometry); only the inferer's settings change. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import load_system  # noqa: E402
from lib.cli import _quiet  # noqa: E402
from lib.data import load_datalist  # noqa: E402
from lib.evaluation import evaluate_items, make_inferer, preprocess_item  # noqa: E402
from lib.samplers import nfe_of  # noqa: E402
from lib.transforms import label_transforms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--out", default="runs/bench/sampler_bench.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="only the output comparison at the default steps")
    a = ap.parse_args()
    _quiet()
    system = load_system(a.checkpoint, device=a.device)
    items = load_datalist(a.datalist, a.split)[: a.limit]
    pre = [preprocess_item(system, it) for it in items]  # with case_id: the same per-image seeds as evaluate
    lab_t = label_transforms(system.hparams.preprocessing)
    labs = [lab_t({"label": it["label"]}) for it in items]
    steps = system.hparams.sampler.steps
    variants = [
        ("p_final (contract)", dict(sampler="euler", steps=steps)),
        ("mean of 4 samples", dict(sampler="euler", steps=steps, num_samples=4)),
        ("last posterior", dict(sampler="euler", steps=steps, output="last_posterior")),
    ]
    if not a.quick:
        for k in (2, 4, 8, 16):
            variants.append((f"euler {k} steps", dict(sampler="euler", steps=k)))
        for k in (2, 4, 8):
            variants.append((f"heun {k} steps", dict(sampler="heun", steps=k)))
        for k in (2, 4, 8):
            variants.append((f"euler {k} steps, last posterior", dict(sampler="euler", steps=k, output="last_posterior")))
            variants.append((f"heun {k} steps, last posterior", dict(sampler="heun", steps=k, output="last_posterior")))
    rows = []
    for name, kw in variants:
        t0 = time.perf_counter()
        inferer = make_inferer(system, **kw)
        cases, summ = evaluate_items(system, items, inferer, preprocessed=pre, labels=labs)
        dt = time.perf_counter() - t0
        nfe = nfe_of(inferer.sampler, inferer.steps) * inferer.num_samples
        row = {"variant": name, **kw, "nfe_per_window": nfe, "dice_mean": summ["dice"]["mean"],
               "dice_median": summ["dice"]["median"], "dice_min": summ["dice"]["min"],
               "hd95_mean": summ.get("hd95", {}).get("mean"), "seconds": round(dt, 1), "n": summ["n"]}
        rows.append(row)
        print(f"{name:36s} NFE/window {nfe:3d}  Dice {row['dice_mean']:.4f} (median {row['dice_median']:.4f}, "
              f"min {row['dice_min']:.4f})  HD95 {row['hd95_mean'] or float('nan'):.2f}  {dt:.0f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "split": a.split, "n": len(items), "rows": rows},
                                      indent=1))


if __name__ == "__main__":
    main()
