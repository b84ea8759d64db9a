"""Click maps per request: the box computation (lib.clicks) against the whole-grid computation it replaced.

    python bench/click_maps_bench.py --shape 80 80 52 --clicks 1 5 10 --repeats 5

Times :func:`lib.clicks.guidance_maps` + :func:`lib.clicks.hold_maps` (the ``brats_wt`` click model's fill: radius 16,
tolerance 0.2, "above", channel 0, scale 3, against a reference segmentation) for K clicks on one network grid, and
the same maps computed over the whole grid for every click (``tests/test_clicks.py::_whole_grid_maps``, the code
before 2026-12-06, which the tests compare bit for bit). Min of ``--repeats``; prints the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lib.clicks import Clicks, guidance_maps, hold_maps  # noqa: E402
from test_clicks import _whole_grid_maps  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[80, 80, 52])
    ap.add_argument("--clicks", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if len(a.shape) not in (2, 3) or min(a.shape) < 1 or min(a.clicks) < 1 or a.repeats < 1:  # (an IndexError)
        ap.error(f"--shape takes 2 or 3 sizes >= 1, --clicks and --repeats numbers >= 1; got {a.shape}, {a.clicks}, "
                 f"{a.repeats}")
    shape = tuple(a.shape)
    image = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    ref = np.zeros(shape, bool)
    ref[tuple(slice(s // 3, 2 * s // 3) for s in shape)] = True
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, grid {shape}")
    for k in a.clicks:
        c = Clicks()
        for i in range(k):
            c.add(tuple([min(10 + 6 * i, shape[0] - 1)] + [s // 2 for s in shape[1:]]), i % 3 != 2)
        times = {}
        for name in ("whole grid", "boxes"):
            best = float("inf")
            for _ in range(a.repeats):
                t = time.perf_counter()
                if name == "boxes":
                    guidance_maps(c, shape, 3.0)
                    hold_maps(c, shape, -1, image=image[:1], grow_radius=16, grow_tolerance=0.2, grow_side="above",
                              grow_scale=3.0, reference=ref)
                else:
                    _whole_grid_maps(c, shape, 3.0, -1, image[:1], 16, 0.2, "above", 3.0, ref)
                best = min(best, time.perf_counter() - t)
            times[name] = best
        g, h = _whole_grid_maps(c, shape, 3.0, -1, image[:1], 16, 0.2, "above", 3.0, ref)
        same = torch.equal(g, guidance_maps(c, shape, 3.0)) and torch.equal(h, hold_maps(
            c, shape, -1, image=image[:1], grow_radius=16, grow_tolerance=0.2, grow_side="above", grow_scale=3.0,
            reference=ref))
        print(f"{k:3d} clicks: whole grid {times['whole grid']:.3f} s, boxes {times['boxes']:.3f} s, "
              f"{times['whole grid'] / times['boxes']:.1f}x, same maps: {same}")
    return 0


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
