"""Clicks: interactive segmentation with the DFM sampler.

A click enters a model in two places:

* **guidance channels** (the DeepGrow/DeepEdit convention): two extra input channels of the U-Net, positive and
  negative clicks, each click a Gaussian bump of ``sigma`` network voxels (max over clicks, values in [0, 1]),
  *truncated* at ``truncate * sigma``: a window that the truncated bump does not reach gets exactly the input it
  gets without the click (this is what makes re-running only the windows a click touches exact, see
  :class:`lib.inferer.WindowCache`). Trained with simulated clicks (:func:`lib.training.simulated_clicks`): a share of patches
  without clicks (the automatic mode), random clicks inside/outside the mask, and corrective clicks at the centre
  of the largest error region of the model's own prediction (:func:`next_click`), as DeepEdit trains.
* **the state x_t** (optional, ``clicks.hold_radius >= 0``): the sampler holds the voxels within ``hold_radius`` of
  every click at the clicked value at every step (:func:`hold_maps`).

Whatever the model does, the returned label has every clicked voxel labelled as clicked
(:func:`lib.evaluation.predict_preprocessed` sets the probability of each clicked voxel of the original grid).

Coordinates. A request gives voxel indices of the image *as MONAI loads it* (``LoadImage``: NIfTI/NRRD/DICOM voxel
order i, j, k -- Slicer's IJK; PNG (x, y) = (column, row)), which is what MONAI Label's clients send. They are mapped
to the network grid through the checkpoint's own preprocessing (orientation, spacing) with the affines that MONAI
records: ``net = inverse(affine after preprocessing) @ affine as loaded @ index`` (:func:`map_points`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from .config import GROW_SIDES, ConfigError


class ClickError(ConfigError):
    """A click that cannot be used (wrong dimensionality, not a number, outside the image): a 422 naming it."""


@dataclass
class Clicks:
    """Positive (foreground) and negative (background) points of one image, in one grid's voxel coordinates."""

    fg: list[tuple[float, ...]] = field(default_factory=list)
    bg: list[tuple[float, ...]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fg or self.bg)

    def __len__(self) -> int:
        return len(self.fg) + len(self.bg)

    def add(self, point: Sequence[float], positive: bool) -> "Clicks":
        (self.fg if positive else self.bg).append(tuple(float(v) for v in point))
        return self

    def copy(self) -> "Clicks":
        return Clicks(list(self.fg), list(self.bg))

    def to_dict(self) -> dict:
        return {"foreground": [list(p) for p in self.fg], "background": [list(p) for p in self.bg]}


# -- requests -------------------------------------------------------------------------------------------------
# points per list of a request: far above what a user places on one image, far below what holds the server (a
# review: 20 000 points held a 2D request 12 s, 500 grown 3D points 29 s, and /infer blocks every other request)
MAX_POINTS = 1000


def _points(value, key: str, spatial_dims: int, shape: Sequence[int]) -> list[tuple[int, ...]]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ClickError(f"clicks {key!r} must be a list of points [[x, y{', z' if spatial_dims == 3 else ''}], ...]; "
                         f"got {str(value)[:200]}")
    if len(value) > MAX_POINTS:
        raise ClickError(f"clicks {key!r}: {len(value)} points, more than this server takes in one list "
                         f"({MAX_POINTS}); a click is a point the user placed")
    out = []
    for n, p in enumerate(value):
        where = f"click {key}[{n}] = {p!r}"
        if isinstance(p, (str, bytes)) or not isinstance(p, (list, tuple)):
            raise ClickError(f"{where} is not a point: give {spatial_dims} voxel indices")
        coords = list(p)
        # a 2D image opened in Slicer is a one-slice volume: its IJK points carry k = 0 (a client that sends unrounded
        # indices may give 1e-9 there: rounded, as i and j are)
        if spatial_dims == 2 and len(coords) == 3 and _is_number(coords[2]):
            if nearest_voxel(coords[2]) != 0:
                raise ClickError(f"{where}: a 2D image has one slice, so its third index must be 0 (or absent)")
            coords = coords[:2]
        if len(coords) != spatial_dims:
            raise ClickError(f"{where} has {len(coords)} coordinate(s); the image is {spatial_dims}D")
        if not all(_is_number(c) for c in coords):
            raise ClickError(f"{where} has a coordinate that is not a finite number")
        idx = tuple(nearest_voxel(c) for c in coords)
        if any(not 0 <= i < s for i, s in zip(idx, shape)):
            raise ClickError(f"{where} is outside the image (voxel indices must be within {tuple(shape)})")
        out.append(idx)
    return out


def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):  # a 400-digit integer (was a 500)
        return False


def _no_uncertain_points(request: dict) -> None:
    """3D Slicer's DeepEdit mode sends the points of every segment it lists, ``uncertain`` included (a segment of
    /info's labels): points placed there are no click of any structure, and were dropped without a word."""
    pts = request.get("uncertain")
    if isinstance(pts, (list, tuple)) and len(pts):
        raise ClickError(f"points under 'uncertain' ({list(pts)[:3]}): the uncertain segment only shows where the "
                         "samples disagree; place a click in a structure's segment or in 'background'")


def looks_like_points(value) -> bool:
    """A request value that is a list of click points (``[[x, y, z], ...]``: every entry 2 or 3 numbers)."""
    import numbers

    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) in (2, 3)
        and all(isinstance(c, numbers.Number) and not isinstance(c, bool) for c in p) for p in value)


def check_no_stray_points(request: dict, labels: Iterable[str], other_labels: Iterable[str] = ()) -> None:
    """Points under a key that is no label of this model (3D Slicer's DeepEdit mode sends the points of every /info
    label, another model's included; a name no model has, "kidney"; a label's name in another case, "Lung") did
    nothing, without a word: :class:`ClickError` naming them. ``other_labels``: the other models' label names (the
    server knows them), whose point lists count even where they are malformed."""
    mine = {labels} if isinstance(labels, str) else set(labels)
    clickable = sorted(mine - {"background", "uncertain"})  # (clicks under "uncertain" are refused elsewhere)
    stray = sorted(set(other_labels) - mine - {"background", "foreground"})
    stray = [n for n in stray if isinstance(request.get(n), (list, tuple)) and len(request.get(n))]
    stray += sorted(k for k, v in request.items() if isinstance(k, str) and k not in mine and k not in stray
                    and k not in ("foreground", "background") and looks_like_points(v))
    if stray:
        near = {n: c for n in stray for c in clickable if n.strip().lower() == c.lower()}
        raise ClickError(f"points under {stray}, which is not a label of this model; select one of its structures "
                         f"{clickable} or 'background'" + (f" (names are case-sensitive: {near})" if near else ""))


def parse_clicks(request: dict, label_names: Iterable[str], spatial_dims: int, shape: Sequence[int]) -> Clicks:
    """The clicks of a request, in the image's own voxel indices; raises :class:`ClickError` naming a bad point.

    Two formats (MONAI Label's): ``foreground`` / ``background`` lists (DeepGrow, SAM2), or DeepEdit's
    ``{"<label name>": [[x, y, z], ...], "background": [...]}`` -- points under the model's label name are
    positive. A voxel clicked both positive and negative is refused.
    """
    _no_uncertain_points(request)
    fg: list[tuple[int, ...]] = []
    fg += _points(request.get("foreground"), "foreground", spatial_dims, shape)
    for name in label_names:
        if name not in ("background", "foreground"):  # a label named "foreground": its list is read once, above
            fg += _points(request.get(name), name, spatial_dims, shape)
    bg = _points(request.get("background"), "background", spatial_dims, shape)
    both = sorted(set(fg) & set(bg))
    if both:
        raise ClickError(f"voxel(s) {both} clicked both as foreground and as background")
    return Clicks([tuple(map(float, p)) for p in fg], [tuple(map(float, p)) for p in bg])


def parse_label_clicks(request: dict, names: Sequence[str], spatial_dims: int, shape: Sequence[int],
                       target: str | None = None) -> dict[str, Clicks]:
    """A prompted model's clicks, per structure: points under a structure's name are positive for it, ``background``
    points negative for every structure; ``foreground`` points (DeepGrow format) belong to ``target`` (the request's
    ``label``, or the one structure asked for) and are refused when that is ambiguous."""
    _no_uncertain_points(request)
    bg = _points(request.get("background"), "background", spatial_dims, shape)
    fg_any = _points(request.get("foreground"), "foreground", spatial_dims, shape)
    if fg_any and target is None:
        raise ClickError(f"'foreground' clicks need the structure they belong to: give 'label' (one of {list(names)}) "
                         "or put the points under the structure's name")
    if target is not None and target not in names:
        raise ClickError(f"label {target!r} is not a structure of this model ({list(names)})")
    out = {}
    for name in names:
        fg = _points(request.get(name), name, spatial_dims, shape) + (fg_any if name == target else [])
        both = sorted(set(fg) & set(bg))
        if both:
            raise ClickError(f"voxel(s) {both} clicked both as {name} and as background")
        out[name] = Clicks([tuple(map(float, p)) for p in fg], [tuple(map(float, p)) for p in bg])
    return out


def nearest_voxel(c) -> int:
    """The voxel a continuous index lies in (voxel ``i`` spans ``[i - 0.5, i + 0.5)``). Python's ``round`` rounds
    halves to even: 10.5 -> 10 but 11.5 -> 12, so on a grid of half the image's spacing the image voxels 1, 3, 5
    (network 0.5, 1.5, 2.5) took network voxels 0, 2, 2 instead of 1, 2, 3."""
    return int(math.floor(float(c) + 0.5))


def map_points(clicks: Clicks, src_affine, dst_affine) -> Clicks:
    """Voxel coordinates of grid ``src`` -> (float) voxel coordinates of grid ``dst`` through world space."""
    src = np.asarray(src_affine, dtype=np.float64)
    dst_inv = np.linalg.inv(np.asarray(dst_affine, dtype=np.float64))
    m = dst_inv @ src
    n = src.shape[0] - 1  # MONAI keeps a 4x4 affine for 2D images too: missing axes are index 0

    def one(p):
        v = m @ np.array(list(p) + [0.0] * (n - len(p)) + [1.0])
        return tuple(float(c) for c in v[:len(p)])

    return Clicks([one(p) for p in clicks.fg], [one(p) for p in clicks.bg])


def to_network_grid(clicks: Clicks, image) -> Clicks:
    """Clicks in the original image's voxel indices -> the preprocessed image's grid (``image``: the MetaTensor
    that the checkpoint's preprocessing returned; it carries ``loaded_affine`` (:class:`lib.transforms.RecordGridd`)
    and its own ``affine``)."""
    meta = getattr(image, "meta", None) or {}
    if not clicks:
        return clicks.copy()
    if "loaded_affine" not in meta:
        raise ClickError("the preprocessed image does not say which grid it was loaded on (no loaded_affine): "
                         "clicks cannot be placed")
    return map_points(clicks, torch.as_tensor(meta["loaded_affine"]).numpy(), torch.as_tensor(image.affine).numpy())


# -- maps -------------------------------------------------------------------------------------------------------
def guidance_maps(clicks: Clicks, shape: Sequence[int], sigma: float, truncate: float = 3.0,
                  device=None) -> torch.Tensor:
    """``(2, *shape)``: positive and negative guidance, a Gaussian bump of ``sigma`` voxels per click (max over
    clicks), exactly 0 beyond ``truncate * sigma``."""
    out = torch.zeros((2, *shape), dtype=torch.float32, device=device)
    if not clicks:
        return out
    r2max = (truncate * sigma) ** 2
    for ch, pts in enumerate((clicks.fg, clicks.bg)):
        for p in pts:
            # only the box the bump reaches (it is 0 beyond truncate * sigma): the same values as over the whole grid,
            # at a cost that does not grow with the image (a 3D request re-sends every click)
            box, d2 = _box_d2(p, shape, truncate * sigma, device)
            if box is None:
                continue
            bump = torch.exp(-d2 / (2.0 * sigma * sigma))
            bump = torch.where(d2 <= r2max, bump, torch.zeros_like(bump))
            out[(ch,) + box] = torch.maximum(out[(ch,) + box], bump)
    return out


def _box_d2(p: Sequence[float], shape: Sequence[int], reach: float, device=None):
    """The box of the grid within ``reach`` of point ``p`` (per axis) and the squared distances to ``p`` in it,
    computed as :func:`_grid` would (float32, summed over the axes in order); ``(None, None)`` when the box is empty."""
    lo = [max(0, math.floor(float(c) - reach)) for c in p]
    hi = [min(int(s), math.ceil(float(c) + reach) + 1) for c, s in zip(p, shape)]
    if any(b <= a for a, b in zip(lo, hi)):
        return None, None
    axes = [torch.arange(a, b, dtype=torch.float32, device=device) for a, b in zip(lo, hi)]
    grid = torch.meshgrid(*axes, indexing="ij")
    d2 = sum((g - float(c)) ** 2 for g, c in zip(grid, p))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), d2


def grown_region(image: np.ndarray, point: Sequence[float], radius: int, tolerance: float,
                 side: str = "both", max_share: float = 0.5) -> np.ndarray:
    """The voxels a click *grows* to (the hold's image-adaptive neighbourhood, ``clicks.grow_radius``): within
    ``radius`` of the click's voxel, face-connected to the click through voxels whose every channel of ``image
    (C, *shape)`` is, against the click's own intensity ``s`` (the mean over the click's voxel and its face
    neighbours), within ``tolerance`` (``side="both"``: ``|I - s| <= tol``), at least as bright (``"above"``:
    ``I >= s - tol``, a hyperintense lesion: "this and brighter") or at least as dark (``"below"``: ``I <= s +
    tol``) -- Slicer's threshold flood fill, bounded by a ball.

    A fill that takes more than ``max_share`` of its ball is not following a structure but leaking into the
    tissue around it (on BraTS a click on a dark necrotic part, "this and brighter", took most of the brain): the
    ball shrinks (3/4, 1/2, 1/4 of ``radius``) until the fill stays within the share; if none does, the click
    grows to nothing but its own voxel. The click's voxel is always in it."""
    if side not in GROW_SIDES:
        raise ConfigError(f"grow side must be one of {GROW_SIDES}, got {side!r}")
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float32)
    shape = image.shape[1:]
    q = tuple(min(max(nearest_voxel(c), 0), s - 1) for c, s in zip(point, shape))
    lo = [max(0, c - radius) for c in q]
    hi = [min(s, c + radius + 1) for c, s in zip(q, shape)]
    box = image[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))]
    qb = tuple(c - a for c, a in zip(q, lo))
    g = np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, q)], indexing="ij")
    d2 = sum(x.astype(np.float32) ** 2 for x in g)
    near = sum(np.abs(x) for x in g) <= 1  # the click's voxel and its face neighbours
    seed = box[:, near].mean(axis=1)
    diff = box - seed.reshape((-1,) + (1,) * len(shape))
    ok = np.abs(diff) <= tolerance if side == "both" else diff >= -tolerance if side == "above" else diff <= tolerance
    ok = np.all(ok, axis=0)
    region = np.zeros(box.shape[1:], dtype=bool)
    region[qb] = True
    for r in sorted({radius, 3 * radius // 4, radius // 2, radius // 4} - {0}, reverse=True):
        ball = d2 <= r * r + 1e-6
        similar = ball & ok
        similar[qb] = True
        lab, _ = ndimage.label(similar)  # face connectivity: a one-voxel bridge at a corner does not leak
        fill = lab == lab[qb]
        if fill.sum() <= max_share * ball.sum():
            region = fill
            break
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = region
    return out


def scaled_grow_radius(reference: np.ndarray | None, point: Sequence[int], radius: int, scale: float) -> int:
    """The ball radius of a positive click's fill with ``clicks.grow_scale`` > 0: ``min(radius, ceil(scale * d))``,
    ``d`` the distance (network voxels) from the click's voxel to the nearest voxel of ``reference`` (the current
    segmentation); ``radius`` where ``reference`` is None or empty, or ``scale`` is 0. A click far from the
    segmentation marks a missed part (a fill up to ``radius``), one a few voxels from it a missed rim (a small
    fill); a click inside the segmentation or touching it (one of its 26 neighbours, d < 2) corrects its boundary
    and grows to nothing but its voxel (on BraTS such a fill added more false tumour than it found)."""
    if not scale or reference is None:
        return radius
    reference = np.asarray(reference, dtype=bool)
    # a segmentation voxel farther than h > radius / scale gives the full radius: look only within h of the click
    # (a voxel outside that box is farther than h, and a box voxel farther than h gives the full radius too; the
    # whole grid was searched per click)
    # (capped at the grid: a scale near 0 gave an infinite h, an OverflowError, a 500)
    h = math.ceil(min(max(reference.shape), radius / scale)) + 1
    q = [int(c) for c in point]
    lo = [max(0, c - h) for c in q]
    hi = [min(s, c + h + 1) for c, s in zip(q, reference.shape)]
    pts = np.argwhere(reference[tuple(slice(a, b) for a, b in zip(lo, hi))])
    if not len(pts):
        return radius
    d = float(np.sqrt(((pts + np.asarray(lo)[None] - np.asarray(q)[None]) ** 2).sum(1).min()))
    return 0 if d < 2.0 else int(math.ceil(min(radius, scale * d) - 1e-9))  # min first: scale * d may be inf


def hold_maps(clicks: Clicks, shape: Sequence[int], radius: int, device=None, image=None, grow_radius: int = -1,
              grow_tolerance: float = 0.0, grow_side: str = "both", grow_channels=None, grow_scale: float = 0.0,
              reference=None) -> torch.Tensor:
    """``(2, *shape)``: a mask of the voxels the sampler holds and the value they are held at (1 positive, 0
    negative; where two clicks reach, the nearer click wins): those within ``radius`` of a click (the nearest voxel
    for radius 0; -1: none), and with ``grow_radius >= 0`` and ``image (C, *shape)`` (the network-grid image; its
    channels ``grow_channels``, default all, are compared) the *positive* click's :func:`grown_region` as well
    (``grow_side``). A negative click does not grow: it holds its own voxel at 0 and releases the grown voxels
    nearer to it than to the positive click that grew them ("the fill went too far here").

    ``grow_scale`` > 0 with ``reference`` (a boolean map of the current segmentation on this grid): each positive
    click's ball is :func:`scaled_grow_radius` (clicks in their order, each measured against ``reference`` and the
    fills of the positive clicks before it)."""
    mask = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    value = torch.zeros_like(mask)
    best = torch.full_like(mask, float("inf"))
    grow = grow_radius >= 0 and image is not None
    if not clicks or (radius < 0 and not grow):
        return torch.stack([mask, value])
    if grow:
        img = torch.as_tensor(image).detach().float().cpu().numpy()
        if grow_channels is not None:
            if max(grow_channels) >= img.shape[0]:
                raise ConfigError(f"clicks.grow_channels {list(grow_channels)} names a channel the "
                                  f"{img.shape[0]}-channel image does not have")
            img = img[list(grow_channels)]
        if img.shape[1:] != tuple(shape):
            raise ValueError(f"hold_maps: image of shape {img.shape[1:]} for a grid of {tuple(shape)}")
    ref = None
    if grow and grow_scale and reference is not None:
        ref = np.asarray(torch.as_tensor(reference).detach().cpu().numpy(), dtype=bool)
        if ref.shape != tuple(shape):
            raise ValueError(f"hold_maps: reference of shape {ref.shape} for a grid of {tuple(shape)}")
    # everything one click changes lies within max(radius, grow_radius) of its voxel: its ball, its fill (inside a
    # ball of at most grow_radius), and the grown voxels a negative click releases (nearer to it than to the positive
    # click that grew them, which is at most grow_radius away) -- so each click works in that box of the grid
    bound = max(radius, grow_radius if grow else -1, 0)
    for v, pts in ((1.0, clicks.fg), (0.0, clicks.bg)):
        for p in pts:
            q = [min(max(nearest_voxel(c), 0), s - 1) for c, s in zip(p, shape)]  # the click's voxel
            box, d2 = _box_d2(q, shape, bound, device)
            bm, bv, bb = mask[box], value[box], best[box]
            reach = d2 <= radius * radius + 1e-6 if radius >= 0 else torch.zeros_like(bm, dtype=torch.bool)
            if grow and v > 0:
                r = scaled_grow_radius(ref, q, grow_radius, grow_scale)
                fill = grown_region(img, q, r, grow_tolerance, grow_side)
                if ref is not None:
                    ref = ref | fill
                reach = reach | torch.as_tensor(fill[box], device=device)
            elif grow:  # a negative click releases the grown voxels nearer to it than to their positive click
                release = (bm > 0) & (bv > 0) & (d2 < bb)
                bm = torch.where(release, torch.zeros_like(bm), bm)
                bb = torch.where(release, torch.full_like(bb, float("inf")), bb)
                reach = reach | (d2 < 0.5)  # and holds its own voxel
            near = reach & (d2 < bb)
            best[box] = torch.where(near, d2, bb)
            mask[box] = torch.where(near, torch.ones_like(bm), bm)
            value[box] = torch.where(near, torch.full_like(bv, v), bv)
    return torch.stack([mask, value])


# -- where to click: the robot user, and the trainer's corrective clicks ------------------------------------------
def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest face-connected component (MONAI's ``get_largest_connected_component_mask``) and its size. Two
    components of the same size: MONAI's keeps the one labelled last (its label order is array order), so the one
    whose first voxel comes later in array order -- every click figure was measured so (a review found it; 1 of 300
    random masks had such a tie)."""
    from monai.transforms.utils import get_largest_connected_component_mask

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask), 0
    region = np.asarray(get_largest_connected_component_mask(mask, connectivity=1), dtype=bool)
    return region, int(region.sum())


def region_centre(region: np.ndarray, spacing: Sequence[float] | None = None) -> tuple[int, ...]:
    """The voxel of ``region`` farthest from its boundary (maximum of the Euclidean distance transform)."""
    from scipy import ndimage

    padded = np.pad(region, 1)  # the image border counts as boundary
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)
    dist = dist[tuple(slice(1, -1) for _ in region.shape)]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), region.shape))


def largest_error_region(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The robot user's region: the largest connected component of the missed foreground or of the false
    foreground, whichever is larger, and whether it is missed foreground. None when the prediction is perfect."""
    pred = np.asarray(pred) > 0.5
    truth = np.asarray(truth) > 0.5
    fn, n_fn = _largest_component(truth & ~pred)
    fp, n_fp = _largest_component(pred & ~truth)
    if n_fn == 0 and n_fp == 0:
        return None
    positive = n_fn >= n_fp
    return (fn if positive else fp), positive


def next_click(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
               ) -> tuple[tuple[int, ...], bool] | None:
    """The robot user's click: the centre of :func:`largest_error_region`; positive where foreground was missed.
    None when the prediction is perfect."""
    found = largest_error_region(pred, truth)
    if found is None:
        return None
    region, positive = found
    return region_centre(region, spacing), positive


def uncertain_mask(var, threshold: float | None = None) -> np.ndarray:
    """Where the M samples disagree most: per-voxel variance of the samples' probabilities above ``threshold``
    (default half of the image's largest variance -- the samples' ``p_final`` are probabilities, so their variance
    has no fixed scale); all False where the samples agree everywhere (largest variance <= 1e-6). The app's
    "uncertain" segment and the uncertain robot both use it."""
    var = np.asarray(var, dtype=np.float64)
    top = float(var.max()) if var.size else 0.0
    if top <= 1e-6:
        return np.zeros(var.shape, dtype=bool)
    return var > (0.5 * top if threshold is None else threshold)


def uncertain_region_centre(mean: np.ndarray, var: np.ndarray, spacing: Sequence[float] | None = None,
                            threshold: float | None = None) -> tuple[int, ...] | None:
    """Where a tool would suggest the next click without the truth: the centre of the largest connected region of
    :func:`uncertain_mask`; None where the samples agree everywhere."""
    region, n = _largest_component(uncertain_mask(var, threshold))
    if n == 0:
        return None
    return region_centre(region, spacing)


# -- training: simulated clicks -----------------------------------------------------------------------------------
def random_clicks(truth: np.ndarray, rng: np.random.Generator, max_clicks: int) -> Clicks:
    """0..max_clicks positive clicks inside the mask and 0..max_clicks negative ones outside (at least one click in
    all), drawn with probability growing with the distance to the boundary (DeepGrow's interior preference)."""
    from scipy import ndimage

    c = Clicks()
    truth = np.asarray(truth) > 0.5
    n_pos, n_neg = rng.integers(0, max_clicks + 1, size=2)
    n_pos, n_neg = (n_pos if truth.any() else 0), (n_neg if not truth.all() else 0)  # no region, no click there
    if n_pos + n_neg == 0:  # at least one click: a patch all background (or all foreground) gets one too
        n_pos, n_neg = (1, 0) if truth.any() and (truth.all() or rng.random() < 0.5) else (0, 1)
    for region, n, positive in ((truth, n_pos, True), (~truth, n_neg, False)):
        if n == 0:
            continue
        if region.all():  # the whole patch (no boundary inside it): the distance to the patch's border
            w = ndimage.distance_transform_edt(np.pad(region, 1))[(slice(1, -1),) * region.ndim].ravel()
        else:
            w = ndimage.distance_transform_edt(region).ravel()
        w = w / w.sum()
        for i in rng.choice(w.size, size=int(n), p=w):
            c.add(np.unravel_index(int(i), region.shape), positive)
    return c
