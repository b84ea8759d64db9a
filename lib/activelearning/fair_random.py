"""MONAI Label's ``random`` strategy without its failure under concurrent requests."""

from __future__ import annotations

import logging
import math
import os
import random
import time

from monailabel.tasks.activelearning.random import Random

from lib.transforms import InputError

logger = logging.getLogger(__name__)


def served_at(info) -> float:
    """When MONAI Label last handed the image out, under any strategy (its info's ``strategy.<name>.ts``; 0: never,
    also for a record that is not one, e.g. edited through ``PUT /datastore/imageinfo``). An image one annotator has
    from ``first`` is in progress for the others too (it was handed out again under ``random`` and the uncertainty
    strategy, which each looked at their own records only)."""
    rec = info.get("strategy") if isinstance(info, dict) else None
    if not isinstance(rec, dict):
        return 0.0
    return max((t for t in (finite_number(r.get("ts")) for r in rec.values() if isinstance(r, dict)) if t is not None),
               default=0.0)


def finite_number(v) -> float | None:
    """A value of the datastore's info as a finite float, or None (a string, null, NaN, a bool, a 400-digit integer:
    ``math.isfinite`` raised OverflowError, a 500) -- every number a client may have edited into the index."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


_READ: dict = {}  # (path, size, mtime_ns) -> why the file cannot be read, or None


def unreadable(path) -> str | None:
    """Why the image at ``path`` cannot be read as the models read it (:class:`lib.transforms.LoadImageChecked`: the
    header checks, then every voxel decoded), or None; remembered per version of the file (size, time), so each
    version is decoded once."""
    from lib.transforms import LoadImageChecked

    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot read {path}: {e}"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _READ:
        if len(_READ) > 10000:
            _READ.clear()
        try:
            LoadImageChecked(keys="image", image_only=True)({"image": str(path)})
            _READ[key] = None
        except InputError as e:
            _READ[key] = str(e)
    return _READ[key]


class FairRandom(Random):
    """Like MONAI Label's ``Random`` (an unlabelled image, weighted by the seconds since it was last handed out), but
    every image keeps a weight of at least 1. MONAI Label's weights are ``now - ts`` in whole seconds: when every
    unlabelled image was handed out within the current second (several annotators asking at once; 3 of 20
    ``next_sample`` requests in ``bench/load.py``) they are all 0 and ``random.choices`` raised, answered as HTTP 500.
    The time is the last hand-out under any strategy (:func:`served_at`; an edited record was a 500)."""

    def __call__(self, request, datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        now = int(time.time())
        weights = [max(1, int(now - served_at(datastore.get_image_info(i)))) for i in images]
        refused = {}
        while images:
            k = random.choices(range(len(images)), weights=weights)[0]
            # a series the loader refuses (a PACS's malformed series): never handed out, it kept the largest weight,
            # and once the readable ones were handed out nearly every Next Sample was its 422 (a review); no file at
            # all: a series deleted from the PACS (its list is cached for up to 2 h)
            try:
                uri = datastore.get_image_uri(images[k])
                # a file that does not decode (a truncated PNG) was handed out: never served, it kept the largest
                # weight, and the annotator's inference was a 422 (a review)
                why = unreadable(uri) if uri else "not in the datastore any more"
            except InputError as e:  # (the DICOMweb datastore's refusal is an InputError and a 422 HTTPException)
                why = str(e)
            if why is None:
                logger.info("Random: selected image %s (weight %s of %s)", images[k], weights[k], sum(weights))
                return {"id": images[k], "weight": weights[k]}
            refused[images[k]] = why
            logger.warning("Random: %s cannot be read, another image is chosen: %s", images[k], why)
            del images[k], weights[k]
        raise InputError(f"no unlabelled image can be read ({len(refused)} refused): "
                         + "; ".join(f"{i}: {e}" for i, e in list(refused.items())[:3]))
