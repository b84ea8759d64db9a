"""The mixture path, the training objective and both samplers (incl. the regression for the earlier sampler bug)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib.config import FlowConfig
from lib.flow import LinearScheduler, MixtureBinaryPath, PolynomialScheduler, make_scheduler, training_step
from lib.samplers import nfe_of, run_sampler, sampler_dfm_euler, sampler_dfm_heun

SAMPLERS = [sampler_dfm_euler, sampler_dfm_heun]


def test_schedulers():
    lin, cub = LinearScheduler(), PolynomialScheduler(3)
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(lin.kappa(t), t)
    assert torch.allclose(cub.kappa(t), t ** 3)
    assert torch.allclose(cub.d_kappa(t), 3 * t ** 2)
    assert make_scheduler(FlowConfig(scheduler="linear")).n == 1.0
    assert make_scheduler(FlowConfig(scheduler="polynomial", exponent=3)).n == 3.0
    # an exponent whose kappa(t) rounds to 1 in float32 before t = 1 broke the Heun sampler at the first request
    from lib.config import MIN_EXPONENT, ConfigError
    from lib.samplers import time_grid

    for bad in (0, -1, 1e-9, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="exponent must be a finite number >= 0.001"):
            FlowConfig(scheduler="polynomial", exponent=bad).resolved()
    grid = time_grid(256)[:-1]
    assert bool((PolynomialScheduler(MIN_EXPONENT).kappa(grid) < 1).all())


@pytest.mark.parametrize("kappa_n", [1.0, 3.0])
def test_mixture_path_marginals(kappa_n):
    g = torch.Generator().manual_seed(0)
    path = MixtureBinaryPath(PolynomialScheduler(kappa_n), source_p=0.5)
    x1 = (torch.rand(64, 1, 32, 32, generator=g) < 0.3).float()
    for t in (0.0, 0.4, 0.8, 1.0):
        xt = path.sample(x1, torch.full((64,), t), g)
        assert set(xt.unique().tolist()) <= {0.0, 1.0}
        k = t ** kappa_n
        agree = (xt == x1).float().mean().item()
        assert abs(agree - (k + (1 - k) * 0.5)) < 0.01, (t, agree)
    assert torch.equal(path.sample(x1, torch.ones(64), g), x1)
    # the source is configurable: p0 = 0 means x_t only ever turns voxels ON where x1 is 1
    xt = MixtureBinaryPath(PolynomialScheduler(1), source_p=0.0).sample(x1, torch.full((64,), 0.5), g)
    assert (xt <= x1).all()


class Spy(torch.nn.Module):
    """A 'model' that records its inputs and returns fixed logits."""

    dfm = True

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.calls = []

    def forward(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone(), cond))
        return self.logits


def test_training_objective_is_bce_on_x1_logits():
    torch.manual_seed(0)
    x1 = (torch.rand(4, 1, 8, 8) < 0.5).float()
    logits = torch.randn(4, 1, 8, 8)
    spy = Spy(logits)
    cond = object()
    loss = training_step(spy, cond, x1, FlowConfig(scheduler="linear"))
    (x_t, t, c), = spy.calls
    assert c is cond and t.shape == (4,) and ((t >= 0) & (t <= 1)).all()
    assert set(x_t.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, x1))
    # the optional auxiliary Dice term is off by default and adds to the BCE when asked for
    loss_d = training_step(Spy(logits), cond, x1, FlowConfig(scheduler="linear", dice_weight=1.0))
    assert loss_d > loss


def test_training_draws_t_uniform_and_x_t_from_the_path_at_that_t():
    """The state the network is trained on is the path's at the ``t`` it is told: per patch, the share of x_t equal
    to x1 is kappa(t) + (1 - kappa(t)) * P(x0 = x1), and t covers [0, 1] uniformly (a check of the core's guards,
    2026-12-07: x_t drawn at t / 2 while the network was told t passed the flow tests)."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.ones(512, 1, 32, 32)  # all foreground: P(x0 = x1) = source_p
    spy = Spy(torch.zeros(512, 1, 32, 32))
    flow = FlowConfig(scheduler="polynomial", exponent=2.0, source_p=0.5)
    training_step(spy, object(), x1, flow, generator=g)
    (x_t, t, _), = spy.calls
    assert float(t.min()) < 0.02 and float(t.max()) > 0.98 and abs(float(t.mean()) - 0.5) < 0.04
    kappa = t ** 2
    share = x_t.flatten(1).mean(1)
    assert torch.allclose(share, kappa + (1 - kappa) * 0.5, atol=0.06), float((share - kappa - (1 - kappa) / 2).abs().max())


def image_model(steep=False, x_gain=0.0):
    """Posterior depends on the image only: p = sigmoid(4 * (image - 0.5)); at t = 1 it copies x (as trained nets do)
    unless ``steep`` is False, in which case it stays the image posterior (an 'ambiguous' model). ``x_gain``: the
    state moves the logit too (``+ x_gain * (2x - 1)``), so that each step's posterior differs from the last."""
    calls = []

    def fn(x, t, cond):
        calls.append(float(t[0]))
        logit = 4.0 * (cond - 0.5) + x_gain * (2 * x - 1)
        if steep and float(t[0]) == 1.0:
            return 8.0 * (2 * x - 1)
        return logit.expand_as(x)

    return fn, calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_returns_p_final_probability_not_a_state(sampler):
    """Regression for the earlier system: a sampler that returned the binary state or an intermediate posterior.
    The model reads the state (a review: one that ignored it gave every posterior the same, so returning the last
    posterior passed)."""
    fn, calls = image_model(x_gain=1.5)
    cond = torch.linspace(0, 1, 64).view(1, 1, 8, 8)  # 0.5 in the middle: ambiguous voxels
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(1, 1, 8, 8, generator=g) < 0.5).float()
    trace = {}
    p = sampler(fn, cond, x0, 4, PolynomialScheduler(2), generator=g, trace=trace)
    assert calls[-1] == 1.0, "p_final must come from the network evaluated at t = 1"
    assert trace["nfe"] == len(calls)
    assert p.min() >= 0 and p.max() <= 1
    non_binary = ((p > 0.01) & (p < 0.99)).float().mean()
    assert non_binary > 0.5, "an ambiguous input must give a probability map, not a binarised one"
    expected = torch.sigmoid(fn(trace["x_final"], torch.ones(1), cond))
    assert torch.allclose(p, expected)
    assert not torch.equal(p, trace["x_final"]), "returned the binary state instead of p_final"
    assert not torch.allclose(p, trace["last_posterior"], atol=1e-3), "returned an intermediate posterior"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_with_copying_network_at_t1(sampler):
    """A network that copies its input at t = 1 (what the mixture path teaches) gives a nearly binary p_final equal
    to the final state -- still sigmoid(model(x, 1)), and the final state is a posterior sample."""
    fn, _ = image_model(steep=True)
    cond = torch.full((1, 1, 64, 64), 0.5 + math.log(0.7 / 0.3) / 4)  # posterior p = 0.7 before t = 1
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(1, 1, 64, 64, generator=g) < 0.5).float()
    trace = {}
    p = sampler(fn, cond, x0, 5, PolynomialScheduler(2), generator=g, trace=trace)
    assert torch.allclose(p, torch.sigmoid(8.0 * (2 * trace["x_final"] - 1)))
    assert not torch.allclose(p, trace["last_posterior"], atol=0.1), "returned an intermediate posterior"
    assert abs(trace["x_final"].mean().item() - 0.7) < 0.03  # x_1 ~ Bernoulli(posterior)


def test_last_step_lands_on_a_posterior_sample():
    """alpha = 1 on the last step: no source-noise voxel survives to t = 1, whatever the scheduler."""
    fn = lambda x, t, c: torch.full_like(x, 30.0)  # posterior p = 1 everywhere  # noqa: E731
    for n in (1.0, 3.0):
        for sampler in SAMPLERS:
            trace = {}
            x0 = torch.zeros(1, 1, 16, 16)
            sampler(fn, None, x0, 3, PolynomialScheduler(n), generator=torch.Generator().manual_seed(0), trace=trace)
            assert trace["x_final"].min() == 1.0


def test_samplers_are_reproducible_with_a_seeded_generator():
    """With a network whose posterior depends on x_t (a model that ignores x_t would make any seed look
    reproducible): the same seed gives the same output, another seed another one."""
    def fn(x, t, cond):
        return 4.0 * (cond - 0.5) + 1.5 * (2 * x - 1)

    cond = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    for name in ("euler", "heun"):
        for output in ("p_final", "last_posterior"):
            run = [run_sampler(name, fn, cond, (1, 1, 16, 16), 4, PolynomialScheduler(2), output=output,
                               generator=torch.Generator().manual_seed(s))[0] for s in (7, 7, 8)]
            assert torch.equal(run[0], run[1])
            assert (run[0] - run[2]).abs().max() > 0.1, (name, output)


def test_network_evaluations_per_sampler():
    """Euler K + 1; theta-trapezoidal 2 per step but the last (an exact Euler jump) + 1 for p_final = 2K."""
    for name, steps in (("euler", 5), ("heun", 5), ("heun", 1)):
        fn, calls = image_model()
        run_sampler(name, fn, torch.rand(1, 1, 4, 4), (1, 1, 4, 4), steps, PolynomialScheduler(2),
                    generator=torch.Generator().manual_seed(0))
        assert len(calls) == nfe_of(name, steps)


def test_mean_and_variance_of_m_samples():
    fn, _ = image_model(steep=True)
    cond = torch.full((1, 1, 32, 32), 0.5)  # posterior 0.5 everywhere
    mean, var = run_sampler("euler", fn, cond, (1, 1, 32, 32), 3, PolynomialScheduler(2), num_samples=16,
                            generator=torch.Generator().manual_seed(0))
    assert abs(mean.mean().item() - 0.5) < 0.05
    assert var is not None and var.mean().item() > 0.15  # ~ p (1 - p) for a copying network
    one, none = run_sampler("euler", fn, cond, (1, 1, 32, 32), 3, PolynomialScheduler(2), num_samples=1,
                            generator=torch.Generator().manual_seed(0))
    assert none is None
    with pytest.raises(ValueError, match="unknown sampler"):
        run_sampler("rk4", fn, cond, (1, 1, 32, 32), 3, PolynomialScheduler(2))


def _chain_error(step, steps: int, n: int = 1_000_000, horizon: float = 0.9, seed: int = 0) -> float:
    """Error of P(x = 1) at t = horizon after ``steps`` sampler steps on a chain with a known solution.

    One voxel per batch item, posterior p(x, t) = sigmoid(-1.5 + 2.5 x + t): it depends on the state and on time,
    so a scheme that freezes it over a step (Euler) is first order. The exact marginal solves the master equation
    dP/ds = (1 - P) p(0, t(s)) - P (1 - p(1, t(s))) on the clock s = -log(1 - kappa(t)) (RK4, fine grid).
    """
    from lib.samplers import _clock, _time_of_clock

    sched = PolynomialScheduler(2.0)

    def p(x, t):
        return 1.0 / (1.0 + math.exp(-(-1.5 + 2.5 * x + t)))

    def f(s, q):
        t = _time_of_clock(sched, s)
        return (1 - q) * p(0, t) - q * (1 - p(1, t))

    m, s, q = 4000, 0.0, 0.5
    h = _clock(sched, horizon) / m
    for _ in range(m):
        k1 = f(s, q)
        k2 = f(s + h / 2, q + h / 2 * k1)
        k3 = f(s + h / 2, q + h / 2 * k2)
        k4 = f(s + h, q + h * k3)
        q, s = q + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h

    def fn(x, t, cond):
        return -1.5 + 2.5 * x + t.view(-1, 1)

    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, generator=g) < 0.5).float()
    grid = torch.linspace(0, horizon, steps + 1).tolist()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x, _ = step(fn, x, t0, t1, None, sched, g)
    return abs(x.mean().item() - q)


def test_heun_is_the_second_order_theta_trapezoidal_method():
    """The trapezoidal error drops ~4x per halved step (second order), Euler's ~2x; at equal network evaluations
    (trapezoidal K steps = 2K, Euler 2K steps) the trapezoidal error is several times smaller. The earlier "Heun"
    (posteriors averaged, jump from x again) fails this: 0.036 / 0.014 at 2 / 4 steps, a ratio of 2.6.
    Monte Carlo noise: std 5e-4 with 1e6 voxels."""
    from lib.samplers import euler_step, trapezoidal_step

    trap = {k: _chain_error(trapezoidal_step, k) for k in (2, 4)}
    euler = {k: _chain_error(euler_step, k) for k in (2, 4, 8)}
    assert trap[2] < 0.015 and trap[4] < 0.005, trap
    assert trap[2] / trap[4] > 3.0, f"not second order: {trap}"
    assert 1.5 < euler[2] / euler[4] < 2.5 and 1.5 < euler[4] / euler[8] < 2.5, f"Euler is first order: {euler}"
    assert trap[2] < euler[4] / 3 and trap[4] < euler[8] / 3, (trap, euler)


def test_item_noise_makes_each_item_independent_of_the_batch():
    from lib.samplers import ItemNoise

    a = ItemNoise([11, 12, 13]).rand((3, 1, 4, 4))
    b = ItemNoise([13, 11]).rand((2, 1, 4, 4))
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="noise streams"):
        ItemNoise([1, 2]).rand((3, 4))
