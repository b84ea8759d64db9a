"""The chest X-ray model on X-rays as a PACS holds them (DX DICOM) instead of the PNGs it was trained on.

    python bench/xray_dicom_bench.py --checkpoint runs/cxr_dx/best.pt \
        --datalist ../shared/data/cxr_lung/datalist.json --split test --spacings 1.0 0.84 0.7 \
        --out bench/results/xray_dicom.json

Each image of the split is written as a DX For Presentation (``lib.dicom.write_xray``: 12 bits, MONOCHROME1, a
window that gives the PNG's grey values back) with a Pixel Spacing of ``s`` mm, its mask as a NIfTI on that grid,
and the checkpoint is evaluated by ``evaluate``'s own code (``lib.evaluation.evaluate_items``, the sampler and seed
of the checkpoint) on the PNGs and on each DX set.

* ``s`` = 1.0: the DX path must give the PNG's Dice, case for case (the conversion is exact).
* other ``s``: cxr_lung's PNGs carry no pixel size, so the preset's 3.0 spacing is 3 *PNG pixels*; a DX keeps its
  real pixel size in mm, and the network sees the lungs larger or smaller than in training by 1/s. 512 px over a
  ~43 cm film is ~0.84 mm per PNG pixel: that is how far a real DX would be from the training scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import load_system  # noqa: E402
from lib.cli import _quiet, run_bench  # noqa: E402
from lib.data import case_id, load_datalist  # noqa: E402
from lib.dicom import write_xray  # noqa: E402
from lib.evaluation import evaluate_items, make_inferer  # noqa: E402


def dx_items(items: list[dict], folder: Path, spacing: float) -> list[dict]:
    """Each item's image as a DX series folder (pixel spacing ``spacing`` mm), its label as a NIfTI on that grid."""
    out = []
    for n, it in enumerate(items):
        p = np.asarray(Image.open(it["image"]).convert("L"), dtype=np.int64)
        case = it["case_id"]  # the case id seeds the windows: the PNG's
        series = folder / case
        write_xray(4095 - 16 * p, series / "x.dcm", photometric="MONOCHROME1", bits_stored=12, window=(2055, 4080),
                   voi_function="LINEAR_EXACT", pixel_spacing=(spacing, spacing), seed=f"{case}-{spacing}")
        mask = np.asarray(Image.open(it["label"]).convert("L"))
        label = folder / f"{case}_label.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(mask.T), np.diag([spacing, spacing, 1.0, 1.0])), str(label))
        out.append({**it, "image": str(series), "label": str(label)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--spacings", type=float, nargs="+", default=[1.0, 0.84])
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    _quiet()
    items = load_datalist(a.datalist, a.split)
    items = [{**it, "case_id": case_id(it)} for it in (items[: a.limit] if a.limit else items)]
    system = load_system(a.checkpoint, device="cpu")
    rep = {"command": " ".join(sys.argv), "cpu": torch.backends.cpu.get_cpu_capability(),
           "checkpoint": a.checkpoint, "split": a.split, "cases": len(items), "rows": []}
    t0 = time.perf_counter()
    cases_png, summary = evaluate_items(system, items, make_inferer(system), progress=False)
    png = {c["case_id"]: c["dice"] for c in cases_png}
    rep["rows"].append({"input": "PNG", "dice_mean": summary["dice"]["mean"], "dice_median": summary["dice"]["median"],
                        "seconds": round(time.perf_counter() - t0, 1)})
    print(f"PNG: mean Dice {summary['dice']['mean']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for s in a.spacings:
        with tempfile.TemporaryDirectory(prefix="dx_") as tmp:
            t0 = time.perf_counter()
            cases, summary = evaluate_items(system, dx_items(items, Path(tmp), s), make_inferer(system),
                                            progress=False)
            diff = [abs(c["dice"] - png[c["case_id"]]) for c in cases]
            row = {"input": f"DX, {s} mm pixels", "pixel_spacing_mm": s, "dice_mean": summary["dice"]["mean"],
                   "dice_median": summary["dice"]["median"], "max_case_difference_from_png": max(diff),
                   "seconds": round(time.perf_counter() - t0, 1)}
        rep["rows"].append(row)
        print(f"DX {s} mm: mean Dice {row['dice_mean']:.4f}, largest case difference from the PNG "
              f"{row['max_case_difference_from_png']:.4f} ({row['seconds']:.0f} s)", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
