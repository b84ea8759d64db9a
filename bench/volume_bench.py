"""A full-size two-channel MR volume (240 x 240 x 155, BraTS size) through the one predictor: seconds, windows,
peak memory, for the ``unet`` and ``cached`` architectures of the ``brats_wt`` backbone (random weights: timing).

    python bench/volume_bench.py [--device cuda] [--steps 4] [--num-samples 1] [--precision auto]

The volume is given to the sliding-window inferer as the network grid (no resampling), so the window count is that
of a 1 mm volume with 48^3 windows. Prints the CPU/GPU, the precision the policy picked and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.cli import _quiet  # noqa: E402
from lib.config import load_preset  # noqa: E402
from lib.evaluation import make_inferer  # noqa: E402
from lib.precision import default_device, describe  # noqa: E402
from lib.training import build_system  # noqa: E402
from lib.vlm import ensure_tiny_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--archs", nargs="+", default=["unet", "cached"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    ap.add_argument("--out", default="runs/bench/volume_bench.json")
    a = ap.parse_args()
    _quiet()
    vlm = ensure_tiny_clip(ROOT / "runs" / "vlm" / "tiny-clip")
    vol = torch.randn(1, 2, *a.shape, generator=torch.Generator().manual_seed(0))
    info = describe(a.precision, a.device)
    print(f"command: python {' '.join(sys.argv)}\n{info}")
    rows = []
    t_start = time.perf_counter()
    x = vol.to(a.device)
    for arch in a.archs:
        hp = load_preset("brats_wt")
        hp.vlm.name_or_path = str(vlm)
        hp.model.arch = arch
        hp.precision = a.precision
        torch.manual_seed(0)
        system = build_system(hp, a.device)
        inf = make_inferer(system, steps=a.steps, num_samples=a.num_samples, sw_batch_size=a.sw_batch_size)
        inf(x[..., :48], system)  # warm-up
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        prob = inf(x, system)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() / 2**20 if a.device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        from monai.inferers.utils import _get_scan_interval
        from monai.data.utils import dense_patch_slices

        n_win = len(dense_patch_slices(a.shape, hp.preprocessing.patch_size,
                                       _get_scan_interval(a.shape, hp.preprocessing.patch_size, 3, (0.25,) * 3)))
        row = {"arch": arch, "seconds": round(dt, 2), "windows": n_win, "steps": a.steps,
               "num_samples": a.num_samples, "peak_memory_MiB": round(peak),
               # CUDA: this call's peak allocation; CPU: the process's peak so far (ru_maxrss never goes down, so a
               # later row cannot be lower than an earlier one)
               "peak_memory_kind": "cuda max_memory_allocated" if a.device.startswith("cuda") else "process ru_maxrss",
               "mean_prob": float(prob.mean())}
        rows.append(row)
        print(row, flush=True)
        # the next architecture's peak must not include this one's output (a 240x240x155 float map: 34 MiB) or model;
        # before 2026-12-06 it did, which put `cached` (measured second) 34 MiB too high
        del prob, inf, system
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": info, "rows": rows,
                                       "wall_s": round(time.perf_counter() - t_start, 1)}, indent=1))


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
