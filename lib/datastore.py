"""MONAI Label DICOMweb datastore whose series conversion is checked (MONAI Label layer).

MONAI Label's ``DICOMWebDatastore`` stacks whatever slices a series has with SimpleITK: a tilted gantry, missing
slices or a localizer silently become a wrong volume. This subclass converts with :func:`lib.dicom.series_to_nifti`
(dicom2nifti with validation): a tilted gantry is resampled onto an orthogonal grid (and the correction recorded in
the image info), anything that is not a regular volume raises :class:`lib.transforms.InputError` naming the problem
-- the app answers 422 and keeps serving. The PACS is only read here; nothing stored in it is changed.

Series are fetched in their stored transfer syntax (``transfer-syntax=*``) and decoded here (pydicom with GDCM):
asking the PACS to transcode fails on some JPEG 2000 files (Orthanc's GDCM plugin refuses them) and costs time.
A download lands in a temporary folder and is renamed into the cache only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Sequence

import numpy as np
import requests
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.checkpoint import atomic_write
from lib.dicom import (is_projection_series, projection_seg, projection_seg_label, segment_codes, segment_colour,
                       series_to_nifti)
from lib.threads import DATASTORE_WRITES
from lib.transforms import InputError, geometry_difference as _geometry_difference

logger = logging.getLogger(__name__)


def image_identity(info) -> tuple:
    """What tells one stored file of an image from its replacement: MONAI Label's ``ts`` (whole seconds) and
    ``name``, and the nanoseconds :meth:`FreshIndex.add_image` stores (two replacements in one second)."""
    return tuple(info.get(k) for k in ("ts", "name", "stored_ns")) if isinstance(info, dict) else (None,) * 3


def one_write_at_a_time(method):
    """A datastore write (an image or label added, replaced, removed, its info changed) runs while no other write of
    this process does (:data:`lib.threads.DATASTORE_WRITES`): each checks the store, then writes, and the server
    now serves requests from several threads (a review: an image replaced during a label's save was left with a
    label of the old image's grid). Re-entrant: a write may call another."""
    import functools

    @functools.wraps(method)
    def locked(*args, **kwargs):
        with DATASTORE_WRITES:
            return method(*args, **kwargs)
    return locked


class FreshIndex:
    """Index writes that start from the index as it is on disk (a mixin for MONAI Label's folder datastores).

    MONAI Label runs scoring and training in subprocesses, each with its own copy of the index (``datastore_v2.json``)
    read at its start, and ``update_image_info`` wrote the whole copy back: a scoring run that outlived an annotator's
    *Submit Label* wrote the index without that label, and the server, reloading the index it watches, listed the
    image as unlabelled again (Next Sample could serve it, the label's info was lost). Here each change is made to the
    index re-read under the datastore's file lock, then written under the same lock."""

    def _reload_index_locked(self) -> None:
        """The index from disk; the caller holds ``self._lock_file`` (``_init_from_datastore_file`` takes it again:
        a second flock on the file from this process would wait for ever). Read whatever the file's time says: two
        writes within the file system's time step share an mtime."""
        from monailabel.datastore.local import LocalDatastoreModel

        path = self._datastore_config_path
        if not os.path.exists(path):
            return
        with open(path) as fp:
            text = fp.read()
        try:
            model = LocalDatastoreModel.model_validate_json(text)
        except ValueError as e:  # a broken index: keep what is in memory (set_aside_unreadable_index at start)
            logger.error("datastore index %s unreadable, not reloaded: %s", path, e)
            return
        model.base_path = self._datastore_path
        self._datastore = model
        self._config_ts = os.stat(path).st_mtime

    def _update_datastore_file(self, lock=True):
        """MONAI Label 0.8.5's index write, made atomic: it opened the index with ``"w"`` and wrote into it, so a
        reader (a subprocess starting, :func:`set_aside_unreadable_index`) or a ``kill -9`` in between saw a
        truncated file. Here the JSON goes to a hidden file beside it (fsync, ``os.replace``). As in MONAI Label,
        ``_ignore_event_config`` is set so that the watcher skips the event of this process's own write and
        ``_config_ts`` is the new file's time. The watcher (MONAI Label's handler takes only *modified* events of
        the index; a rename is a *moved* event, ``os.utime`` an *attrib* one) must still see a write, or the server
        would not reload the index a subprocess wrote (scores): the renamed file is complete JSON, and its final
        newline is appended in place after the rename, one byte that makes the *modified* event (a reader sees
        valid JSON with or without it)."""
        import json

        def write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, lambda f: f.write(text.encode("utf-8")))
            fd = os.open(self._datastore_config_path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    @one_write_at_a_time
    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """MONAI Label's ``add_image`` (copy the file into the image folder, record it in the index), with the
        index re-read under the lock first (it wrote its in-memory copy: a score a subprocess wrote meanwhile was
        lost) and the file copied atomically."""
        from monailabel.datastore.local import ImageLabelModel

        id_, ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or id_
        # "A.NII.GZ" was stored as ".nii.GZ", which a rebuilt index (case-sensitive globs) leaves out (a review)
        ext = ext.lower()
        if ext not in {e.replace("*", "").lower() for e in self._extensions}:
            # a suffix MONAI Label does not list keeps only its last part: "1.2.840...320.dcm" sent as pat7 was
            # stored as "pat7.320.dcm", the file an upload as "pat7.320" then overwrote (a review)
            ext = os.path.splitext(ext)[1] or ext
        name = self._filename(image_id, ext)
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        with FileLock(self._lock_file):
            self._reload_index_locked()
            owner = next((k for k, o in self._datastore.objects.items()
                          if k != image_id and self._filename(k, o.image.ext) == name), None)
            if owner is not None:  # (it replaced that image's file under its labels, and DELETE removed it)
                from fastapi import HTTPException

                raise HTTPException(status_code=409, detail=f"image {owner!r} is stored as {name!r}, the file the "
                                                            f"image {image_id!r} would be stored as: upload it under "
                                                            "another id")
            old = self._datastore.objects.get(image_id)
            if old is None:
                self._set_aside_orphaned_labels(image_id)
            with open(image_filename, "rb") as src:
                atomic_write(dest, lambda f: shutil.copyfileobj(src, f))
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=name, stored_ns=time.time_ns())
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
            # the image it replaces, stored under another extension (a .nrrd sent for a .nii.gz): left there, a
            # DELETE of the image brought the old one back into the datastore (listed, scored, handed out)
            self._remove_replaced(self._datastore.image_path(), image_id, old.image.ext if old is not None else None,
                                  ext, {self._filename(k, o.image.ext) for k, o in self._datastore.objects.items()
                                        if k != image_id})
        return image_id

    ORPHANED = ".orphaned_labels"  # beside the images, outside labels/ (MONAI Label takes every folder there for a tag)

    def _set_aside_orphaned_labels(self, image_id: str) -> None:
        """Label files of ``image_id`` left on disk by an image that is no longer in the datastore (its file deleted or
        renamed in the folder, the server down or up) are moved to ``<studies>/.orphaned_labels/<id>-<time>/<tag>/``
        before a new image takes the id: MONAI Label attached them to whatever image came next under that name, a
        300 x 200 X-ray got the 256 x 256 label of another, counted as annotated (a review, 2026-12-08). Kept, not
        deleted: they are an annotator's work."""
        root = os.path.realpath(self._datastore.label_path(None))
        found = []
        for tag in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            folder = os.path.join(root, tag)
            if tag.startswith(".") or not os.path.isdir(folder):
                continue
            found += [(tag, f) for f in sorted(os.listdir(folder)) if not f.startswith(".")
                      and os.path.isfile(os.path.join(folder, f)) and self._to_id(f)[0] == image_id]
        if not found:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = os.path.join(os.path.realpath(self._datastore_path), self.ORPHANED, f"{image_id}-{stamp}")
        for tag, f in found:
            os.makedirs(os.path.join(aside, tag), exist_ok=True)
            shutil.move(os.path.join(root, tag, f), os.path.join(aside, tag, f))
        logger.warning("image %r: label files of an image no longer in the datastore under that id set aside in %s "
                       "(a new image takes the id): %s", image_id, aside, ", ".join(f"{t}/{f}" for t, f in found))

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        """MONAI Label 0.8.5's ``LocalDatastore.save_label`` with two changes: it copied the upload over the stored
        label in place (``shutil.copy``), so a full disk or a ``kill -9`` during the copy left a partial label; here
        the copy goes through :func:`lib.checkpoint.atomic_write` (a hidden file beside it, fsync, ``os.replace``):
        the stored label is the old file or the new one. A failed write answers 507 and keeps the old label. And the
        index is re-read under the lock before the label is recorded (FreshIndex)."""
        from fastapi import HTTPException

        _, ext = self._to_id(os.path.basename(label_filename))
        ext = ext.lower()  # "label.NII.GZ" was stored as a second file beside the ".nii.gz" one
        folder = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            self._reload_index_locked()  # FreshIndex: a subprocess's scores written meanwhile are kept
            obj = self._datastore.objects.get(image_id)
            if obj is None:  # removed meanwhile
                raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r} (not in the datastore)")
            old = obj.labels.get(label_tag)
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name)

            indexed = []

            def write(f):
                shutil.copyfileobj(src, f)
                f.flush()  # the whole label on disk first (the tail of a copy sits in the buffer until here)
                os.fsync(f.fileno())
                # the index is written before the new label replaces the old one: a failure there (a full disk:
                # room for the label but not for the index) kept the new label with the old label's entry (its
                # segments, which decide what trains) and answered a 500 (a review)
                obj.labels[label_tag] = DataModel(info=info, ext=ext)
                self._update_datastore_file(lock=False)
                indexed.append(True)

            try:
                with open(label_filename, "rb") as src:
                    atomic_write(os.path.join(folder, name), write)
            except OSError as e:
                if old is None:  # the entry in memory as it was
                    obj.labels.pop(label_tag, None)
                else:
                    obj.labels[label_tag] = old
                if indexed:  # the new entry reached the index, then the label's rename failed: the old entry back
                    try:
                        self._update_datastore_file(lock=False)
                    except OSError as again:
                        logger.error("the index of %s still lists the %s label that was not stored: %s", image_id,
                                     label_tag, again)
                raise HTTPException(status_code=507, detail=f"cannot store the {label_tag} label of {image_id!r}: "
                                                            f"{e.strerror or e} (the stored label, if any, is "
                                                            f"kept)") from None
            # the label it replaces, stored under another extension (Slicer saves .nii.gz for a PNG's .png label):
            # left there, a DELETE of the label brought it back, an image later added under this id inherited it,
            # and a rebuilt index took whichever file it found first
            self._remove_replaced(folder, image_id, old.ext if old is not None else None, ext,
                                  {self._filename(k, o.labels[label_tag].ext) for k, o in
                                   self._datastore.objects.items() if k != image_id and label_tag in o.labels})
        return image_id

    def _remove_replaced(self, folder: str, image_id: str, old_ext: str | None, ext: str, taken: set) -> None:
        """Remove ``<image_id><old_ext>`` from ``folder`` after the file was stored again as ``<image_id><ext>``
        (under the lock) -- not a file another image's is stored as (``taken``: ids with dots can name one file,
        "a.x" + ".mha" and "a" + ".x.mha"), nor the new file itself (a case-insensitive disk)."""
        if not old_ext or old_ext == ext or self._filename(image_id, old_ext) in taken:
            return
        stale = os.path.join(folder, self._filename(image_id, old_ext))
        try:
            if not os.path.samefile(stale, os.path.join(folder, self._filename(image_id, ext))):
                os.remove(stale)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("the replaced file %s could not be removed: %s", stale, e)

    def get_dataset_archive(self, limit_cases):
        """MONAI Label's ``GET /datastore/dataset`` zip, from its own image/label pairs: it writes every value of a
        pair as a file, and the ``segments`` this datalist adds (a dict) made it a 500 for any datastore with a
        label submitted from 3D Slicer. The names are in the archive's ``metadata.json`` (the index)."""
        self._plain_datalist = True
        try:
            return super().get_dataset_archive(limit_cases)
        finally:
            self._plain_datalist = False

    def datalist(self, full_path=True) -> list[dict]:
        """MONAI Label's image/label pairs, each with its label's ``segments`` (the names a client sent with the
        label, :func:`label_segments`) where there are any: a training reads such a label as painted in the app
        (:mod:`lib.structures`), not by the dataset's rules."""
        items = super().datalist(full_path)
        if getattr(self, "_plain_datalist", False):
            return items
        named = {}
        for k, obj in self._datastore.filter_by_tag(DefaultLabelTag.FINAL).items():
            label = obj.labels[DefaultLabelTag.FINAL]
            if label.info.get("segments"):  # as stored (PUT /datastore/labelinfo may have set anything)
                named[self._filename(k, label.ext)] = label.info["segments"]
        for item in items:
            seg = named.get(os.path.basename(item["label"]))
            if seg:
                item["segments"] = seg
        return items

    def _change_index(self, change) -> None:
        with FileLock(self._lock_file):
            self._reload_index_locked()
            change()
            self._update_datastore_file(lock=False)

    # an unknown id: a 404 naming it (MONAI Label's ImageNotFoundException / LabelNotFoundException have no HTTP
    # status: PUT /datastore/imageinfo or /labelinfo and DELETE /datastore of an unknown id answered 500)
    @one_write_at_a_time
    def update_image_info(self, image_id: str, info: dict, unless_replaced: tuple | None = None) -> bool:
        """``unless_replaced``: the image's :func:`image_identity` when the caller read it; the info is not written
        (False) when the index, re-read under the lock, holds another file for the id (a score of the file it
        replaced: scoring runs in another process, which saw the replacement only when its index was reloaded)."""
        written = [True]

        def change():
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise _not_found(f"unknown image id {image_id!r} (not in the datastore)")
            if unless_replaced is not None and image_identity(obj.image.info) != unless_replaced:
                written[0] = False
                return
            obj.image.info.update(info)

        self._change_index(change)
        return written[0]

    @one_write_at_a_time
    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        def change():
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise _not_found(f"no {label_tag!r} label for image id {label_id!r} in the datastore")
            label.info.update(info)

        self._change_index(change)

    @one_write_at_a_time
    def remove_image(self, image_id: str) -> None:
        with FileLock(self._lock_file):  # the index as it is on disk (another process may have added the image)
            self._reload_index_locked()
        if not self._datastore.objects.get(image_id):
            raise _not_found(f"unknown image id {image_id!r} (not in the datastore)")
        super().remove_image(image_id)
        # out of the index before the answer (it stayed listed until the file watcher's refresh, which never comes
        # for a suffix MONAI Label does not watch, .dcm: listed, its info served, handed out by Next Sample; a review)
        self._change_index(lambda: self._datastore.objects.pop(image_id, None))


def seg_stamp(meta) -> str:
    """When a SEG was made, as a sortable text: the latest of its content, series and instance creation date+time."""
    return max(f"{meta.get(d, '') or ''}{meta.get(t, '') or ''}" for d, t in (
        ("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"), ("InstanceCreationDate", "InstanceCreationTime")))


SEG_ALGORITHM = "DFM+VLM"  # a SEG's algorithm and series name where the client names no model



def segment_infos(values: Sequence[int], infos: Sequence[dict]) -> list[dict]:
    """MONAI Label's ``label_info`` for its DICOM SEG writer (dcmqi): ``infos[i]`` describes the label value
    ``values[i]``; each entry gets the value as its ``labelID`` (dcmqi reads the voxels by it), its ``model_name``
    (the client's, else :data:`SEG_ALGORITHM`) and the segment's attributes -- label, description, algorithm type
    and name, category and type codes, colour -- unless the client sent its own. One function for a final label's SEG
    and for ``/infer?output=dicom_seg``: the latter passed MONAI Label's defaults on (every segment coded 78961009,
    SNOMED's spleen, algorithm "MONAILABEL", description "Unknown"), and a final label named by Slicer's segments
    titled its SEG series "AIName" (a review, 2026-12-07)."""
    filled = []
    for v, info in zip(values, infos):
        info = dict(info)
        name = info.get("name", "segment")
        info.setdefault("model_name", SEG_ALGORITHM)
        if "segmentAttribute" in info:  # (the client's own: kept as sent)
            filled.append(info)
            continue
        info["segmentAttribute"] = {
            "labelID": int(v), "SegmentLabel": name, "SegmentDescription": info.get("description", name),
            "SegmentAlgorithmType": info.get("algorithm_type", "AUTOMATIC"), "SegmentAlgorithmName": info["model_name"],
            **segment_codes(name),
            "recommendedDisplayRGBValue": list(info.get("color") or segment_colour(v))[:3],
        }
        filled.append(info)
    return filled


def _not_found(detail: str):
    from fastapi import HTTPException

    return HTTPException(status_code=404, detail=detail)


DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_series_uid(value, what: str = "image id") -> str:
    """A DICOMweb image id is a SeriesInstanceUID (digits and dots, at most 64 characters): it names a folder and a
    file in the cache, so ``../../x`` would have made the server convert (and index) any DICOM folder it can read
    and write beside it. Anything else is refused with 422."""
    from fastapi import HTTPException

    check_name(value, what)
    if len(value) > 64 or not DICOM_UID.fullmatch(value):
        raise HTTPException(status_code=422, detail=f"{what} {value[:80]!r} is not a DICOM series UID (digits and "
                                                    "dots, at most 64 characters)")
    return value


def label_on_image_grid(label_path: str, image_path: str) -> str:
    """``label_path`` resampled (nearest neighbour, 0 outside it) onto the grid of ``image_path``, as a temporary
    NIfTI: a label read back from a DICOM SEG covers only the frames it holds."""
    import SimpleITK as sitk

    lab, ref = sitk.ReadImage(label_path), sitk.ReadImage(image_path)
    out = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
    path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    sitk.WriteImage(out, path)
    return path


class SeriesInputError(InputError, HTTPException):
    """A series that is no regular volume: an InputError to the app's tasks (which name it, 422) and an HTTP 422 to
    MONAI Label's datastore endpoints, which do not catch it (``GET /datastore/image`` of such a series, 3D Slicer's
    download, was a 500 while ``/infer`` answered 422)."""

    def __init__(self, detail: str):
        InputError.__init__(self, detail)
        HTTPException.__init__(self, status_code=422, detail=detail)

    def __str__(self) -> str:
        return str(self.detail)


class CheckedDICOMWebDatastore(FreshIndex, DICOMWebDatastore):
    def datalist(self, full_path=True) -> list[dict]:
        """MONAI Label's (every SEG of the PACS fetched with the series it references, then the cached pairs), where
        a pair whose series or SEG cannot be read is left out with a warning naming it: one SEG of a malformed
        series (missing slices) made every training fail."""
        self._leave_out_bad = True
        try:
            items = super().datalist(full_path)
        finally:
            self._leave_out_bad = False
        kept = []
        for item in items:  # a series whose new copy was refused (the PACS changed it) keeps its index entry
            missing = [k for k in ("image", "label") if not os.path.isfile(str(item.get(k)))]
            if missing:
                logger.warning("left out of the training data: %s: its %s file is not in the cache", item.get("image"),
                               " and ".join(missing))
                continue
            kept.append(item)
        return kept

    def _download_labeled_data(self):
        """MONAI Label's (every SEG of the PACS fetched with the series it references, the cached labels the PACS no
        longer has removed) with one change: a series with several SEGs (a label corrected and submitted again) gets
        its **newest** one. MONAI Label converted them all in the PACS's order, each over the last (Orthanc lists the
        newest first), so a training and 3D Slicer got the superseded label back (a review)."""
        newest, incomplete = self._newest_segs()
        # a cached label whose SEG the PACS no longer lists is removed (as MONAI Label does) -- not on a partial view
        # (a review: one SEG's read failing made its series' cached label count as gone)
        invalid = set() if incomplete else set(LocalDatastore.get_labeled_images(self)) - set(newest)
        for image_id in invalid:  # (as MONAI Label does) a cached label whose SEG the PACS no longer has
            logger.info("the final label of %s is no longer in the PACS: removed from the cache", image_id)
            label_uri = LocalDatastore.get_label_uri(self, image_id, DefaultLabelTag.FINAL)
            if label_uri and os.path.exists(label_uri):
                shutil.rmtree(os.path.join(os.path.dirname(label_uri), image_id), ignore_errors=True)
                os.unlink(label_uri)
        for image_id, (_, seg_uid) in newest.items():
            self.get_image_uri(image_id=image_id)
            self.get_label_uri(label_id=seg_uid, label_tag=DefaultLabelTag.FINAL, image_id=image_id)

    SEG_REFS = ".seg_references.json"  # in the cache's final-label folder: {SEG uid: [series it references, time]}

    def _newest_segs(self, study_uid: str | None = None, served: set | None = None) -> tuple[dict[str, tuple], bool]:
        """``{series: (time, SEG uid)}``: the newest SEG in the PACS (in ``study_uid``, where given: a SEG is stored
        in its image's study) that references each of this server's series, and whether a SEG could not be read
        (then which series it labels is unknown). What a SEG references and when it was made are read from the
        PACS once and kept in the cache (:attr:`SEG_REFS`; a SEG does not change): every listing -- each training's
        start -- asked the PACS for the metadata of every SEG it holds. ``served``: the series counted as this
        server's (default: MONAI Label's list of them)."""
        from pydicom import Dataset

        known = self._known_segs()
        listed: set[str] = set()
        read: dict[str, list] = {}
        newest: dict[str, tuple] = {}
        incomplete = False  # a SEG the PACS did not return: which series it labels is unknown
        wanted = {"Modality": "SEG", **({"StudyInstanceUID": study_uid} if study_uid else {})}
        for found in self._client.search_for_series(search_filters=wanted):
            seg = Dataset.from_json(found)
            seg_uid, seg_study = str(seg.get("SeriesInstanceUID", "")), str(seg.get("StudyInstanceUID", ""))
            listed.add(seg_uid)
            entry = known.get(seg_uid)
            if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
                ref, stamp = entry
            else:
                try:
                    meta = Dataset.from_json(self._client.retrieve_series_metadata(seg_study, seg_uid)[0])
                except Exception as e:  # noqa: BLE001 - a PACS error on one SEG: the others still train
                    logger.warning("SEG %s could not be read from the PACS (%s: %s): left out of this listing",
                                   seg_uid, type(e).__name__, str(e)[:200])
                    incomplete = True
                    continue
                try:
                    ref = str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID)
                except (AttributeError, IndexError, KeyError) as e:  # a SEG without a referenced series: skipped
                    logger.warning("SEG %s ignored: no referenced series (%s)", seg_uid, type(e).__name__)
                    ref = ""
                stamp = seg_stamp(meta)
                read[seg_uid] = [ref, stamp]
            if not ref:
                continue
            if ref not in (self.list_images() if served is None else served):
                logger.warning("SEG %s ignored: its series %s is not among this server's series", seg_uid, ref)
                continue
            if ref not in newest or (stamp, seg_uid) > newest[ref]:
                newest[ref] = (stamp, seg_uid)
        # the SEGs the PACS no longer lists are forgotten on a whole listing (not on one study's, nor a partial one)
        self._remember_segs(read, keep=listed if study_uid is None and not incomplete else None)
        return newest, incomplete

    def _known_segs(self) -> dict:
        """The SEG references kept in the cache (:attr:`SEG_REFS`); an unreadable file counts as none."""
        try:
            with open(os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL), self.SEG_REFS),
                      encoding="utf-8") as f:
                known = json.load(f)
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def _remember_segs(self, new: dict, keep: set | None) -> None:
        """Add ``new`` to the kept SEG references and, with ``keep``, drop the others not in it (written atomically;
        a lost update between processes costs a second read from the PACS)."""
        known = self._known_segs()
        merged = {k: v for k, v in known.items() if keep is None or k in keep} | new
        if merged == known:
            return
        path = os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL), self.SEG_REFS)
        text = json.dumps(merged)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        except OSError as e:  # (read again next time)
            logger.warning("the SEG references could not be kept in %s: %s", path, e)

    def _left_out(self, what: str, e: Exception) -> str:
        if not getattr(self, "_leave_out_bad", False):
            raise e
        logger.warning("left out of the training data: %s: %s", what, getattr(e, "detail", None) or e)
        return ""

    def get_image_uri(self, image_id: str) -> str:
        try:
            return self._image_uri(image_id)
        except (InputError, HTTPException) as e:
            return self._left_out(f"series {image_id}", e)

    def _image_uri(self, image_id: str) -> str:
        if not image_id:
            return ""
        check_series_uid(image_id)
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        image_nii_gz = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        state = self._changed_in_pacs(image_id, image_dir) if os.path.isdir(image_dir) and os.listdir(image_dir) \
            else False
        def gone() -> str:
            # deleted from the PACS (a wrong patient, a failed quality check): it was served, and a final label of it
            # written to the PACS, for good (a review)
            logger.warning("series %s: no longer in the PACS: removed from the cache", image_id)
            shutil.rmtree(image_dir, ignore_errors=True)
            if os.path.exists(image_nii_gz):
                os.unlink(image_nii_gz)
            return ""

        if state == "gone":
            return gone()
        if state:
            # fetched while the PACS was still receiving it: served (or refused as "missing slices") as first cached,
            # for good -- after a restart too (a review). The new copy replaces the cached one when it is complete
            # and converted: the cache was removed first, so a training or scoring process reading it met missing
            # files for the whole download, and a PACS failing during it left nothing to serve
            logger.warning("series %s: the PACS holds another number of instances than the cache: fetched again",
                           image_id)
            try:
                if not self._download(image_id, image_dir, replace=True):
                    return gone()  # (meanwhile)
            except Exception as e:  # noqa: BLE001 - a PACS failing now: the cached copy serves, asked again later
                logger.warning("series %s: fetching it again failed (%s: %s): the cached copy serves", image_id,
                               type(e).__name__, str(e)[:200])
                state = False
        elif not os.path.exists(image_dir) or not os.listdir(image_dir):
            if not self._fetch(image_id, image_dir):
                return ""  # no such series in the PACS
        if not self._convert_to_nifti:
            return image_dir
        if state or not os.path.exists(image_nii_gz):
            with tempfile.TemporaryDirectory() as tmp_dir:
                tmp = os.path.join(tmp_dir, f"{image_id}.nii.gz")
                try:
                    res = series_to_nifti(image_dir, tmp)
                except InputError as e:
                    if os.path.exists(image_nii_gz):
                        os.unlink(image_nii_gz)  # the series as fetched again is refused: not its earlier copy
                    raise SeriesInputError(f"series {image_id}: {str(e).split(': ', 1)[-1]}") from e
                info = self._dicom_info(image_id)
                if res["corrections"]:
                    info["corrections"] = res["corrections"]
                    logger.warning("series %s: %s", image_id, "; ".join(res["corrections"]))
                if res.get("left_out"):  # (not a change of grid: its labels are still DICOM SEGs of the series)
                    info["left_out"] = res["left_out"]
                    logger.warning("series %s: %s", image_id, "; ".join(res["left_out"]))
                before = self._datastore.objects.get(image_id)
                # FreshIndex.add_image copies the converted file into the cache and records its info in the index
                # as it is on disk (MONAI Label's wrote its in-memory copy over a subprocess's scores)
                FreshIndex.add_image(self, image_id, tmp, info)
                if state:
                    # the entry of the copy it replaces went with its scores and labels; the files of its labels (on
                    # the earlier grid) go too -- the final one's as well, which its SEG gives again on this grid (a
                    # review: MONAI Label's refresh took the file back into the index, paired with the new image)
                    for tag, label in (before.labels.items() if before is not None else []):
                        stale = os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext))
                        if os.path.isfile(stale):
                            os.unlink(stale)
                    shutil.rmtree(os.path.dirname(self._superseded_path("", image_id)), ignore_errors=True)
        return image_nii_gz

    RECHECK_S = 300.0  # how often (per series and process) a cached series is compared with the PACS
    ASK_S = 3.0  # how long that question may take (dicomweb_client retries ~30 s, and has no timeout of its own)
    _asked: dict = {}
    _asker = None

    def _changed_in_pacs(self, series_uid: str, image_dir: str) -> bool | str:
        """The PACS's NumberOfSeriesRelatedInstances (0020,1209) differs from the cached files (None from the PACS:
        not known, not changed): True; ``"gone"`` when the PACS answers that it has no such series. Asked at most
        every ``RECHECK_S`` per series (a final label's save asks now), for at most ``ASK_S``: a PACS that is down or does not
        answer leaves the cache serving (every request waited on it: 30 s refused, forever silent, with MONAI
        Label's endpoints on the event loop)."""
        import concurrent.futures

        now = time.monotonic()
        key = (id(self), series_uid)
        if now - CheckedDICOMWebDatastore._asked.get(key, -math.inf) < self.RECHECK_S:
            return False
        CheckedDICOMWebDatastore._asked[key] = now
        if CheckedDICOMWebDatastore._asker is None:
            CheckedDICOMWebDatastore._asker = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pacs-ask")
        ask = CheckedDICOMWebDatastore._asker.submit(
            self._client.search_for_series, search_filters={"SeriesInstanceUID": series_uid},
            fields=["NumberOfSeriesRelatedInstances"])
        try:
            found = [x for x in ask.result(timeout=self.ASK_S) if x.get("0020000E", {}).get("Value") == [series_uid]]
        except Exception as e:  # noqa: BLE001 - a PACS that cannot be asked now: the cache serves
            logger.warning("series %s: the PACS could not be asked for its instances (%s): the cache serves",
                           series_uid, type(e).__name__ if isinstance(e, concurrent.futures.TimeoutError) else e)
            return False
        if not found:
            return "gone"
        count = (found[0].get("00201209", {}).get("Value") or [None])[0]
        try:
            return count is not None and int(count) != len(os.listdir(image_dir))
        except (TypeError, ValueError):
            return False

    def _fetch(self, series_uid: str, folder: str) -> bool:
        """:meth:`_download` of a series not cached yet; a PACS that does not answer is a 503 naming the series (was a
        500 through MONAI Label's endpoints: a review)."""
        try:
            return self._download(series_uid, folder)
        except requests.exceptions.RequestException as e:
            raise HTTPException(status_code=503, detail=f"series {series_uid}: the PACS did not return it "
                                                        f"({type(e).__name__}: {str(e)[:200]}); nothing was cached: "
                                                        "ask again") from None

    def _download(self, series_uid: str, image_dir: str, replace: bool = False) -> bool:
        """All instances of the series, as stored, into ``image_dir`` (complete or not at all); ``replace``: over
        the copy there (renamed aside, then removed), else another process's complete copy found there is kept."""
        found = [s for s in self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
                 if s.get("0020000E", {}).get("Value") == [series_uid]]
        if not found:
            return False
        study_uid = found[0]["0020000D"]["Value"][0]
        parent = os.path.dirname(image_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
        try:
            if self._fetch_by_frame:
                self._download_frames(study_uid, series_uid, tmp)
            else:
                instances = self._client.retrieve_series(study_uid, series_uid,
                                                         media_types=(("application/dicom", "*"),))
                for ds in instances:
                    ds.save_as(os.path.join(tmp, f"{ds.SOPInstanceUID}.dcm"))
            if replace and os.path.isdir(image_dir):
                aside = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
                try:
                    os.rename(image_dir, os.path.join(aside, "old"))
                    try:
                        os.rename(tmp, image_dir)
                    except OSError:
                        if not os.path.exists(image_dir):  # the cached copy back (a review: it was removed)
                            os.rename(os.path.join(aside, "old"), image_dir)
                        raise
                finally:
                    shutil.rmtree(aside, ignore_errors=True)
                return True
            if os.path.isdir(image_dir) and os.listdir(image_dir):
                return True  # another process (a training, a scoring) completed it meanwhile: its copy is read now
            try:
                if os.path.isdir(image_dir):
                    os.rmdir(image_dir)  # an empty leftover (was rmtree: of a complete folder another process read)
                os.rename(tmp, image_dir)
            except OSError:
                if not (os.path.isdir(image_dir) and os.listdir(image_dir)):
                    raise  # not another process's complete copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def _download_frames(self, study_uid: str, series_uid: str, folder: str) -> None:
        """``fetch_by_frame``: each instance's metadata and *all* its frames (uncompressed), written as a DICOM file
        with its file meta (preamble, transfer syntax) into ``folder``. MONAI Label's version wrote into the cache
        folder itself, fetched frame 1 only, dropped an instance whose frame request failed (its thread's error was
        never read) and wrote files without the DICM preamble, which the series reader refuses: nothing converted,
        and the partial folder was never fetched again. Here any failure raises (the caller removes ``folder``)."""
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ImplicitVRLittleEndian

        for m in self._client.retrieve_series_metadata(study_uid, series_uid):
            ds = Dataset.from_json(m)
            sop = str(ds.SOPInstanceUID)
            n = int(getattr(ds, "NumberOfFrames", 1) or 1)
            try:
                frames = self._client.retrieve_instance_frames(study_instance_uid=study_uid,
                                                               series_instance_uid=series_uid,
                                                               sop_instance_uid=sop,
                                                               frame_numbers=list(range(1, n + 1)))
            except Exception as e:  # noqa: BLE001 - a PACS error: named, nothing cached, the next request tries again
                raise InputError(f"series {series_uid}: the PACS did not return the frames of instance {sop}: "
                                 f"{type(e).__name__}: {str(e)[:200]} (nothing was cached; ask again)") from e
            if len(frames) != n:
                raise InputError(f"series {series_uid}: the PACS returned {len(frames)} of the {n} frames of "
                                 f"instance {sop} (nothing was cached; ask again)")
            ds.PixelData = b"".join(bytes(f) for f in frames)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.file_meta = meta
            ds.is_little_endian, ds.is_implicit_VR = True, True
            ds.save_as(os.path.join(folder, f"{sop}.dcm"), write_like_original=False)

    def json(self):
        """The cache's records, plus the PACS series the search filter lists (``pacs_series``)."""
        d = super().json()
        d["pacs_series"] = self.list_images()
        return d

    @one_write_at_a_time
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict, label_id: str = ""):
        """Fill in the segment description when the client sent none (DICOM SEG needs a label and an algorithm).

        The SEG written for a final label names the segment (``name``), the algorithm (``model_name``, type
        AUTOMATIC unless the client says otherwise) and references the image series (dcmqi ``itkimage2segimage``).
        """
        from fastapi import HTTPException

        check_series_uid(image_id)
        label_tag = check_name(label_tag or DefaultLabelTag.FINAL, "label tag", MAX_NAME)
        if label_tag == DefaultLabelTag.FINAL:  # asked now, not within RECHECK_S: a SEG of a deleted series is not
            image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))  # sent to the PACS
            if os.path.isdir(image_dir):
                CheckedDICOMWebDatastore._asked.pop((id(self), image_id), None)
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r} (no such series in the PACS)")
        with tempfile.TemporaryDirectory() as tmp_dir:
            if label_filename.endswith(".bin"):  # MONAI Label's raw upload (a mask of the image's voxels)
                from monailabel.datastore.utils.convert import binary_to_image

                label_filename = shutil.move(binary_to_image(image_uri, label_filename),
                                             os.path.join(tmp_dir, "label.nii.gz"))
            try:  # before anything is converted, uploaded or cached: a refused label replaces nothing
                present = check_label_file(label_filename, image_uri, image_id)
                label_info = with_segments(label_info, present, image_id)
            except InputError as e:
                raise HTTPException(status_code=422, detail=str(e)) from None
            label_filename = with_image_geometry(label_filename, image_uri, tmp_dir)
            return self._save_checked_label(image_id, label_filename, label_tag, dict(label_info or {}), present)

    def _save_checked_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                            present: list[int]) -> str:
        from monailabel.datastore.utils.convert import nifti_to_dicom_seg

        # MONAI Label pairs the i-th label value present in the file with label_info[i]: build the list in that order,
        # named by value from the models' label maps (the prompted sample model: lesion = 1, vertebra = 2) unless the
        # client sent its own, and give each segment its real value as labelID (dcmqi reads the voxels by it)
        values = present or [1]  # (an empty label: a cached label of another tag; a final one is refused below)
        given = label_info.get("label_info")
        names = getattr(self, "default_label_names", None) or {}
        segments = label_info.get("segments") or {}
        if segments:  # named by value (Slicer's idx): the i-th value present is not the i-th segment when one is empty
            entries = {x.get("name"): x for x in given or [] if isinstance(x, dict)}
            infos = [{**entries.get(segments.get(str(v)), {}),
                      "name": segments.get(str(v), names.get(v, f"segment {v}"))} for v in values]
        elif given:
            infos = [dict(given[i]) if i < len(given) else {"name": names.get(v, f"segment {v}")}
                     for i, v in enumerate(values)]
        else:
            infos = [{"name": names.get(v, f"segment {v}")} for v in values]
        label_info["label_info"] = segment_infos(values, infos)
        # MONAI Label's DICOMWebDatastore.save_label from here: a final label goes to the PACS as a DICOM SEG (dcmqi),
        # then (any tag) into the cache, through the atomic write and the fresh index (FreshIndex._store_label; its
        # LocalDatastore.save_label copied in place and wrote its in-memory index)
        if label_tag == DefaultLabelTag.FINAL:
            if not present:  # MONAI Label's converter writes nothing then, and the upload of "" was a 500
                raise HTTPException(status_code=422, detail=f"series {image_id}: the final label is empty: a DICOM "
                                                            "SEG holds at least one segment, so it cannot be stored "
                                                            "in the PACS; nothing was stored")
            seg = self.write_seg(image_id, label_filename, label_info.get("label_info"), nifti_to_dicom_seg,
                                 "label", "nothing was stored")
            import pydicom

            try:
                ds = pydicom.dcmread(seg)  # (read once: its time for the SEG references, the instance to upload)
                stamp = seg_stamp(ds)
                label_series_id = self._upload_seg(ds, image_id)
            except (requests.exceptions.RequestException, OSError) as e:
                # the PACS down or refusing the SEG: a bare 500 after dicomweb_client's ~30 s of retries (a review)
                raise HTTPException(status_code=503, detail=f"series {image_id}: the PACS did not store the label's "
                                                            f"DICOM SEG ({type(e).__name__}: {str(e)[:200]}); nothing "
                                                            "was stored: submit the label again when the PACS "
                                                            "answers") from None
            finally:
                os.unlink(seg)
            if label_series_id:
                # what the new SEG references, known without asking the PACS for its metadata (a review: while the
                # PACS could not return it, the image's newest label was not known)
                self._remember_segs({label_series_id: [image_id, stamp]}, keep=None)
            # MONAI Label lists the PACS's series and labelled series through caches kept for
            # MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (default 2 h): the label saved here was not counted, and Next Sample
            # handed the image out again, for that long (a review)
            for cached in (DICOMWebDatastore.list_images, DICOMWebDatastore.get_labeled_images):
                cached.cache_clear()
            image_info = self.get_image_info(image_id)
            label_info.update({"SeriesInstanceUID": label_series_id, "Modality": image_info.get("Modality"),
                               "PatientID": image_info.get("PatientID"),
                               "StudyInstanceUID": image_info.get("StudyInstanceUID")})
        return self._store_label(image_id, label_filename, label_tag, label_info)

    def _upload_seg(self, ds, image_id: str) -> str:
        """STOW-RS of the SEG ``ds``; its SeriesInstanceUID once the PACS stored it. A PACS may answer without an
        HTTP error and still refuse the instance (its answer's Failed SOP Sequence, PS3.18): MONAI Label's upload
        then returned an empty series id, and the label was reported saved and cached with none, while the PACS held
        nothing (a review, 2026-12-07). That answer is a 503 naming the PACS's failure reason; nothing is stored."""
        from pydicom import Dataset

        answer = self._client.store_instances([ds])
        answer = answer if answer is not None else Dataset()
        failed = list(answer.get("FailedSOPSequence", None) or [])
        if failed:
            reasons = sorted({f"0x{int(f.FailureReason):04X}" for f in failed if "FailureReason" in f})
            raise HTTPException(status_code=503, detail=(
                f"series {image_id}: the PACS refused the label's DICOM SEG (STOW-RS Failed SOP Sequence, failure "
                f"reason {', '.join(reasons) or 'not given'}); nothing was stored: submit the label again when the "
                "PACS takes it"))
        for elem in answer.iterall():  # the series the PACS says it stored it in (its answer's Retrieve URL)
            url = str(elem.value or "") if elem.keyword == "RetrieveURL" else ""
            if "/series/" in url:
                return url.split("/series/")[1].split("/")[0]
        return str(ds.SeriesInstanceUID)  # (an answer without a Retrieve URL: the SEG's own series)

    def write_seg(self, image_id: str, label_file: str, label_info, convert, what: str, then: str) -> str:
        """The DICOM SEG of ``label_file`` on the cached series ``image_id``, written by ``convert`` (MONAI Label's
        ``nifti_to_dicom_seg(series_dir, label, label_info)``; dcmqi) -- for a final label's save and for
        ``/infer?output=dicom_seg`` alike. A series corrected on conversion is refused (the label lies on the
        corrected grid, not on the series' slices: 3.7 mm off on the tilted series here); what dcmqi refuses in the
        series (a ``PatientAge`` of ``0Y``, an empty SOPClassUID) is repaired in the copy it reads (8 of the 9 real
        series here gave a 500, on either path); a SEG that dcmqi did not write is a 422 (MONAI Label does not read
        its exit status). An X-ray's SEG is written by :func:`lib.dicom.projection_seg` (highdicom): dcmqi needs a
        plane in space. ``what`` / ``then`` word the refusals ("label", "nothing was stored")."""
        from lib.dicom import seg_source_copy

        corrected = (self.get_image_info(image_id) or {}).get("corrections")
        if corrected:
            raise HTTPException(status_code=422, detail=f"series {image_id} was corrected when converted "
                                                        f"({'; '.join(map(str, corrected))}): its {what} lies on the "
                                                        "corrected grid, not on the series' slices, so it cannot be "
                                                        f"a DICOM SEG of the series; {then}")
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        with tempfile.TemporaryDirectory() as src:
            repaired = seg_source_copy(image_dir, src)
            if repaired:
                logger.info("series %s: repaired for the DICOM SEG writer: %s", image_id, ", ".join(repaired))
            if is_projection_series(src):  # an X-ray: dcmqi needs a plane in space (it wrote nothing: a 422)
                try:
                    seg = projection_seg(src, label_file, label_info)
                except InputError as e:
                    raise HTTPException(status_code=422, detail=f"series {image_id}: {e}; {then}") from None
            else:
                seg = convert(src, label_file, label_info)
                if seg and os.path.isfile(seg) and os.path.getsize(seg) and not seg_references_series(seg, image_id):
                    # dcmqi places the frames by the label file's own header and references the slices it finds
                    # there: a label off the series' slices became a SEG that references none, drawn elsewhere by
                    # a viewer and skipped by every server reading the PACS (a review, 2026-12-08)
                    os.unlink(seg)
                    raise HTTPException(status_code=422, detail=f"series {image_id}: the DICOM SEG of this {what} "
                                                                "references no slice of the series (its frames lie "
                                                                f"off the series' slices); {then}")
        if not seg or not os.path.isfile(seg) or os.path.getsize(seg) == 0:
            if seg and os.path.exists(seg):
                os.unlink(seg)
            raise HTTPException(status_code=422, detail=f"series {image_id}: dcmqi (itkimage2segimage) wrote no DICOM "
                                                        f"SEG for this {what} (the server log has its message: an "
                                                        f"attribute of the series it refuses); {then}")
        return seg

    @one_write_at_a_time
    def remove_image(self, image_id: str) -> None:
        check_series_uid(image_id)
        return super().remove_image(image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        try:
            return self._label_uri(label_id, label_tag, image_id)
        except (InputError, HTTPException, ValueError) as e:  # (pydicom-seg: "not a DICOM-SEG", overlapping segments)
            return self._left_out(f"the {label_tag} label {label_id} of series {image_id}", e)

    def _label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A final label is a DICOM SEG series in the PACS, fetched into the cache and converted to the image's label
        file on first use -- MONAI Label's ``get_label_uri`` with three changes: the SEG's id must be a series UID
        (it names a cache folder: ``../..`` downloaded a series anywhere), the download is the checked one (a
        temporary folder renamed when complete), and the converted label is stored through :meth:`_store_label`
        (atomic, the index re-read under the lock; MONAI Label's ``LocalDatastore.save_label`` wrote the index as
        this process held it, dropping a score a subprocess wrote meanwhile). The SEG of an X-ray is read by
        :func:`lib.dicom.projection_seg_label` (pydicom-seg needs plane positions)."""
        if label_tag != DefaultLabelTag.FINAL:
            return super().get_label_uri(label_id, label_tag)
        from monailabel.datastore.utils.convert import dicom_to_nifti

        check_series_uid(label_id, "label id")
        superseded = False
        if image_id:
            check_series_uid(image_id)
            stored = self._convert_to_nifti and self._stored_label_path(
                image_id, label_tag, None if image_id == label_id else label_id)  # (asked by the image's id: any)
            if stored:
                return stored
        if not image_id or image_id == label_id:
            # GET /datastore/label with a series id alone: the SEG of an X-ray was a 500 (AttributeError) and an
            # image's id made its whole series download into the label cache, then a 500 (not a DICOM-SEG) on every
            # later call. A SEG names the series it labels; an image's id stands for its newest SEG (not the label
            # cached for it, which may be of an older one). A SEG that a newer one replaces is read, not stored as
            # the image's label (a review: asking for it made the cache serve the superseded label)
            label_id, image_id, superseded = self._seg_and_image(label_id)
        label_dir = os.path.realpath(os.path.join(self._datastore.label_path(label_tag), label_id))
        if self._convert_to_nifti:
            kept = self._superseded_path(label_id, image_id) if superseded else \
                self._stored_label_path(image_id, label_tag, label_id)  # (a label cached from another SEG: read again)
            if kept and os.path.isfile(kept):
                return kept
        image_uri = self.get_image_uri(image_id) if self._convert_to_nifti else None
        if image_uri == "":  # (before the SEG is fetched and read: read without its image, a 500 in pydicom-seg)
            raise HTTPException(status_code=404, detail=f"the series {image_id} this SEG labels is not in the PACS "
                                                        "or cannot be read")
        if not os.path.isdir(label_dir) or not os.listdir(label_dir):
            if not self._fetch(label_id, label_dir):
                return ""  # no such series in the PACS
        if not self._convert_to_nifti:
            return label_dir
        if is_projection_series(os.path.join(self._datastore.image_path(), image_id)):
            # the SEG of an X-ray has no plane positions, which pydicom-seg (MONAI Label's reader) needs
            with tempfile.TemporaryDirectory() as tmp:
                on_grid = projection_seg_label(label_dir, image_uri, os.path.join(tmp, "label.nii.gz"))
                return self._store_seg_label(image_id, label_id, label_dir, label_tag, on_grid, superseded)
        converted = dicom_to_nifti(label_dir, is_seg=True)  # a temporary .seg.nrrd
        if not converted:
            return ""
        on_grid = None
        try:
            # a SEG holds the frames its writer kept (dcmqi skips empty slices; another tool may crop in-plane): the
            # volume read back covered the painted slices only, so the trainer's label check left the image out
            on_grid = label_on_image_grid(converted, image_uri)
            return self._store_seg_label(image_id, label_id, label_dir, label_tag, on_grid, superseded)
        finally:
            for f in (converted, on_grid):
                if f and os.path.exists(f):
                    os.unlink(f)

    def _seg_and_image(self, series_uid: str) -> tuple[str, str, bool]:
        """``(SEG, image, superseded)`` for a final label asked for by one series UID: a SEG, the series it
        references and whether a newer SEG of that series is in the PACS; or an image (MONAI Label's convention: a
        label's id is its image's) and the newest SEG in the PACS that references it. 404 when the PACS has no such
        series, the image is not among this server's series (its search filter) or has no SEG; 422 for a SEG that
        names no series; 503 when the PACS does not answer."""
        from pydicom import Dataset

        try:
            found = [s for s in self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
                     if s.get("0020000E", {}).get("Value") == [series_uid]]
            if not found:
                raise _not_found(f"no series {series_uid} in the PACS (no final label)")
            study = found[0]["0020000D"]["Value"][0]
            modality = (found[0].get("00080060", {}).get("Value") or [None])[0]
            image = series_uid
            if modality in (None, "SEG"):  # (a series search need not return the modality)
                meta = Dataset.from_json(self._client.retrieve_series_metadata(study, series_uid)[0])
                if meta.get("Modality") == "SEG":
                    try:
                        image = check_series_uid(str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID),
                                                 f"the series the SEG {series_uid} references:")
                    except (AttributeError, IndexError, KeyError) as e:
                        raise SeriesInputError(f"the SEG {series_uid} names no series it labels (no Referenced "
                                               "Series Sequence)") from e
            if not self._serves(image):
                raise _not_found(f"the series {image} is not among this server's series (its DICOMweb search "
                                 "filter): no final label of it is served")
            # (the SEGs of its study alone: a SEG is stored there)
            newest, incomplete = self._newest_segs(study, served=set(self.list_images()) | {image})
        except requests.exceptions.RequestException as e:
            raise HTTPException(status_code=503, detail=f"the PACS did not answer for series {series_uid} "
                                                        f"({type(e).__name__}: {str(e)[:200]}): ask again") from None
        if image != series_uid:  # a SEG: the image's label only where it is known to be the newest
            return series_uid, image, incomplete or (image in newest and newest[image][1] != series_uid)
        if incomplete:  # (a newer SEG than those read may be among those not read: a review)
            raise HTTPException(status_code=503, detail=f"series {image}: a SEG of its study could not be read from "
                                                        "the PACS, so its newest final label is not known: ask again")
        if image not in newest:
            raise _not_found(f"series {image} has no final label: no SEG in the PACS references it")
        return newest[image][1], image, False

    def _serves(self, series_uid: str) -> bool:
        """The series is among this server's (its search filter): in MONAI Label's list, which it keeps for
        MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (2 h), else asked of the PACS now (a review: a study sent to the PACS
        after the list was made was a 404 for that long)."""
        if series_uid in self.list_images():
            return True
        found = self._client.search_for_series(search_filters={**(self._search_filter or {}),
                                                               "SeriesInstanceUID": series_uid})
        return any(s.get("0020000E", {}).get("Value") == [series_uid] for s in found)

    def _superseded_path(self, seg_uid: str, image_id: str) -> str:
        """Where the label read from a SEG that a newer one replaces (or may: a SEG of its study could not be read)
        is kept: a hidden folder per image (not a label of any image, which MONAI Label's index would take it for;
        removed when the image is fetched again)."""
        return os.path.realpath(os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL), ".superseded",
                                             image_id, f"{seg_uid}.nii.gz"))

    def _store_seg_label(self, image_id: str, label_id: str, label_dir: str, label_tag: str, on_grid: str,
                         superseded: bool = False) -> str:
        """Cache the label read from the SEG ``label_id`` (``on_grid``: on the image's grid) with the SEG's segment
        names, which travel with it (a training reads it as painted, not by the dataset's codes); that of a
        ``superseded`` SEG aside (:meth:`_superseded_path`), not as the image's label."""
        named = seg_segments(label_dir)  # the SEG's segment numbers are the converted label's values
        if named and not is_projection_series(os.path.join(self._datastore.image_path(), image_id)):
            named = values_by_name(on_grid, named, getattr(self, "default_label_names", None) or {})
        if superseded:
            kept = self._superseded_path(label_id, image_id)
            os.makedirs(os.path.dirname(kept), exist_ok=True)
            with open(on_grid, "rb") as src:
                atomic_write(kept, lambda f: shutil.copyfileobj(src, f))
            return kept
        info = self._dicom_info(label_id)
        if named:
            info["segments"] = named
        self._store_label(image_id, on_grid, label_tag, info)
        return self._stored_label_path(image_id, label_tag) or ""

    def _stored_label_path(self, image_id: str, label_tag: str, label_id: str | None = None) -> str | None:
        """The cached label file of ``image_id`` that the index names, if it exists (MONAI Label looked for
        ``<image>.nii.gz`` only, so a label converted from a SEG -- stored as ``.seg.nrrd`` -- was converted again on
        every call)."""
        obj = self._datastore.objects.get(image_id)
        lab = obj.labels.get(label_tag) if obj else None
        if lab is None:
            return None
        if label_id is not None and lab.info.get("SeriesInstanceUID") != label_id:
            # the cache holds another SEG's label (the PACS has a newer one), or a label file the index took back
            # without its SEG (MONAI Label's refresh, after a re-fetch on a new grid: a review): converted again
            return None
        path = os.path.realpath(os.path.join(self._datastore.label_path(label_tag),
                                              lab.info.get("name") or self._filename(image_id, lab.ext)))
        return path if os.path.isfile(path) else None


# -- the local (folder) datastore: a label is checked before it may replace anything ---------------------------------
MAX_NAME = 200  # a new id or tag: the stored file adds its extension, a write's temporary name 18 more: within 255
MAX_EXISTING_NAME = 255  # an id looked up: a file already in the studies folder may have any name the disk allows


def check_name(value, what: str, limit: int = MAX_EXISTING_NAME) -> str:
    """An image id or label tag that names one file in the studies folder: no path, no NUL, at most ``limit``
    bytes (:data:`MAX_NAME` for a new one: an id of 250 characters was stored, and its file name with the extension
    and a write's temporary name went over the file system's 255, a 500; an image already there under a longer name
    is still served: a second review)."""
    from fastapi import HTTPException

    if not isinstance(value, str) or not value.strip():
        raise HTTPException(status_code=422, detail=f"{what} is empty")
    bad = ("/" in value or "\\" in value or "\x00" in value or value in (".", "..")
           or len(value.encode("utf-8", "surrogatepass")) > limit
           or os.path.isabs(value))
    if bad:
        raise HTTPException(status_code=422, detail=f"{what} {value[:80]!r} is not a plain name (no path "
                                                    f"separators, '..', NUL, at most {limit} bytes in UTF-8)")
    return value


def check_label_file(label_path: str, image_path: str, image_id: str) -> list[int]:
    """A label must be a readable image with the image's spatial shape and finite non-negative integer values
    (a label map); raises InputError naming what is wrong. Returns its non-zero values, ascending (read once:
    :func:`label_segments` and the SEG conversion pair names with them)."""
    import numpy as np
    from monai.transforms import LoadImage

    def spatial(arr, ref_nd=None):
        shape = tuple(int(v) for v in arr.shape)
        while len(shape) > (ref_nd or 2) and shape[-1] == 1:
            shape = shape[:-1]
        return shape

    from .transforms import UnreadableInput, check_file

    try:
        check_file(label_path, label=True)  # a header claiming a huge volume is refused before it is read
    except UnreadableInput as e:
        raise UnreadableInput(f"the label sent for {image_id!r} is not a readable image: {e}") from None
    except InputError as e:
        raise InputError(f"the label sent for {image_id!r} is refused: {e}") from None
    try:
        lab_img = LoadImage(image_only=True)(label_path)  # a MetaTensor: its affine is checked below
        lab = np.asarray(lab_img)
    except Exception as e:  # noqa: BLE001 - any reader failure means: not an image
        raise UnreadableInput(f"the label sent for {image_id!r} is not a readable image: {type(e).__name__}: "
                              f"{str(e)[:200]}") from None
    try:
        img = LoadImage(image_only=True)(image_path)
    except Exception as e:  # noqa: BLE001
        raise UnreadableInput(f"image {image_id!r} cannot be read to check its label: {e}") from None
    ref = spatial(img)
    got = spatial(lab, min(len(ref), 3))
    # an image with a channel axis (RGB PNG, multi-channel volume: LoadImage's original_channel_dim) has a label
    # without it; a volume without one does not (a single slice sent for a volume is not its label)
    ch = img.meta.get("original_channel_dim") if hasattr(img, "meta") else None
    allowed = [ref]
    if isinstance(ch, (int, np.integer)) and -len(ref) <= int(ch) < len(ref):
        c = int(ch) % len(ref)
        allowed.append(ref[:c] + ref[c + 1:])
    if got not in allowed:
        raise InputError(f"the label sent for {image_id!r} has shape {got}, the image {ref}: not its label")
    problem = _geometry_difference(label_path, lab_img, image_path, img, ref)
    if problem and _geometry_difference(label_path, lab_img, image_path, img, ref, allow_reorder=True) is None:
        # on the image's points, in another voxel order (flipped or swapped axes): the message said it "would land
        # elsewhere on the image", which is not so; what the annotator must do is save it in the image's order
        raise InputError(f"the label sent for {image_id!r} is stored in another voxel order than the image ({problem}) "
                         "though it covers the same points: save it in the image's voxel order (as 3D Slicer's "
                         "Submit Label does); labels are stored voxel for voxel with their image")
    if problem:
        raise InputError(f"the label sent for {image_id!r} is not on the image's grid: {problem} (training and "
                         "inference place a label by its own affine: it would land elsewhere on the image)")
    if lab.size == 0 or not np.isfinite(lab).all():
        raise InputError(f"the label sent for {image_id!r} has NaN/Inf or no voxels")
    if (lab < 0).any() or (np.round(lab) != lab).any() or lab.max() > 255:
        raise InputError(f"the label sent for {image_id!r} is not a label map (values must be integers 0..255; "
                         f"got min {float(lab.min()):g}, max {float(lab.max()):g})")
    return [int(v) for v in np.unique(lab.astype(np.int64)) if v != 0]


def watch_renames(ds) -> None:
    """MONAI Label's folder watcher handles files created, deleted and modified, not moved: an image renamed in the
    folder while the server ran stayed listed under its old name (its GET a 404, still counted, its label with it)
    and the new name was not listed until another change (a review, 2026-12-08). A rename refreshes like the
    others."""
    handler = getattr(ds, "_handler", None)
    if handler is not None and hasattr(ds, "_on_any_event"):
        handler.on_moved = ds._on_any_event


INDEX_NAME = "datastore_v2.json"  # MONAI Label 0.8.5's LocalDatastore index in the studies folder


def set_aside_unreadable_index(studies: str | os.PathLike, name: str = INDEX_NAME) -> str | None:
    """MONAI Label writes its datastore index in place; a kill -9 (or a full disk) during that write leaves a
    truncated file, and the next start fails (``LocalDatastoreModel`` validation error): the server is down until
    someone edits the file. An index that cannot be read is renamed ``<name>.unreadable-<time>`` (kept for
    inspection) and MONAI Label rebuilds the index from the image and label files, which are the data; what is lost
    is per-label metadata (client info, timestamps). Returns the new name of a set-aside file."""
    from monailabel.datastore.local import LocalDatastoreModel

    path = os.path.join(os.fspath(studies), name)
    if not os.path.isfile(path):
        return None
    # under the datastore's lock (MONAI Label's ``.lock`` in the studies folder): a process (a scoring or training
    # subprocess runs init_datastore too) starting while the server writes the index waits for the write to end,
    # instead of setting the live index aside. Called before this process opens the datastore: no FileLock on the
    # same path is held here (a second one would wait for ever)
    with FileLock(os.path.join(os.fspath(studies), ".lock")):
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                LocalDatastoreModel.model_validate_json(f.read())
            return None
        except (ValueError, UnicodeDecodeError) as e:
            aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            salvaged, dropped = _salvage_index(path)
            os.replace(path, aside)
            if salvaged is not None:
                # one entry a hand edit left wrong took every label's segment names and every image's info with it
                # (a review, 2026-12-08): the entries that read are kept, the others rebuilt from the files
                atomic_write(path, lambda f: f.write(json.dumps(salvaged, indent=2).encode()))
                logger.error("the datastore index %s had %d entr%s that could not be read (%s: %s); set aside as %s, "
                             "the other entries kept, those rebuilt from the files", path, len(dropped),
                             "y" if len(dropped) == 1 else "ies", ", ".join(dropped[:5]),
                             str(e).splitlines()[0][:200], aside)
                return aside
            logger.error("the datastore index %s could not be read (%s); set aside as %s, rebuilt from the files",
                         path, str(e).splitlines()[0][:200], aside)
            return aside


def _salvage_index(path: str) -> tuple[dict | None, list[str]]:
    """An index that is valid JSON but holds entries that do not validate: ``(the index without them, their ids)``;
    ``(None, [])`` where it is no JSON (a truncated write) or is wrong beyond its entries."""
    from monailabel.datastore.local import ImageLabelModel, LocalDatastoreModel

    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError, OSError):
        return None, []
    if not isinstance(raw, dict) or not isinstance(raw.get("objects"), dict):
        return None, []
    kept, dropped = {}, []
    for key, entry in raw["objects"].items():
        try:
            ImageLabelModel.model_validate(entry)
            kept[key] = entry
        except (ValueError, TypeError):
            dropped.append(str(key))
    salvaged = {**raw, "objects": kept}
    try:
        LocalDatastoreModel.model_validate(salvaged)
    except (ValueError, TypeError):
        return None, []
    return (salvaged, dropped) if dropped else (None, [])


def _same_bytes(a: str, b: str) -> bool:
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


class CheckedLocalDatastore(FreshIndex, LocalDatastore):
    """MONAI Label's folder datastore whose ``save_label`` refuses what would replace a good label with garbage:
    an unknown image (404), an id or tag that is a path (422), a file that is not a label map of the image's shape
    (422). The stored label is untouched by a refused request."""

    @one_write_at_a_time
    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """``PUT /datastore/image``: MONAI Label's ``add_image`` named the stored file after the id as given, so
        ``image=../x`` wrote (and ``DELETE`` later removed) a file outside the studies folder, and a file that is no
        image was stored as one. The id must be a plain name (422), the file an image this app can read (422), and
        an image that has labels is not replaced by another file (409: its labels would describe another image)."""
        from fastapi import HTTPException
        from monai.transforms import LoadImage

        from .transforms import check_file

        image_id = check_name(image_id or self._to_id(os.path.basename(image_filename))[0], "image id", MAX_NAME)
        with FileLock(self._lock_file):  # the labels as the index on disk has them (another process may have saved)
            self._reload_index_locked()
        obj = self._datastore.objects.get(image_id)
        if obj is not None and obj.labels and _same_bytes(self.get_image_uri(image_id), image_filename):
            return image_id  # the same image again (a client uploading before each Submit Label): nothing changes
        if obj is not None and obj.labels:
            raise HTTPException(status_code=409, detail=f"image {image_id!r} is in the datastore with labels "
                                                        f"{sorted(obj.labels)}: remove it first, or upload the new "
                                                        "file under another id")
        try:
            check_file(image_filename)
            voxels = LoadImage(image_only=True)(image_filename)
            if not np.isfinite(np.asarray(voxels)).all():
                # stored, every inference, scoring and training of it was refused (a review): refused once, here
                raise InputError("it holds NaN or infinite voxels")
        except InputError as e:
            raise HTTPException(status_code=422, detail=f"the image sent as {image_id!r} is refused: {e}") from None
        except Exception as e:  # noqa: BLE001 - any reader failure means: not an image
            raise HTTPException(status_code=422, detail=f"the image sent as {image_id!r} is not a readable image: "
                                                        f"{type(e).__name__}: {str(e)[:200]}") from None
        return super().add_image(image_id, image_filename, image_info)

    @one_write_at_a_time
    def remove_image(self, image_id: str) -> None:
        check_name(image_id, "image id")
        return super().remove_image(image_id)

    @one_write_at_a_time
    def remove_label(self, label_id: str, label_tag: str) -> None:
        """``DELETE /datastore/label``: an unknown image or a tag it has no label under answered 200 ``{}`` (a
        review: a client's typo looked like a deletion); a 404 naming it."""
        from fastapi import HTTPException

        check_name(label_id, "label id")
        label_tag = check_name(label_tag or "final", "label tag")
        with FileLock(self._lock_file):
            self._reload_index_locked()
        obj = self._datastore.objects.get(label_id)
        if obj is None or label_tag not in obj.labels:
            raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label in the "
                                                        "datastore" if obj is not None else
                                                        f"unknown image id {label_id!r} (not in the datastore)")
        out = super().remove_label(label_id, label_tag)
        # out of the index before the answer, as remove_image: a tag made after the server started is in no folder
        # its file watcher watches, so the label stayed listed, and a second DELETE answered 200 (a review)
        self._change_index(lambda: (self._datastore.objects[label_id].labels.pop(label_tag, None)
                                    if label_id in self._datastore.objects else None))
        return out

    @one_write_at_a_time
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        from fastapi import HTTPException

        check_name(image_id, "image id")
        check_name(label_tag or "final", "label tag", MAX_NAME)
        if not self._datastore.objects.get(image_id):
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r} (not in the datastore)")
        try:
            present = check_label_file(label_filename, self.get_image_uri(image_id), image_id)
            label_info = with_segments(label_info, present, image_id)
        except InputError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        return self._store_label(image_id, label_filename, label_tag or "final", label_info)


def seg_segments(folder: str) -> dict[str, str]:
    """``{"<segment number>": segment label}`` of the DICOM SEG in ``folder`` (MONAI Label's conversion writes each
    segment as its number): a label fetched from the PACS keeps the names it was submitted with (it lost them, and
    a training read it by the dataset's codes again)."""
    import pydicom

    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        try:
            ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file
            continue
        if getattr(ds, "Modality", "") == "SEG" and "SegmentSequence" in ds:
            return {str(int(x.SegmentNumber)): str(x.SegmentLabel) for x in ds.SegmentSequence
                    if getattr(x, "SegmentLabel", "")}
    return {}


def seg_references_series(seg_path: str, series_uid: str) -> bool:
    """The DICOM SEG at ``seg_path`` references ``series_uid`` (its Referenced Series Sequence)."""
    import pydicom

    ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
    return any(str(getattr(x, "SeriesInstanceUID", "")) == series_uid
               for x in (ds.get("ReferencedSeriesSequence") or []))


def with_image_geometry(label_path: str, image_path: str, out_dir: str) -> str:
    """``label_path``, or where its affine differs from the image's, a copy written with the image's (``out_dir``).
    :func:`check_label_file` accepts a label with the image's axes and spacing and another origin voxel for voxel
    (a NIfTI qform/sform difference between readers); the DICOM SEG writer (dcmqi) places the frames by the label's
    own header, so such a label became a SEG 32 mm off the series, referencing none of its slices, while the cache
    held it voxel for voxel (a review, 2026-12-08). The copy holds the same voxels on the image's geometry."""
    import nibabel as nib
    from monai.transforms import LoadImage

    if not image_path.lower().endswith((".nii", ".nii.gz")):
        return label_path
    img = nib.load(image_path)
    lab = LoadImage(image_only=True)(label_path)
    if np.allclose(np.asarray(lab.affine, dtype=np.float64), img.affine, atol=1e-4):
        return label_path
    arr = np.asarray(lab)
    if arr.size != int(np.prod(img.shape)):
        return label_path  # (an image with a channel axis: no series of this datastore)
    out = nib.Nifti1Image(np.rint(arr).astype(np.uint8).reshape(img.shape), img.affine)
    out.set_qform(img.get_qform(), int(img.header["qform_code"]))
    out.set_sform(img.get_sform(), int(img.header["sform_code"]))
    path = os.path.join(out_dir, "label_on_image_geometry.nii.gz")
    nib.save(out, path)
    logger.info("label %s written with its image's geometry (voxel for voxel) for the DICOM SEG", label_path)
    return path


def values_by_name(label_path: str, segments: dict[str, str], names: dict[int, str]) -> dict[str, str]:
    """A label read from a DICOM SEG holds the SEG's segment numbers (1..N, as DICOM numbers them): a label saved
    with the vertebra alone (value 2) came back as value 1, and one of values {1, 3} as {1, 2}, so a client of
    another server (or of this one once it read the PACS again) saw the vertebra as the lesion (a review,
    2026-12-08). Each segment takes back the value it was saved with, known by its name: a model's label name
    (``names``, value -> name) or this app's ``segment <value>``; a name known neither way keeps its number. The
    file at ``label_path`` is rewritten where a value changes; returns ``segments`` keyed by the new values (as
    they were when no value would be unique)."""
    import nibabel as nib

    by_name = {str(n): int(v) for v, n in names.items()}
    want = {}
    for number, name in segments.items():
        m = re.fullmatch(r"segment (\d+)", str(name))
        want[int(number)] = by_name.get(str(name), int(m.group(1)) if m else int(number))
    if all(k == v for k, v in want.items()):
        return segments
    if len(set(want.values())) != len(want) or not all(1 <= v <= 255 for v in want.values()):
        logger.warning("SEG segments %s: their values by name %s are not unique; kept as numbered", segments, want)
        return segments
    img = nib.load(label_path)
    arr = np.asarray(img.dataobj)
    lut = np.arange(max(256, int(arr.max()) + 1), dtype=np.int64)
    for k, v in want.items():
        lut[k] = v
    out = nib.Nifti1Image(lut[arr.astype(np.int64)].astype(np.uint8), img.affine, img.header)
    out.set_data_dtype(np.uint8)
    nib.save(out, label_path)
    return {str(want[int(k)]): n for k, n in segments.items()}


def with_segments(label_info: dict | None, present: list[int], image_id: str) -> dict:
    """``label_info`` with the ``segments`` the client named (:func:`label_segments`), or without when it named none."""
    info = dict(label_info or {})
    seg = label_segments(present, info, image_id)
    info.pop("segments", None)
    if seg:
        info["segments"] = seg
    return info


def label_segments(present: list[int], label_info: dict | None, image_id: str) -> dict[str, str]:
    """The names a client gave the values of a label (``{"<value>": name}``; ``present``: the non-zero values in the
    file, ascending), from the request's ``label_info``:
    3D Slicer's *Submit Label* sends ``[{"name": segment, "idx": position}, ...]`` and numbers the exported segments
    1, 2, ... in that order (its ``idx`` also counts segments it leaves out); entries with
    ``segmentAttribute.labelID`` name that value; other entries are paired with the non-zero values in the file, in
    ascending order, as MONAI Label's DICOM SEG conversion pairs them. A client may also send the mapping itself
    (``"segments": {"1": "lungs"}``); a label the app saves from its own result (``/infer`` with ``save_label``) is
    named by the result's ``label_names``.
    Empty when the client named nothing. Raises InputError for a malformed list, and for a label whose
    ``uncertain`` segment (the app's disagreement region) still has voxels: they are neither a structure nor
    background, and a training would learn them as one or the other."""
    from .structures import parse_segments

    info = label_info or {}
    given = info.get("label_info")
    if isinstance(given, str):  # sent as JSON text
        try:
            given = json.loads(given)
        except ValueError:
            raise InputError(f"the label_info sent for {image_id!r} is not JSON: {given[:200]!r}") from None
    if isinstance(given, dict):  # one segment
        given = [given]
    pairs = []
    if given:
        if not isinstance(given, list) or not all(isinstance(x, dict) for x in given):
            raise InputError(f"the label_info sent for {image_id!r} must be a list of {{'name': ..., 'idx': ...}}, "
                             f"got {str(given)[:200]}")
        slicer = []  # entries with Slicer's idx: the position of the segment, not the value in the file
        positional = []  # entries with neither idx nor labelID: the k-th of them names the k-th value in the file
        for i, x in enumerate(given):
            if "name" not in x or str(x["name"]).strip().lower() == "background":
                continue  # background (some clients list it, idx 0): no segment
            if "idx" in x:
                if _integral(x["idx"]) is None:
                    raise InputError(f"the label_info sent for {image_id!r}: entry {i} ({x['name']!r}) has idx "
                                     f"{x['idx']!r}, not an integer")
                slicer.append((i, x["name"]))
                continue
            value = (x.get("segmentAttribute") or {}).get("labelID")
            if value is None:
                positional.append((i, x["name"]))
            else:
                pairs.append((i, value, x["name"]))
        # counted among themselves: a "background" entry before them (skipped above) took a position, and every name
        # after it landed on the next structure's value (a vertebra trained as the lesion). More names than values:
        # some segment was left empty, and which one cannot be told -- pairing by position would misname the rest
        named = {_integral(v) for _, v, _ in pairs}
        free = [v for v in present if v not in named]  # the values no labelID names, ascending
        if len(positional) > len(free) and free:  # an empty label (a negative case) has nothing to misname
            raise InputError(f"the label_info sent for {image_id!r} names {len(positional)} segment(s) "
                             f"{[n for _, n in positional]} by position, but the label holds {len(free)} other "
                             f"value(s) {free}: give each entry its value ('idx' as 3D Slicer sends it, or "
                             f"segmentAttribute.labelID), or send 'segments' {{value: name}}")
        pairs += [(i, free[k], name) for k, (i, name) in enumerate(positional) if k < len(free)]
        # 3D Slicer's Submit Label exports the segments it lists numbered 1, 2, ... in that order, and its idx counts
        # the segments it leaves out (the "background" of /info's labels, before some of them): the k-th entry is
        # the value k (by idx, a vertebra painted alone was stored as the lesion)
        pairs += [(i, k + 1, name) for k, (i, name) in enumerate(slicer)]
    elif info.get("segments"):
        try:
            pairs = [(i, v, n) for i, (v, n) in enumerate(parse_segments(info["segments"]).items())]
        except InputError as e:
            raise InputError(f"the label info sent for {image_id!r}: {e}") from None
    elif isinstance((info.get("params") or {}).get("label_names"), dict):  # the app's own result (infer save_label)
        # a prompted model's result names every structure it has; a request for a subset (``labels``) segmented only
        # those: the others were never looked for, so they stay unnamed (unknown), not "absent" (a review: a result of
        # labels=vertebra saved as final taught a training "no lesion" on an image with one)
        asked = info["params"].get("labels")
        asked = {str(n) for n in asked} if isinstance(asked, list) else None
        pairs = [(i, v, n) for i, (n, v) in enumerate(info["params"]["label_names"].items())
                 if str(n).strip().lower() != "background"
                 and (asked is None or str(n) in asked or str(n).strip().lower() == "uncertain")]
    out: dict[str, str] = {}
    for i, value, name in pairs:
        number = _integral(value)
        if number is None or not 1 <= number <= 255:
            raise InputError(f"the label_info sent for {image_id!r}: entry {i} ({name!r}) has label value {value!r}, "
                             "not an integer 1..255")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"the label_info sent for {image_id!r}: entry {i} has name {name!r}, not a name")
        key, name = str(number), name.strip()
        if key in out and out[key] != name:
            raise InputError(f"the label_info sent for {image_id!r} names value {key} twice ({out[key]!r}, {name!r})")
        out[key] = name
    absent = sorted(int(k) for k in out if int(k) not in present)
    unnamed = [v for v in present if str(v) not in out]
    if out and absent and unnamed:
        # a label holding only 7 with [{"name": "lesion", "idx": 7}] was stored as {"1": "lesion"}: the lesion's
        # truth read as empty, value 7 unknown (a review); an absent name alone is an empty segment, not this
        raise InputError(f"the label_info sent for {image_id!r} names value(s) {absent} "
                         f"({[out[str(v)] for v in absent]}), which the label does not hold, and leaves its value(s) "
                         f"{unnamed} unnamed: give each segment its value (segmentAttribute.labelID, or 'segments' "
                         "{value: name}), or number the label's segments 1, 2, ... as 3D Slicer exports them")
    for key, name in out.items():
        if name.lower() == "uncertain" and int(key) in present:
            raise InputError(f"the label sent for {image_id!r} still has the 'uncertain' segment (value {key}): "
                             "where the model's samples disagree is neither a structure nor background. Paint those "
                             "voxels into a structure or erase them, delete the segment, then submit again")
    return out


def _integral(value) -> int | None:
    """An integer sent as 2, "2", 2.0 or "2.0" (JSON writers differ); None for anything else."""
    if isinstance(value, bool):
        return None
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None
