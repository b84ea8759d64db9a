"""Would averaging predictions over shifted network grids help? (test-time augmentation by sub-voxel shifts)

    python bench/shift_tta.py --checkpoint runs/cxr_soft/best.pt \
        --datalist ../shared/data/cxr_lung/datalist.json --split validation --out bench/results/shift_tta.json

A 2D PNG checkpoint on a grid coarser than the image (``cxr_lung``: 3 px) samples the image at one phase of that
grid. Cropping the first ``dy`` rows and ``dx`` columns (0..2 px) moves the grid by a third of a network voxel
relative to the anatomy; each view goes through the one predictor path (``predict_item``: preprocessing, sliding
windows, inversion to the image's grid), is put back in place, and the views' probability maps are averaged before
``> 0.5``. Reported: mean Dice for M samples per view x K views (8 x 1 is the product; 2 x 4 draws as many
samples -- the same cost for an ``arch="unet"`` model, about 2.3x for ``cached``, whose U-Net body runs once per
window and view: 4 bodies + 16 step heads against 1 + 16, a step head about 0.07 of a plain pass).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import load_system  # noqa: E402
from lib.data import load_datalist  # noqa: E402
from lib.evaluation import dice_of, make_inferer, predict_item, truth_on_image_grid  # noqa: E402
from lib.transforms import label_item  # noqa: E402

SHIFTS = [(0, 0), (1, 2), (2, 1), (2, 2), (1, 1), (0, 1), (1, 0), (2, 0), (0, 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--samples", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--views", type=int, nargs="+", default=[1, 4, 9])
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    system = load_system(a.checkpoint)
    items = load_datalist(a.datalist, a.split)
    if any(not str(it["image"]).lower().endswith(".png") for it in items):
        raise SystemExit("shift_tta.py shifts 2D PNG images (a chest X-ray datalist)")
    lab_t = system.label_reader()  # evaluate's
    dice: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in a.samples:
            inferer = make_inferer(system, num_samples=m)
            for it in items:
                img = np.array(Image.open(it["image"]))
                probs = []
                for dy, dx in SHIFTS[:max(a.views)]:
                    if (dy, dx) == (0, 0):
                        probs.append(predict_item(system, it, inferer)["prob"])
                        continue
                    f = Path(tmp) / f"{it['case_id']}_{dy}{dx}.png"
                    if not f.exists():
                        Image.fromarray(img[dy:, dx:]).save(f)
                    q = predict_item(system, {**it, "image": str(f)}, inferer)["prob"]
                    # MONAI reads a PNG as (x, y): the crop of rows dy and columns dx is [dx:, dy:] there
                    p = torch.zeros((1, img.shape[1], img.shape[0]))
                    p[:, dx:, dy:] = q
                    probs.append(p)
                label = truth_on_image_grid(it, lab_t(label_item(it))["label"], probs[0])  # as evaluate
                for k in a.views:
                    mean = torch.stack(probs[:k]).mean(0)
                    dice.setdefault(f"{m}x{k}", []).append(dice_of((mean > 0.5).float(), label))
            print({k: round(float(np.mean(v)), 4) for k, v in dice.items()}, flush=True)
    res = {"command": "python " + " ".join(sys.argv), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "wall_seconds": round(time.perf_counter() - t0, 1),
           "checkpoint": a.checkpoint, "split": a.split, "n": len(items), "shifts_px": SHIFTS[:max(a.views)],
           "mean_dice": {k: float(np.mean(v)) for k, v in dice.items()}}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
