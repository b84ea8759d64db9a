"""Sliding-window DFM prediction: a MONAI ``Inferer`` that runs the whole sampler in every window.

``DFMSlidingWindowInferer()(image, system)`` returns one probability map the size of ``image``: MONAI's
``sliding_window_inference`` cuts windows of ``roi_size``, the predictor computes the window's VLM conditioning
with :func:`lib.vlm.patch_condition` (the function training uses on its random patches), prepares the FiLM
parameters once, runs the sampler (``num_samples`` times from fresh noise) and returns ``p_final`` (or the mean
of the samples, with their variance); windows are blended with Gaussian weights. No thresholding here.
"""

from __future__ import annotations

import zlib

import torch
from monai.inferers import Inferer, sliding_window_inference
from torch import nn

from .config import HParams, validate_sampler
from .flow import make_scheduler
from .network import ConditionalUNet
from .samplers import run_sampler
from .vlm import VLMEncoder, patch_condition


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

    @property
    def preprocessing(self):
        """The checkpoint's preprocessing pipeline (one instance, so that its inverse applies to its outputs)."""
        if getattr(self, "_preprocessing", None) is None:
            from .transforms import preprocess

            self._preprocessing = preprocess(self.hparams.preprocessing)
        return self._preprocessing

    def condition(self, patches: torch.Tensor, texts=None):
        """Per-patch condition (VLM embedding + FiLM scale/shift), computed once and reused by every step."""
        return self.model.prepare(patches, patch_condition(self.vlm, patches, texts))


def seed_for(seed: int, key: str | None) -> int:
    """A per-image seed that depends on the image id, not on the order in which images are processed."""
    return int(seed) if key is None else (int(seed) * 1000003 + zlib.crc32(str(key).encode())) % (2**63 - 1)


class DFMSlidingWindowInferer(Inferer):
    def __init__(self, roi_size, sw_batch_size: int = 4, overlap: float = 0.25, mode: str = "gaussian",
                 sigma_scale: float = 0.125, sampler: str = "euler", steps: int = 8, num_samples: int = 1,
                 output: str = "p_final", seed: int = 0, device: str | torch.device | None = None,
                 amp: bool = False, progress: bool = False):
        super().__init__()
        validate_sampler(sampler, steps, num_samples, overlap, sw_batch_size, output)
        self.roi_size = list(roi_size)
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.sampler = sampler
        self.steps = steps
        self.num_samples = num_samples
        self.output = output
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.amp = amp
        self.progress = progress

    @classmethod
    def from_hparams(cls, hp: HParams, **overrides) -> "DFMSlidingWindowInferer":
        s = hp.sampler
        kw = dict(roi_size=s.roi_size, sw_batch_size=s.sw_batch_size, overlap=s.overlap, mode=s.blend_mode,
                  sampler=s.name, steps=s.steps, num_samples=s.num_samples, output=s.output, seed=s.seed)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def _predictor(self, system: DFMSystem, text, generator, device):
        model = system.model
        hp = system.hparams
        scheduler = make_scheduler(hp.flow)
        amp = self.amp and device.type == "cuda"

        def model_fn(x, t, cond):
            with torch.autocast(device_type=device.type, enabled=amp):
                return model(x, t, cond)

        def predict(windows: torch.Tensor):
            windows = windows.to(device)
            texts = None if text is None else [text] * windows.shape[0]
            with torch.autocast(device_type=device.type, enabled=amp):
                cond = system.condition(windows, texts)
            shape = (windows.shape[0], 1, *windows.shape[2:])
            if not model.dfm:
                return {"prob": torch.sigmoid(model_fn(None, None, cond).float()),
                        "var": torch.zeros(shape, device=device)}
            mean, var = run_sampler(self.sampler, model_fn, cond, shape, self.steps, scheduler,
                                    source_p=hp.flow.source_p, num_samples=self.num_samples, generator=generator,
                                    device=device, output=self.output)
            return {"prob": mean, "var": var if var is not None else torch.zeros_like(mean)}

        return predict

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: DFMSystem, text: str | None = None,
                 seed: int | None = None, return_variance: bool = False):
        """``inputs``: one preprocessed image ``(1, C, *spatial)``; returns ``(1, 1, *spatial)`` probabilities.

        ``text``: the image's text (text_mode "image") or None (the prompt is used for text_mode "label").
        ``seed``: the sampler seed (default: the inferer's); with ``return_variance`` also the per-voxel variance
        of the ``num_samples`` samples.
        """
        if inputs.ndim != len(self.roi_size) + 2:
            raise ValueError(f"the inferer's roi_size {self.roi_size} is {len(self.roi_size)}D; "
                             f"got an input of shape {tuple(inputs.shape)}")
        if inputs.shape[0] != 1:
            raise ValueError(f"one image at a time (batch 1); got batch {inputs.shape[0]}")
        if text is None and network.vlm is not None and network.vlm.cfg.text_mode == "label":
            text = network.vlm.cfg.prompt
        if network.vlm is not None and network.vlm.cfg.text_mode == "image" and not text:
            raise ValueError("this model is conditioned on per-image text (text_mode='image'); none was given")
        device = self.device or next(network.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed if seed is None else int(seed))
        was_training = network.training
        network.eval()
        try:
            out = sliding_window_inference(
                inputs, roi_size=self.roi_size, sw_batch_size=self.sw_batch_size,
                predictor=self._predictor(network, text, generator, device), overlap=self.overlap, mode=self.mode,
                sigma_scale=self.sigma_scale, padding_mode="constant", cval=0.0, sw_device=device,
                device=inputs.device, progress=self.progress,
            )
        finally:
            network.train(was_training)
        prob = out["prob"].clamp_(0.0, 1.0)
        return (prob, out["var"]) if return_variance else prob
