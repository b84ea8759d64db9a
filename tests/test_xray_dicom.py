"""Chest X-rays as a PACS holds them: one DX / CR instance, a 2D image (they were refused as "only 1 slice(s)").

The image reads as the PNG of the same pixels reads (voxel order, grey values after the window, MONOCHROME1
inverted, pixel spacing), the shipped 2D model gives the same result on both, and a final label goes to the PACS as
a DICOM SEG of the X-ray and comes back from it pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import ROOT
from lib.transforms import InputError

PHANTOM = ROOT / "sample_data" / "phantom_xray_05.png"  # not among the sample labels: the model never trained on it
SHIPPED_2D = ROOT / "sample_data" / "models" / "dfm_vlm_2d.pt"
needs_sample = pytest.mark.skipif(not PHANTOM.exists() or not SHIPPED_2D.exists(),
                                  reason="sample_data (phantom X-rays, the shipped 2D checkpoint) not found")


def _pixels() -> np.ndarray:
    """(rows, columns) of a sample X-ray, cut to 256 x 216: not square, so that a transposed image cannot pass."""
    return np.asarray(Image.open(PHANTOM).convert("L"), dtype=np.int64)[:, 20:236]


def _variants(tmp_path: Path, p: np.ndarray) -> dict:
    """The same picture stored as detectors store it; each reads back as ``p`` (the window inverts the storage)."""
    from lib.dicom import write_xray

    out = {}
    # 12 bits, white = 0 (MONOCHROME1), a LINEAR_EXACT window whose output is p again: (x - c) / w + 0.5 of the range
    out["dx_monochrome1_12bit"] = write_xray(4095 - 16 * p, tmp_path / "m1" / "x.dcm", photometric="MONOCHROME1",
                                             bits_stored=12, window=(2055, 4080), voi_function="LINEAR_EXACT",
                                             pixel_spacing=(1.0, 1.0), seed="m1")
    out["dx_monochrome2_8bit"] = write_xray(p, tmp_path / "m2" / "x.dcm", window=(127.5, 255),
                                            voi_function="LINEAR_EXACT", pixel_spacing=(1.0, 1.0), seed="m2")
    out["cr_no_spacing"] = write_xray(p, tmp_path / "cr" / "x.dcm", modality="CR", window=(127.5, 255),
                                      voi_function="LINEAR_EXACT", seed="cr")
    return out


@needs_sample
def test_an_xray_dicom_reads_as_its_png_does(tmp_path):
    """Through the loader every model uses (a DICOM folder is converted by lib.dicom.series_to_nifti, the DICOMweb
    datastore's one path): the same array as the PNG, in the same voxel order, with the DICOM's pixel spacing."""
    from lib.dicom import write_xray
    from lib.transforms import LoadImageChecked, image_spatial_dims

    p = _pixels()
    Image.fromarray(p.astype(np.uint8)).save(tmp_path / "x.png")
    load = LoadImageChecked(["image"], image_only=True)
    ref = load({"image": str(tmp_path / "x.png")})["image"]
    assert tuple(ref.shape) == (216, 256)  # MONAI reads a PNG (columns, rows)
    for name in _variants(tmp_path, p):
        folder = tmp_path / {"dx_monochrome1_12bit": "m1", "dx_monochrome2_8bit": "m2", "cr_no_spacing": "cr"}[name]
        got = load({"image": str(folder)})["image"]
        assert tuple(got.shape) == tuple(ref.shape), name
        assert float((got - ref).abs().max()) < 1e-3, (name, float((got - ref).abs().max()))
        assert np.allclose(got.pixdim.numpy(), [1.0, 1.0]), (name, got.pixdim)
        # the X-ray's file alone reads as its folder (MONAI's reader took the stored values, as a (X, Y, 1) volume),
        # and the models that take it are the 2D ones (training, scoring, batch inference sort images so)
        one = load({"image": str(folder / "x.dcm")})["image"]
        assert tuple(one.shape) == tuple(ref.shape) and float((one - ref).abs().max()) < 1e-3, name
        assert image_spatial_dims(folder) == image_spatial_dims(folder / "x.dcm") == 2
    # as detectors and PACS exports also write it (a review, 2026-12-07: each read wrong or refused):
    # - overlay bits above the 12 stored ones set in a pixel (cleared, as the standard says: the pixel read 61 696);
    # - a 4 096-entry VOI LUT of 8-bit entries (pydicom indexed it with 8-bit indices: a scrambled image);
    # - a signed image whose LUT's first mapped value is coded as US (-2048 as 63 488: every pixel the first entry);
    # - a file named as PACS exports name them, without an extension
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(str(tmp_path / "m1" / "x.dcm"))
    arr = ds.pixel_array.copy()
    arr[5, 7] |= 0xF000
    ds.PixelData = arr.tobytes()
    ds.save_as(str(tmp_path / "overlay.dcm"))
    lut8 = Dataset()
    lut8.LUTDescriptor = [4096, 0, 8]
    lut8.add_new(0x00283006, "US", (np.arange(4096) // 16).tolist())
    write_xray(16 * p, tmp_path / "lut8" / "x.dcm", bits_stored=12, seed="lut8")
    ds = pydicom.dcmread(str(tmp_path / "lut8" / "x.dcm"))
    ds.VOILUTSequence = [lut8]
    ds.save_as(str(tmp_path / "lut8" / "x.dcm"))
    signed = Dataset()
    signed.add_new(0x00283002, "US", [4096, 63488, 8])  # LUT Descriptor: -2048 coded as US
    signed.add_new(0x00283006, "US", (np.arange(4096) // 16).tolist())
    write_xray((16 * p - 2048) & 0xFFFF, tmp_path / "signed" / "x.dcm", bits_stored=16, seed="signed")
    ds = pydicom.dcmread(str(tmp_path / "signed" / "x.dcm"))
    ds.PixelRepresentation = 1
    ds.VOILUTSequence = [signed]
    ds.save_as(str(tmp_path / "signed" / "x.dcm"))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "IM0001").write_bytes((tmp_path / "m1" / "x.dcm").read_bytes())
    for case in ("overlay.dcm", "lut8", "signed", "export/IM0001"):
        got = load({"image": str(tmp_path / case)})["image"]
        assert tuple(got.shape) == tuple(ref.shape) and float((got - ref).abs().max()) < 1e-3, \
            (case, float((got - ref).abs().max()))
    # empty window tags (type 2, present and empty): as no window, the image's own range (they were a 422)
    write_xray(p, tmp_path / "empty" / "x.dcm", seed="empty")
    ds = pydicom.dcmread(str(tmp_path / "empty" / "x.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "", "", ""
    ds.save_as(str(tmp_path / "empty" / "x.dcm"))
    got = load({"image": str(tmp_path / "empty")})["image"].numpy()
    assert np.abs(got - (p.T - p.min()) / (p.max() - p.min()) * 255.0).max() < 1e-3
    # compressed as a PACS may store it (RLE Lossless: pydicom's decoders)
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(str(tmp_path / "m1" / "x.dcm"))
    ds.compress(RLELossless)
    ds.save_as(str(tmp_path / "rle.dcm"))
    got = load({"image": str(tmp_path / "rle.dcm")})["image"]
    assert float((got - ref).abs().max()) < 1e-3
    # the spacing a detector writes, rows then columns: i (columns) 0.25 mm, j (rows) 0.5 mm
    write_xray(p, tmp_path / "aniso" / "x.dcm", window=(127.5, 255), voi_function="LINEAR_EXACT",
               pixel_spacing=(0.5, 0.25), seed="aniso")
    got = load({"image": str(tmp_path / "aniso")})["image"]
    assert np.allclose(got.pixdim.numpy(), [0.25, 0.5]), got.pixdim
    # the detector's spacing alone, with the magnification the X-ray's geometry gives: the size in the patient (as
    # OHIF's ruler); a magnification that is no number, or below 1 (impossible: a ratio of distances), is not used
    ds = pydicom.dcmread(str(tmp_path / "aniso" / "x.dcm"))
    del ds.PixelSpacing
    for ermf, want in (("1.25", [0.2, 0.4]), ("-1.25", [0.25, 0.5]), ("", [0.25, 0.5]), ("0.5", [0.25, 0.5])):
        ds.EstimatedRadiographicMagnificationFactor = ermf
        ds.save_as(str(tmp_path / "aniso" / "x.dcm"))
        got = load({"image": str(tmp_path / "aniso")})["image"]
        assert np.allclose(got.pixdim.numpy(), want), (ermf, got.pixdim)
    # a VOI LUT instead of a window (CR and DX vendors ship curves): the LUT's output, scaled from its range; OW
    # and US LUT data alike
    from pydicom.dataset import Dataset

    lut = (np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # a curve, not a line
    stored = (p * 16).astype(np.int64)
    want_lut = ((lut[stored] - lut.min()) / (lut.max() - lut.min()) * 255.0).T
    for vr in ("US", "OW"):
        write_xray(stored, tmp_path / f"lut_{vr}" / "x.dcm", bits_stored=12, seed=f"lut_{vr}")
        ds = pydicom.dcmread(str(tmp_path / f"lut_{vr}" / "x.dcm"))
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.add_new(0x00283006, vr, lut.tolist() if vr == "US" else lut.astype("<u2").tobytes())
        ds.VOILUTSequence = [item]
        ds.save_as(str(tmp_path / f"lut_{vr}" / "x.dcm"))
        got = load({"image": str(tmp_path / f"lut_{vr}")})["image"].numpy()
        assert np.abs(got - want_lut).max() < 1e-3, vr
    # no window: the image's own range, as a viewer shows it (16 bits, of which 1000..3040 are used)
    write_xray(1000 + 8 * p, tmp_path / "raw" / "x.dcm", bits_stored=16, seed="raw")
    got = load({"image": str(tmp_path / "raw")})["image"].numpy()
    want = (p.T - p.min()) / (p.max() - p.min()) * 255.0
    assert np.abs(got - want).max() < 1e-3


def test_what_is_not_an_xray_the_models_read_is_refused_naming_why(tmp_path):
    from lib.dicom import series_to_nifti, write_ct_series, write_xray

    p = np.random.default_rng(0).integers(0, 255, (40, 30))
    rgb = np.repeat(p[..., None], 3, axis=2)
    write_xray(rgb, tmp_path / "rgb" / "x.dcm", photometric="RGB", samples=3, seed="rgb")
    write_xray(p, tmp_path / "zero" / "x.dcm", window=(100, 0), seed="zero")  # a LINEAR window of width 0
    write_xray(p, tmp_path / "raw" / "x.dcm", seed="raw")
    ds = pydicom.dcmread(str(tmp_path / "raw" / "x.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1.1"  # DX for processing
    ds.PresentationIntentType = "FOR PROCESSING"
    ds.save_as(str(tmp_path / "raw" / "x.dcm"))
    write_ct_series(np.zeros((20, 20, 1)), np.eye(4), tmp_path / "ct1", seed="ct1")  # one CT slice: a localizer
    write_xray(p, tmp_path / "huge" / "x.dcm", seed="huge")  # a header declaring 20 000 x 20 000 pixels
    ds = pydicom.dcmread(str(tmp_path / "huge" / "x.dcm"))
    ds.Rows = ds.Columns = 20000
    ds.save_as(str(tmp_path / "huge" / "x.dcm"))
    write_xray(p, tmp_path / "two" / "pa.dcm", seed="pa")  # two views in one series
    lateral = pydicom.dcmread(str(tmp_path / "two" / "pa.dcm"))
    lateral.SOPInstanceUID = "1.2.3.4.5"
    lateral.save_as(str(tmp_path / "two" / "lat.dcm"))
    write_ct_series(np.zeros((20, 20, 4)), np.eye(4), tmp_path / "ct_no_position", seed="ctnp")
    for f in (tmp_path / "ct_no_position").iterdir():  # a CT series without positions: a broken volume, named so
        ds = pydicom.dcmread(str(f))
        del ds.ImagePositionPatient
        ds.save_as(str(f))
    for modality in ("RTSTRUCT", " sr ", "seg"):  # what is no image (an X-ray's SEG has no plane either)
        folder = f"not_image_{modality.strip()}"
        write_xray(p, tmp_path / folder / "x.dcm", window=(127.5, 255), seed=folder)
        ds = pydicom.dcmread(str(tmp_path / folder / "x.dcm"))
        ds.Modality = modality
        ds.save_as(str(tmp_path / folder / "x.dcm"))
        with pytest.raises(InputError, match=rf"a {modality.strip().upper()} series \(.*\), not an image"):
            series_to_nifti(tmp_path / folder, tmp_path / f"{folder}.nii.gz")
    for modality in ("OT", ""):  # a secondary capture of an X-ray, or no modality: converted
        folder = f"image_{modality or 'none'}"
        write_xray(p, tmp_path / folder / "x.dcm", window=(127.5, 255), seed=folder)
        ds = pydicom.dcmread(str(tmp_path / folder / "x.dcm"))
        ds.Modality = modality
        ds.save_as(str(tmp_path / folder / "x.dcm"))
        series_to_nifti(tmp_path / folder, tmp_path / f"{folder}.nii.gz")
    for folder, why in (("rgb", "a colour image (RGB, 3 sample(s) per pixel)"), ("zero", "Window Width"),
                        ("ct_no_position", "has no ImagePositionPatient (0020,0032)"),
                        ("raw", "a 'for processing' image"), ("ct1", "only 1 slice(s)"),
                        ("two", "2 X-ray images in one series"),
                        ("huge", "20000 x 20000 pixels, more than this server's limit")):
        with pytest.raises(InputError) as e:
            series_to_nifti(tmp_path / folder, tmp_path / f"{folder}.nii.gz")
        assert why in str(e.value), (folder, str(e.value))


@needs_sample
def test_the_2d_model_segments_the_xray_dicom_as_its_png_and_the_3d_model_refuses_it(tmp_path):
    from lib.configs.dfm_vlm_2d import DFMVLM2D

    p = _pixels()
    (tmp_path / "png").mkdir()
    Image.fromarray(p.astype(np.uint8)).save(tmp_path / "png" / "m1.png")  # the case id seeds the windows: "m1"
    _variants(tmp_path, p)
    cfg = DFMVLM2D()
    cfg.init("dfm_vlm_2d", str(tmp_path / "model"), {"dfm_vlm_2d_checkpoint": str(SHIPPED_2D)}, None)
    task = cfg.infer()
    req = {"skip_writer": True, "device": "cpu", "seed": 3}
    _, png = task({"image": str(tmp_path / "png" / "m1.png"), **req})
    _, dx = task({"image": str(tmp_path / "m1"), **req})
    prob_png, prob_dx = np.asarray(png["prob"]), np.asarray(dx["prob"])
    assert prob_png.shape == prob_dx.shape
    assert np.abs(prob_png - prob_dx).max() < 1e-4, np.abs(prob_png - prob_dx).max()
    lab = np.asarray(dx["pred"])
    assert 0.05 < (lab > 0).mean() < 0.95, "the model found nothing in the X-ray: this comparison would prove nothing"
    # the 3D model: a clear refusal naming the image's dimensions, not a 500 from deep in the transforms
    from lib.configs.dfm_vlm_3d import DFMVLM3D

    shipped_3d = ROOT / "sample_data" / "models" / "dfm_vlm_3d.pt"
    if shipped_3d.exists():
        cfg3 = DFMVLM3D()
        cfg3.init("dfm_vlm_3d", str(tmp_path / "model3"), {"dfm_vlm_3d_checkpoint": str(shipped_3d)}, None)
        with pytest.raises(InputError, match=r"a 2D image \(shape \(216, 256\).* was given to a 3D model"):
            cfg3.infer()({"image": str(tmp_path / "m1"), **req})


class _XrayPACS:
    """A PACS holding one DX instance (DICOMweb calls as CheckedDICOMWebDatastore makes them); STOW-RS keeps what it
    is sent, and SEGs it holds are listed as SEG series."""

    base_url = "http://fake-pacs/dicom-web"

    def __init__(self, folder):
        self.files = [pydicom.dcmread(str(f)) for f in sorted(Path(folder).iterdir())]
        self.stored = []

    def search_for_series(self, search_filters=None, **_):
        f = search_filters or {}
        out = []
        for ds in self.files:
            if f.get("SeriesInstanceUID") not in (None, ds.SeriesInstanceUID):
                continue
            if f.get("Modality") not in (None, ds.Modality):
                continue
            out.append({"0020000E": {"vr": "UI", "Value": [ds.SeriesInstanceUID]},
                        "0020000D": {"vr": "UI", "Value": [ds.StudyInstanceUID]},
                        "00080060": {"vr": "CS", "Value": [ds.Modality]},
                        "00201209": {"vr": "IS", "Value": [1]}})
        return out

    def retrieve_series(self, study, series, media_types=None):
        return [ds for ds in self.files if ds.SeriesInstanceUID == series]

    def retrieve_series_metadata(self, study, series):
        return [ds.to_json_dict() for ds in self.files if ds.SeriesInstanceUID == series]

    def store_instances(self, datasets):
        from pydicom.dataset import Dataset

        self.stored.extend(datasets)
        r = Dataset()
        r.RetrieveURL = f"{self.base_url}/studies/1/series/{datasets[0].SeriesInstanceUID}"
        return r


def _datastore(client, cache, search_filter=None):
    from lib.datastore import CheckedDICOMWebDatastore

    ds = CheckedDICOMWebDatastore(client=client, search_filter=search_filter or {}, cache_path=str(cache),
                                  fetch_by_frame=False, convert_to_nifti=True)
    ds._observer.stop()
    ds._observer.join()
    return ds


@needs_sample
def test_a_final_label_of_an_xray_goes_to_the_pacs_as_its_seg_and_comes_back_pixel_for_pixel(tmp_path):
    """Submit Label on a DX from the PACS: dcmqi (which writes the SEGs of volumes) needs a plane in space and
    wrote nothing for an X-ray; the SEG is written with highdicom, references the X-ray, and holds the label's
    pixels in the X-ray's own rows and columns; a training (another cache) reads it back as the label that was
    sent, its segment names with it."""
    p = _pixels()
    info = _variants(tmp_path, p)["dx_monochrome1_12bit"]
    # anonymised as X-rays often are (type 2 attributes left out), with a frame of reference: highdicom needed the
    # first and asked for a slice thickness for the second (AttributeErrors: a 500, a review)
    ds = pydicom.dcmread(str(tmp_path / "m1" / "x.dcm"))
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "StudyTime", "PatientID"):
        delattr(ds, keyword)
    ds.FrameOfReferenceUID = "1.2.3.4.5.6"
    ds.save_as(str(tmp_path / "m1" / "x.dcm"))
    client = _XrayPACS(tmp_path / "m1")
    annotator = _datastore(client, tmp_path / "cache")
    uid = info["SeriesInstanceUID"]
    uri = annotator.get_image_uri(uid)
    img = nib.load(uri)
    assert img.shape == (216, 256)
    lab = np.zeros(img.shape, np.uint8)  # (columns, rows), as the app's result and Slicer's label are
    lab[30:90, 40:200] = 1
    lab[120:200, 60:100] = 2
    nib.save(nib.Nifti1Image(lab, img.affine), str(tmp_path / "label.nii.gz"))
    annotator.save_label(uid, str(tmp_path / "label.nii.gz"), "final",
                         {"label_info": [{"name": "left lung", "idx": 1}, {"name": "right lung", "idx": 2}]})
    (seg,) = client.stored
    from fastapi import HTTPException

    with pytest.raises(HTTPException, match="has no final label: no SEG in the PACS references it") as e:
        _datastore(client, tmp_path / "cache_nolabel").get_label_uri(uid, "final")  # (the SEG is not in the PACS yet)
    assert e.value.status_code == 404
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["left lung", "right lung"]
    # coded by name, with the side (every segment was "Tissue"), each in its own colour (the two were one)
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence]
    assert [(str(t.CodeValue), str(t.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning)) for t in types] == \
        [("39607008", "Left"), ("39607008", "Right")]
    assert {str(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue) for s in seg.SegmentSequence} == {"91723000"}
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence]
    assert len(set(colours)) == 2, colours
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == info["SOPInstanceUID"]
    frames = seg.pixel_array.reshape(-1, 256, 216)
    numbers = [int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for g in seg.PerFrameFunctionalGroupsSequence]
    painted = np.zeros((256, 216), np.uint8)
    for frame, n in zip(frames, numbers):
        painted[frame > 0] = n
    assert np.array_equal(painted, lab.T), "the SEG's pixels are not the label's, in the X-ray's rows and columns"
    # a training's datastore (another cache) reads the SEG back from the PACS
    client.files.append(seg)
    trainer = _datastore(client, tmp_path / "cache2")
    path = trainer.get_label_uri(seg.SeriesInstanceUID, "final", uid)
    assert path, "the SEG of the X-ray was not read back"
    assert np.array_equal(np.asarray(nib.load(path).dataobj), lab)
    assert np.allclose(nib.load(path).affine, img.affine)
    assert trainer.get_label_info(uid, "final").get("segments") == {"1": "left lung", "2": "right lung"}
    pairs = trainer.datalist()
    assert [x["segments"] for x in pairs] == [{"1": "left lung", "2": "right lung"}]
    # GET /datastore/label with one series id (a review, 2026-12-07): the SEG's alone was a 500 (pydicom-seg's
    # AttributeError), the image's alone downloaded the X-ray into the label cache and was a 500 (not a DICOM-SEG).
    # A SEG names its image; an image's id stands for its newest SEG
    for k, asked in enumerate((seg.SeriesInstanceUID, uid)):
        alone = _datastore(client, tmp_path / f"cache_alone{k}")
        got = alone.get_label_uri(asked, "final")
        assert got and np.array_equal(np.asarray(nib.load(got).dataobj), lab), asked
        assert not (Path(alone._datastore.label_path("final")) / uid).exists(), "the X-ray went into the label cache"
    # the SEG's own id asked for as an image (a review, 2026-12-07: it was converted as an X-ray -- it has no plane
    # either --, indexed, and could be segmented and labelled); a SEG read for an image the PACS does not have: a 404
    # (was pydicom-seg's AttributeError, a 500)
    as_image = _datastore(client, tmp_path / "cache_seg_as_image")
    with pytest.raises(InputError, match=rf"a SEG series \(a segmentation\), not an image: the image it refers to is "
                                         rf"series {uid}"):
        as_image.get_image_uri(seg.SeriesInstanceUID)
    assert seg.SeriesInstanceUID not in as_image._datastore.objects
    with pytest.raises(HTTPException, match="this SEG labels is not in the PACS") as e:
        as_image.get_label_uri(seg.SeriesInstanceUID, "final", "1.2.3.4")
    assert e.value.status_code == 404 and not list(Path(as_image._datastore.label_path("final")).rglob("*.dcm"))
    # a SEG of a series this server does not serve (its search filter): named, nothing fetched (a second review: the
    # series was fetched into the cache, and its pair later listed without its label file)
    for asked in (seg.SeriesInstanceUID, uid):
        elsewhere = _datastore(client, tmp_path / "cache_ct_only", {"Modality": "CT"})
        with pytest.raises(HTTPException, match="is not among this server's series") as e:
            elsewhere.get_label_uri(asked, "final")
        assert e.value.status_code == 404 and not list((tmp_path / "cache_ct_only").rglob("*.dcm")), asked
    # a SEG of the X-ray that another tool wrote without its per-frame descriptions: named, not a crash
    import copy

    broken = copy.deepcopy(seg)
    del broken.PerFrameFunctionalGroupsSequence
    broken.SeriesInstanceUID = "1.2.3.4.5.6.7.8.9"
    client.files.append(broken)
    with pytest.raises(InputError, match="of the X-ray cannot be read: AttributeError"):
        _datastore(client, tmp_path / "cache3").get_label_uri(broken.SeriesInstanceUID, "final", uid)
    unreferenced = copy.deepcopy(seg)
    del unreferenced.ReferencedSeriesSequence
    unreferenced.SeriesInstanceUID = "1.2.3.4.5.6.7.8.10"
    client.files.append(unreferenced)
    with pytest.raises(InputError, match=r"the SEG 1\.2\.3\.4\.5\.6\.7\.8\.10 names no series it labels"):
        _datastore(client, tmp_path / "cache4").get_label_uri(unreferenced.SeriesInstanceUID, "final")


@pytest.mark.orthanc
@needs_sample
def test_an_xray_in_orthanc_is_segmented_clicked_and_labelled_through_the_real_server(tmp_path):
    """The whole path with real parts: a DX in Orthanc, the MONAI Label server as users start it on its DICOMweb
    address, the 2D model (automatic: the result equals the PNG's of the same pixels; a click labels its pixel),
    /infer?output=dicom_seg, and Submit Label storing a SEG of the X-ray in Orthanc that holds the label's pixels."""
    import json

    import requests
    from dicomweb_client.api import DICOMwebClient

    from lib.configs.dfm_vlm_2d import DFMVLM2D
    from orthanc_utils import Orthanc, available
    from server_utils import Server, process_group_alive

    if available() is not None:
        pytest.skip(available())
    p = _pixels()
    info = _variants(tmp_path, p)["dx_monochrome1_12bit"]
    uid = info["SeriesInstanceUID"]
    pacs = Orthanc(tmp_path / "orthanc")
    server = None
    try:
        pacs.upload_folder(tmp_path / "m1")
        before = pacs.instance_hashes()
        server = Server(pacs.dicomweb, tmp_path, conf={"model_dir": tmp_path / "model", "models": "dfm_vlm_2d"},
                        env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "DX"}),
                             "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")})

        def infer(model, params, output="image"):
            return requests.post(f"{server.url}/infer/{model}", params={"image": uid, "output": output},
                                 data={"params": json.dumps(params)}, timeout=600)

        r = infer("dfm_vlm_2d", {})
        assert r.status_code == 200, r.text[:500]
        (tmp_path / "auto.nii.gz").write_bytes(r.content)
        auto = np.asarray(nib.load(str(tmp_path / "auto.nii.gz")).dataobj)
        # the app in this process on the PNG of the same pixels, named as the series (the windows are seeded by it)
        (tmp_path / "png").mkdir()
        Image.fromarray(p.astype(np.uint8)).save(tmp_path / "png" / f"{uid}.png")
        cfg = DFMVLM2D()
        cfg.init("dfm_vlm_2d", str(tmp_path / "local"), {"dfm_vlm_2d_checkpoint": str(SHIPPED_2D)}, None)
        _, png = cfg.infer()({"image": str(tmp_path / "png" / f"{uid}.png"), "skip_writer": True, "device": "cpu"})
        want = np.asarray(png["pred"])
        assert auto.shape == want.shape == (216, 256)
        assert 0.05 < auto.mean() < 0.95 and (auto != want).sum() == 0, int((auto != want).sum())
        # a click (DeepGrow's format, the image's (column, row) indices) where the model said background
        col, row = (int(v) for v in np.argwhere(auto == 0)[len(np.argwhere(auto == 0)) // 3])
        r = infer("dfm_vlm_2d_interactive", {"foreground": [[col, row]]})
        assert r.status_code == 200, r.text[:500]
        (tmp_path / "click.nii.gz").write_bytes(r.content)
        assert np.asarray(nib.load(str(tmp_path / "click.nii.gz")).dataobj)[col, row] == 1
        # Next Sample with the 2D model's uncertainty: the X-ray is an image of the 2D model (it was refused)
        r = requests.post(f"{server.url}/activelearning/dfm_vlm_2d_uncertainty", json={}, timeout=300)
        assert r.status_code == 200 and r.json().get("id") == uid, r.text[:500]
        # the result as a DICOM SEG of the X-ray
        r = infer("dfm_vlm_2d", {"label_info": [{"name": "lung", "model_name": "dfm_vlm_2d"}]}, output="dicom_seg")
        assert r.status_code == 200, r.text[:500]
        seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(r.content))
        assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["lung"]
        assert np.array_equal(seg.pixel_array.reshape(256, 216) > 0, auto.T > 0)
        # Submit Label: the SEG stored in Orthanc holds the label's pixels; nothing stored was altered
        with open(tmp_path / "click.nii.gz", "rb") as f:
            r = requests.put(f"{server.url}/datastore/label", params={"image": uid, "tag": "final"},
                             files={"label": ("label.nii.gz", f)},
                             data={"params": json.dumps({"label_info": [{"name": "lung", "idx": 1}]})}, timeout=300)
        assert r.status_code == 200, r.text[:500]
        client = DICOMwebClient(pacs.dicomweb)
        (found,) = client.search_for_series(search_filters={"Modality": "SEG"})
        (stored,) = client.retrieve_series(found["0020000D"]["Value"][0], found["0020000E"]["Value"][0])
        assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        clicked = np.asarray(nib.load(str(tmp_path / "click.nii.gz")).dataobj)
        assert np.array_equal(stored.pixel_array.reshape(256, 216), clicked.T.astype(np.uint8))
        after = pacs.instance_hashes()
        assert {k: v for k, v in after.items() if k in before} == before, "the X-ray in the PACS was altered"
        assert server.alive()
    finally:
        pgid = server.proc.pid if server else None
        if server:
            server.stop()
        pacs.stop()
    assert pgid is None or not process_group_alive(pgid)
