"""Command line: ``python -m lib {make-tiny-vlm,train,predict,evaluate,audit,upgrade-checkpoint}``.

Examples (see the README for the measured runs)::

    python -m lib make-tiny-vlm runs/vlm/tiny-clip
    python -m lib train --preset cxr_lung --datalist ../shared/data/cxr_lung/datalist.json --out runs/cxr --minutes 40
    python -m lib evaluate --checkpoint runs/cxr/best.pt --datalist ../shared/data/cxr_lung/datalist.json \\
        --split test --out runs/cxr/eval_test
    python -m lib predict --checkpoint runs/cxr/best.pt --image some.png --out runs/pred
    python -m lib audit --datalist ../shared/data/cxr_lung/datalist.json --a validation --b test --out audit.json
    python -m lib upgrade-checkpoint old.pt --out new.pt
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time

from .config import type_problem  # (stdlib imports only: cheap at the command line's start)
import warnings
from pathlib import Path

logger = logging.getLogger("lib")


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
    warnings.filterwarnings("ignore", message=".*Setting affine, but the applied meta contains an affine.*")
    warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad=True to a scalar.*")
    for name in ("transformers", "monai.apps", "nvImageCodec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _set(hp, assignments: list[str]):
    """``--set section.key=value`` (value parsed as JSON when it parses, else a string). A key whose value is a JSON
    object takes ``section.key.subkey=value``, and a JSON object given for it is merged into it (it replaced the
    whole object: ``train.augmentation={"prob": 0.5}`` dropped the preset's other augmentation settings for the
    library's defaults; a review); ``null`` sets a key whose default is None (``preprocessing.spacing=null``: keep
    the image's spacing)."""
    from .config import ConfigError

    for a in assignments or []:
        if "=" not in a or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"--set expects section.key=value, got {a!r}")
        path, raw = a.split("=", 1)
        section, key = path.split(".", 1)
        key, _, sub = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        obj = getattr(hp, section, None)
        # a field of the section's dataclass (hasattr also matched properties and methods: AttributeError)
        fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if key not in fields:
            import difflib

            near = difflib.get_close_matches(key, list(fields), n=3)  # (a typo: "no such hyper-parameter" alone)
            raise ConfigError(f"--set {path}: no such hyper-parameter" + (
                f"; did you mean {', '.join(f'{section}.{n}' for n in near)}?" if near else
                f"; {section} has {sorted(fields)}" if fields else ""))
        current = getattr(obj, key)
        if sub:  # one key of a JSON-object value (train.augmentation.prob=0.5)
            if not isinstance(current, dict):
                raise ConfigError(f"--set {path}: {section}.{key} is not a JSON object; give {section}.{key}=value")
            value = {sub: value}
        if value is None and "None" in str(fields[key].type):
            setattr(obj, key, None)
            continue
        hint = _hint(obj, key)
        _check_type(path, hint, current, value, raw)
        if type_problem(value, hint) is not None:
            value = raw  # a text setting given a number or a list (vlm.prompt=2024): the text as typed
        if isinstance(current, dict):
            value = {**current, **value}
        if key == "features":
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ConfigError(f"--set {path}: every entry must be an integer >= 1, got {raw}")
            value = tuple(value)
        setattr(obj, key, value)
    return hp


def _hint(obj, key: str):
    import typing

    return typing.get_type_hints(type(obj)).get(key, typing.Any)


def _check_type(path: str, hint, current, value, raw: str) -> None:
    """``--set`` gives a value of the kind the hyper-parameter is declared to hold (:func:`lib.config.type_problem`:
    a number for a number -- ``train.time_budget_s=90.5`` was refused as "an integer" because the preset held 2400 --
    true or false for a switch, a list for a list), so a typo is one clear line, not a traceback deep in training. A
    text setting takes the text as typed."""
    from .config import ConfigError

    problem = type_problem(value, hint)
    if problem and type_problem(raw, hint) is not None:
        raise ConfigError(f"--set {path}={raw}: expected {problem} (it is now {json.dumps(current, default=str)})")


def _sampler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's)")
    g.add_argument("--sampler", choices=["euler", "heun"])
    g.add_argument("--steps", type=int)
    g.add_argument("--num-samples", type=int)
    g.add_argument("--overlap", type=float)
    g.add_argument("--sw-batch-size", type=int)
    g.add_argument("--max-batch-voxels", type=_cap, metavar="auto|N",
                   help="(window x sample) items per network call x window voxels: 'auto' (by device, "
                        "bench/cap_bench.py) or an integer cap; changes speed and memory, not the result")
    g.add_argument("--roi-size", type=int, nargs="+")
    g.add_argument("--seed", type=int)
    g.add_argument("--output", choices=["p_final", "last_posterior"], help="what each sample contributes")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda when available)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision (default: what the checkpoint trained in where that is fast, else fp32; "
                        "'auto': bf16 only where it is fast)")
    g.add_argument("--allow-roi-mismatch", action="store_true",
                   help="allow a --roi-size other than the training patch (changes the VLM's field of view)")
    g.add_argument("--vlm", help="VLM folder or hub id replacing the one stored in the checkpoint")


def _device(name: str | None) -> str:
    """``--device``: absent, CUDA when present, else the CPU; a name that is no device, or a CUDA device this
    machine does not have, is one line (were tracebacks deep in the VLM's load; a review)."""
    import torch

    from .config import ConfigError
    from .precision import default_device

    if not name:
        return default_device()
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {name!r} is not a device: give cpu, cuda or cuda:N ({e})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no CUDA device; leave --device out (the CPU "
                              "here) or give cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise ConfigError(f"--device {name!r}: only cpu and cuda[:N] are supported")
    return name


def _inferer(system, a):
    from .evaluation import make_inferer

    return make_inferer(system, sampler=a.sampler, steps=a.steps, num_samples=a.num_samples, overlap=a.overlap,
                        sw_batch_size=a.sw_batch_size, roi_size=a.roi_size, seed=a.seed, output=a.output,
                        precision=a.precision, allow_roi_mismatch=a.allow_roi_mismatch,
                        max_batch_voxels=a.max_batch_voxels)


def _cap(text: str):
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"'auto' or an integer >= 1, got {text!r}") from None


def cmd_make_tiny_vlm(a) -> int:
    from .config import ConfigError
    from .vlm import make_tiny_clip, make_tiny_siglip

    if (Path(a.out) / "config.json").exists() and not a.overwrite:
        raise ConfigError(f"{a.out} already holds a model: checkpoints that name this folder would get other VLM "
                          "weights (and other conditioning) without a word; give another folder, or --overwrite")

    if a.kind == "siglip":
        p = make_tiny_siglip(a.out, image_size=a.image_size, hidden=a.hidden, seed=a.seed)
    else:
        p = make_tiny_clip(a.out, image_size=a.image_size, hidden=a.hidden, projection_dim=a.projection_dim,
                           seed=a.seed)
    print(f"wrote a tiny random {a.kind.upper()} to {p} (random weights: for tests and demos only)")
    return 0


RUN_FILES = ("best.pt", "last.pt", "resume.pt", "history.json", "best_val_cases.json", "hard_images.json",
             "train_result.json", "losses.csv", "hparams.json", "machine.json")


def cmd_train(a) -> int:
    from .config import ConfigError, load_preset
    from .data import load_datalist
    from .training import train

    hp = _set(load_preset(a.preset), a.set)
    if a.precision:
        hp.precision = a.precision
    if a.vlm:
        hp.vlm.name_or_path = a.vlm
    if a.structures:
        from .structures import select

        hp.structures = select(hp.structures, a.structures) if hp.structures else select([], a.structures)
    _check_out_folder(a.out)
    out = Path(a.out)
    if out.is_dir() and os.environ.get("RANK", "0") == "0":
        from .training import hold_run_lock

        hold_run_lock(out)  # before --overwrite moves a run aside: not one still training (a second process)
        aside = out / ".overwritten"
        if aside.is_dir() and not any((out / n).exists() for n in ("best.pt", "last.pt", "resume.pt")):
            # an --overwrite run killed (kill -9, power) before its first state: the run it replaced is put back
            # (it stayed hidden there: --resume said "nothing to resume", a plain run started over beside it)
            logger.warning("%s: an --overwrite run stopped before its first state without putting back the run it "
                           "replaced; putting it back", out)
            _restore_or_keep(out, aside)
    held = [n for n in ("best.pt", "resume.pt") if (out / n).exists()]
    if held and not (a.resume or a.overwrite):
        kept = " (and an earlier run it overwrote is kept in .overwritten)" if (out / ".overwritten").is_dir() else ""
        raise ConfigError(f"{out} already holds a run ({', '.join(held)}){kept}: --resume continues it, --overwrite "
                          "replaces it, or give another --out")
    tr = load_datalist(a.datalist, a.train_split)
    va = load_datalist(a.datalist, a.val_split)
    if a.limit_train:
        tr = tr[: a.limit_train]
    if a.limit_val:
        va = va[: a.limit_val]
    device = _device(a.device)
    set_aside = None
    if held and a.overwrite and not a.resume and os.environ.get("RANK", "0") == "0":  # (torchrun: rank 0 writes)
        # no file of the old run stays beside the new one's: moved aside, not deleted, until the new run ends (a
        # new run refused by its own checks -- a bad --set, a missing image, a budget too short -- deleted the old
        # one and left the folder empty)
        set_aside = _set_aside_run(out)
    budget = a.minutes * 60 if a.minutes is not None else None
    logger.info("training on %d images, validating on %d (%s)", len(tr), len(va), a.val_split)
    if set_aside is not None:
        import signal

        def terminated(signum, _frame):  # a kill or a scheduler's limit: the old run put back, as for Ctrl-C
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)
    try:
        res = train(hp, tr, va, a.out, device=device, time_budget_s=budget, max_iterations=a.max_iterations,
                    progress=not a.no_progress, resume=a.resume, dist_timeout_min=a.dist_timeout)
    except BaseException:
        if set_aside is not None:
            a.restored_old_run = _restore_or_keep(out, set_aside)
        raise
    if set_aside is not None:
        import shutil

        shutil.rmtree(set_aside, ignore_errors=True)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return 0
    print(json.dumps({"best_checkpoint": res.best_checkpoint, "best_val_dice": res.best_val.get("dice"),
                      "best_iteration": res.best_val.get("iteration"), "iterations": res.iterations,
                      "train_seconds": round(res.train_seconds, 1), "wall_seconds": round(res.wall_seconds, 1)},
                     indent=1))
    return 0


def _set_aside_run(out: Path) -> Path | None:
    """``--overwrite``: the old run's files moved into ``OUT/.overwritten`` (same folder, a rename), where
    :func:`_restore_or_keep` finds them if the new run fails before it writes a state of its own."""
    aside = out / ".overwritten"
    if aside.exists():  # a run kept there before (a new run that stopped after its first state): kept, renamed
        import datetime

        keep = out / f".overwritten-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        os.replace(aside, keep)
        logger.warning("an earlier overwritten run in %s is kept as %s", aside, keep)
    aside.mkdir()
    moved = 0
    for n in RUN_FILES:
        if (out / n).exists():
            os.replace(out / n, aside / n)
            moved += 1
    if not moved:
        aside.rmdir()
    return aside if moved else None


def _restore_or_keep(out: Path, aside: Path) -> bool:
    """The new run stopped: when it wrote no state (no best/last/resume checkpoint), its files are replaced by the
    old run's again (True); otherwise the old run stays in ``aside``, named (False)."""
    import shutil

    if any((out / n).exists() for n in ("best.pt", "last.pt", "resume.pt")):
        logger.warning("the run you overwrote is kept in %s (the new run stopped after writing a state)", aside)
        return False
    for n in RUN_FILES:
        (out / n).unlink(missing_ok=True)
        if (aside / n).exists():
            os.replace(aside / n, out / n)
    shutil.rmtree(aside, ignore_errors=True)
    logger.warning("the new run stopped before writing a state: the run in %s is as it was", out)
    return True


def _items_from_args(a):
    from .data import case_id, load_datalist

    if a.image:
        items = []
        for f in a.image:
            parts = f.split(",")
            it = {"image": parts if len(parts) > 1 else parts[0]}
            if a.text:
                it["text"] = a.text
            it["case_id"] = case_id(it)
            items.append(it)
        return items
    return load_datalist(a.datalist, a.split)


def _check_conditioning(system, a, items) -> None:
    """What the model's conditioning takes, checked before any image is predicted (one line, exit 2): ``--text``
    only for a model conditioned on per-image text (text_mode "image"; a "label" model always uses its own
    prompt, as in training), a text for every image of such a model, ``--vlm`` only for a VLM-conditioned model."""
    from .config import ConfigError

    mode = system.vlm.cfg.text_mode if system.vlm is not None else None
    if a.vlm and system.vlm is None:
        raise ConfigError(f"--vlm {a.vlm}: {a.checkpoint} is not conditioned on a VLM; it takes none")
    if a.text is not None:
        if mode != "image":
            what = ("is not conditioned on a VLM" if mode is None else "is conditioned on images only "
                    "(text_mode 'none')" if mode == "none" else
                    f"is conditioned on its own label prompt {system.vlm.cfg.prompt!r} (text_mode 'label'), as in "
                    f"training" + ("; a free prompt is --prompt" if system.structures else ""))
            raise ConfigError(f"--text: {a.checkpoint} {what}; --text is for a model of text_mode 'image'")
        if not a.image:
            raise ConfigError("--text applies to --image; a datalist gives each image's 'text'")
    if mode == "image":
        bare = [str(it.get("case_id") or it.get("image")) for it in items
                if not isinstance(it.get("text"), str) or not it["text"].strip()]
        if bare:
            raise ConfigError(f"{a.checkpoint} is conditioned on per-image text (text_mode 'image'): "
                              f"{len(bare)} of {len(items)} image(s) have none (e.g. {bare[0]}); give --text, or a "
                              "'text' in every datalist entry")


PREDICT_OUTPUTS = ("_prob.nii.gz", "_label.nii.gz", "_var.nii.gz", "_labels.json")


def output_stem(case: str) -> str:
    """The file-name stem of a case's ``predict`` outputs: its case id, path separators replaced (an id "a/b" wrote
    into a subfolder, ".." out of --out)."""
    stem = str(case).replace("/", "_").replace("\\", "_").strip()
    return stem if stem not in ("", ".", "..") else f"case_{stem or 'unnamed'}"


def _save_like_the_image(t, path: Path, image_path: str, dtype) -> bool:
    """A NIfTI image's output ``t`` (channels first, on the image's grid) written with the image's own header
    geometry and shape (:func:`lib.transforms.as_image_nifti`, as the app writes its results: qform and sform with
    their codes, units; a one-slice (X, Y, 1) image's slice axis), channels last as MONAI's writer puts them (one
    channel: none). MONAI's SaveImage wrote the sform as the qform too, so 3D Slicer, which reads the qform, showed
    a registered image's results 10 mm off it, and a Slicer 2D image's results as (X, Y) (a review). False (not
    written) for another format, or a shape that is not the image's."""
    import nibabel as nib
    import numpy as np
    import torch

    from .transforms import as_image_nifti

    if not str(image_path).lower().endswith((".nii", ".nii.gz")):
        return False
    data = np.moveaxis(np.asarray(t.detach().cpu() if torch.is_tensor(t) else t), 0, -1).astype(dtype)
    src = nib.load(image_path)
    img = as_image_nifti(data[..., 0] if data.shape[-1] == 1 else data, src)
    if img is None:
        logger.warning("%s: shape %s is not the image's %s: written by MONAI's writer", path, data.shape, src.shape)
        return False
    nib.save(img, str(path))
    return True


def cmd_predict(a) -> int:
    import numpy as np
    from monai.transforms import SaveImage
    from tqdm.auto import tqdm

    import torch

    from .checkpoint import load_system
    from .evaluation import predict_item
    from .structures import paint
    from .transforms import first_path, has_geometry

    from .config import ConfigError

    items = _items_from_args(a)
    if not items:  # ("wrote 0 prediction(s)", exit 0; evaluate refused it)
        raise ConfigError(f"split {a.split!r} of {a.datalist} has no images")
    _check_out_folder(a.out)
    seen: dict[str, object] = {}
    names = [output_stem(it["case_id"]) for it in items]
    for it, name in zip(items, names):
        key = name.lower()  # "Case1" and "case1" are one file on a case-insensitive disk (macOS, Windows)
        if key in seen:
            raise ConfigError(f"two images would write the same outputs {name}_*.nii.gz: {seen[key]} and "
                              f"{it['image']}; give them distinct case_id in a datalist, or predict them into "
                              "separate --out folders")
        seen[key] = it["image"]
    system = load_system(a.checkpoint, device=_device(a.device), vlm=a.vlm)
    _check_conditioning(system, a, items)
    inferer = _inferer(system, a)
    if a.save_variance and inferer.num_samples < 2:  # one sample has no spread: an all-zero map read as "certain"
        raise ConfigError(f"--save-variance needs --num-samples >= 2 (the variance of the samples; this run draws "
                          f"{inferer.num_samples})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    saver_p = SaveImage(output_dir=out, output_postfix="prob", separate_folder=False, output_ext=".nii.gz",
                        print_log=False, resample=False)
    saver_l = SaveImage(output_dir=out, output_postfix="label", separate_folder=False, output_ext=".nii.gz",
                        print_log=False, resample=False, output_dtype=np.uint8)
    saver_v = SaveImage(output_dir=out, output_postfix="var", separate_folder=False, output_ext=".nii.gz",
                        print_log=False, resample=False)
    for it, name in tqdm(list(zip(items, names)), desc="predict", unit="img", disable=a.no_progress):
        t0 = time.perf_counter()
        r = predict_item(system, it, inferer, return_variance=a.save_variance, labels=a.labels, prompt=a.prompt)
        flat = not has_geometry(first_path(it["image"]))
        # a case's outputs are one set: an earlier run's files of this case go (a variance map or the label names
        # of another run stayed beside the new label)
        for suffix in PREDICT_OUTPUTS:
            (out / f"{name}{suffix}").unlink(missing_ok=True)

        def named(t):
            # named by the case, not by the file MONAI loaded (SaveImage takes the image's own meta over the
            # meta_data it is given: two DICOM series or two "ct.nii.gz" in other folders wrote one set of files)
            t = t.clone()
            t.meta["filename_or_obj"] = f"{name}.nii.gz"
            if flat and t.ndim == 3:
                # a PNG / JPEG has no geometry: ITK (3D Slicer) reads it with origin 0, spacing 1 and identity
                # axes in LPS; MONAI's identity affine is RAS, so the NIfTI lay mirrored on both axes over it there
                t.affine = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
            return t

        def save(t, saver, suffix, dtype):
            if not _save_like_the_image(t, out / f"{name}_{suffix}.nii.gz", first_path(it["image"]), dtype):
                saver(named(t))

        save(r["prob"], saver_p, "prob", np.float32)  # one channel per target
        # one label map: each target > 0.5 painted with its value, the most specific (listed last) on top
        label = r["prob"][:1] * 0 + paint(r["prob"], [t[1] for t in r["targets"]])[None]  # keeps the geometry
        save(label, saver_l, "label", np.uint8)
        if len(r["targets"]) > 1 or system.structures:
            (out / f"{name}_labels.json").write_text(json.dumps({t[0]: t[1] for t in r["targets"]}))
        if a.save_variance:
            save(r["var"], saver_v, "var", np.float32)
        logger.info("%s: %.1f s, foreground %.3f", it["case_id"], time.perf_counter() - t0,
                    float((r["prob"] > 0.5).float().mean()))
    print(f"wrote {len(items)} prediction(s) to {out}")
    return 0


def cmd_evaluate(a) -> int:
    from .checkpoint import load_system
    from .evaluation import evaluate_items
    from .precision import describe

    from .config import ConfigError

    items = _items_from_args(a)
    if a.limit:
        items = items[: a.limit]
    if not items:
        raise ConfigError(f"split {a.split!r} of {a.datalist} has no images")
    unlabelled = [str(it.get("image")) for it in items if not it.get("label")]
    if unlabelled:
        raise ConfigError(f"evaluate needs a label for every image; {len(unlabelled)} of {len(items)} have none "
                          f"(e.g. {unlabelled[0]}): use predict for images without labels")
    _check_out_folder(a.out)
    system = load_system(a.checkpoint, device=_device(a.device), vlm=a.vlm)
    _check_conditioning(system, a, items)
    inferer = _inferer(system, a)
    t0 = time.perf_counter()
    cases, summary = evaluate_items(system, items, inferer, progress=not a.no_progress, structures=a.labels,
                                    prompt=a.prompt)
    wall = time.perf_counter() - t0
    summary = {"checkpoint": str(a.checkpoint), "split": a.split, "datalist": a.datalist, "wall_seconds": round(wall, 1),
               "sampler": inferer.settings(), "machine": describe(inferer.precision or system.hparams.precision,
                                                                  system.device),
               **summary}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    rows = [_flat(c) for c in cases]
    with open(out / "cases.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)) or ["case_id"])
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    d = summary.get("dice", {})
    for name, st in summary.get("structures", {}).items():
        print(f"{a.split}: {name}: Dice mean {(st.get('dice') or {}).get('mean', float('nan')):.4f} median "
              f"{(st.get('dice') or {}).get('median', float('nan')):.4f}")
    if summary.get("dice_matrix"):
        cols = list(next(iter(summary["dice_matrix"].values())))
        print("mean Dice, prompt (rows) x truth (columns): " + " | ".join(cols))
        for r, row in summary["dice_matrix"].items():
            print(f"  {r}: " + " | ".join(f"{row[c]:.4f}" if row[c] is not None else "-" for c in cols))
    hd = ""
    unit = {"mm": " mm", "px": " px"}.get(summary.get("hd95_units"), f" ({summary['hd95_units']})"
                                           if summary.get("hd95_units") else "")
    if summary.get("hd95", {}).get("n"):
        h = summary["hd95"]
        hd = f"; HD95 mean {h['mean']:.2f}{unit}" + (
            f" over {h['n']} of {summary['n']} cases (undefined where the prediction or the truth is empty)"
            if h["n"] < summary["n"] else "")
    elif summary.get("hd95"):
        hd = "; HD95 undefined in every case (the prediction or the truth is empty)"
    elif summary.get("hd95_by_unit"):  # images with and without a physical pixel size: no mean across both
        hd = "; HD95 mean " + ", ".join(f"{st['mean']:.2f} {u} over {st['n']} case(s)" for u, st in
                                        summary["hd95_by_unit"].items() if st and st.get("n"))
    if summary.get("truth_read_empty"):  # (each named in the log and in its row's truth_note)
        hd += (f"; {summary['truth_read_empty']} label(s) with foreground read as an empty truth (see "
               "truth_note in cases.json)")
    if summary.get("truth_unread_values"):  # (a recoded value beside values read: the Dice fell without a word)
        hd += (f"; label values read as background beside values read: {summary['truth_unread_values']} (value: "
               "cases; see truth_unread in cases.json)")
    if summary.get("empty_prediction_by_structure"):  # a prompted model: counted per structure
        missed = {k: v for k, v in summary["empty_prediction_by_structure"].items() if v}
        if missed:
            hd += f"; nothing predicted where the truth has foreground: {missed} case(s) per structure"
    elif summary.get("empty_prediction"):
        hd += f"; {summary['empty_prediction']} case(s) with nothing predicted where the truth has foreground"
    what = "Dice (mean of the structures)" if summary.get("structures") else "Dice"
    if not d.get("n") and a.prompt is not None:  # a free prompt has no truth of its own: its row of the matrix above
        print(f"{a.split}: n={summary['n']} free prompt {a.prompt!r}: scored against every structure's truth "
              f"(the row above){hd}; {wall:.0f} s -> {out}")
        return 0
    print(f"{a.split}: n={summary['n']} {what} mean {d.get('mean', float('nan')):.4f} median "
          f"{d.get('median', float('nan')):.4f} min {d.get('min', float('nan')):.4f}{hd}; {wall:.0f} s -> {out}")
    return 0


def _check_out_folder(path) -> None:
    from .config import ConfigError

    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"--out {path} is a file, not a folder")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"an integer >= 1, got {text!r}")
    return v


def _positive_minutes(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):  # nan trained forever; 0 or less failed after loading everything
        raise argparse.ArgumentTypeError(f"a finite number of minutes > 0, got {text!r}")
    return v


def _flat(case: dict) -> dict:
    """A case row for CSV: per-structure metrics as ``<metric>_<structure>``, the matrix as ``dice_<p>_vs_<t>``."""
    row = {k: v for k, v in case.items() if k not in ("structures", "dice_matrix")}
    for name, m in case.get("structures", {}).items():
        row.update({f"{k}_{name}": v for k, v in m.items() if k in ("dice", "hd95", "precision", "recall")})
    for p, r in case.get("dice_matrix", {}).items():
        row.update({f"dice_{p}_vs_{t}": v for t, v in r.items()})
    return row


def cmd_upgrade_checkpoint(a) -> int:
    from .checkpoint import upgrade_checkpoint

    r = upgrade_checkpoint(a.checkpoint, a.out, vlm=a.vlm)
    done = [f"- {n}" for n in r["notes"]] + (["- the VLM's fingerprint recorded"] if r["fingerprint"] else [])
    print(f"wrote {a.out}: the same model, probabilities equal on a probe window; "
          + ("resolved:\n" + "\n".join(done) if done else "it was already in this version's format"))
    return 0


def cmd_audit(a) -> int:
    from .audit import audit
    from .data import load_datalist

    items_a = load_datalist(a.datalist, a.a)
    items_b = load_datalist(a.datalist_b or a.datalist, a.b)
    rep = audit(items_a, items_b, a.a, a.b, label_threshold=a.label_threshold, progress=not a.no_progress)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rep, indent=1, default=str))
    def median(stat, fmt):
        return format(stat["median"], fmt) if stat else "n/a"

    for s in (rep["a"], rep["b"]):
        print(f"{s['name']}: n={s['n']} shapes={s['shapes']} spacings={s['spacings']} "
              f"p50 median={median(s['intensity_p50'], '.4g')} fg median={median(s['fg_fraction'], '.4f')}")
    if not rep["flags"]:
        print("no differences flagged")
    for fl in rep["flags"]:
        print(f"[{fl['severity']}] {fl['check']}: {fl['message']}")
    print(f"report: {a.out}")
    # exit 1 when an error is flagged (a script or CI gate reads the status; it was 0 whatever was found)
    errors = sum(fl["severity"] == "error" for fl in rep["flags"])
    if errors:
        print(f"{errors} error(s) flagged: exit 1", file=sys.stderr)
    return 1 if errors else 0


def build_parser() -> argparse.ArgumentParser:
    from .config import DIST_TIMEOUT_MIN

    p = argparse.ArgumentParser(prog="python -m lib", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny-vlm", help="write a tiny random CLIP (save_pretrained) for tests and demos")
    s.add_argument("out")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--hidden", type=int, default=32)
    s.add_argument("--projection-dim", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kind", choices=["clip", "siglip"], default="clip", help="CLIPModel or SiglipModel")
    s.add_argument("--overwrite", action="store_true", help="replace a model already in OUT (default: refused)")
    s.set_defaults(fn=cmd_make_tiny_vlm)

    s = sub.add_parser("train", help="train with sliding-window validation on whole images")
    s.add_argument("--preset", required=True, help="preset name in lib/presets or a JSON file")
    s.add_argument("--datalist", required=True)
    s.add_argument("--train-split", default="training")
    s.add_argument("--val-split", default="validation")
    s.add_argument("--out", required=True)
    s.add_argument("--minutes", type=_positive_minutes, help="wall-time budget, validations included")
    s.add_argument("--max-iterations", type=_positive)
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/resume.pt (the same command plus --resume)")
    s.add_argument("--limit-train", type=_positive, help="the first N training images")
    s.add_argument("--limit-val", type=_positive, help="the first N validation images")
    s.add_argument("--overwrite", action="store_true", help="replace the run OUT already holds (default: refused)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="training and validation precision (default: the preset's, normally 'auto')")
    s.add_argument("--vlm", help="VLM folder or hub id (overrides the preset)")
    s.add_argument("--dist-timeout", type=_positive_minutes, default=DIST_TIMEOUT_MIN, metavar="MINUTES",
                   help="torchrun: how long a rank waits for the others, e.g. while rank 0 validates (default "
                        "60; PyTorch's own default, 10 min for NCCL, ended runs with long validations)")
    s.add_argument("--structures", nargs="+", metavar="NAME",
                   help="a prompted preset: train only these of its structures (e.g. one single-structure model)")
    s.add_argument("--device")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_train)

    for name, fn, hlp in (("predict", cmd_predict, "write probability and label maps in the images' geometry"),
                          ("evaluate", cmd_evaluate, "per-case metrics (JSON, CSV) and a summary")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--checkpoint", required=True)
        g = s.add_mutually_exclusive_group(required=True)
        g.add_argument("--image", nargs="+", action="extend",  # (--image a --image b: both; the last alone was run)
                       help="image file(s), after one --image or each after its own; channels of one image joined by "
                            "commas")
        g.add_argument("--datalist")
        s.add_argument("--split", default="test")
        s.add_argument("--text", help="per-image text for --image: only for a model of text_mode 'image' (refused "
                                      "otherwise; a 'label' model always uses its own prompt)")
        s.add_argument("--labels", nargs="+", metavar="NAME",
                       help="a prompted model: these of its structures (default: all)")
        s.add_argument("--prompt", help="a prompted model: segment what this free text asks for (see the README: "
                                        "with the random tiny CLIP a free prompt means nothing)")
        s.add_argument("--out", required=True)
        s.add_argument("--no-progress", action="store_true")
        if name == "predict":
            s.add_argument("--save-variance", action="store_true")
        else:
            s.add_argument("--limit", type=_positive, help="the first N images")
        _sampler_args(s)
        s.set_defaults(fn=fn)

    s = sub.add_parser("upgrade-checkpoint", help="rewrite an older checkpoint in this version's format (its VLM's "
                                                  "fingerprint recorded, defaults written out), the model unchanged")
    s.add_argument("checkpoint")
    s.add_argument("--out", required=True, help="the new file (the same path as the checkpoint: replaced in place)")
    s.add_argument("--vlm", help="its VLM folder or hub id, if not where the checkpoint says")
    s.set_defaults(fn=cmd_upgrade_checkpoint)

    s = sub.add_parser("audit", help="compare two splits or datasets and flag differences "
                                     "(exit 1 when an error is flagged, 0 for warnings only)")
    s.add_argument("--datalist", required=True)
    s.add_argument("--a", default="validation")
    s.add_argument("--b", default="test")
    s.add_argument("--datalist-b", help="a second datalist for --b (default: the same)")
    s.add_argument("--label-threshold", type=float, default=0.0, help="binary truth = label > this")
    s.add_argument("--out", required=True)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_audit)
    return p


def _interrupted_note(args) -> str:
    """What an interrupted ``train`` left: the iteration of its last saved state and how to go on."""
    if getattr(args, "fn", None) is not cmd_train:
        return ""
    if getattr(args, "restored_old_run", False):  # (it named the overwritten run's state as this run's)
        return f": the new run saved nothing; the earlier run in {args.out} is as it was"
    state = Path(args.out) / "resume.pt"
    if not state.exists():
        return f": {args.out} holds no saved state yet (train.state_every_s); run the command again"
    try:
        from .training import load_train_state

        it = load_train_state(state)["iteration"]
        return (f": {state} holds the state of iteration {it} (saved every train.state_every_s); the same command "
                "with --resume continues from there")
    except Exception:  # noqa: BLE001 - a note, never a second traceback
        return f": {state} is there; the same command with --resume continues from it"


def user_errors() -> tuple[type, ...]:
    """The errors the command line and the benches print as one line (``error: ...``, exit 2): a checkpoint, a
    setting, an input, the VLM, a precision, a structure, or the network's NaN output named -- not a traceback."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .inferer import NonFiniteOutput
    from .precision import PrecisionError
    from .structures import StructureError
    from .transforms import InputError
    from .vlm import VLMError

    return CheckpointError, ConfigError, InputError, VLMError, PrecisionError, StructureError, NonFiniteOutput


def run_bench(main_fn) -> int:
    """A bench's entry point (``raise SystemExit(run_bench(main))``): where its figures come from -- the command,
    ``torch.backends.cpu.get_cpu_capability()``, the threads, and at the end the wall time -- and, as this
    command line, one line and exit 2 for a missing checkpoint, data or device (they were tracebacks); a SIGTERM
    (a ``timeout``) ends it through ``SystemExit`` so its ``finally`` clauses run (a bench's MONAI Label server
    was left running)."""
    import signal

    import torch

    def terminated(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    print(f"command: python {' '.join(sys.argv)} | CPU {torch.backends.cpu.get_cpu_capability()} | "
          f"{torch.get_num_threads()} threads", flush=True)
    t0 = time.perf_counter()
    try:
        rc = main_fn()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a device this machine lacks (CUDA): torch's message, one line
        if "cuda" not in str(e).lower() and "nvidia" not in str(e).lower():
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wall: {time.perf_counter() - t0:.1f} s", flush=True)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet()
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # (a traceback, and no word on what was kept; a review)
        print("interrupted" + _interrupted_note(args), file=sys.stderr)
        return 130
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out, a full disk: the file and the reason, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # torchrun: a rank whose peer stopped (rank 0's own error, a kill) or timed out printed ~25 lines of gloo's
        # traceback after rank 0's one-line error (a review); one line, pointing at the cause
        import torch.distributed as dist

        if not isinstance(e, dist.DistError) or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"error: rank {os.environ.get('RANK', '?')}: lost the other ranks ({first}): another rank stopped "
              "(its error is above) or a collective waited longer than --dist-timeout", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
