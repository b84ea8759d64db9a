"""Prediction and evaluation: ONE path for training-time validation, ``predict``, ``evaluate`` and the app.

``predict_item`` = preprocess (the checkpoint's own pipeline) -> :class:`DFMSlidingWindowInferer` on the whole
image -> probability map -> ``Invertd`` back to the image's original geometry. ``evaluate_items`` thresholds that
map at 0.5 and scores it with MONAI metrics (Dice, HD95, precision, recall) against the label in its original
resolution and geometry. The training loop validates by calling ``evaluate_items``; nothing else computes a
validation Dice.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_confusion_matrix_metric, get_confusion_matrix
from monai.transforms import Invertd

from .clicks import Clicks, to_network_grid
from .inferer import DFMSlidingWindowInferer, DFMSystem, WindowCache, seed_for
from .transforms import (
    CONTENT_KEY,
    TRUTH_NOTE,
    TRUTH_UNREAD,
    InputError,
    check_label_grid,
    first_path,
    has_geometry,
    label_item,
    reorient_like,
)

logger = logging.getLogger(__name__)


def make_inferer(system: DFMSystem, allow_roi_mismatch: bool = False, **overrides) -> DFMSlidingWindowInferer:
    """The checkpoint's sampler defaults with ``overrides``; the roi is the training patch (see ``lib.inferer``)."""
    return DFMSlidingWindowInferer.from_hparams(system.hparams, allow_roi_mismatch=allow_roi_mismatch, **overrides)


def preprocess_item(system: DFMSystem, item: dict, with_label: bool = False) -> dict:
    keys = ("image", "label", "segments", "text", "case_id") if with_label else ("image", "text", "case_id")
    d = system.preprocessing({k: v for k, v in item.items() if k in keys})
    d["case_id"] = item.get("case_id")
    return d


def to_original(prob: torch.Tensor, preprocessed: dict, system: DFMSystem) -> MetaTensor:
    """Probability map in preprocessed space -> the image's original grid (inverse orientation and spacing)."""
    img = preprocessed["image"]
    if not isinstance(img, MetaTensor):
        return prob
    pred = MetaTensor(prob, affine=img.affine, meta=dict(img.meta))
    inv = Invertd(keys="pred", transform=system.preprocessing, orig_keys="image", nearest_interp=False,
                  to_tensor=True)
    out = inv({"pred": pred, "image": img})["pred"]
    return out


def predict_preprocessed(system: DFMSystem, d: dict, inferer: DFMSlidingWindowInferer | None = None,
                         return_variance: bool = False, clicks: Clicks | dict | None = None,
                         cache: WindowCache | None = None, hold_radius: int | None = None,
                         labels=None, prompt: str | None = None, grow_radius: int | None = None,
                         grow_tolerance: float | None = None, grow_channels=None,
                         grow_side: str | None = None, grow_scale: float | None = None) -> dict:
    """Run the inferer on a preprocessed item: ``prob_pre``/``var_pre`` in preprocessed space, ``prob`` (and with
    ``return_variance`` ``var``) in the original geometry, one channel per target; ``targets``: their
    ``(name, value, prompt)`` (:meth:`DFMSystem.prompts`: a prompted model's ``labels`` -- default all -- or a
    free ``prompt``; a one-structure model: its label).

    ``clicks``: in the ORIGINAL image's voxel indices (:func:`lib.clicks.parse_clicks`), one :class:`Clicks` for
    every target or ``{name: Clicks}``; mapped to the network grid through the preprocessing's affines, given to
    the model, and every clicked voxel of the target's ``prob`` is set to 1 (positive) or 0 (negative): the label
    says what the user clicked. ``cache``: re-run only changed windows. ``hold_radius``, ``grow_radius``,
    ``grow_tolerance``, ``grow_channels``, ``grow_side``, ``grow_scale``: the sampler's hold of clicked voxels
    (default the checkpoint's ``clicks``).
    """
    inferer = inferer or make_inferer(system)
    targets = system.prompts(labels, prompt)
    texts = None if targets[0][2] is None else [t[2] for t in targets]
    image = d["image"]
    # the image's content (lib.transforms.ContentKeyd, in the preprocessing every caller runs); an item prepared
    # without it (a hand-made dict) falls back to its case id
    seed = seed_for(inferer.seed, d.get(CONTENT_KEY) or d.get("case_id"))
    x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    x = x.unsqueeze(0).to(system.device)
    if isinstance(clicks, dict):
        per = [clicks.get(t[0]) or Clicks() for t in targets]
    else:
        per = [clicks or Clicks()] * len(targets)
    net = [to_network_grid(k, image) if k else Clicks() for k in per]
    prob, var = inferer(x, system, text=d.get("text"), seed=seed, return_variance=True, clicks=net,
                        cache=cache, hold_radius=hold_radius, prompts=texts, grow_radius=grow_radius,
                        grow_tolerance=grow_tolerance, grow_channels=grow_channels, grow_side=grow_side,
                        grow_scale=grow_scale)
    prob, var = prob[0].cpu(), var[0].cpu()
    out = {"prob_pre": prob, "var_pre": var, "prob": to_original(prob, d, system),
           "windows": dict(inferer.last_windows), "targets": targets}
    for ch, k in enumerate(per):
        for value, pts in ((1.0, k.fg), (0.0, k.bg)):
            for p in pts:
                out["prob"][(ch,) + tuple(int(v) for v in p)] = value
    if any(per):
        out["clicks_network_grid"] = net[0].to_dict() if len(net) == 1 else \
            {t[0]: n.to_dict() for t, n in zip(targets, net)}
    if return_variance:  # the variance map on the original grid as well (one more inversion)
        out["var"] = to_original(var, d, system)
    return out


def uncertainty_scores(mean: torch.Tensor, var: torch.Tensor) -> dict:
    """Summaries of M samples (mean and per-voxel variance, in the network's space): mean variance, variance per
    predicted-foreground voxel (the active-learning score), mean entropy of the mean."""
    mean = torch.as_tensor(mean).float()
    var = torch.as_tensor(var).float()
    fg = float((mean > 0.5).sum())
    p = mean.clamp(1e-6, 1 - 1e-6)
    ent = -(p * p.log() + (1 - p) * (1 - p).log())
    return {"mean_variance": float(var.mean()), "variance_per_foreground_voxel": float(var.sum()) / max(fg, 1.0),
            "mean_entropy": float(ent.mean()), "foreground_voxels": fg}


def predict_item(system: DFMSystem, item: dict, inferer: DFMSlidingWindowInferer | None = None,
                 return_variance: bool = False, labels=None, prompt: str | None = None) -> dict:
    return predict_preprocessed(system, preprocess_item(system, item), inferer, return_variance, labels=labels,
                                prompt=prompt)


def _spacing(meta_tensor) -> list[float] | None:
    if isinstance(meta_tensor, MetaTensor):
        return [float(v) for v in meta_tensor.pixdim]
    return None


def case_metrics(pred_bin: torch.Tensor, label: torch.Tensor, spacing=None) -> dict:
    """Dice, HD95 (in spacing units), precision, recall of one binary prediction (1, *spatial) vs label."""
    y_pred = torch.as_tensor(pred_bin).float().unsqueeze(0)
    y = torch.as_tensor(label).float().unsqueeze(0)
    if y_pred.shape != y.shape:
        raise InputError(f"prediction shape {tuple(y_pred.shape[2:])} differs from the label's {tuple(y.shape[2:])}")
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
    # MONAI's functional form: ConfusionMatrixMetric.aggregate() all-gathers across ranks whenever torch.distributed
    # is initialised, and only rank 0 validates (it waited forever for the others under torchrun)
    cm = get_confusion_matrix(y_pred, y, include_background=True)
    prec = compute_confusion_matrix_metric("precision", cm)
    rec = compute_confusion_matrix_metric("recall", cm)
    hd = float("nan")
    if y_pred.sum() > 0 and y.sum() > 0:
        hd = float(HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            y_pred, y, spacing=spacing).flatten()[0])

    def f(v):
        v = float(torch.as_tensor(v).flatten()[0])
        return None if math.isnan(v) or math.isinf(v) else v

    return {"dice": f(dice), "hd95": None if math.isnan(hd) or math.isinf(hd) else hd,
            "precision": f(prec), "recall": f(rec),
            "fg_fraction_pred": float(y_pred.mean()), "fg_fraction_label": float(y.mean())}


def evaluate_items(system: DFMSystem, items: Sequence[dict], inferer: DFMSlidingWindowInferer | None = None,
                   preprocessed: Sequence[dict] | None = None, labels: Sequence[dict] | None = None,
                   progress: bool = False, on_case: Callable[[dict], None] | None = None,
                   structures=None, prompt: str | None = None, check: bool = True) -> tuple[list[dict], dict]:
    """Sliding-window prediction on whole images, ``prob > 0.5``, metrics in the label's original geometry.

    ``preprocessed``/``labels``: the same pipelines' outputs computed earlier (the training loop caches them); the
    results are identical to computing them here.

    A prompted model: every structure (or the named ``structures``) is predicted with its prompt in one batched
    sampler run per image and scored against its own truth (``structures: {name: metrics}``; the case's
    ``dice`` is their mean); ``dice_matrix[prompt][truth]`` scores every prediction against every structure's
    truth (the wrong-prompt control). A free ``prompt`` is scored against every truth (one row of the matrix).

    ``check``: :func:`check_labels` on ``items`` first (unless ``labels`` are given): off for a validation that
    scores its images a batch at a time, whose whole set is checked once before its training.
    """
    inferer = inferer or make_inferer(system)
    truths = system.structures
    lab_t = system.label_reader()
    if labels is None and check:  # (given, or check=False: a training's, checked once before it trains)
        check_labels(items)
    cases = []
    it = range(len(items))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="evaluate", unit="img")
    for i in it:
        item = items[i]
        t0 = time.perf_counter()
        d = preprocessed[i] if preprocessed is not None else preprocess_item(system, item)
        lab = labels[i] if labels is not None else lab_t(label_item(item))
        out = predict_preprocessed(system, d, inferer, labels=structures, prompt=prompt)
        label = lab["label"]
        note = getattr(label, "meta", {}).get(TRUTH_NOTE)
        unread = getattr(label, "meta", {}).get(TRUTH_UNREAD)
        prob = out["prob"]
        label = truth_on_image_grid(item, label, prob)
        # HD95 in the label's spacing where image and label both have one; in pixels where the image has none (a
        # PNG or JPEG: a label beside it saved by 3D Slicer as NIfTI says 1 mm, which is a pixel -- it was reported
        # in mm, a review)
        physical = has_geometry(first_path(item["image"])) and has_geometry(first_path(item["label"]))
        spacing = _spacing(label) if physical else None
        if not truths:
            m = case_metrics((prob > 0.5).float(), label, spacing=spacing)
        else:
            names = [s.name for s in truths]
            per, matrix = {}, {}
            # a painted label without a structure's segment: that truth is unknown (NaN, lib.structures), not scored
            known = [not bool(torch.isnan(torch.as_tensor(label[k])).any()) for k in range(len(names))]
            for ch, (name, _, _) in enumerate(out["targets"]):
                pred = (prob[ch:ch + 1] > 0.5).float()
                matrix[name] = {t: dice_of(pred, label[k:k + 1]) if known[k] else None for k, t in enumerate(names)}
                if name in names and prompt is None and known[names.index(name)]:
                    k = names.index(name)
                    per[name] = case_metrics(pred, label[k:k + 1], spacing=spacing)
            dices = [v["dice"] for v in per.values() if v.get("dice") is not None]
            m = {"dice": float(np.mean(dices)) if dices else None, "structures": per, "dice_matrix": matrix}
        m = {"case_id": item.get("case_id"), **m, "seconds": round(time.perf_counter() - t0, 3),
             "units": "mm" if physical else "px"}  # HD95's
        if note:
            m[TRUTH_NOTE] = f"{first_path(item['label'])}: {note}"
            if labels is None:  # (a training's: logged once, by check_labels)
                logger.warning("%s", m[TRUTH_NOTE])
        if unread:
            m[TRUTH_UNREAD] = list(unread)
            if labels is None:
                logger.warning("%s: its values {%s} read as background (no truth of this model takes them)",
                               first_path(item["label"]), ", ".join(f"{v:g}" for v in unread))
        cases.append(m)
        if on_case:
            on_case(m)
    return cases, summarize(cases)


def check_labels(items: Sequence[dict], labels=None) -> None:
    """Before any image is predicted: each label's size is its image's, as both files' headers give them (any format
    ITK reads; no pixels read; a DICOM series is checked when converted), in any axis order when both files place
    their axes by an affine (``evaluate`` reorders such a label by it, :func:`truth_on_image_grid`): a label that
    did not fit its image was found after the inferences before it, and the run ended with nothing written (a
    review, 2026-12-07). ``labels`` (a training's, read already): each one whose foreground the model's truth reads
    as background (``TRUTH_NOTE``: a {0, 1} mask under a threshold of 127, values no structure takes) is logged;
    ``evaluate_items`` logs and names it as it reads it. Not refused: a structure may be absent from every case."""
    from types import SimpleNamespace

    import nibabel as nib

    from .transforms import _itk_header, geometry_difference

    def files(v):
        return [str(f) for f in (v if isinstance(v, (list, tuple)) else [v])]

    missing, repeated, seen = [], [], {}
    for k, item in enumerate(items):
        gone = [f for f in files(item["image"]) + files(item["label"]) if not os.path.exists(f)]
        if gone:
            missing.append(f"{item.get('case_id')}: {gone[0]}")
        pair = tuple(os.path.realpath(f) for f in files(item["image"]) + ["|"] + files(item["label"]))
        if pair in seen:
            repeated.append(f"{item.get('case_id')} (entry {k}, the same files as entry {seen[pair]})")
        seen.setdefault(pair, k)
    # (a missing file was found when its case was reached, after the inferences before it, and the run ended with
    # nothing written; an entry listed twice was counted twice in the mean, median and spread: a review, 2026-12-08)
    if missing:
        raise InputError(f"{len(missing)} of {len(items)} entries name a file that does not exist, found before any "
                         f"image was predicted: {'; '.join(missing[:5])}")
    if repeated:
        raise InputError(f"{len(repeated)} entr{'y repeats' if len(repeated) == 1 else 'ies repeat'} an earlier one "
                         f"(the same image and label), which the statistics would count twice: "
                         f"{'; '.join(repeated[:5])}")
    misfit = []
    for k, item in enumerate(items):
        img_file, lab_file = first_path(item["image"]), first_path(item["label"])
        note = getattr(labels[k]["label"], "meta", {}).get(TRUTH_NOTE) if labels is not None else None
        if note:
            logger.warning("%s: %s", lab_file, note)
        img, _ = _itk_header(img_file) if os.path.isfile(img_file) else (None, None)
        lab, _ = _itk_header(lab_file) if os.path.isfile(lab_file) else (None, None)
        if img is None or lab is None:  # (unreadable: the loader says so, naming the file)
            continue
        lab = list(lab)
        while len(lab) > 2 and lab[-1] == 1:  # a label saved with a trailing axis of 1 (Slicer's one-slice 2D)
            lab.pop()
        lab_shape, img_shape = tuple(lab), tuple(img[:len(lab)])
        placed = has_geometry(img_file) and has_geometry(lab_file)  # (its axes reordered by the affines)
        if img_shape != lab_shape and not (placed and sorted(img_shape) == sorted(lab_shape)):
            swapped = len(lab_shape) == 2 and img_shape[::-1] == lab_shape
            misfit.append(f"{item.get('case_id')}: image {img_file} {img_shape}, label {lab_file} {lab_shape}" + (
                " (transposed: a mask written from a (rows, columns) array beside an image the loader reads as "
                "(x, y), a PNG?)" if swapped else ""))
        elif all(f.lower().endswith((".nii", ".nii.gz")) for f in (img_file, lab_file)):
            # off the image's grid (another spacing, a mirrored affine), from the NIfTI headers as the loader reads
            # them (nibabel's affine): was found after the inferences before it (a review, 2026-12-08)
            problem = geometry_difference(lab_file, SimpleNamespace(affine=nib.load(lab_file).affine), img_file,
                                          SimpleNamespace(affine=nib.load(img_file).affine), img_shape,
                                          allow_reorder=True)
            if problem:
                misfit.append(f"{item.get('case_id')}: {lab_file}: the label is not on its image's grid ({problem})")
    if misfit:
        raise InputError(f"{len(misfit)} of {len(items)} label(s) do not fit their image (size or grid), found "
                         f"before any image was predicted: {'; '.join(misfit[:5])}")


def truth_on_image_grid(item: dict, label, prob):
    """The reference label, checked to lie on the image's grid (its own affine against the image's) and put in the
    image's voxel order, so that it compares voxel for voxel with ``prob`` (the prediction on the image's original
    grid): a label stored flipped (LAS for an LPS image) but on the same points was scored against the mirrored
    image. One function for ``evaluate`` and the benches that score like it."""
    img_file, lab_file = first_path(item["image"]), first_path(item["label"])
    check_label_grid(lab_file, label, img_file, prob)
    if isinstance(prob, MetaTensor) and isinstance(label, MetaTensor) and has_geometry(lab_file) \
            and has_geometry(img_file):  # a PNG's affine is the reader's identity, no voxel order to follow
        label = reorient_like(label, prob.affine)
    if tuple(prob.shape[1:]) != tuple(label.shape[1:]):
        raise InputError(f"{item.get('case_id')}: the image's shape {tuple(prob.shape[1:])} differs from its label's "
                         f"{tuple(label.shape[1:])} ({lab_file}): not its label")
    return label


def dice_of(pred_bin: torch.Tensor, truth: torch.Tensor) -> float | None:
    """Dice of one binary prediction ``(1, *spatial)`` against one truth (MONAI's DiceMetric)."""
    v = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        torch.as_tensor(pred_bin).float().unsqueeze(0), torch.as_tensor(truth).float().unsqueeze(0))
    v = float(v.flatten()[0])
    return None if math.isnan(v) else v


def _stats(vals) -> dict | None:
    """Statistics of the defined values; ``undefined`` counts the cases left out (HD95 where the prediction or the
    truth is empty, precision where the prediction is, recall where the truth is), so a mean over fewer cases is
    never read as a mean over all of them. Undefined in every case: ``{"n": 0, "undefined": N}`` (the metric was
    left out of the summary without a word; a review); no case: None."""
    vals = list(vals)
    undefined = sum(v is None for v in vals)
    vals = np.array([v for v in vals if v is not None], dtype=float)
    if not len(vals):
        return {"n": 0, "undefined": int(undefined)} if undefined else None
    return {"mean": float(vals.mean()), "median": float(np.median(vals)), "std": float(vals.std()),
            "min": float(vals.min()), "max": float(vals.max()), "n": int(len(vals)), "undefined": int(undefined)}


def summarize(cases: Sequence[dict]) -> dict:
    out: dict = {"n": len(cases)}
    units = sorted({c["units"] for c in cases if c.get("units")})
    for k in ("dice", "hd95", "precision", "recall"):  # (a prompted model's rows: Dice only, the rest per structure)
        if k == "hd95" and len(units) > 1:
            continue  # (mm and pixels are not averaged together: hd95_by_unit)
        st = _stats(c.get(k) for c in cases if k in c)
        if st:
            out[k] = st
    # a total miss (nothing predicted where there is truth) has Dice 0 and no HD95 or precision: counted here
    def missed(m: dict) -> bool:
        return "precision" in m and m.get("precision") is None and m.get("recall") is not None

    prompted = bool(cases and "structures" in cases[0])
    # an empty truth (recall undefined): a case without the structure, or a label read as background (named in
    # the case's truth_note); and HD95's unit
    out["empty_truth"] = sum(1 for c in cases for m in (c.get("structures", {}).values() if prompted else [c])
                             if "recall" in m and m.get("recall") is None)
    out["truth_read_empty"] = sum(1 for c in cases if c.get(TRUTH_NOTE))
    unread: dict = {}
    for c in cases:  # value -> the cases whose label has it only where the truth reads background
        for v in c.get(TRUTH_UNREAD) or []:
            unread[f"{v:g}"] = unread.get(f"{v:g}", 0) + 1
    if unread:
        out["truth_unread_values"] = unread
    if units:
        out["hd95_units"] = units[0] if len(units) == 1 else "mixed (" + " and ".join(units) + ")"
    if len(units) > 1:  # HD95 per unit: a mean of millimetres and pixels means nothing (a review)
        out["hd95_by_unit"] = {u: _stats(c.get("hd95") for c in cases if "hd95" in c and c.get("units") == u)
                               for u in units}
    # a prompted model's misses are per structure (its case rows hold no precision of their own: always 0)
    out["empty_prediction"] = sum(1 for c in cases for m in (c.get("structures", {}).values() if prompted else [c])
                                  if missed(m))
    if prompted:
        names = list(dict.fromkeys(n for c in cases for n in c.get("structures", {})))
        out["empty_prediction_by_structure"] = {n: sum(1 for c in cases if missed(c["structures"].get(n, {})))
                                                for n in names}
        out["structures"] = {n: {k: _stats(c["structures"].get(n, {}).get(k) for c in cases)
                                 for k in ("dice", "hd95", "precision", "recall") if k != "hd95" or len(units) < 2}
                             for n in names}
        if len(units) > 1:
            for n in names:
                out["structures"][n]["hd95_by_unit"] = {
                    u: _stats(c["structures"].get(n, {}).get("hd95") for c in cases if c.get("units") == u)
                    for u in units}
        rows = list(dict.fromkeys(r for c in cases for r in c.get("dice_matrix", {})))
        cols = list(dict.fromkeys(t for c in cases for r in c.get("dice_matrix", {}).values() for t in r))
        out["dice_matrix"] = {r: {t: (_stats(c["dice_matrix"].get(r, {}).get(t) for c in cases) or {}).get("mean")
                                  for t in cols} for r in rows}
    return out
