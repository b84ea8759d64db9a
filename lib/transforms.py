"""Preprocessing, built from the checkpoint's own ``PreprocConfig`` (MONAI dictionary transforms).

The same :func:`preprocess` pipeline serves training, validation, ``predict``/``evaluate`` and the MONAI Label
infer task: load, channel first, checks, orientation, spacing, whole-image intensity normalisation (never per
window), binary label. Its spatial steps are invertible, so a prediction goes back to the image's original
geometry with MONAI's ``Invertd``.
"""

from __future__ import annotations

import logging
import os
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    GaussianSmooth,
    HistogramNormalized,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from .config import PreprocConfig

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """An input image or label is unreadable or does not fit the model; the message names the file and problem."""


class UnreadableInput(InputError):
    """A file that could not be read at all (no reader for it, a broken header, a permission, a disk gone): unlike a
    label that does not fit its image, a verdict that may change without the file changing."""


SOURCE_KEY = "dfm_source"  # meta: the DICOM series folder an image was converted from (LoadImageChecked)


def _name(d: Mapping, key: Hashable) -> str:
    v = d.get(key)
    meta = getattr(v, "meta", None) or {}
    fn = meta.get(SOURCE_KEY) or meta.get("filename_or_obj")
    if fn is not None:
        return str(fn)
    src = d.get(f"{key}_path") or d.get("case_id")
    return str(src) if src is not None else str(key)


MAX_VOXELS = int(os.environ.get("DFM_MAX_VOXELS", 2 ** 28))  # all channels together: 268 M (1 GiB as float32)


def check_file(path, label: bool = False) -> None:
    """What the file's header says, checked before its voxels are read: a NIfTI claiming more than
    :data:`MAX_VOXELS` voxels (``DFM_MAX_VOXELS``), a zero-sized dimension or a singular/non-finite affine; a PNG
    that is RGBA or palette-coded (an X-ray is grey: say so rather than segment colour indices; ``label=True``
    accepts palette PNGs, a common way to store label maps)."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))  # reads the header; the voxels stay on disk
        except Exception as e:  # noqa: BLE001
            raise UnreadableInput(f"cannot read {path}: not a readable NIfTI header ({type(e).__name__}: {e})") \
                from None
        shape = tuple(int(n) for n in img.header.get_data_shape())
        if not shape or min(shape) < 1:
            raise InputError(f"{path}: the header declares shape {shape}: an empty image")
        n = int(np.prod(shape, dtype=np.int64))
        if n > MAX_VOXELS:
            raise InputError(f"{path}: the header declares shape {shape} = {n:,} voxels, more than this server's "
                             f"limit of {MAX_VOXELS:,} (DFM_MAX_VOXELS); refused before reading it")
        aff = np.asarray(img.affine, dtype=float)
        if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise InputError(f"{path}: its affine (voxel-to-world matrix) is singular or not finite: "
                             f"{aff[:3, :3].round(4).tolist()}; the voxel spacing/orientation is unknown")
    elif name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        # read whole before (a gzip NRRD of zeros is a decompression bomb): ITK reads the header only here
        shape, comps = _itk_header(path)
        if shape is None:
            raise UnreadableInput(f"cannot read {path}: not a readable image header ({comps})")
        _check_declared(path, shape, comps)
    elif name.endswith(".png"):
        from PIL import Image

        try:
            with Image.open(str(path)) as im:
                mode, size = im.mode, im.size
        except Exception as e:  # noqa: BLE001
            raise UnreadableInput(f"cannot read {path}: not a readable PNG ({type(e).__name__}: {e})") from None
        if size[0] * size[1] > MAX_VOXELS:
            raise InputError(f"{path}: {size[0]}x{size[1]} pixels, more than this server's limit of {MAX_VOXELS:,} "
                             f"(DFM_MAX_VOXELS)")
        if mode in (("RGBA", "LA", "PA") if label else ("P", "PA", "RGBA", "LA")):
            raise InputError(f"{path}: a {'palette' if mode.startswith('P') else 'transparent (' + mode + ')'} PNG; "
                             f"save the image as greyscale (8 or 16 bit)")
    elif os.path.isfile(str(path)):
        # every other single file (TIFF, JPEG, BMP, a DICOM file...): the size its header declares, as ITK (or PIL)
        # reads it without the pixels. A 453 KB deflate TIFF of 17000 x 17000 pixels passed unchecked and took a
        # server past 7 GB (a review); a format neither reads is left to the loader, which names it
        shape, comps = _itk_header(path)
        if shape is None:
            from PIL import Image

            try:
                with Image.open(str(path)) as im:
                    shape, comps = tuple(im.size), len(im.getbands())
            except Image.DecompressionBombError as e:
                raise InputError(f"{path}: {e}; refused before reading it") from None
            except Exception:  # noqa: BLE001 - not an image PIL knows: the loader says what it is
                return
        _check_declared(path, shape, comps)


def _itk_header(path) -> tuple:
    """``(shape, components)`` as ITK reads a file's header (the pixels stay on disk), or ``(None, reason)``."""
    import itk

    try:
        io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            return None, "no ITK reader for it"
        io.SetFileName(str(path))
        io.ReadImageInformation()
        return (tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions())),
                int(io.GetNumberOfComponents()))
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def _check_declared(path, shape: tuple, comps: int) -> None:
    if not shape or min(shape) < 1:
        raise InputError(f"{path}: the header declares shape {shape}: an empty image")
    n = int(np.prod(shape, dtype=np.int64)) * max(int(comps), 1)
    if n > MAX_VOXELS:
        raise InputError(f"{path}: the header declares shape {shape} x {comps} component(s) = {n:,} voxels, more "
                         f"than this server's limit of {MAX_VOXELS:,} (DFM_MAX_VOXELS); refused before reading it")


class LoadImageChecked(MapTransform):
    """MONAI ``LoadImaged`` whose failures name the file: missing, unreadable or not an image."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImaged(keys, allow_missing_keys=allow_missing_keys, **kwargs)

    def __call__(self, data):
        import contextlib
        import tempfile

        d = dict(data)
        series = {}  # key -> the DICOM folder given (its converted file is a temporary one)
        with contextlib.ExitStack() as stack:
            tmp = None  # a folder for converted DICOM series, made only when a series is given
            for key in self.key_iterator(d):
                src = d[key]
                files = list(src) if isinstance(src, (list, tuple)) else [src]
                for n, f in enumerate(files):
                    if isinstance(f, (str, os.PathLike)) and not os.path.exists(f):
                        raise InputError(f"{key} file not found: {f}")
                    if isinstance(f, (str, os.PathLike)) and (os.path.isdir(f) or _xray_file(f)):
                        tmp = tmp or stack.enter_context(tempfile.TemporaryDirectory(prefix="dfm_series_"))
                        files[n] = self._series(f, os.path.join(tmp, f"{key}_{n}.nii.gz"))
                        series.setdefault(key, str(f))
                    elif isinstance(f, (str, os.PathLike)) and os.path.isfile(f):
                        check_file(f, label=key != "image")  # a palette PNG is a valid label (as the datastore says)
                d[key] = files if isinstance(src, (list, tuple)) else files[0]
            try:
                out = self.loader(d)
                for key, folder in series.items():  # errors name the series the user gave, not a deleted temp file
                    if hasattr(out.get(key), "meta"):
                        out[key].meta[SOURCE_KEY] = folder
                return out
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 - any reader failure becomes a clear error naming the file
                src = {k: data.get(k) for k in self.keys if k in data}
                raise UnreadableInput(f"cannot read {src}: {type(e).__name__}: {e}") from e

    @staticmethod
    def _series(folder, out: str) -> str:
        """A folder is a DICOM series: converted by the one checked path (:func:`lib.dicom.series_to_nifti`, as the
        DICOMweb datastore does), so an uneven, tilted or incomplete series is refused or corrected and named, never
        read as an evenly spaced volume. So is one X-ray file (``.dcm``): MONAI's reader took its stored values,
        neither windowed nor, for MONOCHROME1, inverted, as a (X, Y, 1) volume."""
        from .dicom import projection_to_nifti, series_to_nifti

        if os.path.isfile(folder):
            res = projection_to_nifti(folder, out, name=str(folder))
        else:
            res = series_to_nifti(folder, out, name=str(folder))  # the folder as given: many series are named "001"
        for c in res["corrections"] + res.get("left_out", []):
            logger.warning("DICOM series %s: %s", folder, c)
        check_file(out)
        return out


def _xray_file(path) -> bool:
    """A DICOM file (``.dcm``, or no image extension and the ``DICM`` mark: PACS exports name files ``IM0001``)
    holding one projection radiograph (:func:`lib.dicom.is_projection_series`)."""
    from .dicom import is_projection_series

    if not os.path.isfile(path):
        return False
    if not str(path).lower().endswith(".dcm"):
        try:
            with open(path, "rb") as f:
                if f.read(132)[128:] != b"DICM":  # (any other image file: 132 bytes read)
                    return False
        except OSError:
            return False
    return is_projection_series(path)


def nifti_like(array, src):
    """``array`` (the image's voxel grid; channels after the spatial axes) as a NIfTI with the image ``src``'s
    affine, qform/sform codes and units in a fresh header: only the geometry and units are the image's (its intent --
    e.g. "vector" for a 4D image, which ITK then reads the result as --, display range, description and scaling
    are not a result's). ITK (3D Slicer) places a NIfTI by its qform: a writer that puts the sform in both (MONAI's
    SaveImage) moved a result of a registered image -- sform and qform apart -- off it (a review)."""
    import nibabel as nib

    array = np.asarray(array)
    img = nib.Nifti1Image(array, src.affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    units = src.header.get_xyzt_units()
    img.header.set_xyzt_units(units[0], units[1])
    sform, scode = src.get_sform(coded=True)
    qform, qcode = src.get_qform(coded=True)
    if scode:
        img.set_sform(sform, code=int(scode))
    if qcode:
        img.set_qform(qform, code=int(qcode))
    return img


def as_image_nifti(array, src):
    """``array`` on the image's voxel grid (spatial axes first, channels after) as a NIfTI of the image ``src``'s
    header geometry (:func:`nifti_like`) and shape: a one-slice (X, Y, 1) image's (X, Y[, C]) result gets its slice
    axis back (3D Slicer sends a 2D image so; it came back (X, Y), a review). None when its spatial shape is not the
    image's. The app's results and ``predict``'s outputs are written by it."""
    array = np.asarray(array)
    shape = tuple(src.shape[:3])
    if len(shape) == 3 and shape[2] == 1 and array.shape[:2] == shape[:2] and (array.ndim == 2 or array.shape[2] != 1):
        array = array[:, :, None]  # (X, Y[, C]) -> (X, Y, 1[, C])
    if tuple(array.shape[:len(shape)]) != shape:
        return None
    return nifti_like(array, src)


def one_slice_as_2d(lab, spatial_dims: int):
    """A 2D image's label (or the image itself: :class:`CheckImaged`) saved as a one-slice volume ``(C, X, Y, 1)`` ->
    ``(C, X, Y)``; any other array as it is.
    3D Slicer opens a 2D image as a one-slice volume and its Submit Label saves the label so: the datastore accepts
    it as the image's label (:func:`lib.datastore.check_label_file`), so training and scoring read it as one (it
    stopped every training of the model: "image size (256, 256) differs from its label's (256, 256, 1)")."""
    if spatial_dims != 2 or lab.ndim != 4 or lab.shape[-1] != 1:
        return lab
    lab = lab[..., 0]
    if hasattr(lab, "spatial_ndim"):  # a MetaTensor keeps its header's 3 (its spacing: 3 values, Spacing refused)
        lab.spatial_ndim = 2
        lab.meta["spatial_shape"] = np.asarray(lab.shape[1:])
    return lab


def stored_layout_note(affine, name: str = "the image") -> str | None:
    """A 2D image's pixels are read in stored order, rows from the top and columns from the left, as a PNG and a
    DICOM X-ray define them (the 2D presets set no orientation: a projection image has no plane in space). Both
    readers' conventions call that order upright: ITK / 3D Slicer give a PNG the axis codes ``LP`` (LPS identity),
    MONAI and nibabel ``RA`` (the identity affine); so no one orientation can be imposed without turning the other's
    images round. A 2D affine that is neither -- one axis mirrored (``LA``, ``RP``: e.g. rows stored bottom-up with
    an affine to match) or the axes swapped -- displays differently from its stored order, and the model segments
    the stored order: a lung Dice of 0.96 fell to 0.75 with the rows reversed (a review, 2026-12-07). This returns
    the note that says so, or None for an upright layout (coronal ``LI`` / ``RS`` too), a sagittal one or no affine."""
    if affine is None:
        return None
    from nibabel.orientations import aff2axcodes, io_orientation

    a = np.asarray(affine.numpy() if hasattr(affine, "numpy") else affine, dtype=float)
    if a.shape not in ((4, 4), (3, 3)) or not np.isfinite(a).all():  # (3 x 3: a 2D NRRD's, MHA's)
        return None
    ornt = io_orientation(a)[:2]  # the stored axes' world axis (0: L/R, 1: P/A, 2: I/S) and direction
    if np.isnan(ornt).any():
        return None
    codes = "".join(aff2axcodes(a)[:2])
    first, second = int(ornt[0, 0]), int(ornt[1, 0])
    if second == 0:
        how = "its axes swapped (the first runs %s)" % ("P/A" if first == 1 else "I/S")
    elif first != 0:  # a sagittal plane (a lateral view's affine): no PNG layout to compare it with
        return None
    elif ornt[0, 1] != ornt[1, 1]:
        how = "one axis mirrored"
    else:
        return None
    return (f"{name}: its affine's in-plane axis codes are {codes!r}, {how} relative to a PNG's order ('LP' in "
            "ITK and 3D Slicer, 'RA' in MONAI and nibabel); a 2D model reads the pixels in stored order, so it "
            "segmented the image as stored, not as it displays: store the pixels upright (rows from the top) for "
            "the result a viewer's display would give")


class OneSliceAs2Dd(MapTransform):
    """:func:`one_slice_as_2d` on ``keys`` (the reference label of a ``spatial_dims`` model)."""

    def __init__(self, keys: KeysCollection, spatial_dims: int):
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_dims = spatial_dims

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = one_slice_as_2d(d[key], self.spatial_dims)
        return d


class CheckImaged(MapTransform):
    """Reject what the model cannot take, with a message naming the file and the problem:

    NaN/Inf voxels, a channel count other than the model's, the wrong number of spatial dimensions.
    """

    def __init__(self, keys: KeysCollection, num_channels: int, spatial_dims: int, label_key: str | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_channels = num_channels
        self.spatial_dims = spatial_dims
        self.label_key = label_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = _name(d, key)
            sd = img.ndim - 1
            if self.spatial_dims == 2 and sd == 3 and img.shape[-1] == 1:
                # a 2D image that 3D Slicer opened sends as a one-slice volume (a session or an upload: it saves the
                # node as a NIfTI of (X, Y, 1)), as it saves its labels: the 2D image it is (was refused as 3D)
                img = d[key] = one_slice_as_2d(img, 2)
                sd = 2
            if sd != self.spatial_dims:
                raise InputError(
                    f"{name}: a {sd}D image (shape {tuple(img.shape[1:])}, {img.shape[0]} channel(s)) was given to a "
                    f"{self.spatial_dims}D model"
                )
            if self.spatial_dims == 2:
                note = stored_layout_note(getattr(img, "affine", None), name)
                if note:
                    logger.warning("%s", note)
            if img.shape[0] != self.num_channels:
                raise InputError(f"{name}: the model expects {self.num_channels} channel(s), the image has "
                                 f"{img.shape[0]} (shape {tuple(img.shape)})")
            t = torch.as_tensor(img)
            if t.is_floating_point() and not torch.isfinite(t).all():
                n_nan = int(torch.isnan(t).sum())
                n_inf = int(torch.isinf(t).sum())
                raise InputError(f"{name}: the image has {n_nan} NaN and {n_inf} infinite voxel(s)")
            lab = d.get(self.label_key) if self.label_key else None
            if lab is None:
                continue
            lab = d[self.label_key] = one_slice_as_2d(lab, sd)
            placed = has_geometry(_first_file(lab)) and has_geometry(_first_file(img))
            if placed:
                # a label on the image's points but stored in another voxel order (an axis reversed, the axes
                # swapped) is put into the image's order, as evaluate reads it: trained as stored, with no
                # orientation step (every 2D preset), it was learnt mirrored and scored the right way round (a
                # review, 2026-12-07: Dice 0.667 of the training label against the truth)
                check_label_grid(_first_file(lab), lab, _first_file(img), img)
                lab = d[self.label_key] = reorient_like(lab, img.affine)
            if tuple(lab.shape[1:]) != tuple(img.shape[1:]):
                raise InputError(f"{name}: image size {tuple(img.shape[1:])} differs from its label's "
                                 f"{tuple(lab.shape[1:])} ({_name(d, self.label_key)})")
            if not placed:
                check_label_grid(_first_file(lab), lab, _first_file(img), img)
        return d


class CheckIntensityRanged(MapTransform):
    """A model of 8-bit images (its intensity the clipped range 0..255 -> 0..1: the X-ray models) refuses an image
    most of whose values lie above 255: clipped, it is a white image, and the model segmented it without a word (a
    16-bit PNG X-ray, values up to 4 095 or 65 535). InputError naming the share, the image's maximum and the
    model's range. Only for such models: a CT window (-200..300 HU) clips bone and air by design, and which modality a
    model takes is not told by its range."""

    SHARE = 0.5

    @staticmethod
    def applies(intensity: dict) -> bool:
        return intensity.get("type") == "range" and bool(intensity.get("clip", True)) \
            and float(intensity["a_min"]) >= 0 and float(intensity["a_max"]) <= 255

    def __init__(self, keys: KeysCollection, a_min: float, a_max: float):
        super().__init__(keys)
        self.a_min, self.a_max = float(a_min), float(a_max)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            t = torch.as_tensor(d[key])
            share = float((t > self.a_max).float().mean())
            if share > self.SHARE:
                raise InputError(f"{_name(d, key)}: {share:.0%} of its values are above {self.a_max:g} (its maximum is "
                                 f"{float(t.max()):g}), the top of the intensity range this model was trained on "
                                 f"[{self.a_min:g}, {self.a_max:g}]: clipped there, the image would be white (a 16-bit "
                                 f"image for a model of 8-bit images?); convert it to the model's range first")
        return d


GEOMETRY_FORMATS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # files whose header places the voxels
GEOMETRY_TOLERANCE = 0.1  # voxels: how far (at most) a corner of the label may lie from the image's


def has_geometry(path: str) -> bool:
    """A file whose header places its voxels (or a folder: a DICOM series); PNG/JPEG have none."""
    return os.path.isdir(path) or str(path).lower().endswith(GEOMETRY_FORMATS)


def _voxel_order_aligned(a_lab: np.ndarray, a_img: np.ndarray, ref_shape) -> np.ndarray:
    """The label's affine after flipping / permuting its axes into the image's voxel order (what orienting both to
    one axis code does), for a label array whose shape is the image's permuted the same way."""
    from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform

    t = ornt_transform(io_orientation(a_lab), io_orientation(a_img))
    lab_shape = [int(ref_shape[int(t[i, 0])]) for i in range(len(t))]
    return a_lab @ inv_ornt_aff(t, lab_shape)


def reorient_like(lab, img_affine):
    """``lab`` (C, *spatial) MetaTensor flipped / permuted into the voxel order of an image with ``img_affine`` (MONAI's
    ``Orientation`` to that image's axis codes): a label stored in another voxel order but on the same points can
    then be compared with the image's arrays voxel for voxel. Returned as it is when the orders agree."""
    from nibabel.orientations import io_orientation

    a_lab = np.asarray(getattr(lab, "affine", None) if getattr(lab, "affine", None) is not None else [], dtype=float)
    a_img = np.asarray(img_affine, dtype=float)
    if a_lab.shape != a_img.shape or (io_orientation(a_lab) == io_orientation(a_img)).all():
        return lab
    import nibabel as nib
    from monai.transforms import Orientation

    return Orientation(axcodes="".join(nib.aff2axcodes(a_img))[: lab.ndim - 1])(lab)


def first_path(v) -> str:
    """A datalist entry's file (the first of a multi-channel image's list)."""
    return str(v[0] if isinstance(v, (list, tuple)) else v)


def affine_2d(affine) -> np.ndarray:
    """A 2D image's 3x3 affine (MONAI keeps a 4x4 one for PNG and NIfTI, a 3x3 one for a 2D NRRD)."""
    a = np.asarray(affine.numpy() if hasattr(affine, "numpy") else affine, dtype=float)
    return a[np.ix_([0, 1, 3], [0, 1, 3])] if a.shape == (4, 4) else a


def geometry_difference(label_path, lab, image_path, img, ref_shape, allow_reorder: bool = False) -> str | None:
    """How the label's voxel-to-world mapping (its affine, as MONAI's LoadImage reads it) differs from the image's,
    in words; None if every corner of the image's grid maps to within GEOMETRY_TOLERANCE voxels of the same point.
    A shape check alone accepted a label whose header mirrors it (3D Slicer and other editors write the image's
    geometry; a file written from an array with another affine, e.g. ``np.eye(4)`` or a flipped axis, does not):
    training reoriented it by its own affine and learnt a mirrored mask. Formats without a geometry (PNG, JPEG)
    are compared by shape only. ``allow_reorder``: a label stored in another voxel order (flipped axes, e.g. LAS
    for an LPS image) whose affine places it on the same points is on the grid -- training orients both files by
    their own affines, and ``evaluate`` reorders it (:func:`reorient_like`) before scoring."""
    if not (has_geometry(str(label_path)) and has_geometry(str(image_path))):
        return None
    a_img = np.asarray(getattr(img, "affine", np.eye(4)), dtype=float)
    a_lab = np.asarray(getattr(lab, "affine", np.eye(4)), dtype=float) if hasattr(lab, "affine") else None
    if a_lab is not None and a_img.shape != a_lab.shape and len(ref_shape) == 2:  # a 2D NIfTI (4x4) and NRRD (3x3)
        a_img, a_lab = affine_2d(a_img), affine_2d(a_lab)
    if a_lab is None or a_img.shape != a_lab.shape:
        return f"its affine has another rank ({None if a_lab is None else a_lab.shape} vs {a_img.shape})"
    r = a_img.shape[0] - 1
    shape = (list(ref_shape) + [1] * r)[:r]
    a_lab0 = a_lab  # as stored: what the message describes
    reordered = False
    if allow_reorder and np.isfinite(a_lab).all() and abs(np.linalg.det(a_lab[:r, :r])) > 1e-12:
        aligned = _voxel_order_aligned(a_lab, a_img, shape)
        reordered = not np.allclose(aligned, a_lab)
        a_lab = aligned
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape], indexing="ij")).reshape(r, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    dist = np.linalg.norm((a_img @ corners - a_lab @ corners)[:r], axis=0).max()
    spacing = np.linalg.norm(a_img[:r, :r], axis=0)
    if dist <= GEOMETRY_TOLERANCE * max(float(spacing.min()), 1e-6):
        return None
    # the same axes and spacing, only another origin: every voxel still pairs with the same image voxel (training
    # orients and resamples each file by its own affine, keeping that pairing), and this is how a correct label
    # differs when an ITK editor (3D Slicer, ITK-SNAP) read a NIfTI image's qform where nibabel / MONAI read its
    # sform (after FSL registration they differ): accepted, with a warning
    # (the corners' spread minus a common shift: a rotation, flip or other spacing still moves them apart)
    diff = (a_img @ corners - a_lab @ corners)[:r]
    linear = np.linalg.norm(diff - diff.mean(axis=1, keepdims=True), axis=0).max()
    # not for a reordered label: a flip plus another origin is exactly a mirrored label (np.eye(4) for an LPS image)
    if not reordered and linear <= GEOMETRY_TOLERANCE * max(float(spacing.min()), 1e-6):
        logger.warning("label file %s: origin %s mm from the image's (same axes and spacing; e.g. a NIfTI qform/sform "
                       "difference): stored, voxel for voxel", label_path, np.round(diff[:, 0], 3).tolist())
        return None

    def codes(a):
        import nibabel as nib

        if r != 3:
            return "?"
        return "".join(nib.orientations.aff2axcodes(a))

    lab_spacing = np.linalg.norm(a_lab0[:r, :r], axis=0)
    return (f"its affine differs from the image's (a corner of the grid lies {dist:.3g} mm away; orientation "
            f"{codes(a_lab0)} vs {codes(a_img)}, spacing {np.round(lab_spacing, 4).tolist()} vs "
            f"{np.round(spacing, 4).tolist()} mm, origin {np.round(a_lab0[:r, r], 3).tolist()} vs "
            f"{np.round(a_img[:r, r], 3).tolist()})")


def _first_file(x) -> str:
    """The (first) file a loaded MetaTensor was read from."""
    meta = getattr(x, "meta", None) or {}
    fn = meta.get(SOURCE_KEY) or meta.get("filename_or_obj")
    if isinstance(fn, (list, tuple)):
        fn = fn[0] if fn else None
    return str(fn) if fn is not None else ""


def check_label_grid(label_path, lab, image_path, img, allow_reorder: bool = True) -> None:
    """A label must lie on its image's grid (as the datastore checks a saved label): orientation and spacing move
    each file by its own affine in training, while ``evaluate`` compares the arrays as loaded -- a label written
    with another affine (``np.eye(4)``, a flipped axis) was learnt mirrored and scored unmirrored. InputError
    naming both files and how they differ; files without a geometry (PNG) are compared by shape only."""
    problem = geometry_difference(label_path, lab, image_path, img, tuple(img.shape[1:]), allow_reorder=allow_reorder)
    if problem:
        raise InputError(f"{label_path}: the label is not on its image's grid ({image_path}): {problem}")


class CheckGridd(MapTransform):
    """The grid the spacing step will make, checked before it is made: a header whose spacing is off by orders of
    magnitude (micrometres written as millimetres) asks for a grid far beyond :data:`MAX_VOXELS`, which the header
    check of the file itself cannot see (1 000 voxels at 10 mm became 753 571 at 1.3 mm)."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float]):
        super().__init__(keys, allow_missing_keys=True)
        self.pixdim = [float(v) for v in pixdim]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            aff = np.asarray(getattr(img, "affine", None) if getattr(img, "affine", None) is not None
                             else np.eye(img.ndim), dtype=float)
            r = img.ndim - 1
            spacing = np.linalg.norm(aff[:r, :r], axis=0)
            shape = np.asarray(img.shape[1:], dtype=float)
            want = np.asarray(self.pixdim[:r] + [0.0] * (r - len(self.pixdim[:r])), dtype=float)
            want = np.where(want > 0, want, spacing)  # <= 0: the axis keeps its spacing (as MONAI's Spacingd)
            target = np.ceil(shape * spacing / want)
            n = int(np.prod(target)) * int(img.shape[0])
            if n > MAX_VOXELS:
                raise InputError(f"{_name(d, key)}: spacing {np.round(spacing, 4).tolist()} mm resampled to the "
                                 f"model's {self.pixdim[:r]} mm makes a grid of {target.astype(int).tolist()} = {n:,} "
                                 f"voxels, more than this server's limit of {MAX_VOXELS:,} (DFM_MAX_VOXELS); is the "
                                 f"header's spacing right?")
        return d


class RecordGridd(MapTransform):
    """Keep the image's affine as loaded (``meta["loaded_affine"]``), before orientation and spacing change it:
    clicks arrive in the loaded image's voxel indices and are mapped with it (:func:`lib.clicks.to_network_grid`).
    (MONAI's ``original_affine`` is only set by some readers, e.g. not for PNG.)"""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if hasattr(img, "meta") and "loaded_affine" not in img.meta:
                img.meta["loaded_affine"] = torch.as_tensor(img.affine).clone()
        return d


CONTENT_KEY = "content_key"


def content_key(image) -> str:
    """A digest of an image's voxels (float32, with its shape): what :class:`ContentKeyd` records."""
    import hashlib

    arr = image.as_tensor() if hasattr(image, "as_tensor") else image
    arr = np.ascontiguousarray(arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr),
                               dtype=np.float32)
    h = hashlib.blake2b(repr(arr.shape).encode(), digest_size=16)
    h.update(memoryview(arr).cast("B"))
    return "content-" + h.hexdigest()


class ContentKeyd(MapTransform):
    """Record what an image's sampling is seeded by (with the seed and each window's position:
    :func:`lib.inferer.seed_for`): :func:`content_key` of its voxels as loaded and oriented, before any resampling
    (whose last bits may differ between CPUs), in ``d["content_key"]``. The same pixels give the same result however
    they arrive: seeded by name, an upload of a file differed from the file in the studies folder by up to 0.26 in
    probability, one file in two datalists (named by path) by 0.19, one DICOM series in two folders by 0.02 (a
    review). Part of :func:`preprocess`, so every caller (evaluate, predict, the app, scoring, validation) has it."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[CONTENT_KEY] = content_key(d[key])
        return d


def one_channel_label(d: Mapping, key: Hashable):
    """``d[key]``, a label map with one channel first; else InputError naming the file."""
    lab = d[key]
    if lab.shape[0] != 1:
        raise InputError(f"{_name(d, key)}: a label must have one channel, got shape {tuple(lab.shape)}")
    return lab


TRUTH_NOTE = "truth_note"  # a label's meta: why its truth is empty although the file has foreground


def unread_label_note(raw, truth, why: str) -> str | None:
    """When a label file holds non-zero values but the model's truth reads none of them (a {0, 1} mask under the
    cxr preset's threshold 127, a label coded otherwise than a prompted model's structure values), what was read,
    in words (``why`` says by which rule); None otherwise. Such a case scored Dice 0 and trained as background
    without a word (a review, 2026-12-07)."""
    t = torch.as_tensor(truth)
    r = torch.as_tensor(raw)
    if bool((t > 0).any()) or not bool((r != 0).any()):
        return None
    values = torch.unique(r[r != 0]).tolist()
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
    return f"its values {{{shown}}} read as background: {why}"


TRUTH_UNREAD = "truth_unread"  # a label's meta: its non-zero values the truth reads as background, where others are read


def unread_values(raw, truth) -> list:
    """The label's non-zero values found only where no channel of the model's ``truth`` is set: read as background.
    :func:`unread_label_note` names them where nothing is read; where other values are read (a lesion recoded 255
    beside a vertebra of 2; the 1s of a {0, 1, 255} mask under a threshold of 127) the Dice fell with no word (a
    review, 2026-12-08)."""
    r = torch.as_tensor(raw)[0]
    t = torch.as_tensor(truth)
    off = (r != 0) & ~(t > 0).any(0)
    return [float(v) for v in torch.unique(r[off]).tolist()] if bool(off.any()) else []


def mark_unread(raw, label) -> None:
    """Record :func:`unread_values` in ``label``'s meta (``TRUTH_UNREAD``) where its truth reads some values."""
    vals = unread_values(raw, label) if hasattr(label, "meta") else []
    if vals:
        label.meta[TRUTH_UNREAD] = vals


class BinarizeLabeld(MapTransform):
    """``label > threshold`` as a float 0/1 map (the binary truth). A label painted in the app (the item's
    ``segments`` names its values, :mod:`lib.structures`) holds the app's values, not the dataset's: its truth is
    the values named as the model's structure (``name``) or, when none is, every non-zero value but those named
    ``background`` or ``uncertain``, whatever the threshold (a cxr_lung model paints the lungs 1, its dataset's
    masks are 255 and its threshold 127: a submitted label read as empty)."""

    def __init__(self, keys: KeysCollection, threshold: float = 0.0, allow_missing_keys: bool = False,
                 name: str | None = None):
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold
        self.name = name  # the model's structure (lib.structures.painted_foreground)

    def __call__(self, data):
        from .structures import painted_foreground, parse_segments

        d = dict(data)
        segments = parse_segments(d.pop("segments", None))
        for key in self.key_iterator(d):
            lab = one_channel_label(d, key)
            if segments:
                values = torch.as_tensor(lab if isinstance(lab, torch.Tensor) else np.asarray(lab)).round().long()
                listed, only = painted_foreground(segments, self.name)
                listed_t = torch.tensor(listed, dtype=torch.long)
                fg = torch.isin(values, listed_t) if only else None
                if fg is None or not bool(fg.any()):
                    # the structure's own segment empty (Slicer makes one segment per label of /info on every
                    # image; the lungs painted in an added "Segment_1"): every named value but background /
                    # uncertain, not an empty truth
                    listed, _ = painted_foreground(segments)
                    fg = (values != 0) & ~torch.isin(values, torch.tensor(listed, dtype=torch.long))
                d[key] = (lab * 0 + fg.float()) if isinstance(lab, torch.Tensor) else fg.numpy().astype(np.float32)
            else:
                d[key] = (lab > self.threshold).float() if isinstance(lab, torch.Tensor) else \
                    (np.asarray(lab) > self.threshold).astype(np.float32)
                note = unread_label_note(lab, d[key], f"all at or below preprocessing.label_threshold "
                                                      f"{self.threshold:g}")
                if note and hasattr(d[key], "meta"):
                    d[key].meta[TRUTH_NOTE] = note
                elif not note:
                    mark_unread(lab, d[key])
        return d


class AntiAliasLabeld(MapTransform):
    """Smooths a binary label before it is resampled to coarser ``pixdim`` (``soft_label``): Gaussian with
    sigma = (ratio - 1) / 2 voxels on each axis that gets coarser by ``ratio`` (as scikit-image's ``resize``
    anti-aliasing), so that the linear resampling after it gives each coarse voxel about the fraction of it that
    is foreground instead of the value at one point (nearest: boundaries shift by up to half a coarse voxel)."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.pixdim = [float(v) for v in pixdim]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            have = [float(v) for v in lab.pixdim] if hasattr(lab, "pixdim") else [1.0] * len(self.pixdim)
            sigma = [max(0.0, (want / max(h, 1e-6) - 1.0) / 2.0) for want, h in zip(self.pixdim, have)]
            if any(s > 0 for s in sigma):
                d[key] = GaussianSmooth(sigma=sigma)(lab.float())
        return d


class CheckedCompose(Compose):
    """MONAI ``Compose`` whose failures surface as :class:`InputError` with the root cause and the file named.

    (MONAI wraps every exception raised inside a transform in ``RuntimeError("applying transform ...")``.)
    """

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as e:
            root: BaseException = e
            while root.__cause__ is not None and not isinstance(root, InputError):
                root = root.__cause__
            if isinstance(root, InputError):
                raise root from None
            src = input_.get("image") if isinstance(input_, Mapping) else None
            raise InputError(f"preprocessing failed for {src}: {type(root).__name__}: {root}") from e


def load_transforms(keys: Sequence[str]) -> list:
    return [
        LoadImageChecked(keys=list(keys), image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys=list(keys), allow_missing_keys=True),
    ]


def _truth(cfg: PreprocConfig, structures, key: str = "label", label_name: str | None = None) -> MapTransform:
    """``label > label_threshold``, or for a prompted model one binary channel per structure
    (:class:`lib.structures.StructureTruthd`, derived on the label as loaded)."""
    if structures:
        from .structures import StructureTruthd

        return StructureTruthd(keys=key, structures=structures, allow_missing_keys=True)
    return BinarizeLabeld(keys=key, threshold=cfg.label_threshold, allow_missing_keys=True, name=label_name)


def preprocess(cfg: PreprocConfig, load: bool = True, structures=None, label_name: str | None = None) -> Compose:
    """Load (optional) + check + orientation + spacing + intensity + binary label (when a label is given; one
    channel per structure for a prompted model).

    One pipeline for items with and without a label. Its spatial steps are invertible: invert a prediction with
    the SAME instance (MONAI matches inverse operations to the transform object that applied them), e.g.
    :attr:`lib.inferer.DFMSystem.preprocessing`.
    """
    cfg = cfg.resolved()
    keys = ["image", "label"]
    t: list = load_transforms(keys) if load else []
    t += [
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True, allow_missing_keys=True),
        CheckImaged(keys="image", num_channels=cfg.num_channels, spatial_dims=cfg.spatial_dims, label_key="label"),
        *([CheckIntensityRanged(keys="image", a_min=cfg.intensity["a_min"], a_max=cfg.intensity["a_max"])]
          if CheckIntensityRanged.applies(cfg.intensity) else []),
        RecordGridd(keys="image"),
        _truth(cfg, structures, label_name=label_name),
    ]
    if cfg.orientation:
        t.append(Orientationd(keys=keys, axcodes=cfg.orientation, allow_missing_keys=True))
    t.append(ContentKeyd(keys="image"))
    if cfg.spacing:
        t.append(CheckGridd(keys="image", pixdim=cfg.spacing))
        if cfg.soft_label:  # the fraction of each network voxel that is foreground (see PreprocConfig.soft_label)
            t.append(AntiAliasLabeld(keys="label", pixdim=cfg.spacing, allow_missing_keys=True))
        t.append(Spacingd(keys=keys, pixdim=cfg.spacing, mode=["bilinear", "bilinear" if cfg.soft_label else "nearest"],
                          allow_missing_keys=True))
    inten = cfg.intensity
    if inten["type"] == "range":
        t.append(ScaleIntensityRanged(keys="image", a_min=inten["a_min"], a_max=inten["a_max"], b_min=0.0,
                                      b_max=1.0, clip=bool(inten.get("clip", True))))
    elif inten["type"] == "zscore":
        t.append(NormalizeIntensityd(keys="image", nonzero=bool(inten.get("nonzero", True)), channel_wise=True))
    elif inten["type"] == "histogram":  # the whole image (after resampling), never a window
        t.append(HistogramNormalized(keys="image", num_bins=int(inten.get("num_bins", 256)), min=0, max=1))
    return CheckedCompose(t)


def label_item(item: Mapping) -> dict:
    """What :func:`label_transforms` reads of a datalist item: its ``label`` and, for a label painted in the app, the
    names of its values (``segments``), which decide how its truth is read."""
    return {k: item[k] for k in ("label", "segments") if k in item}


def label_transforms(cfg: PreprocConfig, label_key: str = "label", structures=None,
                     label_name: str | None = None) -> Compose:
    """The reference label in its ORIGINAL geometry (no resampling), binarised (one channel per structure for a
    prompted model): what metrics compare against."""
    return CheckedCompose(load_transforms([label_key]) + [
        EnsureTyped(keys=label_key, dtype=torch.float32, track_meta=True),
        # a 2D model's label saved by 3D Slicer as a one-slice volume, read as the 2D label it is (one_slice_as_2d)
        OneSliceAs2Dd(keys=label_key, spatial_dims=cfg.spatial_dims),
        _truth(cfg, structures, label_key, label_name),
    ])


def image_spatial_dims(path) -> int:
    """2 or 3: the model whose preprocessing takes the file (which model the trainers, scoring and batch inference
    give it), as the loader reads it (MONAI ``LoadImage`` + ``EnsureChannelFirst``), from the header where it says
    (NIfTI, NRRD; no pixel data read). NIfTI keeps channels in its 4th and later axes, so a (256, 256, 4) volume is
    3D (a guess that took a trailing axis of <= 4 as channels called it 2D, and the 2D model's preprocessing then
    refused it). A one-slice (X, Y, 1) file is 2D: an X-ray 3D Slicer saved (:func:`one_slice_as_2d`; the 2D
    models take it since 2026-12-07, and it went to the 3D CT model for training and scoring)."""
    import nibabel as nib

    def dims(spatial) -> int:
        spatial = [int(v) for v in spatial]
        return 2 if len(spatial) <= 2 or (len(spatial) == 3 and spatial[2] == 1) else 3

    p = str(path)
    low = p.lower()
    if os.path.isdir(p) or low.endswith(".dcm"):
        from .dicom import is_projection_series

        return 2 if is_projection_series(p) else 3  # an X-ray (DX, CR) is a 2D image
    if low.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        return 2
    if low.endswith((".nii", ".nii.gz")):
        return dims(nib.load(p).shape[:3])
    if low.endswith(".nrrd"):
        import nrrd

        hdr = nrrd.read_header(p)
        kinds = hdr.get("kinds") or []
        sizes = list(hdr.get("sizes", []))
        # channel axes are the non-spatial kinds (vector, RGB-color, list, ...); "none" and "???" are spatial to ITK
        spatial_kinds = ("domain", "space", "time", "none", "???", "")
        if kinds and len(kinds) == len(sizes):
            return dims([n for n, k in zip(sizes, kinds) if str(k).strip().lower() in spatial_kinds])
        return dims(sizes)
    from monai.transforms import EnsureChannelFirst, LoadImage

    return dims(EnsureChannelFirst()(LoadImage(image_only=True)(p)).shape[1:])
