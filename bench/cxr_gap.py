"""Where does a checkpoint's validation Dice go? Three checks on one split, through the code ``evaluate`` runs.

    python bench/cxr_gap.py --checkpoint runs/cxr_clicks_s3/best.pt \
        --datalist ../shared/data/cxr_lung/datalist.json --split validation --out runs/bench/cxr_gap.json

* **as evaluated**: ``predict_item`` (the one predictor path), ``prob > 0.5``, :func:`lib.evaluation.case_metrics`;
* **post-processed**: the same label after MONAI's ``KeepLargestConnectedComponent(num_components=2)`` (two lungs)
  and ``FillHoles``;
* **resolution ceiling**: the truth itself taken through the checkpoint's preprocessing (resampling to its grid)
  and back with the inversion every prediction takes (:func:`lib.evaluation.to_original`), scored against the
  truth: what a perfect prediction on the network's grid would score;
* **other thresholds** of the mean probability (``--thresholds``; the product thresholds at 0.5): whether the
  under-segmented cases are a threshold away from their truth;
* the worst cases with their recall and precision (under- or over-segmented);
* **how thin the errors are**: the share of the error voxels (prediction xor truth) within half a network voxel
  of the truth's other side (inside or outside), and the inscribed radius of the largest error region (where the
  robot user of ``bench/clicks_bench.py`` clicks), in the label's units (mm, or pixels for a PNG);
* ``--overlays PNG``: those worst cases drawn, the X-ray as its file displays it, the truth's outline red and the
  prediction's (``prob > 0.5``) cyan, so one can see whether the model or the annotation is off.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import FillHoles, KeepLargestConnectedComponent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import load_system  # noqa: E402
from lib.cli import _quiet  # noqa: E402
from lib.clicks import largest_error_region  # noqa: E402
from lib.data import load_datalist  # noqa: E402
from lib.evaluation import (case_metrics, make_inferer, predict_preprocessed, preprocess_item, to_original,  # noqa: E402
                            truth_on_image_grid)
from lib.transforms import label_item  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--components", type=int, default=2, help="components kept by the post-processing")
    ap.add_argument("--worst", type=int, default=6)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--out", default="runs/bench/cxr_gap.json")
    ap.add_argument("--num-samples", type=int, help="M (default: the checkpoint's)")
    ap.add_argument("--overlays", default=None, help="PNG: the --worst cases, truth red, prediction cyan")
    a = ap.parse_args()
    _quiet()
    t0 = time.perf_counter()
    system = load_system(a.checkpoint)
    if a.overlays and system.hparams.preprocessing.spatial_dims != 2:
        raise SystemExit("--overlays draws 2D images; this checkpoint is "
                         f"{system.hparams.preprocessing.spatial_dims}D")
    inferer = make_inferer(system, num_samples=a.num_samples)
    half_voxel = 0.5 * min(system.hparams.preprocessing.spacing)
    lab_t = system.label_reader()  # evaluate's
    post = [KeepLargestConnectedComponent(applied_labels=[1], num_components=a.components), FillHoles()]
    rows, preds = [], {}
    for item in load_datalist(a.datalist, a.split):
        # the prediction exactly as evaluate makes it (the image preprocessed alone); the truth's own pass separately
        prob = predict_preprocessed(system, preprocess_item(system, item), inferer)["prob"][:1]
        truth = truth_on_image_grid(item, lab_t(label_item(item))["label"], prob)  # as evaluate
        pred = (prob > 0.5).float()
        d = preprocess_item(system, item, with_label=True)
        pp = pred.clone()  # MONAI's KeepLargestConnectedComponent may work in place
        for t in post:
            pp = t(pp)
        back = (to_original(d["label"][:1].float(), d, system) > 0.5).float()
        m = case_metrics(pred, truth)
        if a.overlays:
            preds[item.get("case_id")] = (item["image"], np.asarray(truth[0]) > 0.5, np.asarray(pred[0]) > 0.5)
        near, radius = error_thickness(np.asarray(pred[0]) > 0.5, np.asarray(truth[0]) > 0.5,
                                       [float(v) for v in getattr(truth, "pixdim", [1.0] * (truth.ndim - 1))],
                                       half_voxel)
        rows.append({"case_id": item.get("case_id"), "dice": m["dice"], "recall": m["recall"],
                     "precision": m["precision"], "error_within_half_network_voxel": near,
                     "largest_error_inscribed_radius": radius, "dice_postprocessed": case_metrics(pp, truth)["dice"],
                     "dice_truth_through_grid": case_metrics(back, truth)["dice"],
                     **{f"dice_at_{t:g}": case_metrics((prob > t).float(), truth)["dice"] for t in a.thresholds}})
    wall = time.perf_counter() - t0

    def mean(k):
        return float(np.mean([r[k] for r in rows]))

    summary = {"as_evaluated": mean("dice"), "postprocessed": mean("dice_postprocessed"),
               "resolution_ceiling": mean("dice_truth_through_grid"),
               "error_within_half_network_voxel": mean("error_within_half_network_voxel"),
               "largest_error_inscribed_radius": mean("largest_error_inscribed_radius"),
               "by_threshold": {f"{t:g}": mean(f"dice_at_{t:g}") for t in a.thresholds},
               "worst": sorted(rows, key=lambda r: r["dice"])[:a.worst]}
    meta = {"command": " ".join(sys.argv), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "wall_seconds": round(wall, 1), "n": len(rows)}
    print(f"{a.split} (n={len(rows)}): Dice as evaluated {summary['as_evaluated']:.4f}, post-processed "
          f"{summary['postprocessed']:.4f}, truth through the network grid and back {summary['resolution_ceiling']:.4f}")
    print(f"  error voxels within half a network voxel ({half_voxel:g}) of the truth's other side: "
          f"{summary['error_within_half_network_voxel']:.2f}; largest error region's inscribed radius (mean) "
          f"{summary['largest_error_inscribed_radius']:.2f}")
    print("  by threshold of the mean probability: " +
          ", ".join(f"{t}: {v:.4f}" for t, v in summary["by_threshold"].items()))
    for r in summary["worst"]:
        print(f"  {r['case_id']}: Dice {r['dice']:.3f} recall {r['recall']:.3f} precision {r['precision']:.3f}")
    print(f"CPU {meta['cpu_capability']}, {meta['threads']} threads, {meta['wall_seconds']} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "summary": summary, "cases": rows}, indent=1))
    if a.overlays:
        draw_overlays(a.overlays, [(r, *preds[r["case_id"]]) for r in summary["worst"]], meta["command"])


def error_thickness(pred: np.ndarray, truth: np.ndarray, spacing, half_voxel: float) -> tuple[float, float]:
    """``(share, radius)``: the share of the error voxels (``pred xor truth``) whose depth -- the distance to the
    nearest voxel on the truth's other side -- is at most ``half_voxel``, and the inscribed radius of the oracle
    robot's region (``lib.clicks.largest_error_region``, where ``next_click`` clicks), both
    in ``spacing`` units."""
    from scipy import ndimage

    err = pred ^ truth
    if not err.any():
        return 0.0, 0.0
    # a voxel's depth: its distance to the nearest voxel of the truth's other side (1 voxel next to the surface)
    depth = np.where(truth, ndimage.distance_transform_edt(truth, sampling=spacing),
                     ndimage.distance_transform_edt(~truth, sampling=spacing)) if truth.any() and not truth.all() \
        else np.full(err.shape, np.inf)
    region, _ = largest_error_region(pred, truth)  # the oracle robot's region (lib.clicks.next_click)
    radius = float(ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing).max())
    return float((depth[err] <= half_voxel).mean()), radius


def outline(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """The inner ``width`` pixels of ``mask``'s border (wide enough to survive the figure's downscaling)."""
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, iterations=width, border_value=0)


def draw_overlays(path: str, cases: list, command: str) -> None:
    """One panel per case: the 2D image as displayed (rows top to bottom: MONAI's (x, y) arrays transposed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 4.0), squeeze=False, dpi=110)
    for ax, (r, image, truth, pred) in zip(axes[0], cases):
        img = np.asarray(Image.open(image).convert("L"), dtype=np.float32)
        truth, pred = truth.T, pred.T
        if truth.shape != img.shape:
            raise ValueError(f"{r['case_id']}: label {truth.shape} vs image {img.shape} as displayed")
        rgb = np.repeat(img[..., None] / 255.0, 3, axis=-1)
        rgb[outline(truth)] = (1.0, 0.1, 0.1)
        rgb[outline(pred)] = (0.0, 0.9, 0.9)
        ax.imshow(rgb)
        ax.set_title(f"{r['case_id']}\nDice {r['dice']:.3f}, recall {r['recall']:.3f}", fontsize=8)
        ax.axis("off")
    fig.text(0.5, 0.01, "truth red, prediction cyan -- " + command, ha="center", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    # a 128-colour palette: grey X-rays and two outline colours lose nothing visible; the file is 40 % smaller
    Image.fromarray(rgba[..., :3]).quantize(colors=128).save(path, optimize=True)


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
