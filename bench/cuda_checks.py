"""What the CPU tests cannot show, on a CUDA device: does the same seed give the same probabilities across
``sw_batch_size`` 1 / 4 / 8 and across two runs, in fp32 and in the precision the policy picks there (bf16 on a
GPU that supports it)? Prints the largest absolute difference per comparison, for the ``cxr_lung`` (2D, one real
X-ray when the datalist is given, else a synthetic image) and ``brats_wt`` (3D, 96^3 synthetic) backbones with
random weights and the tiny CLIP.

    python bench/cuda_checks.py [--device cuda] [--datalist ../shared/data/cxr_lung/datalist.json] [--out F.json]

Differences on CUDA come from cuDNN choosing other convolution algorithms for other batch sizes (floating-point
summation order), not from the seeds: each window draws its noise from its own seed (lib.inferer.window_seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.cli import _quiet  # noqa: E402
from lib.config import load_preset  # noqa: E402
from lib.evaluation import make_inferer, preprocess_item  # noqa: E402
from lib.precision import default_device, describe  # noqa: E402
from lib.training import build_system  # noqa: E402
from lib.vlm import ensure_tiny_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(system, image, precision, sw, seed=3):
    system.hparams.precision = precision
    inf = make_inferer(system, sw_batch_size=sw, num_samples=2, steps=4, seed=seed)
    if system.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    p = inf(image.to(system.device), system)
    if system.device.type == "cuda":
        torch.cuda.synchronize()
    return p.float().cpu(), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--datalist")
    ap.add_argument("--out", default="runs/bench/cuda_checks.json")
    a = ap.parse_args()
    _quiet()
    vlm = ensure_tiny_clip(ROOT / "runs" / "vlm" / "tiny-clip")
    info = describe("auto", a.device)
    if a.device.startswith("cuda"):
        info["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    print(f"command: python {' '.join(sys.argv)}\ndefault_device() = {default_device()}\n{info}")
    rows = []
    t_start = time.perf_counter()
    for preset in ("cxr_lung", "brats_wt"):
        hp = load_preset(preset)
        hp.vlm.name_or_path = str(vlm)
        torch.manual_seed(0)
        system = build_system(hp, a.device)
        if preset == "cxr_lung" and a.datalist:
            dl = Path(a.datalist)
            item = json.loads(dl.read_text())["validation"][0]
            item = {"image": str(dl.parent / item["image"])}
            image = preprocess_item(system, item)["image"][None].as_tensor()
        else:
            g = torch.Generator().manual_seed(0)
            shape = (1, hp.model.in_channels, 512, 512) if preset == "cxr_lung" else \
                (1, hp.model.in_channels, 96, 96, 96)
            image = torch.randn(*shape, generator=g)
        for precision in ("fp32", "auto"):
            ref, t_ref = run(system, image, precision, 1)
            again, _ = run(system, image, precision, 1)
            row = {"preset": preset, "shape": list(image.shape), "precision": precision,
                   "dtype": str(describe(precision, a.device)["dtype"]),
                   "max_abs_diff_rerun": float((again - ref).abs().max()), "seconds_sw1": round(t_ref, 3)}
            for sw in (4, 8):
                p, t = run(system, image, precision, sw)
                row[f"max_abs_diff_sw{sw}_vs_sw1"] = float((p - ref).abs().max())
                row[f"seconds_sw{sw}"] = round(t, 3)
            row["mask_voxels_differing_sw8"] = int(((p > 0.5) != (ref > 0.5)).sum())
            print(row)
            rows.append(row)
        # one network call on 8 windows, each alone vs all in one batch, with PyTorch's default cuDNN settings
        # (outside the predictor's lib.precision.reproducible): the network's own spread, no sampling
        g = torch.Generator().manual_seed(1)
        win = torch.randn(8, *image.shape[1:2], *hp.preprocessing.patch_size, generator=g).to(system.device)
        x = (torch.rand(8, 1, *hp.preprocessing.patch_size, generator=g) < 0.5).float().to(system.device)
        with torch.no_grad():
            cond = system.condition(win, system.texts_for(None, 8))
            both = system.model(x, torch.full((8,), 0.5, device=system.device), cond)
            alone = torch.cat([system.model(x[i:i + 1], torch.full((1,), 0.5, device=system.device),
                                            system.condition(win[i:i + 1], system.texts_for(None, 1)))
                               for i in range(8)])
        r = {"preset": preset, "logits_max_abs_diff_batch8_vs_alone": float((both - alone).abs().max()),
             "logits_abs_max": float(both.abs().max())}
        # a training step (forward + backward, batch 16) in fp32 and bf16 autocast: is bf16 faster here?
        opt = torch.optim.AdamW(system.model.parameters(), lr=1e-5)
        xb, wb = torch.cat([x, x]), torch.cat([win, win])
        for dtype in (None, torch.bfloat16):
            def step():
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None and system.device.type == "cuda"):
                    cb = system.condition(wb, system.texts_for(None, 16))
                    loss = system.model(xb, torch.full((16,), 0.5, device=system.device), cb).float().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            for _ in range(3):
                step()
            if system.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                step()
            if system.device.type == "cuda":
                torch.cuda.synchronize()
            # autocast acts on CUDA only here: on a CPU both rows are fp32, named so
            on_cuda = system.device.type == "cuda"
            name = ("bf16" if on_cuda else "fp32_cpu_no_autocast") if dtype else ("fp32_tf32" if on_cuda else "fp32_cpu")
            r[f"train_step_ms_{name}"] = round((time.perf_counter() - t) / 20 * 1e3, 2)
        print(r)
        rows.append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "info": info, "rows": rows,
                                       "wall_s": round(time.perf_counter() - t_start, 1)}, indent=1))


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
