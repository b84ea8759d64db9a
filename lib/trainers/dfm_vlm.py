"""MONAI Label trainer task: the core's random patch batching and DFM loss inside MONAI Label's ignite engines.

* Pre-transforms: the model's own preprocessing (:func:`lib.transforms.preprocess`) + the core's
  :func:`lib.data.patch_transforms` (random patches, pos/neg centres); ``RandCropByPosNegLabeld(num_samples=k)``
  batches flatten to batch x k.
* ``train_iteration_update``: VLM conditioning per patch (:func:`lib.vlm.patch_condition`), ``t`` and ``x_t`` per
  patch, ``BCEWithLogits(model(x_t, t, cond), x1)`` (:func:`lib.flow.training_step`).
* ``val_iteration_update``: :func:`lib.evaluation.evaluate_items` on the whole validation image -- the sliding-window
  sampler, the inversion and the metric that ``predict``/``evaluate`` and the infer task use.
* Publishing: the best validation Dice (or, without validation data, the last epoch) is written as a
  self-describing checkpoint (:func:`lib.checkpoint.save_checkpoint`, atomic) where the infer task looks for it.
* Multi-GPU: MONAI Label's DDP path (``torch.multiprocessing.spawn``); nothing pickled holds a lambda or a model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib import precision as precision_policy
from lib.checkpoint import CheckpointError, load_recorded_vlm, load_system, save_checkpoint
from lib.config import HParams
from lib.infers.dfm_vlm import _as_bool, live_paths
from lib.data import case_id, patch_transforms
from lib.evaluation import check_labels, evaluate_items, make_inferer
from lib.inferer import DFMSystem
from lib.network import ConditionalUNet
from lib.structures import painted_values, parse_segments
from lib.transforms import image_spatial_dims, preprocess
from lib.training import distributed_norm, lr_at, train_loss
from lib.vlm import VLMEncoder

logger = logging.getLogger(__name__)

# a run from a served checkpoint peaks at this share of ``learning_rate`` (request ``fine_tune_lr_scale``)
FINE_TUNE_LR_SCALE = 1.0


class CaseDice(Metric):
    """Mean of the per-case Dice that :func:`lib.evaluation.evaluate_items` computed (engine output ``dice``).

    ignite hands a metric the engine output's ``required_output_keys`` as a tuple; ``skip_unrolling`` keeps the
    per-case list whole (otherwise ignite expects a ``(y_pred, y)`` pair).
    """

    required_output_keys = ("dice",)

    def __init__(self):
        super().__init__(skip_unrolling=True)

    def reset(self):
        self._sum, self._n = 0.0, 0

    def update(self, output):
        (dice,) = output
        for d in dice or []:
            if d is not None:
                self._sum += float(d)
                self._n += 1

    def compute(self):
        return self._sum / self._n if self._n else 0.0


class CaseCount(CaseDice):
    """How many validation cases were scored (recorded with a published checkpoint)."""

    def compute(self):
        return self._n


class _TrainStep:
    """The engine's training iteration (picklable: holds only the context's references at run time)."""

    def __init__(self, context: Context):
        self.context = context
        self.rng = None  # simulated clicks (click-trained models): one stream per process, made at the first step

    def __call__(self, engine, batch) -> dict[str, Any]:
        if self.rng is None:
            self.rng = np.random.default_rng()
        system: DFMSystem = self.context.system
        engine.network.train()
        n = batch["image"].shape[0]
        batch = {"image": batch["image"], "label": batch["label"],
                 "items": [{"text": t} for t in batch.get("text", [None] * n)]}
        if system.structures:  # a prompted model: the prompt drawn with each patch's structure (RandStructured)
            batch["texts"] = list(batch["items"][i]["text"] for i in range(n))
        loss = train_loss(system, batch, engine.state.device, network=engine.network, rng=self.rng)
        engine.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), 1.0)
        engine.optimizer.step()
        return {"loss": loss.item()}


class _ValStep:
    """The evaluator's iteration: whole-image sliding-window prediction + metric in original geometry."""

    def __init__(self, context: Context):
        self.context = context

    def __call__(self, engine, batch) -> dict[str, Any]:
        system: DFMSystem = self.context.system
        items = []
        for i, img in enumerate(batch["image"]):
            it = {"image": img, "label": batch["label"][i]}
            if batch.get("segments") is not None:
                it["segments"] = batch["segments"][i]
            if "text" in batch:
                it["text"] = batch["text"][i]
            it["case_id"] = case_id(it)
            items.append(it)
        cases, _ = evaluate_items(system, items, make_inferer(system), check=False)  # (checked: _create_evaluator)
        return {"dice": [c["dice"] for c in cases], "cases": cases}


class _Outcome:
    """What a run did to the served model, written beside MONAI Label's train stats (``train_stats.json``, which
    ``/info`` shows as ``train_stats``, and a synchronous ``/train``'s answer) as ``publication``: those stats name the
    run's best epoch, which is not what the app serves when the served checkpoint beat every epoch (a user read
    "best_metric 0.93" as the new model)."""

    def __init__(self, stats_path: str | None, path: str, rule: str, served: str | None = None):
        self.stats_path, self.rule = stats_path, rule
        self.ready = False  # this run's stats written (MONAI Label's publisher, at the first epoch's end)
        self.record: dict[str, Any] = {"published": False, "path": path, "rule": rule, "served": served,
                                       "served_val_dice": None, "epoch": None, "val_mean_dice": None,
                                       "note": "nothing published yet"}

    def update(self, **kw) -> None:
        self.record.update(kw)
        r = self.record
        if r["published"]:
            r["note"] = (f"published {r['path']} from epoch {r['epoch']}"
                         + (f" (val Dice {r['val_mean_dice']:.4f})" if r["val_mean_dice"] is not None else "")
                         + (f"; the served checkpoint scored {r['served_val_dice']:.4f} on the same images"
                            if r["served_val_dice"] is not None else ""))
        elif r["served_val_dice"] is not None:
            r["note"] = (f"no epoch beat the served checkpoint (val Dice {r['served_val_dice']:.4f}): "
                         f"{r['path']} not replaced")
        if self.ready:
            self.write()

    def write(self, _engine=None) -> None:
        """Adds the record to the stats file MONAI Label's publisher wrote for this epoch (it is rewritten each
        epoch; as a handler this runs after it). Nothing before this run's first stats: the file is the last run's
        until then (the served model's Dice, measured at the start, was written into it)."""
        self.ready = True
        if not self.stats_path or not os.path.exists(self.stats_path):
            return
        from lib.checkpoint import atomic_write

        try:
            with open(self.stats_path, encoding="utf-8") as f:
                stats = json.load(f)
            stats["publication"] = dict(self.record)
            atomic_write(self.stats_path, lambda f: f.write(json.dumps(stats, indent=2).encode()))
        except (OSError, ValueError) as e:  # the stats are a report: the training goes on
            logger.warning("cannot add the publication to %s: %s", self.stats_path, e)


class _Publish:
    """Write the self-describing checkpoint where the infer task looks for it (best validation Dice).

    Fine-tuning a served checkpoint: its own Dice on this training's validation images (measured before the first
    epoch, :meth:`baseline_from`) is the one to beat, so a training that only makes the model worse publishes nothing and
    the served model stays (the first epoch's model was published whatever its Dice: a 2-iteration fine-tune replaced
    a 0.992 model with a 0.944 one)."""

    def __init__(self, context: Context, publish_path: str, metric: str | None, outcome: _Outcome | None = None,
                 configured: list[str] | None = None):
        self.context = context
        self.publish_path = publish_path
        self.configured = [p for p in (configured or []) if p]  # the checkpoints the user named (never lost)
        self.metric = metric
        self.best = -1.0
        self.baseline: float | None = None
        self.outcome = outcome

    def baseline_from(self, evaluator, served: DFMSystem | None = None):
        """A handler for the trainer's STARTED event: validate the served model -- the starting weights of a
        fine-tune, or ``served`` (a run from scratch, ``pretrained`` false: it replaced a 0.99 model with a 0.19
        one) -- on the evaluator's images with its validation step, and keep its Dice as the best to beat.

        Measured outside the evaluator's run: its end-of-epoch event is what MONAI Label's train stats and early
        stopping read, so the served model's score was shown as the run's best epoch and counted by early
        stopping against the run (on rank 0 only, under several processes). A served model that cannot score
        these images (another dimension) is left unmeasured, with a warning: the run may replace it (it failed
        the whole training, and ``pretrained`` false is how a user leaves a bad model behind)."""

        def run(_engine):
            nonlocal served
            own = self.context.system
            if served is not None:  # the validation step predicts with the context's system
                self.context.system = served
            step, dice = _ValStep(self.context), CaseDice()
            dice.reset()
            try:
                for batch in evaluator.data_loader:
                    dice.update((step(None, batch)["dice"],))
                self.baseline = self.best = float(dice.compute())
                if self.outcome:
                    self.outcome.update(served_val_dice=self.baseline)
                logger.info("served checkpoint: val Dice %.4f on this training's validation images (to beat)",
                            self.best)
            except Exception as e:  # noqa: BLE001 - an unmeasured model must not stop the training
                logger.warning("the served checkpoint could not be measured on this training's validation images "
                               "(%s: %s): this run may replace it", type(e).__name__, e)
            finally:
                self.context.system = own
                served = None  # its memory back (a second model and VLM)

        return run

    def report(self, _engine):
        if self.baseline is not None and self.best <= self.baseline:
            logger.warning("no epoch beat the served checkpoint (val Dice %.4f): %s not replaced", self.baseline,
                           self.publish_path)

    def _keep_unmeasured(self) -> None:
        """Before this run's first publish over a file it never measured nor started from -- one an earlier session
        published, while ``--conf <model>_checkpoint`` names the served one (a restart with the same command after
        a crash) -- keep that file as ``<name>.pt.<time>.replaced``, as ``PUT /model`` does (a review: a 0.47 epoch
        replaced an earlier session's 0.99 model, with no copy left)."""
        if getattr(self, "_kept", False):
            return
        self._kept = True
        served = self.outcome.record.get("served") if self.outcome else None

        def same(p):
            return bool(p) and os.path.exists(p) and os.path.samefile(p, self.publish_path)

        # a publish path that is the configured checkpoint itself (--conf model_dir holding it; PUT /model refuses
        # that case): a copy first, whatever was measured -- it is the file the user named
        if not os.path.exists(self.publish_path) or (same(served) and not any(same(p) for p in self.configured)):
            return
        from lib.checkpoint import keep_replaced_copy

        try:
            keep = keep_replaced_copy(self.publish_path)
            logger.warning("%s (not the checkpoint this run was measured against, %s) is kept as %s before it is "
                           "replaced", self.publish_path, served, keep)
        except OSError as e:
            raise CheckpointError(f"cannot keep a copy of {self.publish_path} ({e.strerror or e}) before replacing "
                                  "it: not published") from e

    def __call__(self, engine):
        ctx = self.context
        value = engine.state.metrics.get(self.metric) if self.metric else None
        if self.metric is not None and (value is None or value <= self.best):
            return
        self.best = value if value is not None else self.best
        model = ctx.system.model
        metrics = {"val_mean_dice": value, "val_cases": engine.state.metrics.get("val_cases") if self.metric else None,
                   "epoch": ctx.trainer.state.epoch if ctx.trainer else None,
                   "run_id": ctx.run_id, "train_images": len(ctx.train_datalist or []),
                   "val_images": len(ctx.val_datalist or [])}
        self._keep_unmeasured()
        save_checkpoint(self.publish_path, model, ctx.system.hparams, metrics=metrics)
        logger.info("published %s (val Dice %s)", self.publish_path, value)
        if self.outcome:
            self.outcome.update(published=True, epoch=metrics["epoch"], val_mean_dice=value)


class _LRSchedule:
    """The learning rate of ``python -m lib train`` (:func:`lib.training.lr_at`: 3 % warm-up from a tenth of the peak,
    then a cosine to 2 % of it) over this run's iterations (``max_epochs`` x iterations per epoch), set before each
    iteration. The trainer ran every epoch at the preset's peak rate (``lr_schedule`` = ``constant`` keeps that)."""

    def __init__(self, peak: float, schedule: str):
        self.peak, self.schedule = peak, schedule

    def attach(self, engine):  # a MONAI train handler: set before each iteration
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine):
        st = engine.state
        total = max(1, int(st.epoch_length or 1) * int(st.max_epochs or 1))
        lr = self.peak if self.schedule == "constant" else lr_at((st.iteration - 1) / total, self.peak)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr


LR_SCHEDULES = ("cosine", "constant")


class LabelChecks:
    """What :func:`lib.datastore.check_label_file` said of each (label, image) pair, kept in a JSON file by the
    files' paths, sizes and modification times (a BraTS volume takes about 0.5 s to check; a training starts in a
    new process each time)."""

    NAME = "label_checks.json"

    def __init__(self, path: str):
        self.path, self.changed, self.used = path, False, set()
        try:
            with open(path, encoding="utf-8") as f:
                self.known = dict(json.load(f))
        except (OSError, ValueError, TypeError):  # none yet, or unreadable: checked again
            self.known = {}

    @staticmethod
    def _key(label: str, image: str) -> str | None:
        """The two files' paths, sizes, inodes and change times (a file replaced with ``cp -p`` keeps its size and
        modification time, not its change time); None for an image that is a folder (a DICOM series: checked each
        time)."""
        if not os.path.isfile(image):
            return None

        def sig(p):
            st = os.stat(p)
            return [str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

        return json.dumps([sig(label), sig(image)])

    def problem(self, label: str, image: str) -> str | None:
        """Why ``label`` cannot train with ``image`` (None: it can). A file that could not be read is not
        remembered (a permission fixed, a disk back): it is checked again next time."""
        from lib.datastore import check_label_file
        from lib.transforms import InputError, UnreadableInput

        key = self._key(label, image)
        if key is None or key not in self.known:
            try:
                check_label_file(label, image, os.path.basename(str(image)))
                verdict = None
            except UnreadableInput as e:
                return str(e)
            except InputError as e:
                verdict = str(e)
            if key is None:
                return verdict
            self.known[key] = verdict
            self.changed = True
        self.used.add(key)
        return self.known[key]

    def save(self) -> None:
        """Keeps the verdicts of this training's pairs only: a label deleted, replaced or moved leaves a key no file
        has any more (the file grew with every label ever saved)."""
        if set(self.known) - self.used:
            self.known = {k: v for k, v in self.known.items() if k in self.used}
            self.changed = True
        if self.changed:
            from lib.checkpoint import atomic_write

            try:
                atomic_write(self.path, lambda f: f.write(json.dumps(self.known).encode()))
            except OSError as e:  # a read-only model folder: checked again next time
                logger.warning("cannot keep the label checks in %s: %s", self.path, e)


def _install_atomic_stats_copy() -> None:
    """MONAI Label's stats publisher (``monailabel.tasks.train.handler``) copies each epoch's stats over
    ``train_stats.json`` with ``shutil.copy``, in place: that module's ``shutil.copy`` becomes a copy through
    :func:`lib.checkpoint.atomic_write` (a reader sees the old file or the new one). Only that module's name is
    rebound; ``shutil`` itself is untouched."""
    import shutil
    import types

    import monailabel.tasks.train.handler as handler

    if getattr(handler.shutil, "_dfm_atomic", False):
        return
    from lib.checkpoint import atomic_write

    def copy(src, dst, *, follow_symlinks=True):
        target = os.path.join(dst, os.path.basename(src)) if os.path.isdir(dst) else dst
        with open(src, "rb") as f:
            atomic_write(target, lambda out: shutil.copyfileobj(f, out))
        return target

    ns = types.SimpleNamespace(**{k: getattr(shutil, k) for k in dir(shutil) if not k.startswith("__")})
    ns.copy = copy
    ns._dfm_atomic = True
    handler.shutil = ns


class DFMVLMTrain(BasicTrainTask):
    def __init__(self, model_dir: str, hparams: HParams, publish_path: str, init_paths: list[str],
                 description: str = "Train the DFM+VLM model", vlm: str | None = None, config: dict | None = None,
                 stale_before: float | None = None, train_defaults=None, labels: list[str] | None = None,
                 vlm_candidates: Sequence[str] = (), **kwargs):
        # ``labels`` (/info): the served checkpoint's structures (the preset's when none is served)
        # the run's defaults (learning rate, batch, patches, augmentation) are those the served checkpoint was trained
        # with (``train_defaults``; the preset's when none is served): a cxr_lung checkpoint named with --conf was
        # fine-tuned with the app preset's rate and batch (3e-3 x 2 images instead of 2e-3 x 8)
        tc = train_defaults or hparams.train
        self.train_defaults = tc
        cfg = {"max_epochs": 20, "val_split": 0.2, "train_batch_size": tc.images_per_batch, "val_batch_size": 1,
               "patches_per_image": tc.patches_per_image, "learning_rate": tc.lr, "lr_schedule": "cosine",
               "fine_tune_lr_scale": FINE_TUNE_LR_SCALE, "augment": tc.augment,
               "dataset": ["CacheDataset", "Dataset"], "dataloader": ["ThreadDataLoader", "DataLoader"],
               "multi_gpu": True, "pretrained": True}
        cfg.update(config or {})
        _install_atomic_stats_copy()
        super().__init__(model_dir, description, config=cfg, amp=False, publish_path=None,
                         key_metric_filename="ignite_model.pt",
                         labels=list(hparams.label_map) if labels is None else list(labels), **kwargs)
        self.hparams = hparams
        self.publish_path = publish_path
        self.init_paths = list(init_paths)
        self.stale_before = stale_before  # fine-tune from what is served (lib.infers.dfm_vlm.live_paths)
        self.vlm = vlm
        self.vlm_candidates = list(vlm_candidates)  # (lib.checkpoint.load_recorded_vlm)
        self.dimension = hparams.preprocessing.spatial_dims
        if tc.ema_decay:
            logger.warning("train.ema_decay = %s is not applied by the MONAI Label trainer (its epochs publish the "
                           "trained weights); python -m lib train averages them", tc.ema_decay)
        if tc.hard_share:
            logger.warning("train.hard_share = %s is not applied by the MONAI Label trainer (its epochs visit every "
                           "labelled image once); python -m lib train samples hard images more often", tc.hard_share)

    def stats(self):
        """MONAI Label's train stats (``/info``'s ``train_stats``; the scoring a server starts reads ``/info``), read
        so that an unreadable file is reported, not raised: MONAI Label rewrote it in place every epoch, so a
        reader could catch it half-written and a ``kill -9`` or a full disk left it empty or truncated -- then
        every ``/info``, ``/infer``, ``/activelearning`` and ``/train`` was a 500 and the server did not start again
        (a review). The file is now written atomically (:func:`_install_atomic_stats_copy`); one written by an
        older server is read again twice, then shown as ``{"error": ...}`` naming it."""
        import time

        path = self._stats_path
        if not path or not os.path.exists(path):
            return {}
        for attempt in range(3):
            try:
                with open(path, encoding="utf-8") as f:
                    stats = json.load(f)
                if isinstance(stats, dict):
                    return stats
                raise ValueError(f"not a JSON object ({type(stats).__name__})")
            except (OSError, ValueError) as e:
                if attempt == 2:
                    logger.warning("the train stats %s are unreadable (%s): shown as an error; the next training "
                                   "writes them again", path, e)
                    return {"error": f"{path} is unreadable ({e}); the next training writes it again"}
                time.sleep(0.05)
        return {}

    # -- data: only images of this model's dimensionality, with a final label ---------------------------------
    def pre_process(self, request, datastore):
        # every label is checked as Submit Label checks it (lib.datastore.check_label_file): a label put into
        # labels/final by hand (importing earlier annotations) that does not fit its image stopped the whole training
        # in the data loader; it is left out, named. The checks are remembered by file (path, size, time).
        checked = LabelChecks(os.path.join(self._model_dir, LabelChecks.NAME))
        self._set_aside_unreadable_published()  # before anything reads what is served
        # the structures of the model this run trains: the served checkpoint's (a --conf <model>_checkpoint of
        # another prompted model: its structures, not the app preset's; a review found every label of such a model
        # skipped as "naming no structure of this model", and a label naming the preset's trained to a crash)
        structures = self.served_hparams().structures
        out, skipped = [], []
        for d in datastore.datalist():
            try:
                if image_spatial_dims(d["image"]) == self.dimension:
                    # the names of a label painted in the app (lib.structures), as JSON text in every item: a data
                    # loader collates a batch's items key by key, and a mapping per item would not collate; names
                    # that are not a mapping of values (set through PUT /datastore/labelinfo) skip that image
                    seg = parse_segments(d.get("segments"))
                    if seg and structures and not any(painted_values(structures, seg, d["label"])):
                        why = (f"its label's segments {seg} name no structure of this model "
                               f"({[s.name for s in structures]})")
                        logger.warning("skipping %s: %s", d.get("image"), why)
                        skipped.append((d.get("image"), why))
                        continue
                    problem = checked.problem(d["label"], d["image"])
                    if problem:
                        logger.warning("skipping %s: %s", d.get("image"), problem)
                        skipped.append((d.get("image"), problem))
                        continue
                    out.append({**d, "segments": json.dumps({str(k): v for k, v in seg.items()}) if seg else ""})
            except Exception as e:  # noqa: BLE001 - a broken study must not stop training on the others
                logger.warning("skipping %s: %s", d.get("image"), e)
                skipped.append((d.get("image"), str(e)))
        checked.save()
        logger.info("%d labelled %dD image(s) for training", len(out), self.dimension)
        # named in the run's publication record too (/info's train_stats, a synchronous /train's answer): only the
        # server log said which labels a training left out (a review, 2026-12-08)
        self.left_out = [{"image": os.path.basename(str(i)), "why": str(w)[:300]} for i, w in skipped]
        if not out and skipped:  # (was "save a final label first" when every label had been left out)
            first = "; ".join(f"{os.path.basename(str(i))}: {w}" for i, w in skipped[:3])
            raise ValueError(f"no labelled {self.dimension}D image can train this model: {len(skipped)} labelled "
                             f"image(s) left out ({first}{'; ...' if len(skipped) > 3 else ''})")
        if not out:
            raise ValueError(f"no labelled {self.dimension}D image in the datastore: save a final label first")
        return out

    def served_hparams(self, with_path: bool = False):
        """The hyper-parameters of the checkpoint the app serves now (the model a training here replaces: its
        structures, architecture and VLM), else the preset's; with ``with_path``, ``(hparams, path or None)``."""
        from lib.checkpoint import load_checkpoint

        for p in reversed(live_paths(self.init_paths, self.stale_before)):
            if p and os.path.exists(p):
                try:
                    hp = load_checkpoint(p).hparams
                    return (hp, p) if with_path else hp
                except CheckpointError as e:
                    logger.warning("the served checkpoint %s does not load (%s)", p, e)
        return (self.hparams, None) if with_path else self.hparams

    # -- the network comes from the latest checkpoint (its own hyper-parameters) or the preset --------------
    def _initial(self, context: Context) -> tuple[ConditionalUNet, HParams, VLMEncoder | None]:
        if context.pretrained:
            for p in reversed(live_paths(self.init_paths, self.stale_before)):
                if p and os.path.exists(p):
                    try:
                        # the same loader as prediction: the checkpoint's hyper-parameters, its VLM resolved
                        # beside it (recorded as resolved, so the published checkpoint finds it too)
                        system = load_system(p, device=context.device, vlm=self.vlm,  # its precision there
                                             vlm_candidates=self.vlm_candidates)
                        logger.info("fine-tuning from %s", p)
                        context.fine_tuned_from = p
                        return system.model, system.hparams, system.vlm
                    except CheckpointError as e:
                        logger.warning("cannot start from %s: %s", p, e)
        # from scratch (Slicer's "pretrained" unticked, or nothing served): a new network of the served model's
        # kind -- its architecture, preprocessing, VLM and structures (a review: the preset's one-label model was
        # published over a served three-structure model, and /info then misnamed its value 1) -- in the precision
        # this machine's policy gives (the preset's, "auto"), never the served file's weights
        hp, served = self.served_hparams(with_path=True)
        hp = copy.deepcopy(hp)
        vlm = None
        if served is not None:
            logger.info("training from scratch a model like the served %s (its structures, architecture and VLM)",
                        served)
            hp = dataclasses.replace(hp, precision=self.hparams.precision)
            if self.vlm and hp.model.cond_dim is not None:
                # --conf vlm names the VLM this server runs (another embedding size, the README's way to change
                # VLM): the new network's conditioning size and the VLM record come from it, not the served file
                hp.model = dataclasses.replace(hp.model, cond_dim=None)
                hp.vlm = dataclasses.replace(hp.vlm, image_embed_dim=None, text_embed_dim=None, fingerprint=None)
        if hp.model.mode == "dfm" and hp.vlm.name_or_path:
            if served is not None and not self.vlm and hp.model.cond_dim is not None:
                # the served model's VLM, found and checked as serving it finds it (it was looked for beside the
                # checkpoint only: a served checkpoint whose VLM is found elsewhere failed every training)
                vlm = load_recorded_vlm(hp, served, context.device, vlm_candidates=self.vlm_candidates)
            else:
                vlm = VLMEncoder.from_pretrained(dataclasses.replace(hp.vlm, name_or_path=self.vlm or
                                                                     hp.vlm.name_or_path))
            hp.vlm = vlm.resolved_config()
        hp = hp.resolved()
        if vlm is not None:
            vlm.cfg = hp.vlm  # resolved: the view's axis codes
        return ConditionalUNet(hp.model), hp, vlm

    def network(self, context: Context):
        model, hp, vlm = self._initial(context)
        # as lib.training.train: the precision this training runs in, recorded in what it publishes (never "auto")
        hp = dataclasses.replace(hp, precision=precision_policy.recorded(hp.precision, context.device))
        model.train()
        if getattr(context, "multi_gpu", False):  # (lib.training.distributed_norm: SyncBatchNorm on CUDA, refused on
            world = max(2, int(getattr(context, "world_size", 0) or 0))  # the CPU)
            model = distributed_norm(model, hp.model.norm, context.device, world)
        if vlm is not None:
            vlm.to(context.device)
        context.system = DFMSystem(model, vlm, hp)
        return model

    def peak_lr(self, context: Context) -> float:
        """The run's peak learning rate: ``learning_rate`` (the preset's), times ``fine_tune_lr_scale`` when the run
        starts from a served checkpoint."""
        lr = float(context.request.get("learning_rate", self.train_defaults.lr))
        if getattr(context, "fine_tuned_from", None):
            lr *= float(context.request.get("fine_tune_lr_scale", FINE_TUNE_LR_SCALE))
        return lr

    def optimizer(self, context: Context):
        return torch.optim.AdamW(context.network.parameters(), lr=self.peak_lr(context),
                                 weight_decay=self.train_defaults.weight_decay)

    def loss_function(self, context: Context):
        return torch.nn.BCEWithLogitsLoss()  # the loss is computed in train_iteration_update (flow.training_step)

    def lr_scheduler_handler(self, context: Context):
        return None

    def train_pre_transforms(self, context: Context):
        hp = context.system.hparams
        k = int(context.request.get("patches_per_image", hp.train.patches_per_image))
        augment = _as_bool("augment", context.request.get("augment", hp.train.augment))
        pre = preprocess(hp.preprocessing, structures=hp.structures, label_name=hp.label_name)
        return list(pre.transforms) + patch_transforms(hp.preprocessing, k, augment, hp.train.augmentation,
                                                       structures=hp.structures)

    def train_post_transforms(self, context: Context):
        return []

    def val_pre_transforms(self, context: Context):
        return []  # whole images: evaluate_items preprocesses them itself, exactly as predict does

    def val_post_transforms(self, context: Context):
        return []

    def val_inferer(self, context: Context):
        return make_inferer(context.system)

    def train_iteration_update(self, context: Context):
        return _TrainStep(context)

    def val_iteration_update(self, context: Context):
        return _ValStep(context)

    def train_key_metric(self, context: Context):
        return None

    def val_key_metric(self, context: Context):
        return {self.VAL_METRIC_MEAN_DICE: CaseDice()}

    def train_handlers(self, context: Context):
        from monai.handlers import StatsHandler, ValidationHandler

        schedule = str(context.request.get("lr_schedule", "cosine")).lower()
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
        handlers: list = [_LRSchedule(self.peak_lr(context), schedule)]
        if context.local_rank == 0:
            handlers.append(StatsHandler(tag_name="train_loss", output_transform=_loss_of))
        if context.evaluator:
            handlers.append(ValidationHandler(self._val_interval, validator=context.evaluator, epoch_level=True))
        return handlers

    def val_handlers(self, context: Context):
        return []

    # -- MONAI Label's multi-GPU path (torch.multiprocessing.spawn, one process per rank), also on CPUs: MONAI Label
    # assumes CUDA devices (cuda:<gpu>, DDP device_ids); with "device": "cpu" (or no GPU) and "gpus": "0,1" each rank
    # runs on the CPU and DDP talks gloo (request "distributed_backend": "gloo").
    def _device(self, context: Context):
        if context.multi_gpu and (not torch.cuda.is_available()
                                  or str(context.request.get("device", "cuda")).startswith("cpu")):
            return torch.device("cpu")
        return super()._device(context)

    def _create_network_and_optimizer(self, context: Context):
        if not (context.multi_gpu and context.device.type == "cpu"):
            return super()._create_network_and_optimizer(context)
        network = self.network(context).to(context.device)
        context.network = network
        optimizer = self.optimizer(context)
        return torch.nn.parallel.DistributedDataParallel(network), optimizer

    def _dataset(self, context, datalist, is_train, replace_rate=0.25):
        """MONAI Label gives each rank of a multi-GPU training its share of the validation images too; rank 0 then
        chose and published the best epoch by its share alone (half of them with 2 GPUs). Validation: every rank the
        whole list (each validates everything: the same Dice everywhere; the sets of an annotation loop are small)."""
        if is_train or not context.multi_gpu:
            return super()._dataset(context, datalist, is_train, replace_rate)
        context.multi_gpu = False
        try:
            return super()._dataset(context, datalist, is_train, replace_rate)
        finally:
            context.multi_gpu = True

    def partition_datalist(self, context: Context, shuffle=False):
        """MONAI Label's split (its counts, ``val_ds`` / ``train_ds`` as given), with the validation images the
        longest labelled (their label files' times, then the datastore's order) instead of the datastore's last
        ones: MONAI Label's unshuffled split held out the last images of its index, where a newly labelled image
        lands, so "Submit Label, Train" did not train on what was just annotated. The validation images stay the
        same as labels are added, and the newest label always trains."""
        train, val = super().partition_datalist(context, shuffle=shuffle)
        if val and context.request.get("val_ds") and not context.request.get("train_ds"):
            # MONAI Label trains on the whole datastore beside a given val_ds: its images were trained on, and the
            # publish decision ("beats the served checkpoint") was measured on them (a review, 2026-12-07)
            def image_file(it):
                return os.path.realpath(str(it.get("image") if isinstance(it, dict) else it))

            held = {image_file(it) for it in val}
            kept = [it for it in train if image_file(it) not in held]
            if len(kept) < len(train):
                logger.info("val_ds: %d of its image(s) left out of training", len(train) - len(kept))
            train = kept
        if val and train and not context.request.get("val_ds"):
            items = list(train) + list(val)  # the datastore's order (MONAI's split is its first and last part)

            def key(i):
                lab = items[i].get("label") if isinstance(items[i], dict) else None
                try:
                    return os.stat(lab).st_mtime_ns, i
                except (OSError, TypeError):
                    return 0, i

            held = set(sorted(range(len(items)), key=key)[:len(val)])
            train = [it for i, it in enumerate(items) if i not in held]
            val = [it for i, it in enumerate(items) if i in held]
        if not train:  # MONAI's partition of 2 images at val_split 0.9: 0 / 2, then a ValueError from the sampler
            raise ValueError(f"val_split {context.request.get('val_split')} leaves none of the {len(val)} labelled "
                             f"image(s) for training: give a smaller val_split (at most "
                             f"{max(0, len(val) - 1)}/{len(val)}) or label more images")
        return train, val

    def _load_checkpoint(self, context, train_handlers):
        return None  # never load a bare state dict non-strictly: network() loads the self-describing checkpoint

    # The base class adds ignite CheckpointSavers (bare state dicts); this task publishes self-describing
    # checkpoints instead (_Publish), so the engines are built without them.
    def _create_evaluator(self, context: Context):
        from monai.engines import SupervisedEvaluator

        if not context.val_datalist:
            return None
        # the validation labels' sizes, once, before the training (the evaluator scores them a batch at a time): one
        # that does not fit its image stops the run now, not at its first validation
        check_labels([{**it, "case_id": case_id(it)} for it in context.val_datalist])
        return SupervisedEvaluator(
            device=context.device, val_data_loader=self.val_data_loader(context), network=context.network,
            inferer=self.val_inferer(context), key_val_metric=self.val_key_metric(context),
            additional_metrics={"val_cases": CaseCount()},
            val_handlers=self.val_handlers(context), iteration_update=self.val_iteration_update(context))

    def _create_trainer(self, context: Context):
        from monai.engines import SupervisedTrainer

        return SupervisedTrainer(
            device=context.device, max_epochs=context.max_epochs, train_data_loader=self.train_data_loader(context),
            network=context.network, optimizer=context.optimizer, loss_function=self.loss_function(context),
            train_handlers=self.train_handlers(context), iteration_update=self.train_iteration_update(context),
            amp=False)

    def _set_aside_unreadable_published(self) -> None:
        """A published checkpoint whose file does not load (truncated, corrupt) served nothing -- every request was
        a 503 -- and a training compared its epochs with the configured checkpoint, published none that did not
        beat it, and left the broken file served (a review). It is renamed ``<name>.pt.unreadable-<time>`` (kept,
        never deleted), so the configured checkpoint is served again and this run is measured against it. Only the
        *file* decides (:func:`lib.checkpoint.load_checkpoint`): a missing VLM folder leaves it where it is."""
        from lib.checkpoint import load_checkpoint

        p = self.publish_path
        if not p or not os.path.exists(p) or any(q and os.path.exists(q) and os.path.samefile(q, p)
                                                for q in self.init_paths[:-1]):
            return  # (a published path that is the configured file: the user's, never renamed)
        try:
            load_checkpoint(p)
        except CheckpointError as e:
            import datetime

            aside = f"{p}.unreadable-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
            try:
                os.replace(p, aside)
                logger.warning("the published checkpoint %s does not load (%s): set aside as %s; the configured "
                               "checkpoint is served again and this run is measured against it", p, e, aside)
            except OSError as err:
                logger.warning("the published checkpoint %s does not load (%s) and cannot be set aside: %s", p, e,
                               err)

    def _served(self, context: Context, load: bool = True) -> tuple[str | None, DFMSystem | None]:
        """The checkpoint the app serves now and, when this run did not start from it (``pretrained`` false) and
        ``load``, that model loaded to be measured; ``(None, None)`` when none is served (or it does not load: not
        served)."""
        if getattr(context, "fine_tuned_from", None):
            return context.fine_tuned_from, None
        for p in reversed(live_paths(self.init_paths, self.stale_before)):
            if p and os.path.exists(p):
                try:
                    return p, (load_system(p, device=context.device, vlm=self.vlm, vlm_candidates=self.vlm_candidates)
                               if load else None)
                except CheckpointError as e:
                    logger.warning("the served checkpoint %s does not load (%s): this run may replace it", p, e)
        return None, None

    def finalize(self, context):
        super().finalize(context)
        if context.local_rank == 0:
            # a served model: publish only what beats it, whether this run fine-tunes it or trains from scratch
            # (request "publish": "always" -- MONAI Label's own behaviour -- publishes this run's best epoch
            # whatever the served model scored)
            better = str(context.request.get("publish", "better")).lower() != "always"
            # (loaded only to be measured: without validation images the served model just stays)
            served, system = self._served(context, load=context.evaluator is not None) if better else (None, None)
            outcome = _Outcome(getattr(self, "_stats_path", None), self.publish_path, "better" if better else "always",
                               served if better else self._served(context, load=False)[0])
            self.outcome = outcome
            outcome.record["left_out"] = list(getattr(self, "left_out", []))
            if context.evaluator:
                publish = _Publish(context, self.publish_path, self.VAL_METRIC_MEAN_DICE, outcome,
                                   configured=self.init_paths[:-1])
                context.evaluator.add_event_handler(Events.EPOCH_COMPLETED, publish)
                # after MONAI Label's publisher (added by the base class first) rewrote the stats for this epoch
                context.evaluator.add_event_handler(Events.EPOCH_COMPLETED, outcome.write)
                if served:
                    context.trainer.add_event_handler(Events.STARTED, publish.baseline_from(context.evaluator,
                                                                                            system))
                    context.trainer.add_event_handler(Events.COMPLETED, publish.report)
            elif served:
                # no validation image (val_split of one or two labelled images): nothing can show that the run beats
                # the served model, so it stays (it was replaced unconditionally, at the start of every loop)
                logger.warning("no validation image (%d labelled for training, val_split %s): the served model %s is "
                               "kept; label more images, or train with \"publish\": \"always\"",
                               len(context.train_datalist or []), context.request.get("val_split"), served)
                outcome.record["note"] = (f"no validation image: the served model {served} is kept (label more "
                                          f"images, or train with \"publish\": \"always\")")
                context.trainer.add_event_handler(Events.EPOCH_COMPLETED, outcome.write)
            else:
                context.trainer.add_event_handler(Events.EPOCH_COMPLETED, outcome.write)
                context.trainer.add_event_handler(Events.COMPLETED, _Publish(context, self.publish_path, None,
                                                                             outcome,
                                                                             configured=self.init_paths[:-1]))

    def train(self, rank, world_size, request, datalist):
        """MONAI Label's run; its stats (a synchronous ``/train``'s answer) with this run's ``publication``."""
        self.outcome = None
        stats = super().train(rank, world_size, request, datalist)
        if self.outcome is not None and isinstance(stats, dict):
            stats["publication"] = dict(self.outcome.record)
        return stats


def _loss_of(output):
    if isinstance(output, list):
        output = output[0]
    return output["loss"]
