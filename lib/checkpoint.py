"""Self-describing checkpoints.

A checkpoint holds the state dict, the complete resolved hyper-parameters (:class:`lib.config.HParams`: spatial
dims, channels, ``vlm_film_decoder_stages`` as an explicit list, flow schedule, sampler defaults, VLM id and
embedding size, preprocessing) and the library version. It is written atomically (temporary file in the same
folder, fsync, rename), so a reader (the MONAI Label infer task watches the file) never sees half a file.

Loading is strict and never trusts a code default over the checkpoint:

* ``vlm_film_decoder_stages`` missing or ``None`` -> derived from the ``vlm_film_heads.{stage}`` keys;
* hyper-parameters that disagree with the state dict -> :class:`CheckpointError` naming both;
* a Lightning-style checkpoint (``{"state_dict": {"model.…": …}, "hyper_parameters": {…}}``, nested like ours or
  flat) loads too; a bare state dict or a checkpoint of another architecture is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import pickle
import re
import secrets
from glob import escape as glob_escape
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__
from .config import ClickConfig, ConfigError, FlowConfig, HParams, ModelConfig, PreprocConfig, SamplerConfig, \
    TrainConfig, VLMConfig
from .network import ConditionalUNet
from .precision import served

logger = logging.getLogger(__name__)

FORMAT = "dfm-vlm-checkpoint"
FORMAT_VERSION = 1
_FILM_KEY = re.compile(r"^vlm_film_heads\.(\d+)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded as a DFM+VLM model; the message says why."""


@dataclass
class LoadedCheckpoint:
    model: ConditionalUNet
    hparams: HParams
    path: str
    library_version: str | None = None
    metrics: dict = field(default_factory=dict)
    source_format: str = FORMAT
    notes: list[str] = field(default_factory=list)


def save_checkpoint(path: str | os.PathLike, model: ConditionalUNet, hparams: HParams,
                    metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write the checkpoint atomically; the hyper-parameters are resolved and checked against the model first."""
    path = Path(path)
    hp = hparams.resolved()
    bad = non_finite_tensors(model.state_dict())
    if bad:  # (a diverged training published last.pt of NaN weights, served as an empty label: a review)
        raise CheckpointError(f"not writing {path}: {len(bad)} weight tensor(s) of the model hold NaN or infinity "
                              f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    if dataclasses.asdict(hp.model) != dataclasses.asdict(model.cfg):
        raise CheckpointError(f"hyper-parameters {dataclasses.asdict(hp.model)} do not describe the model being "
                              f"saved {dataclasses.asdict(model.cfg)}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hyper_parameters": hp.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": dict(metrics or {}),
        **(extra or {}),
    }
    return atomic_torch_save(payload, path)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """``write(f)`` into a temporary file beside ``path`` (same file system; a hidden name that matches no image
    pattern), flush, fsync, then ``os.replace``: a reader (or a restart after a ``kill -9``) sees the old file or the
    new one, never a partial one. A failure (disk full, unwritable folder) removes the temporary file, leaves the old
    file in place and raises the ``OSError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkstemp: its 0600 survived the rename, so a server running as another user could not read a
    # checkpoint (or a label) written by training; 0666 here is narrowed by the umask like any file's
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def remove_interrupted_writes(folder: str | os.PathLike, names) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left beside ``names`` in ``folder`` when a ``kill -9``
    cut a write short (``.<name>.<hex>.tmp``); returns them. Nothing else is touched."""
    folder, removed = Path(folder), []
    for name in names:
        for f in folder.glob(f".{glob_escape(name)}.*.tmp"):
            if f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def keep_replaced_copy(path: str | os.PathLike) -> str:
    """A copy of ``path`` beside it, ``<name>.<time>.replaced``, before it is replaced (a published checkpoint:
    ``PUT /model`` and a training's first publish over a file it never measured); never over an earlier copy of the
    same second. Returns the copy's path; ``OSError`` when it cannot be written."""
    import shutil

    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    keep = f"{path}.{stamp}.replaced"
    n = 0
    while os.path.exists(keep):
        n += 1
        keep = f"{path}.{stamp}-{n}.replaced"
    shutil.copy2(path, keep)
    return keep


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 60.0) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` (``.<name>.<12 hex>.tmp``) that nothing
    has written for ``older_than_s`` seconds: what a ``kill -9`` or a crash cut short (a review found one of a
    checkpoint still there after two restarts). A write in progress, in any process, keeps its file (it was
    written to just now). Returns what was removed; nothing else is touched."""
    import time

    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    now = time.time()
    for f in folder.iterdir():
        if re.fullmatch(r"\..+\.[0-9a-f]{12}\.tmp", f.name) is None:
            continue
        try:
            if f.is_file() and not f.is_symlink() and now - f.stat().st_mtime > older_than_s:
                f.unlink()
                removed.append(f)
        except FileNotFoundError:
            pass
    return removed


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`. A failure leaves the old file in place and raises
    :class:`CheckpointError` saying why."""
    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e} (the previous file, if any, is kept)") from e
    except RuntimeError as e:
        # torch's zip writer reports a failed write (a full disk, a file size limit) as "[enforce fail at
        # inline_container.cc] unexpected pos ...", which named neither the file nor the cause (a review)
        import shutil

        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointError(f"cannot write {path}: the write failed ({free}; a full disk or a file size limit?): "
                              f"{str(e).splitlines()[0][:200]} (the previous file, if any, is kept)") from e


ALLOW_PICKLE_ENV = "DFM_ALLOW_PICKLED_CHECKPOINTS"


def _damaged_entry(path: Path) -> str | None:
    """The first entry of a zip-format checkpoint (``torch.save``'s) whose bytes fail its stored CRC-32, else None.
    PyTorch's reader does not check them: one flipped exponent bit loaded a weight of 3e37, and the model served
    NaN everywhere -- an empty label, without a word (a review, 2026-12-08)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return None  # (the legacy format, or no checkpoint: torch.load says which)
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # (a damaged directory: torch.load names it)
        logger.debug("zip check of %s: %s", path, e)
        return None


def non_finite_tensors(state_dict: dict) -> list[str]:
    """The floating-point tensors of ``state_dict`` holding NaN or infinity."""
    return [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def _torch_load(path: Path, map_location) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only. A file that needs arbitrary unpickling
    (which can run any code it names) is refused, unless ``DFM_ALLOW_PICKLED_CHECKPOINTS=1`` is set by someone who
    trusts that file (e.g. a Lightning checkpoint of their own that pickles an ``AttributeDict``)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    damaged = _damaged_entry(path)
    if damaged:
        raise CheckpointError(f"checkpoint {path} is damaged: its entry {damaged!r} fails its CRC-32 check (a file "
                              "changed on disk or in a copy); use another copy or the run's other checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        objects = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported global" in ln]
        if not objects:  # not a pickle of objects: a damaged or foreign file
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({type(e).__name__})"
                                  ) from e
        if os.environ.get(ALLOW_PICKLE_ENV) != "1":
            first = objects[0][:300]
            raise CheckpointError(
                f"refused {path}: it holds pickled Python objects beyond tensors and plain values, which loading "
                f"would execute ({first}). Re-save it as a plain state dict, or set {ALLOW_PICKLE_ENV}=1 if you "
                f"trust its origin") from None
        logger.warning("%s holds pickled objects; loading it with weights_only=False (%s=1)", path, ALLOW_PICKLE_ENV)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


_SECTIONS = {"model": ModelConfig, "flow": FlowConfig, "sampler": SamplerConfig, "vlm": VLMConfig,
             "preprocessing": PreprocConfig, "train": TrainConfig, "clicks": ClickConfig}


def _hparams_from_flat(flat: dict, notes: list[str]) -> dict:
    """Lightning-style flat hyper-parameters -> our nested layout (a key goes to every section that has it)."""
    nested: dict[str, dict] = {k: {} for k in _SECTIONS}
    used = set()
    for name, cls in _SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        for k, v in flat.items():
            if k in fields:
                nested[name][k] = v
                used.add(k)
    for k in ("labels", "description"):
        if k in flat:
            nested[k] = flat[k]
            used.add(k)
    ignored = sorted(set(flat) - used)
    if ignored:
        notes.append(f"hyper-parameters not used by this library: {ignored}")
    return nested


def _unpack(obj: Any, path: Path) -> tuple[dict, dict | None, str, dict, str | None]:
    """-> (state_dict, raw hyper-parameters or None, source format, metrics, library version)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint dictionary (got {type(obj).__name__})")
    if obj.get("format") == FORMAT:
        fv = obj.get("format_version", 0)
        if not isinstance(fv, int) or isinstance(fv, bool):
            raise CheckpointError(f"{path}: format_version must be an integer, got {fv!r}")
        if fv > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer format version {obj['format_version']} "
                                  f"(library {obj.get('library_version')}); this is {__version__}")
        return obj["state_dict"], obj.get("hyper_parameters"), FORMAT, obj.get("metrics", {}), \
            obj.get("library_version")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        hp = obj.get("hyper_parameters", obj.get("hparams"))
        if hp is not None and not isinstance(hp, dict):  # dict(hp) raised a bare ValueError / TypeError
            raise CheckpointError(f"{path}: its hyper_parameters must be a mapping, got {type(hp).__name__} "
                                  f"{str(hp)[:60]!r}")
        sd = obj["state_dict"]
        if any(k.startswith("model.") for k in sd):
            dropped = sorted({k.split(".")[0] for k in sd if not k.startswith("model.")})
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
            if dropped:
                logger.info("Lightning checkpoint %s: ignoring state-dict prefixes %s", path, dropped)
        return sd, (dict(hp) if hp is not None else None), "lightning", {}, None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, "state_dict", {}, None
    raise CheckpointError(f"{path} is neither a DFM+VLM checkpoint nor a Lightning checkpoint "
                          f"(top-level keys: {sorted(map(str, obj))[:12]})")


def film_stages_in(state_dict: dict) -> list[int]:
    return sorted(int(m.group(1)) for k in state_dict if (m := _FILM_KEY.match(k)))


def _describe_arch(state_dict: dict) -> str:
    keys = list(state_dict)
    return f"{len(keys)} tensors, e.g. {keys[:4]}"


def resolve_hparams(raw: dict | None, state_dict: dict, notes: list[str] | None = None,
                    unknown: list[str] | None = None) -> HParams:
    """Hyper-parameters completed from the state dict where missing, checked against it where given. Settings that
    are missing and that the state dict cannot tell (``model.norm``) are appended to ``unknown``."""
    notes = notes if notes is not None else []
    if raw is None:
        raise CheckpointError("the checkpoint has no hyper-parameters, so its architecture is unknown "
                              f"(state dict: {_describe_arch(state_dict)}); save it with lib.checkpoint")
    raw = dict(raw)
    if not any(k in raw for k in _SECTIONS):
        raw = _hparams_from_flat(raw, notes)
    raw.setdefault("model", {})
    if not isinstance(raw["model"], dict):
        raise CheckpointError(f"hyper-parameters 'model' must be a mapping, got {raw['model']!r}")
    m = raw["model"] = dict(raw["model"])
    if "norm" not in m and unknown is not None:
        # instance and group norm have the same weights: the state dict cannot tell them apart, and a model run
        # with the other one gives other logits (0.27 apart on a probe) without any error
        unknown.append("model.norm")
    # every setting the checkpoint leaves out takes the code's default: said, so that nobody mistakes it for the
    # checkpoint's own (checkpoints written by lib.checkpoint hold them all)
    for name, cls in _SECTIONS.items():
        if name == "train":
            continue
        sec = raw.get(name)
        if sec is None:
            notes.append(f"hyper-parameters have no '{name}' section: the defaults of this version are used "
                         f"({dataclasses.asdict(cls())})")
        elif isinstance(sec, dict):
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in sec and not
                       (name == "model" and f.name in ("vlm_film_decoder_stages", "cond_dim"))]
            if missing:
                notes.append(f"hyper-parameters '{name}' lack {missing}: the defaults of this version are used")

    # FiLM stages and conditioning size: derived from the weights where the hyper-parameters are silent.
    stages_sd = film_stages_in(state_dict)
    given = m.get("vlm_film_decoder_stages")
    if given is not None and not (isinstance(given, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in given)):
        # (the earlier system's checkpoints said how many: 2 of 4 heads were then applied)
        raise CheckpointError(f"vlm_film_decoder_stages must be a list of decoder stage indices, got {given!r}")
    if m.get("vlm_film_decoder_stages") is None:
        m["vlm_film_decoder_stages"] = stages_sd
        notes.append(f"vlm_film_decoder_stages missing in the hyper-parameters: derived {stages_sd} from the "
                     "vlm_film_heads.* keys")
    elif sorted(int(s) for s in m["vlm_film_decoder_stages"]) != stages_sd:
        raise CheckpointError(
            f"hyper-parameters say vlm_film_decoder_stages={list(m['vlm_film_decoder_stages'])} but the state dict "
            f"holds vlm_film_heads for stages {stages_sd}"
        )
    if stages_sd:
        cond_sd = int(state_dict[f"vlm_film_heads.{stages_sd[0]}.weight"].shape[1])
        if m.get("cond_dim") is None:
            m["cond_dim"] = cond_sd
        elif int(m["cond_dim"]) != cond_sd:
            raise CheckpointError(f"hyper-parameters say cond_dim={m['cond_dim']} but the state dict's FiLM heads "
                                  f"take {cond_sd}-d embeddings")
    elif m.get("cond_dim") is not None:
        raise CheckpointError(f"hyper-parameters say cond_dim={m['cond_dim']} (VLM-conditioned) but the state dict "
                              "holds no vlm_film_heads")
    if isinstance(raw.get("vlm"), dict) and raw["vlm"].get("name_or_path") and "view" not in raw["vlm"]:
        # written before views were shown in display orientation: it was trained on the array's own axes
        raw["vlm"] = {**raw["vlm"], "view": "array"}
        notes.append("vlm.view missing (a checkpoint from before 2026-11-28): its VLM views stay in array order")
    if isinstance(raw.get("sampler"), dict) and raw["sampler"].get("max_batch_voxels") == 2 ** 21:
        # the fixed default before "auto" (2026-11-28), recorded by every checkpoint, never a choice: one call of
        # up to 2**21 voxels is 2x slower on a CPU than small calls (bench/cap_bench.py)
        raw["sampler"] = {**raw["sampler"], "max_batch_voxels": "auto"}
        notes.append("sampler.max_batch_voxels = 2**21 (the default before 2026-11-28) read as 'auto'")
    # a checkpoint from before the policy names no precision: it is served in fp32 (what it was validated in)
    raw = {**raw, "precision": raw.get("precision", "fp32")}
    try:
        hp = HParams.from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"invalid hyper-parameters: {e}") from e
    # the values a result is painted with, checked as a preset's are (HParams.resolved): a checkpoint is served
    # without being resolved, so {"lung": 255} (an uncertain value of 256) or a structure of 254 (an uncertain
    # segment of 255, the interactive model's "background") were served, and failed only when a fine-tune published
    if not hp.structures and isinstance(hp.labels, dict) and len(hp.labels) > 1 and \
            hp.labels.get("background") == 0:  # MONAI's {"lung": 1, "background": 0}: the app's own segment
        hp.labels = {k: v for k, v in hp.labels.items() if k != "background"}
        notes.append("labels' 'background': 0 left out (the app's own segment, not a structure)")
    try:
        hp.check_label_values()
    except ConfigError as e:
        raise CheckpointError(f"its {e}; fix the checkpoint's hyper_parameters (torch.load, edit, torch.save) "
                              f"or train it again") from None
    _check_sections(hp, raw, notes)
    return hp


def _check_sections(hp: HParams, raw: dict, notes: list[str]) -> None:
    """The sections checked against each other as a preset's are before a training (:meth:`HParams.resolved`; a
    checkpoint is served without being resolved): a review found checkpoints that loaded, were served, and failed
    every request -- a Lightning checkpoint without ``roi_size`` (a TypeError in the inferer), a 3D preprocessing
    for a 2D model, ``max_batch_voxels`` "lots". A value one section leaves out is taken from the other that fixes
    it (the window is the training patch; the image has the model's channels), with a note; values that disagree
    are refused, naming both."""
    def given(section: str) -> dict:
        return raw.get(section) if isinstance(raw.get(section), dict) else {}

    m, pre, smp = hp.model, hp.preprocessing, hp.sampler
    for key, model_key, what in (("spatial_dims", "spatial_dims", "spatial dimensions"),
                                 ("num_channels", "in_channels", "image channels")):
        if key not in given("preprocessing"):
            if getattr(pre, key) != getattr(m, model_key):
                notes.append(f"preprocessing.{key} missing: {getattr(m, model_key)} from model.{model_key}")
            setattr(pre, key, getattr(m, model_key))
        elif getattr(pre, key) != getattr(m, model_key):
            raise CheckpointError(f"preprocessing.{key}={getattr(pre, key)!r} but model.{model_key}="
                                  f"{getattr(m, model_key)!r}: the {what} of the images and of the network disagree")
    if "patch_size" not in given("preprocessing") and smp.roi_size is not None:
        pre.patch_size = [int(v) for v in smp.roi_size]  # saved resolved: the window is the training patch
        notes.append(f"preprocessing.patch_size missing: {pre.patch_size} from sampler.roi_size (the window is the "
                     "training patch)")
    elif smp.roi_size is None:
        notes.append(f"sampler.roi_size missing: the training patch {list(pre.patch_size)}")
    # the click maps the network takes (model.guidance_channels, in its weights) and clicks.enabled, which decides
    # whether requests make them and a fine-tune simulates clicks: a checkpoint without the clicks section was served
    # as a click model with the defaults and failed to save again at a fine-tune's first publish (a review)
    guided = bool(m.guidance_channels)
    if "enabled" not in given("clicks"):
        if hp.clicks.enabled != guided:
            notes.append(f"clicks.enabled missing: {guided} from model.guidance_channels={m.guidance_channels}")
        hp.clicks.enabled = guided
    elif bool(hp.clicks.enabled) != guided:
        raise CheckpointError(f"clicks.enabled={hp.clicks.enabled!r} but model.guidance_channels="
                              f"{m.guidance_channels}: the network takes "
                              f"{'2 click maps' if guided else 'no click maps'}")
    try:
        hp.clicks = hp.clicks.resolved()
        hp.preprocessing = pre.resolved()
        hp.sampler = smp.resolved(hp.preprocessing.patch_size)
        hp.flow = hp.flow.resolved()
    except ConfigError as e:
        raise CheckpointError(f"invalid hyper-parameters: {e}") from None


def _check_against(model: ConditionalUNet, state_dict: dict, hp: HParams) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, tuple(expected[k].shape), tuple(state_dict[k].shape)) for k in expected
              if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if not (missing or unexpected or shapes):
        return
    m = hp.model
    desc = (f"spatial_dims={m.spatial_dims}, in_channels={m.in_channels}, features={list(m.features)}, "
            f"mode={m.mode!r}, cond_dim={m.cond_dim}, vlm_film_decoder_stages={m.vlm_film_decoder_stages}")
    parts = []
    if shapes:
        parts.append("shape mismatches (hyper-parameters vs state dict): " +
                     "; ".join(f"{k}: {a} vs {b}" for k, a, b in shapes[:5]))
    if missing:
        parts.append(f"{len(missing)} tensor(s) the hyper-parameters need are not in the state dict, e.g. {missing[:4]}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the state dict fit no layer of that model, "
                     f"e.g. {unexpected[:4]}")
    raise CheckpointError(f"the hyper-parameters ({desc}) and the state dict disagree: " + " | ".join(parts))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from the checkpoint's own hyper-parameters and load its weights strictly."""
    path = Path(path)
    obj = _torch_load(path, map_location)
    state_dict, raw, fmt, metrics, version = _unpack(obj, path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        kinds = sorted({type(v).__name__ for v in (state_dict.values() if isinstance(state_dict, dict) else [])
                        if not isinstance(v, torch.Tensor)}) or [type(state_dict).__name__]
        raise CheckpointError(f"{path}: its state_dict must map names to tensors (found {', '.join(kinds)})")
    bad = non_finite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinity ({', '.join(bad[:4])}"
                              f"{', ...' if len(bad) > 4 else ''}): a diverged training's weights; use a checkpoint "
                              "from before the loss became NaN (best.pt of the run)")
    notes: list[str] = []
    unknown: list[str] = []
    try:
        hp = resolve_hparams(raw, state_dict, notes, unknown)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:  # a value of the wrong kind anywhere
        # (a FiLM weight of one dimension was a bare IndexError; a malformed vlm.fingerprint an AttributeError at
        # the VLM's check: a review, 2026-12-08)
        raise CheckpointError(f"{path}: invalid hyper-parameters ({type(e).__name__}: {e})") from None
    try:
        hp.vlm.resolved()
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid hyper-parameters ({e})") from None
    try:
        model = ConditionalUNet(hp.model)
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot build the model its hyper-parameters describe: {e}") from e
    try:
        _check_against(model, state_dict, hp)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if unknown:  # the weights fit, but a setting they cannot tell is missing: not the code's default silently
        raise CheckpointError(f"{path}: its hyper-parameters do not say {', '.join(unknown)} ('instance', 'group' or "
                              f"'batch'), which its weights cannot tell (instance and group norm have the same "
                              f"weights); add it to the checkpoint's hyper-parameters")
    model.load_state_dict(state_dict, strict=True)
    model.to(map_location).eval()
    for n in notes:
        logger.warning("%s: %s", path, n)
    return LoadedCheckpoint(model=model, hparams=hp, path=str(path), library_version=version, metrics=metrics,
                            source_format=fmt, notes=notes)


def upgrade_checkpoint(src: str | os.PathLike, out: str | os.PathLike, vlm: str | None = None) -> dict:
    """Rewrite a checkpoint of an earlier version in this version's format, the model unchanged: every setting the
    loader fills in (the notes it logs at each load: missing sections or keys, ``vlm.view`` of a checkpoint from
    before views, the old ``max_batch_voxels``) written out as it is read, and the fingerprint of the VLM it is
    served with recorded (the loader then refuses another VLM of the same size, which it cannot for a checkpoint
    without one). ``vlm``: where its VLM is, if not where it says (the new file names that). The VLM's name stays
    as written (a folder relative to the checkpoint stays relative). The new file must load without notes and give
    the same probabilities, bit for bit, on a probe window with a fixed seed; else nothing is written. Returns
    ``{"notes": [...the notes it no longer needs...], "fingerprint": added or not}``."""
    src, out = Path(src), Path(out)
    system = load_system(src, vlm=vlm)  # checks the VLM: its size, and a fingerprint already recorded
    ck = system.checkpoint
    hp = ck.hparams
    added = hp.model.cond_dim is not None and hp.vlm.fingerprint is None
    if hp.model.cond_dim is not None:
        hp = dataclasses.replace(hp, vlm=dataclasses.replace(
            hp.vlm, name_or_path=vlm or hp.vlm.name_or_path, fingerprint=system.vlm.fingerprint))
    obj = _torch_load(src, "cpu")
    standard = {"format", "format_version", "library_version", "created", "hyper_parameters", "state_dict",
                "metrics"}
    extra = {k: v for k, v in obj.items() if k not in standard} if obj.get("format") == FORMAT else {}
    extra["upgraded_from"] = {"library_version": ck.library_version, "created": obj.get("created"),
                              "format": ck.source_format}
    tmp = out.with_name(f".{out.name}.upgrade-{secrets.token_hex(4)}.tmp")
    try:
        save_checkpoint(tmp, ck.model, hp, metrics=ck.metrics, extra=extra)
        try:  # as a user will load it: its VLM found from its own folder (or where --vlm says)
            new = load_system(tmp, vlm=vlm)
        except CheckpointError as e:
            raise CheckpointError(f"{src}: the upgraded file would not load from {out.parent}: "
                                  f"{str(e).replace(str(tmp), str(out))} (copy its VLM folder beside it, or give "
                                  f"--vlm with a path that holds from there); nothing written") from None
        if new.checkpoint.notes:
            raise CheckpointError(f"{src}: the upgraded file still loads with notes: {new.checkpoint.notes}")
        g = torch.Generator().manual_seed(0)
        patch = list(hp.preprocessing.patch_size)
        window = torch.rand([2, hp.model.in_channels, *patch], generator=g)
        image_text = system.vlm is not None and system.vlm.cfg.text_mode == "image"
        texts = system.texts_for("a probe image" if image_text else None, 2)
        a, b = (s.predict_windows(window, texts, [11, 12], steps=2, num_samples=2, precision="fp32")
                for s in (system, new))
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
            raise CheckpointError(f"{src}: the upgraded file predicts differently (max difference "
                                  f"{(a[0] - b[0]).abs().max().item():.3g}); nothing written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"notes": list(ck.notes), "fingerprint": added}


def resolve_vlm_path(name_or_path: str | None, checkpoint_path: str | os.PathLike | None) -> str | None:
    """A relative VLM folder is looked up beside the checkpoint first, then from the working directory; a folder
    found is returned as an absolute path (a checkpoint saved from it finds it from anywhere: it recorded the path
    relative to the directory it was loaded from, a review)."""
    if not name_or_path:
        return name_or_path
    p = Path(name_or_path).expanduser()
    if not p.is_absolute() and checkpoint_path is not None:
        beside = Path(checkpoint_path).parent / p
        if beside.exists():
            return str(beside.resolve())
    return str(p.resolve()) if p.exists() else name_or_path


def moved_vlm_folder(name: str, checkpoint_path: str | os.PathLike) -> Path | None:
    """A recorded VLM folder that is not where the checkpoint says, looked for where a moved or copied tree puts it:
    its last parts (``models/vlm/tiny-clip``, ``vlm/tiny-clip``, ...) under the checkpoint's folder and each folder
    above it, then the working directory (a published checkpoint records the VLM's absolute path: after the app's
    folder moved, the same VLM at the same place in it was "not found"; a review). Only the VLM's fingerprint makes
    a folder found so the checkpoint's (:func:`load_system` checks it)."""
    parts = [x for x in Path(name).expanduser().parts if x not in ("/", ".", "..")]
    here = Path(checkpoint_path).resolve().parent
    for base in [here, *here.parents, Path.cwd()]:
        for k in range(len(parts), min(2, len(parts)) - 1, -1):  # (a folder with its parent, at least)
            candidate = base.joinpath(*parts[-k:])
            if (candidate / "config.json").is_file():
                return candidate
    return None


def _recorded_vlm_among(candidates: Sequence[str | os.PathLike], hp, recorded: dict | None, device):
    """The first of ``candidates`` (VLM folders) whose embedding size and fingerprint are the checkpoint's, loaded;
    None if none is (or nothing is recorded to compare with: a VLM is never taken on its name alone)."""
    from .vlm import VLMEncoder, VLMError, fingerprint_mismatch

    if not recorded:
        return None
    for c in dict.fromkeys(str(Path(c).expanduser().resolve()) for c in candidates if c):
        if not (Path(c) / "config.json").is_file():
            continue
        try:
            encoder = VLMEncoder.from_pretrained(dataclasses.replace(hp.vlm, name_or_path=c), device=device,
                                                 local_files_only=True)
        except VLMError as e:
            logger.info("VLM %s was not loaded to compare with %s's (%s)", c, hp.vlm.name_or_path, e)
            continue
        if encoder.embed_dim == hp.model.cond_dim and fingerprint_mismatch(recorded, encoder.fingerprint) is None:
            return encoder
    return None


def _vlm_places(name: str, checkpoint_path) -> list[str]:
    """Where :func:`resolve_vlm_path` looks for a VLM folder (for the error that says it found none)."""
    p = Path(name).expanduser()
    if p.is_absolute():
        return [str(p)]
    return [str((Path(checkpoint_path).parent / p).resolve()), str(p.resolve())]


def load_recorded_vlm(hp, path: str | os.PathLike, device: str | torch.device = "cpu", vlm: str | None = None,
                      vlm_candidates: Sequence[str | os.PathLike] = ()):
    """The VLM a checkpoint (at ``path``, of hyper-parameters ``hp``) was trained with, loaded and checked (embedding
    size, fingerprint): where :func:`load_system` and a training from scratch "like the served model" find it (see
    :func:`load_system` for where it is looked for)."""
    from .vlm import VLMEncoder, VLMError, describe_fingerprint, fingerprint_mismatch

    encoder = None
    recorded = hp.vlm.fingerprint
    name = vlm or hp.vlm.name_or_path
    src = resolve_vlm_path(name, path)
    vcfg = dataclasses.replace(hp.vlm, name_or_path=src)
    local_only = False
    if vlm is None and src and not Path(src).expanduser().exists() and (recorded or {}).get("source") == "local":
        moved = moved_vlm_folder(src, path)
        if moved is not None:
            logger.warning("%s: its VLM folder %s is not there; using %s, where a moved copy of the app puts it "
                           "(its fingerprint is checked)", path, src, moved)
            src = str(moved)
            vcfg = dataclasses.replace(hp.vlm, name_or_path=src)
        else:  # (a checkpoint from another machine, a sample checkpoint's copy uploaded: refused, a review)
            encoder = _recorded_vlm_among(vlm_candidates, hp, recorded, device)
            if encoder is not None:
                logger.warning("%s: its VLM folder %s is not there; using %s, a VLM this server serves, which has "
                               "the fingerprint it records", path, src, encoder.cfg.name_or_path)
                vcfg, src = encoder.cfg, encoder.cfg.name_or_path
    if encoder is None and vlm is None and src and not Path(src).expanduser().exists():
        source = (recorded or {}).get("source")
        places = " and ".join(_vlm_places(src, path))
        if source == "local":
            also = (f", and the VLM folder(s) this server serves ({', '.join(map(str, vlm_candidates))}), none "
                    "with its fingerprint" if vlm_candidates else "")
            raise CheckpointError(f"{path}: its VLM folder {src!r} was not found (looked at {places}, and for "
                                  f"its last parts in the folders above the checkpoint{also}); put the VLM "
                                  f"there, or give its folder with --vlm")
        local_only = source != "hub"
    try:
        if encoder is None:
            encoder = VLMEncoder.from_pretrained(vcfg, device=device, local_files_only=local_only)
    except VLMError as e:
        if not local_only:
            raise
        raise CheckpointError(f"{path}: its VLM {src!r} was not found (looked at "
                              f"{' and '.join(_vlm_places(src, path))}, and in the local Hugging Face cache; a "
                              f"checkpoint without a VLM fingerprint is not looked up on the Hub); put the VLM "
                              f"there, or give its folder or hub id with --vlm") from e
    if encoder.embed_dim != hp.model.cond_dim:
        raise CheckpointError(f"{path}: the model was trained with {hp.model.cond_dim}-d VLM embeddings but "
                              f"{vcfg.name_or_path!r} gives {encoder.embed_dim}-d ones")
    why = fingerprint_mismatch(recorded, encoder.fingerprint)
    if why:
        raise CheckpointError(f"{path}: the model was trained with another VLM than {vcfg.name_or_path!r} "
                              f"({why}): trained with {hp.vlm.name_or_path!r} ({describe_fingerprint(recorded)}), "
                              f"given {vcfg.name_or_path!r} ({describe_fingerprint(encoder.fingerprint)})")
    return encoder


def load_system(path: str | os.PathLike, device: str | torch.device = "cpu", vlm: str | None = None,
                vlm_candidates: Sequence[str | os.PathLike] = ()):
    """Checkpoint -> :class:`lib.inferer.DFMSystem` (model + its frozen VLM) ready for prediction.

    ``vlm`` overrides the VLM folder/hub id stored in the checkpoint (e.g. the weights moved); its embedding size
    must match the checkpoint's, and so must its fingerprint (``vlm.fingerprint``: model type, embedding sizes and
    the embeddings of a fixed probe; checkpoints from before fingerprints are not checked).

    The VLM the checkpoint names is looked up beside the checkpoint, then from the working directory; it goes to
    the Hugging Face Hub only when the checkpoint records it as a hub id (fingerprint ``source`` "hub"). A
    checkpoint from before fingerprints may find a hub id in the local Hugging Face cache, never on the Hub: a
    missing folder ("vlm/tiny-clip" is also a valid hub id) would otherwise fetch whatever model bears its name.

    ``vlm_candidates``: VLM folders the caller already serves (the app: its models' VLM), tried when the folder a
    checkpoint records is nowhere to be found (a checkpoint trained on another machine, or a copy of a sample
    checkpoint uploaded with ``PUT /model``); one is taken only if its fingerprint is the one recorded.
    """
    from .inferer import DFMSystem

    ck = load_checkpoint(path, map_location=device)
    hp = ck.hparams
    encoder = None
    if hp.model.cond_dim is not None:
        encoder = load_recorded_vlm(hp, path, device, vlm=vlm, vlm_candidates=vlm_candidates)
    if encoder is not None:
        # the system records the VLM it actually runs (a relative folder resolved beside the checkpoint), so a
        # checkpoint saved from it (e.g. a trainer publishing elsewhere) still finds its VLM
        hp = dataclasses.replace(hp, vlm=encoder.cfg)
    # the precision it was trained in, where this device does it fast; fp32 where it does not (lib.precision.served)
    runs_in = served(hp.precision, device)
    if runs_in != hp.precision:
        logger.info("%s was trained in %s; %s does not run %s fast (CPU %s): served in %s", path, hp.precision,
                    device, hp.precision, torch.backends.cpu.get_cpu_capability(), runs_in)
        hp = dataclasses.replace(hp, precision=runs_in)
    system = DFMSystem(ck.model, encoder, hp).to(device)
    system.checkpoint = ck
    return system
