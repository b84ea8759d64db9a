"""Hard-image sampling (``train.hard_share``): which training images make each batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_hparams
from lib.config import ConfigError, FlowConfig
from lib.flow import training_step
from lib.training import HardImageSampler, ResumeError, load_train_state, train
from test_inputs_evaluation import _phantom_datalist


def test_share_zero_draws_exactly_what_the_uniform_loop_drew():
    """The default keeps the former draw (``rng.choice(n, size, replace=False)``, no ``p``), so runs of earlier
    presets repeat; with a share the draw follows the difficulties."""
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    s = HardImageSampler(20, share=0.0)
    s.update(range(20), np.linspace(0, 1, 20), np.arange(20.0) + 1)  # difficulties that a share would follow
    got = [s.draw(a, 8).tolist() for _ in range(50)]
    assert got == [b.choice(20, size=8, replace=False).tolist() for _ in range(50)]
    h = HardImageSampler(20, share=0.5)
    h.difficulty = s.difficulty.copy()
    c = np.random.default_rng(7)
    assert [h.draw(c, 8).tolist() for _ in range(50)] != got


def test_hard_images_are_drawn_as_often_as_their_probability():
    s = HardImageSampler(10, share=0.5)
    s.difficulty[3] = 9.0  # 9 of the 18 difficulty units: p = 0.05 + 0.5 * 0.5 = 0.30; the others 0.05 + 0.5/18
    p = s.probabilities()
    assert p.sum() == pytest.approx(1.0) and p[3] == pytest.approx(0.30)
    rng = np.random.default_rng(0)
    counts = np.bincount([int(s.draw(rng, 1)[0]) for _ in range(20000)], minlength=10) / 20000
    assert np.abs(counts - p).max() < 0.01, (counts, p)
    # a batch never holds an image twice
    assert all(len(set(s.draw(rng, 8).tolist())) == 8 for _ in range(200))


def test_difficulty_is_the_loss_relative_to_the_same_flow_time():
    """A patch's BCE falls steeply with t (x_t reveals more voxels): an image that happened to draw small t is not
    harder. Image 0 always draws t < 0.2, image 1 always t > 0.8, image 2 has twice the loss of the others at every
    t; only image 2 must come out hard."""
    rng = np.random.default_rng(0)
    s = HardImageSampler(8, share=0.5, decay=0.8)
    for _ in range(400):
        t = rng.uniform(0, 1, 8)
        t[0], t[1] = rng.uniform(0, 0.2), rng.uniform(0.8, 1.0)
        bce = (1 - t) ** 2 + 0.05
        bce[2] *= 2.0
        s.update(range(8), t, bce)
    d = s.difficulty
    others = np.delete(d, 2)
    assert d[2] > 1.6 * np.median(others), d
    assert others.max() < 1.2 * others.min(), d  # small-t and large-t images alike


def test_bad_settings_and_a_state_of_another_dataset_are_refused():
    with pytest.raises(ConfigError, match="hard_share"):
        HardImageSampler(4, share=1.5)
    with pytest.raises(ConfigError, match="hard_decay"):
        HardImageSampler(4, share=0.5, decay=1.0)
    st = HardImageSampler(5, share=0.5).state_dict()
    with pytest.raises(ResumeError, match="5 training images"):
        HardImageSampler(6, share=0.5).load_state_dict(st)


def test_training_step_reports_each_patch_bce_and_t():
    """``info["item_bce"]`` is each patch's own BCE (the hard-image sampler's signal): patch k's value is the BCE
    of patch k alone, and their mean is the batch loss."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        dfm = True

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x_t, t, cond):
            return self.conv(x_t) * (1 + t.view(-1, 1, 1, 1)) + cond

    net = Net()
    x1 = (torch.rand(4, 1, 16, 16) > 0.6).float()
    x1[2] = 1.0  # patches with different losses
    cond = torch.randn(4, 1, 16, 16)
    info: dict = {}
    g = torch.Generator().manual_seed(3)
    loss = training_step(net, cond, x1, FlowConfig(scheduler="polynomial", exponent=2.0), g, info=info)
    assert info["item_bce"].shape == (4,) and info["t"].shape == (4,)
    assert float(info["item_bce"].mean()) == pytest.approx(float(loss), rel=1e-5)
    # repeat the draw: the same t and x_t, then the BCE of each patch on its own
    g = torch.Generator().manual_seed(3)
    from lib.flow import MixtureBinaryPath, make_scheduler, uniform

    t = uniform((4,), g)
    x_t = MixtureBinaryPath(make_scheduler(FlowConfig(scheduler="polynomial", exponent=2.0)), 0.5).sample(x1, t, g)
    assert torch.allclose(info["t"], t)
    logits = net(x_t, t, cond)
    for k in range(4):
        own = F.binary_cross_entropy_with_logits(logits[k], x1[k])
        assert float(info["item_bce"][k]) == pytest.approx(float(own), rel=1e-5), k
    assert len({round(float(v), 4) for v in info["item_bce"]}) == 4


def test_training_with_a_share_learns_difficulties_and_saves_them(tmp_path, tiny_clip):
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.train.hard_share = 0.5
    from lib.data import load_datalist

    dl = _phantom_datalist(tmp_path)
    tr, va = load_datalist(dl, "training"), load_datalist(dl, "validation")
    train(hp, tr, va, tmp_path / "run", max_iterations=12, progress=False)
    st = load_train_state(tmp_path / "run" / "resume.pt")
    d = np.asarray(st["hard_images"]["difficulty"])
    assert d.shape == (6,) and not np.allclose(d, 1.0)  # every image was drawn (2 per batch, 12 batches) and scored
    saved = json.loads((tmp_path / "run" / "hard_images.json").read_text())
    assert sorted(saved) == sorted(t["case_id"] for t in tr)
    assert sorted(saved.values()) == pytest.approx(sorted(np.round(d, 4).tolist()))
