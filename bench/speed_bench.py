"""Sampler cost as ratios measured side by side in one run (this machine is shared and noisy: ratios, not seconds).

    python bench/speed_bench.py [--preset cxr_lung] [--device cpu] [--repeats 7] [--precision fp32]

Every variant runs :meth:`lib.inferer.DFMSystem.predict_windows` (the one predictor) on the same batch of windows
(``--windows`` windows of the preset's patch size cut from a real chest X-ray when ../shared/data is there, else
random), with the preset's backbone (random weights: timing only). Variants are interleaved round-robin and the
median of ``--repeats`` rounds is reported, relative to one pass of the plain U-Net (``model.mode=plain``):

* ``unet`` / ``cached`` architectures, Euler K steps, 1 sample;
* M samples x K steps, batched along the batch axis vs the earlier path (condition once, then
  ``lib.samplers.run_sampler``'s loop over the samples: sequential);
* fp32 vs bf16 autocast of the same call (what ``precision=auto`` has to decide on this CPU).

Prints the CPU (``torch.backends.cpu.get_cpu_capability()``), threads, the command, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.cli import _quiet  # noqa: E402
from lib.config import load_preset  # noqa: E402
from lib.flow import make_scheduler  # noqa: E402
from lib.inferer import eval_mode  # noqa: E402
from lib.precision import autocast, describe, reproducible  # noqa: E402
from lib.samplers import run_sampler  # noqa: E402
from lib.training import build_system  # noqa: E402
from lib.vlm import ensure_tiny_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def windows_for(hp, n: int) -> torch.Tensor:
    data = ROOT.parent / "shared" / "data" / "cxr_lung" / "datalist.json"
    patch = hp.preprocessing.patch_size
    if hp.preprocessing.spatial_dims == 2 and data.exists():
        from lib.data import load_datalist
        from lib.transforms import preprocess

        item = load_datalist(data, "validation")[0]
        img = preprocess(hp.preprocessing)({"image": item["image"]})["image"].as_tensor()
        h, w = img.shape[1:]
        out = []
        for i in range(n):
            y = (i * 17) % max(1, h - patch[0] + 1)
            x = (i * 29) % max(1, w - patch[1] + 1)
            out.append(img[:, y:y + patch[0], x:x + patch[1]])
        return torch.stack(out)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, hp.preprocessing.num_channels, *patch, generator=g)


def _sync(device) -> None:
    """A CUDA call returns before the GPU has finished: wait, so that each variant's time is its own work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(variants: dict, repeats: int, device="cpu") -> tuple[dict, float]:
    """Warm each variant up once, then time ``repeats`` round-robin rounds: ``({key: median seconds}, wall)``. On
    CUDA the GPU is synchronised before and after each timed call (before 2026-12-06 it was not, so a variant's
    unfinished GPU work was charged to the next one: the GPU rows measured before then are not reliable)."""
    times: dict = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    _sync(device)
    t_start = time.perf_counter()
    for _ in range(repeats):
        for k, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, time.perf_counter() - t_start


def write_result(out: str, info: dict, rows: list[dict], wall: float) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"command": sys.argv, "machine": info, "rows": rows, "wall_s": wall}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cxr_lung")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=4, help="windows per call (the preset's sw_batch_size)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=2)
    ap.add_argument("--step-blocks", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--precision", default="fp32", help="precision of the architecture comparison")
    ap.add_argument("--no-bf16", action="store_true", help="skip the fp32 vs bf16 comparison")
    ap.add_argument("--out", default="runs/bench/speed_bench.json")
    a = ap.parse_args()
    _quiet()
    torch.manual_seed(0)
    vlm = ensure_tiny_clip(ROOT / "runs" / "vlm" / "tiny-clip")

    def system(**model):
        hp = load_preset(a.preset)
        hp.vlm.name_or_path = str(vlm)
        for k, v in model.items():
            setattr(hp.model, k, v)
        if model.get("mode") == "plain":
            hp.vlm.name_or_path = None
        return build_system(hp, a.device)

    hp0 = load_preset(a.preset)
    win = windows_for(hp0, a.windows)
    seeds = list(range(a.windows))
    plain = system(mode="plain")
    systems = {"unet": system(arch="unet")}
    for sb in a.step_blocks:
        systems[f"cached{sb}"] = system(arch="cached", step_blocks=sb)

    def call(s, precision=a.precision, **kw):
        return lambda: s.predict_windows(win, s.texts_for(None, len(win)), seeds, precision=precision, **kw)

    variants = {"plain one pass": call(plain)}
    for name, s in systems.items():
        variants[f"{name} euler K={a.steps}"] = call(s, sampler="euler", steps=a.steps)
        variants[f"{name} M={a.samples}xK={a.sample_steps} batched"] = call(
            s, sampler="euler", steps=a.sample_steps, num_samples=a.samples)

        def sequential(s=s):
            # the earlier path: condition once, then run_sampler's loop over the M samples
            # under the predictor's own settings (no TF32, deterministic cuDNN): only the batching differs
            with eval_mode(s), torch.no_grad(), reproducible(), autocast(a.precision, a.device):
                cond = s.condition(win.to(a.device), s.texts_for(None, len(win)))
                run_sampler("euler", s.model, cond, (len(win), 1, *win.shape[2:]), a.sample_steps,
                            make_scheduler(s.hparams.flow), num_samples=a.samples,
                            generator=torch.Generator(device=a.device).manual_seed(0), device=a.device)

        variants[f"{name} M={a.samples}xK={a.sample_steps} sequential"] = sequential
    if not a.no_bf16:
        for name in ("unet", f"cached{a.step_blocks[0]}"):
            s = systems[name]
            variants[f"{name} euler K={a.steps} bf16"] = call(s, precision="bf16", sampler="euler", steps=a.steps)
            variants[f"{name} euler K={a.steps} fp32"] = call(s, precision="fp32", sampler="euler", steps=a.steps)
        variants["plain one pass bf16"] = call(plain, precision="bf16")

    med, wall = interleaved_medians(variants, a.repeats, a.device)
    base = med["plain one pass"]
    info = describe(a.precision, a.device)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"CPU capability {info['cpu_capability']}, native bf16 {info['cpu_native_bf16']}, threads "
          f"{info['threads']}, torch {info['torch']}; {a.windows} windows of {hp0.preprocessing.patch_size}; "
          f"median of {a.repeats} interleaved rounds; bench wall {wall:.0f} s")
    rows = []
    for k, v in med.items():
        rows.append({"variant": k, "median_s": v, "ratio_to_plain_pass": v / base})
        print(f"  {k:42s} {1000 * v:8.1f} ms   x{v / base:5.2f} of one plain pass")
    for name in systems:
        b = med[f"{name} M={a.samples}xK={a.sample_steps} batched"]
        sq = med[f"{name} M={a.samples}xK={a.sample_steps} sequential"]
        print(f"  {name}: M={a.samples} batched vs sequential: {sq / b:.2f}x faster")
    write_result(a.out, info, rows, wall)


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
