"""DFM samplers (the *solver* piece): independent of the network, like diffusers' schedulers.

Both samplers start at ``x0`` (Bernoulli source), step over the time grid ``0 = t_0 < ... < t_K = 1`` and return

    p_final = sigmoid(model_fn(x, t=1, cond))

a probability map in [0, 1]. Nothing is binarised here: thresholding belongs to evaluation and post-processing.

Jump rule (one voxel, posterior ``p = sigmoid(logits) = P(x1 = 1 | x_t, image)``). On the mixture path the rate
from state 0 to 1 is ``c p`` and from 1 to 0 is ``c (1 - p)`` with ``c = kappa'/(1 - kappa)``. Over a step
``t -> t + h`` with the posterior held fixed, a voxel flips with probability

    alpha(t, h) * q,   alpha = (kappa(t + h) - kappa(t)) / (1 - kappa(t)),   q = p if x = 0 else 1 - p

which is the Euler value ``h c q`` for kappa = t and integrates the scheduler exactly for kappa = t**n. On the
last step ``alpha = 1``: x becomes a sample of the last posterior (what Meta's solver does at the last grid point),
so no voxel of the source noise survives to t = 1.

* ``sampler_dfm_euler``: the posterior at the start of each step (K network evaluations + 1 for p_final).
* ``sampler_dfm_heun``: predictor-corrector (Heun / explicit trapezoid on the rate). Predictor: an Euler jump with
  ``p1 = posterior(x, t)`` gives a binary proposal ``x~`` at ``t + h``; corrector: ``p2 = posterior(x~, t + h)``;
  the actual jump from ``x`` uses ``(p1 + p2) / 2`` with fresh randomness. The proposal stays binary (the network
  never saw soft ``x_t``). The last step is a plain Euler step, as in EDM's Heun sampler, because the corrector
  would need the network at t = 1 where it copies its input. Cost: 2K - 1 evaluations + 1 for p_final.
  ``bench/sampler_bench.py`` compares both at equal network evaluations.
"""

from __future__ import annotations

from typing import Callable

import torch

from .flow import PolynomialScheduler, sample_source

ModelFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def time_grid(steps: int, device=None) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def _alpha(scheduler: PolynomialScheduler, t: float, t_next: float) -> float:
    k, k_next = float(scheduler.kappa(t)), float(scheduler.kappa(t_next))
    if k >= 1.0:
        return 1.0
    return min(1.0, max(0.0, (k_next - k) / (1.0 - k)))


def _jump(x: torch.Tensor, p: torch.Tensor, alpha: float, generator: torch.Generator | None) -> torch.Tensor:
    q = torch.where(x > 0.5, 1.0 - p, p)
    flip = torch.rand(x.shape, generator=generator, device=x.device) < alpha * q
    return torch.where(flip, 1.0 - x, x)


def _posterior(model_fn: ModelFn, x: torch.Tensor, t: float, cond) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    return torch.sigmoid(model_fn(x, tt, cond).float())


def _finish(model_fn, x, cond, trace, p_last, nfe):
    p_final = _posterior(model_fn, x, 1.0, cond)
    if trace is not None:
        trace.update(last_posterior=p_last, x_final=x, nfe=nfe + 1)
    return p_final


def sampler_dfm_euler(model_fn: ModelFn, cond, x0: torch.Tensor, steps: int, scheduler: PolynomialScheduler,
                      generator: torch.Generator | None = None, trace: dict | None = None) -> torch.Tensor:
    """First-order sampler; returns ``p_final = sigmoid(model_fn(x, t=1, cond))``.

    ``trace``, when a dict is given, receives ``last_posterior`` (the posterior at the last grid point before
    t = 1), ``x_final`` (the binary state at t = 1) and ``nfe`` (network evaluations), for benchmarks.
    """
    grid = time_grid(steps).tolist()
    x = x0.float()
    p = None
    for t, t_next in zip(grid[:-1], grid[1:]):
        p = _posterior(model_fn, x, t, cond)
        x = _jump(x, p, _alpha(scheduler, t, t_next), generator)
    return _finish(model_fn, x, cond, trace, p, steps)


def sampler_dfm_heun(model_fn: ModelFn, cond, x0: torch.Tensor, steps: int, scheduler: PolynomialScheduler,
                     generator: torch.Generator | None = None, trace: dict | None = None) -> torch.Tensor:
    """Second-order predictor-corrector sampler (see the module docstring); returns ``p_final``."""
    grid = time_grid(steps).tolist()
    x = x0.float()
    nfe = 0
    p1 = None
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        alpha = _alpha(scheduler, t, t_next)
        p1 = _posterior(model_fn, x, t, cond)
        nfe += 1
        if i == steps - 1:
            x = _jump(x, p1, alpha, generator)
            break
        x_prop = _jump(x, p1, alpha, generator)
        p2 = _posterior(model_fn, x_prop, t_next, cond)
        nfe += 1
        x = _jump(x, 0.5 * (p1 + p2), alpha, generator)
    return _finish(model_fn, x, cond, trace, p1, nfe)


SAMPLER_FUNCTIONS = {"euler": sampler_dfm_euler, "heun": sampler_dfm_heun}


def nfe_of(sampler: str, steps: int) -> int:
    """Network evaluations of one sampler run, p_final included."""
    return steps + 1 if sampler == "euler" else 2 * steps


def run_sampler(name: str, model_fn: ModelFn, cond, shape, steps: int, scheduler: PolynomialScheduler,
                source_p: float = 0.5, num_samples: int = 1, generator: torch.Generator | None = None,
                device=None, output: str = "p_final") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw ``num_samples`` sampler runs from fresh x0 and return ``(mean, variance)`` of their output.

    ``output`` selects what each run contributes: ``p_final`` (the contract), or ``last_posterior`` (benchmarks).
    ``mean`` with num_samples = 1 is that run's output; the variance is ``None`` then.
    """
    try:
        fn = SAMPLER_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLER_FUNCTIONS)}") from None
    outs = []
    for _ in range(num_samples):
        x0 = sample_source(shape, source_p, generator, device)
        trace: dict = {}
        p_final = fn(model_fn, cond, x0, steps, scheduler, generator=generator, trace=trace)
        outs.append(trace["last_posterior"] if output == "last_posterior" else p_final)
    if num_samples == 1:
        return outs[0], None
    stack = torch.stack(outs)
    return stack.mean(0), stack.var(0, unbiased=False)
