"""What a training's listing of a PACS costs: ``CheckedDICOMWebDatastore.datalist()`` on a real Orthanc holding one
X-ray and ``--segs`` DICOM SEGs of it, on a fresh cache and then on the same cache again.

    python bench/pacs_listing_bench.py --segs 100

Every listing (each training's start, each scoring) reads which series each SEG of the PACS references; that is one
metadata request per SEG. The cache keeps what it read (``SEG_REFS``: a SEG does not change), so a listing on a cache
that has seen the SEGs asks for none. Needs Orthanc (Debian's ``orthanc`` package, as ``.ci/run`` installs it).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lib.cli import _quiet, run_bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segs", type=int, default=100, help="SEGs of the X-ray in the PACS (copies of one, new UIDs)")
    a = ap.parse_args()
    _quiet()
    from dicomweb_client.api import DICOMwebClient
    from orthanc_utils import Orthanc, available
    from pydicom.uid import generate_uid

    from lib.datastore import CheckedDICOMWebDatastore
    from lib.dicom import write_xray

    if available() is not None:
        print(f"error: {available()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pacs_listing_") as tmp:
        tmp = Path(tmp)
        pixels = np.asarray(Image.open(ROOT / "sample_data" / "phantom_xray_05.png").convert("L"), dtype=np.int64)
        uid = write_xray(pixels, tmp / "xray" / "x.dcm", window=(127.5, 255), pixel_spacing=(1.0, 1.0),
                         seed="pacs-listing")["SeriesInstanceUID"]
        pacs = Orthanc(tmp / "orthanc")
        try:
            pacs.upload_folder(tmp / "xray")
            requests_made = []

            class Counted(DICOMwebClient):
                def retrieve_series_metadata(self, *args, **kwargs):
                    requests_made.append(1)
                    return super().retrieve_series_metadata(*args, **kwargs)

            def datastore(cache: str) -> CheckedDICOMWebDatastore:
                ds = CheckedDICOMWebDatastore(client=Counted(pacs.dicomweb), search_filter={"Modality": "DX"},
                                              cache_path=str(tmp / cache), fetch_by_frame=False,
                                              convert_to_nifti=True)
                ds._observer.stop()
                ds._observer.join()
                return ds

            annotator = datastore("annotator")
            image = nib.load(annotator.get_image_uri(uid))
            label = np.zeros(image.shape, np.uint8)
            label[30:90, 40:200] = 1
            nib.save(nib.Nifti1Image(label, image.affine), str(tmp / "label.nii.gz"))
            annotator.save_label(uid, str(tmp / "label.nii.gz"), "final", {})  # Submit Label: one SEG in Orthanc
            client = DICOMwebClient(pacs.dicomweb)
            (found,) = client.search_for_series(search_filters={"Modality": "SEG"})
            (seg,) = client.retrieve_series(found["0020000D"]["Value"][0], found["0020000E"]["Value"][0])
            (tmp / "segs").mkdir()
            for k in range(a.segs - 1):  # older corrections of the same label
                x = copy.deepcopy(seg)
                x.SeriesInstanceUID, x.SOPInstanceUID = generate_uid(), generate_uid()
                x.file_meta.MediaStorageSOPInstanceUID = x.SOPInstanceUID
                x.ContentTime = "000000"  # (made before the submitted one)
                x.save_as(str(tmp / "segs" / f"{k}.dcm"))
            if a.segs > 1:
                pacs.upload_folder(tmp / "segs")
            print(f"SEGs in the PACS: {len(client.search_for_series(search_filters={'Modality': 'SEG'}))}",
                  flush=True)
            for what in ("fresh cache", "same cache again", "same cache, third time"):
                requests_made.clear()
                t0 = time.perf_counter()
                items = datastore("training").datalist()
                print(f"{what}: {time.perf_counter() - t0:.2f} s, {len(requests_made)} SEG metadata requests, "
                      f"{len(items)} image/label pair(s)", flush=True)
        finally:
            pacs.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
