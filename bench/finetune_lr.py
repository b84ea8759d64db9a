"""The MONAI Label trainer's learning rate when it fine-tunes a served checkpoint: per-epoch validation Dice.

    python bench/finetune_lr.py --checkpoint runs/cxr_preset_r4/best.pt \
        --datalist ../shared/data/cxr_lung/datalist.json --epochs 10 \
        --arms constant:1 cosine:1 cosine:0.1 --out bench/results/finetune_lr_cxr.json

Each arm is one in-process run of the app's trainer task (``lib.trainers.dfm_vlm.DFMVLMTrain``, built by the 2D
task config with ``--conf dfm_vlm_2d_checkpoint <checkpoint>``, exactly as the server builds it), fine-tuning the
checkpoint on the datalist's ``training`` images with the datalist's ``validation`` images as its validation set
(request ``val_ds``); ``SCHEDULE:SCALE`` sets the request's ``lr_schedule`` and ``fine_tune_lr_scale``. Recorded per
arm: the starting checkpoint's validation Dice (measured by the trainer before the first epoch, the one a fine-tune
must beat to be published), the Dice after each epoch, and the last epoch's model scored on ``--test-split`` with
the same predictor (``lib.evaluation.evaluate_items``). The validation images also choose the published epoch, so
the per-epoch curve, not the best epoch, is the comparison.

``SCHEDULE:SCALE:PAINTED`` (``named`` / ``unnamed``) fine-tunes instead on the training labels as an annotator
submits them from 3D Slicer after the app's *Run*: painted with the app's value (1), not the dataset's code (255),
with their segment name (``named``: the datastore's ``segments``, what Slicer's *Submit Label* sends since
2026-12-06) or without (``unnamed``: a label read by the dataset's rules, ``> 127``, as every submitted label was
before). The validation images keep the dataset's labels.
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

from lib.checkpoint import load_system, save_checkpoint  # noqa: E402
from lib.configs.dfm_vlm_2d import DFMVLM2D  # noqa: E402
from lib.data import case_id, load_datalist  # noqa: E402
from lib.evaluation import evaluate_items, make_inferer  # noqa: E402
import lib.trainers.dfm_vlm as trainer_mod  # noqa: E402


class _Datastore:
    """What the trainer task reads of a datastore: the labelled images."""

    def __init__(self, items):
        self.items = items

    def datalist(self):
        return [dict(i) for i in self.items]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--arms", nargs="+", default=["constant:1", "cosine:1", "cosine:0.1"])
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="first N images of each split (a quick check)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not Path(a.checkpoint).is_file():  # (the app's trainer then trained a new network from its preset)
        print(f"error: checkpoint not found: {a.checkpoint}", file=sys.stderr)
        return 2
    print("command: python " + " ".join(sys.argv), f"| CPU {torch.backends.cpu.get_cpu_capability()}", flush=True)
    train = load_datalist(a.datalist, "training")
    val = load_datalist(a.datalist, "validation")
    test = load_datalist(a.datalist, a.test_split)
    if a.limit:
        train, val, test = train[:a.limit], val[:a.limit], test[:a.limit]
    res = {"command": "python " + " ".join(sys.argv), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "checkpoint": a.checkpoint, "train_images": len(train),
           "val_images": len(val), "test_images": len(test), "epochs": a.epochs, "arms": []}
    original = trainer_mod._Publish.__call__
    original_baseline = trainer_mod._Publish.baseline_from
    painted_dir = tempfile.TemporaryDirectory()
    painted = {}
    for arm in a.arms:
        schedule, scale, *mode = arm.split(":")
        mode = mode[0] if mode else None
        if mode not in (None, "named", "unnamed"):
            ap.error(f"arm {arm!r}: the third field is 'named' or 'unnamed'")
        if mode and not painted:
            painted = {"named": [], "unnamed": []}
            for k, it in enumerate(train):  # the lungs painted 1, as the app returns them (lib.structures.paint)
                mask = (np.asarray(Image.open(it["label"]).convert("L")) > 127).astype(np.uint8)
                path = Path(painted_dir.name) / f"label_{k:04d}.png"
                Image.fromarray(mask).save(path)
                painted["unnamed"].append({**it, "label": str(path)})
                painted["named"].append({**it, "label": str(path), "segments": {"1": "lung"}})
        train_items = painted[mode] if mode else train
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = DFMVLM2D()
            cfg.init("dfm_vlm_2d", tmp, {"dfm_vlm_2d_checkpoint": a.checkpoint}, None)
            task = cfg.trainer()
            curve, last = [], str(Path(tmp) / "last_epoch.pt")

            def record(self, engine, _curve=curve, _last=last):  # each epoch's validation (the publisher)
                ctx = self.context
                dice = float(engine.state.metrics.get(self.metric, float("nan")))
                epoch = ctx.trainer.state.epoch
                lr = ctx.optimizer.param_groups[0]["lr"]
                _curve.append({"epoch": epoch, "val_dice": round(dice, 4), "lr_at_end": lr})
                print(f"{arm}: epoch {epoch} val Dice {dice:.4f} (lr {lr:.2e})", flush=True)
                save_checkpoint(_last, ctx.system.model, ctx.system.hparams)
                return original(self, engine)

            def baseline(self, evaluator, served=None, _curve=curve):  # the starting checkpoint, before epoch 1
                run = original_baseline(self, evaluator, served)

                def measured(engine):
                    run(engine)
                    opt = getattr(self.context, "optimizer", None)
                    lr = opt.param_groups[0]["lr"] if opt is not None else None
                    dice = float("nan") if self.baseline is None else self.baseline
                    _curve.append({"epoch": 0, "val_dice": round(dice, 4), "lr_at_end": lr})
                    print(f"{arm}: epoch 0 (the starting checkpoint) val Dice {dice:.4f}", flush=True)

                return measured

            trainer_mod._Publish.__call__ = record
            trainer_mod._Publish.baseline_from = baseline
            try:
                task({"max_epochs": a.epochs, "val_ds": val, "device": "cpu", "multi_gpu": False,
                      "lr_schedule": schedule, "fine_tune_lr_scale": float(scale), "publish": "better"},
                     _Datastore(train_items))
            finally:
                trainer_mod._Publish.__call__ = original
                trainer_mod._Publish.baseline_from = original_baseline
            system = load_system(last)
            items = [dict(i, case_id=case_id(i)) for i in test]
            cases, _ = evaluate_items(system, items, make_inferer(system))
            test_dice = sum(c["dice"] for c in cases) / len(cases)
        row = {"lr_schedule": schedule, "fine_tune_lr_scale": float(scale), "painted": mode,
               "peak_lr": task.train_defaults.lr * float(scale), "curve": curve,
               "last_epoch_test_dice": round(test_dice, 4), "wall_s": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        res["arms"].append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
