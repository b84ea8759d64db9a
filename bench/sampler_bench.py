"""What the sampler returns, measured: Dice of p_final, mean of M samples, last posterior; Euler vs Heun
(theta-trapezoidal) at equal network evaluations per sample (Heun K steps = 2K = Euler 2K - 1 steps).

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
from lib.precision import describe  # noqa: E402
from lib.samplers import nfe_of  # noqa: E402
from lib.transforms import label_item  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--out", default="runs/bench/sampler_bench.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="only the output comparison at the default steps")
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 8], help="M for the Euler/Heun comparison")
    ap.add_argument("--heun-steps", type=int, nargs="+", default=[2, 4, 8])
    a = ap.parse_args()
    _quiet()
    system = load_system(a.checkpoint, device=a.device)
    items = load_datalist(a.datalist, a.split)[: a.limit]
    pre = [preprocess_item(system, it) for it in items]  # with case_id: the same per-image seeds as evaluate
    lab_t = system.label_reader()  # evaluate's
    labs = [lab_t(label_item(it)) for it in items]
    d = system.hparams.sampler
    variants = [
        (f"checkpoint default ({d.name} {d.steps} steps x {d.num_samples})", dict()),
        (f"p_final, 1 sample, {d.steps} steps", dict(sampler="euler", steps=d.steps, num_samples=1)),
        (f"last posterior, 1 sample, {d.steps} steps", dict(sampler="euler", steps=d.steps, num_samples=1,
                                                             output="last_posterior")),
    ]
    if not a.quick:
        # equal network evaluations per sample: heun K steps = 2K = euler 2K - 1 steps
        for m in a.samples:
            for k in a.heun_steps:
                variants.append((f"euler {2 * k - 1} steps x {m}", dict(sampler="euler", steps=2 * k - 1, num_samples=m)))
                variants.append((f"heun {k} steps x {m}", dict(sampler="heun", steps=k, num_samples=m)))
    rows = []
    t_start = time.perf_counter()
    for name, kw in variants:
        t0 = time.perf_counter()
        inferer = make_inferer(system, **kw)
        kw = inferer.settings()
        cases, summ = evaluate_items(system, items, inferer, preprocessed=pre, labels=labs)
        dt = time.perf_counter() - t0
        nfe = nfe_of(inferer.sampler, inferer.steps) * inferer.num_samples
        row = {"variant": name, **kw, "nfe_per_window": nfe, "dice_mean": summ["dice"]["mean"],
               "dice_median": summ["dice"]["median"], "dice_min": summ["dice"]["min"],
               "hd95_mean": summ.get("hd95", {}).get("mean"), "seconds": round(dt, 1), "n": summ["n"]}
        rows.append(row)
        print(f"{name:44s} NFE/window {nfe:3d}  Dice {row['dice_mean']:.4f} (median {row['dice_median']:.4f}, "
              f"min {row['dice_min']:.4f})  HD95 {row['hd95_mean'] or float('nan'):.2f}  {dt:.0f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "split": a.split, "n": len(items), "rows": rows,
                                       "command": sys.argv, "machine": describe(system.hparams.precision, a.device),
                                       "wall_s": round(time.perf_counter() - t_start, 1)},
                                      indent=1))


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
