"""THE per-window predictor, and the sliding-window inferer around it.

:meth:`DFMSystem.predict_windows` is the only code that turns image windows into probabilities. Validation during
training, ``predict``/``evaluate``, the MONAI Label infer task, active-learning scoring and the benches all reach it
through :class:`DFMSlidingWindowInferer` (a thin subclass of MONAI's ``SlidingWindowInferer``). Per call it

1. refuses windows whose size is not the training patch size (unless explicitly allowed): a different window
   changes the VLM's field of view -- the earlier system's whole-image-embedding bug;
2. runs in eval mode (every submodule's own train/eval flag is restored afterwards; the frozen VLM is always in
   eval mode) under the one precision policy (:mod:`lib.precision`);
3. conditions each window once (:func:`lib.vlm.patch_condition` + FiLM, and for ``arch="cached"`` the whole image
   path of the U-Net);
4. runs the M samples of all windows *batched* along the batch axis (``repeat_interleave``), in network calls of
   :func:`items_per_call` (window x sample) items (the memory cap, which on a CPU is also a speed knob);
5. draws every random number of sample ``m`` of a window from its own stream, seeded by
   ``(seed, image id, window position, m)``: the result does not depend on ``sw_batch_size``, on the order of the
   windows, on the memory cap or on other images;
6. returns the mean of the samples' ``p_final`` (or ``last_posterior`` for benchmarks) and their variance.

A prompted model (:mod:`lib.structures`) predicts every window for each asked label (``per_window``): one more
batch axis of the same call; each window's image is embedded once, and each label's noise is seeded by the
prompt's text as well, so a label's result does not depend on which other labels were asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import uuid
from collections import OrderedDict
from typing import Sequence

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from . import precision as precision_policy
from .config import ConfigError, HParams, check_patch_fits, roi_mismatch_message, validate_sampler
from .flow import make_scheduler
from .network import ConditionalUNet
from .samplers import ItemNoise, _hold, derive_seed, mean_var, nfe_of, sample_source_like, sampler_function
from .transforms import InputError
from .vlm import VLMEncoder, VLMError, patch_condition
from .clicks import Clicks, guidance_maps, hold_maps


_eval_lock = threading.Lock()
_eval_held: dict[int, list] = {}  # id(submodule) -> [predictions inside, its flag before the first]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Eval mode inside; afterwards every submodule gets back its *own* flag (not its container's). Predictions in
    several threads on one model share it: the first to enter saves the flags, the last to leave restores them (each
    restoring its own put a model trained in the same process back in train mode under the other prediction)."""
    subs = list({id(m): m for mod in modules if mod is not None for m in mod.modules()}.values())
    with _eval_lock:
        for m in subs:
            held = _eval_held.setdefault(id(m), [0, m.training])
            held[0] += 1
            m.training = False
    try:
        yield
    finally:
        with _eval_lock:
            for m in subs:
                held = _eval_held[id(m)]
                held[0] -= 1
                if held[0] == 0:
                    m.training = held[1]
                    del _eval_held[id(m)]


class DFMSystem(nn.Module):
    """What prediction needs: the U-Net, the frozen VLM (or None) and the resolved hyper-parameters."""

    def __init__(self, model: ConditionalUNet, vlm: VLMEncoder | None, hparams: HParams):
        super().__init__()
        self.model = model
        self.vlm = vlm
        self.hparams = hparams
        if (vlm is None) != (model.cfg.cond_dim is None):
            raise ValueError("the model's cond_dim and the presence of a VLM disagree: "
                             f"cond_dim={model.cfg.cond_dim}, vlm={'given' if vlm is not None else 'none'}")
        if vlm is not None and vlm.embed_dim != model.cfg.cond_dim:
            raise ValueError(f"the VLM gives {vlm.embed_dim}-d embeddings but the model's FiLM heads take "
                             f"cond_dim={model.cfg.cond_dim}")
        self.cache_token = uuid.uuid4().hex  # identifies these weights in a WindowCache (a reload gets a new one)
        if vlm is not None and hparams.structures and hparams.vlm.center_prompts:
            vlm.center_texts_on([p for s in hparams.structures for p in s.prompts])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def preprocessing(self):
        """The checkpoint's preprocessing pipeline (one instance, so that its inverse applies to its outputs)."""
        if getattr(self, "_preprocessing", None) is None:
            from .transforms import preprocess

            self._preprocessing = preprocess(self.hparams.preprocessing, structures=self.hparams.structures,
                                             label_name=self.hparams.label_name)
        return self._preprocessing

    def label_reader(self):
        """The reference label as metrics compare it (original geometry, this model's truth: its structures, or its
        one structure's name in a painted label): one pipeline for ``evaluate`` and training's validation."""
        from .transforms import label_transforms

        return label_transforms(self.hparams.preprocessing, structures=self.hparams.structures,
                                label_name=self.hparams.label_name)

    @property
    def takes_clicks(self) -> bool:
        return self.model.cfg.guidance_channels > 0

    @property
    def structures(self) -> list:
        """A prompted model's structures (painting order); empty for a one-structure model."""
        return list(self.hparams.structures)

    def prompts(self, labels=None, prompt: str | None = None) -> list[tuple[str, int, str]]:
        """``(name, value, prompt)`` of what a request asks for: a free ``prompt`` (named by itself, value 1), the
        named ``labels`` of a prompted model (default: all, in painting order), or a one-structure model's label."""
        from .config import StructureConfig
        from .structures import StructureError, select

        if prompt is not None:
            prompt = str(prompt).strip()
            if not prompt:
                raise StructureError("the prompt is empty")
            if self.vlm is None or self.vlm.cfg.text_mode != "label":
                raise StructureError("this model takes no text prompt (it is not conditioned on a label prompt)")
            asked = labels if isinstance(labels, (list, tuple)) else \
                ([] if labels is None else [x for x in str(labels).split(",")])
            asked = [str(x).strip() for x in asked if str(x).strip()]
            if asked and [x.lower() for x in asked] != ["all"]:  # labels were silently ignored beside a prompt
                raise StructureError(f"give either 'labels' ({asked}) or a free 'prompt' ({prompt!r}), not both")
            taken = {"background", "uncertain"} | {s.name.lower() for s in self.structures} | \
                {str(n).lower() for n in self.hparams.labels}
            if prompt.lower() in taken:  # the segment would be named like another one (Slicer, Submit Label)
                what = "a reserved segment" if prompt.lower() in ("background", "uncertain") else \
                    "a structure of this model: ask for it with labels"
                raise StructureError(f"the free prompt {prompt!r} is the name of {what}; reword the prompt (e.g. "
                                     f"'the {prompt}')")
            return [(prompt, 1, prompt)]
        if self.structures:
            return [(s.name, s.value, s.prompts[0]) for s in select(self.structures, labels)]
        name, value = next(iter(self.hparams.labels.items()))
        select([StructureConfig(name, value, [name], {"above": 0})], labels)  # refuses any other name or value
        return [(name, value, None)]

    def condition(self, patches: torch.Tensor, texts=None, guidance: torch.Tensor | None = None, repeats: int = 1):
        """Per-patch condition (VLM embedding + FiLM scale/shift [+ image features]), once per patch.

        The VLM sees the image channels only; a click-trained model also gets the click-guidance channels
        (``guidance (B * repeats, 2, *patch)``; none given = no click = zeros, the automatic mode). ``repeats``:
        each patch with ``repeats`` texts in a row (a prompted model's labels); its image is embedded once."""
        emb = patch_condition(self.vlm, patches, texts, repeats=repeats)
        if repeats > 1:
            patches = patches.repeat_interleave(repeats, dim=0)
        g = self.model.cfg.guidance_channels
        if g:
            if guidance is None:
                guidance = torch.zeros((patches.shape[0], g, *patches.shape[2:]), device=patches.device)
            patches = torch.cat([patches, guidance.to(device=patches.device, dtype=patches.dtype)], dim=1)
        elif guidance is not None:
            raise ValueError("this model was not trained with clicks: it takes no click-guidance channels")
        return self.model.prepare(patches, emb)

    def texts_for(self, text: str | None, n: int) -> list[str] | None:
        """The text of ``n`` windows of one image: the image's text (text_mode "image") or, for text_mode "label",
        the model's prompt -- always, as in training (:func:`lib.vlm.patch_texts`): an image's ``text`` is
        ignored (a prompted model's free prompt is the deliberate override: ``prompts``)."""
        if self.vlm is None or self.vlm.cfg.text_mode == "none":
            return None
        if self.vlm.cfg.text_mode == "label":
            return [self.vlm.cfg.prompt] * n
        if not isinstance(text, str) or not text.strip():
            raise VLMError("this model is conditioned on per-image text (text_mode='image'); none was given "
                           "(a datalist entry's 'text', or --text)")
        return [text] * n

    @torch.no_grad()
    def predict_windows(self, windows: torch.Tensor, texts: Sequence[str] | None, seeds: Sequence[int], *,
                        sampler: str = "euler", steps: int = 8, num_samples: int = 1, output: str = "p_final",
                        precision: str | None = None, max_batch_voxels: int | str | None = None,
                        allow_roi_mismatch: bool = False, guidance: torch.Tensor | None = None,
                        hold: torch.Tensor | None = None, per_window: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``windows (B, C, *patch)`` + one text and one seed per window -> ``(mean, variance)``, each
        ``(B, 1, *patch)`` on the system's device. See the module docstring for what it guarantees.

        ``per_window = L``: every window is predicted for L texts (a prompted model's labels): ``texts`` and
        ``seeds`` hold ``B * L`` entries (window-major) and the result ``B * L`` items; each window's image is
        embedded by the VLM once. Clicks (:mod:`lib.clicks`): ``guidance (B * L, 2, *patch)`` click maps for a
        click-trained model, ``hold (B * L, 2, *patch)`` mask and value of voxels the sampler holds in ``x_t``."""
        cfg = self.model.cfg
        patch = list(self.hparams.preprocessing.patch_size)
        if windows.ndim != cfg.spatial_dims + 2:
            raise ValueError(f"the model is {cfg.spatial_dims}D: windows must be (batch, channel, "
                             f"{'H, W' if cfg.spatial_dims == 2 else 'H, W, D'}); got {tuple(windows.shape)}")
        if list(windows.shape[2:]) != patch:
            if not allow_roi_mismatch:
                raise ConfigError(roi_mismatch_message(list(windows.shape[2:]), patch))
            check_patch_fits(windows.shape[2:], cfg.features, "roi_size")
        if len(seeds) != windows.shape[0] * per_window:
            raise ValueError(f"one seed per window and text: {len(seeds)} seeds for {windows.shape[0]} windows x "
                             f"{per_window}")
        validate_sampler(sampler, steps, num_samples, 0.0, 1, output)
        dev = self.device
        prec = precision or self.hparams.precision
        windows = windows.to(dev).float()
        b, m = windows.shape[0] * per_window, num_samples
        spatial = tuple(windows.shape[2:])
        if hold is not None:
            hold = hold.to(dev).float()
        with eval_mode(self.model, self.vlm), precision_policy.reproducible(), \
                precision_policy.autocast(prec, dev):
            cond = self.condition(windows, texts, None if guidance is None else guidance.to(dev).float(),
                                  repeats=per_window)
            if not self.model.dfm:  # one pass; the clicks' held voxels are known here too (were ignored)
                p = _hold(torch.sigmoid(self.model(None, None, cond).float()), hold)
                check_finite(p, prec)
                return p, torch.zeros_like(p)
            hp = self.hparams
            scheduler = make_scheduler(hp.flow)
            fn = sampler_function(sampler)
            cap = items_per_call(windows[0, 0].numel(), dev, max_batch_voxels or hp.sampler.max_batch_voxels)
            outs = []
            for start in range(0, b * m, cap):
                idx = torch.arange(start, min(start + cap, b * m))
                noise = ItemNoise([derive_seed(int(seeds[i // m]), i % m) for i in idx.tolist()], device=dev)
                c = cond if (m == 1 and len(idx) == b) else cond[idx // m]
                x0 = sample_source_like((len(idx), 1, *spatial), hp.flow.source_p, noise, dev)
                trace: dict = {}
                h = None if hold is None else hold[idx // m]
                p_final = fn(self.model, c, x0, steps, scheduler, generator=noise, trace=trace, hold=h)
                # the held (clicked) voxels are known in either output (the samplers hold them in p_final; the
                # posterior before t = 1 is the network's own: a review found them unheld there)
                outs.append(_hold(trace["last_posterior"], h) if output == "last_posterior" else p_final)
        out = torch.cat(outs).float().view(b, m, 1, *spatial)
        check_finite(out, prec)
        return mean_var(out, 1)


class NonFiniteOutput(RuntimeError):
    """The network's probabilities hold NaN: no segmentation is made of them."""


def check_finite(p: torch.Tensor, precision) -> None:
    """Raise :class:`NonFiniteOutput` where the probabilities ``p`` (``(B, ...)``) hold NaN. A NaN never flips a
    voxel of the sampler's state (``rand < NaN`` is false) and ``> 0.5`` reads it as background: a checkpoint with
    a NaN weight segmented nothing, and NaN in part of a window left holes in the result, without a word (a review,
    2026-12-08). (±inf logits are fine: probabilities 0 and 1.)"""
    bad = torch.isnan(p.reshape(p.shape[0], -1)).any(1)
    if bool(bad.any()):
        raise NonFiniteOutput(f"the network returned NaN for {int(bad.sum())} of {p.shape[0]} window samples "
                              f"(precision {precision}): its weights or this input are not finite, or the precision "
                              "overflowed; no segmentation is made from it")


CPU_AUTO_VOXELS = 40 * 1024  # 4 items of 96^2: measured fastest on this CPU (bench/cap_bench.py, README)
CUDA_AUTO_VOXELS = 2 ** 21


def items_per_call(window_voxels: int, device, max_batch_voxels: int | str | None = "auto") -> int:
    """(window x sample) items per network call of :meth:`DFMSystem.predict_windows`.

    An integer ``max_batch_voxels`` is a cap: ``max_batch_voxels // window_voxels`` items (at least 1). ``"auto"``
    (the default) depends on the device, as measured by ``bench/cap_bench.py`` (README, "Sampler cost"): on a GPU
    2**21 voxels (memory is the only limit); on a CPU small calls are faster -- 3-5 items of 96**2 beat 7-8 by
    1.3-1.9x and 32 by 2x, and one 48**3 item per call is 4x slower than two (AVX2 and AVX512 alike) -- so
    ``CPU_AUTO_VOXELS // window_voxels`` items (4 of 96**2), at least 2. The draws do not depend on it (every item
    has its own noise stream)."""
    vox = max(1, int(window_voxels))
    if max_batch_voxels is None or max_batch_voxels == "auto":
        if torch.device(device).type == "cpu":
            return max(2, CPU_AUTO_VOXELS // vox)
        return max(1, CUDA_AUTO_VOXELS // vox)
    return max(1, int(max_batch_voxels) // vox)


class WindowCache:
    """Results of single windows, keyed by *everything* a window's result depends on: the window's input bytes
    (image channels, click-guidance and hold channels), its seed, the sampler settings and the weights
    (``DFMSystem.cache_token``). A hit is therefore exactly what re-running the window would give (up to the
    floating-point reduction order of a different batch composition). Least recently used entries are dropped
    beyond ``max_bytes``. Thread-safe; ``stats`` counts hits and misses since the last :meth:`reset_stats`."""

    def __init__(self, max_bytes: int = 512 * 2 ** 20):
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(window: torch.Tensor, *parts) -> str:
        h = hashlib.blake2b(repr(parts).encode(), digest_size=20)
        h.update(window.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str):
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        # a copy: a CPU view of one window would keep its whole batch's tensor alive beyond what the cache counts
        value = tuple(v.detach().to("cpu", copy=True) for v in value)
        size = sum(v.numel() * v.element_size() for v in value)
        with self._lock:
            if key in self._d or size > self.max_bytes:  # (an entry over the cap was kept: a cap of 0 cached; a review)
                return
            self._d[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._d) > 1:
                _, old = self._d.popitem(last=False)
                self._bytes -= sum(v.numel() * v.element_size() for v in old)

    def reset_stats(self) -> None:
        with self._lock:
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)


def seed_for(seed: int, key: str | None) -> int:
    """A per-image seed that depends on the image id, not on the order in which images are processed: a 64-bit hash
    of both (:func:`lib.samplers.derive_seed`; a CRC32 of the id gave "plumless" and "buckeroo" one stream, and seed
    1 of one id the stream of seed 0 of another)."""
    return int(seed) if key is None else derive_seed(int(seed), "image", str(key))


def window_seed(image_seed: int, slices) -> int:
    """The seed of one window: the image's seed and the window's position (start of every spatial axis)."""
    starts = tuple(int(s.start or 0) for s in list(slices)[2:])
    return derive_seed(int(image_seed), starts)


class DFMSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` with :meth:`DFMSystem.predict_windows` as the per-window predictor.

    ``inferer(image (1, C, *spatial), system, text=..., seed=...)`` -> ``(1, 1, *spatial)`` probabilities (Gaussian
    blending); with ``return_variance`` also the blended per-voxel variance of the ``num_samples`` samples.
    """

    def __init__(self, roi_size, sw_batch_size: int = 4, overlap: float = 0.25, mode: str = "gaussian",
                 sigma_scale: float = 0.125, sampler: str = "euler", steps: int = 8, num_samples: int = 1,
                 output: str = "p_final", seed: int = 0, device: str | torch.device | None = None,
                 precision: str | None = None, max_batch_voxels: int | str | None = None,
                 allow_roi_mismatch: bool = False, progress: bool = False):
        validate_sampler(sampler, steps, num_samples, overlap, sw_batch_size, output, seed, mode, list(roi_size))
        if precision is not None:
            precision_policy.check(precision)
        super().__init__(roi_size=list(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode,
                         sigma_scale=sigma_scale, padding_mode="constant", cval=0.0, progress=progress,
                         with_coord=True)
        self.roi_size = list(roi_size)
        self.sampler = sampler
        self.steps = steps
        self.num_samples = num_samples
        self.output = output
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.precision = precision
        self.max_batch_voxels = max_batch_voxels
        self.allow_roi_mismatch = allow_roi_mismatch

    @classmethod
    def from_hparams(cls, hp: HParams, allow_roi_mismatch: bool = False, **overrides) -> "DFMSlidingWindowInferer":
        s = hp.sampler
        roi = overrides.get("roi_size")
        if roi is not None and len(roi) != hp.model.spatial_dims:
            raise ConfigError(f"roi_size {list(roi)} has {len(roi)} values; the model is {hp.model.spatial_dims}D")
        if roi is not None and list(roi) != list(hp.preprocessing.patch_size) and not allow_roi_mismatch:
            raise ConfigError(roi_mismatch_message(roi, hp.preprocessing.patch_size))
        kw = dict(roi_size=s.roi_size, sw_batch_size=s.sw_batch_size, overlap=s.overlap, mode=s.blend_mode,
                  sampler=s.name, steps=s.steps, num_samples=s.num_samples, output=s.output, seed=s.seed,
                  max_batch_voxels=s.max_batch_voxels)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(allow_roi_mismatch=allow_roi_mismatch, **kw)

    def window_count(self, spatial_shape) -> int:
        """How many windows MONAI's sliding window takes over an image of ``spatial_shape`` (the network's grid), at
        this inferer's overlap (MONAI's own slicing: an image smaller than the window is one window along that
        axis)."""
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval
        from monai.utils import ensure_tuple_rep, fall_back_tuple

        roi = fall_back_tuple(self.roi_size, tuple(int(v) for v in spatial_shape))
        image = [int(s) for s in spatial_shape]
        overlap = ensure_tuple_rep(self.overlap, len(image))
        return len(dense_patch_slices(image, roi, _get_scan_interval(image, roi, len(image), overlap)))

    def work(self, spatial_shape) -> int:
        """Window evaluations of the network for one image and one structure: windows x samples x evaluations per
        sample (:func:`lib.samplers.nfe_of`)."""
        return self.window_count(spatial_shape) * self.num_samples * nfe_of(self.sampler, self.steps)

    def settings(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "num_samples": self.num_samples,
                "overlap": self.overlap, "roi_size": self.roi_size, "seed": self.seed, "output": self.output,
                "sw_batch_size": self.sw_batch_size}

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: DFMSystem, text: str | None = None,
                 seed: int | None = None, return_variance: bool = False, clicks=None,
                 cache: WindowCache | None = None, click_sigma: float | None = None, hold_radius: int | None = None,
                 prompts: Sequence[str] | None = None, grow_radius: int | None = None,
                 grow_tolerance: float | None = None, grow_channels: Sequence[int] | None = None,
                 grow_side: str | None = None, grow_scale: float | None = None):
        """``inputs``: one preprocessed image ``(1, C, *spatial)``; returns ``(1, L, *spatial)`` probabilities, one
        channel per prompt (L = 1 without ``prompts``).

        ``seed``: the image's seed (default: the inferer's; callers derive it from the image id with
        :func:`seed_for`); every window derives its own from it and its position (and, with ``prompts``, the
        prompt's text: a label's result does not depend on which other labels were asked for).
        ``prompts``: the texts of a prompted model's labels (or a free prompt); every window is predicted for each,
        batched (:meth:`DFMSystem.predict_windows` ``per_window``).
        ``clicks``: points in this (preprocessed) grid's voxel coordinates (one :class:`Clicks`, or one per prompt):
        click-guidance channels for a click-trained model (Gaussian of ``click_sigma``, default the checkpoint's)
        and, with ``hold_radius >= 0`` (default the checkpoint's), the held voxels of the sampler; both travel with
        the image through MONAI's window slicing; with ``grow_radius >= 0`` (default the checkpoint's) the sampler
        also holds what each click grows to in this image (:func:`lib.clicks.grown_region`, ``grow_tolerance``
        on the image channels ``grow_channels``, ``grow_side``; with ``grow_scale`` > 0 each fill's ball follows
        the click's distance to the automatic result -- this call without clicks, served from ``cache`` after the
        first request -- and the earlier fills: :func:`lib.clicks.scaled_grow_radius`).
        ``cache``: reuse the result of every window whose input did not
        change (a click changes only the windows its truncated guidance bump or held voxels reach).
        """
        if inputs.ndim != len(self.roi_size) + 2:
            raise ConfigError(f"the inferer's roi_size {self.roi_size} is {len(self.roi_size)}D; "
                              f"got an input of shape {tuple(inputs.shape)}")
        if inputs.shape[0] != 1:
            raise InputError(f"one image at a time (batch 1); got batch {inputs.shape[0]}")
        if inputs.shape[1] != network.model.cfg.in_channels:
            raise InputError(f"the model expects {network.model.cfg.in_channels} image channel(s); "
                             f"got {inputs.shape[1]}")
        image_seed = self.seed if seed is None else int(seed)
        if prompts is not None:
            prompts = [str(p) for p in prompts]
            if not prompts:
                raise ValueError("prompts is empty")
            texts_of = prompts
        else:
            texts_of = network.texts_for(text, 1)
        n_p = len(prompts) if prompts is not None else 1
        device = self.device or network.device
        c = inputs.shape[1]
        hp = network.hparams
        sigma = float(click_sigma if click_sigma is not None else hp.clicks.sigma)
        radius = int(hold_radius if hold_radius is not None else hp.clicks.hold_radius)
        grow = int(grow_radius if grow_radius is not None else hp.clicks.grow_radius)
        tol = float(grow_tolerance if grow_tolerance is not None else hp.clicks.grow_tolerance)
        # a click model always gets its guidance (and hold) channels, zero without clicks (= what the network and
        # the sampler do with none): windows that no click reaches then have the same bytes with and without clicks
        per_prompt = list(clicks) if isinstance(clicks, (list, tuple)) else [clicks or Clicks()] * n_p
        if len(per_prompt) != n_p:
            raise ValueError(f"{len(per_prompt)} click sets for {n_p} prompt(s)")
        per_prompt = [k or Clicks() for k in per_prompt]
        scale = float(grow_scale if grow_scale is not None else hp.clicks.grow_scale)
        refs, ref_windows = [None] * n_p, None
        if grow >= 0 and scale > 0 and any(k.fg for k in per_prompt):
            auto = self(inputs, network, text=text, seed=image_seed, cache=cache, prompts=prompts,
                        hold_radius=radius, grow_radius=grow, grow_tolerance=tol, grow_channels=grow_channels,
                        grow_side=grow_side, grow_scale=0.0, click_sigma=sigma)
            refs = [(auto[0, j] > 0.5).cpu().numpy() for j in range(n_p)]
            ref_windows = dict(self.last_windows)
        extra = []
        if network.takes_clicks:
            extra += [guidance_maps(k, inputs.shape[2:], sigma, device=inputs.device)[None] for k in per_prompt]
        n_guid = sum(e.shape[1] for e in extra)
        if (radius >= 0 or grow >= 0) and (any(per_prompt) or network.takes_clicks):
            extra += [hold_maps(k, inputs.shape[2:], radius, device=inputs.device, image=inputs[0],
                                grow_radius=grow, grow_tolerance=tol, grow_side=grow_side or hp.clicks.grow_side,
                                grow_channels=grow_channels if grow_channels is not None else hp.clicks.grow_channels,
                                grow_scale=scale, reference=ref)[None] for k, ref in zip(per_prompt, refs)]
        n_hold = sum(e.shape[1] for e in extra) - n_guid
        if extra:
            inputs = torch.cat([inputs.float()] + [e.to(inputs.device) for e in extra], dim=1)
        settings = (self.sampler, self.steps, self.num_samples, self.output, self.precision,
                    None if texts_of is None else tuple(texts_of), network.cache_token, n_guid, n_hold)
        self.last_windows = {"windows": 0, "rerun": 0}
        if ref_windows:  # the automatic pass the fills are measured against: its re-run windows count as well
            self.last_windows["rerun"] = ref_windows["rerun"]

        def per_item(x, n):  # (n, L * k, ...) channels of L prompts -> (n * L, k, ...)
            return x.reshape(n * n_p, x.shape[1] // n_p, *x.shape[2:])

        def run(windows, seeds):
            n = windows.shape[0]
            return network.predict_windows(
                windows[:, :c], None if texts_of is None else texts_of * n, seeds,
                sampler=self.sampler, steps=self.steps, num_samples=self.num_samples, output=self.output,
                precision=self.precision, max_batch_voxels=self.max_batch_voxels,
                allow_roi_mismatch=self.allow_roi_mismatch,
                guidance=per_item(windows[:, c:c + n_guid], n) if n_guid else None,
                hold=per_item(windows[:, c + n_guid:], n) if n_hold else None, per_window=n_p)

        # a model without click channels gets hold channels only in a request with clicks: a window that no held
        # voxel reaches is keyed as the same window without them (the sampler holds nothing there: the same result,
        # bit for bit), so a first click re-runs only the windows it reaches (was: every window)
        bare = settings[:-1] + (0,)

        def key_of(window, ws):
            if n_hold and not network.takes_clicks and not bool(window[c + n_guid:].any()):
                return WindowCache.key(window[:c + n_guid], ws, bare)
            return WindowCache.key(window, ws, settings)

        def item_seeds(ws: int) -> list[int]:
            return [ws] if prompts is None else [derive_seed(ws, "prompt", p) for p in prompts]

        def predictor(windows: torch.Tensor, slices):
            seeds = [window_seed(image_seed, s) for s in slices]
            n = windows.shape[0]
            self.last_windows["windows"] += n
            if cache is None:
                self.last_windows["rerun"] += n
                mean, var = run(windows, [x for ws in seeds for x in item_seeds(ws)])
                return {"prob": mean.reshape(n, n_p, *mean.shape[2:]), "var": var.reshape(n, n_p, *var.shape[2:])}
            keys = [key_of(windows[i], seeds[i]) for i in range(n)]
            found = [cache.get(k) for k in keys]
            todo = [i for i in range(n) if found[i] is None]
            if todo:
                mean, var = run(windows[todo], [x for i in todo for x in item_seeds(seeds[i])])
                mean = mean.reshape(len(todo), n_p, *mean.shape[2:])
                var = var.reshape(len(todo), n_p, *var.shape[2:])
                for j, i in enumerate(todo):
                    found[i] = (mean[j], var[j])
                    cache.put(keys[i], found[i])
            self.last_windows["rerun"] += len(todo)
            dev = network.device
            return {"prob": torch.stack([f[0].to(dev) for f in found]),
                    "var": torch.stack([f[1].to(dev) for f in found])}

        self.sw_device = device
        out = super().__call__(inputs, predictor, device=inputs.device)
        prob = out["prob"]
        return (prob, out["var"]) if return_variance else prob
