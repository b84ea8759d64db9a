"""Binary discrete flow matching on the mixture path (the *path* and *scheduler* pieces).

Path (Gat et al. 2024; Meta's ``flow_matching`` ``MixtureDiscreteProbPath``): per voxel ``x0 ~ Bernoulli(p0)``,
``u ~ U(0, 1)``, ``x_t = x1`` where ``u < kappa(t)``, else ``x0``.

Training objective (the contract): ``logits = model(x_t, t, cond)``, ``loss = BCEWithLogits(logits, x1)``. An
auxiliary soft-Dice term can be added with ``FlowConfig.dice_weight`` (default 0: the contract alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from .config import FlowConfig


class PolynomialScheduler:
    """kappa(t) = t**n (n = 1: the linear scheduler kappa(t) = t)."""

    def __init__(self, exponent: float = 1.0):
        if exponent <= 0:
            raise ValueError(f"scheduler exponent must be > 0, got {exponent}")
        self.n = float(exponent)

    def kappa(self, t: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float32) ** self.n

    def d_kappa(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        return self.n * t ** (self.n - 1) if self.n != 1 else torch.ones_like(t)

    def __repr__(self) -> str:
        return f"PolynomialScheduler(exponent={self.n:g})"


def LinearScheduler() -> PolynomialScheduler:  # noqa: N802 - a named scheduler, like diffusers'
    return PolynomialScheduler(1.0)


def make_scheduler(cfg: FlowConfig) -> PolynomialScheduler:
    cfg = cfg.resolved()
    return LinearScheduler() if cfg.scheduler == "linear" else PolynomialScheduler(cfg.exponent)


def uniform(shape, generator=None, device=None) -> torch.Tensor:
    """U(0, 1) of ``shape`` from a ``torch.Generator`` or from per-item streams (``lib.samplers.ItemNoise``: one
    stream per batch item, so an item's draws do not depend on the batch it is in)."""
    if hasattr(generator, "rand"):
        return generator.rand(tuple(shape)).to(device)
    return torch.rand(shape, generator=generator, device=device)


def sample_source(shape, source_p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """x0: independent Bernoulli(source_p) voxels, as a float tensor of 0/1."""
    u = uniform(shape, generator, device)
    return (u < source_p).float()


class MixtureBinaryPath:
    def __init__(self, scheduler: PolynomialScheduler, source_p: float = 0.5):
        self.scheduler = scheduler
        self.source_p = float(source_p)

    def sample(self, x1: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t for a batch: ``t`` has one value per batch item."""
        x1 = x1.float()
        x0 = sample_source(x1.shape, self.source_p, generator, x1.device)
        kappa = self.scheduler.kappa(t).to(x1.device).view(-1, *([1] * (x1.ndim - 1)))
        u = uniform(x1.shape, generator, x1.device)
        return torch.where(u < kappa, x1, x0)


def flow_loss(logits: torch.Tensor, x1: torch.Tensor, dice_weight: float = 0.0) -> torch.Tensor:
    """BCEWithLogits(logits, x1) [+ dice_weight * soft Dice on sigmoid(logits)]."""
    loss = F.binary_cross_entropy_with_logits(logits, x1.float())
    if dice_weight:
        loss = loss + dice_weight * DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, x1.float())
    return loss


def training_step(model, cond, x1: torch.Tensor, flow: FlowConfig, generator: torch.Generator | None = None,
                  dfm: bool | None = None, info: dict | None = None) -> torch.Tensor:
    """One loss evaluation: draw ``t`` and ``x_t`` per patch, ``logits = model(x_t, t, cond)``, BCE on ``x1``.

    A ``"plain"`` model (the baseline) ignores ``x_t`` and ``t``; its loss is the same BCE on ``x1``. ``dfm``
    defaults to ``model.dfm`` (pass it when ``model`` is wrapped, e.g. in DistributedDataParallel). ``info``: filled
    with each patch's ``t`` and its own BCE (``item_bce``, detached; their mean is the BCE of the batch), which the
    training loop's hard-image sampling reads (:class:`lib.training.HardImageSampler`).
    """
    dfm = getattr(model, "dfm", True) if dfm is None else dfm
    t = None
    if dfm:
        path = MixtureBinaryPath(make_scheduler(flow), flow.source_p)
        t = uniform((x1.shape[0],), generator, x1.device)
        # a soft target (PreprocConfig.soft_label: the foreground fraction of each voxel) is the BCE target; the
        # state x_t reveals its binary truth (fraction > 0.5), as a binary label's state reveals the label
        x_t = path.sample((x1 > 0.5).float(), t, generator)
        logits = model(x_t, t, cond)
    else:
        logits = model(None, None, cond)
    if info is not None:
        with torch.no_grad():
            per = F.binary_cross_entropy_with_logits(logits.float(), x1.float(), reduction="none")
            info["item_bce"] = per.flatten(1).mean(1).detach()
            info["t"] = (t if t is not None else torch.ones(x1.shape[0], device=x1.device)).detach()
    return flow_loss(logits, x1, flow.dice_weight)
