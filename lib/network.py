"""Conditional U-Net for 2D and 3D: ``logits = model(x_t, t, cond)``.

* Inputs: the image channels, for a click-trained model two click-guidance channels (:mod:`lib.clicks`), and, in ``"dfm"`` mode, the current binary state ``x_t`` as one more channel; a
  sinusoidal embedding of ``t`` added inside every residual block.
* VLM conditioning: FiLM heads ``vlm_film_heads.{stage}`` (one linear layer each, ``h <- h * (1 + scale) + shift``,
  as in CLIPSeg) applied at the decoder stages listed in ``vlm_film_decoder_stages``. Decoder stage 0 is the
  deepest. The head's name carries its stage, so a state dict says by itself which stages it conditions.
* What does not depend on ``(x_t, t)`` -- the VLM embedding and each stage's FiLM scale and shift -- is computed
  once per patch by :meth:`ConditionalUNet.prepare` and reused by every sampler step.
* ``arch="cached"``: the U-Net (encoder, decoder, FiLM) sees the image only, so :meth:`prepare` runs it once per
  window, and also the image half of the step head's first convolution (a convolution is linear:
  ``conv([F, X]) = conv_F(F) + conv_X(X)``). Each sampler step runs only the *step head* at full resolution:
  ``h = act(norm(conv_F(F) + conv_X(x_t) + time))``, a residual convolution block (``step_blocks - 1`` more
  residual blocks if asked), and the 1x1 output. ``arch="unet"``: ``x_t`` enters at the stem and every step runs
  the whole U-Net.

Built from MONAI blocks (``Convolution``, ``UpSample``, MONAI's norm factory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from .config import ModelConfig


@dataclass
class Condition:
    """Everything the network needs besides ``(x_t, t)``: the image, the VLM embedding and its FiLM parameters."""

    image: torch.Tensor
    embedding: torch.Tensor | None = None
    film: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # stage -> (scale, shift), from prepare()
    features: torch.Tensor | None = None  # arch "cached": the image path's output, from prepare()

    def _map(self, fn) -> "Condition":
        film = None if self.film is None else {k: (fn(a), fn(b)) for k, (a, b) in self.film.items()}
        return Condition(fn(self.image), None if self.embedding is None else fn(self.embedding), film,
                         None if self.features is None else fn(self.features))

    def __getitem__(self, idx) -> "Condition":
        return self._map(lambda v: v[idx])

    def repeat_interleave(self, m: int) -> "Condition":
        """Each item ``m`` times in a row (item i's copies at ``i*m .. i*m+m-1``): M samples along the batch axis."""
        return self if m == 1 else self._map(lambda v: v.repeat_interleave(m, dim=0))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as in DDPM-style U-Nets)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _norm(cfg: ModelConfig, channels: int) -> nn.Module:
    name = ("group", {"num_groups": min(8, channels)}) if cfg.norm == "group" else (cfg.norm, {"affine": True})
    return get_norm_layer(name=name, spatial_dims=cfg.spatial_dims, channels=channels)


class ResBlock(nn.Module):
    """conv-norm-act, + time embedding, conv-norm, + skip, act (MONAI ``Convolution`` layers)."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int, temb_dim: int):
        super().__init__()
        sd = cfg.spatial_dims
        self.conv1 = Convolution(sd, cin, cout, kernel_size=3, norm=None, act=None, bias=False)
        self.norm1 = _norm(cfg, cout)
        self.conv2 = Convolution(sd, cout, cout, kernel_size=3, norm=None, act=None, bias=False,
                                 dropout=cfg.dropout or None)
        self.norm2 = _norm(cfg, cout)
        self.act = nn.LeakyReLU(0.1, inplace=False)
        self.temb = nn.Linear(temb_dim, cout) if temb_dim else None
        self.skip = Convolution(sd, cin, cout, kernel_size=1, conv_only=True) if cin != cout else nn.Identity()

    def forward(self, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(h)))
        if self.temb is not None and temb is not None:
            y = y + self.temb(temb).view(*temb.shape[:1], -1, *([1] * (h.ndim - 2)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(h))


class ConditionalUNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        sd, f = cfg.spatial_dims, list(cfg.features)
        self.dfm = cfg.mode == "dfm"
        self.cached = self.dfm and cfg.arch == "cached"
        # click guidance channels (lib.clicks) enter with the image: once per window for arch "cached"
        cin = cfg.in_channels + cfg.guidance_channels + (1 if self.dfm and not self.cached else 0)
        tdim = cfg.time_embed_dim if self.dfm else 0
        if self.dfm:
            self.time_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        step_tdim = tdim
        if self.cached:  # the image path is independent of (x_t, t); the step head gets x_t and t
            tdim = 0
        self.stem = Convolution(sd, cin, f[0], kernel_size=3, conv_only=True)
        self.enc = nn.ModuleList([ResBlock(cfg, f[0], f[0], tdim)])
        self.down = nn.ModuleList()
        for i in range(1, len(f)):
            self.down.append(Convolution(sd, f[i - 1], f[i], strides=2, kernel_size=3, conv_only=True))
            self.enc.append(ResBlock(cfg, f[i], f[i], tdim))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        self.stage_channels: list[int] = []
        for s in range(cfg.num_decoder_stages):
            hi, lo = f[-1 - s], f[-2 - s]
            self.up.append(UpSample(sd, hi, lo, scale_factor=2, mode="deconv"))
            self.dec.append(ResBlock(cfg, 2 * lo, lo, tdim))
            self.stage_channels.append(lo)
        self.head = Convolution(sd, f[0], 1, kernel_size=1, conv_only=True)
        self.act = nn.LeakyReLU(0.1, inplace=False)
        if self.cached:
            self.step_image = Convolution(sd, f[0], f[0], kernel_size=3, conv_only=True)  # once per window
            self.step_xt = Convolution(sd, 1, f[0], kernel_size=3, conv_only=True, bias=False)
            self.step_temb = nn.Linear(step_tdim, f[0])
            self.step_norm = _norm(cfg, f[0])
            self.step_blocks = nn.ModuleList([ResBlock(cfg, f[0], f[0], step_tdim) for _ in range(cfg.step_blocks)])
        self.vlm_film_decoder_stages: list[int] = list(cfg.vlm_film_decoder_stages)
        self.vlm_film_heads = nn.ModuleDict()
        for s in self.vlm_film_decoder_stages:
            head = nn.Linear(cfg.cond_dim, 2 * self.stage_channels[s])
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.vlm_film_heads[str(s)] = head

    # -- what does not depend on (x_t, t): computed once per patch -------------------------------------------
    def prepare(self, image: torch.Tensor, embedding: torch.Tensor | None = None) -> Condition:
        """The per-patch condition: FiLM scale and shift of every conditioned stage, from the VLM embedding."""
        if image.ndim != self.cfg.spatial_dims + 2:
            raise ValueError(
                f"the model is {self.cfg.spatial_dims}D and expects a (batch, channel, "
                f"{'H, W' if self.cfg.spatial_dims == 2 else 'H, W, D'}) image; got shape {tuple(image.shape)}"
            )
        want = self.cfg.in_channels + self.cfg.guidance_channels
        if image.shape[1] != want:
            extra = f" + {self.cfg.guidance_channels} click-guidance" if self.cfg.guidance_channels else ""
            raise ValueError(f"the model expects {self.cfg.in_channels} image{extra} channel(s); got {image.shape[1]}")
        film = None
        if self.vlm_film_decoder_stages:
            if embedding is None:
                raise ValueError("this model is VLM-conditioned: a conditioning embedding is required")
            if embedding.shape != (image.shape[0], self.cfg.cond_dim):
                raise ValueError(
                    f"conditioning embedding must have shape (batch={image.shape[0]}, {self.cfg.cond_dim}); "
                    f"got {tuple(embedding.shape)}"
                )
            film = {}
            for s in self.vlm_film_decoder_stages:
                scale, shift = self.vlm_film_heads[str(s)](embedding).chunk(2, dim=-1)
                film[s] = (scale, shift)
        cond = Condition(image=image, embedding=embedding, film=film)
        if self.cached:
            cond.features = self.step_image(self._unet(image, None, cond.film))
        return cond

    def _time(self, t, b: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        return self.time_mlp(timestep_embedding(t, self.cfg.time_embed_dim))

    def forward(self, x_t: torch.Tensor | None, t: torch.Tensor | float | None, cond: Condition) -> torch.Tensor:
        if (cond.film is None and self.vlm_film_decoder_stages) or (self.cached and cond.features is None):
            cond = self.prepare(cond.image, cond.embedding)
        image = cond.image
        b = image.shape[0]
        if not self.dfm:
            return self.head(self._unet(image, None, cond.film))
        if x_t is None or t is None:
            raise ValueError("a 'dfm' model needs x_t and t")
        temb = self._time(t, b, image.device)
        if self.cached:  # the step head: everything else ran once per window in prepare()
            feats = cond.features
            shape = (b, -1) + (1,) * self.cfg.spatial_dims
            h = feats + self.step_xt(x_t.to(feats.dtype)) + self.step_temb(temb).view(shape)
            h = self.act(self.step_norm(h))
            for block in self.step_blocks:
                h = block(h, temb)
            return self.head(h)
        return self.head(self._unet(torch.cat([image, x_t.to(image.dtype)], dim=1), temb, cond.film))

    def _unet(self, h: torch.Tensor, temb: torch.Tensor | None, film) -> torch.Tensor:
        """Encoder-decoder with FiLM at the conditioned decoder stages; full-resolution features (no head)."""
        b = h.shape[0]
        h = self.enc[0](self.stem(h), temb)
        skips = [h]
        for down, block in zip(self.down, self.enc[1:]):
            h = block(down(h), temb)
            skips.append(h)
        h = skips.pop()
        for s, (up, block) in enumerate(zip(self.up, self.dec)):
            h = up(h)
            skip = skips.pop()
            h = block(torch.cat([h, skip], dim=1), temb)
            if film is not None and s in film:
                scale, shift = film[s]
                shape = (b, -1) + (1,) * self.cfg.spatial_dims
                h = h * (1 + scale.view(shape)) + shift.view(shape)
        return h


def build_model(cfg: ModelConfig) -> ConditionalUNet:
    return ConditionalUNet(cfg)
