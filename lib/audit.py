"""Compare two splits or datasets and flag what differs: the checks the earlier system left open.

Per image: shape, spacing, orientation, dtype, intensity percentiles (1, 50, 99), label foreground fraction,
metadata keys (datalist entry and image header), text present, a content hash. Per split: distributions. Flags:
different shapes / spacings / orientations / dtypes, shifted intensity or foreground distributions (two-sample
Kolmogorov-Smirnov test and a standardised median difference), different metadata keys, missing texts or labels,
the same image id or the same pixels in both splits (leakage), unreadable files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from typing import Sequence

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage
from scipy.stats import ks_2samp


def _axcodes(affine) -> str:
    try:
        return "".join(nib.aff2axcodes(np.asarray(affine)))
    except Exception:  # noqa: BLE001
        return "?"


def _as_the_loader_reads(src, tmp: str, label: bool = False):
    """The file(s) the training and inference loader would read for ``src`` (lib.transforms.LoadImageChecked): a
    file is checked first (a header that claims a huge volume is refused), a DICOM series folder is converted by the
    one checked path (an uneven, tilted or incomplete series is refused or corrected, never read as an evenly spaced
    volume: four malformed series passed the audit as normal volumes)."""
    import os

    from .transforms import LoadImageChecked, check_file

    files = list(src) if isinstance(src, (list, tuple)) else [src]
    out = []
    for n, f in enumerate(files):
        if os.path.isdir(f):
            out.append(LoadImageChecked._series(f, os.path.join(tmp, f"{'label' if label else 'series'}_{n}.nii.gz")))
        else:
            if os.path.isfile(f):
                check_file(f, label=label)
            out.append(f)
    return out if isinstance(src, (list, tuple)) else out[0]


def _spacing(meta, nd: int) -> list[float] | None:
    """The voxel spacing of the first ``nd`` axes, from the affine (every format: NRRD, MHA and a converted DICOM
    series have no NIfTI ``pixdim``, so their spacings were never compared), else from ``pixdim``."""
    aff = meta.get("affine")
    if aff is not None:
        a = np.asarray(aff, dtype=float)
        r = min(nd, a.shape[0] - 1)
        return [round(float(v), 4) for v in np.linalg.norm(a[:r, :r], axis=0)]
    pix = meta.get("pixdim")
    return [round(float(v), 4) for v in np.asarray(pix)[1:1 + nd]] if pix is not None else None


def _canonical_sha1(a: np.ndarray, affine, spatial_dims: int, channel_first: bool = False) -> str | None:
    """The SHA-1 of the pixels in the closest canonical voxel order of their affine (RAS): one scan stored twice in
    another voxel order (flipped or permuted axes, the affine following) has two stored-order hashes and one of
    these (a review: a LAS copy of a RAS training scan in the test split was not flagged). None without one."""
    from nibabel.orientations import apply_orientation, io_orientation

    from .transforms import affine_2d

    if affine is None or spatial_dims not in (2, 3):
        return None
    aff = np.asarray(affine, dtype=float)
    if spatial_dims == 2:
        aff = affine_2d(aff)
    if aff.shape != (spatial_dims + 1,) * 2 or not np.isfinite(aff).all():
        return None
    arr = np.moveaxis(a, 0, -1) if channel_first else a  # the spatial axes first
    if arr.ndim < spatial_dims:
        return None
    ornt = io_orientation(aff)
    if np.isnan(ornt).any():
        return None
    return hashlib.sha1(np.ascontiguousarray(apply_orientation(arr, ornt)).tobytes()).hexdigest()


def image_stats(item: dict, label_threshold: float = 0.0) -> dict:
    # dtype=None: the stored data type (LoadImage's default float32 made every image "float32", so the
    # different-data-types check could never fire)
    loader = LoadImage(image_only=False, ensure_channel_first=False, dtype=None)
    rec: dict = {"case_id": item.get("case_id"), "entry_keys": sorted(k for k in item if k != "case_id"),
                 "has_text": bool(isinstance(item.get("text"), str) and item["text"].strip()),
                 "has_label": "label" in item}
    from .data import case_id

    src = item["image"]
    first = str(src[0] if isinstance(src, (list, tuple)) and src else src)
    rec["image_file"] = os.path.realpath(first) if os.path.exists(first) else first
    # an id taken from the file's name (not the datalist's own case_id): two files of one name are not one case
    rec["named_by_file"] = item.get("case_id") == case_id({"image": src})
    try:
        with tempfile.TemporaryDirectory(prefix="dfm_audit_") as tmp:
            img, meta = loader(_as_the_loader_reads(item["image"], tmp))
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    a = np.asarray(img, dtype=np.float64)
    rec["shape"] = list(a.shape)
    rec["dtype"] = str(meta.get("dtype", img.dtype))
    # the spatial axes: a multi-channel image (a list of files stacked first, an RGB or 4D file with a channel
    # axis) has a label without that axis, and its channel axis has no spacing (an RGB PNG gave three spacings)
    spatial = list(a.shape)
    ch = meta.get("original_channel_dim")
    if isinstance(item["image"], (list, tuple)):
        spatial = spatial[1:]
    elif isinstance(ch, (int, np.integer)) and -len(spatial) <= int(ch) < len(spatial):
        spatial.pop(int(ch))
    rec["spacing"] = _spacing(meta, min(len(spatial), 3))
    rec["orientation"] = _axcodes(meta.get("affine")) if meta.get("affine") is not None else None
    finite = a[np.isfinite(a)]
    rec["nonfinite"] = int(a.size - finite.size)
    p1, p50, p99 = np.percentile(finite, [1, 50, 99]) if finite.size else (np.nan,) * 3
    rec.update(p1=float(p1), p50=float(p50), p99=float(p99), mean=float(finite.mean()) if finite.size else None)
    rec["header_keys"] = sorted(k for k in meta if isinstance(k, str) and not k.startswith("_"))
    rec["sha1"] = hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
    rec["sha1_canonical"] = _canonical_sha1(a, meta.get("affine"), len(spatial),
                                            channel_first=isinstance(item["image"], (list, tuple)))
    if "label" in item:
        try:
            with tempfile.TemporaryDirectory(prefix="dfm_audit_") as tmp:
                lab, lab_meta = loader(_as_the_loader_reads(item["label"], tmp, label=True))
            lab = np.asarray(lab)
            rec["fg_fraction"] = float((lab > label_threshold).mean())
            rec["label_shape"] = list(lab.shape)
            got = list(lab.shape)
            while len(got) > len(spatial) and got[-1] == 1:  # a label saved with a channel axis of 1
                got.pop()
            rec["label_matches_image"] = got in (list(a.shape), spatial)
            if rec["label_matches_image"] and lab_meta.get("affine") is not None and meta.get("affine") is not None:
                # the label on the image's grid (training's and evaluate's check): a label written with another
                # affine is learnt mirrored
                from types import SimpleNamespace

                from .transforms import first_path, geometry_difference

                rec["label_geometry"] = geometry_difference(
                    first_path(item["label"]), SimpleNamespace(affine=np.asarray(lab_meta["affine"])),
                    first_path(item["image"]), SimpleNamespace(affine=np.asarray(meta["affine"])), spatial,
                    allow_reorder=True)
        except Exception as e:  # noqa: BLE001
            rec["label_error"] = f"{type(e).__name__}: {e}"
    return rec


def _dist(vals: Sequence[float]) -> dict | None:
    v = np.array([x for x in vals if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return None
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "q1": float(q1), "median": float(med),
            "q3": float(q3), "min": float(v.min()), "max": float(v.max())}


def summarize_split(recs: Sequence[dict]) -> dict:
    ok = [r for r in recs if "error" not in r]
    return {
        "n": len(recs),
        "unreadable": [r["case_id"] for r in recs if "error" in r],
        "shapes": dict(Counter("x".join(map(str, r["shape"])) for r in ok)),
        "spacings": dict(Counter(str(r["spacing"]) for r in ok)),
        "orientations": dict(Counter(str(r["orientation"]) for r in ok)),
        "dtypes": dict(Counter(r["dtype"] for r in ok)),
        "intensity_p1": _dist([r["p1"] for r in ok]),
        "intensity_p50": _dist([r["p50"] for r in ok]),
        "intensity_p99": _dist([r["p99"] for r in ok]),
        "fg_fraction": _dist([r.get("fg_fraction") for r in ok]),
        "entry_keys": dict(Counter(",".join(r["entry_keys"]) for r in recs)),
        "header_keys": sorted(set().union(*[set(r["header_keys"]) for r in ok])) if ok else [],
        "missing_text": sum(not r["has_text"] for r in recs),
        "missing_label": sum(not r["has_label"] for r in recs),
        "nonfinite_images": sum(1 for r in ok if r["nonfinite"]),
        "label_errors": [r["case_id"] for r in ok if r.get("label_error")],
        "label_shape_mismatch": [r["case_id"] for r in ok if r.get("label_matches_image") is False],
        "label_geometry_mismatch": [r["case_id"] for r in ok if r.get("label_geometry")],
    }


def compare(a_recs: Sequence[dict], b_recs: Sequence[dict], name_a: str = "A", name_b: str = "B",
            alpha: float = 0.01, effect: float = 0.5) -> dict:
    sa, sb = summarize_split(a_recs), summarize_split(b_recs)
    flags: list[dict] = []

    def flag(check, severity, message, **details):
        flags.append({"check": check, "severity": severity, "message": message, **details})

    for key, what in (("shapes", "image shapes"), ("spacings", "spacings"), ("orientations", "orientations"),
                      ("dtypes", "stored data types")):
        if set(sa[key]) != set(sb[key]):
            flag(key, "warning", f"{what} differ: {name_a} {sa[key]} vs {name_b} {sb[key]}")
    ok_a = [r for r in a_recs if "error" not in r]
    ok_b = [r for r in b_recs if "error" not in r]
    for key, what in (("p1", "intensity 1st percentile"), ("p50", "median intensity"),
                      ("p99", "intensity 99th percentile"), ("fg_fraction", "label foreground fraction")):
        va = np.array([r[key] for r in ok_a if r.get(key) is not None], dtype=float)
        vb = np.array([r[key] for r in ok_b if r.get(key) is not None], dtype=float)
        if len(va) < 2 or len(vb) < 2:
            continue
        ks = ks_2samp(va, vb)
        pooled = np.sqrt(0.5 * (va.var() + vb.var())) or 1e-9
        d = (np.median(vb) - np.median(va)) / pooled
        if ks.pvalue < alpha and abs(d) >= effect:
            flag(f"distribution:{key}", "warning",
                 f"{what} distribution shifts: median {np.median(va):.4g} ({name_a}) vs {np.median(vb):.4g} "
                 f"({name_b}), standardised difference {d:+.2f}, KS p={ks.pvalue:.2g}",
                 ks_statistic=float(ks.statistic), ks_pvalue=float(ks.pvalue), standardized_median_difference=float(d))
    if set(sa["entry_keys"]) != set(sb["entry_keys"]):
        flag("entry_keys", "warning", f"datalist entry keys differ: {name_a} {sa['entry_keys']} vs {name_b} {sb['entry_keys']}")
    if set(sa["header_keys"]) != set(sb["header_keys"]):
        only_a = sorted(set(sa["header_keys"]) - set(sb["header_keys"]))
        only_b = sorted(set(sb["header_keys"]) - set(sa["header_keys"]))
        flag("header_keys", "info", f"image header keys differ: only in {name_a} {only_a}, only in {name_b} {only_b}")
    for s, n in ((sa, name_a), (sb, name_b)):
        if s["missing_text"] and s["missing_text"] < s["n"]:
            flag("missing_text", "error", f"{s['missing_text']} of {s['n']} {n} entries have no text")
        elif s["missing_text"] == s["n"]:
            flag("no_text", "info", f"no {n} entry has a per-image text (fine unless the model uses text_mode='image')")
        if s["missing_label"]:
            flag("missing_label", "warning", f"{s['missing_label']} of {s['n']} {n} entries have no label")
        if s["unreadable"]:
            flag("unreadable", "error", f"{n}: unreadable images {s['unreadable'][:5]}")
        if s["nonfinite_images"]:
            flag("nonfinite", "error", f"{n}: {s['nonfinite_images']} image(s) hold NaN/Inf")
        if s["label_errors"]:  # a missing or unreadable label file (evaluate and training refuse it)
            flag("label_unreadable", "error", f"{n}: labels missing or unreadable for {s['label_errors'][:5]}")
        if s["label_shape_mismatch"]:
            flag("label_shape", "error", f"{n}: label and image sizes differ for {s['label_shape_mismatch'][:5]}")
        if s["label_geometry_mismatch"]:
            flag("label_geometry", "error", f"{n}: labels not on their image's grid (another affine: training "
                                            f"would learn them mirrored or shifted) for {s['label_geometry_mismatch'][:5]}")
    ids = set(r["case_id"] for r in a_recs) & set(r["case_id"] for r in b_recs)
    # one image file in both, or one id the datalist gave: an error; two files that only share a name (ids taken from
    # file names, e.g. case*/flair.nii.gz of two datalists): a warning, the pixel check below tells copies
    files = {r["case_id"]: r.get("image_file") for r in a_recs}
    same = {i for i in ids if any(r["case_id"] == i and (r.get("image_file") == files[i]
                                                         or not r.get("named_by_file", False)) for r in b_recs)}
    if same:
        flag("id_overlap", "error", f"{len(same)} image id(s) in both {name_a} and {name_b}: {sorted(same)[:5]}")
    if ids - same:
        flag("id_name_overlap", "warning", f"{len(ids - same)} image name(s) in both {name_a} and {name_b}, of other "
                                           f"files: {sorted(ids - same)[:5]} (two cases of one file name, or one case "
                                           "at two paths: the pixel check tells copies)")
    # the pixels as stored, or in their canonical voxel order (one scan stored as RAS and as LAS)
    hashes = {h: r["case_id"] for r in ok_a for h in (r["sha1"], r.get("sha1_canonical")) if h}
    dup = [(hashes[h], r["case_id"]) for r in ok_b
           for h in [next((x for x in (r["sha1"], r.get("sha1_canonical")) if x in hashes), None)] if h]
    if dup:
        flag("pixel_duplicates", "error", f"{len(dup)} image(s) of {name_b} have the same pixels as one of {name_a}: {dup[:5]}")
    return {"a": {"name": name_a, **sa}, "b": {"name": name_b, **sb}, "flags": flags}


def audit(items_a: Sequence[dict], items_b: Sequence[dict], name_a: str = "A", name_b: str = "B",
          label_threshold: float = 0.0, progress: bool = False) -> dict:
    def stats(items, desc):
        it = items
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(items, desc=desc, unit="img")
        return [image_stats(x, label_threshold) for x in it]

    ra, rb = stats(items_a, name_a), stats(items_b, name_b)
    report = compare(ra, rb, name_a, name_b)
    report["cases"] = {name_a: ra, name_b: rb}
    return report
