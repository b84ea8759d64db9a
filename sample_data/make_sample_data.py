"""Make ``sample_data/``: synthetic phantoms in MONAI Label's datastore layout and the default checkpoints.

    python sample_data/make_sample_data.py            # images + labels (seconds)
    python sample_data/make_sample_data.py --train    # + tiny CLIP + default checkpoints (a few CPU minutes)

* 3D: CT-like volumes (HU) of a body with one lesion (label 1) and a vertebra (bone, label 2), 64x64x40 at
  1.5x1.5x2.5 mm with an LPS-style affine (x and y flipped) and a non-zero origin; ``phantom_ct_XX.nii.gz``. The
  first five have ``labels/final``. The 3D model is prompted: one map with both labels, each chosen by its prompt.
* 2D: chest-radiograph-like 256x256 PNGs (a bright thorax, two darker lung fields, a spine); label = lungs;
  ``phantom_xray_XX.png``. The first four have ``labels/final``.
* ``models/vlm/tiny-clip``: a tiny random CLIP (save_pretrained) -- NOT a real VLM, see the README.
* ``models/dfm_vlm_3d.pt``, ``models/dfm_vlm_2d.pt``: self-describing checkpoints trained on the labelled
  phantoms with the core trainer (``lib.training.train``), so Auto Segmentation works at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def ct_phantom(seed: int, shape=(64, 64, 40)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    g = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    body = ((g[0] - 32) / 28) ** 2 + ((g[1] - 32) / 22) ** 2 <= 1.0
    c = [rng.uniform(20, 44), rng.uniform(22, 42), rng.uniform(12, 28)]
    r = [rng.uniform(4, 9), rng.uniform(4, 9), rng.uniform(3, 6)]
    lesion = sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, c, r)) <= 1.0
    lesion &= body
    img = np.where(body, 40.0, -1000.0) + np.where(lesion, rng.uniform(110, 160), 0.0)
    img = img + rng.normal(0, 18, shape) * body
    # a vertebra: a bone cylinder along z behind the body's centre (drawn after the lesion, so the lesion of each
    # seed is what it was before the phantom had a second structure); where they meet, the lesion is kept
    vc, vr = [rng.uniform(29, 35), rng.uniform(45, 49)], rng.uniform(3.5, 5.0)
    vertebra = (((g[0] - vc[0]) ** 2 + (g[1] - vc[1]) ** 2) <= vr ** 2) & body & ~lesion
    img = img + np.where(vertebra, rng.uniform(450, 650) - 40.0, 0.0)
    label = lesion.astype(np.uint8) + 2 * vertebra.astype(np.uint8)
    return np.round(img).astype(np.int16), label


def xray_phantom(seed: int, size=256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2000 + seed)
    y, x = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    thorax = ((x - 128) / rng.uniform(95, 110)) ** 2 + ((y - 135) / rng.uniform(105, 118)) ** 2 <= 1.0
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        cx = 128 + side * rng.uniform(42, 52)
        cy = rng.uniform(118, 132)
        lungs |= ((x - cx) / rng.uniform(28, 36)) ** 2 + ((y - cy) / rng.uniform(62, 74)) ** 2 <= 1.0
    spine = np.abs(x - 128) < 9
    img = np.where(thorax, 175.0, 25.0) - np.where(lungs, 110.0, 0.0) + np.where(spine & thorax, 30.0, 0.0)
    img += 15 * (y / size) + rng.normal(0, 9, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8), lungs.astype(np.uint8)


def ct_affine() -> np.ndarray:
    aff = np.diag([-1.5, -1.5, 2.5, 1.0])
    aff[:3, 3] = [48.0, 48.0, -50.0]
    return aff


def make_images(root: Path, n3d: int = 8, n2d: int = 6, labelled3d: int = 5, labelled2d: int = 4) -> None:
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for i in range(n3d):
        img, lab = ct_phantom(i)
        name = f"phantom_ct_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(img, ct_affine()), str(root / name))
        if i < labelled3d:
            nib.save(nib.Nifti1Image(lab, ct_affine()), str(root / "labels" / "final" / name))
    for i in range(n2d):
        img, lab = xray_phantom(i)
        name = f"phantom_xray_{i:02d}.png"
        Image.fromarray(img).save(root / name, optimize=True)
        if i < labelled2d:
            Image.fromarray(lab).save(root / "labels" / "final" / name, optimize=True)


def write_unlabelled_truth(root: Path, out: Path, n3d: int = 8, n2d: int = 6, labelled3d: int = 5,
                           labelled2d: int = 4) -> Path:
    """The truth of the phantoms ``make_images`` leaves unlabelled (the app's Next Sample candidates), written
    outside ``root`` with a datalist whose ``test`` split pairs them with their images: what the README's
    ``python -m lib evaluate ... --split test`` figures of the sample models were measured on."""
    (out / "labels").mkdir(parents=True, exist_ok=True)
    lists: dict[str, list] = {"test_3d": [], "test_2d": []}
    for i in range(labelled3d, n3d):
        _, lab = ct_phantom(i)
        name = f"phantom_ct_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(lab, ct_affine()), str(out / "labels" / name))
        lists["test_3d"].append({"image": str((root / name).resolve()), "label": str((out / "labels" / name).resolve())})
    for i in range(labelled2d, n2d):
        _, lab = xray_phantom(i)
        name = f"phantom_xray_{i:02d}.png"
        Image.fromarray(lab).save(out / "labels" / name, optimize=True)
        lists["test_2d"].append({"image": str((root / name).resolve()), "label": str((out / "labels" / name).resolve())})
    path = out / "datalist.json"
    path.write_text(json.dumps(lists, indent=1))
    return path


def train_defaults(root: Path, minutes: float, only: str | None = None) -> None:
    import torch

    from lib.config import load_preset
    from lib.data import case_id
    from lib.training import train
    from lib.vlm import make_tiny_clip

    torch.set_num_threads(2)
    models = root / "models"
    make_tiny_clip(models / "vlm" / "tiny-clip", image_size=32, hidden=32, projection_dim=32, seed=0)
    for name, pattern in (("dfm_vlm_3d", "phantom_ct_*.nii.gz"), ("dfm_vlm_2d", "phantom_xray_*.png")):
        if only and only != name:
            continue
        items = []
        for lab in sorted((root / "labels" / "final").glob(pattern)):
            it = {"image": str(root / lab.name), "label": str(lab)}
            it["case_id"] = case_id(it)
            items.append(it)
        hp = load_preset(name)
        hp.vlm.name_or_path = str(models / "vlm" / "tiny-clip")
        out = root.parent / "runs" / f"sample_{name}"
        res = train(hp, items[:-1], items[-1:], out, time_budget_s=minutes * 60, progress=False)
        ck = torch.load(res.best_checkpoint, weights_only=True)
        ck["hyper_parameters"]["vlm"]["name_or_path"] = "vlm/tiny-clip"  # found beside the checkpoint
        torch.save(ck, models / f"{name}.pt")
        per = {k: round(v, 3) for k, v in res.best_val.items() if k.startswith("dice")}
        print(f"{name}: best validation {per} after {res.iterations} iterations")
    (models / "README.md").write_text(
        "Default checkpoints trained on the synthetic phantoms of this folder by `make_sample_data.py --train`.\n"
        "`vlm/tiny-clip` is a tiny RANDOMLY initialised CLIP, not a real VLM (see the project README).\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--train", action="store_true", help="also train the default checkpoints")
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per model")
    ap.add_argument("--only", choices=("dfm_vlm_3d", "dfm_vlm_2d"), help="train only this model")
    ap.add_argument("--unlabelled-truth", metavar="DIR",
                    help="only write the truth of the unlabelled phantoms into DIR (outside the datastore) with "
                         "DIR/datalist.json (splits test_3d, test_2d), for `python -m lib evaluate`")
    a = ap.parse_args()
    root = Path(a.out)
    if a.unlabelled_truth:
        print(write_unlabelled_truth(root, Path(a.unlabelled_truth)))
        return
    make_images(root)
    if a.train:
        train_defaults(root, a.minutes, a.only)
    print(json.dumps(sorted(p.name for p in root.iterdir())))


if __name__ == "__main__":
    main()
