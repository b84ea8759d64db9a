"""Robot users: Dice per click, NoC@90/95 and the wall time per click, through the code the app runs per click.

    python bench/clicks_bench.py --checkpoint runs/cxr_clicks/best.pt \
        --datalist ../shared/data/cxr_lung/datalist.json --split validation test --out runs/bench/clicks_cxr

Per image: the automatic result (k = 0), then k = 1..K clicks. Each request goes through what the interactive
infer task runs (preprocess the image, :func:`lib.evaluation.predict_preprocessed` with all clicks so far and the
task's :class:`lib.inferer.WindowCache`, inversion to the image's grid, clicked voxels set) and is scored with
:func:`lib.evaluation.case_metrics` (``evaluate``'s metric) against the label in the image's own geometry.

* ``oracle`` robot: clicks the centre (distance-transform maximum) of the largest error region of the current
  label (:func:`lib.clicks.next_click`): positive where foreground was missed, negative where it was added.
* ``uncertain`` robot: clicks the centre of the largest region where the M samples disagree (variance map, no
  ground truth used: what a tool can suggest; :func:`lib.clicks.uncertain_region_centre`); the *sign* of the
  click is the truth at that voxel (the user looks and says which side it is on). Voxels within ``--exclude``
  voxels of earlier clicks are not suggested again.

``--hold-radius`` / ``--grow`` compare the sampler's optional holds (a ball around each click; a positive click's
threshold flood fill, ``RADIUS:TOLERANCE[:CHANNELS[:SIDE[:SCALE]]]``, e.g. ``12:0.2:0:above`` for BraTS FLAIR, or
``off``; ``SCALE``: ``clicks.grow_scale``, the fill's ball follows the click's distance to the segmentation).

NoC@x: the number of clicks after which Dice >= x (0 when the automatic result reaches it), capped at K (not
reached = K). Prints the table and the CPU; writes ``summary.json``, ``cases.csv`` and ``dice_per_click.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import load_system  # noqa: E402
from lib.cli import _quiet  # noqa: E402
from lib.clicks import Clicks, next_click, uncertain_region_centre  # noqa: E402
from lib.data import load_datalist  # noqa: E402
from lib.evaluation import (case_metrics, make_inferer, predict_preprocessed, preprocess_item,  # noqa: E402
                            truth_on_image_grid)
from lib.cli import _positive  # noqa: E402
from lib.inferer import WindowCache  # noqa: E402
from lib.transforms import label_item  # noqa: E402


def spacing_of(label) -> list[float] | None:
    return [float(v) for v in label.pixdim] if hasattr(label, "pixdim") else None


def run_case(system, inferer, item, truth, k_max: int, robot: str, hold_radius, exclude: float,
             cache: WindowCache, grow=(None, None, None, None, None)) -> dict:
    spacing = truth_np = None
    clicks = Clicks()
    dice, times, rerun, windows = [], [], [], []
    for k in range(k_max + 1):
        t0 = time.perf_counter()
        d = preprocess_item(system, item)  # the app loads and preprocesses the image at every request
        out = predict_preprocessed(system, d, inferer, return_variance=(robot == "uncertain"), clicks=clicks,
                                   cache=cache, hold_radius=hold_radius, grow_radius=grow[0],
                                   grow_tolerance=grow[1], grow_channels=grow[2], grow_side=grow[3],
                                   grow_scale=grow[4])
        pred = (out["prob"][0] > 0.5).numpy()
        dt = time.perf_counter() - t0
        if truth_np is None:  # evaluate's truth: checked on the image's grid, in the image's voxel order
            truth = truth_on_image_grid(item, truth, out["prob"])
            spacing = spacing_of(truth)
            truth_np = np.asarray(truth[0]) > 0.5
        m = case_metrics(torch.as_tensor(pred[None]).float(), truth, spacing=spacing)
        dice.append(m["dice"] if m["dice"] is not None else 0.0)
        if k:
            times.append(dt)
            rerun.append(out["windows"]["rerun"])
            windows.append(out["windows"]["windows"])
        if k == k_max:
            break
        if robot == "oracle":
            c = next_click(pred, truth_np, spacing)
            if c is None:  # perfect: nothing left to click; Dice stays
                dice += [dice[-1]] * (k_max - k)
                break
            clicks.add(c[0], c[1])
        else:
            var = np.asarray(out["var"][0]).copy()
            g = np.meshgrid(*[np.arange(s) for s in var.shape], indexing="ij")
            for p in clicks.fg + clicks.bg:  # do not suggest the same place again
                var[sum((gi - pi) ** 2 for gi, pi in zip(g, p)) <= exclude ** 2] = 0.0
            p = uncertain_region_centre(np.asarray(out["prob"][0]), var, spacing)
            if p is None:
                dice += [dice[-1]] * (k_max - k)
                break
            clicks.add(p, bool(truth_np[p]))
    return {"case_id": item.get("case_id"), "dice": dice, "seconds_per_click": times, "windows_rerun": rerun,
            "windows": windows}


def noc(dice: list[float], thr: float, k_max: int) -> int:
    for k, d in enumerate(dice):
        if d >= thr:
            return k
    return k_max


def summarize(cases: list[dict], k_max: int) -> dict:
    d = np.array([c["dice"] for c in cases])  # cases x (K + 1)
    t = np.array([x for c in cases for x in c["seconds_per_click"]])
    rr = np.array([x for c in cases for x in c["windows_rerun"]])
    ww = np.array([x for c in cases for x in c["windows"]])
    mean = d.mean(0)
    return {"n": len(cases), "dice_mean": mean.round(4).tolist(), "dice_median": np.median(d, 0).round(4).tolist(),
            "dice_worst": d.min(0).round(4).tolist(),
            "mean_never_decreases": bool(np.all(np.diff(mean) >= -1e-9)),
            "noc90": float(np.mean([noc(c["dice"], 0.90, k_max) for c in cases])),
            "noc95": float(np.mean([noc(c["dice"], 0.95, k_max) for c in cases])),
            "seconds_per_click_mean": float(t.mean()) if len(t) else None,
            "seconds_per_click_median": float(np.median(t)) if len(t) else None,
            "windows_rerun_share": float(rr.sum() / max(1, ww.sum()))}


def _secs(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"  # no click made (every case right at k = 0): no time per click


def _write(out: Path, a, cpu, t_all, inferer, results: dict, rows: list) -> None:
    meta = {"command": " ".join(sys.argv), "cpu_capability": cpu, "threads": torch.get_num_threads(),
            "wall_seconds": round(time.perf_counter() - t_all, 1), "sampler": inferer.settings()}
    (out / "summary.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if rows:
        with open(out / "cases.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r},
                                                    key=lambda k: (k != "run", k != "case_id", len(k), k)))
            w.writeheader()
            w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--split", nargs="+", default=["validation", "test"])
    ap.add_argument("--clicks", type=_positive, default=10, help="K >= 1 clicks per image")
    ap.add_argument("--robots", nargs="+", default=["oracle", "uncertain"], choices=["oracle", "uncertain"])
    ap.add_argument("--hold-radius", type=int, nargs="+", default=[None],
                    help="sampler hold of clicked voxels in x_t (-1 none); several values are compared")
    ap.add_argument("--grow", nargs="+", default=[None],
                    help="RADIUS:TOLERANCE[:CHANNEL,...[:SIDE[:SCALE]]] of the sampler's hold of what a positive "
                         "click grows to (lib.clicks.grown_region; SCALE: clicks.grow_scale), or off; several are "
                         "compared; default the checkpoint's")
    ap.add_argument("--num-samples", type=int, help="M (default: the checkpoint's; the uncertain robot needs > 1)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--exclude", type=float, default=5.0)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", default="runs/bench/clicks")
    a = ap.parse_args()
    _quiet()
    system = load_system(a.checkpoint)
    if system.structures:  # one truth, one output channel here; evaluate scores each structure on its own truth
        ap.error(f"{a.checkpoint} is a prompted model ({[s.name for s in system.structures]}): this bench scores one "
                 "structure; use a single-structure checkpoint")
    inferer = make_inferer(system, num_samples=a.num_samples, steps=a.steps)
    if "uncertain" in a.robots and inferer.num_samples < 2:  # no variance: it clicked nothing, without a word
        ap.error(f"the uncertain robot clicks where the model's samples disagree: it needs --num-samples >= 2 (this "
                 f"checkpoint draws {inferer.num_samples}); or run --robots oracle")
    lab_t = system.label_reader()  # evaluate's
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"checkpoint {a.checkpoint} (guidance channels: {system.takes_clicks}); sampler {inferer.settings()}; "
          f"CPU capability {cpu}, {torch.get_num_threads()} threads")
    results, rows = {}, []
    t_all = time.perf_counter()
    for split in a.split:
        items = load_datalist(a.datalist, split)[: a.limit]
        truths = [lab_t(label_item(it))["label"] for it in items]
        for robot in a.robots:
            for hold, grow in [(h, g) for h in a.hold_radius for g in a.grow]:
                gp = [] if grow is None else ["-1", "0"] if grow == "off" else grow.split(":")
                gr = (None, None, None, None, None) if grow is None else \
                    (int(gp[0]), float(gp[1]), [int(v) for v in gp[2].split(",")] if len(gp) > 2 and gp[2] else None,
                     gp[3] if len(gp) > 3 and gp[3] else None, float(gp[4]) if len(gp) > 4 and gp[4] else None)
                cache = WindowCache()  # one per robot run, as the app keeps one per model
                cases = [run_case(system, inferer, it, tr, a.clicks, robot, hold, a.exclude, cache, gr)
                         for it, tr in zip(items, truths)]
                cc = system.hparams.clicks
                key = f"{split}/{robot}/hold={cc.hold_radius if hold is None else hold}"
                if grow is not None or cc.grow_radius >= 0:
                    key += f"/grow={grow}" if grow is not None else \
                        f"/grow={cc.grow_radius}:{cc.grow_tolerance:g}" + \
                        (f":{','.join(map(str, cc.grow_channels))}" if cc.grow_channels else ":") + \
                        f":{cc.grow_side}" + (f":{cc.grow_scale:g}" if cc.grow_scale else "")
                results[key] = s = summarize(cases, a.clicks)
                for c in cases:
                    rows.append({"run": key, "case_id": c["case_id"], **{f"dice@{k}": round(v, 4)
                                                                        for k, v in enumerate(c["dice"])}})
                k3 = min(3, a.clicks)
                print(f"{key}: n={s['n']} Dice@0..{a.clicks} mean {s['dice_mean']} | median@{k3} "
                      f"{s['dice_median'][k3]} worst@{k3} {s['dice_worst'][k3]} | NoC@90 "
                      f"{s['noc90']:.2f} NoC@95 {s['noc95']:.2f} | {_secs(s['seconds_per_click_mean'])} s/click "
                      f"(median {_secs(s['seconds_per_click_median'])}), windows re-run "
                      f"{100 * s['windows_rerun_share']:.0f}% | mean never decreases: {s['mean_never_decreases']}",
                      flush=True)
                _write(out, a, cpu, t_all, inferer, results, rows)  # after each run: a later failure loses nothing
    _write(out, a, cpu, t_all, inferer, results, rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, s in results.items():
        ax.plot(range(len(s["dice_mean"])), s["dice_mean"], marker="o", label=key)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{Path(a.checkpoint).parent.name}: Dice per click")
    fig.tight_layout()
    fig.savefig(out / "dice_per_click.png", dpi=110)
    print(f"wrote {out}/summary.json, cases.csv, dice_per_click.png ({round(time.perf_counter() - t_all, 1)} s)")


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
