"""Datalists and random patch batching (training side of the one conditioning path)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from .config import PreprocConfig
from .transforms import InputError


# the image file suffixes this product names images without (a case's id, an uploaded image's id): one list (the
# app's upload ids cut these while case_id cut a shorter list: "x.tif" was the case "x.tif" and the image "x")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
                  ".bmp", ".dcm", ".svs")


def strip_image_suffix(name: str) -> str:
    """``name`` without its longest known image suffix (any case); unchanged where it has none or is only one."""
    low = name.lower()
    known = next((e for e in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if low.endswith(e)), None)
    return name[: -len(known)] if known and len(name) > len(known) else name


def case_id(item: dict) -> str:
    """A stable id for a datalist entry: its ``case_id`` or the image file's name without extensions."""
    if item.get("case_id"):
        return str(item["case_id"])
    img = item["image"]
    first = img[0] if isinstance(img, (list, tuple)) else img
    p = Path(str(first))
    name = strip_image_suffix(p.name)
    if isinstance(img, (list, tuple)):  # multi-file images (e.g. BraTS modalities): the folder names the case
        return p.parent.name
    return name


def load_datalist(path: str | os.PathLike, split: str, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Entries of ``split`` with absolute paths (relative paths are taken from the datalist's folder)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"datalist not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (a UTF-16 file: a traceback before)
            raise InputError(f"datalist {path} is not valid JSON (UTF-8): {e}") from e
    if not isinstance(d, dict):  # (a list of entries: an AttributeError in this very message before)
        raise InputError(f"datalist {path} must be a JSON object of splits ({{\"training\": [...], ...}}), got a "
                         f"{type(d).__name__}")
    if split not in d:
        raise InputError(f"datalist {path} has no split {split!r}; it has {[k for k, v in d.items() if isinstance(v, list)]}")
    base = Path(base_dir) if base_dir else path.parent

    def absolute(v, where):
        if isinstance(v, (list, tuple)) and v:
            return [absolute(x, where) for x in v]
        if not isinstance(v, str) or not v.strip():  # null, a number, "": a TypeError traceback before
            raise InputError(f"datalist {path} split {split!r} {where} must be a file path (or a list of paths, "
                             f"one per channel), got {v!r}")
        return str(v if os.path.isabs(v) else (base / v).resolve())

    if not isinstance(d[split], list):
        raise InputError(f"datalist {path} split {split!r} must be a list of entries, got {type(d[split]).__name__}")
    items = []
    for i, e in enumerate(d[split]):
        if not isinstance(e, dict) or "image" not in e:
            raise InputError(f"datalist {path} split {split!r} entry {i} has no 'image'")
        e = dict(e)
        for k in ("image", "label"):
            if k in e:
                e[k] = absolute(e[k], f"entry {i}: '{k}'")
        e["case_id"] = case_id(e)
        items.append(e)
    shared = _shared_names(d, base)
    for e, given in zip(items, d[split]):
        if e["case_id"] in shared and not given.get("case_id"):
            e["case_id"] = _path_id(e["image"], base)
    return items


def _path_id(image, base: Path) -> str:
    """An entry's id by where its (first) image file lies below the datalist's folder, without the extension
    (``BraTS20_0003/flair``), for files or case folders that share one name (:func:`_shared_names`)."""
    first = Path(str(image[0] if isinstance(image, (list, tuple)) else image))
    try:
        rel = first.relative_to(base.resolve())
    except ValueError:  # outside the datalist's folder: its absolute path
        rel = first
    return (rel.parent / case_id({"image": str(rel)})).as_posix()


def _shared_names(d: dict, base: Path) -> set[str]:
    """The ids by file name (:func:`case_id`) that two different images of the datalist would share, over all its
    splits: the usual one-folder-per-case layout (``case1/flair.nii.gz``, ``case2/flair.nii.gz``) gave every case
    one id, so ``evaluate``'s rows could not be told apart, their seeds were one, and ``audit`` flagged two
    disjoint splits as leaking (a review, 2026-12-07). Entries with their own ``case_id`` keep it, and an id is the
    file name's wherever no other image shares it (so the datalists of this README's figures keep theirs): adding an
    image of the same name elsewhere in the datalist gives both their path ids."""
    seen: dict[str, set] = {}
    for v in d.values():
        for e in v if isinstance(v, list) else []:
            img = e.get("image") if isinstance(e, dict) and not e.get("case_id") else None
            first = img[0] if isinstance(img, (list, tuple)) and img else img
            if not isinstance(first, str) or not first.strip():
                continue
            seen.setdefault(case_id({"image": img}), set()).add(str((base / first).resolve()))
    return {k for k, files in seen.items() if len(files) > 1}


def patch_transforms(cfg: PreprocConfig, num_patches: int, augment: bool = True,
                     augmentation: dict | None = None, structures=None) -> list:
    """Per-image random patching, as MONAI dictionary transforms (also the MONAI Label trainer's pre-transforms).

    [prompted model: draw one structure (:class:`lib.structures.RandStructured`): its mask becomes the label, one
    of its prompts the text] -> [augmentation: random affine of the whole image with zero padding] -> pad to the patch size ->
    ``RandCropByPosNegLabeld`` (``num_samples`` patches, positive/negative centres at ``pos : neg``) ->
    [augmentation: intensity scale, shift, gamma]. ``augmentation``: see :data:`lib.config.AUGMENTATION`.
    """
    from .config import AUGMENTATION

    cfg = cfg.resolved()
    aug = {**AUGMENTATION, **(augmentation or {})}
    keys = ["image", "label"]
    t: list = []
    if structures:
        from .structures import RandStructured

        t.append(RandStructured(structures))
    if augment:
        sd = cfg.spatial_dims
        rot = (aug["rotate"],) if sd == 2 else (aug["rotate"] * 0.66,) * 3
        translate = [aug["translate"] * p for p in cfg.patch_size] if aug["translate"] else None
        t.append(RandAffined(keys=keys, prob=aug["prob"], rotate_range=rot, scale_range=aug["scale"],
                             translate_range=translate, mode=("bilinear", "bilinear" if cfg.soft_label else "nearest"),
                             padding_mode="zeros"))
    t.append(SpatialPadd(keys=keys, spatial_size=cfg.patch_size))
    t.append(RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=cfg.patch_size, pos=cfg.pos,
                                    neg=cfg.neg, num_samples=num_patches, allow_smaller=False))
    if augment:
        t += [RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
              RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
              RandAdjustContrastd(keys="image", gamma=tuple(aug["gamma"]), prob=0.3)]
    return t


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class PatchBatcher:
    """``random_patch_batch`` with its own seeded random state: :func:`patch_transforms` over a list of images."""

    def __init__(self, cfg: PreprocConfig, num_patches: int, augment: bool = True, seed: int = 0,
                 augmentation: dict | None = None, structures=None):
        self.transforms = Compose(patch_transforms(cfg, num_patches, augment, augmentation, structures))
        self.transforms.set_random_state(seed=seed)
        self.crop = next(t for t in self.transforms.transforms if isinstance(t, RandCropByPosNegLabeld))

    def __call__(self, items: Sequence[dict], seeds: Sequence[int] | None = None) -> dict:
        """``seeds``: one per item -- its crops and augmentations then depend on that seed alone (distributed
        training: the same item gets the same patches whichever rank draws it); else the batcher's own stream."""
        images, labels, ids, centers, sources, texts = [], [], [], [], [], []
        for k, it in enumerate(items):
            if seeds is not None:
                self.transforms.set_random_state(seed=int(seeds[k]) % (2 ** 32))
            patches = self.transforms({"image": _own_meta(it["image"]), "label": _own_meta(it["label"])})
            patches = patches if isinstance(patches, list) else [patches]
            crop_centers = [list(map(int, c)) for c in (self.crop.cropper.centers or [])]
            for j, p in enumerate(patches):
                images.append(_plain(p["image"]))
                labels.append(_plain(p["label"]))
                ids.append(it.get("case_id"))
                centers.append(crop_centers[j] if j < len(crop_centers) else None)
                sources.append(it)
                texts.append(p.get("text") if "structure" in p else None)
        out = {"image": torch.stack(images).float(), "label": torch.stack(labels).float(), "case_id": ids,
               "center": centers, "items": sources}
        if any(t is not None for t in texts):  # a prompted model: the prompt drawn with each patch's structure
            out["texts"] = texts
        return out


def _own_meta(x):
    """The same voxels (not copied) with a metadata dict, affine and transform history of their own: the items are a
    ``CacheDataset``'s cached objects, and the random transforms appended to the cached image's history at every draw
    (96 entries after 300 batches; a review) -- the cache is read-only."""
    from monai.data import MetaTensor

    if not isinstance(x, MetaTensor):
        return x
    meta = {**x.meta, "affine": x.affine.clone()}
    return MetaTensor(x.as_tensor(), meta=meta, applied_operations=list(x.applied_operations))


def random_patch_batch(items: Sequence[dict], cfg: PreprocConfig, num_patches: int, augment: bool = False,
                       seed: int = 0) -> dict:
    """N random patches per preprocessed image (positive/negative centres at ``cfg.pos : cfg.neg``).

    Returns ``image (B*N, C, *patch)``, ``label (B*N, 1, *patch)``, ``case_id``, ``center`` (crop centre in the
    preprocessed image) and the source ``items`` of every patch; the caller computes the VLM conditioning of
    every patch with :func:`lib.vlm.patch_condition`.
    """
    return PatchBatcher(cfg, num_patches, augment=augment, seed=seed)(items)
