"""``preprocessing.soft_label``: training targets that are the foreground fraction of each network voxel.

A binary truth resampled nearest to a coarser grid moves its boundary by up to half a coarse voxel; the fraction
(smoothed against aliasing, then resampled linearly) keeps the boundary where it is, which the probability map,
resampled back to the image's grid, then reproduces. The network's state ``x_t`` stays binary.
"""

import dataclasses
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib.config import FlowConfig, PreprocConfig
from lib.data import PatchBatcher
from lib.evaluation import dice_of, to_original
from lib.flow import training_step
from lib.transforms import label_transforms, preprocess


@pytest.fixture
def disc_png(tmp_path):
    """A 0/255 disc of radius 37.3 px off the grid, and a ramp image, as PNGs (spacing 1 px)."""
    yy, xx = np.mgrid[0:120, 0:120]
    disc = (((yy - 61.4) ** 2 + (xx - 57.7) ** 2) < 37.3 ** 2).astype(np.uint8) * 255
    Image.fromarray(disc).save(tmp_path / "label.png")
    Image.fromarray(((yy + xx) % 256).astype(np.uint8)).save(tmp_path / "image.png")
    return {"image": str(tmp_path / "image.png"), "label": str(tmp_path / "label.png")}


def _cfg(soft: bool) -> PreprocConfig:
    return PreprocConfig(spatial_dims=2, num_channels=1, spacing=[3.0, 3.0], intensity={"type": "none"},
                         label_threshold=127.0, patch_size=[24, 24], soft_label=soft)


def test_soft_label_keeps_the_boundary_on_the_coarse_grid(disc_png):
    truth = label_transforms(_cfg(False))({"label": disc_png["label"]})["label"]
    out = {}
    for soft in (False, True):
        pre = preprocess(_cfg(soft))
        d = pre(dict(disc_png))
        lab = d["label"].as_tensor()
        back = to_original(lab.float(), d, types.SimpleNamespace(preprocessing=pre))  # what evaluation does
        out[soft] = {"label": lab, "image": d["image"].as_tensor(), "dice": dice_of((back > 0.5).float(), truth)}
    hard, soft = out[False], out[True]
    assert set(hard["label"].unique().tolist()) <= {0.0, 1.0}
    fractional = (soft["label"] > 0.02) & (soft["label"] < 0.98)
    assert int(fractional.sum()) > 20  # the boundary ring of the disc
    assert ((soft["label"] > 0.5) == (hard["label"] > 0.5)).float().mean() > 0.97  # the same shape
    assert torch.equal(soft["image"], hard["image"])  # the image (what inference sees) is untouched
    # the fraction map, resampled back like a probability map, lies on the true boundary; nearest does not
    assert soft["dice"] > 0.995 and soft["dice"] > hard["dice"] + 0.003, (soft["dice"], hard["dice"])


def test_augmented_patches_keep_fractional_targets(disc_png):
    """The random affine of training resamples a fraction linearly: its patches hold values that the
    preprocessed label does not (nearest would only copy them); a binary label stays binary."""
    for soft in (False, True):
        d = preprocess(_cfg(soft))(dict(disc_png))
        batcher = PatchBatcher(_cfg(soft), 2, augment=True, seed=0,
                               augmentation={"prob": 1.0, "rotate": 0.3, "scale": 0.1, "translate": 0.0})
        lab = batcher([d, d], seeds=[1, 2])["label"]
        if not soft:
            assert set(lab.unique().tolist()) <= {0.0, 1.0}
            continue
        have = d["label"].as_tensor().flatten()
        new = [v for v in lab.flatten().tolist() if 0.02 < v < 0.98 and bool((have - v).abs().min() > 1e-5)]
        assert len(new) > 20, len(new)


def test_soft_label_is_the_smoothed_truth_interpolated_linearly(tmp_path):
    """A non-integer spacing ratio (1 px -> 2.5 px): each coarse voxel holds the anti-aliased truth (Gaussian,
    sigma (2.5 - 1) / 2, MONAI's kernel) interpolated linearly at its centre (SciPy's ``map_coordinates``)."""
    from monai.transforms import GaussianSmooth
    from scipy.ndimage import map_coordinates

    truth = np.zeros((100, 90), np.uint8)
    truth[:, :51] = 255  # a straight boundary between columns 50 and 51
    Image.fromarray(truth.T.copy()).save(tmp_path / "label.png")  # PIL: (width, height) -> MONAI's first axis
    Image.fromarray(np.zeros((90, 100), np.uint8)).save(tmp_path / "image.png")
    cfg = dataclasses.replace(_cfg(True), spacing=[2.5, 2.5])
    d = preprocess(cfg)({"image": str(tmp_path / "image.png"), "label": str(tmp_path / "label.png")})
    lab = d["label"].as_tensor()[0].numpy()
    b = (truth > 127).astype(np.float64)
    assert lab.shape == (41, 37)  # MONAI's Spacing keeps the first voxel's centre: ceil(99 / 2.5) + 1 voxels
    want = map_coordinates(GaussianSmooth(sigma=0.75)(torch.as_tensor(b)[None].float())[0].numpy(),
                           np.mgrid[0:41, 0:37].astype(float) * 2.5, order=1)
    inner = (slice(3, 37), slice(3, 33))  # away from the image border (padding differs)
    assert np.abs(lab[inner] - want[inner]).max() < 2e-3
    assert ((lab[inner] > 0.05) & (lab[inner] < 0.95)).any()


def test_soft_target_is_the_bce_target_and_the_state_stays_binary():
    """x_t at t = 1 is the binary truth (fraction > 0.5); the loss is the BCE on the fraction itself."""

    class Spy(torch.nn.Module):
        dfm = True

        def __init__(self, logits):
            super().__init__()
            self.logits, self.x_t = logits, []

        def forward(self, x_t, t, cond):
            self.x_t.append(x_t.clone())
            return self.logits

    torch.manual_seed(0)
    x1 = torch.rand(4, 1, 8, 8)
    logits = torch.randn(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    spy = Spy(logits)
    flow = dataclasses.replace(FlowConfig(scheduler="polynomial", exponent=1.0), source_p=0.5)
    loss = training_step(spy, None, x1, flow, g)
    assert set(spy.x_t[0].unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, x1))
    assert not torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, (x1 > 0.5).float()))

    class AtOne:  # t = 1 for every patch: x_t is the whole (binary) truth
        def rand(self, shape):
            return torch.ones(shape) if len(shape) == 1 else torch.zeros(shape)

    spy = Spy(logits)
    training_step(spy, None, x1, flow, AtOne())
    assert torch.equal(spy.x_t[0], (x1 > 0.5).float())


def test_drawing_patches_leaves_the_cached_item_as_it_was(disc_png):
    """A review: the training set is a CacheDataset's cached objects, and every draw appended the random transforms to
    the cached image's and label's history (96 entries after 300 batches); the cache is read-only."""
    d = preprocess(_cfg(False))(dict(disc_png))
    before = {k: (len(d[k].applied_operations), d[k].as_tensor().clone(), d[k].affine.clone()) for k in ("image",
                                                                                                        "label")}
    batcher = PatchBatcher(_cfg(False), 2, augment=True, seed=0,
                           augmentation={"prob": 0.5, "rotate": 0.3, "scale": 0.1, "translate": 0.0})
    for i in range(12):
        batcher([d], seeds=[i])
    for k, (ops, values, affine) in before.items():
        assert len(d[k].applied_operations) == ops, k
        assert torch.equal(d[k].as_tensor(), values) and torch.equal(d[k].affine, affine), k
