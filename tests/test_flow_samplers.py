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


def image_model(steep=False):
    """Posterior depends on the image only: p = sigmoid(4 * (image - 0.5)); at t = 1 it copies x (as trained nets do)
    unless ``steep`` is False, in which case it stays the image posterior (an 'ambiguous' model)."""
    calls = []

    def fn(x, t, cond):
        calls.append(float(t[0]))
        logit = 4.0 * (cond - 0.5)
        if steep and float(t[0]) == 1.0:
            return 8.0 * (2 * x - 1)
        return logit.expand_as(x)

    return fn, calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_returns_p_final_probability_not_a_state(sampler):
    """Regression for the earlier system: a sampler that returned the binary state or an intermediate posterior."""
    fn, calls = image_model()
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
    fn, _ = image_model()
    cond = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    for name in ("euler", "heun"):
        a, _ = run_sampler(name, fn, cond, (1, 1, 16, 16), 4, PolynomialScheduler(2),
                           generator=torch.Generator().manual_seed(7), output="last_posterior")
        b, _ = run_sampler(name, fn, cond, (1, 1, 16, 16), 4, PolynomialScheduler(2),
                           generator=torch.Generator().manual_seed(7), output="last_posterior")
        assert torch.equal(a, b)
    fn2, _ = image_model(steep=True)
    a, _ = run_sampler("euler", fn2, cond, (1, 1, 16, 16), 4, PolynomialScheduler(2),
                       generator=torch.Generator().manual_seed(7))
    c, _ = run_sampler("euler", fn2, cond, (1, 1, 16, 16), 4, PolynomialScheduler(2),
                       generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)


def test_network_evaluations_per_sampler():
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
