"""Does the DFM sampler uncertainty rank images by their Dice? (the app's active-learning score, measured)

    python bench/uncertainty_bench.py --checkpoint runs/cxr_dfm/best.pt \
        --datalist ../shared/data/cxr_lung/datalist.json --split test --cases runs/cxr_dfm/eval_test/cases.json

For every image: M samples through the same code the app's scoring method runs (predict_item with num_samples=M,
then lib.evaluation.uncertainty_scores) -> the scores; the Dice of each image comes from ``evaluate``'s
cases.json (the contract output). Reports Spearman's rank correlation between each score and Dice (negative =
uncertain images are the bad ones) and how many of the worst-Dice quartile the top-uncertainty quartile catches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import load_system  # noqa: E402
from lib.cli import _quiet  # noqa: E402
from lib.data import load_datalist  # noqa: E402
from lib.evaluation import make_inferer, predict_item, uncertainty_scores  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--cases", required=True, help="cases.json from `python -m lib evaluate` on the same split")
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", default="runs/bench/uncertainty_bench.json")
    a = ap.parse_args()
    _quiet()
    system = load_system(a.checkpoint)
    inferer = make_inferer(system, num_samples=a.num_samples)
    dice = {c["case_id"]: c["dice"] for c in json.loads(Path(a.cases).read_text())}
    items = [it for it in load_datalist(a.datalist, a.split) if it["case_id"] in dice][: a.limit]
    rows = []
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        out = predict_item(system, it, inferer)
        s = uncertainty_scores(out["prob_pre"], out["var_pre"])
        rows.append({"case_id": it["case_id"], "dice": dice[it["case_id"]], **s})
        print(f"{i + 1}/{len(items)} {it['case_id']}: Dice {dice[it['case_id']]:.4f} "
              f"var/fg {s['variance_per_foreground_voxel']:.4f} mean var {s['mean_variance']:.5f}", flush=True)
    d = np.array([r["dice"] for r in rows])
    report = {"command": "python " + " ".join(sys.argv), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "device": str(system.device), "threads": torch.get_num_threads(),
              "checkpoint": a.checkpoint, "split": a.split, "n": len(rows), "num_samples": a.num_samples,
              "seconds": round(time.perf_counter() - t0, 1), "scores": {}}
    q = max(1, len(rows) // 4)
    worst = set(np.argsort(d)[:q])
    for key in ("variance_per_foreground_voxel", "mean_variance", "mean_entropy"):
        s = np.array([r[key] for r in rows])
        rho, p = spearmanr(s, d)
        top = set(np.argsort(-s)[:q])
        report["scores"][key] = {"spearman_vs_dice": float(rho), "p_value": float(p),
                                 "worst_quartile_caught": f"{len(top & worst)}/{q}"}
        print(f"{key:32s} Spearman(score, Dice) = {rho:+.3f} (p={p:.2g}); top-uncertainty quartile holds "
              f"{len(top & worst)}/{q} of the worst-Dice quartile")
    report["rows"] = rows
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
