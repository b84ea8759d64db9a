"""MONAI Label's ``random`` strategy without its failure under concurrent requests."""

from __future__ import annotations

import logging
import random
import time

from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)


class FairRandom(Random):
    """Like MONAI Label's ``Random`` (an unlabelled image, weighted by the seconds since it was last handed out), but
    every image keeps a weight of at least 1. MONAI Label's weights are ``now - ts`` in whole seconds: when every
    unlabelled image was handed out within the current second (several annotators asking at once; 3 of 20
    ``next_sample`` requests in ``bench/load.py``) they are all 0 and ``random.choices`` raised, answered as HTTP 500."""

    def __call__(self, request, datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request["strategy"]
        now = int(time.time())
        weights = [max(1, now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0))
                   for i in images]
        k = random.choices(range(len(images)), weights=weights)[0]
        logger.info("Random: selected image %s (weight %s of %s)", images[k], weights[k], sum(weights))
        return {"id": images[k], "weight": weights[k]}
