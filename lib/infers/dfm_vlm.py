"""MONAI Label infer task: the core's preprocessing, sliding-window DFM sampler and inversion, nothing else.

The task never builds a network from code defaults: the network, its VLM and its preprocessing all come from the
checkpoint (:func:`lib.checkpoint.load_system`). With no loadable checkpoint the model is *not ready*: it is left
out of ``/info``'s models, ``/info`` says why under ``models_not_ready``, and ``/infer`` answers 503 with the reason.
A new checkpoint file (the trainer publishes atomically) is picked up at the next request, by its mtime.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import device_list, device_map, file_ext

from lib.checkpoint import CheckpointError, load_system
from lib.clicks import ClickError, check_no_stray_points, parse_clicks, parse_label_clicks, uncertain_mask
from lib.config import SAMPLERS, ConfigError, SamplerConfig, validate_sampler
from lib.evaluation import make_inferer, predict_preprocessed, uncertainty_scores
from lib.inferer import DFMSystem, WindowCache
from lib.precision import PRECISIONS, default_device
from lib.samplers import nfe_of
from lib.structures import NOT_A_STRUCTURE, StructureError, inside, paint
from lib.transforms import affine_2d, as_image_nifti, has_geometry, stored_layout_note
from lib.vlm import VLMError

logger = logging.getLogger(__name__)


INTERACTIVE_TYPE = InferType.DEEPEDIT
UNCERTAIN_VALUE = 2  # the least label value of the optional "uncertain" segment (request parameter uncertain_segment)


def uncertain_value(structure_values) -> int:
    """The value of a result's uncertain segment: after every structure's (a one-label model's: 2)."""
    return max(UNCERTAIN_VALUE, max((int(v) for v in structure_values), default=0) + 1)


REQUEST_KEYS = ("sampler", "steps", "num_samples", "overlap", "sw_batch_size", "seed", "precision")
# also: "labels" (a prompted model: a subset of its structures), "prompt" (a free text prompt), clicks (interactive)


def live_paths(paths: Sequence[str], stale_before: float | None = None) -> list[str]:
    """The existing checkpoint files of ``paths`` in serving order (the last one is served): ``[the configured
    checkpoint, the published one]``. With ``stale_before`` (a ``--conf <model>_checkpoint`` was given while a file
    published by an earlier session sat in ``model_dir``), that published file counts only once a training here has
    replaced it: the checkpoint the user named is served, not last week's model -- and not when the named file does
    not exist either (a typo served last week's model; a review, 2026-12-07): then nothing is, until it does."""
    out = [p for p in paths if p and os.path.exists(p)]
    last = paths[-1] if paths else None
    if stale_before is not None and len(paths) > 1 and out and out[-1] == last \
            and os.stat(last).st_mtime < stale_before:
        out.pop()
    return out


class ModelNotReady(RuntimeError):
    """No usable checkpoint: the model must not be served (never with random weights)."""


def file_sha256(path) -> str:
    """The SHA-256 of a file (a checkpoint: which version answered a request)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) and v else v


def _as_int(name: str, v) -> int:
    v = _first(v)
    try:
        if isinstance(v, bool) or not math.isfinite(float(v)) or float(v) != int(float(v)):
            raise ValueError
        return int(float(v))
    except (TypeError, ValueError, OverflowError):  # OverflowError: a 400-digit integer (was a 500)
        raise ConfigError(f"parameter {name!r} must be an integer, got {str(v)[:40]!r}") from None


def _as_float(name: str, v) -> float:
    v = _first(v)
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 10**400 (was a 500); callers check ranges
        raise ConfigError(f"parameter {name!r} must be a number, got {str(v)[:40]!r}") from None


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _max_request_work(raw: str) -> float:
    """``DFM_MAX_REQUEST_WORK``: 0 (no limit) or a factor of at least 1 (below 1 the model's own sampler would be
    refused); empty: the default."""
    if not raw.strip():
        return 32.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not (value == 0 or value >= 1):
        raise ConfigError(f"DFM_MAX_REQUEST_WORK={raw!r}: expected 0 (no limit) or a number >= 1")
    return value


# a request may ask at most this many times the network work of the checkpoint's own sampler (DFM_MAX_REQUEST_WORK;
# 0: no limit): steps, samples and overlap are each bounded, their product was not (DFMVLMInfer.check_work)
MAX_REQUEST_WORK = _max_request_work(os.environ.get("DFM_MAX_REQUEST_WORK", "32"))
INTERNAL_PREFIX = "_dfm_"  # the keys this app adds to a request's data while it runs (never a client's)


def _as_bool(name: str, v) -> bool:
    """A request's boolean, which may arrive as a string ("false" is false); anything else is a ConfigError."""
    v = _first(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ConfigError(f"parameter {name!r} must be true or false, got {v!r}")


def sampler_params(req: dict) -> dict:
    """Validated sampler overrides from a request (numbers may arrive as strings); raises ConfigError."""
    out: dict[str, Any] = {}
    if req.get("sampler") is not None:
        out["sampler"] = str(_first(req["sampler"]))
    for k in ("steps", "num_samples", "sw_batch_size", "seed"):
        if req.get(k) is not None:
            out[k] = _as_int(k, req[k])
    if req.get("overlap") is not None:
        out["overlap"] = _as_float("overlap", req["overlap"])
    if req.get("precision") is not None:
        out["precision"] = str(_first(req["precision"]))
        if out["precision"] not in PRECISIONS:
            raise ConfigError(f"parameter 'precision' must be one of {PRECISIONS}, got {out['precision']!r}")
    full = {"sampler": "euler", "steps": 1, "num_samples": 1, "overlap": 0.0, "sw_batch_size": 1, **out}
    validate_sampler(full["sampler"], full["steps"], full["num_samples"], full["overlap"], full["sw_batch_size"],
                     seed=out.get("seed"))
    return out


def _sampler_config(d: SamplerConfig) -> dict:
    """A task config's sampler entries (3D Slicer shows them as the task's options), from a checkpoint's sampler."""
    return {"sampler": [d.name] + [s for s in SAMPLERS if s != d.name], "steps": d.steps,
            "num_samples": d.num_samples, "overlap": d.overlap, "sw_batch_size": d.sw_batch_size, "seed": d.seed}


# the sampler's hold of clicked voxels, per request; "checkpoint" (or absent, or empty): the checkpoint's setting.
# An interactive task lists them in its config, which 3D Slicer's MONAILabel module shows as its options and sends
# with every request (as strings)
HOLD_OPTIONS = {"hold_radius": ["checkpoint", "-1", "0", "2", "4"],
                "grow_radius": ["checkpoint", "-1", "4", "8", "12", "16"],
                "grow_tolerance": ["checkpoint", "0.1", "0.2", "0.3", "0.5"],
                "grow_scale": ["checkpoint", "0", "1", "2", "3"]}


def hold_params(req: dict) -> tuple:
    """``(hold_radius, grow_radius, grow_tolerance, grow_scale)`` of a request, None where it leaves the checkpoint's
    (absent, empty or ``"checkpoint"``); raises ConfigError naming a bad value."""
    def given(k):
        v = _first(req.get(k))
        return None if v is None or (isinstance(v, str) and v.strip().lower() in ("", "checkpoint")) else v

    hold = grow = tol = scale = None
    if given("hold_radius") is not None:
        hold = _as_int("hold_radius", given("hold_radius"))
        if hold < -1:
            raise ConfigError(f"parameter 'hold_radius' must be >= -1 (-1: no hold), got {hold}")
    if given("grow_radius") is not None:
        grow = _as_int("grow_radius", given("grow_radius"))
        if grow < -1:
            raise ConfigError(f"parameter 'grow_radius' must be >= -1 (-1: no growing), got {grow}")
    for k in ("grow_tolerance", "grow_scale"):
        if given(k) is not None:
            v = _as_float(k, given(k))
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"parameter {k!r} must be a finite number >= 0, got {v}")
            tol, scale = (v, scale) if k == "grow_tolerance" else (tol, v)
    return hold, grow, tol, scale


def is_upload(path: str) -> bool:
    """A file MONAI Label wrote for this request: an upload, stored by ``tempfile.NamedTemporaryFile`` as
    ``tmpXXXXXXXX<the upload's suffixes>`` directly in the temporary folder (a new name each time)."""
    import re
    import tempfile

    if "\x00" in path:  # os.path raises on it
        return False
    real = os.path.realpath(path)
    return os.path.isfile(real) and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()) and \
        re.fullmatch(r"tmp[a-z0-9_]{8}(\.[^/\\]*)?", os.path.basename(real)) is not None


def session_store() -> str:
    """Where MONAI Label keeps session images (``PUT /session``: 3D Slicer's upload of an image it opened itself),
    as its ``Sessions`` store decides it."""
    from pathlib import Path

    from monailabel.config import settings

    return os.path.realpath(settings.MONAI_LABEL_SESSION_PATH
                            or os.path.join(Path.home(), ".cache", "monailabel", "sessions"))


def is_session_image(path: str) -> bool:
    """A file in MONAI Label's session store (under a new session id and a new temporary name each time)."""
    if "\x00" in path:
        return False
    real = os.path.realpath(path)
    return os.path.isfile(real) and real.startswith(session_store() + os.sep)


def request_device(value, default: str) -> str:
    """The torch device a request names. 3D Slicer sends the task's ``device`` option as MONAI Label lists it
    (``device_list()``: "cpu", or a GPU's *name*, "NAME:i" with several GPUs), REST clients torch's ("cuda",
    "cuda:1"): names go through MONAI Label's ``device_map``, as its own tasks do; absent or empty -> ``default``;
    CUDA asked on a machine without it -> the CPU (as MONAI Label's ``name_to_device``); anything else ->
    ConfigError (422) naming it and the choices, never a silent fall-back to the CPU."""
    v = _first(value)
    if v is None or str(v).strip() == "":
        return default
    v = str(v).strip()
    dev = device_map().get(v, v)
    if dev == "cpu":
        return "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            return "cpu"
        try:
            index = torch.device(dev).index
        except RuntimeError:
            index = -1
        if index is None or 0 <= index < torch.cuda.device_count():
            return dev
    raise ConfigError(f"parameter 'device' {v!r} is not a device of this server: one of {device_list()}, "
                      f"'cpu', 'cuda' or 'cuda:N'")


RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")  # integer label maps


def result_dtype(value) -> str | None:
    """The request's ``result_dtype`` (OHIF asks ``uint16`` and reads the file's voxels as such; it was always
    written uint8); None when absent; else ConfigError naming it and the choices."""
    v = _first(value)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if not isinstance(v, str) or v.strip().lower() not in RESULT_DTYPES:
        raise ConfigError(f"parameter 'result_dtype' {v!r} is not one of {list(RESULT_DTYPES)}")
    return v.strip().lower()


def device_key(device) -> str:
    """One name per device: ``cuda`` is the current CUDA device, ``cuda:N``."""
    d = torch.device(str(device))
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(d)


LOSSY_EXTENSIONS = (".jpg", ".jpeg")  # a label map is never written lossy: its label values would blur
RESULT_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff",
                     ".bmp") + LOSSY_EXTENSIONS  # what the writer can write (a JPEG request: a PNG)


def result_extension(value) -> str | None:
    """The request's ``result_extension``, with its leading dot ("nii.gz" -> ".nii.gz"); None when absent; else
    ConfigError naming it and the choices (ITK was asked to write ``.txt``: a 500)."""
    v = _first(value)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if not isinstance(v, str):
        raise ConfigError(f"parameter 'result_extension' must be a file extension, got {v!r}")
    ext = v.strip() if v.strip().startswith(".") else "." + v.strip()
    if ext.lower() not in RESULT_EXTENSIONS:
        raise ConfigError(f"parameter 'result_extension' {v!r} is not one of {list(RESULT_EXTENSIONS)}")
    return ext


def write_label_like_nifti(label, image_path: str, ext: str) -> str | None:
    """``label`` (the image's spatial shape) as a NIfTI with the image's own affine, qform/sform codes and units in
    a fresh header; None when the shapes differ (the caller falls back to MONAI Label's writer)."""
    import tempfile

    import nibabel as nib

    src = nib.load(image_path)
    img = as_image_nifti(label, src)  # (a one-slice (X, Y, 1) image's label keeps its slice axis)
    if img is None:
        logger.warning("label shape %s is not the spatial shape of %s %s: written by MONAI Label's writer",
                       tuple(np.shape(label)), image_path, tuple(src.shape))
        return None
    out = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
    nib.save(img, out)
    return out


class DFMPreprocessd:
    """Run the checkpoint's own preprocessing on the request's image (and keep the result for inversion); for an
    interactive model also read the request's clicks (in the image's own voxel indices; ClickError -> 422)."""

    def __init__(self, system: DFMSystem, labels: Sequence[str] = (), interactive: bool = False):
        self.system = system
        self.labels = list(labels)
        self.interactive = interactive

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        if not self.interactive:
            sent = [k for k in ("foreground", "background", *self.labels)
                    if isinstance(d.get(k), (list, tuple)) and len(d[k])]
            if sent:  # they were ignored without a word: a result the user did not ask for
                raise ClickError(f"this model segments automatically and takes no clicks (got points under "
                                 f"{sent}): send them to its interactive model ('<model>_interactive')")
        item = {"image": d["image"]}
        if d.get("text"):
            item["text"] = d["text"]
        pre = self.system.preprocessing(item)
        d["image"] = pre["image"]
        d["_dfm_pre"] = pre
        # the model that preprocessed it infers it and inverts it: a training that publishes a checkpoint during
        # the request (loading and resampling a volume takes seconds) made run_inferer load the new one, whose
        # Spacingd then refused to invert the old one's (a 500)
        d["_dfm_system"] = self.system
        if self.interactive:
            img = pre["image"]
            shape = [int(v) for v in img.meta.get("spatial_shape", img.shape[1:])] if hasattr(img, "meta") \
                else list(img.shape[1:])
            dims = self.system.hparams.preprocessing.spatial_dims
            check_no_stray_points(d, self.labels)  # (the server checks it first, with the other models' names)
            if self.system.structures:  # a prompted model: clicks per structure (lib.clicks.parse_label_clicks)
                d["_dfm_clicks"] = prompted_clicks(self.system, d, dims, shape)
            else:
                d["_dfm_clicks"] = parse_clicks(d, self.labels, dims, shape)
        return d


def prompted_clicks(system: DFMSystem, d: dict, dims: int, shape: Sequence[int]) -> dict:
    """A prompted model's clicks, ``{target name: Clicks}`` for exactly the targets the request asks for (its
    ``labels``, default all, or a free ``prompt``): points under a structure's name are positive for it,
    ``background`` negative for every target, ``foreground`` (DeepGrow) for the request's ``label`` (3D Slicer sends
    the selected segment) or the one target asked for. A click for a structure the request does not ask for would be
    dropped from the result while the user sees it placed, so it is refused (ClickError -> 422, naming it)."""
    prompt = _prompt_param(d)
    targets = system.prompts(_labels_param(d), prompt)
    asked = [t[0] for t in targets]
    structures = [s.name for s in system.structures]
    label = _first(d.get("label"))
    if prompt is not None:  # one target, named by the prompt: a DeepGrow click is for it, whatever segment is selected
        per = parse_label_clicks({k: v for k, v in d.items() if k != "foreground"}, structures, dims, shape)
        named = [n for n in structures if per[n].fg]
        if named:
            raise ClickError(f"clicks under {named} with a free prompt ({prompt!r}): a free prompt segments one "
                             "target; send its positive points as 'foreground'")
        only = {k: d.get(k) for k in ("foreground", "background")}  # the prompt's text is no request key
        return parse_label_clicks(only, asked, dims, shape, target=asked[0])
    by_value = {str(s.value): s.name for s in system.structures}  # Slicer may send the segment's value ("2")
    label = by_value.get(str(label).strip(), label) if label is not None else None
    target = label if label in structures else (asked[0] if len(asked) == 1 else None)
    if target is None and label not in (None, "") and d.get("foreground"):
        # (was: "give 'label'", to a request that gave one: a Slicer segment renamed, or background / uncertain
        # selected; a review)
        hint = {"background": "send negative points as 'background'",
                "uncertain": "the uncertain segment takes no clicks"}.get(str(label).strip().lower(),
                                                                       "select one of them, or put the points "
                                                                       "under the structure's name")
        raise ClickError(f"'foreground' clicks with label {label!r}, which is not a structure of this model "
                         f"({structures}): {hint}")
    clicks = parse_label_clicks(d, structures, dims, shape, target=target)
    dropped = [n for n in structures if n not in asked and clicks[n].fg]
    if dropped:
        raise ClickError(f"positive clicks for {dropped}, which this request does not ask for (labels {asked}): add "
                         f"{'it' if len(dropped) == 1 else 'them'} to 'labels' or leave the points out")
    # one voxel clicked positive for two structures that cannot overlap (a lesion and a vertebra; a tumour core
    # inside the whole tumour can): the label map gives it one value, so one click would not be as clicked
    rules = {s.name: s.truth for s in system.structures}
    for i, a in enumerate(asked):
        for b in asked[i + 1:]:
            both = sorted(set(map(tuple, clicks[a].fg)) & set(map(tuple, clicks[b].fg)))
            if both and not (inside(rules[a], rules[b]) or inside(rules[b], rules[a])):
                raise ClickError(f"voxel(s) {both} clicked positive for both {a!r} and {b!r}, which do not overlap: "
                                 "one label value per voxel; leave one of the points out")
    return {n: clicks[n] for n in asked}


def _prompt_param(d: dict) -> str | None:
    """The request's free ``prompt`` (absent or empty: none; a list of several: refused, one prompt segments one
    target -- its first element was used silently)."""
    v = d.get("prompt")
    if isinstance(v, (list, tuple)) and len([x for x in v if str(x).strip()]) > 1:
        raise StructureError(f"'prompt' is one free text, got {len(v)}: {list(v)[:4]}; send one per request, or "
                             "ask for the model's structures with 'labels'")
    return None if v is None or str(_first(v)).strip() == "" else str(_first(v))


def _labels_param(d: dict):
    """The request's ``labels`` (a list or a comma-separated string; absent: every structure)."""
    v = d.get("labels")
    if v is None or isinstance(v, (list, tuple)):
        return v
    return str(v)


class DFMPostprocessd:
    """prob > 0.5 -> one uint8 label map on the input's grid (the probability map was inverted already): each
    target painted with its value, the smallest over the larger (:func:`lib.structures.paint`);
    + result JSON."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        prob = d["prob"]
        targets = d.pop("_dfm_targets", None) or [("foreground", 1, None)]
        label = paint(prob, [t[1] for t in targets])
        for p, value, keep in d.pop("_dfm_clicked", None) or []:
            where = tuple(int(v) for v in p)
            if int(label[where]) not in keep:
                label[where] = value
        res = d.setdefault("result", {})
        unc = d.pop("_dfm_uncertain", None)
        if unc is not None:  # the disagreement of the M samples as a segment of its own (never on a clicked voxel)
            label[torch.as_tensor(unc)] = d.get("_dfm_uncertain_value", UNCERTAIN_VALUE)
            res["uncertain_fraction"] = float(torch.as_tensor(unc).float().mean())
        d["pred"] = MetaTensor(label, affine=prob.affine, meta=dict(prob.meta)) if isinstance(prob, MetaTensor) else label
        res["foreground_fraction"] = float(sum((label == t[1]).float().mean() for t in targets))
        if len(targets) > 1 or d.get("_dfm_prompted"):
            res["fractions"] = {t[0]: float((label == t[1]).float().mean()) for t in targets}
        return d


class DFMVLMInfer(BasicInferTask):
    RETRY_FAILED_S = 60.0  # a checkpoint that failed to load is tried again after this, or at once when it changes

    def __init__(self, path: Sequence[str], labels, dimension: int, description: str, vlm: str | None = None,
                 sampler_defaults: SamplerConfig | None = None, config: dict | None = None,
                 interactive: bool = False, cache_bytes: int = 512 * 2 ** 20, stale_before: float | None = None,
                 vlm_candidates: Sequence[str] = ()):
        d = sampler_defaults or SamplerConfig()
        cfg = {**_sampler_config(d), "device": device_list(),  # "precision" is accepted too (the checkpoint's policy)
               "uncertain_segment": False}  # a check box in Slicer's options: where the samples disagree
        if interactive:
            cfg.update({k: list(v) for k, v in HOLD_OPTIONS.items()})
        cfg.update(config or {})
        # interactive: the infer type that makes 3D Slicer's MONAILabel module and OHIF show their point tools
        super().__init__(path=list(path), network=None, type=INTERACTIVE_TYPE if interactive else InferType.SEGMENTATION,
                         labels=labels, dimension=dimension, description=description, config=cfg)
        self.interactive = interactive
        self._fixed = set(config or {})  # config values given here: not the served checkpoint's (follow_checkpoint)
        self.stale_before = stale_before  # lib.infers.dfm_vlm.live_paths
        # the windows of the last results: a new click re-runs only the windows it reaches (lib.inferer.WindowCache)
        self.window_cache = WindowCache(cache_bytes) if interactive else None
        self.vlm = vlm
        self.vlm_candidates = list(vlm_candidates)  # VLM folders a checkpoint's missing one may be (fingerprint)
        self._lock = threading.Lock()
        self._request = threading.local()  # the model a request started with (its config, preprocessing, inference)
        self._systems: dict[str, tuple[DFMSystem, str, float]] = {}
        self._failures: dict[str, tuple[str, float, float, str]] = {}

    def get_path(self, validate=True):
        """The checkpoint served: the last existing file of ``path`` (:func:`live_paths`)."""
        live = live_paths(self.path, self.stale_before)
        return live[-1] if live else None

    # -- readiness: a model is served only from a checkpoint that loads ------------------------------------
    def readiness(self) -> tuple[bool, str | None]:
        path = self.get_path()
        if not path:
            return False, ("no trained checkpoint: looked for " + ", ".join(map(str, self.path)) +
                           "; train the model first (POST /train/<model>) or give a checkpoint with --conf")
        try:
            self.system(self.default_device())  # the copy that serves requests: no second one for /info
        except ModelNotReady as e:
            return False, str(e)
        return True, None

    @staticmethod
    def default_device() -> str:
        """CUDA when present (as MONAI Label's own tasks), else the CPU; a request may name another."""
        return default_device()

    def is_valid(self) -> bool:
        return self.readiness()[0]

    def system(self, device) -> DFMSystem:
        """The checkpoint's system on ``device``; reloaded when the checkpoint file changes (no restart). "cuda"
        and "cuda:<current>" are one device, one copy (MONAI Label's config names the GPU "cuda:0" where a request
        without a device gets "cuda": two copies of model and VLM on one GPU). A published file removed while it
        was looked up or loaded (DELETE /model, a training replacing it) is looked up again: the file served now
        (it was a FileNotFoundError, a 500 on /infer and /info)."""
        for _ in range(3):
            try:
                return self._system(device)
            except FileNotFoundError:
                continue
        raise ModelNotReady(f"the checkpoint files {self.path} kept changing while they were loaded; ask again")

    def _system(self, device) -> DFMSystem:
        device = device_key(device)
        path = self.get_path()
        if not path:
            raise ModelNotReady("no trained checkpoint: looked for " + ", ".join(map(str, self.path)))
        mtime = os.stat(path).st_mtime
        with self._lock:
            cached = self._systems.get(device)
            if cached and cached[1] == path and cached[2] == mtime:
                return cached[0]
            failed = self._failures.get(device)
            if failed and failed[:2] == (path, mtime) and time.monotonic() - failed[2] < self.RETRY_FAILED_S:
                raise ModelNotReady(failed[3])  # /info polls often: do not retry a failing load (hub lookups) each time
            try:
                digest = file_sha256(path)
                system = load_system(path, device=device, vlm=self.vlm, vlm_candidates=self.vlm_candidates)
            except (CheckpointError, VLMError, ConfigError, OSError) as e:
                if not os.path.exists(path):  # removed while it loaded: look again (system)
                    raise FileNotFoundError(path) from e
                reason = f"checkpoint {path} cannot be served: {e}"
                self._failures[device] = (path, mtime, time.monotonic(), reason)
                raise ModelNotReady(reason) from e
            self._failures.pop(device, None)
            if os.stat(path).st_mtime != mtime:  # replaced while it loaded: the digest may name the other file
                digest = None
            system.checkpoint_sha256 = digest  # which checkpoint answered: every result names it
            logger.info("loaded %s (mtime %s, sha256 %s) on %s", path, time.ctime(mtime), digest, device)
            self._systems[device] = (system, path, mtime)
            return system

    def share_models_with(self, other: "DFMVLMInfer") -> None:
        """Serve from ``other``'s loaded systems (the same checkpoint: one model copy for both tasks)."""
        self._lock, self._systems, self._failures = other._lock, other._systems, other._failures

    def clear_cache(self):
        with self._lock:
            self._systems.clear()
            self._failures.clear()

    def info(self) -> dict:
        path = self.get_path()
        system = None
        if path:
            try:
                system = self.system(self.default_device())
                self.follow_checkpoint(system)  # the config /info shows (Slicer's options) is the served checkpoint's
            except ModelNotReady:
                pass
        i = super().info()
        if system is not None:  # the file that was loaded (the one looked up may have gone since)
            path = getattr(getattr(system, "checkpoint", None), "path", None) or path
        try:
            mtime = os.stat(path).st_mtime if path else None
        except FileNotFoundError:  # removed since (a 500 on /info)
            path = None
        if path:
            i["checkpoint"] = {"path": path, "modified_time": mtime}
            try:
                if system is None:
                    raise ModelNotReady(path)
                i["checkpoint"]["sha256"] = getattr(system, "checkpoint_sha256", None)
                hp = system.hparams
                i["sampler_defaults"] = {"sampler": hp.sampler.name, "steps": hp.sampler.steps,
                                         "num_samples": hp.sampler.num_samples, "overlap": hp.sampler.overlap,
                                         "roi_size": hp.sampler.roi_size, "precision": hp.precision}
                i["vlm"] = hp.vlm.name_or_path
            except ModelNotReady:
                pass
        return i

    # -- pipeline -----------------------------------------------------------------------------------------------
    def _device(self, data) -> str:
        return request_device(data.get("device") if data else None, self.default_device())

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        labels = list(self.labels) if isinstance(self.labels, (dict, list, tuple)) else [self.labels]
        device = self._device(data)
        return [DFMPreprocessd(self._pinned(device) or self.system(device), labels, self.interactive)]

    def _pin(self, device, system) -> None:
        """The model this thread's request started with (None: none), for its preprocessing and inference."""
        # one name per device: a request without one is "cuda" when it starts, "cuda:0" once MONAI Label merged the
        # task's config (a review: the pin compared the two spellings and was skipped on a GPU server)
        self._request.system = (device_key(device), system) if system is not None else None

    def _pinned(self, device) -> DFMSystem | None:
        pinned = getattr(self._request, "system", None)
        return pinned[1] if pinned and pinned[0] == device_key(device) else None

    def inverse_transforms(self, data=None):
        return None  # the core inverts the probability map itself (predict_preprocessed)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [DFMPostprocessd()]

    def make_inferer(self, system: DFMSystem, data: dict):
        """The core's DFMSlidingWindowInferer with the request's sampler parameters (validated; ConfigError)."""
        fixed = sorted(k for k in ("roi_size", "max_batch_voxels") if data.get(k) is not None)
        if fixed:  # (accepted and ignored, the README saying another roi_size is refused: a review)
            raise ConfigError(f"{fixed} cannot be set in a request: the windows are the training patch (another "
                              "size changes what the VLM sees; `python -m lib predict --roi-size` with "
                              "--allow-roi-mismatch for experiments), and the memory cap is the checkpoint's")
        params = sampler_params({k: v for k, v in data.items() if k in REQUEST_KEYS})
        return make_inferer(system, **params)

    @staticmethod
    def check_work(system: DFMSystem, inferer, spatial_shape) -> None:
        """Refuse a request that asks more than :data:`MAX_REQUEST_WORK` times the network work of the checkpoint's
        own sampler on this image (:meth:`lib.inferer.DFMSlidingWindowInferer.work`: windows x samples x
        evaluations). Each parameter has its bound (``steps`` <= 256, ``num_samples`` <= 64, ``overlap`` <= 0.9),
        but not their product: one request of all three would hold the model -- which serves requests one at a time
        -- for some 39 hours (5.6 million window evaluations on the 3D sample image phantom_ct_06 against 40 by
        default, which take about 1 s here), with no way to cancel it."""
        if not MAX_REQUEST_WORK:
            return
        asked, usual = inferer.work(spatial_shape), make_inferer(system).work(spatial_shape)
        if asked > MAX_REQUEST_WORK * usual:
            raise ConfigError(
                f"this request asks {asked / usual:.1f} times the network work of the model's own sampler on this "
                f"image ({inferer.window_count(spatial_shape)} windows x {inferer.num_samples} samples x "
                f"{nfe_of(inferer.sampler, inferer.steps)} evaluations = {asked:,}, against {usual:,}); "
                f"this server takes at most {MAX_REQUEST_WORK:g} times (DFM_MAX_REQUEST_WORK), because the model "
                "serves one request at a time for everyone: lower steps, num_samples or overlap, or run it "
                "outside the server (python -m lib predict)")

    def run_inferer(self, data: dict, convert_to_batch=True, device="cuda"):
        system = data.pop("_dfm_system", None) or self.system(self._device(data))
        inferer = self.make_inferer(system, data)
        # seeded by the image's content (lib.transforms.ContentKeyd, in the preprocessing): a file, an upload of it and
        # a session's copy give the same result, as evaluate and predict do (it was seeded by the file's name)
        src = data.get("image_path")
        pre = dict(data["_dfm_pre"])
        self.check_work(system, inferer, tuple(pre["image"].shape[1:]))
        clicks = data.pop("_dfm_clicks", None)
        hold, grow, tol, scale = hold_params(data)
        uncertain = _as_bool("uncertain_segment", data.get("uncertain_segment", False))
        if uncertain and inferer.num_samples < 2:
            raise ConfigError("parameter 'uncertain_segment' needs num_samples >= 2 (the samples' disagreement)")
        prompt = _prompt_param(data)
        out = predict_preprocessed(system, pre, inferer, clicks=clicks, cache=self.window_cache, hold_radius=hold,
                                   grow_radius=grow, grow_tolerance=tol, grow_scale=scale,
                                   return_variance=uncertain, labels=_labels_param(data), prompt=prompt)
        targets = out["targets"]
        all_clicks = list(clicks.values()) if isinstance(clicks, dict) else [clicks] if clicks else []
        if uncertain:
            mask = torch.as_tensor(uncertain_mask(out["var"].max(0).values))  # where any target's samples disagree
            for k in all_clicks:
                for p in k.fg + k.bg:
                    mask[tuple(int(v) for v in p)] = False  # a clicked voxel is what the user said
            data["_dfm_uncertain"] = mask
        # the result's segments: a prompted model's every structure (those not asked for are empty), a free prompt's
        # one target, or the task's labels. 3D Slicer gives the k-th name (by value) the value k, so the values are
        # 1..N without gaps: a subset named alone ({"vertebra": 2}) showed nothing, the uncertain value 3 after
        # {"lesion": 1} was dropped. The uncertain segment comes after them all (a one-label model's value may be 2)
        if prompt is None and system.structures:
            names = {s.name: int(s.value) for s in system.structures}
        elif system.structures or prompt is not None:
            names = {t[0]: int(t[1]) for t in targets}
        else:
            names = {n: int(v) for n, v in self.labels.items() if n not in NOT_A_STRUCTURE} \
                if isinstance(self.labels, dict) else {str(self.labels): 1}
        if uncertain:
            data["_dfm_uncertain_value"] = uncertain_value(names.values())
        data["_dfm_targets"] = targets
        data["_dfm_prompted"] = bool(system.structures)
        if isinstance(clicks, dict):  # after painting, a clicked voxel keeps what the user clicked it as
            values = {t[0]: int(t[1]) for t in targets}
            # a voxel painted as a structure nested in the clicked one is in it already (a whole-tumour click on a
            # voxel painted core: it was rewritten to whole tumour, "not core", which the user never said)
            truth = {s.name: s.truth for s in system.structures}
            keep = {n: {values[o] for o in values if o == n or (o in truth and n in truth
                                                                and inside(truth[o], truth[n]))} for n in values}
            data["_dfm_clicked"] = [(p, values[n], keep[n]) for n, k in clicks.items() if n in values for p in k.fg] + \
                [(p, 0, {0}) for p in (all_clicks[0].bg if all_clicks else [])]
        data["prob"] = out["prob"]
        data.pop("_dfm_pre", None)
        res = data.setdefault("result", {})
        if inferer.num_samples > 1:  # the same scores as the active-learning scoring method
            res["uncertainty"] = uncertainty_scores(out["prob_pre"], out["var_pre"])
        ck_path = getattr(getattr(system, "checkpoint", None), "path", None) or self.get_path()  # the one that ran
        res.update({"checkpoint": ck_path, "checkpoint_sha256": getattr(system, "checkpoint_sha256", None),
                    "sampler": inferer.sampler, "steps": inferer.steps,
                    "num_samples": inferer.num_samples, "overlap": inferer.overlap, "seed": inferer.seed,
                    "precision": inferer.precision or system.hparams.precision, "device": str(system.device)})
        if system.hparams.preprocessing.spatial_dims == 2:  # a 2D image stored mirrored or transposed: said
            note = stored_layout_note(pre["image"].meta.get("loaded_affine"), os.path.basename(str(src or "image")))
            if note:
                res["notes"] = [note]
        if system.structures or prompt is not None:
            res["label_names"] = dict(names)  # Slicer names the segments by these
            res["labels"] = [t[0] for t in targets]  # what was segmented
            if prompt is not None:
                res["prompt"] = prompt
        if uncertain:
            res["label_names"] = {**names, "uncertain": data["_dfm_uncertain_value"]}
        if "label_names" in res:
            res["dfm_label_names"] = dict(res["label_names"])
        if self.interactive:
            n_fg = sum(len(k.fg) for k in all_clicks)
            n_bg = len(all_clicks[0].bg) if all_clicks else 0
            res.update({"clicks": {"foreground": n_fg, "background": n_bg},
                        "guidance": system.takes_clicks,
                        "hold_radius": system.hparams.clicks.hold_radius if hold is None else hold,
                        "grow_radius": system.hparams.clicks.grow_radius if grow is None else grow,
                        "grow_tolerance": system.hparams.clicks.grow_tolerance if tol is None else tol,
                        "grow_scale": system.hparams.clicks.grow_scale if scale is None else scale,
                        "windows": out["windows"]["windows"], "windows_rerun": out["windows"]["rerun"]})
        return data

    def followed(self, system: DFMSystem) -> dict:
        """The sampler values that follow ``system``'s checkpoint (all but those given as the task's ``config``)."""
        return {k: v for k, v in _sampler_config(system.hparams.sampler).items() if k not in self._fixed}

    def follow_checkpoint(self, system: DFMSystem) -> None:
        """The config's sampler values are the served checkpoint's. MONAI Label merges the task's config into every
        request, and the config was made once, from the checkpoint served at start: after a training published a
        checkpoint with other sampler settings, every request still ran the old ones (while /info showed the new).
        Values a request names itself still win."""
        self._config.update(self.followed(system))

    def __call__(self, request, callbacks=None):
        # the request's own keys only: the app's (set while a request runs) were read from a client's params as
        # well ("_dfm_clicked" painted any value at any voxel of an automatic result; others were 500s)
        own = sorted(k for k in request if isinstance(k, str) and k.startswith(INTERNAL_PREFIX))
        if own:
            raise ConfigError(f"parameter(s) {own} are set by this app while a request runs, not by a client")
        # checked before MONAI Label reads them: its name_to_device failed on device=5 (a 500), and ITK was asked to
        # write any result_extension (a 500 after the whole inference)
        device = self._device(request)
        if _first(request.get("device")) is not None:
            request["device"] = device
        ext = result_extension(request.get("result_extension"))
        if ext is not None:
            request["result_extension"] = ext
        dtype = result_dtype(request.get("result_dtype"))
        if dtype is not None:
            request["result_dtype"] = dtype
        system = None
        try:  # before MONAI Label merges the config into the request
            system = self.system(device)
            self.follow_checkpoint(system)
        except (ModelNotReady, ConfigError):
            pass  # the request itself reports it (503 / 422)
        # one model for the whole request: a checkpoint published after the config followed it was loaded for the
        # preprocessing, so the request ran one checkpoint with another's sampler settings
        self._pin(device, system)
        if system is not None:
            # the request carries its model's sampler values itself: the config is shared, and another request or
            # /info following a newer checkpoint between here and MONAI Label's merge gave this request that
            # checkpoint's settings (with infer concurrency, or a request served while a training published)
            request = {**self.followed(system), **request}
        try:
            label_file, res = super().__call__(request, callbacks)
        finally:
            self._pin(None, None)
        # MONAI Label sets label_names to the task's labels after the writer: a prompted request (a subset, a free
        # prompt) or the uncertain segment names its own
        names = res.pop("dfm_label_names", None) if isinstance(res, dict) else None
        if names is not None:
            res["label_names"] = names
        return label_file, res

    def writer(self, data, extension=None, dtype=None):
        """The label file, in the image's own geometry. MONAI Label's writer writes a 2D label through ITK without
        its affine (spacing 1, origin 0, the axes flipped: a 2D NIfTI or NRRD label came back mirrored and at the
        wrong scale, and the datastore then refused it as the image's label) and a NIfTI through ITK, which makes a
        sheared affine orthogonal; a JPEG image got a lossy JPEG label (values 0/1/2 smeared). Here: a NIfTI image's
        label is written by nibabel with the image's own affine and header, another 2D image with a geometry
        header through ITK with its affine, and a JPEG image's label is a PNG; the rest as MONAI Label writes it."""
        dtype = dtype or data.get("result_dtype") or "uint8"  # checked in __call__ (result_dtype)
        path = data.get("image_path")
        src_ext = file_ext(path) if isinstance(path, str) else ""
        ext = extension or data.get("result_extension") or src_ext
        low = (ext or "").lower()  # an upload's suffix may be ".AP-view.png": decide by how the name ends
        if low.endswith(LOSSY_EXTENSIONS):
            ext = extension = ".png"
            low = ext
        pred = data.get(self.output_label_key)
        if data.get("result_write_to_file", True) and pred is not None and isinstance(path, str):
            arr = (pred.array if isinstance(pred, MetaTensor) else torch.as_tensor(pred).numpy()).astype(dtype)
            if low.endswith((".nii", ".nii.gz")) and src_ext.lower().endswith((".nii", ".nii.gz")):
                out = write_label_like_nifti(arr, path, ext)
                if out is not None:
                    return out, data.get(self.output_json_key, {})
            elif arr.ndim == 2 and low.endswith((".nrrd", ".nhdr", ".mha", ".mhd")) and isinstance(pred, MetaTensor):
                import tempfile

                from monailabel.transform.writer import write_itk

                # one file back to the client: a detached header (.nhdr, .mhd) would leave its voxels behind
                ext = ".nrrd" if low.endswith((".nrrd", ".nhdr")) else ".mha"
                out = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
                # a PNG / JPEG has no geometry: ITK (3D Slicer) reads it with spacing 1, origin 0, identity axes,
                # and so is its label written (MONAI's identity affine, turned to LPS, flipped both axes)
                write_itk(arr, out, affine_2d(pred.affine) if has_geometry(path) else None, dtype,
                          data.get("result_compress", False))
                return out, data.get(self.output_json_key, {})
            elif arr.ndim == 2 and low.endswith((".nii", ".nii.gz")) and has_geometry(path) \
                    and isinstance(pred, MetaTensor):  # a 2D NRRD / MHA image, a NIfTI label (ITK lost the affine)
                import tempfile

                import nibabel as nib

                a = affine_2d(pred.affine)
                aff = np.eye(4)
                aff[:2, :2], aff[:2, 3] = a[:2, :2], a[:2, 2]
                out = tempfile.NamedTemporaryFile(suffix=".nii.gz" if low.endswith(".gz") else ".nii",
                                                  delete=False).name
                img = nib.Nifti1Image(arr, aff)
                img.header.set_qform(aff, code=1)
                img.header.set_sform(aff, code=1)
                nib.save(img, out)
                return out, data.get(self.output_json_key, {})
        return super().writer(data, extension=extension, dtype=dtype)
