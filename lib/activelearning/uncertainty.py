"""Active learning on DFM sampler uncertainty.

``DFMUncertaintyScoring`` draws M samples (fresh source noise each) per unlabelled image with the infer task's own
core path (:func:`lib.evaluation.predict_item`, ``num_samples=M``) and stores in the datastore's image info

* ``{model}_uncertainty``: the score the strategy ranks by (default: the per-voxel variance of the M samples summed
  and divided by the number of predicted foreground voxels -- boundary disagreement relative to object size;
  ``bench/uncertainty_bench.py`` measures how it ranks images by their Dice),
* ``{model}_uncertainty_detail`` (all summaries), ``{model}_uncertainty_ts`` (the checkpoint's mtime in ns),
  ``{model}_uncertainty_num_samples`` (M) and ``{model}_uncertainty_default_num_samples`` (the server's default M
  then): an image is rescored when the model or M changed.

``DFMUncertaintyStrategy`` serves the unlabelled image with the highest *current* score that was not handed out in
the last hour. Images whose score is missing or was made by another checkpoint are scored first, for at most
``scoring_s`` seconds (MONAI Label runs the strategy on the server's event loop), and only current scores are ranked
(it ranked old and new models' scores together after a training published a new checkpoint); the M of a
``POST /scoring`` that scored every image is kept.
"""

from __future__ import annotations

import logging
import math
import os
import time

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.fair_random import finite_number, served_at
from lib.data import case_id
from lib.datastore import FreshIndex, image_identity
from lib.evaluation import make_inferer, predict_item, uncertainty_scores
from lib.config import MAX_SAMPLES, ConfigError
from lib.infers.dfm_vlm import DFMVLMInfer, ModelNotReady, _as_int
from lib.transforms import InputError, image_spatial_dims
from lib.vlm import VLMError

logger = logging.getLogger(__name__)

SCORE = "variance_per_foreground_voxel"


class DFMUncertaintyScoring(ScoringMethod):
    def __init__(self, infer_task: DFMVLMInfer, model: str, num_samples: int = 4, score: str = SCORE):
        super().__init__(f"DFM sampler uncertainty of {model} ({num_samples} samples per image)")
        self.infer_task = infer_task
        self.model = model
        self.num_samples = num_samples
        self.score = score
        self.key = f"{model}_uncertainty"
        self.clock = time.monotonic  # the budget's clock (Next Sample's deadline)

    def info(self):
        i = super().info()
        i.update({"model": self.model, "num_samples": self.num_samples, "score": self.score, "key": self.key})
        return i

    def candidates(self, datastore: Datastore) -> list[str]:
        out = []
        for image_id in datastore.get_unlabeled_images():
            try:
                if image_spatial_dims(datastore.get_image_uri(image_id)) == self.infer_task.dimension:
                    out.append(image_id)
            except Exception as e:  # noqa: BLE001 - an unreadable study is skipped, not fatal
                logger.warning("%s: cannot read %s: %s", self.key, image_id, e)
        return out

    def score_image(self, image_id: str, datastore: Datastore, num_samples: int, device: str | None = None) -> dict:
        system = self.infer_task.system(device or self.infer_task.default_device())  # the infer task's own copy
        inferer = make_inferer(system, num_samples=num_samples)
        uri = datastore.get_image_uri(image_id)
        item = {"image": uri, "case_id": case_id({"image": uri})}
        text = (datastore.get_image_info(image_id) or {}).get("text")
        if text:  # a model of text_mode 'image' is conditioned on each image's text (its info's, as a datalist's)
            item["text"] = text
        out = predict_item(system, item, inferer)
        return uncertainty_scores(out["prob_pre"], out["var_pre"])

    def file_stamp(self, datastore: Datastore, image_id: str) -> list[int] | None:
        """The image file's (or series folder's) size and modification time in ns, recorded with its score: a file
        replaced in the studies folder kept the old file's score as current, never scored again (a review); None
        when it cannot be read (not compared)."""
        try:
            st = os.stat(datastore.get_image_uri(image_id))
        except Exception:  # noqa: BLE001 - scoring names what cannot be read
            return None
        return [int(st.st_size), int(st.st_mtime_ns)]

    def model_ts(self) -> int:
        """The served checkpoint's mtime in nanoseconds (whole seconds let two trainings that published within one
        second share their scores); raises ModelNotReady."""
        path = self.infer_task.get_path()
        if not path:  # os.stat(None): a TypeError, a 500
            raise ModelNotReady(self.infer_task.readiness()[1])
        return os.stat(path).st_mtime_ns

    def _published_since(self, model_ts: int) -> bool:
        try:
            return self.model_ts() != model_ts
        except (ModelNotReady, OSError):
            return True

    def current_num_samples(self, infos: dict, model_ts: int) -> int:
        """The M to score and rank with when a request names none: the default, unless every current score was made
        with another M by one explicit ``POST /scoring`` (``num_samples=8``): those are kept, not replaced by a
        rescoring with the default (MONAI Label's background scoring after every Next Sample, which names no M,
        replaced them)."""
        key = self.key
        current = [info for info in infos.values()
                   if isinstance(info, dict) and key in info and info.get(f"{key}_ts") == model_ts]
        ms = {info.get(f"{key}_num_samples") for info in current}
        # kept only when made while the default was today's: a server restarted with another
        # --conf uncertainty_samples scores with it (the old default's scores were kept as if asked for), and a
        # value edited into the index is checked
        if len(ms) != 1 or any(info.get(f"{key}_default_num_samples") != self.num_samples for info in current):
            return self.num_samples
        try:
            return check_num_samples(ms.pop())
        except ConfigError:
            return self.num_samples

    def is_current(self, info: dict, model_ts: int, num_samples: int, stamp: list[int] | None = None) -> bool:
        """A score is reused only when the served checkpoint made it with the same number of samples, of the file
        there now (``stamp``: :meth:`file_stamp`; a score recorded without one, from before, is not compared), and
        it is a number (one edited to null or NaN is scored again)."""
        return self.key in info and _finite(info[self.key]) and info.get(f"{self.key}_ts") == model_ts \
            and info.get(f"{self.key}_num_samples") == num_samples \
            and (stamp is None or info.get(f"{self.key}_file") in (None, stamp))

    def __call__(self, request, datastore: Datastore, deadline: float | None = None, last=frozenset()):
        """Score every candidate whose score is not current (MONAI Label's ``POST /scoring`` and its background scoring
        after each Next Sample). With ``deadline`` (on ``self.clock``; the strategy's budget) it stops once that
        has passed and it has scored one image (an image that fails is no progress: one that always fails, first in
        the order, ended every call's scoring), the images it did not reach counted in
        ``pending``. Stale images are scored in the order of their last score, highest first (images never scored
        before them): the most uncertain under the last model are the likeliest to be so under this one; images in
        ``last`` (handed out to an annotator) after all others. The request's ``device`` is the one scoring runs on
        (default: the infer task's)."""
        t0 = time.time()
        try:
            model_ts = self.model_ts()
            device = self.infer_task._device(request)
            self.infer_task.system(device)
        except ModelNotReady as e:
            return {"error": str(e)}
        except ConfigError as e:
            return {"error": str(e)}
        infos = {i: datastore.get_image_info(i) or {} for i in self.candidates(datastore)}
        try:
            num_samples = check_num_samples(request.get("num_samples")) if request.get("num_samples") is not None \
                else self.current_num_samples(infos, model_ts)
        except ConfigError as e:
            return {"error": str(e)}
        stamps = {i: self.file_stamp(datastore, i) for i in infos}
        stale = [i for i, info in infos.items() if not self.is_current(info, model_ts, num_samples, stamps[i])]
        stale.sort(key=lambda i: (i in last, -infos[i][self.key] if _finite(infos[i].get(self.key)) else -math.inf))
        done, failed, pending = 0, {}, 0
        skipped = len(infos) - len(stale)
        for n, image_id in enumerate(stale):
            if deadline is not None and done and self.clock() >= deadline:
                pending = len(stale) - n
                break
            if self._published_since(model_ts):
                # a training published: this run's stamp is the old checkpoint's, and score_image would load the new
                # one (a review: the startup scoring went on for 30 min, writing the new model's scores under the
                # old stamp, so fresh scores read as stale, and it held MONAI Label's one scoring slot)
                pending = len(stale) - n
                logger.info("%s: a newer checkpoint was published: %d image(s) left to the next scoring", self.key,
                            pending)
                break
            try:
                info_now = datastore.get_image_info(image_id) or {}
                stamp = self.file_stamp(datastore, image_id)  # (the file scored: taken before it is read)
                if self.is_current(info_now, model_ts, num_samples, stamp) or \
                        image_id not in set(datastore.get_unlabeled_images()):
                    skipped += 1  # scored by another process meanwhile, or labelled since this run listed it
                    continue
                before = image_identity(info_now)
                s = self.score_image(image_id, datastore, num_samples, device)
                if self._published_since(model_ts):  # which checkpoint scored it cannot be told: not written
                    pending = len(stale) - n
                    break
                # the image replaced while it was scored (PUT /datastore/image): this score is the old file's, and
                # was counted current for the new one. Checked under the index's lock where the datastore can (the
                # app's: FreshIndex), else by reading the info again
                score = {self.key: s[self.score], f"{self.key}_detail": s, f"{self.key}_ts": model_ts,
                         f"{self.key}_num_samples": num_samples, f"{self.key}_default_num_samples": self.num_samples,
                         f"{self.key}_file": stamp}
                if isinstance(datastore, FreshIndex):
                    replaced = not datastore.update_image_info(image_id, score, unless_replaced=before)
                else:
                    replaced = image_identity(datastore.get_image_info(image_id)) != before
                    if not replaced:
                        datastore.update_image_info(image_id, score)
                if replaced:
                    logger.warning("%s: %s was replaced while it was scored: scored again later", self.key, image_id)
                    continue
            except (InputError, VLMError) as e:  # this image only (e.g. no text for a text_mode 'image' model)
                failed[image_id] = str(e)
                logger.warning("%s: %s", self.key, e)
                continue
            except (HTTPException, ImageNotFoundException) as e:  # removed meanwhile: the others go on
                if getattr(e, "status_code", 404) != 404:
                    raise
                logger.warning("%s: %s was removed while scoring: skipped", self.key, image_id)
                continue
            done += 1
        return {"executed": done, "skipped": skipped, "failed": failed, "pending": pending,
                "latency": round(time.time() - t0, 2), "model_ts": model_ts, "num_samples": num_samples}


def scoring_in_background(method: str, states=("SUBMITTED", "RUNNING")) -> bool:
    """Whether a MONAI Label background scoring of ``method`` (a subprocess) waits (``SUBMITTED``) or runs in this
    server: its task list (empty in a subprocess)."""
    from monailabel.utils.async_tasks.utils import tasks

    return any(t.get("status") in states and (t.get("request") or {}).get("method") == method
               for t in tasks("scoring"))


def stale_images(scoring: "DFMUncertaintyScoring", datastore) -> int:
    """How many candidates' scores are not current (the served checkpoint's, with the M it would rank with); 0 when
    no model is served (nothing can be scored)."""
    try:
        model_ts = scoring.model_ts()
    except (ModelNotReady, ConfigError, OSError):
        return 0
    infos = {i: datastore.get_image_info(i) or {} for i in scoring.candidates(datastore)}
    m = scoring.current_num_samples(infos, model_ts)
    return sum(not scoring.is_current(info, model_ts, m, scoring.file_stamp(datastore, i))
               for i, info in infos.items())


def background_scorings_to_queue(methods: dict, datastore) -> dict:
    """Which scoring methods MONAI Label's background scoring after a Next Sample should queue: ``{method: None}``
    to queue, ``{method: why not}`` otherwise. It queued every method after every Next Sample, each a subprocess
    that loads the app, whatever was stale or already queued: 10 Next Samples left 20 runs, 13 still waiting at
    shutdown, each 16-32 s of a 2-core server's CPU for nothing (a review). A method is queued only when none of its
    runs waits or runs and some image's score is stale."""
    out = {}
    for name, scoring in methods.items():
        if scoring_in_background(name):
            out[name] = "a scoring of it is queued or running"
        elif isinstance(scoring, DFMUncertaintyScoring) and not stale_images(scoring, datastore):
            out[name] = "every score is current"
        else:
            out[name] = None
    return out


class DFMUncertaintyStrategy(Strategy):
    """The unlabelled image with the highest current score that was not handed out in the last ``reset`` seconds
    (MONAI Label's ``Epistemic`` keeps the same rule: two annotators asking one after the other, or one who skips an
    image, got the same image again); when every image was handed out within it, the one handed out longest ago."""

    def __init__(self, scoring: DFMUncertaintyScoring, reset: int = 3600, scoring_s: float = 10.0):
        super().__init__(f"Most uncertain unlabelled image for {scoring.model} (DFM sampler variance)")
        self.scoring = scoring
        self.reset = reset
        self.scoring_s = scoring_budget(scoring_s)

    def __call__(self, request, datastore: Datastore):
        key = self.scoring.key
        candidates = self.scoring.candidates(datastore)
        if not candidates:
            return None
        # no served model, no ranking: an error naming why (the app answers 503), not an empty answer that a client
        # shows as "no more images" (MONAI Label answers {} for None); 'random' / 'first' need no model
        ts = self.scoring.model_ts()
        self.scoring.infer_task.system(self.scoring.infer_task.default_device())  # a file that cannot be loaded
        infos = {i: datastore.get_image_info(i) for i in candidates}
        m = self.scoring.current_num_samples(infos, ts)
        failed, res_error = {}, None
        budget = scoring_budget(request.get("scoring_s", self.scoring_s))
        pending = 0
        now = int(time.time())
        recent = {i for i in candidates if now - served_at(infos[i]) < self.reset}
        stamps = {i: self.scoring.file_stamp(datastore, i) for i in candidates}
        current = [i for i in candidates if self.scoring.is_current(infos[i], ts, m, stamps[i])]
        if current and len(current) < len(candidates) and scoring_in_background(self.scoring.key, ("RUNNING",)):
            # the background scoring of this method is scoring the stale images now: scoring them here too (in
            # the same order) scored each twice at once, on 2 cores 2.5 times slower (a review); ranked among the
            # current ones, the others pending
            pending = len(candidates) - len(current)
            logger.info("%s: %d image(s) being scored in the background: ranked among the %d current", key, pending,
                        len(current))
        elif len(current) < len(candidates):
            # MONAI Label runs a strategy on the server's event loop: every other request (/info, /infer) waits for
            # it. So it scores for at most `scoring_s` seconds (until it has scored one image); MONAI Label's
            # background scoring, started after every Next Sample, or the next Next Samples score the rest (it
            # scored every stale image here: bench/next_sample_bench.py, 25 s for 9 volumes, 2.6 s with 0)
            # images another annotator has (handed out in the last `reset` s) are scored last: scored first (the
            # highest old score is the image handed out last), the budget was spent on them and the one image
            # never handed out stayed unscored, so after every training the next annotator got the last one's image
            res = self.scoring({"num_samples": m}, datastore, deadline=self.scoring.clock() + budget, last=recent)
            pending = res.get("pending", 0)
            res_error = res.get("error")
            # the scores it made are of the checkpoint it stamped them with, even if a training published a newer
            # one meanwhile (was: ranked by the newer one's, of which there were none: "no more images")
            ts, m, failed = res.get("model_ts", ts), res.get("num_samples", m), res.get("failed") or {}
            infos = {i: datastore.get_image_info(i) for i in candidates}
        # an image labelled meanwhile (scoring takes up to the budget; an annotator saves in another thread) is no
        # longer a candidate: it was handed out, labelled (a review, 2026-12-07)
        unlabelled = set(datastore.get_unlabeled_images())
        candidates = [i for i in candidates if i in unlabelled]
        if not candidates:
            return None
        # only scores of one checkpoint with one M: never old and new models' scores side by side (is_current: and
        # numbers -- a score edited to null or NaN through PUT /datastore/imageinfo was a 500)
        scored = [(float(infos[i][key]), i) for i in candidates
                  if self.scoring.is_current(infos[i], ts, m, self.scoring.file_stamp(datastore, i))]
        if not scored:
            why = "; ".join(f"{i}: {e}" for i, e in list(failed.items())[:5]) or res_error
            raise InputError(f"no unlabelled image could be scored for {self.scoring.model}"
                             + (f": {why}" if why else ""))
        now = int(time.time())
        served = {i: served_at(infos[i]) for _, i in scored}
        fresh = [(score, i) for score, i in scored if now - served[i] >= self.reset]
        if not fresh:
            # every ranked image is with an annotator while the background scoring has not yet scored the others:
            # one of those, never handed out (or longest ago), before an image another annotator has (a review: three
            # annotators got three images handed out minutes earlier while two new ones waited to be scored)
            ranked = {i for _, i in scored}
            waiting = [i for i in candidates if i not in ranked and now - served_at(infos[i]) >= self.reset]
            if waiting:
                image = min(waiting, key=lambda i: (served_at(infos[i]), i))
                logger.info("%s: next image %s, not yet scored by this checkpoint (%d being scored in the background): "
                            "the %d ranked were all handed out in the last %d s", key, image, pending, len(scored),
                            self.reset)
                return {"id": image, f"{key}_ranked": len(scored), f"{key}_pending": pending, f"{key}_unscored": True}
        score, image = max(fresh) if fresh else min(scored, key=lambda si: (served[si[1]], -si[0]))
        logger.info("%s: next image %s (score %.5g of %d; %d handed out in the last %d s; %d not yet scored by this "
                    "checkpoint)", key, image, score, len(scored), len(scored) - len(fresh), self.reset, pending)
        return {"id": image, key: score, f"{key}_ranked": len(scored), f"{key}_pending": pending}



def scoring_budget(value) -> float:
    """The seconds Next Sample may spend scoring (``scoring_s``: a finite number >= 0; 0: until one image is scored)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(value, bool) or not math.isfinite(f) or f < 0:
        raise InputError(f"parameter 'scoring_s' (the seconds Next Sample may spend scoring images) must be a number "
                         f">= 0, got {value!r}")
    return f


def check_num_samples(value) -> int:
    """M for uncertainty scoring (a request's ``num_samples``, ``--conf uncertainty_samples``): an integer in
    [2, MAX_SAMPLES] (one sample has no variance); ConfigError naming the bound."""
    m = _as_int("num_samples", value)
    if not 2 <= m <= MAX_SAMPLES:  # checked before any image (a bound hit in the loop: a 500)
        raise ConfigError(f"parameter 'num_samples' must be an integer in [2, {MAX_SAMPLES}] (the samples' "
                          f"variance), got {m}")
    return m


def _finite(v) -> bool:
    return finite_number(v) is not None
