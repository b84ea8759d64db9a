"""Clicks: request formats, coordinates through the preprocessing, the label guarantee, the window cache, the
sampler's hold, simulated clicks in training, the interactive MONAI Label task."""

from __future__ import annotations

import types

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.clicks import (ClickError, Clicks, grown_region, guidance_maps, hold_maps, next_click, parse_clicks,
                        parse_label_clicks, random_clicks, scaled_grow_radius, to_network_grid,
                        uncertain_region_centre)
from lib.config import PreprocConfig
from lib.evaluation import make_inferer, predict_item, preprocess_item
from lib.inferer import DFMSlidingWindowInferer, WindowCache
from lib.samplers import sampler_dfm_euler, sampler_dfm_heun
from lib.flow import make_scheduler
from lib.transforms import preprocess


# -- requests -------------------------------------------------------------------------------------------------
def test_both_request_formats_give_the_same_clicks():
    shape = (40, 30, 20)
    deepgrow = parse_clicks({"foreground": [[1, 2, 3], [4, 5, 6]], "background": [[7, 8, 9]]}, ["lesion"], 3, shape)
    deepedit = parse_clicks({"lesion": [[1, 2, 3], [4, 5, 6]], "background": [[7, 8, 9]]}, ["lesion"], 3, shape)
    assert deepgrow == deepedit
    assert deepgrow.fg == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)] and deepgrow.bg == [(7.0, 8.0, 9.0)]
    # a 2D image opened in Slicer is a one-slice volume: IJK with k = 0 is accepted, k != 0 is not
    assert parse_clicks({"lung": [[3, 4, 0]]}, ["lung"], 2, (10, 10)).fg == [(3.0, 4.0)]
    # unrounded indices (OHIF v3) with k from a matrix inversion: rounded as i and j are (was refused as "3D")
    assert parse_clicks({"lung": [[3.4, 4.2, 1e-9]]}, ["lung"], 2, (10, 10)).fg == [(3.0, 4.0)]
    with pytest.raises(ClickError, match="third index must be 0"):
        parse_clicks({"lung": [[3, 4, 1]]}, ["lung"], 2, (10, 10))
    assert not parse_clicks({"image": "x", "steps": 2}, ["lung"], 2, (10, 10))
    # a model whose label is named "foreground" (the config's default): each click once, not twice
    assert parse_clicks({"foreground": [[1, 2]]}, ["foreground", "background"], 2, (10, 10)).fg == [(1.0, 2.0)]
    # Slicer's DeepEdit mode sends every segment's points, "uncertain" (one of /info's labels) too: empty is fine,
    # points there are no click of anything and are refused (were dropped without a word)
    assert parse_clicks({"lung": [[3, 4]], "uncertain": []}, ["lung"], 2, (10, 10)).fg == [(3.0, 4.0)]
    for parse in (lambda r: parse_clicks(r, ["lung"], 2, (10, 10)),
                  lambda r: parse_label_clicks(r, ["lung"], 2, (10, 10))):
        with pytest.raises(ClickError, match="points under 'uncertain'"):
            parse({"lung": [[3, 4]], "uncertain": [[5, 5]]})


@pytest.mark.parametrize("request_, needle", [
    ({"foreground": [[1, 2]]}, "foreground[0] = [1, 2] has 2 coordinate(s); the image is 3D"),
    ({"background": [[1, 2, 3, 4]]}, "background[0]"),
    ({"lesion": [[1, "a", 3]]}, "lesion[0] = [1, 'a', 3] has a coordinate that is not a finite number"),
    ({"foreground": [[1, float("nan"), 3]]}, "not a finite number"),
    ({"foreground": [[0, 0, 0], [40, 0, 0]]}, "foreground[1] = [40, 0, 0] is outside the image"),
    ({"background": [[-1, 0, 0]]}, "outside the image"),
    ({"foreground": "1,2,3"}, "must be a list of points"),
    ({"foreground": [5]}, "foreground[0] = 5 is not a point"),
    ({"foreground": [[1, 2, 3]], "background": [[1, 2, 3]]}, "clicked both as foreground and as background"),
    ({"foreground": [[10 ** 400, 2, 3]]}, "not a finite number"),  # an OverflowError, a 500
    # a review: 20 000 points held a request 12 s (and /infer every other one); a user places a few
    ({"background": [[0, 0, 0]] * 1001}, "clicks 'background': 1001 points, more than this server takes in one list "
                                         "(1000)"),
])
def test_bad_points_are_refused_naming_the_point(request_, needle):
    with pytest.raises(ClickError) as e:
        parse_clicks(request_, ["lesion"], 3, (40, 30, 20))
    assert needle in str(e.value)


# -- coordinates ----------------------------------------------------------------------------------------------
def test_a_click_on_an_anisotropic_reoriented_volume_lands_on_the_voxel_the_user_saw(tmp_path):
    """Axes permuted and flipped, anisotropic spacing, non-zero origin; the preprocessing reorients to RAS and
    resamples to 1 mm. Each clicked bright voxel must map onto the bright spot of the network grid."""
    arr = np.zeros((30, 24, 12), np.float32)
    spots = [(3, 7, 2), (25, 20, 9), (14, 3, 6)]
    for i, s in enumerate(spots):
        arr[s] = 100.0 + i
    aff = np.array([[0.0, -0.8, 0.0, 5.0], [1.2, 0.0, 0.0, -3.0], [0.0, 0.0, -2.5, 2.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(arr, aff), str(tmp_path / "v.nii.gz"))
    cfg = PreprocConfig(spatial_dims=3, spacing=[1.0, 1.0, 1.0], orientation="RAS", patch_size=[8, 8, 8])
    img = preprocess(cfg)({"image": str(tmp_path / "v.nii.gz")})["image"]
    assert tuple(img.shape[1:]) != arr.shape  # really resampled and reoriented
    clicks = parse_clicks({"foreground": [list(s) for s in spots]}, [], 3, arr.shape)
    net = to_network_grid(clicks, img)
    for s, p in zip(spots, net.fg):
        q = tuple(int(round(v)) for v in p)
        # the brightest voxel of the neighbourhood of the mapped point is this spot's (bilinear resampling
        # spreads a one-voxel spot over at most one voxel each way)
        lo = [max(0, v - 1) for v in q]
        patch = img[0][lo[0]:q[0] + 2, lo[1]:q[1] + 2, lo[2]:q[2] + 2]
        assert float(patch.max()) > 20.0, (s, p, float(patch.max()))


def test_png_clicks_use_monai_x_y_indices(tmp_path):
    from PIL import Image

    a = np.zeros((40, 60), np.uint8)  # rows (y) x columns (x)
    a[9:12, 44:47] = 255  # around row 10, column 45 -> MONAI index (x=45, y=10)
    Image.fromarray(a).save(tmp_path / "x.png")
    cfg = PreprocConfig(spatial_dims=2, spacing=[2.0, 2.0], patch_size=[8, 8])
    img = preprocess(cfg)({"image": str(tmp_path / "x.png")})["image"]
    c = parse_clicks({"foreground": [[45, 10]]}, [], 2, img.meta["spatial_shape"])
    p = to_network_grid(c, img).fg[0]
    assert p == pytest.approx((22.5, 5.0), abs=0.51)
    q = tuple(int(round(v)) for v in p)
    assert float(img[0][q]) > 0


def _cornerstone_volume(folder) -> tuple[np.ndarray, list]:
    """A DICOM series as OHIF (cornerstone3D) builds its volume, written here from pydicom: slices sorted ascending
    along row x column cosine (``sortImageIdsAndGetSpacing``), each slice's pixels indexed (column, row). OHIF's
    point tools send ``worldToIndex`` of this volume: these indices."""
    from pathlib import Path

    import pydicom

    dss = [pydicom.dcmread(str(f)) for f in sorted(Path(folder).iterdir()) if f.is_file()]
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], normal)))
    vol = np.stack([d.pixel_array.T * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0))
                    for d in dss], axis=-1)
    return vol, dss


def _check_series_order(folder, out):
    """The converted series has OHIF's (and ITK's) voxel order and ITK's geometry."""
    from monai.transforms import LoadImage

    from lib.dicom import series_to_nifti

    series_to_nifti(folder, out)
    ours = LoadImage(image_only=True)(str(out))
    ohif, _ = _cornerstone_volume(folder)
    itk = LoadImage(image_only=True, reader="ITKReader")(str(folder))
    assert tuple(ours.shape) == ohif.shape and np.allclose(np.asarray(ours), ohif), folder
    assert np.allclose(np.asarray(ours), np.asarray(itk))
    assert np.allclose(ours.affine.numpy(), itk.affine.numpy(), atol=1e-3), (ours.affine, itk.affine)


@pytest.mark.parametrize("axes", ["sample", "ras", "flipped_z", "coronal"])
def test_a_dicom_series_keeps_its_own_voxel_order_so_ohif_clicks_land_where_shown(tmp_path, axes):
    """OHIF sends clicks as indices of its own volume of the DICOM series; the server converts the series to NIfTI
    and reads the points as indices of that NIfTI. dicom2nifti's reorientation reversed the rows of a standard
    axial series (an OHIF click landed on the mirror-image voxel, and a returned label was drawn mirrored): the
    converted array must run in the series' own order, the order of OHIF and of ITK (MONAI Label's own
    conversion, 3D Slicer)."""
    from lib.dicom import write_ct_series

    from conftest import ROOT

    img = nib.load(str(ROOT / "sample_data" / "phantom_ct_05.nii.gz"))
    vol = np.asarray(img.dataobj, dtype=float)
    affine = {"sample": img.affine, "ras": np.diag([1.5, 1.5, 2.5, 1.0]), "flipped_z": np.diag([1.5, -1.5, -2.5, 1.0]),
              "coronal": np.array([[1.5, 0, 0, 0], [0, 0, 2.5, 0], [0, -1.5, 0, 0], [0, 0, 0, 1.0]])}[axes]
    write_ct_series(vol, affine, tmp_path / "ct", seed=axes)
    _check_series_order(tmp_path / "ct", tmp_path / "ct.nii.gz")


def test_real_vendor_series_keep_their_own_voxel_order(tmp_path):
    """The same on real MR series of four vendors: sagittal, oblique, non-isotropic (../shared/data/dicom)."""
    from conftest import SHARED

    vendor = SHARED / "dicom" / "vendor_mr"
    if not vendor.exists():
        pytest.skip(f"real DICOM data not found at {vendor}")
    names = ["ge_anatomical_001", "generic_anatomical_002_non_isotropic", "hitachi_anatomical_001",
             "siemens_anatomical_001"]
    for name in names:
        _check_series_order(vendor / name, tmp_path / f"{name}.nii.gz")


# -- maps, sampler hold -------------------------------------------------------------------------------------------
def test_guidance_is_a_truncated_gaussian_and_the_hold_marks_the_clicked_voxels():
    c = Clicks().add((5, 5), True).add((15, 12), False)
    g = guidance_maps(c, (20, 20), sigma=2.0)
    assert g[0, 5, 5] == 1.0 and g[1, 15, 12] == 1.0 and g[0, 15, 12] == 0.0
    assert g[0, 5, 12] == 0.0 and g[0, 5, 11] > 0  # zero beyond 3 sigma (6 voxels), not before
    h = hold_maps(c, (20, 20), radius=1)
    assert h[0].sum() == 10 and h[1, 5, 5] == 1 and h[1, 15, 12] == 0 and h[0, 15, 12] == 1


def test_a_point_between_two_voxels_takes_the_upper_one_on_every_axis_and_grid():
    """Voxel i spans [i - 0.5, i + 0.5). Python's round took halves to the even voxel (10.5 -> 10, 11.5 -> 12), so
    a client's unrounded point and the network-grid point of an image voxel on a grid of twice its spacing (image
    voxels 1, 3, 5 -> 0.5, 1.5, 2.5) landed alternately below and above: network voxels 0, 2, 2."""
    c = parse_clicks({"foreground": [[10.5, 11.5]], "background": [[0.5, 2.49]]}, ["blob"], 2, (20, 20))
    assert c.fg == [(11, 12)] and c.bg == [(1, 2)]
    half = Clicks([(0.5, 0.5), (1.5, 1.5), (2.5, 2.5)], [(4.5, 0.0)])
    h = hold_maps(half, (6, 6), radius=0)
    assert sorted(map(tuple, torch.nonzero(h[1]).tolist())) == [(1, 1), (2, 2), (3, 3)]
    assert torch.nonzero(h[0]).tolist() == [[1, 1], [2, 2], [3, 3], [5, 0]]
    img = np.zeros((1, 12, 12), np.float32)
    img[0, 3:6, 3:6] = 1.0  # the fill of a click at (2.5, 2.5) starts from voxel (3, 3), in the bright block
    fill = grown_region(img, (2.5, 2.5), radius=2, tolerance=0.5)  # seed: the mean of 5 voxels, 0.6
    assert fill[3, 3] and fill[4, 4] and not fill[2, 2]


def _two_regions() -> np.ndarray:
    """(2, 30, 30): channel 0 bright (2.0) in a 10x12 block at rows 5..14, cols 5..16, a second bright block at
    rows 5..14, cols 19..24 touching the first only at one corner through a diagonal voxel, noise-free elsewhere
    (0.0); channel 1 noise that the lesion does not show in."""
    img = np.zeros((2, 30, 30), np.float32)
    img[0, 5:15, 5:17] = 2.0
    img[0, 15, 17] = 2.0  # touches the block only diagonally (corner to corner)
    img[0, 16:26, 18:25] = 2.0  # a second block, diagonal to that voxel only
    img[1] = np.random.default_rng(0).normal(0, 3.0, (30, 30))
    return img


def _whole_grid_maps(clicks, shape, sigma, radius, image=None, grow_radius=-1, tol=0.0, side="both", scale=0.0,
                     reference=None):
    """The click maps computed over the whole grid for every click (the code before 2026-12-06): the reference the
    per-click boxes must reproduce exactly."""
    import math

    from lib.clicks import grown_region

    grid = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    guid = torch.zeros((2, *shape))
    for ch, pts in enumerate((clicks.fg, clicks.bg)):
        for p in pts:
            d2 = sum((g - float(c)) ** 2 for g, c in zip(grid, p))
            bump = torch.where(d2 <= (3.0 * sigma) ** 2, torch.exp(-d2 / (2.0 * sigma * sigma)), torch.zeros_like(d2))
            guid[ch] = torch.maximum(guid[ch], bump)
    mask, value = torch.zeros(shape), torch.zeros(shape)
    best = torch.full(shape, float("inf"))
    grow = grow_radius >= 0 and image is not None
    ref = None if reference is None else np.asarray(reference, bool)
    for v, pts in ((1.0, clicks.fg), (0.0, clicks.bg)):
        for p in pts:
            q = [min(max(int(round(c)), 0), s - 1) for c, s in zip(p, shape)]
            d2 = sum((g - float(c)) ** 2 for g, c in zip(grid, q))
            reach = d2 <= radius * radius + 1e-6 if radius >= 0 else torch.zeros(shape, dtype=torch.bool)
            if grow and v > 0:
                r = grow_radius
                if scale and ref is not None and ref.any():
                    d = float(np.sqrt(((np.argwhere(ref) - np.asarray(q)[None]) ** 2).sum(1).min()))
                    r = 0 if d < 2.0 else int(min(grow_radius, math.ceil(scale * d - 1e-9)))
                fill = grown_region(np.asarray(image), q, r, tol, side)
                if ref is not None:
                    ref = ref | fill
                reach = reach | torch.as_tensor(fill)
            elif grow:
                release = (mask > 0) & (value > 0) & (d2 < best)
                mask = torch.where(release, torch.zeros_like(mask), mask)
                best = torch.where(release, torch.full_like(best, float("inf")), best)
                reach = reach | (d2 < 0.5)
            near = reach & (d2 < best)
            best = torch.where(near, d2, best)
            mask = torch.where(near, torch.ones_like(mask), mask)
            value = torch.where(near, torch.full_like(value, v), value)
    return guid, torch.stack([mask, value])


@pytest.mark.parametrize("shape", [(23, 31), (17, 20, 13)])
def test_click_maps_in_boxes_equal_the_whole_grid_computation(shape):
    """A review: every click's maps were computed over the whole grid on every request (10 clicks on the BraTS
    grid: 0.5 s of guidance and 1.9 s of holds per request). Each click now works in the box it can reach; the maps
    are bit for bit those of the whole-grid computation (the window cache keys on their bytes), clicks at the border,
    overlapping, fills, releases and scaled fills included."""
    rng = np.random.default_rng(len(shape))
    image = rng.random((1, *shape)).astype(np.float32)
    image[(0,) + tuple(slice(s // 4, s // 2 + 2) for s in shape)] += 1.0  # a bright block to fill
    reference = np.zeros(shape, bool)
    reference[tuple(slice(s // 3, s // 3 + 3) for s in shape)] = True
    for trial in range(12):
        c = Clicks()
        for _ in range(int(rng.integers(1, 7))):
            p = tuple(float(rng.integers(0, s)) + float(rng.uniform(-0.4, 0.4)) * (trial % 2) for s in shape)
            c.add(p, bool(rng.random() < 0.6))
        radius, grow, scale = int(rng.integers(-1, 4)), int(rng.integers(-1, 7)), float(rng.choice([0.0, 1.0, 3.0]))
        sigma = float(rng.choice([1.0, 2.5]))
        want_g, want_h = _whole_grid_maps(c, shape, sigma, radius, image, grow, 0.3, "above", scale, reference)
        got_g = guidance_maps(c, shape, sigma)
        got_h = hold_maps(c, shape, radius, image=image, grow_radius=grow, grow_tolerance=0.3, grow_side="above",
                          grow_scale=scale, reference=reference)
        assert torch.equal(got_g, want_g), (trial, c)
        assert torch.equal(got_h, want_h), (trial, c, radius, grow, scale)


def test_a_click_grows_to_the_connected_similar_voxels_within_its_radius():
    img = _two_regions()
    g = grown_region(img[:1], (9, 10), radius=20, tolerance=0.5)
    assert g[5:15, 5:17].all() and g.sum() == 120  # the whole block and nothing else: not the dark background,
    assert not g[15, 17] and not g[16:26, 18:25].any()  # not through the diagonal (face connectivity)
    # bounded by the ball: radius 3 keeps the voxels within 3 of the click
    g3 = grown_region(img[:1], (9, 10), radius=3, tolerance=0.5, max_share=1.0)
    pts = np.argwhere(g3)
    assert len(pts) == 29 and ((pts - [9, 10]) ** 2).sum(1).max() <= 9
    # all compared channels must agree: channel 1's noise breaks the block apart; the click's voxel is always in
    g2 = grown_region(img, (9, 10), radius=20, tolerance=0.5)
    assert g2[9, 10] and g2.sum() < 40


def test_a_grown_click_takes_its_side_and_does_not_leak_over_its_ball():
    # a lesion brighter towards its centre: "above" from its rim takes the brighter core, "both" only the rim's band
    img = np.zeros((1, 40, 40), np.float32)
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    img[0][r <= 8] = 1.0 + (8 - r[r <= 8]) * 0.25  # 1.0 at the rim, 3.0 at the centre
    above = grown_region(img, (20, 13), radius=30, tolerance=0.1, side="above")
    both = grown_region(img, (20, 13), radius=30, tolerance=0.1, side="both")
    assert above[r <= 7].all() and not above[r > 8].any() and both.sum() < above.sum() / 2
    below = grown_region(img, (20, 13), radius=30, tolerance=0.1, side="below")
    assert not below[r < 7].any()  # the core is brighter: "below" does not take it
    # the fill would take nearly all of its ball (the background around a dark click, "this and brighter"): the
    # ball shrinks until the fill is at most half of it, here down to the click's voxel alone
    dark = np.full((1, 40, 40), 1.0, np.float32)
    dark[0, 20, 20] = -1.0
    leak = grown_region(dark, (20, 20), radius=12, tolerance=0.1, side="above")
    assert leak.sum() == 1 and leak[20, 20]
    assert grown_region(dark, (20, 20), radius=12, tolerance=0.1, side="above", max_share=1.0).sum() > 400
    # a fill of about a quarter of its ball (a click in a corner of a bright quadrant) stays whole
    quad = np.zeros((1, 40, 40), np.float32)
    quad[0, :20, :20] = 1.0
    h = grown_region(quad, (18, 18), radius=8, tolerance=0.1)
    ball = np.hypot(yy - 18, xx - 18) <= 8
    assert h.sum() == (ball & (xx < 20) & (yy < 20)).sum() and h.sum() <= 0.5 * ball.sum()


def test_the_hold_of_a_grown_click_marks_its_region_and_a_negative_click_releases_its_side():
    img = _two_regions()[:1]
    c = Clicks().add((9, 10), True)
    h = hold_maps(c, (30, 30), radius=-1, image=torch.as_tensor(img), grow_radius=20, grow_tolerance=0.5)
    assert h[0].sum() == 120 and bool((h[1][h[0] > 0] == 1).all())
    assert hold_maps(c, (30, 30), radius=-1).sum() == 0  # no growing, no ball: nothing held
    c.add((9, 15), False)  # a negative click inside the block: the voxels nearer to it are released, its own is 0
    h = hold_maps(c, (30, 30), radius=-1, image=torch.as_tensor(img), grow_radius=20, grow_tolerance=0.5)
    assert h[0, 9, 15] == 1 and h[1, 9, 15] == 0
    assert h[0, 9, 12] == 1 and h[1, 9, 12] == 1 and h[0, 9, 13] == 0 and h[0, 9, 16] == 0
    assert h[0].sum() == 10 * 8 + 1  # columns 5..12 of the block stay held at 1


def test_a_scaled_fill_follows_the_clicks_distance_to_the_segmentation():
    """clicks.grow_scale: the ball of a positive click's fill is min(grow_radius, ceil(scale * d)), d its distance to
    the current segmentation (the reference and the fills of the clicks before it)."""
    img = np.zeros((1, 40, 40), np.float32)
    img[0, 15:21, 2:38] = 1.0  # a bright band, 6 voxels high
    ref = np.zeros((40, 40), bool)
    ref[15:21, 2:9] = True  # its left end is segmented
    assert scaled_grow_radius(ref, (18, 30), 12, 2.0) == 12  # 22 away: the whole radius
    assert scaled_grow_radius(ref, (18, 11), 12, 2.0) == 6 and scaled_grow_radius(ref, (18, 11), 12, 0.0) == 12
    assert scaled_grow_radius(ref, (18, 5), 12, 2.0) == 0  # inside: nothing but the click's voxel
    assert scaled_grow_radius(ref, (16, 9), 12, 2.0) == 0  # touching it (d = 1)
    assert scaled_grow_radius(ref, (14, 9), 12, 2.0) == 0  # touching it diagonally (d = 1.41)
    assert scaled_grow_radius(ref, (18, 10), 12, 2.0) == 4  # 2 away: a missed rim
    assert scaled_grow_radius(np.zeros_like(ref), (18, 11), 12, 2.0) == 12  # nothing segmented yet
    # any finite scale >= 0 (the request's grow_scale): a huge one is the whole radius, a tiny one nothing (both
    # were an OverflowError, a 500, found by a review)
    assert scaled_grow_radius(ref, (18, 10), 12, 1e308) == 12 and scaled_grow_radius(ref, (18, 30), 12, 1e308) == 12
    assert scaled_grow_radius(ref, (18, 11), 12, 1e-320) == 0 and scaled_grow_radius(ref, (18, 30), 12, 1e-320) == 0
    kw = dict(image=torch.as_tensor(img), grow_radius=12, grow_tolerance=0.1)
    inside = Clicks().add((18, 5), True)
    assert hold_maps(inside, (40, 40), -1, **kw)[0].sum() > 80  # the band within 12 of it
    assert hold_maps(inside, (40, 40), -1, grow_scale=2.0, reference=ref, **kw)[0].sum() == 1
    # two clicks: the first, far away, fills the band's right part; the second, 7 voxels from the segmentation but
    # 3 from the first fill, is measured against both (a ball of 6, whose fill leaks and shrinks to its voxel),
    # so it does not fill the band back to the segmented end as a ball of 12 would
    two = Clicks().add((18, 30), True).add((18, 15), True)
    h = hold_maps(two, (40, 40), -1, grow_scale=2.0, reference=ref, **kw)
    h_fixed = hold_maps(two, (40, 40), -1, **kw)
    assert h[0, 18, 25] == 1 and h[0, 18, 15] == 1
    assert h_fixed[0, 18, 4] == 1 and h[0, 18, 4] == 0 and h[0, 18, 12] == 0
    with pytest.raises(ValueError, match="reference of shape"):
        hold_maps(two, (40, 40), -1, grow_scale=2.0, reference=ref[:30], **kw)


@pytest.mark.parametrize("field,value,needle", [
    ("grow_scale", -1.0, "grow_scale must be a finite number >= 0"),
    ("grow_scale", float("nan"), "grow_scale must be a finite number >= 0"),
    ("grow_radius", -2, "grow_radius must be an integer >= -1"),
    ("grow_side", "up", "grow_side must be one of"),
])
def test_bad_fill_settings_in_a_preset_are_named(field, value, needle):
    from lib.config import ClickConfig, ConfigError

    with pytest.raises(ConfigError, match=needle):
        ClickConfig(**{field: value}).resolved()
    assert ClickConfig(grow_scale=2).resolved().grow_scale == 2


@pytest.mark.parametrize("fn", [sampler_dfm_euler, sampler_dfm_heun])
def test_the_sampler_holds_clicked_voxels_at_every_step(fn):
    """A model that pushes every voxel to 0; the held voxels must stay 1 in every state the sampler visits."""
    seen = []

    def model(x, t, cond):
        seen.append(x.clone())
        return torch.full_like(x, -8.0)

    hold = torch.zeros(2, 2, 16, 16)
    hold[:, 0, 4:6, 4:6] = 1
    hold[:, 1, 4:6, 4:6] = 1
    trace = {}
    p = fn(model, None, torch.zeros(2, 1, 16, 16), 4, make_scheduler(
        __import__("lib.config", fromlist=["FlowConfig"]).FlowConfig()), torch.Generator().manual_seed(0),
        trace=trace, hold=hold)
    assert len(seen) >= 4
    for x in seen + [trace["x_final"]]:
        assert bool((x[:, :, 4:6, 4:6] == 1).all())
    assert float(trace["x_final"].sum()) == 2 * 4  # everything else followed the model
    # p_final: a held voxel is known (probability 1 here, though the network says 0); elsewhere the network's
    assert bool((p[:, :, 4:6, 4:6] == 1).all()) and float(p.sum()) == pytest.approx(8 + 2 * 252 / (1 + np.exp(8)))


def test_a_one_pass_click_model_holds_the_clicked_neighbourhood_too(make_system):
    """A review: the one-pass baseline (``model.mode = "plain"``) trained with clicks dropped the hold, so the
    voxels within ``hold_radius`` of a click took the network's value (0.43-0.55 on the probe), while the result
    reported the radius it did not apply."""
    from lib.clicks import Clicks
    from lib.training import build_system

    hp = make_system(mode="plain").hparams
    hp.clicks.enabled, hp.clicks.hold_radius = True, 3
    torch.manual_seed(0)
    system = build_system(hp)
    img = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    inf = DFMSlidingWindowInferer([32, 32], steps=2)
    free = inf(img, system)
    p = inf(img, system, clicks=Clicks(fg=[(20, 20)], bg=[(6, 30)]))
    near_fg = [p[0, 0, 20 + d, 20] for d in (-3, 0, 2)] + [p[0, 0, 20, 23]]
    near_bg = [p[0, 0, 6 + d, 30] for d in (-3, 0, 3)]
    assert all(float(v) == 1.0 for v in near_fg) and all(float(v) == 0.0 for v in near_bg)
    assert 0.05 < float(free[0, 0, 20, 20]) < 0.95, "the network alone is not already sure there"


@pytest.mark.parametrize("output", ["p_final", "last_posterior"])
def test_either_output_of_the_sampler_holds_the_clicked_neighbourhood(make_system, output):
    """A review (2026-12-07): the samplers hold the clicked voxels in ``p_final``, but ``output="last_posterior"``
    (the CLI's ``--output``, a checkpoint's ``sampler.output``) returned the network's own posterior there: the
    held disc around a click had a mean probability of 0.264."""
    from lib.clicks import Clicks
    from lib.training import build_system

    hp = make_system().hparams
    hp.clicks.enabled, hp.clicks.hold_radius = True, 3
    torch.manual_seed(0)
    system = build_system(hp)
    img = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    inf = DFMSlidingWindowInferer([32, 32], steps=2, output=output)
    free = inf(img, system)
    p = inf(img, system, clicks=Clicks(fg=[(20, 20)], bg=[(6, 30)]))
    near_fg = [p[0, 0, 20 + d, 20] for d in (-3, 0, 2)] + [p[0, 0, 20, 23]]
    near_bg = [p[0, 0, 6 + d, 30] for d in (-3, 0, 3)]
    assert all(float(v) == 1.0 for v in near_fg) and all(float(v) == 0.0 for v in near_bg), (near_fg, near_bg)
    assert 0.05 < float(free[0, 0, 17, 20]) < 0.95, "the network alone is not already sure there"


# -- where the robot clicks --------------------------------------------------------------------------------------
def test_next_click_is_the_centre_of_the_largest_error_region():
    truth = np.zeros((40, 40), bool)
    truth[5:25, 5:25] = True
    pred = truth.copy()
    pred[10:20, 10:16] = False  # missed: 60 voxels, centre near (14.5, 12.5)
    pred[30:34, 30:34] = True  # false: 16 voxels
    (p, positive) = next_click(pred, truth)
    assert positive and 12 <= p[0] <= 17 and 12 <= p[1] <= 13 and truth[p] and not pred[p]
    pred[10:20, 10:16] = True
    (p, positive) = next_click(pred, truth)
    assert not positive and 30 <= p[0] < 34 and 30 <= p[1] < 34
    assert next_click(truth, truth) is None
    # the LARGEST region, not the thickest: a long thin miss (2 x 30 = 60 voxels) beats a thick small one (25)
    truth = np.zeros((40, 40), bool)
    truth[2:4, 5:35] = True
    truth[20:25, 20:25] = True
    (p, positive) = next_click(np.zeros_like(truth), truth)
    assert positive and 2 <= p[0] < 4 and 5 <= p[1] < 35, p


def test_uncertain_region_centre_uses_no_truth():
    var = np.zeros((30, 30))
    var[2:6, 2:6] = 0.2
    var[10:22, 12:20] = 0.24
    var[25:27, 25:27] = 0.08  # below half the maximum
    p = uncertain_region_centre(np.full((30, 30), 0.5), var)
    assert 13 <= p[0] <= 18 and 15 <= p[1] <= 16
    assert uncertain_region_centre(np.zeros((5, 5)), np.zeros((5, 5))) is None


def test_random_clicks_fall_inside_and_outside_the_mask():
    truth = np.zeros((32, 32), bool)
    truth[8:20, 8:20] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = random_clicks(truth, rng, 3)
        assert c and all(truth[tuple(map(int, p))] for p in c.fg) and not any(truth[tuple(map(int, p))] for p in c.bg)


def test_random_clicks_give_a_patch_without_a_boundary_its_click_too():
    """A patch all background (common under positive/negative cropping) or all foreground gets at least one click,
    of the only kind it can have, away from the patch's border (it got none in 3 of 16 draws: more click-less
    patches than ``clicks.no_click_prob`` asks for)."""
    rng = np.random.default_rng(0)
    for full in (False, True):
        truth = np.full((9, 9), full)
        got = [random_clicks(truth, rng, 3) for _ in range(64)]
        assert all(c for c in got)
        assert all(not (c.bg if full else c.fg) for c in got)
        pts = np.array([p for c in got for p in (c.fg or c.bg)], float)
        assert np.abs(pts.mean(0) - 4).max() < 0.5, pts.mean(0)  # centred in the patch (not one corner)


def test_the_window_cache_keeps_copies_not_views_of_a_batch():
    """What the cache counts is what it holds: an entry cut from a batch (``mean[j]``) would keep the whole
    batch's tensor alive, up to ``sw_batch_size`` times the cap."""
    cache = WindowCache()
    mean, var = torch.rand(8, 1, 32, 32), torch.rand(8, 1, 32, 32)
    cache.put("k", (mean[3], var[3]))
    got = cache.get("k")
    assert torch.equal(got[0], mean[3]) and torch.equal(got[1], var[3])
    for v in got:
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
        assert v.untyped_storage().data_ptr() not in (mean.untyped_storage().data_ptr(),
                                                      var.untyped_storage().data_ptr())
    # the cap holds for every entry: one larger than it (or a cap of 0) is not kept (one entry was, whatever its size)
    for cap in (0, 10):
        small = WindowCache(max_bytes=cap)
        small.put("k", (mean[3], var[3]))
        assert len(small) == 0 and small.get("k") is None
    two = WindowCache(max_bytes=2 * 2 * 32 * 32 * 4)  # room for two entries of (mean, var) 32 x 32 float32
    for k in "abc":
        two.put(k, (mean[0], var[0]))
    assert len(two) == 2 and two.get("a") is None and two.get("c") is not None


# -- through the one predictor ------------------------------------------------------------------------------------
@pytest.fixture
def click_system(make_system):
    """A click-trained tiny model whose guidance channels matter (random stem weights on them are not zero)."""
    system = make_system(arch="cached")
    from lib.training import build_system

    hp = system.hparams
    hp.clicks.enabled = True
    hp.clicks.sigma = 2.0  # the window arithmetic below (reach 3 sigma = 6 voxels); not the default (3)
    torch.manual_seed(0)
    system = build_system(hp)
    with torch.no_grad():
        for h in system.model.vlm_film_heads.values():
            h.weight.normal_(0, 0.3)
        system.model.stem.conv.weight[:, 1:] *= 20.0  # make clicks change the output clearly
    return system


def _image(tmp_path, shape=(70, 60)):
    from PIL import Image

    rng = np.random.default_rng(0)
    a = (rng.random(shape) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "img.png")
    return {"image": str(tmp_path / "img.png"), "case_id": "img"}


def test_every_clicked_voxel_is_labelled_as_clicked(tmp_path, click_system):
    item = _image(tmp_path)
    inf = make_inferer(click_system, steps=2)
    auto = predict_item(click_system, item, inf)["prob"][0] > 0.5
    fg_cand = np.argwhere(~auto.numpy())
    bg_cand = np.argwhere(auto.numpy())
    assert len(fg_cand) and len(bg_cand)
    clicks = Clicks()
    for p in fg_cand[:: max(1, len(fg_cand) // 5)][:5]:
        clicks.add(p, True)
    for p in bg_cand[:: max(1, len(bg_cand) // 5)][:5]:
        clicks.add(p, False)
    d = preprocess_item(click_system, item)
    from lib.evaluation import predict_preprocessed

    lab = predict_preprocessed(click_system, d, inf, clicks=clicks)["prob"][0] > 0.5
    assert all(bool(lab[tuple(int(v) for v in p)]) for p in clicks.fg)
    assert not any(bool(lab[tuple(int(v) for v in p)]) for p in clicks.bg)


def _spy_holds(system, monkeypatch) -> list:
    """Record the ``hold`` every predict_windows call of ``system`` gets (and still run it)."""
    seen = []
    real = system.predict_windows

    def spy(*a, **kw):
        seen.append(kw.get("hold"))
        return real(*a, **kw)

    monkeypatch.setattr(system, "predict_windows", spy)
    return seen


def test_the_inferer_holds_what_a_click_grows_to_in_the_image_it_segments(click_system, monkeypatch):
    """One 32x32 window (the training patch) = the whole image: the hold that reaches the sampler is the grown region
    of the click in this image (its bright block), from the request's or the checkpoint's grow settings."""
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 4:14, 6:20] = 2.0
    x[0, 0, 14:18, 6:20] = 2.8  # joins the block within a tolerance of 1.0, not of 0.5 (the checkpoint's)
    seen = _spy_holds(click_system, monkeypatch)
    inf = make_inferer(click_system, steps=2)
    c = Clicks().add((8, 10), True)
    inf(x, click_system, clicks=c)
    assert seen[-1] is None  # the checkpoint grows nothing (grow_radius -1) and holds nothing
    inf(x, click_system, clicks=c, grow_radius=30, grow_tolerance=1.0)
    h = seen[-1]
    assert h is not None and h.shape == (1, 2, 32, 32)
    want = torch.zeros(32, 32)
    want[4:18, 6:20] = 1
    assert torch.equal(h[0, 0], want) and torch.equal(h[0, 1], want)
    click_system.hparams.clicks.grow_radius = 30  # the checkpoint's settings when the request says nothing
    try:
        inf(x, click_system, clicks=c)
        want[14:18] = 0  # the checkpoint's tolerance (0.5) leaves the brighter part out
        assert torch.equal(seen[-1][0, 0], want)
    finally:
        click_system.hparams.clicks.grow_radius = -1


def test_the_inferer_scales_each_fill_by_the_automatic_result(click_system, monkeypatch):
    """grow_scale: the hold that reaches the sampler is hold_maps against the automatic result of the same image
    (this inferer without clicks), which a cached session serves without re-running a window."""
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 4:10, 2:30] = 2.0  # a bright band
    inf = make_inferer(click_system, steps=2)
    auto = inf(x, click_system, grow_radius=12, grow_tolerance=0.5)[0, 0] > 0.5
    c = Clicks().add((7, 16), True)
    seen = _spy_holds(click_system, monkeypatch)
    cache = WindowCache()
    inf(x, click_system, cache=cache, grow_radius=12, grow_tolerance=0.5)  # the session's automatic result
    inf(x, click_system, clicks=c, cache=cache, grow_radius=12, grow_tolerance=0.5, grow_scale=1.0)
    kw = dict(image=x[0], grow_radius=12, grow_tolerance=0.5)
    want = hold_maps(c, (32, 32), -1, grow_scale=1.0, reference=auto, **kw)
    assert auto.any() and not auto[7, 16]
    assert not torch.equal(want, hold_maps(c, (32, 32), -1, **kw))  # the reference matters here
    assert torch.equal(seen[-1][0], want)
    assert len(seen) == 2  # the automatic pass came from the cache; only the click's window ran
    assert inf.last_windows == {"windows": 1, "rerun": 1}


def test_a_new_click_reruns_only_the_windows_it_reaches_and_the_result_is_exact(click_system):
    inf = make_inferer(click_system, steps=2, num_samples=2)
    x = torch.rand(1, 1, 80, 70)
    cache = WindowCache()
    ref0 = inf(x, click_system)
    p0 = inf(x, click_system, cache=cache)
    assert inf.last_windows["rerun"] == inf.last_windows["windows"] == 9
    assert torch.allclose(p0, ref0, atol=1e-6)
    c = Clicks().add((6, 6), True)  # the corner: one window of 9
    p1 = inf(x, click_system, clicks=c, cache=cache)
    assert inf.last_windows == {"windows": 9, "rerun": 1}
    ref1 = inf(x, click_system, clicks=c)
    assert torch.allclose(p1, ref1, atol=1e-5)
    assert (ref1 - ref0).abs().max() > 1e-2  # the click changed the result
    c.add((40, 35), False)  # the centre: reached by every window that covers it
    p2 = inf(x, click_system, clicks=c, cache=cache)
    assert inf.last_windows["rerun"] == 3  # x 34..46 lies in the windows starting at 24 only; y 29..41 in 0, 24, 38
    ref2 = inf(x, click_system, clicks=c)
    assert torch.allclose(p2, ref2, atol=1e-5)
    p2b = inf(x, click_system, clicks=c, cache=cache)  # the same request again: nothing re-runs
    assert inf.last_windows["rerun"] == 0 and torch.equal(p2, p2b)
    other = make_inferer(click_system, steps=3, num_samples=2)  # other sampler settings: nothing is reused
    p3 = other(x, click_system, clicks=c, cache=cache)
    assert other.last_windows["rerun"] == 9
    assert torch.allclose(p3, other(x, click_system, clicks=c), atol=1e-5)


def test_a_first_click_on_a_model_without_click_channels_reruns_only_the_windows_its_hold_reaches(make_system):
    """Seen in a review of 2026-12-06: a model trained without clicks gets hold channels only when a request has
    clicks, so every window's bytes changed and a first click (``hold_radius`` >= 0) re-ran all 9 windows after an
    automatic result. A window the hold does not reach is the same window: it is now a cache hit, and the result
    is that of a run without the cache."""
    system = make_system(spatial_dims=2)
    assert not system.takes_clicks
    inf = make_inferer(system, steps=2, num_samples=2)
    x = torch.rand(1, 1, 80, 70)
    cache = WindowCache()
    p0 = inf(x, system, cache=cache)
    assert inf.last_windows == {"windows": 9, "rerun": 9}
    c = Clicks().add((6, 6), True)  # the corner: one window of 9
    p1 = inf(x, system, clicks=c, hold_radius=1, cache=cache)
    assert inf.last_windows == {"windows": 9, "rerun": 1}
    ref1 = inf(x, system, clicks=c, hold_radius=1)
    assert torch.allclose(p1, ref1, atol=1e-5)  # (up to the reduction order of another batch composition)
    assert (p1 - p0).abs().max() > 1e-3  # the hold changed the corner's window
    assert torch.equal(p1[..., 40:, 40:], p0[..., 40:, 40:])  # beyond it: the automatic windows, from the cache


def test_a_checkpoint_is_served_with_the_click_sigma_it_was_trained_with(tmp_path, click_system):
    """The shipped sample models were trained with sigma 2, the default is now 3: a loaded checkpoint's guidance
    maps use its recorded sigma (a model fed clicks of another width than it learned answers differently)."""
    from lib.checkpoint import load_system, save_checkpoint
    from lib.config import ClickConfig

    assert ClickConfig().sigma != click_system.hparams.clicks.sigma == 2.0
    save_checkpoint(tmp_path / "m.pt", click_system.model, click_system.hparams)
    loaded = load_system(tmp_path / "m.pt")
    assert loaded.hparams.clicks.sigma == 2.0
    x = torch.rand(1, 1, 40, 40)
    c = Clicks().add((20, 20), True)
    inf = make_inferer(loaded, steps=2, num_samples=2)
    served = inf(x, loaded, clicks=c)
    assert torch.allclose(served, inf(x, loaded, clicks=c, click_sigma=2.0), atol=1e-6)
    assert (served - inf(x, loaded, clicks=c, click_sigma=ClickConfig().sigma)).abs().max() > 1e-2


def test_training_corrective_predictions_hold_the_fill_the_app_would(click_system, monkeypatch):
    """One path: with clicks.grow_radius set, the corrective rounds of training predict with the same hold as the
    inferer builds (lib.clicks.hold_maps on each patch, the checkpoint's grow settings); a bad channel is named."""
    from lib.config import ConfigError
    from lib.training import simulated_clicks

    cc = click_system.hparams.clicks
    cc.no_click_prob, cc.corrective_prob, cc.grow_radius, cc.grow_channels = 0.0, 1.0, 20, [0]
    seen = _spy_holds(click_system, monkeypatch)
    img = torch.zeros(2, 1, 32, 32)
    img[:, :, 8:24, 8:24] = 2.0
    lab = (img > 1).float()
    try:
        clicks = simulated_clicks(click_system, img, lab, ["a bright blob"] * 2, np.random.default_rng(1))
        assert seen and all(h is not None for h in seen) and any(c.fg for c in clicks)
        # a positive click in the block fills the block (16 x 16 voxels; a random negative click beside it releases
        # the few grown voxels nearer to it); with clicks.grow_radius off only the clicked voxels would be held (or
        # no hold at all)
        assert max(float(h[j, 0].sum()) for h in seen for j in range(h.shape[0])) >= 0.9 * 256
        cc.grow_channels = [3]
        with pytest.raises(ConfigError, match=r"grow_channels \[3\] names a channel the 1-channel image"):
            simulated_clicks(click_system, img, lab, ["a bright blob"] * 2, np.random.default_rng(1))
        # clicks.grow_scale: as in the app, each fill is measured against the patch's automatic result (a
        # prediction without clicks) -- the reference every round's hold_maps gets
        import lib.training as training

        cc.grow_channels, cc.grow_scale = [0], 2.0
        refs, outs = [], []
        real_hold, real = training.hold_maps, click_system.predict_windows  # (the hold spy above)

        def hold_spy(*a, **kw):
            refs.append(kw.get("reference"))
            return real_hold(*a, **kw)

        def out_spy(*a, **kw):
            r = real(*a, **kw)
            outs.append((kw.get("guidance"), r[0]))
            return r

        monkeypatch.setattr(training, "hold_maps", hold_spy)
        monkeypatch.setattr(click_system, "predict_windows", out_spy)
        simulated_clicks(click_system, img, lab, ["a bright blob"] * 2, np.random.default_rng(1))
        assert len(outs) >= 2 and float(outs[0][0].abs().sum()) == 0  # first: no clicks
        auto = outs[0][1][:, 0].numpy() > 0.5
        assert refs and all(r is not None for r in refs)
        assert all(np.array_equal(r, auto[j % len(auto)]) for j, r in enumerate(refs))
    finally:
        cc.grow_radius, cc.grow_channels, cc.grow_scale = -1, None, 0.0


def test_training_with_simulated_clicks_uses_the_guidance(click_system):
    """train_loss draws clicks (random and corrective) and feeds them: the loss changes with the clicks drawn."""
    from lib.training import simulated_clicks, train_loss

    hp = click_system.hparams
    hp.clicks.no_click_prob, hp.clicks.corrective_prob = 0.0, 1.0
    img = torch.rand(4, 1, 32, 32)
    lab = torch.zeros(4, 1, 32, 32)
    lab[:, :, 8:24, 8:24] = 1
    clicks = simulated_clicks(click_system, img, lab, ["a bright blob"] * 4, np.random.default_rng(0))
    assert all(len(c) >= 1 for c in clicks)
    for c in clicks:
        assert all(lab[0, 0][tuple(int(v) for v in p)] == 1 for p in c.fg)
        assert all(lab[0, 0][tuple(int(v) for v in p)] == 0 for p in c.bg)
    batch = {"image": img, "label": lab, "items": [{}] * 4}
    torch.manual_seed(1)
    a = float(train_loss(click_system, batch, "cpu", generator=torch.Generator().manual_seed(0),
                         rng=np.random.default_rng(0)))
    hp.clicks.no_click_prob = 1.0
    b = float(train_loss(click_system, batch, "cpu", generator=torch.Generator().manual_seed(0),
                         rng=np.random.default_rng(0)))
    assert abs(a - b) > 1e-4


# -- the interactive MONAI Label task ------------------------------------------------------------------------------
@pytest.fixture
def interactive_task(tmp_path, make_system):
    from conftest import serve_in_app

    hp = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0]).hparams
    hp.preprocessing.orientation = "RAS"
    hp.clicks.enabled = True
    hp.labels = {"lesion": 1}  # the task serves the checkpoint's labels
    return serve_in_app(tmp_path, hp)[0]


def test_interactive_task_labels_clicked_voxels_in_both_formats_and_shares_the_model(tmp_path, interactive_task):
    from lib.phantoms import write_phantom_case

    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(40, 36, 20), spacing=(1.2, 1.0, 2.5))
    auto, task = interactive_task.infer(), interactive_task.interactive_infer()
    assert task.type == "deepedit" and auto.type == "segmentation" and task.dimension == 3
    # DeepEdit: negative clicks on "background" (255: OHIF); "uncertain" with the value of that segment (OHIF draws it)
    assert task.labels == {"lesion": 1, "uncertain": 2, "background": 255}
    assert auto.labels == {"lesion": 1, "uncertain": 2}
    assert task.system("cpu") is auto.system("cpu")  # one checkpoint, one model copy
    _, a = auto({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu"})
    lab = np.asarray(a["pred"])
    fg = [list(map(int, p)) for p in np.argwhere(lab == 0)[::997][:4]]
    bg = [list(map(int, p)) for p in np.argwhere(lab == 1)[::97][:3]]
    assert fg
    # clicks sent to the automatic model were ignored without a word (a review): refused, naming the interactive
    # model; empty point lists (a client's defaults) are no clicks
    from lib.clicks import ClickError

    for clicked in ({"foreground": fg}, {"lesion": fg, "background": []}, {"background": bg}):
        with pytest.raises(ClickError, match=r"takes no clicks .*_interactive"):
            auto({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", **clicked})
    _, a2 = auto({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", "foreground": [],
                  "background": []})
    assert np.array_equal(np.asarray(a2["pred"]), lab)
    # OHIF v2 / DeepGrow: foreground + background; Slicer's DeepEdit mode: every label name, rounded IJK, plus the
    # model's config and result_extension; OHIF v3: every label name, unrounded IJK
    for req in ({"foreground": fg, "background": bg},
                {"lesion": fg, "background": bg, "label": "lesion", "result_extension": ".nrrd", "sampler": "euler"},
                {"lesion": [[v + 0.3 for v in p] for p in fg], "background": bg}):
        _, d = task({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", **req})
        out = np.asarray(d["pred"])
        assert out.shape == lab.shape
        assert all(out[tuple(p)] == 1 for p in fg) and all(out[tuple(p)] == 0 for p in bg)
        res = d["result"]
        assert res["clicks"] == {"foreground": len(fg), "background": len(bg)} and res["guidance"] is True
    with pytest.raises(ClickError, match=r"lesion\[0\] = \[99, 0, 0\] is outside the image"):
        task({"image": entry["image"], "skip_writer": True, "device": "cpu", "lesion": [[99, 0, 0]]})
    # points under a key that is no label of the model did nothing, without a word, where the task was called
    # in-process (only the server refused them)
    for stray, needle in (({"kidney": fg[:1]}, r"points under \['kidney'\]"),
                          ({"Lesion": fg[:1]}, r"case-sensitive: \{'Lesion': 'lesion'\}")):
        with pytest.raises(ClickError, match=needle):
            task({"image": entry["image"], "skip_writer": True, "device": "cpu", "steps": 1, **stray})
    # the app's own keys come from the app, never from a client's params (a review: "_clicked" painted value 77 at
    # any voxel of an automatic result, "_clicks" and "_uncertain" were 500s)
    from lib.config import ConfigError

    for t, key, value in ((auto, "_dfm_clicked", [[tuple(fg[0]), 77, [1]]]), (task, "_dfm_clicks", {"lesion": fg}),
                          (auto, "_dfm_uncertain", "x")):
        with pytest.raises(ConfigError, match=rf"\['{key}'\] are set by this app"):
            t({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", key: value})
    # a flood-fill click (request grow_radius / grow_tolerance): it reaches the predictor, is reported, and bad
    # values name the parameter
    import lib.infers.dfm_vlm as infer_module

    seen = []
    real = infer_module.predict_preprocessed

    def spy(*a, **kw):
        seen.append((kw.get("hold_radius"), kw.get("grow_radius"), kw.get("grow_tolerance"), kw.get("grow_scale")))
        return real(*a, **kw)

    # Slicer shows the task's config as its options and sends every entry with each request, as strings: the
    # first entry of each hold option ("checkpoint") leaves the checkpoint's setting
    opts = {k: v for k, v in task.config().items() if k in ("hold_radius", "grow_radius", "grow_tolerance", "grow_scale")}
    assert len(opts) == 4 and all(v[0] == "checkpoint" for v in opts.values())
    assert not any(k in auto.config() for k in opts)  # the automatic model has no clicks to hold
    infer_module.predict_preprocessed = spy
    try:
        _, d = task({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", "foreground": fg[:1],
                     "grow_radius": "6", "grow_tolerance": 0.5, "grow_scale": "2"})
        _, d0 = task({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", "foreground": fg[:1],
                      **{k: v[0] for k, v in opts.items()}})
    finally:
        infer_module.predict_preprocessed = real
    assert seen == [(None, 6, 0.5, 2.0), (None, None, None, None)]
    assert d["result"]["grow_radius"] == 6 and d["result"]["grow_tolerance"] == 0.5 and d["result"]["grow_scale"] == 2
    cc = task.system("cpu").hparams.clicks
    assert (d0["result"]["grow_radius"], d0["result"]["grow_scale"]) == (cc.grow_radius, cc.grow_scale)
    assert np.asarray(d["pred"])[tuple(fg[0])] == 1
    from lib.config import ConfigError

    for bad, needle in (({"grow_radius": -2}, "'grow_radius' must be >= -1"),
                        ({"grow_radius": "x"}, "'grow_radius' must be an integer"),
                        ({"grow_tolerance": -1}, "'grow_tolerance' must be a finite number >= 0"),
                        ({"grow_tolerance": "nan"}, "'grow_tolerance' must be a finite number >= 0"),
                        ({"grow_scale": "-1"}, "'grow_scale' must be a finite number >= 0"),
                        ({"grow_scale": "two"}, "'grow_scale' must be a number"),
                        ({"hold_radius": "-3"}, "'hold_radius' must be >= -1")):
        with pytest.raises(ConfigError, match=needle):
            task({"image": entry["image"], "skip_writer": True, "device": "cpu", "foreground": fg[:1], **bad})


def test_the_uncertain_segment_marks_where_the_samples_disagree(tmp_path, interactive_task):
    from lib.phantoms import write_phantom_case

    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(40, 36, 20), spacing=(1.2, 1.0, 2.5))
    task = interactive_task.interactive_infer()
    req = {"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", "num_samples": 4,
           "foreground": [[20, 18, 10]], "background": [[2, 2, 2]]}
    _, plain = task(dict(req))
    _, d = task({**req, "uncertain_segment": True})
    lab, base = np.asarray(d["pred"]), np.asarray(plain["pred"])
    unc = lab == 2
    assert unc.any() and set(np.unique(lab).tolist()) <= {0, 1, 2}
    assert d["result"]["label_names"] == {"lesion": 1, "uncertain": 2}
    assert np.array_equal(lab[~unc], base[~unc])  # elsewhere the same label
    assert lab[20, 18, 10] == 1 and lab[2, 2, 2] == 0  # never on a clicked voxel
    # click right into the uncertain region: those voxels come back as clicked, not as "uncertain"
    into = [list(map(int, q)) for q in np.argwhere(unc)[:: max(1, int(unc.sum()) // 8)][:8]]
    _, d2 = task({**req, "foreground": into, "uncertain_segment": True})
    lab2 = np.asarray(d2["pred"])
    assert (lab2 == 2).any() and all(lab2[tuple(q)] == 1 for q in into)
    from lib.config import ConfigError

    with pytest.raises(ConfigError, match="uncertain_segment' needs num_samples >= 2"):
        task({**req, "num_samples": 1, "uncertain_segment": True})
    # the request's booleans share one parser (lib.infers.dfm_vlm._as_bool): "false" is false, nonsense is named
    # (it was silently false)
    _, d3 = task({**req, "uncertain_segment": "false"})
    assert "uncertain_fraction" not in d3["result"]
    with pytest.raises(ConfigError, match="'uncertain_segment' must be true or false"):
        task({**req, "uncertain_segment": "sometimes"})


def test_the_uncertain_segment_never_takes_the_labels_value(tmp_path, interactive_task):
    """A review: a one-label model whose label value is 2 got its uncertain voxels as 2 too (label_names mapped two
    names to 2; Submit Label stored the uncertain region as the structure)."""
    from lib.checkpoint import load_checkpoint, save_checkpoint
    from lib.phantoms import write_phantom_case

    path = interactive_task.checkpoint
    ck = load_checkpoint(path)
    ck.hparams.labels = {"tumour": 2}
    from lib.training import build_system

    torch.manual_seed(0)
    save_checkpoint(path, build_system(ck.hparams).model, ck.hparams)
    interactive_task.init("dfm_vlm_3d", interactive_task.model_dir, dict(interactive_task.conf), None)
    task = interactive_task.interactive_infer()
    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(40, 36, 20), spacing=(1.2, 1.0, 2.5))
    _, d = task({"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu", "num_samples": 4,
                 "foreground": [[20, 18, 10]], "uncertain_segment": True})
    names = d["result"]["label_names"]
    assert names["tumour"] == 2 and names["uncertain"] == 3, names
    lab = np.asarray(d["pred"])
    assert (lab == 3).any() and lab[20, 18, 10] == 2


def test_a_republished_checkpoint_is_served_with_its_own_sampler_settings(tmp_path, interactive_task):
    """A review: the task's config (which MONAI Label merges into every request) was made once from the checkpoint
    served at start, so after a training published a checkpoint with other sampler settings every request still ran
    the old ones, while /info showed the new. A value the request names still wins."""
    import os

    from lib.checkpoint import load_checkpoint, save_checkpoint
    from lib.phantoms import write_phantom_case

    path = interactive_task.checkpoint
    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(24, 20, 12), spacing=(1.2, 1.0, 2.5))
    for task in (interactive_task.infer(), interactive_task.interactive_infer()):
        ck = load_checkpoint(path)
        ck.hparams.sampler.steps, ck.hparams.sampler.num_samples = 2, 1
        save_checkpoint(path, interactive_task.infer().system("cpu").model, ck.hparams)
        os.utime(path, (1e9, 1e9))
        _, d = task({"image": entry["image"], "skip_writer": True, "device": "cpu"})
        assert (d["result"]["steps"], d["result"]["num_samples"]) == (2, 1)
        ck.hparams.sampler.steps, ck.hparams.sampler.num_samples = 3, 2  # a training publishes
        save_checkpoint(path, interactive_task.infer().system("cpu").model, ck.hparams)
        os.utime(path, (2e9, 2e9))
        assert task.info()["config"]["steps"] == 3  # what Slicer shows as the task's options
        _, d = task({"image": entry["image"], "skip_writer": True, "device": "cpu"})
        assert (d["result"]["steps"], d["result"]["num_samples"]) == (3, 2)
        _, d = task({"image": entry["image"], "skip_writer": True, "device": "cpu", "steps": 1})
        assert d["result"]["steps"] == 1
        # the config is shared: another request (or /info) following a newer checkpoint after this request took its
        # model, before MONAI Label merged the config, gave this request the newer one's settings (a race with
        # infer concurrency); it runs its own model's
        newer = load_checkpoint(path).hparams
        newer.sampler.steps, newer.sampler.num_samples = 4, 3
        pin = task._pin

        def pin_then_another_follows(device, system):
            pin(device, system)
            if system is not None:
                task.follow_checkpoint(types.SimpleNamespace(hparams=newer))

        task._pin = pin_then_another_follows
        try:
            _, d = task({"image": entry["image"], "skip_writer": True, "device": "cpu"})
        finally:
            del task._pin
        assert (d["result"]["steps"], d["result"]["num_samples"]) == (3, 2)
        assert task.info()["config"]["steps"] == 3  # /info follows the served checkpoint again
