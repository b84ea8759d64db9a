"""Shared MONAI Label task config for the DFM+VLM models (one thin subclass per model in this package).

Conf keys (``--conf KEY VALUE``), ``<name>`` being the model (config module) name:

* ``models``: comma-separated model names or ``all`` (default)
* ``model_dir``: where the trainer publishes ``<name>.pt`` (default ``monailabel_app/model``)
* ``<name>_checkpoint``: the checkpoint served before any training here (default ``sample_data/models/<name>.pt``)
* ``vlm``: a VLM folder or hub id replacing the one recorded in the checkpoints
* ``interactive``: also serve ``<name>_interactive`` (clicks; default ``true``)
* ``uncertainty_samples``: M, the samples per image for uncertainty scoring (default 4)
* ``next_sample_scoring_s``: the seconds a Next Sample may spend scoring images not yet scored by the served
  checkpoint (default 10; at least one image; it runs in the model thread: other inferences wait, the rest is
  answered)
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

from monailabel.interfaces.config import TaskConfig

from lib.checkpoint import CheckpointError, load_checkpoint
from lib.config import ConfigError, load_preset
from lib.infers.dfm_vlm import live_paths

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BACKGROUND_CLICKS = 255  # the interactive models' "background" label (negative clicks; see interactive_infer)
SAMPLE_MODELS = REPO / "sample_data" / "models"


def stale_env_key(name: str) -> str:
    """The environment variable that carries a model's ``stale_before`` (the server's start) to MONAI Label's
    subprocesses."""
    return "DFM_STALE_BEFORE_" + "".join(c if c.isalnum() else "_" for c in name).upper()


class DFMTaskConfig(TaskConfig):
    PRESET: str = ""
    DESCRIPTION: str = ""

    def init(self, name: str, model_dir: str, conf: dict, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.hparams = load_preset(self.PRESET)
        vlm = self.hparams.vlm.name_or_path
        if vlm and not os.path.isabs(vlm) and (REPO / vlm).exists():
            self.hparams.vlm.name_or_path = str(REPO / vlm)
        self.vlm = conf.get("vlm") or None
        explicit = conf.get(f"{name}_checkpoint")
        if explicit:
            if not os.path.isfile(explicit):
                # not served until it exists or a training here publishes one (lib.infers.dfm_vlm.live_paths: never
                # an earlier session's published model instead -- a typo served last week's model, a review)
                logger.warning("%s: --conf %s_checkpoint %r names no file (from %s): the model is not served until "
                               "it exists or a training here publishes one", name, name, explicit, os.getcwd())
            explicit = os.path.abspath(explicit)  # (training and scoring subprocesses read it too)
        self.checkpoint = explicit or str(SAMPLE_MODELS / f"{name}.pt")
        self.published = os.path.join(model_dir, f"{name}.pt")
        self.path = [self.checkpoint, self.published]  # the last existing file is served (live_paths)
        # a checkpoint named with --conf wins over one an earlier session published into model_dir (which every
        # --studies shares); a training here publishes a newer one, which is then served. "Here" is the server's
        # start: MONAI Label runs training, scoring and batch inference in subprocesses that build the app again, and
        # inherit the server's environment -- each used its own start time, so a checkpoint published by this
        # session's first training looked stale to the next training (which fine-tuned from the --conf file again)
        self.stale_before = None
        if explicit:
            key = stale_env_key(name)
            self.stale_before = float(os.environ.get(key) or time.time())
            os.environ[key] = repr(self.stale_before)
        if self.stale_before is not None and os.path.exists(self.published) and os.path.isfile(explicit) \
                and os.stat(self.published).st_mtime < self.stale_before:
            logger.warning("%s: serving %s (--conf %s_checkpoint), not %s, which an earlier session published; a "
                           "training here replaces it and is then served", name, explicit, name, self.published)
        self._served_from = None
        self._served = self._served_hparams()  # read once: the labels (a prompted model's structures), sampler
        self.labels = self._served.label_map
        self.dimension = self.hparams.preprocessing.spatial_dims
        served_dims = self._served.preprocessing.spatial_dims
        if served_dims != self.dimension:  # (a 2D checkpoint as the 3D model: ready in /info, every request failed)
            raise ConfigError(f"model {name} is {self.dimension}D but its checkpoint {self.served_path()} is a "
                              f"{served_dims}D model; name it for a {served_dims}D model instead (--conf "
                              "<model>_checkpoint FILE)")
        self.vlm_candidates = self._served_vlms()
        self._infer = None
        self._interactive = None
        self._scoring = None

    def _served_vlms(self) -> list[str]:
        """The VLM folders this model serves: the preset's (the sample VLM) and the served checkpoint's. A checkpoint
        whose recorded VLM folder is not on this machine (trained on another one; a sample checkpoint's copy uploaded
        with PUT /model) is served with one of them when it has the fingerprint the checkpoint records
        (:func:`lib.checkpoint.load_recorded_vlm`)."""
        from lib.checkpoint import resolve_vlm_path

        found = [self.hparams.vlm.name_or_path]
        if self._served_from:
            found.append(resolve_vlm_path(self._served.vlm.name_or_path, self._served_from))
        return [str(p) for p in dict.fromkeys(found) if p and os.path.isdir(p)]

    def _served_hparams(self):
        """The hyper-parameters of the checkpoint served first (the last existing path), else the preset's."""
        for p in reversed(live_paths(self.path, self.stale_before)):
            if os.path.exists(p):
                try:
                    hp = load_checkpoint(p).hparams
                    self._served_from = p
                    return hp
                except CheckpointError as e:
                    logger.warning("%s: %s", self.name, e)
        return self.hparams

    def served_path(self) -> str | None:
        """The checkpoint file whose settings this config serves (None: none loads; the preset's)."""
        return self._served_from

    def _sampler_defaults(self):
        return copy.deepcopy(self._served.sampler)

    def infer(self):
        from lib.infers.dfm_vlm import DFMVLMInfer

        if self._infer is None:
            self._infer = DFMVLMInfer(path=self.path, labels=self.served_labels(), dimension=self.dimension,
                                      description=self.DESCRIPTION, vlm=self.vlm,
                                      vlm_candidates=self.vlm_candidates,
                                      sampler_defaults=self._sampler_defaults(), stale_before=self.stale_before)
        return self._infer

    def served_labels(self) -> dict:
        """The infer tasks' labels (``/info``): the model's structures, then ``uncertain`` with the value a result's
        uncertain segment takes (request ``uncertain_segment``: where the samples disagree; a free prompt's result,
        one target, has it at 2 and says so in its ``label_names``). The OHIF panel draws only the values of a
        model's labels: without it there, the uncertain segment was never shown in OHIF. (3D Slicer names a
        result's values by its ``label_names``.)"""
        from lib.infers.dfm_vlm import uncertain_value

        labels = dict(self.labels) if isinstance(self.labels, dict) else {str(self.labels): 1}
        return {**labels, "uncertain": uncertain_value(labels.values())}

    def interactive_infer(self):
        """The same checkpoint served for clicks (``<name>_interactive``, infer type DeepEdit): it shares the
        automatic task's loaded model (one copy in memory) and keeps a window cache for click latency."""
        from lib.infers.dfm_vlm import DFMVLMInfer

        if self._interactive is None:
            auto = self.infer()
            # "background" names the segment negative clicks are placed on (DeepEdit's points by label name). Its
            # value is 255, which no result uses (a result's background is 0): the OHIF v3 panel of monailabel 0.8.5
            # paints a name whose value is 0 with its position among the names it asked for, so with 0 a negative
            # click painted the lungs, or the vertebra after a lesion click, as OHIF's "background" segment; it
            # leaves 255 alone. 3D Slicer drops "background" by name and numbers the other names by value.
            labels = {**self.served_labels(), "background": BACKGROUND_CLICKS}
            self._interactive = DFMVLMInfer(path=self.path, labels=labels, dimension=self.dimension,
                                            description=f"{self.DESCRIPTION}; interactive: foreground/background "
                                                        "clicks", vlm=self.vlm,
                                            vlm_candidates=self.vlm_candidates,
                                            sampler_defaults=self._sampler_defaults(), interactive=True,
                                            stale_before=self.stale_before)
            self._interactive.share_models_with(auto)
        return self._interactive

    def trainer(self):
        from lib.trainers.dfm_vlm import DFMVLMTrain

        return DFMVLMTrain(model_dir=os.path.join(self.model_dir, self.name), hparams=self.hparams,
                           labels=list(self._served.label_map),
                           publish_path=self.published, init_paths=self.path, vlm=self.vlm,
                           vlm_candidates=self.vlm_candidates,
                           stale_before=self.stale_before, train_defaults=self._served.train,
                           description=f"Train {self.name}: {self.DESCRIPTION}")

    def scoring_method(self):
        from lib.activelearning.uncertainty import DFMUncertaintyScoring

        if self._scoring is None:
            from lib.activelearning.uncertainty import check_num_samples
            from lib.config import ConfigError

            try:  # checked at start: 1 started a server whose every scoring ended in an error, "abc" a traceback
                m = check_num_samples(self.conf.get("uncertainty_samples", 4))
            except ConfigError as e:
                raise ConfigError(f"--conf uncertainty_samples: {e}") from None
            self._scoring = DFMUncertaintyScoring(self.infer(), self.name, num_samples=m)
        return {f"{self.name}_uncertainty": self._scoring}

    def strategy(self):
        from lib.activelearning.uncertainty import DFMUncertaintyStrategy, scoring_budget
        from lib.config import ConfigError
        from lib.transforms import InputError

        scoring = self.scoring_method()[f"{self.name}_uncertainty"]
        try:
            budget = scoring_budget(self.conf.get("next_sample_scoring_s", 10))
        except InputError:
            raise ConfigError(f"--conf next_sample_scoring_s must be a number of seconds >= 0, got "
                              f"{self.conf.get('next_sample_scoring_s')!r}") from None
        return {f"{self.name}_uncertainty": DFMUncertaintyStrategy(scoring, scoring_s=budget)}
