"""The predictor's memory cap (``sampler.max_batch_voxels``) as a speed knob: ratios measured side by side in one run.

    python bench/cap_bench.py [--preset cxr_lung] [--items 1 2 4 8 16 32] [--repeats 5]

:meth:`lib.inferer.DFMSystem.predict_windows` runs the (window x sample) items of a call in chunks of at most
``max_batch_voxels // window voxels`` items. Every item draws from its own seeded stream, so the chunk size changes
the time, not the draws; what remains is the floating-point order of a batched convolution, which can now and then
flip a Bernoulli draw (the largest difference to the first variant is printed). Windows: the preset's
``sw_batch_size`` windows of its patch size (cut from a real chest X-ray for 2D when ../shared/data is there, else
random), the preset's backbone and sampler, random weights (timing only). Variants are interleaved round-robin; the
median of ``--repeats`` rounds is reported relative to the fastest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.cli import _quiet  # noqa: E402
from lib.config import load_preset  # noqa: E402
from lib.precision import describe  # noqa: E402
from lib.training import build_system  # noqa: E402
from lib.vlm import ensure_tiny_clip  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_bench import interleaved_medians, windows_for, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cxr_lung")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                    help="(window x sample) items per network call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--samples", type=int, default=None, help="samples per window (default: the preset's)")
    ap.add_argument("--out", default="runs/bench/cap_bench.json")
    a = ap.parse_args()
    _quiet()
    torch.manual_seed(0)
    hp = load_preset(a.preset)
    hp.vlm.name_or_path = str(ensure_tiny_clip(ROOT / "runs" / "vlm" / "tiny-clip"))
    s = build_system(hp, a.device)
    sp = hp.sampler
    if a.samples:
        sp.num_samples = a.samples
    win = windows_for(hp, sp.sw_batch_size)
    seeds = list(range(len(win)))
    vox = win[0, 0].numel()
    total = len(win) * sp.num_samples

    def call(items):
        return s.predict_windows(win, s.texts_for(None, len(win)), seeds, sampler=sp.name, steps=sp.steps,
                                 num_samples=sp.num_samples, precision=a.precision,
                                 max_batch_voxels=items * vox)

    ref = call(a.items[0])[0]
    diff = {n: float((call(n)[0] - ref).abs().max()) for n in a.items}
    med, wall = interleaved_medians({n: (lambda n=n: call(n)) for n in a.items}, a.repeats, a.device)
    best = min(med, key=med.get)
    info = describe(a.precision, a.device)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"CPU capability {info['cpu_capability']}, threads {info['threads']}, torch {info['torch']}; "
          f"{len(win)} windows of {list(win.shape[2:])} x {sp.num_samples} samples x {sp.steps} {sp.name} steps "
          f"({total} items); median of {a.repeats} interleaved rounds; bench wall {wall:.0f} s")
    rows = []
    for n in a.items:
        rows.append({"items_per_call": n, "max_batch_voxels": n * vox, "median_s": med[n],
                     "ratio_to_best": med[n] / med[best], "max_abs_diff_to_first": diff[n]})
        print(f"  {n:3d} items per call (max_batch_voxels {n * vox:>9d}): {1000 * med[n]:8.1f} ms  "
              f"x{med[n] / med[best]:5.2f} of the fastest   max |diff| {diff[n]:.2e}")
    write_result(a.out, info, rows, wall)


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
