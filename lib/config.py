"""Hyper-parameters of a DFM+VLM model, as plain dataclasses.

Everything that is needed to rebuild a model, reproduce its preprocessing and run its sampler lives here and is
stored, fully resolved, in every checkpoint (see :mod:`lib.checkpoint`). Nothing here has an implicit default that
could silently differ between the code that trained a model and the code that loads it: the checkpoint always
wins, and :func:`ModelConfig.resolved` turns every ``None`` into an explicit value before saving.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A hyper-parameter is missing, unknown or out of range."""


def type_problem(value, tp) -> str | None:
    """What kind of value the annotation ``tp`` asks for, in words, where ``value`` is not of it; None where it is (or
    the kind is one this does not check). A preset's ``"enabled": "false"`` (a string, so true) made a click model,
    and ``"soft_label": "false"`` switched soft labels on, without a word (a review, 2026-12-08)."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(value, a) for a in args]
        return None if any(p is None for p in problems) else " or ".join(dict.fromkeys(problems))
    if tp is type(None):
        return None if value is None else "null"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    if tp is dict or origin is dict:
        return None if isinstance(value, dict) else "a JSON object"
    if tp in (list, tuple) or origin in (list, tuple):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if not isinstance(value, (list, tuple)) or len(value) != len(args) \
                    or any(type_problem(v, a) for v, a in zip(value, args)):
                return f"a JSON list of {len(args)} values ({', '.join(str(type_problem(None, a)) for a in args)})"
            return None
        inner = args[0] if args else typing.Any
        what = type_problem(None, inner) if inner is not typing.Any else None
        whole = f"a JSON list of {what.removeprefix('a ').removeprefix('an ')}s" if what else "a JSON list"
        if not isinstance(value, (list, tuple)):
            return whole
        return None if all(type_problem(v, inner) is None for v in value) else whole
    return None  # (nested sections check themselves)


def check_types(cls, values: dict, where: str) -> None:
    """Each given value of the dataclass ``cls``'s fields of the kind its annotation names; ConfigError naming the
    first that is not."""
    import typing

    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        problem = type_problem(v, hints[k]) if k in hints else None
        if problem:
            raise ConfigError(f"{where}.{k} must be {problem}, got {v!r}")


def _check_keys(cls, d: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {where} hyper-parameter(s) {unknown}; known: {sorted(names)}")


ARCHS = ("unet", "cached")
NORMS = ("instance", "group", "batch")  # lib.network._norm


@dataclass
class ModelConfig:
    """The conditional U-Net (:class:`lib.network.ConditionalUNet`)."""

    spatial_dims: int = 2
    in_channels: int = 1  # image channels (x_t is one more input channel in "dfm" mode)
    features: tuple[int, ...] = (16, 32, 64, 128)
    time_embed_dim: int = 64
    cond_dim: int | None = None  # size of the VLM conditioning vector; None: no VLM conditioning
    vlm_film_decoder_stages: list[int] | None = None  # None: every decoder stage (resolved before saving)
    mode: str = "dfm"  # "dfm" (x_t, t, cond -> logits of x1) or "plain" (one-pass segmenter, same U-Net)
    # "unet": x_t enters at the stem, every sampler step runs the whole U-Net; "cached": the U-Net runs on the image
    # once per window (VLM + FiLM included) and only a light x_t/t head at full resolution runs per sampler step
    # (one fused convolution block + ``step_blocks`` residual blocks; see lib.network)
    arch: str = "unet"
    step_blocks: int = 1
    guidance_channels: int = 0  # 2 for a click-trained model (positive, negative click maps; lib.clicks)
    norm: str = "instance"
    dropout: float = 0.0

    @property
    def num_decoder_stages(self) -> int:
        return len(self.features) - 1

    def resolved(self) -> "ModelConfig":
        c = dataclasses.replace(self, features=tuple(int(f) for f in self.features))
        if c.spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {c.spatial_dims}")
        if c.mode not in ("dfm", "plain"):
            raise ConfigError(f"mode must be 'dfm' or 'plain', got {c.mode!r}")
        if c.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {c.arch!r}")
        if c.mode == "plain":
            c.arch = "unet"  # a one-pass model has no sampler steps to cache for
        if not isinstance(c.step_blocks, int) or c.step_blocks < 0:
            raise ConfigError(f"step_blocks must be an integer >= 0, got {c.step_blocks!r}")
        if c.guidance_channels not in (0, 2):
            raise ConfigError(f"guidance_channels must be 0 or 2 (positive and negative clicks), got {c.guidance_channels!r}")
        if len(c.features) < 2:
            raise ConfigError(f"features needs at least two levels, got {c.features}")
        # (each was a traceback deep in the network's construction, or a flow model that never saw t: a review)
        if c.norm not in NORMS:
            raise ConfigError(f"model.norm must be one of {NORMS}, got {c.norm!r}")
        if isinstance(c.dropout, bool) or not isinstance(c.dropout, (int, float)) or not 0.0 <= c.dropout < 1.0:
            raise ConfigError(f"model.dropout must be a number in [0, 1), got {c.dropout!r}")
        if isinstance(c.time_embed_dim, bool) or not isinstance(c.time_embed_dim, int) \
                or c.time_embed_dim < (1 if c.mode == "dfm" else 0):
            raise ConfigError(f"model.time_embed_dim must be an integer >= 1 (a flow model's time embedding), got "
                              f"{c.time_embed_dim!r}")
        if c.cond_dim is None:
            stages: list[int] = []
        elif c.vlm_film_decoder_stages is None:
            stages = list(range(c.num_decoder_stages))
        else:
            stages = sorted(int(s) for s in c.vlm_film_decoder_stages)
            if len(set(stages)) < len(stages):  # (trained, then every load refused the checkpoint: a review)
                raise ConfigError(f"vlm_film_decoder_stages {stages} names a stage twice; each stage has one FiLM head")
        bad = [s for s in stages if not 0 <= s < c.num_decoder_stages]
        if bad:
            raise ConfigError(
                f"vlm_film_decoder_stages {stages} names stage(s) {bad}, but features {c.features} give "
                f"decoder stages 0..{c.num_decoder_stages - 1}"
            )
        if c.cond_dim is not None and not stages:
            raise ConfigError("cond_dim is set but vlm_film_decoder_stages is empty: the VLM would not be used")
        c.vlm_film_decoder_stages = stages
        return c


@dataclass
class FlowConfig:
    """The mixture probability path x_t = x1 where u < kappa(t) else x0."""

    scheduler: str = "polynomial"  # "linear" (kappa = t) or "polynomial" (kappa = t**exponent)
    exponent: float = 2.0
    source_p: float = 0.5  # x0 ~ Bernoulli(source_p) per voxel
    dice_weight: float = 0.0  # optional auxiliary soft-Dice term; 0 = the contract (BCE on x1 logits only)

    def resolved(self) -> "FlowConfig":
        if self.scheduler not in ("linear", "polynomial"):
            raise ConfigError(f"flow scheduler must be 'linear' or 'polynomial', got {self.scheduler!r}")
        if self.scheduler == "polynomial" and not MIN_EXPONENT <= self.exponent < float("inf"):
            # (1e-9 was taken, and the Heun sampler failed at the first request: kappa(t) rounds to 1 in float32
            # before t = 1; a review, 2026-12-08)
            raise ConfigError(f"polynomial scheduler exponent must be a finite number >= {MIN_EXPONENT}, got "
                              f"{self.exponent}")
        if not 0.0 <= self.source_p <= 1.0:
            raise ConfigError(f"source_p must be in [0, 1], got {self.source_p}")
        if isinstance(self.dice_weight, bool) or not isinstance(self.dice_weight, (int, float)) \
                or not 0.0 <= self.dice_weight < float("inf"):  # (NaN stopped training blaming the learning rate)
            raise ConfigError(f"flow.dice_weight must be a finite number >= 0, got {self.dice_weight!r}")
        return dataclasses.replace(self, exponent=1.0 if self.scheduler == "linear" else float(self.exponent))


MIN_EXPONENT = 1e-3  # kappa(t) = t ** exponent stays below 1 in float32 for every t < 1 of a 256-step grid
SAMPLERS = ("euler", "heun")
OUTPUTS = ("p_final", "last_posterior")


@dataclass
class SamplerConfig:
    """Defaults for sliding-window sampling; every field can be overridden per request."""

    name: str = "euler"
    steps: int = 8
    num_samples: int = 1  # M samples per window: the map is their mean, the variance is returned too
    output: str = "p_final"  # the contract; "last_posterior" (the posterior before t = 1) is for benchmarks
    seed: int = 0
    roi_size: list[int] | None = None  # None: the training patch size (any other value is refused, see lib.inferer)
    overlap: float = 0.25
    sw_batch_size: int = 4
    blend_mode: str = "gaussian"
    # (window x sample) items per network call x window voxels: a memory cap and, on a CPU, a speed knob.
    # "auto": lib.inferer.items_per_call picks by device (measured, bench/cap_bench.py); an integer is used as given
    max_batch_voxels: int | str = "auto"

    def resolved(self, patch_size: list[int] | None = None) -> "SamplerConfig":
        c = dataclasses.replace(self)
        if c.roi_size is None:
            c.roi_size = list(patch_size) if patch_size is not None else None
        elif patch_size is not None and [int(v) for v in c.roi_size] != [int(v) for v in patch_size]:
            raise ConfigError(roi_mismatch_message(c.roi_size, patch_size))
        if c.max_batch_voxels != "auto" and (not isinstance(c.max_batch_voxels, int)
                                             or isinstance(c.max_batch_voxels, bool) or c.max_batch_voxels < 1):
            raise ConfigError(f"max_batch_voxels must be 'auto' or an integer >= 1, got {c.max_batch_voxels!r}")
        validate_sampler(c.name, c.steps, c.num_samples, c.overlap, c.sw_batch_size, c.output, c.seed, c.blend_mode,
                         c.roi_size)
        return c


def roi_mismatch_message(roi_size, patch_size) -> str:
    return (f"sliding-window roi_size {list(roi_size)} differs from the training patch size {list(patch_size)}: the VLM "
            "would embed a different field of view (with roi >= image size, the whole image -- the bug that took an "
            "earlier system of this design from validation Dice 0.87 to test Dice 0.12-0.26) and the conditioning "
            "would no longer be the one the model was trained on. Use the training patch size, or opt in explicitly "
            "(allow_roi_mismatch=True / --allow-roi-mismatch) for experiments")


MAX_STEPS, MAX_SAMPLES, MAX_OVERLAP, MAX_SW_BATCH = 256, 64, 0.9, 1024


def check_patch_fits(size, features, what: str) -> None:
    """A patch (or window) the U-Net can take: each side a multiple of 2 ** (levels - 1), since the encoder halves
    it that many times and the decoder joins each upsampled map to its skip; else ConfigError naming the sizes
    (not a tensor-size mismatch deep in the decoder)."""
    step = 2 ** (len(features) - 1)
    if any(int(p) % step for p in size):
        fit = [max(step, round(int(p) / step) * step) for p in size]
        raise ConfigError(f"{what} {list(size)}: every side must be a multiple of {step} (the U-Net's {len(features)} "
                          f"levels, features {list(features)}, halve it {len(features) - 1} times); e.g. {fit}")


BLEND_MODES = ("gaussian", "constant")  # MONAI's sliding-window blend modes


def validate_sampler(name: str, steps: int, num_samples: int, overlap: float, sw_batch_size: int,
                     output: str = "p_final", seed=None, blend_mode: str | None = None, roi_size=None) -> None:
    """Every sampler setting in its range, ConfigError naming the one that is not: one check for a preset, a
    checkpoint (:meth:`SamplerConfig.resolved`), the inferer and the app's requests (a seed of -1 or a blend mode
    "bogus" was accepted by a preset, loaded, reported ready and failed every request; a review, 2026-12-07)."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    # upper bounds too: one request of num_samples=100000 held a server's CPU until it was killed (a review). The
    # bounds are far above anything measured to help (README: 16 samples, 8 steps and overlap 0.5 change Dice by
    # <= 0.0015 on cxr_lung)
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    if not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_SAMPLES:
        raise ConfigError(f"num_samples must be an integer in [1, {MAX_SAMPLES}], got {num_samples!r}")
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap <= MAX_OVERLAP):
        raise ConfigError(f"overlap must be in [0, {MAX_OVERLAP}], got {overlap!r}")
    if not isinstance(sw_batch_size, int) or not 1 <= sw_batch_size <= MAX_SW_BATCH:
        raise ConfigError(f"sw_batch_size must be an integer in [1, {MAX_SW_BATCH}], got {sw_batch_size!r}")
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if blend_mode is not None and blend_mode not in BLEND_MODES:
        raise ConfigError(f"blend_mode must be one of {BLEND_MODES}, got {blend_mode!r}")
    if roi_size is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in roi_size):
        # (MONAI reads a side <= 0 as "the whole image along that axis": the whole-image embedding of the earlier
        # system, with --allow-roi-mismatch; a review)
        raise ConfigError(f"roi_size {list(roi_size)}: every side must be an integer >= 1")


@dataclass
class VLMConfig:
    """The frozen CLIP-family encoder and how a patch becomes its input (see :mod:`lib.vlm`)."""

    name_or_path: str | None = None  # local folder or hub id, loaded with from_pretrained; None: no VLM
    image_embed_dim: int | None = None  # filled in from the loaded model
    text_embed_dim: int | None = None
    text_mode: str = "none"  # "none", "label" (one prompt per label) or "image" (datalist key "text")
    prompt: str | None = None  # the prompt for text_mode "label"
    intensity_window: tuple[float, float] = (0.0, 1.0)  # preprocessed intensities mapped to [0, 1] by this window
    num_slices: int = 3  # 3D patches: evenly spaced axial slices, embeddings mean-pooled
    # how a patch is shown to the VLM: "display" = as a radiologist sees it (rows top to bottom; axial slices in the
    # radiological convention, see lib.vlm); "array" = the array's own axis order (checkpoints from before 2026-11-28)
    view: str = "display"
    center_prompts: bool = True  # a prompted model: text embeddings centred on its prompts' mean (see lib.vlm)
    axcodes: str | None = None  # the patches' axis codes (3D: the preprocessing's orientation; set by HParams.resolved)
    # what identifies the VLM the model was trained with (lib.vlm.VLMEncoder.fingerprint: model type, embedding
    # sizes, probe embeddings); filled in from the loaded model, checked at load (None: a checkpoint from before)
    fingerprint: dict | None = None

    @property
    def embed_dim(self) -> int | None:
        if self.name_or_path is None:
            return None
        if self.image_embed_dim is None:
            raise ConfigError("image_embed_dim is unknown: load the VLM before building the model")
        if self.text_mode == "none":
            return self.image_embed_dim
        if self.text_embed_dim is None:
            raise ConfigError("text_embed_dim is unknown: load the VLM before building the model")
        return self.image_embed_dim + self.text_embed_dim

    def resolved(self) -> "VLMConfig":
        if self.text_mode not in ("none", "label", "image"):
            raise ConfigError(f"text_mode must be 'none', 'label' or 'image', got {self.text_mode!r}")
        if self.text_mode == "label" and not self.prompt:
            raise ConfigError("text_mode 'label' needs a prompt")
        try:
            lo, hi = (float(v) for v in self.intensity_window)
        except (TypeError, ValueError):  # (a bare ValueError: a traceback from the command line)
            raise ConfigError(f"vlm.intensity_window must be two numbers (low, high), got {self.intensity_window!r}") \
                from None
        if not hi > lo:
            raise ConfigError(f"intensity_window must be (low, high) with high > low, got {self.intensity_window}")
        if self.num_slices < 1:
            raise ConfigError(f"num_slices must be >= 1, got {self.num_slices}")
        if self.view not in VIEWS:
            raise ConfigError(f"vlm.view must be one of {VIEWS}, got {self.view!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, dict):
            raise ConfigError(f"vlm.fingerprint must be a mapping or null, got {self.fingerprint!r}")
        return dataclasses.replace(self, intensity_window=(lo, hi))

    def view_sides(self, patch_size) -> list[int]:
        """(rows, columns) of the 2D views a patch of ``patch_size`` gives the VLM (see :mod:`lib.vlm`)."""
        p = [int(v) for v in patch_size]
        if len(p) == 2:
            return p
        if self.view == "display" and self.axcodes and len(self.axcodes) == 3:
            codes = self.axcodes.upper()
            ap = next((i for i, c in enumerate(codes) if c in "AP"), 0)
            lr = next((i for i, c in enumerate(codes) if c in "LR"), 1)
            return [p[ap], p[lr]]
        return p[:2]


VIEWS = ("display", "array")
DIST_TIMEOUT_MIN = 60.0  # torchrun: how long a rank waits in a collective (train --dist-timeout)


def check_one_label(labels) -> None:
    """A one-structure model's ``labels``: its one structure's name and the value its results are painted with,
    1..253 as a structure's (:class:`StructureConfig`). Taken as they came, ``{"lung": 255}`` gave an uncertain
    segment of value 256 (a uint8 label) and collided with the interactive model's "background" (255), and of two
    labels the second was silently never segmented."""
    if not isinstance(labels, dict) or len(labels) != 1:
        raise ConfigError(f"labels of a model without structures must name its one structure and its value (e.g. "
                          f'{{"lung": 1}}; several structures are a prompted model\'s "structures"), got {labels!r}')
    (name, value), = labels.items()
    if not isinstance(name, str) or not name.strip() or name in ("background", "uncertain"):
        raise ConfigError(f"labels: the structure's name must be a non-empty string other than 'background'/"
                          f"'uncertain' (the app's own segments), got {name!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 253:
        raise ConfigError(f"labels: {name!r} must have an integer value in 1..253 (254 and 255 are the uncertain "
                          f"segment's and the clicks' 'background'), got {value!r}")


@dataclass
class StructureConfig:
    """One structure a prompted model segments: its name and value in the multi-label map, its text prompt(s) and
    how its binary truth is derived from the label file (:mod:`lib.structures`)."""

    name: str
    value: int  # its value in the multi-label map the app returns
    prompts: list[str]  # training draws one per patch; inference uses the first
    truth: dict  # {"values": [1, 3, 4]} | {"above": 127} [+ "side": "low"/"high" along "axis" (default 0)]
    weight: float = 1.0  # training draws a structure per patch with probability proportional to its weight

    def resolved(self) -> "StructureConfig":
        c = dataclasses.replace(self, prompts=[str(p) for p in (self.prompts or [])], truth=dict(self.truth or {}))
        if not c.name or not isinstance(c.name, str) or c.name in ("background", "uncertain"):
            raise ConfigError(f"structure name must be a non-empty string other than 'background'/'uncertain', "
                              f"got {c.name!r}")
        # 254 and 255 are taken: a result's uncertain segment comes after every structure (<= 254), and the
        # interactive model's "background" (negative clicks) is 255, which no result may use (lib.configs._common)
        if not isinstance(c.value, int) or isinstance(c.value, bool) or not 1 <= c.value <= 253:
            raise ConfigError(f"structure {c.name!r}: value must be an integer in 1..253 (254 and 255 are the "
                              f"uncertain segment's and the clicks' 'background'), got {c.value!r}")
        if not c.prompts or not all(p.strip() for p in c.prompts):
            raise ConfigError(f"structure {c.name!r}: needs at least one non-empty prompt")
        if not (isinstance(c.weight, (int, float)) and c.weight > 0):
            raise ConfigError(f"structure {c.name!r}: weight must be > 0, got {c.weight!r}")
        from .structures import check_truth

        check_truth(c.truth, c.name)
        c.weight = float(c.weight)
        return c



@dataclass
class PreprocConfig:
    """Preprocessing shared by training, validation, prediction and the MONAI Label tasks."""

    spatial_dims: int = 2
    num_channels: int = 1
    spacing: list[float] | None = None  # target spacing (mm, or pixels for PNG); None: keep
    orientation: str | None = None  # e.g. "RAS" for volumes; None: keep
    # "range" (a_min..a_max -> 0..1) | "zscore" | "histogram" (the whole image's histogram equalised to 0..1,
    # MONAI's HistogramNormalize, num_bins default 256; one-channel images) | "none"
    intensity: dict = field(default_factory=lambda: {"type": "none"})
    label_threshold: float = 0.0  # binary truth = label > label_threshold
    # training targets on the network grid: False = the binary truth resampled nearest; True = the fraction of
    # each voxel that is foreground (the truth smoothed against aliasing, then resampled linearly; lib.transforms
    # .AntiAliasLabeld). The network's input (x_t) is built from ``fraction > 0.5`` either way.
    soft_label: bool = False
    patch_size: list[int] = field(default_factory=lambda: [128, 128])
    # the weights of patch centres drawn on and off the label (MONAI's RandCropByPosNegLabeld). MONAI then moves a
    # centre into the band where a whole patch fits, so where the patch is large against the image the ratio drawn is
    # not the ratio trained: cxr_lung's 1 : 1 gave 0.75 of 400 patches centred on lung and none without lung (a
    # review, 2026-12-07; every figure was measured so)
    pos: float = 1.0
    neg: float = 1.0

    def resolved(self) -> "PreprocConfig":
        if len(self.patch_size) != self.spatial_dims:
            raise ConfigError(f"patch_size {self.patch_size} does not have spatial_dims={self.spatial_dims} values")
        if self.spacing is not None and len(self.spacing) != self.spatial_dims:
            raise ConfigError(f"spacing {self.spacing} does not have spatial_dims={self.spatial_dims} values")
        # an axis' spacing of 0 keeps that axis' own (MONAI's Spacingd; null keeps the image's); a negative one was
        # read the same way without a word ([-1, 3] trained a 1 x 3 px grid; a review, 2026-12-08)
        if self.spacing is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and 0 <= v < float("inf") for v in self.spacing):
            raise ConfigError(f"preprocessing.spacing must be finite numbers >= 0 (0: keep that axis' spacing; null: "
                              f"keep the image's), got {self.spacing}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.patch_size):
            raise ConfigError(f"preprocessing.patch_size must be integers >= 1, got {self.patch_size}")
        o = self.orientation
        if o is not None and (not isinstance(o, str) or len(o) != self.spatial_dims
                              or sorted({"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(ch, 9)
                                        for ch in o.upper()) != list(range(self.spatial_dims))):
            raise ConfigError(f"preprocessing.orientation must be {self.spatial_dims} axis codes, one of R/L, A/P"
                              f"{', S/I' if self.spatial_dims == 3 else ''} each (e.g. "
                              f"{'RAS' if self.spatial_dims == 3 else 'RA'}), or null, got {o!r}")
        t = self.intensity.get("type")
        if t not in ("range", "zscore", "histogram", "none"):
            raise ConfigError(f"intensity type must be 'range', 'zscore', 'histogram' or 'none', got {t!r}")
        if t == "histogram" and self.num_channels != 1:
            raise ConfigError(f"intensity type 'histogram' equalises one channel; this model has {self.num_channels}")
        if t == "range" and not {"a_min", "a_max"} <= set(self.intensity):
            raise ConfigError("intensity type 'range' needs a_min and a_max")
        known = {"range": {"a_min", "a_max", "clip"}, "histogram": {"num_bins"}}.get(t, set()) | {"type"}
        if set(self.intensity) - known:  # ("clp": false was ignored, the clip kept)
            raise ConfigError(f"preprocessing.intensity {t!r}: unknown key(s) {sorted(set(self.intensity) - known)}; "
                              f"known: {sorted(known)}")
        if t == "range":
            a, b = self.intensity["a_min"], self.intensity["a_max"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (a, b)) \
                    or not b > a:  # (a_min == a_max divided by zero: the input -300..-45 instead of 0..1)
                raise ConfigError(f"preprocessing.intensity a_min and a_max must be finite numbers with a_max > a_min, "
                                  f"got {a!r} and {b!r}")
            if not isinstance(self.intensity.get("clip", True), bool):  # ("false", a string, clipped)
                raise ConfigError(f"preprocessing.intensity clip must be true or false, got "
                                  f"{self.intensity['clip']!r}")
        try:  # (refused here, in a second: MONAI's crop refused them after the VLM load and the data cache, a review)
            pos, neg = float(self.pos), float(self.neg)
        except (TypeError, ValueError):
            raise ConfigError(f"preprocessing.pos and .neg must be numbers, got {self.pos!r} and {self.neg!r}") from None
        if not (math.isfinite(pos) and math.isfinite(neg) and pos >= 0 and neg >= 0 and pos + neg > 0):
            raise ConfigError(f"preprocessing.pos and .neg (the weights of patch centres on and off the label) must be "
                              f"finite, >= 0 and not both 0, got {self.pos!r} and {self.neg!r}")
        return dataclasses.replace(self, patch_size=[int(p) for p in self.patch_size], pos=pos, neg=neg)


AUGMENTATION = {
    "prob": 0.3,  # probability of the random affine (whole image, before cropping; zero padding)
    "rotate": 0.15,  # radians
    # +- relative stretch of the FIRST spatial axis only: MONAI's RandAffine reads one number as axis 0's range (the
    # others keep their size); every figure in the README was measured so (a review, 2026-12-07)
    "scale": 0.1,
    "translate": 0.0,  # +- fraction of the patch size (lib.data: in network voxels), not of the image
    "gamma": [0.7, 1.5],  # random contrast (gamma) range, applied with probability 0.3
}


GROW_SIDES = ("both", "above", "below")  # lib.clicks.grown_region


@dataclass
class ClickConfig:
    """Interactive segmentation (:mod:`lib.clicks`): click-guidance channels trained with simulated clicks, and the
    sampler's optional hold of clicked voxels in ``x_t``."""

    enabled: bool = False  # the model takes 2 guidance channels (positive, negative) and trains with clicks
    # Gaussian bump of each click, in network voxels (truncated at 3 sigma). 3 measured better than 2 on cxr_lung
    # (test Dice@3 0.9757 vs 0.9718/0.9693, automatic mode kept) and alike on BraTS (README, "Clicks, measured")
    sigma: float = 3.0
    no_click_prob: float = 0.5  # share of training patches without any click (keeps the automatic mode; as measured)
    max_random: int = 3  # random clicks per patch: 0..max_random positive and 0..max_random negative
    corrective_prob: float = 0.5  # share of training iterations that add corrective clicks
    corrective_rounds: int = 2  # up to this many rounds: predict, click the centre of the largest error region
    hold_radius: int = -1  # the sampler holds voxels within this radius of a click in x_t; -1: no hold
    # the sampler also holds the voxels a click grows to (lib.clicks.grown_region: connected to the click, every
    # channel within grow_tolerance of the click's intensity, within grow_radius network voxels); -1: no growing
    grow_radius: int = -1
    grow_tolerance: float = 0.5
    grow_channels: list[int] | None = None  # the image channels compared (None: all), e.g. BraTS FLAIR only
    grow_side: str = "both"  # a positive click grows to: "both" (similar), "above" (as bright or brighter), "below"
    # (negative clicks do not grow; they release the grown voxels nearer to them than to their positive click)
    # > 0: a positive click's fill ball is min(grow_radius, ceil(grow_scale * d)), d its distance to the current
    # segmentation (the automatic result and earlier fills; lib.clicks.scaled_grow_radius); 0: always grow_radius
    grow_scale: float = 0.0

    def resolved(self) -> "ClickConfig":
        c = dataclasses.replace(self)
        if not c.sigma > 0:
            raise ConfigError(f"clicks.sigma must be > 0, got {c.sigma}")
        if not 0.0 <= c.no_click_prob <= 1.0 or not 0.0 <= c.corrective_prob <= 1.0:
            raise ConfigError("clicks.no_click_prob and clicks.corrective_prob must be in [0, 1]")
        if c.max_random < 1 or c.corrective_rounds < 0:
            raise ConfigError("clicks.max_random must be >= 1 and clicks.corrective_rounds >= 0")
        if not isinstance(c.hold_radius, int) or c.hold_radius < -1:
            raise ConfigError(f"clicks.hold_radius must be an integer >= -1, got {c.hold_radius!r}")
        if not isinstance(c.grow_radius, int) or c.grow_radius < -1:
            raise ConfigError(f"clicks.grow_radius must be an integer >= -1, got {c.grow_radius!r}")
        if not (isinstance(c.grow_tolerance, (int, float)) and c.grow_tolerance >= 0):
            raise ConfigError(f"clicks.grow_tolerance must be a number >= 0, got {c.grow_tolerance!r}")
        if not (isinstance(c.grow_scale, (int, float)) and math.isfinite(c.grow_scale) and c.grow_scale >= 0):
            raise ConfigError(f"clicks.grow_scale must be a finite number >= 0, got {c.grow_scale!r}")
        if c.grow_side not in GROW_SIDES:
            raise ConfigError(f"clicks.grow_side must be one of {GROW_SIDES}, got {c.grow_side!r}")
        if c.grow_channels is not None and (not isinstance(c.grow_channels, (list, tuple)) or not c.grow_channels
                                            or not all(isinstance(v, int) and v >= 0 for v in c.grow_channels)):
            raise ConfigError(f"clicks.grow_channels must be a non-empty list of channel indices or null, "
                              f"got {c.grow_channels!r}")
        return c


@dataclass
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-4
    images_per_batch: int = 4
    patches_per_image: int = 2
    time_budget_s: float = 600.0
    max_iterations: int | None = None
    val_every_s: float = 300.0
    state_every_s: float = 60.0  # resume.pt (lib.training.train) at least this often, and at each validation
    state_every_it: int = 0  # also every N iterations (0: off)
    seed: int = 0
    augment: bool = True
    augmentation: dict = field(default_factory=lambda: dict(AUGMENTATION))
    autocast: str | None = None  # legacy (before HParams.precision): "none" -> precision "fp32", "bf16" -> "auto"
    num_threads: int | None = None
    # exponential moving average of the weights (torch.optim.swa_utils.AveragedModel), 0: off. When on, validation,
    # best.pt and last.pt hold the averaged weights (what is served); resume.pt keeps both. The decay warms up as
    # min(ema_decay, (1 + n) / (10 + n)) after n updates, so early validations are not dominated by the initial weights
    ema_decay: float = 0.0
    # hard-image sampling (lib.training.HardImageSampler): the share of each image's draw probability that follows
    # its recent difficulty (patch BCE relative to the mean at the same flow time t), the rest uniform. 0: uniform
    hard_share: float = 0.0
    hard_decay: float = 0.5  # moving average of an image's difficulty over the times it is drawn


def check_train(train: "TrainConfig", strict: bool = True) -> None:
    """The training section's values, checked before anything is loaded (lib.training.train calls it first: a bad
    value was refused only after the VLM loaded and the training set was cached, or ended in a bare traceback).
    ``strict=False`` (every ``HParams.resolved``, i.e. every checkpoint load and save) leaves out the checks added
    on 2026-12-06 for settings that only a training run reads (seed, threads, state intervals, hard sampling):
    checkpoints written before with such values (``num_threads: 0``) still load and can be published again."""
    if isinstance(train.ema_decay, bool) or not isinstance(train.ema_decay, (int, float)) \
            or not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no weight averaging), got {train.ema_decay!r}")
    for k in ("images_per_batch", "patches_per_image"):
        v = getattr(train, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"train.{k} must be an integer >= 1, got {v!r}")
    v = train.max_iterations  # None: the time budget alone (a string passed --set's check and failed later)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ConfigError(f"train.max_iterations must be null or an integer >= 1, got {v!r}")
    for k, lo in (("lr", 0.0), ("val_every_s", 0.0), ("time_budget_s", 0.0)):
        v = getattr(train, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= lo:
            raise ConfigError(f"train.{k} must be a finite number > {lo:g}, got {v!r}")
    if isinstance(train.weight_decay, bool) or not isinstance(train.weight_decay, (int, float)) \
            or not train.weight_decay >= 0:
        raise ConfigError(f"train.weight_decay must be a number >= 0, got {train.weight_decay!r}")
    if not isinstance(train.augmentation, dict):
        raise ConfigError(f"train.augmentation must be a mapping of {sorted(AUGMENTATION)}, "
                          f"got {train.augmentation!r}")
    unknown = sorted(set(train.augmentation) - set(AUGMENTATION))
    if unknown:  # a typo was silently ignored (the default used instead)
        raise ConfigError(f"train.augmentation: unknown key(s) {unknown}; known: {sorted(AUGMENTATION)}")
    aug = {**AUGMENTATION, **train.augmentation}  # (a string scale failed in RandAffined mid-training; prob 5 taken)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(aug["prob"]) and 0.0 <= aug["prob"] <= 1.0):
        raise ConfigError(f"train.augmentation.prob must be in [0, 1], got {aug['prob']!r}")
    for k in ("rotate", "scale", "translate"):
        if not (number(aug[k]) and aug[k] >= 0):
            raise ConfigError(f"train.augmentation.{k} must be a finite number >= 0, got {aug[k]!r}")
    g = aug["gamma"]
    if not (isinstance(g, (list, tuple)) and len(g) == 2 and all(number(v) and v > 0 for v in g) and g[0] <= g[1]):
        raise ConfigError(f"train.augmentation.gamma must be [low, high] with 0 < low <= high, got {g!r}")
    if strict:
        _check_train_run(train)


def _check_train_run(train: "TrainConfig") -> None:
    if isinstance(train.seed, bool) or not isinstance(train.seed, int) or not 0 <= train.seed < 2 ** 63:
        raise ConfigError(f"train.seed must be an integer >= 0, got {train.seed!r}")
    v = train.num_threads
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ConfigError(f"train.num_threads must be null (PyTorch's default) or an integer >= 1, got {v!r}")
    v = train.state_every_s  # <= 0 wrote resume.pt at every iteration
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"train.state_every_s must be a finite number > 0, got {v!r}")
    v = train.state_every_it
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"train.state_every_it must be an integer >= 0 (0: off), got {v!r}")
    v = train.hard_share  # checked here, before the VLM loads and the training set is cached
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ConfigError(f"train.hard_share must be within [0, 1], got {v!r}")
    v = train.hard_decay
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ConfigError(f"train.hard_decay must be within [0, 1), got {v!r}")


@dataclass
class HParams:
    """The complete, resolved description of a model; saved in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    preprocessing: PreprocConfig = field(default_factory=PreprocConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clicks: ClickConfig = field(default_factory=ClickConfig)
    labels: dict[str, int] = field(default_factory=lambda: {"foreground": 1})
    description: str = ""
    precision: str = "auto"  # lib.precision: one policy for training, validation, evaluate and the app
    # a prompted model: several structures, each chosen by its text prompt (empty: one structure, labels + vlm.prompt)
    structures: list[StructureConfig] = field(default_factory=list)

    @property
    def label_map(self) -> dict[str, int]:
        """``{name: value}`` of what the model segments: its structures (a prompted model) or ``labels``."""
        if self.structures:
            return {(s["name"] if isinstance(s, dict) else s.name): (s["value"] if isinstance(s, dict) else s.value)
                    for s in self.structures}
        return dict(self.labels)

    def check_label_values(self) -> None:
        """The values results are painted with: each structure's (:meth:`StructureConfig.resolved`) or the one
        label's (:func:`check_one_label`); ConfigError naming the rule. One check for a preset (:meth:`resolved`)
        and a checkpoint (:func:`lib.checkpoint.resolve_hparams`, which is not resolved)."""
        if self.structures:
            structures = [(StructureConfig(**s) if isinstance(s, dict) else s).resolved() for s in self.structures]
            names, values = [s.name for s in structures], [int(s.value) for s in structures]
            if len(set(names)) < len(names) or len(set(values)) < len(values) \
                    or len({n.lower() for n in names}) < len(names):
                raise ConfigError(f"structure names (in any case) and values must be unique, got "
                                  f"{dict(zip(names, values))}")
            if sorted(values) != list(range(1, len(values) + 1)):
                # 3D Slicer names the k-th value of a result's label_names (by value) k: structures 7 and 3 were
                # shown as "upper" on 1 and "lower" on 2, both empty, and 3 as "uncertain" (a review)
                raise ConfigError(f"structure values must be 1..{len(values)}, one each (3D Slicer gives the k-th "
                                  f"name, by value, the value k), got {dict(zip(names, values))}")
        else:
            check_one_label(self.labels)

    @property
    def label_name(self) -> str | None:
        """A one-structure model's structure name (what a painted label's segment is named for it); None for a
        prompted model."""
        return None if self.structures else next(iter(self.labels), None)

    def resolved(self) -> "HParams":
        """Every field explicit and consistent; raises ConfigError naming what disagrees."""
        precision, train = _precision_of(self.precision, self.train)
        check_train(train, strict=False)  # the run-only checks: where a training starts (lib.training.train)
        pre = self.preprocessing.resolved()
        structures = [(StructureConfig(**s) if isinstance(s, dict) else s).resolved() for s in self.structures]
        labels = dict(self.labels)
        vlm = dataclasses.replace(self.vlm)
        self.check_label_values()
        if structures:
            names = [s.name for s in structures]
            values = [s.value for s in structures]
            if vlm.name_or_path is None or vlm.text_mode != "label":
                raise ConfigError("a prompted model (structures) needs a VLM with vlm.text_mode 'label': the prompt "
                                  "is how a structure is chosen")
            labels = dict(zip(names, values))
            vlm.prompt = vlm.prompt or structures[0].prompts[0]
        if vlm.name_or_path is not None and vlm.view == "display" and pre.spatial_dims == 3:
            if pre.orientation:
                vlm.axcodes = pre.orientation
            elif not vlm.axcodes:
                raise ConfigError("vlm.view 'display' of 3D patches needs the patches' axis codes: set "
                                  "preprocessing.orientation (e.g. 'RAS'), or vlm.axcodes when every image is known "
                                  "to come in that orientation")
        vlm = vlm.resolved()
        model = dataclasses.replace(self.model)
        clicks = self.clicks.resolved()
        model.guidance_channels = 2 if clicks.enabled else 0
        if clicks.grow_channels is not None and max(clicks.grow_channels) >= pre.num_channels:
            # (refused only at the first click request: every click of the trained model failed)
            raise ConfigError(f"clicks.grow_channels {clicks.grow_channels} names a channel the {pre.num_channels}-"
                              f"channel image does not have")
        if model.spatial_dims != pre.spatial_dims:
            raise ConfigError(f"model spatial_dims={model.spatial_dims} but preprocessing spatial_dims={pre.spatial_dims}")
        if model.in_channels != pre.num_channels:
            raise ConfigError(f"model in_channels={model.in_channels} but preprocessing num_channels={pre.num_channels}")
        if model.mode == "plain":
            if vlm.name_or_path is not None:
                raise ConfigError("a 'plain' model takes no VLM conditioning; set vlm.name_or_path to null")
            model.cond_dim = None
        elif vlm.name_or_path is not None:
            if model.cond_dim is None:
                model.cond_dim = vlm.embed_dim
            elif model.cond_dim != vlm.embed_dim:
                raise ConfigError(f"model cond_dim={model.cond_dim} but the VLM gives embeddings of size {vlm.embed_dim}")
        else:
            model.cond_dim = None
        model = model.resolved()
        check_patch_fits(pre.patch_size, model.features, "preprocessing.patch_size")
        if model.cond_dim is not None:
            rows, cols = vlm.view_sides(pre.patch_size)
            if rows != cols:
                # a CLIP processor resizes the shortest edge and centre-crops a square: the VLM would never see the
                # outer parts of the window (and a SigLIP one squashes it)
                raise ConfigError(f"preprocessing.patch_size {list(pre.patch_size)} gives the VLM {rows} x {cols} "
                                  "views: VLM views must be square (its processor centre-crops a square, so the "
                                  "window's outer parts would never be seen); use a square patch (in-plane, for 3D)")
        sampler = self.sampler.resolved(pre.patch_size)
        if len(sampler.roi_size) != pre.spatial_dims:
            raise ConfigError(f"sampler roi_size {sampler.roi_size} does not match spatial_dims={pre.spatial_dims}")
        return dataclasses.replace(self, model=model, flow=self.flow.resolved(), sampler=sampler, vlm=vlm,
                                   preprocessing=pre, train=train, precision=precision, clicks=clicks,
                                   labels=labels, structures=structures)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HParams":
        if not isinstance(d, dict):  # (a preset file holding [1, 2]: a TypeError traceback before)
            raise ConfigError(f"hyper-parameters must be a JSON object of sections, got {type(d).__name__}")
        d = dict(d)
        parts = {"model": ModelConfig, "flow": FlowConfig, "sampler": SamplerConfig, "vlm": VLMConfig,
                 "preprocessing": PreprocConfig, "train": TrainConfig, "clicks": ClickConfig}
        _check_keys(cls, d, "top-level")
        kwargs: dict[str, Any] = {}
        for name, sub in parts.items():
            if name in d and d[name] is not None:
                if not isinstance(d[name], dict):
                    raise ConfigError(f"hyper-parameter section {name!r} must be a mapping, got {type(d[name]).__name__}")
                _check_keys(sub, d[name], name)
                check_types(sub, d[name], name)
                vals = dict(d[name])
                if "features" in vals:
                    f = vals["features"]
                    if not (isinstance(f, (list, tuple)) and f and all(isinstance(v, int) and not isinstance(v, bool)
                                                                       and v >= 1 for v in f)):
                        raise ConfigError(f"model.features must be a list of integers >= 1, got {f!r}")
                    vals["features"] = tuple(f)
                if "intensity_window" in vals:
                    vals["intensity_window"] = tuple(vals["intensity_window"])
                kwargs[name] = sub(**vals)
        for k in ("labels", "description", "precision"):
            if k in d:
                kwargs[k] = d[k]
        if d.get("structures"):
            if not isinstance(d["structures"], list):
                raise ConfigError("'structures' must be a list of {name, value, prompts, truth[, weight]}")
            for i, st in enumerate(d["structures"]):
                if not isinstance(st, dict):
                    raise ConfigError(f"structures[{i}] must be a mapping, got {type(st).__name__}")
                _check_keys(StructureConfig, st, f"structures[{i}]")
                check_types(StructureConfig, st, f"structures[{i}]")
                missing = [k for k in ("name", "value", "prompts", "truth") if k not in st]
                if missing:
                    raise ConfigError(f"structures[{i}] misses {missing}")
            kwargs["structures"] = [StructureConfig(**st) for st in d["structures"]]
        # no precision: the default ("auto"; a legacy train.autocast maps onto it). A checkpoint without one is read
        # as fp32 by lib.checkpoint.resolve_hparams (it was a preset file's fp32 too, against the documented auto)
        hp = cls(**kwargs)
        hp.precision, hp.train = _precision_of(hp.precision, hp.train)  # checkpoints from before the policy
        return hp

    @classmethod
    def from_file(cls, path: str | Path) -> "HParams":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (tracebacks before; a review)
            raise ConfigError(f"{path} is not valid JSON (UTF-8): {e}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _precision_of(precision: str, train: TrainConfig) -> tuple[str, TrainConfig]:
    """The precision setting, with the legacy ``train.autocast`` ("none" -> "fp32", "bf16" -> "auto") folded in."""
    from .precision import _LEGACY, PRECISIONS

    train = dataclasses.replace(train)
    if train.autocast is not None:
        if train.autocast not in _LEGACY:
            raise ConfigError(f"train.autocast (legacy) must be 'none' or 'bf16', got {train.autocast!r}; "
                              f"use precision = one of {PRECISIONS}")
        if precision == "auto":
            precision = _LEGACY[train.autocast]
        train.autocast = None
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision, train


PRESETS_DIR = Path(__file__).parent / "presets"


def load_preset(name_or_path: str) -> HParams:
    """A preset name from ``lib/presets`` (e.g. ``cxr_lung``) or a path to a JSON file."""
    p = Path(name_or_path)
    if not p.suffix and not ("/" in str(name_or_path) and p.is_file()):  # (a file path without .json was refused)
        p = PRESETS_DIR / f"{name_or_path}.json"
    if not p.exists():
        known = sorted(q.stem for q in PRESETS_DIR.glob("*.json"))
        raise ConfigError(f"no preset or config file {name_or_path!r}; presets: {known}")
    return HParams.from_file(p)
