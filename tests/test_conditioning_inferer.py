"""One conditioning function for training patches and inference windows; sliding-window prediction."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from lib.config import ConfigError, VLMConfig
from lib.data import random_patch_batch
from lib.inferer import DFMSlidingWindowInferer
from lib.training import train_loss
from lib.vlm import VLMEncoder, VLMError, axial_slice_indices, patch_condition, patch_texts


def _spy_prepare(system):
    seen = []
    orig = system.model.prepare

    def prepare(image, embedding=None):
        seen.append((image.detach().clone(), None if embedding is None else embedding.detach().clone()))
        return orig(image, embedding)

    system.model.prepare = prepare
    return seen


def test_tiny_clip_loads_through_from_pretrained(tiny_clip):
    enc = VLMEncoder.from_pretrained(VLMConfig(name_or_path=str(tiny_clip), text_mode="label", prompt="lung"))
    assert enc.image_embed_dim == 16 and enc.text_embed_dim == 16 and enc.embed_dim == 32
    assert not any(p.requires_grad for p in enc.parameters()), "the VLM must be frozen"
    e = patch_condition(enc, torch.rand(3, 1, 40, 40), ["lung"] * 3)
    assert e.shape == (3, 32)
    assert torch.allclose(e[:, :16].norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(VLMError, match="does not exist"):
        VLMEncoder.from_pretrained(VLMConfig(name_or_path="./no/such/folder"))
    # the presets' relative folder (not a hub id: "owner/name" has one slash): how to make it, not a hub error
    with pytest.raises(VLMError, match="does not exist.*make-tiny-vlm runs/vlm/missing-clip"):
        VLMEncoder.from_pretrained(VLMConfig(name_or_path="runs/vlm/missing-clip"))


def test_3d_patches_use_evenly_spaced_axial_slices(tiny_clip):
    assert axial_slice_indices(16, 3) == [2, 8, 13]
    enc = VLMEncoder.from_pretrained(VLMConfig(name_or_path=str(tiny_clip), num_slices=3, view="array"))
    vol = torch.rand(2, 2, 24, 24, 16)
    views, s = enc.views(vol)
    assert s == 3 and views.shape == (6, 3, 24, 24)
    # channels -> RGB: (c0, c1, mean) after the fixed window [0, 1]
    assert torch.allclose(views[0, 0], vol[0, 0, :, :, 2]) and torch.allclose(views[0, 2], vol[0, :, :, :, 2].mean(0))
    # the pooled embedding is the mean of the slices' embeddings
    per_slice = enc.encode_images(vol[:1, :, :, :, [2, 8, 13]].permute(0, 4, 1, 2, 3).reshape(3, 2, 24, 24))
    assert torch.allclose(enc.encode_images(vol[:1])[0], per_slice.mean(0), atol=1e-6)


def test_per_image_text_is_required_when_the_model_uses_it():
    cfg = VLMConfig(name_or_path="x", text_mode="image")
    assert patch_texts([{"text": "left lung"}], cfg) == ["left lung"]
    with pytest.raises(VLMError, match="has no 'text'"):
        patch_texts([{"image": "a.nii.gz", "case_id": "case7"}], cfg)
    assert patch_texts([{}], VLMConfig(name_or_path="x", text_mode="label", prompt="lung")) == ["lung"]


@pytest.mark.parametrize("sd", [2, 3])
def test_training_patch_and_inference_window_get_the_same_conditioning(make_system, sd):
    """The training path (random patch) and the sliding-window path condition the same patch identically."""
    patch = [32, 32] if sd == 2 else [16, 16, 16]
    system = make_system(spatial_dims=sd, patch=patch, features=(8, 16))
    size = [2 * p for p in patch]
    g = torch.Generator().manual_seed(0)
    image = MetaTensor(torch.rand(1, *size, generator=g))
    label = torch.zeros(1, *size)
    label[(0,) + tuple(p // 2 for p in patch)] = 1  # one foreground voxel: the positive crop is the first window
    item = {"image": image, "label": label, "case_id": "case0"}
    system.hparams.preprocessing.pos, system.hparams.preprocessing.neg = 1.0, 0.0
    batch = random_patch_batch([item], system.hparams.preprocessing, num_patches=1, augment=False)
    seen = _spy_prepare(system)
    train_loss(system, {**batch, "label": batch["label"]}, "cpu")
    (train_patch, train_emb), = seen
    assert torch.equal(train_patch, image[None, :, : patch[0], : patch[1]] if sd == 2
                       else image[None, :, : patch[0], : patch[1], : patch[2]])
    seen.clear()
    inferer = DFMSlidingWindowInferer(patch, sw_batch_size=1, overlap=0.0, steps=2)
    inferer(image[None], system)
    windows = [w for w, _ in seen]
    assert len(windows) == 2 ** sd and all(tuple(w.shape[2:]) == tuple(patch) for w in windows)
    first = [e for w, e in seen if torch.equal(w, train_patch)]
    assert first, "no inference window covers the training patch"
    assert torch.equal(first[0], train_emb)


def test_vlm_embedding_is_per_window_not_whole_image(make_system):
    """Regression: the earlier system embedded the whole image at test time but each patch in training."""
    system = make_system(patch=[32, 32])
    calls = []
    orig = system.vlm.encode_images

    def spy(patches):
        calls.append(tuple(patches.shape))
        return orig(patches)

    system.vlm.encode_images = spy
    seen = _spy_prepare(system)
    image = torch.rand(1, 1, 96, 80)
    DFMSlidingWindowInferer([32, 32], sw_batch_size=2, overlap=0.25, steps=2)(image, system)
    assert calls and all(c[2:] == (32, 32) for c in calls), f"VLM saw {calls}, not roi-sized windows"
    embs = torch.cat([e for _, e in seen])
    whole = patch_condition(system.vlm, image, ["a bright blob"])
    assert embs.shape[0] > 4 and embs.unique(dim=0).shape[0] == embs.shape[0], "windows got the same embedding"
    assert not any(torch.allclose(e, whole[0], atol=1e-4) for e in embs)
    for (w, e) in seen:  # every window's embedding is the conditioning of that window
        assert torch.allclose(e, patch_condition(system.vlm, w, ["a bright blob"] * w.shape[0]), atol=1e-6)


def _film_matters(system, std=0.5):
    with torch.no_grad():
        for h in system.model.vlm_film_heads.values():
            h.weight.normal_(0, std)
    return system


@pytest.mark.parametrize("shape,patch", [((50, 37), [32, 32]), ((20, 18, 13), [16, 16, 16]), ((12, 70), [32, 32])])
def test_prediction_has_the_size_of_the_input(make_system, shape, patch):
    system = make_system(spatial_dims=len(shape), patch=patch, features=(8, 16))
    inferer = DFMSlidingWindowInferer(patch, sw_batch_size=3, overlap=0.5, steps=2, num_samples=2)
    prob, var = inferer(torch.rand(1, 1, *shape), system, return_variance=True)
    assert tuple(prob.shape) == (1, 1, *shape) and tuple(var.shape) == (1, 1, *shape)
    assert var.max() > 0, "two samples from different noise must disagree somewhere"
    one, var1 = DFMSlidingWindowInferer(patch, sw_batch_size=3, overlap=0.5, steps=2)(
        torch.rand(1, 1, *shape), system, return_variance=True)
    assert var1.abs().max() == 0, "one sample has no variance"


@pytest.mark.parametrize("arch", ["unet", "cached"])
def test_same_seed_same_output_whatever_the_batching_window_order_and_threads(make_system, arch):
    """Seeds per (image, window position, sample): sw_batch_size, the memory cap, the window order and the
    thread count do not change the result (measured 0.29-0.36 apart before, one generator for all windows)."""
    from lib.inferer import window_seed

    system = _film_matters(make_system(arch=arch))
    img = torch.rand(1, 1, 80, 72, generator=torch.Generator().manual_seed(1))
    ref = DFMSlidingWindowInferer([32, 32], sw_batch_size=1, overlap=0.25, steps=3, num_samples=3)(img, system,
                                                                                                   seed=5)
    for bs, cap in ((4, None), (8, None), (8, 32 * 32), (8, "auto"), (4, 5 * 32 * 32)):
        out = DFMSlidingWindowInferer([32, 32], sw_batch_size=bs, overlap=0.25, steps=3, num_samples=3,
                                      max_batch_voxels=cap)(img, system, seed=5)
        assert (out - ref).abs().max() < 1e-5, (bs, cap, (out - ref).abs().max())
    other = DFMSlidingWindowInferer([32, 32], sw_batch_size=4, overlap=0.25, steps=3, num_samples=3)(img, system,
                                                                                                    seed=6)
    assert (other - ref).abs().max() > 0.05, "the seed must matter"
    # window order: the same windows in another order give the same per-window results, permuted
    wins = torch.stack([img[0, :, y:y + 32, x:x + 32] for y, x in ((0, 0), (24, 8), (48, 40), (10, 30))])
    seeds = [window_seed(5, [slice(None), slice(None), slice(y, y + 32), slice(x, x + 32)])
             for y, x in ((0, 0), (24, 8), (48, 40), (10, 30))]
    texts = system.texts_for(None, 4)
    a, _ = system.predict_windows(wins, texts, seeds, steps=3, num_samples=2)
    perm = [2, 0, 3, 1]
    b, _ = system.predict_windows(wins[perm], texts, [seeds[i] for i in perm], steps=3, num_samples=2)
    assert (a[perm] - b).abs().max() < 1e-5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c, _ = system.predict_windows(wins, texts, seeds, steps=3, num_samples=2)
    finally:
        torch.set_num_threads(threads)
    assert (a - c).abs().max() < 1e-5


def test_every_window_and_every_image_draws_its_own_noise(make_system):
    """A review: neither the window's position nor the image id was guarded (every window of an image sharing one
    stream, or every image one, passed the suite), and ids went through a 32-bit CRC ("plumless" and "buckeroo"
    shared a stream). Two windows of the same content at two positions sample differently; so do two image ids;
    the same position and id give the same result."""
    from lib.inferer import seed_for

    system = _film_matters(make_system())
    tile = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    img = torch.cat([tile, tile], dim=-1)  # two windows (overlap 0), the same pixels at two positions
    inf = DFMSlidingWindowInferer([32, 32], overlap=0.0, steps=3, num_samples=1)
    out = inf(img, system, seed=5)
    assert (out[..., :32] - out[..., 32:]).abs().max() > 0.05, "two positions must draw different noise"
    again = inf(tile, system, seed=5)  # the first position alone: the same stream
    assert (again - out[..., :32]).abs().max() < 1e-5
    a, b = (inf(tile, system, seed=seed_for(5, k)) for k in ("plumless", "buckeroo"))
    assert (a - b).abs().max() > 0.05, "two image ids must draw different noise"
    assert torch.equal(a, inf(tile, system, seed=seed_for(5, "plumless")))
    assert len({seed_for(s, k) for s in (0, 1) for k in ("a", "b", "plumless", "buckeroo")}) == 8


@pytest.mark.parametrize("mode", ["dfm", "plain"])
def test_a_network_returning_nan_is_an_error_not_an_empty_or_holed_mask(make_system, mode):
    """A review (2026-12-08): NaN never flips a voxel of the sampler's state and ``> 0.5`` reads it as background, so
    a checkpoint with a NaN weight segmented nothing, and NaN in part of a window left holes, without a word."""
    from lib.inferer import NonFiniteOutput

    system = make_system(mode=mode) if mode == "plain" else _film_matters(make_system())
    img = torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    inf = DFMSlidingWindowInferer([32, 32], steps=2, num_samples=2)
    assert torch.isfinite(inf(img, system, seed=1)).all()
    real = system.model.forward

    def corner_nan(*a, **kw):  # NaN logits in the top-left 4 x 4 of every window
        out = real(*a, **kw).clone()
        out[..., :4, :4] = float("nan")
        return out

    system.model.forward = corner_nan
    try:
        with pytest.raises(NonFiniteOutput, match=r"NaN for \d+ of \d+ window samples"):
            inf(img, system, seed=1)
    finally:
        system.model.forward = real
    with torch.no_grad():
        next(iter(system.model.parameters())).view(-1)[0] = float("nan")  # one NaN weight
    with pytest.raises(NonFiniteOutput, match="its weights or this input are not finite"):
        inf(img, system, seed=1)


def test_inferer_is_reproducible_and_seeded(make_system):
    system = _film_matters(make_system())
    img = torch.rand(1, 1, 48, 48)
    inf = DFMSlidingWindowInferer([32, 32], steps=3)
    a, b = inf(img, system, seed=5), inf(img, system, seed=5)
    assert torch.equal(a, b)
    assert (a - inf(img, system, seed=6)).abs().max() > 0.05


@pytest.mark.parametrize("arch", ["unet", "cached"])
def test_predictor_returns_the_mean_of_the_samples_p_final(make_system, arch):
    """Regression (the earlier system's sampler bug): the predictor's output is the mean over samples of
    sigmoid(model(x_1, t=1)) -- not the binarised mean, not the last posterior; the M samples batched along the
    batch axis equal the same samples run one by one with the same streams."""
    from lib.flow import make_scheduler
    from lib.samplers import ItemNoise, derive_seed, sample_source_like, sampler_dfm_euler

    system = _film_matters(make_system(arch=arch))
    wins = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = system.texts_for(None, 2)
    mean, var = system.predict_windows(wins, texts, [7, 8], steps=2, num_samples=3)
    cond = system.condition(wins, texts)
    finals, posts = [], []
    with torch.no_grad():
        for w, seed in enumerate((7, 8)):
            for m in range(3):
                noise = ItemNoise([derive_seed(seed, m)])
                x0 = sample_source_like((1, 1, 32, 32), 0.5, noise)
                trace = {}
                finals.append(sampler_dfm_euler(system.model, cond[[w]], x0, 2, make_scheduler(system.hparams.flow),
                                                generator=noise, trace=trace))
                posts.append(trace["last_posterior"])
    ref = torch.cat(finals).view(2, 3, 1, 32, 32)
    assert (mean - ref.mean(1)).abs().max() < 1e-5 and (var - ref.var(1, unbiased=False)).abs().max() < 1e-5
    assert ((mean > 0.02) & (mean < 0.98)).float().mean() > 0.05, "a probability map, not a binary one"
    last = torch.cat(posts).view(2, 3, 1, 32, 32).mean(1)
    assert (mean - last).abs().max() > 0.05, "the last posterior is not p_final"


def test_roi_is_the_training_patch_unless_explicitly_allowed(make_system):
    """The roi decides the VLM's field of view: a bigger roi (or roi >= image: the whole image) is the earlier
    system's conditioning bug, so it is refused with the reason, everywhere, unless explicitly allowed."""
    from lib.config import ConfigError, SamplerConfig
    from lib.evaluation import make_inferer

    system = make_system(patch=[32, 32])
    assert make_inferer(system).roi_size == system.hparams.preprocessing.patch_size == [32, 32]
    with pytest.raises(ConfigError, match="whole image"):
        make_inferer(system, roi_size=[64, 64])
    with pytest.raises(ConfigError, match="training patch size"):
        SamplerConfig(roi_size=[64, 64]).resolved([32, 32])
    img = torch.rand(1, 1, 64, 64)
    with pytest.raises(ConfigError, match="field of view"):  # a hand-made inferer is refused by the predictor
        DFMSlidingWindowInferer([64, 64], steps=2)(img, system)
    out = make_inferer(system, roi_size=[64, 64], steps=2, allow_roi_mismatch=True)(img, system)
    assert out.shape == img.shape
    # an allowed roi the U-Net cannot take (3 levels: sides must be multiples of 4) is named, not a size mismatch
    # deep in the decoder
    with pytest.raises(ConfigError, match=r"roi_size \[30, 30\]: every side must be a multiple of 4"):
        make_inferer(system, roi_size=[30, 30], steps=2, allow_roi_mismatch=True)(img, system)


def test_a_patch_size_the_unet_cannot_take_is_refused_by_name(make_system):
    make_system(patch=[32, 24], mode="plain")  # multiples of 4 (features 8, 16, 32): fine (no VLM: not square)
    with pytest.raises(ConfigError, match=r"preprocessing.patch_size \[32, 30\]: every side must be a multiple "
                                          r"of 4 .*e.g. \[32, 32\]"):
        make_system(patch=[32, 30])


def test_a_text_embedding_does_not_depend_on_the_precision_that_first_used_it(tiny_clip):
    """The text cache outlives a request: a text first encoded under bf16 autocast (a bf16 request, bf16 training)
    must give later fp32 callers the fp32 embedding (it gave the bf16-rounded one: 2.8e-3 apart)."""
    cfg = VLMConfig(name_or_path=str(tiny_clip), text_mode="label", prompt="lung")
    first_bf16 = VLMEncoder.from_pretrained(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = first_bf16.encode_texts(["the lungs"])
    fresh = VLMEncoder.from_pretrained(cfg).encode_texts(["the lungs"])
    assert torch.equal(first_bf16.encode_texts(["the lungs"]), fresh)
    assert torch.equal(under_bf16, fresh)


def test_prediction_runs_in_eval_mode_and_restores_each_module_s_own_mode(make_system):
    """Regression: the inferer restored .training on the container, which put the frozen VLM in train mode for
    every training step after the first validation."""
    system = make_system()
    system.train()  # a training loop's state
    assert not system.vlm.model.training, "the frozen VLM stays in eval mode inside a training container"
    seen = []
    system.model.head.register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    system.vlm.model.register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    DFMSlidingWindowInferer([32, 32], steps=2)(torch.rand(1, 1, 40, 40), system)
    assert seen and not any(seen), "prediction must run in eval mode"
    assert system.model.training and system.training, "the training state comes back"
    assert not system.vlm.model.training and not any(m.training for m in system.vlm.model.modules())
    from lib.inferer import eval_mode

    system.model.enc[0].eval()  # a submodule deliberately in eval mode keeps it
    with eval_mode(system):
        pass
    assert system.model.training and not system.model.enc[0].training


def test_overlapping_predictions_in_two_threads_keep_eval_mode_and_the_cuda_flags():
    """A review: each prediction saved the process-wide cuDNN/TF32 flags (and each module's train flag) on entry and
    wrote them back on exit. Two threads overlapping (A enters, B enters, A leaves, B leaves): A's exit turned TF32
    and cuDNN's autotuning back on (and the model back to train mode) while B still predicted, and B's exit wrote
    back A's settings, so TF32 stayed off for good. Now the first to enter saves, the last to leave restores."""
    import threading

    from lib.inferer import eval_mode
    from lib.precision import reproducible

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.Dropout(0.5)).train()  # a training's model
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with reproducible(), eval_mode(net):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with reproducible(), eval_mode(net):
            b_in.set()
            a_out.wait(10)  # A has left: B still predicts
            seen["flags"] = (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32)
            seen["training"] = [m.training for m in net.modules()]

    try:
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32 = True, False, True, True
        threads = [threading.Thread(target=f) for f in (a, b)]
        [t.start() for t in threads]
        [t.join(20) for t in threads]
        assert seen["flags"] == (False, True, False, False), "a prediction still running lost its settings"
        assert not any(seen["training"]), "a prediction still running was put back in train mode"
        after = (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32)
        assert after == (True, False, True, True), "the process's own settings come back when both are done"
        assert all(m.training for m in net.modules())
    finally:
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32 = before


def test_inferer_rejects_bad_settings(make_system):
    from lib.config import ConfigError

    for kw, msg in (({"steps": 0}, "steps"), ({"overlap": 2.0}, "overlap"), ({"sampler": "rk9"}, "sampler"),
                    ({"num_samples": 0}, "num_samples")):
        with pytest.raises(ConfigError, match=msg):
            DFMSlidingWindowInferer([32, 32], **kw)
    system = make_system()
    with pytest.raises(ValueError, match="2D"):
        DFMSlidingWindowInferer([32, 32])(torch.rand(1, 1, 8, 8, 8), system)
    with pytest.raises(ValueError, match="1 image channel"):
        DFMSlidingWindowInferer([32, 32])(torch.rand(1, 2, 40, 40), system)


def test_random_patch_batch_respects_pos_neg_ratio(make_system):
    system = make_system()
    label = torch.zeros(1, 96, 96)
    label[:, 40:56, 40:56] = 1
    item = {"image": MetaTensor(torch.rand(1, 96, 96)), "label": label, "case_id": "c"}
    pre = system.hparams.preprocessing
    pre.pos, pre.neg = 1.0, 0.0
    b = random_patch_batch([item], pre, num_patches=8, seed=1)
    assert b["image"].shape == (8, 1, 32, 32) and b["label"].shape == (8, 1, 32, 32)
    centers = np.array(b["center"])
    assert (np.abs(centers - 47.5) <= 8.5).all(), "positive centres must lie in the foreground"
    pre.pos, pre.neg = 0.0, 1.0
    b = random_patch_batch([item], pre, num_patches=8, seed=1)
    centers = np.array(b["center"])
    inside = ((centers >= 40) & (centers < 56)).all(axis=1)
    assert not inside.any(), "negative centres must lie in the background"


def test_items_per_call_auto_by_device_and_explicit_caps_as_given():
    """The memory cap's "auto": on a CPU small calls (measured 2x faster for 2D, and at least 2 items: one 48^3 item
    per call 4x slower, bench/cap_bench.py), on a GPU up to 2**21 voxels; an integer is a cap, used as given."""
    from lib.config import SamplerConfig
    from lib.inferer import items_per_call

    assert SamplerConfig().max_batch_voxels == "auto"
    assert items_per_call(96 * 96, "cpu") == 4  # 40960 // 9216
    assert items_per_call(48 ** 3, "cpu") == 2  # at least 2
    assert items_per_call(96 * 96, "cuda") == 227 and items_per_call(48 ** 3, "cuda:0") == 18
    assert items_per_call(96 * 96, "cpu", 2 ** 21) == 227  # an explicit cap is honoured, on a CPU too
    assert items_per_call(48 ** 3, "cpu", 48 ** 3) == 1
    assert items_per_call(96 * 96, "cpu", None) == 4
    with pytest.raises(ConfigError, match="max_batch_voxels"):
        SamplerConfig(max_batch_voxels="fast").resolved()
    with pytest.raises(ConfigError, match="max_batch_voxels"):
        SamplerConfig(max_batch_voxels=0).resolved()


def test_predict_windows_uses_the_auto_cap(make_system, monkeypatch):
    """The predictor's network calls follow items_per_call: 4 windows x 8 samples of 32^2 on a CPU run in calls of
    40960 // 1024 = 40 items (one call), an explicit cap of 3 windows' voxels in calls of 3."""
    system = make_system(arch="cached")
    sizes = []
    real = system.model.forward

    def spy(x, *a, **k):
        if x is not None:
            sizes.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(system.model, "forward", spy)
    wins = torch.rand(4, 1, 32, 32)
    texts = system.texts_for(None, 4)
    system.predict_windows(wins, texts, [0, 1, 2, 3], steps=1, num_samples=8)
    assert set(sizes) == {32}, sizes
    sizes.clear()
    system.predict_windows(wins, texts, [0, 1, 2, 3], steps=1, num_samples=8, max_batch_voxels=3 * 32 * 32)
    assert set(sizes) == {3, 2}, sizes  # 32 items = 10 calls of 3 + one of 2, per network evaluation
    sizes.clear()
    import lib.inferer

    # the CPU's auto value (not the GPU's, not the checkpoint's number) decides: 5 windows' voxels -> calls of 5
    monkeypatch.setattr(lib.inferer, "CPU_AUTO_VOXELS", 5 * 32 * 32)
    system.predict_windows(wins, texts, [0, 1, 2, 3], steps=1, num_samples=8)
    assert set(sizes) == {5, 2}, sizes  # 6 calls of 5 + one of 2


def test_the_cli_cap_reaches_the_inferer_and_refuses_nonsense(make_system, capsys):
    """``--max-batch-voxels auto|N`` on predict/evaluate: parsed, refused when not 'auto' or an integer >= 1 (exit 2
    naming the rule), and handed to the one inferer."""
    from lib.cli import _inferer, build_parser

    base = ["evaluate", "--checkpoint", "m.pt", "--datalist", "d.json", "--out", "o"]
    for text, expected in (("auto", "auto"), ("4096", 4096), (None, None)):
        a = build_parser().parse_args(base + ([] if text is None else ["--max-batch-voxels", text]))
        assert a.max_batch_voxels == expected
        # not given: the checkpoint's own setting ("auto" here)
        assert _inferer(make_system(), a).max_batch_voxels == (expected or "auto")
    for bad in ("0", "-5", "fast", "1e6"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(base + ["--max-batch-voxels", bad])
        assert e.value.code == 2
        assert "'auto' or an integer >= 1" in capsys.readouterr().err


def test_a_label_model_predicts_with_its_training_prompt_whatever_text_an_image_carries(make_system):
    """A review: text_mode "label" trains every patch on ``vlm.prompt`` (lib.vlm.patch_texts), but inference used
    the datalist entry's ``text`` (or ``predict --text``) when there was one: another conditioning than training's.
    The image's text is now ignored for a label model (a prompted model's free prompt stays the override)."""
    system = _film_matters(make_system(text_mode="label"))  # FiLM heads of zeros: no text could change the output
    assert system.texts_for("the patient's left kidney", 3) == [system.vlm.cfg.prompt] * 3
    img = torch.rand(1, 1, 40, 40)
    inf = DFMSlidingWindowInferer([32, 32], steps=2, seed=0)
    own = inf(img, system)
    assert torch.equal(inf(img, system, text="the patient's left kidney"), own)
    prompt, system.vlm.cfg.prompt = system.vlm.cfg.prompt, "the patient's left kidney"
    try:  # the control: this model's output does follow the text it is conditioned on
        assert (inf(img, system) - own).abs().max() > 1e-3
    finally:
        system.vlm.cfg.prompt = prompt
    # a text_mode "image" model without a text: the library's error (CLI: one line, exit 2), not a bare ValueError
    with pytest.raises(VLMError, match="text_mode='image'"):
        make_system(text_mode="image").texts_for(None, 1)


def test_vlm_views_must_be_square(make_system):
    """A review: a CLIP processor resizes the shortest edge and centre-crops a square, so with a non-square patch the
    VLM never saw the window's outer parts. Non-square VLM views are refused when the config is resolved."""
    with pytest.raises(ConfigError, match=r"patch_size \[32, 24\] gives the VLM 32 x 24 views: VLM views must be "
                                          r"square"):
        make_system(patch=[32, 24])
    make_system(patch=[32, 24], mode="plain")  # no VLM: any side the U-Net takes
    make_system(spatial_dims=3, features=(8, 16), patch=[16, 16, 8])  # RAS: axial views are 16 x 16 (R/L x A/P)
    with pytest.raises(ConfigError, match=r"gives the VLM 8 x 16 views"):
        make_system(spatial_dims=3, features=(8, 16), patch=[16, 8, 16])


def test_a_prompt_longer_than_the_text_model_is_truncated(tiny_clip):
    """A review: CLIP texts were tokenised with truncation=True but no max_length, and the tiny CLIP's tokenizer
    had no model_max_length: a prompt of more than 63 tokens crashed in the position embedding. Texts are truncated
    to the text model's max_position_embeddings (whatever the tokenizer's own limit)."""
    enc = VLMEncoder.from_pretrained(VLMConfig(name_or_path=str(tiny_clip), text_mode="label", prompt="lung"))
    assert enc.tokenizer.model_max_length == enc.model.config.text_config.max_position_embeddings == 64
    enc.tokenizer.model_max_length = int(1e30)  # a tokenizer that names no limit of its own (as ours did)
    long = "the whole of the left lung field " * 20
    e = enc.encode_texts([long, "lung"])
    assert e.shape == (2, enc.text_embed_dim) and torch.isfinite(e).all()


def test_the_tiny_clip_embeds_a_prompt_whole_and_a_vlm_that_pools_at_one_token_is_named(tiny_clip):
    """A review (2026-12-07): the tiny CLIP had its end of text at id 2, which transformers' CLIP reads as the legacy
    rule "pool at the highest token id": a prompt was embedded by its highest-id character, so "tumour core in a
    brain MRI" and "tumour" had one embedding (cosine 1.000000), and so had "...right lung" and "...left lung". Its
    end of text is now the last id, as in OpenAI's vocabulary; a VLM that still pools so is named when it loads."""
    from lib.vlm import legacy_eos_pooling

    enc = VLMEncoder.from_pretrained(VLMConfig(name_or_path=str(tiny_clip), text_mode="label", prompt="lung"))
    for a, b in (("tumour core in a brain MRI", "tumour"), ("the patient's right lung", "the patient's left lung"),
                 ("a lesion in a CT scan", "a lesion in a CT scan of the liver")):
        e = enc.encode_texts([a, b])
        assert torch.nn.functional.cosine_similarity(e[:1], e[1:]).item() < 0.999, (a, b)
    assert legacy_eos_pooling(enc.model, enc.tokenizer) is None
    enc.model.config.text_config.eos_token_id = 2  # the legacy rule, with an end of text that is not the last id
    enc.tokenizer.eos_token = "a"
    assert "pools each prompt at its highest token id" in legacy_eos_pooling(enc.model, enc.tokenizer)


def test_a_vlm_saved_in_half_precision_runs_in_fp32(tiny_clip, tmp_path):
    """A review (2026-12-07): from_pretrained keeps the dtype the weights were saved in, so a VLM saved in fp16 ran
    in fp16 on the CPU (slow without the instructions; its embeddings not the fp32 ones the precision policy
    assumes)."""
    import shutil

    from transformers import AutoModel

    half = tmp_path / "half-clip"
    shutil.copytree(tiny_clip, half)
    AutoModel.from_pretrained(str(tiny_clip)).half().save_pretrained(str(half))
    enc = VLMEncoder.from_pretrained(VLMConfig(name_or_path=str(half), text_mode="label", prompt="lung"))
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}


def test_the_text_embedding_cache_is_bounded_and_keeps_what_is_used(tiny_clip):
    """A review: the text cache grew with every free prompt a server was sent. It is a least-recently-used cache of
    ``text_cache_size`` entries; evictions never change an embedding."""
    enc = VLMEncoder.from_pretrained(VLMConfig(name_or_path=str(tiny_clip), text_mode="label", prompt="lung"))
    enc.text_cache_size = 3
    texts = [f"prompt {i}" for i in range(6)]
    ref = enc._encode_text_uncached(texts)
    for t in texts[:3]:
        enc.encode_texts([t])
    enc.encode_texts([texts[0]])  # used again: the most recent
    enc.encode_texts(texts[3:5])
    assert list(enc._text_cache) == [texts[0], texts[3], texts[4]]
    assert torch.allclose(enc.encode_texts(texts), ref, atol=1e-6)  # more texts in one call than the cache holds
    assert len(enc._text_cache) == 3


def test_a_roi_size_of_the_wrong_dimensionality_is_a_config_error(make_system):
    """A review: ``--roi-size 32 32 32 --allow-roi-mismatch`` on a 2D model raised a bare ValueError deep in the
    inferer (CLI: a traceback, exit 1). It is a ConfigError at the inferer's construction (and at its call)."""
    from lib.evaluation import make_inferer

    system = make_system()
    with pytest.raises(ConfigError, match=r"roi_size \[32, 32, 32\] has 3 values; the model is 2D"):
        make_inferer(system, roi_size=[32, 32, 32], allow_roi_mismatch=True)
    with pytest.raises(ConfigError, match="is 3D"):
        DFMSlidingWindowInferer([32, 32, 32], steps=1)(torch.rand(1, 1, 40, 40), system)
