"""DICOM series in and out (pydicom, dicom2nifti, highdicom): checked conversion, X-rays (one DX / CR instance: a
2D image, and the DICOM SEG of its label), a CT series writer, an X-ray writer, UID repair.

:func:`series_to_nifti` converts a downloaded series with dicom2nifti's validation switched on, and either
*corrects* what can be corrected without inventing data (a tilted gantry: resampled onto an orthogonal grid) or
raises :class:`lib.transforms.InputError` naming the problem (not a volume, too few slices / a localizer, missing
slices or an uneven slice increment, mixed slice orientations).
"""

from __future__ import annotations

import datetime as _dt
import functools
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


MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: the index of a CD/DVD export, not an image


def _is_dicomdir(ds: pydicom.Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return MEDIA_DIRECTORY in (str(ds.get("SOPClassUID", "") or "").strip(),
                               str(getattr(meta, "MediaStorageSOPClassUID", "") or "").strip())


def read_series(folder: str | os.PathLike) -> list[pydicom.Dataset]:
    """The headers of the DICOM files in ``folder`` (not its subfolders), in file-name order. Non-DICOM files are
    skipped, as PACS exports have them, and so is a DICOMDIR (a CD export's index: a series folder with one beside
    its slices was refused as "instance DICOMDIR has no Rows", a CD's root taken for an X-ray; a review)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    out, directories = [], 0
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - non-DICOM files in the folder are ignored, as PACS exports have them
            logger.debug("not DICOM: %s", f)
            continue
        if _is_dicomdir(ds):
            directories += 1
        else:
            ds.filename = str(f)  # (a deflated file's header kept its inflated stream there, not the path)
            out.append(ds)
    if not out and directories:
        subfolders = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
        hint = f" (here: {', '.join(subfolders[:4])}{', ...' if len(subfolders) > 4 else ''})" if subfolders else ""
        raise InputError(f"{folder}: a DICOMDIR (the index of a CD/DVD export) and no image beside it: give the "
                         f"folder that holds one series' images{hint}")
    if not out:
        raise InputError(f"{folder}: no DICOM file")
    return out


def one_series(datasets: Sequence[pydicom.Dataset], name: str) -> tuple[list[pydicom.Dataset], list[str]]:
    """The image instances of one series among ``datasets``, and what was left out, in words: presentation states,
    reports and other non-image objects beside the images (one PR object refused a CT series as "a PR series") and
    a second copy of an instance (the same SOP Instance UID). Refused (InputError): only non-image objects, or images
    of several series in one folder (two series of different pixel spacing became one volume in the first's
    geometry; a review)."""
    def modality(ds):
        return str(ds.get("Modality", "") or "").strip().upper()

    images = [ds for ds in datasets if modality(ds) not in NOT_IMAGES]
    if not images:  # (a SEG of an X-ray was converted as an X-ray, indexed and segmented: a review)
        kind = modality(datasets[0])
        try:
            ref = f": the image it refers to is series {datasets[0].ReferencedSeriesSequence[0].SeriesInstanceUID}"
        except (AttributeError, IndexError):
            ref = ""
        raise InputError(f"DICOM series {name}: a {kind} series ({NOT_IMAGES[kind]}), not an image{ref}")
    left_out = []
    others = sorted({modality(ds) for ds in datasets} & set(NOT_IMAGES))
    if others:
        left_out.append(f"{len(datasets) - len(images)} non-image object(s) beside the images left out "
                        f"({', '.join(others)})")
    unique: dict[str, pydicom.Dataset] = {}
    for ds in images:
        unique.setdefault(str(ds.get("SOPInstanceUID", "") or "").strip() or str(getattr(ds, "filename", id(ds))), ds)
    if len(unique) < len(images):
        left_out.append(f"{len(images) - len(unique)} second copy(ies) of an instance (the same SOP Instance UID) "
                        "left out")
    images = list(unique.values())
    series: dict[str, int] = {}
    for ds in images:
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        series[uid] = series.get(uid, 0) + 1
    if len(series) > 1:
        listed = "; ".join(f"{uid or '(no Series Instance UID)'}: {n} instance(s)" for uid, n in series.items())
        raise InputError(f"DICOM series {name}: {len(series)} series in one folder ({listed}): give one series "
                         "per folder")
    return images, left_out


# the header fields the geometry check (and the conversion) read: keyword, tag, number of values (None: one integer)
GEOMETRY_TAGS = (("Rows", "(0028,0010)", None), ("Columns", "(0028,0011)", None),
                 ("ImageOrientationPatient", "(0020,0037)", 6), ("ImagePositionPatient", "(0020,0032)", 3),
                 ("PixelSpacing", "(0028,0030)", 2))


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
    frames = [_frames(ds) for ds in datasets]
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
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
    if not np.isfinite(spacings).all() or (spacings <= 0).any():
        return "a pixel spacing that is not a positive number: not a volume"
    if np.abs(spacings - spacings[0]).max() > 1e-3:  # (converted in the first slice's spacing: a review)
        found = sorted({tuple(np.round(v, 4)) for v in spacings})
        return f"slices with different pixel spacings {[list(map(float, v)) for v in found]} mm: not one volume"
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
    # every position on the line through the first and the last (straight, or oblique: a tilted gantry); stacks of
    # different fields of view, or two series interleaved, were converted as a 4D series or failed with
    # dicom2nifti's own words (a review)
    axis = (pos[-1] - pos[0]) / (np.linalg.norm(pos[-1] - pos[0]) + 1e-12)
    rel = pos - pos[0]
    off = np.linalg.norm(rel - np.outer(rel @ axis, axis), axis=1)
    if off.max() > max(0.05 * abs(ref), 0.1):
        return (f"slice positions not on one line (one is {off.max():.3g} mm off it): several stacks or series "
                "mixed, not one volume")
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
    """Convert one series with dicom2nifti, the array in the series' own voxel order (:func:`to_series_order`), or
    one projection radiograph (an X-ray: :func:`projection_to_nifti`) to a 2D image; returns ``{"path",
    "corrections", "left_out"}`` or raises InputError naming the series as ``name`` (default: the folder's own name,
    e.g. a DICOMweb series UID). ``corrections``: what changed the grid (the result then lies on it, not on the
    series' slices); ``left_out``: what :func:`one_series` left out and the bits cleared (the grid is the series')."""
    import dicom2nifti.convert_dicom
    import dicom2nifti.settings as d2n_settings
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    folder, out_path = str(folder), str(out_path)
    name = name or Path(folder).name
    datasets, left_out = one_series(read_series(folder), name)
    if is_projection_image(datasets):  # an X-ray (DX, CR): one 2D image (was refused: "only 1 slice(s)")
        return {**projection_to_nifti(datasets[0].filename, out_path, name), "left_out": left_out}
    if len(datasets) > 1 and all(is_projection_image([ds]) for ds in datasets):
        # (was: "only 2 slice(s): at least 3 are needed for a volume", or "not one volume")
        raise InputError(f"DICOM series {name}: {len(datasets)} X-ray images in one series (a PA and a lateral "
                         "view?): an image here is a series, so this server segments series of one X-ray each; "
                         "send each image as its own series")
    problem = describe_geometry_problem(datasets)
    tilt = problem is None and is_gantry_tilt(datasets)
    if problem:
        raise InputError(f"DICOM series {name}: {problem}")
    instances, cleared = decoded_instances(datasets, name)
    corrections: list[str] = []
    if cleared:
        left_out.append(f"bits above Bits Stored cleared in {cleared} slice(s) (overlay or garbage bits, which "
                        "the standard says to ignore)")
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
        # these instances, not the folder again (dicom2nifti read it anew, subfolders and a DICOMDIR included)
        dicom2nifti.convert_dicom.dicom_array_to_nifti(instances, out_path, reorient_nifti=True)
        to_series_order(out_path, datasets)
    except ConversionValidationError as e:
        raise InputError(f"DICOM series {name}: not a regular volume ({e})") from e
    except (ConversionError, ValueError, IndexError, AttributeError) as e:
        raise InputError(f"DICOM series {name}: cannot convert it: {type(e).__name__}: {e}") from e
    finally:
        d2n_settings.enable_validate_orthogonal()
        d2n_settings.disable_resampling()
    return {"path": out_path, "corrections": corrections, "left_out": left_out}


def decoded_instances(datasets: Sequence[pydicom.Dataset], name: str) -> tuple[list[pydicom.Dataset], int]:
    """Each instance read whole and its pixels decoded here (pydicom), with the bits above Bits Stored cleared
    (:func:`_stored_bits`: a set overlay bit made -1000 HU read as 31 768 HU; a review) and stored back as Explicit
    VR Little Endian, for dicom2nifti; and how many slices had such bits. A transfer syntax that cannot be decoded
    here (HTJ2K, JPEG XL with pydicom 2.4) is refused naming it (it raised a bare NotImplementedError: a 500), and
    a deflated one is inflated here (dicom2nifti's deferred read failed on it)."""
    out, cleared = [], 0
    for ds in datasets:
        where = os.path.basename(str(getattr(ds, "filename", "") or "")) or "an instance"
        full = pydicom.dcmread(ds.filename)
        full.filename = ds.filename
        syntax = getattr(getattr(full, "file_meta", None), "TransferSyntaxUID", None)
        try:
            stored = full.pixel_array
        except Exception as e:  # noqa: BLE001 - any decoder's failure is the same refusal, named
            said = f"{syntax.name} ({syntax})" if syntax else "no transfer syntax given"
            raise InputError(f"DICOM series {name}: the pixels of {where} cannot be decoded here ({said}: "
                             f"{type(e).__name__}: {str(e)[:160]}); ask the PACS for Explicit VR Little Endian "
                             "(uncompressed) or JPEG 2000 / JPEG lossless") from e
        if stored.ndim != 2:
            raise InputError(f"DICOM series {name}: {where} holds pixels of shape {stored.shape}, not one grey "
                             "slice (a colour or multi-frame image in a volume?)")
        values = _stored_bits(stored, full)
        if not np.array_equal(values, stored):
            cleared += 1
        full.PixelData = np.ascontiguousarray(values.astype(stored.dtype.newbyteorder("<"))).tobytes()
        full["PixelData"].VR = "OW" if stored.dtype.itemsize > 1 else "OB"
        full.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        full.is_little_endian, full.is_implicit_VR = True, False
        out.append(full)
    return out, cleared


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
    from the modality), a missing ``FrameOfReferenceUID`` (one made from the series UID, so that every SEG of the
    series has one frame). The UIDs the SEG references are the series' own; pixel data are copied as they are."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    repaired: set[str] = set()
    # the instances the conversion used (:func:`one_series`: no DICOMDIR, PR object or second copy beside them)
    for f in sorted(Path(ds.filename) for ds in one_series(read_series(folder), Path(folder).name)[0]):
        ds = pydicom.dcmread(str(f))
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
        if not str(ds.get("FrameOfReferenceUID", "") or "").strip():
            # dcmqi made a new frame of reference for every SEG of such a series (all 8 vendor MR series here), so
            # two SEGs of one series claimed two frames (a review, 2026-12-07): one, made from the series UID
            ds.FrameOfReferenceUID = _uid("frame-of-reference", str(ds.get("SeriesInstanceUID", "") or folder))
            repaired.add("no FrameOfReferenceUID (one made from the series UID, the same for every SEG of it)")
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


# -- projection radiographs (DX, CR, ...): one instance, one 2D image, no plane in space ---------------------------
PROJECTION_MODALITIES = {"CR", "DX", "MG", "IO", "PX", "RG"}
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}
NOT_IMAGES = {"SEG": "a segmentation", "RTSTRUCT": "contours", "SR": "a report", "PR": "a presentation state",
              "KO": "a key-object selection", "REG": "a registration", "RTPLAN": "a treatment plan"}
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
FOR_PROCESSING_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2.1",  # DX, MG,
                              "1.2.840.10008.5.1.4.1.1.1.3.1"}  # IO ("for processing")


def _frames(ds: pydicom.Dataset) -> int:
    value = str(ds.get("NumberOfFrames", 1) or 1)
    return int(value) if value.isdigit() else 1


def is_projection_image(datasets: Sequence[pydicom.Dataset]) -> bool:
    """One single-frame instance of a projection modality (CR, DX, MG, IO, PX, RG), or of another modality but CT,
    MR, PT or NM without a plane in space (no ImagePositionPatient or ImageOrientationPatient: a secondary capture of
    an X-ray): a 2D image, not a volume's slice. A single CT or MR slice (a localizer) is not one: it is refused as
    a volume of one slice, and one without its position as such."""
    if len(datasets) != 1 or _frames(datasets[0]) > 1:
        return False
    ds = datasets[0]
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in PROJECTION_MODALITIES:
        return True
    if modality in VOLUME_MODALITIES:  # a CT / MR slice without its position is a broken volume, named as such
        return False
    return not ds.get("ImagePositionPatient") or not ds.get("ImageOrientationPatient")


def is_projection_series(folder: str | os.PathLike) -> bool:
    """:func:`is_projection_image` of the DICOM files in ``folder``, or of the one DICOM file ``folder`` (False for
    anything else)."""
    try:
        files = [Path(folder)] if os.path.isfile(folder) else sorted(p for p in Path(folder).iterdir() if p.is_file())
    except OSError:
        return False
    found = []
    for f in files:  # headers only, and no further than a second DICOM file (a volume's folder: not one X-ray)
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM (skipped, as read_series does)
            continue
        if not _is_dicomdir(ds):  # (a CD export's index was taken for an X-ray)
            found.append(ds)
        if len(found) > 1:
            return False
    return is_projection_image(found)


MAGNIFICATION = (1.0, 5.0)  # source-to-detector over source-to-patient distance: 1 at least (~1.1 for a chest film)


def projection_affine(ds: pydicom.Dataset, name: str) -> np.ndarray:
    """The 2D image's NIfTI affine: i along the columns, j along the rows (as a PNG is read), spaced in mm by Pixel
    Spacing (in the patient, where calibrated), else Imager Pixel Spacing (at the detector: an X-ray's anatomy is
    magnified by some 10 %) divided by the Estimated Radiographic Magnification Factor where one is given (the size
    in the patient, as OHIF measures and the IHE mammography profile asks), else 1 per pixel (logged)."""
    def positive(value) -> float | None:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return None
        return v if np.isfinite(v) and v > 0 else None

    for tag in ("PixelSpacing", "ImagerPixelSpacing"):  # (row spacing, column spacing)
        value = ds.get(tag)
        try:
            row, col = positive(value[0]), positive(value[1])
        except (TypeError, IndexError, KeyError):
            continue
        if row and col:
            magnified = tag == "ImagerPixelSpacing" and positive(ds.get("EstimatedRadiographicMagnificationFactor"))
            if magnified and not MAGNIFICATION[0] <= magnified <= MAGNIFICATION[1]:
                logger.warning("DICOM image %s: Estimated Radiographic Magnification Factor %g is outside %g..%g: "
                               "not used", name, magnified, *MAGNIFICATION)
            elif magnified:
                row, col = row / magnified, col / magnified
            return np.diag([col, row, 1.0, 1.0])
    logger.warning("DICOM image %s has no pixel spacing: 1 per pixel", name)
    return np.eye(4)


def _stored_bits(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The stored values with the bits above Bits Stored cleared (overlay or garbage bits, which the standard says to
    ignore: one pixel of 61 696 in a 12-bit image put the real image into 0..7 of 255), sign-extended when signed."""
    bits = int(ds.get("BitsStored", 0) or 0)
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    values = stored.astype(np.int64)
    if not 0 < bits < allocated:
        return values
    values &= (1 << bits) - 1
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        sign = 1 << (bits - 1)
        values = (values ^ sign) - sign
    return values


def _voi_lut(values: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, float, float]:
    """The first VOI LUT of ``ds`` applied to ``values`` (the Modality LUT's output), with its output range. Read
    here rather than with pydicom 2.4's ``apply_voi``, which indexed a LUT of 8-bit entries with 8-bit indices (a
    4 096-entry LUT scrambled the image) and read a signed image's first mapped value coded as US (-2048 as
    63 488) as it is (every pixel took the first entry)."""
    from struct import unpack_from

    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor[:3])
    entries = entries or 65536
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first >= 32768:
        first -= 65536  # a signed image's first mapped value, coded as US (the descriptor's VR is US or SS)
    if not 1 <= bits <= 16:
        raise ValueError(f"its VOI LUT has {bits} bits per entry (1..16)")
    data = item["LUTData"]
    if isinstance(data.value, (bytes, bytearray)):  # OW: 16-bit words
        raw = bytes(data.value)
        if len(raw) < 2 * entries:
            raise ValueError(f"its VOI LUT holds {len(raw) // 2} entries, its descriptor says {entries}")
        lut = np.asarray(unpack_from(f"{'<' if ds.is_little_endian else '>'}{entries}H", raw), dtype=np.float64)
    else:
        lut = np.asarray(list(data.value) if not isinstance(data.value, (int, float)) else [data.value],
                         dtype=np.float64)
        if lut.size < entries:
            raise ValueError(f"its VOI LUT holds {lut.size} entries, its descriptor says {entries}")
        lut = lut[:entries]
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)
    return lut[index], float(lut.min()), float(lut.max())


def projection_display(ds: pydicom.Dataset, name: str) -> np.ndarray:
    """The image as a viewer displays it, ``(rows, columns)`` float32 in 0..255 (what the 2D models were trained on:
    8-bit X-rays, bright bone): the stored values (bits above Bits Stored cleared) -> Modality LUT (rescale) -> the
    first VOI LUT, else the first window (centre/width), scaled from its output range to 0..255 -- without either
    (or with empty ones), the image's own minimum..maximum, as OHIF (cornerstone) and 3D Slicer show such an image
    -- and MONOCHROME1 (white is the lowest value) inverted. Presentation LUT Shape is not read: a DX writes
    INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2, the same rendering as the photometric interpretation."""
    from struct import error as StructError

    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_windowing

    where = f"DICOM image {name}"
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"{where}: a colour image ({photometric or 'no PhotometricInterpretation'}, {samples} "
                         "sample(s) per pixel): the 2D models read grey-scale X-rays (MONOCHROME1 or MONOCHROME2)")
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID",
                                                         "") or "")
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if sop_class in FOR_PROCESSING_SOP_CLASSES or intent == "FOR PROCESSING":
        raise InputError(f"{where}: a 'for processing' image (the detector's raw data, not what a radiologist "
                         "reads): send the 'for presentation' image of this exposure")
    from .transforms import MAX_VOXELS

    try:
        declared = int(ds.Rows) * int(ds.Columns) * samples
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"{where}: no usable Rows / Columns in its header") from None
    if declared > MAX_VOXELS:  # before decoding (a compressed 20 000^2 image is a few KB; decoded 800 MB and more)
        raise InputError(f"{where}: {ds.Columns} x {ds.Rows} pixels, more than this server's limit of "
                         f"{MAX_VOXELS:,} (DFM_MAX_VOXELS); refused before reading it")
    try:
        stored = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - an unsupported or broken encoding: named, not a 500
        raise InputError(f"{where}: its pixel data cannot be decoded ({type(e).__name__}: {str(e)[:200]})") from e
    if stored.ndim != 2:
        raise InputError(f"{where}: pixel data of shape {tuple(stored.shape)}, not one grey-scale image")
    for tag in ("WindowCenter", "WindowWidth", "VOILUTFunction"):  # present but empty (type 2): as absent
        if tag in ds and (ds[tag].value is None or str(ds[tag].value).strip() in ("", "[]")):
            del ds[tag]
    try:
        values = apply_modality_lut(_stored_bits(stored, ds), ds)
        if ds.get("VOILUTSequence"):
            shown, lo, hi = _voi_lut(values, ds)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            shown = apply_windowing(values, ds, index=0)
            ends = apply_windowing(np.array([-1e12, 1e12]), ds, index=0)  # the window's output range
            lo, hi = float(ends.min()), float(ends.max())
        else:
            shown = values
            lo, hi = float(np.min(values)), float(np.max(values))
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, NotImplementedError, StructError) as e:
        raise InputError(f"{where}: its intensity transform (rescale / window / VOI LUT) cannot be applied: "
                         f"{type(e).__name__}: {str(e)[:200]}") from e
    shown = np.asarray(shown, dtype=np.float64)
    if not np.isfinite(shown).all():
        raise InputError(f"{where}: its intensities are not finite numbers after the rescale and window")
    out = np.clip((shown - lo) / (hi - lo) * 255.0, 0.0, 255.0) if hi > lo else np.zeros_like(shown)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return out.astype(np.float32)


def projection_to_nifti(folder: str | os.PathLike, out_path: str | os.PathLike, name: str) -> dict:
    """One projection radiograph (:func:`is_projection_image`; ``folder``: its series folder or its file) as a 2D
    NIfTI: the array ``(columns, rows)`` -- the voxel order of a PNG as MONAI reads it, and of the image's own
    pixels, so that a click or a label in its indices is the pixel the user saw -- with
    :func:`projection_display`'s grey values and :func:`projection_affine`'s spacing."""
    import nibabel as nib

    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file()] if os.path.isdir(folder) else [Path(folder)]
    ds = None
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except Exception:  # noqa: BLE001 - non-DICOM files beside it (read_series skipped them too)
            continue
        if not _is_dicomdir(ds):
            break
        ds = None
    if ds is None:
        raise InputError(f"DICOM image {name}: no DICOM file")
    image = projection_display(ds, name)
    out = nib.Nifti1Image(np.ascontiguousarray(image.T), projection_affine(ds, name))
    out.header.set_xyzt_units("mm")
    nib.save(out, str(out_path))
    return {"path": str(out_path), "corrections": []}


# the segmentation property categories (DICOM CID 7150) of the type lists (CIDs 7191-7197) a segment's name is
# looked up in; "Anatomical Structure" as SNOMED's 91723000 (pydicom's dictionary also has the older 123037004)
_CATEGORY_OF_CID = {7191: ("85756007", "Tissue"), 7192: ("91723000", "Anatomical Structure"),
                    7193: ("260787004", "Physical object"), 7194: ("49755003", "Morphologically Abnormal Structure"),
                    7195: ("246464006", "Function"), 7196: ("309825002", "Spatial and Relational Concept"),
                    7197: ("91720002", "Body Substance")}
# names a label here goes by that the DICOM lists spell otherwise (British spelling, plurals, a lesion: SNOMED's
# 52988006, in no segmentation list, so its category is the one Slicer's terminology gives it)
_SEGMENT_SYNONYMS = {"tumour": "Neoplasm", "tumor": "Neoplasm", "lungs": "Lung", "vertebrae": "Vertebra",
                     "oedema": "Edema", "haemorrhage": "Hemorrhage", "necrotic": "Necrosis", "lesion": ("Lesion", 7194)}
_LATERALITY = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}
# distinct display colours by label value (recommendedDisplayRGBValue: every segment was red)
SEGMENT_COLOURS = [(216, 101, 79), (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210),
                    (220, 245, 20), (230, 220, 70), (144, 238, 144), (183, 156, 220), (255, 128, 0)]
_DEFAULT_TYPE = ("85756007", "Tissue")


def segment_colour(value: int) -> list[int]:
    """The display colour (RGB) of the segment of label value ``value``, where the client gives none."""
    return list(SEGMENT_COLOURS[(int(value) - 1) % len(SEGMENT_COLOURS)])


@functools.lru_cache(maxsize=None)
def _segment_type_index() -> dict:
    """lower-case keyword (and synonym) -> (value, meaning, cid): each keyword's code in the list it is found in
    (pydicom's concepts by CID: "Mass" has two SNOMED codes, 4147007 in CID 7194; asking pydicom by keyword for such
    a one raised, and a label named "breast mass" failed to save: a review)."""
    from pydicom.sr._cid_dict import cid_concepts
    from pydicom.sr._concepts_dict import concepts

    index = {}
    for cid in _CATEGORY_OF_CID:
        for keyword in cid_concepts.get(cid, {}).get("SCT", []):
            found = [(value, meaning) for value, (meaning, cids) in concepts["SCT"].get(keyword, {}).items()
                     if cid in cids]
            if len(found) == 1:
                index.setdefault(keyword.lower(), (*found[0], cid))
    for name, target in _SEGMENT_SYNONYMS.items():
        if isinstance(target, tuple):  # (a code in no segmentation list, its category given)
            keyword, cid = target
            (value, (meaning, _)), = concepts["SCT"][keyword].items()
            index[name] = (value, meaning, cid)
        else:
            index[name] = index[target.lower()]
    return index


def segment_codes(name: str) -> dict:
    """The DICOM codes of a segment named ``name`` (``lung``, ``left_lung``, ``whole_tumour``, ``vertebra``): its
    property category and type from DICOM's segmentation lists (CIDs 7191-7197, pydicom's dictionary), looked up by
    the whole name, then by each word from the last (``tumour_core`` -> Neoplasm), and a laterality modifier for a
    ``left``/``right`` word that the type found does not already hold ("Left Ventricle" has none added); a name in no
    list keeps the generic Anatomical Structure / Tissue. Every segment was coded Tissue, so a viewer or a PACS
    query by code could not tell a lung from a tumour."""
    index = _segment_type_index()
    words = [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w]
    matched = next((key for key in ["".join(words)] + words[::-1] if key in index), None)
    value, meaning, cid = index[matched] if matched else (*_DEFAULT_TYPE, 7192)
    category = _CATEGORY_OF_CID[cid]
    out = {"SegmentedPropertyCategoryCodeSequence": {"CodeValue": category[0], "CodingSchemeDesignator": "SCT",
                                                     "CodeMeaning": category[1]},
           "SegmentedPropertyTypeCodeSequence": {"CodeValue": value, "CodingSchemeDesignator": "SCT",
                                                 "CodeMeaning": meaning[:1].upper() + meaning[1:]}}
    side = next((_LATERALITY[w] for w in words if w in _LATERALITY), None)
    if side and matched and matched in words:  # (a whole-name match such as "leftventricle" holds its side)
        out["SegmentedPropertyTypeModifierCodeSequence"] = {"CodeValue": side[0], "CodingSchemeDesignator": "SCT",
                                                            "CodeMeaning": side[1]}
    return out


def _segment_description(entry: dict, number: int):
    """A highdicom segment description from one entry of MONAI Label's ``label_info`` (``name``, ``model_name``,
    ``color``, or the dcmqi ``segmentAttribute`` the datastore fills in)."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    attr = entry.get("segmentAttribute") if isinstance(entry.get("segmentAttribute"), dict) else {}
    name = str(attr.get("SegmentLabel") or entry.get("name") or f"segment {number}")[:64]
    kind = str(attr.get("SegmentAlgorithmType") or entry.get("algorithm_type") or "AUTOMATIC").upper()
    if kind not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
        kind = "AUTOMATIC"
    algorithm = str(attr.get("SegmentAlgorithmName") or entry.get("model_name") or "DFM+VLM")[:64]

    # the client's codes, else those of the segment's name (the modifier goes with the type it modifies)
    given = {k: v for k, v in attr.items() if isinstance(v, dict) and v.get("CodeValue")}
    coded = segment_codes(name)
    if "SegmentedPropertyTypeCodeSequence" in given:
        coded.pop("SegmentedPropertyTypeModifierCodeSequence", None)
    coded.update(given)

    def code(key):
        c = coded.get(key)
        return Code(str(c["CodeValue"]), str(c.get("CodingSchemeDesignator") or "SCT"),
                    str(c.get("CodeMeaning") or c["CodeValue"])[:64]) if c else None

    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=name,
        segmented_property_category=code("SegmentedPropertyCategoryCodeSequence"),
        segmented_property_type=code("SegmentedPropertyTypeCodeSequence"),
        algorithm_type=getattr(hd.seg.SegmentAlgorithmTypeValues, kind),
        algorithm_identification=None if kind == "MANUAL" else hd.AlgorithmIdentificationSequence(
            name=algorithm, version="1", family=Code("113037", "DCM", "Artificial Intelligence")),
        tracking_id=None, tracking_uid=None)
    modifier = code("SegmentedPropertyTypeModifierCodeSequence")
    if modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)]
    rgb = attr.get("recommendedDisplayRGBValue") or entry.get("color") or segment_colour(number)
    try:  # the colour a viewer draws it in, as dcmqi writes it for a volume's SEG (RGB -> CIELab)
        from skimage.color import rgb2lab

        lab = rgb2lab(np.asarray(list(rgb)[:3], float).reshape(1, 1, 3) / 255.0)[0, 0]
        description.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor(*map(float, lab)).value)
    except (TypeError, ValueError):  # (a client's colour that is not three numbers 0-255: none recommended)
        pass
    return description


def projection_seg(folder: str | os.PathLike, label_file: str, label_info) -> str:
    """The DICOM SEG (highdicom) of a label on the projection image in ``folder`` -- dcmqi, which writes the SEGs of
    volumes, needs a plane in space and wrote nothing for an X-ray. As MONAI Label's writer does: the i-th value
    present in the label is segment i + 1, described by ``label_info[i]``. Returns a temporary ``.dcm`` file."""
    import tempfile

    import highdicom as hd
    import SimpleITK as sitk

    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file()]
    source = pydicom.dcmread(str(files[0]))
    # what highdicom copies from the source and needs (type 2: present, may be empty), missing in anonymised X-rays
    # (an AttributeError, a 500, a review); with a frame of reference it wrote plane positions, asking for a slice
    # thickness an X-ray has not: the SEG of a 2D image references the image itself, frame by frame
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in source:
            setattr(source, keyword, "")
    if "FrameOfReferenceUID" in source:
        del source.FrameOfReferenceUID
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))  # (rows, columns), or (1, rows, columns)
    if label.ndim == 3 and label.shape[0] == 1:  # 3D Slicer saves a 2D image's label as a one-slice volume
        label = label[0]
    shape = (int(source.Rows), int(source.Columns))
    if label.shape != shape:
        raise InputError(f"the label's grid {tuple(label.shape[::-1])} (columns x rows) is not the X-ray's "
                         f"{shape[::-1]}")
    present = [int(v) for v in np.unique(label) if v != 0]
    entries = [x if isinstance(x, dict) else {} for x in (label_info or [])]
    numbered = np.zeros(shape, np.uint8)
    descriptions = []
    for i, v in enumerate(present):
        numbered[label == v] = i + 1
        descriptions.append(_segment_description(entries[i] if i < len(entries) else {}, i + 1))
    model = next((str(x["model_name"]) for x in entries if x.get("model_name")), "DFM+VLM")
    try:
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=numbered[None],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="DFM+VLM", manufacturer_model_name=model[:64], software_versions="1",
            device_serial_number="1", series_description=model[:64], omit_empty_frames=False)
    except (AttributeError, TypeError, ValueError, KeyError) as e:  # an attribute of the X-ray highdicom refuses
        raise InputError(f"highdicom could not write the DICOM SEG of this X-ray: {type(e).__name__}: "
                         f"{str(e)[:200]}") from e
    out = tempfile.NamedTemporaryFile(suffix=".dcm", delete=False).name
    seg.save_as(out)
    return out


def projection_seg_label(seg_folder: str | os.PathLike, image_nifti: str, out_path: str) -> str:
    """The label of a DICOM SEG of a projection image, as a NIfTI on that image's converted grid
    (:func:`projection_to_nifti`): each frame's pixels take its segment's number. Read with pydicom (the SEG of an
    image without a frame of reference has no plane positions, which MONAI Label's pydicom-seg reader needs)."""
    import nibabel as nib

    seg = None
    for p in sorted(Path(seg_folder).iterdir()):
        try:
            ds = pydicom.dcmread(str(p)) if p.is_file() else None
        except Exception:  # noqa: BLE001 - not DICOM: skipped, as the series reader does
            continue
        if ds is not None and str(ds.get("Modality", "")) == "SEG":
            seg = ds
            break
    if seg is None:
        raise InputError(f"{seg_folder}: no DICOM SEG")
    image = nib.load(image_nifti)
    columns, rows = image.shape[:2]
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise InputError(f"the DICOM SEG {seg.SeriesInstanceUID} has {seg.Columns} x {seg.Rows} pixels, its X-ray "
                         f"{columns} x {rows}")
    fractional = str(seg.get("SegmentationType", "")) == "FRACTIONAL"
    threshold = float(seg.get("MaximumFractionalValue", 255)) / 2 if fractional else 0
    label = np.zeros((rows, columns), np.uint8)
    try:
        frames = seg.pixel_array.reshape(-1, rows, columns)
        groups = seg.PerFrameFunctionalGroupsSequence
        if len(groups) != len(frames):
            raise ValueError(f"{len(frames)} frames, {len(groups)} per-frame descriptions")
        for frame, group in zip(frames, groups):
            number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if not 1 <= number <= 255:
                raise ValueError(f"segment number {number} (a label holds 1..255)")
            label[frame > threshold] = number
    except Exception as e:  # noqa: BLE001 - a SEG another tool wrote badly, or pixels that cannot be decoded
        raise InputError(f"the DICOM SEG {seg.get('SeriesInstanceUID', '?')} of the X-ray cannot be read: "
                         f"{type(e).__name__}: {str(e)[:200]}") from e
    nib.save(nib.Nifti1Image(np.ascontiguousarray(label.T), image.affine), out_path)
    return out_path


def write_xray(stored: np.ndarray, out_file: str | os.PathLike, *, photometric: str = "MONOCHROME2",
               bits_stored: int = 8, window: tuple[float, float] | None = None, voi_function: str | None = None,
               pixel_spacing: tuple[float, float] | None = None, modality: str = "DX", samples: int = 1,
               seed: str = "dfm-vlm-xray") -> dict:
    """Write ``stored`` ((rows, columns) of stored values, or (rows, columns, 3) RGB with ``samples`` 3) as one
    projection radiograph, DX For Presentation (or ``modality`` CR): the header a detector writes, with
    deterministic UIDs from ``seed``."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else "1.2.840.10008.5.1.4.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(seed, "sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("dfm-vlm-implementation")
    ds = FileDataset(str(out_file), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(seed, "study"), _uid(seed, "series")
    ds.Modality = modality
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "XRAY-001", "Phantom^Xray", "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "dfm-vlm-seg"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if pixel_spacing is not None:
        ds.ImagerPixelSpacing = [float(v) for v in pixel_spacing]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits_stored, bits_stored - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    if voi_function:
        ds.VOILUTFunction = voi_function
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint8 if allocated == 8 else np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(out_file), write_like_original=False)
    return {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
            "SOPInstanceUID": ds.SOPInstanceUID}
