"""DICOM series in and out (pydicom, dicom2nifti): checked conversion, a CT series writer, UID repair.

:func:`series_to_nifti` converts a downloaded series with dicom2nifti's validation switched on, and either
*corrects* what can be corrected without inventing data (a tilted gantry: resampled onto an orthogonal grid) or
raises :class:`lib.transforms.InputError` naming the problem (not a volume, too few slices / a localizer, missing
slices or an uneven slice increment, mixed slice orientations).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .transforms import InputError

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_PREFIX = "1.2.826.0.1.3680043.10.1466."  # a root for this project's generated UIDs (deterministic suffixes)


def _uid(*parts) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def read_series(folder: str | os.PathLike) -> list[pydicom.Dataset]:
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception:  # noqa: BLE001 - non-DICOM files in the folder are ignored, as PACS exports have them
            logger.debug("not DICOM: %s", f)
    if not out:
        raise InputError(f"{folder}: no DICOM file")
    return out


# the header fields the geometry check (and the conversion) read: keyword, tag, number of values (None: one integer)
GEOMETRY_TAGS = (("Rows", "(0028,0010)", None), ("Columns", "(0028,0011)", None),
                 ("ImageOrientationPatient", "(0020,0037)", 6), ("ImagePositionPatient", "(0020,0032)", 3))


def _header_problem(datasets: Sequence[pydicom.Dataset]) -> str | None:
    """The first instance whose geometry fields are missing or malformed, named with its file and the tag (an
    instance without Rows, an ImageOrientationPatient of 3 values, an ImagePositionPatient of 2 raised
    AttributeError/ValueError further on: a 500 instead of a refusal)."""
    for ds in datasets:
        where = os.path.basename(str(getattr(ds, "filename", "") or "")) or f"SOP {getattr(ds, 'SOPInstanceUID', '?')}"
        for keyword, tag, count in GEOMETRY_TAGS:
            value = ds.get(keyword)
            if value is None or value == "":
                return f"instance {where} has no {keyword} {tag}: not a volume"
            try:
                if count is None:
                    ok = int(value) > 0
                else:
                    values = [float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue))
                                                 else [value])]
                    ok = len(values) == count
            except (TypeError, ValueError):
                ok = False
            if not ok:
                want = "a positive integer" if count is None else f"{count} numbers"
                return f"instance {where} has a malformed {keyword} {tag} ({str(value)[:60]!r}; expected {want})"
    return None


def describe_geometry_problem(datasets: Sequence[pydicom.Dataset]) -> str | None:
    """A plain-words reason why these slices are not one regular volume (None if they are)."""
    frames = [int(str(ds.get("NumberOfFrames", 1) or 1)) if str(ds.get("NumberOfFrames", 1) or 1).isdigit() else 1
              for ds in datasets]
    if any(n > 1 for n in frames):
        # an enhanced (multi-frame) CT or MR: one instance holds the whole volume (was: "only 1 slice(s) ... a
        # localizer?")
        return (f"{sum(n > 1 for n in frames)} multi-frame instance(s) ({max(frames)} frames): multi-frame "
                "(enhanced) DICOM is not read by this server; export the series as single-frame images")
    if len(datasets) < 3:
        return f"only {len(datasets)} slice(s): at least 3 are needed for a volume (a localizer or an incomplete series?)"
    problem = _header_problem(datasets)
    if problem:
        return problem
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    if not np.isfinite(iops).all() or not np.isfinite(ipps).all():
        return "slice positions or orientations are not finite numbers: not a volume"
    if np.abs(iops - iops[0]).max() > 1e-3:
        return "slices with different orientations (ImageOrientationPatient differs): not one volume"
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        return f"slices of different sizes {sorted(sizes)}: not one volume"
    row, col = iops[0, :3], iops[0, 3:]
    normal = np.cross(row, col)
    order = np.argsort(ipps @ normal)
    pos = ipps[order]
    steps = np.diff(pos, axis=0)
    d = steps @ normal
    if np.any(np.abs(d) < 1e-4):
        return "two slices at the same position: duplicated slices or several series mixed, not one volume"
    # 5 % of the median step (at least 0.02 mm): positions stored with two decimals (0.625 mm slices: steps of 0.62
    # and 0.63 mm) are one volume; a missing slice (a step twice the others) or a change of spacing is not. 1 % of
    # the first step refused such series, which dicom2nifti converts (its own check is as lenient)
    ref = float(np.median(d))
    if np.abs(d - ref).max() > max(0.05 * abs(ref), 0.02):
        return (f"uneven slice increment (between {np.abs(d).min():.3g} and {np.abs(d).max():.3g} mm): "
                "missing slices or a non-uniform series")
    return None


def is_gantry_tilt(datasets: Sequence[pydicom.Dataset]) -> bool:
    """Parallel, evenly spaced slices whose positions advance obliquely to the slice normal."""
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    row, col = iops[0, :3], iops[0, 3:]
    normal = np.cross(row, col)
    pos = ipps[np.argsort(ipps @ normal)]
    step = pos[1] - pos[0]
    cos = abs(step @ normal) / (np.linalg.norm(step) + 1e-12)
    return cos < 0.9999


def series_index_orientation(datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The nibabel orientation of the series' own voxel order: i along the row direction cosine (the columns), j along
    the column direction cosine (the rows), k ascending along their cross product. It is the order of ITK (MONAI
    Label's own DICOM conversion, MONAI's ITKReader, 3D Slicer's DICOM reader) and of OHIF/cornerstone's volume
    (``sortImageIdsAndGetSpacing``), whose ``worldToIndex`` gives the points OHIF sends as clicks."""
    import nibabel as nib

    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row, col, np.cross(row, col)
    return nib.orientations.io_orientation(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)  # DICOM LPS -> NIfTI RAS


def to_series_order(path: str | os.PathLike, datasets: Sequence[pydicom.Dataset]) -> bool:
    """Rewrite the NIfTI at ``path`` (same voxels, same physical geometry) so that its array runs in the series' own
    voxel order (:func:`series_index_orientation`); returns whether it had to change. dicom2nifti's
    ``reorient_nifti`` makes an LAS-like array instead: a standard axial series came out with its rows reversed,
    so a click OHIF sent in the series' indices landed on the mirror-image voxel (and OHIF drew returned labels
    mirrored)."""
    import nibabel as nib

    img = nib.load(str(path))
    now = nib.orientations.io_orientation(img.affine)
    want = series_index_orientation(datasets)
    if np.array_equal(now, want):
        return False
    t = nib.orientations.ornt_transform(now, want)
    raw = nib.orientations.apply_orientation(np.asanyarray(img.dataobj.get_unscaled()), t)  # stored values, dtype
    affine = img.affine @ nib.orientations.inv_ornt_aff(t, img.shape)
    out = nib.Nifti1Image(np.ascontiguousarray(raw), affine, img.header)  # the header keeps dtype and scaling
    out.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    out.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    nib.save(out, str(path))
    return True


def series_to_nifti(folder: str | os.PathLike, out_path: str | os.PathLike, name: str | None = None) -> dict:
    """Convert one series with dicom2nifti, the array in the series' own voxel order (:func:`to_series_order`);
    returns ``{"path", "corrections"}`` or raises InputError naming the series as ``name`` (default: the folder's
    own name, e.g. a DICOMweb series UID)."""
    import dicom2nifti
    import dicom2nifti.settings as d2n_settings
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    folder, out_path = str(folder), str(out_path)
    datasets = read_series(folder)
    name = name or Path(folder).name
    corrections: list[str] = []
    problem = describe_geometry_problem(datasets)
    tilt = problem is None and is_gantry_tilt(datasets)
    if problem:
        raise InputError(f"DICOM series {name}: {problem}")
    try:
        d2n_settings.enable_validate_slice_increment()
        d2n_settings.enable_validate_slicecount()
        if tilt:
            d2n_settings.disable_validate_orthogonal()
            d2n_settings.enable_resampling()
            d2n_settings.set_resample_spline_interpolation_order(1)
            d2n_settings.set_resample_padding(float(min(getattr(ds, "RescaleIntercept", 0) for ds in datasets)))
            corrections.append("gantry tilt: resampled onto an orthogonal grid (linear interpolation)")
        else:
            d2n_settings.enable_validate_orthogonal()
            d2n_settings.disable_resampling()
        dicom2nifti.dicom_series_to_nifti(folder, out_path, reorient_nifti=True)
        to_series_order(out_path, datasets)
    except ConversionValidationError as e:
        raise InputError(f"DICOM series {name}: not a regular volume ({e})") from e
    except (ConversionError, ValueError, IndexError, AttributeError) as e:
        raise InputError(f"DICOM series {name}: cannot convert it: {type(e).__name__}: {e}") from e
    finally:
        d2n_settings.enable_validate_orthogonal()
        d2n_settings.disable_resampling()
    return {"path": out_path, "corrections": corrections}


def repair_uids(files: Iterable[str | os.PathLike], out_dir: str | os.PathLike, force_new: bool = False) -> list[str]:
    """Copy a series into ``out_dir``, filling empty Study/Series/SOP Instance UIDs (deterministically, from the
    files' content) or replacing all of them (``force_new``: e.g. several encodings of one series that share UIDs).

    Returns what was changed, in words. Pixel data are copied as they are (no re-encoding).
    """
    files = sorted(map(str, files))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1()
    for f in files:
        digest.update(Path(f).read_bytes()[:4096])
    key = digest.hexdigest()
    changed: set[str] = set()
    study, series = _uid(key, "study"), _uid(key, "series")
    for f in files:
        ds = pydicom.dcmread(f)
        for tag, new in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
            if force_new or not str(getattr(ds, tag, "") or "").strip():
                setattr(ds, tag, new)
                changed.add(tag)
        if force_new or not str(getattr(ds, "SOPInstanceUID", "") or "").strip():
            ds.SOPInstanceUID = _uid(key, Path(f).name)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            changed.add("SOPInstanceUID")
        ds.save_as(str(out_dir / Path(f).name), write_like_original=True)
    return [f"{'replaced' if force_new else 'filled in empty'} {t}" for t in sorted(changed)]


_AGE = re.compile(r"^\s*0*(\d{1,3})\s*([DWMY])\s*$")
SOP_CLASS_BY_MODALITY = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def seg_source_copy(folder: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy a series for dcmqi (``itkimage2segimage``, which writes a label as a DICOM SEG of it), repairing what it
    refuses in real PACS data, and return what was repaired, in words. Found on 8 of the 9 real series here (dcmqi
    wrote no SEG; MONAI Label then uploaded a file that did not exist: a 500): a ``PatientAge`` of ``0Y`` (the
    DICOM age string is ``nnn`` + D/W/M/Y: zero-padded), an empty ``SOPClassUID`` (taken from the file meta, else
    from the modality). The UIDs the SEG references are the series' own; pixel data are copied as they are."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    repaired: set[str] = set()
    for f in sorted(Path(folder).iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(f))
        except Exception:  # noqa: BLE001 - not DICOM (the series reader skips it too)
            continue
        age = str(ds.get("PatientAge", "") or "")
        if age and not re.fullmatch(r"\d{3}[DWMY]", age):
            m = _AGE.match(age)
            if m:
                ds.PatientAge = f"{int(m.group(1)):03d}{m.group(2)}"
            else:
                del ds.PatientAge
            repaired.add(f"PatientAge {age!r}")
        if not str(ds.get("SOPClassUID", "") or "").strip():
            meta = getattr(ds, "file_meta", None)
            sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "").strip() \
                or SOP_CLASS_BY_MODALITY.get(str(ds.get("Modality", "")))
            if sop_class:
                ds.SOPClassUID = sop_class
                repaired.add("an empty SOPClassUID")
        ds.save_as(str(out_dir / f.name), write_like_original=True)
    return sorted(repaired)


def write_ct_series(volume_hu: np.ndarray, affine_ras: np.ndarray, out_dir: str | os.PathLike,
                    patient_id: str = "PHANTOM-001", patient_name: str = "Phantom^CT", series_description: str = "",
                    seed: str = "dfm-vlm") -> dict:
    """Write a volume (i, j, k) in HU with a RAS affine as a CT series: one slice per k, LPS patient coordinates,
    RescaleSlope 1 / RescaleIntercept -1024 over unsigned 16-bit pixels, deterministic UIDs from ``seed``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    dirs = lps[:3, :3] / spacing
    study, series, frame = _uid(seed, "study"), _uid(seed, "series"), _uid(seed, "frame")
    now = _dt.datetime(2026, 1, 1, 12, 0, 0)
    intercept = -1024.0
    stored = np.clip(np.round(volume_hu - intercept), 0, 65535).astype(np.uint16)
    for k in range(volume_hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = _uid(seed, "sop", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = _uid("dfm-vlm-implementation")
        ds = FileDataset(str(out_dir / f"CT{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber = "1", ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.SeriesDescription = series_description or "synthetic CT phantom (dfm-vlm sample data)"
        ds.Manufacturer = "dfm-vlm-seg"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        # rows follow j, columns follow i: the row direction cosine is axis i, the column direction axis j
        ds.ImageOrientationPatient = [float(v) for v in (*dirs[:, 0], *dirs[:, 1])]
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.SpacingBetweenSlices = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume_hu.shape[1]), int(volume_hu.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.KVP = 120
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(out_dir / f"CT{k:04d}.dcm"), write_like_original=False)
    return {"StudyInstanceUID": study, "SeriesInstanceUID": series, "files": volume_hu.shape[2]}
