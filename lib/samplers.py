"""DFM samplers (the *solver* piece): independent of the network, like diffusers' schedulers.

Both samplers start at ``x0`` (Bernoulli source), step over the time grid ``0 = t_0 < ... < t_K = 1`` and return

    p_final = sigmoid(model_fn(x, t=1, cond))

a probability map in [0, 1]. Nothing is binarised here: thresholding belongs to evaluation and post-processing.

The chain. One voxel, posterior ``p = sigmoid(logits) = P(x1 = 1 | x_t, image)``. On the mixture path the rate from
state 0 to 1 is ``c p`` and from 1 to 0 is ``c (1 - p)`` with ``c = kappa'/(1 - kappa)``. In the clock
``s = -log(1 - kappa(t))`` the rate factor is 1: from state ``x`` the voxel leaves with intensity
``q(x) = p if x = 0 else 1 - p``.

* ``sampler_dfm_euler`` (first order): the posterior at the start of each step, held over the step; a voxel flips
  with probability ``alpha q``, ``alpha = 1 - exp(-(s(t + h) - s(t))) = (kappa(t + h) - kappa(t)) / (1 - kappa(t))``:
  the exact solution of the two-state chain with the posterior frozen (Euler for kappa = t). K network evaluations
  + 1 for ``p_final``.
* ``sampler_dfm_heun`` (second order): the theta-trapezoidal tau-leaping method (Hu, Li & Min 2011 for chemical
  kinetics; Ren et al. 2025, "Fast solvers for discrete diffusion models", with a second-order error bound for
  discrete diffusion), theta = 1/2 by default. Step of clock length ``D`` from ``x``:

  1. predictor: ``y* = x`` with flips of intensity ``theta D q(x; p(x, t))`` (posterior at ``x``);
  2. corrector, from ``y*``: intensity ``(1 - theta) D (a1 mu(y*) - a2 mu(x))_+`` for each jump direction, with
     ``a1 = 1 / (2 theta (1 - theta))``, ``a2 = ((1 - theta)^2 + theta^2) / (2 theta (1 - theta))`` (a1 - a2 = 1),
     ``mu(y*)`` the rate at ``y*`` (posterior at ``(y*, t + theta h)``) and ``mu(x)`` the rate of the *same
     direction* at ``x``. For a binary voxel the only direction open at ``y*`` is the flip away from ``y*``: where
     the predictor did not flip it, ``mu(x)`` is the same direction's rate at ``x``; where it flipped, the direction
     back is closed at ``x`` (rate 0), so the corrector may only undo a flip with intensity ``a1 (1 - theta) D``
     times its posterior -- it never re-uses the old posterior to undo it (what the earlier "Heun" did).

  Flip probability for intensity ``L``: ``1 - exp(-L)`` (a tau-leap; two events on a binary voxel count as one).
  The last step (``s`` infinite at t = 1) is the exact Euler jump with ``alpha = 1``: ``x`` becomes a sample of
  the last posterior, as in Meta's solver. Cost: 2 (K - 1) + 1 evaluations + 1 for ``p_final`` = 2K.
  ``tests/test_flow_samplers.py`` shows the order on a chain with a known solution; ``bench/sampler_bench.py``
  compares both at equal network evaluations on real images.

Randomness. ``generator`` is either a ``torch.Generator`` (one stream for the whole batch) or a
:class:`ItemNoise` (one stream per batch item: results of an item do not depend on what else is in the batch).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch

from .flow import PolynomialScheduler

ModelFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class ItemNoise:
    """Independent random streams, one per batch item, each seeded by its own integer seed (CPU generators, so a
    seed gives the same numbers on every device); ``rand(shape)`` draws ``shape[1:]`` from each stream."""

    def __init__(self, seeds: Sequence[int], device=None):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, shape) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} noise streams for a batch of {shape[0]}")
        out = torch.stack([torch.rand(tuple(shape[1:]), generator=g) for g in self.generators])
        return out.to(self.device) if self.device is not None else out


def mean_var(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance over ``dim``, two passes. ``Tensor.var`` over the sample axis of
    ``(windows, samples, 1, *patch)`` took 3.4 ms for 4 x 8 windows of 96^2 and 39 ms for 4 x 4 of 48^3 on this
    CPU, 30-40x the two passes (the same values to 3e-8): 5 % of a whole 8 x 2 prediction call."""
    m = x.mean(dim)
    return m, (x - m.unsqueeze(dim)).square().mean(dim)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and machines)."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2 ** 63 - 1)


def _rand(shape, generator, device) -> torch.Tensor:
    if isinstance(generator, ItemNoise):
        return generator.rand(shape).to(device)
    return torch.rand(shape, generator=generator, device=device)


def sample_source_like(shape, source_p: float, generator, device=None) -> torch.Tensor:
    return (_rand(shape, generator, device) < source_p).float()


def time_grid(steps: int, device=None) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def _clock(scheduler: PolynomialScheduler, t: float) -> float:
    """s(t) = -log(1 - kappa(t)) (infinite at kappa = 1)."""
    k = float(scheduler.kappa(t))
    return math.inf if k >= 1.0 else -math.log1p(-k)


def _time_of_clock(scheduler: PolynomialScheduler, s: float) -> float:
    return float((-math.expm1(-s)) ** (1.0 / scheduler.n))


def _alpha(scheduler: PolynomialScheduler, t: float, t_next: float) -> float:
    k, k_next = float(scheduler.kappa(t)), float(scheduler.kappa(t_next))
    if k >= 1.0:
        return 1.0
    return min(1.0, max(0.0, (k_next - k) / (1.0 - k)))


def _leave(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """q(x): the probability term of the rate of leaving state x (p from 0, 1 - p from 1)."""
    return torch.where(x > 0.5, 1.0 - p, p)


def _flip(x: torch.Tensor, prob: torch.Tensor, generator) -> torch.Tensor:
    flip = _rand(x.shape, generator, x.device) < prob
    return torch.where(flip, 1.0 - x, x)


def _jump(x: torch.Tensor, p: torch.Tensor, alpha: float, generator) -> torch.Tensor:
    return _flip(x, alpha * _leave(x, p), generator)


def _posterior(model_fn: ModelFn, x: torch.Tensor, t: float, cond) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    return torch.sigmoid(model_fn(x, tt, cond).float())


def _finish(model_fn, x, cond, trace, p_last, nfe):
    p_final = _posterior(model_fn, x, 1.0, cond)
    if trace is not None:
        trace.update(last_posterior=p_last, x_final=x, nfe=nfe + 1)
    return p_final


def euler_step(model_fn: ModelFn, x, t: float, t_next: float, cond, scheduler, generator):
    """One exact-jump Euler step; returns (x_next, posterior used)."""
    p = _posterior(model_fn, x, t, cond)
    return _jump(x, p, _alpha(scheduler, t, t_next), generator), p


def trapezoidal_step(model_fn: ModelFn, x, t: float, t_next: float, cond, scheduler, generator,
                     theta: float = 0.5, hold: torch.Tensor | None = None):
    """One theta-trapezoidal step on the clock s (see the module docstring); needs kappa(t_next) < 1.

    Returns (x_next, posterior at x)."""
    s0, s1 = _clock(scheduler, t), _clock(scheduler, t_next)
    if not math.isfinite(s1):
        raise ValueError("the theta-trapezoidal step needs t_next < 1 (the last step is an exact Euler jump)")
    d = s1 - s0
    a1 = 1.0 / (2.0 * theta * (1.0 - theta))
    a2 = ((1.0 - theta) ** 2 + theta ** 2) / (2.0 * theta * (1.0 - theta))
    p = _posterior(model_fn, x, t, cond)
    q_x = _leave(x, p)
    y = _hold(_flip(x, -torch.expm1(-theta * d * q_x), generator), hold)
    p_star = _posterior(model_fn, y, _time_of_clock(scheduler, s0 + theta * d), cond)
    same_dir = torch.where(y == x, q_x, torch.zeros_like(q_x))  # the direction away from y* is closed at x if flipped
    lam = ((a1 * _leave(y, p_star) - a2 * same_dir).clamp_min(0.0)) * ((1.0 - theta) * d)
    return _flip(y, -torch.expm1(-lam), generator), p


def _hold(x: torch.Tensor, hold: torch.Tensor | None) -> torch.Tensor:
    """Voxels the user clicked are *known*: ``hold (B, 2, ...)`` = (mask, value) sets them in every state, and in
    ``p_final`` (the posterior of a known voxel is its value: the network's output there would overrule the
    click -- on BraTS it left 38 % of a held region below 0.5)."""
    if hold is None:
        return x
    return torch.where(hold[:, :1] > 0.5, hold[:, 1:2].to(x.dtype), x)


def sampler_dfm_euler(model_fn: ModelFn, cond, x0: torch.Tensor, steps: int, scheduler: PolynomialScheduler,
                      generator=None, trace: dict | None = None, hold: torch.Tensor | None = None) -> torch.Tensor:
    """First-order sampler; returns ``p_final = sigmoid(model_fn(x, t=1, cond))``.

    ``trace``, when a dict is given, receives ``last_posterior`` (the posterior at the last grid point before
    t = 1), ``x_final`` (the binary state at t = 1) and ``nfe`` (network evaluations), for benchmarks.
    ``hold``: ``(B, 2, ...)`` mask and value of voxels held fixed in ``x`` at every step and in ``p_final``
    (clicks, lib.clicks).
    """
    grid = time_grid(steps).tolist()
    x = _hold(x0.float(), hold)
    p = None
    for t, t_next in zip(grid[:-1], grid[1:]):
        x, p = euler_step(model_fn, x, t, t_next, cond, scheduler, generator)
        x = _hold(x, hold)
    return _hold(_finish(model_fn, x, cond, trace, p, steps), hold)


def sampler_dfm_heun(model_fn: ModelFn, cond, x0: torch.Tensor, steps: int, scheduler: PolynomialScheduler,
                     generator=None, trace: dict | None = None, theta: float = 0.5,
                     hold: torch.Tensor | None = None) -> torch.Tensor:
    """Second-order theta-trapezoidal sampler (module docstring); the last step is the exact Euler jump.
    ``hold``: as for :func:`sampler_dfm_euler` (applied to every state, the predictor's included)."""
    grid = time_grid(steps).tolist()
    x = _hold(x0.float(), hold)
    nfe = 0
    p = None
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if i == steps - 1:
            x, p = euler_step(model_fn, x, t, t_next, cond, scheduler, generator)
            nfe += 1
        else:
            x, p = trapezoidal_step(model_fn, x, t, t_next, cond, scheduler, generator, theta, hold)
            nfe += 2
        x = _hold(x, hold)
    return _hold(_finish(model_fn, x, cond, trace, p, nfe), hold)


SAMPLER_FUNCTIONS = {"euler": sampler_dfm_euler, "heun": sampler_dfm_heun}


def nfe_of(sampler: str, steps: int) -> int:
    """Network evaluations of one sampler run, p_final included."""
    return steps + 1 if sampler == "euler" else 2 * steps


def sampler_function(name: str):
    try:
        return SAMPLER_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLER_FUNCTIONS)}") from None


def run_sampler(name: str, model_fn: ModelFn, cond, shape, steps: int, scheduler: PolynomialScheduler,
                source_p: float = 0.5, num_samples: int = 1, generator=None,
                device=None, output: str = "p_final") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num_samples`` sampler runs from fresh x0, one after another; ``(mean, variance)`` of their output.

    A reference for tests: prediction batches the samples (:meth:`lib.inferer.DFMSystem.predict_windows`).
    ``output``: ``p_final`` (the contract) or ``last_posterior`` (benchmarks). The variance is None for one sample.
    """
    fn = sampler_function(name)
    outs = []
    for _ in range(num_samples):
        x0 = sample_source_like(shape, source_p, generator, device)
        trace: dict = {}
        p_final = fn(model_fn, cond, x0, steps, scheduler, generator=generator, trace=trace)
        outs.append(trace["last_posterior"] if output == "last_posterior" else p_final)
    if num_samples == 1:
        return outs[0], None
    return mean_var(torch.stack(outs), 0)  # the statistics predict_windows computes
