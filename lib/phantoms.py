"""Synthetic phantoms (ellipses / ellipsoids in noise) for tests and ``sample_data``: made by the project."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def phantom(shape: tuple[int, ...], seed: int = 0, channels: int = 1, contrast: float = 1.0,
            noise: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """An image ``(C, *shape)`` with one bright ellipse(oid) and its binary label ``(*shape)``."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    center = [rng.uniform(0.35, 0.65) * s for s in shape]
    radii = [rng.uniform(0.12, 0.25) * s for s in shape]
    r = sum(((g - c) / rad) ** 2 for g, c, rad in zip(grids, center, radii))
    label = (r <= 1.0).astype(np.uint8)
    imgs = []
    for c in range(channels):
        base = contrast * (0.6 + 0.2 * c) * label + 0.2 * np.exp(-r / 4)
        imgs.append(base + noise * rng.standard_normal(shape))
    return np.stack(imgs).astype(np.float32), label


def write_nifti(path: str | Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                dtype=None) -> Path:
    """Write ``array`` (spatial first; channels last if any) with a diagonal RAS affine."""
    nd = 3 if array.ndim >= 3 else 2
    aff = np.eye(4)
    for i in range(nd):
        aff[i, i] = spacing[i]
        aff[i, 3] = origin[i]
    img = nib.Nifti1Image(array.astype(dtype) if dtype else array, aff)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_phantom_case(folder: str | Path, name: str, shape=(48, 48, 32), seed: int = 0, spacing=(1.5, 1.5, 2.0),
                       with_label: bool = True) -> dict:
    """One single-channel phantom case as NIfTI (image, optional label); returns its datalist entry."""
    folder = Path(folder)
    img, lab = phantom(shape, seed=seed)
    entry = {"image": str(write_nifti(folder / f"{name}.nii.gz", img[0], spacing))}
    if with_label:
        entry["label"] = str(write_nifti(folder / "labels" / f"{name}.nii.gz", lab, spacing, dtype=np.uint8))
    return entry
